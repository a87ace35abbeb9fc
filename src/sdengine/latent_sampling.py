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
  latent is the posterior mean.
* ``"sdengine"``: the pipeline's. Row ``i`` owns ``Generator().manual_seed(seed + i)``; a VAE-encoded latent
  is a posterior sample drawn from that generator BEFORE the noise; ``denoise`` is the img2img strength
  (the last ``int(steps * denoise)`` of ``steps`` steps run). With it a graph gives exactly the pipeline's
  images for the same seed.

For one image from an empty latent both rules draw the same start noise (not the same per-step noise).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sdengine.diffusion import sampling
from sdengine.diffusion.denoisers import Denoiser
from sdengine.diffusion.guidance import CFGDenoiser
from sdengine.diffusion.samplers import BatchNoise, SamplingInterrupted
from sdengine.diffusion.schedules import img2img_start
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


@dataclass(frozen=True)
class TextCondition:
    """One conditioning entry: the pipeline conditioner's tensors for one prompt (``crossattn`` (1, L, D),
    ``vector`` (1, D) for U-Nets that read a pooled vector), and the ControlNets attached to it."""

    cond: dict[str, Tensor]
    controls: tuple[ControlHint, ...] = field(default_factory=tuple)


def encode_text(pipe: Any, text: str, clip_skip: int = 1) -> TextCondition:
    """One prompt's conditioning, exactly as the pipeline's conditioner encodes a prompt. For SDXL the pooled
    text is kept too (``pooled_text``): the size numbers of its ``vector`` are the latent's, known when it is
    sampled (as ComfyUI does), not the training size the conditioner assumes here."""
    cond, _ = pipe.conditioner.pair(text, "", clip_skip=clip_skip)
    out = dict(cond)
    if hasattr(pipe.conditioner, "size_vectors"):
        out["pooled_text"] = pipe.conditioner.text(text, text, clip_skip)[1]
    return TextCondition(out)


def _same_hint(a: ControlHint, b: ControlHint) -> bool:
    same = (a.model, a.strength, a.start, a.end) == (b.model, b.strength, b.start, b.end)
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


