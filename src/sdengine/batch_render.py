"""``sdengine generate --prompts FILE``: render a list of requests, resumably, on one process or sharded over the
ranks of ``torchrun``.

The file: ``.txt`` holds one prompt per line (or, for a line starting with ``--``, A1111's command-line form,
:data:`A1111_LINE_TAGS`); ``.jsonl`` one JSON object per line with
:class:`~sdengine.pipeline.request.GenerationRequest` fields (``{"prompt": "a cat", "steps": 30, "seed": 7}``).
Blank lines are skipped (and ``#`` comment lines in ``.txt``). The command's flags are every line's defaults; a
line's fields override them.

The rules that make a list reproducible and resumable:

* **Index.** Line ``L`` of the file (1-based, blank lines counted) is request index ``i = L - 1``.
* **Seed.** A line's own ``seed`` wins; otherwise ``base + i``, where ``base`` is ``--seed`` (default 0 for a
  list: a random base would make the names unknowable, so a list never draws one). A line making ``n`` images
  (``batch_size`` or lists) gets seeds ``s, s + 1, ...`` like any batch.
* **Names.** ``IIIII-SEED.png`` (``IIIII-K-SEED.png`` for image ``K`` of a line making several): a pure function
  of the line and the seed rule. A line whose files all exist is skipped, so running the command again after a
  crash renders only what is missing (a file of such a name must record the line's seed and prompt: another image
  there is a :class:`PromptListError`, never skipped nor replaced); every PNG is written atomically (a
  half-written file never has the name).
* **Checked first.** Every line is parsed and validated before the model is loaded: a bad line is a one-line
  :class:`PromptListError` naming the file and line number, and nothing is rendered.
* **Ranks.** Under torchrun (``RANK``/``WORLD_SIZE`` set) rank ``r`` of ``N`` renders the requests with
  ``i % N == r`` (every line on exactly one rank; no process group is needed), on ``cuda:LOCAL_RANK`` when the
  device is CUDA. Each image is made alone with its own seed, so the files are the same bytes whatever ``N``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .distributed import World, env_world
from .errors import SdengineError, UsageError

# Settings a line may not give: they belong to the process, not to one request.
NOT_PER_LINE = frozenset({"callback", "progress"})


class PromptListError(UsageError):
    """A line of a ``--prompts`` file cannot be read or makes no valid request (the message names the line)."""


@dataclass(frozen=True)
class ListItem:
    """One line of the list: its index (line number - 1), settings, seeds and output names."""

    index: int
    settings: dict[str, Any]  # GenerationRequest fields, seed filled in
    seeds: tuple[int, ...]
    names: tuple[str, ...]
    source: str = "--prompts"  # the list's file, for errors found when the line renders
    prompts: tuple[str, ...] = ()  # each image's prompt (to tell this line's finished files from others)
    # the settings the command's flags or the line gave: a model family's defaults (SD3, Flux) leave them be
    chosen: frozenset[str] = frozenset()

    @property
    def line(self) -> int:
        return self.index + 1


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise PromptListError(f"--prompts {path}: no such file")
    try:
        # utf-8-sig: a byte-order mark (Windows Notepad writes one) is not part of the first prompt
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise PromptListError(f"--prompts {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


# A1111's "Prompts from file or textbox" lines (``--prompt "a cat" --steps 20 --seed 5``): its tags -> our fields.
A1111_LINE_TAGS: dict[str, tuple[str, type]] = {
    "prompt": ("prompt", str),
    "negative_prompt": ("negative_prompt", str),
    "seed": ("seed", int),
    "subseed": ("subseed", int),
    "subseed_strength": ("subseed_strength", float),
    "sampler_name": ("sampler", str),
    "scheduler": ("schedule", str),
    "batch_size": ("batch_size", int),
    "steps": ("steps", int),
    "cfg_scale": ("cfg_scale", float),
    "denoising_strength": ("strength", float),
    "width": ("width", int),
    "height": ("height", int),
}


def _a1111_line(path: Path, lineno: int, text: str) -> dict[str, Any]:
    """A .txt line in A1111's command-line form, read as its script reads it (``--prompt`` and
    ``--negative_prompt`` take every word up to the next ``--tag``); a tag sdengine cannot honour (``--n_iter``,
    ``--sd_model``, ``--styles``, ...) is an error naming the line, never a prompt of that text."""
    import shlex

    try:
        words = shlex.split(text)
    except ValueError as e:
        raise PromptListError(f"{path}:{lineno}: cannot read the line's --options ({e})") from None
    out: dict[str, Any] = {}
    pos = 0
    while pos < len(words):
        arg = words[pos]
        if not arg.startswith("--"):
            raise PromptListError(f"{path}:{lineno}: expected an --option (A1111's form), got {arg!r}")
        tag = arg[2:]
        if tag not in A1111_LINE_TAGS:
            raise PromptListError(
                f"{path}:{lineno}: {arg} is not an option sdengine's prompt lists take "
                f"(they take --{', --'.join(A1111_LINE_TAGS)}); use a .jsonl line for other settings"
            )
        if pos + 1 >= len(words):
            raise PromptListError(f"{path}:{lineno}: {arg} has no value")
        field, kind = A1111_LINE_TAGS[tag]
        pos += 1
        if kind is str and tag in ("prompt", "negative_prompt"):
            value: Any = words[pos]
            pos += 1
            while pos < len(words) and not words[pos].startswith("--"):
                value += " " + words[pos]
                pos += 1
        else:
            try:
                value = kind(words[pos])
            except ValueError:
                raise PromptListError(f"{path}:{lineno}: {arg} {words[pos]!r} is not a number") from None
            pos += 1
        if tag == "sampler_name":  # A1111 looks the name up in lower case ("euler a" is "Euler a")
            from .diffusion.sampling import A1111_NAMES, SAMPLERS

            value = {n.lower(): n for n in (*SAMPLERS, *A1111_NAMES)}.get(value.lower(), value)
        out[field] = value
    return out


def _line_settings(path: Path, lineno: int, text: str, jsonl: bool) -> dict[str, Any] | None:
    """The fields one line gives (None: a line to skip)."""
    if not text.strip():
        return None
    if not jsonl:
        if text.lstrip().startswith("#"):
            return None
        return _a1111_line(path, lineno, text) if text.lstrip().startswith("--") else {"prompt": text}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PromptListError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, dict):
        raise PromptListError(f"{path}:{lineno}: a line must be a JSON object with request fields, not {data!r:.60}")
    bad = sorted(NOT_PER_LINE & set(data))
    if bad:
        raise PromptListError(f"{path}:{lineno}: {', '.join(bad)} cannot be set per line")
    return data


def with_family_defaults(
    settings: Mapping[str, Any], family: Mapping[str, Any] | None, chosen: Iterable[str]
) -> dict[str, Any]:
    """``settings`` with a model family's defaults (``pipe.family_defaults``: SD3's, Flux's) where neither the
    command's flags nor the line chose them, by ``generate``'s rule: the sampler and schedule as a pair (when
    neither was chosen), ``cfg_scale`` and ``steps`` each."""
    out = dict(settings)
    if not family:
        return out
    chosen = set(chosen)
    if "sampler" not in chosen and "schedule" not in chosen:
        out.update({k: family[k] for k in ("sampler", "schedule") if k in family})
    out.update({k: family[k] for k in ("cfg_scale", "steps") if k in family and k not in chosen})
    return out


def parse_prompt_list(
    path: str | Path, defaults: Mapping[str, Any], base_seed: int = 0, chosen: Iterable[str] = ()
) -> list[ListItem]:
    """Every request of the file, checked (see the module notes); ``defaults`` are the fields every line starts
    from, ``chosen`` those of them the command's flags gave (the rest a model family may replace:
    :func:`with_family_defaults`). Raises :class:`PromptListError` naming the first bad line; an empty list is an
    error too."""
    from .pipeline.request import GenerationRequest

    path = Path(path)
    if path.suffix.lower() not in (".txt", ".jsonl"):
        raise PromptListError(f"--prompts {path}: give a .txt (one prompt per line) or .jsonl (one request per line)")
    if not isinstance(base_seed, int) or base_seed < 0:
        raise PromptListError(f"the base seed of a prompt list must be an integer >= 0, got {base_seed!r}")
    jsonl = path.suffix.lower() == ".jsonl"
    items: list[ListItem] = []
    for index, text in enumerate(_read_lines(path)):
        lineno = index + 1
        given = _line_settings(path, lineno, text, jsonl)
        if given is None:
            continue
        settings = {**defaults, **given}
        settings.pop("progress", None)
        if settings.get("seed") is None:
            settings["seed"] = base_seed + index
        try:
            request = GenerationRequest.from_dict(settings).precheck()
            random_seed = not isinstance(request.seed, list | tuple) and int(request.seed) == -1  # type: ignore[arg-type]
            seeds = request.seeds()
            prompts = tuple(request.prompts())
        except (SdengineError, TypeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PromptListError(f"{path}:{lineno}: {first}") from None
        if random_seed:  # a random seed would make the line's file name unknowable, and the list unresumable
            raise PromptListError(f"{path}:{lineno}: a seed in a prompt list must be >= 0 (no random seeds)")
        names = (
            (f"{index:05d}-{seeds[0]}.png",)
            if len(seeds) == 1
            else tuple(f"{index:05d}-{k}-{s}.png" for k, s in enumerate(seeds))
        )
        picked = frozenset(chosen) | frozenset(given)
        items.append(ListItem(index, settings, tuple(seeds), names, str(path), prompts, picked))
    if not items:
        raise PromptListError(f"--prompts {path}: no requests (every line is blank)")
    return items


@dataclass
class RenderReport:
    """What one process did: files written, lines skipped because their files existed, lines of other ranks."""

    written: list[Path]
    skipped: int
    other_ranks: int


def render_prompt_list(
    items: list[ListItem],
    out: str | Path,
    load: Callable[[], Any],
    *,
    world: World | None = None,
    progress: bool = True,
    echo: Callable[[str], None] | None = print,
) -> RenderReport:
    """Render this rank's unfinished ``items`` into ``out`` with the pipeline ``load()`` returns (loaded only if
    there is something to render). ``world``: default the torchrun environment, else one process."""
    from .metadata import save_png
    from .pipeline.request import GenerationRequest

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: a prompt list is written into a folder, and {out} is a file")
    world = world if world is not None else (env_world() or World())
    mine = [items[k] for k in world.shard(len(items))]
    for it in mine:  # before anything renders: a file of this name that is another image is neither skipped nor lost
        for k, name in enumerate(it.names):
            _check_existing(out / name, it, k)
    todo = [it for it in mine if not all((out / n).is_file() for n in it.names)]
    report = RenderReport([], len(mine) - len(todo), len(items) - len(mine))
    if not todo:
        return report
    out.mkdir(parents=True, exist_ok=True)
    pipe = load()
    family = getattr(pipe, "family_defaults", None)
    for it in todo:
        settings = with_family_defaults(it.settings, family, it.chosen)
        try:  # what only the model can check (a size that is no multiple of its VAE's factor) names the line too
            result = pipe(GenerationRequest.from_dict({**settings, "progress": progress}))
        except SdengineError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PromptListError(f"{it.source}:{it.line}: {first}") from None
        for image, text, name in zip(result.images, result.infotexts, it.names, strict=True):
            path = save_png(image, out / name, text)
            report.written.append(path)
            if echo is not None:
                echo(str(path))
    return report


def _words(text: str) -> str:
    return " ".join(text.split())


def _check_existing(path: Path, item: ListItem, k: int) -> None:
    """A file already named like image ``k`` of ``item`` must be that image (a finished line of an earlier run
    of this list): its parameters record the line's seed and prompt (``<lora:...>`` tags the run appended to
    the prompt allowed). Anything else there, say ``generate``'s ``00000-0.png`` of another prompt in the same
    folder, is a :class:`PromptListError`: skipping it would leave the line unmade, rendering would replace it."""
    if not path.exists() and not path.is_symlink():
        return
    from .metadata import MetadataError, parse_parameters, read_png_parameters

    what = "not an image with parameters"
    if path.is_file():
        try:
            text = read_png_parameters(path)
        except MetadataError:
            text = None
        if text is not None:
            fields = parse_parameters(text)
            seed, prompt = fields.get("Seed", ""), fields.get("Prompt", "")
            expected = item.prompts[k] if k < len(item.prompts) else str(item.settings.get("prompt", ""))
            recorded, expected = _words(prompt), _words(expected)
            if seed == str(item.seeds[k]) and (recorded == expected or recorded.startswith(f"{expected} <lora:")):
                return
            what = f"seed {seed or 'none'}, prompt {prompt[:60]!r}"
    raise PromptListError(
        f"{item.source}:{item.line}: {path} exists and is not this line's image ({what}): move it or give another --out"
    )


def rank_device(device: str, world: World | None) -> str:
    """The device a rank renders on: ``cuda:LOCAL_RANK`` for a CUDA device under torchrun, else ``device``."""
    if world is None or world.size == 1:
        return device
    if device == "cuda" or (device == "auto" and _cuda_available()):
        return f"cuda:{world.local_rank}"
    return device


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def summary_line(report: RenderReport, world: World | None) -> str:
    where = f"rank {world.rank}/{world.size}: " if world is not None and world.size > 1 else ""
    return f"{where}{len(report.written)} image(s) written, {report.skipped} line(s) already done" + (
        f", {report.other_ranks} on other ranks" if report.other_ranks else ""
    )


def print_summary(report: RenderReport, world: World | None) -> None:
    print(summary_line(report, world), file=sys.stderr)


__all__ = [
    "A1111_LINE_TAGS",
    "NOT_PER_LINE",
    "ListItem",
    "PromptListError",
    "RenderReport",
    "parse_prompt_list",
    "print_summary",
    "rank_device",
    "render_prompt_list",
    "summary_line",
    "with_family_defaults",
]
