"""IP-Adapter units of a generation (``GenerationRequest.ip_adapters``): each a loaded adapter
(:func:`sdengine.weights.ip_adapter_file.load_ip_adapter`), the CLIP vision outputs of its image(s), a scale.

The image tokens are made once per generation (the projection of the CLIP vision outputs) and travel in the
conditioning dict as ``ip_tokens`` (B, T, C), every adapter's after the one before it: the conditional rows get the
image's tokens, the unconditional rows (classifier-free guidance's negative) the tokens of ``negative`` -- by default
a zero image embedding (diffusers' ``prepare_ip_adapter_image_embeds`` for the plain adapter; for the Plus and
full-face adapters diffusers encodes an all-zero pixel tensor, so pass its hidden states as ``negative`` to match it;
for a FLUX.1 adapter diffusers' FluxPipeline encodes a black picture, which :func:`unit_from_images` does too).
:class:`sdengine.nn.ip_adapter.IPAdapterNet` hands them to the U-Net's cross-attention call by call.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sdengine.errors import GenerationError, UsageError
from sdengine.io.images import load_image
from sdengine.models.clip_vision import CLIPVisionModel, ImageLike, clip_image_tensor
from sdengine.models.ip_adapter import IPAdapter
from sdengine.nn.ip_adapter import SCALINGS, AdapterLayers, check_family, check_fits


@dataclass(frozen=True)
class IPAdapterUnit:
    """One IP-Adapter in a generation. ``adapter``: a loaded :class:`IPAdapter` or its file's path (loaded at the
    call, kept for the next). ``embeds``: the CLIP vision output of the image(s) -- the image embedding
    ``[D]`` / ``[n, D]`` / ``[n, k, D]`` for a plain adapter, the penultimate hidden states ``[L, H]`` / ``[n, L, H]``
    / ``[n, k, L, H]`` for Plus and full-face -- one image for every row (n = 1) or one per row of the batch
    (n = rows), ``k`` images each (their tokens side by side); ``negative``: the same for the unconditional rows
    (None: zeros); ``scale``: the weight of the image tokens' attention (0: no effect).

    Instead of ``embeds``, ``images`` (a picture, or a list the rows all take together) and ``clip_vision`` (a
    :class:`CLIPVisionModel` or its file / folder) are encoded at the call as :func:`unit_from_images` does, the
    unconditional rows' input by ``negative_rule``.

    ``start`` / ``end``: the fractions of the model's schedule the adapter acts between, ComfyUI's sigma rule
    (ComfyUI_IPAdapter_plus's start_at / end_at: a model call acts when its sigma lies between
    ``percent_to_sigma(end)`` and ``percent_to_sigma(start)``, judged at every call); 0 and 1: every call.
    ``layer_scales``: a scale per cross-attention layer in place of ``scale`` (in the file's layer order; None:
    ``scale`` everywhere); ``scaling``: how the scale weighs the image attention
    (:data:`sdengine.nn.ip_adapter.SCALINGS`: "output", the default, or ComfyUI_IPAdapter_plus's "kv" and
    "k_mean_v")."""

    adapter: IPAdapter | str | Path
    embeds: Tensor | None = None
    scale: float = 1.0
    negative: Tensor | None = None
    images: Any = None
    clip_vision: CLIPVisionModel | str | Path | None = None
    negative_rule: str = "diffusers"
    start: float = 0.0
    end: float = 1.0
    layer_scales: tuple[float, ...] | None = None
    scaling: str = "output"

    @property
    def name(self) -> str:
        """The adapter's file name (for the infotext and errors)."""
        if isinstance(self.adapter, IPAdapter):
            return self.adapter.name.removeprefix("IP-Adapter ")
        return Path(self.adapter).name

    def check(self) -> None:
        """One line for a unit that cannot run (needs no model)."""
        if not isinstance(self.adapter, IPAdapter | str | Path):
            raise GenerationError(
                "an IP-Adapter unit needs a loaded adapter (sdengine.weights.ip_adapter_file.load_ip_adapter) or its "
                f"file, got {type(self.adapter).__name__}"
            )
        s = self.scale
        if isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s):
            raise GenerationError(f"IP-Adapter scale must be a finite number, got {s!r}")
        if self.negative_rule not in NEGATIVE_RULES:
            raise GenerationError(
                f"IP-Adapter negative_rule {self.negative_rule!r}: choose one of {', '.join(NEGATIVE_RULES)}"
            )
        check_unit_extras(self)
        if self.images is not None or self.embeds is None:
            if self.embeds is not None or self.negative is not None:
                raise GenerationError("an IP-Adapter unit takes images or embeds (and negative), not both")
            if self.images is None or (isinstance(self.images, list | tuple) and not self.images):
                raise GenerationError(f"IP-Adapter {self.name}: give images (with clip_vision) or embeds")
            if not isinstance(self.clip_vision, CLIPVisionModel | str | Path):
                raise GenerationError(
                    f"IP-Adapter {self.name}: images need a CLIP vision encoder (clip_vision: a file or a loaded "
                    "CLIPVisionModel)"
                )
            return
        if not isinstance(self.adapter, IPAdapter):
            return  # its embeds are checked once the file is loaded (resolve_units)
        for what, t in (("embeds", self.embeds), ("negative", self.negative)):
            if t is None and what == "negative":
                continue
            if not isinstance(t, Tensor) or not t.is_floating_point():
                raise GenerationError(f"IP-Adapter {what} must be a float tensor, got {type(t).__name__}")
            one = 2 if self.adapter.reads_hidden_states else 1
            if not one <= t.dim() <= one + 2 or t.shape[-1] != self.adapter.embed_dim:
                raise GenerationError(
                    f"{self.adapter.name} takes {self.adapter.input_shape()}, got {what} of shape {tuple(t.shape)}"
                )
            if not bool(torch.isfinite(t).all()):
                raise GenerationError(f"IP-Adapter {what} hold NaN or infinite values")
        one = 2 if self.adapter.reads_hidden_states else 1  # the dims of one image's input
        assert self.embeds is not None
        if self.negative is not None and self.negative.shape[-one:] != self.embeds.shape[-one:]:
            raise GenerationError(
                f"IP-Adapter negative of shape {tuple(self.negative.shape)} does not match embeds "
                f"{tuple(self.embeds.shape)}"
            )

    def rows(self) -> tuple[int, int]:
        """How many rows ``embeds`` and ``negative`` give images for (1: every row)."""
        assert isinstance(self.adapter, IPAdapter) and self.embeds is not None, "resolve_unit first"
        one = 2 if self.adapter.reads_hidden_states else 1
        counts = [1 if t.dim() == one else int(t.shape[0]) for t in (self.embeds, self.negative) if t is not None]
        return counts[0], counts[-1]

    def layers(self, log_sigmas: Tensor | None = None) -> AdapterLayers:
        """The adapter's projections and scale for the U-Net's layers; the token count is filled in per run, the
        sigma window of ``start`` / ``end`` on the schedule of ``log_sigmas`` (None: no window)."""
        assert isinstance(self.adapter, IPAdapter), "resolve_unit first"
        return AdapterLayers(
            list(self.adapter.to_k_ip),
            list(self.adapter.to_v_ip),
            float(self.scale),
            0,
            self.adapter.name,
            layer_scales=None if self.layer_scales is None else tuple(float(v) for v in self.layer_scales),
            scaling=self.scaling,
            window=unit_window(self, log_sigmas),
            family=self.adapter.family,
        )


