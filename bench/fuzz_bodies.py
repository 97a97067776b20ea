"""Hypothesis strategies for every body gatefleet takes in, and the bytes they become.

A body is drawn as a tree of JSON values (dicts as lists of pairs, so a key can repeat)
with three kinds of leaf besides the plain ones: `Raw` bytes written as they are (NaN and
Infinity tokens, 400-digit numbers, 1e400, invalid UTF-8, nesting 100,000 deep), and
`Correct`, a placeholder for a value only known when the body is sent (the distribution
id of the push a ConfigAck answers, the id of the gateway a pong speaks for). `render`
turns a tree into the bytes put on the wire.

Each drawn body carries `expect`: what docs/PROTOCOL.md says gatefleet must do with it,
"accept", "reject", or "either" where the protocol is silent (e.g. invalid UTF-8 inside
a field that is ignored). The load process compares it with what the edge does; the
exact drop counts it checks come from decoding each delivered body as the edge does.

A shot is one message of a family: gateway messages published (`heartbeat`, `goodbye`,
`gateway_subject`: odd subjects under `P.gw.`), API requests (`api` to each
`P.api.*` endpoint, `api_no_reply` published without a reply subject, `api_subject`:
subjects nobody serves) and answers to gatefleet's requests (`pong`, `ack`), which are
templates rendered when a ping or a push arrives.
"""

from __future__ import annotations

import base64
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC
from typing import Any, Final, Literal

import hypothesis
import msgspec
from hypothesis import strategies as st

from schemas.api import MAX_TARGETS
from schemas.endpoints import ENDPOINTS
from schemas.types import MAX_COUNT, STRATEGIES

Expect = Literal["accept", "reject", "either"]
Family = Literal[
    "heartbeat", "goodbye", "gateway_subject", "api", "api_no_reply", "api_subject", "pong", "ack"
]

# Gateways the fuzz speaks for: `hb` ids get the fuzzed heartbeats, `bye` ids the fuzzed
# goodbyes (kept apart: a goodbye removes a gateway and its heartbeat count), `extra` ids
# stand for "a valid id gatefleet has not seen yet" (each registers on its first good beat).
HB_POOL: Final = tuple(f"fz-hb-{n:02}" for n in range(16))
BYE_POOL: Final = tuple(f"fz-bye-{n:02}" for n in range(8))
EXTRA_POOL: Final = tuple(f"fz-new-{n:02}" for n in range(24))
POOL: Final = (*HB_POOL, *BYE_POOL, *EXTRA_POOL)
DEEP: Final = 20_000  # nesting no decoder follows
SHALLOW: Final = 50  # nesting any decoder follows


