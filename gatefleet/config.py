"""Load the configuration: defaults from `Settings`, a user TOML file on top, one-line errors."""

from __future__ import annotations

import difflib
import json
import os
import re
import secrets
import socket
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import msgspec
import tomli

from schemas.settings import Settings

CONFIG_ENV = "GATEFLEET_CONFIG"
# Written by `gatefleet up` beside the embedded server: where local clients find it.
URL_FILE = "nats.url"
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_MSGSPEC_PATH = re.compile(r"\.([^.\[]+)|\[(\d+)\]|\[\.\.\.\]")
_NOUNS = {"int": "integer", "str": "string", "bool": "boolean", "object": "table"}  # TOML words
Key = str | int


class ConfigError(Exception):
    """A configuration problem; str is one line: `<file>: <where>: <reason>`."""

    def __init__(self, file: str, where: str, reason: str) -> None:
        self.file, self.where, self.reason = file, where, " ".join(reason.split("\n"))
        super().__init__(": ".join(part for part in (file, where, self.reason) if part))


class _KeyPathError(Exception):
    def __init__(self, path: list[Any], reason: str) -> None:
        super().__init__(reason)
        self.path, self.reason = path, reason


def load_settings(
    path: str | Path | None = None,
    *,
    nats_url: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Defaults, then the user file (`path`, else $GATEFLEET_CONFIG) key by key, then --nats."""
    env = os.environ if env is None else env
    if path is None:
        path = env.get(CONFIG_ENV) or None
    file = "(defaults)" if path is None else str(path)
    user = {} if path is None else _read_toml(Path(path), file)
    merged = _merge(msgspec.to_builtins(Settings()), user)
    if nats_url is not None and isinstance(merged["bus"], dict):  # else convert reports `bus`
        merged["bus"]["url"] = nats_url
    try:
        _check_keys(user, Settings, [])
        settings = _convert(merged)
        _check_semantics(settings)
    except _KeyPathError as problem:
        raise ConfigError(file, format_key_path(problem.path), problem.reason) from None
    return settings


def resolve_data_dir(settings: Settings, env: Mapping[str, str] | None = None) -> Path:
    """The embedded server's store: bus.data_dir, $XDG_STATE_HOME or ~/.local/state/gatefleet."""
    env = os.environ if env is None else env
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    data_dir = settings.bus.data_dir
    if data_dir == "~" or data_dir.startswith("~/"):
        return home / data_dir[2:]
    if data_dir:
        return Path(data_dir).expanduser()
    state = env.get("XDG_STATE_HOME", "")
    base = Path(state) if Path(state).is_absolute() else home / ".local" / "state"
    return base / "gatefleet"


def resolve_replica_id(settings: Settings, hostname: str | None = None) -> str:
    """`[cluster] replica_id`, else the host's name (its first label, as a valid id) and a
    short random suffix: two processes on one host, or one and its restart, differ."""
    if settings.cluster.replica_id:
        return settings.cluster.replica_id
    host = (socket.gethostname() if hostname is None else hostname).split(".")[0]
    host = re.sub(r"[^A-Za-z0-9_-]", "-", host)[:57] or "gatefleet"
    return f"{host}-{secrets.token_hex(3)}"


def format_key_path(path: list[Key]) -> str:
    """["gateways", 0, "id"] -> `gateways[0].id`; keys that are not bare TOML keys are quoted."""
    out = ""
    for key in path:
        if isinstance(key, int):
            out += f"[{key}]"
        else:
            text = key if _BARE_KEY.match(key) else json.dumps(key)
            out += f".{text}" if out else text
    return out


def split_host_port(listen: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 as `[::1]:8080`) -> (host, port); ValueError if it is not that."""
    host, sep, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {listen!r}")
    return host, int(port)


def _read_toml(path: Path, file: str) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(file, "cannot read", e.strerror or str(e)) from None
    try:
        return tomli.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(file, f"line {line}", "not valid UTF-8") from None
    except tomli.TOMLDecodeError as e:
        raise ConfigError(file, f"line {e.lineno}, column {e.colno}", e.msg) from None


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Tables merge key by key; anything else (arrays included) replaces."""
    out = dict(base)
    for key, value in override.items():
        old = out.get(key)
        out[key] = (
            _merge(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
        )
    return out


def _unwrap(tp: Any) -> Any:
    """Strip Annotated[...] and `X | None` down to the type that has children or choices."""
    if get_origin(tp) is Annotated:
        return _unwrap(get_args(tp)[0])
    union = get_origin(tp) in (Union, types.UnionType)
    args = [a for a in get_args(tp) if a is not type(None)] if union else []
    return _unwrap(args[0]) if len(args) == 1 else tp


def _child_types(tp: Any) -> tuple[dict[str, Any] | None, Any]:
    """(fields by name if a Struct, else None; item/value type of a list or dict, else None)."""
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return {f.encode_name: f.type for f in msgspec.structs.fields(tp)}, None
    if get_origin(tp) in (list, dict):
        return None, get_args(tp)[-1]
    return None, None


def _check_keys(data: Any, tp: Any, path: list[Key]) -> None:
    """Raise _KeyPathError at the first key (in file order) that no Struct in the tree declares."""
    fields, item = _child_types(tp)
    if fields is not None and isinstance(data, dict):
        for key, value in data.items():
            if key not in fields:
                what = "unknown section" if not path and isinstance(value, dict) else "unknown key"
                raise _KeyPathError([*path, key], what + _did_you_mean(key, fields))
            _check_keys(value, fields[key], [*path, key])
    elif item is not None and isinstance(data, list | dict):
        pairs = data.items() if isinstance(data, dict) else enumerate(data)
        for key, value in pairs:
            _check_keys(value, item, [*path, key])


def _did_you_mean(word: str, choices: Any) -> str:
    lower = {str(c).lower(): str(c) for c in choices}
    close = difflib.get_close_matches(word.lower(), lower, n=1)
    return f" (did you mean {lower[close[0]]!r}?)" if close else ""


def _convert(merged: dict[str, Any]) -> Settings:
    try:
        return msgspec.convert(merged, Settings)
    except msgspec.ValidationError as e:
        message, _, where = str(e).rpartition(" - at `")
        path, value, tp = _locate(merged, where.rstrip("`"))
        if m := re.fullmatch(r"Object missing required field `([^`]+)`", message):
            raise _KeyPathError([*path, m[1]], "missing required key") from None
        raise _KeyPathError(path, _reason(message or str(e), value, tp)) from None


def _locate(data: Any, where: str) -> tuple[list[Key], Any, Any]:
    """Follow msgspec's `$.a[0][...]` through the data: (key path, value there, its type)."""
    path: list[Key] = []
    tp: Any = Settings
    for match in _MSGSPEC_PATH.finditer(where.removeprefix("$")):
        name, index = match.group(1), match.group(2)
        fields, item = _child_types(tp)
        if name is not None:
            key: Key = name
            tp = fields.get(name) if fields else None
        else:
            key = int(index) if index is not None else _first_invalid(data, item)
            tp = item
        path.append(key)
        data = data[key] if isinstance(data, dict | list) else None  # type: ignore[index]
    return path, data, tp


def _first_invalid(data: Any, value_type: Any) -> str:
    """msgspec writes a dict key as `[...]`: find the first entry that does not convert."""
    for key, value in data.items():
        try:
            msgspec.convert(value, value_type)
        except msgspec.ValidationError:
            return str(key)
    return "..."


def _noun(names: str) -> str:
    """msgspec's `int | null` -> `an integer` (TOML has no null)."""
    words = [_NOUNS.get(n, n) for n in names.split(" | ") if n != "null"]
    return " or ".join(("an " if w[0] in "aeiou" else "a ") + w for w in words)


def _reason(message: str, value: Any, tp: Any) -> str:
    """msgspec's message in config words, with the offending value."""
    if m := re.fullmatch(r"Expected `([^`]+)`, got `([^`]+)`", message):
        return f"expected {_noun(m[1])}, got {_noun(m[2])}"
    if m := re.fullmatch(r"Expected `([^`]+)` (.+)", message):
        return f"expected {_noun(m[1])} {m[2]}, got {value!r}"
    if message.startswith("Invalid enum value"):
        choices = get_args(_unwrap(tp)) if get_origin(_unwrap(tp)) is Literal else ()
        hint = _did_you_mean(str(value), choices) if choices else ""
        return f"expected one of {', '.join(map(repr, choices))}, got {value!r}{hint}"
    return message[:1].lower() + message[1:]


def _check_semantics(settings: Settings) -> None:
    """What the types cannot say: unique gateway ids, no self-backup, a HOST:PORT listen,
    a RegionAware whose inner strategy is not RegionAware again, replication only on a
    cluster, and a TLS certificate with its key.

    A `backup_for` naming a gateway not in the file is fine: the primary may only ever
    register by heartbeat."""
    first: dict[str, int] = {}
    for i, gateway in enumerate(settings.gateways):
        if gateway.id in first:
            where = f"gateways[{first[gateway.id]}]"
            reason = f"duplicate gateway id {gateway.id!r}, already used by {where}"
            raise _KeyPathError(["gateways", i, "id"], reason)
        first[gateway.id] = i
    for i, gateway in enumerate(settings.gateways):
        target, path = gateway.backup_for, ["gateways", i, "backup_for"]
        if target == gateway.id:
            raise _KeyPathError(path, f"gateway {target!r} cannot be its own backup")
    if settings.load_balancing.region_inner_strategy == "RegionAware":
        raise _KeyPathError(
            ["load_balancing", "region_inner_strategy"],
            "RegionAware cannot be its own inner strategy; choose one of the other four",
        )
    if settings.bus.replicas > 1 and not settings.bus.url:
        raise _KeyPathError(
            ["bus", "replicas"],
            "more than 1 needs a NATS cluster ([bus] url): the embedded server is one server",
        )
    if bool(settings.bus.tls_cert) != bool(settings.bus.tls_key):
        given = "tls_cert" if settings.bus.tls_cert else "tls_key"
        missing = "tls_key" if settings.bus.tls_cert else "tls_cert"
        raise _KeyPathError(["bus", missing], f"needed with [bus] {given}")
    if settings.http.listen:
        try:
            split_host_port(settings.http.listen)
        except ValueError as e:
            raise _KeyPathError(["http", "listen"], str(e)) from None


def config_warnings(settings: Settings) -> list[str]:
    """Settings that are allowed but void a guarantee: each a line to log at start."""
    health = settings.health
    # bus/awareness.py: a live gateway survives a lag of gatefleet's own only while three
    # lag thresholds stay below (fall - 1/2) heartbeat intervals.
    limit = (health.fall - 0.5) / 3
    if health.lag_suspend_share < limit:
        return []
    return [
        f"health.lag_suspend_share = {health.lag_suspend_share:g} is not below "
        f"(health.fall - 1/2) / 3 = {limit:.2f} (health.fall = {health.fall}): after a lag "
        "of gatefleet's own, a live gateway may be marked down"
    ]


def discover_url(settings: Settings, env: dict[str, str] | os._Environ[str]) -> str:
    """The NATS URL a client should use: configured, or the embedded server's."""
    if settings.bus.url:
        return settings.bus.url
    url_file = Path(resolve_data_dir(settings, env)) / URL_FILE
    if url_file.exists():
        return url_file.read_text().strip()
    return f"nats://127.0.0.1:{settings.bus.port or 4222}"
