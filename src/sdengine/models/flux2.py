"""FLUX.2's transformer (Black Forest Labs, 2025; the [klein] 4B / 9B models and [dev]): diffusers'
``Flux2Transformer2DModel``.

Reading order: config, position ids, the blocks, the model.

It is FLUX.1's design (:mod:`sdengine.models.flux`: double-stream blocks with joint attention, then single-stream
parallel blocks, RMS qk-norm, RoPE) with these differences, all from diffusers' implementation:

* the image tokens are the pixels of the pipeline's patchified latent (B, 128, H/16, W/16)
  (:mod:`sdengine.models.flux2_vae`): ``x_embedder`` reads the 128 numbers of one pixel (no packing here);
* no pooled text vector: the conditioning vector is the timestep's (plus, where ``guidance_embeds`` and a guidance
  scale is given, the guidance scale's) sinusoid through an MLP, without biases;
* shared modulation: three linears at the top (``double_stream_modulation_img`` / ``_txt``: six vectors each;
  ``single_stream_modulation``: three) make every block's shifts, scales and gates; the blocks have no modulation
  weights of their own;
* no biases (every Linear is bias-free); the MLPs are SwiGLU (``linear_in`` makes 2 x
  ``mlp_ratio`` x dim, ``silu(first half) * second half``, ``linear_out``); the single blocks' fused
  ``to_qkv_mlp_proj`` and ``to_out`` hold the attention's and the SwiGLU MLP's weights side by side;
* 4-axis RoPE (``axes_dims_rope`` (32, 32, 32, 32), ``rope_theta`` 2000) over position ids (T, H, W, L): a text
  token is (0, 0, 0, l), an image pixel (0, row, col, 0), reference image k's pixels (10 + 10 k, row, col, 0)
  (diffusers' ``Flux2KleinPipeline._prepare_*_ids``);
* the final layer: adaLN (scale, shift) without bias, ``proj_out`` without bias.

``forward(hidden_states, timestep, encoder_hidden_states, guidance=None, reference_latents=None)`` takes the latent
(B, C, H, W) and returns the velocity in that shape; ``timestep`` is on the 0..1000 scale (the flow's t x 1000;
diffusers' pipeline passes t and the model multiplies by 1000: the number fed to the sinusoid is rounded the same
way here, ``(timestep / 1000)`` in the weights' dtype x 1000). Parameter names are diffusers', so its
``transformer/`` state dict loads strictly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdengine.errors import UsageError
from sdengine.models.config_checks import ConfigError, check_config, check_scalar_ints
from sdengine.models.flux import apply_rope, rope_angles
from sdengine.nn.attention import scaled_dot_product_attention
from sdengine.nn.embeddings import TimestepEmbedding, timestep_embedding
from sdengine.nn.fp8_storage import compute_dtype

CLASS_NAME = "Flux2Transformer2DModel"
REFERENCE_T_STEP = 10  # reference image k's time id: 10 + 10 k (diffusers' _prepare_image_ids scale)
MAX_MLP_RATIO = 16.0


# ----------------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class Flux2Config:
    """Architecture of a FLUX.2 transformer, diffusers' ``Flux2Transformer2DModel`` config names and defaults
    (FLUX.2 [dev]'s: 8 double and 48 single blocks of 48 x 128; [klein] 4B: 5 + 20 of 24 x 128, 7680-wide text)."""

    LABEL: ClassVar[str] = "FLUX.2 transformer"

    patch_size: int = 1
    in_channels: int = 128
    out_channels: int | None = None
    num_layers: int = 8
    num_single_layers: int = 48
    attention_head_dim: int = 128
    num_attention_heads: int = 48
    joint_attention_dim: int = 15360
    timestep_guidance_channels: int = 256
    mlp_ratio: float = 3.0
    axes_dims_rope: tuple[int, ...] = (32, 32, 32, 32)
    rope_theta: float = 2000.0
    eps: float = 1e-6
    guidance_embeds: bool = True

    def __post_init__(self) -> None:
        what = self.LABEL
        if isinstance(self.axes_dims_rope, list):
            object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))
        check_scalar_ints(f"{what} config", self)
        check_config("flux2", {k: v for k, v in dataclasses.asdict(self).items() if v is not None})
        if type(self.guidance_embeds) is not bool:
            raise ConfigError(f"{what} config: guidance_embeds={self.guidance_embeds!r} is not true/false")
        if self.patch_size != 1:
            raise ConfigError(
                f"{what} config: patch_size={self.patch_size} is not supported (the pipeline patchifies; only 1)"
            )
        if type(self.timestep_guidance_channels) is not int or not 2 <= self.timestep_guidance_channels <= 4096:
            raise ConfigError(
                f"{what} config: timestep_guidance_channels={self.timestep_guidance_channels!r} must be 2 to 4096"
            )
        for name, lo, hi in (("mlp_ratio", 0.0, MAX_MLP_RATIO), ("rope_theta", 1.0, 1e9), ("eps", 0.0, 1.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not lo < v <= hi:
                raise ConfigError(f"{what} config: {name}={v!r} must be a number in ({lo:g}, {hi:g}]")
        if int(self.hidden_size * self.mlp_ratio) < 1:
            raise ConfigError(f"{what} config: mlp_ratio={self.mlp_ratio} leaves the MLP no width")
        axes = self.axes_dims_rope
        if not isinstance(axes, tuple) or len(axes) != 4 or any(type(d) is not int or d % 2 for d in axes):
            raise ConfigError(f"{what} config: axes_dims_rope={axes!r} must be four even numbers (T, H, W, L)")
        if sum(axes) != self.attention_head_dim:
            raise ConfigError(
                f"{what} config: axes_dims_rope={list(axes)} adds up to {sum(axes)}, not attention_head_dim="
                f"{self.attention_head_dim}"
            )

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_hidden(self) -> int:
        """The MLPs' inner width (diffusers' ``int(dim * mlp_ratio)``)."""
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def latent_channels(self) -> int:
        """Channels of the latent the model takes (``in_channels``: 128, the VAE's 32 in 2x2 patches)."""
        return self.in_channels

    @property
    def out_latent_channels(self) -> int:
        return self.out_channels or self.in_channels

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> Flux2Config:
        """A diffusers ``transformer/config.json``; keys starting with ``_`` are ignored, any other unknown key is
        refused (one line naming them)."""
        what = cls.LABEL
        if not isinstance(config, Mapping):
            raise ConfigError(f"a {what} config must be a mapping, got {type(config).__name__}")
        name = config.get("_class_name")
        if name is not None and name != CLASS_NAME:
            raise ConfigError(f"not a {what} config: _class_name={name!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in config if not str(k).startswith("_") and k not in known)
        if unknown:
            raise ConfigError(f"unknown {what} config options: {', '.join(unknown)}")
        values = {k: v for k, v in config.items() if k in known}
        if isinstance(values.get("axes_dims_rope"), list):
            values["axes_dims_rope"] = tuple(values["axes_dims_rope"])
        check_config("flux2", {k: v for k, v in values.items() if v is not None})
        try:
            return cls(**values)
        except TypeError as e:
            raise ConfigError(f"{what} config: {e}") from None

    def to_diffusers(self) -> dict[str, Any]:
        out: dict[str, Any] = {"_class_name": CLASS_NAME, **dataclasses.asdict(self)}
        out["axes_dims_rope"] = list(self.axes_dims_rope)
        return out


# ----------------------------------------------------------------------------------------------------------
# Position ids (T, H, W, L)


def text_ids(length: int) -> Tensor:
    """(length, 4): (0, 0, 0, l) for text token l."""
    ids = torch.zeros(length, 4)
    ids[:, 3] = torch.arange(length)
    return ids


def grid_ids(rows: int, cols: int, t: int = 0) -> Tensor:
    """(rows * cols, 4) row-major: (t, row, col, 0) (the image's t is 0, reference k's 10 + 10 k)."""
    ids = torch.zeros(rows, cols, 4)
    ids[..., 0] = t
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 4)


# ----------------------------------------------------------------------------------------------------------
# Blocks


def _modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    return (1 + scale) * F.layer_norm(x, x.shape[-1:], eps=eps) + shift


class Modulation(nn.Module):
    """SiLU -> bias-free Linear of the conditioning vector into ``3 sets`` (shift, scale, gate) vectors (B, 1, dim)
    (diffusers' ``Flux2Modulation``, key ``linear``)."""

    def __init__(self, dim: int, sets: int) -> None:
        super().__init__()
        self.sets = sets
        self.linear = nn.Linear(dim, 3 * sets * dim, bias=False)

    def forward(self, vec: Tensor) -> tuple[Tensor, ...]:
        return self.linear(F.silu(vec)).unsqueeze(1).chunk(3 * self.sets, dim=-1)


def swiglu(x: Tensor) -> Tensor:
    """``silu(first half) * second half`` of the last dimension."""
    a, b = x.chunk(2, dim=-1)
    return F.silu(a) * b


class FeedForward(nn.Module):
    """bias-free ``linear_in`` (dim -> 2 inner), SwiGLU, ``linear_out`` (inner -> dim)."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.linear_in = nn.Linear(dim, 2 * inner, bias=False)
        self.linear_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_out(swiglu(self.linear_in(x)))


class JointAttention(nn.Module):
    """The double blocks' attention: per-stream bias-free q/k/v, RMS qk-norm per head, RoPE, one attention over
    [text, image], per-stream output projections (``to_out.0`` for the image, ``to_add_out`` for the text)."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.norm_q = nn.RMSNorm(head_dim, eps=eps)
        self.norm_k = nn.RMSNorm(head_dim, eps=eps)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=False), nn.Dropout(0.0)])  # diffusers' key names
        self.add_q_proj = nn.Linear(dim, inner, bias=False)
        self.add_k_proj = nn.Linear(dim, inner, bias=False)
        self.add_v_proj = nn.Linear(dim, inner, bias=False)
        self.norm_added_q = nn.RMSNorm(head_dim, eps=eps)
        self.norm_added_k = nn.RMSNorm(head_dim, eps=eps)
        self.to_add_out = nn.Linear(inner, dim, bias=False)

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim))

    def forward(self, x: Tensor, context: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        q = torch.cat(
            [self.norm_added_q(self._heads(self.add_q_proj(context))), self.norm_q(self._heads(self.to_q(x)))], 1
        )
        k = torch.cat(
            [self.norm_added_k(self._heads(self.add_k_proj(context))), self.norm_k(self._heads(self.to_k(x)))], 1
        )
        v = torch.cat([self._heads(self.add_v_proj(context)), self._heads(self.to_v(x))], 1)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        h = scaled_dot_product_attention(q.flatten(2), k.flatten(2), v.flatten(2), self.heads)  # (B, S + N, inner)
        S = context.shape[1]
        return self.to_out[0](h[:, S:]), self.to_add_out(h[:, :S])


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights and one joint attention, modulated by the shared vectors
    (diffusers' ``Flux2TransformerBlock``)."""

    def __init__(self, cfg: Flux2Config) -> None:
        super().__init__()
        dim = cfg.hidden_size
        self.eps = cfg.eps
        self.attn = JointAttention(dim, cfg.num_attention_heads, cfg.attention_head_dim, cfg.eps)
        self.ff = FeedForward(dim, cfg.mlp_hidden)
        self.ff_context = FeedForward(dim, cfg.mlp_hidden)

    def forward(
        self,
        x: Tensor,
        context: Tensor,
        img_mod: Sequence[Tensor],
        txt_mod: Sequence[Tensor],
        rope: tuple[Tensor, Tensor],
    ) -> tuple[Tensor, Tensor]:
        shift1, scale1, gate1, shift2, scale2, gate2 = img_mod
        c_shift1, c_scale1, c_gate1, c_shift2, c_scale2, c_gate2 = txt_mod
        eps = self.eps
        img, txt = self.attn(_modulate(x, shift1, scale1, eps), _modulate(context, c_shift1, c_scale1, eps), rope)
        x = x + gate1 * img
        x = x + gate2 * self.ff(_modulate(x, shift2, scale2, eps))
        context = context + c_gate1 * txt
        context = context + c_gate2 * self.ff_context(_modulate(context, c_shift2, c_scale2, eps))
        return _clip_fp16(x), _clip_fp16(context)


class ParallelAttention(nn.Module):
    """The single blocks' fused layer: ``to_qkv_mlp_proj`` (dim -> 3 inner + 2 mlp) gives q, k, v and the SwiGLU
    MLP's input; attention and MLP outputs side by side through ``to_out`` (inner + mlp -> dim), all bias-free
    (diffusers' ``Flux2ParallelSelfAttention``)."""

    def __init__(self, cfg: Flux2Config) -> None:
        super().__init__()
        dim, heads, head_dim = cfg.hidden_size, cfg.num_attention_heads, cfg.attention_head_dim
        self.heads, self.head_dim, self.inner, self.mlp = heads, head_dim, heads * head_dim, cfg.mlp_hidden
        self.to_qkv_mlp_proj = nn.Linear(dim, 3 * self.inner + 2 * self.mlp, bias=False)
        self.norm_q = nn.RMSNorm(head_dim, eps=cfg.eps)
        self.norm_k = nn.RMSNorm(head_dim, eps=cfg.eps)
        self.to_out = nn.Linear(self.inner + self.mlp, dim, bias=False)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        qkv, mlp = self.to_qkv_mlp_proj(x).split([3 * self.inner, 2 * self.mlp], dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, self.head_dim)) for t in qkv.chunk(3, dim=-1))
        q, k = apply_rope(self.norm_q(q), *rope), apply_rope(self.norm_k(k), *rope)
        h = scaled_dot_product_attention(q.flatten(2), k.flatten(2), v.flatten(2), self.heads)
        return self.to_out(torch.cat([h, swiglu(mlp)], dim=-1))


