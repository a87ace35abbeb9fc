"""The pixel DDPM (fashion-mnist) behind the pipeline's call: the prompt is a class name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sdengine.diffusion import sampling
from sdengine.diffusion.samplers import SamplingInterrupted
from sdengine.errors import GenerationError
from sdengine.io.images import to_uint8
from sdengine.pipeline.core import as_request
from sdengine.pipeline.finite import require_finite
from sdengine.pipeline.infotext import format_infotext
from sdengine.pipeline.request import GenerationRequest
from sdengine.pipeline.result import Cancelled, GenerationResult, StepInfo


class PixelPipeline:
    """A class-conditional pixel DDPM behind the pipeline's call: ``prompt`` names the class (any case);
    an empty prompt samples unconditionally where the model has a null class. No VAE, no text."""

    def __init__(self, model: Any, name: str) -> None:
        self.model = model
        self.name = name

    @classmethod
    def load(cls, name_or_path: str | Path, device: torch.device) -> PixelPipeline:
        from sdengine.ddpm import PixelDDPM

        return cls(PixelDDPM.load(name_or_path, device=device), Path(str(name_or_path)).name)

    def _label(self, prompt: str) -> int | None:
        names = self.model.class_names or []
        text = prompt.strip().lower()
        if not text:
            if self.model.null_class is None and names:
                raise GenerationError(f"{self.name} needs a class name as its prompt: {', '.join(names)}")
            return None
        for i, n in enumerate(names):
            if text == n.lower():
                return i
        raise GenerationError(f"{self.name}: unknown class {prompt!r}; classes: {', '.join(names)}")

    # The pixel model's own defaults where they differ from a Stable Diffusion request's.
    DEFAULTS: dict[str, Any] = {"schedule": "normal", "cfg_scale": 1.0}
    SUPPORTED = (
        "prompt",
        "negative_prompt",
        "steps",
        "sampler",
        "schedule",
        "cfg_scale",
        "seed",
        "width",
        "height",
        "batch_size",
        "callback",
        "progress",
    )

    def __call__(self, prompt: Any = "", negative_prompt: Any = None, **kwargs: Any) -> GenerationResult:
        """Same call as :class:`sdengine.pipeline.Pipeline` (a request, or its fields; lists of class names
        and seeds make one row each); settings a pixel DDPM has no use for are refused by name."""
        if not isinstance(prompt, GenerationRequest):
            kwargs = {**{k: v for k, v in self.DEFAULTS.items() if k not in kwargs}, **kwargs}
        r = as_request(prompt, negative_prompt, kwargs)
        defaults = GenerationRequest.defaults()
        given = [
            k
            for k in GenerationRequest.field_names()
            if k not in self.SUPPORTED
            and (v := getattr(r, k)) is not None
            and v is not False
            and v != []
            and v != ()
            and v != defaults[k]
        ]
        if given:
            raise GenerationError(f"{self.name} is a pixel DDPM: it does not take {', '.join(sorted(given))}")
        size = self.model.image_size - 2 * self.model.crop
        for what, v in (("width", r.width), ("height", r.height)):
            if v is not None and v != size:
                raise GenerationError(f"{self.name} makes {size}x{size} images; {what} {v} is not possible")
        if any(r.negative_prompts()):
            raise GenerationError(f"{self.name} has no text encoder: a negative prompt cannot be used")
        r.replace(init_image=None).validate()
        prompts, seeds, steps = r.prompts(), r.seeds(), int(r.steps)
        labels = [self._label(t) for t in prompts]
        if any(lb is None for lb in labels) and any(lb is not None for lb in labels):
            raise GenerationError(f"{self.name}: a batch cannot mix class names and empty prompts")
        callback = r.callback

        def on_step(i: int, sigma: float, x: Tensor, denoised: Tensor) -> bool | None:
            if callback is not None:
                return callback(StepInfo(i + 1, steps, float(sigma), x, denoised))
            return None

        try:
            x = self.model.generate(
                None if labels[0] is None else labels,
                n=len(seeds),
                sampler=r.sampler,
                steps=steps,
                schedule=r.schedule or "normal",
                seeds=seeds,
                guidance_scale=r.cfg_scale,
                callback=on_step,
            )
        except SamplingInterrupted as e:
            raise Cancelled(e.step + 1, steps) from None
        arr = require_finite(x, "sampled image").permute(0, 2, 3, 1).float().numpy()
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        images = [Image.fromarray(a) for a in to_uint8(arr)]
        name, sched = sampling.resolve(r.sampler, r.schedule)
        rows = [
            {
                "prompt": t,
                "negative_prompt": "",
                "steps": steps,
                "sampler": name,
                "schedule": sched,
                "cfg_scale": float(r.cfg_scale),
                "seed": s,
                "width": size,
                "height": size,
                "model": self.name,
            }
            for t, s in zip(prompts, seeds, strict=True)
        ]
        return GenerationResult(
            images,
            arr.astype(np.float32),
            rows[0],
            seeds,
            [format_infotext(p) for p in rows],
            rows=[{"prompt": p["prompt"], "negative_prompt": "", "seed": p["seed"]} for p in rows],
        )


__all__ = ["PixelPipeline"]
