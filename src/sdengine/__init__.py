"""sdengine: diffusion image generation written from scratch in PyTorch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from sdengine.pipeline import Cancelled, GenerationRequest, GenerationResult, Pipeline, load_pipeline

__all__ = ["Cancelled", "GenerationRequest", "GenerationResult", "Pipeline", "__version__", "load_pipeline"]


def __getattr__(name: str) -> Any:
    # Lazy: `import sdengine` stays cheap (no torch) until the pipeline is used.
    if name in ("load_pipeline", "Pipeline", "GenerationRequest", "GenerationResult", "Cancelled"):
        from sdengine import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'sdengine' has no attribute {name!r}")
