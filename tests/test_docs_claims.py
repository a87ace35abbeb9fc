"""README.md and docs/*.md say only what the code does, for the claims a machine can check: every flag a doc gives
an ``sdengine`` command is a flag of that command; ``sdengine serve``'s flag table lists every flag with its
default; every route a doc names is served (with that method); the sampler and schedule lists are the table's;
the package map of docs/ARCHITECTURE.md is the layer table of tests/test_architecture.py; every repository file
a doc names in backticks exists."""

from __future__ import annotations

import argparse
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# Claims known wrong in a file this branch may not edit (docs/reliability.md is edited by the main session only):
# each is a fix to make there, then to drop from here.
KNOWN_ROUTES: set[str] = set()  # "doc: METHOD /path" lines the route check may skip (none now)
FLAG = re.compile(r"(?<![\w-])(--[a-z][\w-]*)")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {o for action in parser._actions for o in action.option_strings}


@cache
def _parser() -> argparse.ArgumentParser:
    from sdengine.cli import build_parser

    return build_parser()


def _logical_lines(md: Path) -> list[tuple[int, str]]:
    """The file's lines, a command continued on the next line (a trailing backslash, or an indented line that
    starts with a flag or a ``[``) joined to it."""
    joined: list[tuple[int, str]] = []
    for n, line in enumerate(md.read_text(encoding="utf-8").splitlines(), 1):
        if joined:
            prev = joined[-1][1]
            if prev.rstrip().endswith("\\") or (re.match(r"\s+[\[-]", line) and "sdengine " in prev):
                joined[-1] = (joined[-1][0], prev.rstrip().removesuffix("\\") + " " + line.strip())
                continue
        joined.append((n, line))
    return joined


def _command_flags() -> list[tuple[str, str, str, argparse.ArgumentParser]]:
    """(where, command, flag, parser) for every flag written after ``sdengine COMMAND [SUBCOMMAND]`` in a doc (up
    to the end of the code span, or the next ``sdengine``)."""
    top = _parser()
    commands = _subparsers(top)
    found = []
    for md in DOCS:
        for n, line in _logical_lines(md):
            for m in re.finditer(r"sdengine(?:\s+--threads\s+\w+)?\s+([a-z][\w-]*)(?:\s+([a-z][\w-]*))?([^`]*)", line):
                name, second, rest = m.group(1), m.group(2), m.group(3)
                if name not in commands:
                    continue
                parser, words = commands[name], name
                inner = _subparsers(parser)
                if inner:
                    if second not in inner:
                        continue
                    parser, words = inner[second], f"{name} {second}"
                else:
                    rest = f"{second or ''}{rest}"
                rest = rest.split("sdengine ")[0]
                for flag in FLAG.findall(rest):
                    found.append((f"{md.relative_to(ROOT)}:{n}", words, flag, parser))
    return found


def test_every_flag_the_docs_give_a_command_is_one_of_its_flags():
    found = _command_flags()
    assert len(found) > 400, len(found)  # the docs are full of commands: the reader found them
    top = _flags(_parser())
    wrong = [f"  {where}: sdengine {cmd} has no {flag}" for where, cmd, flag, p in found if flag not in _flags(p) | top]
    assert not wrong, "flags the docs give that the command does not take:\n" + "\n".join(wrong)


