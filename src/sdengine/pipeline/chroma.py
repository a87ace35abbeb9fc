"""Chroma (Chroma1-Base, Chroma1-HD): FLUX.1 [schnell]'s transformer reworked, T5-XXL only, real CFG.

lodestones' Chroma (2025) is a rectified flow in Flux.1's 16-channel latent (the same VAE), with the transformer
of :mod:`sdengine.models.chroma` (Flux's blocks, every modulation from one small network of the timestep) and the
conditioning of :mod:`sdengine.text.chroma_conditioner` (T5's states and a text mask; no CLIP). Unlike FLUX.1 it
is not guidance-distilled: a run is classifier-free guided with a real negative prompt, two passes per step.

:class:`ChromaPipeline` is :class:`sdengine.pipeline.flux.FluxPipeline` with Chroma's text side and network
arguments: the flow schedule (diffusers' ``FlowMatchEulerDiscreteScheduler`` grid ``linspace(1, 1/n, n)``, shifted
by the scheduler config: Chroma1's folders ship FLUX.1 [dev]'s, dynamic shifting by the image's token count),
img2img (diffusers' ``ChromaImg2ImgPipeline``: the flow start at step ``int(n - min(n strength, n))``), samplers,
the hires fix and the refusals of Flux's (:func:`sdengine.pipeline.flux.refusals`) are Flux's.

Defaults (:attr:`ChromaPipeline.family_defaults`, diffusers' ``ChromaPipeline``): ``cfg_scale`` 5, 35 steps, the
``euler`` sampler on the ``normal`` grid. Sizes are multiples of 16.

Refused, one line each before any model runs: what Flux refuses, and for Chroma also ``distilled_cfg_scale``
(no guidance input) and ControlNets (no Chroma ControlNets exist in sdengine).

LoRAs (``loras=``, ``<lora:NAME:W>`` tags, ``--lora``) apply through the core's path as Flux's do:
:mod:`sdengine.weights.lora_dit_keys` reads diffusers' names (ai-toolkit, SimpleTuner) and BFL's (ComfyUI,
kohya) on Chroma's transformer, including its ``distilled_guidance_layer``; T5 layers (diffusers'
``text_encoder.``, kohya's ``lora_te3_`` / ``lora_te_``, ComfyUI's ``text_encoders.t5xxl.transformer.``) adapt
its T5. A Flux.1 LoRA with layers Chroma lacks (modulation linears, ``time_in``, ...) is refused in one line.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sdengine.errors import GenerationError
from sdengine.pipeline.core import Pipeline, Prepared
from sdengine.pipeline.flux import FluxPipeline, refusals
from sdengine.pipeline.request import GenerationRequest
from sdengine.text.chroma_conditioner import ChromaConditioner
from sdengine.text.conditioners import Conditioning

CHROMA_STEPS = 35  # diffusers' ChromaPipeline num_inference_steps default
CHROMA_CFG = 5.0  # and its guidance_scale default (real CFG: > 1 runs the negative prompt)


class ChromaAdapter:
    """The conditioning dict -> the Chroma transformer's arguments (``crossattn`` -> ``encoder_hidden_states``,
    ``text_mask`` -> ``text_mask``); the network runs in ``dtype``, its velocity comes back in float32."""

    takes_step = takes_row_kinds = False

    def __init__(self, net: Any, dtype: torch.dtype) -> None:
        self.net = net
        self.dtype = dtype

    def __call__(
        self,
        x: Tensor,
        t: Tensor,
        *,
        crossattn: Tensor,
        text_mask: Tensor | None = None,
        concat: Tensor | None = None,
        ip_tokens: Tensor | None = None,
        **other: Any,
    ) -> Tensor:
        if concat is not None or ip_tokens is not None or other:
            extra = sorted(other) or ["concat" if concat is not None else "ip_tokens"]
            raise GenerationError(f"the Chroma transformer takes no {', '.join(extra)}")
        mask = None if text_mask is None else text_mask.to(x.device)
        return self.net(x.to(self.dtype), t, crossattn.to(self.dtype), mask).float()


def chroma_refusals(r: GenerationRequest) -> list[str]:
    """The settings of ``r`` a Chroma model cannot run, one line each (Flux's, plus Chroma's own)."""
    reasons = [why.replace("for Flux", "for Chroma") for why in refusals(r)]
    if getattr(r, "distilled_cfg_scale", None) is not None:
        reasons.append(
            "distilled_cfg_scale (--guidance) applies to FLUX.1 [dev]; Chroma takes no guidance input (use cfg_scale)"
        )
    if getattr(r, "controlnets", None):
        reasons.append("ControlNets are not supported for Chroma")
    if getattr(r, "ip_adapters", None):
        reasons.append("IP-Adapters are not supported for Chroma (XLabs' flux-ip-adapter is made for FLUX.1)")
    return reasons


class ChromaPipeline(FluxPipeline):
    """Chroma1 (Base / HD). Build it with :func:`sdengine.pipeline.load_pipeline` on a Chroma diffusers folder or a
    Chroma single file (with ``--vae`` and ``--t5``)."""

    def __init__(
        self,
        *,
        transformer: torch.nn.Module,
        text_encoder: torch.nn.Module,
        tokenizer: Any,
        max_sequence_length: int = 512,
        **kwargs: Any,
    ) -> None:
        self.transformer: Any = transformer.eval().requires_grad_(False)
        self.text_encoder_2 = text_encoder.eval().requires_grad_(False)
        self.tokenizer_2 = tokenizer
        cfg: Any = self.transformer.config
        conditioner = ChromaConditioner(
            self.text_encoder_2,
            tokenizer,
            joint_attention_dim=int(cfg.joint_attention_dim),
            max_sequence_length=max_sequence_length,
            dtype=kwargs["dtype"],
            device=kwargs["device"],
            name=kwargs.get("name", "model"),
        )
        self._chroma_schedule: Any = None
        Pipeline.__init__(  # Flux's text side (CLIP-L + T5) is not Chroma's: the core's own constructor
            self,
            unet=transformer,
            text_encoder=self.text_encoder_2,
            tokenizer=tokenizer,
            conditioner=conditioner,  # type: ignore[arg-type]
            prediction_type="flow",
            pad_token_id=int(getattr(tokenizer, "pad_token_id", 0)),
            **kwargs,
        )
        vae_channels = int(self.vae.config.latent_channels)
        if vae_channels != int(cfg.latent_channels):
            raise GenerationError(
                f"{self.name}: the VAE's latents have {vae_channels} channels but the Chroma transformer takes "
                f"{cfg.latent_channels}: not this model's VAE (Chroma's is Flux.1's ae.safetensors, 16 channels)"
            )

    def network_adapter(self, net: Any) -> ChromaAdapter:  # type: ignore[override]
        return ChromaAdapter(net, self.dtype)

    def controlled_network(self, net: Any, units: list[Any], **kw: Any) -> Any:
        raise GenerationError(f"ControlNets are not supported for Chroma; {self.name} is a Chroma model")

    @property
    def guidance_distilled(self) -> bool:
        return False

    @property
    def variant(self) -> str:
        return "chroma"

    @property
    def family_defaults(self) -> dict[str, Any]:
        """diffusers' ChromaPipeline defaults: 35 steps, guidance scale 5 (real CFG), Euler on its grid."""
        return {"steps": CHROMA_STEPS, "cfg_scale": CHROMA_CFG, "sampler": "euler", "schedule": "normal"}

    def distilled_guidance(self, r: GenerationRequest) -> float | None:
        if getattr(r, "distilled_cfg_scale", None) is not None:
            raise GenerationError(
                f"distilled_cfg_scale (--guidance) applies to FLUX.1 [dev]; {self.name} is a Chroma model (no "
                "guidance input): use cfg_scale"
            )
        return None

    def check_request(self, r: GenerationRequest) -> None:
        reasons = chroma_refusals(r)
        if reasons:
            raise GenerationError(f"{reasons[0]}; {self.name} is a Chroma model")

    def conditioning_pair(
        self, prompt: str, negative: str, p: Prepared, note: Any
    ) -> tuple[Conditioning, Conditioning]:
        """(cond, uncond); at ``cfg_scale`` 1 the negative is not encoded (one pass per step)."""
        from sdengine.diffusion import sampling

        conditioner: ChromaConditioner = self.conditioner  # type: ignore[assignment]
        if float(p.request.cfg_scale) == 1.0 and p.sampler not in sampling.CFG_PP_SAMPLERS:
            cond = conditioner.text(prompt, note=note)
            return cond, cond
        return conditioner.pair(prompt, negative, note=note)

    @property
    def noise_schedule(self) -> Any:
        """The schedule of the call under way (its size's shift), else the model's own."""
        return self._chroma_schedule if self._chroma_schedule is not None else self.base_schedule

    def sample_latents(self, p: Prepared, init_latent: Tensor | None = None) -> Tensor:
        """The core's sampling under the schedule of the call's size."""
        self._chroma_schedule = self.flow_schedule(p.width, p.height)
        try:
            return Pipeline.sample_latents(self, p, init_latent)
        finally:
            self._chroma_schedule = None

    def infotext_fields(self, request: GenerationRequest) -> dict[str, Any]:
        return {}

    def network_activation_bytes(self, rows: int, h: int, w: int, bytes_per: int) -> int:
        from sdengine.nn.attention import CHUNK_SCORES

        cfg = self.transformer.config
        n = (h // 2) * (w // 2) + int(self.conditioner.max_sequence_length)  # type: ignore[attr-defined]
        width = int(cfg.num_attention_heads) * int(cfg.attention_head_dim)
        scores = min(CHUNK_SCORES, int(cfg.num_attention_heads) * n * n) * 4
        return rows * (n * width * bytes_per * 12 + scores)


__all__ = ["CHROMA_CFG", "CHROMA_STEPS", "ChromaAdapter", "ChromaPipeline", "chroma_refusals"]
