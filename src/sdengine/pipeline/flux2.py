"""FLUX.2 [klein] behind sdengine's pipeline: the FLUX.2 transformer (:mod:`sdengine.models.flux2`), Qwen3's text
states, the 32-channel FLUX.2 VAE (:mod:`sdengine.models.flux2_vae`).

Everything after the conditioning dict is :class:`sdengine.pipeline.core.Pipeline`'s (seeds, the sampling loop, the
VAE decode, infotext), through the hooks Flux uses (:class:`sdengine.pipeline.flux.FluxPipeline`). What FLUX.2
[klein] changes, each as diffusers' ``Flux2KleinPipeline`` does it:

* the latent: the diffusion model works on the VAE latent in 2x2 patches, normalised by the VAE's batch-norm
  statistics, (B, 128, H/16, W/16) (:meth:`sdengine.models.flux2_vae.Flux2VAE.scale_latents`); the starting noise
  is drawn in that shape (row i from ``torch.Generator("cpu").manual_seed(seed + i)``, the seed contract), so
  batch 1 equals diffusers with ``generator=torch.Generator("cpu").manual_seed(seed)``. Sizes are multiples of 16;
* the conditioning (:class:`Flux2Conditioner`): ``crossattn``, Qwen3's hidden states of layers 9, 18 and 27 side by
  side per token (:mod:`sdengine.text.flux2_prompt`), padded to ``max_sequence_length`` (512) tokens; every token
  (padding included) is attended to, as diffusers' pipeline does (no text mask);
* the schedule: ``linspace(1, 1/n, n)`` shifted by ``mu`` from diffusers' ``compute_empirical_mu`` (a fit in the
  image token count and the step count, :func:`empirical_mu`), then the Euler sampler
  (FlowMatchEulerDiscreteScheduler);
* guidance: plain CFG, ``v_u + s (v_c - v_u)``, for the base (undistilled) models when ``cfg_scale`` > 1 (diffusers'
  ``guidance_scale``, default 4; the negative prompt's states, empty by default, are the unconditional rows:
  diffusers' ``negative_prompt_embeds``). The step-distilled models (``is_distilled`` in ``model_index.json``) run
  without CFG (cfg_scale 1, 4 steps); a cfg_scale above 1 on them is refused in one line (diffusers ignores it
  with a warning). No distilled-guidance input is used (diffusers' klein pipeline passes none).

Defaults (:attr:`Flux2Pipeline.family_defaults`): distilled 4 steps at cfg 1, base 50 steps at cfg 4, ``euler`` on
the ``normal`` grid, 1024x1024. What does not apply is refused in one line before any model runs
(:func:`flux2_refusals`): the hires fix, ControlNets, IP-Adapters, FLUX.1 Kontext's reference images, the
distilled guidance, prompt editing and Flux's other refusals.

LoRAs (``loras=``, ``<lora:NAME:W>`` tags, ``--lora``) apply to the transformer through the core's path as Flux's
and Z-Image's do: :mod:`sdengine.weights.lora_dit_keys` reads diffusers' / PEFT names (``transformer.``), BFL's
(ai-toolkit's and ComfyUI's ``diffusion_model.``, kohya's ``lora_unet_``; the fused ``qkv`` split by rows, the final
modulation's halves swapped); a file with text-encoder layers, or another family's, is refused in one line.

FLUX.2 [dev] (diffusers' ``Flux2Pipeline``; ``dev=True``, :mod:`sdengine.pipeline.flux2_loading` tells it from the
folder's ``model_index.json``) is the same pipeline with three changes: the text is Mistral Small 3's (layers 10, 20,
30 in BFL's system prompt, :data:`sdengine.text.flux2_prompt.DEV_PROMPT_TEMPLATE`); the transformer's guidance
embedding takes the distilled guidance scale (``distilled_cfg_scale``, ``--guidance``; diffusers' ``guidance_scale``,
default 4: :data:`DEV_GUIDANCE`) with every step, as a ``guidance`` entry of the conditioning; there is no CFG
(``cfg_scale`` other than 1 is refused in one line, as for a step-distilled klein). 50 steps by default.

img2img and inpainting (``init_image``, ``mask``, ``strength``) are diffusers' ``Flux2KleinInpaintPipeline``'s
(:mod:`sdengine.pipeline.flux2_inpaint`: the size, the init latent, the mask's latent, the init image as a reference),
for [dev] too (with its guidance input at every step; diffusers has no [dev] pipeline for them).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from sdengine.diffusion import sampling
from sdengine.diffusion.flow import FLUX_TABLE_LENGTH, FlowSchedule
from sdengine.errors import GenerationError, UsageError
from sdengine.pipeline import flux2_inpaint, flux2_references
from sdengine.pipeline.core import Pipeline, Prepared
from sdengine.pipeline.flux import FluxPipeline, refusals, token_refusal
from sdengine.pipeline.request import GenerationRequest
from sdengine.text.conditioners import Conditioning, PerTextConditioner

DISTILLED_STEPS = 4  # FLUX.2 [klein]'s step-distilled models (BFL's and diffusers' examples)
BASE_STEPS = 50  # diffusers' Flux2KleinPipeline num_inference_steps default
BASE_CFG = 4.0  # and its guidance_scale default
MAX_SEQUENCE_LENGTH = 512  # diffusers' max_sequence_length default
DEFAULT_LATENT_SIDE = 128  # diffusers' default_sample_size: 128 VAE latents (1024 pixels)
DEV_GUIDANCE = 4.0  # diffusers' Flux2Pipeline guidance_scale default (FLUX.2 [dev]'s embedded guidance)
DEV_STEPS = 50  # and its num_inference_steps default
MAX_DEV_GUIDANCE = 100.0

Note = Callable[[str], None]
# texts -> Qwen3's stacked states (B, L, 3 x hidden), already padded to the call's length
TextEncode = Callable[[list[str]], Tensor]


def _ignore(_: str) -> None:
    return None


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """diffusers' ``compute_empirical_mu`` (FLUX.2's schedule shift): linear in the token count, fitted at 10 and 200
    steps and interpolated in the step count between them; above 4300 tokens the 200-step line alone."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    return float(a * num_steps + b)


