"""How well the ``emoji`` model follows its prompts, measured with the emoji recogniser.

:func:`evaluate_emoji` generates images and scores them with a recogniser (a classifier over the emoji chars,
``sdengine.metrics.emoji_recogniser``):

a. **prompt adherence**: recogniser top-1 / top-5 on images generated from every base-model emoji's canonical
   caption (all but the held-out subgroup; ``n`` takes an evenly spaced subset) and from the hand-written
   paraphrases (:mod:`sdengine.data.emoji_paraphrases`). An image counts as correct at k when the
   recogniser's k best classes contain the emoji the prompt asks for;
b. **Frechet distance** between the recogniser features of those caption images and of the real renders of
   all base-model emoji (:mod:`sdengine.metrics.frechet`);
c. **guidance sweep**: top-1 / top-5 on a fixed, evenly spaced subset (``sweep_n``) of the captions at each
   scale of ``cfg_sweep``;
d. **ControlNet** (given one): for an evenly spaced subset of renders, the Canny edges of the render are the
   control; the caption, and then the empty prompt (where only the ControlNet can give the structure), is
   generated with and without the ControlNet, and the report gives the mean F1
   between the control edges and the Canny edges of the generated image, with a 1-pixel tolerance (an edge
   pixel counts as matched when the other map has an edge within its 3x3 neighbourhood); the pixel-exact F1
   is reported beside it. A mismatched prompt (another emoji's caption) is generated with the ControlNet too:
   its F1, and how often the recogniser's top 5 holds the prompt's emoji, the control's, or either; with
   ``control_sweep`` again at other conditioning scales, step ranges, guidance scales or in guess mode (the
   trade-off between the two);
e. **LoRA** (given one): top-1 / top-5 on the held-out subgroup's canonical captions and on the fruit
   paraphrases, without and with the LoRA.

Reproducibility: every image has its own seed. A caption image of dataset entry ``j`` uses ``seed + j`` (so the
same emoji gets the same noise in every section and at every guidance scale), paraphrase ``k`` uses
``seed + k``. Images are generated in batches of different prompts (:func:`generate_batch`,
one call of the pipeline's batched core), and a row does not depend on its batch: row ``i`` equals
``pipe(prompts[i], seed=seeds[i])`` of the ordinary pipeline.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sdengine.errors import UsageError
from sdengine.eval import emoji_defaults
from sdengine.io.images import to_uint8
from sdengine.pipeline.control import ControlUnit

__all__ = [
    "DEFAULT_CFG",
    "DEFAULT_CFG_SWEEP",
    "canny_edges",
    "edge_f1",
    "evaluate_emoji",
    "evenly_spaced",
    "format_report",
    "generate_batch",
    "resize_uint8",
    "topk_hits",
]

DEFAULT_CFG, DEFAULT_CFG_SWEEP = emoji_defaults.DEFAULT_CFG, emoji_defaults.DEFAULT_CFG_SWEEP
RECOGNISER_SIZE = 64  # the recogniser reads 64x64 images, as the renders are
EDGE_TOLERANCE_PX = 1


# ---------------------------------------------------------------------------------------------------
# Small pure pieces
# ---------------------------------------------------------------------------------------------------


def evenly_spaced(total: int, n: int | None) -> list[int]:
    """``n`` indices spread evenly over ``range(total)`` (first and last included); all when ``n`` is None or
    at least ``total``."""
    if n is None or n >= total:
        return list(range(total))
    if n < 1:
        raise UsageError(f"n must be at least 1, got {n}")
    if n == 1:
        return [0]
    return sorted({int(round(i * (total - 1) / (n - 1))) for i in range(n)})


def topk_hits(logits: Tensor, targets: Tensor, k: int) -> Tensor:
    """Bool ``(B,)``: whether each row's ``k`` largest logits contain its target class. ``k`` larger than the
    number of classes counts every class."""
    if logits.ndim != 2:
        raise UsageError(f"logits must be (B, classes), got {tuple(logits.shape)}")
    targets = torch.as_tensor(targets, device=logits.device).long().reshape(-1)
    if targets.shape[0] != logits.shape[0]:
        raise UsageError(f"{logits.shape[0]} rows of logits but {targets.shape[0]} targets")
    k = max(1, min(int(k), logits.shape[1]))
    top = logits.topk(k, dim=1).indices
    return (top == targets[:, None]).any(dim=1)


def _dilate(edges: np.ndarray, px: int) -> np.ndarray:
    if px <= 0:
        return edges
    import cv2

    kernel = np.ones((2 * px + 1, 2 * px + 1), np.uint8)
    return cv2.dilate(edges.astype(np.uint8), kernel) > 0


def edge_f1(reference: np.ndarray, generated: np.ndarray, tolerance: int = EDGE_TOLERANCE_PX) -> float:
    """F1 between two edge maps (H, W) (anything > 0 is an edge; an RGB map is read from its first channel).

    Precision: the fraction of ``generated`` edge pixels that have a ``reference`` edge within ``tolerance``
    pixels (a (2t+1)^2 square); recall: the same the other way round. ``tolerance=0`` is pixel-exact. Two
    empty maps agree (1.0); one empty map against a non-empty one scores 0.
    """
    ref = np.asarray(reference)
    gen = np.asarray(generated)
    ref = ref[..., 0] if ref.ndim == 3 else ref
    gen = gen[..., 0] if gen.ndim == 3 else gen
    if ref.shape != gen.shape:
        raise UsageError(f"edge maps differ in size: {ref.shape} vs {gen.shape}")
    ref, gen = ref > 0, gen > 0
    n_ref, n_gen = int(ref.sum()), int(gen.sum())
    if n_ref == 0 and n_gen == 0:
        return 1.0
    if n_ref == 0 or n_gen == 0:
        return 0.0
    precision = float((gen & _dilate(ref, tolerance)).sum()) / n_gen
    recall = float((ref & _dilate(gen, tolerance)).sum()) / n_ref
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def canny_edges(rgb_uint8: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) uint8 edges (0/255), with sdengine.control's canny (100/200)."""
    from PIL import Image

    from sdengine.control import canny

    return np.asarray(canny(Image.fromarray(rgb_uint8)))[..., 0]