def test_the_serve_flag_table_lists_every_flag_with_its_default():
    """docs/server.md's table under "Starting it": one row per ``sdengine serve`` flag, the default column as the
    parser's default (``none`` for None, numbers compared as numbers)."""
    serve = _subparsers(_parser())["serve"]
    text = (ROOT / "docs" / "server.md").read_text(encoding="utf-8")
    table = text.split("## Starting it", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        if line.startswith("| `--"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            flags = FLAG.findall(cells[0])
            defaults = [d.strip().strip("`") for d in cells[1].split(",")]
            for i, flag in enumerate(flags):
                rows[flag] = defaults[i] if len(defaults) == len(flags) else cells[1]
    missing = sorted(_flags(serve) - set(rows) - {"-h", "--help"})
    assert not missing, f"docs/server.md's flag table lacks {missing}"
    wrong = []
    for action in serve._actions:
        for flag in action.option_strings:
            if flag not in rows:
                continue
            doc = rows[flag]
            if action.default is None:
                ok = doc.startswith(("none", "$", "fp16 on GPUs"))  # unset, read from the environment, per device
            elif isinstance(action.default, bool):
                ok = doc == "off"
            elif isinstance(action.default, (int, float)):
                ok = float(re.match(r"[\d.]+", doc).group()) == action.default  # type: ignore[union-attr]
            else:
                ok = doc == str(action.default)
            if not ok:
                wrong.append(f"  {flag}: the table says {doc!r}, the parser's default is {action.default!r}")
    assert not wrong, "docs/server.md's defaults:\n" + "\n".join(wrong)


@cache
def _routes() -> list[tuple[str, frozenset[str], re.Pattern[str]]]:
    pytest.importorskip("fastapi")
    from sdengine.server.app import create_app
    from sdengine.server.config import ServerConfig

    app = create_app(ServerConfig(), loader=lambda ref, device: None, preload=False)

    def walk(routes: list, prefix: str = ""):  # noqa: ANN202
        for r in routes:
            if hasattr(r, "original_router"):  # an included router, not flattened by this FastAPI
                yield from walk(r.original_router.routes, prefix + r.include_context.prefix)
            elif getattr(r, "path", None) is not None:
                yield prefix + r.path, frozenset(getattr(r, "methods", None) or {"WS"})

    out = []
    for path, methods in walk(app.routes):
        pattern = re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(path))
        if path == "/static":  # the page's files, mounted
            pattern, methods = pattern + "(/.*)?", frozenset({"GET", "HEAD"})
        out.append((path, methods, re.compile(f"^{pattern}$")))
    return out


def _served(path: str, method: str | None) -> bool:
    concrete = re.sub(r"\{[^}]+\}", "x", path.split("?")[0])
    return any(p.match(concrete) and (method is None or method in m) for _, m, p in _routes())


def test_every_route_the_docs_name_is_served():
    """Every ``METHOD /path`` in a doc is a route with that method; every bare ``/path`` that looks like a whole route
    (a leading ``/v1/``, ``/sdapi/v1/``, ``/controlnet/`` ...) is one too; in a table row that starts with
    ``METHOD /a/b/x``, the bare names after it (``y``, ``z``) are ``/a/b/y``, ``/a/b/z`` with that method."""
    wrong = []
    for md in DOCS:
        for n, line in enumerate(md.read_text(encoding="utf-8").splitlines(), 1):
            where = f"  {md.relative_to(ROOT)}:{n}"
            for method, path in re.findall(r"`(GET|POST|PUT|DELETE|PATCH) (/[^`\s]*)`", line):
                if not _served(path, method) and f"{md.relative_to(ROOT)}: {method} {path}" not in KNOWN_ROUTES:
                    wrong.append(f"{where}: {method} {path}")
            for path in re.findall(r"`((?:/v1|/sdapi/v1|/controlnet|/internal)/[\w{}./-]+)", line):
                if not path.endswith("/") and not _served(path, None):
                    wrong.append(f"{where}: {path}")
            row = re.match(r"\| `(GET|POST) ((?:/[\w-]+)+)/[\w-]+`(.*?)\|", line)
            if row:
                method, parent, rest = row.groups()
                for name in re.findall(r"`([a-z][\w-]*)`", rest):
                    if not _served(f"{parent}/{name}", method):
                        wrong.append(f"{where}: {method} {parent}/{name}")
    assert len(_routes()) > 60
    stale = [k for k in KNOWN_ROUTES if k.partition(": ")[2] not in (ROOT / k.partition(":")[0]).read_text()]
    assert not stale, f"drop from KNOWN_ROUTES: {stale}"
    assert not wrong, "routes the docs name that the server does not serve:\n" + "\n".join(wrong)


def test_the_readme_protocol_table_names_served_routes():
    """README's protocol table: the A1111 row's short names are ``/sdapi/v1/`` routes, the OpenAI row's are
    ``POST /v1/images/`` routes, a path is a route or the end of one (``/events``); the ComfyUI row's bare words
    are ``/prompt``'s fields, not routes."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    heads = {"| sdengine's own": None, "| AUTOMATIC1111": "/sdapi/v1/", "| OpenAI": "/v1/images/", "| ComfyUI": None}
    rows = [(line, parent) for line in text.splitlines() for head, parent in heads.items() if line.startswith(head)]
    assert len(rows) == 4
    wrong = []
    for row, parent in rows:
        for token in re.findall(r"`([^`]+)`", row.split("|")[2]):
            if token.startswith("/"):
                ok = _served(token, None) or any(p.endswith(token) for p, _, _ in _routes())
            elif parent:
                ok = _served(parent + token, "POST" if parent == "/v1/images/" else None)
            else:
                continue
            if not ok:
                wrong.append(f"  {row.split('|')[1].strip()}: {token}")
    assert not wrong, "README's protocol table:\n" + "\n".join(wrong)


def test_the_sampler_and_schedule_lists_are_the_table():
    """README's "N samplers: ..." row and docs/cli.md name exactly the samplers and schedules
    ``sampling.resolve`` takes."""
    from sdengine.diffusion import sampling

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"\| (\d+) samplers: ([\w, ]+); schedules ([\w /]+) \|", text)
    assert m, "README's sampler row"
    names = [s.strip() for s in m.group(2).split(",")]
    schedules = [s.strip() for s in m.group(3).split("/")]
    assert int(m.group(1)) == len(names) == len(sampling.SAMPLERS)
    assert set(names) == set(sampling.SAMPLERS)
    assert set(schedules) == set(sampling.ALL_SCHEDULES)
    for name in names:
        assert sampling.resolve(name)[0] == name
    assert re.search(rf"\b{len(sampling.SAMPLERS)} samplers\b", text)  # the opening paragraph's count in words
    words = {14: "fourteen", 15: "fifteen", 16: "sixteen", 19: "nineteen", 20: "twenty", 21: "twenty-one"}
    words.update(
        {
            22: "twenty-two",
            23: "twenty-three",
            24: "twenty-four",
            25: "twenty-five",
            33: "thirty-three",
            41: "forty-one",
        }
    )
    assert words.get(len(sampling.SAMPLERS), "?") in text.split("\n\n", 2)[1]


def test_the_package_map_is_the_layer_table():
    """Every row of docs/ARCHITECTURE.md's package map names files that exist, at the layer LAYERS gives them;
    every top-level module of LAYERS has a row (``imageio``, the old re-export, is named above the table)."""
    from test_architecture import LAYERS

    text = (ROOT / "docs/ARCHITECTURE.md").read_text(encoding="utf-8")
    table = text.split("## Package map", 1)[1].split("\n## ", 1)[0]
    wrong, seen = [], {"imageio"} if "`imageio.py`" in text else set()
    for layer, cell in re.findall(r"^\| (\d) \| (.+?) \|", table, re.M):
        for name in re.findall(r"`([\w/.]+)`", cell):
            top = name.split("/")[0].removesuffix(".py")
            seen.add(top)
            if not (ROOT / "src" / "sdengine" / name).exists():
                wrong.append(f"  {name}: no such file or folder in src/sdengine")
            elif LAYERS.get(top) != int(layer):
                wrong.append(f"  {name}: layer {layer} in the doc, {LAYERS.get(top)} in LAYERS")
    wrong += [f"  {name}: in LAYERS, not in the package map" for name in sorted(set(LAYERS) - seen)]
    assert not wrong, "docs/ARCHITECTURE.md's package map:\n" + "\n".join(wrong)


def test_repository_files_the_docs_name_exist():
    """A path in backticks that starts at a top-level folder (``src/...``, ``tests/...``, ``benchmarks/...``,
    ``tools/...``, ``docs/...``) or a package path the README's tables use (``diffusion/samplers.py``) exists."""
    wrong = []
    for md in DOCS:
        for n, line in enumerate(md.read_text(encoding="utf-8").splitlines(), 1):
            for code in re.findall(r"`([^`]+)`", line):
                for token in re.findall(r"(?<![\w./-])((?:src|tests|benchmarks|tools|docs)/[\w./-]+)", code):
                    token = token.rstrip(".")
                    if any(c in token for c in "*{}") or token.endswith("/FILE") or f"{token}*" in code:
                        continue
                    if not (ROOT / token).exists() and not (ROOT / token.split("::")[0]).exists():
                        wrong.append(f"  {md.relative_to(ROOT)}:{n}: {token}")
    assert not wrong, "files the docs name that are not in the repository:\n" + "\n".join(wrong)


def test_links_stay_inside_the_repository():
    """A relative Markdown link or image resolves inside the repository (one outside it works only on the machine
    that wrote it)."""
    outside = []
    for md in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", md.read_text(encoding="utf-8")):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue
            dest = (md.parent / target.partition("#")[0]).resolve()
            if dest != ROOT and ROOT not in dest.parents:
                outside.append(f"  {md.relative_to(ROOT)}: ({target})")
    assert not outside, "links that leave the repository:\n" + "\n".join(outside)


def test_every_flag_the_docs_give_a_script_is_in_it():
    """A reproducing command ``python benchmarks/X.py --flag ...`` (or ``tools/``) names flags the script defines
    (as a quoted string in its source: the scripts import torch and diffusers, so they are read, not run)."""
    checked, wrong = 0, []
    for md in DOCS:
        for n, line in _logical_lines(md):
            for m in re.finditer(r"((?:benchmarks|tools)/[\w.-]+\.(?:py|sh))([^`]*)", line):
                script = ROOT / m.group(1)
                if not script.exists():
                    wrong.append(f"  {md.relative_to(ROOT)}:{n}: no {m.group(1)}")
                    continue
                source = script.read_text(encoding="utf-8")
                for flag in FLAG.findall(re.split(r"python |sdengine ", m.group(2))[0]):
                    checked += 1
                    if f'"{flag}"' not in source and f"'{flag}'" not in source:
                        wrong.append(f"  {md.relative_to(ROOT)}:{n}: {m.group(1)} has no {flag}")
    assert checked > 20, checked
    assert not wrong, "script flags the docs give:\n" + "\n".join(wrong)


def test_the_python_names_the_docs_use_exist():
    """``from sdengine.x import a, b`` in a doc's examples, and ``sdengine.x.y(`` / `` `sdengine.x.Y` `` in its text,
    name a module and attributes that exist (a metadata key such as ``sdengine.configs`` is no module path)."""
    import importlib

    def resolve(dotted: str) -> bool:
        parts = dotted.split(".")
        for k in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:k]))
            except ImportError:
                continue
            for attr in parts[k:]:
                if not hasattr(obj, attr):
                    return False
                obj = getattr(obj, attr)
            return True
        return False

    checked, wrong = 0, []
    for md in DOCS:
        for n, line in enumerate(md.read_text(encoding="utf-8").splitlines(), 1):
            where = f"  {md.relative_to(ROOT)}:{n}"
            m = re.match(r"\s*from (sdengine[\w.]*) import ([\w, ]+)", line)
            names = [f"{m.group(1)}.{x.strip()}" for x in m.group(2).split(",") if x.strip()] if m else []
            names += [r for r in re.findall(r"`(sdengine(?:\.\w+)+)(?:\(|`)", line) if r != "sdengine.configs"]
            for dotted in names:
                checked += 1
                if not resolve(dotted):
                    wrong.append(f"{where}: {dotted}")
    assert checked > 20, checked
    assert not wrong, "Python names the docs use that do not exist:\n" + "\n".join(wrong)


