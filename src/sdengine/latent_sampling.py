"""Sampling from latents and conditioning that the caller already holds (what a node graph needs).

The pipeline's ``__call__`` goes from a prompt to pixels in one call. A node graph (the ComfyUI API in
:mod:`sdengine.server.comfy`) holds the pieces separately: text conditioning from one node, a latent from
another (empty, VAE-encoded, upscaled, or the output of an earlier sampler), a noise mask, ControlNet hints
and LoRAs. :func:`sample_latents` runs the engine's own samplers (:func:`sdengine.diffusion.sampling.sample`
with the same Denoiser / CFGDenoiser / InpaintBlend / ControlNet wrappers the pipeline builds) on them.

Two seed rules (``seed_rule``):

* ``"comfyui"``: ComfyUI's. ONE noise tensor for the whole batch, ``torch.randn(latent.shape)`` from
  ``torch.manual_seed(seed)`` on the CPU; the samplers' per-step noise is the whole batch's too, each step
  ``randn(latent.shape)`` from one generator seeded by the seed (:class:`sdengine.diffusion.samplers.BatchNoise`),
  the churn's goes on from the start noise's generator, and the SDE samplers read one Brownian tree of the batch;
  ``denoise`` < 1 runs the last ``steps`` steps of a schedule of ``int(steps / denoise)`` steps; a VAE-encoded
  latent is the posterior mean; the network gets the training timestep nearest each sigma (ComfyUI's
  ``ModelSamplingDiscrete.timestep``, :class:`sdengine.diffusion.denoisers.Denoiser`'s ``"nearest"`` mode).
* ``"sdengine"``: the pipeline's. Row ``i`` owns ``Generator().manual_seed(seed + i)``; a VAE-encoded latent
  is a posterior sample drawn from that generator BEFORE the noise; ``denoise`` is the img2img strength
  (the last ``int(steps * denoise)`` of ``steps`` steps run); the network's timesteps are the pipeline's
  (fractional between the training timesteps where a sigma falls between them). With it a graph gives exactly the
  pipeline's images for the same seed.

For one image from an empty latent both rules draw the same start noise (not the same per-step noise).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ParamSpec, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from sdengine.diffusion import sampling
from sdengine.diffusion.denoisers import Denoiser, TimestepMode
from sdengine.diffusion.edm import EDMDenoiser, EDMSchedule
from sdengine.diffusion.guidance import CFGDenoiser
from sdengine.diffusion.samplers import BatchNoise, SamplingInterrupted
from sdengine.diffusion.schedules import img2img_start
from sdengine.diffusion.text_groups import run_text_groups, texts_concat
from sdengine.errors import SdengineError

SEED_RULES = ("comfyui", "sdengine")


class LatentSamplingError(SdengineError, ValueError):
    """A sampling request that cannot run (bad shapes, steps, seed rule)."""


class SamplingStopped(SdengineError):
    """The step callback returned False after ``step`` steps; ``denoised`` is the last x0 estimate."""

    def __init__(self, step: int, steps: int, denoised: Tensor) -> None:
        super().__init__(f"sampling stopped after step {step} of {steps}")
        self.step = step
        self.steps = steps
        self.denoised = denoised


@dataclass(frozen=True, eq=False)
class ControlHint:
    """One ControlNet applied while sampling: ``(model, image, strength, start, end)`` as
    :func:`sdengine.control.build_controlled_unet` takes it; ``image`` (1, 3, H, W) in [0, 1]."""

    model: Any
    image: Tensor
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    # ComfyUI's ControlNetApplyAdvanced's optional VAE (a node handle): what encodes the hint of an SD3 / Flux
    # ControlNet (U-Net ControlNets read pixels and ignore it, as ComfyUI's)
    vae: Any = None
    # SetUnionControlNetType's type number (ComfyUI's UNION_CONTROLNET_TYPES), None: "auto" / not set
    union_type: int | None = None
    # ControlNetInpaintingAliMamaApply's MASK ((H, W) or (1, H, W) in [0, 1], 1 = repaint): an SD3 inpainting
    # ControlNet's (sdengine.pipeline.dit_control prepares it as diffusers does)
    mask: Tensor | None = None


@dataclass(frozen=True)
class TextCondition:
    """One conditioning entry: the pipeline conditioner's tensors for one prompt (``crossattn`` (1, L, D),
    ``vector`` (1, D) for U-Nets that read a pooled vector), and the ControlNets attached to it."""

    cond: dict[str, Tensor]
    controls: tuple[ControlHint, ...] = field(default_factory=tuple)
    # ComfyUI's regional conditioning (ConditioningSetArea / ...Percentage / ...Strength / ConditioningSetMask):
    # ``area`` ("pixels", h, w, y, x) in image pixels (floored to latent pixels as ComfyUI's // 8), (h, w, y, x) in
    # latent pixels, or ("percentage", h, w, y, x) in fractions of the latent's sides;
    # ``strength`` the entry's weight; ``mask`` (B, H, W) or (H, W) at any size (resized to the latent),
    # scaled by ``mask_strength``; ``mask_bounds``: the area becomes the mask's bounding box (at least 8 x 8)
    area: tuple[Any, ...] | None = None
    strength: float = 1.0
    mask: Tensor | None = None
    mask_strength: float = 1.0
    mask_bounds: bool = False
    # ComfyUI's ConditioningSetTimestepRange: the entry weighs in at a model call whose sigma lies between the
    # schedule's sigmas at these percents of the denoising (0: the start, 1: the end), bounds included
    start_percent: float = 0.0
    end_percent: float = 1.0
    # the width of the pooled text at the head of a ``vector`` made when encoding (CLIPTextEncodeSDXL's), so that
    # ConditioningZeroOut can zero it as ComfyUI zeroes pooled_output
    pooled_width: int = 0
    # ComfyUI's ReferenceLatent (FLUX.1 Kontext): raw VAE latents (B, 16, h, w) whose tokens the model appends to the
    # image's (sdengine.server.comfy.nodes_sd3_flux); a model that takes none refuses them
    references: tuple[Tensor, ...] = ()
    reference_method: str | None = None  # ComfyUI's FluxKontextMultiReferenceLatentMethod; None: the model's own

    @property
    def regional(self) -> bool:
        """Whether the entry weighs in otherwise than as a whole-latent prediction of weight 1."""
        ranged = self.start_percent > 0.0 or self.end_percent < 1.0
        return self.area is not None or self.mask is not None or self.strength != 1.0 or ranged


def encode_text(pipe: Any, text: str, clip_skip: int = 1) -> TextCondition:
    """One prompt's conditioning, exactly as the pipeline's conditioner encodes a prompt. For SDXL the pooled
    text is kept too (``pooled_text``): the size numbers of its ``vector`` are the latent's, known when it is
    sampled (as ComfyUI does), not the training size the conditioner assumes here."""
    cond, _ = pipe.conditioner.pair(text, "", clip_skip=clip_skip)
    out = dict(cond)
    if hasattr(pipe.conditioner, "size_vectors"):
        out["pooled_text"] = pipe.conditioner.text(text, text, clip_skip)[1]
    return TextCondition(out)


def same_hint(a: ControlHint, b: ControlHint) -> bool:
    same = (a.model, a.strength, a.start, a.end, a.vae, a.union_type) == (
        b.model, b.strength, b.start, b.end, b.vae, b.union_type)  # fmt: skip
    if (a.mask is None) != (b.mask is None) or (
        a.mask is not None and b.mask is not None
        and (a.mask.shape != b.mask.shape or not bool(torch.equal(a.mask, b.mask)))
    ):  # fmt: skip
        return False
    return same and tuple(a.image.shape) == tuple(b.image.shape) and bool(torch.equal(a.image, b.image))


@dataclass
class StepReport:
    step: int  # 1-based, steps finished in this run
    steps: int
    denoised: Tensor


class _MeanOfGuided:
    """Several positive conditionings (ComfyUI's ConditioningCombine): the mean of their guided
    predictions, which is CFG of the mean of their conditional predictions against one negative."""

    def __init__(self, parts: list[tuple[CFGDenoiser, dict[str, Tensor]]]) -> None:
        self.parts = parts
        self.schedule = parts[0][0].schedule
        self.prediction = parts[0][0].prediction
        self.takes_step = bool(getattr(parts[0][0], "takes_step", False))

    @property
    def off_grid(self) -> _MeanOfGuided:
        return _MeanOfGuided([(d.off_grid, a) for d, a in self.parts])

    def with_timesteps(self, sigmas: Tensor, timesteps: Tensor) -> _MeanOfGuided:
        return _MeanOfGuided([(d.with_timesteps(sigmas, timesteps), a) for d, a in self.parts])

    takes_guidance_parts = True  # a CFG++ sampler's unconditional x0: the parts' (one negative: all the same)

    def __call__(self, x: Tensor, sigma: Tensor | float, **kw: Any) -> Tensor:
        step = {"step": kw["step"]} if "step" in kw else {}
        parts = kw.get("guidance_parts")
        if parts is None:
            outs = [d(x, sigma, **a, **step) for d, a in self.parts]
            return torch.stack(outs).mean(0)
        kinds = [type(parts)() for _ in self.parts]
        outs = [d(x, sigma, **a, **step, guidance_parts=k) for (d, a), k in zip(self.parts, kinds, strict=True)]
        parts.uncond = torch.stack([k.uncond for k in kinds]).mean(0)
        return torch.stack(outs).mean(0)


@dataclass(frozen=True, eq=False)
class _Region:
    """One conditioning entry resolved for a latent of h x w: its model arguments, its area (h, w, y, x) in latent
    pixels (None: the whole latent), its strength and its mask (mb, h, w) times its mask strength."""

    args: dict[str, Tensor]
    area: tuple[int, int, int, int] | None
    strength: float
    mask: Tensor | None
    window: tuple[float, float] | None = None  # (low, high): the sigmas of the model calls it takes part in
    controls: tuple[ControlHint, ...] = ()  # the entry's ControlNets (whole-latent entries only)
    den: Any = None  # its x0-denoiser (set by sample_latents: the ControlNets it carries act on its rows)


def _resolve_region(
    entry: TextCondition, args: dict[str, Tensor], h: int, w: int, f: int, dev: Any, log_sigmas: Tensor
) -> _Region:
    """ComfyUI's resolve_areas_and_cond_masks: an area in latent pixels (``f`` image pixels each), the mask resized
    (bilinear) to the latent, and with ``mask_bounds`` the area set to the mask's bounding box (sides at least 8)."""
    area = entry.area
    if area is not None and area[0] == "pixels":
        area = tuple(int(v) // f for v in area[1:])
    elif area is not None and area[0] == "percentage":
        _, ph, pw, py, px = area
        area = (max(1, round(ph * h)), max(1, round(pw * w)), round(py * h), round(px * w))
    mask = None
    if entry.mask is not None:
        mask = entry.mask.float().to(dev)
        if mask.ndim == 2:
            mask = mask[None]
        if mask.ndim != 3 or mask.shape[0] < 1 or min(mask.shape[1:]) < 1:
            raise LatentSamplingError(f"a conditioning mask of shape {tuple(entry.mask.shape)} is not (B, H, W)")
        if tuple(mask.shape[1:]) != (h, w):
            mask = F.interpolate(mask[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        if entry.mask_bounds:
            covered = mask.abs().amax(0) != 0
            if not bool(covered.any()):
                area = (8, 8, 0, 0)  # ComfyUI's: an all-zero mask adds nothing anyway
            else:
                ys, xs = torch.nonzero(covered, as_tuple=True)
                y0, x0 = int(ys.min()), int(xs.min())
                area = (max(8, int(ys.max()) - y0 + 1), max(8, int(xs.max()) - x0 + 1), y0, x0)
        mask = mask * float(entry.mask_strength)
    if area is not None:
        area = tuple(int(v) for v in area)
    window = None
    if entry.start_percent > 0.0 or entry.end_percent < 1.0:
        from sdengine.pipeline.control import comfy_sigma_window

        window = comfy_sigma_window(log_sigmas, float(entry.start_percent), float(entry.end_percent))
    return _Region(args, area, float(entry.strength), mask, window, entry.controls)  # type: ignore[arg-type]


def _opposite_areas(mine: list[_Region], others: list[_Region]) -> None:
    """ComfyUI's create_cond_with_same_area_if_none: for each entry of ``others`` with an area, ``mine`` gets a copy
    of it (area, strength, mask) holding the model arguments of ``mine``'s smallest entry whose area encloses it
    (an entry without area encloses all), unless that entry has the very same area: so each area is predicted
    under both halves of CFG alike."""
    for c in list(others):
        if c.area is None:
            continue
        ch, cw, cy, cx = c.area
        smallest = None
        for r in list(mine):
            if r.area is None:
                smallest = r if smallest is None else smallest
                continue
            ah, aw, ay, ax = r.area
            if cy >= ay and cx >= ax and cy + ch <= ay + ah and cx + cw <= ax + aw:
                if smallest is None or smallest.area is None or smallest.area[0] * smallest.area[1] > ah * aw:
                    smallest = r
        if smallest is None or smallest.area == c.area:
            continue
        # ComfyUI's copy keeps the entry's own ControlNets (an area's: refused later), not the enclosing one's
        mine.append(_Region(smallest.args, c.area, c.strength, c.mask, c.window, c.controls))


def _crop_mult(region: _Region, b: int, h: int, w: int, dev: Any) -> tuple[tuple[int, int, int, int], Tensor]:
    """ComfyUI's get_area_and_mult: the area cut to the latent, and the weight (1 or b, 1, ah, aw) of the region's
    prediction there: its mask (or ones) times its strength; an area without mask has its inner edges (those not
    on the latent's border) feathered over min(8, side // 4) pixels, linearly."""
    ah, aw, y, x = region.area if region.area is not None else (h, w, 0, 0)
    ah, aw = min(h - y, ah), min(w - x, aw)
    if ah < 1 or aw < 1:
        raise LatentSamplingError(
            f"a conditioning area at latent pixel ({x}, {y}) lies outside the latent of {w} x {h} latent pixels"
        )
    if region.mask is not None:
        m, mb = region.mask, region.mask.shape[0]
        if mb < b and b % mb:  # ComfyUI repeats a smaller batch of masks over the latent's rows
            raise LatentSamplingError(f"a conditioning mask batch of {mb} does not fit the latent batch {b}")
        m = m[:b] if mb >= b else m.repeat(b // mb, 1, 1)
        mult = m[:, None, y : y + ah, x : x + aw] * region.strength
    else:
        mult = torch.full((1, 1, ah, aw), region.strength, device=dev)
        if region.area is not None:
            for dim, off, size, full in ((2, y, ah, h), (3, x, aw, w)):
                rr = min(8, size // 4)
                ramp = torch.arange(1, rr + 1, device=dev, dtype=mult.dtype) / rr  # 1/rr .. 1 from the edge in
                shape = [1, 1, 1, 1]
                shape[dim] = rr
                if off != 0:
                    mult.narrow(dim, 0, rr).mul_(ramp.reshape(shape))
                if off + size < full:
                    mult.narrow(dim, size - rr, rr).mul_(ramp.flip(0).reshape(shape))
    return (ah, aw, y, x), mult


class _Regional:
    """ComfyUI's calc_cond_batch: each entry's x0 prediction on its area of the latent, summed weighted by its
    weight (mask, strength, feathering) and divided by the summed weight (1e-37 where nothing weighs), for the
    positive and the negative entries apart; then CFG (a scale of 1 skips the negative pass, as ComfyUI)."""

    def __init__(
        self,
        cfg: float,
        cond: list[_Region],
        uncond: list[_Region],
        extra: tuple[list[_Region], ...] = (),
        rule: Any = None,
    ) -> None:
        # ``rule`` (a guider over three conditionings, :class:`sdengine.diffusion.guidance.DualCFG` / ``PerpNeg``)
        # combines the predictions of cond, uncond and ``extra``'s one conditioning in place of CFG
        self.cfg, self.cond, self.uncond, self.extra, self.rule = float(cfg), cond, uncond, extra, rule
        den = cond[0].den
        self.schedule = den.schedule
        self.prediction = den.prediction
        self.takes_step = any(bool(getattr(r.den, "takes_step", False)) for r in (*cond, *uncond))

    def _mapped(self, fn: Callable[[Any], Any]) -> _Regional:
        """The same regions, each denoiser replaced by ``fn`` of it (once per denoiser: shared ones stay shared)."""
        done: dict[int, Any] = {}

        def new(r: _Region) -> _Region:
            if id(r.den) not in done:
                done[id(r.den)] = fn(r.den)
            return replace(r, den=done[id(r.den)])

        extra = tuple([new(r) for r in group] for group in self.extra)
        return _Regional(self.cfg, [new(r) for r in self.cond], [new(r) for r in self.uncond], extra, self.rule)

    @property
    def off_grid(self) -> _Regional:
        return self._mapped(lambda d: getattr(d, "off_grid", d))

    def with_timesteps(self, sigmas: Tensor, timesteps: Tensor) -> _Regional:
        return self._mapped(lambda d: d.with_timesteps(sigmas, timesteps))

    takes_guidance_parts = True  # a CFG++ sampler's unconditional x0: the negative entries' weighted sum

    def __call__(self, x: Tensor, sigma: Tensor | float, **kw: Any) -> Tensor:
        step = {"step": kw["step"]} if "step" in kw else {}
        parts = kw.get("guidance_parts")
        sig = torch.as_tensor(sigma, dtype=torch.float32)
        sig = sig.reshape(-1).expand(x.shape[0]) if sig.numel() == 1 else sig
        # cfg 1 skips the negative entries, unless a CFG++ sampler asks for their x0 (as CFGDenoiser)
        halves = [self.cond] if math.isclose(self.cfg, 1.0) and parts is None else [self.cond, self.uncond]
        active = [True] * len(halves)
        if self.rule is not None:  # the rule's passes (those it leaves out: zeros, as ComfyUI's calc_cond_batch)
            halves = [self.cond, self.uncond, *self.extra]
            active = list(self.rule.active(every=parts is not None))
        b, _, h, w = x.shape
        s0 = float(sig[0])
        # The model calls: one per active entry; entries of the same crop and argument shapes (an area's positive
        # and its negative copy) run as one batch of at most two, the memory of an ordinary CFG call.
        groups: dict[Any, list[tuple[int, tuple[int, int, int, int], Tensor, dict[str, Tensor], Any]]] = {}
        for half, regions in enumerate(halves):
            for r in regions if active[half] else ():
                if r.window is not None and not r.window[0] <= s0 <= r.window[1]:
                    continue  # ComfyUI's timestep range: not at this sigma
                box, mult = _crop_mult(r, b, h, w, x.device)
                args = {k: v.expand(b, *v.shape[1:]) if v.shape[0] == 1 else v for k, v in r.args.items()}
                key = (box, tuple(sorted((k, tuple(v.shape)) for k, v in args.items())), id(r.den))
                groups.setdefault(key, []).append((half, box, mult, args, r.den))
        outs = [torch.zeros_like(x) for _ in halves]
        counts = [torch.full_like(x, 1e-37) for _ in halves]
        for jobs in groups.values():
            for i in range(0, len(jobs), 2):
                batch = jobs[i : i + 2]
                ah, aw, y, x0 = batch[0][1]
                crop = x[:, :, y : y + ah, x0 : x0 + aw]
                args = {k: torch.cat([j[3][k] for j in batch]) for k in batch[0][3]}
                den = batch[0][4]
                extra: dict[str, Any] = dict(step)
                if getattr(den, "takes_row_kinds", False):  # which CFG half each row is (a ControlNet's rows)
                    extra["row_kinds"] = tuple("cond" if j[0] == 0 else "uncond" for j in batch for _ in range(b))
                preds = den(torch.cat([crop] * len(batch)), torch.cat([sig] * len(batch)), **args, **extra)
                for (half, _, mult, _, _), pred in zip(batch, preds.chunk(len(batch)), strict=True):
                    outs[half][:, :, y : y + ah, x0 : x0 + aw] += pred * mult
                    counts[half][:, :, y : y + ah, x0 : x0 + aw] += mult
        if self.rule is not None:
            guided, uncond_x0 = self.rule.combine([o / c for o, c in zip(outs, counts, strict=True)])
            if parts is not None:
                parts.uncond = uncond_x0
            return guided
        cond = outs[0] / counts[0]
        if len(halves) == 1:
            return cond
        uncond = outs[1] / counts[1]
        if parts is not None:
            parts.uncond = uncond
        return cond if math.isclose(self.cfg, 1.0) else uncond + (cond - uncond) * self.cfg


def _match_length(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Contexts of different token lengths (CLIP's 77-token chunks) repeated to a common length."""
    if a.shape[1] == b.shape[1]:
        return a, b
    n = math.lcm(a.shape[1], b.shape[1])
    return a.repeat(1, n // a.shape[1], 1), b.repeat(1, n // b.shape[1], 1)


class _TextGroups:
    """A network ``(x, t, *, crossattn, text_len, **kw)`` whose rows hold texts of several token counts, run as
    ComfyUI runs them: ``crossattn`` holds every row's text zero-padded to the longest, ``text_len`` (N,) its own
    count; the rows are split into :func:`text_length_groups`, one call of ``inner`` per group (each row's text cut
    to its own count and repeated to the group's least common multiple), every output put back in its row. Row
    arguments (tensors of N rows, ``t``, ``row_kinds``) follow their rows; others go to every call as they are."""

    def __init__(self, inner: Callable[..., Tensor], rule: str) -> None:
        self.inner, self.rule = inner, rule

    def __getattr__(self, name: str) -> Any:  # what a denoiser asks of its network (takes_step, takes_row_kinds ...)
        return getattr(self.inner, name)

    def __call__(self, x: Tensor, t: Tensor, *, crossattn: Tensor, text_len: Tensor, **kw: Any) -> Tensor:
        return run_text_groups(self.inner, x, t, crossattn=crossattn, text_len=text_len, rule=self.rule, **kw)


def _grouped_skipping(skipping: Skipping, layers: tuple[int, ...], single: tuple[int, ...]) -> Any:
    """A flow model's network with ``layers`` (and ``single``) left out, its texts run as :class:`_TextGroups`
    runs them (None: nothing is left out of this model)."""
    net = skipping(layers, single)
    return None if net is None else _TextGroups(net, "equal")


def _padded_texts(c: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The positive's and negative's texts zero-padded to the longer, and their token counts (one per row, on the
    CPU) for :class:`_TextGroups`."""
    m = max(c.shape[1], u.shape[1])
    lc = torch.full((c.shape[0],), c.shape[1], dtype=torch.long)
    lu = torch.full((u.shape[0],), u.shape[1], dtype=torch.long)
    return F.pad(c, (0, 0, 0, m - c.shape[1])), F.pad(u, (0, 0, 0, m - u.shape[1])), lc, lu


def make_noise(
    shape: Sequence[int],
    seed: int,
    seed_rule: str,
    batch_index: Sequence[int] | None = None,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The initial noise of ``shape`` (B, C, h, w) on the CPU under ``seed_rule`` (see the module docstring).

    ``batch_index`` (ComfyUI's rule only): the row of the original batch each row stands for (what ComfyUI's
    LatentFromBatch and RepeatLatentBatch record): rows 0 .. max are drawn one after the other from the seed and
    each row takes its own, so a row cut out of a batch gets the noise it had in the whole batch.
    ``generator`` (ComfyUI's rule only): the generator to draw from, seeded here with ``seed``; it is left where
    the draw ends (ComfyUI's churn noise goes on from there)."""
    if seed_rule == "comfyui":
        gen = (generator if generator is not None else torch.Generator("cpu")).manual_seed(seed)
        if batch_index is None:
            return torch.randn(tuple(shape), generator=gen)
        inds = [int(i) for i in batch_index]
        if len(inds) != shape[0] or min(inds) < 0 or max(inds) >= 1 << 16:
            raise LatentSamplingError(f"batch_index {inds[:8]} does not fit a batch of {shape[0]}")
        wanted, drawn = set(inds), {}
        for i in range(max(inds) + 1):
            row = torch.randn((1, *shape[1:]), generator=gen)
            if i in wanted:
                drawn[i] = row
        return torch.cat([drawn[i] for i in inds])
    return torch.cat(
        [torch.randn((1, *shape[1:]), generator=torch.Generator("cpu").manual_seed(seed + i)) for i in range(shape[0])]
    )


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _model_schedule(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """``fn(pipe, ...)`` run with the pipeline walking the Zero Terminal SNR rescale of its schedule when called with
    ``zero_terminal_snr=True`` (every read of ``pipe.noise_schedule`` inside sees it)."""

    @functools.wraps(fn)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        from sdengine.pipeline.core import zero_snr_schedule

        pipe = args[0] if args else kwargs.get("pipe")
        with zero_snr_schedule(bool(kwargs.get("zero_terminal_snr", False)), pipe):
            return fn(*args, **kwargs)

    return run


def edit_image(cond: Mapping[str, Tensor], pipe: Any, b: int, h: int, w: int, dev: Any) -> Tensor:
    """An instruct-pix2pix U-Net's extra channels for one conditioning entry: its ``concat`` image latent
    (InstructPixToPixConditioning's, unscaled), one row or one per latent row, or zeros where it carries none (as
    ComfyUI's ``IP2P.concat_cond``); an image of another size than the latent is a one-line error."""
    channels = int(pipe.unet.config.in_channels) - int(pipe.latent_channels)
    image = cond.get("concat")
    if image is None:
        return torch.zeros(b, channels, h, w, device=dev)
    if image.ndim != 4 or image.shape[1] != channels or tuple(image.shape[-2:]) != (h, w):
        raise LatentSamplingError(
            f"the instruct-pix2pix image latent {tuple(image.shape)} does not fit the sampled latent ({b}, "
            f"{pipe.latent_channels}, {h}, {w}): encode the image at the size sampled"
        )
    if image.shape[0] not in (1, b):
        raise LatentSamplingError(f"the instruct-pix2pix image batch of {image.shape[0]} does not fit {b} latents")
    if isinstance(pipe.noise_schedule, EDMSchedule):  # CosXL Edit reads it scaled (ComfyUI's process_ip2p_image_in)
        image = image * float(pipe.vae.config.scaling_factor)
    return image.to(dev).expand(b, -1, -1, -1)


def _x0_denoiser(pipe: Any, model: Any, prediction: str, t_mode: TimestepMode) -> Any:
    """The x0-denoiser of ``pipe``'s network: EDM's preconditioning on an EDM model (sdengine.diffusion.edm),
    else the VP one at ComfyUI's timesteps."""
    if isinstance(pipe.noise_schedule, EDMSchedule):
        return EDMDenoiser(model, pipe.noise_schedule)
    return Denoiser(model, pipe.noise_schedule, prediction, timestep_mode=t_mode)


@_model_schedule
def sample_latents(
    pipe: Any,
    positive: Sequence[TextCondition],
    negative: Sequence[TextCondition],
    latent: Tensor,
    *,
    seed: int,
    steps: int,
    cfg: float,
    sampler: str = "euler",
    schedule: str = "normal",
    denoise: float = 1.0,
    seed_rule: str = "comfyui",
    posterior: tuple[Tensor, Tensor] | None = None,
    posterior_scaled: bool = False,
    noise_mask: Tensor | None = None,
    loras: Sequence[tuple[Any, float]] = (),
    add_noise: bool = True,
    start_at_step: int = 0,
    end_at_step: int | None = None,
    leftover_noise: bool = False,
    callback: Callable[[StepReport], bool | None] | None = None,
    batch_index: Sequence[int] | None = None,
    sigmas: Tensor | None = None,
    sampler_options: Mapping[str, Any] | None = None,
    discard_penultimate_sigma: bool = False,
    guidance_rescale: float = 0.0,
    pag_scale: float = 0.0,
    sag_scale: float = 0.0,
    sag_blur_sigma: float = 2.0,
    sag_rule: str | None = None,
    prediction: str | None = None,
    zero_terminal_snr: bool = False,
    guidance_rule: Any = None,
    third: Sequence[TextCondition] = (),
    deep_shrink: Any = None,
    ip_adapters: Sequence[Any] = (),
    differential: float | None = None,
    cfg_hooks: Sequence[Any] = (),
) -> Tensor:
    """Sample from ``latent`` (B, C, h, w) in the model's scaled latent space; returns the new latent.

    ``positive`` / ``negative``: conditioning entries (several positives are averaged as ComfyUI's
    ConditioningCombine, and so are several negatives). Entries with an area, a mask or a strength other than 1
    (``TextCondition.regional``) are combined as ComfyUI's samplers combine them: every positive and every negative
    entry predicts on its area, weighted by its mask, strength and feathered edges, at the sigmas of its timestep
    range (see :class:`_Regional`); a ControlNet then acts on the rows of the entries that carry it, on an entry with
    an area with its whole hint fitted to the area (cut to its aspect around the centre and resized, as ComfyUI's
    get_control fits it to the crop of the latent it is handed; a T2I-Adapter there is refused). A ControlNet acts
    on the CFG half whose entry carries it (both when both do), as in ComfyUI. ``posterior``: (mean, std) of a VAE
    encoding, drawn per row under the ``sdengine`` rule; ``posterior_scaled``: it is in the diffusion model's units
    (a tiny VAE's encoding), taken back to the VAE's first, as the pipeline's ``vae_encode="tiny"`` does. ``noise_mask``
    (1 or B, 1, H, W), 1 = repaint: the known region is kept on the init latent's noising path, as the
    pipeline's inpainting. ``loras``: (path, weight)
    applied to the U-Net for this call only. ``start_at_step`` / ``end_at_step`` / ``add_noise`` /
    ``leftover_noise``: KSamplerAdvanced's window of a ``steps``-step schedule. ``callback`` returning
    False raises :class:`SamplingStopped`. ``batch_index``: under ComfyUI's rule, the original batch's row of each
    row (see :func:`make_noise`). ``sigmas``: an explicit decreasing sigma list (ComfyUI's SIGMAS, SamplerCustom),
    or a rising one from above 0 (FlipSigmas: unsampling, by :data:`sampling.RISING_SIGMA_SAMPLERS`), walked
    instead of ``steps``/``schedule``/``denoise`` and the window, as ComfyUI walks it: from the latent plus
    the noise at ``sigmas[0]``, or from pure noise (``sqrt(1 + sigma**2)`` scaled) when the latent is empty and
    ``sigmas[0]`` is the model's sigma_max; the result is the sample at ``sigmas[-1]`` (noisy when that is not 0:
    x0 + sigma * eps, ComfyUI's scaling, which a next run from it continues exactly).
    ``sampler_options``: the sampler's keyword options (ComfyUI's DPM fast / adaptive run with eta 0,
    k-diffusion's default). ``discard_penultimate_sigma``: the ``steps``-step grid is made for one step more and
    its next-to-last sigma dropped (ComfyUI's KSampler does so for dpm_2, dpm_2_ancestral, uni_pc, uni_pc_bh2;
    :func:`sdengine.diffusion.sampling.make_grid`); not with ``sigmas``.
    ``guidance_rescale``: CFG rescale (ComfyUI's RescaleCFG multiplier; the pipeline's ``guidance_rescale``);
    ``pag_scale``: perturbed-attention guidance on the U-Net's middle block (ComfyUI's PerturbedAttentionGuidance,
    diffusers' "mid"); both as ComfyUI computes them under its seed rule (the rescale on the v-prediction, the PAG term
    after it), as the pipeline does under sdengine's (:mod:`sdengine.diffusion.guidance`), and not with regional
    entries (the rescale not with several positive ones either). ``sag_scale`` / ``sag_blur_sigma``: self-attention
    guidance (ComfyUI's SelfAttentionGuidance under its rule: the unconditional rows' map and x0, its term in x0 after
    the rescale, skipped on a latent of a side 4 or less; under sdengine's rule the pipeline's default), not with
    regional entries either; ``sag_rule`` ("diffusers" / "comfyui", the pipeline's ``sag_rule``) places it by that
    rule whatever the seed rule (the SelfAttentionGuidance node passes "comfyui").
    A positive and a negative of different token counts share the U-Net call as ComfyUI's ``CONDCrossAttn`` lets
    them (:func:`texts_concat`'s ``"lcm"`` rule: repeated to their least common multiple where that is at most 4 x the
    shorter; with PAG or SAG always) and run in calls of their own beyond that.
    ``prediction``: what the network predicts in place of the pipeline's own ("epsilon",
    "v_prediction", "sample"; ComfyUI's ModelSamplingDiscrete eps / v_prediction / x0); ``zero_terminal_snr``: the
    model's schedule rescaled to zero terminal SNR for this call (its zsnr).
    ``guidance_rule`` with ``third``: a guider over three conditionings in place of CFG (``cfg`` unused), ComfyUI's
    DualCFGGuider / PerpNegGuider (:class:`sdengine.diffusion.guidance.DualCFG`, ``PerpNeg``): each of positive,
    negative and ``third`` predicted as ComfyUI's calc_cond_batch weighs its entries (the regional path), then the
    rule's combination; not with ``guidance_rescale`` or ``pag_scale``.
    ``deep_shrink``: a :class:`sdengine.nn.deep_shrink.DeepShrink` patch of the U-Net in the calls whose sigma is in
    its window (ComfyUI's PatchModelAddDownscale), or a chain of them applied in ComfyUI's order (chained nodes);
    not with a ControlNet or T2I-Adapter.
    ``ip_adapters``: :class:`sdengine.pipeline.ip_adapter.IPAdapterUnit` values (ComfyUI_IPAdapter_plus's model
    patches), on the U-Net's cross-attention of every call, each in its start / end sigma window; the conditional
    rows take their images' tokens, the unconditional rows their negatives'; not with regional entries or a guider
    over three conditionings.
    ``differential``: Differential Diffusion's strength (ComfyUI's DifferentialDiffusion node; None = off): the
    ``noise_mask`` is kept grey (resized bilinearly, as ComfyUI's prepare_mask) and each model call repaints where it
    is at or above a threshold falling from 1 to 0 over the run
    (:class:`sdengine.pipeline.latents.DifferentialBlend`); without a noise mask it does nothing, as there.
    ``cfg_hooks``: :class:`sdengine.diffusion.cfg_hooks.CFGHook` values (ComfyUI's pre- and post-CFG functions: APG,
    TCFG, CFGZeroStar, Mahiro, Epsilon Scaling) in the order applied, with one plain positive and negative only.
    """
    if guidance_rule is not None and not third:
        raise LatentSamplingError("a guider over three conditionings needs its third conditioning")
    if guidance_rule is not None and (guidance_rescale or pag_scale):
        raise LatentSamplingError(
            f"{guidance_rule!r} takes no CFG rescale (RescaleCFG) or perturbed-attention guidance in sdengine: "
            "leave those model patches out of this guider's model"
        )
    if seed_rule not in SEED_RULES:
        raise LatentSamplingError(f"unknown seed rule {seed_rule!r}; use one of {', '.join(SEED_RULES)}")
    if not positive or not negative:
        raise LatentSamplingError("sampling needs positive and negative conditioning")
    if getattr(pipe, "inpainting", False):
        raise LatentSamplingError(
            f"{pipe.name}: 9-channel inpainting U-Nets are not supported here; use an ordinary model with a noise mask"
        )
    if getattr(pipe, "prediction_type", None) == "flow":  # SD3: its pipeline's call only (docs/sd3.md)
        raise LatentSamplingError(f"{pipe.name}: SD3 / flow models are not supported here yet; run the pipeline")
    if latent.ndim != 4 or latent.shape[1] != pipe.latent_channels:
        raise LatentSamplingError(
            f"latent of shape {tuple(latent.shape)} does not fit {pipe.name} ({pipe.latent_channels} channels)"
        )
    if not 0.0 < denoise <= 1.0:
        raise LatentSamplingError(f"denoise must be in (0, 1], got {denoise}")
    # ComfyUI's weighted sum of the entries' predictions (see _Regional): for regional entries, and for several
    # negative ones (ComfyUI averages them as it averages the positive ones)
    regional = any(e.regional for e in (*positive, *negative)) or len(negative) > 1 or guidance_rule is not None
    edit = bool(getattr(pipe, "instruct_pix2pix", False))
    if edit and (regional):
        raise LatentSamplingError(
            f"{pipe.name}: an instruct-pix2pix U-Net (8 channels) samples with one plain positive and negative here "
            "(no areas, masks, strengths, several entries or a guider over three conditionings)"
        )
    if (guidance_rescale or pag_scale) and (regional or (guidance_rescale and len(positive) > 1)):
        raise LatentSamplingError(
            "CFG rescale and perturbed-attention guidance take one whole-latent negative conditioning and no area, "
            "mask or strength (the rescale one positive entry too); combine the entries first"
        )
    if sag_scale and regional:
        raise LatentSamplingError(
            "self-attention guidance takes one whole-latent negative conditioning and no area, mask or strength (its "
            "map and degraded pass are the whole latent's); combine the entries first"
        )
    if cfg_hooks and (regional or len(positive) > 1):
        raise LatentSamplingError(
            "APG, TCFG, CFGZeroStar, Mahiro and Epsilon Scaling take one whole-latent positive and negative "
            "conditioning here (no areas, masks, strengths, several entries or a guider over three conditionings)"
        )
    from sdengine.diffusion.cfg_hooks import start_hooks

    hooks = start_hooks(cfg_hooks)
    prediction = pipe.prediction_type if prediction is None else prediction
    rule = "comfyui" if seed_rule == "comfyui" else "diffusers"
    perturb = None
    if pag_scale:
        from sdengine.nn.attention import identity_attention, pag_layers

        perturb = functools.partial(identity_attention, pag_layers(pipe.unet, ["mid"]))
    attention_map = None
    if sag_scale:
        from sdengine.nn.transformer import middle_attention_mass, middle_transformer

        middle_transformer(pipe.unet)  # one line where the U-Net has no middle-block transformer
        attention_map = functools.partial(middle_attention_mass, pipe.unet)
    dev = pipe.device
    b, _, h, w = latent.shape
    ip = None
    if ip_adapters:
        from sdengine.pipeline.ip_adapter import check_units, image_tokens

        if regional:
            raise LatentSamplingError(
                "IP-Adapter cannot run with conditioning areas, masks, strengths, several negatives or a guider over "
                "three conditionings in sdengine: sample with one plain positive and negative"
            )
        try:
            ip_units = check_units(list(ip_adapters), pipe.unet, b)
            ip = image_tokens(ip_units, b, dev, pipe.dtype, log_sigmas=pipe.noise_schedule.log_sigmas)
        except SdengineError as e:
            raise LatentSamplingError(str(e)) from None
    f = pipe.vae_scale_factor
    name, sched = sampling.resolve(sampler, schedule, sdxl=getattr(pipe, "text_kind", "") == "sdxl")
    latent = latent.float().to(dev)

    # Noise and the starting latent under the seed rule.
    if seed_rule == "sdengine" and seed + b - 1 > 2**64 - 1:  # the pipeline's rule, and its range (docs/CONTRACTS.md)
        raise LatentSamplingError(
            f"seed {seed} is out of range for a batch of {b}: row seeds (seed + row) run up to 2**64 - 1"
        )
    # Row generators: the posterior, noise and per-step noise under the sdengine rule.
    gens: Any = [torch.Generator("cpu").manual_seed(seed + i) for i in range(b)] if seed_rule == "sdengine" else None
    if seed_rule == "sdengine" and posterior is not None:
        mean, std = (t.float().to(dev) for t in posterior)
        if posterior_scaled:
            vae_dtype = next(pipe.vae.parameters()).dtype
            mean, std = pipe.vae.unscale_latents(mean).to(vae_dtype).float(), std / pipe.vae.config.scaling_factor
        rows = []
        for i, g in enumerate(gens):
            m, s = mean[i % mean.shape[0]][None], std[i % std.shape[0]][None]
            eps = torch.randn(m.shape, generator=g, dtype=m.dtype)
            rows.append(m + s * eps.to(dev))
        latent = pipe.vae.scale_latents(torch.cat(rows))
    if seed_rule == "sdengine":
        noise = torch.cat([torch.randn((1, *latent.shape[1:]), generator=g) for g in gens]).to(dev)
    else:
        # ComfyUI's prepare_noise seeds torch's global generator and draws the start noise from it; its samplers'
        # churn (randn_like) goes on from there, and their per-step noise (default_noise_sampler) comes from a
        # generator of its own seeded by the seed, drawing the whole batch each step. Without noise (add_noise
        # off) ComfyUI draws none and its global generator holds whatever it held: here it is seeded all the same.
        churn = torch.Generator("cpu").manual_seed(seed)
        noise = make_noise(latent.shape, seed, "comfyui", batch_index, generator=churn if add_noise else None)
        noise = noise.to(dev)
        gens = BatchNoise.seeded(b, seed, churn)
    if not add_noise:
        noise = torch.zeros_like(noise)

    empty = posterior is None and not bool(latent.abs().amax() > 0)
    blend = None
    if noise_mask is not None:
        m = noise_mask.float().to(dev)
        if m.ndim == 3:
            m = m[:, None]
        binary = (m >= 0.5).float()
        blend = F.interpolate(binary, size=(h, w)).expand(b, -1, -1, -1) if binary.shape[0] in (1, b) else None
        if blend is None:
            raise LatentSamplingError(f"noise mask batch {m.shape[0]} does not fit the latent batch {b}")
        if differential is not None:  # Differential Diffusion: the grey levels kept (ComfyUI's prepare_mask)
            from sdengine.pipeline.latents import differential_latent_mask

            blend = differential_latent_mask(m, h, w).expand(b, -1, -1, -1)

    # Which steps of which grid run.
    given = None
    if sigmas is not None:
        given = sigmas.detach().to("cpu", torch.float32).reshape(-1)
        if given.shape[0] < 2:
            raise LatentSamplingError(f"{given.shape[0]} sigmas make no step")
        problem = sampling.sigma_list_problem(given)
        if problem is not None:
            shown = [round(v, 4) for v in given.tolist()[:8]]
            raise LatentSamplingError(f"{problem}, got {shown}")
        why = sampling.rising_sigmas_problem(name, sampler_options) if sampling.sigmas_rise(given) else None
        if why is not None:
            raise LatentSamplingError(f"sampler {sampler} cannot walk rising sigmas (unsampling): {why}")
        total = end = given.shape[0] - 1
        start, strength = 0, 1.0
        sigma_max = float(pipe.noise_schedule.sigma_max)
        max_denoise = math.isclose(float(given[0]), sigma_max, rel_tol=1e-5) or float(given[0]) > sigma_max
        from_init = not (empty and max_denoise)  # ComfyUI's max_denoise: pure noise; else latent + noise * sigma
    elif start_at_step or end_at_step is not None:
        total, start = steps, start_at_step
        end = steps if end_at_step is None else min(end_at_step, steps)
        if not 0 <= start < end:
            raise LatentSamplingError(f"start_at_step {start_at_step} must be below end_at_step {end}")
        strength = 1.0
        from_init = start > 0 or not empty
    elif seed_rule == "sdengine" and not empty:
        pure = blend is not None and denoise >= 1.0  # inpainting at strength 1 starts from pure noise
        total, start, end, strength = steps, 0 if pure else img2img_start(steps, denoise), steps, denoise
        from_init = not pure
    else:
        total = steps if denoise >= 1.0 else int(steps / denoise)
        start, end, strength = total - steps, total, 1.0
        from_init = not empty or start > 0
        limit = int(pipe.noise_schedule.num_train_timesteps)
        if total > limit:  # ComfyUI's rule runs the last `steps` of int(steps / denoise): more than the model has
            raise LatentSamplingError(
                f"denoise {denoise:g} with {steps} steps runs the last {steps} of a {total}-step schedule, and "
                f"{pipe.name} has {limit} timesteps: raise denoise to at least {steps / limit:g} or lower steps"
            )
    if given is not None:
        from sdengine.diffusion.schedules import SamplingGrid, sigma_to_t

        log_sigmas = pipe.noise_schedule.log_sigmas
        grid = SamplingGrid(sigmas=given, timesteps=sigma_to_t(given[:-1], log_sigmas).to(torch.float32))
    else:
        grid = sampling.make_grid(
            name,
            total,
            pipe.noise_schedule,
            sched,
            pipe.scheduler_config,
            strength,
            discard_penultimate=discard_penultimate_sigma,
            comfy_grid=True,
        )
    asked = total  # the step count the grid is made for (sampling.sample(steps=...))
    if given is None and grid.steps != total and start_at_step == 0 and end_at_step is None:
        # A sigma list of another length than asked (ComfyUI's ddim_uniform, beta): the run is counted on it,
        # the denoise's steps from its end as ComfyUI takes them (sigmas[-(steps + 1):]).
        if seed_rule == "sdengine" and not empty:
            start = 0 if start == 0 else img2img_start(grid.steps, denoise)
        else:
            start = max(grid.steps - steps, 0) if start > 0 else 0
        total = end = grid.steps
    if end < total and name in ("dpm_fast", "dpm_adaptive"):
        # they take their own steps between the grid's ends: there is no step of the grid to stop at
        raise LatentSamplingError(f"{sampler} cannot stop at end_at_step {end} of {total}: it takes its own steps")
    noise_scale, max_denoise = None, False
    if seed_rule == "comfyui":
        # ComfyUI's noise_scaling: latent + noise * sigma, but sqrt(1 + sigma**2) where its sampler starts at the
        # model's sigma_max or above (its max_denoise), from an empty latent or not, whatever the model's spacing.
        # Below it an empty latent starts at noise * sigma on ComfyUI's ddim_uniform list (the one of its lists that
        # starts below sigma_max; the grids here are ComfyUI's lists, make_grid's comfy_grid), and as the sampler's
        # own grid starts elsewhere.
        s_first = float(given[0]) if given is not None else float(grid.sigmas[start])
        sigma_max = float(pipe.noise_schedule.sigma_max)
        max_denoise = math.isclose(s_first, sigma_max, rel_tol=1e-5) or s_first > sigma_max
        if max_denoise:
            noise_scale = math.sqrt(s_first**2 + 1)
        elif given is not None or sched == "ddim_uniform":
            noise_scale = s_first
    brownian = None
    if seed_rule == "comfyui" and name in sampling.BROWNIAN_SAMPLERS:
        # ComfyUI's SDE noise: one Brownian tree of the batch's shape, seeded by the seed, over the sigmas its
        # sampler is handed (the run's window: its last sigma 0 where the window ends without leftover noise)
        from sdengine.diffusion.brownian import BrownianSpec

        window = given if given is not None else grid.sigmas[start : end + 1]
        if given is None and end < total and not leftover_noise:
            window = window[:-1]  # ComfyUI's force_full_denoise sets that last sigma to 0
        brownian = BrownianSpec.over([seed], window)

    # The network's timestep: ComfyUI's nearest table timestep of each sigma under its rule (ModelSamplingDiscrete),
    # the pipeline's (fractional, or a diffusers scheduler's own grid timestep) under sdengine's
    t_mode: TimestepMode = "nearest" if seed_rule == "comfyui" else "interpolated"
    net: Any = pipe.unet
    # every entry weighs in, and its ControlNets with it (without the regional path there is one negative)
    controls = [c for cond in (*positive, *negative) for c in cond.controls]
    distinct: list[ControlHint] = []  # one unit per distinct hint (see below)
    # how a hint of another size is fitted: ComfyUI's centre cut and nearest-exact resize (its ControlNets'
    # common_upscale) under its rule, the native API's Lanczos under sdengine's (centre cut to the aspect alike)
    from sdengine.pipeline.control import HINT_NEAREST_CENTRE

    hint_fit = HINT_NEAREST_CENTRE if seed_rule == "comfyui" else "crop and resize"
    for hint in controls:
        if not any(same_hint(hint, d) for d in distinct):
            distinct.append(hint)
        if hint.union_type is not None:
            raise LatentSamplingError(
                "SetUnionControlNetType: a Union ControlNet for U-Nets (ControlNet++) is not supported; the type is "
                "for SD3 / Flux Union ControlNets"
            )
    if deep_shrink is not None:
        from sdengine.nn.deep_shrink import check_deep_shrink

        if distinct:  # their residuals have the full-size skips' shapes
            raise LatentSamplingError(
                "Deep Shrink (PatchModelAddDownscale) cannot run with a ControlNet or T2I-Adapter: drop one of the two"
            )
        try:
            check_deep_shrink(pipe.unet, deep_shrink)
        except SdengineError as e:
            raise LatentSamplingError(str(e)) from None

    def shrunk(den: Any) -> Any:
        """``den`` with the Deep Shrink patch in the calls of its window (as it is without one)."""
        if deep_shrink is None:
            return den
        from sdengine.nn.deep_shrink import DeepShrinkDenoiser

        return DeepShrinkDenoiser(den, pipe.unet, deep_shrink)

    handle = None
    if loras:
        from sdengine.weights.lora import apply_loras

        handle = apply_loras(pipe.unet, None, list(loras), part="unet")  # the CLIP part: at encoding
    try:
        if distinct:
            from sdengine.pipeline.control import ControlUnit, build_controlled_unet

            # One unit per distinct hint: the same ControlNet, image and settings applied to the positive and to
            # the negative is one unit (it acts on both halves), never twice the strength. As in ComfyUI a unit
            # acts on the CFG halves whose conditioning carries it (set per positive entry below): on the
            # negative only, the unconditional half only; on the positive only, the conditional half only.
            # start/end percents: ComfyUI's sigma window on the model's schedule, judged at each model call.
            units = [ControlUnit(d.model, d.image, d.strength, d.start, d.end, "comfyui") for d in distinct]
            net = build_controlled_unet(
                net, units, width=w * f, height=h * f, grid=grid, device=dev, dtype=pipe.dtype, start_step=start,
                resize_mode=hint_fit,  # a hint of another aspect: its centre, as ComfyUI cuts it
                noise_schedule=pipe.noise_schedule,
            )  # fmt: skip
        from sdengine.pipeline.unet_adapter import UNetAdapter

        def carried(entry: TextCondition, hint: ControlHint) -> bool:
            return any(same_hint(hint, c) for c in entry.controls)

        parts: list[tuple[Any, dict[str, Tensor]]] = []
        if regional:  # ComfyUI's weighted sum of every entry's prediction on its area (see _Regional)
            sizes = getattr(pipe.conditioner, "size_vectors", None)

            def region_args(entry: TextCondition, half: int) -> dict[str, Tensor]:
                args = {"crossattn": entry.cond["crossattn"].to(dev)}
                if "vector" in entry.cond:
                    vec = entry.cond["vector"]
                    if sizes is not None and "pooled_text" in entry.cond:  # SDXL: the latent's size (encode_text)
                        vec = sizes(entry.cond["pooled_text"], w * f, h * f)[half]
                    args["vector"] = vec.to(dev)
                return args

            ls = pipe.noise_schedule.log_sigmas
            cond_r = [_resolve_region(e, region_args(e, 0), h, w, f, dev, ls) for e in positive]
            uncond_r = [_resolve_region(e, region_args(e, 1), h, w, f, dev, ls) for e in negative]
            # the third conditioning of a guider rule: its SDXL size vector the negative's (ComfyUI marks it so)
            third_r = [_resolve_region(e, region_args(e, 1), h, w, f, dev, ls) for e in third] if guidance_rule else []
            groups = [cond_r, uncond_r, third_r]
            order = guidance_rule.order if guidance_rule is not None else (0, 1)
            for k in order:  # ComfyUI's order: each conditioning's areas copied into the others, the positive's first
                for kk in order:
                    if kk != k:
                        _opposite_areas(groups[kk], groups[k])
            for r in (*cond_r, *uncond_r, *third_r):
                if r.area is not None and (r.area[2] >= h or r.area[3] >= w or min(r.area[:2]) < 1):
                    ah, aw, ay, ax = (v * f for v in r.area)
                    raise LatentSamplingError(
                        f"a conditioning area of {aw} x {ah} at ({ax}, {ay}) lies outside the latent of "
                        f"{w * f} x {h * f} pixels"
                    )
            dens: dict[tuple[Any, ...], Any] = {}

            def area_net(ah: int, aw: int, kinds: tuple[frozenset[str], ...]) -> Any:
                """The controlled U-Net for an area of ``ah`` x ``aw`` latent pixels: as ComfyUI's get_control, each
                ControlNet the area carries (``kinds`` not empty) reads its whole hint fitted to the area (centre cut
                to its aspect, resized), the U-Net's input there being the area's crop of the latent."""
                from sdengine.models.t2i_adapter import T2IAdapter
                from sdengine.pipeline.control import ControlledUNet, control_image_tensor

                units = []
                for d, u, k in zip(distinct, net.units, kinds, strict=True):
                    if k:
                        if isinstance(u.net, T2IAdapter):  # its features must fit the U-Net's: whole latents only
                            raise LatentSamplingError(
                                "a T2I-Adapter cannot act on a conditioning area (ConditioningSetArea, ...Percentage, "
                                "ConditioningSetMask's mask bounds): apply it to a conditioning without an area"
                            )
                        img = control_image_tensor(d.image, aw * f, ah * f, hint_fit)
                        if img.shape[1] != u.image.shape[1]:  # a one-channel ControlNet: the mean, as for the whole
                            img = img.mean(dim=1, keepdim=True)
                        u = replace(u, image=img.to(device=u.image.device, dtype=u.image.dtype))
                    units.append(u)
                return ControlledUNet(net.unet, units, guess_mode=net.guess_mode)

            def den_for(r: _Region, label: str) -> Any:
                """The denoiser of a region of the CFG half ``label``: its ControlNets act on its rows only (on an
                area, with their hints fitted to it)."""
                kinds = tuple(frozenset({label}) if any(same_hint(d, c) for c in r.controls) else frozenset()
                              for d in distinct)  # fmt: skip
                size = None
                if r.area is not None and any(kinds):
                    ah, aw, y, x = r.area
                    size = (min(h - y, ah), min(w - x, aw))  # the crop _Regional hands the network (_crop_mult)
                if (kinds, size) not in dens:
                    whole = net if size is None else area_net(*size, kinds)
                    part = whole.with_kinds(list(kinds)) if distinct else net
                    dens[(kinds, size)] = shrunk(_x0_denoiser(pipe, UNetAdapter(part, pipe.dtype), prediction, t_mode))
                return dens[(kinds, size)]

            cond_r = [replace(r, den=den_for(r, "cond")) for r in cond_r]
            uncond_r = [replace(r, den=den_for(r, "uncond")) for r in uncond_r]
            third_r = [replace(r, den=den_for(r, "uncond")) for r in third_r]
            extra_groups = (third_r,) if guidance_rule is not None else ()
            parts.append((_Regional(cfg, cond_r, uncond_r, extra_groups, guidance_rule), {}))
        neg = negative[0].cond
        for pos_entry in positive if not regional else ():
            part_net = net
            if distinct:
                kinds = [
                    frozenset(k for k, e in (("cond", pos_entry), ("uncond", negative[0])) if carried(e, d))
                    for d in distinct
                ]
                part_net = net.with_kinds(kinds)
            if ip is not None:  # the IP-Adapters on the U-Net's cross-attention, their tokens in the conditioning
                from sdengine.nn.ip_adapter import IPAdapterNet

                part_net = IPAdapterNet(part_net, pipe.unet, ip.layers)
            unet_net: Any = UNetAdapter(part_net, pipe.dtype)
            pos = pos_entry.cond
            c, u = pos["crossattn"].to(dev), neg["crossattn"].to(dev)
            uncond_args: dict[str, Tensor] = {}
            extra: dict[str, Tensor] = {}
            if texts_concat(c.shape[1], u.shape[1], "lcm") or pag_scale or sag_scale:
                # ComfyUI's CONDCrossAttn: one call, each text repeated to the two counts' least common multiple
                # (which leaves cross-attention as it is); PAG's and SAG's rows are told by their place in that one
                # call, so with them the texts are repeated whatever their counts
                c, u = _match_length(c, u)
            else:  # further apart ComfyUI runs the two in calls of their own (_TextGroups)
                c, u, extra["text_len"], uncond_args["text_len"] = _padded_texts(c, u)
                extra["text_len"] = extra["text_len"].expand(b)
                unet_net = _TextGroups(unet_net, "lcm")
            den = shrunk(_x0_denoiser(pipe, unet_net, prediction, t_mode))
            uncond_args["crossattn"] = u
            extra["crossattn"] = c.expand(b, -1, -1)
            if ip is not None:
                uncond_args["ip_tokens"] = ip.uncond
                extra["ip_tokens"] = ip.cond
            if edit:  # instruct-pix2pix: each half's image latent in the U-Net's extra channels (ComfyUI's IP2P)
                extra["concat"] = edit_image(pos, pipe, b, h, w, dev)
                uncond_args["concat"] = edit_image(neg, pipe, b, h, w, dev)
            if "vector" in pos and "vector" in neg:
                pos_vec, neg_vec = pos["vector"], neg["vector"]
                sizes = getattr(pipe.conditioner, "size_vectors", None)
                if sizes is not None and "pooled_text" in pos:  # SDXL: the latent's size (see encode_text)
                    pos_vec = sizes(pos["pooled_text"], w * f, h * f)[0]
                if sizes is not None and "pooled_text" in neg:
                    neg_vec = sizes(neg["pooled_text"], w * f, h * f)[1]
                uncond_args["vector"] = neg_vec.to(dev)
                extra["vector"] = pos_vec.to(dev).expand(b, -1)
            guide = CFGDenoiser(
                den,
                cfg,
                uncond_args,
                guidance_rescale,
                rule=rule,
                pag_scale=pag_scale,
                perturb=perturb,
                sag_scale=sag_scale,
                sag_blur_sigma=sag_blur_sigma,
                attention_map=attention_map,
                sag_rule=sag_rule,
                hooks=hooks,
            )
            parts.append((guide, extra))
        guided: Any = parts[0][0] if len(parts) == 1 else _MeanOfGuided(parts)
        extra_args = parts[0][1] if len(parts) == 1 else {}
        inpaint: Any = None
        if blend is not None:
            from sdengine.pipeline.latents import InpaintBlend

            known_noise = noise
            if seed_rule == "comfyui" and name == "ddim":
                # ComfyUI's ddim is its Euler with inpaint_options "random": the known region follows other noise,
                # torch.randn(shape) from torch.manual_seed(seed + 1), the start noise or not
                g1 = torch.Generator("cpu").manual_seed((seed + 1) % 2**64)
                known_noise = torch.randn(tuple(latent.shape), generator=g1).to(dev)
            # ComfyUI blends before every model call, the first too (its start differs at max denoise, and with ddim)
            first = seed_rule == "comfyui" and (max_denoise or known_noise is not noise)
            if differential is not None:
                from sdengine.pipeline.latents import DifferentialBlend, DifferentialMask

                # the run's sigmas as its sampler is handed them: the window's first, and its last (0 where it
                # ends clean: ComfyUI's force_full_denoise)
                if given is not None:
                    s_first, s_last = float(given[0]), float(given[-1])
                else:
                    s_first = float(grid.sigmas[start])
                    s_last = float(grid.sigmas[end]) if end < total and leftover_noise else 0.0
                dd = DifferentialMask.over(blend, pipe.noise_schedule, s_first, s_last, float(differential))
                guided = inpaint = DifferentialBlend(guided, latent, known_noise, dd)
            else:
                guided = inpaint = InpaintBlend(guided, latent, known_noise, blend, first=first)
        run_steps = end - start
        # KSamplerAdvanced's end_at_step: ComfyUI runs a fresh sampler on the window's sigmas (their last one 0
        # without leftover noise), so a multistep sampler ends the window as it ends any run (UniPC at a lower
        # order, every sampler stepping to 0 where the leftover noise is off); the timestep samplers (single-step:
        # the same sample either way) stop on the grid at the window's end instead
        window_run = given is None and end < min(total, grid.steps) and name not in sampling.TIMESTEP_SAMPLERS

        def on_step(i: int, sigma: float, x: Tensor, denoised: Tensor) -> bool | None:
            ok = callback(StepReport(i + 1, run_steps, denoised)) if callback is not None else None
            if i + 1 == run_steps and end < total and ok is not False and not window_run:
                return False  # KSamplerAdvanced's end_at_step: stop here
            return ok

        try:
            with torch.inference_mode():
                x = sampling.sample(
                    guided,
                    noise,
                    sampler=name,
                    steps=asked,
                    schedule=sched,
                    scheduler_config=pipe.scheduler_config,
                    generators=gens,
                    callback=on_step,
                    extra_args=extra_args,
                    init_latent=latent if from_init else None,
                    strength=strength,
                    start_step=start if from_init else None,
                    noise_schedule=pipe.noise_schedule,
                    sigmas=given,
                    sampler_options=sampler_options,
                    discard_penultimate=discard_penultimate_sigma and given is None,
                    brownian=brownian,
                    noise_scale=noise_scale,
                    comfy_grid=True,
                    end_step=end if window_run else None,
                    end_as_run=window_run,
                    end_at_zero=window_run and not leftover_noise,
                )
            if window_run and leftover_noise:  # the window's last sample in ComfyUI's scaling, x0 + sigma * eps
                x = x * math.sqrt(1 + float(grid.sigmas[end]) ** 2)
        except SamplingInterrupted as e:
            if e.step + 1 != run_steps or end >= total:
                raise SamplingStopped(e.step + 1, run_steps, e.denoised) from None
            # Stopped at end_at_step: the noisy sample (ComfyUI's leftover noise) or its x0 estimate (a window run
            # stopped by its caller at its last step: its sample, walked to 0 where the leftover noise is off).
            x = e.x if leftover_noise or window_run else e.denoised
    finally:
        if handle is not None:
            handle.remove()
    if given is not None and float(given[-1]) > 0:
        # sampling.sample answers a sample at sigma > 0 in the network's (VP) scaling; ComfyUI's is x0 + sigma * eps
        # (what KSamplerAdvanced's leftover noise is here too, and what a next SamplerCustom starts from)
        x = x * math.sqrt(1 + float(given[-1]) ** 2)
    if inpaint is not None:
        x = inpaint.finish(x)
    return x.float()


# ---------------------------------------------------------------------------------------------------
# Flow models (SD3, Flux): what the ComfyUI nodes sample them with
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class FlowModel:
    """A rectified-flow model as a node graph holds it (SD3's MMDiT, Flux's transformer): ``network`` maps
    ``(x, t, **conditioning) -> v`` (the pipeline family's adapter: ``MMDiTAdapter`` / ``FluxAdapter``), ``schedule``
    the :class:`sdengine.diffusion.flow.FlowSchedule` it is sampled on (ComfyUI's ModelSamplingDiscreteFlow /
    ModelSamplingFlux: its table feeds the `simple`, `beta`, `sgm_uniform` and ComfyUI's `normal` lists),
    ``channels`` its latent channels, ``name`` for messages."""

    network: Callable[..., Tensor]
    schedule: Any
    channels: int
    device: Any
    name: str = "model"
    # (double, single) block indices -> the network with those blocks left out (skip-layer guidance: SD3's MMDiT,
    # the joint blocks; Flux's / Chroma's transformer, both kinds) or None where that leaves nothing out; None where
    # the model cannot leave blocks out
    skipping: Skipping | None = None


Skipping = Callable[[tuple[int, ...], tuple[int, ...]], "Callable[..., Tensor] | None"]


@dataclass(frozen=True)
class SkipLayerGuidance:
    """ComfyUI's SkipLayerGuidanceSD3 (SkipLayerGuidanceDiT, after Stability's SD3.5 recipe): at the model calls whose
    sigma lies in ``[percent_to_sigma(end_percent), percent_to_sigma(start_percent)]``, the guided x0 gets
    ``scale * (x0_cond - x0_cond_skipped)``, the conditional rows run once more with ``layers`` left out (a post-CFG
    term, as PAG's; at cfg 1 too). ``rescaling_scale`` (SkipLayerGuidanceDiT's): the result then times
    ``r * std(x0_cond) / std(result) + (1 - r)`` (stds over the whole batch); with it and nothing left out the term
    is 0 and the rescaling alone acts (ComfyUI's SkipLayerGuidanceDiT with only single blocks named on SD3's MMDiT,
    which has none). ``single_layers``: single-stream blocks left out too (Flux, Chroma)."""

    layers: tuple[int, ...]
    scale: float
    start_percent: float = 0.01
    end_percent: float = 0.15
    rescaling_scale: float = 0.0
    single_layers: tuple[int, ...] = ()


class _CFGNormed:
    """ComfyUI's CFGNorm (a post-CFG function) on a guided flow denoiser: the guided x0 scaled, at each latent pixel,
    by ``min(1, |x0_cond| / (|x0_guided| + 1e-8))`` (norms over the channels) and by ``strength``. The conditional
    x0 is the guided one at scale 1 (ComfyUI's one-pass shortcut), else read back from the unconditional one the
    guidance hands over: ``u + (guided - u) / scale``."""

    def __init__(self, guided: Any, scale: float, strength: float) -> None:
        self.guided, self.scale, self.strength = guided, scale, strength

    def __getattr__(self, name: str) -> Any:  # what the samplers ask of the guided denoiser
        return getattr(self.guided, name)

    def __call__(self, x: Tensor, sigma: Tensor | float, **kw: Any) -> Tensor:
        from sdengine.diffusion.samplers import GuidanceParts

        if self.scale == 1.0:
            out = self.guided(x, sigma, **kw)
            cond = out
        else:
            parts = kw.get("guidance_parts") or GuidanceParts()
            out = self.guided(x, sigma, **{**kw, "guidance_parts": parts})
            u = parts.uncond
            cond = out if u is None else u + (out - u) / self.scale
        ratio = torch.norm(cond, dim=1, keepdim=True) / (torch.norm(out, dim=1, keepdim=True) + 1e-8)
        return out * ratio.clamp(0.0, 1.0) * self.strength


class _SkipLayerGuided:
    """A guided flow denoiser with :class:`SkipLayerGuidance`'s term added in its sigma window."""

    def __init__(
        self, guided: Any, cond: Any, skipped: Any, scale: float, high: float, low: float, rescaling: float = 0.0
    ) -> None:
        self.guided, self.cond, self.skipped = guided, cond, skipped
        self.scale, self.high, self.low, self.rescaling = scale, high, low, rescaling

    def __getattr__(self, name: str) -> Any:  # what the samplers ask of the guided denoiser
        return getattr(self.guided, name)

    def __call__(self, x: Tensor, sigma: Tensor | float, **kw: Any) -> Tensor:
        out = self.guided(x, sigma, **kw)
        s = float(torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)[0])
        if self.scale > 0 and self.low <= s <= self.high:
            args = {k: v for k, v in kw.items() if k not in ("guidance_parts", "step")}
            cond = self.cond(x, sigma, **args)
            skipped = cond if self.skipped is None else self.skipped(x, sigma, **args)
            out = out + (cond - skipped) * self.scale
            if self.rescaling != 0:
                factor = cond.std() / out.std()
                out = out * (self.rescaling * factor + (1 - self.rescaling))
        return out


def flow_sigmas(
    schedule: Any,
    steps: int,
    scheduler: str,
    *,
    denoise: float = 1.0,
    start_at_step: int = 0,
    end_at_step: int | None = None,
    leftover_noise: bool = False,
    discard_penultimate_sigma: bool = False,
) -> Tensor | None:
    """The sigmas ComfyUI's KSampler / KSamplerAdvanced walk on a flow model: the ``scheduler``'s list (ComfyUI's,
    :func:`sdengine.diffusion.flow.flow_grid` with ``comfy=True``) of ``int(steps / denoise)`` steps, its last
    ``steps + 1``; then the window ``[start_at_step, end_at_step]``, its last sigma 0 unless ``leftover_noise``
    (ComfyUI's force_full_denoise). None: no step to run (ComfyUI hands the latent back as it came)."""
    from sdengine.diffusion.flow import flow_grid

    if not 0.0 < denoise <= 1.0:
        raise LatentSamplingError(f"denoise must be in (0, 1], got {denoise}")
    total = steps if denoise >= 1.0 else int(steps / denoise)
    if total > int(schedule.num_train_timesteps):
        raise LatentSamplingError(
            f"denoise {denoise:g} with {steps} steps runs the last {steps} of a {total}-step schedule, over the "
            f"model's {schedule.num_train_timesteps}: raise denoise or lower steps"
        )
    try:
        grid = flow_grid(schedule, total + (1 if discard_penultimate_sigma else 0), scheduler, comfy=True)
    except SdengineError as e:
        raise LatentSamplingError(str(e)) from None
    if discard_penultimate_sigma:
        grid = sampling.drop_penultimate(grid)
    sigmas = grid.sigmas[-(steps + 1) :].clone()
    if end_at_step is not None and end_at_step < sigmas.shape[0] - 1:
        sigmas = sigmas[: end_at_step + 1].clone()
        if not leftover_noise:
            sigmas[-1] = 0.0
    if start_at_step:
        if start_at_step >= sigmas.shape[0] - 1:
            return None
        sigmas = sigmas[start_at_step:]
    return sigmas


class _FlowInpaint:
    """ComfyUI's KSamplerX0Inpaint on a flow model: every model call reads ``x`` with the known region (``mask`` 0)
    replaced by the latent on its noising path, ``s noise + (1 - s) latent``, and its x0 there is the latent itself
    (the sampler's own ``x`` is left as it is)."""

    def __init__(self, inner: Any, latent: Tensor, noise: Tensor, mask: Tensor, rule: Any = None) -> None:
        self.inner, self.latent, self.noise, self.mask = inner, latent, noise, mask
        self.keep = 1.0 - mask
        # Differential Diffusion (sdengine.pipeline.latents.DifferentialMask): each call's mask from its sigma
        self.rule = rule

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __call__(self, x: Tensor, sigma: Tensor | float, **kw: Any) -> Tensor:
        from sdengine.diffusion.flow import flow_noise_scaling

        s = float(torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)[0])
        mask, keep = self.mask, self.keep
        if self.rule is not None:
            mask = self.rule.at(s).to(device=x.device, dtype=x.dtype)
            keep = 1.0 - mask
        x = x * mask + flow_noise_scaling(s, self.noise, self.latent) * keep
        return self.inner(x, sigma, **kw) * mask + self.latent * keep


def flow_noise_mask(mask: Tensor, shape: Sequence[int]) -> Tensor:
    """ComfyUI's prepare_mask: a noise mask ((B, 1, H, W), (B, H, W) or (H, W); 1 = repaint) resized bilinearly to
    the latent's sides, for every channel and row of a latent of ``shape`` (B, C, h, w)."""
    m = mask.float()
    m = F.interpolate(m.reshape(-1, 1, m.shape[-2], m.shape[-1]), size=(int(shape[2]), int(shape[3])), mode="bilinear")
    b = int(shape[0])
    if m.shape[0] not in (1, b) and b % m.shape[0] != 0:
        raise LatentSamplingError(f"a noise mask batch of {m.shape[0]} does not fit the latent batch of {b}")
    m = m.repeat(math.ceil(b / m.shape[0]), 1, 1, 1)[:b]
    return m.expand(-1, int(shape[1]), -1, -1)


def _flow_entry(entries: Sequence[TextCondition], which: str, model: FlowModel) -> dict[str, Tensor]:
    if len(entries) != 1 or entries[0].regional or entries[0].controls:
        raise LatentSamplingError(
            f"{model.name} (a flow model) samples with one plain {which} conditioning here: no ConditioningCombine, "
            "areas, masks, strengths, timestep ranges or ControlNets"
        )
    return dict(entries[0].cond)


def sample_flow_latents(
    model: FlowModel,
    positive: Sequence[TextCondition],
    negative: Sequence[TextCondition],
    latent: Tensor,
    sigmas: Tensor,
    *,
    seed: int,
    cfg: float,
    sampler: str = "euler",
    seed_rule: str = "comfyui",
    add_noise: bool = True,
    callback: Callable[[StepReport], bool | None] | None = None,
    batch_index: Sequence[int] | None = None,
    sampler_options: Mapping[str, Any] | None = None,
    skip_layer_guidance: SkipLayerGuidance | None = None,
    noise_mask: Tensor | None = None,
    differential: float | None = None,
    cfg_norm: float | None = None,
    cfg_hooks: Sequence[Any] = (),
) -> Tensor:
    """Sample a flow model from ``latent`` (B, C, h, w) in its scaled latent space along ``sigmas`` (decreasing, at
    most 1: :func:`flow_sigmas`, or a SamplerCustom's list), as ComfyUI's samplers run a flow model: the start is
    ``s0 noise + (1 - s0) latent`` (ComfyUI's CONST noise scaling; an empty latent is zeros, pure noise at s0 = 1),
    classifier-free guidance over the :class:`sdengine.diffusion.flow.FlowDenoiser` (one pass at ``cfg`` 1, as
    ComfyUI's shortcut), the sampler run as :func:`sdengine.diffusion.sampling.sample` runs it on flow models
    (docs/flow-matching.md: the samplers that are not right there are refused, one line). A run ending above 0
    answers ComfyUI's ``latent / (1 - s)`` (its inverse noise scaling), which a next run without added noise
    continues exactly. Noise: ``seed_rule`` as :func:`sample_latents` (the step noise from ``BatchNoise`` under
    ComfyUI's rule; the SDE samplers draw it there too, not from a Brownian tree). ``skip_layer_guidance``: see
    :class:`SkipLayerGuidance` (a model with ``skipping``). ``noise_mask`` (1 = repaint): ComfyUI's inpainting of a
    plain model (:class:`_FlowInpaint`, the mask as :func:`flow_noise_mask` fits it); ``differential``: Differential
    Diffusion's strength on that mask (None = off; see :func:`sample_latents`), the threshold in the flow's timestep
    (sigma) between ``sigmas[0]`` and the larger of ``sigmas[-1]`` and the table's sigma_min. ``cfg_norm``:
    ComfyUI's CFGNorm strength (:class:`_CFGNormed`, after the CFG). ``cfg_hooks``: as :func:`sample_latents`'s, not
    with CFGNorm or skip-layer guidance (their order against the hooks is not kept here). A positive and a negative
    of different token counts run apart where the negative runs, each at its own length in a call of its own
    (ComfyUI's ``CONDRegular``, :func:`texts_concat`'s ``"equal"`` rule);
    at cfg 1 the positive runs alone at its own length."""
    from sdengine.diffusion.flow import FlowDenoiser

    if seed_rule not in SEED_RULES:
        raise LatentSamplingError(f"unknown seed rule {seed_rule!r}; use one of {', '.join(SEED_RULES)}")
    if not positive or not negative:
        raise LatentSamplingError("sampling needs positive and negative conditioning")
    if latent.ndim != 4 or latent.shape[1] != model.channels:
        raise LatentSamplingError(
            f"latent of shape {tuple(latent.shape)} does not fit {model.name} ({model.channels} channels)"
        )
    pos = _flow_entry(positive, "positive", model)
    neg = _flow_entry(negative, "negative", model)
    given = sigmas.detach().to("cpu", torch.float32).reshape(-1)
    if given.shape[0] < 2:
        raise LatentSamplingError(f"{given.shape[0]} sigmas make no step")
    dev = model.device
    b = latent.shape[0]
    latent = latent.float().to(dev)
    gens: Any
    if seed_rule == "sdengine":
        if seed + b - 1 > 2**64 - 1:
            raise LatentSamplingError(
                f"seed {seed} is out of range for a batch of {b}: row seeds (seed + row) run up to 2**64 - 1"
            )
        gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(b)]
        noise = torch.cat([torch.randn((1, *latent.shape[1:]), generator=g) for g in gens])
    else:
        churn = torch.Generator("cpu").manual_seed(seed)
        noise = make_noise(latent.shape, seed, "comfyui", batch_index, generator=churn)
        gens = BatchNoise.seeded(b, seed, churn)
    noise = noise.to(dev) if add_noise else torch.zeros_like(latent)

    c, u = pos["crossattn"].to(dev), neg["crossattn"].to(dev)
    network, skipping = model.network, model.skipping
    extra: dict[str, Tensor] = {}
    uncond: dict[str, Tensor] = {}
    # Texts of different token counts where the negative runs (cfg other than 1, or a CFG++ sampler): ComfyUI's
    # CONDRegular never batches them, each runs at its own length in a call of its own (at cfg 1 the positive runs
    # alone, at its length: nothing is ever repeated to the two counts' least common multiple)
    if c.shape[1] != u.shape[1] and (float(cfg) != 1.0 or sampler in sampling.CFG_PP_SAMPLERS):
        c, u, extra["text_len"], uncond["text_len"] = _padded_texts(c, u)
        extra["text_len"] = extra["text_len"].expand(b)
        network = _TextGroups(model.network, "equal")
        if model.skipping is not None:
            skipping = functools.partial(_grouped_skipping, model.skipping)

    extra["crossattn"] = c.expand(b, -1, -1)
    uncond["crossattn"] = u
    for key in sorted((set(pos) | set(neg)) - {"crossattn"}):
        if key not in pos or key not in neg:
            raise LatentSamplingError(f"the positive and negative conditionings differ in their {key!r} entry")
        extra[key] = pos[key].to(dev).expand(b, *pos[key].shape[1:])
        uncond[key] = neg[key].to(dev)
    den = FlowDenoiser(network, model.schedule)
    if cfg_hooks and (cfg_norm is not None or skip_layer_guidance is not None):
        raise LatentSamplingError(
            "APG, TCFG, CFGZeroStar, Mahiro and Epsilon Scaling do not run with CFGNorm or SkipLayerGuidanceSD3 here: "
            "use one or the other"
        )
    from sdengine.diffusion.cfg_hooks import start_hooks

    guided: Any = CFGDenoiser(den, float(cfg), uncond, rule="comfyui", hooks=start_hooks(cfg_hooks, flow=True))
    if cfg_norm is not None:
        guided = _CFGNormed(guided, float(cfg), float(cfg_norm))
    slg = skip_layer_guidance
    if slg is not None and (slg.layers or slg.single_layers or slg.rescaling_scale) and slg.scale > 0:
        if skipping is None:
            raise LatentSamplingError(
                f"{model.name} cannot leave blocks out: skip-layer guidance runs on SD3, Flux and Chroma"
            )
        net = skipping(tuple(slg.layers), tuple(slg.single_layers)) if slg.layers or slg.single_layers else None
        skipped = None if net is None else FlowDenoiser(net, model.schedule)
        high = model.schedule.percent_to_sigma(float(slg.start_percent))
        low = model.schedule.percent_to_sigma(float(slg.end_percent))
        if skipped is not None or slg.rescaling_scale:  # else the term is 0 (nothing left out) and nothing acts
            guided = _SkipLayerGuided(guided, den, skipped, float(slg.scale), high, low, float(slg.rescaling_scale))
    if noise_mask is not None:
        fitted = flow_noise_mask(noise_mask, latent.shape).to(dev)
        rule = None
        if differential is not None:
            from sdengine.pipeline.latents import DifferentialMask

            rule = DifferentialMask.over(fitted, model.schedule, float(given[0]), float(given[-1]), float(differential))
        guided = _FlowInpaint(guided, latent, noise, fitted, rule)
    run_steps = given.shape[0] - 1

    def on_step(i: int, sigma: float, x: Tensor, denoised: Tensor) -> bool | None:
        return callback(StepReport(i + 1, run_steps, denoised)) if callback is not None else None

    try:
        with torch.inference_mode():
            x = sampling.sample(
                guided,
                noise,
                sampler=sampler,
                steps=run_steps,
                generators=gens,
                callback=on_step,
                extra_args=extra,
                init_latent=latent,
                start_step=0,
                noise_schedule=model.schedule,
                sigmas=given,
                sampler_options=sampler_options,
            )
    except SamplingInterrupted as e:
        raise SamplingStopped(e.step + 1, run_steps, e.denoised) from None
    except SdengineError as e:
        if isinstance(e, LatentSamplingError):
            raise
        raise LatentSamplingError(f"{model.name}: {e}") from None
    last = float(given[-1])
    if last > 0:
        x = x / (1.0 - last)  # ComfyUI's inverse noise scaling of a flow model (a window with leftover noise)
    return x.float()