class SingleStreamBlock(nn.Module):
    """Text and image tokens as one sequence (diffusers' ``Flux2SingleTransformerBlock``)."""

    def __init__(self, cfg: Flux2Config) -> None:
        super().__init__()
        self.eps = cfg.eps
        self.attn = ParallelAttention(cfg)

    def forward(self, x: Tensor, mod: Sequence[Tensor], rope: tuple[Tensor, Tensor]) -> Tensor:
        shift, scale, gate = mod
        return _clip_fp16(x + gate * self.attn(_modulate(x, shift, scale, self.eps), rope))


def _clip_fp16(x: Tensor) -> Tensor:
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x  # as diffusers, on the residual stream


class TimeGuidanceEmbedding(nn.Module):
    """MLP(sinusoid(t)) [+ MLP(sinusoid(1000 g))], bias-free (diffusers' ``Flux2TimestepGuidanceEmbeddings``)."""

    def __init__(self, channels: int, dim: int, guidance: bool) -> None:
        super().__init__()
        self.channels = channels
        self.timestep_embedder = TimestepEmbedding(channels, dim, bias=False)
        self.guidance_embedder = TimestepEmbedding(channels, dim, bias=False) if guidance else None

    def forward(self, timestep: Tensor, guidance: Tensor | None, dtype: torch.dtype) -> Tensor:
        """timestep (B,) on the 0..1000 scale, guidance (B,) the scale itself or None -> (B, dim).

        The number fed to the sinusoid is rounded as ``Flux2KleinPipeline`` rounds it: the step's timestep in the
        latents' dtype, divided by 1000 and multiplied by 1000 again in it (the model's dtype here); in float32 that
        is the timestep itself, in bfloat16 it moves 875.3 to 876."""
        t = (timestep.to(dtype) / 1000) * 1000
        vec = self.timestep_embedder(timestep_embedding(t, self.channels).to(dtype))
        if guidance is not None and self.guidance_embedder is not None:
            g = guidance.to(dtype) * 1000
            vec = vec + self.guidance_embedder(timestep_embedding(g, self.channels).to(dtype))
        return vec


