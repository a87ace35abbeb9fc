"""Flux.1's conditioning: CLIP-L's pooled output, T5-XXL's states and the distilled guidance scale.

FLUX.1 [dev] and [schnell] (Black Forest Labs 2024) read the prompt twice:

* ``"crossattn"`` (B, 512, 4096): T5-XXL's last hidden states (after its final RMS norm) of the prompt,
  padded with T5's pad token to ``max_sequence_length`` tokens (512 by default, diffusers' ``FluxPipeline``
  default; BFL's schnell reference runs 256) and truncated with the end token kept, no attention mask: the
  transformer's ``encoder_hidden_states``;
* ``"vector"`` (B, 768): CLIP ViT-L's *pooled* output (the final LayerNorm's state at the end token; not the
  projected ``text_embeds``) of the prompt truncated to 77 tokens: the transformer's ``pooled_projections``;
* ``"guidance"`` (B,) float32, [dev] only: the *distilled* guidance scale (3.5 typical). [dev] was distilled
  from a model run with classifier-free guidance (Meng et al. 2023, "On Distillation of Guided Diffusion
  Models"): the scale is an input of the network (an embedding added to the timestep's), and one pass per step
  gives the guided prediction. :class:`sdengine.pipeline.flux.FluxAdapter` hands it to the transformer as its
  ``guidance``. Forge calls it "Distilled CFG Scale" (its infotext name, which sdengine writes).

These are diffusers' ``FluxPipeline.encode_prompt`` (``_get_clip_prompt_embeds``: ``pooler_output`` of the
77-token CLIP ids; ``_get_t5_prompt_embeds``: ``max_length`` padding and truncation). The prompt's A1111 syntax
is taken out first, as for SD3's T5 (:func:`sdengine.text.sd3_conditioner.t5_text`): ``<lora:...>`` tags,
emphasis brackets (the weights are not applied: a note says so), and ``BREAK`` reads as a space; a plain prompt
is read as diffusers reads it.

Flux has no negative prompt of its own: at ``cfg_scale`` 1 (the default for Flux) there is one pass per step
and the negative prompt is not encoded. ``cfg_scale`` above 1 runs classifier-free guidance on top of the
distilled guidance (diffusers' ``true_cfg_scale`` with a ``negative_prompt``): two passes, the negative's
conditioning with the same guidance entry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from sdengine.errors import GenerationError
from sdengine.text.sd3_conditioner import t5_text

Conditioning = dict[str, Tensor]
Note = Callable[[str], None]

T5_LENGTH = 512  # diffusers' FluxPipeline max_sequence_length default
CLIP_LENGTH = 77
GUIDANCE_KEY = "guidance"  # the conditioning entry of the distilled guidance scale (FLUX.1 [dev])


def _ignore(_: str) -> None:
    return None


class FluxConditioner:
    """Flux's text side: CLIP-L (``clip_l``, a CLIPTextModel) and T5-XXL (``t5``).

    ``t5`` is called as ``t5(input_ids) -> (B, L, d_model)``, ``t5_tokenizer`` as ``t5_tokenizer(texts,
    max_length) -> (ids, mask)`` (padded to ``max_length``, the end token kept when truncating) and
    ``tokenizer`` (CLIP's) as ``tokenizer(texts, pad_token_id, max_length) -> ids``.
    ``guidance``: whether the transformer takes the distilled guidance scale (FLUX.1 [dev])."""

    kind = "flux"
    encoder_name = "Flux CLIP-L and T5-XXL"

    def __init__(
        self,
        clip_l: Any,
        tokenizer: Any,
        t5: Any,
        t5_tokenizer: Any,
        *,
        pad_token_id: int,
        joint_attention_dim: int,
        pooled_projection_dim: int,
        guidance: bool,
        max_sequence_length: int = T5_LENGTH,
        dtype: torch.dtype,
        device: torch.device,
        name: str = "model",
    ) -> None:
        self.text_encoder = clip_l
        self.tokenizer = tokenizer
        self.t5 = t5
        self.t5_tokenizer = t5_tokenizer
        self.pad_token_id = int(pad_token_id)
        self.guidance = bool(guidance)
        self.max_sequence_length = int(max_sequence_length)
        self.dtype = dtype
        self.device = device
        self.name = name
        # the distilled guidance of the generation call under way ([dev]; the pipeline sets it for the call), which
        # encode() adds to each text's conditioning: prompt editing encodes its texts one by one
        self.call_guidance: float | None = None
        width = int(clip_l.config.hidden_size)
        if width != int(pooled_projection_dim):
            raise GenerationError(
                f"{name}: CLIP-L's pooled output is {width} wide but the Flux transformer takes "
                f"{pooled_projection_dim} (pooled_projection_dim): not this model's CLIP-L"
            )
        t5_width = int(getattr(t5.config, "d_model", joint_attention_dim))
        if t5_width != int(joint_attention_dim):
            raise GenerationError(
                f"{name}: T5's states are {t5_width} wide but the Flux transformer takes {joint_attention_dim} "
                "(joint_attention_dim): not this model's T5"
            )

    # -- clip skip: Flux reads CLIP's pooled output only ----------------------------------------------------

    def a1111_clip_skip(self, clip_skip: int, *, sdxl_clip_l: bool = False) -> int:
        """A1111's clip skip here: 1 (it applies to SD 1.x's CLIP only; Flux reads CLIP's pooled output)."""
        return 1

    def check_clip_skip(self, clip_skip: Any) -> None:
        if clip_skip != 1 or isinstance(clip_skip, bool):
            raise GenerationError(
                f"clip_skip {clip_skip!r} does not apply to Flux (it reads CLIP-L's pooled output, after the last "
                "layer): leave it at 1"
            )

    # -- text -------------------------------------------------------------------------------------------

    def clip_pooled(self, text: str) -> Tensor:
        """CLIP-L's pooled output (1, 768) of ``text`` truncated to 77 tokens, float32."""
        from sdengine.cuda_graphs import through
        from sdengine.text.encode_cache import cached_call

        encoder = self.text_encoder
        param = next(iter(encoder.parameters()))
        ids = self.tokenizer([text], self.pad_token_id, CLIP_LENGTH).to(param.device)
        key = ("flux_pooled", tuple(ids[0].tolist()))
        pooled = cached_call(encoder, key, lambda: through(encoder)(ids).pooled)
        return pooled.float()

    def t5_states(self, text: str) -> Tensor:
        """T5's (1, max_sequence_length, 4096) last hidden states of ``text``, float32."""
        from sdengine.text.encode_cache import cached_call

        ids, _mask = self.t5_tokenizer([text], self.max_sequence_length)
        param = next(iter(self.t5.parameters()))
        ids = torch.as_tensor(ids, dtype=torch.long).to(param.device)
        states = cached_call(self.t5, ("flux_t5", tuple(ids[0].tolist())), lambda: self.t5(ids))
        return states.float()

    def _cut_notes(self, text: str, note: Note) -> None:
        """Say which encoder loses the prompt's tail (diffusers logs the same as a warning)."""
        n_clip = len(self.tokenizer.encode(text))
        if n_clip > CLIP_LENGTH - 2:
            note(f"CLIP-L reads the first {CLIP_LENGTH - 2} tokens of the prompt for Flux's pooled vector")
        if len(self.t5_tokenizer.encode(text)) > self.max_sequence_length:  # its pieces and the end token
            note(f"T5 reads the first {self.max_sequence_length} tokens of the prompt; the rest is cut off")

    def text(self, prompt: str, *, what: str = "prompt", note: Note = _ignore) -> Conditioning:
        """``{"crossattn", "vector"}`` of one prompt in the model's dtype (no guidance entry)."""
        text, weighted = t5_text(prompt)
        if weighted:
            note(f"Flux reads the {what} without its emphasis weights ((word:1.2) is read as 'word')")
        self._cut_notes(text, note)
        return {"crossattn": self.t5_states(text).to(self.dtype), "vector": self.clip_pooled(text).to(self.dtype)}

    def with_guidance(self, cond: Conditioning, guidance: float | None) -> Conditioning:
        """``cond`` with the distilled guidance entry for a [dev] model (one value per row); [schnell] takes
        none, and a guidance given to it is refused."""
        rows = int(cond["crossattn"].shape[0])
        if not self.guidance:
            if guidance is not None:
                raise GenerationError(
                    f"{self.name} takes no distilled guidance (FLUX.1 [schnell]: no guidance embedding); drop it"
                )
            return cond
        if guidance is None:
            raise GenerationError(f"{self.name} is guidance-distilled (FLUX.1 [dev]): give its guidance scale")
        return {**cond, GUIDANCE_KEY: torch.full((rows,), float(guidance), dtype=torch.float32)}

    # -- the conditioner API ----------------------------------------------------------------------------

    def pair(
        self,
        prompt: str,
        negative: str,
        *,
        clip_skip: Any = 1,
        note: Note = _ignore,
        guidance: float | None = None,
    ) -> tuple[Conditioning, Conditioning]:
        """(cond, uncond) of a prompt and a negative prompt, each with the guidance entry ([dev])."""
        self.check_clip_skip(clip_skip)
        cond = self.with_guidance(self.text(prompt, note=note), guidance)
        uncond = self.with_guidance(self.text(negative, what="negative prompt", note=note), guidance)
        return cond, uncond

    def encode(self, text: str, *, what: str = "prompt", clip_skip: int = 1, note: Note | None = None) -> Conditioning:
        """One text's conditioning (prompt editing's texts, each encoded once, switched per step), with the
        guidance entry of the call under way (:attr:`call_guidance`, set by the pipeline)."""
        self.check_clip_skip(clip_skip)
        if self.guidance and self.call_guidance is None:
            raise GenerationError(f"{self.name}: encode() outside a generation call has no distilled guidance")
        return self.with_guidance(self.text(text, what=what, note=note or _ignore), self.call_guidance)

    def __call__(self, prompts: Sequence[str], *, clip_skip: int = 1, guidance: float | None = None) -> Conditioning:
        """One row per prompt (all of one length: T5's ``max_sequence_length``)."""
        rows = [self.with_guidance(self.text(p), guidance) for p in prompts]
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}

    def empty(self, n: int = 1, *, guidance: float | None = None) -> Conditioning:
        one = self([""], guidance=guidance)
        return {k: v.expand(n, *v.shape[1:]) for k, v in one.items()}


__all__ = ["CLIP_LENGTH", "GUIDANCE_KEY", "T5_LENGTH", "FluxConditioner"]
