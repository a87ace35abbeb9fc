"""CLIP text encoder (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision"), the text tower that conditions Stable Diffusion.

A pre-LayerNorm transformer with a causal mask over 77 positions. Parameter names are those of
transformers' ``CLIPTextModel`` as saved on disk (``text_model.embeddings.token_embedding.weight``,
``text_model.encoder.layers.N.self_attn.q_proj.weight``, ..., ``text_model.final_layer_norm.*``), so
the ``text_encoder/`` of a diffusers SD folder loads with a strict ``load_state_dict``. The
``text_model.embeddings.position_ids`` buffer that older checkpoints carry is accepted and ignored.

Presets: ``SD1`` is OpenAI CLIP ViT-L/14's text tower (768 wide, 12 layers, 12 heads, quick_gelu);
``SD2`` is OpenCLIP ViT-H/14's (1024 wide, 16 heads, exact gelu) with 23 layers: the trained model has
24, and SD 2.x conditions on the output of the 23rd (the "penultimate" layer, after the final
LayerNorm), so diffusers' SD2 folders ship 23 layers and so does this preset.

``clip_skip`` uses A1111's numbering: 1 = the last layer, 2 = the one before it, ...; the final
LayerNorm is applied to the chosen layer's output (A1111's ``CLIP_stop_at_last_layers`` and ComfyUI
do this). diffusers counts differently: its ``clip_skip=k`` means A1111's ``k + 1``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from sdengine.models.config_checks import ConfigError, check_config
from sdengine.nn.meta_init import skip_meta_init
from sdengine.sdpa_backends import attention

Activation = Literal["quick_gelu", "gelu"]
PooledRule = Literal["argmax", "first_eos"]


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: Activation = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # Where the pooled output is read. "argmax": at the largest id of each row (OpenAI CLIP's rule,
    # right while the EOS token 49407 is the largest id; transformers uses it for configs with the
    # legacy eos_token_id=2, which is what SD 1.x/2.x folders ship). "first_eos": at the first
    # `eos_token_id` (transformers' rule for every other config; right with added tokens too).
    pooled_rule: PooledRule = "argmax"
    eos_token_id: int = 49407
    # Output width of ``text_projection`` (only :class:`CLIPTextModelWithProjection` has one).
    projection_dim: int = 512

    def __post_init__(self) -> None:
        check_config("clip_text", self)  # every number bounded before anything reads it
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} not divisible by {self.num_attention_heads} heads")
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ConfigError(f"unsupported hidden_act {self.hidden_act!r} (quick_gelu or gelu)")
        if self.pooled_rule not in ("argmax", "first_eos"):
            raise ConfigError(f"unknown pooled_rule {self.pooled_rule!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any]) -> CLIPTextConfig:
        """From a transformers ``CLIPTextConfig`` dict (``text_encoder/config.json``) or a full
        ``CLIPConfig`` dict (its ``text_config`` is used). Missing keys take transformers' defaults."""
        if "text_config" in config and isinstance(config["text_config"], Mapping):
            config = config["text_config"]
        check_config("clip_text", config)  # before int() could coerce 1.5 or "77"
        act = config.get("hidden_act", "quick_gelu")  # anything but quick_gelu/gelu is refused below
        eos = int(config.get("eos_token_id", 49407))
        return cls(
            vocab_size=int(config.get("vocab_size", 49408)),
            hidden_size=int(config.get("hidden_size", 512)),
            intermediate_size=int(config.get("intermediate_size", 2048)),
            num_hidden_layers=int(config.get("num_hidden_layers", 12)),
            num_attention_heads=int(config.get("num_attention_heads", 8)),
            max_position_embeddings=int(config.get("max_position_embeddings", 77)),
            hidden_act=act,
            layer_norm_eps=float(config.get("layer_norm_eps", 1e-5)),
            # transformers keeps OpenAI's argmax rule for the pre-2023 eos_token_id=2 configs.
            pooled_rule="argmax" if eos == 2 else "first_eos",
            eos_token_id=49407 if eos == 2 else eos,
            projection_dim=int(config.get("projection_dim", 512)),
        )

    def to_transformers(self) -> dict[str, Any]:
        """A transformers ``CLIPTextConfig`` dict describing the same network."""
        d = asdict(self)
        d.pop("pooled_rule")
        d["eos_token_id"] = 2 if self.pooled_rule == "argmax" else self.eos_token_id
        d.update(bos_token_id=0 if self.pooled_rule == "argmax" else 49406, pad_token_id=1)
        d.update(architectures=["CLIPTextModel"], model_type="clip_text_model")
        return d


