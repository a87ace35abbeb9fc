"""docs/reliability.md: every test a row names exists (so the table cannot point at nothing)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _referenced() -> list[tuple[str, str]]:
    """(test file, test name) for every `file.py::name` and every following `::name` of the same cell."""
    refs = []
    for line in (ROOT / "docs" / "reliability.md").read_text().splitlines():
        if not line.startswith("|"):
            continue
        current = None
        for m in re.finditer(r"`(?:(test_\w+\.py))?::(test_\w+)", line):
            current = m.group(1) or current
            assert current, f"a row refers to ::{m.group(2)} before naming its file: {line}"
            refs.append((current, m.group(2)))
    return refs


def test_every_row_names_an_existing_test():
    refs = _referenced()
    assert len(refs) >= 30
    names: dict[str, set[str]] = {}
    for file, name in refs:
        if file not in names:
            tree = ast.parse((ROOT / "tests" / file).read_text())
            names[file] = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert name in names[file], f"docs/reliability.md names {file}::{name}, which does not exist"