def _rows(t: Tensor, rows: int, adapter: IPAdapter) -> Tensor:
    """Tokens ``[n, T, C]`` for ``rows`` rows: n = 1 is every row's."""
    if t.shape[0] == rows:
        return t
    if t.shape[0] == 1:
        return t.expand(rows, -1, -1)
    raise GenerationError(f"{adapter.name}: image inputs for {t.shape[0]} rows in a batch of {rows} (give 1 or {rows})")


# Files loaded at a call, kept for the next (a server's jobs name the same few): the key is the file's path, size and
# modification time (a replaced file is read again), the device and the dtype. An encoder is large (ViT-H/14: 632M
# parameters), so one is kept; adapters are small, four are.
_KEEP_ADAPTERS, _KEEP_ENCODERS = 4, 1
_adapters: OrderedDict[tuple[Any, ...], IPAdapter] = OrderedDict()
_encoders: OrderedDict[tuple[Any, ...], CLIPVisionModel] = OrderedDict()
_lock = threading.Lock()


def _file_key(path: str | Path, device: torch.device, dtype: torch.dtype) -> tuple[Any, ...]:
    p = Path(path).resolve()
    try:
        files = [p] if p.is_file() else sorted(q for q in p.iterdir() if q.is_file())
        stamp = tuple((q.name, q.stat().st_size, q.stat().st_mtime_ns) for q in files)
    except OSError:
        stamp = ()  # the loader says what is wrong with it
    return (str(p), stamp, str(device), dtype)


