"""LoRA names of the diffusion transformers: SD3's MMDiT, Flux.1's transformer, Chroma's, Qwen-Image's, Z-Image's and
FLUX.2's.

A LoRA (Hu et al. 2021) for a diffusion transformer names its layers in one of two vocabularies:

* diffusers' module names, which are sdengine's (:mod:`sdengine.models.mmdit`, :mod:`sdengine.models.flux`):
  ``transformer.transformer_blocks.0.attn.to_q`` (diffusers/PEFT, ai-toolkit, SimpleTuner), the same name with
  underscores behind ``lora_transformer_`` (OneTrainer) or ``lycoris_`` (LyCORIS' own wrapper on diffusers'
  transformer, as SimpleTuner drives it; ComfyUI reads these for every diffusion transformer, diffusers for FLUX.2's
  LoKr files), or behind PEFT's ``base_model.model.``;
* the original checkpoints' names (Black Forest Labs' for Flux, Stability's for SD3, Esser et al. 2024), as the
  model's own single files spell them: ``double_blocks.0.img_attn.qkv``, ``single_blocks.3.linear1``,
  ``joint_blocks.5.x_block.attn.qkv`` -- behind ``diffusion_model.`` (ComfyUI; with ``lora_down`` / ``lora_up``
  or ``lora_A`` / ``lora_B``) or with underscores behind ``lora_unet_`` (kohya's sd-scripts);
* XLabs' Flux LoRAs: ``double_blocks.0.processor.qkv_lora1`` (the image stream's qkv; ``2``: the text's),
  ``proj_lora1/2``, ``single_blocks.0.processor.qkv_lora`` (the attention's rows of ``linear1``).

Chroma (:mod:`sdengine.models.chroma`) has Flux's blocks without their modulation linears, and its approximator
``distilled_guidance_layer`` instead of Flux's timestep / guidance / pooled-text embedders: its LoRAs use the same
two vocabularies (diffusers' ``transformer.transformer_blocks.0.attn.to_q`` from ai-toolkit, SimpleTuner and
diffusers; BFL's ``diffusion_model.double_blocks.0.img_attn.qkv`` / ``lora_unet_double_blocks_0_img_attn_qkv``
from ComfyUI and kohya), with the approximator's layers as ``distilled_guidance_layer.{in_proj, out_proj,
layers.N.in_layer, layers.N.out_layer}`` in BFL's names (diffusers': ``layers.N.linear_1`` / ``linear_2``). A
file naming a layer only Flux.1 has (:func:`flux_only_layers`: a modulation linear, ``time_in``, ``vector_in``,
``guidance_in``) is refused on Chroma as a LoRA for Flux.1 (:func:`sdengine.weights.lora_keys.check_dit_family`).

Qwen-Image (:mod:`sdengine.models.qwen_image`) was released in diffusers' names, which are its modules' (no fused
layer, no swapped halves): its LoRAs name ``transformer_blocks.N.attn.to_q`` / ``add_q_proj`` / ``to_add_out``,
``img_mod.1`` / ``txt_mod.1``, ``img_mlp.net.0.proj`` / ``txt_mlp.net.2``, ``img_in``, ``txt_in``,
``norm_out.linear``, ``proj_out``, ``time_text_embed.timestep_embedder.linear_1`` behind ``transformer.``
(diffusers/PEFT), ``diffusion_model.`` (ComfyUI, ai-toolkit, DiffSynth), ``base_model.model.``, or bare, and with
underscores behind ``lora_unet_`` (kohya-style: musubi-tuner), ``lora_transformer_`` or ``lycoris_`` -- the
layouts diffusers' ``QwenImagePipeline.load_lora_weights`` reads (its ``_convert_non_diffusers_qwen_lora_to_
diffusers``), plus PEFT's adapter names (``lora_A.default.weight``), which the file reader drops. A file naming a
layer Qwen-Image does not have and Flux.1 / SD3 do in diffusers' names (:func:`not_qwen_layers`: ``norm1.linear``,
``ff.net``, ``context_embedder``, ``single_transformer_blocks``, ...) is refused on Qwen-Image in one line, and a
file with Qwen-Image's own names (``transformer_blocks.N.img_mod`` / ``txt_mlp`` ...) on the others
(:func:`sdengine.weights.lora_keys.check_dit_family`).

Z-Image (:mod:`sdengine.models.z_image`): diffusers' names (``layers.N.attention.to_q``, ``feed_forward.w1``,
``adaLN_modulation.0``, ``all_final_layer.2-1.linear`` ...) behind ``transformer.`` / ``diffusion_model.`` /
``base_model.model.`` or bare, with underscores behind ``lora_unet_`` (kohya-style) or ``lora_transformer_``, and the
original layout's (ComfyUI's): ``attention.qkv`` (q, k, v fused: split by rows), ``attention.out``, ``x_embedder``,
``final_layer.*`` (:func:`_z_image_native`). Its LoRAs adapt the transformer only, as diffusers'
``ZImagePipeline.load_lora_weights``; :data:`Z_IMAGE_LAYERS` tells its files from the other families'.

FLUX.2 (:mod:`sdengine.models.flux2`): diffusers' names (``transformer_blocks.N.attn.to_q``, ``ff.linear_in``,
``single_transformer_blocks.N.attn.to_qkv_mlp_proj``, ``double_stream_modulation_img.linear`` ...) behind
``transformer.`` (diffusers / PEFT) and the aliases above, and BFL's (:func:`_flux2_native`: ai-toolkit's
``diffusion_model.double_blocks.N.img_attn.qkv``, kohya's ``lora_unet_double_blocks_N_img_attn_qkv``, ComfyUI's): a
double block's fused ``qkv`` split by rows, ``img_mlp.0`` / ``img_mlp.2`` -> ``ff.linear_in`` / ``linear_out``, a
single block's ``linear1`` / ``linear2`` -> ``to_qkv_mlp_proj`` / ``to_out`` (one module each: no split), the shared
modulations' ``lin`` -> ``linear``, ``final_layer.adaLN_modulation.1`` -> ``norm_out.linear`` with its halves swapped
(as the model file's conversion swaps them; diffusers' LoRA conversion of that one layer does not). Its LoRAs adapt
the transformer only, as diffusers' ``Flux2KleinPipeline.load_lora_weights``; :data:`FLUX2_LAYERS` tells its files
from the other families' (its BFL attention names are FLUX.1's: a FLUX.1 file is told by a layer only FLUX.1 has,
:func:`flux_only_layers`).

The original layouts differ from diffusers' in two ways that matter to a LoRA:

* fused projections: ``img_attn.qkv`` stacks q, k and v by rows, a single block's ``linear1`` stacks q, k, v and
  the MLP's first layer. A LoRA on such a layer, ``delta = up @ down``, is the same change as one LoRA per part
  with the same ``down`` and the part's rows of ``up`` (``up`` splits by rows; the rank and alpha stay);
* the final modulation (and SD3's last context modulation) outputs (shift, scale) where diffusers' outputs
  (scale, shift): the two halves of ``up``'s rows swap.

:func:`dit_routes` lists, for a given model, every name a file may use and where its rows go; :func:`split_dit_layers`
rewrites a parsed file onto the model's module names (``transformer.<module>``), which
:class:`sdengine.weights.lora_keys.ModelIndex` then matches like any other LoRA, so the same
apply/fuse/unfuse/report path serves these models. Names it does not know are left as they are (reported unmatched,
never dropped). LyCORIS layers map onto layers that are one module in both vocabularies as they are; on a fused or
swapped layer, LoHa, LoKr and LoCon-Tucker updates (built from their factors alone) give each part its rows of the
update, and weight/bias differences are cut by rows; the others (OFT, (IA)^3, GLoRA, DoRA), whose update depends on
the whole base layer, are refused there.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..models.chroma import ChromaTransformer
from ..models.flux import FluxTransformer
from ..models.flux2 import Flux2Transformer
from ..models.mmdit import MMDiT
from ..models.qwen_image import QwenImageTransformer
from ..models.z_image import PATCH_KEY, ZImageTransformer
from ..nn.lycoris import FACTOR_ONLY, NORM_TYPES
from .flux_file import DOUBLE_NORMS, DOUBLE_RENAMES, SINGLE_NORMS
from .lora_file import LoRAFile, LoRAFileError, LoRALayerWeights
from .lycoris_file import LycorisLayerWeights

FLUX_FAMILY = "Flux.1"
SD3_FAMILY = "SD3 (MMDiT)"
CHROMA_FAMILY = "Chroma"
QWEN_FAMILY = "Qwen-Image"
Z_IMAGE_FAMILY = "Z-Image"
FLUX2_FAMILY = "FLUX.2"

# the prefix a rewritten layer name carries (diffusers' component name of the denoiser)
DIT_PREFIX = "transformer."
# LyCORIS kinds whose update is a plain difference (a full weight difference, ComfyUI's bias difference): each
# output row stands alone, so they split and swap by rows like a LoRA's up matrix
ROW_WISE = frozenset({"full", "bias"})


@dataclass(frozen=True)
class Route:
    """Where a file layer's output rows go: ``rows`` (start, stop) blocks of the file layer's output, joined in
    this order, are the outputs of the model's ``target`` module. ``rows`` empty: all of them, in order."""

    target: str
    rows: tuple[tuple[int, int], ...] = ()


