"""IP-Adapter's decoupled cross-attention (Ye et al. 2023): every cross-attention layer of the U-Net answers

    ``attn(q, K_text, V_text) + sum_j scale_j * attn(q, to_k_ip_j(tokens_j), to_v_ip_j(tokens_j))``

with the same queries ``q = to_q(x)``, where ``tokens_j`` are adapter ``j``'s image tokens (its image projection of
the CLIP vision output, :mod:`sdengine.models.ip_adapter`) and ``to_k_ip_j`` / ``to_v_ip_j`` its own key and value
projections for that layer; the sum goes through the layer's ``to_out`` as the text's answer alone would. A scale of
0 leaves the layer exactly as without the adapter (its term is skipped).

Which layer takes which weights: the original release (and diffusers' ``load_ip_adapter``) numbers every attention
processor of diffusers' U-Net in ``unet.attn_processors`` order (down blocks, then up blocks, then the middle block;
within a block its transformers in order, within a transformer block ``attn1`` then ``attn2``), so the k-th
cross-attention layer (``attn2``) in that order is entry ``2k + 1`` of the file (:func:`cross_attention_layers`).

FLUX.1 (XLabs' ``flux-ip-adapter``, diffusers' ``FluxIPAdapterAttnProcessor``): the layers are the transformer's
double-stream blocks (none in the single-stream ones), in order; a block's image-stream queries (projected and
RMS-normed, before RoPE) attend to the adapter's keys and values (``Linear`` with bias, from image tokens as wide as
T5's states), and the scaled sum is added to the image stream after the block's MLP, with no output projection and
no gate (:class:`sdengine.models.flux.DoubleStreamBlock`). A network says which layers it has through
``ip_adapter_layers()`` and ``ip_adapter_family`` (:func:`ip_layers`).

:func:`ip_attention_applied` sets the layers' ``ip_attention`` (:attr:`sdengine.nn.attention.Attention.ip_attention`)
for a block; :class:`IPAdapterNet` wraps a network call in it, the image tokens of the call's rows handed in as
``ip_tokens`` (classifier-free guidance stacks the conditional rows' tokens and the unconditional rows' as it stacks
the text states). Nothing is patched outside a call: the plain U-Net's path is one attribute test per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from sdengine.errors import UsageError
from sdengine.nn.attention import Attention, scaled_dot_product_attention

# cross-attention layers of the U-Nets the adapters are released for, to name a model in a count mismatch
KNOWN_LAYER_COUNTS = {16: "SD 1.x / 2.x", 70: "SDXL", 19: "FLUX.1"}

# the model families IP-Adapters are made for: a U-Net's cross-attention (SD 1.x / 2.x, SDXL) or Flux's double blocks
FAMILIES = ("unet", "flux")
_FAMILY_NAMES = {"unet": "an SD 1.x / 2.x / SDXL (U-Net)", "flux": "a FLUX.1 (XLabs flux-ip-adapter)"}


def cross_attention_layers(unet: Any) -> list[Attention]:
    """The cross-attention layers of ``unet`` in the order IP-Adapter files number them (module docstring)."""
    blocks: list[nn.Module] = [*getattr(unet, "down_blocks", ()), *getattr(unet, "up_blocks", ())]
    mid = getattr(unet, "mid_block", None)
    if mid is not None:
        blocks.append(mid)
    return [m for b in blocks for m in b.modules() if isinstance(m, Attention) and m.is_cross_attention]


def network_family(net: Any) -> str:
    """Which IP-Adapters ``net`` takes: "flux" for Flux's transformer, else "unet"."""
    return str(getattr(net, "ip_adapter_family", "unet"))


