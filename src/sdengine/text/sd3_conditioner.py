"""Stable Diffusion 3 / 3.5's conditioning: two CLIP encoders and T5-XXL -> ``{"crossattn", "vector"}``.

SD3 (Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis", section
5.2 and figure 2) conditions its MMDiT on three text encoders:

* ``"crossattn"`` (B, 77 * k + 256, joint width): the penultimate hidden states (raw, without the final
  LayerNorm) of CLIP ViT-L (``clip_l``, 768 wide) and OpenCLIP ViT-bigG (``clip_g``, 1280 wide), concatenated
  feature-wise (2048) and zero-padded to T5's width (4096), followed along the tokens by T5-XXL's final
  states of the prompt (256 tokens: padded with T5's pad token, truncated with its end token kept, no
  attention mask, as diffusers' ``StableDiffusion3Pipeline`` runs it). A model loaded without T5 (the paper's
  "drop T5 at inference", diffusers' ``text_encoder_3=None``) gets 256 tokens of zeros in its place.
  The MMDiT's ``context_embedder`` reads this as its ``encoder_hidden_states``.
* ``"vector"`` (B, 768 + 1280): the two encoders' projected pooled outputs (``text_embeds``) concatenated:
  the MMDiT's ``pooled_projections``.

Prompts are read as for SD 1.x on the CLIP side (A1111 emphasis, ``BREAK``, 75-token chunks, each chunk its
own 77-token context, once per encoder); the pooled vectors are the first chunk's. T5 reads the same text with
the emphasis syntax taken out (``a (red:1.3) apple`` -> ``a red apple``; ``BREAK`` a space): its weights are
not applied to T5's states (said in a note), and T5's 256 tokens do not take chunks. For a plain prompt of at
most 75 CLIP tokens the result equals diffusers' ``encode_prompt``.

``clip_skip`` (sdengine's numbering, as for SDXL): 1 (default) = SD3's trained layer, the penultimate one of
both CLIP encoders; k reads ``hidden_states[-(k + 1)]``, which is diffusers' ``clip_skip = k - 1``. diffusers
applies its ``clip_skip`` to the prompt only and reads the negative prompt at the default layer; sdengine
applies it to both (the two halves of CFG then come from the same layer). T5 has no clip skip.

An empty negative prompt is encoded as the empty text (SD3 has no ``force_zeros_for_empty_prompt``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sdengine.errors import GenerationError

Conditioning = dict[str, Tensor]
Note = Callable[[str], None]

T5_LENGTH = 256  # diffusers' max_sequence_length default for SD3 (the length SD3 was trained with)


def _ignore(_: str) -> None:
    return None


def t5_text(prompt: str) -> tuple[str, bool]:
    """What T5 reads of an A1111 prompt: the text with ``<lora:...>`` tags and emphasis brackets taken out and
    ``BREAK`` as a space, and whether any weight other than 1 was dropped."""
    from sdengine.prompts import extract_lora_tags, parse_prompt_attention

    plain, _ = extract_lora_tags(prompt)
    pieces = parse_prompt_attention(plain)
    text = "".join(" " if (piece == "BREAK" and weight == -1.0) else piece for piece, weight in pieces)
    weighted = any(weight not in (1.0, -1.0) for _, weight in pieces)
    return text, weighted


class SD3Conditioner:
    """SD3's text side: CLIP-L and bigG (both with projections), T5-XXL (or None: zeros in its place).

    ``t5`` is called as ``t5(input_ids) -> (B, L, d_model)`` and ``t5_tokenizer`` as ``t5_tokenizer(texts,
    max_length) -> (ids, mask)`` (padded to ``max_length``, the end token kept when truncating)."""

    kind = "sd3"
    encoder_name = "SD3 CLIP-L, OpenCLIP-bigG and T5-XXL"

    def __init__(
        self,
        clip_l: Any,
        clip_g: Any,
        tokenizer_l: Any,
        tokenizer_g: Any,
        t5: Any | None,
        t5_tokenizer: Any | None,
        *,
        pad_token_id: int,
        pad_token_id_2: int,
        joint_attention_dim: int,
        pooled_projection_dim: int,
        t5_length: int = T5_LENGTH,
        dtype: torch.dtype,
        device: torch.device,
        name: str = "model",
    ) -> None:
        self.text_encoder = clip_l
        self.text_encoder_2 = clip_g
        self.tokenizer = tokenizer_l
        self.tokenizer_2 = tokenizer_g
        self.t5 = t5
        self.t5_tokenizer = t5_tokenizer
        self.pad_token_id = pad_token_id
        self.pad_token_id_2 = pad_token_id_2
        self.joint_dim = int(joint_attention_dim)
        self.t5_length = int(t5_length)
        self.edit_chunks = 1  # the CLIP chunks every prompt-editing text is padded to (see encode)
        self.dtype = dtype
        self.device = device
        self.name = name
        if (t5 is None) != (t5_tokenizer is None):
            raise GenerationError(f"{name}: T5 needs both its encoder and its tokenizer")
        clip_width = int(clip_l.config.hidden_size) + int(clip_g.config.hidden_size)
        if clip_width > self.joint_dim:
            raise GenerationError(
                f"{name}: the CLIP states are {clip_width} wide, wider than the MMDiT's joint width {self.joint_dim}"
            )
        pooled = int(clip_l.config.projection_dim) + int(clip_g.config.projection_dim)
        if pooled != int(pooled_projection_dim):
            raise GenerationError(
                f"{name}: the CLIP encoders' pooled outputs are {pooled} wide but the MMDiT takes "
                f"{pooled_projection_dim} (pooled_projection_dim)"
            )
        if t5 is not None:
            width = int(getattr(t5.config, "d_model", self.joint_dim))
            if width != self.joint_dim:
                raise GenerationError(
                    f"{name}: T5's states are {width} wide but the MMDiT's joint width is {self.joint_dim}"
                )

    # -- clip skip (as SDXL's) ----------------------------------------------------------------------------

    def a1111_clip_skip(self, clip_skip: int, *, sdxl_clip_l: bool = False) -> int:
        """A1111's clip skip here: 1, SD3's trained layers (A1111 applies its Clip skip to SD 1.x's CLIP only)."""
        return 1

    def check_clip_skip(self, clip_skip: Any) -> None:
        for encoder in (self.text_encoder, self.text_encoder_2):
            n = int(encoder.config.num_hidden_layers)
            if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 0 <= clip_skip <= n - 1:
                raise GenerationError(f"clip_skip must be an integer in 0..{n - 1} for SD3, got {clip_skip!r}")

    # -- text -------------------------------------------------------------------------------------------

    def _clip(self, encoder: Any, tokenizer: Any, pad: int, text: str, clip_skip: int) -> tuple[Tensor, Tensor]:
        """(states (1, 77 * k, D) with emphasis, projected pooled output of the first chunk (1, P)), as SDXL's."""
        from sdengine.text.sdxl_conditioner import encode_clip_chunks

        states, pooled = encode_clip_chunks(encoder, tokenizer, pad, text, clip_skip, "sd3")
        return states.float(), pooled.float()

    def clip_text(self, prompt: str, clip_skip: int = 1, chunks: int = 0) -> tuple[Tensor, Tensor]:
        """(CLIP states zero-padded to the joint width (1, 77 * k, joint), pooled (1, P_l + P_g)); at least
        ``chunks`` chunks (more are the empty prompt's, as A1111 pads a shorter side)."""
        z1, p1 = self._clip(self.text_encoder, self.tokenizer, self.pad_token_id, prompt, clip_skip)
        z2, p2 = self._clip(self.text_encoder_2, self.tokenizer_2, self.pad_token_id_2, prompt, clip_skip)
        z = torch.cat([z1, z2], dim=-1)
        if chunks * 77 > z.shape[1]:
            from sdengine.prompts import pad_to_length

            empty, _ = self.clip_text("", clip_skip)
            z = pad_to_length(z, chunks * 77, empty[..., : z.shape[-1]])
        return F.pad(z, (0, self.joint_dim - z.shape[-1])), torch.cat([p1, p2], dim=-1)

    def t5_states(self, prompt: str, note: Note = _ignore) -> Tensor:
        """T5's (1, 256, joint) states of the prompt's text (zeros without T5)."""
        t5, tokenizer = self.t5, self.t5_tokenizer
        if t5 is None or tokenizer is None:
            return torch.zeros(1, self.t5_length, self.joint_dim)
        from sdengine.text.encode_cache import cached_call

        text, weighted = t5_text(prompt)
        if weighted:
            note("T5 reads the prompt without its emphasis weights (they apply to the CLIP encoders only)")
        ids, _mask = tokenizer([text], self.t5_length)  # no mask: diffusers' SD3 attends to the padding
        ids = torch.as_tensor(ids, dtype=torch.long)
        if len(tokenizer.encode(text)) > self.t5_length:
            note(f"T5 reads the first {self.t5_length} tokens of the prompt; the rest is cut off (CLIP reads it all)")
        param = next(iter(t5.parameters()))
        ids = ids.to(param.device)
        states = cached_call(t5, ("t5", tuple(ids[0].tolist())), lambda: t5(ids))
        return states.float()

    def text(self, prompt: str, clip_skip: int = 1, chunks: int = 0, note: Note = _ignore) -> tuple[Tensor, Tensor]:
        """(crossattn (1, 77 * k + 256, joint), vector (1, P)) of one prompt, in float32."""
        clip, pooled = self.clip_text(prompt, clip_skip, chunks)
        return torch.cat([clip, self.t5_states(prompt, note).to(clip.device)], dim=1), pooled

    def chunk_count(self, prompt: str) -> int:
        """The 77-token chunks ``prompt`` takes on the CLIP side (the more of the two encoders')."""
        return self._chunk_count(prompt)

    def _chunk_count(self, prompt: str) -> int:
        from sdengine.prompts import prompt_chunks

        return max(
            len(prompt_chunks(self.tokenizer, prompt, pad_token_id=self.pad_token_id)),
            len(prompt_chunks(self.tokenizer_2, prompt, pad_token_id=self.pad_token_id_2)),
        )

    # -- the conditioner API ----------------------------------------------------------------------------

    def pair(
        self, prompt: str, negative: str, *, clip_skip: Any = 1, note: Note = _ignore
    ) -> tuple[Conditioning, Conditioning]:
        """(cond, uncond), their CLIP parts padded to one chunk count with the empty prompt's chunks."""
        self.check_clip_skip(clip_skip)
        chunks = max(self._chunk_count(prompt), self._chunk_count(negative))
        c, c_pooled = self.text(prompt, clip_skip, chunks, note)
        u, u_pooled = self.text(negative, clip_skip, chunks, note)
        cond = {"crossattn": c.to(self.dtype), "vector": c_pooled.to(self.dtype)}
        uncond = {"crossattn": u.to(self.dtype), "vector": u_pooled.to(self.dtype)}
        return cond, uncond

    def encode(self, text: str, *, what: str = "prompt", clip_skip: int = 1, note: Note = _ignore) -> Conditioning:
        """One text of a prompt-editing schedule: ``{"crossattn", "vector"}`` with the CLIP part padded to
        ``edit_chunks`` chunks (the most any text of the call has: the pipeline sets it), so that every text's
        states have one length and T5's tokens stay last (prompt editing would otherwise pad at the end)."""
        self.check_clip_skip(clip_skip)
        if self._chunk_count(text) > self.edit_chunks:
            raise GenerationError(
                f"{what}: a prompt-editing text of {self._chunk_count(text)} chunks, more than the "
                f"{self.edit_chunks} counted for this call"
            )
        z, pooled = self.text(text, clip_skip, self.edit_chunks, note)
        return {"crossattn": z.to(self.dtype), "vector": pooled.to(self.dtype)}

    def __call__(self, prompts: Sequence[str], *, clip_skip: int = 1) -> Conditioning:
        """One row per prompt (all of one chunk count)."""
        rows = [self.pair(p, "", clip_skip=clip_skip)[0] for p in prompts]
        length = max(r["crossattn"].shape[1] for r in rows)
        if any(r["crossattn"].shape[1] != length for r in rows):
            raise GenerationError("SD3 captions of different chunk counts cannot be batched")
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}

    def empty(self, n: int = 1) -> Conditioning:
        one = self([""])
        return {k: v.expand(n, *v.shape[1:]) for k, v in one.items()}


__all__ = ["T5_LENGTH", "SD3Conditioner", "t5_text"]