def _match_length(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Contexts of different token lengths (CLIP's 77-token chunks) repeated to a common length."""
    if a.shape[1] == b.shape[1]:
        return a, b
    n = math.lcm(a.shape[1], b.shape[1])
    return a.repeat(1, n // a.shape[1], 1), b.repeat(1, n // b.shape[1], 1)


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
) -> Tensor:
    """Sample from ``latent`` (B, C, h, w) in the model's scaled latent space; returns the new latent.

    ``positive`` / ``negative``: conditioning entries (several positives are averaged as ComfyUI's
    ConditioningCombine; the first negative is used); a ControlNet acts on the CFG half whose entry carries it
    (both when both do), as in ComfyUI. ``posterior``: (mean, std) of a VAE encoding, drawn
    per row under the ``sdengine`` rule; ``posterior_scaled``: it is in the diffusion model's units (a tiny VAE's
    encoding), taken back to the VAE's first, as the pipeline's ``vae_encode="tiny"`` does. ``noise_mask``
    (1 or B, 1, H, W), 1 = repaint: the known region is kept on the init latent's noising path, as the
    pipeline's inpainting. ``loras``: (path, weight)
    applied to the U-Net for this call only. ``start_at_step`` / ``end_at_step`` / ``add_noise`` /
    ``leftover_noise``: KSamplerAdvanced's window of a ``steps``-step schedule. ``callback`` returning
    False raises :class:`SamplingStopped`. ``batch_index``: under ComfyUI's rule, the original batch's row of each
    row (see :func:`make_noise`). ``sigmas``: an explicit decreasing sigma list (ComfyUI's SIGMAS, SamplerCustom)
    walked instead of ``steps``/``schedule``/``denoise`` and the window, as ComfyUI walks it: from the latent plus
    the noise at ``sigmas[0]``, or from pure noise (``sqrt(1 + sigma**2)`` scaled) when the latent is empty and
    ``sigmas[0]`` is the model's sigma_max; the result is the sample at ``sigmas[-1]`` (noisy when that is not 0).
    ``sampler_options``: the sampler's keyword options (ComfyUI's DPM fast / adaptive run with eta 0,
    k-diffusion's default). ``discard_penultimate_sigma``: the ``steps``-step grid is made for one step more and
    its next-to-last sigma dropped (ComfyUI's KSampler does so for dpm_2, dpm_2_ancestral, uni_pc, uni_pc_bh2;
    :func:`sdengine.diffusion.sampling.make_grid`); not with ``sigmas``.
    """
    if seed_rule not in SEED_RULES:
        raise LatentSamplingError(f"unknown seed rule {seed_rule!r}; use one of {', '.join(SEED_RULES)}")
    if not positive or not negative:
        raise LatentSamplingError("sampling needs positive and negative conditioning")
    if getattr(pipe, "inpainting", False):
        raise LatentSamplingError(
            f"{pipe.name}: 9-channel inpainting U-Nets are not supported here; use an ordinary model with a noise mask"
        )
    if latent.ndim != 4 or latent.shape[1] != pipe.latent_channels:
        raise LatentSamplingError(
            f"latent of shape {tuple(latent.shape)} does not fit {pipe.name} ({pipe.latent_channels} channels)"
        )
    if not 0.0 < denoise <= 1.0:
        raise LatentSamplingError(f"denoise must be in (0, 1], got {denoise}")
    dev = pipe.device
    b, _, h, w = latent.shape
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

    # Which steps of which grid run.
    given = None
    if sigmas is not None:
        given = sigmas.detach().to("cpu", torch.float32).reshape(-1)
        if given.shape[0] < 2:
            raise LatentSamplingError(f"{given.shape[0]} sigmas make no step")
        if not bool(torch.isfinite(given).all()) or float(given[-1]) < 0 or not bool((given[1:] < given[:-1]).all()):
            shown = [round(v, 4) for v in given.tolist()[:8]]
            raise LatentSamplingError(f"sigmas must be finite, decreasing and end at or above 0, got {shown}")
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
        # starts below sigma_max), and as the sampler's own grid starts on the others (diffusers' karras and
        # exponential grids start below it where ComfyUI's start at it, with sqrt(1 + sigma**2), as that start does).
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

    net: Any = pipe.unet
    # the first negative is the one used: its ControlNets count, those of the others do not
    controls = [c for cond in (*positive, negative[0]) for c in cond.controls]
    distinct: list[ControlHint] = []  # one unit per distinct hint (see below)
    for hint in controls:
        if not any(_same_hint(hint, d) for d in distinct):
            distinct.append(hint)
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
                resize_mode="crop and resize",  # a hint of another aspect: its centre, as ComfyUI cuts it
                noise_schedule=pipe.noise_schedule,
            )  # fmt: skip
        from sdengine.pipeline.unet_adapter import UNetAdapter

        def carried(entry: TextCondition, hint: ControlHint) -> bool:
            return any(_same_hint(hint, c) for c in entry.controls)

        neg = negative[0].cond
        parts = []
        for pos_entry in positive:
            part_net = net
            if distinct:
                kinds = [
                    frozenset(k for k, e in (("cond", pos_entry), ("uncond", negative[0])) if carried(e, d))
                    for d in distinct
                ]
                part_net = net.with_kinds(kinds)
            den = Denoiser(UNetAdapter(part_net, pipe.dtype), pipe.noise_schedule, pipe.prediction_type)
            pos = pos_entry.cond
            c, u = _match_length(pos["crossattn"].to(dev), neg["crossattn"].to(dev))
            uncond_args: dict[str, Tensor] = {"crossattn": u}
            extra: dict[str, Tensor] = {"crossattn": c.expand(b, -1, -1)}
            if "vector" in pos and "vector" in neg:
                pos_vec, neg_vec = pos["vector"], neg["vector"]
                sizes = getattr(pipe.conditioner, "size_vectors", None)
                if sizes is not None and "pooled_text" in pos:  # SDXL: the latent's size (see encode_text)
                    pos_vec = sizes(pos["pooled_text"], w * f, h * f)[0]
                if sizes is not None and "pooled_text" in neg:
                    neg_vec = sizes(neg["pooled_text"], w * f, h * f)[1]
                uncond_args["vector"] = neg_vec.to(dev)
                extra["vector"] = pos_vec.to(dev).expand(b, -1)
            parts.append((CFGDenoiser(den, cfg, uncond_args), extra))
        guided: Any = parts[0][0] if len(parts) == 1 else _MeanOfGuided(parts)
        extra_args = parts[0][1] if len(parts) == 1 else {}
        inpaint = None
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
            guided = inpaint = InpaintBlend(guided, latent, known_noise, blend, first=first)
        run_steps = end - start

        def on_step(i: int, sigma: float, x: Tensor, denoised: Tensor) -> bool | None:
            ok = callback(StepReport(i + 1, run_steps, denoised)) if callback is not None else None
            if i + 1 == run_steps and end < total and ok is not False:
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
                )
        except SamplingInterrupted as e:
            if e.step + 1 != run_steps or end >= total:
                raise SamplingStopped(e.step + 1, run_steps, e.denoised) from None
            # Stopped at end_at_step: the noisy sample (ComfyUI's leftover noise) or its x0 estimate.
            x = e.x if leftover_noise else e.denoised
    finally:
        if handle is not None:
            handle.remove()
    if inpaint is not None:
        x = inpaint.finish(x)
    return x.float()