SD1 = CLIPTextConfig(projection_dim=768)  # openai/clip-vit-large-patch14 text tower
SD2 = CLIPTextConfig(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu"
)  # laion/CLIP-ViT-H-14 text tower without its last layer, as SD 2.x uses it
# Tiny configs for tests: real vocabulary and context length, so real token ids work.
TINY_SD1 = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4)
TINY_SD2 = CLIPTextConfig(
    hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=16, hidden_act="gelu"
)
# SDXL's second encoder: OpenCLIP ViT-bigG/14's text tower (1280 wide, 32 layers, 20 heads) with its
# 1280-wide text projection; SDXL reads its penultimate layer and its projected pooled output.
SDXL_G = CLIPTextConfig(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
    projection_dim=1280,
)
TINY_SDXL_G = CLIPTextConfig(
    hidden_size=48,  # not CLIP-L's 32: tools tell the two encoders apart by width, as 768 vs 1280
    intermediate_size=37,
    num_hidden_layers=3,
    num_attention_heads=4,
    hidden_act="gelu",
    projection_dim=32,
)
PRESETS: dict[str, CLIPTextConfig] = {
    "sd1": SD1,
    "sd2": SD2,
    "sdxl_g": SDXL_G,
    "tiny_sd1": TINY_SD1,
    "tiny_sd2": TINY_SD2,
    "tiny_sdxl_g": TINY_SDXL_G,
}


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU (Hendrycks & Gimpel 2016, section 2)."""
    return x * torch.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        c = cfg.hidden_size
        self.q_proj = nn.Linear(c, c)
        self.k_proj = nn.Linear(c, c)
        self.v_proj = nn.Linear(c, c)
        self.out_proj = nn.Linear(c, c)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, c = x.shape  # (B, T, C)
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        # Scale 1/sqrt(D) is SDPA's default, as in CLIP. Without a padding mask the causal mask
        # is built in by the kernel.
        y = attention(q, k, v, mask=mask, is_causal=mask is None)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, c))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = quick_gelu if cfg.hidden_act == "quick_gelu" else F.gelu  # exact (erf) GELU for OpenCLIP

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        # (N, C) vectors of the ids vocab_size .. vocab_size + N - 1 (textual-inversion embeddings, see
        # sdengine.text.embeddings). A plain attribute, not a parameter or buffer: it is not part of the
        # model's weights, so state dicts and LoRA key maps never see it.
        self.extra_tokens: torch.Tensor | None = None

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T, C) token vectors: the vocabulary's rows, and ``extra_tokens`` for ids past it."""
        extra = self.extra_tokens
        vocab = self.token_embedding.num_embeddings
        if extra is None:
            return self.token_embedding(input_ids)
        is_extra = input_ids >= vocab
        if not bool(is_extra.any()):
            return self.token_embedding(input_ids)
        if int(input_ids.max()) >= vocab + extra.shape[0]:
            raise ValueError(f"token id {int(input_ids.max())} is past the {vocab + extra.shape[0]} known tokens")
        base = self.token_embedding(input_ids.masked_fill(is_extra, 0))
        more = extra.to(base)[(input_ids - vocab).clamp(min=0)]  # rows of ordinary ids are discarded below
        return torch.where(is_extra.unsqueeze(-1), more, base)

    def forward(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        t = input_ids.shape[-1]
        if t > self.position_embedding.num_embeddings:
            raise ValueError(f"sequence of {t} tokens is longer than {self.position_embedding.num_embeddings}")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, T, C)
        positions = torch.arange(t, device=inputs_embeds.device)
        return inputs_embeds + self.position_embedding(positions)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # Checkpoints written by older transformers carry the constant `position_ids` buffer;
        # positions are computed here, so the entry is dropped rather than reported as unexpected.
        state_dict.pop(prefix + "position_ids", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


@dataclass
class CLIPTextOutput:
    last_hidden_state: torch.Tensor  # (B, T, C): final LayerNorm of the layer chosen by clip_skip
    pooled: torch.Tensor  # (B, C): final LayerNorm of the last layer, at the EOS position
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embeddings + each layer, before the final LN
    text_embeds: torch.Tensor | None = None  # (B, P): text_projection(pooled), CLIPTextModelWithProjection only


def add_text_model_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as transformers 4.x wrote them (``text_model.*``, the layout of every SD 1.x/2.x
    ``text_encoder/`` folder). transformers 5 writes ``CLIPTextModel`` without that prefix; such
    a state dict gets it added. Mixed or already-prefixed dicts are returned unchanged."""
    if any(k.startswith("text_model.") for k in state_dict):
        return dict(state_dict)
    return {f"text_model.{k}": v for k, v in state_dict.items()}


class CLIPTextModel(nn.Module):
    """CLIP text transformer with transformers' ``CLIPTextModel`` parameter names."""

    def __init__(self, config: CLIPTextConfig = SD1) -> None:
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, torch.Tensor],
        config: CLIPTextConfig,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> CLIPTextModel:
        """Build on the meta device (no throw-away init) and take the tensors of ``state_dict``
        (strict: missing or unexpected keys raise, except ``position_ids``).

        Keys without the ``text_model.`` prefix (what transformers >= 5 writes) are accepted too
        (``text_projection.*`` stays where it is).
        """
        with torch.device("meta"), skip_meta_init():
            model = cls(config)
        tensors = {
            k: v.to(device=device, dtype=dtype if v.is_floating_point() else None)
            for k, v in add_projection_prefix(state_dict).items()
        }
        model.load_state_dict(tensors, strict=True, assign=True)
        return model

    def _attention_mask(self, attention_mask: torch.Tensor | None, t: int, device: torch.device) -> torch.Tensor | None:
        if attention_mask is None:
            return None
        causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()  # (T, T) query attends to keys <= itself
        return causal[None, None] & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # (B,1,T,T)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        clip_skip: int = 1,
        output_hidden_states: bool = False,
        inputs_embeds: torch.Tensor | None = None,
    ) -> CLIPTextOutput:
        """Encode (B, T) token ids.

        ``attention_mask`` (B, T), 1 = real token, only narrows the causal mask; SD does not use
        it. ``inputs_embeds`` (B, T, C) replaces the token embeddings (textual inversion);
        ``input_ids`` is still needed to find the pooled position.
        """
        n_layers = self.config.num_hidden_layers
        if not 1 <= clip_skip <= n_layers:
            raise ValueError(f"clip_skip must be in 1..{n_layers}, got {clip_skip}")
        tm = self.text_model
        x = tm.embeddings(input_ids, inputs_embeds)  # (B, T, C)
        mask = self._attention_mask(attention_mask, x.shape[1], x.device)
        hidden = [x]
        for layer in tm.encoder.layers:
            x = layer(x, mask)
            hidden.append(x)
        last = tm.final_layer_norm(x)
        chosen = last if clip_skip == 1 else tm.final_layer_norm(hidden[-clip_skip])

        ids = input_ids.to(device=last.device, dtype=torch.int)  # argmax has no int64 kernel on some backends
        # Ids past the vocabulary (textual inversion) must not win the argmax rule: they count as 0, the id
        # A1111 gives an embedding's placeholders.
        ids = ids.masked_fill(ids >= tm.embeddings.token_embedding.num_embeddings, 0)
        if self.config.pooled_rule == "argmax":
            pos = ids.argmax(dim=-1)  # first maximum: the first EOS when padding with EOS
        else:
            pos = (ids == self.config.eos_token_id).int().argmax(dim=-1)
        pooled = last[torch.arange(last.shape[0], device=last.device), pos]  # (B, C)
        return CLIPTextOutput(chosen, pooled, tuple(hidden) if output_hidden_states else None)

    def set_extra_tokens(self, vectors: torch.Tensor | None) -> None:
        """Vectors ``(N, C)`` for the ids ``vocab_size .. vocab_size + N - 1`` (textual-inversion
        embeddings), or None. They are looked up like vocabulary rows but are not weights of the model."""
        if vectors is not None and (vectors.ndim != 2 or vectors.shape[1] != self.config.hidden_size):
            raise ValueError(f"extra token vectors must be (N, {self.config.hidden_size}), got {tuple(vectors.shape)}")
        self.text_model.embeddings.extra_tokens = vectors

    @property
    def extra_token_vectors(self) -> torch.Tensor | None:
        """The vectors :meth:`set_extra_tokens` gave (None when none)."""
        return self.text_model.embeddings.extra_tokens

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        c = self.config
        return f"width={c.hidden_size}, layers={c.num_hidden_layers}, heads={c.num_attention_heads}, act={c.hidden_act}"