def ip_layers(net: Any) -> tuple[list[Any], list[tuple[int, int]]]:
    """The layers of ``net`` an IP-Adapter acts in, in its files' order, and the shape (width, image-token width)
    of the key / value projection each takes: a U-Net's cross-attention layers (:func:`cross_attention_layers`;
    the text's width), or what ``net.ip_adapter_layers()`` gives (Flux's double-stream blocks)."""
    own = getattr(net, "ip_adapter_layers", None)
    if callable(own):
        layers, shapes = own()
        return list(layers), [(int(a), int(b)) for a, b in shapes]
    found = cross_attention_layers(net)
    return list(found), [(m.to_k.out_features, m.to_k.in_features) for m in found]


def transformer_places(unet: Any) -> list[tuple[str, int]]:
    """Each cross-attention layer of ``unet`` (in :func:`cross_attention_layers` order) as ComfyUI places it: its
    block kind ("input", "middle", "output") and the index of its spatial transformer in the order ComfyUI's U-Net
    runs them (``transformer_index``: the down blocks', then the middle block's, then the up blocks')."""
    from sdengine.nn.transformer import SpatialTransformer

    groups: list[tuple[str, list[nn.Module]]] = [
        ("input", list(getattr(unet, "down_blocks", ()))),
        ("output", list(getattr(unet, "up_blocks", ()))),
        ("middle", [m for m in (getattr(unet, "mid_block", None),) if m is not None]),
    ]
    found: dict[str, list[int]] = {}  # kind -> the transformer ordinal (within the kind) of each layer
    for kind, blocks in groups:
        ordinal, own = 0, []
        for b in blocks:
            for m in b.modules():
                if isinstance(m, SpatialTransformer):
                    own += [ordinal for a in m.modules() if isinstance(a, Attention) and a.is_cross_attention]
                    ordinal += 1
        found[kind] = own
    n_in = len(set(found["input"]))
    n_mid = len(set(found["middle"]))
    first = {"input": 0, "middle": n_in, "output": n_in + n_mid}
    return [(kind, first[kind] + t) for kind, _ in groups for t in found[kind]]


def _model_name(count: int) -> str:
    name = KNOWN_LAYER_COUNTS.get(count)
    return f"{count} ({name})" if name else str(count)


# How an adapter's scale weighs its image attention (ComfyUI_IPAdapter_plus's embeds_scaling): "output" (its
# "V only", diffusers' rule): the attention's output times the scale; "kv" ("K+V"): the image keys and values times
# the scale, then the attention; "k_mean_v" ("K+mean(V)"): the keys times the scale, the values' mean over the
# tokens times the scale (each value's difference from the mean kept).
SCALINGS = ("output", "kv", "k_mean_v")


@dataclass(frozen=True)
class AdapterLayers:
    """One adapter's key and value projections, one pair per cross-attention layer (in :func:`cross_attention_layers`
    order), its scale and how many image tokens it has in a call's ``ip_tokens`` (after the earlier adapters').
    ``layer_scales``: a scale per layer in place of ``scale`` (None: ``scale`` everywhere); ``scaling``: one of
    :data:`SCALINGS`; ``window``: (low, high) -- the adapter acts in a call whose sigma (the sampler's
    ``step.sigma``) lies in it, ComfyUI's rule (None: every call)."""

    to_k: Sequence[nn.Module]
    to_v: Sequence[nn.Module]
    scale: float
    tokens: int
    name: str = "IP-Adapter"
    layer_scales: Sequence[float] | None = None
    scaling: str = "output"
    window: tuple[float, float] | None = None
    family: str = "unet"

    def scale_of(self, i: int) -> float:
        """The scale of cross-attention layer ``i``."""
        return float(self.scale if self.layer_scales is None else self.layer_scales[i])


def check_family(net: Any, family: str, name: str) -> None:
    """One line when an adapter of ``family`` is given to a network of another (an SD adapter on Flux, ...)."""
    own = network_family(net)
    if family != own:
        model = "a FLUX.1 model" if own == "flux" else "an SD 1.x / 2.x / SDXL model"
        raise UsageError(
            f"{name} is {_FAMILY_NAMES.get(family, family)} IP-Adapter and this is {model}: use an IP-Adapter made "
            f"for it ({'XLabs flux-ip-adapter' if own == 'flux' else 'ip-adapter_sd15, ip-adapter_sdxl, ...'})"
        )