def test_the_fast_path_options_the_cli_doc_lists_are_the_table():
    from sdengine import fastpath

    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    m = re.search(r"names from\s+`([\w,]+)`", text)
    assert m, "docs/cli.md's --fast-path list"
    assert tuple(m.group(1).split(",")) == fastpath.OPTIONS
    cuda_default = re.search(r"`CUDA_DEFAULT_OPTIONS`: `([\w,]+)`", text)
    assert cuda_default and set(cuda_default.group(1).split(",")) == fastpath.CUDA_DEFAULT_OPTIONS
    assert "none today" in text and not fastpath.DEFAULT_OPTIONS  # "on the CPU ... DEFAULT_OPTIONS, none today"


def test_the_tests_the_docs_name_exist():
    """``test_x.py`` and ``test_x.py::test_y`` anywhere in the docs name a test file and function that exist
    (docs/reliability.md's table has its own test, tests/test_reliability_doc.py)."""
    functions: dict[str, set[str]] = {}
    wrong = []
    for md in DOCS:
        for n, line in enumerate(md.read_text(encoding="utf-8").splitlines(), 1):
            for file, name in re.findall(r"(?<![\w/])(test_\w+\.py)(?:::(test_\w+))?", line):
                path = ROOT / "tests" / file
                if not path.exists():
                    wrong.append(f"  {md.relative_to(ROOT)}:{n}: no tests/{file}")
                    continue
                if file not in functions:  # read, not parsed: a few large files, and only the names matter
                    functions[file] = set(
                        re.findall(r"^\s*(?:async )?def (test_\w+)", path.read_text(encoding="utf-8"), re.M)
                    )
                if name and name not in functions[file]:
                    wrong.append(f"  {md.relative_to(ROOT)}:{n}: no {file}::{name}")
    assert len(functions) > 20
    assert not wrong, "tests the docs name that do not exist:\n" + "\n".join(wrong)


