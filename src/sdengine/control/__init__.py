"""ControlNet outside the sampler: control-map preprocessors (:mod:`.preprocess`) and ControlNet files
(:mod:`.files`). The controlled U-Net used while sampling is :mod:`sdengine.pipeline.control`; the
``--control`` flag is read in :mod:`sdengine.commands.generate`."""

from sdengine.control.files import (
    CONFIG_METADATA_KEY,
    WEIGHT_NAMES,
    LoadedControlNet,
    check_compatible,
    config_from_weights,
    controlnet_layout,
    family,
    load_controlnet,
    read_controlnet,
    save_controlnet,
)
from sdengine.control.preprocess import (
    NEEDS_A_MODEL,
    PREPROCESSORS,
    canny,
    canny_fractions,
    invert,
    load_control_image,
    option_names,
    preprocess,
    scribble,
    softedge,
    threshold,
    unknown_type_message,
)
from sdengine.errors import ControlNetError

__all__ = [
    "CONFIG_METADATA_KEY",
    "NEEDS_A_MODEL",
    "PREPROCESSORS",
    "WEIGHT_NAMES",
    "ControlNetError",
    "LoadedControlNet",
    "canny",
    "canny_fractions",
    "check_compatible",
    "config_from_weights",
    "controlnet_layout",
    "family",
    "invert",
    "load_control_image",
    "load_controlnet",
    "option_names",
    "preprocess",
    "read_controlnet",
    "save_controlnet",
    "scribble",
    "softedge",
    "threshold",
    "unknown_type_message",
]
