"""Flux.1's transformer: a rectified-flow diffusion transformer with double- and single-stream blocks.

Black Forest Labs' FLUX.1 [dev] and [schnell] (2024; the architecture follows Esser et al. 2024, "Scaling
Rectified Flow Transformers for High-Resolution Image Synthesis" (SD3's MMDiT), with parallel blocks after
Dehghani et al. 2023 and rotary position embeddings after Su et al. 2021, "RoFormer").

Reading order: config, rotary embedding, the two block kinds, the model.

What the network sees:

* the image: the 16-channel latent cut into 2x2 patches, each patch one token of 64 numbers
  (``x_embedder``: 64 -> hidden, 3072 in Flux.1); a 1024x1024 image is a 128x128 latent, 64x64 = 4096 tokens;
* the text: T5-XXL's hidden states, 4096 wide (``context_embedder``: 4096 -> hidden), 256 or 512 tokens;
* one conditioning vector per image: the timestep's sinusoidal features through an MLP, plus (dev only) the
  distilled guidance scale's features through another MLP, plus CLIP-L's pooled 768-wide text embedding
  through a third. It steers every block through adaptive layer norm (shift, scale and a gate per branch:
  "adaLN-Zero", Peebles & Xie 2023).

Positions are not added to the tokens: each token carries three integer ids, (0, row, col) for an image patch and
(0, 0, 0) for every text token, and attention rotates each head's query and key by angles made of those ids
(RoPE, split over the head's 128 numbers: 16 for the first axis, 56 for rows, 56 for columns). Two tokens'
score then depends on their offset, not on where they are, so Flux runs at sizes it was not trained at.

Blocks:

* double-stream (19 in Flux.1): image and text tokens keep separate weights (modulation, q/k/v, output
  projection, MLP) but attend jointly: their queries, keys and values are concatenated (text first) for one
  attention. Queries and keys get an RMS norm per head (Henry et al. 2020; Dehghani et al. 2023) before RoPE;
* single-stream (38): the text and image tokens are one sequence with one set of weights; one modulation,
  then attention and an MLP side by side on the same normalised input, their outputs concatenated into one
  output projection (a "parallel" block).

Then a last adaptive layer norm (scale and shift from the conditioning vector) and a projection back to 64
numbers per token, unpacked into the latent's shape.

The parameter names are diffusers' ``FluxTransformer2DModel``, so a diffusers ``transformer/`` state dict loads
with a strict ``load_state_dict``; BFL's own files are renamed by :mod:`sdengine.weights.flux_file`.

The interface is the one sdengine's SD3 transformer keeps, so one pipeline core drives both:
``forward(hidden_states, timestep, encoder_hidden_states, pooled_projections, guidance)`` takes the *unpacked*
latent (B, 16, H, W) and returns the prediction (the flow's velocity) in the same shape; ``timestep`` is on the
0..1000 scale (1000 x the flow's t). diffusers' FluxPipeline passes t in 0..1 and its model multiplies by 1000:
here the multiplication is the caller's. ``guidance`` is the guidance scale itself (dev: 3.5 typical), which the
model multiplies by 1000 as BFL's and diffusers' do.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdengine.errors import UsageError
from sdengine.models.config_checks import ConfigError, check_config
from sdengine.nn.attention import scaled_dot_product_attention
from sdengine.nn.embeddings import TimestepEmbedding, timestep_embedding
from sdengine.nn.fp8_storage import compute_dtype

# ----------------------------------------------------------------------------------------------------------
# Config

ROPE_THETA = 10000.0  # the base of the rotary frequencies (BFL's and diffusers' theta)
TIME_FEATURES = 256  # sinusoidal features of the timestep and of the guidance scale
GUIDANCE_SCALE = 1000.0  # the guidance scale enters the sinusoid multiplied by this (as t did, in 0..1)
PATCH = 2  # latent pixels per patch side: 2x2 patches of the latent are the image tokens


def _numbers(values: Mapping[str, Any]) -> dict[str, Any]:
    """The config's values for the bounds check (``out_channels`` None means "as in_channels")."""
    return {k: v for k, v in values.items() if not (k == "out_channels" and v is None)}