@dataclass(frozen=True, slots=True)
class Raw:
    """Bytes written into the body as they are."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Correct:
    """The right value of `name` for the request being answered (see `render`)."""

    name: str


@dataclass(frozen=True, slots=True)
class Obj:
    """A JSON object as (key, value) pairs: keys may repeat or be Raw."""

    pairs: tuple[tuple[str | Raw, Any], ...]


@dataclass(frozen=True, slots=True)
class Shot:
    family: Family
    subject: str  # "" for answers (pong, ack): they go to the request's reply subject
    body: Any  # a tree; `render` makes the bytes
    expect: Expect
    note: str  # what was done to it, for reports


def render(node: Any, correct: Mapping[str, Any] | None = None) -> bytes:
    """The JSON bytes of a tree; `Correct` leaves take their value from `correct`."""
    parts: list[bytes] = []
    _render(node, correct or {}, parts)
    return b"".join(parts)


def _render(node: Any, correct: Mapping[str, Any], out: list[bytes]) -> None:
    if isinstance(node, Raw):
        out.append(node.data)
    elif isinstance(node, Correct):
        out.append(msgspec.json.encode(correct[node.name]))
    elif isinstance(node, Obj):
        out.append(b"{")
        for i, (key, value) in enumerate(node.pairs):
            if i:
                out.append(b",")
            _render(key, correct, out)
            out.append(b":")
            _render(value, correct, out)
        out.append(b"}")
    elif isinstance(node, list):
        out.append(b"[")
        for i, item in enumerate(node):
            if i:
                out.append(b",")
            _render(item, correct, out)
        out.append(b"]")
    elif isinstance(node, float) and not math.isfinite(node):
        out.append(b"NaN" if math.isnan(node) else b"Infinity" if node > 0 else b"-Infinity")
    elif isinstance(node, int) and not isinstance(node, bool):
        out.append(str(node).encode())  # any size: msgspec would refuse past 64 bits
    else:
        out.append(msgspec.json.encode(node))


# Values ---------------------------------------------------------------------------------

# A value with its verdict under the protocol: True valid, False invalid, None either.
Judged = tuple[Any, bool | None]


def _ok(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Judged]:
    return strategy.map(lambda v: (v, True))


def _bad(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Judged]:
    return strategy.map(lambda v: (v, False))


def _maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Judged]:
    return strategy.map(lambda v: (v, None))


huge_ints = st.integers(min_value=10**399, max_value=10**400 - 1)
extreme_ints = st.one_of(
    st.sampled_from([-1, MAX_COUNT + 1, 2**63, 2**64, -(2**63) - 1]),
    huge_ints,
    huge_ints.map(lambda n: -n),
    st.integers(max_value=-1),
)
number_tokens = st.sampled_from(
    [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"+1", b"01", b"1.", b".5", b"0x10"]
).map(Raw)
tiny_floats = st.sampled_from([b"1e-400", b"-0.0", b"-0", b"0e0", b"4.9e-324"]).map(Raw)
invalid_utf8 = st.sampled_from(
    [b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"a\x80b"]
).map(lambda bad: Raw(b'"' + bad + b'"'))
bad_escapes = st.sampled_from([b'"\\ud800"', b'"\\x41"', b'"\\u12"', b'"\n"']).map(Raw)


def deep(depth: int, opener: bytes = b"[") -> Raw:
    closer = b"]" if opener == b"[" else b"}"
    if opener == b"[":
        return Raw(b"[" * depth + b"]" * depth)
    return Raw(b'{"a":' * depth + b"1" + closer * depth)


deep_values = st.sampled_from([deep(DEEP), deep(DEEP, b"{"), deep(5000), deep(5000, b"{")])
shallow_nesting = st.sampled_from([deep(SHALLOW), deep(SHALLOW, b"{"), deep(3)])
huge_texts = st.sampled_from([257, 257, 4097, 4097, 20_000, 100_000]).flatmap(
    lambda n: st.sampled_from(["x", "é", "\u2028", "\x00", "😀"]).map(lambda c: c * n)
)
texts = st.text(max_size=40)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), texts
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(texts, inner, max_size=4).map(lambda d: Obj(tuple(d.items()))),
    ),
    max_leaves=12,
)
wrong_types = st.one_of(
    st.none(), st.booleans(), texts, st.lists(scalars, max_size=3), st.just(Obj(()))
)
# Wrong types for a string field and for a boolean one.
non_strings = st.one_of(
    st.none(), st.booleans(), st.integers(), st.lists(scalars, max_size=3), st.just(Obj(()))
)
non_booleans = st.one_of(
    st.none(), texts, st.integers(), st.lists(scalars, max_size=3), st.just(Obj(()))
)
token_chars = st.characters(
    blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp"), blacklist_characters=".*> \t\r\n"
)
valid_ids = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
invalid_ids = st.one_of(
    st.just(""),
    st.text(alphabet="abc", min_size=65, max_size=80),
    st.text(token_chars, min_size=1, max_size=10).filter(lambda s: not s.isascii()),
    st.sampled_from(["a.b", "a b", "a*", ">", "id%", "$SYS", "ïd"]),
)


def _is_token(text: str) -> bool:
    """Publishable as one subject token (no separator, wildcard or white space)."""
    return bool(text) and not any(c in text for c in ".*> \t\r\n")


def _choice(*weighted: tuple[int, st.SearchStrategy[Judged]]) -> st.SearchStrategy[Judged]:
    """one_of with integer weights (each branch repeated)."""
    return st.one_of(*[s for weight, s in weighted for _ in range(weight)])


@dataclass(frozen=True, slots=True)
class Values:
    """A field's values: `valid` ones only, and `mixed` (valid twice as often as not)."""

    valid: st.SearchStrategy[Judged]
    mixed: st.SearchStrategy[Judged]


