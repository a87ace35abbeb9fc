"""The T5 text encoder (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer"), encoder half only, as Stable Diffusion 3 / 3.5 and Flux use T5 v1.1 XXL for their long prompt tokens.

The network is a stack of pre-norm transformer blocks over token embeddings, with three departures from the
"Attention Is All You Need" layout that a reader should know:

- **RMS norm.** Every norm is ``x / sqrt(mean(x^2) + eps) * weight`` (Zhang & Sennrich 2019): no mean
  subtraction, no bias. The mean square is taken in float32 whatever the weights' dtype.
- **No 1/sqrt(d) in the attention.** T5 folds that factor into the initialisation of the query weights, so the
  scores are plain ``q k^T`` (``scale=1.0`` below).
- **Relative position bias instead of position embeddings.** The key-minus-query offset of every pair of tokens
  falls into one of ``relative_attention_num_buckets`` buckets: half for keys before, half for keys after the
  query (bidirectional); inside each half, offsets below a quarter of the buckets get one bucket each, longer ones
  share log-spaced buckets up to ``relative_attention_max_distance``, beyond which all offsets share the last.
  A learned table (bucket -> one number per head) turns the buckets into a bias added to the scores. Only block 0
  holds that table; the bias it gives is computed once per call and added in every block.

The feed-forward layer is ``wo(relu(wi x))`` in the original T5 (``feed_forward_proj="relu"``) and the gated
``wo(gelu(wi_0 x) * wi_1 x)`` in T5 v1.1 / T5-XXL (``"gated-gelu"``, Shazeer 2020, "GLU Variants Improve
Transformer"), with GELU's tanh approximation (transformers' ``gelu_new``).

**Half precision.** T5-XXL's feed-forward output overflows float16 (values past 65504 appear in the residual
stream). transformers keeps the ``wo`` weights in float32 when loading in float16 (``_keep_in_fp32_modules``) and
clamps the float16 hidden states to the float16 range after each sub-layer. Here the residual stream is float32
throughout (the matmuls run in the weights' dtype; each sub-layer's output is added to a float32 sum), and
:meth:`T5Encoder.set_dtype` keeps ``wo`` in float32 for float16 as transformers does, the gated product entering it in
float32 too; so nothing is clamped. A ``wo`` that a caller did cast to float16 gets its input clamped to the
float16 range instead of turning it into infinities. bfloat16 has float32's range and needs neither.

Parameter names are those of transformers' ``T5EncoderModel`` (``shared.weight``,
``encoder.block.N.layer.0.SelfAttention.q.weight``, ``encoder.block.N.layer.1.DenseReluDense.wi_0.weight``,
``encoder.final_layer_norm.weight``, ...), so its state dict loads strictly; its tied alias
``encoder.embed_tokens.weight`` is accepted for ``shared.weight``. Files are read by
:mod:`sdengine.weights.t5_file`, prompts tokenized by :mod:`sdengine.text.t5_tokenizer`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdengine.errors import UsageError
from sdengine.models.config_checks import ConfigError, check_config
from sdengine.sdpa_backends import attention

FeedForward = Literal["gated-gelu", "relu"]
FEED_FORWARDS: tuple[str, ...] = ("gated-gelu", "relu")
EMBED_ALIAS = "encoder.embed_tokens.weight"  # transformers ties it to shared.weight; files may hold both


@dataclass(frozen=True)
class T5Config:
    """A T5 encoder's numbers, under transformers' ``T5Config`` names. The defaults are T5 v1.1 XXL's (the
    ``text_encoder_3`` of SD3 and ``text_encoder_2`` of Flux)."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: FeedForward = "gated-gelu"
    layer_norm_epsilon: float = 1e-6

    def __post_init__(self) -> None:
        check_config("t5", self)  # every number bounded before anything reads it
        if self.feed_forward_proj not in FEED_FORWARDS:
            raise ConfigError(
                f"T5 text config: unsupported feed_forward_proj {self.feed_forward_proj!r} "
                f"({' or '.join(FEED_FORWARDS)})"
            )
        if self.relative_attention_num_buckets < 4 or self.relative_attention_num_buckets % 2:
            raise ConfigError(
                f"T5 text config: relative_attention_num_buckets={self.relative_attention_num_buckets} must be an "
                "even number of at least 4 (half per direction, a quarter of them exact)"
            )
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 4:
            raise ConfigError(
                f"T5 text config: relative_attention_max_distance={self.relative_attention_max_distance} must exceed "
                f"the {self.relative_attention_num_buckets // 4} exact offsets of "
                f"{self.relative_attention_num_buckets} buckets"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj == "gated-gelu"

    @classmethod
    def from_transformers(cls, config: dict[str, Any]) -> T5Config:
        """From a transformers ``T5Config`` dict (``text_encoder_3/config.json``); missing keys take transformers'
        defaults (t5-small's numbers, ``relu``)."""
        kind = config.get("model_type", "t5")
        if kind == "umt5":
            raise ConfigError("T5 text config: model_type 'umt5' (a relative position table per block) is not T5")
        if kind not in ("t5", "mt5"):
            raise ConfigError(f"T5 text config: model_type {kind!r} is not a T5 encoder")
        named = {
            "vocab_size": config.get("vocab_size", 32128),
            "d_model": config.get("d_model", 512),
            "d_kv": config.get("d_kv", 64),
            "d_ff": config.get("d_ff", 2048),
            "num_layers": config.get("num_layers", 6),
            "num_heads": config.get("num_heads", 8),
            "relative_attention_num_buckets": config.get("relative_attention_num_buckets", 32),
            "relative_attention_max_distance": config.get("relative_attention_max_distance", 128),
            "feed_forward_proj": config.get("feed_forward_proj", "relu"),
            "layer_norm_epsilon": config.get("layer_norm_epsilon", 1e-6),
        }
        check_config("t5", named)  # before anything could coerce 1.5 or "16"
        return cls(**named)

    def to_transformers(self) -> dict[str, Any]:
        """A transformers ``T5Config`` dict describing the same encoder."""
        return {
            "architectures": ["T5EncoderModel"],
            "model_type": "t5",
            "vocab_size": self.vocab_size,
            "d_model": self.d_model,
            "d_kv": self.d_kv,
            "d_ff": self.d_ff,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "relative_attention_num_buckets": self.relative_attention_num_buckets,
            "relative_attention_max_distance": self.relative_attention_max_distance,
            "feed_forward_proj": self.feed_forward_proj,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "dense_act_fn": "gelu_new" if self.gated else "relu",
            "is_gated_act": self.gated,
            "is_encoder_decoder": False,
            "use_cache": False,
        }


T5_XXL = T5Config()  # google/t5-v1_1-xxl: SD3's text_encoder_3, Flux's text_encoder_2
TINY = T5Config(vocab_size=320, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)
PRESETS: dict[str, T5Config] = {"t5_xxl": T5_XXL, "tiny": TINY}


def relative_position_buckets(
    query_length: int, key_length: int, num_buckets: int, max_distance: int, device: torch.device | None = None
) -> Tensor:
    """(query_length, key_length) bucket indices of the offsets ``key - query``, T5's bidirectional rule: keys
    after the query use the upper half of the buckets; in each half, offsets below ``num_buckets // 4`` are exact
    and longer ones are spaced logarithmically up to ``max_distance`` (everything beyond shares the last)."""
    offset = torch.arange(key_length, device=device)[None, :] - torch.arange(query_length, device=device)[:, None]
    half = num_buckets // 2
    bucket = (offset > 0).long() * half
    distance = offset.abs()
    exact = half // 2
    # log(distance / exact) / log(max_distance / exact) runs 0 -> 1 from `exact` to `max_distance`; the distances
    # below `exact` take the other branch of the where, clamped here only to keep log() finite
    far = (
        exact
        + (
            torch.log(distance.clamp(min=exact).float() / exact) / math.log(max_distance / exact) * (half - exact)
        ).long()
    )
    far = far.clamp(max=half - 1)
    return bucket + torch.where(distance < exact, distance, far)


class T5LayerNorm(nn.Module):
    """RMS norm: ``x / sqrt(mean(x^2) + eps) * weight``, the mean square in float32; the result in the weight's
    dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(self.weight.dtype)


class T5SelfAttention(nn.Module):
    """Bias-free multi-head self-attention without the 1/sqrt(d) factor; block 0's also holds the relative
    position table (``relative_attention_bias``: bucket -> one bias per head)."""

    def __init__(self, cfg: T5Config, has_relative_bias: bool) -> None:
        super().__init__()
        self.heads = cfg.num_heads
        self.d_kv = cfg.d_kv
        self.q = nn.Linear(cfg.d_model, cfg.inner_dim, bias=False)
        self.k = nn.Linear(cfg.d_model, cfg.inner_dim, bias=False)
        self.v = nn.Linear(cfg.d_model, cfg.inner_dim, bias=False)
        self.o = nn.Linear(cfg.inner_dim, cfg.d_model, bias=False)
        self.relative_attention_bias = (
            nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads) if has_relative_bias else None
        )

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        """x: (B, L, d_model); bias: the additive scores (B or 1, heads, L, L) in x's dtype."""
        B, L, _ = x.shape
        q, k, v = (proj(x).view(B, L, self.heads, self.d_kv).transpose(1, 2) for proj in (self.q, self.k, self.v))
        # F.scaled_dot_product_attention with the bias as its additive float mask and scale 1 (through sdengine's
        # one call site, which keeps masked CUDA calls off cuDNN's kernel)
        out = attention(q, k, v, mask=bias, scale=1.0)  # (B, heads, L, d_kv)
        return self.o(out.transpose(1, 2).reshape(B, L, self.heads * self.d_kv))


class T5LayerSelfAttention(nn.Module):
    """``layer.0`` of a block: RMS norm, then self-attention (the residual is added by the block)."""

    def __init__(self, cfg: T5Config, has_relative_bias: bool) -> None:
        super().__init__()
        self.SelfAttention = T5SelfAttention(cfg, has_relative_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        return self.SelfAttention(self.layer_norm(x), bias)


class T5DenseReluDense(nn.Module):
    """The feed-forward network: ``wo(relu(wi x))``, or gated ``wo(gelu_tanh(wi_0 x) * wi_1 x)``. Its output is in
    ``wo``'s dtype (float32 where :meth:`T5Encoder.set_dtype` kept it so for float16)."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.gated = cfg.gated
        if self.gated:
            self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
            self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        else:
            self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out_dtype = self.wo.weight.dtype
        if self.gated:
            gate = F.gelu(self.wi_0(x), approximate="tanh")
            h = gate.to(out_dtype) * self.wi_1(x).to(out_dtype)  # the product in wo's dtype (float32 for fp16)
        else:
            h = F.relu(self.wi(x)).to(out_dtype)
        if out_dtype == torch.float16:  # a wo the caller cast to float16: no infinities into it
            h = h.clamp(-torch.finfo(torch.float16).max, torch.finfo(torch.float16).max)
        return self.wo(h)


class T5LayerFF(nn.Module):
    """``layer.1`` of a block: RMS norm, then the feed-forward network."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.DenseReluDense = T5DenseReluDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: Tensor) -> Tensor:
        return self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    """``x + attention(norm(x))``, then ``x + ff(norm(x))``; x (the residual stream) stays float32."""

    def __init__(self, cfg: T5Config, has_relative_bias: bool) -> None:
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, has_relative_bias), T5LayerFF(cfg)])

    @property
    def attention(self) -> T5SelfAttention:
        return cast(T5LayerSelfAttention, self.layer[0]).SelfAttention

    @property
    def feed_forward(self) -> T5DenseReluDense:
        return cast(T5LayerFF, self.layer[1]).DenseReluDense

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        x = x + self.layer[0](x, bias).float()
        return x + self.layer[1](x).float()


