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
        for m in re.finditer(r"`(?:(?:tests/)?(test_\w+\.py))?::(test_\w+)", line):
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


def test_the_table_covers_every_surface():
    """One table per surface the reliability promise covers: the CLI and the Python API, the loaders,
    training and the server; each with at least one row naming a test."""
    text = (ROOT / "docs" / "reliability.md").read_text()
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    rows = {s.splitlines()[0]: sum(1 for line in s.splitlines() if line.startswith("| ") and "::test_" in line)
            for s in sections}  # fmt: skip
    for heading in ("Generation: the CLI and the Python API", "Weight files", "LoRA files", "Training", "The server"):
        (match,) = [h for h in rows if h.startswith(heading)]
        assert rows[match] >= 1, heading
