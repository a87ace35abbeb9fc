"""Qwen-Image ControlNets on sdengine's ComfyUI route: InstantX's Union and Inpainting ControlNets
(:mod:`sdengine.models.qwen_controlnet`) as ComfyUI runs them (ControlNetLoader, ControlNetApplyAdvanced with its
vae, ControlNetInpaintingAliMamaApply; read from ComfyUI's ``comfy/controlnet.py`` ``load_controlnet_qwen_instantx``
and ``ControlNet.get_control``, ``comfy/ldm/qwen_image/controlnet.py`` and ``comfy/ldm/qwen_image/model.py``).

ComfyUI's rules, where they differ from diffusers' ``QwenImageControlNetPipeline`` (the Python pipeline's,
:class:`sdengine.pipeline.dit_control.ControlledQwen`):

* **Every CFG row** runs the ControlNet with its own text (ComfyUI's ``get_control`` is called per conditioning with
  its ``c_crossattn``); diffusers runs it once per step on the prompt and the unconditional rows reuse those
  residuals.
* **Which base block takes which residual**: ComfyUI's ControlNet repeats each of its ``m`` residuals
  ``ceil(60 / m)`` times and keeps the first 60 (its ``main_model_double``); base block ``i`` adds entry ``i``
  (blocks past 60 none). On the 60-block Qwen-Image this is diffusers' ``i // ceil(60 / m)``; on a transformer of
  another depth it is not, and ComfyUI's rule is followed.
* **The window** is ComfyUI's sigma window (start_percent / end_percent through the model's
  ``percent_to_sigma``), judged at every model call.
* **Positions**: an odd grid of patches is centred as ComfyUI centres it, in the ControlNet as in the transformer.

The same as diffusers': the hint resized to the output size (ComfyUI: nearest-exact, centre crop), encoded by the
VAE (the posterior's mean) and normalised by Wan 2.1's latent format (ComfyUI's ``Wan21`` ``process_in``:
``(z - mean) / std``, the Qwen VAE's ``latents_mean`` / ``latents_std``), strength multiplying the residuals, the
timestep and text the transformer's. The inpainting ControlNet's mask rides after the latent as its 17th channel
(1 = keep; ComfyUI's ``concat_mask``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from sdengine.server.comfy.nodes import NodeError

COMFY_MAIN_BLOCKS = 60  # ComfyUI's QwenImageControlNetModel.main_model_double


def comfy_block_samples(residuals: Sequence[torch.Tensor], blocks: int) -> list[torch.Tensor]:
    """The residual each of the transformer's ``blocks`` blocks adds, by ComfyUI's rule (module docstring): one
    entry per block (zeros past the 60th), so the transformer's own rule (``i // ceil(n / n)``) reads entry ``i``."""
    m = len(residuals)
    if m < 1:
        raise NodeError("a Qwen-Image ControlNet gave no residuals")
    repeat = math.ceil(COMFY_MAIN_BLOCKS / m)
    seq = [r for r in residuals for _ in range(repeat)][:COMFY_MAIN_BLOCKS]
    if blocks <= len(seq):
        return seq[:blocks]
    return seq + [torch.zeros_like(residuals[0])] * (blocks - len(seq))


class ComfyControlledQwen:
    """``model(x, t, text, text_mask, *, rope_centre, step)``: the Qwen-Image transformer with the active units'
    residuals by ComfyUI's rules (module docstring); ``units``: :class:`sdengine.pipeline.dit_control.PreparedDiTUnit`
    of :func:`~sdengine.pipeline.dit_control.build_controlled_dit`, ``windows``: each unit's (low, high) sigmas,
    ``sigmas``: the run's (for a call without its step's sigma)."""

    takes_step = True

    def __init__(
        self, base: Any, units: Sequence[Any], windows: Sequence[tuple[float, float]], sigmas: torch.Tensor
    ) -> None:
        self.base = base
        self.units = list(units)
        self.windows = list(windows)
        self.sigmas = sigmas
        for unit in self.units:
            if int(unit.latent.shape[0]) != 1:
                raise NodeError("a Qwen-Image ControlNet takes one hint image here (a batch of hints is not supported)")

    def _sigma(self, step: Any) -> float:
        s = getattr(step, "sigma", None)
        if s is not None:
            return float(s)
        index = int(getattr(step, "index", 0 if step is None else step))
        return float(self.sigmas[min(index, len(self.sigmas) - 1)])

    def __call__(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        *,
        rope_centre: str = "comfyui",
        step: Any = None,
    ) -> torch.Tensor:
        b = int(x.shape[0])
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(b) if t.ndim == 0 else t
        s = self._sigma(step)
        total: list[torch.Tensor] | None = None
        for unit, (low, high) in zip(self.units, self.windows, strict=True):
            if not low <= s <= high:
                continue
            net = unit.net
            dt = net.dtype
            maps = unit.latent.to(device=x.device, dtype=dt).expand(b, -1, -1, -1)
            got = net(x.to(dt), maps, t, text.to(dt), text_mask, conditioning_scale=unit.scale,
                      rope_centre=rope_centre)  # fmt: skip
            if total is not None and len(total) != len(got):
                raise NodeError(
                    f"Qwen-Image ControlNets of {len(total)} and {len(got)} blocks: several must have as many blocks"
                )
            total = got if total is None else [a + c for a, c in zip(total, got, strict=True)]
        kw: dict[str, Any] = {}
        if total is not None:
            kw["controlnet_block_samples"] = comfy_block_samples(total, len(self.base.transformer_blocks))
        return self.base(x, t, text, text_mask, rope_centre=rope_centre, **kw)


class ComfyQwenControlAdapter:
    """:class:`sdengine.server.comfy.nodes_qwen.ComfyQwenAdapter` for a :class:`ComfyControlledQwen`: the sampler's
    step handed on (for the sigma windows)."""

    takes_step = True
    takes_row_kinds = False

    def __init__(self, net: ComfyControlledQwen, dtype: torch.dtype) -> None:
        self.net = net
        self.dtype = dtype

    def __call__(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        *,
        crossattn: torch.Tensor,
        text_mask: Any = None,
        step: Any = None,
        **other: Any,
    ) -> torch.Tensor:
        extra = sorted(k for k, v in other.items() if v is not None)
        if extra:
            raise NodeError(f"the Qwen-Image transformer with a ControlNet takes no {', '.join(extra)}")
        mask = None if text_mask is None else text_mask.to(x.device)
        states = crossattn.to(device=x.device, dtype=self.dtype)
        return self.net(x.to(self.dtype), t, states, mask, rope_centre="comfyui", step=step).float()


__all__ = ["COMFY_MAIN_BLOCKS", "ComfyControlledQwen", "ComfyQwenControlAdapter", "comfy_block_samples"]
