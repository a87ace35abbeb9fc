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

_IP_KEY = re.compile(r"(\d+)\.(to_k_ip|to_v_ip)\.weight")
_LAYER = re.compile(r"layers\.(\d+)\.0\.to_q\.weight")


def _tensors(group: Any, prefix: str, path: Path) -> dict[str, Tensor]:
    if not isinstance(group, Mapping) or not all(isinstance(v, Tensor) for v in group.values()):
        raise WeightsError(f"{path}: {prefix!r} of an IP-Adapter file must hold tensors only")
    return {str(k): v for k, v in group.items()}


def read_ip_adapter_state(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(image_proj state dict, ip_adapter state dict) of an IP-Adapter file in either layout."""
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
    kind, proj, embed, cross = build_image_proj(proj_sd, path)
    found: dict[int, dict[str, Tensor]] = {}
    for key, value in ip_sd.items():
        m = _IP_KEY.fullmatch(key)
        if m is None:
            raise WeightsError(f"{path}: IP-Adapter ip_adapter.{key} is not a to_k_ip / to_v_ip weight (FaceID?)")
        found.setdefault(int(m.group(1)), {})[m.group(2)] = value
    ids = sorted(found)
    if ids != list(range(1, 2 * len(ids), 2)):
        raise WeightsError(
            f"{path}: IP-Adapter layers numbered {ids[:6]}{'...' if len(ids) > 6 else ''}, not 1, 3, 5, ..."
        )
    widths: list[int] = []
    for i in ids:
        pair = found[i]
        k, v = pair.get("to_k_ip"), pair.get("to_v_ip")
        if k is None or v is None or k.dim() != 2 or k.shape != v.shape or k.shape[1] != cross:
            raise WeightsError(
                f"{path}: IP-Adapter layer {i}: to_k_ip / to_v_ip missing or not [width, {cross}] (the image "
                "projection's width)"
            )
        widths.append(int(k.shape[0]))
    adapter = IPAdapter(kind, proj, embed, cross, widths, name=f"IP-Adapter {path.name}")
    state = {f"image_proj.{k}": v for k, v in proj_sd.items()}
    for j, i in enumerate(ids):
        state[f"to_k_ip.{j}.weight"] = found[i]["to_k_ip"]
        state[f"to_v_ip.{j}.weight"] = found[i]["to_v_ip"]
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


__all__ = ["build_image_proj", "load_ip_adapter", "read_ip_adapter_state", "save_ip_adapter"]
