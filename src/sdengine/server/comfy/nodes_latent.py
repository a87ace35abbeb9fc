"""ComfyUI's latent arithmetic and transform nodes: add, subtract, multiply, interpolate, blend, batch, the batch's
seed behaviour, flip, rotate and crop.

Each follows the ComfyUI node of the same name (ComfyUI's ``comfy_extras/nodes_latent.py`` and the latent nodes of
its ``nodes.py``), written here from that description. A LATENT is sdengine's dict (see :mod:`nodes`): its
``samples`` may be None (an empty latent, made once the model is known); an operation on two latents makes the
empty one as zeros in the other's channels, and one on empty latents alone keeps them empty (their result is zeros).
The noise mask and ``batch_index`` of the first latent pass through as ComfyUI's dict copy passes them; a VAE
posterior follows the samples through flips, rotations and crops and is dropped where the samples are recomputed.
"""

from __future__ import annotations

from typing import Any

import torch

from sdengine.server.comfy.nodes import (
    SIDE_MAX,
    Input,
    NodeDef,
    NodeError,
    RunContext,
    composite_latents,
    repeat_to_batch,
    resize_nchw,
    with_samples,
)

ROTATIONS = ("none", "90 degrees", "180 degrees", "270 degrees")
FLIPS = ("x-axis: vertically", "y-axis: horizontally")
SEED_BEHAVIORS = ("random", "fixed")


def _out(base: dict[str, Any], z: torch.Tensor, f: int) -> dict[str, Any]:
    """``base`` with new samples ``z`` and the size they cover (``f`` pixels a latent pixel); no posterior."""
    out = with_samples(base, z)
    out["size"] = (z.shape[0], z.shape[2] * f, z.shape[3] * f)
    return out


def _reshaped_to(z: torch.Tensor, ref: torch.Tensor, method: str = "bilinear") -> torch.Tensor:
    """ComfyUI's reshape_latent_to: ``z`` scaled (centre cut to the aspect) to ``ref``'s latent size when it differs."""
    if tuple(z.shape[2:]) != tuple(ref.shape[2:]):
        z = resize_nchw(z, ref.shape[3], ref.shape[2], method, "center")
    return z


def latent_add(ctx: RunContext, samples1: dict[str, Any], samples2: dict[str, Any]) -> tuple[Any]:
    """ComfyUI's LatentAdd: samples1 + samples2 (samples2 scaled bilinearly to samples1's size and repeated / cut to
    its batch)."""
    pair = composite_latents(samples1, samples2, "LatentAdd")
    if pair is None:
        return (dict(samples1),)
    a, b, f = pair
    return (_out(samples1, a + repeat_to_batch(_reshaped_to(b, a), a.shape[0]), f),)


def latent_subtract(ctx: RunContext, samples1: dict[str, Any], samples2: dict[str, Any]) -> tuple[Any]:
    """ComfyUI's LatentSubtract: samples1 - samples2 (samples2 fitted to samples1 as LatentAdd's)."""
    pair = composite_latents(samples1, samples2, "LatentSubtract")
    if pair is None:
        return (dict(samples1),)
    a, b, f = pair
    return (_out(samples1, a - repeat_to_batch(_reshaped_to(b, a), a.shape[0]), f),)