def dit_family(model: nn.Module | None) -> str | None:
    """The family label of a diffusion transformer (``"Flux.1"``, ``"SD3 (MMDiT)"``, ``"Chroma"``,
    ``"Qwen-Image"``), None for anything else."""
    if isinstance(model, QwenImageTransformer):
        return QWEN_FAMILY
    if isinstance(model, Flux2Transformer):
        return FLUX2_FAMILY
    if isinstance(model, ZImageTransformer):
        return Z_IMAGE_FAMILY
    if isinstance(model, ChromaTransformer):
        return CHROMA_FAMILY
    if isinstance(model, FluxTransformer):
        return FLUX_FAMILY
    if isinstance(model, MMDiT):
        return SD3_FAMILY
    return None


def _rows_of(model: nn.Module, name: str) -> int:
    module = model.get_submodule(name)
    assert isinstance(module, nn.Linear)
    return int(module.out_features)


def _split(model: nn.Module, targets: tuple[str, ...]) -> tuple[Route, ...]:
    """Routes for a fused layer whose rows are ``targets``' outputs stacked in order."""
    routes, start = [], 0
    for t in targets:
        n = _rows_of(model, t)
        routes.append(Route(t, ((start, start + n),)))
        start += n
    return tuple(routes)


def _swapped(model: nn.Module, target: str) -> tuple[Route, ...]:
    """The route of a (shift, scale) layer onto diffusers' (scale, shift) one: the halves of its rows swap."""
    n = _rows_of(model, target)
    half = n // 2
    return (Route(target, ((half, n), (0, half))),)


