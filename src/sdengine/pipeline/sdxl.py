"""SDXL behind the same pipeline: two text encoders and size micro-conditioning.

Everything after the conditioning dict is :class:`sdengine.pipeline.core.Pipeline`'s (samplers, img2img,
VAE decode with its fp32 fall-back, seeds, infotext); what differs is where the conditioning comes from
(:class:`sdengine.text.sdxl_conditioner.SDXLConditioner`, which needs the image size) and the request's
``sdxl`` settings (``prompt_2``, ``negative_prompt_2``, sizes, crops, aesthetic score).
"""

from __future__ import annotations

from typing import Any

import torch

from sdengine.pipeline.core import Pipeline, Prepared
from sdengine.pipeline.request import GenerationRequest
from sdengine.text.conditioners import Conditioning
from sdengine.text.sdxl_conditioner import SDXLConditioner, SDXLOptions


class SDXLPipeline(Pipeline):
    """SDXL base or refiner. Build it with :func:`sdengine.pipeline.load_pipeline` on an SDXL folder."""

    def __init__(
        self,
        *,
        text_encoder_2: torch.nn.Module,
        tokenizer_2: Any,
        pad_token_id_2: int,
        force_zeros_for_empty_prompt: bool,
        **kwargs: Any,
    ) -> None:
        self.text_encoder_2 = text_encoder_2.eval().requires_grad_(False)
        self.tokenizer_2 = tokenizer_2
        te = kwargs.get("text_encoder")
        conditioner = SDXLConditioner(
            te.eval().requires_grad_(False) if te is not None else None,
            self.text_encoder_2,
            kwargs.get("tokenizer"),
            tokenizer_2,
            pad_token_id=kwargs["pad_token_id"],
            pad_token_id_2=pad_token_id_2,
            unet_config=kwargs["unet"].config,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            dtype=kwargs["dtype"],
            device=kwargs["device"],
            name=kwargs.get("name", "model"),
        )
        super().__init__(conditioner=conditioner, **kwargs)

    @property
    def refiner(self) -> bool:
        """True for the refiner (bigG only, aesthetic-score conditioning)."""
        return bool(getattr(self.conditioner, "refiner", False))

    @property
    def pooled_dim(self) -> int | None:
        return None  # the vector is not a caption's pooled embedding alone (see unet_text_kwargs of Pipeline)

    def prepare(self, request: GenerationRequest) -> Prepared:
        SDXLOptions.coerce(request.sdxl)  # bad settings are refused before any model runs
        return super().prepare(request)

    def conditioning_pair(
        self, prompt: str, negative: str, p: Prepared, note: Any
    ) -> tuple[Conditioning, Conditioning]:
        cond: SDXLConditioner = self.conditioner  # type: ignore[assignment]
        return cond.pair(
            prompt,
            negative,
            clip_skip=p.request.clip_skip,
            note=note,
            width=p.width,
            height=p.height,
            options=p.request.sdxl,
        )


__all__ = ["SDXLPipeline"]
