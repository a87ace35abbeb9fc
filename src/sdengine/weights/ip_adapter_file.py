"""IP-Adapter files (Tencent AI Lab's release, ``h94/IP-Adapter``): the layouts users have, read into
:class:`sdengine.models.ip_adapter.IPAdapter`.

* ``.safetensors``: flat names ``image_proj.<name>`` (the image projection's state dict) and
  ``ip_adapter.<N>.to_k_ip.weight`` / ``ip_adapter.<N>.to_v_ip.weight``;
* ``.bin`` (a torch pickle, read with ``weights_only``): ``{"image_proj": {...}, "ip_adapter": {...}}``, the same
  names under the two dicts.

``N`` numbers every attention processor of diffusers' U-Net (self- and cross-attention), so the cross-attention
layers are ``1, 3, 5, ...`` (:mod:`sdengine.nn.ip_adapter`): 16 of them for SD 1.x (``1`` .. ``31``), 70 for SDXL.

The architecture comes from the shapes, by the names diffusers' loader tells the kinds apart by: ``proj.weight``
(``[tokens * C, D]``) is the plain projection (:class:`ImageProjModel`; the tokens are its width over the LayerNorm's
``C``), ``proj.3.weight`` the full-face MLP (:class:`MLPProjModel`), ``latents`` the Plus perceiver resampler
(:class:`Resampler`: queries and width from ``latents`` ``[1, Q, W]``, depth from the ``layers.<i>`` present, heads
as the query width over 64, the feed-forward's factor from its first product). FaceID adapters (an id-embedding
projection, LoRA weights in ``ip_adapter``) are refused by name.

FLUX.1 adapters (XLabs' ``flux-ip-adapter``, the layout diffusers' ``FluxPipeline.load_ip_adapter`` reads): flat
``.safetensors`` names ``ip_adapter_proj_model.<name>`` (the plain projection: ``proj``, ``norm``) and
``double_blocks.<N>.processor.ip_adapter_double_stream_{k,v}_proj.{weight,bias}``, ``N`` the double-stream block
(0 .. 18 in FLUX.1); read as ``image_proj.<name>`` and ``ip_adapter.<N>.to_{k,v}_ip.{weight,bias}`` (diffusers'
converted names, which a ``.bin`` of the two groups may hold too: biases tell a Flux one). They load as an
:class:`IPAdapter` of family "flux" (keys and values with biases, numbered 0, 1, 2, ...).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from sdengine.models.ip_adapter import PERCEIVER_HEAD_DIM, ImageProjModel, IPAdapter, MLPProjModel, Resampler
from sdengine.weights.io import (
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    WeightsError,
    load_file,
    load_pickle_checkpoint,
)

_IP_KEY = re.compile(r"(\d+)\.(to_k_ip|to_v_ip)\.(weight|bias)")
_XLABS_KEY = re.compile(r"double_blocks\.(\d+)\.processor\.ip_adapter_double_stream_(k|v)_proj\.(weight|bias)")
XLABS_PROJ = "ip_adapter_proj_model."  # XLabs' flux-ip-adapter: the image projection's prefix
_LAYER = re.compile(r"layers\.(\d+)\.0\.to_q\.weight")


def _tensors(group: Any, prefix: str, path: Path) -> dict[str, Tensor]:
    if not isinstance(group, Mapping) or not all(isinstance(v, Tensor) for v in group.values()):
        raise WeightsError(f"{path}: {prefix!r} of an IP-Adapter file must hold tensors only")
    return {str(k): v for k, v in group.items()}


def _from_xlabs(flat: Mapping[str, Tensor], path: Path) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """XLabs' flux-ip-adapter names -> (image_proj, ip_adapter) in diffusers' converted names."""
    proj, ip, others = {}, {}, []
    for k, v in flat.items():
        m = _XLABS_KEY.fullmatch(k)
        if k.startswith(XLABS_PROJ):
            proj[k[len(XLABS_PROJ) :]] = v
        elif m is not None:
            ip[f"{m.group(1)}.to_{m.group(2)}_ip.{m.group(3)}"] = v
        else:
            others.append(k)
    if others:
        raise WeightsError(f"{path}: Flux IP-Adapter (XLabs) file with unknown tensors {sorted(others)[:3]}")
    if not proj or not ip:
        raise WeightsError(
            f"{path}: not a whole Flux IP-Adapter (XLabs) file (it needs {XLABS_PROJ}* and double_blocks.N.processor.* "
            "tensors)"
        )
    return proj, ip


def is_flux_state(ip: Mapping[str, Any]) -> bool:
    """Whether an ``ip_adapter`` state dict is a FLUX.1 adapter's (its key / value projections have biases)."""
    return any(str(k).endswith(("to_k_ip.bias", "to_v_ip.bias")) for k in ip)


