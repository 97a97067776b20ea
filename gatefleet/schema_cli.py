"""`gatefleet schema`: the JSON Schemas of the wire and API bodies (schemas/json_schemas.py)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from gatefleet.cli_common import fail
from schemas.json_schemas import generate, render


@click.command()
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write each schema to DIR/<name>.json (DIR is created if missing).",
)
def schema(out: Path | None) -> None:
    """Print the JSON Schema of every message: gateway wire, API requests and replies, events.

    Generated from gatefleet's own types. Without --out: one JSON document on stdout, an
    object mapping each file name (e.g. `heartbeat.json`) to its schema. The repository
    keeps them in docs/schemas (`gatefleet schema --out docs/schemas`).
    """
    schemas = generate()
    if out is None:
        click.echo(json.dumps(schemas, indent=2, ensure_ascii=False))
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, body in schemas.items():
            (out / name).write_text(render(body), encoding="utf-8")
    except OSError as exc:
        fail(f"cannot write the schemas to {out}: {exc}")
    click.echo(f"wrote {len(schemas)} schemas to {out}")
