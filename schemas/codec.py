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


def decode(data: bytes, kind: type[T]) -> T:
    return decoder(kind).decode(data)


def error_cause(exc: msgspec.DecodeError) -> str:
    """A short, stable name for why a message was rejected, used to count drops per cause."""
    if isinstance(exc, msgspec.ValidationError):
        return "invalid_fields"
    return "malformed_json"