class T5Stack(nn.Module):
    """transformers' ``encoder``: the blocks and the final RMS norm (the embedding table lives one level up)."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.block = nn.ModuleList([T5Block(cfg, has_relative_bias=(i == 0)) for i in range(cfg.num_layers)])
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)


class T5Encoder(nn.Module):
    """The T5 encoder: token ids (B, L) -> last hidden state (B, L, d_model), in the weights' dtype."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config)
        self.name = ""  # the file it came from, set by the loader
        self.register_load_state_dict_pre_hook(_accept_embed_alias)

    @property
    def dtype(self) -> torch.dtype:
        return self.shared.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.shared.weight.device

    def set_dtype(self, dtype: torch.dtype) -> T5Encoder:
        """Cast to ``dtype``, keeping the feed-forward output weights (``wo``) in float32 when ``dtype`` is float16:
        T5-XXL's feed-forward output overflows float16 (transformers' ``_keep_in_fp32_modules = ["wo"]``)."""
        self.to(dtype)
        if dtype == torch.float16:
            for block in self.blocks:
                block.feed_forward.wo.float()
        return self

    @property
    def blocks(self) -> list[T5Block]:
        return [cast(T5Block, b) for b in self.encoder.block]

    def position_bias(self, length: int) -> Tensor:
        """(1, heads, length, length) float32: block 0's relative position table looked up for every pair."""
        table = self.blocks[0].attention.relative_attention_bias
        if table is None:  # only a hand-built module could lack it; a loaded one has it
            raise UsageError("T5 encoder: block 0 has no relative_attention_bias table")
        buckets = relative_position_buckets(
            length,
            length,
            self.config.relative_attention_num_buckets,
            self.config.relative_attention_max_distance,
            device=table.weight.device,
        )
        return table(buckets).float().permute(2, 0, 1).unsqueeze(0)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """input_ids (B, L) integers; attention_mask (B, L), 1 (or True) for tokens to attend to and 0 for padding
        (None: all). Returns the last hidden state (B, L, d_model) after the final norm. Padding positions get
        outputs too (they attend to the real tokens), as in transformers."""
        if input_ids.dim() != 2 or input_ids.is_floating_point() or input_ids.is_complex():
            raise UsageError(
                f"T5 encoder: input_ids must be a (batch, length) integer tensor, got {input_ids.dtype} "
                f"{tuple(input_ids.shape)}"
            )
        B, L = input_ids.shape
        if L == 0:
            raise UsageError("T5 encoder: input_ids has no tokens (length 0)")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise UsageError(
                f"T5 encoder: token id {hi if hi >= self.config.vocab_size else lo} is outside the vocabulary "
                f"(0 to {self.config.vocab_size - 1})"
            )
        compute = self.dtype
        bias = self.position_bias(L)  # float32, (1, heads, L, L)
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, L):
                raise UsageError(
                    f"T5 encoder: attention_mask is {tuple(attention_mask.shape)}, input_ids {(B, L)}: they must match"
                )
            keep = (attention_mask != 0).to(bias.device)[:, None, None, :]  # (B, 1, 1, L) over the keys
            # padded keys get the dtype's most negative number: a row with no key at all then averages evenly
            # (as transformers' finfo.min) instead of giving NaN as -inf would
            bias = bias.masked_fill(~keep, torch.finfo(compute).min)
        bias = bias.clamp(min=torch.finfo(compute).min).to(compute)
        x = self.shared(input_ids).float()  # the residual stream, float32 (see the module docstring)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)


def _accept_embed_alias(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """transformers' tied ``encoder.embed_tokens.weight``: taken as ``shared.weight`` when that is absent,
    dropped when both are there (they are the same tensor in a T5EncoderModel)."""
    alias = state_dict.pop(prefix + EMBED_ALIAS, None)
    if alias is not None and prefix + "shared.weight" not in state_dict:
        state_dict[prefix + "shared.weight"] = alias


__all__ = [
    "EMBED_ALIAS",
    "FEED_FORWARDS",
    "PRESETS",
    "T5_XXL",
    "TINY",
    "T5Block",
    "T5Config",
    "T5DenseReluDense",
    "T5Encoder",
    "T5LayerNorm",
    "T5SelfAttention",
    "relative_position_buckets",
]
