"""Qwen2.5-VL's language model, text-only path: the text encoder of Qwen-Image (diffusers' ``QwenImagePipeline``
runs ``Qwen2_5_VLForConditionalGeneration`` on a chat-formatted prompt and keeps the last hidden state); and Qwen3,
the same decoder with three switches (below), the text encoder of Z-Image (Qwen3-4B) and FLUX.2 [klein].

The network is a decoder-only transformer (the Qwen2 architecture) over token embeddings:

- **Pre-norm blocks.** ``x + attn(rms_norm(x))``, then ``x + mlp(rms_norm(x))``; a final RMS norm (``norm``) after
  the last block. RMS norm is ``weight * (x / sqrt(mean(x^2) + eps))``, the mean square in float32 and the result
  cast back to the input's dtype before the weight multiplies it (transformers' ``Qwen2_5_VLRMSNorm``).
- **Causal grouped-query attention with biased q/k/v.** ``num_attention_heads`` query heads share
  ``num_key_value_heads`` key/value heads (query head ``h`` reads key/value head ``h // (heads / kv_heads)``);
  ``q_proj``, ``k_proj``, ``v_proj`` have biases, ``o_proj`` has none; scores scaled by ``1/sqrt(head_dim)``. Each
  token attends to itself and the tokens before it, padding keys (attention mask 0) never. A query that sees no key
  at all (a left-padded row's leading padding) gets a zero attention output, as transformers' ``sdpa`` attention
  gives it (PyTorch's kernel does for a fully masked row): FLUX.2 [dev]'s Mistral pads on the left and its pipeline
  reads those positions.
- **Rotary positions (RoPE).** Queries and keys are rotated by ``position * theta^(-2i/head_dim)``, the two halves of
  each head paired (transformers' ``rotate_half`` layout). Qwen2.5-VL's *multimodal* RoPE gives every token three
  position ids (time, height, width) and takes the frequency bands ``mrope_section`` (``[16, 24, 24]`` of the 64
  frequencies) from the three axes in turn; for text-only input the three ids are equal (transformers builds them
  as one ``arange`` expanded to three rows when no image grid is given), so the bands recombine into plain 1-D RoPE
  over positions ``0 .. L-1``. Those positions count padding too: a left-padded row's first real token is not at
  position 0 (transformers does the same for text-only input; the default right padding is unaffected).
- **SwiGLU MLP.** ``down_proj(silu(gate_proj x) * up_proj x)``, no biases.

**Qwen3** (transformers' ``Qwen3Model``) differs in three config switches: no biases on q/k/v (``attention_bias``
false; when true, ``o_proj`` is biased too, unlike Qwen2.5's), an RMS norm over each head's width on queries and keys
before RoPE (``qk_norm``: ``self_attn.q_norm`` / ``self_attn.k_norm``), and a head width given apart from the model
width (``head_dim``: Qwen3-4B runs 32 heads of 128 on a 2560-wide stream). Its RoPE is plain 1-D.

The residual stream stays in the weights' dtype, as transformers runs it. :meth:`QwenTextEncoder.forward` returns
the last hidden state after the final norm: what ``output_hidden_states=True``'s ``hidden_states[-1]`` holds and what
Qwen-Image's pipeline reads; with ``hidden_layers`` it returns the states transformers' ``hidden_states`` tuple holds at
those indices (0: the token embeddings; k: block k's output, no final norm; the last: after the final norm), which is
what Z-Image (``hidden_states[-2]``) and FLUX.2 [klein] (layers 9, 18, 27) read. The vision tower and the
language-model head are not part of this module (Qwen-Image never uses them for text-to-image);
:mod:`sdengine.weights.qwen_text_file` skips their tensors.

Parameter names are those of transformers' ``Qwen2_5_VLTextModel`` (``embed_tokens.weight``,
``layers.N.self_attn.q_proj.weight``, ``layers.N.mlp.gate_proj.weight``, ``norm.weight``, ...), so a file's tensors
load strictly once its prefix (``model.language_model.`` or ``model.``) is taken off.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdengine.errors import UsageError
from sdengine.models.config_checks import ConfigError
from sdengine.sdpa_backends import attention

# Bounds on the config's integers (inclusive). Qwen2.5-VL-72B's language model is the largest release: 80 layers of
# 8192 (64 heads, 8 key/value heads, 29568-wide MLP); vocabularies are 151,936 or 152,064 entries.
INT_LIMITS: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 1_000_000),
    "hidden_size": (1, 16384),
    "intermediate_size": (1, 65536),
    "num_hidden_layers": (1, 128),
    "num_attention_heads": (1, 256),
    "num_key_value_heads": (1, 256),
}
MAX_PARAMETERS = 100_000_000_000  # a lower estimate past this is not a model anyone runs here
# a Mistral sliding window at least this wide changes nothing: no caller runs more tokens (FLUX.2's longest text)
SLIDING_WINDOW_FLOOR = 4096
TEXT_ONLY_ROPE_TYPES = ("default", "mrope")  # "mrope" is Qwen2-VL's old spelling of the default rule


@dataclass(frozen=True)
class QwenTextConfig:
    """The language model's numbers under transformers' ``Qwen2_5_VLTextConfig`` names. The defaults are
    Qwen2.5-VL-7B-Instruct's, the ``text_encoder`` of Qwen-Image."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    attention_bias: bool = True  # q/k/v biased (Qwen2.5); Qwen3: False
    o_proj_bias: bool = False  # Qwen3 biases o_proj exactly when attention_bias is set; Qwen2.5 never
    qk_norm: bool = False  # Qwen3: per-head RMS norms on queries and keys
    head_dim_override: int | None = None  # Qwen3's explicit head_dim; None: hidden_size / num_attention_heads

    def __post_init__(self) -> None:
        for name, (lo, hi) in INT_LIMITS.items():
            value = getattr(self, name)
            if type(value) is not int:
                raise ConfigError(f"Qwen text config: {name}={value!r} is not an integer")
            if not lo <= value <= hi:
                raise ConfigError(f"Qwen text config: {name}={value} is out of range ({lo} to {hi})")
        for fname, flo, fhi in (("rms_norm_eps", 0.0, 1.0), ("rope_theta", 1.0, 1e12)):
            number = getattr(self, fname)
            if isinstance(number, bool) or not isinstance(number, int | float) or not math.isfinite(number):
                raise ConfigError(f"Qwen text config: {fname}={number!r} is not a finite number")
            if not flo < number <= fhi:
                raise ConfigError(f"Qwen text config: {fname}={number} is out of range ({flo:g} (excluded) to {fhi:g})")
        heads, kv = self.num_attention_heads, self.num_key_value_heads
        for flag in ("attention_bias", "o_proj_bias", "qk_norm"):
            if type(getattr(self, flag)) is not bool:
                raise ConfigError(f"Qwen text config: {flag}={getattr(self, flag)!r} is not true or false")
        override = self.head_dim_override
        if override is not None and (type(override) is not int or not 2 <= override <= 1024):
            raise ConfigError(f"Qwen text config: head_dim={override!r} is not an integer from 2 to 1024")
        if override is None and self.hidden_size % heads:
            raise ConfigError(
                f"Qwen text config: hidden_size={self.hidden_size} is not a multiple of num_attention_heads={heads}"
            )
        if heads % kv:
            raise ConfigError(
                f"Qwen text config: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"Qwen text config: head width {self.head_dim} is odd; RoPE rotates pairs")
        section = self.mrope_section
        if (
            not isinstance(section, tuple)
            or len(section) != 3
            or any(type(s) is not int or s < 0 for s in section)
            or sum(section) != self.head_dim // 2
        ):
            raise ConfigError(
                f"Qwen text config: mrope_section={list(section) if isinstance(section, tuple) else section!r} must be "
                f"three counts summing to half the head width ({self.head_dim // 2})"
            )
        estimate = self.num_hidden_layers * (
            2 * self.hidden_size * self.head_dim * self.num_attention_heads
            + 3 * self.hidden_size * self.intermediate_size
        )
        if estimate > MAX_PARAMETERS:
            raise ConfigError(
                f"Qwen text config describes a network of at least {estimate:.2e} parameters (limit "
                f"{MAX_PARAMETERS:.0e}); refusing to build it"
            )

    @property
    def head_dim(self) -> int:
        if self.head_dim_override is not None:
            return self.head_dim_override
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_transformers(cls, config: dict[str, Any]) -> QwenTextConfig:
        """From a transformers ``Qwen2_5_VLConfig`` or ``Qwen3Config`` dict (a ``text_encoder/config.json``): the
        language model's numbers from its ``text_config`` (transformers 5) or from the top level (older files such
        as Qwen-Image's), the RoPE settings from ``rope_parameters`` / ``rope_scaling`` / ``rope_theta``. What this
        module does not run (another model type, another activation, sliding-window attention, scaled RoPE) is a
        ConfigError."""
        kind = config.get("model_type")
        if kind == "qwen3":
            return cls._from_qwen3(config)
        if kind in ("mistral3", "mistral"):
            return cls._from_mistral(config)
        if kind not in ("qwen2_5_vl", "qwen2_5_vl_text"):
            raise ConfigError(
                f"Qwen text config: model_type {kind!r} is not Qwen2.5-VL (qwen2_5_vl), Qwen3 (qwen3) or Mistral "
                "(mistral3, mistral)"
            )
        text = config.get("text_config")
        src: dict[str, Any] = dict(config)
        if isinstance(text, dict):
            src.update({k: v for k, v in text.items() if v is not None})
        act = src.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"Qwen text config: hidden_act {act!r} is not supported (silu)")
        if src.get("use_sliding_window"):
            raise ConfigError("Qwen text config: use_sliding_window is true; sliding-window attention is not supported")
        rope = src.get("rope_parameters") or src.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"Qwen text config: rope_parameters is {type(rope).__name__}, not an object")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in TEXT_ONLY_ROPE_TYPES:
            raise ConfigError(f"Qwen text config: rope_type {rope_type!r} is not supported (default)")
        theta = rope.get("rope_theta", src.get("rope_theta", 1_000_000.0))
        section = rope.get("mrope_section", [16, 24, 24])
        if not isinstance(section, list | tuple):
            raise ConfigError(f"Qwen text config: mrope_section={section!r} is not a list")
        heads = src.get("num_attention_heads", 64)
        kv = src.get("num_key_value_heads")
        return cls(
            vocab_size=src.get("vocab_size", 152064),
            hidden_size=src.get("hidden_size", 8192),
            intermediate_size=src.get("intermediate_size", 29568),
            num_hidden_layers=src.get("num_hidden_layers", 80),
            num_attention_heads=heads,
            num_key_value_heads=heads if kv is None else kv,
            rms_norm_eps=src.get("rms_norm_eps", 1e-5),
            rope_theta=theta,
            mrope_section=tuple(section),
        )

    @classmethod
    def _from_mistral(cls, config: dict[str, Any]) -> QwenTextConfig:
        """A transformers ``Mistral3Config`` (its ``text_config``: FLUX.2 [dev]'s Mistral Small 3) or ``MistralConfig``
        dict: the Llama-style decoder this module runs with no biases and no q/k norms, the head width given apart
        (Mistral Small 3: 32 heads of 128 on a 5120-wide stream), RoPE's theta from the config; its defaults are
        transformers' ``MistralConfig``'s (Mistral-7B's numbers)."""
        src: dict[str, Any] = dict(config)
        if config.get("model_type") == "mistral3":
            text = config.get("text_config")
            if not isinstance(text, dict):
                raise ConfigError("Mistral text config: a mistral3 config without a text_config object")
            if text.get("model_type", "mistral") != "mistral":
                raise ConfigError(
                    f"Mistral text config: text_config model_type {text.get('model_type')!r} is not mistral"
                )
            src = dict(text)
        act = src.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"Mistral text config: hidden_act {act!r} is not supported (silu)")
        window = src.get("sliding_window", 4096)  # transformers' MistralConfig default when the key is absent
        if window is not None and (type(window) is not int or window < SLIDING_WINDOW_FLOOR):
            raise ConfigError(
                f"Mistral text config: sliding_window={window!r}; sliding-window attention narrower than "
                f"{SLIDING_WINDOW_FLOOR} tokens is not supported (Mistral Small 3 has none)"
            )
        rope, heads, kv, hidden, head_dim = _rope_and_heads(src, "Mistral")
        return cls(
            vocab_size=src.get("vocab_size", 32000),
            hidden_size=hidden,
            intermediate_size=src.get("intermediate_size", 14336),
            num_hidden_layers=src.get("num_hidden_layers", 32),
            num_attention_heads=heads,
            num_key_value_heads=heads if kv is None else kv,
            rms_norm_eps=src.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", src.get("rope_theta", 10_000.0)),
            mrope_section=(head_dim // 2, 0, 0) if type(head_dim) is int else (64, 0, 0),
            attention_bias=False,
            o_proj_bias=False,
            qk_norm=False,
            head_dim_override=head_dim,
        )

    @classmethod
    def _from_qwen3(cls, src: dict[str, Any]) -> QwenTextConfig:
        """A transformers ``Qwen3Config`` dict; its defaults are transformers' (Qwen3-8B's numbers)."""
        act = src.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"Qwen text config: hidden_act {act!r} is not supported (silu)")
        layer_types = src.get("layer_types") or []
        if src.get("use_sliding_window") or any(t != "full_attention" for t in layer_types):
            raise ConfigError("Qwen text config: sliding-window attention layers are not supported")
        rope, heads, kv, hidden, head_dim = _rope_and_heads(src, "Qwen")
        bias = src.get("attention_bias", False)
        return cls(
            vocab_size=src.get("vocab_size", 151936),
            hidden_size=hidden,
            intermediate_size=src.get("intermediate_size", 22016),
            num_hidden_layers=src.get("num_hidden_layers", 32),
            num_attention_heads=heads,
            num_key_value_heads=heads if kv is None else kv,
            rms_norm_eps=src.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", src.get("rope_theta", 10_000.0)),
            mrope_section=(head_dim // 2, 0, 0) if type(head_dim) is int else (64, 0, 0),
            attention_bias=bias,
            o_proj_bias=bias,
            qk_norm=True,
            head_dim_override=head_dim,
        )


def _rope_and_heads(src: dict[str, Any], label: str) -> tuple[dict[str, Any], Any, Any, Any, Any]:
    """A transformers text config's RoPE parameters (default RoPE only, else one line) and its head numbers: (rope,
    heads, key/value heads or None, hidden size, head width: the config's or hidden / heads)."""
    rope = src.get("rope_parameters") or src.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"{label} text config: rope_parameters is {type(rope).__name__}, not an object")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"{label} text config: rope_type {rope_type!r} is not supported (default)")
    heads = src.get("num_attention_heads", 32)
    hidden = src.get("hidden_size", 4096)
    head_dim = src.get("head_dim")
    if head_dim is None and type(hidden) is int and type(heads) is int and heads > 0:
        head_dim = hidden // heads
    return rope, heads, src.get("num_key_value_heads"), hidden, head_dim