# ----------------------------------------------------------------------------------------------------------
# The text side


class Flux2Conditioner(PerTextConditioner):
    """FLUX.2 [klein]'s text side over ``encode`` (texts -> Qwen3's stacked states, :mod:`sdengine.text.flux2_prompt`);
    see the module docstring."""

    kind = "flux2"
    no_clip_name = "FLUX.2 (no CLIP)"
    encoder_name = "Qwen3"  # "Mistral Small 3" for FLUX.2 [dev] (set by the pipeline)

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
        count_tokens: Callable[[str], int] | None = None,
    ) -> None:
        if not 1 <= int(max_sequence_length) <= 4096:
            raise GenerationError(f"max_sequence_length must be 1 to 4096, got {max_sequence_length}")
        self.encode_texts = encode
        self.joint_attention_dim = int(joint_attention_dim)
        self.max_sequence_length = int(max_sequence_length)
        self.dtype = dtype
        self.device = device
        self.name = name
        self.tokenizer = None
        self.pad_token_id = 0
        self.module = module  # the text encoder: its outputs are remembered per text while its weights stay
        self.count_tokens = count_tokens  # a text's tokens in the chat template (None: not told)

    def text(self, prompt: str, *, what: str = "prompt", note: Note = _ignore) -> Conditioning:
        """``{"crossattn": (1, max_sequence_length, D)}`` of one text. ``<lora:...>`` tags are taken out first
        (replaced by nothing, as A1111 does; the spaces a tag at the start or end leaves are dropped too, as
        Qwen-Image's conditioner does: Qwen2's tokenizer reads spaces). A text longer than ``max_sequence_length``
        tokens in its template is cut there (diffusers' truncation), with a note."""
        from sdengine.prompts import extract_lora_tags

        plain, tags = extract_lora_tags(prompt)
        prompt = plain.strip() if tags else prompt
        if self.count_tokens is not None and self.count_tokens(prompt) > self.max_sequence_length:
            note(
                f"FLUX.2 reads the first {self.max_sequence_length} tokens of the {what} in its chat template; the "
                "rest is cut off"
            )
        if self.module is not None:
            from sdengine.text.encode_cache import cached_call

            states = cached_call(self.module, ("flux2", prompt), lambda: self.encode_texts([prompt]))
        else:
            states = self.encode_texts([prompt])
        if states.ndim != 3 or states.shape[0] != 1 or states.shape[2] != self.joint_attention_dim:
            raise GenerationError(
                f"{self.name}: the text encoder's states are {tuple(states.shape)}, the transformer takes "
                f"{self.joint_attention_dim} wide ones (joint_attention_dim): not this model's text encoder"
            )
        if states.shape[1] != self.max_sequence_length:
            raise GenerationError(
                f"{self.name}: the text encoder gave {states.shape[1]} tokens, expected {self.max_sequence_length} "
                "(max_sequence_length)"
            )
        return {"crossattn": states.to(self.dtype)}


