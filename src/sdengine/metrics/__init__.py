"""Metrics: a Fashion-MNIST feature classifier and the Frechet distance on its features.

Names are resolved lazily so that ``python -m sdengine.metrics.classifier`` (the training entry
point) does not import the module twice (runpy warns when the package already imported it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sdengine.metrics.classifier import FashionClassifier, features, load_classifier, predict
    from sdengine.metrics.frechet import (
        class_accuracy,
        fd_fmnist,
        feature_stats,
        frechet_distance,
        frechet_distance_features,
    )

_WHERE = {
    "FashionClassifier": "classifier",
    "features": "classifier",
    "load_classifier": "classifier",
    "predict": "classifier",
    "class_accuracy": "frechet",
    "fd_fmnist": "frechet",
    "feature_stats": "frechet",
    "frechet_distance": "frechet",
    "frechet_distance_features": "frechet",
}

__all__ = [
    "FashionClassifier",
    "class_accuracy",
    "fd_fmnist",
    "feature_stats",
    "features",
    "frechet_distance",
    "frechet_distance_features",
    "load_classifier",
    "predict",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"sdengine.metrics.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'sdengine.metrics' has no attribute {name!r}")