def check_fits(unet: Any, adapter: AdapterLayers) -> list[Any]:
    """The network's IP-Adapter layers (a U-Net's cross-attention layers, Flux's double blocks), checked against an
    adapter's family and projections (count, widths): one line each."""
    check_family(unet, adapter.family, adapter.name)
    layers, shapes = ip_layers(unet)
    n = len(adapter.to_k)
    flux = adapter.family == "flux"
    what, net = ("double blocks", "transformer") if flux else ("cross-attention layers", "U-Net")
    if n != len(layers):
        raise UsageError(
            f"{adapter.name} has {_model_name(n)} {what} and this {net} has "
            f"{_model_name(len(layers))}: it was made for another model family"
        )
    if adapter.layer_scales is not None and len(adapter.layer_scales) != n:
        raise UsageError(f"{adapter.name}: {len(adapter.layer_scales)} layer scales for {n} cross-attention layers")
    if adapter.scaling not in SCALINGS:
        raise UsageError(f"{adapter.name}: unknown scaling {adapter.scaling!r}; use one of {', '.join(SCALINGS)}")
    for i, (want, to_k) in enumerate(zip(shapes, adapter.to_k, strict=True)):
        w = getattr(to_k, "weight", None)
        if w is None or tuple(w.shape) != want:
            got = "?" if w is None else f"{w.shape[0]} x {w.shape[1]}"
            raise UsageError(
                f"{adapter.name}: {what[:-1]} {i} projects image tokens as {got} and the {net}'s is "
                f"{want[0]} x {want[1]} (width x {'T5' if flux else 'text'} width): it was made for another model"
            )
    return layers


Part = tuple[nn.Module, nn.Module, float, int, int, str]  # to_k_ip, to_v_ip, scale, first token, count, scaling
Parts = list[list[Part]]


class DecoupledAttention:
    """What a cross-attention layer's ``ip_attention`` is during a call: the image tokens' attention of the layer's
    queries, each adapter's scaled, summed; None when every scale is 0."""

    def __init__(self, layer: Any, parts: Sequence[Part], tokens: Tensor) -> None:
        self.heads, self.upcast = int(layer.heads), bool(getattr(layer, "upcast", False))
        self.parts = parts  # (to_k_ip, to_v_ip, scale, first token, token count, scaling)
        self.tokens = tokens  # (B or 1, T, C)

    def __call__(self, q: Tensor) -> Tensor | None:
        out: Tensor | None = None
        tokens = self.tokens.to(q.dtype)
        if tokens.shape[0] != q.shape[0]:
            if tokens.shape[0] != 1:
                raise UsageError(f"IP-Adapter got image tokens for {tokens.shape[0]} rows in a call of {q.shape[0]}")
            tokens = tokens.expand(q.shape[0], -1, -1)
        for to_k, to_v, scale, first, count, scaling in self.parts:
            if scale == 0:
                continue
            t = tokens[:, first : first + count]  # (B, n, C)
            k, v = to_k(t), to_v(t)
            if scaling == "output":
                h = scaled_dot_product_attention(q, k, v, self.heads, upcast=self.upcast) * scale  # (B, L, inner)
            else:
                if scaling == "kv":
                    v = v * scale
                else:  # "k_mean_v"
                    mean = v.mean(dim=1, keepdim=True)
                    v = (v - mean) + mean * scale
                h = scaled_dot_product_attention(q, k * scale, v, self.heads, upcast=self.upcast)
            out = h if out is None else out + h
        return out


def layer_parts(unet: Any, adapters: Sequence[AdapterLayers]) -> tuple[list[Any], Parts, int]:
    """The IP-Adapter layers of ``unet`` (:func:`ip_layers`), checked against every adapter, each layer's (to_k_ip,
    to_v_ip, scale, first token, token count, scaling) per adapter, and the adapters' token count in all."""
    layers, _ = ip_layers(unet)
    parts: Parts = [[] for _ in layers]
    first = 0
    for adapter in adapters:
        check_fits(unet, adapter)
        for i in range(len(layers)):
            part = (adapter.to_k[i], adapter.to_v[i], adapter.scale_of(i), first, adapter.tokens, adapter.scaling)
            parts[i].append(part)
        first += adapter.tokens
    return layers, parts, first


