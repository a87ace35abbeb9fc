"""ControlNet outside the sampler: control-map preprocessors (:mod:`.preprocess`), ControlNet files
(:mod:`.files`) and T2I-Adapter files (:mod:`.adapter_files`, with ``load_control_model``, which reads either).
The controlled U-Net used while sampling is :mod:`sdengine.pipeline.control`; the ``--control`` flag is read
in :mod:`sdengine.commands.generate`."""

from sdengine.control.adapter_files import (
    LoadedAdapter,
    check_adapter_compatible,
    is_adapter_state,
    load_control_model,
    load_t2i_adapter,
    read_control,
    save_t2i_adapter,
)
from sdengine.control.adapter_files import config_from_weights as adapter_config_from_weights
from sdengine.control.control_lora import is_control_lora
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
    "LoadedAdapter",
    "LoadedControlNet",
    "adapter_config_from_weights",
    "check_adapter_compatible",
    "is_adapter_state",
    "is_control_lora",
    "load_control_model",
    "load_t2i_adapter",
    "read_control",
    "save_t2i_adapter",
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