def _qk_norms(model: nn.Module) -> Iterator[tuple[str, tuple[Route, ...]]]:
    """BFL's names of the q/k RMS norms of a Flux-like transformer's blocks (``double_blocks.N.img_attn.norm.
    query_norm``, ``single_blocks.N.norm.key_norm``, ...) -> its (diffusers') norm modules: a full difference
    (``diff``) of their scale routes there, as ComfyUI maps these names."""
    modules = dict(model.named_modules())
    blocks = (
        ("double_blocks", "transformer_blocks", DOUBLE_NORMS),
        ("single_blocks", "single_transformer_blocks", SINGLE_NORMS),
    )
    for native_list, ours_list, norms in blocks:
        for i in range(len(getattr(model, ours_list))):
            for native, ours in norms.items():
                target = f"{ours_list}.{i}." + ours.removesuffix(".weight")
                if target in modules:
                    yield f"{native_list}.{i}." + native.removesuffix(".scale"), (Route(target),)


def _flux_native(model: FluxTransformer) -> Iterator[tuple[str, tuple[Route, ...]]]:
    """BFL's layer names of a Flux transformer -> routes onto its (diffusers') modules."""
    one = {
        "img_in": "x_embedder",
        "txt_in": "context_embedder",
        "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
        "final_layer.linear": "proj_out",
    }
    if model.config.guidance_embeds:
        one["guidance_in.in_layer"] = "time_text_embed.guidance_embedder.linear_1"
        one["guidance_in.out_layer"] = "time_text_embed.guidance_embedder.linear_2"
    for native, ours in one.items():
        yield native, (Route(ours),)
    yield "final_layer.adaLN_modulation.1", _swapped(model, "norm_out.linear")
    double = {"img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear", **DOUBLE_RENAMES}
    for i in range(len(model.transformer_blocks)):
        a, b = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for native, ours in double.items():
            yield a + native, (Route(b + ours),)
        img_qkv = _split(model, tuple(b + f"attn.to_{p}" for p in "qkv"))
        txt_qkv = _split(model, tuple(b + f"attn.add_{p}_proj" for p in "qkv"))
        yield a + "img_attn.qkv", img_qkv
        yield a + "txt_attn.qkv", txt_qkv
        # XLabs' processor LoRAs: 1 is the image stream, 2 the text's
        yield a + "processor.qkv_lora1", img_qkv
        yield a + "processor.qkv_lora2", txt_qkv
        yield a + "processor.proj_lora1", (Route(b + "attn.to_out.0"),)
        yield a + "processor.proj_lora2", (Route(b + "attn.to_add_out"),)
    for i in range(len(model.single_transformer_blocks)):
        a, b = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        yield a + "modulation.lin", (Route(b + "norm.linear"),)
        yield a + "linear2", (Route(b + "proj_out"),)
        yield a + "linear1", _split(model, (*(b + f"attn.to_{p}" for p in "qkv"), b + "proj_mlp"))
        # XLabs: a LoRA on the attention's part of linear1 only (q, k, v), and on linear2 (diffusers' rule)
        yield a + "processor.qkv_lora", _split(model, tuple(b + f"attn.to_{p}" for p in "qkv"))
        yield a + "processor.proj_lora", (Route(b + "proj_out"),)


