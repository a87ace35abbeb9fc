"""The last line of defence against a black PNG: latents and images are checked for NaN/inf before use.

Bounded inputs (cfg, prompt and LoRA weights) stop most runaway values up front; what still overflows
(a model whose weights are broken, a combination of large but allowed values) is caught here and refused
with :class:`~sdengine.errors.NonFiniteError`, so no file is written from it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sdengine.errors import NonFiniteError

HINT = "lower --cfg, the prompt's (word:weight) values or the LoRA weights, or check the model's files"


def require_finite(values: Tensor, what: str) -> Tensor:
    """``values`` unchanged when every element is finite, else a NonFiniteError naming ``what`` and the
    share of bad values (one reduction over the tensor; no copy is kept)."""
    finite = torch.isfinite(values)
    if bool(finite.all()):
        return values
    bad = int((~finite).sum())
    raise NonFiniteError(
        f"the {what} went non-finite ({bad} of {values.numel()} values are NaN/inf): no image was written; {HINT}"
    )


__all__ = ["HINT", "require_finite"]
