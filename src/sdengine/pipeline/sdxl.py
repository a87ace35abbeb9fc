"""SDXL behind the same pipeline: two text encoders and size micro-conditioning.

Everything after the conditioning dict is :class:`sdengine.pipeline.core.Pipeline`'s (samplers, img2img,
VAE decode with its fp32 fall-back, seeds, infotext); what differs is where the conditioning comes from
(:class:`sdengine.text.sdxl_conditioner.SDXLConditioner`, which needs the image size) and the request's
``sdxl`` settings (``prompt_2``, ``negative_prompt_2``, sizes, crops, aesthetic score).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from PIL import Image

from sdengine import vae_utils
from sdengine.diffusion import sampling
from sdengine.diffusion.samplers import SamplingInterrupted
from sdengine.diffusion.schedules import img2img_start
from sdengine.errors import GenerationError
from sdengine.io.images import to_uint8
from sdengine.pipeline.core import Pipeline, Prepared, as_request, grid_strength
from sdengine.pipeline.infotext import call_parameters, format_infotext, init_resize_mode
from sdengine.pipeline.latents import start_latents
from sdengine.pipeline.request import GenerationRequest
from sdengine.pipeline.result import Cancelled, GenerationResult, StepInfo
from sdengine.text.conditioners import Conditioning
from sdengine.text.sdxl_conditioner import SDXLConditioner, SDXLOptions

SWITCH_RULES = ("diffusers", "a1111")


def check_hand_off(request: GenerationRequest, switch_at: Any, switch_rule: str = "diffusers") -> None:
    """The settings a base -> refiner hand-off cannot run (a GenerationError, one line), read from the request
    alone: the server checks them before it queues a job."""
    if switch_rule not in SWITCH_RULES:
        raise GenerationError(f"switch_rule must be one of {', '.join(SWITCH_RULES)}, got {switch_rule!r}")
    if isinstance(switch_at, bool) or not isinstance(switch_at, int | float) or not 0.0 < switch_at < 1.0:
        raise GenerationError(f"switch_at must be a number in (0, 1), got {switch_at!r}")
    if request.mask is not None or request.controlnets or request.loras:
        raise GenerationError("a base -> refiner hand-off takes no mask, ControlNet or LoRA")
    if request.enable_hr:  # it would be dropped: an image of the first pass's size, without its second pass
        raise GenerationError("the hires fix is not supported with a refiner hand-off")
    if request.vae_decode != "full":
        raise GenerationError("vae_decode 'tiny' is not supported with a refiner (the refiner's VAE decodes)")
    if request.subseed_strength:
        raise GenerationError("variation seeds are not supported with a refiner hand-off")
    try:
        sampler = sampling.resolve(request.sampler, request.schedule)[0]
    except ValueError as e:
        raise GenerationError(str(e)) from None
    if sampler in sampling.TIMESTEP_SAMPLERS:
        raise GenerationError(
            f"sampler {sampler} is not supported with a refiner hand-off (it cannot stop at the switch): use "
            "one of the others, e.g. euler or dpmpp_2m"
        )
    if request.seed_resize_from is not None or request.tiling:
        raise GenerationError("seed_resize_from_w/_h and tiling are not supported with a refiner hand-off")


def switch_step(grid: Any, noise_schedule: Any, switch_at: float, rule: str = "diffusers", first: int = 0) -> int:
    """The first step the refiner runs. diffusers: the base walks the steps whose timestep is at least
    ``(1 - switch_at) * T``; A1111: the refiner starts at the first step whose sigma's nearest training
    timestep ``t`` has ``(999 - t) / 1000 >= switch_at``. ``first``: the first step an img2img run takes. A
    GenerationError when either model gets no step."""
    if rule == "a1111":
        table = noise_schedule.sigmas.double()
        t = [int(torch.argmin((table - float(s)).abs())) for s in grid.sigmas[: grid.steps]]
        k = next((i for i, ti in enumerate(t) if (999 - ti) / 1000 >= switch_at), grid.steps)
    else:
        cutoff = round(noise_schedule.num_train_timesteps * (1.0 - switch_at))
        k = int((torch.as_tensor(grid.timesteps) >= cutoff).sum())
    if not first < k < grid.steps:
        which = "base" if k <= first else "refiner"
        img2img = f" of the img2img's steps {first + 1}..{grid.steps}" if first else ""
        raise GenerationError(f"switch_at {switch_at} leaves no steps{img2img} for the {which}")
    return k


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
        **kwargs: Any,
    ) -> GenerationResult:
        """Text-to-image (or image-to-image: ``init_image``, ``strength``) with this base model for the noisy part of
        the steps and ``refiner`` for the rest,
        as diffusers' ``denoising_end=switch_at`` on the base and ``denoising_start=switch_at`` on the refiner
        do: the base walks the steps whose timestep is at least ``(1 - switch_at) * 1000``, the refiner
        continues from that latent (no noise added) on the same grid, and its VAE decodes. Both samplers
        restart at the switch (a multistep sampler's history is not carried over), as in diffusers.
        Settings are a request's (no mask, ControlNet, LoRA or hires fix). With an init image the base starts at
        the img2img's first step of that grid (its strength and ``strength_rule``) and the switch is the same step
        of the whole grid: A1111 switches on its img2img schedule so; one of the models left without a step is a
        GenerationError (A1111 would run the other alone).

        ``switch_rule`` ``"a1111"``: A1111's step instead (its ``refiner_switch_at``): the refiner takes over at
        the first step whose sigma's nearest training timestep ``t`` has ``(999 - t) / 1000 >= switch_at``
        (``apply_refiner`` in its sd_samplers_common.py); the samplers restart there as above, where A1111's
        carries a multistep sampler's history across (the same image for single-step samplers, Euler's)."""
        if not isinstance(refiner, SDXLPipeline):
            raise GenerationError("the refiner must be an SDXL model loaded with load_pipeline")
        request = as_request(prompt, negative_prompt, kwargs)
        check_hand_off(request, switch_at, switch_rule)
        if refiner.latent_channels != self.latent_channels or refiner.vae_scale_factor != self.vae_scale_factor:
            raise GenerationError(f"{refiner.name} does not share {self.name}'s latent space")
        p = self.prepare(request)
        # the refiner's conditioning settings (the base encodes the init image: its tiny encoder, not the refiner's)
        p_ref = refiner.prepare(request.replace(width=p.width, height=p.height, vae_encode="full"))
        steps, cfg_scale, rescale = int(request.steps), float(request.cfg_scale), float(request.guidance_rescale)
        strength = grid_strength(request) if p.init is not None else 1.0
        grid = sampling.make_grid(p.sampler, steps, self.noise_schedule, p.schedule, self.scheduler_config, strength)
        first = 0
        if p.init is not None:  # img2img: the base starts at the img2img's first step (A1111 switches on its schedule)
            first = img2img_start(grid.steps, float(request.strength), request.strength_rule, p.sampler)
            if first >= grid.steps:
                raise GenerationError(f"strength {request.strength} runs no step of {steps}")
        k = switch_step(grid, self.noise_schedule, float(switch_at), switch_rule, first)
        from tqdm.auto import tqdm

        total, done = grid.steps - first, [0]
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
                for prompt_i, negative_i, seed in zip(p.prompts, self.encoded_negatives(p), p.seeds, strict=True):
                    pixels = self._hand_off_row(
                        refiner, p, p_ref, request, prompt_i, negative_i, seed, (first, k, strength), grid, on_step
                    )
                    images.append(pixels)
            except SamplingInterrupted as e:
                raise Cancelled(done[0], total, vae_utils.latent_preview(e.denoised)) from None
            finally:
                bar.close()
        arrays = torch.cat(images).permute(0, 2, 3, 1).float().cpu().numpy()
        pil = [Image.fromarray(a) for a in to_uint8(arrays)]
        refiner_hash = refiner.model_hash()
        rows = []
        for prompt_i, negative_i, seed in zip(p.prompts, p.negatives, p.seeds, strict=True):
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
                vae=refiner.vae_name(),  # the refiner's VAE decodes (a separate one: --from-png loads it again)
                vae_hash=refiner.vae_hash(),
                strength=float(request.strength) if p.init is not None else None,
                clip_skip=request.clip_skip,
                clip_skip_rule=request.clip_skip_rule,
                guidance_rescale=rescale,
                loras=[],
                n_tag_loras=0,
                lora_dir=None,
                controlnets=[],
                mask_blur=None,
                resize_mode=init_resize_mode(request) if p.init is not None else None,
                sampler_options=request.sampler_options,
                strength_rule=request.strength_rule if p.init is not None else "diffusers",
                sdxl=request.sdxl,
            )
            if p.init is not None and float(request.noise_multiplier) != 1.0:
                row["Noise multiplier"] = float(request.noise_multiplier)  # A1111's field (img2img)
            if int(request.noise_seed_delta) and sampling.SAMPLERS[p.sampler].stochastic:
                row["ENSD"] = int(request.noise_seed_delta)  # A1111's, written where the sampler draws noise
            if p.init is not None and request.vae_encode == "tiny":
                row["Tiny VAE encode"] = self.tiny_vae.name  # the init latent is the tiny encoder's
            # A1111's names for its refiner settings
            row["Refiner"] = f"{refiner.name} [{refiner_hash}]" if refiner_hash else refiner.name
            row["Refiner switch at"] = float(switch_at)
            rows.append(row)
        per_row = [{"prompt": r["prompt"], "negative_prompt": r["negative_prompt"], "seed": r["seed"]} for r in rows]
        return GenerationResult(pil, arrays, rows[0], p.seeds, [format_infotext(r) for r in rows], p.notes, per_row)

    def _hand_off_row(
        self,
        refiner: SDXLPipeline,
        p: Prepared,
        p_ref: Prepared,
        request: GenerationRequest,
        prompt_i: str,
        negative_i: str,
        seed: int,
        span: tuple[int, int, float],
        grid: Any,
        on_step: Any,
    ) -> torch.Tensor:
        """One row of :meth:`generate_with_refiner`: the base's steps up to ``k``, the refiner's from there, decoded."""
        steps, cfg_scale, rescale = int(request.steps), float(request.cfg_scale), float(request.guidance_rescale)
        note = lambda t: p.notes.append(t)  # noqa: E731
        # the notes describe the job: a setting one model has no use for is the other's (the base's prompt_2 and
        # target size, the refiner's aesthetic scores); generate_with_refiner notes those neither uses
        cond, uncond = self.conditioning_pair(prompt_i, negative_i, p, note, note_unused=False)
        r_cond, r_uncond = refiner.conditioning_pair(prompt_i, negative_i, p_ref, note, note_unused=False)
        first, k, strength = span
        gen = torch.Generator("cpu").manual_seed(seed)
        start = start_latents(
            self.vae,
            generators=[gen],
            latent_channels=self.latent_channels,
            width=p.width,
            height=p.height,
            scale_factor=self.vae_scale_factor,
            init=p.init,
            mask=None,
            mask_blur=0.0,
            strength=float(request.strength) if p.init is not None else 1.0,
            nine_channels=False,
            tiled=p.tiled,
            device=self.device,
            tiny=self.tiny_vae if p.init is not None and request.vae_encode == "tiny" else None,
        )
        noise = start.noise
        if p.init is not None and float(request.noise_multiplier) != 1.0:  # A1111's img2img noise multiplier
            noise = noise * float(request.noise_multiplier)
        if int(request.noise_seed_delta):  # A1111's ENSD: the per-step noise from seed + delta
            gen = torch.Generator("cpu").manual_seed(seed + int(request.noise_seed_delta))
        common: dict[str, Any] = dict(
            sampler=p.sampler,
            steps=steps,
            schedule=p.schedule,
            generators=[gen],
            sampler_options=dict(request.sampler_options or {}) or None,
            strength=strength,
        )
        x = sampling.sample(
            self.guided_denoiser(cfg_scale, uncond, rescale),
            noise,
            scheduler_config=self.scheduler_config,
            extra_args=cond,
            noise_schedule=self.noise_schedule,
            init_latent=start.init_latent if p.init is not None else None,
            start_step=first if p.init is not None else None,
            end_step=k,
            callback=on_step(0, self.tiny_vae),
            **common,
        )
        x = x * math.sqrt(1.0 + float(grid.sigmas[k]) ** 2)  # back to the sampler's (VE) scaling
        x = sampling.sample(
            refiner.guided_denoiser(cfg_scale, r_uncond, rescale),
            torch.zeros_like(x),
            scheduler_config=refiner.scheduler_config,
            extra_args=r_cond,
            noise_schedule=refiner.noise_schedule,
            init_latent=x,
            start_step=k,
            callback=on_step(k - first, refiner.tiny_vae),
            **common,
        )
        img, upcast = vae_utils.decode(refiner.vae, x, tiled=p.tiled, upcast=refiner.vae_upcast, warn=False)
        if upcast and not refiner.vae_upcast:
            refiner.vae_upcast = True
            p.notes.append("the VAE decode in half precision gave NaN/inf; decoded again in float32")
        return vae_utils.to_unit(img)


__all__ = ["SWITCH_RULES", "SDXLPipeline", "check_hand_off", "switch_step"]