def test_the_keywords_the_docs_pass_exist():
    """Keywords in the docs' ``load_pipeline(...)`` calls are its parameters; keywords in the Python examples'
    ``pipe(...)`` calls are GenerationRequest fields (what ``Pipeline.__call__`` takes)."""
    import dataclasses
    import inspect

    from sdengine.pipeline.loading import load_pipeline
    from sdengine.pipeline.request import GenerationRequest

    loader = set(inspect.signature(load_pipeline).parameters)
    fields = {f.name for f in dataclasses.fields(GenerationRequest)}
    checked, wrong = 0, []
    for md in DOCS:
        text = md.read_text(encoding="utf-8")
        calls = [(loader, c) for c in re.findall(r"load_pipeline\(([^)]*)\)", text)]
        for block in re.findall(r"```python\n(.*?)```", text, re.S):
            calls += [(fields, c) for c in re.findall(r"\bpipe\((.*?)\)(?:\.images|\n|$)", block, re.S)]
        for allowed, args in calls:
            for keyword in re.findall(r"(?<![\w.=])(\w+)=(?!=)", args):
                checked += 1
                if keyword not in allowed:
                    wrong.append(f"  {md.relative_to(ROOT)}: {keyword}= in ({args.strip()[:60]}...)")
    assert checked > 40, checked
    assert not wrong, "keywords the docs pass that the API does not take:\n" + "\n".join(wrong)


