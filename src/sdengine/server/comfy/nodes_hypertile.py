"""ComfyUI's ``HyperTile`` node (its ``comfy_extras/nodes_hypertile.py``, read for facts): the model's U-Net
self-attention within tiles (:mod:`sdengine.nn.hypertile`, rule ``"comfyui"``).

Inputs as ComfyUI's: ``tile_size`` (pixels, 256; the smallest tile is ``max(32, tile_size) // 8`` latent cells),
``swap_size`` (2: how many tile counts a side draws from), ``max_depth`` (0: the first level only), ``scale_depth``
(false: the same smallest tile at every depth). The layers are those at the resolution levels ``0..max_depth``.

Where sdengine differs (docs/CONTRACTS.md): the tile counts are drawn from a ``random.Random`` seeded with the
sampler's seed (ComfyUI draws them from torch's global generator, whose state depends on what ran before); the
queries, keys and values are tiled together (ComfyUI's node tiles the queries only); the tiles are rectangles of the
true grid where ComfyUI reads a non-square grid transposed.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from sdengine.nn.hypertile import MAX_DEPTH, MAX_SWAP_SIZE, MAX_TILE_SIZE, HyperTile
from sdengine.server.comfy.nodes import Input, ModelHandle, NodeDef, NodeError, RunContext


def hypertile(
    ctx: RunContext, model: ModelHandle, tile_size: int, swap_size: int, max_depth: int, scale_depth: bool
) -> tuple[Any]:
    """ComfyUI's HyperTile: the model with HyperTile's settings (rule "comfyui"); a sampler runs them."""
    if not isinstance(scale_depth, bool):
        raise NodeError(f"scale_depth must be true or false, got {scale_depth!r}")
    settings = HyperTile(int(tile_size), int(swap_size), int(max_depth), rule="comfyui", scale_depth=scale_depth)
    return (replace(model, hypertile=settings.key),)


HYPERTILE_NODES: dict[str, NodeDef] = {
    n.name: n
    for n in (
        NodeDef(
            "HyperTile",
            "HyperTile",
            "model_patches/unet",
            (
                Input("model", "MODEL"),
                Input("tile_size", "INT", 256, 1, MAX_TILE_SIZE, 1),
                Input("swap_size", "INT", 2, 1, MAX_SWAP_SIZE, 1),
                Input("max_depth", "INT", 0, 0, MAX_DEPTH, 1),
                Input("scale_depth", "BOOLEAN", False),
            ),
            ("MODEL",),
            hypertile,
            description="HyperTile (tfernd): the U-Net's self-attention within tiles of the feature map, the tile "
            "counts drawn from the sampler's seed; queries, keys and values tiled together.",
        ),
    )
}