def read_ip_adapter_state(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(image_proj state dict, ip_adapter state dict) of an IP-Adapter file in any layout (XLabs' Flux names read
    as diffusers converts them)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        obj = load_pickle_checkpoint(path)
        if "image_proj" in obj or "ip_adapter" in obj:
            if not ("image_proj" in obj and "ip_adapter" in obj):
                raise WeightsError(f"{path}: not an IP-Adapter file (it needs both 'image_proj' and 'ip_adapter')")
            return _tensors(obj["image_proj"], "image_proj", path), _tensors(obj["ip_adapter"], "ip_adapter", path)
        flat = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    elif suffix in SAFETENSORS_SUFFIXES:
        flat, _ = load_file(path)
    else:
        raise WeightsError(f"{path}: unsupported IP-Adapter file type {suffix!r} (use .safetensors or .bin)")
    if any(k.startswith((XLABS_PROJ, "double_blocks.")) for k in flat):
        return _from_xlabs(flat, path)
    proj = {k[len("image_proj.") :]: v for k, v in flat.items() if k.startswith("image_proj.")}
    ip = {k[len("ip_adapter.") :]: v for k, v in flat.items() if k.startswith("ip_adapter.")}
    if not proj or not ip:
        raise WeightsError(
            f"{path}: not an IP-Adapter file (no image_proj.* and ip_adapter.* tensors; first names: "
            f"{sorted(flat)[:3]})"
        )
    others = sorted(k for k in flat if not k.startswith(("image_proj.", "ip_adapter.")))
    if others:
        raise WeightsError(f"{path}: IP-Adapter file with unknown tensors {others[:3]}")
    return proj, ip


def _shape(sd: Mapping[str, Tensor], key: str, dims: int, path: Path) -> tuple[int, ...]:
    t = sd.get(key)
    if t is None or t.dim() != dims:
        raise WeightsError(f"{path}: IP-Adapter image_proj.{key} missing or not {dims}-D")
    return tuple(t.shape)


def build_image_proj(sd: Mapping[str, Tensor], path: Path) -> tuple[str, torch.nn.Module, int, int]:
    """(kind, image projection with the shapes of ``sd``, CLIP width it reads, cross-attention width it makes)."""
    if any(k.startswith("perceiver_resampler.") for k in sd) or ("norm.weight" in sd and "proj.0.weight" in sd):
        raise WeightsError(f"{path}: IP-Adapter FaceID files are not supported (an id-embedding projection)")
    if "proj.weight" in sd:
        out, embed = _shape(sd, "proj.weight", 2, path)
        (cross,) = _shape(sd, "norm.weight", 1, path)
        if out % cross:
            raise WeightsError(f"{path}: IP-Adapter image_proj.proj makes {out} values, not tokens of {cross}")
        return "plain", ImageProjModel(embed, cross, out // cross), embed, cross
    if "proj.3.weight" in sd:
        _, embed = _shape(sd, "proj.0.weight", 2, path)
        cross, _ = _shape(sd, "proj.2.weight", 2, path)
        return "full", MLPProjModel(embed, cross), embed, cross
    if "latents" in sd:
        _, queries, width = _shape(sd, "latents", 3, path)
        _, embed = _shape(sd, "proj_in.weight", 2, path)
        cross, _ = _shape(sd, "proj_out.weight", 2, path)
        depth = 1 + max((int(m.group(1)) for k in sd if (m := _LAYER.fullmatch(k))), default=-1)
        if depth == 0:
            raise WeightsError(f"{path}: IP-Adapter Plus file without resampler layers (layers.0.0.to_q.weight)")
        inner, _ = _shape(sd, "layers.0.0.to_q.weight", 2, path)
        ff, _ = _shape(sd, "layers.0.1.1.weight", 2, path)
        if inner % PERCEIVER_HEAD_DIM or ff % width:
            raise WeightsError(f"{path}: IP-Adapter Plus resampler of query width {inner} / feed-forward {ff}")
        proj = Resampler(
            embed,
            width,
            cross,
            depth=depth,
            heads=inner // PERCEIVER_HEAD_DIM,
            num_queries=queries,
            ff_mult=ff // width,
        )
        return "plus", proj, embed, cross
    raise WeightsError(f"{path}: unknown IP-Adapter image projection (names {sorted(sd)[:4]})")


def load_ip_adapter(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> IPAdapter:
    """An IP-Adapter file -> :class:`IPAdapter` (its weights checked and loaded strictly), on ``device`` in
    ``dtype``; one-line errors for files that are not IP-Adapters or have a layout it does not know."""
    path = Path(path)
    proj_sd, ip_sd = read_ip_adapter_state(path)
    flux = is_flux_state(ip_sd)
    kind, proj, embed, cross = build_image_proj(proj_sd, path)
    if flux and kind != "plain":
        raise WeightsError(
            f"{path}: a Flux IP-Adapter with a {kind} image projection is not supported (XLabs' flux-ip-adapter "
            "files have the plain one: image_proj.proj, image_proj.norm)"
        )
    found: dict[int, dict[str, Tensor]] = {}
    for key, value in ip_sd.items():
        m = _IP_KEY.fullmatch(key)
        if m is None or (m.group(3) == "bias" and not flux):
            raise WeightsError(f"{path}: IP-Adapter ip_adapter.{key} is not a to_k_ip / to_v_ip weight (FaceID?)")
        found.setdefault(int(m.group(1)), {})[f"{m.group(2)}.{m.group(3)}"] = value
    ids = sorted(found)
    want_ids = list(range(len(ids))) if flux else list(range(1, 2 * len(ids), 2))
    if ids != want_ids:
        raise WeightsError(
            f"{path}: IP-Adapter layers numbered {ids[:6]}{'...' if len(ids) > 6 else ''}, not "
            f"{'0, 1, 2' if flux else '1, 3, 5'}, ..."
        )
    names = ("to_k_ip.weight", "to_v_ip.weight", "to_k_ip.bias", "to_v_ip.bias")
    widths: list[int] = []
    for i in ids:
        pair = found[i]
        k, v = pair.get("to_k_ip.weight"), pair.get("to_v_ip.weight")
        if k is None or v is None or k.dim() != 2 or k.shape != v.shape or k.shape[1] != cross:
            raise WeightsError(
                f"{path}: IP-Adapter layer {i}: to_k_ip / to_v_ip missing or not [width, {cross}] (the image "
                "projection's width)"
            )
        if flux and any(
            (b := pair.get(n)) is None or tuple(b.shape) != (k.shape[0],) for n in ("to_k_ip.bias", "to_v_ip.bias")
        ):
            raise WeightsError(f"{path}: Flux IP-Adapter block {i}: k / v biases missing or not [{k.shape[0]}]")
        widths.append(int(k.shape[0]))
    family = "flux" if flux else "unet"
    adapter = IPAdapter(kind, proj, embed, cross, widths, name=f"IP-Adapter {path.name}", family=family)
    state = {f"image_proj.{k}": v for k, v in proj_sd.items()}
    for j, i in enumerate(ids):
        for n in names[: 4 if flux else 2]:
            group, what = n.split(".")
            state[f"{group}.{j}.{what}"] = found[i][n]
    try:
        adapter.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise WeightsError(
            f"{path}: IP-Adapter weights do not fit its {kind} layout ({' '.join(first[1:2])})"
        ) from None
    return adapter.to(device=device, dtype=dtype).eval()


def save_ip_adapter(adapter: IPAdapter, path: str | Path) -> Path:
    """Write ``adapter`` in the release's layout: ``.safetensors`` flat names or a ``.bin`` pickle of the two dicts
    (what :func:`load_ip_adapter` reads back; tests and conversions)."""
    from sdengine.weights.io import save_safetensors

    path = Path(path)
    proj = {k: v.detach().contiguous() for k, v in adapter.image_proj.state_dict().items()}
    if adapter.family == "flux":
        return _save_flux(adapter, proj, path)
    ip: dict[str, Tensor] = {}
    for j, (k, v) in enumerate(zip(adapter.to_k_ip, adapter.to_v_ip, strict=True)):
        ip[f"{2 * j + 1}.to_k_ip.weight"] = cast(nn.Linear, k).weight.detach().contiguous()
        ip[f"{2 * j + 1}.to_v_ip.weight"] = cast(nn.Linear, v).weight.detach().contiguous()
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        flat = {f"image_proj.{k}": v for k, v in proj.items()} | {f"ip_adapter.{k}": v for k, v in ip.items()}
        save_safetensors(flat, path)
    else:
        torch.save({"image_proj": proj, "ip_adapter": ip}, path)
    return path


def _save_flux(adapter: IPAdapter, proj: dict[str, Tensor], path: Path) -> Path:
    """A Flux adapter in XLabs' names (``.safetensors``) or diffusers' two groups (``.bin``)."""
    from sdengine.weights.io import save_safetensors

    ip: dict[str, Tensor] = {}
    for j, (k, v) in enumerate(zip(adapter.to_k_ip, adapter.to_v_ip, strict=True)):
        for which, layer in (("k", k), ("v", v)):
            lin = cast(nn.Linear, layer)
            ip[f"{j}.to_{which}_ip.weight"] = lin.weight.detach().contiguous()
            ip[f"{j}.to_{which}_ip.bias"] = lin.bias.detach().contiguous()
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        flat = {f"{XLABS_PROJ}{k}": v for k, v in proj.items()}
        for key, t in ip.items():
            block, name, what = key.split(".")
            which = name[len("to_") : -len("_ip")]
            flat[f"double_blocks.{block}.processor.ip_adapter_double_stream_{which}_proj.{what}"] = t
        save_safetensors(flat, path)
    else:
        torch.save({"image_proj": proj, "ip_adapter": ip}, path)
    return path


__all__ = [
    "XLABS_PROJ",
    "build_image_proj",
    "is_flux_state",
    "load_ip_adapter",
    "read_ip_adapter_state",
    "save_ip_adapter",
]