QWEN25_VL_7B = QwenTextConfig()  # Qwen/Qwen2.5-VL-7B-Instruct: Qwen-Image's text_encoder
# Qwen/Qwen3-4B: Z-Image's text_encoder (and FLUX.2 [klein] 4B's)
QWEN3_4B = QwenTextConfig(
    vocab_size=151936,
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    mrope_section=(64, 0, 0),
    attention_bias=False,
    qk_norm=True,
    head_dim_override=128,
)


def rope_frequencies(config: QwenTextConfig, device: torch.device | None = None) -> Tensor:
    """(head_dim / 2,) float32 inverse frequencies ``theta^(-2i/head_dim)``."""
    d = config.head_dim
    return 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))


def rope_cos_sin(config: QwenTextConfig, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin (L, head_dim) of integer ``positions`` (L,): angles in float32, each frequency used for both
    halves of the head, then cast to ``dtype`` (as transformers casts them to the hidden states' dtype). With the
    three multimodal axes equal this is also Qwen2.5-VL's ``mrope_section`` recombination."""
    angles = positions.float()[:, None] * rope_frequencies(config, positions.device)[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def mrope_positions(
    ids: Sequence[int], image_token_id: int, grids: Sequence[tuple[int, int, int]], merge: int
) -> Tensor:
    """(3, L) multimodal position ids (time, row, column) of one row of tokens (no padding) holding images: each
    run of ``image_token_id`` tokens is the next grid's merged tokens (``t * (h/merge) * (w/merge)`` of them); an
    image at position ``p`` (the count so far) gets ``(p + t', p + r, p + c)`` for its tokens, and the text after
    it continues from ``p + max(h, w) / merge``; text tokens get ``p`` on all three axes, ``p`` counting up by one
    (transformers' ``Qwen2_5_VLModel.get_rope_index`` for still images)."""
    ids = [int(v) for v in ids]
    out = torch.zeros(3, len(ids), dtype=torch.long)
    pos, i, images = 0, 0, iter(grids)
    n = len(ids)
    while i < n:
        if ids[i] != image_token_id:
            out[:, i] = pos
            pos += 1
            i += 1
            continue
        grid = next(images, None)
        if grid is None:
            raise UsageError("Qwen text encoder: more image tokens than images")
        t, h, w = grid[0], grid[1] // merge, grid[2] // merge
        count = t * h * w
        if ids[i : i + count] != [image_token_id] * count:
            raise UsageError(f"Qwen text encoder: an image of {count} tokens has fewer image tokens in the text")
        tt, rr, cc = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        out[:, i : i + count] = torch.stack([tt, rr, cc]).reshape(3, -1) + pos
        pos += max(h, w)
        i += count
    if next(images, None) is not None:
        raise UsageError("Qwen text encoder: more images than runs of image tokens in the text")
    return out


def mrope_cos_sin(config: QwenTextConfig, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin (B, 1, L, head_dim) of (3, B, L) multimodal positions: the frequency bands ``mrope_section``
    taken from the time, row and column axes in turn, each used for both halves of the head."""
    freqs = rope_frequencies(config, positions.device)
    angles = positions.float()[..., None] * freqs  # (3, B, L, d/2)
    bands, start = [], 0
    for axis, width in enumerate(config.mrope_section):
        bands.append(angles[axis, ..., start : start + width])
        start += width
    half = torch.cat(bands, dim=-1)
    full = torch.cat((half, half), dim=-1)[:, None]
    return full.cos().to(dtype), full.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, heads, L, d) by the (L, d) (or (B, 1, L, d)) angles; the first half of each head pairs with the
    second."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class QwenRMSNorm(nn.Module):
    """``weight * (x / sqrt(mean(x^2) + eps))``: the mean square in float32, cast back to x's dtype before the
    weight multiplies it."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class QwenAttention(nn.Module):
    """Grouped-query self-attention with (Qwen2.5) biased q/k/v projections or (Qwen3) per-head RMS norms on
    queries and keys, RoPE on queries and keys."""

    def __init__(self, cfg: QwenTextConfig) -> None:
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=cfg.o_proj_bias)
        self.q_norm = QwenRMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = QwenRMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, blind: Tensor | None = None) -> Tensor:
        """x (B, L, hidden); cos/sin (L, head_dim); mask (B, 1, L, L) bool, True where a key is visible, or None:
        causal over every token; blind (B, 1, L, 1) bool or None: queries that see no key (their attention output
        is zero, as transformers' sdpa gives it)."""
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.heads, self.head_dim)
        k = self.k_proj(x).view(B, L, self.kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        groups = self.heads // self.kv_heads
        if groups > 1:  # key/value head j serves query heads j*groups .. j*groups + groups - 1
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        out = attention(q, k, v, mask=mask, is_causal=mask is None)  # scale 1/sqrt(head_dim)
        if blind is not None:
            out = out.masked_fill(blind, 0.0)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, self.heads * self.head_dim))


