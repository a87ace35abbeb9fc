"""ControlNet at generation time: control-image preprocessors, loading ControlNets, and the controlled U-Net.

Three parts, in the order data flows:

1. **Preprocessors** (:func:`preprocess`): turn a photo into the map a ControlNet was trained on, with
   OpenCV/NumPy only. Available here: ``canny`` (Canny edges, ``low``/``high`` thresholds), ``scribble``
   (dark strokes on a light background -> white strokes on black), ``threshold`` (binarise at
   ``threshold``), ``softedge`` (Sobel gradient magnitude of a blurred image, a model-free stand-in for
   HED/PiDiNet soft edges), ``invert`` (black-on-white line art -> white-on-black) and ``none`` (a map
   you prepared yourself: a depth map, a pose drawing, a segmentation, a tile). The usual preprocessors
   listed in :data:`NEEDS_A_MODEL` (depth, openpose, normal, HED, MLSD, lineart, segmentation) run
   neural networks whose weights cannot be had here: make those maps with another tool and pass them
   with ``none``.
2. **Loading** (:func:`load_controlnet`): a diffusers folder (``config.json`` + weights), a diffusers-
   layout single file, or an original ``control_*.safetensors``/``.pth`` file (``control_model.*``
   keys), SD 1.x and SD 2.x. A ControlNet whose architecture does not fit the base U-Net is refused,
   the mismatch named.
3. **The controlled U-Net** (:func:`build_controlled_unet`): a callable used in place of the U-Net by
   the Denoiser. At each call it works out which sampling step it is in from the timestep, runs every
   ControlNet that is active at that step (``start``/``end`` fractions, diffusers' ``controlnet_keep``
   rule), sums their residuals (each times its conditioning scale) and runs the U-Net with them.

CLI helpers: :func:`parse_control_spec` reads ``--control TYPE:IMAGE[:WEIGHT[:START:END]]`` and
:func:`control_units_from_cli` pairs those with ``--controlnet PATH`` flags.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sdengine.errors import SdengineError
from sdengine.models.controlnet import ControlNet, ControlNetConfig
from sdengine.models.unet import UNetConfig
from sdengine.weights import controlnet_keys as ck
from sdengine.weights.io import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, WeightsError, load_file, parse_dtype

log = logging.getLogger(__name__)

ImageLike = Image.Image | np.ndarray | Tensor | str | Path

CONFIG_METADATA_KEY = "sdengine.controlnet_config"  # diffusers config JSON in original-layout files we write
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")


class ControlNetError(SdengineError, ValueError):
    """A user-facing ControlNet problem (bad file, wrong base model, bad settings); one clear line."""


# ==========================================================================================================
# 1. Preprocessors
# ==========================================================================================================


def load_control_image(image: ImageLike) -> Image.Image:
    """Any supported input -> an RGB PIL image. Grayscale becomes RGB; transparency is composited onto
    black, which is "nothing here" for every control map (edges, scribbles and poses are drawn on black).
    A path that cannot be read raises ControlNetError naming it."""
    if isinstance(image, str | Path):
        path = Path(image)
        try:
            with Image.open(path) as im:
                im.load()
                image = im.copy()
        except FileNotFoundError:
            raise ControlNetError(f"control image not found: {path}") from None
        except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
            raise ControlNetError(f"control image {path} cannot be read ({type(e).__name__}: {e})") from None
    if isinstance(image, Tensor):
        image = _tensor_to_array(image)
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    if not isinstance(image, Image.Image):
        raise ControlNetError(f"control image must be a path, a PIL image or an array, got {type(image).__name__}")
    return _to_rgb(image)


def _tensor_to_array(t: Tensor) -> np.ndarray:
    t = t.detach().float().cpu()
    if t.ndim == 4:
        if t.shape[0] != 1:
            raise ControlNetError(f"expected one control image, got a batch of {t.shape[0]}")
        t = t[0]
    if t.ndim == 3 and t.shape[0] in (1, 3, 4):
        t = t.permute(1, 2, 0)  # (C, H, W) -> (H, W, C)
    return t.numpy()


def _array_to_pil(a: np.ndarray) -> Image.Image:
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ControlNetError(f"control image array must be (H, W), (H, W, 3) or (H, W, 4), got {a.shape}")
    if a.dtype != np.uint8:
        a = np.clip(np.asarray(a, dtype=np.float64), 0.0, 1.0) * 255.0  # float arrays are 0..1
        a = np.round(a).astype(np.uint8)
    return Image.fromarray(a)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return img.convert("RGB")


def _gray(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("L"), dtype=np.uint8)  # (H, W)


def _rgb(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(a[:, :, None], 3, axis=2).astype(np.uint8))


def canny(img: Image.Image, low: float = 100, high: float = 200) -> Image.Image:
    """Canny edges (Canny 1986) as white lines on black; ``low``/``high`` are the hysteresis thresholds
    (100/200 as in the ControlNet examples)."""
    import cv2

    if not 0 <= low <= high:
        raise ControlNetError(f"canny thresholds must satisfy 0 <= low <= high, got low={low}, high={high}")
    return _rgb(cv2.Canny(np.asarray(img.convert("RGB")), float(low), float(high)))


def threshold(img: Image.Image, threshold: float = 127) -> Image.Image:
    """Binarise: pixels brighter than ``threshold`` (0..255) become white, the rest black."""
    g = _gray(img)
    return _rgb(np.where(g > threshold, 255, 0))


def scribble(img: Image.Image, threshold: float = 127) -> Image.Image:
    """A hand drawing -> white strokes on black, what the scribble ControlNets take. Strokes are whatever
    differs from the background: dark strokes on a light page are inverted, light on dark kept."""
    g = _gray(img)
    if np.median(g) > 127:  # a light page
        g = 255 - g
    return _rgb(np.where(g > 255 - threshold, 255, 0))


def softedge(img: Image.Image, blur: float = 1.5) -> Image.Image:
    """Soft edges: Sobel gradient magnitude of the Gaussian-blurred image, scaled to 0..255 (a model-free
    stand-in for HED/PiDiNet, which are networks)."""
    import cv2

    g = _gray(img).astype(np.float32) / 255.0
    if blur > 0:
        g = cv2.GaussianBlur(g, (0, 0), blur)
    gx = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3)
    mag = np.sqrt(gx * gx + gy * gy)
    peak = float(mag.max())
    if peak > 0:
        mag = mag / peak
    return _rgb(np.round(mag * 255.0))


def invert(img: Image.Image) -> Image.Image:
    """255 - pixel: black-on-white line art becomes the white-on-black the line-art ControlNets expect."""
    return Image.fromarray(255 - np.asarray(img.convert("RGB"), dtype=np.uint8))


def identity(img: Image.Image) -> Image.Image:
    return img


PREPROCESSORS: dict[str, Callable[..., Image.Image]] = {
    "canny": canny,
    "scribble": scribble,
    "threshold": threshold,
    "softedge": softedge,
    "invert": invert,
    "none": identity,
}

# Usual ControlNet preprocessors that are neural networks (weights not available offline here).
NEEDS_A_MODEL: dict[str, str] = {
    "depth": "MiDaS / ZoeDepth / Depth Anything depth estimation",
    "openpose": "OpenPose body/hand/face keypoint networks",
    "normal": "BAE / NormalBae normal estimation",
    "hed": "HED edge network (softedge uses Sobel instead)",
    "pidinet": "PiDiNet edge network (softedge uses Sobel instead)",
    "mlsd": "M-LSD line-segment network",
    "lineart": "the lineart / lineart_anime networks (use invert on drawn line art)",
    "seg": "UperNet / OneFormer semantic segmentation",
}


def preprocess(kind: str, image: ImageLike, **options: float) -> Image.Image:
    """The control map for ``image`` (RGB PIL) by preprocessor ``kind`` (see :data:`PREPROCESSORS`)."""
    if kind not in PREPROCESSORS:
        raise ControlNetError(_unknown_type_message(kind))
    return PREPROCESSORS[kind](load_control_image(image), **options)


def _unknown_type_message(kind: str) -> str:
    valid = ", ".join(PREPROCESSORS)
    if kind in NEEDS_A_MODEL:
        return (f"control type {kind!r} needs a model that is not available here ({NEEDS_A_MODEL[kind]}): "
                f"make the map with another tool and use type 'none'; valid types: {valid}")
    return f"unknown control type {kind!r}; valid types: {valid}"


# ==========================================================================================================
# 2. Loading
# ==========================================================================================================


def _family(cross_attention_dim: int | None) -> str:
    return {768: "SD 1.x", 1024: "SD 2.x"}.get(cross_attention_dim or 0, f"a {cross_attention_dim}-wide text encoder")


def check_compatible(cn: ControlNetConfig, base: UNetConfig, *, name: str = "ControlNet") -> None:
    """Raise ControlNetError naming every way the ControlNet's encoder differs from the base U-Net's."""
    u = cn.unet
    if u.cross_attention_dim != base.cross_attention_dim:
        raise ControlNetError(
            f"{name} is for {_family(u.cross_attention_dim)} (cross-attention width {u.cross_attention_dim}) "
            f"but the model is {_family(base.cross_attention_dim)} (width {base.cross_attention_dim})"
        )
    fields = ("block_out_channels", "layers_per_block", "attention", "mid_block", "transformer_layers_per_block",
              "use_linear_projection", "flip_sin_to_cos", "freq_shift")
    diffs = [f"{f} {getattr(u, f)!r} vs model {getattr(base, f)!r}"
             for f in fields if getattr(u, f) != getattr(base, f)]
    if u.projection_class_embeddings_input_dim is not None and (
        u.projection_class_embeddings_input_dim != base.projection_class_embeddings_input_dim
    ):
        diffs.append(f"pooled text vector of {u.projection_class_embeddings_input_dim} "
                     f"vs model {base.projection_class_embeddings_input_dim}")
    if diffs:
        raise ControlNetError(f"{name} does not fit this model's U-Net: " + "; ".join(diffs))


def _hint_channels(sd: Mapping[str, Tensor], original: bool) -> tuple[int, tuple[int, ...]]:
    """(conditioning channels, conditioning_embedding_out_channels) from hint-encoder shapes."""
    if original:
        idx = sorted(int(k.split(".")[1]) for k in sd if k.startswith("input_hint_block.") and k.endswith(".weight"))
        convs = [sd[f"input_hint_block.{i}.weight"] for i in idx[:-1]]  # the last is conv_out
    else:
        n = len({k.split(".")[2] for k in sd if k.startswith("controlnet_cond_embedding.blocks.")})
        convs = [sd["controlnet_cond_embedding.conv_in.weight"]]
        convs += [sd[f"controlnet_cond_embedding.blocks.{k}.weight"] for k in range(n)]
    # conv_in, then pairs (same-size conv, stride-2 conv): the level widths are conv_in's output and
    # every stride-2 conv's output.
    widths = [int(convs[0].shape[0])] + [int(c.shape[0]) for c in convs[2::2]]
    return int(convs[0].shape[1]), tuple(widths)


def _config_from_weights(sd: Mapping[str, Tensor], *, base: UNetConfig | None) -> ControlNetConfig:
    """Synthesise a ControlNetConfig from original-layout shapes (files carry no config).

    Shapes give the layout, widths, context width and projection kind; not the number of attention
    heads: SD1 uses 8 heads, SD2 64-wide heads, anything else copies the base model's."""
    from sdengine.weights.detect import _ints, unet_layout_from_ldm

    layout = unet_layout_from_ldm(sd)
    lpb = layout.layers_per_block
    chs = tuple(int(sd[f"input_blocks.{1 + lv * (lpb + 1)}.0.out_layers.3.weight"].shape[0])
                for lv in range(layout.num_levels))
    first_attn = next((f"input_blocks.{1 + lv * (lpb + 1)}.1" for lv in range(layout.num_levels)
                       if layout.down_attention[lv]), "middle_block.1")
    to_k = sd.get(f"{first_attn}.transformer_blocks.0.attn2.to_k.weight")
    context = int(to_k.shape[1]) if to_k is not None else None
    proj_in = sd.get(f"{first_attn}.proj_in.weight")
    linear = proj_in is not None and proj_in.ndim == 2
    depth = len(_ints(rf"^{first_attn.replace('.', r'.')}\.transformer_blocks\.(\d+)\.", list(sd))) or 1
    attention = tuple("cross" if a else "none" for a in layout.down_attention)
    if base is not None and base.block_out_channels == chs and base.cross_attention_dim == context:
        heads, upcast = base.num_heads, base.upcast_attention
    elif context == 1024:
        heads, upcast = tuple(max(c // 64, 1) for c in chs), False
    else:
        heads, upcast = (8,) * len(chs), False
    cond_ch, hint = _hint_channels(sd, original=True)
    ucfg = UNetConfig(
        in_channels=int(sd["input_blocks.0.0.weight"].shape[1]),
        out_channels=4,
        block_out_channels=chs,
        layers_per_block=lpb,
        attention=attention,  # type: ignore[arg-type]
        num_heads=heads,
        mid_block="middle_block.0.in_layers.0.weight" in sd,
        mid_attention="cross",
        cross_attention_dim=context,
        use_linear_projection=linear,
        transformer_layers_per_block=depth,
        upcast_attention=upcast,
        norm_num_groups=base.norm_num_groups if base is not None else 32,
    )
    return ControlNetConfig(ucfg, conditioning_channels=cond_ch, conditioning_embedding_out_channels=hint)


def _layout(cfg: ControlNetConfig) -> Any:
    from sdengine.weights.keymaps import UNetLayout

    u = cfg.unet
    n = len(u.block_out_channels)
    return UNetLayout(n, u.layers_per_block, tuple(a != "none" for a in u.attention), (False,) * n,
                      u.mid_block and u.mid_attention != "none")


def _find_weights(folder: Path) -> Path:
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise ControlNetError(f"{folder}: no ControlNet weights (expected {WEIGHT_NAMES[0]})")


@dataclass
class LoadedControlNet:
    """A ControlNet state dict in diffusers names, its config, and where it came from."""

    state_dict: dict[str, Tensor]
    config: ControlNetConfig
    source: Path
    layout: str  # "diffusers" or "original"


def read_controlnet(path: str | Path, *, base: UNetConfig | None = None) -> LoadedControlNet:
    """Read a ControlNet from disk into diffusers names + config, without building the model."""
    path = Path(path)
    if path.is_dir():
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            sub = path / "controlnet"
            if (sub / "config.json").is_file():
                return read_controlnet(sub, base=base)
            raise ControlNetError(f"{path}: not a ControlNet folder (no config.json)")
        raw = json.loads(cfg_path.read_text())
        if raw.get("_class_name") not in (None, "ControlNetModel"):
            raise ControlNetError(f"{path}: holds a {raw.get('_class_name')}, not a ControlNetModel")
        try:
            cfg = ControlNetConfig.from_diffusers(raw)
        except ValueError as e:
            raise ControlNetError(f"{path}: {e}") from None
        sd, _ = load_file(_find_weights(path))
        return LoadedControlNet(dict(sd), cfg, path, "diffusers")
    if not path.exists():
        raise ControlNetError(f"ControlNet not found: {path}")
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
        raise ControlNetError(f"{path}: expected a ControlNet folder or a .safetensors/.pth/.ckpt file")
    sd, info = load_file(path)
    return _from_single_file(sd, info, path, base)


def _from_single_file(sd: Mapping[str, Tensor], info: Mapping[str, Any], path: Path,
                      base: UNetConfig | None) -> LoadedControlNet:
    sd = ck.strip_prefix(sd)
    keys = list(sd)
    if "controlnet_cond_embedding.conv_in.weight" in sd:  # diffusers names in one file
        cfg_json = info.get(CONFIG_METADATA_KEY)
        if cfg_json is None and (path.parent / "config.json").is_file():
            cfg_json = (path.parent / "config.json").read_text()
        if cfg_json is not None:
            return LoadedControlNet(dict(sd), ControlNetConfig.from_diffusers(json.loads(cfg_json)), path, "diffusers")
        # No config: go through the original names to read the architecture off the shapes.
        from sdengine.weights.detect import unet_layout_from_diffusers

        layout = unet_layout_from_diffusers(sd)
        hint = 1 + len({k.split(".")[2] for k in sd if k.startswith("controlnet_cond_embedding.blocks.")}) // 2
        original, _ = ck.controlnet_diffusers_to_original(sd, layout, hint)
        cfg = _config_from_weights(original, base=base)
        return LoadedControlNet(dict(sd), cfg, path, "diffusers")
    if "input_hint_block.0.weight" not in sd:
        if any(k.startswith("model.diffusion_model.") for k in keys):
            raise ControlNetError(f"{path}: this is a Stable Diffusion checkpoint, not a ControlNet")
        if any(k.startswith(("lora_", "lora_unet_")) or ".lora_" in k for k in keys):
            raise ControlNetError(f"{path}: this is a LoRA, not a ControlNet")
        prefixes = sorted({k.split(".")[0] for k in keys})[:6]
        raise ControlNetError(f"{path}: not a ControlNet (no input_hint_block / controlnet_cond_embedding weights; "
                              f"top-level names: {prefixes})")
    label = sd.get("label_emb.0.0.weight")
    if label is not None:
        raise ControlNetError(f"{path}: a ControlNet with label_emb (SDXL-style); only SD 1.x/2.x ControlNets are "
                              "supported")
    if CONFIG_METADATA_KEY in info:
        cfg = ControlNetConfig.from_diffusers(json.loads(info[CONFIG_METADATA_KEY]))
    else:
        try:
            cfg = _config_from_weights(sd, base=base)
        except (KeyError, WeightsError) as e:
            raise ControlNetError(f"{path}: cannot read the ControlNet architecture ({e})") from None
    renamed, unknown = ck.controlnet_original_to_diffusers(sd, _layout(cfg),
                                                           len(cfg.conditioning_embedding_out_channels))
    if unknown:
        shown = ", ".join(unknown[:5])
        raise ControlNetError(f"{path}: unexpected ControlNet keys: {shown} ({len(unknown)} in all)")
    return LoadedControlNet(renamed, cfg, path, "original")


def load_controlnet(
    path: str | Path,
    *,
    base: UNetConfig | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> ControlNet:
    """A ControlNet from a diffusers folder, a diffusers-layout file or an original ``control_*`` file.

    ``base``: the U-Net config it will be used with; a ControlNet that does not fit is refused with the
    mismatch named (an SD 2.x ControlNet on an SD 1.x model, ...)."""
    from sdengine.weights.loading import build_on_meta

    loaded = read_controlnet(path, base=base)
    if base is not None:
        check_compatible(loaded.config, base, name=f"ControlNet {Path(path).name}")
    cfg = loaded.config
    try:
        net = build_on_meta(lambda: ControlNet(cfg), loaded.state_dict, name=f"ControlNet {path}",
                            dtype=parse_dtype(dtype))
    except WeightsError as e:
        raise ControlNetError(str(e)) from None
    assert isinstance(net, ControlNet)
    return net.to(device) if device is not None else net


def save_controlnet(net: ControlNet, dst: str | Path, *, layout: str = "diffusers",
                    dtype: str | torch.dtype | None = None) -> Path:
    """Write ``net`` as a diffusers folder (``layout="diffusers"``: config.json +
    diffusion_pytorch_model.safetensors) or an original-layout ``control_model.*`` ``.safetensors`` file
    (``layout="original"``, the config kept in the file's metadata so it loads back exactly)."""
    from sdengine.weights.io import save_safetensors
    from sdengine.weights.loading import DIFFUSERS_VERSION

    dst = Path(dst)
    sd = {k: v.detach() for k, v in net.state_dict().items()}
    cfg = {**net.config.to_diffusers(), "_diffusers_version": DIFFUSERS_VERSION}
    if layout == "diffusers":
        dst.mkdir(parents=True, exist_ok=True)
        (dst / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        save_safetensors(sd, dst / WEIGHT_NAMES[0], metadata={"format": "pt"}, dtype=dtype)
        return dst
    if layout != "original":
        raise ControlNetError(f"unknown ControlNet layout {layout!r}; valid: diffusers, original")
    if dst.suffix.lower() != ".safetensors":
        raise ControlNetError(f"{dst}: original-layout ControlNets are written as .safetensors")
    original, bad = ck.controlnet_diffusers_to_original(sd, _layout(net.config),
                                                        len(net.config.conditioning_embedding_out_channels))
    if bad:
        raise ControlNetError(f"ControlNet keys with no original name: {', '.join(bad[:5])}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors({ck.CONTROL_PREFIX + k: v for k, v in original.items()}, dst,
                     metadata={"format": "pt", CONFIG_METADATA_KEY: json.dumps(cfg, sort_keys=True)}, dtype=dtype)
    return dst


# ==========================================================================================================
# 3. The controlled U-Net
# ==========================================================================================================

Unit = tuple[Any, Any, float, float, float]  # (model_or_path, image, scale, start, end)


def check_unit_settings(scale: float, start: float, end: float, *, name: str = "ControlNet") -> None:
    """start/end must satisfy 0 <= start < end <= 1 (error); a scale outside [0, 2] is warned about."""
    if not (math.isfinite(start) and math.isfinite(end)) or start < 0 or end > 1:
        raise ControlNetError(f"{name}: start and end are fractions of the steps in [0, 1], got {start}, {end}")
    if start >= end:
        raise ControlNetError(f"{name}: start ({start}) must be less than end ({end})")
    if not math.isfinite(scale):
        raise ControlNetError(f"{name}: weight must be a number, got {scale}")
    if not 0.0 <= scale <= 2.0:
        msg = f"{name}: weight {scale} is outside the usual range [0, 2]"
        warnings.warn(msg, stacklevel=3)
        log.warning(msg)


def control_image_tensor(image: ImageLike, width: int, height: int) -> Tensor:
    """(1, 3, height, width) float32 in [0, 1]: RGB-converted and resized (Lanczos) to the output size,
    as diffusers' control image processor does (``VaeImageProcessor(do_normalize=False)``)."""
    if isinstance(image, Tensor) and image.ndim in (3, 4) and image.is_floating_point():
        t = image.detach().float()
        t = t[None] if t.ndim == 3 else t
        if t.shape[1] == 1:
            t = t.expand(-1, 3, -1, -1)
        elif t.shape[1] == 4:
            t = t[:, :3] * t[:, 3:]  # onto black
        if t.shape[1] != 3:
            raise ControlNetError(f"control image tensor must have 1, 3 or 4 channels, got {tuple(t.shape)}")
        if tuple(t.shape[-2:]) != (height, width):
            t = torch.nn.functional.interpolate(t, size=(height, width), mode="bilinear", antialias=True)
        return t.clamp(0, 1)
    img = load_control_image(image)
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.LANCZOS)
    arr = np.asarray(img, dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


@dataclass
class _Unit:
    net: ControlNet
    image: Tensor  # (N, 3, H, W) on the device, the ControlNet's dtype
    scale: float
    keep: list[bool]  # per step index


def step_keep(steps: int, start: float, end: float) -> list[bool]:
    """diffusers' ``controlnet_keep``: step i (of ``steps``) is controlled unless i/steps < start or
    (i+1)/steps > end."""
    return [not (i / steps < start or (i + 1) / steps > end) for i in range(steps)]


class ControlledUNet:
    """``model(x, t, *, encoder_hidden_states, **kw)``: the U-Net with the active ControlNets' residuals.

    The step index comes from ``t``: the last grid step whose timestep is >= t (exact for every grid
    evaluation; the midpoint evaluations of second-order samplers count with the step they start from).
    With guess mode and classifier-free guidance (``x`` holding ``2 * batch_size`` rows, the conditional
    half first as sdengine's CFGDenoiser stacks it), ControlNets see the conditional half only and the
    unconditional half gets no residuals, as in diffusers.
    """

    def __init__(self, unet: Any, units: list[_Unit], timesteps: Tensor, *, guess_mode: bool = False,
                 batch_size: int | None = None) -> None:
        self.unet = unet
        self.units = units
        self.timesteps = [float(t) for t in timesteps]
        self.guess_mode = guess_mode
        self.batch_size = batch_size

    def __getattr__(self, name: str) -> Any:  # config, dtype, ... of the wrapped U-Net
        if name == "unet":
            raise AttributeError(name)
        return getattr(self.unet, name)

    def step_index(self, t: Tensor | float) -> int:
        value = float(torch.as_tensor(t).reshape(-1)[0])
        tol = 1e-4 * max(1.0, abs(value))
        idx = 0
        for i, ts in enumerate(self.timesteps):
            if ts >= value - tol:
                idx = i
            else:
                break
        return idx

    def residuals(self, x: Tensor, t: Tensor | float, encoder_hidden_states: Tensor,
                  **kw: Any) -> tuple[list[Tensor] | None, Tensor | None]:
        i = self.step_index(t)
        b = x.shape[0]
        halves = self.guess_mode and self.batch_size is not None and b == 2 * self.batch_size
        rows = b // 2 if halves else b
        down: list[Tensor] | None = None
        mid: Tensor | None = None
        for unit in self.units:
            if not unit.keep[min(i, len(unit.keep) - 1)]:
                continue
            net = unit.net
            xi = x[:rows, : net.config.unet.in_channels]  # the latent only, without inpainting's extra channels
            ctx = encoder_hidden_states[:rows]
            tt = torch.as_tensor(t, device=x.device)
            tt = tt[:rows] if tt.ndim == 1 and tt.shape[0] == b else tt
            img = unit.image
            if img.shape[0] != rows:
                img = img.repeat(rows // img.shape[0], 1, 1, 1) if rows % img.shape[0] == 0 else img[:1].expand(
                    rows, -1, -1, -1)
            extra = {}
            # A ControlNet trained without the U-Net's class (pooled text) embedding does not read it.
            if kw.get("class_labels") is not None and getattr(net, "class_embedding", None) is not None:
                extra["class_labels"] = kw["class_labels"][:rows]
            d, m = net(xi.to(net.dtype), tt, img, encoder_hidden_states=ctx.to(net.dtype), scale=unit.scale,
                       guess_mode=self.guess_mode, **extra)
            if halves:  # no control on the unconditional half (second half in sdengine's CFG batch)
                d = [torch.cat([r, torch.zeros_like(r)]) for r in d]
                m = torch.cat([m, torch.zeros_like(m)])
            if down is None or mid is None:
                down, mid = d, m
            else:
                down = [a + r for a, r in zip(down, d, strict=True)]
                mid = mid + m
        return down, mid

    def __call__(self, x: Tensor, t: Tensor | float, *, encoder_hidden_states: Tensor, **kw: Any) -> Tensor:
        down, mid = self.residuals(x, t, encoder_hidden_states, **kw)
        if down is not None and mid is not None:
            dt = x.dtype if not isinstance(self.unet, torch.nn.Module) else _module_dtype(self.unet, x.dtype)
            kw["down_block_additional_residuals"] = [r.to(dt) for r in down]
            kw["mid_block_additional_residual"] = mid.to(dt)
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states, **kw)


def _module_dtype(m: torch.nn.Module, default: torch.dtype) -> torch.dtype:
    p = next(m.parameters(), None)
    return p.dtype if p is not None else default


def build_controlled_unet(
    unet: Any,
    units: Sequence[Unit],
    *,
    width: int,
    height: int,
    grid: Any,
    guess_mode: bool = False,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int | None = None,
    start_step: int = 0,
) -> ControlledUNet:
    """The U-Net callable with ControlNets attached, for the Denoiser to use in place of the U-Net.

    ``units``: ``(model_or_path, image, scale, start, end)`` each; ``model_or_path`` a :class:`ControlNet`
    or anything :func:`load_controlnet` reads; ``image`` a control map (PIL, array, path or (1, 3, H, W)
    tensor in [0, 1]) used as it is, resized to ``width`` x ``height``; ``scale`` its conditioning scale;
    ``start``/``end`` the fractions of the steps it acts on. ``grid``: the sampling grid
    (``.timesteps``) of this run; ``start_step``: the first step that runs (img2img), so that the
    fractions count the steps that actually run, as diffusers does. ``batch_size``: images per call
    before CFG doubling; needed by guess mode to find the conditional half.
    """
    torch_dtype = parse_dtype(dtype) if dtype is not None else None
    if device is None:
        device = next(unet.parameters()).device if isinstance(unet, torch.nn.Module) else "cpu"
    base_cfg = getattr(unet, "config", None)
    timesteps = torch.as_tensor(getattr(grid, "timesteps", grid)).reshape(-1)[start_step:]
    steps = int(timesteps.shape[0])
    if steps < 1:
        raise ControlNetError(f"no steps to control (grid of {timesteps.shape[0] + start_step}, start {start_step})")
    prepared: list[_Unit] = []
    for k, unit in enumerate(units):
        if len(unit) != 5:
            raise ControlNetError(f"ControlNet unit {k} must be (model_or_path, image, scale, start, end)")
        model, image, scale, start, end = unit
        name = f"ControlNet {k + 1}" if not isinstance(model, str | Path) else f"ControlNet {Path(model).name}"
        check_unit_settings(float(scale), float(start), float(end), name=name)
        if isinstance(model, ControlNet):
            # A model the caller owns (maybe one being trained): moved if it must be, otherwise left alone.
            net = model
            if isinstance(base_cfg, UNetConfig):
                check_compatible(net.config, base_cfg, name=name)
        else:
            net = load_controlnet(model, base=base_cfg if isinstance(base_cfg, UNetConfig) else None)
            net.eval().requires_grad_(False)
        net = net.to(device=device, dtype=torch_dtype) if torch_dtype is not None else net.to(device)
        img = control_image_tensor(image, width, height)
        if img.shape[1] != net.config.conditioning_channels:
            if net.config.conditioning_channels == 1:
                img = img.mean(dim=1, keepdim=True)
            else:
                raise ControlNetError(f"{name} takes {net.config.conditioning_channels}-channel control images")
        prepared.append(_Unit(net, img.to(device=device, dtype=net.dtype), float(scale),
                              step_keep(steps, float(start), float(end))))
    return ControlledUNet(unet, prepared, timesteps, guess_mode=guess_mode, batch_size=batch_size)


# ==========================================================================================================
# CLI helpers
# ==========================================================================================================


@dataclass(frozen=True)
class ControlSpec:
    """One ``--control TYPE:IMAGE[:WEIGHT[:START:END]]``."""

    type: str
    image: str
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_control_spec_full(text: str) -> ControlSpec:
    """``TYPE:IMAGE[:WEIGHT[:START:END]]`` -> ControlSpec. Trailing numbers are options, everything
    between the type and them is the image path (so ``C:\\x.png`` and names with colons still work)."""
    kind, sep, rest = text.partition(":")
    kind = kind.strip().lower()
    if not sep or not rest:
        raise ControlNetError(f"--control {text!r}: expected TYPE:IMAGE[:WEIGHT[:START:END]], e.g. canny:edges.png:0.8")
    if kind not in PREPROCESSORS:
        raise ControlNetError(_unknown_type_message(kind))
    parts = rest.split(":")
    numbers: list[float] = []
    while len(parts) > 1 and len(numbers) < 3 and (v := _number(parts[-1])) is not None:
        numbers.insert(0, v)
        parts.pop()
    image = ":".join(parts)
    if not image:
        raise ControlNetError(f"--control {text!r}: no image given")
    if len(numbers) == 2:  # WEIGHT:START without END is ambiguous: read as part of the name? refuse.
        raise ControlNetError(f"--control {text!r}: give WEIGHT, or WEIGHT:START:END")
    weight = numbers[0] if numbers else 1.0
    start, end = (numbers[1], numbers[2]) if len(numbers) == 3 else (0.0, 1.0)
    check_unit_settings(weight, start, end, name=f"--control {text}")
    return ControlSpec(kind, image, weight, start, end)


def parse_control_spec(text: str) -> tuple[str, str, float]:
    """``TYPE:IMAGE[:WEIGHT]`` -> (type, image path, weight); unknown types list the valid ones, a weight
    outside [0, 2] is warned about."""
    spec = parse_control_spec_full(text)
    return spec.type, spec.image, spec.weight


def control_units_from_cli(
    controls: Sequence[str], controlnets: Sequence[str], **preprocess_options: float
) -> list[tuple[str, Image.Image, float, float, float]]:
    """Pair repeated ``--control`` and ``--controlnet`` flags in order -> ``(path, control map, weight,
    start, end)`` units, each image read (named if unreadable) and preprocessed by its type."""
    if len(controls) != len(controlnets):
        raise ControlNetError(f"{len(controls)} --control but {len(controlnets)} --controlnet: give one "
                              "--controlnet MODEL per --control TYPE:IMAGE")
    out = []
    for text, path in zip(controls, controlnets, strict=True):
        spec = parse_control_spec_full(text)
        options = {k: v for k, v in preprocess_options.items() if k in _option_names(spec.type)}
        out.append((path, preprocess(spec.type, spec.image, **options), spec.weight, spec.start, spec.end))
    return out


def _option_names(kind: str) -> set[str]:
    import inspect

    params = list(inspect.signature(PREPROCESSORS[kind]).parameters)
    return set(params[1:])


__all__ = [
    "NEEDS_A_MODEL",
    "PREPROCESSORS",
    "ControlNetError",
    "ControlSpec",
    "ControlledUNet",
    "LoadedControlNet",
    "build_controlled_unet",
    "check_compatible",
    "check_unit_settings",
    "control_image_tensor",
    "control_units_from_cli",
    "load_control_image",
    "load_controlnet",
    "parse_control_spec",
    "parse_control_spec_full",
    "preprocess",
    "read_controlnet",
    "save_controlnet",
    "step_keep",
]
