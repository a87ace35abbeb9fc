"""SDXL's conditioning: two CLIP text encoders and micro-conditioning -> ``{"crossattn", "vector"}``.

* ``"crossattn"`` (B, 77 * k, 768 + 1280): the penultimate hidden states (raw, without the final
  LayerNorm) of CLIP ViT-L (``text_encoder``) and OpenCLIP ViT-bigG (``text_encoder_2``), concatenated
  feature-wise. The refiner has only the second encoder (width 1280).
* ``"vector"``: bigG's projected pooled output (of the first chunk) followed by sinusoidal features of the
  size/crop numbers (base: original_size, crops_coords_top_left, target_size; refiner: original_size,
  crops_coords_top_left, aesthetic_score), see :func:`sdengine.models.unet_sdxl.text_time_vector`.

Prompts are read as for SD 1.x (A1111 emphasis, ``BREAK``, 75-token chunks, each chunk its own 77-token
context), once per encoder; ``prompt_2`` / ``negative_prompt_2`` (default: the same text) go to the
second encoder of the base model. The refiner's one encoder reads the prompt itself (as diffusers and A1111
do); a ``prompt_2`` given to a refiner is said to be unused. Emphasis is applied per encoder and chunk (A1111
wraps each encoder on its own). A side with fewer chunks is padded with the empty prompt's chunk, so the two
encoders and cond/uncond line up.

``clip_skip`` (sdengine's own numbering, counted as A1111 counts SD 1.x layers): 1 (default) = SDXL's trained
layer, the penultimate one of both encoders; k reads ``hidden_states[-(k + 1)]`` of both, which is diffusers'
``clip_skip = k - 1``; 0 reads the last layer's output, raw (what ComfyUI's CLIPSetLastLayer -1 gives an SDXL
model). A1111 itself ignores its "Clip skip" for SDXL (``FrozenCLIPEmbedderForSDXLWithCustomWords`` and
``FrozenOpenCLIPEmbedder2WithCustomWords`` read their trained layers) unless its ``sdxl_clip_l_skip`` option is
on: a request with ``clip_skip_rule="a1111"`` gets 1 here (:meth:`SDXLConditioner.a1111_clip_skip`); with
``"a1111_sdxl_clip_l"`` (that option on) a (CLIP-L, bigG) pair, CLIP-L reading ``hidden_states[-clip_skip]``.

``force_zeros_for_empty_prompt`` (the base model's setting): an empty negative prompt (and empty
negative_prompt_2) gives all-zero text states and pooled vector, as diffusers does for
``negative_prompt=None`` and A1111 for an empty negative prompt; the size numbers are kept. The refiner's
folder sets it to false (diffusers); A1111 zeroes an empty negative on every SDXL model, the refiner too
(``force_zero_negative_prompt`` in its sd_models_xl.py): the request's ``sdxl`` setting
``force_zeros_for_empty_prompt`` (true/false) replaces the folder's rule, and the A1111 routes set it.

Defaults of the numbers (diffusers' and A1111's): original_size = target_size = (height, width) of the
image, crops (0, 0), the negative ones equal to the positive ones (the refiner's negative crops: (0, 0), as
diffusers' img2img pipeline has them), aesthetic_score 6.0 and negative_aesthetic_score 2.5. The base model
has no aesthetic score and the refiner no target size: such a setting given to the other model is said to be
unused (a note), never silently dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sdengine.errors import GenerationError
from sdengine.models.unet_sdxl import text_time_vector, time_id_count

Conditioning = dict[str, Tensor]
Note = Callable[[str], None]
Size = tuple[int, int]


def _ignore(_: str) -> None:
    return None


@dataclass(frozen=True)
class SDXLOptions:
    """SDXL-only settings of a request (``GenerationRequest.sdxl``). Sizes are (height, width) in pixels,
    as diffusers takes them; None = the default described in the module docstring."""

    prompt_2: str | None = None
    negative_prompt_2: str | None = None
    original_size: Size | None = None
    crops_coords_top_left: Size = (0, 0)
    target_size: Size | None = None
    negative_original_size: Size | None = None
    negative_crops_coords_top_left: Size | None = None
    negative_target_size: Size | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    # None: the model folder's ``force_zeros_for_empty_prompt`` (true for the base, false for the refiner);
    # true/false: that rule for this request, on every model it runs (A1111 zeroes an empty negative prompt on
    # the base and the refiner alike: its routes set true)
    force_zeros_for_empty_prompt: bool | None = None

    @classmethod
    def coerce(cls, value: SDXLOptions | Mapping[str, Any] | None) -> SDXLOptions:
        """From a request's ``sdxl`` dict (JSON lists for sizes are fine); bad values raise GenerationError."""
        if value is None:
            return cls()
        if isinstance(value, SDXLOptions):
            return value
        if not isinstance(value, Mapping):
            raise GenerationError(f"sdxl settings must be a mapping, got {type(value).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise GenerationError(f"unknown sdxl settings: {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        kw: dict[str, Any] = {}
        for k, v in value.items():
            if v is None:
                continue
            if k.startswith("prompt") or k.startswith("negative_prompt"):
                if not isinstance(v, str):
                    raise GenerationError(f"sdxl {k} must be a string, got {type(v).__name__}")
                kw[k] = v
            elif k == "force_zeros_for_empty_prompt":
                if not isinstance(v, bool):
                    raise GenerationError(f"sdxl {k} must be true or false, got {v!r}")
                kw[k] = v
            elif k.endswith("score"):
                if isinstance(v, bool) or not isinstance(v, int | float) or not -1e4 <= v <= 1e4:
                    raise GenerationError(f"sdxl {k} must be a number, got {v!r}")
                kw[k] = float(v)
            else:
                kw[k] = _pair(k, v, allow_zero="crops" in k)
        return cls(**kw)

    def changed(self) -> dict[str, Any]:
        """The settings that differ from the defaults, JSON-ready (sizes as [height, width] lists): what the
        infotext's "SDXL options" field holds, and what :meth:`coerce` reads back."""
        default = SDXLOptions()
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v != getattr(default, f.name):
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


def _pair(name: str, v: Any, *, allow_zero: bool) -> Size:
    lo = 0 if allow_zero else 1
    if (
        not isinstance(v, list | tuple)
        or len(v) != 2
        or not all(isinstance(x, int) and not isinstance(x, bool) and lo <= x <= 65536 for x in v)
    ):
        raise GenerationError(f"sdxl {name} must be two integers (height, width) in {lo}..65536, got {v!r}")
    return (int(v[0]), int(v[1]))


class SDXLConditioner:
    """SDXL base (two encoders) or refiner (``text_encoder`` None: bigG only)."""

    kind = "sdxl"

    def __init__(
        self,
        text_encoder: Any | None,
        text_encoder_2: Any,
        tokenizer: Any,
        tokenizer_2: Any,
        *,
        pad_token_id: int,
        pad_token_id_2: int,
        unet_config: Any,
        force_zeros_for_empty_prompt: bool,
        dtype: torch.dtype,
        device: torch.device,
        name: str = "model",
    ) -> None:
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.pad_token_id = pad_token_id
        self.pad_token_id_2 = pad_token_id_2
        self.unet_config = unet_config
        self.force_zeros = force_zeros_for_empty_prompt
        self.dtype = dtype
        self.device = device
        self.name = name
        self.pooled_dim = int(text_encoder_2.config.projection_dim)
        self.n_time_ids = time_id_count(unet_config, self.pooled_dim)
        if self.n_time_ids not in (5, 6):
            raise GenerationError(
                f"{name}: the U-Net's added conditioning holds {self.n_time_ids} numbers; SDXL has 6 (base) or 5 "
                "(refiner)"
            )
        width = int(text_encoder_2.config.hidden_size) + (
            int(text_encoder.config.hidden_size) if text_encoder is not None else 0
        )
        if width != unet_config.cross_attention_dim:
            raise GenerationError(
                f"{name}: text states of width {width} but the U-Net cross-attends to {unet_config.cross_attention_dim}"
            )

    @property
    def refiner(self) -> bool:
        """The refiner's conditioning (aesthetic score instead of the target size)."""
        return self.n_time_ids == 5

    encoder_name = "SDXL CLIP-L and OpenCLIP-bigG"

    def a1111_clip_skip(self, clip_skip: int, *, sdxl_clip_l: bool = False) -> int | tuple[int, int]:
        """A1111's clip skip in this numbering: 1 (its trained layers), as A1111 ignores
        ``CLIP_stop_at_last_layers`` for SDXL with its ``sdxl_clip_l_skip`` option off (the default). With it on
        (``sdxl_clip_l``) A1111's CLIP-L reads ``hidden_states[-clip_skip]``, raw: the pair (clip_skip - 1, 1)
        for (CLIP-L, bigG); the refiner has no CLIP-L."""
        if sdxl_clip_l and self.text_encoder is not None:
            n = int(self.text_encoder.config.num_hidden_layers)
            if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 1 <= clip_skip <= n:
                # said in A1111's numbering, not as the (CLIP-L, bigG) pair it becomes
                raise GenerationError(
                    f"clip_skip must be an integer in 1..{n} for SDXL's CLIP-L under clip_skip_rule "
                    f"a1111_sdxl_clip_l (A1111's Clip skip with sdxl_clip_l_skip on), got {clip_skip!r}"
                )
            return (clip_skip - 1, 1)
        return 1

    def _per_encoder(self, clip_skip: Any) -> tuple[Any, Any]:
        """(CLIP-L's, bigG's) clip_skip: a pair as given, or one number for both."""
        if isinstance(clip_skip, tuple) and len(clip_skip) == 2:
            return clip_skip[0], clip_skip[1]
        return clip_skip, clip_skip

    def check_clip_skip(self, clip_skip: Any) -> None:
        for encoder, skip in zip((self.text_encoder, self.text_encoder_2), self._per_encoder(clip_skip), strict=True):
            if encoder is None:
                continue
            n = int(encoder.config.num_hidden_layers)
            if isinstance(skip, bool) or not isinstance(skip, int) or not 0 <= skip <= n - 1:
                raise GenerationError(f"clip_skip must be an integer in 0..{n - 1} for SDXL, got {clip_skip!r}")

    # -- text -------------------------------------------------------------------------------------------

    def _encode(self, encoder: Any, tokenizer: Any, pad: int, text: str, clip_skip: int) -> tuple[Tensor, Tensor]:
        """(states (1, 77 * k, D), pooled output of the first chunk (1, P) or (1, D))."""
        return encode_clip_chunks(encoder, tokenizer, pad, text, clip_skip, "sdxl")

    def text(self, prompt: str, prompt_2: str, clip_skip: Any = 1) -> tuple[Tensor, Tensor]:
        """(crossattn (1, 77 * k, C), pooled bigG (1, P)) of one prompt pair, in float32. The refiner's one
        encoder reads ``prompt`` (``prompt_2`` is the base model's second encoder's). ``clip_skip``: one number
        for both encoders, or a (CLIP-L, bigG) pair."""
        skip_l, skip_g = self._per_encoder(clip_skip)
        if self.text_encoder is None:
            return self._encode(self.text_encoder_2, self.tokenizer_2, self.pad_token_id_2, prompt, skip_g)
        z2, pooled = self._encode(self.text_encoder_2, self.tokenizer_2, self.pad_token_id_2, prompt_2, skip_g)
        z1, _ = self._encode(self.text_encoder, self.tokenizer, self.pad_token_id, prompt, skip_l)
        if z1.shape[1] != z2.shape[1]:  # prompt and prompt_2 of different chunk counts
            length = max(z1.shape[1], z2.shape[1])
            z1 = self._pad(z1, length, self.text_encoder, self.tokenizer, self.pad_token_id, skip_l)
            z2 = self._pad(z2, length, self.text_encoder_2, self.tokenizer_2, self.pad_token_id_2, skip_g)
        return torch.cat([z1, z2], dim=-1), pooled

    def _pad(self, z: Tensor, length: int, encoder: Any, tokenizer: Any, pad: int, clip_skip: int) -> Tensor:
        from sdengine.prompts import pad_to_length

        if z.shape[1] == length:
            return z
        empty, _ = self._encode(encoder, tokenizer, pad, "", clip_skip)
        return pad_to_length(z, length, empty)

    def _pad_both(self, z: Tensor, length: int, clip_skip: Any, zeros: bool) -> Tensor:
        """Pad combined states with the empty prompt's (or zero) chunks."""
        from sdengine.prompts import pad_to_length

        if z.shape[1] == length:
            return z
        empty, _ = self.text("", "", clip_skip)
        return pad_to_length(z, length, torch.zeros_like(empty) if zeros else empty)

    # -- numbers ----------------------------------------------------------------------------------------

    def time_ids(self, opts: SDXLOptions, width: int, height: int) -> tuple[Tensor, Tensor]:
        """(cond, uncond) size/crop/score numbers, each (1, 6) or (1, 5), in diffusers' order."""
        original = opts.original_size or (height, width)
        target = opts.target_size or (height, width)
        crops = opts.crops_coords_top_left
        n_original = opts.negative_original_size or original
        n_crops = opts.negative_crops_coords_top_left or ((0, 0) if self.refiner else crops)
        n_target = opts.negative_target_size or target
        if self.refiner:
            pos = [*original, *crops, opts.aesthetic_score]
            neg = [*n_original, *n_crops, opts.negative_aesthetic_score]
        else:
            pos = [*original, *crops, *target]
            neg = [*n_original, *n_crops, *n_target]
        return torch.tensor([pos], dtype=torch.float32), torch.tensor([neg], dtype=torch.float32)

    def size_vectors(self, pooled: Tensor, width: int, height: int) -> tuple[Tensor, Tensor]:
        """The ``vector`` of a prompt's pooled text with the default size numbers of a ``width`` x ``height`` image,
        as a positive and as a negative prompt: what ComfyUI's samplers give a plain CLIPTextEncode (the latent's
        size), where the pipeline's :meth:`pair` knows the size when it encodes."""
        ids, neg_ids = self.time_ids(SDXLOptions(), width, height)
        return self._vector(pooled, ids).to(self.dtype), self._vector(pooled, neg_ids).to(self.dtype)

    def vector_of(self, pooled: Tensor, numbers: Sequence[float]) -> Tensor:
        """The ``vector`` of pooled text (1, P) and explicit size/crop/score numbers in diffusers' order (base:
        original h, w, crop top, left, target h, w; refiner: original h, w, crop top, left, aesthetic score), in
        the model's dtype: what ComfyUI's CLIPTextEncodeSDXL / CLIPTextEncodeSDXLRefiner give the U-Net."""
        if len(numbers) != self.n_time_ids:
            raise GenerationError(f"{self.name} takes {self.n_time_ids} size/crop/score numbers, got {len(numbers)}")
        ids = torch.tensor([[float(n) for n in numbers]], dtype=torch.float32)
        return self._vector(pooled, ids).to(self.dtype)

    def _vector(self, pooled: Tensor, ids: Tensor) -> Tensor:
        return text_time_vector(pooled.float(), ids.to(pooled.device), self.unet_config)

    # -- the conditioner API ----------------------------------------------------------------------------

    def pair(
        self,
        prompt: str,
        negative: str,
        *,
        clip_skip: Any = 1,
        note: Note = _ignore,
        width: int | None = None,
        height: int | None = None,
        options: SDXLOptions | Mapping[str, Any] | None = None,
        note_unused: bool = True,
    ) -> tuple[Conditioning, Conditioning]:
        """(cond, uncond) for an image of ``width`` x ``height`` (default: the U-Net's training size).
        ``note_unused`` False: settings this model has no use for are not noted (a base -> refiner hand-off, where
        the other model uses them)."""
        self.check_clip_skip(clip_skip)
        opts = SDXLOptions.coerce(options)
        size = int(self.unet_config.sample_size) * 8
        width, height = width or size, height or size
        if note_unused:
            self._note_unused(opts, note)
        prompt_2 = prompt if opts.prompt_2 is None else opts.prompt_2
        negative_2 = negative if opts.negative_prompt_2 is None else opts.negative_prompt_2
        c, c_pooled = self.text(prompt, prompt_2, clip_skip)
        force = self.force_zeros if opts.force_zeros_for_empty_prompt is None else opts.force_zeros_for_empty_prompt
        zeros = force and negative == "" and negative_2 == ""
        if zeros:
            u, u_pooled = torch.zeros_like(c[:, :77]), torch.zeros_like(c_pooled)
        else:
            u, u_pooled = self.text(negative, negative_2, clip_skip)
        length = max(c.shape[1], u.shape[1])
        c = self._pad_both(c, length, clip_skip, zeros=False)
        u = self._pad_both(u, length, clip_skip, zeros=zeros)
        ids, neg_ids = self.time_ids(opts, width, height)
        cond = {"crossattn": c.to(self.dtype), "vector": self._vector(c_pooled, ids).to(self.dtype)}
        uncond = {"crossattn": u.to(self.dtype), "vector": self._vector(u_pooled, neg_ids).to(self.dtype)}
        return cond, uncond

    def unused_settings(self, options: SDXLOptions | Mapping[str, Any] | None) -> list[str]:
        """The given settings this model has no use for (module docstring)."""
        opts, default = SDXLOptions.coerce(options), SDXLOptions()
        if self.refiner:
            unused = ["prompt_2", "negative_prompt_2", "target_size", "negative_target_size"]
        else:
            unused = ["aesthetic_score", "negative_aesthetic_score"]
        return [k for k in unused if getattr(opts, k) != getattr(default, k)]

    def _note_unused(self, opts: SDXLOptions, note: Note) -> None:
        given = self.unused_settings(opts)
        if given:
            refiner = "a refiner (one text encoder, no target size)"
            which = refiner if self.refiner else "a base model (no aesthetic score)"
            note(f"sdxl {', '.join(given)}: not used by {which}")

    def encode(self, text: str, *, what: str = "prompt", clip_skip: int = 1, note: Any = None) -> Conditioning:
        """Prompt editing encodes each scheduled text alone; SDXL's conditioning also carries the image size and
        the second prompt, which that path does not thread through yet: refused rather than half right."""
        raise GenerationError("prompt editing ([a:b:when], [a|b]) is not supported for SDXL yet")

    def __call__(self, prompts: Any, *, clip_skip: int = 1) -> Conditioning:
        """One row per prompt at the training size (what a trainer's captions need)."""
        rows = [self.pair(p, "", clip_skip=clip_skip)[0] for p in prompts]
        length = max(r["crossattn"].shape[1] for r in rows)
        if any(r["crossattn"].shape[1] != length for r in rows):
            raise GenerationError("SDXL captions of different chunk counts cannot be batched")
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}

    def empty(self, n: int = 1) -> Conditioning:
        one = self([""])
        return {k: v.expand(n, *v.shape[1:]) for k, v in one.items()}


def encode_clip_chunks(
    encoder: Any, tokenizer: Any, pad: int, text: str, clip_skip: int, family: str
) -> tuple[Tensor, Tensor]:
    """One CLIP encoder's reading of ``text`` as SDXL and SD3 use it: (states (1, 77 * k, D) of
    ``hidden_states[-(clip_skip + 1)]`` (raw, no final LayerNorm) with A1111 emphasis per 75-token chunk, pooled
    output of the first chunk (1, P): the projected ``text_embeds`` when the encoder has a projection, else
    ``pooled``). ``family`` keys the encoder-output cache."""
    from sdengine.cuda_graphs import through
    from sdengine.prompts import apply_emphasis, extra_tokens_key, prompt_chunks
    from sdengine.text.encode_cache import cached_call

    chunks = prompt_chunks(tokenizer, text, pad_token_id=pad)
    param = next(iter(encoder.parameters()))
    ids = torch.tensor([c.ids for c in chunks], dtype=torch.long, device=param.device)  # (k, 77)

    def run() -> tuple[Tensor, Tensor]:
        out = through(encoder)(ids, output_hidden_states=True)  # its CUDA graphs, when recorded
        pooled = out.text_embeds if getattr(out, "text_embeds", None) is not None else out.pooled
        return out.hidden_states[-(clip_skip + 1)], pooled  # states (k, 77, D): raw, no final LayerNorm

    key = (family, tuple(tuple(c.ids) for c in chunks), clip_skip, extra_tokens_key(encoder, chunks))
    states, pooled = cached_call(encoder, key, run)
    parts = []
    for i, chunk in enumerate(chunks):
        z = states[i : i + 1]
        if any(w != 1.0 for w in chunk.weights):
            z = apply_emphasis(z, torch.tensor([chunk.weights], dtype=torch.float32, device=z.device))
        parts.append(z)
    return torch.cat(parts, dim=1), pooled[:1]


__all__ = ["encode_clip_chunks", "SDXLConditioner", "SDXLOptions"]
