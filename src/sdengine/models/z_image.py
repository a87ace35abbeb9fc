"""Z-Image's transformer: Tongyi-MAI's 6 B single-stream DiT (Z-Image, Z-Image-Turbo) over 2x2 latent patches and
Qwen3-4B's text states.

Z-Image ("Z-Image: An Efficient Image Generation Foundation Model with Single-Stream Diffusion Transformer",
Tongyi-MAI 2025) is a rectified-flow model over FLUX.1's 16-channel VAE latent. Its network (diffusers'
``ZImageTransformer2DModel``, whose parameter names this module keeps):

* **tokens**: the latent's 2x2 patches (each patch's numbers row by row, channels last: ``(dy, dx, c)``, not
  Flux's channel-first order) through ``all_x_embedder.2-1``; the caption (Qwen3's states, ``cap_feat_dim`` wide)
  through ``cap_embedder`` (an RMS norm, then a Linear). Each sequence is padded to a multiple of 32 tokens
  (:data:`SEQ_MULTIPLE`) with a learnt pad token (``x_pad_token`` / ``cap_pad_token``); the pads take part in
  attention as tokens do;
* **refiners**: ``noise_refiner`` blocks over the image tokens alone (modulated by the timestep) and
  ``context_refiner`` blocks over the caption tokens alone (no modulation); then the ``layers`` (30 in the release)
  over the joint sequence ``[image, caption]``, a key mask over the batch's shorter rows where the rows differ;
* **a block**: RMS norms before and after each part (``attention_norm1/2``, ``ffn_norm1/2``); with modulation one
  Linear of the timestep embedding (no SiLU) into (scale, gate) for attention and for the MLP, the gates through
  tanh and the scales as ``1 + scale``: ``x += tanh(g1) norm2(attn(norm1(x) (1 + s1)))``, likewise the MLP; the
  attention has no biases, per-head RMS norms on q and k (``qk_norm``); the MLP is SwiGLU (``w1``, ``w3``, ``w2``,
  ``int(dim / 3 * 8)`` wide);
* **positions** (RoPE, Su et al. 2021, with theta 256): three axes (``axes_dims``, 32 + 48 + 48 of a 128-wide
  head in the release); caption token j (pads included) at (1 + j, 0, 0); image token (r, c) at
  (L + 1, r, c) with L the caption's padded length (per row); the image's pads at (0, 0, 0). Each pair of a head
  is turned by position x ``theta ** (-2i / d)``, the angles made in float64 and rounded to float32 as the
  reference makes them; positions must stay under ``axes_lens``;
* **the timestep**: ``t`` in 0..1 where 1 is the clean image (diffusers' pipeline passes ``(1000 - 1000 s) / 1000``
  for the flow's ``s``), its sinusoid (cosines first) of ``t_scale t`` through ``t_embedder``'s MLP into a
  ``min(dim, 256)`` vector;
* **the final layer**: a weightless layer norm scaled by ``1 + adaLN(SiLU(t_emb))``, a Linear to 4 x 16 numbers
  per token, unpatchified. The output is the network's own (the pipeline negates it into the flow's velocity).

``forward(hidden_states, timestep, cap_feats, cap_mask)`` takes the latent (B, 16, H, W), the caption states
(B, L, cap_feat_dim) and their mask (B, L) (each row's tokens first, then padding; None: all tokens); rows of
different caption lengths give the outputs diffusers' list inputs give.

Not here: Z-Image-Omni's SigLIP inputs and per-token noise masks (``siglip_feat_dim`` refused), patch sizes other
than 2x2 (one frame). ControlNets (VideoX-Fun's Union ones) are :mod:`sdengine.models.z_image_controlnet`'s,
through ``forward``'s ``control``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdengine.errors import UsageError
from sdengine.models.config_checks import ConfigError, check_config, check_scalar_ints
from sdengine.nn.attention import scaled_dot_product_attention
from sdengine.nn.fp8_storage import compute_dtype

SEQ_MULTIPLE = 32  # every token sequence is padded to a multiple of this (diffusers' SEQ_MULTI_OF)
ADALN_WIDTH = 256  # the timestep embedding's width is min(dim, 256)
TIME_FEATURES = 256  # sinusoidal features of the timestep
TIME_HIDDEN = 1024  # the timestep MLP's hidden width
PATCH = 2
PATCH_KEY = "2-1"  # the ModuleDict key of the 2x2, one-frame patches (``all_x_embedder.2-1``)
WHAT = "Z-Image transformer config"


@dataclass(frozen=True)
class ZImageConfig:
    """Architecture of a Z-Image transformer; diffusers' ``ZImageTransformer2DModel`` config names and defaults
    (:data:`Z_IMAGE_TURBO` is the release's)."""

    all_patch_size: tuple[int, ...] = (2,)
    all_f_patch_size: tuple[int, ...] = (1,)
    in_channels: int = 16
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30
    norm_eps: float = 1e-5
    qk_norm: bool = True
    cap_feat_dim: int = 2560
    siglip_feat_dim: int | None = None
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, ...] = (32, 48, 48)
    axes_lens: tuple[int, ...] = (1024, 512, 512)

    def __post_init__(self) -> None:
        for name in ("all_patch_size", "all_f_patch_size", "axes_dims", "axes_lens"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
            elif not isinstance(value, tuple):
                raise ConfigError(f"{WHAT}: {name}={value!r} is not a list")
        check_scalar_ints(WHAT, self)
        check_config("z_image", _numbers(dataclasses.asdict(self)))
        if type(self.qk_norm) is not bool:
            raise ConfigError(f"{WHAT}: qk_norm={self.qk_norm!r} is not true/false")
        if self.siglip_feat_dim is not None:
            raise ConfigError(f"{WHAT}: siglip_feat_dim (Z-Image-Omni's image inputs) is not supported")
        if self.all_patch_size != (PATCH,) or self.all_f_patch_size != (1,):
            raise ConfigError(
                f"{WHAT}: all_patch_size={list(self.all_patch_size)}, all_f_patch_size={list(self.all_f_patch_size)} "
                "are not supported (only [2] and [1]: 2x2 patches of one frame)"
            )
        for name in ("rope_theta", "t_scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not 0 < v <= 1e6:
                raise ConfigError(f"{WHAT}: {name}={v!r} is out of range (0 (excluded) to 1e6)")
        if self.dim % self.n_heads:
            raise ConfigError(f"{WHAT}: dim={self.dim} is not a multiple of n_heads={self.n_heads}")
        if self.n_kv_heads != self.n_heads:
            raise ConfigError(
                f"{WHAT}: n_kv_heads={self.n_kv_heads} differs from n_heads={self.n_heads} (not supported: "
                "diffusers' model ignores it and would run another network)"
            )
        if len(self.axes_dims) != 3 or len(self.axes_lens) != 3:
            raise ConfigError(f"{WHAT}: axes_dims and axes_lens must have three entries each (frame, row, column)")
        if any(d % 2 for d in self.axes_dims) or sum(self.axes_dims) != self.head_dim:
            raise ConfigError(
                f"{WHAT}: axes_dims={list(self.axes_dims)} must be even numbers adding up to the head width "
                f"dim / n_heads = {self.head_dim}"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def latent_channels(self) -> int:
        return self.in_channels

    @property
    def adaln_width(self) -> int:
        return min(self.dim, ADALN_WIDTH)

    @property
    def ffn_width(self) -> int:
        return int(self.dim / 3 * 8)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> ZImageConfig:
        """A diffusers ``transformer/config.json``; keys starting with ``_`` are ignored, others unknown refused."""
        if not isinstance(config, Mapping):
            raise ConfigError(f"a Z-Image transformer config must be a mapping, got {type(config).__name__}")
        name = config.get("_class_name")
        if name is not None and name != "ZImageTransformer2DModel":
            raise ConfigError(f"not a Z-Image transformer config: _class_name={name!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
        if unknown:
            raise ConfigError(f"unknown Z-Image transformer config options: {', '.join(unknown)}")
        values = {k: v for k, v in config.items() if k in known}
        check_config("z_image", _numbers(values))
        try:
            return cls(**values)
        except TypeError as e:
            raise ConfigError(f"{WHAT}: {e}") from None

    def to_diffusers(self) -> dict[str, Any]:
        out: dict[str, Any] = {"_class_name": "ZImageTransformer2DModel"}
        for k, v in dataclasses.asdict(self).items():
            out[k] = list(v) if isinstance(v, tuple) else v
        return out


def _numbers(values: Mapping[str, Any]) -> dict[str, Any]:
    """The fields :func:`check_config` bounds (the others are checked by the config itself)."""
    skip = {"qk_norm", "siglip_feat_dim", "rope_theta", "t_scale"}
    return {k: v for k, v in values.items() if k not in skip}


# Tongyi-MAI/Z-Image-Turbo's transformer/config.json
Z_IMAGE_TURBO = ZImageConfig(axes_lens=(1536, 512, 512))


# ----------------------------------------------------------------------------------------------------------
# Positions


def rope_angles(positions: Tensor, axes_dims: tuple[int, ...], theta: float) -> Tensor:
    """The angles (N, sum(axes_dims) / 2) of integer positions (N, 3): per axis of width d, position x
    ``theta ** (-2i / d)`` made in float64, rounded to float32 (diffusers' ``RopeEmbedder`` table)."""
    out = []
    for axis, d in enumerate(axes_dims):
        freqs = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        out.append((positions[:, axis, None].to(torch.float64) * freqs[None, :]).float())
    return torch.cat(out, dim=1)


def padded(n: int) -> int:
    """``n`` rounded up to a multiple of :data:`SEQ_MULTIPLE`."""
    return n + (-n) % SEQ_MULTIPLE


def positions(caption: int, rows: int, cols: int) -> tuple[Tensor, Tensor]:
    """The (image, caption) position ids (N_pad, 3) and (L_pad, 3) of one row whose caption has ``caption``
    tokens and whose latent has rows x cols patches (module docstring)."""
    cap_len = padded(caption)
    cap = torch.zeros(cap_len, 3, dtype=torch.long)
    cap[:, 0] = 1 + torch.arange(cap_len)
    n = rows * cols
    img = torch.zeros(padded(n), 3, dtype=torch.long)
    img[:n, 0] = cap_len + 1
    img[:n, 1] = torch.arange(rows).repeat_interleave(cols)
    img[:n, 2] = torch.arange(cols).repeat(rows)
    return img, cap


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Turn each pair (x[2j], x[2j+1]) of every head: x (B, L, heads, d), cos / sin (B, L, d/2); float32 inside,
    x's dtype out (the pair as a complex number times e^(i angle))."""
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs.unbind(-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    """RMS norm with a weight, statistics in float32 (diffusers' ``RMSNorm``: the normalised values in the input's
    dtype promoted by the float32 statistics, cast to a half weight's dtype before the weight)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight


class Attention(nn.Module):
    """Self-attention without biases: ``to_q/k/v``, per-head RMS norms ``norm_q`` / ``norm_k`` (eps 1e-5),
    RoPE, ``to_out.0``."""

    def __init__(self, dim: int, heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.norm_q = RMSNorm(self.head_dim, 1e-5) if qk_norm else None
        self.norm_k = RMSNorm(self.head_dim, 1e-5) if qk_norm else None
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=False)])

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None) -> Tensor:
        q = self.to_q(x).unflatten(-1, (self.heads, -1))
        k = self.to_k(x).unflatten(-1, (self.heads, -1))
        v = self.to_v(x)
        if self.norm_q is not None and self.norm_k is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        m = None if mask is None else mask[:, None, None, :]
        h = scaled_dot_product_attention(q.flatten(2), k.flatten(2), v.to(q.dtype), self.heads, mask=m)
        return self.to_out[0](h.to(q.dtype))


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``, no biases."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """One block (diffusers' ``ZImageTransformerBlock``): see the module docstring."""

    def __init__(self, cfg: ZImageConfig, modulation: bool) -> None:
        super().__init__()
        dim = cfg.dim
        self.attention = Attention(dim, cfg.n_heads, cfg.qk_norm)
        self.feed_forward = FeedForward(dim, cfg.ffn_width)
        self.attention_norm1 = RMSNorm(dim, cfg.norm_eps)
        self.ffn_norm1 = RMSNorm(dim, cfg.norm_eps)
        self.attention_norm2 = RMSNorm(dim, cfg.norm_eps)
        self.ffn_norm2 = RMSNorm(dim, cfg.norm_eps)
        self.modulation = modulation
        if modulation:
            self.adaLN_modulation = nn.Sequential(nn.Linear(cfg.adaln_width, 4 * dim))

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None, vec: Tensor | None) -> Tensor:
        if not self.modulation:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), rope, mask))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        assert vec is not None
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(vec).unsqueeze(1).chunk(4, dim=2)
        attn = self.attention(self.attention_norm1(x) * (1.0 + scale_msa), rope, mask)
        x = x + gate_msa.tanh() * self.attention_norm2(attn)
        return x + gate_mlp.tanh() * self.ffn_norm2(self.feed_forward(self.ffn_norm1(x) * (1.0 + scale_mlp)))


class TimestepEmbedder(nn.Module):
    """``mlp``: Linear (256 -> 1024), SiLU, Linear (-> min(dim, 256)) of the sinusoid (cosines first) of its
    input."""

    def __init__(self, out: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIME_FEATURES, TIME_HIDDEN), nn.SiLU(), nn.Linear(TIME_HIDDEN, out))

    def forward(self, t: Tensor) -> Tensor:
        half = TIME_FEATURES // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        first = self.mlp[0]
        assert isinstance(first, nn.Linear)
        return self.mlp(features.to(compute_dtype(first)))


class FinalLayer(nn.Module):
    """A weightless layer norm (eps 1e-6) scaled by ``1 + adaLN_modulation(t_emb)`` (SiLU, Linear), then
    ``linear``."""

    def __init__(self, dim: int, adaln: int, out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(adaln, dim))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        scale = 1.0 + self.adaLN_modulation(vec).unsqueeze(1)
        return self.linear(F.layer_norm(x, x.shape[-1:], eps=1e-6) * scale)


# ----------------------------------------------------------------------------------------------------------
# The model


def patchify(latent: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): 2x2 patches row-major, each patch's numbers ``(dy, dx, c)``."""
    B, C, H, W = latent.shape
    x = latent.reshape(B, C, H // PATCH, PATCH, W // PATCH, PATCH)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // PATCH) * (W // PATCH), PATCH * PATCH * C)


def unpatchify(tokens: Tensor, height: int, width: int) -> Tensor:
    """The inverse of :func:`patchify`: (B, H/2 * W/2, 4C) -> (B, C, H, W)."""
    B, _, D = tokens.shape
    C = D // (PATCH * PATCH)
    x = tokens.reshape(B, height // PATCH, width // PATCH, PATCH, PATCH, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, C, height, width)


def caption_lengths(cap_mask: Tensor | None, batch: int, length: int) -> list[int]:
    """Each row's token count from a (B, L) mask whose rows are tokens first, then padding (all L: None)."""
    if cap_mask is None:
        return [length] * batch
    if tuple(cap_mask.shape) != (batch, length):
        raise UsageError(f"Z-Image transformer: cap_mask must be ({batch}, {length}), got {tuple(cap_mask.shape)}")
    m = cap_mask.detach().to("cpu", torch.bool)
    counts = [int(n) for n in m.sum(dim=1)]
    for i, n in enumerate(counts):
        if n < 1 or not bool(m[i, :n].all()):
            raise UsageError(
                "Z-Image transformer: each cap_mask row must start with its tokens (at least one) and end with padding"
            )
    return counts


@dataclass
class ZImageState:
    """A call's inputs as the layers read them (:meth:`ZImageTransformer.embed`): ``vec`` the timestep embedding
    (B, adaln); ``x`` the image tokens (B, N_pad, dim), embedded and padded with ``x_pad_token``, not yet refined;
    ``cap`` the caption tokens after the context refiner (B, L_pad, dim); the image's and the joint sequence's RoPE
    tables; ``mask`` the joint sequence's key mask (None: every row as long); ``n`` the real image tokens;
    ``height`` / ``width`` the latent's."""

    vec: Tensor
    x: Tensor
    cap: Tensor
    img_rope: tuple[Tensor, Tensor]
    joint_rope: tuple[Tensor, Tensor]
    mask: Tensor | None
    n: int
    height: int
    width: int


class ZImageTransformer(nn.Module):
    """Z-Image's transformer (see the module docstring); diffusers' ``ZImageTransformer2DModel`` names."""

    def __init__(self, config: ZImageConfig = Z_IMAGE_TURBO) -> None:
        super().__init__()
        self.config = config
        self.name = ""
        self._rope_key: tuple[Any, ...] | None = None
        self._rope: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None
        dim = config.dim
        out = PATCH * PATCH * config.in_channels
        self.all_x_embedder = nn.ModuleDict({PATCH_KEY: nn.Linear(PATCH * PATCH * config.in_channels, dim)})
        self.all_final_layer = nn.ModuleDict({PATCH_KEY: FinalLayer(dim, config.adaln_width, out)})
        self.noise_refiner = nn.ModuleList([Block(config, True) for _ in range(config.n_refiner_layers)])
        self.context_refiner = nn.ModuleList([Block(config, False) for _ in range(config.n_refiner_layers)])
        self.t_embedder = TimestepEmbedder(config.adaln_width)
        self.cap_embedder = nn.Sequential(
            RMSNorm(config.cap_feat_dim, config.norm_eps), nn.Linear(config.cap_feat_dim, dim)
        )
        self.x_pad_token = nn.Parameter(torch.zeros(1, dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, dim))
        self.layers = nn.ModuleList([Block(config, True) for _ in range(config.n_layers)])

    @property
    def x_embedder(self) -> nn.Linear:
        layer = self.all_x_embedder[PATCH_KEY]
        assert isinstance(layer, nn.Linear)
        return layer

    @property
    def dtype(self) -> torch.dtype:
        return compute_dtype(self.x_embedder)

    @property
    def device(self) -> torch.device:
        return self.x_embedder.weight.device

    def check_sizes(self, caption: int, rows: int, cols: int) -> None:
        """One line unless a caption of ``caption`` tokens and a rows x cols patch grid fit the RoPE's
        ``axes_lens`` (the largest frame position is the caption's padded length + 1)."""
        frames, max_rows, max_cols = self.config.axes_lens
        if padded(caption) + 1 >= frames:
            raise UsageError(
                f"Z-Image transformer: a caption of {caption} tokens is too long for this model's positions "
                f"(at most {frames - 2 - (frames - 2) % SEQ_MULTIPLE} after padding to {SEQ_MULTIPLE})"
            )
        if rows >= max_rows or cols >= max_cols:
            raise UsageError(
                f"Z-Image transformer: a latent of {rows}x{cols} patches is too large for this model's positions "
                f"(under {max_rows}x{max_cols} patches)"
            )

    def rope(
        self, lengths: list[int], rows: int, cols: int, device: torch.device
    ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """(image, caption, joint) cos / sin tables (B, N, head_dim / 2) for rows of caption ``lengths``; the last
        ones made kept (every step of a call asks for the same). A row's positions past its own length (the
        batch's padding) are zeros: those tokens are masked out."""
        key = (tuple(lengths), rows, cols, device)
        if self._rope_key == key and self._rope is not None:
            return self._rope
        cfg = self.config
        cap_max = max(padded(n) for n in lengths)
        n_img = padded(rows * cols)
        img_pos = torch.zeros(len(lengths), n_img, 3, dtype=torch.long)
        cap_pos = torch.zeros(len(lengths), cap_max, 3, dtype=torch.long)
        for i, n in enumerate(lengths):
            img, cap = positions(n, rows, cols)
            img_pos[i], cap_pos[i, : len(cap)] = img, cap
        angles = rope_angles(torch.cat([img_pos, cap_pos], dim=1).reshape(-1, 3), cfg.axes_dims, cfg.rope_theta)
        angles = angles.reshape(len(lengths), n_img + cap_max, -1)
        for i, n in enumerate(lengths):  # the batch's padding: diffusers pads its tables with zeros
            angles[i, n_img + padded(n) :] = 0.0
        cos, sin = angles.cos().to(device), angles.sin().to(device)
        self._rope = ((cos[:, :n_img], sin[:, :n_img]), (cos[:, n_img:], sin[:, n_img:]), (cos, sin))
        self._rope_key = key
        return self._rope

    def embed(
        self, hidden_states: Tensor, timestep: Tensor | float, cap_feats: Tensor, cap_mask: Tensor | None = None
    ) -> ZImageState:
        """The inputs checked and embedded: the timestep vector, the image tokens (padded, not yet refined), the
        caption tokens through the context refiner, the RoPE tables and the joint sequence's key mask (see
        :meth:`forward`)."""
        cfg = self.config
        if hidden_states.ndim != 4 or hidden_states.shape[1] != cfg.in_channels:
            raise UsageError(
                f"Z-Image transformer: hidden_states must be a (B, {cfg.in_channels}, H, W) latent, "
                f"got {tuple(hidden_states.shape)}"
            )
        B, _, H, W = hidden_states.shape
        if H % PATCH or W % PATCH:
            raise UsageError(f"Z-Image transformer: the latent's height and width must be even, got {H}x{W}")
        if cap_feats.ndim != 3 or cap_feats.shape[0] != B or cap_feats.shape[2] != cfg.cap_feat_dim:
            raise UsageError(
                f"Z-Image transformer: cap_feats must be (B={B}, L, {cfg.cap_feat_dim}), got {tuple(cap_feats.shape)}"
            )
        lengths = caption_lengths(cap_mask, B, cap_feats.shape[1])
        rows, cols = H // PATCH, W // PATCH
        self.check_sizes(max(lengths), rows, cols)
        t = torch.as_tensor(timestep, device=hidden_states.device, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise UsageError(f"Z-Image transformer: timestep must be a number or have shape ({B},)")
        device, dtype = hidden_states.device, self.dtype
        vec = self.t_embedder(t * cfg.t_scale).to(dtype)
        img_rope, cap_rope, joint_rope = self.rope(lengths, rows, cols, device)
        n = rows * cols
        n_img = padded(n)
        # the image tokens, padded with x_pad_token to a multiple of 32
        x = self.x_embedder(patchify(hidden_states.to(dtype)))
        x = torch.cat([x, self.x_pad_token.to(x.dtype).expand(B, n_img - n, -1)], dim=1)
        # each caption row: its tokens, then cap_pad_token up to a multiple of 32, then the batch's padding
        cap_max = max(padded(k) for k in lengths)
        c = self.cap_embedder(cap_feats.to(dtype)[:, : max(lengths)])
        cap = c.new_zeros(B, cap_max, c.shape[2])
        valid = torch.zeros(B, cap_max, dtype=torch.bool)
        for i, k in enumerate(lengths):
            cap[i, :k] = c[i, :k]
            cap[i, k : padded(k)] = self.cap_pad_token.to(c.dtype)
            valid[i, : padded(k)] = True
        ragged = not bool(valid.all())
        cap_mask_keys = valid.to(device) if ragged else None
        for layer in self.context_refiner:
            cap = layer(cap, cap_rope, cap_mask_keys, None)
        mask = torch.cat([torch.ones(B, n_img, dtype=torch.bool), valid], dim=1).to(device) if ragged else None
        return ZImageState(vec, x, cap, img_rope, joint_rope, mask, n, H, W)

    def refine_image(self, state: ZImageState, hints: Mapping[int, Tensor] | None = None) -> Tensor:
        """The image tokens through the noise refiner (on their own; no key mask: every row's image is as long),
        ``hints[i]`` added after refiner block ``i`` where given (a ControlNet's, inside it)."""
        x = state.x
        for i, layer in enumerate(self.noise_refiner):
            x = layer(x, state.img_rope, None, state.vec)
            if hints is not None and i in hints:
                x = x + hints[i]
        return x

    def forward(
        self,
        hidden_states: Tensor,
        timestep: Tensor | float,
        cap_feats: Tensor,
        cap_mask: Tensor | None = None,
        *,
        control: Callable[[ZImageState, Tensor], Mapping[int, Tensor] | None] | None = None,
        refiner_control: Callable[[ZImageState], Mapping[int, Tensor] | None] | None = None,
    ) -> Tensor:
        """The network's output (B, C, H, W) for the latent (B, C, H, W) at ``timestep`` (B,) (0..1, 1 = clean:
        diffusers' ``(1000 - 1000 s) / 1000``), given the caption states (B, L, cap_feat_dim) and their mask
        (B, L) (1 = a token, 0 = padding after them; None: all tokens).

        ``control``: ControlNets (:mod:`sdengine.models.z_image_controlnet`): called with the embedded inputs and
        the refined image tokens, it returns residuals (B, N_joint, dim) by main layer index (diffusers'
        ``controlnet_block_samples``), each added to the joint sequence after that layer; None: none.
        ``refiner_control``: called with the embedded inputs first, it returns residuals (B, N_pad, dim) by noise
        refiner block, each added to the image tokens after that block (ComfyUI's ``noise_refiner`` patches: the
        transformer's own refinement changed, not a ControlNet's view of it); None: none."""
        state = self.embed(hidden_states, timestep, cap_feats, cap_mask)
        x = self.refine_image(state, refiner_control(state) if refiner_control is not None else None)
        samples = control(state, x) if control is not None else None
        joint = torch.cat([x, state.cap], dim=1)
        for i, layer in enumerate(self.layers):
            joint = layer(joint, state.joint_rope, state.mask, state.vec)
            if samples is not None and i in samples:
                joint = joint + samples[i]
        final = self.all_final_layer[PATCH_KEY]
        return unpatchify(final(joint[:, : state.n], state.vec), state.height, state.width)


__all__ = [
    "PATCH",
    "SEQ_MULTIPLE",
    "Z_IMAGE_TURBO",
    "Block",
    "ZImageConfig",
    "ZImageState",
    "ZImageTransformer",
    "apply_rope",
    "caption_lengths",
    "padded",
    "patchify",
    "positions",
    "rope_angles",
    "unpatchify",
]