# ----------------------------------------------------------------------------------------------------------
# The network


class Flux2Adapter:
    """The conditioning dict -> the transformer's arguments (``crossattn`` -> ``encoder_hidden_states``); runs in
    ``dtype``, the velocity back in float32. ``references``: reference latents for every row (None: none)."""

    def __init__(self, net: Any, dtype: torch.dtype, references: list[Tensor] | None = None) -> None:
        self.net = net
        self.dtype = dtype
        self.references = references

    def __call__(
        self, x: Tensor, t: Tensor, *, crossattn: Tensor, guidance: Tensor | None = None, **other: Any
    ) -> Tensor:
        extra = sorted(k for k, v in other.items() if v is not None)
        if extra:
            raise GenerationError(f"the FLUX.2 transformer takes no {', '.join(extra)}")
        kw: dict[str, Any] = {"reference_latents": self.references} if self.references else {}
        if guidance is not None:  # FLUX.2 [dev]'s distilled guidance scale, one per row
            kw["guidance"] = guidance.to(device=x.device, dtype=torch.float32)
        return self.net(x.to(self.dtype), t, crossattn.to(device=x.device, dtype=self.dtype), **kw).float()


# ----------------------------------------------------------------------------------------------------------
# Refusals

_OWN_REFUSALS: tuple[tuple[str, Any, str], ...] = (
    ("enable_hr", bool, "the hires fix is not supported for FLUX.2 yet"),
    ("controlnets", bool, "ControlNets are not supported for FLUX.2"),
    ("ip_adapters", bool, "IP-Adapters are not supported for FLUX.2"),
    ("control_image", lambda v: v is not None, "a control image is FLUX.1 Depth / Canny's; FLUX.2 takes none"),
    (
        "distilled_cfg_scale",
        lambda v: v is not None,
        "distilled_cfg_scale (--guidance) is FLUX.1 [dev]'s; use cfg_scale",
    ),
    ("subseed_strength", bool, "variation seeds are not supported for FLUX.2 yet"),
)


def distilled_cfg_refusal(scale: Any, name: str) -> str | None:
    """The line refusing ``cfg_scale`` ``scale`` on the step-distilled model ``name`` (anything but 1: diffusers
    ignores it with a warning), None for 1 (and for a value the request's own checks refuse)."""
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale) or scale == 1:
        return None
    return f"cfg_scale {scale:g}: {name} is step-distilled (is_distilled) and runs without CFG: leave cfg_scale at 1"


# FLUX.1's refusal lines that say something else for FLUX.2 (the rest only change "Flux" to "FLUX.2")
_WORDING = {
    "Flux ControlNets do not take it": "FLUX.2 takes no ControlNets",
    "Flux [dev] shifts its schedule by the image size, [schnell] not at all": (
        "FLUX.2 shifts its schedule by the image size and the step count"
    ),
    "(it reads CLIP-L's pooled output)": "(its text is Qwen3's, no CLIP)",
}