class CLIPTextModelWithProjection(CLIPTextModel):
    """transformers' ``CLIPTextModelWithProjection``: the text tower plus ``text_projection`` (a Linear
    without bias) of the pooled output, which it returns as ``text_embeds``. SDXL's second text encoder
    (OpenCLIP ViT-bigG) is saved in this layout; its projected pooled vector conditions the U-Net."""

    def __init__(self, config: CLIPTextConfig = SDXL_G) -> None:
        super().__init__(config)
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        clip_skip: int = 1,
        output_hidden_states: bool = False,
        inputs_embeds: torch.Tensor | None = None,
    ) -> CLIPTextOutput:
        out = super().forward(
            input_ids,
            attention_mask,
            clip_skip=clip_skip,
            output_hidden_states=output_hidden_states,
            inputs_embeds=inputs_embeds,
        )
        out.text_embeds = self.text_projection(out.pooled)  # (B, P)
        return out


def add_projection_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """:func:`add_text_model_prefix` for a ``CLIPTextModelWithProjection`` dict: ``text_projection.weight``
    stays at the top level."""
    rest = {k: v for k, v in state_dict.items() if not k.startswith("text_projection.")}
    out = add_text_model_prefix(rest)
    out.update({k: v for k, v in state_dict.items() if k.startswith("text_projection.")})
    return out


__all__ = [
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "SDXL_G",
    "TINY_SDXL_G",
    "add_projection_prefix",
    "CLIPTextOutput",
    "PRESETS",
    "SD1",
    "SD2",
    "TINY_SD1",
    "TINY_SD2",
    "add_text_model_prefix",
    "quick_gelu",
]
