"""Z-Image / Z-Image-Turbo on sdengine's ComfyUI route: what ComfyUI's own Z-Image-Turbo graph (its
``image_z_image_turbo`` template) reads and does, on sdengine's networks.

The graph: UNETLoader on the transformer file (``diffusion_models/z_image_turbo_bf16.safetensors``: the original
names, ComfyUI's ``model.diffusion_model.`` prefix or not, or diffusers' names; read by
:mod:`sdengine.weights.z_image_file`), CLIPLoader type ``lumina2`` on Qwen3-4B (``text_encoders/qwen_3_4b.safetensors``;
Qwen2's tokenizer folder beside it, as for Qwen-Image), VAELoader on FLUX.1's ``ae.safetensors``,
ModelSamplingAuraFlow (shift 3), CLIPTextEncode, ConditioningZeroOut for the negative, EmptySD3LatentImage, KSampler
(res_multistep / simple, cfg 1), VAEDecode. The sampling is
:func:`sdengine.server.comfy.nodes_sd3_flux.sample_flow`'s; this module holds the Z-Image facts it reads, each
ComfyUI's (its ``comfy/text_encoders/z_image.py``, ``comfy/sd.py``, ``comfy/supported_models.py`` ``ZImage``,
``comfy/model_base.py`` ``Lumina2``, ``comfy/ldm/lumina/model.py`` and ``comfy/latent_formats.py``):

* **CLIPLoader's type**: ComfyUI tells a text encoder by its weights; a Qwen3-4B file under any type but ``flux`` /
  ``flux2`` becomes its Z-Image text encoder. The templates say ``lumina2``; ``qwen_image`` with a Qwen3 file is
  Z-Image's too here, as there. A Qwen2.5-VL file under ``lumina2`` and Lumina 2's Gemma are refused in one line.
* **Text** (:class:`ZImageComfyText`): the prompt in Qwen3's chat template (``<|im_start|>user\\n{}<|im_end|>\\n
  <|im_start|>assistant\\n``, always: a text is never its own template), tokenized whole (weights disabled: ComfyUI's
  escape of ``\\(`` applies, :func:`sdengine.server.comfy.nodes_qwen.comfy_text`), no padding, Qwen3 run to its
  next-to-last block with no final norm (``layer="hidden"``, ``layer_idx=-2``: transformers' ``hidden_states[-2]``),
  every token's state kept. These are diffusers' states
  (:func:`sdengine.text.z_image_prompt.encode_prompt_z_image`) except that diffusers cuts a text at 512 tokens
  (template included) and ComfyUI takes it whole (up to the transformer's RoPE length, 1536 on the release).
* **Guidance**: ComfyUI's plain CFG ``u + s (c - u)`` on x0; diffusers' Z-Image ``c + g (c - u)`` on the velocity
  with ``g = s - 1`` is the same number (x0 is linear in the velocity). diffusers' ``cfg_normalization`` /
  ``cfg_truncation`` are not ComfyUI's (not offered here). The positive and negative run at their own lengths
  (ComfyUI's ``c_crossattn`` and ``num_tokens`` do not batch texts of different lengths), here padded to one
  length with the padding masked out, which the transformer reads as each row alone.
* **Schedule**: ComfyUI's ZImage model sampling is ModelSamplingDiscreteFlow with shift 3 and multiplier 1 (its
  ``sampling_settings``); ModelSamplingAuraFlow sets the same with its shift. The transformer reads ``1 - sigma``
  (``NextDiT``: ``t = 1 - timesteps``) and its output negated is the velocity, as diffusers' pipeline calls it
  (:class:`sdengine.pipeline.z_image.ZImageAdapter`). ModelSamplingSD3 / ModelSamplingFlux (timesteps 1000 sigma /
  Flux's shift table) are refused on Z-Image.
* **Latents**: ComfyUI's Flux latent format (``(z - 0.1159) * 0.3611``, the pipeline's FLUX.1 VAE scaling), an
  all-zero latent left as it is.
* **Positions**: ComfyUI's transformer puts the caption before the image in the joint sequence (diffusers: after);
  the positions (caption at 1 .. L, the image at L + 1) and the pad tokens are the same, so the attention is. A
  latent with an odd side is padded to the patches at each call as ComfyUI's
  (:class:`sdengine.server.comfy.nodes_sd3_flux.PatchPadded`).

What is not built is refused in one line: CheckpointLoaderSimple on a Z-Image folder (its parts are not files
UNETLoader / CLIPLoader list), LoraLoader's strength_clip (Z-Image LoRAs adapt the transformer only:
LoraLoaderModelOnly and LoraLoader's model part run), CLIPSetLastLayer, FluxGuidance, ReferenceLatent,
ControlNetApply's ControlNets (the Z-Image Fun ControlNet Union runs through ModelPatchLoader and ZImageFunControlnet:
:mod:`sdengine.server.comfy.nodes_z_image_control`), a Z-Image model with another family's conditioning and the
reverse.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sdengine.errors import SdengineError
from sdengine.server.comfy.nodes import ClipHandle, ModelHandle, NodeError

FAMILY = "z_image"
CLIP_TYPE = "lumina2"  # CLIPLoader's type in ComfyUI's Z-Image templates
COMFY_SHIFT = 3.0  # ComfyUI's ZImage sampling_settings (ModelSamplingDiscreteFlow, multiplier 1)
LABEL = "Z-Image"


# ---------------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------------


def is_qwen3_file(path: Path) -> bool:
    """A Qwen3 language model's weights: Qwen's layer names with q/k norms (``self_attn.q_norm``), by the header."""
    from sdengine.weights.io import read_safetensors_header

    if path.is_dir():
        return False
    names, _, _ = read_safetensors_header(path)
    return any(n.endswith("layers.0.self_attn.q_norm.weight") for n in names) and any(
        n.endswith("embed_tokens.weight") for n in names
    )


def is_gemma_file(path: Path) -> bool:
    """Lumina Image 2.0's Gemma 2 text encoder (``pre_feedforward_layernorm``), by the header."""
    from sdengine.weights.io import read_safetensors_header

    if path.is_dir():
        return False
    names, _, _ = read_safetensors_header(path)
    return any(n.endswith("layers.0.pre_feedforward_layernorm.weight") for n in names)