def _reworded(why: str) -> str:
    for old, new in _WORDING.items():
        why = why.replace(old, new)
    return why.replace("FLUX.1", "\0").replace("Flux", "FLUX.2").replace("\0", "FLUX.1")


def flux2_refusals(r: GenerationRequest, *, dev: bool = False) -> list[str]:
    """The settings of ``r`` a FLUX.2 model cannot run, one line each (Flux's, plus FLUX.2's own). FLUX.1 Kontext's
    reference checks and IP-Adapter windows are not asked: FLUX.2's own lines cover those settings. ``dev``: FLUX.2
    [dev], which takes ``distilled_cfg_scale`` (its guidance) and no CFG."""
    flux = refusals(r.replace(reference_images=None, ip_adapters=None))
    reasons = [_reworded(why) for why in flux]
    own = [entry for entry in _OWN_REFUSALS if not (dev and entry[0] == "distilled_cfg_scale")]
    reasons += [f"{field}: {why}" for field, is_set, why in own if is_set(getattr(r, field, None))]
    if dev:
        why = dev_cfg_refusal(r.cfg_scale)
        reasons += [why] if why else []
    reasons += flux2_inpaint.init_refusals(r)
    return list(dict.fromkeys(reasons))


def dev_cfg_refusal(scale: Any) -> str | None:
    """The line refusing ``cfg_scale`` ``scale`` on FLUX.2 [dev] (anything but 1: it is guidance-distilled and
    diffusers' Flux2Pipeline has no CFG), None for 1 (and for a value the request's own checks refuse)."""
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale) or scale == 1:
        return None
    return (
        f"cfg_scale {scale:g}: FLUX.2 [dev] is guidance-distilled and runs without CFG: leave cfg_scale at 1 and set "
        "its guidance with distilled_cfg_scale (--guidance)"
    )


# ----------------------------------------------------------------------------------------------------------
# The pipeline