def resize_uint8(a: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8 (Lanczos; unchanged when it already has that size)."""
    if a.shape[0] == size and a.shape[1] == size:
        return a
    from PIL import Image

    return np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.LANCZOS))


@dataclass(frozen=True)
class ControlSetting:
    """How the ControlNet is applied for one point of the mismatched-prompt sweep: conditioning ``scale`` for the
    first ``end`` of the steps, guidance ``cfg`` (None: the evaluation's), ``guess_mode`` (the ControlNet on the
    conditional rows only: diffusers' guess mode; sd-webui-controlnet's "ControlNet is more important" also
    softens its weights)."""

    scale: float = 1.0
    end: float = 1.0
    cfg: float | None = None
    guess_mode: bool = False
    start: float = 0.0
    early: float = 0.0  # the scale before ``start`` (0: no ControlNet there)

    def describe(self, cfg: float) -> str:
        mode = ", guess mode" if self.guess_mode else ""
        if self.start > 0:
            steps = f"from {self.start:.0%} to {self.end:.0%} of the steps"
            if self.early > 0:
                steps += f" (scale {self.early:g} before)"
        else:
            steps = f"for the first {self.end:.0%} of the steps"
        return f"ControlNet scale {self.scale:g} {steps}, cfg {cfg:g}{mode}"


def control_setting(point: ControlSetting | Sequence[Any]) -> ControlSetting:
    """A :class:`ControlSetting` from itself or a ``(scale, end[, cfg[, guess_mode]])`` tuple, checked: scale
    >= 0, end in (0, 1], cfg >= 0; anything else is a one-line :class:`UsageError`."""
    if isinstance(point, ControlSetting):
        st = point
    else:
        if not isinstance(point, tuple | list) or not 2 <= len(point) <= 4:
            raise UsageError(f"control_sweep takes (scale, end[, cfg[, guess_mode]]) tuples, got {point!r}")
        nums = list(point[:3])
        guess = point[3] if len(point) == 4 else False
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in nums) or not isinstance(guess, bool):
            raise UsageError(f"control_sweep takes (scale, end[, cfg[, guess_mode]]) tuples, got {point!r}")
        st = ControlSetting(float(nums[0]), float(nums[1]), float(nums[2]) if len(nums) == 3 else None, guess)
    ok = math.isfinite(st.scale) and st.scale >= 0 and math.isfinite(st.end) and 0 < st.end <= 1
    ok = ok and math.isfinite(st.start) and 0 <= st.start < st.end and math.isfinite(st.early) and st.early >= 0
    ok = ok and (st.early == 0 or st.start > 0)  # an early scale needs steps before the start
    ok = ok and (st.cfg is None or (math.isfinite(st.cfg) and st.cfg >= 0))
    if not ok:
        raise UsageError(
            f"control_sweep: scale and early must be >= 0, 0 <= start < end <= 1, start > 0 with early and "
            f"cfg >= 0, got {point!r}"
        )
    return st


# ---------------------------------------------------------------------------------------------------
# Batched generation
# ---------------------------------------------------------------------------------------------------


def generate_batch(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int,
    sampler: str,
    cfg_scale: float,
    schedule: str | None = "karras",
    controlnet: Any = None,
    control_images: Tensor | None = None,
    control_scale: float = 1.0,
    control_end: float = 1.0,
    control_start: float = 0.0,
    control_early: float = 0.0,
    guess_mode: bool = False,
    loras: Sequence[tuple[Any, float]] | None = None,
) -> np.ndarray:
    """Images for several prompts in one batch: float32 ``(B, H, W, 3)`` in [0, 1] at the model's own size.

    One call of the pipeline's batched core (``pipe(prompts, seed=seeds, ...)``): row ``i`` is what
    ``pipe(prompts[i], seed=seeds[i], ...)`` makes. ``controlnet``: a loaded ControlNet with ``control_images``
    ``(B, 3, H, W)`` in [0, 1], one per row, at ``control_scale`` from ``control_start`` to ``control_end`` of the
    steps and, when ``control_early`` > 0, at that scale before ``control_start`` (a second unit of the same net);
    ``guess_mode``: the ControlNet acts on the conditional rows only (sd-webui-controlnet's "ControlNet is more
    important"), so that guidance amplifies the control as it amplifies the prompt."""
    if len(prompts) != len(seeds):
        raise UsageError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    kw: dict[str, Any] = {}
    if controlnet is not None:
        if control_images is None or control_images.shape[0] != len(prompts):
            raise UsageError("a ControlNet needs one control image per prompt")
        if control_early > 0 and control_start <= 0:
            raise UsageError("control_early needs control_start > 0 (the steps before it)")
        units = [ControlUnit(controlnet, control_images, control_scale, control_start, control_end)]
        if control_early > 0:
            units.insert(0, ControlUnit(controlnet, control_images, control_early, 0.0, control_start))
        kw["controlnets"] = units
        if guess_mode:
            kw["guess_mode"] = True
    elif guess_mode:
        raise UsageError("guess_mode needs a ControlNet")
    if loras:
        kw["loras"] = list(loras)
    r = pipe(
        list(prompts),
        seed=[int(s) for s in seeds],
        steps=steps,
        sampler=sampler,
        schedule=schedule,
        cfg_scale=cfg_scale,
        progress=False,
        **kw,
    )
    return np.asarray(r.arrays, dtype=np.float32)


# ---------------------------------------------------------------------------------------------------
# The recogniser
# ---------------------------------------------------------------------------------------------------


def _recogniser_device(recogniser: Any) -> torch.device:
    p = next(iter(recogniser.parameters()), None) if hasattr(recogniser, "parameters") else None
    return p.device if p is not None else torch.device("cpu")


def _class_index(recogniser: Any) -> Callable[[str], int | None]:
    """char -> class index of the recogniser, or None for a char it does not know."""
    fn = getattr(recogniser, "class_index", None)
    if fn is None:
        chars = getattr(recogniser, "classes", None) or getattr(recogniser, "chars", None)
        if not chars:
            raise UsageError("the recogniser has no class_index(char) and no list of its classes")
        table = {c: i for i, c in enumerate(chars)}
        return table.get

    def lookup(char: str) -> int | None:
        try:
            i = fn(char)
        except (KeyError, ValueError):
            return None
        return None if i is None or int(i) < 0 else int(i)

    return lookup


def _to_recogniser_input(arrays: np.ndarray) -> Tensor:
    """(B, H, W, 3) in [0, 1] -> (B, 3, 64, 64) in [-1, 1] (bilinear, antialiased, when the size differs)."""
    x = torch.from_numpy(np.ascontiguousarray(arrays, dtype=np.float32)).permute(0, 3, 1, 2) * 2.0 - 1.0
    if tuple(x.shape[-2:]) != (RECOGNISER_SIZE, RECOGNISER_SIZE):
        x = F.interpolate(
            x, size=(RECOGNISER_SIZE, RECOGNISER_SIZE), mode="bilinear", antialias=True, align_corners=False
        )
    return x


def _recognise(recogniser: Any, x: Tensor, want_features: bool, batch: int = 256) -> tuple[Tensor, Tensor | None]:
    dev = _recogniser_device(recogniser)
    logits, feats = [], []
    with torch.inference_mode():
        for i in range(0, x.shape[0], batch):
            xb = x[i : i + batch].to(dev)
            logits.append(recogniser(xb).float().cpu())
            if want_features:
                feats.append(recogniser.features(xb).float().cpu())
    return torch.cat(logits), (torch.cat(feats) if want_features else None)


# ---------------------------------------------------------------------------------------------------
# The evaluation
# ---------------------------------------------------------------------------------------------------


class _Runner:
    """Generates and scores (prompt, char, seed) items in batches; remembers scored items by (prompt, seed, cfg,
    lora) so that the guidance sweep reuses the main run's images."""

    def __init__(self, pipe: Any, recogniser: Any, *, steps: int, sampler: str, batch_size: int, progress: bool):
        self.pipe = pipe
        self.recogniser = recogniser
        self.steps = steps
        self.sampler = sampler
        self.batch_size = batch_size
        self.progress = progress
        self.index = _class_index(recogniser)
        self.cache: dict[tuple[str, int, float, str], tuple[bool, bool]] = {}
        self.images_generated = 0
        self.generation_s = 0.0

    def generate(
        self, prompts: Sequence[str], seeds: Sequence[int], cfg: float, desc: str, **control: Any
    ) -> np.ndarray:
        from tqdm.auto import tqdm

        out = []
        starts = range(0, len(prompts), self.batch_size)
        for s in tqdm(starts, desc=desc, unit="batch", disable=not self.progress, leave=False):
            sl = slice(s, s + self.batch_size)
            kw = dict(control)
            if kw.get("control_images") is not None:
                kw["control_images"] = kw["control_images"][sl]
            t = time.perf_counter()
            out.append(
                generate_batch(
                    self.pipe, prompts[sl], seeds[sl], steps=self.steps, sampler=self.sampler, cfg_scale=cfg, **kw
                )
            )
            self.generation_s += time.perf_counter() - t
            self.images_generated += len(prompts[sl])
        if not out:
            return np.zeros((0, 1, 1, 3), np.float32)
        return np.concatenate(out)

    def adherence(
        self,
        items: Sequence[tuple[str, str, int]],
        cfg: float,
        desc: str,
        *,
        lora: str = "",
        loras: Sequence[tuple[Any, float]] | None = None,
        features: bool = False,
    ) -> tuple[dict[str, Any], Tensor | None, list[bool]]:
        """Top-1/top-5 of ``(prompt, char, seed)`` items at ``cfg``; the hit list (top-1) per item; recogniser
        features of the generated images when asked (then nothing comes from the cache)."""
        known = [(p, c, s, self.index(c)) for p, c, s in items]
        scored = [(p, c, s, t) for p, c, s, t in known if t is not None]
        todo = [it for it in scored if features or (it[0], it[2], cfg, lora) not in self.cache]
        feats = None
        if todo:
            arrays = self.generate(
                [p for p, _, _, _ in todo], [s for _, _, s, _ in todo], cfg, desc, **({"loras": loras} if loras else {})
            )
            logits, feats = _recognise(self.recogniser, _to_recogniser_input(arrays), features)
            targets = torch.tensor([t for _, _, _, t in todo])
            h1, h5 = topk_hits(logits, targets, 1), topk_hits(logits, targets, 5)
            for (p, _, s, _), a, b in zip(todo, h1.tolist(), h5.tolist(), strict=True):
                self.cache[(p, s, cfg, lora)] = (a, b)
        hits = [self.cache[(p, s, cfg, lora)] for p, _, s, _ in scored]
        n = len(hits)
        res = {
            "n": n,
            "top1": sum(a for a, _ in hits) / n if n else math.nan,
            "top5": sum(b for _, b in hits) / n if n else math.nan,
            "unknown_to_recogniser": len(known) - n,
        }
        per_item = [self.cache[(p, s, cfg, lora)][0] if t is not None else False for p, _, s, t in known]
        return res, feats, per_item


def evaluate_emoji(
    pipe: Any,
    recogniser: Any,
    *,
    n: int | None = None,
    cfg: float = DEFAULT_CFG,
    steps: int = 20,
    sampler: str = "dpmpp_2m",
    seed: int = 0,
    batch_size: int = 64,
    cfg_sweep: Sequence[float] | None = DEFAULT_CFG_SWEEP,
    sweep_n: int = 200,
    paraphrase_n: int | None = None,
    controlnet: Any = None,
    control_n: int = 64,
    control_sweep: Sequence[ControlSetting | Sequence[Any]] = (),
    lora: str | Path | None = None,
    lora_weight: float = 1.0,
    progress: bool = True,
    dataset: Any = None,
) -> dict[str, Any]:
    """Measure the emoji model ``pipe`` with ``recogniser`` (see the module docstring); a JSON-able dict.

    ``n``: caption images (an evenly spaced subset of the base-model emoji; None = all of them);
    ``paraphrase_n`` the same for the paraphrases. ``cfg``: the
    guidance scale of sections a, b, d and e. ``cfg_sweep`` None or empty skips section c. ``controlnet``: a
    ControlNet path (or loaded model) for section d on ``control_n`` renders; ``control_sweep``:
    :class:`ControlSetting` s (or ``(scale, end[, cfg[, guess_mode]])`` tuples) at which the mismatched-prompt
    images of section d are made again and scored the same way; ``lora``: a LoRA file for
    section e at ``lora_weight``. ``dataset``: an :class:`~sdengine.data.emoji.EmojiDataset` (default: load it).
    """
    from sdengine.data.emoji import EmojiDataset
    from sdengine.data.emoji_paraphrases import FRUIT_PARAPHRASES, PARAPHRASES
    from sdengine.metrics.frechet import frechet_distance_features
    from sdengine.train.emoji import HELD_OUT_SUBGROUP

    for what, v in (("steps", steps), ("batch_size", batch_size), ("sweep_n", sweep_n), ("control_n", control_n)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UsageError(f"{what} must be a positive integer, got {v!r}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 2):
        raise UsageError(f"n must be an integer >= 2 (the Frechet distance needs two images), got {n!r}")
    if paraphrase_n is not None and (
        isinstance(paraphrase_n, bool) or not isinstance(paraphrase_n, int) or paraphrase_n < 1
    ):
        raise UsageError(f"paraphrase_n must be a positive integer, got {paraphrase_n!r}")
    for c in (cfg, *(cfg_sweep or ())):
        if not isinstance(c, int | float) or isinstance(c, bool) or not math.isfinite(c) or c < 0:
            raise UsageError(f"guidance scales must be numbers >= 0, got {c!r}")
    settings = [control_setting(point) for point in control_sweep]
    if settings and controlnet is None:
        raise UsageError("control_sweep needs a controlnet")
    if lora is not None and not Path(lora).is_file():
        raise FileNotFoundError(f"LoRA file not found: {lora}")

    t_all = time.perf_counter()
    ds = dataset if dataset is not None else EmojiDataset()
    entries = ds.entries
    base = [j for j, e in enumerate(entries) if e.subgroup != HELD_OUT_SUBGROUP]
    held = [j for j, e in enumerate(entries) if e.subgroup == HELD_OUT_SUBGROUP]
    chosen = [base[i] for i in evenly_spaced(len(base), n)]
    run = _Runner(pipe, recogniser, steps=steps, sampler=sampler, batch_size=batch_size, progress=progress)
    cfg = float(cfg)
    timings: dict[str, float] = {}

    def caption_items(idx: Sequence[int]) -> list[tuple[str, str, int]]:
        return [(ds.captions[j], entries[j].char, seed + j) for j in idx]

    # (a) captions, with features for (b)
    t = time.perf_counter()
    captions, gen_feats, per_item = run.adherence(caption_items(chosen), cfg, "captions", features=True)
    by_group: dict[str, list[bool]] = {}
    for j, hit in zip(chosen, per_item, strict=True):
        by_group.setdefault(entries[j].group, []).append(hit)
    captions["by_group_top1"] = {g: {"n": len(h), "top1": sum(h) / len(h)} for g, h in sorted(by_group.items())}
    timings["captions_s"] = time.perf_counter() - t

    t = time.perf_counter()
    para_items = [
        (PARAPHRASES[k][0], PARAPHRASES[k][1], seed + k) for k in evenly_spaced(len(PARAPHRASES), paraphrase_n)
    ]
    paraphrases, _, _ = run.adherence(para_items, cfg, "paraphrases")
    timings["paraphrases_s"] = time.perf_counter() - t

    # (b) Frechet distance in recogniser features: generated captions vs the real renders of the base emoji
    t = time.perf_counter()
    real = ds.images[base]
    if tuple(real.shape[-2:]) != (RECOGNISER_SIZE, RECOGNISER_SIZE):
        real = F.interpolate(real, size=(RECOGNISER_SIZE, RECOGNISER_SIZE), mode="bilinear", antialias=True)
    _, real_feats = _recognise(recogniser, real, True)
    assert real_feats is not None
    fd: dict[str, Any] = {"n_generated": 0, "n_real": int(real_feats.shape[0]), "dims": int(real_feats.shape[1])}
    if gen_feats is not None and gen_feats.shape[0] >= 2:
        fd["n_generated"] = int(gen_feats.shape[0])
        fd["value"] = frechet_distance_features(gen_feats, real_feats)
    else:
        fd["value"] = math.nan
    timings["fd_s"] = time.perf_counter() - t

    # (c) guidance sweep on a fixed subset
    sweep: list[dict[str, Any]] | None = None
    if cfg_sweep:
        t = time.perf_counter()
        sweep_idx = [base[i] for i in evenly_spaced(len(base), sweep_n)]
        sweep = []
        for c in cfg_sweep:
            res, _, _ = run.adherence(caption_items(sweep_idx), float(c), f"cfg {c:g}")
            sweep.append({"cfg": float(c), **res})
        timings["cfg_sweep_s"] = time.perf_counter() - t

    # (d) ControlNet: canny edges of the render as control
    control_res = None
    if controlnet is not None:
        t = time.perf_counter()
        control_res = _control_section(run, pipe, ds, base, controlnet, control_n, cfg, seed, entries, settings)
        timings["controlnet_s"] = time.perf_counter() - t

    # (e) LoRA on the held-out subgroup
    lora_res = None
    if lora is not None:
        t = time.perf_counter()
        lora_res = _lora_section(
            run,
            pipe,
            caption_items(held),
            [(p, c, seed + k) for k, (p, c) in enumerate(FRUIT_PARAPHRASES)],
            cfg,
            Path(lora),
            float(lora_weight),
        )
        timings["lora_s"] = time.perf_counter() - t

    timings["generation_s"] = run.generation_s
    timings["total_s"] = time.perf_counter() - t_all
    return {
        "model": str(getattr(pipe, "name", type(pipe).__name__)),
        "settings": {
            "n": len(chosen),
            "paraphrases": len(para_items),
            "base_emoji": len(base),
            "held_out_subgroup": HELD_OUT_SUBGROUP,
            "cfg": cfg,
            "steps": steps,
            "sampler": sampler,
            "seed": seed,
            "batch_size": batch_size,
            "cfg_sweep": [float(c) for c in cfg_sweep or ()],
            "sweep_n": sweep_n if cfg_sweep else 0,
            "image_size": int(getattr(pipe, "default_size", 0) or 0),
            "recogniser_size": RECOGNISER_SIZE,
            "device": str(getattr(pipe, "device", "")),
        },
        "captions": captions,
        "paraphrases": paraphrases,
        "fd": fd,
        "cfg_sweep": sweep,
        "controlnet": control_res,
        "lora": lora_res,
        "images_generated": run.images_generated,
        "timings": timings,
    }


def _control_section(
    run: _Runner,
    pipe: Any,
    ds: Any,
    base: list[int],
    controlnet: Any,
    control_n: int,
    cfg: float,
    seed: int,
    entries: Sequence[Any] | None = None,
    control_sweep: Sequence[ControlSetting] = (),
) -> dict[str, Any]:
    from sdengine.control import load_controlnet
    from sdengine.models.controlnet import ControlNet

    label = str(controlnet) if isinstance(controlnet, str | Path) else type(controlnet).__name__
    if isinstance(controlnet, str | Path):
        from sdengine.models.unet import UNetConfig

        cfg_base = getattr(pipe.unet, "config", None)
        net = load_controlnet(controlnet, base=cfg_base if isinstance(cfg_base, UNetConfig) else None)
        net = net.eval().requires_grad_(False)
    elif isinstance(controlnet, ControlNet):
        net = controlnet
    else:
        raise UsageError(f"controlnet must be a path or a ControlNet, got {type(controlnet).__name__}")
    size = int(getattr(pipe, "default_size", RECOGNISER_SIZE))
    idx = [base[i] for i in evenly_spaced(len(base), control_n)]
    edges = np.stack([canny_edges(resize_uint8(ds.pixels[j], size)) for j in idx])  # (N, H, W) 0/255
    control = torch.from_numpy(edges).float().div(255.0)[:, None].expand(-1, 3, -1, -1).contiguous()
    seeds = [seed + j for j in idx]
    out: dict[str, Any] = {
        "controlnet": label,
        "n": len(idx),
        "tolerance_px": EDGE_TOLERANCE_PX,
        "control_edge_fraction": float((edges > 0).mean()),
    }
    # With the caption as the prompt a model that follows its prompt already draws the control's edges;
    # with the empty prompt the structure can only come from the ControlNet.
    for mode, prompts in (("", [ds.captions[j] for j in idx]), ("empty_", [""] * len(idx))):
        for key, kw in (("without", {}), ("with", {"controlnet": net, "control_images": control})):
            arrays = run.generate(prompts, seeds, cfg, f"controlnet {key} ({mode or 'caption_'}prompt)", **kw)
            gen_edges = [canny_edges(to_uint8(a)) for a in arrays]
            pairs = list(zip(edges, gen_edges, strict=True))
            out[f"f1_{mode}{key}"] = float(np.mean([edge_f1(e, g) for e, g in pairs]))
            out[f"f1_exact_{mode}{key}"] = float(np.mean([edge_f1(e, g, 0) for e, g in pairs]))
    # Mismatched prompt: the caption of another emoji (half the list away) with this render's edges. Both
    # failure modes show here: a ControlNet the prompt overrides (low F1) and one that ignores the prompt. The
    # recogniser says whose emoji the result is: the prompt's, the control's (top-5 each).
    if entries is not None and len(idx) >= 2:
        other = [idx[(k + len(idx) // 2) % len(idx)] for k in range(len(idx))]
        prompts = [ds.captions[j] for j in other]

        def mismatched(setting: ControlSetting) -> dict[str, float]:
            use_cfg = cfg if setting.cfg is None else setting.cfg
            desc = f"controlnet with (mismatched prompt, {setting.describe(use_cfg)})"
            arrays = run.generate(
                prompts,
                seeds,
                use_cfg,
                desc,
                controlnet=net,
                control_images=control,
                control_scale=setting.scale,
                control_end=setting.end,
                control_start=setting.start,
                control_early=setting.early,
                guess_mode=setting.guess_mode,
            )
            return _mismatched_scores(
                run, arrays, edges, [entries[j].char for j in other], [entries[j].char for j in idx]
            )

        scores = mismatched(ControlSetting())
        out["f1_mismatched_with"] = scores.pop("f1")
        out.update({f"mismatched_top5_{who}": share for who, share in scores.items()})
        # The trade-off between following the control and drawing the prompt's emoji: the same images at other
        # conditioning scales, with the ControlNet acting on the first part of the steps only, at other guidance
        # scales, or in guess mode.
        if control_sweep:
            out["mismatched_sweep"] = [
                {**asdict(st), "cfg": cfg if st.cfg is None else st.cfg, **mismatched(st)} for st in control_sweep
            ]
    return out


def _mismatched_scores(
    run: _Runner, arrays: np.ndarray, edges: np.ndarray, prompt_chars: Sequence[str], control_chars: Sequence[str]
) -> dict[str, float]:
    """Mismatched-prompt images scored: ``f1`` (edge F1 against the control edges) and the recogniser's top-5
    shares for the prompt's emoji, the control's and either (over the images whose emoji it knows)."""
    gen_edges = [canny_edges(to_uint8(a)) for a in arrays]
    res = {"f1": float(np.mean([edge_f1(e, g) for e, g in zip(edges, gen_edges, strict=True)]))}
    logits, _ = _recognise(run.recogniser, _to_recogniser_input(arrays), False)
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices.tolist()
    targets = {
        "prompt": [run.index(c) for c in prompt_chars],
        "control": [run.index(c) for c in control_chars],
    }
    for who, rows in targets.items():
        known = [k for k, t in enumerate(rows) if t is not None]
        if known:
            res[who] = float(np.mean([rows[k] in top5[k] for k in known]))
    both = [k for k in range(len(top5)) if targets["prompt"][k] is not None and targets["control"][k] is not None]
    if both:
        res["either"] = float(
            np.mean([targets["prompt"][k] in top5[k] or targets["control"][k] in top5[k] for k in both])
        )
    return res


def _lora_section(
    run: _Runner,
    pipe: Any,
    captions: list[tuple[str, str, int]],
    paraphrases: list[tuple[str, str, int]],
    cfg: float,
    lora: Path,
    weight: float,
) -> dict[str, Any]:
    out: dict[str, Any] = {"lora": str(lora), "weight": weight}
    for key, loras in (("without", None), ("with", [(str(lora), weight)])):
        tag = f"{lora}:{weight:g}" if loras else ""
        out[f"captions_{key}"], _, _ = run.adherence(captions, cfg, f"lora {key}: captions", lora=tag, loras=loras)
        out[f"paraphrases_{key}"], _, _ = run.adherence(
            paraphrases, cfg, f"lora {key}: paraphrases", lora=tag, loras=loras
        )
    return out


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------


def _pct(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * float(v):.1f}%"


def format_report(res: dict[str, Any]) -> str:
    """The result of :func:`evaluate_emoji` as a markdown table (and a line of settings)."""
    s = res["settings"]
    lines = [
        f"**{res['model']}**: {s['sampler']}, {s['steps']} steps, cfg {s['cfg']:g}, seed {s['seed']}, "
        f"{s['image_size']}x{s['image_size']} px; {res['images_generated']} images in "
        f"{res['timings']['total_s']:.1f} s",
        "",
        "| measure | n | top-1 | top-5 / value |",
        "|---|---:|---:|---:|",
    ]

    def row(name: str, r: dict[str, Any]) -> None:
        lines.append(f"| {name} | {r['n']} | {_pct(r['top1'])} | {_pct(r['top5'])} |")

    row("canonical captions (base emoji)", res["captions"])
    row("paraphrases", res["paraphrases"])
    fd = res["fd"]
    value = "n/a" if math.isnan(fd["value"]) else f"{fd['value']:.3f}"
    lines.append(
        f"| Frechet distance, recogniser features (vs {fd['n_real']} renders) | {fd['n_generated']} | | {value} |"
    )
    for r in res.get("cfg_sweep") or []:
        row(f"captions at cfg {r['cfg']:g}", r)
    c = res.get("controlnet")
    if c:
        lines.append(f"| edge F1 (±{c['tolerance_px']} px) without ControlNet | {c['n']} | | {c['f1_without']:.3f} |")
        lines.append(f"| edge F1 (±{c['tolerance_px']} px) with ControlNet | {c['n']} | | {c['f1_with']:.3f} |")
        lines.append(
            f"| edge F1 (exact) without / with ControlNet | {c['n']} | | "
            f"{c['f1_exact_without']:.3f} / {c['f1_exact_with']:.3f} |"
        )
        if "f1_empty_with" in c:
            lines.append(
                f"| empty prompt: edge F1 (±{c['tolerance_px']} px) without / with ControlNet | {c['n']} | | "
                f"{c['f1_empty_without']:.3f} / {c['f1_empty_with']:.3f} |"
            )
            lines.append(
                f"| empty prompt: edge F1 (exact) without / with ControlNet | {c['n']} | | "
                f"{c['f1_exact_empty_without']:.3f} / {c['f1_exact_empty_with']:.3f} |"
            )
        if "f1_mismatched_with" in c:
            lines.append(
                f"| mismatched prompt (another emoji's caption): edge F1 (±{c['tolerance_px']} px) with ControlNet "
                f"| {c['n']} | | {c['f1_mismatched_with']:.3f} |"
            )
            lines.append(
                f"| mismatched prompt: recogniser top-5 finds the prompt's / the control's / either emoji | {c['n']} "
                f"| | {_pct(c.get('mismatched_top5_prompt'))} / {_pct(c.get('mismatched_top5_control'))} / "
                f"{_pct(c.get('mismatched_top5_either'))} |"
            )
        for r in c.get("mismatched_sweep") or []:
            st = ControlSetting(**{f.name: r[f.name] for f in fields(ControlSetting) if f.name in r})
            lines.append(
                f"| mismatched prompt, {st.describe(r.get('cfg', s['cfg']))}: "
                f"edge F1; top-5 prompt's / control's / either | {c['n']} | | {r['f1']:.3f}; "
                f"{_pct(r.get('prompt'))} / {_pct(r.get('control'))} / {_pct(r.get('either'))} |"
            )
    lo = res.get("lora")
    if lo:
        for part, label in (("captions", "held-out captions"), ("paraphrases", "fruit paraphrases")):
            row(f"{label} without LoRA", lo[f"{part}_without"])
            row(f"{label} with LoRA (weight {lo['weight']:g})", lo[f"{part}_with"])
    return "\n".join(lines)