def _kept(cache: OrderedDict[tuple[Any, ...], Any], key: tuple[Any, ...], keep: int, load: Any) -> Any:
    with _lock:
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
    value = load()
    with _lock:
        cache[key] = value
        while len(cache) > keep:
            cache.popitem(last=False)
    return value


def forget_loaded() -> None:
    """Drop the adapters and encoders kept from earlier calls (a server's "free memory")."""
    with _lock:
        _adapters.clear()
        _encoders.clear()


def resolve_unit(unit: IPAdapterUnit, device: torch.device, dtype: torch.dtype, network: Any = None) -> IPAdapterUnit:
    """``unit`` with its adapter loaded and its images encoded (files read once and kept, see above); with
    ``network``, an adapter of another model family (an SD one on Flux, ...) is refused before any image is
    encoded."""
    from sdengine.weights.clip_vision_file import load_clip_vision
    from sdengine.weights.ip_adapter_file import load_ip_adapter

    unit.check()
    adapter = unit.adapter
    if not isinstance(adapter, IPAdapter):
        path = adapter
        adapter = _kept(
            _adapters,
            _file_key(path, device, dtype),
            _KEEP_ADAPTERS,
            lambda: load_ip_adapter(path, device=device, dtype=dtype),
        )
    if network is not None:
        check_family(network, adapter.family, adapter.name)
    if unit.embeds is not None:
        done = dataclasses.replace(unit, adapter=adapter)
    else:
        encoder = unit.clip_vision
        if not isinstance(encoder, CLIPVisionModel):
            assert encoder is not None
            where = encoder
            encoder = _kept(
                _encoders,
                _file_key(where, device, dtype),
                _KEEP_ENCODERS,
                lambda: load_clip_vision(where, device=device, dtype=dtype),
            )
        images = list(unit.images) if isinstance(unit.images, list | tuple) else [unit.images]
        pictures = [load_image(im, f"IP-Adapter {unit.name} image", mode="RGB", error=GenerationError) for im in images]
        made = unit_from_images(adapter, encoder, pictures, unit.scale, negative_rule=unit.negative_rule)
        done = dataclasses.replace(unit, adapter=adapter, embeds=made.embeds, negative=made.negative, images=None)
    done.check()
    return done