def _chroma_native(model: ChromaTransformer) -> Iterator[tuple[str, tuple[Route, ...]]]:
    """BFL's layer names of a Chroma transformer (Flux's blocks without modulation, the approximator) -> routes
    onto its (diffusers') modules."""
    one = {"img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out"}
    one["distilled_guidance_layer.in_proj"] = "distilled_guidance_layer.in_proj"
    one["distilled_guidance_layer.out_proj"] = "distilled_guidance_layer.out_proj"
    for i in range(len(model.distilled_guidance_layer.layers)):
        a = f"distilled_guidance_layer.layers.{i}."
        one[a + "in_layer"], one[a + "out_layer"] = a + "linear_1", a + "linear_2"
    for native, ours in one.items():
        yield native, (Route(ours),)
    double = DOUBLE_RENAMES  # Flux's without the modulation linears
    for i in range(len(model.transformer_blocks)):
        a, b = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for native, ours in double.items():
            yield a + native, (Route(b + ours),)
        yield a + "img_attn.qkv", _split(model, tuple(b + f"attn.to_{p}" for p in "qkv"))
        yield a + "txt_attn.qkv", _split(model, tuple(b + f"attn.add_{p}_proj" for p in "qkv"))
    for i in range(len(model.single_transformer_blocks)):
        a, b = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        yield a + "linear2", (Route(b + "proj_out"),)
        yield a + "linear1", _split(model, (*(b + f"attn.to_{p}" for p in "qkv"), b + "proj_mlp"))


# Flux.1's layers that Chroma does not have, in both vocabularies (the conditioning vector's embedders and every
# modulation linear): a file naming one was made for Flux.1
_FLUX_ONLY = re.compile(
    r"(?:^|[._])(?:img_mod[._]lin|txt_mod[._]lin|modulation[._]lin|final_layer[._]adaLN_modulation|time_in|"
    r"vector_in|guidance_in|time_text_embed|norm1[._]linear|norm1_context[._]linear|norm[._]linear|"
    r"norm_out[._]linear)(?:[._]|$)"
)