def test_the_job_body_example_is_a_job_the_server_takes():
    """docs/server.md's job body (every field the native route takes, "unknown fields are a 422") validates, and
    names every field but the hires fix's (hires.md has that one)."""
    import json

    pytest.importorskip("pydantic")
    from sdengine.server.schemas import JobRequest

    text = (ROOT / "docs" / "server.md").read_text(encoding="utf-8")
    block = text.split("The job body's fields are the pipeline's keyword names", 1)[1].split("```json", 1)[1]
    body = json.loads(block.split("```", 1)[0])
    body["controlnets"][0]["image"] = "aGVsbG8="  # the placeholder "<upload id or base64>"
    JobRequest.model_validate(body)
    assert set(JobRequest.model_fields) - set(body) == {"hires"}


def test_the_environment_variables_the_docs_name_are_read():
    """Every ``SDENGINE_*`` variable a doc names is read somewhere in the package, the tools, the tests or the
    Makefile."""
    sources = "\n".join(
        p.read_text(encoding="utf-8", errors="replace")
        for folder in ("src", "tools", "tests", "benchmarks")
        for p in (ROOT / folder).rglob("*")
        if p.suffix in (".py", ".sh", ".js") and p.name != Path(__file__).name
    ) + (ROOT / "Makefile").read_text(encoding="utf-8")
    named = {v for md in DOCS for v in re.findall(r"\bSDENGINE_[A-Z0-9_]*[A-Z0-9]\b", md.read_text(encoding="utf-8"))}
    assert len(named) > 5
    missing = sorted(v for v in named if v not in sources)
    assert not missing, f"variables the docs name that nothing reads: {missing}"


