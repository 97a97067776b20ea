"""The JSON Schema of every body on the wire, generated from the Structs (docs/schemas/).

One schema per message: what a gateway and gatefleet say to each other (PROTOCOL.md
section 1, and the redirect notice), each `P.api.*` request and reply and the error reply
(section 2), each event type (section 3), the `details` of each distribution step, and
what the replicas tell one another (section 5).
`gatefleet schema --out docs/schemas` writes them, so that a gateway or client written in
another language can generate its types from them; a test fails when the files checked in
differ from what this module generates.

The schemas follow the Structs' constraints (bounds, patterns, lengths), so they reject
what gatefleet's decoders reject, and a little more: a `pattern` is an ECMA-262 regular
expression there, whose `$` does not match before a final newline as Python's does.

Two directions:
- a body gatefleet *receives* (heartbeat, ack, requests, ...) is described as its decoder
  takes it: a field with a default may be left out;
- a body gatefleet *sends* (pushes, replies, events, ...) is always encoded whole, so its
  schema requires every field: a type generated from it need not make them optional.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from typing import Any, Final, get_args

import msgspec

from schemas.api import ErrorReply
from schemas.endpoints import ENDPOINTS
from schemas.events import STEP_TYPES, Event
from schemas.replica import ProbeResults
from schemas.wire import ConfigAck, ConfigPush, Goodbye, Heartbeat, Ping, Pong, Redirect

DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"
Schema = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Message:
    name: str  # the file's name without `.json`
    body: type[msgspec.Struct]
    sent_by_gatefleet: bool
    where: str  # where it travels, for the schema's description
    # False for a tagged Struct whose tag is not in the body: a step's `details` (the
    # event's `step` field names it).
    tag_on_wire: bool = True


def _wire() -> list[Message]:
    return [
        Message("heartbeat", Heartbeat, False, "`P.gw.<id>.heartbeat`: a gateway publishes it"),
        Message("config-push", ConfigPush, True, "`P.gw.<id>.config`: gatefleet's request"),
        Message("config-ack", ConfigAck, False, "The gateway's reply to `P.gw.<id>.config`"),
        Message("ping", Ping, True, "`P.gw.<id>.ping`: gatefleet's request"),
        Message("pong", Pong, False, "The gateway's reply to `P.gw.<id>.ping`"),
        Message("goodbye", Goodbye, False, "`P.gw.<id>.goodbye`: a gateway publishes it"),
        Message("redirect", Redirect, True, "`P.redirect.<id>`: gatefleet publishes it"),
    ]


def _api() -> list[Message]:
    messages = []
    for endpoint in ENDPOINTS:
        subject = f"`P.api.{endpoint.name}`"
        messages += [
            Message(f"api.{endpoint.name}.request", endpoint.request, False, f"{subject}: request"),
            Message(f"api.{endpoint.name}.reply", endpoint.reply, True, f"{subject}: reply"),
        ]
    messages.append(
        Message("error-reply", ErrorReply, True, "The reply of any `P.api.*` request that fails")
    )
    return messages


def _events() -> list[Message]:
    messages = []
    for kind in get_args(Event):
        tag = kind.__struct_config__.tag
        messages.append(Message(f"event.{tag}", kind, True, f"`P.events.{tag}`: an event"))
    for step, kind in STEP_TYPES.items():
        where = f"The `details` of a `distribution.step` event whose `step` is `{step}`"
        messages.append(Message(f"step.{step}", kind, True, where, tag_on_wire=False))
    return messages


def _replicas() -> list[Message]:
    where = "`P.replica.probes`: the leading replica publishes it, the others read it"
    return [Message("replica.probes", ProbeResults, True, where)]


def messages() -> list[Message]:
    """Every message with a schema, in the order of PROTOCOL.md."""
    return [*_wire(), *_api(), *_events(), *_replicas()]


def _portable_patterns(node: object) -> None:
    """`\\Z` (end of string in Python's re, see schemas.types.whole) becomes `$`, which
    means the same in ECMA-262 and Go's RE2, where `\\Z` does not exist."""
    if isinstance(node, dict):
        pattern = node.get("pattern")
        if isinstance(pattern, str) and pattern.endswith("\\Z"):
            node["pattern"] = pattern[:-2] + "$"
        for value in node.values():
            _portable_patterns(value)
    elif isinstance(node, list):
        for value in node:
            _portable_patterns(value)


def _omits_defaults(body: Any) -> dict[str, set[str]]:
    """Struct name -> the fields it leaves out when they hold their default, for every
    Struct `body` holds that omits defaults (msgspec's `omit_defaults`)."""
    found: dict[str, set[str]] = {}
    seen: set[Any] = set()

    def visit(info: msgspec.inspect.Type) -> None:
        if isinstance(info, msgspec.inspect.StructType):
            if info.cls in seen:
                return
            seen.add(info.cls)
            if info.cls.__struct_config__.omit_defaults:
                found[info.cls.__name__] = {f.name for f in info.fields if not f.required}
            for field in info.fields:
                visit(field.type)
        for attribute in ("types", "item_type", "key_type", "value_type"):
            inner = getattr(info, attribute, None)
            if isinstance(inner, tuple):
                for item in inner:
                    visit(item)
            elif isinstance(inner, msgspec.inspect.Type):
                visit(inner)

    visit(msgspec.inspect.type_info(body))
    return found


def schema_of(message: Message) -> Schema:
    """The message's JSON Schema: its Struct's own at the root, nested ones in `$defs`."""
    generated = msgspec.json.schema(message.body)
    _portable_patterns(generated)
    defs: dict[str, Schema] = generated["$defs"]
    root_name = generated["$ref"].rsplit("/", 1)[1]
    for component in defs.values():
        if "description" in component:
            component["description"] = inspect.cleandoc(component["description"])
        if message.sent_by_gatefleet and component.get("type") == "object":
            # gatefleet sends every field, bar the defaults of a Struct that omits them.
            omitted = _omits_defaults(message.body).get(component.get("title", ""), set())
            properties = component.get("properties", {})
            component["required"] = [name for name in properties if name not in omitted]
    root = defs.pop(root_name)
    if not message.tag_on_wire:
        tag_field = message.body.__struct_config__.tag_field
        del root["properties"][tag_field]
        root["required"].remove(tag_field)
    description = f"{message.where}."
    if "description" in root:
        description += "\n\n" + root.pop("description")
    schema: Schema = {"$schema": DIALECT, "title": root.pop("title"), "description": description}
    schema |= root
    if defs:
        schema["$defs"] = defs
    return schema


def generate() -> dict[str, Schema]:
    """Every schema by file name (`heartbeat.json`, `api.status.reply.json`, ...)."""
    return {f"{message.name}.json": schema_of(message) for message in messages()}


def render(schema: Schema) -> str:
    """A schema as the text of its file: stable, indented, one final newline."""
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"