def flux_only_layers(names: list[str]) -> list[str]:
    """The names among ``names`` of Flux.1 layers that Chroma does not have (modulation linears, the timestep /
    guidance / pooled-text embedders), in any of the vocabularies above."""
    return [n for n in names if _FLUX_ONLY.search(n)]


# Flux.1's and SD3's layers in diffusers' names that Qwen-Image does not have (its blocks carry img_mod / txt_mod,
# img_mlp / txt_mlp, its input is img_in / txt_in, no pooled text, no single-stream blocks): a file naming one was
# made for one of those
_NOT_QWEN = re.compile(
    r"(?:^|[._])(?:norm1|norm1_context|norm2|norm2_context)[._]linear|(?:^|[._])(?:ff|ff_context)[._]net[._]|"
    r"(?:^|[._])(?:x_embedder|context_embedder|pos_embed|text_embedder|guidance_embedder|"
    r"single_transformer_blocks|attn2)(?:[._]|$)"
)
# Qwen-Image's own layers (a dual-stream block's modulation and MLPs in diffusers' names): no other family has them
QWEN_LAYERS = re.compile(r"transformer_blocks[._]\d+[._](?:img_mod|txt_mod|img_mlp|txt_mlp)(?:[._]|$)")


# Z-Image's own layers in either of its layouts (a block of layers / noise_refiner / context_refiner: its attention,
# SwiGLU or modulation); Lumina 2's NextDiT shares them (sdengine does not run it: a size mismatch there)
Z_IMAGE_LAYERS = re.compile(
    r"(?:^|[._])(?:layers|noise_refiner|context_refiner)[._]\d+[._](?:attention[._](?:qkv|out|to_[qkv]|to_out)|"
    r"feed_forward[._]w[123]|adaLN_modulation)(?:[._]|$)"
)