def values(
    valid: Sequence[tuple[int, st.SearchStrategy[Judged]]],
    invalid: Sequence[tuple[int, st.SearchStrategy[Judged]]],
) -> Values:
    total_valid = sum(w for w, _ in valid)
    total_invalid = sum(w for w, _ in invalid)
    # Scaled so that the valid branches together weigh twice the invalid ones.
    mixed = [(w * 2 * total_invalid, s) for w, s in valid] + [
        (w * total_valid, s) for w, s in invalid
    ]
    return Values(_choice(*valid), _choice(*_reduced(mixed)))


def _reduced(
    weighted: list[tuple[int, st.SearchStrategy[Judged]]],
) -> list[tuple[int, st.SearchStrategy[Judged]]]:
    divisor = math.gcd(*(w for w, _ in weighted))
    return [(w // divisor, s) for w, s in weighted]


def count_field(*, minimum: int = 0) -> Values:
    """A count (or version): an integer from `minimum` to 2^53."""
    return values(
        [
            (3, _ok(st.integers(min_value=minimum, max_value=MAX_COUNT))),
            (1, _ok(st.sampled_from([minimum, minimum + 1, MAX_COUNT - 1, MAX_COUNT]))),
        ],
        [
            (2, _bad(extreme_ints.filter(lambda n: n < minimum or n > MAX_COUNT))),
            (1, _bad(st.floats().filter(lambda f: not f.is_integer()) | number_tokens)),
            (1, _bad(wrong_types)),
        ],
    )


def float_field(low: float, high: float) -> Values:
    return values(
        [
            (3, _ok(st.floats(min_value=low, max_value=high))),
            (1, _ok(st.sampled_from([low, high, math.nextafter(high, low), 5e-324]))),
            (1, _ok(st.integers(min_value=math.ceil(low), max_value=math.floor(high)))),
            (1, _maybe(tiny_floats)),
        ],
        [
            (2, _bad(st.floats().filter(lambda f: not low <= f <= high))),
            (1, _bad(number_tokens | huge_ints)),
            (1, _bad(wrong_types)),
        ],
    )


def text_field(low: int, high: int) -> Values:
    """A string of `low` to `high` characters."""
    return values(
        [
            (3, _ok(st.text(min_size=low, max_size=min(high, 80)))),
            (1, _ok(st.sampled_from([low, high]).map(lambda n: "y" * n))),
            (1, _ok(st.sampled_from(["\x00", "😀", "\u2028", "é"]).map(lambda c: c * high))),
        ],
        [
            (1, _bad(huge_texts.filter(lambda s: len(s) > high))),
            (1, _bad(invalid_utf8 | bad_escapes)),
            (1, _bad(st.integers() | st.lists(texts, max_size=2))),
        ],
    )


def id_field() -> Values:
    return values(
        [(3, _ok(st.sampled_from(POOL))), (1, _ok(valid_ids))],
        [(2, _bad(invalid_ids)), (1, _bad(non_strings | invalid_utf8))],
    )


def literal_field(choices: Sequence[str]) -> Values:
    return values(
        [(1, _ok(st.sampled_from(choices)))],
        [
            (1, _bad(st.sampled_from([v.upper() for v in choices] + [v + " " for v in choices]))),
            (1, _bad(texts.filter(lambda s: s not in choices))),
            (1, _bad(non_strings)),
        ],
    )


def nullable(field: Values) -> Values:
    """null allowed: valid, wherever it was drawn (a wrong type elsewhere)."""

    def null_ok(judged: Judged) -> Judged:
        return (None, True) if judged[0] is None else judged

    null = _ok(st.none())
    return Values(null | field.valid, null | field.mixed.map(null_ok))


def only(valid: st.SearchStrategy[Judged], invalid: st.SearchStrategy[Judged]) -> Values:
    return values([(1, valid)], [(1, invalid)])


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    values: Values
    required: bool = False


unknown_fields = st.tuples(
    st.text(min_size=1, max_size=12),
    _choice(
        (3, _ok(json_values)),
        (1, _ok(shallow_nesting | huge_texts)),
        (1, _bad(deep_values)),
        (1, _maybe(invalid_utf8)),
        (1, _bad(st.sampled_from([Raw(b"NaN"), Raw(b"Infinity"), Raw(b"-Infinity")]))),
    ),
)


# Placeholder values used when a template must be rendered before it is sent (truncation).
_PLACEHOLDERS: Final = {
    "gateway_id": "fz-hb-00",
    "distribution_id": "dist-00000000-0000-0000-0000-000000000000",
    "version": 1,
}


def _describe(value: Any) -> str:
    text = repr(value.data[:24]) if isinstance(value, Raw) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


whole_bodies = st.one_of(
    st.just((Raw(b""), "either", "empty")),
    st.binary(min_size=1, max_size=64)
    .filter(lambda b: not b.lstrip().startswith(b"{"))
    .map(lambda b: (Raw(b), "reject", "random bytes")),
    st.one_of(st.none(), st.booleans(), st.integers(), texts, st.lists(scalars, max_size=3)).map(
        lambda v: (v, "reject", f"not an object: {_describe(v)}")
    ),
    deep_values.map(lambda r: (r, "reject", "nested too deep")),
    number_tokens.map(lambda r: (r, "reject", f"bare {r.data!r}")),
    invalid_utf8.map(lambda r: (r, "reject", "invalid UTF-8")),
    st.just((Raw(b"{" * 3), "reject", "unclosed")),
)


# The bodies of each message ---------------------------------------------------------------


def _id_answer(name: str) -> Field:
    """The gateway_id of a heartbeat, a goodbye, a pong or an ack: mostly the right one
    (the id of the subject, or of the gateway asked); a pool id may be it by chance."""
    return Field(
        name,
        values(
            [(1, _ok(st.just(Correct(name))))],
            [
                (1, _maybe(st.sampled_from(POOL))),
                (1, _bad(valid_ids)),
                (1, _bad(invalid_ids | wrong_types | invalid_utf8)),
            ],
        ),
        required=True,
    )


def _objects(judged: st.SearchStrategy[Judged]) -> st.SearchStrategy[Judged]:
    return judged.map(
        lambda j: (Obj(tuple(j[0].items())) if isinstance(j[0], dict) else j[0], j[1])
    )


def _capped(field: Values, most: int) -> Values:
    """A count field whose valid values above `most` are invalid (a limit's maximum)."""

    def cap(judged: Judged) -> Judged:
        value, verdict = judged
        return value, False if isinstance(value, int) and value > most else verdict

    return Values(field.valid.map(cap), field.mixed.map(cap))


config_type_names = st.from_regex(r"[A-Za-z0-9_]{1,64}", fullmatch=True)
ts_values = values(
    [
        (4, _ok(st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat()))),
        (1, _ok(st.sampled_from(["0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z"]))),
        (1, _maybe(st.sampled_from(["2026-01-01T00:00:00", "2026-01-01T00:00:00+14:00"]))),
    ],
    [
        (1, _bad(st.sampled_from(["2026-13-01T00:00:00Z", "yesterday", "", "1e9"]))),
        (1, _bad(st.integers() | st.none())),
    ],
)
config_versions = values(
    [
        (
            3,
            _objects(
                _ok(st.dictionaries(config_type_names, st.integers(0, MAX_COUNT), max_size=4))
            ),
        ),
        (1, _objects(_ok(st.sampled_from([0, 256]).map(lambda n: {f"T{i}": i for i in range(n)})))),
    ],
    [
        (1, _objects(_bad(st.just({f"T{i}": i for i in range(257)})))),
        (
            1,
            _objects(
                _bad(st.sampled_from(["", "a.b", "a-b", "ü", "x" * 65]).map(lambda k: {k: 1}))
            ),
        ),
        (1, _objects(_bad(extreme_ints.map(lambda n: {"Route": n})))),
        (1, _bad(st.none() | st.lists(scalars, max_size=2) | texts)),
    ],
)
labels = values(
    [
        (3, _objects(_ok(st.dictionaries(st.text(max_size=20), st.text(max_size=20), max_size=4)))),
        (1, _objects(_ok(st.just({f"k{i}": "v" * 256 for i in range(64)})))),
    ],
    [
        (1, _objects(_bad(st.just({f"k{i}": "v" for i in range(65)})))),
        (1, _objects(_bad(st.sampled_from([{"k": "v" * 257}, {"k" * 257: "v"}, {"k": 1}])))),
        (1, _bad(st.none() | st.lists(scalars, max_size=2))),
    ],
)

HEARTBEAT_FIELDS: Final = (
    _id_answer("gateway_id"),
    Field("region", text_field(1, 64), required=True),
    Field("seq", count_field(), required=True),
    Field("ts", ts_values, required=True),
    Field("cpu_percent", float_field(0.0, 100.0), required=True),
    Field("memory_percent", float_field(0.0, 100.0), required=True),
    Field("active_connections", count_field(), required=True),
    Field("latency_ms", nullable(float_field(0.0, 1e12))),
    Field("max_connections", nullable(count_field(minimum=1))),
    Field("role", nullable(literal_field(["primary", "backup"]))),
    Field("backup_for", nullable(id_field())),
    Field("config_versions", config_versions),
    Field("labels", labels),
)
GOODBYE_FIELDS: Final = (_id_answer("gateway_id"),)
PONG_FIELDS: Final = (_id_answer("gateway_id"),)
ACK_FIELDS: Final = (
    Field(
        "distribution_id",
        values(
            [(1, _ok(st.just(Correct("distribution_id"))))],
            [
                (1, _bad(st.from_regex(r"dist-[A-Za-z0-9-]{1,64}", fullmatch=True))),
                (1, _bad(st.text(max_size=70))),
                (1, _bad(wrong_types | invalid_utf8)),
            ],
        ),
        required=True,
    ),
    _id_answer("gateway_id"),
    Field("ok", only(_ok(st.booleans()), _bad(non_booleans)), required=True),
    Field(
        "version",
        only(
            _ok(st.just(Correct("version"))),
            count_field(minimum=1).mixed.map(lambda j: (j[0], False)),
        ),
        required=True,
    ),
    Field("error", nullable(text_field(0, 4096))),
)


def _cursor(kind: str, *key: Any) -> str:
    raw = msgspec.json.encode([kind, *key])
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


cursors = nullable(
    values(
        [
            (2, _ok(st.sampled_from(POOL).map(lambda gw: _cursor("gw", gw)))),
            (1, _ok(st.just(_cursor("dist", "2026-01-01T00:00:00Z", "dist-x")))),
            (1, _ok(st.just(""))),
            # Not one of ours: a bad_request from the actor, after the edge let it through.
            (
                2,
                _ok(
                    st.text(max_size=60)
                    | st.binary(max_size=40).map(lambda b: base64.urlsafe_b64encode(b).decode())
                ),
            ),
        ],
        [
            (1, _bad(st.just("c" * 1025))),
            (1, _bad(st.integers() | st.lists(scalars, max_size=2) | st.booleans())),
        ],
    )
)
config_types = values(
    [(2, _ok(st.sampled_from(["FzRoute", "FzAcl", "Fz_Tls"]))), (1, _ok(config_type_names))],
    [
        (1, _bad(st.sampled_from(["", "a.b", "a-b", "ü", "x" * 65, "Route "]))),
        (1, _bad(non_strings)),
    ],
)
config_data = values(
    [
        (4, _objects(_ok(st.dictionaries(texts, json_values, max_size=5)))),
        (
            1,
            _objects(
                _ok(st.dictionaries(st.sampled_from("ab"), huge_ints | extreme_ints, min_size=1))
            ),
        ),
        (1, _ok(st.just(Obj((("a", deep(SHALLOW)),))))),
    ],
    [
        (
            1,
            _bad(
                st.sampled_from([deep(DEEP), Raw(b"NaN"), Raw(b"1e400")]).map(
                    lambda raw: Obj((("a", raw),))
                )
            ),
        ),
        (1, _bad(st.none() | st.lists(scalars, max_size=2) | texts)),
    ],
)
target_lists = nullable(
    values(
        [
            (4, _ok(st.lists(st.sampled_from(POOL), min_size=1, max_size=4))),
            (1, _ok(st.lists(valid_ids, max_size=3))),
            # A long list of gateways nobody knows.
            (1, _ok(st.just([f"fz-unknown-{n}" for n in range(1000)]))),
        ],
        [
            (1, _bad(st.lists(st.sampled_from(["", "a.b", "x" * 65]), min_size=1, max_size=2))),
            (1, _bad(st.just([f"g{n}" for n in range(MAX_TARGETS + 1)]))),
            (1, _bad(st.booleans() | texts | st.just(Obj(())))),
        ],
    )
)
limits = {
    name: nullable(_capped(count_field(minimum=1), most))
    for name, most in (("gateways", 1000), ("distributions", 1000))
}

distribution_ids = only(
    _ok(st.from_regex(r"dist-[A-Za-z0-9-]{1,64}", fullmatch=True)),
    _bad(st.sampled_from(["", "dist-", "dist-a.b", "x" * 70]) | non_strings),
)

REQUEST_FIELDS: Final[dict[str, tuple[Field, ...]]] = {
    "status": (),
    "load-balancing.get": (),
    "gateways": (
        Field("limit", limits["gateways"]),
        Field("cursor", cursors),
        Field("status", nullable(literal_field(["unknown", "healthy", "degraded", "down"]))),
        Field("region", nullable(text_field(1, 64))),
    ),
    "select-gateway": (
        Field("region", nullable(text_field(1, 64))),
        Field("client_id", nullable(text_field(1, 256))),
    ),
    "load-balancing.set": (
        Field("strategy", nullable(literal_field(STRATEGIES))),
        Field("health_threshold", nullable(float_field(0.0, 100.0))),
    ),
    "distribute": (
        Field("config_type", config_types, required=True),
        Field("config_data", config_data, required=True),
        Field("target_gateways", target_lists),
        Field("request_id", nullable(text_field(1, 128))),
    ),
    "distributions.get": (
        Field("distribution_id", distribution_ids, required=True),
        Field("limit", limits["distributions"]),
        Field("cursor", cursors),
    ),
    "distributions.list": (
        Field("include_completed", only(_ok(st.booleans()), _bad(non_booleans))),
        Field("limit", limits["distributions"]),
        Field("cursor", cursors),
        Field(
            "status",
            nullable(
                literal_field(["pending", "in_progress", "completed", "partially_failed", "failed"])
            ),
        ),
        Field("config_type", nullable(config_types)),
    ),
    "reconcile": (
        Field("gateway_id", id_field(), required=True),
        Field("config_type", nullable(config_types)),
    ),
    "failback": (Field("gateway_id", id_field(), required=True),),
    **{
        f"distributions.{action}": (Field("distribution_id", distribution_ids, required=True),)
        for action in ("pause", "resume", "abort")
    },
    "rollback": (
        Field("config_type", config_types, required=True),
        Field("to_version", nullable(count_field(minimum=1))),
        Field("target_gateways", target_lists),
    ),
    "maintenance": (
        Field("gateway_id", id_field(), required=True),
        Field("enabled", only(_ok(st.booleans()), _bad(non_booleans)), required=True),
        Field("reason", nullable(text_field(1, 256))),
    ),
}
assert set(REQUEST_FIELDS) == {e.name for e in ENDPOINTS}, "a P.api endpoint has no fuzz body"
# How often each endpoint is drawn: those that start work (a distribution, a
# reconciliation, a new strategy) less often, so the run stays about the edge.
ENDPOINT_WEIGHTS: Final = {
    "status": 3,
    "load-balancing.get": 2,
    "gateways": 4,
    "select-gateway": 5,
    "load-balancing.set": 2,
    "distribute": 1,
    "distributions.get": 3,
    "distributions.list": 3,
    "reconcile": 1,
    "failback": 2,
}


# Banks and the assembler ----------------------------------------------------------------

# Which fields each kind of body has: the gateway messages, the answers, and each request.
BODIES: Final[dict[str, tuple[Field, ...]]] = {
    "heartbeat": HEARTBEAT_FIELDS,
    "goodbye": GOODBYE_FIELDS,
    "pong": PONG_FIELDS,
    "ack": ACK_FIELDS,
    **{f"api:{name}": fields for name, fields in REQUEST_FIELDS.items()},
}
# Everything drawn from Hypothesis besides the fields' values.
EXTRAS: Final[dict[str, st.SearchStrategy[Any]]] = {
    "unknown": unknown_fields,
    "whole": whole_bodies,
    "bad_token": invalid_ids.filter(_is_token),
    "json": json_values,
}


def sample(strategy: st.SearchStrategy[Any], count: int, seed: int) -> list[Any]:
    """`count` examples of `strategy` from Hypothesis's generator, seeded (fewer when the
    strategy has fewer distinct values)."""
    found: list[Any] = []

    @hypothesis.seed(seed)
    @hypothesis.settings(
        max_examples=count,
        database=None,
        phases=[hypothesis.Phase.generate],
        deadline=None,
        suppress_health_check=list(hypothesis.HealthCheck),
        verbosity=hypothesis.Verbosity.quiet,
    )
    @hypothesis.given(strategy)
    def collect(value: Any) -> None:
        found.append(value)

    collect()
    return found


@dataclass(frozen=True, slots=True)
class Banks:
    """Hypothesis's examples of every field of every body (valid ones, and mixed ones) and
    of the extras: what the assembler builds messages from."""

    fields: dict[tuple[str, str, bool], list[Judged]]  # (body, field, mixed) -> values
    extras: dict[str, list[Any]]

    @classmethod
    def fill(cls, seed: int, size: int) -> Banks:
        """`size` examples of each strategy (a few seconds per hundred)."""
        fields = {
            (body, field.name, mixed): sample(
                field.values.mixed if mixed else field.values.valid, size, seed
            )
            for body, body_fields in BODIES.items()
            for field in body_fields
            for mixed in (False, True)
        }
        extras = {name: sample(strategy, size, seed) for name, strategy in EXTRAS.items()}
        return cls(fields, extras)


# How a body is made: every field valid (extreme values included), each field valid or
# not, the whole body something else, or a body cut short.
SHAPES: Final = ("valid",) * 10 + ("mixed",) * 6 + ("whole", "truncated")
UNKNOWN_COUNTS: Final = (0, 0, 0, 0, 0, 1, 1, 2)
# Families sent unasked, and how often.
FAMILY_WEIGHTS: Final[dict[Family, int]] = {
    "heartbeat": 40,
    "goodbye": 8,
    "gateway_subject": 5,
    "api": 40,
    "api_subject": 2,
}
# Verbs after `P.gw.<token>.`: with a valid token only the odd ones (a plain heartbeat or
# goodbye there would be a gateway's own message, e.g. a goodbye removing it).
ODD_VERBS: Final = (
    "heartbeat.x", "goodbye.a.b", "config.more", "ping.x", "Heartbeat", "beat", "x.heartbeat",
    "x.goodbye",
)  # fmt: skip
PLAIN_VERBS: Final = ("heartbeat", "goodbye")


class Assembler:
    """Builds messages from the banks with its own seeded random: fast enough for a
    hundred thousand (Hypothesis itself draws a few milliseconds per message)."""

    def __init__(self, banks: Banks, prefix: str, seed: int) -> None:
        self.banks = banks
        self.prefix = prefix
        self.rng = random.Random(seed)
        self._families = [f for f, weight in FAMILY_WEIGHTS.items() for _ in range(weight)]
        self._endpoints = [n for n, weight in ENDPOINT_WEIGHTS.items() for _ in range(weight)]

    def shot(self) -> Shot:
        """One message sent unasked, of a family drawn by FAMILY_WEIGHTS."""
        rng, prefix = self.rng, self.prefix
        family = rng.choice(self._families)
        if family == "heartbeat":
            gateway_id = rng.choice(HB_POOL if rng.random() < 0.7 else EXTRA_POOL)
            return self._shot("heartbeat", f"{prefix}.gw.{gateway_id}.heartbeat", "heartbeat")
        if family == "goodbye":
            subject = f"{prefix}.gw.{rng.choice(BYE_POOL)}.goodbye"
            return self._shot("goodbye", subject, "goodbye")
        if family == "gateway_subject":
            if rng.random() < 0.5:
                token, verb = rng.choice(HB_POOL), rng.choice(ODD_VERBS)
            else:
                token, verb = self._extra("bad_token"), rng.choice(ODD_VERBS + PLAIN_VERBS)
            body = Obj((("gateway_id", token),)) if rng.random() < 0.5 else self._extra("json")
            return Shot(family, f"{prefix}.gw.{token}.{verb}", body, "reject", f"subject {verb}")
        if family == "api_subject":
            odd = rng.choice(
                [f"{rng.choice(self._endpoints)}.x", "STATUS", "select", "distributions", "x"]
            )
            return Shot(family, f"{prefix}.api.{odd}", Obj(()), "reject", f"subject api.{odd}")
        name = rng.choice(self._endpoints)
        kind: Family = "api_no_reply" if rng.random() < 0.04 else "api"
        return self._shot(kind, f"{prefix}.api.{name}", f"api:{name}")

    def answer(self, family: Literal["pong", "ack"]) -> Shot:
        """The template of an answer to a ping or a config push."""
        return self._shot(family, "", family)

    def _shot(self, family: Family, subject: str, kind: str) -> Shot:
        body, expect, note = self.body(kind)
        return Shot(family, subject, body, expect, note)

    def _extra(self, name: str) -> Any:
        return self.rng.choice(self.banks.extras[name])

    def body(self, kind: str) -> tuple[Any, Expect, str]:
        """A body of `kind` (a key of BODIES) with what the protocol expects of it."""
        rng = self.rng
        shape = rng.choice(SHAPES)
        if shape == "whole":
            whole: tuple[Any, Expect, str] = self._extra("whole")
            return whole
        mixed = shape != "valid"
        fields = BODIES[kind]
        pairs: list[tuple[str | Raw, Any]] = []
        verdicts: list[bool | None] = []
        notes: list[str] = []
        for field in fields:
            if field.required:
                if mixed and rng.random() < 0.1:
                    verdicts.append(False)
                    notes.append(f"no {field.name}")
                    continue
            elif rng.random() < 0.5:
                continue
            value, verdict = rng.choice(self.banks.fields[kind, field.name, mixed])
            pairs.append((field.name, value))
            verdicts.append(verdict)
            if verdict is not True:
                notes.append(f"{field.name}={_describe(value)}")
        names = {field.name for field in fields}
        for _ in range(rng.choice(UNKNOWN_COUNTS)):
            key, (value, verdict) = self._extra("unknown")
            if key in names:
                continue  # a known name with an arbitrary value: not an unknown field
            pairs.insert(rng.randint(0, len(pairs)), (key, value))
            verdicts.append(verdict)
            if verdict is not True:
                notes.append(f"extra {key!r}={_describe(value)}")
        body = Obj(tuple(pairs))
        if shape == "truncated" and pairs:  # cut short: no longer JSON
            data = render(body, _PLACEHOLDERS)
            return Raw(data[: rng.randint(1, max(1, len(data) - 1))]), "reject", "truncated"
        expect: Expect = (
            "reject" if False in verdicts else "either" if None in verdicts else "accept"
        )
        return body, expect, "; ".join(notes) or "valid"
