"""The package's shape, checked mechanically (the rules are written out in docs/ARCHITECTURE.md).

Every module under src/sdengine is parsed with ``ast`` (nothing is imported), and:

a. no module uses another sdengine module's private names (``from x import _name``, ``x._name``, ``x._mod``);
   tests/ are held to the same rule;
b. imports only go down the layer table :data:`LAYERS` (same layer or lower);
c. the package never imports the test oracles (diffusers, transformers, peft, accelerate);
d. every relative link in README.md and docs/**/*.md points at a file that exists (and at a heading that exists,
   when it names one), every Markdown file under docs/ that a module or test mentions exists, every reference of
   the form "CONTRACTS.md, <section title>" names a section of the contracts file, and nothing points at a
   contract file outside the repository;
e. every CUDA-only test is marked ``cuda``, which is what tools/gpu_check.sh runs on a GPU machine.

Each test collects every violation and reports them all at once. :data:`KNOWN` lists the violations that exist
would list violations tolerated for a while (it is empty);
an entry that no longer occurs is reported too, so the list can only shrink. Nothing new goes in it.
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "sdengine"

# Lower layers never import higher ones. The key is the first name under sdengine (a subpackage or a module).
LAYERS: dict[str, int] = {
    # 0: foundations, used by everything
    "errors": 0,
    "names": 0,  # did-you-mean suggestions for unknown names
    "devices": 0,
    "io": 0,
    "imageio": 0,  # a re-export of io/images for old imports
    "threads": 0,  # the thread count and OpenMP wait policy chosen at start-up
    "catalog": 0,  # the built-in models, LoRAs and ControlNets by name (reads the file system only)
    "distributed": 0,  # torchrun's environment, the process group, the collectives the trainers need
    "sdpa_backends": 0,  # which fused attention kernel runs; masked calls kept off cuDNN's
    # 1: the building blocks: networks, samplers, text, weight files, data, metrics
    "nn": 1,
    "models": 1,
    "diffusion": 1,
    "text": 1,
    "weights": 1,
    "control": 1,  # preprocessors and ControlNet files; the controlled U-Net is pipeline/control
    "prompts": 1,
    "metadata": 1,
    "vae_utils": 1,
    "cuda_graphs": 1,  # CUDA graphs of a network's calls, recorded per shape, with fall-backs
    "aot": 1,  # networks compiled ahead of time (AOTInductor packages), weights bound from the live module
    "ddpm": 1,
    "data": 1,
    "metrics": 1,
    "image_info": 1,  # the parameters text of PNG/JPEG/WebP files, without torch
    # 2: the generation core
    "pipeline": 2,
    "fastpath": 2,  # optional speed options applied to a loaded pipeline (channels_last, compile)
    "latent_sampling": 2,  # sampling from latents and conditioning the caller holds (ComfyUI's nodes)
    # 3: what runs the core: trainers and evaluations
    "train": 3,
    "eval": 3,
    "evaluation": 3,
    "bench": 3,  # sdengine bench: timing and memory against a peer engine
    "bench_scaling": 3,  # sdengine bench --scaling: time and memory against size and batch, parts composed
    "bench_decode": 3,  # sdengine bench --decoders: the full and the tiny VAE decode against diffusers'
    "bench_gpu": 3,  # sdengine bench --device cuda: the GPU comparison in one prepared run
    "bench_timeline": 3,  # one generation's profiler trace cut into the pipeline's stages (GPU busy, idle gaps)
    "grids": 3,  # X/Y/Z plots and batch grids over the pipeline
    "outpaint": 3,  # extend the canvas: pad, mask the new area, inpaint, paste the original back
    "sd_upscale": 3,  # A1111's SD upscale script: upscale, tiles, img2img each, the overlap blend
    "batch_render": 3,  # generate --prompts: a checked list of requests, resumable, sharded over ranks
    # 4: the front ends
    "demo": 4,
    "commands": 4,
    "cli": 4,
    "server": 4,
    "__main__": 4,
}

ORACLES = ("diffusers", "transformers", "peft", "accelerate", "lycoris")

# Known violations (none today). Nothing new goes in it: fix the code instead.
KNOWN: frozenset[str] = frozenset({})


# ----------------------------------------------------------------------------------------------- the parser


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


@dataclass(frozen=True)
class Use:
    """One module's use of another sdengine module: ``target`` and, for ``from target import name`` or
    ``target.name``, the name (None when the module itself is imported)."""

    line: int
    target: str
    name: str | None


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _base_of(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    package = module if is_package else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _uses(module: str, path: Path, tree: ast.AST) -> Iterator[Use]:
    """Every import of an sdengine module and every attribute read through an imported sdengine module."""
    is_package = path.name == "__init__.py"
    aliases: dict[str, str] = {}  # local name -> sdengine module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == PACKAGE:
                    yield Use(node.lineno, a.name, None)
                    aliases[a.asname or PACKAGE] = a.name if a.asname else PACKAGE
        elif isinstance(node, ast.ImportFrom):
            base = _base_of(module, is_package, node)
            if base.split(".")[0] != PACKAGE:
                continue
            for a in node.names:
                full = f"{base}.{a.name}"
                if full in MODULES:
                    yield Use(node.lineno, full, None)
                    aliases[a.asname or a.name] = full
                else:
                    yield Use(node.lineno, base, a.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            chain: list[str] = []
            inner: ast.expr = node
            while isinstance(inner, ast.Attribute):
                chain.append(inner.attr)
                inner = inner.value
            if not isinstance(inner, ast.Name) or inner.id not in aliases:
                continue
            target = aliases[inner.id]
            for attr in reversed(chain):
                if f"{target}.{attr}" in MODULES and not _is_private(attr):
                    target = f"{target}.{attr}"
                    continue
                yield Use(node.lineno, target, attr)
                break


@functools.cache
def _parsed() -> tuple[tuple[str, Path, ast.AST], ...]:
    """Every sdengine module's syntax tree, parsed once for the rules below (nothing here changes a tree)."""
    return tuple(
        (module, path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        for module, path in MODULES.items()
    )


@functools.cache
def _module_uses(module: str) -> tuple[Use, ...]:
    """:func:`_uses` of an sdengine module, found once for the rules that read them."""
    path, tree = next((p, t) for m, p, t in _parsed() if m == module)
    return tuple(_uses(module, path, tree))


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def _report(found: set[str], kind: str) -> list[str]:
    """The violations of ``kind`` that are not known, and the known ones that no longer occur."""
    known = {k for k in KNOWN if k.startswith(f"{kind}: ")}
    lines = [f"  {v}" for v in sorted(found - known)]
    lines += [f"  stale KNOWN entry (it no longer occurs: delete it): {v}" for v in sorted(known - found)]
    return lines


def _private_violations(source: str, module: str | None, uses: Iterator[Use]) -> set[str]:
    found = set()
    for use in uses:
        names = [use.name] if use.name is not None else []
        if use.target == module:
            continue
        if any(_is_private(p) for p in use.target.split(".")) or any(_is_private(n) for n in names):
            found.add(f"private: {source} uses {use.target}" + (f".{use.name}" if use.name else ""))
    return found


# -------------------------------------------------------------------------------------------------- the rules


def test_every_module_is_in_the_layer_table():
    missing = sorted({m.split(".")[1] for m in MODULES if m != PACKAGE} - set(LAYERS))
    assert not missing, f"add these to LAYERS (and docs/ARCHITECTURE.md): {missing}"


def test_no_private_names_across_modules():
    found: set[str] = set()
    for module, _path, _tree in _parsed():
        found |= _private_violations(module, module, iter(_module_uses(module)))
    for path in sorted((ROOT / "tests").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        source = f"tests/{path.name}"
        found |= _private_violations(source, None, _uses("tests." + path.stem, path, tree))
    problems = _report(found, "private")
    assert not problems, "private names used across modules (make them public or move the code):\n" + "\n".join(
        problems
    )


def test_imports_only_go_down_the_layers():
    found: set[str] = set()
    for module, _path, _tree in _parsed():
        src_layer = _layer(module)
        if src_layer is None:  # the package root re-exports load_pipeline for users
            continue
        for use in _module_uses(module):
            if use.name is not None and f"{use.target}.{use.name}" in MODULES:
                continue
            dst_layer = _layer(use.target)
            if dst_layer is not None and dst_layer > src_layer:
                found.add(f"layer: {module} ({src_layer}) imports {use.target} ({dst_layer})")
    problems = _report(found, "layer")
    assert not problems, "imports that go up the layer table (see docs/ARCHITECTURE.md):\n" + "\n".join(problems)


def test_the_package_never_imports_the_test_oracles():
    found = []
    for module, _path, tree in _parsed():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found += [f"  {module}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in ORACLES]
    assert not found, "diffusers/transformers/peft are test oracles only:\n" + "\n".join(found)


# ------------------------------------------------------------------------------------------------ the documents

_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _headings(md: Path) -> list[str]:
    return _HEADING.findall(_FENCE.sub("", md.read_text(encoding="utf-8")))


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_relative_links_in_readme_and_docs_resolve():
    broken = []
    for md in _markdown_files():
        text = _FENCE.sub("", md.read_text(encoding="utf-8"))
        for target in _LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path_part, _, fragment = target.partition("#")
            dest = (md.parent / path_part).resolve() if path_part else md
            where = f"  {md.relative_to(ROOT)}: ({target})"
            if not dest.exists():
                broken.append(f"{where} -> no such file")
            elif fragment and dest.suffix == ".md" and fragment not in {_anchor(h) for h in _headings(dest)}:
                broken.append(f"{where} -> no heading #{fragment} in {dest.relative_to(ROOT)}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def _code_and_docs() -> Iterator[Path]:
    for folder in ("src", "tests", "benchmarks", "tools", "docs"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".md") and path.is_file():
                yield path
    yield ROOT / "README.md"
    yield ROOT / "Makefile"


def test_references_stay_inside_the_repository():
    """A Markdown file under docs/ mentioned anywhere exists; a "CONTRACTS.md, <section title>" reference names a
    real section; no pointer at a contract file or folder that is not in the repository (that pattern is spelled
    in pieces so that this file does not match itself)."""
    contracts = ROOT / "docs" / "CONTRACTS.md"
    sections = set(_headings(contracts))
    outside = re.compile(r"\b" + "SP" + "EC" + r"(\.md|\s+section|\s+\d)|\.\./" + "shared")
    problems = []
    outside_files = set()
    for path in _code_and_docs():
        rel = path.relative_to(ROOT)
        text = path.read_text(encoding="utf-8")
        for n, line in enumerate(text.splitlines(), 1):
            if outside.search(line):
                outside_files.add(f"ref: {rel} points outside the repository")
                if f"ref: {rel} points outside the repository" not in KNOWN:
                    problems.append(f"  {rel}:{n}: points outside the repository: {line.strip()}")
            for doc in re.findall(r"\bdocs/[\w./-]+\.md\b", line):
                if not (ROOT / doc).is_file():
                    problems.append(f"  {rel}:{n}: {doc} does not exist")
        # "docs/CONTRACTS.md, Seeds" / "docs/CONTRACTS.md, Model files and Test oracles" (may wrap a line)
        for m in re.finditer(r"CONTRACTS\.md,\s+([A-Z][\w ]*(?:\s+and\s+[A-Z][\w ]*)*)", text):
            for name in re.split(r"\s+and\s+", " ".join(m.group(1).split())):
                if name not in sections:
                    line_no = text.count("\n", 0, m.start()) + 1
                    problems.append(f"  {rel}:{line_no}: no section {name!r} in docs/CONTRACTS.md")
    problems += [line for line in _report(outside_files, "ref") if "stale KNOWN" in line]
    assert not problems, "references that lead nowhere:\n" + "\n".join(problems)


def test_every_test_that_needs_cuda_is_marked_so_the_gpu_check_runs_it():
    """tools/gpu_check.sh runs the tests marked ``cuda`` (only those) on a GPU machine: a CUDA-only test without the
    marker would never run anywhere."""
    unmarked = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if "@pytest.mark.skipif" not in line:
                continue
            # the condition is on this line, or on the next when the decorator's parenthesis ends the line
            condition = lines[i + 1] if line.rstrip().endswith("(") and i + 1 < len(lines) else line
            if re.search(r"not torch\.cuda\.is_available\(\)", condition):
                if not any("@pytest.mark.cuda" in lines[j] for j in range(max(0, i - 3), i)):
                    unmarked.append(f"{path.name}:{i + 1}")
    assert not unmarked, f"CUDA-only tests without @pytest.mark.cuda: {unmarked}"
    assert "-m cuda" in (ROOT / "tools" / "gpu_check.sh").read_text()