def _z_image_native(model: ZImageTransformer) -> Iterator[tuple[str, tuple[Route, ...]]]:
    """Z-Image's names -> routes onto its (diffusers') modules: diffusers' own (ai-toolkit writes them behind
    ``diffusion_model.``) and the original layout's (fused ``attention.qkv`` split by rows into q, k, v;
    ``attention.out``; ``x_embedder``; ``final_layer``)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            yield name, (Route(name),)
    yield "x_embedder", (Route(f"all_x_embedder.{PATCH_KEY}"),)
    yield "final_layer.linear", (Route(f"all_final_layer.{PATCH_KEY}.linear"),)
    yield "final_layer.adaLN_modulation.1", (Route(f"all_final_layer.{PATCH_KEY}.adaLN_modulation.1"),)
    for group in ("noise_refiner", "context_refiner", "layers"):
        for i in range(len(getattr(model, group))):
            b = f"{group}.{i}.attention."
            yield b + "qkv", _split(model, (b + "to_q", b + "to_k", b + "to_v"))
            yield b + "out", (Route(b + "to_out.0"),)


# FLUX.2's own layers in either vocabulary (its shared modulations, SwiGLU MLPs, the single blocks' fused projection
# and their output projection in diffusers' names, the timestep embedder's name): no other family has them (FLUX.1's
# and Chroma's single blocks have proj_out, not attn.to_out)
FLUX2_LAYERS = re.compile(
    r"(?:^|[._])(?:double_stream_modulation_(?:img|txt)|single_stream_modulation|to_qkv_mlp_proj|"
    r"time_guidance_embed|(?:ff|ff_context)[._]linear_(?:in|out)|single_transformer_blocks[._]\d+[._]attn[._]to_out)"
    r"(?:[._]|$)"
)


# FLUX.1's layers that FLUX.2 does not have, in both vocabularies (per-block modulation linears, the pooled-text and
# time-text embedders, GELU MLPs, the single blocks' separate projections, XLabs' processors): a file naming one was
# made for FLUX.1
_FLUX1_NOT_FLUX2 = re.compile(
    r"(?:^|[._])(?:img_mod[._]lin|txt_mod[._]lin|vector_in|time_text_embed|norm1[._]linear|norm1_context[._]linear|"
    r"(?:ff|ff_context)[._]net|processor)(?:[._]|$)|single_blocks[._]\d+[._]modulation[._]lin|"
    r"single_transformer_blocks[._]\d+[._](?:norm[._]linear|proj_mlp|proj_out|attn[._]to_[qkv])(?:[._]|$)"
)


def flux1_layers(names: list[str]) -> list[str]:
    """The names among ``names`` of FLUX.1 layers that FLUX.2 does not have, in any of the vocabularies above."""
    return [n for n in names if _FLUX1_NOT_FLUX2.search(n)]


def _flux2_native(model: Flux2Transformer) -> Iterator[tuple[str, tuple[Route, ...]]]:
    """BFL's layer names of a FLUX.2 transformer -> routes onto its (diffusers') modules (module docstring)."""
    one = {
        "img_in": "x_embedder",
        "txt_in": "context_embedder",
        "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
        "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
        "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
        "single_stream_modulation.lin": "single_stream_modulation.linear",
        "final_layer.linear": "proj_out",
    }
    if model.config.guidance_embeds:
        one["guidance_in.in_layer"] = "time_guidance_embed.guidance_embedder.linear_1"
        one["guidance_in.out_layer"] = "time_guidance_embed.guidance_embedder.linear_2"
    for native, ours in one.items():
        yield native, (Route(ours),)
    yield "final_layer.adaLN_modulation.1", _swapped(model, "norm_out.linear")
    double = {
        "img_attn.proj": "attn.to_out.0",
        "txt_attn.proj": "attn.to_add_out",
        "img_mlp.0": "ff.linear_in",
        "img_mlp.2": "ff.linear_out",
        "txt_mlp.0": "ff_context.linear_in",
        "txt_mlp.2": "ff_context.linear_out",
    }
    for i in range(len(model.transformer_blocks)):
        a, b = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for native, ours in double.items():
            yield a + native, (Route(b + ours),)
        yield a + "img_attn.qkv", _split(model, tuple(b + f"attn.to_{p}" for p in "qkv"))
        yield a + "txt_attn.qkv", _split(model, tuple(b + f"attn.add_{p}_proj" for p in "qkv"))
    for i in range(len(model.single_transformer_blocks)):
        a, b = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        yield a + "linear1", (Route(b + "attn.to_qkv_mlp_proj"),)
        yield a + "linear2", (Route(b + "attn.to_out"),)


def not_qwen_layers(names: list[str]) -> list[str]:
    """The names among ``names`` of Flux.1 / SD3 layers (diffusers' vocabulary) that Qwen-Image does not have."""
    return [n for n in names if _NOT_QWEN.search(n)]


def _sd3_native(model: MMDiT) -> Iterator[tuple[str, tuple[Route, ...]]]:
    """Stability's layer names of an MMDiT -> routes onto its (diffusers') modules."""
    one = {
        "x_embedder.proj": "pos_embed.proj",
        "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
        "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
        "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
        "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
        "context_embedder": "context_embedder",
        "final_layer.linear": "proj_out",
    }
    for native, ours in one.items():
        yield native, (Route(ours),)
    yield "final_layer.adaLN_modulation.1", _swapped(model, "norm_out.linear")
    for i, block in enumerate(model.transformer_blocks):
        x, c, b = f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block.", f"transformer_blocks.{i}."
        yield x + "adaLN_modulation.1", (Route(b + "norm1.linear"),)
        yield x + "attn.proj", (Route(b + "attn.to_out.0"),)
        yield x + "mlp.fc1", (Route(b + "ff.net.0.proj"),)
        yield x + "mlp.fc2", (Route(b + "ff.net.2"),)
        yield x + "attn.qkv", _split(model, tuple(b + f"attn.to_{p}" for p in "qkv"))
        if getattr(block, "attn2", None) is not None:  # MMDiT-X (SD3.5 Medium): the image tokens' own attention
            yield x + "attn2.qkv", _split(model, tuple(b + f"attn2.to_{p}" for p in "qkv"))
            yield x + "attn2.proj", (Route(b + "attn2.to_out.0"),)
        yield c + "attn.qkv", _split(model, tuple(b + f"attn.add_{p}_proj" for p in "qkv"))
        if getattr(block, "pre_only", False):  # the last block: the text stream ends, its modulation is 2 vectors
            yield c + "adaLN_modulation.1", _swapped(model, b + "norm1_context.linear")
        else:
            yield c + "adaLN_modulation.1", (Route(b + "norm1_context.linear"),)
            yield c + "attn.proj", (Route(b + "attn.to_add_out"),)
            yield c + "mlp.fc1", (Route(b + "ff_context.net.0.proj"),)
            yield c + "mlp.fc2", (Route(b + "ff_context.net.2"),)


def dit_routes(model: nn.Module) -> dict[str, tuple[Route, ...]]:
    """Every layer name a LoRA file may give a layer of this diffusion transformer -> where its rows go.

    diffusers' names of every Linear/Conv2d (behind ``transformer.``, ``base_model.model.``, ``lora_transformer_`` or
    ``lycoris_`` with underscores, or bare) route one-to-one; the original checkpoint's names (behind
    ``diffusion_model.``, ``lora_unet_`` with underscores, ``base_model.model.``, or bare) route as
    :func:`_flux_native` / :func:`_sd3_native` / :func:`_chroma_native` say. Qwen-Image's names are its modules' in
    every layout. Empty for a model that is not a diffusion transformer."""
    if isinstance(model, QwenImageTransformer):  # the original names are diffusers': every layout routes one-to-one
        native: dict[str, tuple[Route, ...]] = {
            name: (Route(name),) for name, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)
        }
    elif isinstance(model, ZImageTransformer):
        native = dict(_z_image_native(model))
    elif isinstance(model, Flux2Transformer):
        native = {**dict(_flux2_native(model)), **dict(_qk_norms(model))}
    elif isinstance(model, ChromaTransformer):
        native = {**dict(_chroma_native(model)), **dict(_qk_norms(model))}
    elif isinstance(model, FluxTransformer):
        native = {**dict(_flux_native(model)), **dict(_qk_norms(model))}
    elif isinstance(model, MMDiT):
        native = dict(_sd3_native(model))
    else:
        return {}
    out: dict[str, tuple[Route, ...]] = {}
    for name, m in model.named_modules():
        # every Linear/Conv2d, and the norm layers with a weight (their weight/bias differences: diff, diff_b)
        if isinstance(m, nn.Linear | nn.Conv2d) or (
            isinstance(m, NORM_TYPES) and getattr(m, "weight", None) is not None
        ):
            route = (Route(name),)
            flat = name.replace(".", "_")
            aliases = (
                DIT_PREFIX + name,
                "base_model.model." + name,
                "lora_transformer_" + flat,
                "lycoris_" + flat,
                name,
            )
            for alias in aliases:
                out.setdefault(alias, route)
    for name, routes in native.items():
        flat = name.replace(".", "_")
        for alias in ("diffusion_model." + name, "lora_unet_" + flat, "base_model.model." + name, name):
            out.setdefault(alias, routes)
    return out


