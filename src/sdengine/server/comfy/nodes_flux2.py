"""FLUX.2 [klein] and [dev] on sdengine's ComfyUI route: what ComfyUI's own FLUX.2 graphs (its ``image_flux2_klein``
and ``image_flux2`` templates) read and do, on sdengine's FLUX.2 networks (:mod:`sdengine.models.flux2`,
:mod:`sdengine.models.flux2_vae`).

The graph: UNETLoader on the transformer file (``diffusion_models/flux-2-klein-4b.safetensors``: BFL's names,
ComfyUI's ``model.diffusion_model.`` prefix or not, or diffusers' names; read by :mod:`sdengine.weights.flux2_file`),
CLIPLoader type ``flux2`` on Qwen3 (``text_encoders/qwen_3_4b.safetensors``; Qwen2's tokenizer folder beside it,
``qwen25_tokenizer/``, as for Z-Image), VAELoader on ``flux2-vae.safetensors``, CLIPTextEncode, EmptyFlux2LatentImage,
Flux2Scheduler, KSamplerSelect, RandomNoise, CFGGuider (cfg 1 on the step-distilled models), SamplerCustomAdvanced,
VAEDecode; for klein edit each reference picture VAEEncoded and put on the conditioning with ReferenceLatent. The
sampling is :func:`sdengine.server.comfy.nodes_sd3_flux.sample_flow`'s; this module holds the FLUX.2 facts it reads,
each ComfyUI's (its ``comfy/text_encoders/flux.py``, ``comfy/supported_models.py`` ``Flux2``,
``comfy/model_base.py`` ``Flux`` / ``Flux2``, ``comfy/latent_formats.py`` ``Flux2``, ``comfy_extras/nodes_flux.py``,
``comfy/model_detection.py``):

* **CLIPLoader's type**: ``flux2`` with a Qwen3 file is ComfyUI's klein text encoder (``klein_te``: Qwen3-4B for
  klein 4B, Qwen3-8B for 9B); with a Mistral Small 3 file (ComfyUI's ``mistral_3_small_flux2_*.safetensors``) it is
  FLUX.2 [dev]'s (``flux2_te``), its tokenizer the ``tekken_model`` inside the file (the only one ComfyUI reads: a
  Mistral file without it is refused in one line); any other file is refused in one line.
* **[dev]'s text** (:class:`Flux2ComfyText` with ``dev``): ``Flux2Tokenizer`` / ``Mistral3Tokenizer``: ``<s>`` then
  BFL's system prompt around the prompt (:data:`sdengine.text.flux2_prompt.DEV_PROMPT_TEMPLATE`), weights disabled,
  no padding (``min_length`` 1) and never cut; Mistral's states 10, 20 and 30 side by side per token. diffusers pads
  to 512 tokens with a mask instead (other states); the transformer gets ComfyUI's states zero-padded in front to
  512 (``model_base.Flux2``). [dev]'s guidance embedding takes FluxGuidance's value, ComfyUI's Flux default 3.5
  where none is set (``model_base.Flux.extra_conds``).
* **Text** (:class:`Flux2ComfyText`): ``KleinTokenizer``: the prompt in Qwen3's chat template with thinking off
  (``<|im_start|>user\\n{}<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n``), weights disabled
  (ComfyUI's escape of ``\\(`` applies), padded with the pad token 151643 to at least 512 tokens (``min_length``
  512) and never cut; Qwen3 run with its mask, the states before blocks 9, 18 and 27 (transformers'
  ``hidden_states[9]``, ``[18]``, ``[27]``) side by side per token. For a text of up to 512 tokens these are
  diffusers' states (:func:`sdengine.text.flux2_prompt.encode_prompt_flux2`, ``max_sequence_length`` 512), every
  padding position included; a longer one is kept whole here (diffusers cuts it at 512).
* **The transformer call**: every token is attended to, the padding's too (ComfyUI's Flux ``extra_conds`` passes no
  text mask; a state list shorter than 512 is padded with zeros in front to 512, ``model_base.Flux2``), as
  diffusers' pipeline does. ComfyUI adds a guidance value to every Flux conditioning; a klein has no guidance
  embedding and reads none (FluxGuidance has no effect, here as there); [dev] reads it.
* **Latents**: ComfyUI's Flux2 latent format is the identity (scale 1): its VAE's encode gives the diffusion
  model's latent itself, the VAE latent in 2x2 patches normalised by the VAE's batch-norm statistics
  (:meth:`sdengine.models.flux2_vae.Flux2VAE.scale_latents`), 128 channels at 1/16 of the pixels, and its decode
  takes it back. EmptyFlux2LatentImage makes zeros of (128, height // 16, width // 16).
* **Schedule**: Flux2Scheduler's sigmas are ``shift(linspace(1, 0, steps + 1))`` with ``shift(t) = e^mu / (e^mu +
  1/t - 1)`` and ``mu`` diffusers' ``compute_empirical_mu`` of ``round(width * height / 256)`` tokens and the step
  count: the same list as diffusers' ``linspace(1, 1/n, n)`` shifted, then 0. KSampler / BasicScheduler walk
  ComfyUI's model sampling of klein instead (ModelSamplingFlux with ``mu`` 2.02, the ``sampling_settings``; a
  ModelSamplingFlux node sets its own); ModelSamplingSD3 / ModelSamplingAuraFlow are refused.
* **Reference latents** (klein edit): ReferenceLatent's latents go to the transformer unscaled (the latent format is
  the identity), reference ``k`` at time index ``10 (k + 1)`` (ComfyUI's ``default_ref_method`` "index" with
  ``ref_index_scale`` 10): diffusers' ids.

LoRAs go on the transformer (LoraLoaderModelOnly; the pipelines' FLUX.2 LoRA formats). What is not built is refused
in one line: CheckpointLoaderSimple on a klein folder, LoRAs on the text encoder (LoraLoader's strength_clip),
CLIPSetLastLayer, ControlNets, a negative of another token count than the positive's at cfg other than 1, and a
FLUX.2 model with another family's conditioning or latent.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from sdengine.errors import SdengineError
from sdengine.server.comfy.nodes import ClipHandle, Input, ModelHandle, NodeDef, NodeError, RunContext

FAMILY = "flux2"
CLIP_TYPE = "flux2"  # CLIPLoader's type in ComfyUI's klein templates
COMFY_MU = 2.02  # ComfyUI's Flux2 sampling_settings ("shift", ModelSamplingFlux's mu)
MIN_TOKENS = 512  # KleinTokenizer's min_length (and model_base.Flux2's target_text_len)
PAD_TOKEN = 151643  # KleinTokenizer's pad token (Qwen's <|endoftext|>)
LATENT_CHANNELS = 128  # EmptyFlux2LatentImage's
LATENT_FACTOR = 16  # EmptyFlux2LatentImage's pixels per latent pixel
SIDE_MAX = 16384
LABEL = "FLUX.2"


# ---------------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------------


class Flux2ComfyText:
    """ComfyUI's FLUX.2 text encoder over sdengine's language model and tokenizer (the module docstring):
    ``encode(text)`` -> (1, max(min_tokens, tokens), 3 x hidden) float32. klein: Qwen3 in its chat template, layers
    9 / 18 / 27, padded to 512; [dev] (``dev``): Mistral Small 3 in BFL's system prompt, layers 10 / 20 / 30, no
    padding (ComfyUI's ``Mistral3Tokenizer``: ``min_length`` 1)."""

    def __init__(self, encoder: Any, tokenizer: Any, name: str, *, dev: bool = False) -> None:
        from sdengine.text import flux2_prompt

        self.encoder = encoder
        self.tokenizer = tokenizer
        self.name = name
        self.dtype = encoder.dtype
        self.dev = dev
        self.layers = flux2_prompt.DEV_HIDDEN_LAYERS if dev else flux2_prompt.HIDDEN_LAYERS
        self.template = flux2_prompt.DEV_PROMPT_TEMPLATE if dev else flux2_prompt.PROMPT_TEMPLATE
        self.min_tokens = 1 if dev else MIN_TOKENS
        self.width = len(self.layers) * int(encoder.config.hidden_size)

    def encode(self, text: str) -> torch.Tensor:
        from sdengine.server.comfy.nodes_qwen import comfy_text
        from sdengine.text import flux2_prompt

        plain = comfy_text(text, LABEL)
        n = len(self.tokenizer.encode(self.template.replace("{}", plain, 1)))
        length = max(self.min_tokens, n)  # ComfyUI's min_length (512 / 1), no max_length cut
        try:
            states = flux2_prompt.encode_prompt_flux2(
                self.encoder,
                self.tokenizer,
                plain,
                max_sequence_length=length,
                hidden_layers=self.layers,
                template=self.template,
            )
        except SdengineError as e:
            raise NodeError(f"CLIPTextEncode on FLUX.2: {str(e).splitlines()[0]}") from None
        return states.float()


def load_text(path: Path, dev: torch.device, dtype: torch.dtype) -> Flux2ComfyText:
    """CLIPLoader type flux2's encoder: the Qwen3 file (or folder) and Qwen2's tokenizer beside it."""
    from sdengine.pipeline.qwen_image_loading import tokenizer_beside
    from sdengine.text.qwen_tokenizer import load_qwen_tokenizer
    from sdengine.weights.qwen_text_file import load_qwen_text_encoder

    folder = tokenizer_beside(path)
    if folder is None:
        raise NodeError(
            f"no Qwen2 tokenizer beside {path.name} (sdengine ships none): put the tokenizer folder (a klein "
            "folder's tokenizer/ or ComfyUI's comfy/text_encoders/qwen25_tokenizer) beside it as qwen25_tokenizer/"
        )
    tokenizer = load_qwen_tokenizer(folder)
    encoder = load_qwen_text_encoder(path, device=dev, dtype=dtype, family="qwen3").eval().requires_grad_(False)
    layers = int(encoder.config.num_hidden_layers)
    if layers < 27:
        raise NodeError(f"{path.name}: Qwen3 of {layers} layers; FLUX.2 [klein] reads layers 9, 18 and 27")
    return Flux2ComfyText(encoder, tokenizer, path.name)


def load_mistral_text(path: Path, dev: torch.device, dtype: torch.dtype) -> Flux2ComfyText:
    """CLIPLoader type flux2's encoder on a Mistral Small 3 file (FLUX.2 [dev]'s): its language model and the
    tokenizer the file carries (``tekken_model``, the only one ComfyUI reads)."""
    from sdengine.pipeline.flux2_loading import read_tekken
    from sdengine.weights.qwen_text_file import load_qwen_text_encoder

    try:
        tokenizer = read_tekken(path)
    except SdengineError as e:
        raise NodeError(str(e).splitlines()[0]) from None
    encoder = load_qwen_text_encoder(path, device=dev, dtype=dtype, family="mistral").eval().requires_grad_(False)
    layers = int(encoder.config.num_hidden_layers)
    if layers < 30:
        raise NodeError(f"{path.name}: Mistral of {layers} layers; FLUX.2 [dev] reads layers 10, 20 and 30")
    return Flux2ComfyText(encoder, tokenizer, path.name, dev=True)


def load_clip_text(files: dict[str, str], dev: torch.device, dtype: torch.dtype) -> Flux2ComfyText:
    """The text side of a CLIPLoader type flux2 handle (:func:`clip_handle`'s encoders)."""
    if "mistral" in files:
        return load_mistral_text(Path(files["mistral"]), dev, dtype)
    return load_text(Path(files["qwen3"]), dev, dtype)


def clip_handle(path: Path) -> ClipHandle:
    """CLIPLoader type flux2 on ``path``: a Qwen3 file is klein's text encoder; anything else one line."""
    from sdengine.server.comfy.nodes import TEXT_ENCODERS_REF
    from sdengine.server.comfy.nodes_z_image import is_qwen3_file

    try:
        qwen3 = path.is_dir() or is_qwen3_file(path)
        mistral = not qwen3 and _is_mistral_file(path)
    except (OSError, SdengineError) as e:
        raise NodeError(f"CLIPLoader: {str(e).splitlines()[0]}") from None
    if mistral:
        from sdengine.pipeline.flux2_loading import TEKKEN, holds_tekken

        if not holds_tekken(path):
            raise NodeError(
                f"CLIPLoader type flux2: {path.name} is Mistral Small 3 without its tokenizer ({TEKKEN}, which "
                "ComfyUI's mistral_3_small_flux2_*.safetensors carry and ComfyUI reads): use such a file"
            )
        return ClipHandle(TEXT_ENCODERS_REF + str(path), encoders=(("mistral", str(path)),), clip_type=FAMILY)
    if not qwen3:
        raise NodeError(
            f"CLIPLoader type flux2 takes FLUX.2 [klein]'s Qwen3 text encoder (qwen_3_4b.safetensors / "
            f"qwen_3_8b*.safetensors); {path.name} is not one"
        )
    return ClipHandle(TEXT_ENCODERS_REF + str(path), encoders=(("qwen3", str(path)),), clip_type=FAMILY)


def _is_mistral_file(path: Path) -> bool:
    """A Mistral language model's weights (Llama's names, no q/k norms, no biases) with a vision tower or not."""
    from sdengine.weights.io import read_safetensors_header

    names, _, _ = read_safetensors_header(path)
    return any(n.endswith("layers.0.self_attn.q_proj.weight") for n in names) and not any(
        n.endswith("layers.0.self_attn.q_norm.weight") or n.endswith("layers.0.self_attn.q_proj.bias") for n in names
    )


def check_clip(clip: ClipHandle) -> None:
    if clip.layer is not None:
        raise NodeError(
            "CLIPSetLastLayer does not apply to FLUX.2 (ComfyUI reads Qwen3's layers 9, 18 and 27, Mistral's 10, 20 "
            "and 30)"
        )
    if clip.loras:
        raise NodeError(
            "LoraLoader's strength_clip on FLUX.2: LoRAs on its text encoder (Qwen3 / Mistral) are not supported; use "
            "LoraLoaderModelOnly (or strength_clip 0)"
        )


def text_entry(clip: ClipHandle, text_side: Flux2ComfyText, text: str) -> Any:
    """CLIPTextEncode with a klein CLIP: one entry, every token's states (the padding's too, no mask)."""
    from sdengine.latent_sampling import TextCondition

    check_clip(clip)
    with torch.inference_mode():
        return TextCondition({"crossattn": text_side.encode(str(text))})


# ---------------------------------------------------------------------------------------------------
# The model: loading, schedule, latents, conditioning
# ---------------------------------------------------------------------------------------------------


def load_transformer(path: Path, dev: torch.device, dtype: torch.dtype) -> Any:
    from sdengine.weights.flux2_file import load_flux2_transformer

    try:
        return load_flux2_transformer(path, device=dev, dtype=dtype).eval().requires_grad_(False)
    except SdengineError as e:
        raise NodeError(f"{path.name}: {str(e).splitlines()[0]}") from None


def channels(net: Any) -> int:
    """The latent channels a FLUX.2 transformer reads (128 on the release)."""
    return int(net.config.in_channels)


def schedule(model: ModelHandle) -> Any:
    """The flow schedule ComfyUI samples a klein on: ModelSamplingFlux's ``mu`` where the node set one, else the
    model's own (``mu`` 2.02); ModelSamplingSD3 / ModelSamplingAuraFlow refused in one line."""
    from sdengine.diffusion.flow import FlowSchedule

    if model.flow_sampling:
        kind, value = model.flow_sampling
        if kind == "flux":
            return FlowSchedule.flux(mu=float(value))
        node = "ModelSamplingSD3" if kind == "sd3" else "ModelSamplingAuraFlow"
        raise NodeError(f"{node} is not FLUX.2's (ComfyUI samples it as Flux): use ModelSamplingFlux or none")
    return FlowSchedule.flux(mu=COMFY_MU)


def check_latent(z: torch.Tensor, want: int, name: str) -> None:
    if int(z.shape[1]) != want:
        raise NodeError(
            f"the latent has {int(z.shape[1])} channels, {name} (FLUX.2) reads {want}: make it with "
            "EmptyFlux2LatentImage or VAEEncode with the FLUX.2 VAE"
        )


def fit_conditioning(entries: list[Any], width: int, guidance: bool = False) -> list[Any]:
    """The entries as a FLUX.2 transformer reads them: the stacked states ``width`` wide (the transformer's
    ``joint_attention_dim``), padded in front with zeros to 512 tokens where shorter (``model_base.Flux2``); no
    pooled vector. ``guidance`` ([dev]: the guidance embedding): FluxGuidance's value, ComfyUI's Flux default 3.5
    where none is set; a klein has none and reads none (the value dropped, as ComfyUI's model ignores it)."""
    from dataclasses import replace

    from sdengine.server.comfy.nodes_sd3_flux import FLUX_GUIDANCE

    out = []
    for e in entries:
        cond = dict(e.cond)
        x = cond.get("crossattn")
        if x is None or x.ndim != 3:
            raise NodeError("this conditioning has no token states (crossattn): encode it with the model's CLIP")
        if int(x.shape[-1]) != width or "vector" in cond:
            raise NodeError(
                f"this conditioning is not this FLUX.2 model's (its states are {int(x.shape[-1])} wide, the "
                f"transformer reads {width}): encode it with CLIPLoader type {CLIP_TYPE}'s CLIP (Qwen3 for "
                "[klein], Mistral for [dev])"
            )
        if int(x.shape[1]) < MIN_TOKENS:
            cond["crossattn"] = torch.nn.functional.pad(x, (0, 0, MIN_TOKENS - int(x.shape[1]), 0))
        if guidance:
            g = cond.get("guidance")
            from sdengine.server.comfy.nodes_sd3_flux import guidance_disabled

            if guidance_disabled(g):
                raise NodeError("FluxDisableGuidance on FLUX.2 [dev] is not supported here: leave it out")
            cond["guidance"] = torch.tensor([FLUX_GUIDANCE]) if g is None else g
        else:
            cond.pop("guidance", None)
        cond.pop("text_mask", None)
        out.append(replace(e, cond=cond))
    return out


def refuse_checkpoint(name: str) -> None:
    raise NodeError(
        f"CheckpointLoaderSimple: {name} is a FLUX.2 model; on the ComfyUI route load its parts as ComfyUI's klein "
        "template does: UNETLoader (diffusion_models/flux-2-klein-*.safetensors), CLIPLoader type flux2 "
        "(qwen_3_4b.safetensors) and VAELoader (flux2-vae.safetensors)"
    )


# ---------------------------------------------------------------------------------------------------
# Nodes
# ---------------------------------------------------------------------------------------------------


def empty_flux2_latent(ctx: RunContext, width: int, height: int, batch_size: int = 1) -> tuple[Any]:
    """ComfyUI's EmptyFlux2LatentImage: zeros of 128 x (height // 16) x (width // 16)."""
    ctx.check_size(int(width), int(height), int(batch_size))
    b, h, w = int(batch_size), int(height), int(width)
    z = torch.zeros(b, LATENT_CHANNELS, h // LATENT_FACTOR, w // LATENT_FACTOR)
    return ({"samples": z, "size": (b, h, w), "posterior": None, "noise_mask": None},)


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    from sdengine.pipeline.flux2 import empirical_mu as mu

    return mu(image_seq_len, num_steps)


def flux2_sigmas(steps: int, width: int, height: int) -> torch.Tensor:
    """Flux2Scheduler's list (module docstring), float32 as ComfyUI's."""
    mu = empirical_mu(round(int(width) * int(height) / (16 * 16)), int(steps))
    t = torch.linspace(1, 0, int(steps) + 1)
    e = math.exp(mu)
    return (e / (e + (1 / t - 1))).to(torch.float32)


def flux2_scheduler(ctx: RunContext, steps: int, width: int, height: int) -> tuple[Any]:
    """ComfyUI's Flux2Scheduler: FLUX.2's shifted list for ``steps`` steps of a ``width`` x ``height`` image."""
    from sdengine.server.comfy.nodes import Sigmas

    n = int(steps)
    if n > ctx.max_steps:
        raise NodeError(f"steps {n} is over the server's limit of {ctx.max_steps}")
    return (Sigmas(flux2_sigmas(n, int(width), int(height))),)


FLUX2_NODES: dict[str, NodeDef] = {
    "EmptyFlux2LatentImage": NodeDef(
        "EmptyFlux2LatentImage",
        "Empty Flux 2 Latent",
        "latent",
        (
            Input("width", "INT", 1024, 16, SIDE_MAX, 16, limit="side"),
            Input("height", "INT", 1024, 16, SIDE_MAX, 16, limit="side"),
            Input("batch_size", "INT", 1, 1, 4096, limit="batch"),
        ),
        ("LATENT",),
        empty_flux2_latent,
        description="Zeros of 128 x height/16 x width/16: FLUX.2's empty latent (the VAE latent in 2x2 patches, "
        "normalised, as ComfyUI's FLUX.2 VAE gives and takes it).",
    ),
    "Flux2Scheduler": NodeDef(
        "Flux2Scheduler",
        "Flux2Scheduler",
        "sampling/custom_sampling/schedulers",
        (
            Input("steps", "INT", 20, 1, 4096, limit="steps"),
            Input("width", "INT", 1024, 16, SIDE_MAX, 1),
            Input("height", "INT", 1024, 16, SIDE_MAX, 1),
        ),
        ("SIGMAS",),
        flux2_scheduler,
        description="FLUX.2's sigmas: linspace(1, 0, steps + 1) through the exponential time shift with diffusers' "
        "empirical mu of width x height / 256 tokens and the step count (the FLUX.2 pipelines' schedule).",
    ),
}


__all__ = [
    "CLIP_TYPE",
    "COMFY_MU",
    "FAMILY",
    "FLUX2_NODES",
    "Flux2ComfyText",
    "channels",
    "check_clip",
    "check_latent",
    "clip_handle",
    "empty_flux2_latent",
    "fit_conditioning",
    "flux2_scheduler",
    "flux2_sigmas",
    "load_clip_text",
    "load_mistral_text",
    "load_text",
    "load_transformer",
    "refuse_checkpoint",
    "schedule",
    "text_entry",
]