@dataclass(frozen=True)
class FluxLikeConfig:
    """What the configs of Flux's and Chroma's transformers (:class:`FluxConfig`,
    :class:`sdengine.models.chroma.ChromaConfig`, in diffusers' names) share: their first fields, the checks of the
    patching and the RoPE split, the widths, diffusers' ``config.json`` in and out. ``LABEL`` starts their errors,
    ``DIFFUSERS_CLASS`` is the config's ``_class_name``; each adds its own fields (``axes_dims_rope`` among them)."""

    LABEL: ClassVar[str] = "Flux transformer"
    DIFFUSERS_CLASS: ClassVar[str] = "FluxTransformer2DModel"

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096

    def check_layout(self) -> None:
        """``axes_dims_rope`` a tuple (a list made one already) of three even numbers adding up to the head,
        ``patch_size`` 1, ``in_channels`` / ``out_channels`` multiples of 4: one line each."""
        cfg: Any = self  # axes_dims_rope: each config's own field
        what = self.LABEL
        if not isinstance(cfg.axes_dims_rope, tuple):
            raise ConfigError(f"{what} config: axes_dims_rope={cfg.axes_dims_rope!r} is not a list")
        if cfg.patch_size != 1:
            raise ConfigError(
                f"{what} config: patch_size={cfg.patch_size} is not supported (2x2 latent patches are packed before "
                "the network; patch_size is 1)"
            )
        for name in ("in_channels", "out_channels"):
            value = getattr(cfg, name)
            if value is not None and value % (PATCH * PATCH):
                raise ConfigError(f"{what} config: {name}={value} is not a multiple of 4 (2x2 patches of the latent)")
        if len(cfg.axes_dims_rope) != 3 or any(d % 2 for d in cfg.axes_dims_rope):
            raise ConfigError(
                f"{what} config: axes_dims_rope={list(cfg.axes_dims_rope)} must be three even numbers "
                "(RoPE over the three position ids)"
            )
        if sum(cfg.axes_dims_rope) != cfg.attention_head_dim:
            raise ConfigError(
                f"{what} config: axes_dims_rope={list(cfg.axes_dims_rope)} adds up to "
                f"{sum(cfg.axes_dims_rope)}, not attention_head_dim={cfg.attention_head_dim}"
            )

    @property
    def hidden_size(self) -> int:
        """Width of every token inside the network (heads x head width; 3072 in Flux.1)."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def latent_channels(self) -> int:
        """Channels of the (unpacked) latent the model takes: ``in_channels / 4`` (16 for Flux.1)."""
        return self.in_channels // (PATCH * PATCH)

    @property
    def out_latent_channels(self) -> int:
        """Channels of the (unpacked) prediction the model returns."""
        return (self.out_channels or self.in_channels) // (PATCH * PATCH)

    @classmethod
    def check_values(cls, values: Mapping[str, Any]) -> None:
        """Bounds on a ``config.json``'s known values before the config is built (none here)."""

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> Self:
        """A diffusers ``transformer/config.json``; keys starting with ``_`` (class name, versions) are
        ignored, any other unknown key is refused (one line naming them)."""
        what = cls.LABEL
        if not isinstance(config, Mapping):
            raise ConfigError(f"a {what} config must be a mapping, got {type(config).__name__}")
        name = config.get("_class_name")
        if name is not None and name != cls.DIFFUSERS_CLASS:
            raise ConfigError(f"not a {what} config: _class_name={name!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
        if unknown:
            raise ConfigError(f"unknown {what} config options: {', '.join(unknown)}")
        values = {k: v for k, v in config.items() if k in known}
        cls.check_values(values)
        try:
            return cls(**values)
        except TypeError as e:  # a list where a number belongs, ...
            raise ConfigError(f"{what} config: {e}") from None

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers ``config.json`` for this architecture."""
        out: dict[str, Any] = {"_class_name": self.DIFFUSERS_CLASS}
        out.update(dataclasses.asdict(self))
        out["axes_dims_rope"] = list(out["axes_dims_rope"])
        return out


@dataclass(frozen=True)
class FluxConfig(FluxLikeConfig):
    """Architecture of a Flux transformer; the names are those of diffusers' ``FluxTransformer2DModel`` config.

    ``in_channels``: numbers per image token, 4 x the latent's channels (2x2 patches: 64 for Flux.1's 16-channel
    latent). ``patch_size`` is diffusers' name for a patching it does not do (always 1: the 2x2 packing
    happens before the network, here inside :meth:`FluxTransformer.forward`). ``guidance_embeds``: the
    guidance-distilled [dev] model, which takes the guidance scale as an input ([schnell] does not).
    ``axes_dims_rope``: how many numbers of each head the three position ids rotate; they add up to the head.
    """

    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    def __post_init__(self) -> None:
        if isinstance(self.axes_dims_rope, list):
            object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))
        check_config("flux", _numbers(dataclasses.asdict(self)))
        if type(self.guidance_embeds) is not bool:
            raise ConfigError(f"Flux transformer config: guidance_embeds={self.guidance_embeds!r} is not true/false")
        self.check_layout()

    @classmethod
    def check_values(cls, values: Mapping[str, Any]) -> None:
        check_config("flux", _numbers(values))


FLUX_SCHNELL = FluxConfig()  # FLUX.1 [schnell]: timestep-distilled, no guidance input
FLUX_DEV = FluxConfig(guidance_embeds=True)  # FLUX.1 [dev]: guidance-distilled


# ----------------------------------------------------------------------------------------------------------
# Rotary position embedding (Su et al. 2021)


def rope_frequencies(dim: int, theta: float = ROPE_THETA) -> Tensor:
    """The rotation frequencies of one axis of ``dim`` numbers, ``theta ** (-2j / dim)`` for j < dim / 2
    (float64): what :func:`rope_angles` multiplies the positions by."""
    return theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def rope_angles(ids: Tensor, axes_dims: tuple[int, ...], theta: float = ROPE_THETA) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotation angles of tokens with position ``ids`` (L, n_axes): (L, head_dim) each.

    Axis ``a`` owns ``axes_dims[a]`` numbers of every head, taken as ``axes_dims[a] / 2`` consecutive pairs; pair
    ``j`` turns by ``position_a * theta ** (-2j / axes_dims[a])``. Each angle is written twice (once for each
    number of its pair), so the tables line up with the head. The angles are computed in float64 (positions up
    to a few hundred times frequencies near 1 keep their digits), the tables returned in float32.
    """
    pos = ids.to(device="cpu", dtype=torch.float64)  # tiny: a few thousand x 3; float64 is not on every device
    cos, sin = [], []
    for axis, dim in enumerate(axes_dims):
        angles = pos[:, axis, None] * rope_frequencies(dim, theta)[None, :]  # (L, dim/2)
        cos.append(angles.cos().repeat_interleave(2, dim=1))  # (L, dim)
        sin.append(angles.sin().repeat_interleave(2, dim=1))
    return (
        torch.cat(cos, dim=1).to(device=ids.device, dtype=torch.float32),
        torch.cat(sin, dim=1).to(device=ids.device, dtype=torch.float32),
    )


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair (x[2j], x[2j+1]) of every head by its angle: x (B, L, heads, d), cos/sin (L, d).

    The pair as a complex number x[2j] + i x[2j+1] multiplied by e^(i angle): (a cos - b sin, a sin + b cos).
    Computed in float32, returned in x's dtype.
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, L, heads, d/2, 2)
    a, b = pairs.unbind(-1)
    turned = torch.stack([-b, a], dim=-1).flatten(-2)  # (B, L, heads, d): the pair turned by 90 degrees
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return (x.float() * c + turned * s).to(x.dtype)