def _cut(up: torch.Tensor, rows: tuple[tuple[int, int], ...]) -> torch.Tensor:
    if not rows:
        return up
    parts = [up[a:b] for a, b in rows]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def split_dit_layers(lf: LoRAFile, model: nn.Module) -> LoRAFile:
    """``lf`` with every layer it names of the diffusion transformer ``model`` rewritten onto the model's own
    module names (``transformer.<module>``): fused layers split by rows of ``up`` (same ``down``, rank and alpha),
    (shift, scale) layers with the halves of ``up`` swapped. Text-encoder layers and names of no known layout are
    left as they are (matched by the text encoders' names, or reported unmatched). A layer whose rows do not add
    up to its parts', LyCORIS on a fused or swapped layer, and two layers of the file on one module are a
    :class:`LoRAFileError` (nothing is applied)."""
    routes = dit_routes(model)
    if not routes:
        return lf
    where = str(lf.path) if lf.path is not None else lf.name
    layers: dict[str, LoRALayerWeights] = {}
    lycoris: dict[str, LycorisLayerWeights] = {}
    source: dict[str, str] = {}  # new name -> the file's name, to name both of two layers on one module

    def claim(new: str, key: str) -> None:
        prev = source.setdefault(new, key)
        if prev != key:  # (a LoRA pair and its bias difference share the file's name: one layer, no clash)
            raise LoRAFileError(
                f"{where}: two layers of the file adapt {new.removeprefix(DIT_PREFIX)} ({prev} and {key}); "
                "refused rather than guess which one is meant"
            )

    def check_rows(key: str, rows: int, rs: tuple[Route, ...]) -> None:
        total = sum(b - a for r in rs for a, b in (r.rows or ((0, rows),)))
        if rows != total:
            parts = " + ".join(r.target for r in rs)
            raise LoRAFileError(
                f"{where}: {key} has {rows} output rows, this model's {parts} have {total}: "
                f"a LoRA for another size of {dit_family(model)}"
            )

    for key, w in lf.layers.items():
        rs = routes.get(key)
        if rs is None:
            layers[key] = w
            continue
        check_rows(key, int(w.up.shape[0]), rs)
        for r in rs:
            new = DIT_PREFIX + r.target
            claim(new, key)
            layers[new] = dataclasses.replace(w, key=new, up=_cut(w.up, r.rows))
    for key, lw in lf.lycoris.items():
        rs = routes.get(key)
        if rs is None:
            lycoris[key] = lw
            continue
        cut = len(rs) != 1 or bool(rs[0].rows)
        if not cut:
            new = DIT_PREFIX + rs[0].target
            claim(new, key)
            lycoris[new] = dataclasses.replace(lw, key=new)
            continue
        if lw.algo in ROW_WISE:  # a difference: its rows are cut here
            check_rows(key, int(next(iter(lw.parts.values())).shape[0]), rs)
            for r in rs:
                new = DIT_PREFIX + r.target
                claim(new, key)
                lycoris[new] = dataclasses.replace(lw, key=new, parts={k: _cut(t, r.rows) for k, t in lw.parts.items()})
            continue
        if lw.algo not in FACTOR_ONLY or lw.magnitude is not None:
            kind = "fused" if len(rs) > 1 else "(shift, scale)-swapped"
            raise LoRAFileError(
                f"{where}: {key} is a {lw.label} layer on a {kind} layer of the original layout "
                f"({' + '.join(r.target for r in rs)}); its update depends on the whole layer, so it cannot be cut "
                "into the model's parts (LoRA, LoHa, LoKr and weight/bias differences can)"
            )
        shape = lw.shape()
        if isinstance(shape, str):
            raise LoRAFileError(f"{where}: {key}: {shape}")
        check_rows(key, shape[0], rs)
        for r in rs:  # the factors stay whole; each part's layer takes its rows of their update
            new = DIT_PREFIX + r.target
            claim(new, key)
            rows = r.rows or ((0, shape[0]),)
            lycoris[new] = dataclasses.replace(lw, key=new, rows=rows)
    return dataclasses.replace(lf, layers=layers, lycoris=lycoris)


__all__ = [
    "CHROMA_FAMILY",
    "DIT_PREFIX",
    "FLUX2_FAMILY",
    "FLUX2_LAYERS",
    "ROW_WISE",
    "FLUX_FAMILY",
    "QWEN_FAMILY",
    "QWEN_LAYERS",
    "SD3_FAMILY",
    "Z_IMAGE_FAMILY",
    "Z_IMAGE_LAYERS",
    "Route",
    "dit_family",
    "dit_routes",
    "flux1_layers",
    "flux_only_layers",
    "not_qwen_layers",
    "split_dit_layers",
]
