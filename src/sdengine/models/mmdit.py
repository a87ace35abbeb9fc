"""SD3's MMDiT (Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis").

Stable Diffusion 3 and 3.5 replace the U-Net by a transformer that treats the image and the text alike: both
are sequences of tokens, and every block runs ONE attention over the two sequences joined, while each keeps
its own weights (the "multimodal" of MMDiT). Reading order, as the data flows:

1. **Patches.** The latent (B, C, H, W) is cut into p x p patches (``patch_size`` p, 2 in SD3) by a strided
   convolution: (B, h*w, D) tokens, h = H/p, w = W/p, D the model width (64 x heads). A fixed 2-D sin-cos
   position table (Vaswani et al.'s features, half the channels for the column, half for the row) of a
   ``pos_embed_max_size`` x ``pos_embed_max_size`` grid is stored with the weights; an image uses the
   h x w window at the grid's centre, so one table serves every aspect ratio up to the grid's size.
2. **Conditioning vector.** The timestep (0..1000, ``1000 * sigma`` of the flow) becomes 256 sinusoidal
   features and an MLP; the pooled text embedding (CLIP-L + CLIP-G, 2048) another MLP; their sum ``c``
   steers every block through adaptive layer norm.
3. **Context.** The text tokens (CLIP states padded to T5's 4096 and T5's states, joined along the
   sequence) are projected to D by ``context_embedder``.
4. **Joint blocks.** Each block has two streams, x (image) and context (text). For each stream, adaLN-Zero
   (Peebles & Xie 2023, DiT) turns ``c`` into shift, scale and gate vectors: ``LN(s) * (1 + scale) + shift``
   before a layer, ``s + gate * layer(...)`` after it (the gates start at zero in training, so each block
   starts as the identity). Both streams compute their own q, k, v; the attention runs over the tokens of
   both, joined (diffusers joins them as [x; context], SD3's reference code as [context; x]: attention with
   no mask and no positions in q/k is the same either way); the output is split back and each stream gets
   its own output projection, then its own 4x GELU(tanh) MLP. SD3.5 normalises q and k per head with RMS
   norm (``qk_norm``). The last block's context stream is "pre only": its q/k/v feed the image tokens'
   attention, but it computes no output of its own (nobody would read it): its adaLN has only a shift and a
   scale. SD3.5 Medium's MMDiT-X adds, in ``dual_attention_layers``, a second self-attention over the image
   tokens alone (``attn2``), with a third set of shift/scale/gate from the same adaLN (9 vectors in place of 6).
5. **Out.** A final adaLN (a scale and a shift, in that order in diffusers' weights: SD3's files store
   shift first, the loader swaps them), a linear layer to p*p*C_out numbers per token, and the patches put
   back together: the velocity (B, C_out, H, W) of the rectified flow.

Skip-layer guidance (SD3.5's ``skip_layer_guidance`` in diffusers, ComfyUI's ``SkipLayerGuidanceSD3``) runs the
network with some joint blocks left out: ``skip_layers`` lists them; a skipped block passes both streams on
unchanged, as diffusers does.

Parameter names equal diffusers' ``SD3Transformer2DModel`` so that a diffusers ``transformer/`` state dict
loads with ``load_state_dict(strict=True)``; :mod:`sdengine.weights.mmdit_file` reads Stability's files.
Build a model that is about to take its file's weights on the meta device (``with torch.device("meta"),
skip_meta_init(): MMDiT(cfg)``): the position table is then computed on meta too, for free, and comes from
the file.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdengine.errors import GenerationError, UsageError
from sdengine.models.config_checks import ConfigError, check_config
from sdengine.nn.attention import scaled_dot_product_attention
from sdengine.nn.embeddings import TimestepEmbedding, timestep_embedding
from sdengine.nn.fp8_storage import compute_dtype

QK_NORMS = (None, "rms_norm")
TIMESTEP_FEATURES = 256  # sinusoidal features of the timestep (SD3's frequency_embedding_size)
EPS = 1e-6  # every layer norm and RMS norm of the MMDiT

# ----------------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class MMDiTConfig:
    """Architecture of an MMDiT; the field names and defaults (an 18-block layout of no release: see the
    presets below) are diffusers' ``SD3Transformer2DModel`` config's. The width is ``num_attention_heads *
    attention_head_dim``, which ``caption_projection_dim`` must equal (the context stream has the image
    stream's width).

    ``sample_size`` (latent size of training) only sets the scale of the position table built here
    (positions are spaced ``sample_size / patch_size / pos_embed_max_size``); a loaded model takes the table
    stored in its file. ``dual_attention_layers``: the blocks with MMDiT-X's second self-attention.
    ``qk_norm``: None or ``"rms_norm"``.
    """

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple[int, ...] = field(default=())
    qk_norm: str | None = None

    def __post_init__(self) -> None:
        layers = self.dual_attention_layers
        if not isinstance(layers, list | tuple):
            raise ConfigError(f"MMDiT config: dual_attention_layers={layers!r} is not a list of block indices")
        object.__setattr__(self, "dual_attention_layers", tuple(layers))
        check_config("mmdit", self)
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name not in ("dual_attention_layers", "qk_norm") and type(v) is not int:
                raise ConfigError(f"MMDiT config: {f.name}={v!r} is not an integer")
        n = self.num_layers
        for i in self.dual_attention_layers:
            if type(i) is not int or not 0 <= i < n:
                raise ConfigError(
                    f"MMDiT config: dual_attention_layers entry {i!r} is not a block index (0 to {n - 1})"
                )
        if len(set(self.dual_attention_layers)) != len(self.dual_attention_layers):
            raise ConfigError(f"MMDiT config: dual_attention_layers={list(self.dual_attention_layers)} repeats a block")
        if self.qk_norm not in QK_NORMS:
            raise ConfigError(f"MMDiT config: qk_norm={self.qk_norm!r} is not supported (None or 'rms_norm')")
        if self.caption_projection_dim != self.inner_dim:
            raise ConfigError(
                f"MMDiT config: caption_projection_dim={self.caption_projection_dim} must equal the width "
                f"num_attention_heads x attention_head_dim = {self.inner_dim}"
            )
        if self.inner_dim % 4:
            raise ConfigError(f"MMDiT config: the width {self.inner_dim} must be a multiple of 4 (2-D sin-cos table)")
        if self.patch_size > self.sample_size:
            raise ConfigError(f"MMDiT config: patch_size={self.patch_size} exceeds sample_size={self.sample_size}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> MMDiTConfig:
        """Map a diffusers ``transformer/config.json`` (``SD3Transformer2DModel``) to an MMDiTConfig; keys other
        than the fields (and diffusers' own ``_...`` entries) are refused, all named in one ConfigError."""
        if not isinstance(config, Mapping):
            raise ConfigError(f"an MMDiT config must be a mapping, got {type(config).__name__}")
        check_config("mmdit", config)
        cls_name = config.get("_class_name", "SD3Transformer2DModel")
        if cls_name != "SD3Transformer2DModel":
            raise ConfigError(f"MMDiT config: _class_name is {cls_name!r}, not 'SD3Transformer2DModel'")
        names = {f.name for f in fields(cls)}
        unknown = sorted(k for k in config if k not in names and not str(k).startswith("_"))
        if unknown:
            raise ConfigError(f"MMDiT config: options sdengine does not implement: {', '.join(map(str, unknown))}")
        values = {k: v for k, v in config.items() if k in names}
        if values.get("out_channels", 0) is None:  # diffusers: None means "as many as go in"
            values["out_channels"] = values.get("in_channels", cls.in_channels)
        if values.get("dual_attention_layers") is None:
            values.pop("dual_attention_layers", None)
        return cls(**values)

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers ``config.json`` of this architecture."""
        out: dict[str, Any] = {"_class_name": "SD3Transformer2DModel"}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


# ----------------------------------------------------------------------------------------------------------
# Pieces


def sincos_position_table(dim: int, grid: int, base_size: float) -> Tensor:
    """The 2-D sin-cos position features of a ``grid`` x ``grid`` table, rows in row-major token order:
    (grid * grid, dim), float32. Positions are ``index * base_size / grid``; the first half of the channels
    encodes the column, the second half the row, each as ``[sin(pos * f_i), cos(pos * f_i)]`` with
    ``f_i = 10000 ** (-i / (dim / 4))`` (computed in float64, as diffusers and SD3's reference code)."""
    quarter = dim // 4
    pos = (torch.arange(grid, dtype=torch.float32) / (grid / base_size)).double()  # (grid,), float32 steps
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)
    angles = pos[:, None] * freqs[None, :]  # (grid, dim/4)
    feats = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (grid, dim/2): one axis
    cols = feats[None, :, :].expand(grid, grid, dim // 2)  # [row, col] -> the column's features
    rows = feats[:, None, :].expand(grid, grid, dim // 2)  # [row, col] -> the row's features
    return torch.cat([cols, rows], dim=-1).reshape(grid * grid, dim).float()


class PatchEmbed(nn.Module):
    """p x p patches -> tokens (a strided convolution, ``proj``) plus the centre crop of the stored position
    table (``pos_embed``, (1, M*M, D), M = ``pos_embed_max_size``)."""

    def __init__(self, cfg: MMDiTConfig) -> None:
        super().__init__()
        d, p = cfg.inner_dim, cfg.patch_size
        self.patch_size = p
        self.grid = cfg.pos_embed_max_size
        self.proj = nn.Conv2d(cfg.in_channels, d, kernel_size=p, stride=p)
        table = sincos_position_table(d, self.grid, cfg.sample_size / p)
        self.pos_embed: Tensor
        self.register_buffer("pos_embed", table.unsqueeze(0), persistent=True)

    def positions(self, h: int, w: int) -> Tensor:
        """The (1, h*w, D) window at the centre of the M x M table (top-left at ((M-h)//2, (M-w)//2))."""
        top, left = (self.grid - h) // 2, (self.grid - w) // 2
        table = self.pos_embed.reshape(self.grid, self.grid, -1)
        return table[top : top + h, left : left + w].reshape(1, h * w, -1)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens = self.proj(x).flatten(2).transpose(1, 2)  # (B, h*w, D), row-major
        return (tokens + self.positions(h, w)).to(tokens.dtype)


class TimeTextEmbed(nn.Module):
    """The conditioning vector ``c``: MLP(sinusoidal timestep features) + MLP(pooled text). Each MLP is
    Linear -> SiLU -> Linear (names ``timestep_embedder`` / ``text_embedder``, ``linear_1``/``linear_2``)."""

    def __init__(self, dim: int, pooled_dim: int) -> None:
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(TIMESTEP_FEATURES, dim)
        self.text_embedder = TimestepEmbedding(pooled_dim, dim)

    def forward(self, timestep: Tensor, pooled: Tensor) -> Tensor:
        feats = timestep_embedding(timestep, TIMESTEP_FEATURES, flip_sin_to_cos=True, freq_shift=0.0)
        return self.timestep_embedder(feats.to(pooled.dtype)) + self.text_embedder(pooled)  # (B, D)


class Modulation(nn.Module):
    """adaLN's projection: SiLU(c) -> ``count`` vectors of width D (name ``linear``). The block receives
    SiLU(c) already computed (the same for every block), so this is one Linear."""

    def __init__(self, dim: int, count: int) -> None:
        super().__init__()
        self.count = count
        self.linear = nn.Linear(dim, count * dim)

    def forward(self, silu_c: Tensor) -> list[Tensor]:
        return [v[:, None, :] for v in self.linear(silu_c).chunk(self.count, dim=1)]  # each (B, 1, D)


def layer_norm(x: Tensor) -> Tensor:
    """Layer norm without learned scale and bias (adaLN supplies them)."""
    return F.layer_norm(x, (x.shape[-1],), eps=EPS)


def modulate(normed: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return normed * (1 + scale) + shift


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis (Zhang & Sennrich 2019), the statistic in
    float32; SD3.5 applies it to each head's queries and keys."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS)
        return normed.to(self.weight.dtype) * self.weight


class JointAttention(nn.Module):
    """Multi-head attention over the image tokens, joined with the context tokens when there are any.

    Names are diffusers' ``Attention`` with ``added_kv_proj_dim``: ``to_q/k/v`` and ``to_out.0`` for the
    image stream, ``add_q/k/v_proj`` and ``to_add_out`` for the context stream, ``norm_q/k`` and
    ``norm_added_q/k`` for the per-head RMS norms. ``context``: whether this layer has a context stream (the
    MMDiT-X ``attn2`` has none); ``context_out``: whether the context stream gets an output (not in the
    last block)."""

    def __init__(self, dim: int, heads: int, head_dim: int, *, context: bool, context_out: bool, qk_norm: bool) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])
        self.norm_q = RMSNorm(head_dim) if qk_norm else None
        self.norm_k = RMSNorm(head_dim) if qk_norm else None
        make = (lambda: nn.Linear(dim, inner)) if context else (lambda: None)
        self.add_q_proj: nn.Linear | None = make()
        self.add_k_proj: nn.Linear | None = make()
        self.add_v_proj: nn.Linear | None = make()
        self.norm_added_q = RMSNorm(head_dim) if qk_norm and context else None
        self.norm_added_k = RMSNorm(head_dim) if qk_norm and context else None
        self.to_add_out = nn.Linear(inner, dim) if context and context_out else None
        self.perturbed_rows = 0  # PAG's switch: the last rows of a joint call take the perturbed map (see forward)

    def _per_head(self, norm: RMSNorm | None, t: Tensor) -> Tensor:
        if norm is None:
            return t
        b, n, _ = t.shape
        return norm(t.view(b, n, self.heads, self.head_dim)).reshape(b, n, -1)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        q = self._per_head(self.norm_q, self.to_q(x))
        k = self._per_head(self.norm_k, self.to_k(x))
        v = self.to_v(x)
        if context is not None:
            if self.add_q_proj is None or self.add_k_proj is None or self.add_v_proj is None:
                raise UsageError("this attention layer has no context stream")
            cq = self._per_head(self.norm_added_q, self.add_q_proj(context))
            ck = self._per_head(self.norm_added_k, self.add_k_proj(context))
            cv = self.add_v_proj(context)
            q, k, v = (torch.cat([a, b], dim=1) for a, b in ((q, cq), (k, ck), (v, cv)))  # [x; context]
        n = x.shape[1]
        p = min(self.perturbed_rows, x.shape[0]) if context is not None else 0
        if p:
            keep = x.shape[0] - p
            plain = [scaled_dot_product_attention(q[:keep], k[:keep], v[:keep], self.heads)] if keep else []
            out = torch.cat([*plain, self._perturbed(q[keep:], k[keep:], v[keep:], n)])
        else:
            out = scaled_dot_product_attention(q, k, v, self.heads)  # (B, Lx + Lc, inner)
        x_out = self.to_out[0](out[:, :n])
        c_out = self.to_add_out(out[:, n:]) if self.to_add_out is not None else None
        return x_out, c_out

    def _perturbed(self, q: Tensor, k: Tensor, v: Tensor, n: int) -> Tensor:
        """Perturbed-attention guidance's joint attention (diffusers' ``PAGJointAttnProcessor2_0``): the map
        between image tokens is the identity, so an image query attends to its own key and to every text key only;
        text queries attend to all keys as usual. (B, n + Lc, inner) in and out, ``n`` image tokens first."""
        b, length, inner = q.shape
        h, d = self.heads, self.head_dim
        text = scaled_dot_product_attention(q[:, n:], k, v, h) if self.to_add_out is not None else q[:, n:]
        qi, ki, vi = (t[:, :n].reshape(b, n, h, d).transpose(1, 2).float() for t in (q, k, v))  # (B, h, n, d)
        kc, vc = (t[:, n:].reshape(b, length - n, h, d).transpose(1, 2).float() for t in (k, v))  # (B, h, Lc, d)
        scale = d**-0.5
        own = (qi * ki).sum(-1, keepdim=True) * scale  # (B, h, n, 1): the one image key left to each image query
        weights = torch.softmax(torch.cat([own, qi @ kc.transpose(-1, -2) * scale], dim=-1), dim=-1)
        image = weights[..., :1] * vi + weights[..., 1:] @ vc  # (B, h, n, d)
        image = image.transpose(1, 2).reshape(b, n, inner).to(q.dtype)
        return torch.cat([image, text], dim=1)


class GELUTanh(nn.Module):
    """Linear (``proj``) -> GELU with the tanh approximation (Hendrycks & Gimpel 2016)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class MLP(nn.Module):
    """GELU(tanh) projection -> Linear, 4x wide; names ``net.0.proj`` and ``net.2`` (index 1 is diffusers'
    dropout slot, a no-op at inference)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(GELUTanh(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class JointBlock(nn.Module):
    """One MMDiT block (diffusers' ``JointTransformerBlock``): adaLN-Zero on both streams, the joint
    attention, MMDiT-X's second image-only attention where ``dual``, the MLPs. ``pre_only``: the last
    block, whose context stream only feeds the attention."""

    def __init__(self, cfg: MMDiTConfig, *, pre_only: bool, dual: bool) -> None:
        super().__init__()
        d = cfg.inner_dim
        qk = cfg.qk_norm == "rms_norm"
        self.pre_only, self.dual = pre_only, dual
        self.norm1 = Modulation(d, 9 if dual else 6)
        self.norm1_context = Modulation(d, 2 if pre_only else 6)
        heads, hd = cfg.num_attention_heads, cfg.attention_head_dim
        self.attn = JointAttention(d, heads, hd, context=True, context_out=not pre_only, qk_norm=qk)
        self.attn2 = JointAttention(d, heads, hd, context=False, context_out=False, qk_norm=qk) if dual else None
        self.ff = MLP(d)
        self.ff_context = None if pre_only else MLP(d)

    def forward(self, x: Tensor, context: Tensor, silu_c: Tensor) -> tuple[Tensor, Tensor]:
        mods = self.norm1(silu_c)
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        x_normed = layer_norm(x)
        if self.pre_only:
            c_scale, c_shift = self.norm1_context(silu_c)  # diffusers' order: scale first
            c_in = modulate(layer_norm(context), c_shift, c_scale)
        else:
            c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(silu_c)
            c_in = modulate(layer_norm(context), c_shift, c_scale)
        x_att, c_att = self.attn(modulate(x_normed, shift, scale), c_in)
        x = x + gate * x_att
        if self.attn2 is not None:
            shift2, scale2, gate2 = mods[6:]
            x = x + gate2 * self.attn2(modulate(x_normed, shift2, scale2))[0]  # the same normed x, its own shift
        x = x + gate_mlp * self.ff(modulate(layer_norm(x), shift_mlp, scale_mlp))
        if self.ff_context is None or c_att is None:
            return x, context  # pre only: the context is not used after this block
        context = context + c_gate * c_att
        context = context + c_gate_mlp * self.ff_context(modulate(layer_norm(context), c_shift_mlp, c_scale_mlp))
        return x, context


# ----------------------------------------------------------------------------------------------------------
# The model


class MMDiT(nn.Module):
    """SD3's MMDiT: (latent, timestep, text states, pooled text) -> the flow's velocity. See the module
    docstring for the walk-through."""

    def __init__(self, config: MMDiTConfig) -> None:
        super().__init__()
        self.config = config
        d = config.inner_dim
        self.pos_embed = PatchEmbed(config)
        self.time_text_embed = TimeTextEmbed(d, config.pooled_projection_dim)
        self.context_embedder = nn.Linear(config.joint_attention_dim, config.caption_projection_dim)
        last = config.num_layers - 1
        self.transformer_blocks = nn.ModuleList(
            JointBlock(config, pre_only=i == last, dual=i in config.dual_attention_layers)
            for i in range(config.num_layers)
        )
        self.norm_out = Modulation(d, 2)  # scale, shift (diffusers' AdaLayerNormContinuous)
        self.proj_out = nn.Linear(d, config.patch_size**2 * config.out_channels)

    def _check(self, x: Tensor, timestep: Tensor, context: Tensor, pooled: Tensor, skip: Sequence[int]) -> Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise GenerationError(f"MMDiT: latents (B, {cfg.in_channels}, H, W) expected, got {tuple(x.shape)}")
        b, _, hh, ww = x.shape
        p, m = cfg.patch_size, cfg.pos_embed_max_size
        if hh % p or ww % p:
            raise GenerationError(f"MMDiT: latent size {hh}x{ww} is not a multiple of the patch size {p}")
        if hh // p > m or ww // p > m:
            raise GenerationError(
                f"MMDiT: latent size {hh}x{ww} is {hh // p}x{ww // p} patches, more than the position grid's "
                f"{m}x{m} (at most {m * p}x{m * p} latent pixels)"
            )
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg.joint_attention_dim:
            raise GenerationError(
                f"MMDiT: encoder_hidden_states ({b}, L, {cfg.joint_attention_dim}) expected, got {tuple(context.shape)}"
            )
        if pooled.ndim != 2 or pooled.shape != (b, cfg.pooled_projection_dim):
            raise GenerationError(
                f"MMDiT: pooled_projections ({b}, {cfg.pooled_projection_dim}) expected, got {tuple(pooled.shape)}"
            )
        t = torch.as_tensor(timestep, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise GenerationError(f"MMDiT: timestep () or ({b},) expected, got {tuple(t.shape)}")
        for i in skip:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < cfg.num_layers:
                raise UsageError(f"MMDiT: skip_layers entry {i!r} is not a block index (0 to {cfg.num_layers - 1})")
        return t

    def forward(
        self,
        hidden_states: Tensor,
        timestep: Tensor,
        encoder_hidden_states: Tensor,
        pooled_projections: Tensor,
        skip_layers: Sequence[int] = (),
        block_controlnet_hidden_states: Sequence[Tensor] | None = None,
    ) -> Tensor:
        """(B, C, H, W) latents at ``timestep`` (B,) on the 0..1000 scale, text states (B, L,
        joint_attention_dim) and pooled text (B, pooled_projection_dim), taken in the model's dtype -> the
        velocity (B, C_out, H, W) in that dtype.
        ``skip_layers``: joint blocks left out (skip-layer guidance).
        ``block_controlnet_hidden_states``: an SD3 ControlNet's residuals (B, h*w, D), m of them: block i (all but
        the last) gets residual ``int(i / (n / m))`` added to its image tokens, skipped or not (diffusers' rule;
        :mod:`sdengine.models.dit_controlnet`)."""
        t = self._check(hidden_states, timestep, encoder_hidden_states, pooled_projections, skip_layers)
        skip = set(skip_layers)
        dtype = compute_dtype(self.proj_out)  # inputs are taken in the model's dtype (the timestep stays as given)
        hidden_states = hidden_states.to(dtype)
        encoder_hidden_states = encoder_hidden_states.to(dtype)
        pooled_projections = pooled_projections.to(dtype)
        p, c_out = self.config.patch_size, self.config.out_channels
        b, _, hh, ww = hidden_states.shape
        x = self.pos_embed(hidden_states)  # (B, h*w, D)
        c = self.time_text_embed(t, pooled_projections)  # (B, D)
        silu_c = F.silu(c)  # what every adaLN projection reads
        context = self.context_embedder(encoder_hidden_states)  # (B, L, D)
        control = block_controlnet_hidden_states
        n = len(self.transformer_blocks)
        for i, block in enumerate(self.transformer_blocks):
            if i not in skip:
                x, context = block(x, context, silu_c)
            if control and not block.pre_only:  # a ControlNet's residual (diffusers: after every full block)
                x = x + control[int(i / (n / len(control)))].to(x.dtype)
        scale, shift = self.norm_out(silu_c)
        x = self.proj_out(modulate(layer_norm(x), shift, scale))  # (B, h*w, p*p*C_out)
        h, w = hh // p, ww // p
        x = x.reshape(b, h, w, p, p, c_out).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
        return x.reshape(b, c_out, h * p, w * p)


# ----------------------------------------------------------------------------------------------------------
# Perturbed-attention guidance


def pag_joint_layers(model: nn.Module, patterns: Sequence[str]) -> list[JointAttention]:
    """The joint-attention layers (``transformer_blocks.<i>.attn``) that perturbed-attention guidance perturbs, by
    diffusers' ``pag_applied_layers`` rule (:func:`sdengine.nn.attention.match_pag_layers`): "blocks.1" (diffusers'
    SD3 default) matches blocks 1 and 10 to 19 of a 24-block model, as there; "blocks.1.attn$" or "13" pick one.
    MMDiT-X's image-only ``attn2`` layers are not candidates (diffusers' joint PAG processor cannot run them)."""
    from sdengine.nn.attention import match_pag_layers

    named = [
        (name, m) for name, m in model.named_modules() if isinstance(m, JointAttention) and m.add_q_proj is not None
    ]
    last = max(0, len(named) - 1)
    what = f"joint-attention layer of the MMDiT (transformer_blocks.0.attn to .{last}.attn; e.g. 'blocks.1')"
    return match_pag_layers(named, patterns, what)


@contextmanager
def perturbed_attention(layers: Sequence[JointAttention], rows: int) -> Iterator[None]:
    """Inside the block, the last ``rows`` rows of every call of ``layers`` take PAG's perturbed joint attention
    (:meth:`JointAttention._perturbed`); as before after it, whatever happens."""
    for layer in layers:
        layer.perturbed_rows = int(rows)
    try:
        yield
    finally:
        for layer in layers:
            layer.perturbed_rows = 0


# ----------------------------------------------------------------------------------------------------------
# Presets (diffusers' transformer/config.json of the releases)

SD3_MEDIUM = MMDiTConfig(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192)
SD35_MEDIUM = MMDiTConfig(
    num_layers=24,
    num_attention_heads=24,
    caption_projection_dim=1536,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)
SD35_LARGE = MMDiTConfig(
    num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192, qk_norm="rms_norm"
)
# A tiny layout for tests: every feature, 71 k parameters.
TINY_MMDIT = MMDiTConfig(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    num_layers=3,
    attention_head_dim=8,
    num_attention_heads=3,  # one head per block, SD3's rule (what a single file's loader assumes)
    joint_attention_dim=12,
    caption_projection_dim=24,
    pooled_projection_dim=10,
    out_channels=4,
    pos_embed_max_size=12,
    dual_attention_layers=(0,),
    qk_norm="rms_norm",
)
PRESETS: dict[str, MMDiTConfig] = {
    "sd3_medium": SD3_MEDIUM,
    "sd3.5_medium": SD35_MEDIUM,
    "sd3.5_large": SD35_LARGE,
    "tiny_mmdit": TINY_MMDIT,
}


def parameter_count(cfg: MMDiTConfig) -> int:
    """The exact number of parameters of ``MMDiT(cfg)`` (without building it)."""
    d, p = cfg.inner_dim, cfg.patch_size
    linear = lambda i, o: i * o + o  # noqa: E731
    total = cfg.in_channels * d * p * p + d  # patch convolution
    total += linear(TIMESTEP_FEATURES, d) + linear(d, d) + linear(cfg.pooled_projection_dim, d) + linear(d, d)
    total += linear(cfg.joint_attention_dim, d)
    qk = 4 * cfg.attention_head_dim if cfg.qk_norm else 0
    for i in range(cfg.num_layers):
        last, dual = i == cfg.num_layers - 1, i in cfg.dual_attention_layers
        total += linear(d, (9 if dual else 6) * d) + linear(d, (2 if last else 6) * d)
        total += 7 * linear(d, d) + (0 if last else linear(d, d)) + qk  # q/k/v x 2, out x (1 or 2)
        total += linear(d, 4 * d) + linear(4 * d, d)
        if not last:
            total += linear(d, 4 * d) + linear(4 * d, d)
        if dual:
            total += 4 * linear(d, d) + qk // 2
    return total + linear(d, 2 * d) + linear(d, p * p * cfg.out_channels)


__all__ = [
    "PRESETS",
    "QK_NORMS",
    "SD3_MEDIUM",
    "SD35_LARGE",
    "SD35_MEDIUM",
    "TINY_MMDIT",
    "JointAttention",
    "JointBlock",
    "MMDiT",
    "MMDiTConfig",
    "pag_joint_layers",
    "parameter_count",
    "perturbed_attention",
    "sincos_position_table",
]
