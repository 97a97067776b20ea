"""The README keeps its promises: the two commands first, every setting documented."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from pathlib import Path

import msgspec

from schemas.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def setting_paths(struct: msgspec.Struct, prefix: str = "") -> Iterator[str]:
    for field in msgspec.structs.fields(struct):
        value = getattr(struct, field.name)
        if isinstance(value, msgspec.Struct):
            yield from setting_paths(value, f"{prefix}{field.name}.")
        else:
            yield f"{prefix}{field.name}"


def test_every_setting_is_in_the_reference_table() -> None:
    documented = set(re.findall(r"^\| `([a-z_.]+)` \|", README, flags=re.MULTILINE))
    expected = set(setting_paths(Settings()))
    assert expected - documented == set(), "settings missing from README's table"
    assert documented - expected == set(), "README documents settings that do not exist"


def test_the_first_two_blocks_are_install_and_run_then_test() -> None:
    blocks = re.findall(r"^```sh\n(.+?)\n```", README, flags=re.MULTILINE)
    assert "pip install -e ." in blocks[0]
    assert ".venv/bin/gatefleet up --simulate" in blocks[0]
    assert "pip install -e '.[test]'" in blocks[1]
    assert "pytest" in blocks[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "README.md" in ci  # CI runs the README's test command itself


def test_every_row_of_the_reference_table_has_three_cells() -> None:
    """key, default, meaning: a row with `||` renders with its meaning dropped. Cells are
    split as a Markdown renderer does, at every pipe not escaped (inside code too)."""
    table = README[README.index("| key | default | meaning |\n|---|---|---|\n") :]
    rows = list(itertools.takewhile(lambda line: line.startswith("|"), table.splitlines()))
    assert len(rows) - 2 == len(list(setting_paths(Settings()))), "one row per setting"
    for row in rows[2:]:
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", row.strip()[1:-1])]
        assert len(cells) == 3, row
        assert all(cells), f"an empty cell: {row}"