def check_units(
    units: Sequence[Any],
    unet: Any,
    rows: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> list[IPAdapterUnit]:
    """The units, their files loaded and images encoded (on ``device`` in ``dtype``: the U-Net's by default), checked
    against the U-Net (layer count, widths) and the batch's rows, before any generation runs."""
    param = next(unet.parameters(), None) if isinstance(unet, torch.nn.Module) else None
    dev = torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
    dt = dtype if dtype is not None else (param.dtype if param is not None else torch.float32)
    out = []
    for u in units:
        if not isinstance(u, IPAdapterUnit):
            raise GenerationError(f"ip_adapters takes IPAdapterUnit values, got {type(u).__name__}")
        u = resolve_unit(u, dev, dt, network=unet)
        check_fits(unet, u.layers())
        for n in u.rows():
            if n not in (1, rows):
                raise GenerationError(f"{u.name}: images for {n} rows in a batch of {rows} (give 1 or {rows})")
        out.append(u)
    return out


@dataclass
class IPTokens:
    """A generation's image tokens: ``cond`` and ``uncond`` (rows, T, C) and the adapters' layers with their counts."""

    cond: Tensor
    uncond: Tensor
    layers: list[AdapterLayers]


def image_tokens(
    units: Sequence[IPAdapterUnit],
    rows: int,
    device: torch.device | str,
    dtype: torch.dtype,
    log_sigmas: Tensor | None = None,
) -> IPTokens | None:
    """The tokens of every unit for ``rows`` rows (projected once, in ``dtype`` on ``device``); None without units.
    ``log_sigmas``: the model's schedule, for the units' start / end windows."""
    if not units:
        return None
    cond, uncond, layers = [], [], []
    with torch.inference_mode():
        for u in units:
            assert isinstance(u.adapter, IPAdapter) and u.embeds is not None, "resolve_unit first"
            adapter = u.adapter.to(device=device, dtype=dtype)
            pos = adapter(u.embeds)
            neg = adapter(torch.zeros_like(u.embeds) if u.negative is None else u.negative)
            if pos.shape[1] != neg.shape[1]:
                raise UsageError(f"{adapter.name}: negative gives {neg.shape[1]} tokens, embeds {pos.shape[1]}")
            cond.append(_rows(pos, rows, adapter))
            uncond.append(_rows(neg, rows, adapter))
            layers.append(dataclasses.replace(u.layers(log_sigmas), tokens=int(pos.shape[1])))
    return IPTokens(torch.cat(cond, dim=1), torch.cat(uncond, dim=1), layers)


# What the unconditional rows see, by the front end whose images a unit should reproduce: "diffusers" (and the
# original IP-Adapter release): zeros for a plain adapter, the encoder's output on an all-zero *normalised* pixel
# tensor for Plus / full face; "comfyui" (ComfyUI_IPAdapter_plus): zeros for a plain adapter, the encoder's output on
# a black picture (zeros before the CLIP normalisation) for the others.
NEGATIVE_RULES = ("diffusers", "comfyui")


def encoder_width(encoder: CLIPVisionModel, adapter: IPAdapter) -> int:
    """The width of what ``encoder`` gives ``adapter`` (its image embedding's or its hidden states')."""
    c = encoder.config
    if adapter.reads_hidden_states:
        return c.hidden_size
    return c.projection_dim or c.hidden_size


def check_encoder(encoder: CLIPVisionModel, adapter: IPAdapter) -> None:
    """One line when ``encoder`` cannot feed ``adapter`` (a ViT-bigG adapter given ViT-H, ...)."""
    width = encoder_width(encoder, adapter)
    if width != adapter.embed_dim:
        what = "hidden states" if adapter.reads_hidden_states else "image embeddings"
        named = f"the CLIP vision encoder {encoder.name}" if encoder.name else "the CLIP vision encoder"
        raise UsageError(
            f"{adapter.name} reads CLIP vision {what} of width {adapter.embed_dim}; {named} gives {width} "
            f"({encoder.extra_repr()}): use the encoder it was trained with (ViT-H/14 for the SD 1.5 and *_vit-h "
            "adapters, ViT-bigG/14 for ip-adapter_sdxl, ViT-L/14 for XLabs flux-ip-adapter)"
        )


def unit_from_images(
    adapter: IPAdapter,
    encoder: CLIPVisionModel,
    images: ImageLike | Sequence[ImageLike],
    scale: float = 1.0,
    *,
    negative_rule: str = "diffusers",
    per_row: bool = False,
) -> IPAdapterUnit:
    """An :class:`IPAdapterUnit` for pictures: each encoded as transformers' ``CLIPImageProcessor`` prepares it
    (:func:`sdengine.models.clip_vision.clip_image_tensor`), the unconditional rows' input by ``negative_rule``.
    Several images are taken together by every row (their tokens side by side), or, with ``per_row``, one per row
    of the batch."""
    if negative_rule not in NEGATIVE_RULES:
        raise UsageError(f"IP-Adapter negative rule {negative_rule!r}: choose one of {', '.join(NEGATIVE_RULES)}")
    check_encoder(encoder, adapter)
    param = next(encoder.parameters())
    pixels = clip_image_tensor(images, size=encoder.config.image_size).to(param.device, param.dtype)
    with torch.inference_mode():
        out = encoder(pixels)
        embeds = out.penultimate_hidden_state if adapter.reads_hidden_states else out.image_embeds
        negative = None
        if adapter.family == "flux":  # diffusers' FluxPipeline: a black picture's image embedding, either rule
            size = encoder.config.image_size
            black = np.zeros((size, size, 3), dtype=np.uint8)
            negative = encoder(clip_image_tensor(black, size=size).to(param.device, param.dtype)).image_embeds[0]
        elif adapter.reads_hidden_states:
            if negative_rule == "diffusers":
                blank = torch.zeros_like(pixels[:1])
            else:
                size = encoder.config.image_size
                black = np.zeros((size, size, 3), dtype=np.uint8)
                blank = clip_image_tensor(black, size=size).to(param.device, param.dtype)
            negative = encoder(blank).penultimate_hidden_state[0]
    embeds = embeds.float()
    if not per_row:
        embeds = embeds.unsqueeze(0)  # one row of k images: every row takes them all
    if negative is not None:
        negative = negative.float()
        if not per_row and embeds.shape[1] > 1:
            negative = negative.expand(embeds.shape[1], *negative.shape).unsqueeze(0)
    return IPAdapterUnit(adapter, embeds.clone(), float(scale), None if negative is None else negative.clone())


def check_unit_extras(unit: IPAdapterUnit) -> None:
    """One line for a unit's start / end, layer scales or scaling that cannot run."""
    for what, v in (("start", unit.start), ("end", unit.end)):
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= v <= 1.0:
            raise GenerationError(f"IP-Adapter {what} must be a number in [0, 1], got {v!r}")
    if unit.start > unit.end:
        raise GenerationError(f"IP-Adapter start {unit.start:g} is after its end {unit.end:g}")
    if unit.scaling not in SCALINGS:
        raise GenerationError(f"IP-Adapter scaling {unit.scaling!r}: choose one of {', '.join(SCALINGS)}")
    if unit.layer_scales is not None:
        values = list(unit.layer_scales)
        n = len(unit.adapter.to_k_ip) if isinstance(unit.adapter, IPAdapter) else len(values)  # a file: checked later
        if len(values) != n or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values
        ):
            raise GenerationError(f"IP-Adapter {unit.name}: layer_scales must be {n} finite numbers (one per layer)")


def unit_window(unit: IPAdapterUnit, log_sigmas: Tensor | None) -> tuple[float, float] | None:
    """``(low, high)``: the sigmas a unit's start / end let it act between on the schedule of ``log_sigmas``
    (:func:`sdengine.pipeline.control.comfy_sigma_window`, ComfyUI's rule); None for the whole run (0 and 1) or
    without a schedule."""
    if log_sigmas is None or (float(unit.start) <= 0.0 and float(unit.end) >= 1.0):
        return None
    from sdengine.pipeline.control import comfy_sigma_window

    return comfy_sigma_window(log_sigmas, float(unit.start), float(unit.end))


__all__ = [
    "NEGATIVE_RULES",
    "IPAdapterUnit",
    "IPTokens",
    "check_encoder",
    "check_unit_extras",
    "check_units",
    "forget_loaded",
    "resolve_unit",
    "encoder_width",
    "image_tokens",
    "unit_from_images",
    "unit_window",
]
