"""Qwen-Image behind sdengine's pipeline: a 20 B MMDiT (:mod:`sdengine.models.qwen_image`), Qwen2.5-VL's text
states, a Wan-style VAE run on single frames.

Everything after the conditioning dict is :class:`sdengine.pipeline.core.Pipeline`'s (seeds, the sampling loop,
img2img, the VAE decode, infotext), through the hooks Flux uses (:class:`sdengine.pipeline.flux.FluxPipeline`, whose
flow schedule this reuses). What Qwen-Image changes:

* the conditioning (:class:`QwenConditioner`): ``crossattn``, the text encoder's last hidden states of the prompt
  in Qwen-Image's chat template with the template's first tokens dropped (diffusers' ``QwenImagePipeline``
  ``_get_qwen_prompt_embeds``), at most ``max_sequence_length`` (512, diffusers' default) of them, zero-padded to
  that length; ``text_mask``, the real tokens. The transformer attends to the real tokens only, so the padding
  changes nothing but lets every prompt (and negative prompt) of a call batch together;
* true CFG with Qwen-Image's norm-preserving combination (:class:`QwenTrueCFG`): ``v = v_u + s (v_c - v_u)``, then
  every 2x2 patch's 64 numbers rescaled to the norm the conditional prediction has there (diffusers'
  ``QwenImagePipeline``; done on the velocity, before the flow's ``x0 = x - s v``);
* the schedule: ``linspace(1, 1/n, n)`` shifted by the scheduler config's dynamic ``mu`` (diffusers'
  ``calculate_shift`` of the image token count, Qwen-Image's 0.5 at 256 tokens to 0.9 at 8192) and stretched to
  its ``shift_terminal`` (0.02), the Euler sampler (FlowMatchEulerDiscreteScheduler);
* the VAE (:class:`sdengine.models.qwen_vae.QwenImageVAE`): one frame of the 3-D VAE, latents normalised by the
  config's per-channel ``latents_mean`` / ``latents_std``.

Defaults (:attr:`QwenImagePipeline.family_defaults`): 50 steps, ``cfg_scale`` 4 (diffusers' ``true_cfg_scale``
with the negative prompt, empty by default: diffusers runs CFG when a negative prompt is given, "" included),
``euler`` on the ``normal`` grid. What does not apply is refused in one line before any model runs (IP-Adapters,
textual inversion, PAG, SAG, FreeU, ..., the distilled guidance, CFG++ samplers, prompt editing;
:func:`qwen_refusals`); a U-Net, SD3 or Flux ControlNet in one line when the units are built, before the first step.

ControlNets (``controlnets=[ControlUnit(path, image, weight, start, end)]``, ``--control``, a server job's
``controlnets``): InstantX's Qwen-Image ControlNets (Union, Inpainting) through
:mod:`sdengine.pipeline.dit_control` (:meth:`QwenImagePipeline.controlled_network`), as diffusers'
``QwenImageControlNetPipeline``.

LoRAs (``loras=``, ``<lora:NAME:W>`` tags, ``--lora``, a server job's ``loras``) apply through the core's path as
Flux's do: :mod:`sdengine.weights.lora_dit_keys` reads diffusers' / PEFT names (``transformer.``), ComfyUI's /
ai-toolkit's (``diffusion_model.``), kohya-style ones (``lora_unet_``, musubi-tuner) and ComfyUI's ``lycoris_`` onto
the transformer's modules. They adapt the transformer only, as diffusers' ``load_lora_weights``: a file with
text-encoder layers, or with Flux.1 / SD3 layers, is refused in one line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from sdengine import vae_utils
from sdengine.diffusion import sampling
from sdengine.diffusion.guidance import CFGDenoiser
from sdengine.errors import GenerationError
from sdengine.models.flux import pack_latents, unpack_latents
from sdengine.pipeline.core import Pipeline, Prepared
from sdengine.pipeline.flux import FluxPipeline, refusals
from sdengine.pipeline.request import GenerationRequest
from sdengine.text.conditioners import Conditioning, PerTextConditioner

QWEN_STEPS = 50  # diffusers' QwenImagePipeline num_inference_steps default
QWEN_CFG = 4.0  # and its true_cfg_scale default
MAX_SEQUENCE_LENGTH = 512  # diffusers' max_sequence_length default (its limit is 1024)
MASK_KEY = "text_mask"
PATCH = 2

Note = Callable[[str], None]
# texts -> (states (B, L, D), mask (B, L)): the text encoder's last hidden states after the template's tokens
TextEncode = Callable[[list[str]], tuple[Tensor, Tensor]]


def _ignore(_: str) -> None:
    return None


# ----------------------------------------------------------------------------------------------------------
# The text side


class QwenConditioner(PerTextConditioner):
    """Qwen-Image's text side over ``encode`` (texts -> the template-stripped states and their mask, as diffusers'
    ``_get_qwen_prompt_embeds``); see the module docstring."""

    kind = "qwen_image"
    family = "Qwen-Image"  # how a note names the model
    no_clip_name = "Qwen-Image (no CLIP)"
    encoder_name = "Qwen2.5-VL"

    def __init__(
        self,
        encode: TextEncode,
        *,
        joint_attention_dim: int,
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
        dtype: torch.dtype,
        device: torch.device,
        name: str = "model",
        module: torch.nn.Module | None = None,
    ) -> None:
        if not 1 <= int(max_sequence_length) <= 1024:
            raise GenerationError(f"max_sequence_length must be 1 to 1024, got {max_sequence_length}")
        self.encode_texts = encode
        self.joint_attention_dim = int(joint_attention_dim)
        self.max_sequence_length = int(max_sequence_length)
        self.dtype = dtype
        self.device = device
        self.name = name
        self.tokenizer = None
        self.pad_token_id = 0
        self.module = module  # the text encoder: its outputs are remembered per text while its weights stay

    def text(self, prompt: str, *, what: str = "prompt", note: Note = _ignore) -> Conditioning:
        """``{"crossattn": (1, max_sequence_length, D), "text_mask": (1, max_sequence_length)}`` of one text.
        ``<lora:...>`` tags are taken out first (replaced by nothing, as A1111 does; the spaces a tag at the start or
        end leaves are dropped too, since Qwen2's tokenizer reads spaces: "a cat <lora:x:1>" reads as "a cat")."""
        from sdengine.prompts import extract_lora_tags

        plain, tags = extract_lora_tags(prompt)
        prompt = plain.strip() if tags else prompt
        if self.module is not None:  # the text's states remembered while the encoder's weights are the same
            from sdengine.text.encode_cache import cached_call

            states, mask = cached_call(self.module, ("qwen_image", prompt), lambda: self.encode_texts([prompt]))
        else:
            states, mask = self.encode_texts([prompt])
        if states.ndim != 3 or states.shape[2] != self.joint_attention_dim:
            raise GenerationError(
                f"{self.name}: the text encoder's states are {tuple(states.shape)}, the transformer takes "
                f"{self.joint_attention_dim} wide ones (joint_attention_dim): not this model's text encoder"
            )
        n = int(mask[0].bool().sum())
        if n > self.max_sequence_length:
            note(f"{self.family} reads the first {self.max_sequence_length} tokens of the {what}; the rest is cut off")
            n = self.max_sequence_length
        out = states.new_zeros(1, self.max_sequence_length, states.shape[2])
        out[0, :n] = states[0, mask[0].bool()][:n]
        keep = torch.zeros(1, self.max_sequence_length, dtype=torch.bool)
        keep[0, :n] = True
        return {"crossattn": out.to(self.dtype), MASK_KEY: keep.to(states.device)}


# ----------------------------------------------------------------------------------------------------------
# The network and its guidance


class QwenAdapter:
    """The conditioning dict -> the transformer's arguments (``crossattn`` -> ``encoder_hidden_states``,
    ``text_mask`` -> ``encoder_hidden_states_mask``); runs in ``dtype``, the velocity back in float32."""

    family = "Qwen-Image"

    def __init__(self, net: Any, dtype: torch.dtype) -> None:
        self.net = net
        self.dtype = dtype
        # ControlNets attached (sdengine.pipeline.dit_control.ControlledQwen): the step and the rows' CFG kinds
        self.takes_step = self.takes_row_kinds = bool(getattr(net, "takes_step", False))

    def __call__(
        self,
        x: Tensor,
        t: Tensor,
        *,
        crossattn: Tensor,
        text_mask: Tensor | None = None,
        step: Any = None,
        row_kinds: Any = None,
        **other: Any,
    ) -> Tensor:
        extra = sorted(k for k, v in other.items() if v is not None)
        if extra:
            raise GenerationError(f"the {self.family} transformer takes no {', '.join(extra)}")
        mask = None if text_mask is None else text_mask.to(x.device)
        control = {"step": step, "row_kinds": row_kinds} if self.takes_step else {}
        text = crossattn.to(device=x.device, dtype=self.dtype)
        return self.velocity(x.to(self.dtype), t, text, mask, control)

    def velocity(self, x: Tensor, t: Tensor, text: Tensor, mask: Tensor | None, control: dict[str, Any]) -> Tensor:
        """The network's velocity in float32 (Qwen-Image's network takes the flow's timestep and gives it as is)."""
        return self.net(x, t, text, mask, **control).float()


def norm_preserving_cfg(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Qwen-Image's true CFG on velocities (B, C, H, W): ``u + s (c - u)``, each 2x2 patch's 4C numbers rescaled to
    the norm ``c`` has there (diffusers' ``QwenImagePipeline``: norms over the packed tokens' last dimension)."""
    H, W = cond.shape[2], cond.shape[3]
    c, u = pack_latents(cond), pack_latents(uncond)
    comb = u + scale * (c - u)
    out = comb * (torch.norm(c, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
    return unpack_latents(out, H, W)


class QwenTrueCFG:
    """A velocity model ``(x, t, **cond) -> v`` running the conditional and unconditional rows in one batch and
    combining them with :func:`norm_preserving_cfg` (``scale`` 1: the conditional rows alone)."""

    def __init__(self, model: Any, scale: float, uncond: Conditioning) -> None:
        self.model = model
        self.scale = float(scale)
        self.uncond = dict(uncond)
        self.takes_step = bool(getattr(model, "takes_step", False))
        self.takes_row_kinds = bool(getattr(model, "takes_row_kinds", False))

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        if self.scale == 1.0:
            return self.model(x, t, **cond)
        b = x.shape[0]
        both: dict[str, Any] = {}
        if self.takes_row_kinds:  # the conditional rows, then the unconditional ones
            cond = {**cond, "row_kinds": ("cond",) * b + ("uncond",) * b}
        for k, v in cond.items():
            if isinstance(v, Tensor) and k in self.uncond:
                u = self.uncond[k].to(v.device)
                both[k] = torch.cat([v, u.expand(b, *u.shape[1:]) if u.shape[0] == 1 else u])
            else:
                both[k] = v
        v_c, v_u = self.model(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)
        return norm_preserving_cfg(v_c, v_u, self.scale)


# ----------------------------------------------------------------------------------------------------------
# Refusals


_OWN_REFUSALS: tuple[tuple[str, Any, str], ...] = (
    ("ip_adapters", bool, "IP-Adapters are not supported for Qwen-Image"),
    ("reference_images", bool, "reference images are FLUX.1 Kontext's; Qwen-Image takes none"),
    (
        "distilled_cfg_scale",
        lambda v: v is not None,
        "distilled_cfg_scale (--guidance) is FLUX.1 [dev]'s; use cfg_scale",
    ),
    ("guidance_rescale", bool, "guidance_rescale does not apply to Qwen-Image's norm-preserving CFG"),
)


def qwen_refusals(r: GenerationRequest) -> list[str]:
    """The settings of ``r`` a Qwen-Image model cannot run, one line each (Flux's, plus Qwen-Image's own)."""
    reasons = [why.replace("for Flux", "for Qwen-Image").replace("Flux", "Qwen-Image") for why in refusals(r)]
    reasons += [f"{field}: {why}" for field, is_set, why in _OWN_REFUSALS if is_set(getattr(r, field, None))]
    return list(dict.fromkeys(reasons))


# ----------------------------------------------------------------------------------------------------------
# The pipeline


class QwenTextFlowPipeline(FluxPipeline):
    """What the flow pipelines conditioned on a Qwen text encoder with true CFG share (Qwen-Image, Z-Image): the
    conditioner over ``text_encode`` (:class:`QwenConditioner` or a subclass), the VAE's latent width checked against
    the transformer's, the family's one-line refusals, no CFG++ sampler, the negative prompt encoded only when CFG
    runs, a per-call flow schedule, and CFG on the velocity by :meth:`cfg_model` under the core's pass-through CFG.
    A subclass names its family, conditioner and config fields, and gives :meth:`family_refusals` and
    :meth:`cfg_model`."""

    family_label = "Qwen-Image"
    conditioner_class: type[QwenConditioner] = QwenConditioner
    text_width_field = "joint_attention_dim"  # the transformer config's field of the text states' width
    latent_field = "latent_channels"  # ... and of its latent channels
    vae_hint = ""  # what the VAE refusal adds
    cfg_pp_why = ""  # why no CFG++ sampler, if more than "not supported"

    def __init__(
        self,
        *,
        transformer: torch.nn.Module,
        text_encode: TextEncode,
        text_encoder: Any = None,
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
        **kwargs: Any,
    ) -> None:
        self.transformer: Any = transformer.eval().requires_grad_(False)
        cfg: Any = self.transformer.config
        conditioner = self.conditioner_class(
            text_encode,
            joint_attention_dim=int(getattr(cfg, self.text_width_field)),
            max_sequence_length=max_sequence_length,
            dtype=kwargs["dtype"],
            device=kwargs["device"],
            name=kwargs.get("name", "model"),
            module=text_encoder if isinstance(text_encoder, torch.nn.Module) else None,
        )
        self._call_schedule = None
        self.text_encoder_2 = text_encoder
        Pipeline.__init__(
            self,
            unet=transformer,
            text_encoder=text_encoder,
            tokenizer=None,
            conditioner=conditioner,  # type: ignore[arg-type]
            prediction_type="flow",
            pad_token_id=0,
            **kwargs,
        )
        vae_channels, takes = int(self.vae.config.latent_channels), int(getattr(cfg, self.latent_field))
        if vae_channels != takes:
            raise GenerationError(
                f"{self.name}: the VAE's latents have {vae_channels} channels but the {self.family_label} transformer "
                f"takes {takes}: not this model's VAE{self.vae_hint}"
            )

    def family_refusals(self, r: GenerationRequest) -> list[str]:
        raise NotImplementedError

    def cfg_model(self, net: Any, cfg_scale: float, uncond: Conditioning) -> Any:
        """The network with the family's CFG on its velocity."""
        raise NotImplementedError

    def guided_denoiser(self, cfg_scale: float, uncond: Conditioning, rescale: float, **kw: Any) -> Any:
        """The family's CFG on the velocity (:meth:`cfg_model`), the flow's x0 after it; the core's CFG wrapper on
        top runs at scale 1 (it only passes the calls on)."""
        label = self.family_label
        if kw.get("texts") is not None:
            raise GenerationError(f"prompt editing ([a:b:when], [a|b]) is not supported for {label}; {self.name}")
        unsupported = sorted(k for k, v in kw.items() if k not in ("net", "texts") and v)
        if unsupported or rescale:
            raise GenerationError(
                f"{', '.join(unsupported) or 'guidance_rescale'} is not supported for {label}; {self.name}"
            )
        model = self.cfg_model(self.network_adapter(kw.get("net") or self.unet), cfg_scale, uncond)
        return CFGDenoiser(self.x0_denoiser(model), 1.0, {})

    def graphed(self, name: str) -> Any:
        return None  # no step graphs or compiled packages for these transformers yet

    @property
    def kind(self) -> str:
        return "plain"

    @property
    def guidance_distilled(self) -> bool:
        return False

    def distilled_guidance(self, r: GenerationRequest) -> float | None:
        if getattr(r, "distilled_cfg_scale", None) is not None:
            raise GenerationError(
                f"distilled_cfg_scale (--guidance) is FLUX.1 [dev]'s; {self.name} is a {self.family_label} model: "
                "use cfg_scale"
            )
        return None

    def check_request(self, r: GenerationRequest) -> None:
        reasons = self.family_refusals(r)
        if reasons:
            raise GenerationError(f"{reasons[0]}; {self.name} is a {self.family_label} model")

    def prepare(self, request: GenerationRequest) -> Prepared:
        p = super().prepare(request)
        if p.sampler in sampling.CFG_PP_SAMPLERS:
            why = f" ({self.cfg_pp_why})" if self.cfg_pp_why else ""
            raise GenerationError(f"sampler {p.sampler}: CFG++ samplers are not supported for {self.family_label}{why}")
        return p

    def conditioning_pair(
        self, prompt: str, negative: str, p: Prepared, note: Any
    ) -> tuple[Conditioning, Conditioning]:
        """(cond, uncond); at ``cfg_scale`` 1 the negative is not encoded (one pass per step)."""
        conditioner: QwenConditioner = self.conditioner  # type: ignore[assignment]
        if float(p.request.cfg_scale) == 1.0:
            cond = conditioner.text(prompt, note=note)
            return cond, cond
        return conditioner.pair(prompt, negative, note=note)

    def start_latent_options(self, p: Prepared) -> dict[str, Any]:
        return {}

    def sample_latents(self, p: Prepared, init_latent: Tensor | None = None) -> Tensor:
        self._call_schedule = self.flow_schedule(p.width, p.height)
        try:
            return Pipeline.sample_latents(self, p, init_latent)
        finally:
            self._call_schedule = None


class QwenImagePipeline(QwenTextFlowPipeline):
    """Qwen-Image. Build it with :func:`sdengine.pipeline.load_pipeline` on a diffusers ``QwenImagePipeline``
    folder (:mod:`sdengine.pipeline.qwen_image_loading`)."""

    cfg_pp_why = "its CFG is norm-preserving"

    def family_refusals(self, r: GenerationRequest) -> list[str]:
        return qwen_refusals(r)

    def cfg_model(self, net: Any, cfg_scale: float, uncond: Conditioning) -> Any:
        return QwenTrueCFG(net, cfg_scale, uncond)

    def network_adapter(self, net: Any) -> QwenAdapter:  # type: ignore[override]
        return QwenAdapter(net, self.dtype)

    def controlled_network(self, net: Any, units: list[Any], **kw: Any) -> Any:
        """Qwen-Image ControlNets on the transformer (:func:`sdengine.pipeline.dit_control.build_controlled_dit`)."""
        from sdengine.pipeline.dit_control import build_controlled_dit, qwen_vae_encoder

        return build_controlled_dit(net, units, family="qwen_image", **qwen_vae_encoder(self.vae), **kw)

    def set_tiny_vae(self, tiny: Any) -> None:
        """No tiny VAE decodes Qwen-Image's latents (TAESD's are for SD, SDXL, SD3 and Flux.1, whose 16-channel ones
        have the same shapes but not the same latent space): one given is refused."""
        if tiny is not None:
            raise GenerationError(
                f"a tiny VAE for previews or vae_decode='tiny' is not supported for Qwen-Image ({self.name}): no TAESD "
                "decodes its latents"
            )
        super().set_tiny_vae(None)

    def set_vae(self, vae: Any, *, checkpoint_vae: bool = False) -> None:
        """Another VAE is given at load (``load_pipeline(..., vae=)``, ``--vae``); an SD VAE here is refused."""
        if vae is not None:
            raise GenerationError(
                f"{self.name}: give another Qwen-Image VAE when loading the model (vae= / --vae), not per call"
            )

    @property
    def latent_rgb_map(self) -> vae_utils.LatentRGBMap:
        """Qwen-Image's latent -> RGB preview map (ComfyUI's Wan21 factors, on the standardised latent the
        transformer sees, as ComfyUI's Wan21 process_in makes it; docs/tiny-vae.md). The Edit pipelines keep it."""
        return vae_utils.QWEN_IMAGE_LATENT_RGB

    @property
    def variant(self) -> str:
        return "qwen_image"

    @property
    def family_defaults(self) -> dict[str, Any]:
        """diffusers' QwenImagePipeline defaults: 50 steps, true CFG 4 (with the negative prompt), Euler."""
        return {"steps": QWEN_STEPS, "cfg_scale": QWEN_CFG, "sampler": "euler", "schedule": "normal"}

    def infotext_fields(self, request: GenerationRequest) -> dict[str, Any]:
        return {}

    def network_activation_bytes(self, rows: int, h: int, w: int, bytes_per: int) -> int:
        from sdengine.nn.attention import CHUNK_SCORES

        cfg = self.transformer.config
        n = (h // PATCH) * (w // PATCH) + int(self.conditioner.max_sequence_length)  # type: ignore[attr-defined]
        width = int(cfg.num_attention_heads) * int(cfg.attention_head_dim)
        scores = min(CHUNK_SCORES, int(cfg.num_attention_heads) * n * n) * 4
        return 2 * rows * (n * width * bytes_per * 12 + scores)  # the conditional and unconditional rows


__all__ = [
    "MASK_KEY",
    "MAX_SEQUENCE_LENGTH",
    "QWEN_CFG",
    "QWEN_STEPS",
    "QwenAdapter",
    "QwenConditioner",
    "QwenImagePipeline",
    "QwenTextFlowPipeline",
    "QwenTrueCFG",
    "norm_preserving_cfg",
    "qwen_refusals",
]
