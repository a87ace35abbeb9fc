"""Qwen-Image's transformer: a 20 B dual-stream MMDiT over 2x2 latent patches and Qwen2.5-VL's text states.

Alibaba's Qwen-Image (2025, "Qwen-Image Technical Report") is a rectified-flow model (Liu et al. 2023; Esser et al.
2024's MMDiT). Against Flux (:mod:`sdengine.models.flux`), whose blocks it shares in shape:

* every block is dual-stream (60 of them, 3072 wide: 24 heads of 128); there are no single-stream blocks;
* the conditioning vector is the timestep's alone (no pooled text, no guidance input): the sinusoid (cosines first)
  of ``1000 t`` through an MLP, the caller's t in 0..1;
* the text is Qwen2.5-VL-7B's last hidden states (3584 wide), RMS-normed (``txt_norm``, with a weight) before
  ``txt_in``; a key mask may drop the padding of the shorter prompts of a batch;
* the rotary positions (Su et al. 2021) are three axes (frame, row, column: 16 + 56 + 56 numbers of a head) with
  the image *centred*: a grid of h x w tokens has rows ``-(h - h//2) .. h//2 - 1`` and columns likewise, frame 0;
  text token j has position ``max(h//2, w//2) + j`` on all three axes (diffusers' ``QwenEmbedRope`` with
  ``scale_rope``), so the text sits after the image along the diagonal. Angles in float32 as the reference code
  makes them.

Each block: adaLN (shift, scale, gate for attention, then for the MLP; its ``img_mod`` / ``txt_mod`` are a SiLU
and a Linear) on a weightless layer norm, joint attention of [text, image] with per-stream q/k/v/out projections
and per-head RMS norms on q and k, a tanh-GELU MLP 4x wide per stream. Then the final adaLN (scale, shift) and
``proj_out`` to 4 x 16 numbers per token, unpacked.

The parameter names are diffusers' ``QwenImageTransformer2DModel``'s, so its ``transformer/`` state dict loads
with a strict ``load_state_dict`` (:mod:`sdengine.weights.qwen_image_file`).

``forward(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_mask)`` takes the *unpacked*
latent (B, 16, H, W) and returns the velocity in the same shape; ``timestep`` is on the 0..1000 scale (the
sdengine convention of :mod:`sdengine.models.flux`; diffusers' pipeline passes ``t / 1000`` and the model's
sinusoid multiplies by 1000 again: the model here divides and multiplies the same way, so the numbers match).

Qwen-Image-Edit's reference image (``reference=``, a (B, 16, h, w) latent): its 2x2 patches are appended after the
generated image's tokens (diffusers' ``torch.cat([latents, image_latents], dim=1)`` with a second ``img_shapes``
entry). Its positions are centred on its own grid with frame 1 (the n-th image's frame is n), the text starts after
the largest of the grids (``max(h//2, w//2)`` over both), and only the generated tokens are returned.

Qwen-Image-Edit-2511's ``zero_cond_t`` (diffusers' option of the same name): the conditioning vector is also made
for t = 0, and in every block the reference images' tokens (all after the generated latent's) take their image
modulation (shifts, scales, gates) from it; the generated tokens, the text stream and the final layer take the
step's. Without reference tokens it changes nothing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdengine.errors import UsageError
from sdengine.models.config_checks import ConfigError, check_config
from sdengine.models.flux import MLP, apply_rope, modulate, pack_latents, unpack_latents
from sdengine.nn.attention import scaled_dot_product_attention
from sdengine.nn.embeddings import TimestepEmbedding
from sdengine.nn.fp8_storage import compute_dtype

ROPE_THETA = 10000.0
TIME_FEATURES = 256  # sinusoidal features of the timestep
TIME_SCALE = 1000.0  # the sinusoid's input is 1000 t (t in 0..1)
PATCH = 2  # 2x2 latent patches are the image tokens
# Options of diffusers' config for later Qwen-Image models (Layered's additional t condition and 3D layer RoPE)
# and an unused guidance embedding: refused while set
_UNSUPPORTED = {
    "guidance_embeds": "a guidance-distilled Qwen-Image transformer",
    "use_additional_t_cond": "use_additional_t_cond (Qwen-Image-Layered)",
    "use_layer3d_rope": "use_layer3d_rope (Qwen-Image-Layered)",
}


@dataclass(frozen=True)
class QwenImageConfig:
    """Architecture of a Qwen-Image transformer; diffusers' ``QwenImageTransformer2DModel`` config names.

    ``in_channels``: numbers per image token (4 x the 16 latent channels); ``out_channels``: the latent channels
    the prediction has (diffusers' meaning: ``proj_out`` gives ``patch_size**2 * out_channels``);
    ``joint_attention_dim``: the text encoder's width (3584 for Qwen2.5-VL-7B)."""

    patch_size: int = 2
    in_channels: int = 64
    out_channels: int | None = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    zero_cond_t: bool = False
    use_additional_t_cond: bool = False
    use_layer3d_rope: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.axes_dims_rope, list):
            object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))
        check_config("qwen_image", _numbers(dataclasses.asdict(self)))
        if type(self.zero_cond_t) is not bool:
            raise ConfigError(f"Qwen-Image transformer config: zero_cond_t={self.zero_cond_t!r} is not true/false")
        for name, what in _UNSUPPORTED.items():
            value = getattr(self, name)
            if type(value) is not bool:
                raise ConfigError(f"Qwen-Image transformer config: {name}={value!r} is not true/false")
            if value:
                raise ConfigError(f"Qwen-Image transformer config: {what} is not supported")
        if self.patch_size != PATCH:
            raise ConfigError(f"Qwen-Image transformer config: patch_size={self.patch_size} is not supported (2)")
        if self.in_channels % (PATCH * PATCH):
            raise ConfigError(
                f"Qwen-Image transformer config: in_channels={self.in_channels} is not a multiple of 4 (2x2 patches)"
            )
        if not isinstance(self.axes_dims_rope, tuple) or len(self.axes_dims_rope) != 3:
            raise ConfigError(
                f"Qwen-Image transformer config: axes_dims_rope={self.axes_dims_rope!r} must be three even numbers"
            )
        if any(d % 2 for d in self.axes_dims_rope) or sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ConfigError(
                f"Qwen-Image transformer config: axes_dims_rope={list(self.axes_dims_rope)} must be even numbers "
                f"adding up to attention_head_dim={self.attention_head_dim}"
            )

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def latent_channels(self) -> int:
        """Channels of the unpacked latent the model takes (in_channels / 4)."""
        return self.in_channels // (PATCH * PATCH)

    @property
    def out_latent_channels(self) -> int:
        """Channels of the unpacked prediction (``out_channels``; unset: ``in_channels``, as diffusers reads it)."""
        return self.out_channels or self.in_channels

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> QwenImageConfig:
        """A diffusers ``transformer/config.json``; keys starting with ``_`` are ignored, others unknown refused."""
        if not isinstance(config, Mapping):
            raise ConfigError(f"a Qwen-Image transformer config must be a mapping, got {type(config).__name__}")
        name = config.get("_class_name")
        if name is not None and name != "QwenImageTransformer2DModel":
            raise ConfigError(f"not a Qwen-Image transformer config: _class_name={name!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
        if unknown:
            raise ConfigError(f"unknown Qwen-Image transformer config options: {', '.join(unknown)}")
        values = {k: v for k, v in config.items() if k in known}
        check_config("qwen_image", _numbers(values))
        try:
            return cls(**values)
        except TypeError as e:
            raise ConfigError(f"Qwen-Image transformer config: {e}") from None

    def to_diffusers(self) -> dict[str, Any]:
        out: dict[str, Any] = {"_class_name": "QwenImageTransformer2DModel"}
        out.update(dataclasses.asdict(self))
        out["axes_dims_rope"] = list(self.axes_dims_rope)
        return out


def _numbers(values: Mapping[str, Any]) -> dict[str, Any]:
    skip = {*_UNSUPPORTED, "zero_cond_t"}  # true / false, checked by the config itself
    return {k: v for k, v in values.items() if not (k == "out_channels" and v is None) and k not in skip}


QWEN_IMAGE = QwenImageConfig()  # Qwen/Qwen-Image


# ----------------------------------------------------------------------------------------------------------
# Positions


ROPE_CENTRES = ("diffusers", "comfyui")


def rope_tables(
    rows: int,
    cols: int,
    text: int,
    axes_dims: tuple[int, ...],
    centre: str = "diffusers",
    more: tuple[tuple[int, int], ...] = (),
    layout: tuple[tuple[int, int, int], ...] = (),
) -> tuple[Tensor, Tensor]:
    """cos / sin (text + rows*cols (+ the ``more`` grids' tokens), head_dim) of ``text`` text tokens followed by a
    rows x cols image grid (row-major) and then the further (rows, cols) grids of ``more`` (Qwen-Image-Edit's
    reference), the pairs' angles written twice as :func:`sdengine.models.flux.apply_rope` takes them.

    Image n's token (r, c): positions (n, r - (rows - rows//2), c - (cols - cols//2)) (the first image is n = 0);
    text token j: ``start + j`` on every axis with ``start`` the largest ``max(rows//2, cols//2)`` of the grids.
    Angle = position x ``theta ** (-2i / dim)``, both in float32 (the reference's numbers). ``centre`` "comfyui":
    ComfyUI's rows ``r - rows//2`` (and columns likewise), the same grid on an even side, one further on an odd one
    (its ``QwenImageTransformer2DModel.process_img``), and the text's ``start`` from the first grid alone (ComfyUI's
    ``txt_start`` reads the generated latent's size, not its reference latents'). ``layout``: for each ``more`` grid
    its (frame, rows down, columns right) in patches (ComfyUI's ``reference_latents_method`` "offset": frame 1, each
    moved past the ones before; :func:`sdengine.server.comfy.nodes_qwen.reference_layout`); none: frames 1, 2, ...
    unshifted."""
    if centre not in ROPE_CENTRES:
        raise UsageError(f"Qwen-Image RoPE: centre must be one of {', '.join(ROPE_CENTRES)}, got {centre!r}")
    grids = ((rows, cols), *more)
    start = max(max(h // 2, w // 2) for h, w in (grids[:1] if centre == "comfyui" else grids))
    if layout and len(layout) != len(more):
        raise UsageError(f"Qwen-Image RoPE: a layout of {len(layout)} for {len(more)} reference grids")
    places = ((0, 0, 0), *(layout or ((n + 1, 0, 0) for n in range(len(more)))))
    images = []
    for (h, w), (frame, dy, dx) in zip(grids, places, strict=True):
        row0, col0 = (h // 2, w // 2) if centre == "comfyui" else (h - h // 2, w - w // 2)
        img = torch.full((h, w, 3), float(frame), dtype=torch.float32)
        img[..., 1] = (torch.arange(h) - row0 + dy).float()[:, None]
        img[..., 2] = (torch.arange(w) - col0 + dx).float()[None, :]
        images.append(img.reshape(h * w, 3))
    txt = (start + torch.arange(text)).float()[:, None].expand(text, 3)
    pos = torch.cat([txt, *images])
    cos, sin = [], []
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / torch.pow(ROPE_THETA, torch.arange(0, dim, 2).to(torch.float32).div(dim))
        angles = pos[:, axis, None] * freqs[None, :]
        cos.append(angles.cos().repeat_interleave(2, dim=1))
        sin.append(angles.sin().repeat_interleave(2, dim=1))
    return torch.cat(cos, dim=1), torch.cat(sin, dim=1)


# ----------------------------------------------------------------------------------------------------------
# Blocks


class JointAttention(nn.Module):
    """[text, image] attention with per-stream projections (diffusers' ``Attention`` with ``added_kv_proj_dim``
    and RMS qk-norms: ``to_q/k/v``, ``add_q/k/v_proj``, ``norm_q/k``, ``norm_added_q/k``, ``to_out.0``,
    ``to_add_out``)."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.add_q_proj, self.add_k_proj = nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.add_v_proj = nn.Linear(dim, inner)
        self.norm_q, self.norm_k = nn.RMSNorm(head_dim, eps=1e-6), nn.RMSNorm(head_dim, eps=1e-6)
        self.norm_added_q, self.norm_added_k = nn.RMSNorm(head_dim, eps=1e-6), nn.RMSNorm(head_dim, eps=1e-6)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])  # diffusers' key names to_out.0
        self.to_add_out = nn.Linear(inner, dim)

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim))

    def forward(
        self, x: Tensor, context: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """x (B, N, dim) image, context (B, S, dim) text, rope of the S + N tokens, mask (B, S + N) bool or None."""
        q = torch.cat(
            [self.norm_added_q(self._heads(self.add_q_proj(context))), self.norm_q(self._heads(self.to_q(x)))], 1
        )
        k = torch.cat(
            [self.norm_added_k(self._heads(self.add_k_proj(context))), self.norm_k(self._heads(self.to_k(x)))], 1
        )
        v = torch.cat([self._heads(self.add_v_proj(context)), self._heads(self.to_v(x))], dim=1)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        m = None if mask is None else mask[:, None, None, :]
        h = scaled_dot_product_attention(q.flatten(2), k.flatten(2), v.flatten(2), self.heads, mask=m)
        S = context.shape[1]
        return self.to_out[0](h[:, S:]), self.to_add_out(h[:, :S])


class DualStreamBlock(nn.Module):
    """One of Qwen-Image's blocks (diffusers' ``QwenImageTransformerBlock``)."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.attn = JointAttention(dim, heads, head_dim)
        self.img_mlp = MLP(dim)
        self.txt_mlp = MLP(dim)

    def forward(
        self,
        x: Tensor,
        context: Tensor,
        vec: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: Tensor | None,
        zero: tuple[Tensor, int] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``zero``: (the t = 0 conditioning vector, n) for ``zero_cond_t``: the image tokens from the n-th on (a
        reference's) are modulated and gated by it, the first n (the generated latent's) and the text by ``vec``."""
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(vec).unsqueeze(1).chunk(6, dim=-1)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec).unsqueeze(1).chunk(6, dim=-1)
        if zero is None:
            img_in = modulate(x, i_shift1, i_scale1)
        else:
            z_shift1, z_scale1, z_gate1, z_shift2, z_scale2, z_gate2 = (
                self.img_mod(zero[0]).unsqueeze(1).chunk(6, dim=-1)
            )
            n = zero[1]
            img_in = torch.cat([modulate(x[:, :n], i_shift1, i_scale1), modulate(x[:, n:], z_shift1, z_scale1)], 1)
        img, txt = self.attn(img_in, modulate(context, t_shift1, t_scale1), rope, mask)
        if zero is None:
            x = x + i_gate1 * img
            x = x + i_gate2 * self.img_mlp(modulate(x, i_shift2, i_scale2))
        else:
            x = x + torch.cat([i_gate1 * img[:, :n], z_gate1 * img[:, n:]], 1)
            h = torch.cat([modulate(x[:, :n], i_shift2, i_scale2), modulate(x[:, n:], z_shift2, z_scale2)], 1)
            h = self.img_mlp(h)
            x = x + torch.cat([i_gate2 * h[:, :n], z_gate2 * h[:, n:]], 1)
        context = context + t_gate1 * txt
        context = context + t_gate2 * self.txt_mlp(modulate(context, t_shift2, t_scale2))
        if x.dtype == torch.float16:  # the residual stream outgrows float16; the reference clips it
            x, context = x.clip(-65504, 65504), context.clip(-65504, 65504)
        return x, context


class TimeEmbedding(nn.Module):
    """The conditioning vector: MLP(sinusoid(1000 t)), cosines first (diffusers' ``QwenTimestepProjEmbeddings``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(TIME_FEATURES, dim)

    def forward(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        """t (B,) in 0..1, rounded to the model's dtype as the reference rounds it; the frequencies likewise."""
        t = t.to(dtype)
        half = TIME_FEATURES // 2
        exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        freqs = torch.exp(exponent).to(dtype)
        args = (t[:, None].float() * freqs[None, :]) * TIME_SCALE
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.timestep_embedder(features.to(dtype))


class FinalLayer(nn.Module):
    """``norm_out``: SiLU -> Linear into (scale, shift), on a weightless layer norm (``AdaLayerNormContinuous``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        scale, shift = self.linear(F.silu(vec)).unsqueeze(1).chunk(2, dim=-1)
        return modulate(x, shift, scale)


# ----------------------------------------------------------------------------------------------------------
# The model


class QwenImageTransformer(nn.Module):
    """Qwen-Image's transformer (see the module docstring); diffusers' ``QwenImageTransformer2DModel`` names."""

    def __init__(self, config: QwenImageConfig = QWEN_IMAGE) -> None:
        super().__init__()
        self.config = config
        self.name = ""
        self._rope_key: tuple[Any, ...] | None = None
        self._rope: tuple[Tensor, Tensor] | None = None
        dim, heads, head_dim = config.hidden_size, config.num_attention_heads, config.attention_head_dim
        self.time_text_embed = TimeEmbedding(dim)
        self.txt_norm = nn.RMSNorm(config.joint_attention_dim, eps=1e-6)
        self.img_in = nn.Linear(config.in_channels, dim)
        self.txt_in = nn.Linear(config.joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList(
            [DualStreamBlock(dim, heads, head_dim) for _ in range(config.num_layers)]
        )
        self.norm_out = FinalLayer(dim)
        self.proj_out = nn.Linear(dim, PATCH * PATCH * config.out_latent_channels)

    @property
    def dtype(self) -> torch.dtype:
        return compute_dtype(self.img_in)

    @property
    def device(self) -> torch.device:
        return self.img_in.weight.device

    def rope(
        self,
        rows: int,
        cols: int,
        text: int,
        device: torch.device,
        centre: str = "diffusers",
        more: tuple[tuple[int, int], ...] = (),
        layout: tuple[tuple[int, int, int], ...] = (),
    ) -> tuple[Tensor, Tensor]:
        """The cos / sin tables (:func:`rope_tables`), the last ones made kept (every step asks for the same)."""
        key = (rows, cols, text, device, centre, more, layout)
        if self._rope_key != key or self._rope is None:
            cos, sin = rope_tables(rows, cols, text, self.config.axes_dims_rope, centre, more, layout)
            self._rope = (cos.to(device), sin.to(device))
            self._rope_key = key
        return self._rope

    def forward(
        self,
        hidden_states: Tensor,
        timestep: Tensor | float,
        encoder_hidden_states: Tensor,
        encoder_hidden_states_mask: Tensor | None = None,
        *,
        rope_centre: str = "diffusers",
        reference: Tensor | Sequence[Tensor] | None = None,
        reference_layout: Sequence[tuple[int, int, int]] | None = None,
        controlnet_block_samples: list[Tensor] | None = None,
    ) -> Tensor:
        """The velocity for the latent (B, C, H, W) at ``timestep`` (B,) on the 0..1000 scale given the text states
        (B, L, joint_attention_dim) and their mask (B, L) (1 = a token, 0 = padding; None: all tokens);
        ``rope_centre``: how an odd grid is centred (:func:`rope_tables`); ``reference``: Qwen-Image-Edit's
        reference latent (B, C, h, w) (module docstring), or a list of them (Qwen-Image-Edit-2509's input images, each
        of its own size: image n's frame is n; ``reference_layout``: each one's (frame, rows, columns) shift in
        patches instead, :func:`rope_tables`); ``controlnet_block_samples``: a ControlNet's residuals
        (B, N, dim) (:mod:`sdengine.models.qwen_controlnet`), block ``i`` of ``n`` adding residual
        ``i // ceil(n / m)`` of the ``m`` to its image tokens (diffusers' rule)."""
        cfg = self.config
        if hidden_states.ndim != 4 or hidden_states.shape[1] != cfg.latent_channels:
            raise UsageError(
                f"Qwen-Image transformer: hidden_states must be a (B, {cfg.latent_channels}, H, W) latent, "
                f"got {tuple(hidden_states.shape)}"
            )
        B, _, H, W = hidden_states.shape
        if H % PATCH or W % PATCH:
            raise UsageError(f"Qwen-Image transformer: the latent's height and width must be even, got {H}x{W}")
        text = encoder_hidden_states
        if text.ndim != 3 or text.shape[0] != B or text.shape[2] != cfg.joint_attention_dim:
            raise UsageError(
                f"Qwen-Image transformer: encoder_hidden_states must be (B={B}, L, {cfg.joint_attention_dim}), "
                f"got {tuple(text.shape)}"
            )
        L = text.shape[1]
        more: tuple[tuple[int, int], ...] = ()
        refs = [] if reference is None else [reference] if isinstance(reference, Tensor) else list(reference)
        for ref in refs:
            if (
                ref.ndim != 4
                or ref.shape[:2] != hidden_states.shape[:2]
                or ref.shape[2] % PATCH
                or ref.shape[3] % PATCH
            ):
                raise UsageError(
                    f"Qwen-Image transformer: reference must be a (B={B}, {cfg.latent_channels}, h, w) latent, h and "
                    f"w even, got {tuple(ref.shape)}"
                )
            more = (*more, (ref.shape[2] // PATCH, ref.shape[3] // PATCH))
        tokens = (H // PATCH) * (W // PATCH)
        mask = None
        if encoder_hidden_states_mask is not None:
            if tuple(encoder_hidden_states_mask.shape) != (B, L):
                raise UsageError(
                    f"Qwen-Image transformer: encoder_hidden_states_mask must be ({B}, {L}), "
                    f"got {tuple(encoder_hidden_states_mask.shape)}"
                )
            text_mask = encoder_hidden_states_mask.to(device=hidden_states.device, dtype=torch.bool)
            image_tokens = tokens + sum(h * w for h, w in more)
            image_mask = torch.ones(B, image_tokens, dtype=torch.bool, device=hidden_states.device)
            mask = torch.cat([text_mask, image_mask], dim=1)
        t = torch.as_tensor(timestep, device=hidden_states.device, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise UsageError(f"Qwen-Image transformer: timestep must be a number or have shape ({B},)")
        device, dtype = hidden_states.device, self.dtype
        packed = pack_latents(hidden_states.to(dtype))
        if refs:
            packed = torch.cat([packed, *(pack_latents(ref.to(device=device, dtype=dtype)) for ref in refs)], dim=1)
        x = self.img_in(packed)
        context = self.txt_in(self.txt_norm(text.to(dtype)))
        vec = self.time_text_embed(t / 1000.0, dtype)
        # zero_cond_t (Qwen-Image-Edit-2511): the reference tokens are conditioned on t = 0, the rest on t
        zero = (self.time_text_embed(t * 0, dtype), tokens) if cfg.zero_cond_t and refs else None
        layout = tuple((int(f), int(dy), int(dx)) for f, dy, dx in reference_layout or ())
        if layout and len(layout) != len(refs):
            raise UsageError(f"Qwen-Image transformer: a reference_layout of {len(layout)} for {len(refs)} references")
        rope = self.rope(H // PATCH, W // PATCH, L, device, rope_centre, more, layout)
        samples = controlnet_block_samples or None
        every = math.ceil(len(self.transformer_blocks) / len(samples)) if samples else 0
        for i, block in enumerate(self.transformer_blocks):
            x, context = block(x, context, vec, rope, mask, zero)
            if samples is not None:  # on the image tokens (not a reference's)
                r = samples[i // every].to(x.dtype)
                x = x + r if x.shape[1] == tokens else torch.cat([x[:, :tokens] + r, x[:, tokens:]], dim=1)
        x = self.proj_out(self.norm_out(x[:, :tokens], vec))
        return unpack_latents(x, H, W)


__all__ = [
    "QWEN_IMAGE",
    "ROPE_CENTRES",
    "DualStreamBlock",
    "QwenImageConfig",
    "QwenImageTransformer",
    "rope_tables",
]