@contextmanager
def _applied(layers: list[Any], parts: Parts, total: int, tokens: Tensor) -> Iterator[None]:
    if tokens.dim() != 3 or tokens.shape[1] != total:
        raise UsageError(f"IP-Adapter got image tokens of shape {tuple(tokens.shape)} where its adapters have {total}")
    for layer, own in zip(layers, parts, strict=True):
        layer.ip_attention = DecoupledAttention(layer, own, tokens)
    try:
        yield
    finally:
        for layer in layers:
            layer.ip_attention = None


@contextmanager
def ip_attention_applied(unet: Any, adapters: Sequence[AdapterLayers], tokens: Tensor) -> Iterator[None]:
    """Inside the block, every cross-attention layer of ``unet`` attends also to ``tokens`` (B, T, C): adapter ``j``'s
    tokens after those of the adapters before it; as before after it, whatever happens."""
    with _applied(*layer_parts(unet, adapters), tokens):
        yield


# the sigma ComfyUI judges a call by when it is handed none (CrossAttentionPatch's stand-in)
NO_SIGMA = 999999999.9


class IPAdapterNet:
    """``net`` (the U-Net, or what calls it) called with the adapters on ``unet``'s cross-attention: the call's image
    tokens come as the keyword ``ip_tokens`` (B, T, C) and are not passed on. An adapter with a ``window`` acts in
    the calls whose sigma (the sampler's ``step.sigma``; ComfyUI's stand-in :data:`NO_SIGMA` without one) lies in
    it, ``low <= sigma <= high``; then the net takes the sampler's ``step`` (passed on if ``net`` takes it)."""

    takes_ip_tokens = True

    def __init__(self, net: Callable[..., Tensor], unet: Any, adapters: Sequence[AdapterLayers]) -> None:
        self.net, self.unet, self.adapters = net, unet, list(adapters)
        self.plan = layer_parts(unet, self.adapters)  # checked once, not per call
        # what UNetAdapter asks of the network it calls
        self.inner_takes_step = bool(getattr(net, "takes_step", False))
        self.windowed = any(a.window is not None for a in self.adapters)
        self.takes_step = self.inner_takes_step or self.windowed
        self.takes_row_kinds = bool(getattr(net, "takes_row_kinds", False))

    def active(self, sigma: float | None) -> list[bool]:
        """Which adapters act in a call at ``sigma``."""
        s = NO_SIGMA if sigma is None else float(sigma)
        return [a.window is None or a.window[0] <= s <= a.window[1] for a in self.adapters]

    def __call__(self, *args: Any, ip_tokens: Tensor | None = None, **kwargs: Any) -> Tensor:
        if ip_tokens is None:
            raise UsageError("IP-Adapter: the call got no image tokens (ip_tokens)")
        layers, parts, total = self.plan
        if self.windowed:
            step = kwargs.get("step")
            if not self.inner_takes_step:
                kwargs.pop("step", None)
            on = self.active(getattr(step, "sigma", None))
            if not all(on):  # this call without the adapters out of their window
                parts = [[p for p, a in zip(own, on, strict=True) if a] for own in parts]
        with _applied(layers, parts, total, ip_tokens):
            return self.net(*args, **kwargs)


__all__ = [
    "FAMILIES",
    "KNOWN_LAYER_COUNTS",
    "NO_SIGMA",
    "SCALINGS",
    "AdapterLayers",
    "DecoupledAttention",
    "IPAdapterNet",
    "check_family",
    "check_fits",
    "cross_attention_layers",
    "ip_attention_applied",
    "ip_layers",
    "layer_parts",
    "network_family",
    "transformer_places",
]