class ZImageComfyText:
    """ComfyUI's Z-Image text encoder over sdengine's Qwen3 and Qwen2 tokenizer (the module docstring):
    ``encode(text)`` -> every token's states (1, L, hidden) in float32."""

    def __init__(self, encoder: Any, tokenizer: Any, name: str) -> None:
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.name = name
        self.dtype = encoder.dtype
        self.width = int(encoder.config.hidden_size)

    def encode(self, text: str) -> torch.Tensor:
        from sdengine.server.comfy.nodes_qwen import comfy_text
        from sdengine.text.qwen_tokenizer import MAX_LENGTH_LIMIT
        from sdengine.text.z_image_prompt import encode_prompt_z_image

        try:  # the template applied there; the whole text (ComfyUI cuts none), each text remembered
            states, _ = encode_prompt_z_image(
                self.encoder, self.tokenizer, comfy_text(text, LABEL), max_length=MAX_LENGTH_LIMIT
            )
        except SdengineError as e:
            raise NodeError(f"CLIPTextEncode on Z-Image: {str(e).splitlines()[0]}") from None
        return states.float()


def load_text(path: Path, dev: torch.device, dtype: torch.dtype) -> ZImageComfyText:
    """CLIPLoader type lumina2's encoder: the Qwen3 file (or folder) and Qwen2's tokenizer beside it; a Qwen2.5-VL
    file is one line (:func:`sdengine.weights.qwen_text_file.load_qwen_text_encoder`, family ``qwen3``)."""
    from sdengine.pipeline.qwen_image_loading import tokenizer_beside
    from sdengine.text.qwen_tokenizer import load_qwen_tokenizer
    from sdengine.weights.qwen_text_file import load_qwen_text_encoder

    folder = tokenizer_beside(path)
    if folder is None:
        raise NodeError(
            f"no Qwen2 tokenizer beside {path.name} (sdengine ships none): put the "
            "tokenizer folder (Z-Image's tokenizer/ or ComfyUI's comfy/text_encoders/qwen25_tokenizer) beside it as "
            "qwen25_tokenizer/"
        )
    tokenizer = load_qwen_tokenizer(folder)
    encoder = load_qwen_text_encoder(path, device=dev, dtype=dtype, family="qwen3").eval().requires_grad_(False)
    return ZImageComfyText(encoder, tokenizer, path.name)