def test_every_whole_command_in_a_code_block_parses():
    """A concrete ``sdengine ...`` command in a fenced block (no ``[optional]``, ``a|b`` or ``...`` in it) is one the
    parser takes: the right positionals, values of the right type, choices it has."""
    import contextlib
    import io
    import shlex

    parser = _parser()
    checked, wrong = 0, []
    for md in DOCS:
        commands, fenced, pending = [], False, None
        for n, line in enumerate(md.read_text(encoding="utf-8").splitlines(), 1):
            if line.startswith("```"):
                fenced = not fenced
                continue
            if not fenced:
                continue
            if pending is not None:
                pending = (pending[0], pending[1].rstrip().removesuffix("\\") + " " + line.strip())
            else:
                m = re.match(r"\s*(?:\$ )?(?:torchrun .*?-m )?sdengine (.*)", line)
                if not m:
                    continue
                pending = (n, m.group(1))
            if not line.rstrip().endswith("\\"):
                commands.append(pending)
                pending = None
        for n, command in commands:
            command = re.split(r"\s+#", command)[0]
            if re.search(r"\[|\||\.\.\.", command):
                continue
            checked += 1
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err):
                    parser.parse_args(shlex.split(command))
            except SystemExit:
                wrong.append(f"  {md.relative_to(ROOT)}:{n}: sdengine {command[:80]}: {err.getvalue().strip()[-160:]}")
    assert checked > 50, checked
    assert not wrong, "commands the docs show that the parser refuses:\n" + "\n".join(wrong)


def test_every_route_is_documented():
    """The other direction: every route the server serves is in docs/server.md, comfyui.md or webui.md (as its
    path, or as a short name in a table row of its parent, ``| `GET /sdapi/v1/x`, `y` |``; a ComfyUI route under
    ``/api`` as its plain path; FastAPI's own ``/docs/oauth2-redirect`` aside)."""
    doc = "".join(
        (ROOT / "docs" / name).read_text(encoding="utf-8") for name in ("server.md", "comfyui.md", "webui.md")
    )
    missing = []
    for path, methods, _ in _routes():
        if path == "/docs/oauth2-redirect":
            continue
        plain = re.sub(r"\{\w+(:path)?\}", "{", path.removeprefix("/api") if path.startswith("/api/") else path)
        base = plain.split("{")[0].rstrip("/")
        parent, _, last = base.rpartition("/")
        found = base in doc and ("{" not in plain or re.search(re.escape(base) + r"/\{", doc) is not None)
        if not found:
            row = r"\| `[A-Z]+ " + re.escape(parent) + r"/[\w-]+`[^|\n]*`" + re.escape(last) + "`"
            found = re.search(row, doc) is not None
        if not found:
            missing.append(f"  {'/'.join(sorted(methods))} {path}")
    assert not missing, "routes no doc describes:\n" + "\n".join(missing)


def _schedule_lists() -> list[tuple[str, list[str]]]:
    """(where, names) for every line of README.md and docs/*.md that lists schedules, in backticks, as sdengine
    names them (at least eight of them; docs/comfyui.md's lists are ComfyUI's own scheduler names, another set)."""
    from sdengine.diffusion import sampling

    found = []
    for md in DOCS:
        if md.name == "comfyui.md":
            continue
        items: list[tuple[int, str]] = []  # a list item with its indented continuation lines, or one line
        for n, line in enumerate(md.read_text(encoding="utf-8").splitlines(), 1):
            if items and re.match(r"\s{2,}[^\s*|-]", line):
                items[-1] = (items[-1][0], items[-1][1] + " " + line.strip())
            else:
                items.append((n, line))
        for n, text in items:
            names = [t for t in re.findall(r"`([a-z_]+)`", text) if t in sampling.ALL_SCHEDULES]
            if len(set(names)) >= 8:
                found.append((f"{md.relative_to(ROOT)}:{n}", names))
    return found


