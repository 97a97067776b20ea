"""JSON encoding and decoding, with encoders and decoders built once per type."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

T = TypeVar("T")

_encoder = msgspec.json.Encoder()

DecodeError = msgspec.DecodeError  # ValidationError is a subclass: both mean "bad input"


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}


def decoder(kind: type[T]) -> msgspec.json.Decoder[T]:
    """The one decoder for `kind` (decoders are reused: building one costs more than decoding)."""
    found = _decoders.get(kind)
    if found is None:
        found = _decoders[kind] = msgspec.json.Decoder(kind)
    return found


class TooDeep(msgspec.DecodeError):
    """Nested deeper than the decoder goes (msgspec raises RecursionError)."""


class NotUtf8(msgspec.DecodeError):
    """Not UTF-8 (msgspec raises UnicodeDecodeError)."""


def decode(data: bytes, kind: type[T]) -> T:
    """Decodes or raises DecodeError: every way bad bytes can fail is one exception."""
    try:
        return decoder(kind).decode(data)
    except RecursionError as exc:
        raise TooDeep("JSON nested too deeply") from exc
    except UnicodeDecodeError as exc:
        raise NotUtf8(f"not valid UTF-8 at byte {exc.start}") from exc


def error_cause(exc: msgspec.DecodeError) -> str:
    """A short, stable name for why a message was rejected, used to count drops per cause."""
    if isinstance(exc, msgspec.ValidationError):
        return "invalid_fields"
    if isinstance(exc, TooDeep):
        return "too_deep"
    if isinstance(exc, NotUtf8):
        return "invalid_utf8"
    return "malformed_json"
