"""Weight files: safe reading/writing (io), LDM <-> diffusers name tables (keymaps), architecture detection
(detect), loading/conversion of whole checkpoints (loading), and A1111's checkpoint merging (merge)."""

from .detect import UnsupportedModelError, read_prediction_type
from .io import (
    CorruptFileError,
    UnsafeCheckpointError,
    WeightsError,
    load_file,
    load_safetensors,
    save_safetensors,
)
from .loading import (
    LoadedCheckpoint,
    MissingVAEError,
    build_models,
    build_on_meta,
    convert,
    load_checkpoint,
    load_into,
    load_vae,
)
from .merge import MergeError, merge_checkpoints

__all__ = [
    "CorruptFileError",
    "LoadedCheckpoint",
    "MergeError",
    "MissingVAEError",
    "UnsafeCheckpointError",
    "UnsupportedModelError",
    "WeightsError",
    "build_models",
    "build_on_meta",
    "convert",
    "load_checkpoint",
    "load_file",
    "load_into",
    "load_safetensors",
    "load_vae",
    "merge_checkpoints",
    "read_prediction_type",
    "save_safetensors",
]