class QwenMLP(nn.Module):
    """SwiGLU: ``down_proj(silu(gate_proj x) * up_proj x)``, no biases."""

    def __init__(self, cfg: QwenTextConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class QwenDecoderLayer(nn.Module):
    """``x + self_attn(input_layernorm(x))``, then ``x + mlp(post_attention_layernorm(x))``."""

    def __init__(self, cfg: QwenTextConfig) -> None:
        super().__init__()
        self.self_attn = QwenAttention(cfg)
        self.mlp = QwenMLP(cfg)
        self.input_layernorm = QwenRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = QwenRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, blind: Tensor | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, blind)
        return x + self.mlp(self.post_attention_layernorm(x))


class QwenTextEncoder(nn.Module):
    """Qwen2.5-VL's language model: token ids (B, L) -> last hidden state (B, L, hidden) after the final norm, in
    the weights' dtype."""

    def __init__(self, config: QwenTextConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([QwenDecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = QwenRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.name = ""  # the file or folder it came from, set by the loader

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def blocks(self) -> list[QwenDecoderLayer]:
        return [cast(QwenDecoderLayer, b) for b in self.layers]

    def attention_mask(self, key_mask: Tensor | None, batch: int, length: int) -> Tensor | None:
        """None when no key is padding (the attention then runs causal, ``is_causal=True``, which lets fused
        kernels skip the mask); otherwise (B, 1, L, L) bool, True where query i may see key j: j <= i and key j not
        padding (transformers' mask, so a right-padded row's padding positions get transformers' numbers too: FLUX.2
        [klein] reads them). A query that sees no key at all (a left-padded row's leading padding) sees itself here,
        so that no kernel gives NaN; :meth:`blind_queries` then zeroes its attention output, as transformers' sdpa
        attention does (no real token reads a padding key, so this changes only the padding positions' own
        outputs, which FLUX.2 [dev] reads)."""
        if key_mask is None or bool((key_mask != 0).all()):
            return None
        device = self.device
        allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
        allowed = allowed & (key_mask != 0).to(device)[:, None, None, :]
        blind = ~allowed.any(dim=-1, keepdim=True)  # (B, 1, L, 1): queries with no visible key
        return allowed | (blind & torch.eye(length, dtype=torch.bool, device=device)[None, None])

    def blind_queries(self, key_mask: Tensor | None, length: int) -> Tensor | None:
        """(B, 1, L, 1) bool: the queries that see no key (a left-padded row's leading padding), or None when
        there are none."""
        if key_mask is None:
            return None
        seen = torch.cumsum((key_mask != 0).to(self.device, torch.int64), dim=1) > 0  # a key at or before i
        if bool(seen.all()):
            return None
        return (~seen)[:, None, :length, None]

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        image_embeds: Tensor | None = None,
        image_token_id: int | None = None,
        position_ids: Tensor | None = None,
        hidden_layers: Sequence[int] | None = None,
    ) -> Any:
        """input_ids (B, L) integers; attention_mask (B, L), 1 (or True) for tokens and 0 for padding (None: all
        tokens). Returns the last hidden state (B, L, hidden); padding positions get outputs too: transformers' numbers
        after a row's tokens (right padding, which FLUX.2 [klein] reads), not before them (left padding).

        With ``hidden_layers`` (indices into transformers' ``hidden_states`` tuple of ``num_hidden_layers + 1``
        states, negative ones counting from its end) it returns a list of those states instead, in the order
        asked; only the blocks up to the deepest one asked for run.

        With images (Qwen-Image-Edit): ``image_embeds`` (N, hidden), the vision tower's tokens, replace the N
        ``image_token_id`` tokens of ``input_ids`` in order, and ``position_ids`` (3, B, L) are the multimodal
        positions (:func:`mrope_positions`)."""
        if (
            input_ids.dim() != 2
            or input_ids.is_floating_point()
            or input_ids.is_complex()
            or input_ids.dtype == torch.bool
        ):
            raise UsageError(
                f"Qwen text encoder: input_ids must be a (batch, length) integer tensor, got {input_ids.dtype} "
                f"{tuple(input_ids.shape)}"
            )
        B, L = input_ids.shape
        if L == 0 or B == 0:
            raise UsageError(f"Qwen text encoder: input_ids {tuple(input_ids.shape)} holds no tokens")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise UsageError(
                f"Qwen text encoder: token id {hi if hi >= self.config.vocab_size else lo} is outside the vocabulary "
                f"(0 to {self.config.vocab_size - 1})"
            )
        if attention_mask is not None and tuple(attention_mask.shape) != (B, L):
            raise UsageError(
                f"Qwen text encoder: attention_mask is {tuple(attention_mask.shape)}, input_ids {(B, L)}: they must "
                "match"
            )
        wanted = self._hidden_indices(hidden_layers)
        mask = self.attention_mask(attention_mask, B, L)
        blind = self.blind_queries(attention_mask, L) if mask is not None else None
        x = self.embed_tokens(input_ids.to(self.device))
        if image_embeds is not None:
            where = torch.eq(input_ids.to(self.device), -1 if image_token_id is None else int(image_token_id))
            count = int(where.sum())
            if image_embeds.ndim != 2 or image_embeds.shape != (count, self.config.hidden_size):
                raise UsageError(
                    f"Qwen text encoder: {count} image tokens in the text, image_embeds is "
                    f"{tuple(image_embeds.shape)} (needs ({count}, {self.config.hidden_size}))"
                )
            x = x.masked_scatter(where[..., None], image_embeds.to(device=x.device, dtype=x.dtype))
        if position_ids is not None:
            if tuple(position_ids.shape) != (3, B, L):
                raise UsageError(
                    f"Qwen text encoder: position_ids must be (3, {B}, {L}), got {tuple(position_ids.shape)}"
                )
            cos, sin = mrope_cos_sin(self.config, position_ids.to(self.device), x.dtype)
        else:
            cos, sin = rope_cos_sin(self.config, torch.arange(L, device=self.device), x.dtype)
        if wanted is None:
            for layer in self.layers:
                x = layer(x, cos, sin, mask, blind)
            return self.norm(x)
        n = self.config.num_hidden_layers
        states: dict[int, Tensor] = {0: x} if 0 in wanted else {}
        for i, layer in enumerate(self.layers[: max(wanted)], start=1):
            x = layer(x, cos, sin, mask, blind)
            if i in wanted:
                states[i] = self.norm(x) if i == n else x
        return [states[i] for i in wanted]

    def _hidden_indices(self, hidden_layers: Sequence[int] | None) -> list[int] | None:
        """``hidden_layers`` as indices 0..num_hidden_layers (negative ones from the end); a one-line UsageError
        for an index outside, a non-integer or an empty list."""
        if hidden_layers is None:
            return None
        count = self.config.num_hidden_layers + 1
        asked = list(hidden_layers)
        if not asked:
            raise UsageError("Qwen text encoder: hidden_layers is empty; leave it out for the last hidden state")
        out = []
        for i in asked:
            if isinstance(i, bool) or not isinstance(i, int) or not -count <= i < count:
                raise UsageError(
                    f"Qwen text encoder: hidden layer {i!r} does not exist (the model has {count} hidden states: "
                    f"{-count} to {count - 1})"
                )
            out.append(i % count)
        return out


__all__ = [
    "INT_LIMITS",
    "QWEN25_VL_7B",
    "QWEN3_4B",
    "QwenAttention",
    "QwenDecoderLayer",
    "QwenMLP",
    "QwenRMSNorm",
    "QwenTextConfig",
    "QwenTextEncoder",
    "apply_rope",
    "mrope_cos_sin",
    "mrope_positions",
    "rope_cos_sin",
    "rope_frequencies",
]