def latent_multiply(ctx: RunContext, samples: dict[str, Any], multiplier: float) -> tuple[Any]:
    """ComfyUI's LatentMultiply: the samples times ``multiplier``."""
    z = samples.get("samples")
    if z is None:
        return (dict(samples),)
    f = max(1, samples["size"][1] // z.shape[2])
    return (_out(samples, z.float() * float(multiplier), f),)


def latent_interpolate(ctx: RunContext, samples1: dict[str, Any], samples2: dict[str, Any], ratio: float) -> tuple[Any]:
    """ComfyUI's LatentInterpolate: at each latent pixel the two channel vectors' directions mixed linearly by
    ``ratio`` (1: samples1) and renormalised, with the lengths mixed linearly; a zero vector has no direction
    (0). Each row takes its own lengths (ComfyUI's broadcasting of them is right for one row only: a batch of
    several fails there, or, with as many rows as channels, mixes the rows up)."""
    pair = composite_latents(samples1, samples2, "LatentInterpolate")
    if pair is None:
        return (dict(samples1),)
    a, b, f = pair
    b = repeat_to_batch(_reshaped_to(b, a), a.shape[0])
    r = float(ratio)
    m1 = torch.linalg.vector_norm(a, dim=1, keepdim=True)
    m2 = torch.linalg.vector_norm(b, dim=1, keepdim=True)
    t = torch.nan_to_num(a / m1) * r + torch.nan_to_num(b / m2) * (1.0 - r)
    mt = torch.linalg.vector_norm(t, dim=1, keepdim=True)
    return (_out(samples1, torch.nan_to_num(t / mt) * (m1 * r + m2 * (1.0 - r)), f),)


def latent_blend(
    ctx: RunContext, samples1: dict[str, Any], samples2: dict[str, Any], blend_factor: float
) -> tuple[Any]:
    """ComfyUI's LatentBlend: samples1 * blend_factor + samples2 * (1 - blend_factor), samples2 first scaled
    (bicubic, centre cut) to samples1's size; one row of samples2 serves every row of samples1."""
    pair = composite_latents(samples1, samples2, "LatentBlend")
    if pair is None:
        return (dict(samples1),)
    a, b, f = pair
    if b.shape[0] not in (1, a.shape[0]):
        raise NodeError(
            f"LatentBlend: samples2 has {b.shape[0]} rows and samples1 {a.shape[0]}; give the same batch, or one row"
        )
    b = _reshaped_to(b, a, "bicubic")
    k = float(blend_factor)
    return (_out(samples1, a * k + b * (1 - k), f),)


def latent_batch(ctx: RunContext, samples1: dict[str, Any], samples2: dict[str, Any]) -> tuple[Any]:
    """ComfyUI's LatentBatch: samples2's rows after samples1's (samples2 scaled bilinearly, centre cut, to samples1's
    size). Each row keeps its ``batch_index`` (a latent without one numbers its rows from 0), as ComfyUI: so two
    fresh latents batched get the same noise row for row under ComfyUI's seed rule."""
    n1, h1, w1 = samples1["size"]
    n2 = samples2["size"][0]
    ctx.check_size(w1, h1, n1 + n2)
    index = list(samples1.get("batch_index") or range(n1)) + list(samples2.get("batch_index") or range(n2))
    pair = composite_latents(samples1, samples2, "LatentBatch")
    if pair is None:
        out = {**samples1, "size": (n1 + n2, h1, w1), "posterior": None}
        out.pop("posterior_scaled", None)
    else:
        a, b, f = pair
        out = _out(samples1, torch.cat([a, _reshaped_to(b, a)]), f)
    mask = out.get("noise_mask")
    if mask is not None and mask.shape[0] > 1:  # as ComfyUI's sampler fits it: its rows repeated to the batch
        out["noise_mask"] = repeat_to_batch(mask, n1 + n2)
    out["batch_index"] = index
    return (out,)


def latent_batch_seed_behavior(ctx: RunContext, samples: dict[str, Any], seed_behavior: str) -> tuple[Any]:
    """ComfyUI's LatentBatchSeedBehavior: "fixed" gives every row the noise of the batch's first row (its
    ``batch_index``, else row 0), "random" forgets the rows' indices (the batch draws its noise as a new one)."""
    out = dict(samples)
    if seed_behavior == "random":
        out.pop("batch_index", None)
    elif seed_behavior == "fixed":
        first = (samples.get("batch_index") or [0])[0]
        out["batch_index"] = [first] * samples["size"][0]
    else:
        raise NodeError(f"LatentBatchSeedBehavior: unknown seed_behavior {seed_behavior!r}")
    return (out,)


def _transformed(samples: dict[str, Any], fn: Any, size: tuple[int, int, int]) -> dict[str, Any]:
    """``samples`` with ``fn`` applied to its samples and VAE posterior alike, covering ``size``."""
    out = dict(samples)
    z = samples.get("samples")
    post = samples.get("posterior")
    if z is not None:
        out["samples"] = fn(z)
    if post is not None:
        out["posterior"] = tuple(fn(t) for t in post)
    out["size"] = size
    return out


def latent_flip(ctx: RunContext, samples: dict[str, Any], flip_method: str) -> tuple[Any]:
    """ComfyUI's LatentFlip: "x-axis" flips top to bottom, "y-axis" left to right (the noise mask stays as it is,
    as ComfyUI's)."""
    dim = 2 if flip_method.startswith("x") else 3
    return (_transformed(samples, lambda t: torch.flip(t, dims=[dim]), tuple(samples["size"])),)


def latent_rotate(ctx: RunContext, samples: dict[str, Any], rotation: str) -> tuple[Any]:
    """ComfyUI's LatentRotate: quarter turns clockwise (the noise mask stays as it is, as ComfyUI's)."""
    k = ROTATIONS.index(rotation)
    b, h, w = samples["size"]
    size = (b, w, h) if k % 2 else (b, h, w)
    return (_transformed(samples, lambda t: torch.rot90(t, k=k, dims=[3, 2]).contiguous(), size),)


def latent_crop(ctx: RunContext, samples: dict[str, Any], width: int, height: int, x: int, y: int) -> tuple[Any]:
    """ComfyUI's LatentCrop: the box at pixel (x, y) of ``width`` x ``height``, all floored to latent pixels; x and
    y at most 64 pixels before the right and bottom edges (ComfyUI's minimum size); cut to the latent. An empty
    latent is cut at ComfyUI's factor 8. The noise mask stays as it is, as ComfyUI's."""
    b, h, w = samples["size"]
    z = samples.get("samples")
    f = 8 if z is None else max(1, h // z.shape[2])
    hl, wl = (h // f, w // f) if z is None else (z.shape[2], z.shape[3])
    least = max(1, 64 // f)
    xl = max(0, min(int(x) // f, wl - least))
    yl = max(0, min(int(y) // f, hl - least))
    x1, y1 = min(wl, xl + int(width) // f), min(hl, yl + int(height) // f)
    if x1 <= xl or y1 <= yl:
        raise NodeError(f"LatentCrop: a {width}x{height} box is under one latent pixel of {f} pixels")
    size = (b, (y1 - yl) * f, (x1 - xl) * f)
    return (_transformed(samples, lambda t: t[:, :, yl:y1, xl:x1].contiguous(), size),)


# ------------------------------------------------------------------------------------------------ table


LATENT_NODES: dict[str, NodeDef] = {
    n.name: n
    for n in (
        NodeDef(
            "LatentAdd",
            "LatentAdd",
            "latent/advanced",
            (Input("samples1", "LATENT"), Input("samples2", "LATENT")),
            ("LATENT",),
            latent_add,
            description="samples1 + samples2 (samples2 scaled to samples1's size and repeated to its batch).",
        ),
        NodeDef(
            "LatentSubtract",
            "LatentSubtract",
            "latent/advanced",
            (Input("samples1", "LATENT"), Input("samples2", "LATENT")),
            ("LATENT",),
            latent_subtract,
            description="samples1 - samples2 (samples2 scaled to samples1's size and repeated to its batch).",
        ),
        NodeDef(
            "LatentMultiply",
            "LatentMultiply",
            "latent/advanced",
            (Input("samples", "LATENT"), Input("multiplier", "FLOAT", 1.0, -10.0, 10.0, 0.01)),
            ("LATENT",),
            latent_multiply,
        ),
        NodeDef(
            "LatentInterpolate",
            "LatentInterpolate",
            "latent/advanced",
            (Input("samples1", "LATENT"), Input("samples2", "LATENT"), Input("ratio", "FLOAT", 1.0, 0.0, 1.0, 0.01)),
            ("LATENT",),
            latent_interpolate,
            description="Per latent pixel, the channel vectors' directions and lengths mixed by `ratio` (1: "
            "samples1), as ComfyUI; each row of a batch takes its own lengths.",
        ),
        NodeDef(
            "LatentBlend",
            "Latent Blend",
            "_for_testing",
            (Input("samples1", "LATENT"), Input("samples2", "LATENT"), Input("blend_factor", "FLOAT", 0.5, 0, 1, 0.01)),
            ("LATENT",),
            latent_blend,
            description="samples1 * blend_factor + samples2 * (1 - blend_factor), samples2 scaled (bicubic) to "
            "samples1's size, as ComfyUI.",
        ),
        NodeDef(
            "LatentBatch",
            "LatentBatch",
            "latent/batch",
            (Input("samples1", "LATENT"), Input("samples2", "LATENT")),
            ("LATENT",),
            latent_batch,
            description="samples2's rows after samples1's; each row keeps its batch index (rows of a fresh latent "
            "count from 0), so under ComfyUI's seed rule two fresh latents batched share their noise row for row, "
            "as in ComfyUI.",
        ),
        NodeDef(
            "LatentBatchSeedBehavior",
            "LatentBatchSeedBehavior",
            "latent/advanced",
            (Input("samples", "LATENT"), Input("seed_behavior", "COMBO", "fixed", choices=SEED_BEHAVIORS)),
            ("LATENT",),
            latent_batch_seed_behavior,
            description="fixed: every row gets the noise of the first row; random: the rows' batch indices are "
            "dropped. It acts under ComfyUI's seed rule (under extra_data's `sdengine` rule row i has seed + i).",
        ),
        NodeDef(
            "LatentFlip",
            "Flip Latent",
            "latent/transform",
            (Input("samples", "LATENT"), Input("flip_method", "COMBO", choices=FLIPS)),
            ("LATENT",),
            latent_flip,
        ),
        NodeDef(
            "LatentRotate",
            "Rotate Latent",
            "latent/transform",
            (Input("samples", "LATENT"), Input("rotation", "COMBO", choices=ROTATIONS)),
            ("LATENT",),
            latent_rotate,
            description="Quarter turns clockwise, as ComfyUI (the noise mask is not turned, as in ComfyUI).",
        ),
        NodeDef(
            "LatentCrop",
            "Crop Latent",
            "latent/transform",
            (
                Input("samples", "LATENT"),
                Input("width", "INT", 512, 64, SIDE_MAX, 8),
                Input("height", "INT", 512, 64, SIDE_MAX, 8),
                Input("x", "INT", 0, 0, SIDE_MAX, 8),
                Input("y", "INT", 0, 0, SIDE_MAX, 8),
            ),
            ("LATENT",),
            latent_crop,
            description="The box at (x, y) floored to latent pixels, x and y at most 64 pixels before the edges, "
            "as ComfyUI (the noise mask is not cut, as in ComfyUI).",
        ),
    )
}