class FinalLayer(nn.Module):
    """adaLN with (scale, shift) from a bias-free linear (diffusers' ``AdaLayerNormContinuous(bias=False)``)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(dim, 2 * dim, bias=False)

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        scale, shift = self.linear(F.silu(vec)).unsqueeze(1).chunk(2, dim=-1)
        return _modulate(x, shift, scale, self.eps)


# ----------------------------------------------------------------------------------------------------------
# The model


class Flux2Transformer(nn.Module):
    """FLUX.2's transformer (module docstring); diffusers' ``Flux2Transformer2DModel`` parameter names."""

    def __init__(self, config: Flux2Config | None = None) -> None:
        super().__init__()
        self.config = cfg = config or Flux2Config()
        self.name = ""  # the file it came from (set by the loader)
        dim = cfg.hidden_size
        self.time_guidance_embed = TimeGuidanceEmbedding(cfg.timestep_guidance_channels, dim, cfg.guidance_embeds)
        self.double_stream_modulation_img = Modulation(dim, 2)
        self.double_stream_modulation_txt = Modulation(dim, 2)
        self.single_stream_modulation = Modulation(dim, 1)
        self.x_embedder = nn.Linear(cfg.in_channels, dim, bias=False)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, dim, bias=False)
        self.transformer_blocks = nn.ModuleList([DoubleStreamBlock(cfg) for _ in range(cfg.num_layers)])
        self.single_transformer_blocks = nn.ModuleList([SingleStreamBlock(cfg) for _ in range(cfg.num_single_layers)])
        self.norm_out = FinalLayer(dim, cfg.eps)
        self.proj_out = nn.Linear(dim, cfg.out_latent_channels, bias=False)
        self._rope_key: tuple[Any, ...] | None = None
        self._rope: tuple[Tensor, Tensor] | None = None

    @property
    def dtype(self) -> torch.dtype:
        return compute_dtype(self.x_embedder)

    @property
    def device(self) -> torch.device:
        return self.x_embedder.weight.device

    def rope_tables(
        self, text: int, rows: int, cols: int, device: torch.device, references: tuple[tuple[int, int], ...] = ()
    ) -> tuple[Tensor, Tensor]:
        """cos / sin tables (text + image + references tokens, head_dim) of the ids :func:`text_ids`, :func:`grid_ids`
        (the image at t 0, reference k at 10 + 10 k); the last ones made are kept (every step asks for the same)."""
        key = (text, rows, cols, device, references)
        if self._rope_key != key or self._rope is None:
            parts = [text_ids(text), grid_ids(rows, cols)]
            parts += [grid_ids(h, w, REFERENCE_T_STEP * (k + 1)) for k, (h, w) in enumerate(references)]
            ids = torch.cat(parts).to(device)
            self._rope = rope_angles(ids, self.config.axes_dims_rope, float(self.config.rope_theta))
            self._rope_key = key
        return self._rope

    def _check(self, x: Tensor, text: Tensor) -> tuple[int, int, int]:
        cfg, what = self.config, self.config.LABEL
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise UsageError(
                f"{what}: hidden_states must be a (B, {cfg.in_channels}, H, W) latent, got {tuple(x.shape)}"
            )
        B = x.shape[0]
        if text.ndim != 3 or text.shape[0] != B or text.shape[2] != cfg.joint_attention_dim:
            raise UsageError(
                f"{what}: encoder_hidden_states must be (B={B}, L, {cfg.joint_attention_dim}), got {tuple(text.shape)}"
            )
        return B, x.shape[2], x.shape[3]

    @staticmethod
    def _rows(value: Tensor | float, batch: int, name: str, device: torch.device) -> Tensor:
        t = torch.as_tensor(value)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise UsageError(
                f"FLUX.2 transformer: {name} must be a number or have shape ({batch},), got {tuple(t.shape)}"
            )
        if t.device.type == "cpu" and not bool(torch.isfinite(t).all()):
            raise UsageError(f"FLUX.2 transformer: {name} must be finite, got {t.tolist()}")
        return t.to(device=device, dtype=torch.float32)

    def forward(
        self,
        hidden_states: Tensor,
        timestep: Tensor | float,
        encoder_hidden_states: Tensor,
        guidance: Tensor | float | None = None,
        reference_latents: Sequence[Tensor] | None = None,
    ) -> Tensor:
        """The velocity for the latent ``hidden_states`` (B, C, H, W) at ``timestep`` (B,) on the 0..1000 scale given
        the text states (B, L, joint_attention_dim) -> (B, C_out, H, W). ``guidance``: the guidance scale of a
        guidance-distilled model (None: not used, as diffusers' pipelines for [klein]); ``reference_latents``:
        reference images' latents (1 or B, C, h, w) whose tokens follow the image's (ids at t = 10, 20, ...), their
        outputs dropped."""
        cfg = self.config
        B, H, W = self._check(hidden_states, encoder_hidden_states)
        if guidance is not None and not cfg.guidance_embeds:
            raise UsageError(
                "FLUX.2 transformer: this model has no guidance embedding (guidance_embeds false): pass guidance=None"
            )
        device, dtype = hidden_states.device, self.dtype
        t = self._rows(timestep, B, "timestep", device)
        g = self._rows(guidance, B, "guidance", device) if guidance is not None else None
        tokens = hidden_states.to(dtype).flatten(2).transpose(1, 2)  # (B, H*W, C), row-major
        N = tokens.shape[1]
        sizes: list[tuple[int, int]] = []
        for k, ref in enumerate(reference_latents or ()):
            if ref.ndim != 4 or ref.shape[1] != cfg.in_channels or ref.shape[0] not in (1, B):
                raise UsageError(
                    f"FLUX.2 transformer: reference latent {k} must be (1 or {B}, {cfg.in_channels}, h, w), got "
                    f"{tuple(ref.shape)}"
                )
            sizes.append((int(ref.shape[2]), int(ref.shape[3])))
            ref_tokens = ref.to(device=device, dtype=dtype).flatten(2).transpose(1, 2).expand(B, -1, -1)
            tokens = torch.cat([tokens, ref_tokens], dim=1)
        x = self.x_embedder(tokens)
        context = self.context_embedder(encoder_hidden_states.to(dtype))
        vec = self.time_guidance_embed(t, g, dtype)
        img_mod = self.double_stream_modulation_img(vec)
        txt_mod = self.double_stream_modulation_txt(vec)
        single_mod = self.single_stream_modulation(vec)
        L = context.shape[1]
        rope = self.rope_tables(L, H, W, device, tuple(sizes))
        for block in self.transformer_blocks:
            x, context = block(x, context, img_mod, txt_mod, rope)
        seq = torch.cat([context, x], dim=1)
        for single in self.single_transformer_blocks:
            seq = single(seq, single_mod, rope)
        x = self.proj_out(self.norm_out(seq[:, L : L + N], vec))  # (B, N, C_out): the image's tokens only
        return x.transpose(1, 2).reshape(B, -1, H, W)


__all__ = [
    "CLASS_NAME",
    "REFERENCE_T_STEP",
    "Flux2Config",
    "Flux2Transformer",
    "grid_ids",
    "swiglu",
    "text_ids",
]
