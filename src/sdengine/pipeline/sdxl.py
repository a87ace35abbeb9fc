"""SDXL behind the same pipeline: two text encoders and size micro-conditioning.

Everything after the conditioning dict is :class:`sdengine.pipeline.core.Pipeline`'s (samplers, img2img,
VAE decode with its fp32 fall-back, seeds, infotext); what differs is where the conditioning comes from
(:class:`sdengine.text.sdxl_conditioner.SDXLConditioner`, which needs the image size) and the request's
``sdxl`` settings (``prompt_2``, ``negative_prompt_2``, sizes, crops, aesthetic score).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from PIL import Image

from sdengine import vae_utils
from sdengine.diffusion import sampling
from sdengine.diffusion.brownian import BrownianSpec
from sdengine.diffusion.multidiffusion import MultiDiffusionDenoiser
from sdengine.diffusion.philox import make_generator
from sdengine.diffusion.samplers import SamplingInterrupted
from sdengine.diffusion.schedules import A1111_STRENGTH_RULES, img2img_start, img2img_steps
from sdengine.errors import GenerationError
from sdengine.io.images import to_uint8
from sdengine.metadata import REFINER_SWITCH_RULES
from sdengine.nn.hypertile import vae_hypertile_applied
from sdengine.pipeline.core import (
    Pipeline,
    Prepared,
    a1111_changes_run,
    as_request,
    check_hr_model,
    discards_penultimate,
    grid_strength,
    hypertile_infotext,
    model_title,
    zero_snr_call,
)
from sdengine.pipeline.hires import (
    first_pass,
    infotext_fields,
    second_pass,
    second_prepared,
    upscale_latents,
    upscaled_pictures,
)
from sdengine.pipeline.infotext import call_parameters, format_infotext, init_resize_mode
from sdengine.pipeline.latents import A1111Blend, InpaintBlend, start_latents
from sdengine.pipeline.request import GenerationRequest
from sdengine.pipeline.result import Cancelled, GenerationResult, StepInfo
from sdengine.text.conditioners import Conditioning
from sdengine.text.sdxl_conditioner import SDXLConditioner, SDXLOptions

SWITCH_RULES = REFINER_SWITCH_RULES  # diffusers', A1111's (sdengine.metadata: the infotext names it)
# A1111's hires_fix_refiner_pass: which pass of the hires fix hands off to the refiner (its default "second pass")
HIRES_REFINER_PASSES = ("first pass", "second pass", "both passes")


def check_hand_off(
    request: GenerationRequest, switch_at: Any, switch_rule: str = "diffusers", hires_pass: Any = "second pass"
) -> None:
    """The settings a base -> refiner hand-off cannot run (a GenerationError, one line), read from the request
    alone: the server checks them before it queues a job. ``hires_pass``: which pass of the hires fix hands off
    (A1111's ``hires_fix_refiner_pass``, :data:`HIRES_REFINER_PASSES`)."""
    if switch_rule not in SWITCH_RULES:
        raise GenerationError(f"switch_rule must be one of {', '.join(SWITCH_RULES)}, got {switch_rule!r}")
    if hires_pass not in HIRES_REFINER_PASSES:
        raise GenerationError(
            f"hires_fix_refiner_pass must be one of {', '.join(map(repr, HIRES_REFINER_PASSES))}, got {hires_pass!r}"
        )
    if isinstance(switch_at, bool) or not isinstance(switch_at, int | float) or not 0.0 <= switch_at < 1.0:
        # 0: the refiner runs every step (A1111's apply_refiner switches before the first one)
        raise GenerationError(f"switch_at must be a number in [0, 1), got {switch_at!r}")
    if request.controlnets or request.loras:
        raise GenerationError("a base -> refiner hand-off takes no ControlNet or LoRA")
    if request.ip_adapters:
        raise GenerationError("a base -> refiner hand-off takes no IP-Adapter (run the base alone with it)")
    if request.vae_decode != "full":
        raise GenerationError("vae_decode 'tiny' is not supported with a refiner (the refiner's VAE decodes)")
    if request.subseed_strength:
        raise GenerationError("variation seeds are not supported with a refiner hand-off")
    if request.differential_diffusion:
        raise GenerationError("differential_diffusion is not supported with a refiner hand-off (run the base alone)")
    if request.soft_inpainting_settings() is not None:
        raise GenerationError("soft_inpainting is not supported with a refiner hand-off (run the base alone)")
    try:
        sampler = sampling.resolve(request.sampler, request.schedule)[0]
        hr_sampler = None
        if request.enable_hr and (request.hr_sampler or request.hr_schedule is not None):
            from sdengine.pipeline.hires import hires_sampler

            hr_sampler = hires_sampler(request)[0]
    except ValueError as e:
        raise GenerationError(str(e)) from None
    # the samplers of the passes that hand off (the hires fix's: its first pass's, its second pass's hr_sampler)
    for name, hands, what in (
        (sampler, not request.enable_hr or hires_pass != "second pass", "sampler"),
        (hr_sampler or sampler, request.enable_hr and hires_pass != "first pass", "hr_sampler"),
    ):
        if hands and name in sampling.TIMESTEP_SAMPLERS:
            raise GenerationError(
                f"{what} {name} is not supported with a refiner hand-off (it cannot stop at the switch): use "
                "one of the others, e.g. euler or dpmpp_2m"
            )
    if request.seed_resize_from is not None or request.tiling:
        raise GenerationError("seed_resize_from_w/_h and tiling are not supported with a refiner hand-off")


def switch_step(grid: Any, noise_schedule: Any, switch_at: float, rule: str = "diffusers", first: int = 0) -> int:
    """The first step the refiner runs. diffusers: the base walks the steps whose timestep is at least
    ``(1 - switch_at) * T``; A1111: the refiner starts at the first step whose sigma's nearest training
    timestep ``t`` has ``(999 - t) / 1000 >= switch_at``. ``first``: the first step an img2img run takes. As
    A1111's ``apply_refiner`` (which checks the switch before each step), a switch at or before ``first`` is
    ``first`` (the refiner runs every step) and one after the last step is ``grid.steps`` (the base runs alone)."""
    if rule == "a1111":
        table = noise_schedule.sigmas.double()
        t = [int(torch.argmin((table - float(s)).abs())) for s in grid.sigmas[: grid.steps]]
        k = next((i for i, ti in enumerate(t) if (999 - ti) / 1000 >= switch_at), grid.steps)
    else:
        cutoff = round(noise_schedule.num_train_timesteps * (1.0 - switch_at))
        k = int((torch.as_tensor(grid.timesteps) >= cutoff).sum())
    return min(max(k, first), grid.steps)


class SDXLPipeline(Pipeline):
    """SDXL base or refiner. Build it with :func:`sdengine.pipeline.load_pipeline` on an SDXL folder."""

    def __init__(
        self,
        *,
        text_encoder_2: torch.nn.Module,
        tokenizer_2: Any,
        pad_token_id_2: int,
        force_zeros_for_empty_prompt: bool,
        **kwargs: Any,
    ) -> None:
        self.text_encoder_2 = text_encoder_2.eval().requires_grad_(False)
        self.tokenizer_2 = tokenizer_2
        te = kwargs.get("text_encoder")
        conditioner = SDXLConditioner(
            te.eval().requires_grad_(False) if te is not None else None,
            self.text_encoder_2,
            kwargs.get("tokenizer"),
            tokenizer_2,
            pad_token_id=kwargs["pad_token_id"],
            pad_token_id_2=pad_token_id_2,
            unet_config=kwargs["unet"].config,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            dtype=kwargs["dtype"],
            device=kwargs["device"],
            name=kwargs.get("name", "model"),
        )
        super().__init__(conditioner=conditioner, **kwargs)

    @property
    def refiner(self) -> bool:
        """True for the refiner (bigG only, aesthetic-score conditioning)."""
        return bool(getattr(self.conditioner, "refiner", False))

    @property
    def pooled_dim(self) -> int | None:
        return None  # the vector is not a caption's pooled embedding alone (see unet_text_kwargs of Pipeline)

    def prepare(self, request: GenerationRequest) -> Prepared:
        SDXLOptions.coerce(request.sdxl)  # bad settings are refused before any model runs
        return super().prepare(request)

    def conditioning_pair(
        self, prompt: str, negative: str, p: Prepared, note: Any, *, note_unused: bool = True
    ) -> tuple[Conditioning, Conditioning]:
        cond: SDXLConditioner = self.conditioner  # type: ignore[assignment]
        return cond.pair(
            prompt,
            negative,
            clip_skip=self.clip_skip_of(p.request),
            note=note,
            width=p.width,
            height=p.height,
            options=p.request.sdxl,
            note_unused=note_unused,
        )

    # -- base -> refiner hand-off -------------------------------------------------------------------------

    def generate_with_refiner(
        self,
        refiner: SDXLPipeline,
        prompt: Any = "",
        negative_prompt: Any = None,
        *,
        switch_at: float = 0.8,
        switch_rule: str = "diffusers",
        hires_pass: str = "second pass",
        hr_model: Any = None,
        **kwargs: Any,
    ) -> GenerationResult:
        """Text-to-image (or image-to-image: ``init_image``, ``strength``; inpainting: ``mask`` too) with this base
        model for the noisy part of the steps and ``refiner`` for the rest,
        as diffusers' ``denoising_end=switch_at`` on the base and ``denoising_start=switch_at`` on the refiner
        do: the base walks the steps whose timestep is at least ``(1 - switch_at) * 1000``, the refiner
        continues from that latent (no noise added) on the same grid, and its VAE decodes. Both samplers
        restart at the switch (a multistep sampler's history is not carried over), as in diffusers.
        Settings are a request's (no ControlNet or LoRA). With an init image the base starts at
        the img2img's first step of that grid (its strength and ``strength_rule``) and the switch is the same step
        of the whole grid: A1111 switches on its img2img schedule so. A switch at or before a pass's first step runs
        the refiner alone on it, one past its last step the base alone, as A1111 does (the infotext names the
        refiner only where it ran, as A1111's). With a ``mask`` the inpainting blend of the request's
        rule (:class:`sdengine.pipeline.latents.A1111Blend` / ``InpaintBlend``, on the base's init latent) runs on
        the refiner's steps too, as A1111's denoiser keeps blending after its switch.

        The hires fix (``enable_hr``): ``hires_pass`` (A1111's ``hires_fix_refiner_pass``) says which pass hands
        off: "second pass" (A1111's default: the first pass is the base's alone, the second pass hands off on its
        own img2img steps), "first pass" (the first pass hands off, the refiner's VAE decodes it for a pixel
        upscaler, and the second pass runs on the base alone: A1111 reloads it), "both passes". ``hr_model``: the
        second pass's model in place of this one (A1111's ``hr_checkpoint_name``).

        ``switch_rule`` ``"a1111"``: A1111's step instead (its ``refiner_switch_at``): the refiner takes over at
        the first step whose sigma's nearest training timestep ``t`` has ``(999 - t) / 1000 >= switch_at``
        (``apply_refiner`` in its sd_samplers_common.py); the samplers restart there as above, where A1111's
        carries a multistep sampler's history across (the same image for single-step samplers, Euler's)."""
        if not isinstance(refiner, SDXLPipeline):
            raise GenerationError("the refiner must be an SDXL model loaded with load_pipeline")
        request = as_request(prompt, negative_prompt, kwargs)
        with zero_snr_call(request, self, refiner, hr_model):  # A1111's Zero Terminal SNR: on every model it runs
            return self._with_refiner(refiner, request, switch_at, switch_rule, hires_pass, hr_model)

    def _with_refiner(
        self,
        refiner: SDXLPipeline,
        request: GenerationRequest,
        switch_at: float,
        switch_rule: str,
        hires_pass: str,
        hr_model: Any,
    ) -> GenerationResult:
        check_hand_off(request, switch_at, switch_rule, hires_pass)
        if request.row_images:  # each row's hand-off reads the call's one init image
            raise GenerationError("a refiner hand-off takes one init image for the call, not one per row (a list)")
        if refiner.latent_channels != self.latent_channels or refiner.vae_scale_factor != self.vae_scale_factor:
            raise GenerationError(f"{refiner.name} does not share {self.name}'s latent space")
        p = self.prepare(request)
        if hr_model is self:
            hr_model = None
        second_model: Any = self
        if hr_model is not None:
            check_hr_model(self, hr_model, request)
            second_model = hr_model
            if hires_pass != "first pass" and not isinstance(hr_model, SDXLPipeline):
                raise GenerationError(
                    f"the hires model {hr_model.name} must be an SDXL model to hand off to the refiner"
                )
        # the refiner's conditioning settings (the base encodes the init image: its tiny encoder, not the refiner's)
        p_ref = refiner.prepare(request.replace(width=p.width, height=p.height, vae_encode="full", enable_hr=False))
        steps, cfg_scale, rescale = int(request.steps), float(request.cfg_scale), float(request.guidance_rescale)
        first_hands = p.hires is None or hires_pass != "second pass"
        second_hands = p.hires is not None and hires_pass != "first pass"
        span: tuple[int, int, float] = (0, steps, 1.0)
        first_switches = second_switches = False  # whether a pass reaches its switch (A1111 loads the refiner)
        grid_steps = steps  # the first pass's schedule: img2img_fix_steps' steps / strength (A1111's)
        if first_hands:
            strength = grid_strength(request) if p.init is not None else 1.0
            if p.init is not None:
                grid_steps = img2img_steps(steps, float(request.strength), request.strength_rule, p.sampler)[0]
            grid = sampling.make_grid(
                p.sampler,
                grid_steps,
                self.noise_schedule,
                p.schedule,
                self.scheduler_config,
                strength,
                discard_penultimate=discards_penultimate(p),
            )
            first = 0
            if p.init is not None:  # img2img: the base starts at the img2img's first step (A1111 switches so)
                if request.strength_rule == "a1111_fix_steps":  # the last `steps` of the longer schedule
                    first = grid.steps - (
                        grid_steps - img2img_steps(steps, float(request.strength), request.strength_rule, p.sampler)[1]
                    )
                else:
                    first = img2img_start(grid.steps, float(request.strength), request.strength_rule, p.sampler)
                if first >= grid.steps:
                    raise GenerationError(f"strength {request.strength} runs no step of {steps}")
            span = (first, switch_step(grid, self.noise_schedule, float(switch_at), switch_rule, first), strength)
            first_switches = span[1] < grid.steps  # else the base runs the first pass alone (no step reaches it)
        first_run = grid_steps - span[0]
        total = first_run
        second_span: tuple[int, int, float] | None = None
        if p.hires is not None:
            second = second_prepared(p)
            total += second.request.steps - int(second.start_step or 0)
            if second_hands:
                plan = p.hires
                g_strength = grid_strength(request)
                grid2 = sampling.make_grid(
                    plan.sampler,
                    plan.steps,
                    second_model.noise_schedule,
                    plan.schedule,
                    second_model.scheduler_config,
                    g_strength,
                    discard_penultimate=discards_penultimate(second),
                )
                k2 = switch_step(grid2, second_model.noise_schedule, float(switch_at), switch_rule, plan.start)
                second_span = (plan.start, k2, g_strength)
                second_switches = k2 < grid2.steps
        from tqdm.auto import tqdm

        done = [0]
        bar = tqdm(total=total * len(p.seeds), disable=not request.progress, unit="step", desc="sampling", leave=False)

        def on_step(offset: int, tiny_vae: Any) -> Any:
            """The request's step callback over the whole run (the refiner's steps count on from the base's)."""

            def report(i: int, sigma: float, x: torch.Tensor, denoised: torch.Tensor) -> bool | None:
                bar.update(1)
                done[0] = offset + i + 1
                if request.callback is not None:
                    return request.callback(StepInfo(offset + i + 1, total, float(sigma), x, denoised, tiny_vae))
                return None

            return report

        def shifted(offset: int) -> Any:
            """The request's callback for a pass run by the pipeline's own sampling (its steps from 1)."""

            def report(info: StepInfo) -> bool | None:
                bar.update(1)
                done[0] = offset + info.step
                if request.callback is not None:
                    return request.callback(
                        StepInfo(offset + info.step, total, info.sigma, info.latents, info.denoised, info.tiny_vae)
                    )
                return None

            return report

        unused = [
            k
            for k in self.conditioner.unused_settings(request.sdxl)  # type: ignore[attr-defined]
            if k in refiner.conditioner.unused_settings(request.sdxl)  # type: ignore[attr-defined]
        ]
        if unused:
            p.notes.append(f"sdxl {', '.join(unused)}: not used by {self.name} nor by the refiner {refiner.name}")
        images = []
        with torch.inference_mode():
            try:
                for i, (prompt_i, negative_i, seed) in enumerate(
                    zip(p.prompts, self.encoded_negatives(p), p.seeds, strict=True)
                ):
                    prow = dataclasses.replace(  # one row; the passes report through this call's bar
                        p,
                        request=request.replace(progress=False, callback=None),
                        prompts=[prompt_i],
                        negatives=[p.negatives[i]],
                        seeds=[seed],
                        subseeds=None,
                    )
                    if first_hands:
                        run = dataclasses.replace(prow, request=prow.request.replace(steps=grid_steps))
                        x = hand_off_latents(self, refiner, run, p_ref, prompt_i, negative_i, span, on_step)
                        ended: Any = refiner if first_switches else self  # the model whose VAE decodes it
                    else:
                        x = self.sample_latents(first_pass(prow, callback=shifted(0)))
                        ended = self
                    if p.hires is None:
                        images.append(decode_with(ended, p, x))
                        continue
                    if second_span is None:  # the second pass on the base (or hr_model) alone
                        images.append(second_pass(second_model, prow, x, callback=shifted(first_run), decoder=ended))
                        continue
                    sec = second_prepared(prow)
                    init_latent = None
                    if p.hires.latent:
                        init_latent = upscale_latents(x, p.hires, int(second_model.vae_scale_factor))
                    else:
                        sec = dataclasses.replace(sec, init=upscaled_pictures(ended, prow, x)[0])
                    p_ref2 = dataclasses.replace(p_ref, width=sec.width, height=sec.height)
                    hr_negative = second_model.encoded_negatives(sec)[0]
                    x = hand_off_latents(
                        second_model,
                        refiner,
                        sec,
                        p_ref2,
                        sec.prompts[0],
                        hr_negative,
                        second_span,
                        lambda offset, tiny: on_step(first_run + offset, tiny),
                        init_latent,
                    )
                    images.append(decode_with(refiner if second_switches else second_model, sec, x))
            except SamplingInterrupted as e:
                raise Cancelled(done[0], total, vae_utils.latent_preview(e.denoised)) from None
            finally:
                bar.close()
        arrays = torch.cat(images).permute(0, 2, 3, 1).float().cpu().numpy()
        pil = [Image.fromarray(a) for a in to_uint8(arrays)]
        final = (refiner if first_switches else self) if p.hires is None else second_model  # the VAE that decoded
        if second_switches:
            final = refiner
        switched = first_switches or second_switches
        if not switched:  # A1111 writes no Refiner field then: the image is the base's alone
            p.notes.append(f"refiner: switch_at {switch_at} is past the last step; {self.name} ran alone")
        rows = []
        for i, (prompt_i, negative_i, seed) in enumerate(zip(p.prompts, p.negatives, p.seeds, strict=True)):
            row = call_parameters(
                prompt=prompt_i,
                negative_prompt=negative_i,
                steps=steps,
                sampler=p.sampler,
                schedule=sampling.infotext_schedule(p.schedule, sdxl=True),
                cfg_scale=cfg_scale,
                seed=seed,
                width=p.width,
                height=p.height,
                model=self.name,
                model_hash=self.model_hash(),
                vae=final.vae_name(),  # the refiner's VAE decodes (a separate one: --from-png loads it again)
                vae_hash=final.vae_hash(),
                strength=float(request.strength) if p.init is not None else None,
                clip_skip=request.clip_skip,
                clip_skip_rule=request.clip_skip_rule,
                guidance_rescale=rescale,
                loras=[],
                n_tag_loras=0,
                lora_dir=None,
                controlnets=[],
                mask_blur=float(request.mask_blur) if p.mask is not None else None,
                resize_mode=init_resize_mode(request) if p.init is not None else None,
                sampler_options=request.sampler_options,
                strength_rule=request.strength_rule
                if p.init is not None or p.hires is not None or a1111_changes_run(p)
                else "diffusers",
                sdxl=request.sdxl,
            )
            if request.discard_penultimate_sigma:  # A1111's, where its option (not the sampler) discarded
                row["Discard penultimate sigma"] = True
            if request.zero_terminal_snr:  # A1111's, where its sd_noise_schedule option rescaled
                row["Noise Schedule"] = "Zero Terminal SNR"
            if request.pag_scale:  # sdengine's, as the single-model pipeline writes them (both models ran it)
                row["PAG scale"] = float(request.pag_scale)
                if request.pag_layer_list() != ("mid",):
                    row["PAG layers"] = ",".join(request.pag_layer_list())
            if request.sag_scale:
                row["SAG scale"] = float(request.sag_scale)
                row["SAG blur sigma"] = float(request.sag_blur_sigma)
                if request.sag_rule != "diffusers":
                    row["SAG rule"] = request.sag_rule
            if p.mask is not None and request.masked_content != "original":  # sdengine's (A1111 writes none)
                row["Masked content"] = request.masked_content
            if p.init is not None and float(request.noise_multiplier) != 1.0:
                row["Noise multiplier"] = float(request.noise_multiplier)  # A1111's field (img2img)
            if request.noise_source == "nv":  # A1111's "RNG: NV" (it writes the field when not its default GPU)
                row["RNG"] = "NV"
            if int(request.noise_seed_delta) and sampling.SAMPLERS[p.sampler].stochastic:
                row["ENSD"] = int(request.noise_seed_delta)  # A1111's, written where the sampler draws noise
            if p.init is not None and request.vae_encode == "tiny":
                row["Tiny VAE encode"] = self.tiny_vae.name  # the init latent is the tiny encoder's
            row.update(hypertile_infotext(request))  # A1111's Hypertile U-Net fields (both models ran it)
            multi = request.tiled_diffusion_settings()
            if multi is not None:  # sdengine's MultiDiffusion fields (both models ran it)
                row.update(multi.infotext())
            if p.hires is not None:
                row.update(infotext_fields(p, i, sdxl=getattr(second_model, "text_kind", "") == "sdxl"))
                if hr_model is not None:  # A1111's field: the second pass's model
                    row["Hires checkpoint"] = model_title(hr_model)
                if hires_pass != "second pass" and switched:  # A1111 writes it where it is not its default
                    row["Hires refiner"] = hires_pass
            if switched:  # A1111's names for its refiner settings, written where the refiner ran (apply_refiner)
                row["Refiner"] = model_title(refiner)
                row["Refiner switch at"] = float(switch_at)
                if switch_rule != "diffusers":  # sdengine's field: the switch counted as A1111's apply_refiner does
                    row["Refiner switch rule"] = switch_rule
            rows.append(row)
        per_row = [{"prompt": r["prompt"], "negative_prompt": r["negative_prompt"], "seed": r["seed"]} for r in rows]
        return GenerationResult(pil, arrays, rows[0], p.seeds, [format_infotext(r) for r in rows], p.notes, per_row)


def decode_with(model: Any, p: Prepared, x: torch.Tensor) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1]: a hand-off's final latent decoded by ``model``'s VAE (the refiner's), with the
    float32 fall-back noted once; HyperTile on the VAE where the request asks (``p.vae_tiles``)."""
    with vae_hypertile_applied(model.vae, p.vae_tiles, (int(x.shape[-2]), int(x.shape[-1]))):
        img, upcast = vae_utils.decode(model.vae, x, tiled=p.tiled, upcast=model.vae_upcast, warn=False)
    if upcast and not model.vae_upcast:
        model.vae_upcast = True
        p.notes.append("the VAE decode in half precision gave NaN/inf; decoded again in float32")
    return vae_utils.to_unit(img)


def hand_off_latents(
    base: Any,
    refiner: Any,
    p: Prepared,
    p_ref: Prepared,
    prompt_i: str,
    negative_i: str,
    span: tuple[int, int, float],
    on_step: Any,
    init_latent: torch.Tensor | None = None,
) -> torch.Tensor:
    """One row's hand-off (``p``: that row's Prepared, its first seed): ``base``'s steps ``first..k - 1`` of
    ``span`` (first, k, grid strength), the refiner's from ``k``; the final latent, before any VAE. From pure
    noise (txt2img), ``p.init`` (img2img, the base's VAE encodes it; with ``p.mask`` inpainting, the blend on
    both models' steps), or ``init_latent`` (the hires fix's latent upscale: only the noise is drawn)."""
    request = p.request
    steps, cfg_scale, rescale = int(request.steps), float(request.cfg_scale), float(request.guidance_rescale)
    note = lambda t: p.notes.append(t)  # noqa: E731
    # the notes describe the job: a setting one model has no use for is the other's (the base's prompt_2 and
    # target size, the refiner's aesthetic scores); generate_with_refiner notes those neither uses
    cond, uncond = base.conditioning_pair(prompt_i, negative_i, p, note, note_unused=False)
    r_cond, r_uncond = refiner.conditioning_pair(prompt_i, negative_i, p_ref, note, note_unused=False)
    first, k, strength = span
    seed = p.seeds[0]
    gen = make_generator(seed, request.noise_source)
    img2img = p.init is not None or init_latent is not None
    start = start_latents(
        base.vae,
        generators=[gen],
        latent_channels=base.latent_channels,
        width=p.width,
        height=p.height,
        scale_factor=base.vae_scale_factor,
        init=p.init,
        mask=p.mask,
        mask_blur=float(request.mask_blur),
        strength=float(request.strength) if img2img else 1.0,
        nine_channels=base.inpainting,
        tiled=p.tiled,
        device=base.device,
        tiny=base.tiny_vae if p.init is not None and request.vae_encode == "tiny" else None,
        pure_noise_at_full_strength=request.strength_rule == "diffusers",
        latent_mask=p.latent_mask,
        mask_round=bool(request.mask_round),  # (soft inpainting is refused with a hand-off)
    )
    if init_latent is not None:
        start.init_latent, start.from_init = init_latent.to(base.device, start.noise.dtype), True
    noise = start.noise
    if init_latent is None and p.mask is not None and request.masked_content != "original":
        lat = start.rounded_mask  # A1111's "latent noise" / "latent nothing" (as Pipeline._sample_rows)
        if lat is not None and start.init_latent is not None:
            fill = noise if request.masked_content == "latent noise" else torch.zeros_like(noise)
            start.init_latent = start.init_latent * (1 - lat) + fill * lat
    if init_latent is None and p.init is not None and float(request.noise_multiplier) != 1.0:
        noise = noise * float(request.noise_multiplier)  # A1111's img2img noise multiplier
    if int(request.noise_seed_delta):  # A1111's ENSD: the per-step noise from seed + delta
        gen = make_generator(seed + int(request.noise_seed_delta), request.noise_source)
    if start.concat is not None:  # an inpainting base's masked image: the base's alone (the refiner has 4 channels)
        cond = {**cond, "concat": start.concat}

    def blended(den: Any) -> Any:
        """The request's inpainting blend around a model's denoiser (both models blend with the base's init)."""
        if request.strength_rule in A1111_STRENGTH_RULES and start.rounded_mask is not None:
            if start.init_latent is not None:
                return A1111Blend(den, start.init_latent, start.rounded_mask, before=False)
        if start.blend_mask is not None and start.init_latent is not None:
            return InpaintBlend(den, start.init_latent, start.noise, start.blend_mask)
        return den

    discard = discards_penultimate(p)
    grid = sampling.make_grid(
        p.sampler,
        steps,
        base.noise_schedule,
        p.schedule,
        base.scheduler_config,
        strength,
        discard_penultimate=discard,
    )
    brownian = None
    if request.strength_rule in A1111_STRENGTH_RULES and p.sampler in sampling.BROWNIAN_SAMPLERS:
        # A1111's SDE noise: the image's one Brownian tree over the whole grid, read by both models' steps
        brownian = BrownianSpec.over([seed], grid.sigmas)
    common: dict[str, Any] = dict(
        sampler=p.sampler,
        steps=steps,
        schedule=p.schedule,
        generators=[gen],
        sampler_options=dict(request.sampler_options or {}) or None,
        strength=strength,
        discard_penultimate=discard,
        brownian=brownian,
    )
    init = start.init_latent if start.from_init else None
    # the base's steps first..k - 1, then the refiner's k..: a switch at the first step is the refiner's run alone,
    # one past the last the base's alone (A1111's apply_refiner switches at a step or never)
    pag = (float(request.pag_scale), request.pag_layer_list()) if request.pag_scale else None
    freeu = request.freeu_settings()  # on each model's own U-Net
    sag = request.sag_settings()
    shrink = request.deep_shrink_settings()  # the base's only (its block numbers; the refiner's are another U-Net's)
    tiles = request.hypertile_settings()  # and HyperTile, each model's generator seeded with the first seed
    ht = None if tiles is None else (tiles, int(p.seeds[0]))
    guides: dict[str, Any] = dict(pag=pag, freeu=freeu, sag=sag, hypertile=ht)
    multi = request.tiled_diffusion_settings()  # MultiDiffusion: each model's guided denoiser run on the views

    def tiled(den: Any) -> Any:
        return den if multi is None else MultiDiffusionDenoiser(den, multi)

    runs = [
        (
            base,
            blended(tiled(base.guided_denoiser(cfg_scale, uncond, rescale, deep_shrink=shrink, **guides))),
            cond,
            first,
            k,
        ),
        (
            refiner,
            blended(tiled(refiner.guided_denoiser(cfg_scale, r_uncond, rescale, **guides))),
            r_cond,
            k,
            grid.steps,
        ),
    ]
    x: torch.Tensor | None = None
    den: Any = None
    for model, den, extra, a, b in [r for r in runs if r[3] < r[4]]:
        if x is None:  # the first model to run starts from the noise (and the init latent)
            start_at, x_in, noise_in = (first if init is not None else None), init, noise
        else:  # the other continues from the first's latent at its switch (no noise added)
            start_at, x_in, noise_in = a, x * math.sqrt(1.0 + float(grid.sigmas[a]) ** 2), torch.zeros_like(x)
        x = sampling.sample(
            den,
            noise_in,
            scheduler_config=model.scheduler_config,
            extra_args=extra,
            noise_schedule=model.noise_schedule,
            init_latent=x_in,
            start_step=start_at,
            end_step=b if b < grid.steps else None,
            callback=on_step(a - first, model.tiny_vae),
            **common,
        )
    assert x is not None
    if isinstance(den, A1111Blend | InpaintBlend):  # the known region from the clean init latent
        x = den.finish(x)
    return x


__all__ = [
    "HIRES_REFINER_PASSES",
    "SWITCH_RULES",
    "SDXLPipeline",
    "check_hand_off",
    "decode_with",
    "hand_off_latents",
    "switch_step",
]