def image_ids(rows: int, cols: int, *, device: torch.device | str | None = None) -> Tensor:
    """Position ids of a rows x cols grid of image tokens, row-major: (rows * cols, 3) of (0, row, col)."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device)


REFERENCE_METHODS = ("offset", "index", "uxo")  # ComfyUI's reference_latents_method values (Flux.1's default first)


def reference_ids(
    shapes: Sequence[tuple[int, int]],
    *,
    method: str = "offset",
    image: tuple[int, int] = (0, 0),
    device: torch.device | str | None = None,
) -> Tensor:
    """Position ids of reference latents (FLUX.1 Kontext) of latent sizes ``shapes`` ((h, w) each; an odd side is
    padded to the patches, ComfyUI's ``pad_to_patch_size``: ``ceil(h / 2)`` rows of tokens, the shifts below still
    counted in the unpadded sizes, as ComfyUI counts them), their tokens one after another, rows and columns as an
    image's, shifted by ComfyUI's ``method``:

    * "offset" (ComfyUI's default for Flux.1; diffusers' FluxKontextPipeline for one reference): first id 1; each
      further one moved past the ones before it along its shorter side (right of their box where it is taller
      than the box is wide, else below);
    * "index": first id 1, 2, 3 ... one per reference, no shift;
    * "uxo" (ComfyUI's "uxo/uno"): first id 0, each one shifted down and right by the image's latent size
      ``image`` (h, w) plus the references before it.

    Shifts are in latent pixels, rounded to whole patches as ComfyUI's ``(offset + 1) // 2``."""
    if method not in REFERENCE_METHODS:
        raise UsageError(f"unknown reference method {method!r}; use one of {', '.join(REFERENCE_METHODS)}")
    out, box_h, box_w, index = [], 0, 0, 0
    for h, w in shapes:
        dy = dx = 0
        if method == "index":
            index += 1
        elif method == "uxo":
            index, dy, dx = 0, image[0] + box_h, image[1] + box_w
            box_h, box_w = box_h + h, box_w + w
        else:
            index = 1
            if h + box_h > w + box_w:
                dx = box_w
            else:
                dy = box_h
            box_h, box_w = max(box_h, h + dy), max(box_w, w + dx)
        ids = image_ids(-(-h // PATCH), -(-w // PATCH))
        ids[:, 0] = index
        ids[:, 1] += (dy + PATCH // 2) // PATCH
        ids[:, 2] += (dx + PATCH // 2) // PATCH
        out.append(ids)
    return torch.cat(out).to(device)


def pack_latents(latents: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): each 2x2 patch one token, row-major; a token's numbers are channel
    by channel, each channel's four pixels in the order (top-left, top-right, bottom-left, bottom-right)."""
    B, C, H, W = latents.shape
    x = latents.reshape(B, C, H // 2, 2, W // 2, 2)  # (B, C, rows, dy, cols, dx)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // 2) * (W // 2), C * 4)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """The inverse of :func:`pack_latents`: (B, H/2 * W/2, 4C) -> (B, C, H, W)."""
    B, _, D = tokens.shape
    x = tokens.reshape(B, height // 2, width // 2, D // 4, 2, 2)  # (B, rows, cols, C, dy, dx)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(B, D // 4, height, width)


# ----------------------------------------------------------------------------------------------------------
# Blocks


class GELUProjection(nn.Module):
    """Linear then tanh-approximated GELU: the first layer of Flux's MLPs (key ``proj``)."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class MLP(nn.Module):
    """Linear (4x wider) -> GELU (tanh) -> Linear, keys ``net.0.proj`` and ``net.2`` (diffusers' FeedForward)."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.ModuleList([GELUProjection(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class Modulation(nn.Module):
    """SiLU -> Linear of the conditioning vector into ``n`` (shift, scale, gate ...) vectors of width ``dim``
    (key ``linear``); the layer norm they modulate has no weights of its own."""

    def __init__(self, dim: int, n: int) -> None:
        super().__init__()
        self.n = n
        self.linear = nn.Linear(dim, n * dim)

    def forward(self, vec: Tensor) -> tuple[Tensor, ...]:
        return self.linear(F.silu(vec)).unsqueeze(1).chunk(self.n, dim=-1)  # n x (B, 1, dim)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: a layer norm without weights, then the conditioning's scale and shift."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale) + shift


def _clip_fp16(x: Tensor) -> Tensor:
    # Flux's activations outgrow float16 in some blocks; diffusers clips the residual stream, so do we
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class JointAttention(nn.Module):
    """The attention of both block kinds: q/k/v projections, an RMS norm per head on q and k, RoPE, one scaled
    dot-product attention over [text, image] tokens.

    ``context_dim`` set (double-stream): the text tokens have their own projections (``add_q_proj``,
    ``add_k_proj``, ``add_v_proj``, ``norm_added_q/k``, ``to_add_out``) and each stream gets its part of the
    output projected back (``to_out.0`` for the image). Unset (single-stream): one set of projections over the
    whole sequence and no output projection (the block's ``proj_out`` does it, together with the MLP's).

    ``mask`` (Chroma's, :mod:`sdengine.models.chroma`): (B, S + L) bool over the keys, text first, False for a key
    no query attends to; None: every key."""

    def __init__(self, dim: int, heads: int, head_dim: int, *, joint: bool) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.head_dim = head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.norm_q = nn.RMSNorm(head_dim, eps=1e-6)
        self.norm_k = nn.RMSNorm(head_dim, eps=1e-6)
        self.joint = joint
        if joint:
            # A ModuleList (not Sequential) only to keep diffusers' key names `to_out.0.*`.
            self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])
            self.add_q_proj = nn.Linear(dim, inner)
            self.add_k_proj = nn.Linear(dim, inner)
            self.add_v_proj = nn.Linear(dim, inner)
            self.norm_added_q = nn.RMSNorm(head_dim, eps=1e-6)
            self.norm_added_k = nn.RMSNorm(head_dim, eps=1e-6)
            self.to_add_out = nn.Linear(inner, dim)

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim))  # (B, L, heads, d)

    def image_queries(self, x: Tensor) -> Tensor:
        """The queries of ``x``'s tokens (B, L, heads, d): projected and RMS-normed, before RoPE (IP-Adapter's
        image attention reads these, :mod:`sdengine.nn.ip_adapter`)."""
        return self.norm_q(self._heads(self.to_q(x)))

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor], context: Tensor | None = None, mask: Tensor | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        """x: (B, L, dim) image tokens (or the whole sequence, single-stream); context: (B, S, dim) text tokens
        (double-stream); rope: the cos/sin tables of the (S + L) tokens, text first; mask: the class docstring's."""
        q = self.image_queries(x)
        k = self.norm_k(self._heads(self.to_k(x)))
        v = self._heads(self.to_v(x))
        if context is not None:
            q = torch.cat([self.norm_added_q(self._heads(self.add_q_proj(context))), q], dim=1)
            k = torch.cat([self.norm_added_k(self._heads(self.add_k_proj(context))), k], dim=1)
            v = torch.cat([self._heads(self.add_v_proj(context)), v], dim=1)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        m = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, S + L): over the keys
        h = scaled_dot_product_attention(q.flatten(2), k.flatten(2), v.flatten(2), self.heads, mask=m)  # (B, S+L, D)
        if context is None:
            return h
        S = context.shape[1]
        return self.to_out[0](h[:, S:]), self.to_add_out(h[:, :S])


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, one joint attention (diffusers' ``FluxTransformerBlock``;
    BFL's ``DoubleStreamBlock``).

    ``ip_attention``: set for the duration of a call by an IP-Adapter (:mod:`sdengine.nn.ip_adapter`): it takes the
    image tokens' queries (B, N, heads x d; :meth:`JointAttention.image_queries`, no RoPE) and gives what is added to
    the image stream after the MLP, ungated (XLabs' flux-ip-adapter, diffusers' ``FluxIPAdapterAttnProcessor``), or
    None. ``modulation=False``: without its modulation linears (Chroma's block, which is given its shifts,
    scales and gates: :meth:`modulated`)."""

    ip_attention: Any = None
    upcast = False  # IP-Adapter's image attention runs in the block's dtype

    def __init__(self, dim: int, heads: int, head_dim: int, *, modulation: bool = True) -> None:
        super().__init__()
        if modulation:
            self.norm1 = Modulation(dim, 6)  # the image's shift/scale/gate for attention, then for the MLP
            self.norm1_context = Modulation(dim, 6)  # the text's
        self.attn = JointAttention(dim, heads, head_dim, joint=True)
        self.heads = heads
        self.ff = MLP(dim)
        self.ff_context = MLP(dim)

    def forward(self, x: Tensor, context: Tensor, vec: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return self.modulated(x, context, self.norm1(vec), self.norm1_context(vec), rope)

    def modulated(
        self,
        x: Tensor,
        context: Tensor,
        img_mod: Sequence[Tensor],
        txt_mod: Sequence[Tensor],
        rope: tuple[Tensor, Tensor],
        mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The block given each stream's six (B, 1, dim) modulation vectors (shift, scale, gate for attention, then
        for the MLP) and the attention's key ``mask`` (:class:`JointAttention`)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = img_mod
        c_shift1, c_scale1, c_gate1, c_shift2, c_scale2, c_gate2 = txt_mod
        h = modulate(x, shift1, scale1)
        img, txt = self.attn(h, rope, modulate(context, c_shift1, c_scale1), mask=mask)
        x = x + gate1 * img
        x = x + gate2 * self.ff(modulate(x, shift2, scale2))
        if self.ip_attention is not None:  # IP-Adapter: the image tokens' attention to its image tokens
            extra = self.ip_attention(self.attn.image_queries(h).flatten(2))
            if extra is not None:
                x = x + extra.to(x.dtype)
        context = context + c_gate1 * txt
        context = context + c_gate2 * self.ff_context(modulate(context, c_shift2, c_scale2))
        return _clip_fp16(x), _clip_fp16(context)


class SingleStreamBlock(nn.Module):
    """Text and image tokens as one sequence; attention and MLP in parallel on the same input, one output
    projection over both (diffusers' ``FluxSingleTransformerBlock``; BFL's ``SingleStreamBlock``).
    ``modulation=False``: without its modulation linear (Chroma's: :meth:`modulated`)."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: int = 4, *, modulation: bool = True) -> None:
        super().__init__()
        if modulation:
            self.norm = Modulation(dim, 3)
        self.attn = JointAttention(dim, heads, head_dim, joint=False)
        self.proj_mlp = nn.Linear(dim, dim * mlp_ratio)
        self.proj_out = nn.Linear(dim + dim * mlp_ratio, dim)

    def forward(self, x: Tensor, vec: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        return self.modulated(x, self.norm(vec), rope)

    def modulated(
        self, x: Tensor, mod: Sequence[Tensor], rope: tuple[Tensor, Tensor], mask: Tensor | None = None
    ) -> Tensor:
        """The block given its three (B, 1, dim) modulation vectors (shift, scale, gate) and the attention's key
        ``mask`` (:class:`JointAttention`)."""
        shift, scale, gate = mod
        h = modulate(x, shift, scale)
        attn = cast(Tensor, self.attn(h, rope, mask=mask))  # (B, L, dim): no context, so one tensor
        mlp = F.gelu(self.proj_mlp(h), approximate="tanh")
        return _clip_fp16(x + gate * self.proj_out(torch.cat([attn, mlp], dim=-1)))


class TimeTextEmbedding(nn.Module):
    """The conditioning vector: MLP(sinusoid(t)) [+ MLP(sinusoid(1000 g))] + MLP(pooled text) (diffusers'
    ``CombinedTimestep[Guidance]TextProjEmbeddings``; BFL's ``time_in``, ``guidance_in``, ``vector_in``)."""

    def __init__(self, dim: int, pooled_dim: int, guidance: bool) -> None:
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(TIME_FEATURES, dim)
        self.guidance_embedder = TimestepEmbedding(TIME_FEATURES, dim) if guidance else None
        self.text_embedder = TimestepEmbedding(pooled_dim, dim)  # the same Linear-SiLU-Linear

    def forward(self, timestep: Tensor, guidance: Tensor | None, pooled: Tensor) -> Tensor:
        """timestep (B,) on the 0..1000 scale, guidance (B,) the scale itself (NaN: that row without the guidance
        embedding), pooled (B, pooled_dim) -> (B, dim).

        The numbers fed to the sinusoid are rounded as BFL's and diffusers' code rounds them: t in 0..1 and the
        guidance scale are cast to the model's dtype and multiplied by 1000 in it. In float32 that is t itself;
        in bfloat16 it moves 875 to 876 and 3.5 x 1000 to 3504, and the released models were run (and
        distilled) with those numbers, so a bf16 Flux here sees what it sees there."""
        dtype = pooled.dtype
        t = (timestep.float() / 1000).to(dtype) * 1000
        vec = self.timestep_embedder(timestep_embedding(t, TIME_FEATURES).to(dtype))
        if self.guidance_embedder is not None and guidance is not None:
            # a NaN row: that row without the guidance embedding (ComfyUI's guidance None, FluxDisableGuidance)
            off = torch.isnan(guidance.float()).reshape(-1, 1)
            g = torch.nan_to_num(guidance.float(), nan=0.0).to(dtype) * GUIDANCE_SCALE
            emb = self.guidance_embedder(timestep_embedding(g, TIME_FEATURES).to(dtype))
            vec = vec + (torch.where(off, torch.zeros_like(emb), emb) if bool(off.any()) else emb)
        return vec + self.text_embedder(pooled)


class FinalLayer(nn.Module):
    """adaLN (diffusers' ``AdaLayerNormContinuous``: the linear's output is (scale, shift), in that order; BFL's
    ``final_layer.adaLN_modulation`` has them as (shift, scale), which the file loader swaps)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        scale, shift = self.linear(F.silu(vec)).unsqueeze(1).chunk(2, dim=-1)
        return modulate(x, shift, scale)


# ----------------------------------------------------------------------------------------------------------
# The model


def _batch_vector(
    value: Tensor | float,
    batch: int,
    name: str,
    device: torch.device,
    what: str = "Flux transformer",
    nan_ok: bool = False,
) -> Tensor:
    """A per-row number as a (B,) float32 tensor on ``device``: a scalar (Python or 0-d) is repeated, a (B,) kept.
    Numbers given on the CPU are checked to be finite (one on the GPU is not: that check would wait for the GPU
    at every step, and the pipeline refuses a non-finite result anyway)."""
    t = torch.as_tensor(value)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise UsageError(f"{what}: {name} must be a number or have shape ({batch},), got {tuple(t.shape)}")
    if t.device.type == "cpu" and not bool((torch.isfinite(t) | (torch.isnan(t) & nan_ok)).all()):
        raise UsageError(f"{what}: {name} must be finite, got {t.tolist()}")
    return t.to(device=device, dtype=torch.float32)


class FluxLikeTransformer(nn.Module):
    """What Flux's and Chroma's transformers (:class:`FluxTransformer`,
    :class:`sdengine.models.chroma.ChromaTransformer`) share: the config and the file's name, the weights' dtype and
    device, the RoPE tables of the last size, the latent's and text's checks, the per-row numbers. ``LABEL`` starts
    their errors."""

    LABEL = "Flux transformer"
    x_embedder: nn.Linear

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.name = ""  # the file it came from (set by the loader)
        self._rope_key: tuple[Any, ...] | None = None
        self._rope: tuple[Tensor, Tensor] | None = None

    @property
    def dtype(self) -> torch.dtype:
        return compute_dtype(self.x_embedder)  # float8-stored weights compute in this dtype

    @property
    def device(self) -> torch.device:
        return self.x_embedder.weight.device

    def rope_tables(
        self,
        text: int,
        rows: int,
        cols: int,
        device: torch.device,
        references: tuple[tuple[int, int], ...] = (),
        method: str = "offset",
    ) -> tuple[Tensor, Tensor]:
        """The cos/sin tables of ``text`` text tokens (ids 0) followed by a rows x cols grid of image tokens (and
        the tokens of reference latents of sizes ``references``: :func:`reference_ids`); the last ones made are
        kept (a generation's every step asks for the same), so that the steps after the first copy nothing from
        the CPU (a step recorded as a CUDA graph could not)."""
        key = (text, rows, cols, device, references, method)
        if self._rope_key != key or self._rope is None:
            ids = torch.cat([torch.zeros(text, 3), image_ids(rows, cols)])  # text first, as in the attention
            if references:
                ids = torch.cat([ids, reference_ids(references, method=method, image=(rows * PATCH, cols * PATCH))])
            self._rope = rope_angles(ids.to(device), self.config.axes_dims_rope)
            self._rope_key = key
        return self._rope

    def check_latent(self, hidden_states: Tensor, text: Tensor) -> tuple[int, int, int]:
        """The latent (B, C, H, W) with even sides and T5's states (B, L, joint_attention_dim): (B, H, W), or one
        line naming what does not fit."""
        cfg, what = self.config, self.LABEL
        if hidden_states.ndim != 4 or hidden_states.shape[1] != cfg.latent_channels:
            raise UsageError(
                f"{what}: hidden_states must be a (B, {cfg.latent_channels}, H, W) latent, "
                f"got {tuple(hidden_states.shape)}"
            )
        B, _, H, W = hidden_states.shape
        if H % PATCH or W % PATCH:
            raise UsageError(
                f"{what}: the latent's height and width must be even (2x2 patches), got {H}x{W} "
                f"(an image size that is a multiple of 16 pixels gives one)"
            )
        if text.ndim != 3 or text.shape[0] != B or text.shape[2] != cfg.joint_attention_dim:
            raise UsageError(
                f"{what}: encoder_hidden_states must be (B={B}, L, {cfg.joint_attention_dim}), got {tuple(text.shape)}"
            )
        return B, H, W

    def batch_vector(self, value: Tensor | float, batch: int, name: str, device: torch.device) -> Tensor:
        """A per-row number as a (B,) float32 tensor on ``device`` (:func:`_batch_vector`)."""
        return _batch_vector(value, batch, name, device, self.LABEL)

    def skip_sets(self, double: Sequence[int], single: Sequence[int]) -> tuple[frozenset[int], frozenset[int]]:
        """The double- and single-stream block indices left out (skip-layer guidance: a skipped block passes its
        tokens on unchanged, as ComfyUI's ``dit`` block patches that return their input), or one line naming the
        model's block counts."""
        counts = (len(self.transformer_blocks), len(self.single_transformer_blocks))  # type: ignore[arg-type]
        for kind, layers, n in (("double", double, counts[0]), ("single", single, counts[1])):
            for i in layers:
                if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
                    raise UsageError(
                        f"{self.LABEL}: {kind}-stream block {i!r} to leave out is not a block of this model "
                        f"({counts[0]} double blocks 0-{counts[0] - 1}, {counts[1]} single blocks 0-{counts[1] - 1})"
                    )
        return frozenset(double), frozenset(single)


class FluxTransformer(FluxLikeTransformer):
    """Flux.1's transformer (see the module docstring); diffusers' ``FluxTransformer2DModel`` parameter names."""

    def __init__(self, config: FluxConfig = FLUX_SCHNELL) -> None:
        super().__init__(config)
        self.config: FluxConfig = config
        dim = config.hidden_size
        heads, head_dim = config.num_attention_heads, config.attention_head_dim
        out = config.out_channels or config.in_channels
        self.time_text_embed = TimeTextEmbedding(dim, config.pooled_projection_dim, config.guidance_embeds)
        self.context_embedder = nn.Linear(config.joint_attention_dim, dim)
        self.x_embedder = nn.Linear(config.in_channels, dim)
        self.transformer_blocks = nn.ModuleList(
            [DoubleStreamBlock(dim, heads, head_dim) for _ in range(config.num_layers)]
        )
        self.single_transformer_blocks = nn.ModuleList(
            [SingleStreamBlock(dim, heads, head_dim) for _ in range(config.num_single_layers)]
        )
        self.norm_out = FinalLayer(dim)
        self.proj_out = nn.Linear(dim, out)

    ip_adapter_family = "flux"  # which IP-Adapters fit (sdengine.nn.ip_adapter.ip_layers)

    def ip_adapter_layers(self) -> tuple[list[nn.Module], list[tuple[int, int]]]:
        """The layers an IP-Adapter acts in (the double-stream blocks, their ``ip_attention``) and the shape
        (width, image-token width) of the key / value projections each takes (XLabs' flux-ip-adapter: its image
        tokens are ``joint_attention_dim`` wide, as T5's states)."""
        want = (self.config.hidden_size, self.config.joint_attention_dim)
        return list(self.transformer_blocks), [want] * len(self.transformer_blocks)

    def _check_inputs(
        self, hidden_states: Tensor, encoder_hidden_states: Tensor, pooled_projections: Tensor
    ) -> tuple[int, int, int]:
        cfg = self.config
        B, H, W = self.check_latent(hidden_states, encoder_hidden_states)
        if tuple(pooled_projections.shape) != (B, cfg.pooled_projection_dim):
            raise UsageError(
                f"Flux transformer: pooled_projections must be ({B}, {cfg.pooled_projection_dim}), "
                f"got {tuple(pooled_projections.shape)}"
            )
        return B, H, W

    def forward(
        self,
        hidden_states: Tensor,
        timestep: Tensor | float,
        encoder_hidden_states: Tensor,
        pooled_projections: Tensor,
        guidance: Tensor | float | None = None,
        controlnet_block_samples: Sequence[Tensor] | None = None,
        controlnet_single_block_samples: Sequence[Tensor] | None = None,
        reference_latents: Sequence[Tensor] | None = None,
        reference_method: str = "offset",
        skip_layers: Sequence[int] = (),
        skip_single_layers: Sequence[int] = (),
    ) -> Tensor:
        """The velocity prediction for the latent ``hidden_states`` (B, C, H, W) at ``timestep`` (B,) on the
        0..1000 scale (1000 x the flow's t; 1000 is pure noise), given T5 states ``encoder_hidden_states``
        (B, L, 4096), CLIP's pooled embedding ``pooled_projections`` (B, 768) and, for a guidance-distilled
        (dev) model, the guidance scale ``guidance`` (B,) (e.g. 3.5; None for schnell) -> (B, C, H, W).

        ``controlnet_block_samples`` / ``controlnet_single_block_samples``: a Flux ControlNet's residuals (B, N, dim)
        on the image tokens, m of them for n blocks of a kind: block i gets ``[i // ceil(n / m)]`` after it runs
        (diffusers' rule; :mod:`sdengine.models.dit_controlnet`).

        ``reference_latents``: FLUX.1 Kontext's reference images' latents (1 or B, C, h, w), scaled as the input;
        their tokens follow the image's with the ids of :func:`reference_ids`, and the network's output for them
        is dropped; ``reference_method``: how several are laid out (ComfyUI's, :data:`REFERENCE_METHODS`).

        ``skip_layers`` / ``skip_single_layers``: double- / single-stream blocks left out (skip-layer guidance, as
        ComfyUI's SkipLayerGuidanceDiT): a skipped block passes its tokens on unchanged, a ControlNet's residual
        after it is still added."""
        cfg = self.config
        skip, skip_single = self.skip_sets(skip_layers, skip_single_layers)
        B, H, W = self._check_inputs(hidden_states, encoder_hidden_states, pooled_projections)
        if cfg.guidance_embeds and guidance is None:
            raise UsageError(
                "Flux transformer: this model is guidance-distilled (FLUX.1 [dev]): pass guidance, the guidance "
                "scale (e.g. 3.5)"
            )
        if not cfg.guidance_embeds and guidance is not None:
            raise UsageError(
                "Flux transformer: this model takes no guidance scale (FLUX.1 [schnell]-like, no guidance "
                "embedding): pass guidance=None"
            )
        device, dtype = hidden_states.device, self.dtype
        t = _batch_vector(timestep, B, "timestep", device)
        # a NaN row: no guidance embedding there (ComfyUI's guidance None: FluxDisableGuidance)
        g = _batch_vector(guidance, B, "guidance", device, nan_ok=True) if guidance is not None else None

        tokens = pack_latents(hidden_states.to(dtype))  # (B, N, 4C), N = H/2 * W/2
        N = tokens.shape[1]
        refs = self._reference_tokens(reference_latents, B, dtype)
        if refs is not None:
            if controlnet_block_samples or controlnet_single_block_samples:
                raise UsageError("Flux transformer: reference latents (Kontext) and ControlNet residuals together")
            tokens = torch.cat([tokens, refs[0]], dim=1)  # the references' tokens after the image's
        x = self.x_embedder(tokens)  # (B, N [+ reference tokens], dim)
        context = self.context_embedder(encoder_hidden_states.to(dtype))  # (B, L, dim)
        vec = self.time_text_embed(t, g, pooled_projections.to(dtype))  # (B, dim)
        L = context.shape[1]
        sizes = () if refs is None else refs[1]
        if reference_method not in REFERENCE_METHODS:
            raise UsageError(
                f"Flux transformer: unknown reference_method {reference_method!r}; use one of "
                f"{', '.join(REFERENCE_METHODS)}"
            )
        rope = self.rope_tables(
            L, H // PATCH, W // PATCH, device, sizes, reference_method
        )  # (L + N [+ refs], head_dim), text first

        double, single = controlnet_block_samples, controlnet_single_block_samples
        every = math.ceil(len(self.transformer_blocks) / len(double)) if double else 0
        for i, block in enumerate(self.transformer_blocks):
            if i not in skip:
                x, context = block(x, context, vec, rope)
            if double:  # a ControlNet's residual on the image tokens
                x = x + double[i // every].to(x.dtype)
        seq = torch.cat([context, x], dim=1)  # (B, L + N, dim)
        every = math.ceil(len(self.single_transformer_blocks) / len(single)) if single else 0
        for i, block in enumerate(self.single_transformer_blocks):
            if i not in skip_single:
                seq = block(seq, vec, rope)
            if single:
                seq = torch.cat([seq[:, :L], seq[:, L:] + single[i // every].to(seq.dtype)], dim=1)
        x = seq[:, L : L + N]  # the image's tokens (a reference's output is dropped)
        x = self.proj_out(self.norm_out(x, vec))  # (B, N, 4 C_out)
        return unpack_latents(x, H, W)

    def _reference_tokens(
        self, latents: Sequence[Tensor] | None, batch: int, dtype: torch.dtype
    ) -> tuple[Tensor, tuple[tuple[int, int], ...]] | None:
        """Reference latents as packed tokens (B, R, 4C), and their sizes; None where there are none. An odd side is
        padded circularly at the bottom / right to the 2 x 2 patches (ComfyUI's ``process_img``); the sizes are the
        unpadded ones (ComfyUI's layouts count those)."""
        if not latents:
            return None
        packed, sizes = [], []
        for k, ref in enumerate(latents):
            if ref.ndim != 4 or ref.shape[1] != self.config.latent_channels or ref.shape[0] not in (1, batch):
                raise UsageError(
                    f"Flux transformer: reference latent {k} must be (1 or {batch}, {self.config.latent_channels}, "
                    f"h, w), got {tuple(ref.shape)}"
                )
            h, w = int(ref.shape[2]), int(ref.shape[3])
            padded = F.pad(ref, (0, -w % PATCH, 0, -h % PATCH), mode="circular") if h % PATCH or w % PATCH else ref
            packed.append(pack_latents(padded.to(device=self.device, dtype=dtype)).expand(batch, -1, -1))
            sizes.append((h, w))
        return torch.cat(packed, dim=1), tuple(sizes)


__all__ = [
    "FLUX_DEV",
    "FLUX_SCHNELL",
    "REFERENCE_METHODS",
    "FluxConfig",
    "FluxLikeConfig",
    "FluxLikeTransformer",
    "FluxTransformer",
    "apply_rope",
    "image_ids",
    "pack_latents",
    "reference_ids",
    "rope_angles",
    "rope_frequencies",
    "unpack_latents",
]