def check_clip(clip: ClipHandle) -> None:
    """What a Z-Image CLIP does not take: CLIPSetLastLayer, LoraLoader's strength_clip (one line each)."""
    if clip.layer is not None:
        raise NodeError("CLIPSetLastLayer does not apply to Z-Image (ComfyUI reads Qwen3's next-to-last layer)")
    if clip.loras:
        raise NodeError(
            "LoraLoader's strength_clip on Z-Image: its LoRAs adapt the transformer only; use LoraLoaderModelOnly "
            "(or strength_clip 0)"
        )


def text_entry(clip: ClipHandle, text_side: ZImageComfyText, text: str) -> Any:
    """CLIPTextEncode with a Z-Image CLIP: one entry, every token's states (no mask)."""
    from sdengine.latent_sampling import TextCondition

    check_clip(clip)
    return TextCondition({"crossattn": text_side.encode(str(text))})


# ---------------------------------------------------------------------------------------------------
# The model: schedule, latents, conditioning
# ---------------------------------------------------------------------------------------------------


def schedule(model: ModelHandle) -> Any:
    """The flow schedule ComfyUI samples a Z-Image model on: ModelSamplingAuraFlow's shift on the 1000-entry table,
    else the model's own (the same with shift 3); ModelSamplingSD3 / ModelSamplingFlux refused in one line."""
    from sdengine.diffusion.flow import FlowSchedule

    if model.flow_sampling:
        kind, value = model.flow_sampling
        if kind == "auraflow":
            return FlowSchedule.sd3(float(value))
        node = "ModelSamplingSD3" if kind == "sd3" else "ModelSamplingFlux"
        raise NodeError(
            f"{node} is not Z-Image's (its transformer reads the sigma, ComfyUI's multiplier 1): use "
            "ModelSamplingAuraFlow"
        )
    return FlowSchedule.sd3(COMFY_SHIFT)


def fit_conditioning(entries: list[Any], width: int) -> list[Any]:
    """The entries as a Z-Image transformer reads them: caption states ``width`` wide (its ``cap_feat_dim``), no
    pooled vector; FluxGuidance refused."""
    from dataclasses import replace

    out = []
    for e in entries:
        cond = dict(e.cond)
        x = cond.get("crossattn")
        if x is None or x.ndim != 3:
            raise NodeError("this conditioning has no token states (crossattn): encode it with the model's CLIP")
        if int(x.shape[-1]) != width or "vector" in cond:
            raise NodeError(
                f"this conditioning is not this Z-Image model's (its states are {int(x.shape[-1])} wide, the "
                f"transformer reads {width}): encode it with CLIPLoader type {CLIP_TYPE}'s CLIP (Qwen3-4B)"
            )
        from sdengine.server.comfy.nodes_sd3_flux import guidance_disabled

        g = cond.pop("guidance", None)
        if g is not None and not guidance_disabled(g):  # FluxDisableGuidance's mark: nothing to leave out
            raise NodeError("FluxGuidance does not apply to Z-Image (it has no distilled guidance): leave it out")
        out.append(replace(e, cond=cond))
    return out


def refuse_checkpoint(name: str) -> None:
    """CheckpointLoaderSimple on a Z-Image model: one line saying how ComfyUI's Z-Image graph loads it."""
    raise NodeError(
        f"CheckpointLoaderSimple: {name} is a Z-Image model; on the ComfyUI route load its parts as ComfyUI's "
        "Z-Image template does: UNETLoader (diffusion_models/z_image_*.safetensors), CLIPLoader type lumina2 "
        "(qwen_3_4b.safetensors) and VAELoader (ae.safetensors)"
    )


def load_transformer(path: Path, dev: torch.device, dtype: torch.dtype) -> Any:
    from sdengine.weights.z_image_file import load_z_image_transformer

    try:
        return load_z_image_transformer(path, device=dev, dtype=dtype).eval().requires_grad_(False)
    except SdengineError as e:
        raise NodeError(f"{path.name}: {str(e).splitlines()[0]}") from None


__all__ = [
    "CLIP_TYPE",
    "COMFY_SHIFT",
    "FAMILY",
    "ZImageComfyText",
    "check_clip",
    "fit_conditioning",
    "is_gemma_file",
    "is_qwen3_file",
    "load_text",
    "load_transformer",
    "refuse_checkpoint",
    "schedule",
    "text_entry",
]