class Flux2Pipeline(FluxPipeline):
    """FLUX.2 [klein] and [dev]. Build it with :func:`sdengine.pipeline.load_pipeline` on a diffusers
    ``Flux2KleinPipeline`` or ``Flux2Pipeline`` folder (:mod:`sdengine.pipeline.flux2_loading`). ``distilled``: the
    klein folder's ``is_distilled`` (the step-distilled models, which take no CFG); ``dev``: FLUX.2 [dev] (its
    transformer's guidance embedding takes the distilled guidance; no CFG)."""

    def __init__(
        self,
        *,
        transformer: torch.nn.Module,
        text_encode: TextEncode,
        text_encoder: Any = None,
        distilled: bool = False,
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
        count_tokens: Callable[[str], int] | None = None,
        dev: bool = False,
        **kwargs: Any,
    ) -> None:
        self.transformer: Any = transformer.eval().requires_grad_(False)
        cfg: Any = self.transformer.config
        self.distilled = bool(distilled)
        self.dev = bool(dev)
        if self.dev and not bool(getattr(cfg, "guidance_embeds", False)):
            raise GenerationError(
                f"{kwargs.get('name', 'model')}: a FLUX.2 [dev] pipeline whose transformer has no guidance embedding "
                "(guidance_embeds false): not FLUX.2 [dev]'s transformer"
            )
        conditioner = Flux2Conditioner(
            text_encode,
            joint_attention_dim=int(cfg.joint_attention_dim),
            max_sequence_length=max_sequence_length,
            dtype=kwargs["dtype"],
            device=kwargs["device"],
            name=kwargs.get("name", "model"),
            module=text_encoder if isinstance(text_encoder, torch.nn.Module) else None,
            count_tokens=count_tokens,
        )
        if self.dev:
            conditioner.encoder_name = "Mistral Small 3"
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
        vae_cfg = self.vae.config
        if not hasattr(vae_cfg, "diffusion_channels"):
            raise GenerationError(f"{self.name}: the VAE is not a FLUX.2 VAE (AutoencoderKLFlux2)")
        if int(vae_cfg.diffusion_channels) != int(cfg.in_channels) or int(cfg.out_latent_channels) != int(
            cfg.in_channels
        ):
            raise GenerationError(
                f"{self.name}: the VAE's latents are {vae_cfg.diffusion_channels} numbers per 2x2 patch but the FLUX.2 "
                f"transformer takes {cfg.in_channels} and gives {cfg.out_latent_channels}: not this model's VAE"
            )

    # -- facts about the model ------------------------------------------------------------------------------

    @property
    def latent_channels(self) -> int:
        """The diffusion latent's channels (128: the VAE's 32 in 2x2 patches)."""
        return int(self.vae.config.diffusion_channels)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per diffusion-latent pixel (16: the VAE's 8 x the 2x2 patches)."""
        return int(self.vae.config.diffusion_factor)

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor

    @property
    def default_size(self) -> int:
        """diffusers' default: 128 VAE latents, 1024 pixels."""
        return DEFAULT_LATENT_SIDE * int(self.vae.config.downscale_factor)

    @property
    def kind(self) -> str:
        return "plain"

    @property
    def guidance_distilled(self) -> bool:
        """FLUX.2 [dev]: the transformer takes the distilled guidance scale."""
        return self.dev

    @property
    def variant(self) -> str:
        if self.dev:
            return "dev"
        return "klein_distilled" if self.distilled else "klein_base"

    @property
    def latent_rgb_map(self) -> Any:
        """FLUX.2's latent -> RGB preview map (ComfyUI's Flux2 factors on the VAE's 32 channels, read from the
        normalised 2x2-patch latent; docs/tiny-vae.md)."""
        from sdengine import vae_utils

        return vae_utils.FLUX2_LATENT_RGB

    @property
    def family_defaults(self) -> dict[str, Any]:
        """Distilled: 4 steps, no CFG; base: diffusers' 50 steps at guidance 4; [dev]: 50 steps, no CFG, distilled
        guidance 4; Euler on the normal grid."""
        if self.dev:
            return {
                "steps": DEV_STEPS,
                "cfg_scale": 1.0,
                "distilled_cfg_scale": DEV_GUIDANCE,
                "sampler": "euler",
                "schedule": "normal",
            }
        if self.distilled:
            return {"steps": DISTILLED_STEPS, "cfg_scale": 1.0, "sampler": "euler", "schedule": "normal"}
        return {"steps": BASE_STEPS, "cfg_scale": BASE_CFG, "sampler": "euler", "schedule": "normal"}

    def flow_schedule(self, width: int, height: int, steps: int | None = None) -> FlowSchedule:
        """The schedule of a ``width`` x ``height`` image in ``steps`` steps: the scheduler config's, its dynamic
        shift's ``mu`` from :func:`empirical_mu` of the image's token count ``(H/16)(W/16)`` and the step count
        (the family's default step count where none is given)."""
        f = self.vae_scale_factor
        n = int(steps if steps is not None else self.family_defaults["steps"])
        mu = empirical_mu((height // f) * (width // f), n)
        try:
            schedule = FlowSchedule.from_config(self.scheduler_config, mu=mu)
        except UsageError as e:
            raise GenerationError(f"{self.name}: scheduler config: {e}") from None
        return dataclasses.replace(schedule, spacing="flux", num_train_timesteps=FLUX_TABLE_LENGTH)

    def network_adapter(self, net: Any) -> Flux2Adapter:  # type: ignore[override]
        return Flux2Adapter(net, self.dtype, self._call_references)

    def controlled_network(self, net: Any, units: list[Any], **kw: Any) -> Any:
        raise GenerationError(f"ControlNets are not supported for FLUX.2; {self.name}")

    def set_tiny_vae(self, tiny: Any) -> None:
        """No tiny VAE decodes FLUX.2's latents: one given is refused."""
        if tiny is not None:
            raise GenerationError(
                f"a tiny VAE for previews or vae_decode='tiny' is not supported for FLUX.2 ({self.name}): no TAESD "
                "decodes its latents"
            )
        Pipeline.set_tiny_vae(self, None)

    def set_vae(self, vae: Any, *, checkpoint_vae: bool = False) -> None:
        if vae is not None or checkpoint_vae:
            raise GenerationError(f"{self.name}: another VAE per call is not supported for FLUX.2")

    def graphed(self, name: str) -> Any:
        return None  # no step graphs or compiled packages for the FLUX.2 transformer yet

    def start_latent_options(self, p: Prepared) -> dict[str, Any]:
        return flux2_inpaint.start_options(p)

    def infotext_fields(self, request: GenerationRequest) -> dict[str, Any]:
        """[dev]: Forge's "Distilled CFG Scale" of the call (as FLUX.1 [dev]'s); klein: none."""
        g = self.distilled_guidance(request) if self.dev else None
        return {} if g is None else {"Distilled CFG Scale": g}

    def network_activation_bytes(self, rows: int, h: int, w: int, bytes_per: int) -> int:
        """As Flux's: every block holds the image and text tokens at its width, a 3x SwiGLU MLP and temporaries
        (12 maps), plus attention scores where a kernel materialises them; twice the rows under CFG."""
        from sdengine.nn.attention import CHUNK_SCORES

        cfg = self.transformer.config
        n = h * w + int(self.conditioner.max_sequence_length) + self._reference_tokens  # type: ignore[attr-defined]
        width = int(cfg.num_attention_heads) * int(cfg.attention_head_dim)
        scores = min(CHUNK_SCORES, int(cfg.num_attention_heads) * n * n) * 4
        return (1 if self.distilled or self.dev else 2) * rows * (n * width * bytes_per * 12 + scores)

    # -- a call ---------------------------------------------------------------------------------------------

    def distilled_guidance(self, r: GenerationRequest) -> float | None:
        """[dev]: the request's ``distilled_cfg_scale`` (4 by default); klein: None (a scale given is refused)."""
        value = getattr(r, "distilled_cfg_scale", None)
        if self.dev:
            if value is None:
                return DEV_GUIDANCE
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise GenerationError(f"distilled_cfg_scale must be a number, got {value!r}")
            if not 0.0 <= float(value) <= MAX_DEV_GUIDANCE:
                raise GenerationError(f"distilled_cfg_scale must be in [0, {MAX_DEV_GUIDANCE:g}], got {value}")
            return float(value)
        if value is not None:
            raise GenerationError(
                f"distilled_cfg_scale (--guidance) is FLUX.1 [dev]'s; {self.name} is a FLUX.2 model: use cfg_scale"
            )
        return None

    def check_request(self, r: GenerationRequest) -> None:
        reasons = flux2_refusals(r, dev=self.dev)
        if reasons:
            raise GenerationError(f"{reasons[0]}; {self.name} is a FLUX.2 {'[dev] ' if self.dev else ''}model")
        why = distilled_cfg_refusal(r.cfg_scale, self.name) if self.distilled else None
        if why is not None:
            raise GenerationError(why)
        self.distilled_guidance(r)

    def prepare(self, request: GenerationRequest) -> Prepared:
        """As Flux's, with FLUX.2's reference images (:mod:`sdengine.pipeline.flux2_references`) read, fitted and
        counted here (FLUX.1 Kontext's fitting is not run on them); a call without width / height takes the first
        reference's fitted size, one without one of them the first reference's for it (diffusers' rule)."""
        self.check_request(request)
        notes: list[str] = []
        references = None
        request = flux2_inpaint.prepare_init(request, self.size_multiple, notes)  # the init image's size
        if request.reference_list():
            if not request.reference_auto_resize:
                raise GenerationError(
                    "reference_auto_resize is FLUX.1 Kontext's; FLUX.2 fits references by its own rule (area up to "
                    f"1024x1024, sides floored to multiples of {self.size_multiple}): leave it on"
                )
            request.validate_references()
            references = flux2_references.prepare_references(request, self.size_multiple, notes)
            first = references[0].size
            w, h = request.width or first[0], request.height or first[1]
            request = request.replace(width=w, height=h)
            sizes = [im.size for im in references]
            why = None  # a size that is not a whole number is refused by the core's checks next
            if isinstance(w, int) and isinstance(h, int) and request.init_image is None:
                why = token_refusal(w, h, sizes, self.size_multiple, self.max_side(), self.name)
            if why is not None:
                raise GenerationError(why.replace("reference_auto_resize puts each", "each is fitted to"))
            self._reference_tokens = sum((w // self.size_multiple) * (h // self.size_multiple) for w, h in sizes)
            request = request.replace(reference_images=None)
        if request.init_image is not None:  # its latent joins every step as a reference (flux2_inpaint)
            w, h = request.width or self.default_size, request.height or self.default_size
            if isinstance(w, int) and isinstance(h, int):
                sizes = [im.size for im in references or []]
                why = flux2_inpaint.token_refusal(w, h, sizes, self.size_multiple, self.max_side(), self.name)
                if why is not None:
                    raise GenerationError(why)
                self._reference_tokens += (w // self.size_multiple) * (h // self.size_multiple)
        try:
            p = super().prepare(request)
        finally:
            self._reference_tokens = 0
        p.references = references
        for text in notes:
            p.notes.append(text)
        if p.sampler in sampling.CFG_PP_SAMPLERS:
            raise GenerationError(f"sampler {p.sampler}: CFG++ samplers are not supported for FLUX.2")
        return p

    def guided_denoiser(self, cfg_scale: float, uncond: Conditioning, rescale: float, **kw: Any) -> Any:
        """The core's CFG (on x0, the same combination as diffusers' on the velocity); prompt editing refused."""
        if kw.get("texts") is not None:
            raise GenerationError(f"prompt editing ([a:b:when], [a|b]) is not supported for FLUX.2; {self.name}")
        return super().guided_denoiser(cfg_scale, uncond, rescale, **kw)

    def conditioning_pair(
        self, prompt: str, negative: str, p: Prepared, note: Any
    ) -> tuple[Conditioning, Conditioning]:
        """(cond, uncond); at ``cfg_scale`` 1 the negative is not encoded (one pass per step)."""
        conditioner: Flux2Conditioner = self.conditioner  # type: ignore[assignment]
        if float(p.request.cfg_scale) == 1.0:
            cond = conditioner.text(prompt, note=note)
            guidance = self.distilled_guidance(p.request)
            if guidance is not None:  # [dev]: the guidance scale beside the text, one per row
                cond = {**cond, "guidance": torch.full((cond["crossattn"].shape[0],), guidance, dtype=torch.float32)}
            return cond, cond
        return conditioner.pair(prompt, negative, note=note)

    def sample_latents(self, p: Prepared, init_latent: Tensor | None = None) -> Tensor:
        """The call's schedule (its size and step count) and its reference latents, encoded once, for every step."""
        from sdengine.pipeline.flux_kontext import encode_references

        self._call_schedule = self.flow_schedule(p.width, p.height, int(p.request.steps))
        references = flux2_inpaint.call_references(p)  # the init image's first
        if references:
            self._call_references = encode_references(self, references, p.tiled)
        try:
            return Pipeline.sample_latents(self, p, init_latent)
        finally:
            self._call_schedule = None
            self._call_references = None


__all__ = [
    "BASE_CFG",
    "BASE_STEPS",
    "DEV_GUIDANCE",
    "DEV_STEPS",
    "DISTILLED_STEPS",
    "MAX_SEQUENCE_LENGTH",
    "Flux2Adapter",
    "Flux2Conditioner",
    "Flux2Pipeline",
    "dev_cfg_refusal",
    "distilled_cfg_refusal",
    "empirical_mu",
    "flux2_refusals",
]