def test_every_schedule_list_names_every_schedule():
    """A list of the schedules (docs/cli.md's ``list schedules`` entry and its ``xyz`` axis row, and ``generate
    --schedule``'s help) names each schedule ``sampling.resolve`` takes, none left out."""
    from sdengine.diffusion import sampling

    lists = _schedule_lists()
    assert len(lists) >= 2, lists  # docs/cli.md's two lists at least
    wrong = [f"  {where}: lacks {sorted(set(sampling.ALL_SCHEDULES) - set(names))}" for where, names in lists]
    generate = _subparsers(_parser())["generate"]
    help_text = next(a.help for a in generate._actions if "--schedule" in a.option_strings) or ""
    named = set(re.findall(r"[a-z_]+", help_text))
    if set(sampling.ALL_SCHEDULES) - named:
        wrong.append(f"  generate --schedule's help: lacks {sorted(set(sampling.ALL_SCHEDULES) - named)}")
    wrong = [w for w in wrong if not w.endswith("lacks []")]
    assert not wrong, "schedule lists that leave schedules out:\n" + "\n".join(wrong)


def test_the_defaults_the_docs_show_in_brackets_are_the_parsers():
    """``[--flag VALUE]`` after ``sdengine COMMAND`` in a doc, for a flag whose parser default is set, shows that
    default (a placeholder such as ``N``, ``DIR`` or ``...`` is no value; numbers compared as numbers)."""
    checked, wrong = 0, []
    for where, command, flag, parser, value in _bracketed_values():
        action = next(a for a in parser._actions if flag in a.option_strings)
        if action.default is None or action.nargs == 0 or re.fullmatch(r"[A-Z][A-Z_]*|\.\.\.", value):
            continue
        checked += 1
        ok = str(action.default) == value
        try:
            ok = ok or float(value) == float(action.default)
        except (TypeError, ValueError):
            pass
        if not ok:
            wrong.append(f"  {where}: sdengine {command} [{flag} {value}], the parser's default is {action.default!r}")
    assert checked >= 8, checked
    assert not wrong, "defaults the docs show that are not the parser's:\n" + "\n".join(wrong)


def _bracketed_values() -> list[tuple[str, str, str, argparse.ArgumentParser, str]]:
    """(where, command, flag, parser, value) for every ``[--flag VALUE]`` a doc writes after ``sdengine COMMAND``."""
    found = []
    commands = _subparsers(_parser())
    for md in DOCS:
        for n, line in _logical_lines(md):
            where = f"{md.relative_to(ROOT)}:{n}"
            for m in re.finditer(r"sdengine(?:\s+--threads\s+\w+)?\s+([a-z][\w-]*)(?:\s+([a-z][\w-]*))?([^`]*)", line):
                name, second, rest = m.group(1), m.group(2), m.group(3)
                if name not in commands:
                    continue
                parser, words = commands[name], name
                inner = _subparsers(parser)
                if inner:
                    if second not in inner:
                        continue
                    parser, words = inner[second], f"{name} {second}"
                flags = _flags(parser)
                for flag, value in re.findall(r"\[(--[a-z][\w-]*) ([^\]\s|]+)\]", rest.split("sdengine ")[0]):
                    if flag in flags:
                        found.append((where, words, flag, parser, value))
    return found


def _anchors(md: Path) -> set[str]:
    """The ``#fragment`` names of a Markdown file's headings as GitHub makes them: lower case, punctuation but
    ``-`` and ``_`` dropped, spaces as ``-`` (a repeated heading's ``-1`` ... too); code blocks hold no heading."""
    text = re.sub(r"```.*?```", "", md.read_text(encoding="utf-8"), flags=re.S)
    out: set[str] = set()
    for heading in re.findall(r"^#+ (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        k = 0
        while (slug if k == 0 else f"{slug}-{k}") in out:
            k += 1
        out.add(slug if k == 0 else f"{slug}-{k}")
    return out


def test_every_relative_link_reaches_a_file_and_heading():
    """A relative Markdown link or image names a file that exists, and its ``#fragment`` (in a link to a Markdown
    file, or within the same file) a heading there."""
    checked, wrong = 0, []
    for md in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", md.read_text(encoding="utf-8")):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue
            checked += 1
            path, _, fragment = target.partition("#")
            dest = (md.parent / path).resolve() if path else md
            if not dest.exists():
                wrong.append(f"  {md.relative_to(ROOT)}: ({target}): no such file")
            elif fragment and dest.suffix == ".md" and fragment not in _anchors(dest):
                wrong.append(f"  {md.relative_to(ROOT)}: ({target}): no such heading")
    assert checked > 50, checked
    assert not wrong, "links that lead nowhere:\n" + "\n".join(wrong)
