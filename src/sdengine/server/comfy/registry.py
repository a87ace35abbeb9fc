"""Every ComfyUI node the server offers, by class name.

The core nodes (loaders, text encoders, samplers, VAE, latents, images) live in ``nodes.py``; a family of
nodes that stands on its own gets a module of its own (``nodes_<family>.py``, importing the shared types from
``nodes.py``) and is added here, so that ``nodes.py`` does not grow without end and families do not collide.
"""

from __future__ import annotations

from sdengine.server.comfy.nodes import NODES as CORE_NODES
from sdengine.server.comfy.nodes import NodeDef
from sdengine.server.comfy.nodes_clip_vision import CLIP_VISION_NODES
from sdengine.server.comfy.nodes_edit import EDIT_NODES
from sdengine.server.comfy.nodes_files import FILE_NODES
from sdengine.server.comfy.nodes_flux2 import FLUX2_NODES
from sdengine.server.comfy.nodes_guidance import GUIDANCE_NODES
from sdengine.server.comfy.nodes_hypertile import HYPERTILE_NODES
from sdengine.server.comfy.nodes_image import IMAGE_NODES
from sdengine.server.comfy.nodes_ipadapter import IPADAPTER_NODES
from sdengine.server.comfy.nodes_latent import LATENT_NODES
from sdengine.server.comfy.nodes_lists import LIST_NODES
from sdengine.server.comfy.nodes_merge import NODES as MERGE_NODES
from sdengine.server.comfy.nodes_patches import PATCH_NODES
from sdengine.server.comfy.nodes_qwen import QWEN_NODES
from sdengine.server.comfy.nodes_redux import REDUX_NODES
from sdengine.server.comfy.nodes_sampling import NODES as SAMPLING_NODES
from sdengine.server.comfy.nodes_sd3_flux import SD3_FLUX_NODES
from sdengine.server.comfy.nodes_tools import TOOL_NODES
from sdengine.server.comfy.nodes_utility import UTILITY_NODES
from sdengine.server.comfy.nodes_z_image_control import Z_IMAGE_CONTROL_NODES

NODES: dict[str, NodeDef] = {
    **CORE_NODES,
    **IMAGE_NODES,
    **LATENT_NODES,
    **MERGE_NODES,
    **SAMPLING_NODES,
    **GUIDANCE_NODES,
    **FILE_NODES,
    **PATCH_NODES,
    **HYPERTILE_NODES,
    **UTILITY_NODES,
    **TOOL_NODES,
    **CLIP_VISION_NODES,
    **REDUX_NODES,
    **IPADAPTER_NODES,
    **EDIT_NODES,
    **SD3_FLUX_NODES,
    **QWEN_NODES,
    **Z_IMAGE_CONTROL_NODES,
    **FLUX2_NODES,
    **LIST_NODES,
}
