"""ComfyUI's list nodes (``comfy_extras/nodes_rebatch.py``): RebatchLatents and RebatchImages.

Both are INPUT_IS_LIST nodes with an OUTPUT_IS_LIST output (see ``graph.Executor`` for the list semantics): they
take every batch of their input list at once, lay the rows end to end and cut them into batches of ``batch_size``;
each batch of the output list then runs the nodes downstream once (a KSampler per batch, a SaveImage per batch).
Written here from ComfyUI's description of the nodes.

RebatchLatents keeps each row's noise: a latent without ``batch_index`` numbers its rows by their place in the
whole list (rows 2 and 3 of a batch of 4 rebatched by 2 keep indices [2, 3], so under ComfyUI's seed rule a
KSampler on that batch draws the noise those rows have in the whole batch); a latent with one keeps it. Its noise
mask follows the rows (a latent without one counts as all ones, a mask of fewer rows is repeated to the batch), and
a batch whose mask is all ones has none, as ComfyUI. A new pixel size (ComfyUI compares the latents' last two
dimensions) closes the batch being filled: the rows before it go out as a batch of their own.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from sdengine.server.comfy.nodes import Input, NodeDef, NodeError, RunContext, composite_latents, repeat_to_batch


def _batch_size(value: Any) -> int:
    size = int(value[0]) if isinstance(value, list) else int(value)
    if size < 1:
        raise NodeError(f"batch_size must be at least 1, got {size}")
    return size


def _mask_of(latent: dict[str, Any]) -> torch.Tensor | None:
    """The latent's noise mask as (rows, 1, h, w), one per row (fewer rows repeated), or None (all ones)."""
    mask = latent.get("noise_mask")
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.ndim < 2:
        raise NodeError("RebatchLatents: a latent's noise_mask is not a mask")
    m = mask.float().reshape(-1, 1, mask.shape[-2], mask.shape[-1])
    return repeat_to_batch(m, latent["size"][0])


def _join_masks(a: torch.Tensor | None, na: int, b: torch.Tensor | None, nb: int) -> torch.Tensor | None:
    """Two runs of rows' masks end to end (a missing one as ones at the other's size; the second resized to the
    first's size when they differ)."""
    if a is None and b is None:
        return None
    ref = a if a is not None else b
    assert ref is not None
    h, w = ref.shape[-2], ref.shape[-1]
    a = torch.ones(na, 1, h, w) if a is None else a
    b = torch.ones(nb, 1, h, w) if b is None else b
    if b.shape[-2:] != a.shape[-2:]:
        b = F.interpolate(b, size=(h, w), mode="bilinear")
    return torch.cat([a, b])


class _Run:
    """Rows of the same pixel size laid end to end: the latent, its per-row mask (None: ones), its batch indices."""

    def __init__(self, latent: dict[str, Any], mask: torch.Tensor | None, index: list[int]) -> None:
        self.latent, self.mask, self.index = latent, mask, index

    @property
    def rows(self) -> int:
        return int(self.latent["size"][0])

    def pixel_size(self) -> tuple[int, int]:
        return int(self.latent["size"][1]), int(self.latent["size"][2])

    def join(self, other: _Run) -> _Run:
        n1, n2 = self.rows, other.rows
        _, h, w = self.latent["size"]
        out = {**self.latent, "size": (n1 + n2, h, w)}
        pair = composite_latents(self.latent, other.latent, "RebatchLatents")
        out["samples"] = None if pair is None else torch.cat([pair[0], pair[1]])
        p1, p2 = self.latent.get("posterior"), other.latent.get("posterior")
        same_units = bool(self.latent.get("posterior_scaled")) == bool(other.latent.get("posterior_scaled"))
        if p1 is not None and p2 is not None and same_units and pair is not None:
            out["posterior"] = tuple(
                torch.cat([repeat_to_batch(x, n1), repeat_to_batch(y, n2)]) for x, y in zip(p1, p2, strict=True)
            )
        else:
            out["posterior"] = None
            out.pop("posterior_scaled", None)
        return _Run(out, _join_masks(self.mask, n1, other.mask, n2), self.index + other.index)

    def cut(self, start: int, stop: int) -> dict[str, Any]:
        """Rows ``start:stop`` as a latent of their own (ComfyUI drops a mask of all ones)."""
        z = self.latent.get("samples")
        post = self.latent.get("posterior")
        _, h, w = self.latent["size"]
        out = {
            **self.latent,
            "samples": None if z is None else z[start:stop],
            "size": (stop - start, h, w),
            "posterior": None
            if post is None
            else tuple(t if t.shape[0] == 1 else repeat_to_batch(t, self.rows)[start:stop] for t in post),
            "batch_index": self.index[start:stop],
        }
        mask = None if self.mask is None else self.mask[start:stop]
        if mask is None or float(mask.mean()) == 1.0:
            out.pop("noise_mask", None)
        else:
            out["noise_mask"] = mask
        return out


def rebatch_latents(ctx: RunContext, latents: list[dict[str, Any]], batch_size: Any) -> tuple[Any]:
    """ComfyUI's RebatchLatents: the list's rows in batches of ``batch_size`` (a new pixel size starts a new batch;
    each row keeps its batch index and noise mask)."""
    size = _batch_size(batch_size)
    out: list[dict[str, Any]] = []
    current: _Run | None = None
    seen = 0
    for latent in latents:
        if not isinstance(latent, dict) or "size" not in latent:
            raise NodeError("RebatchLatents: an element of the list is not a latent")
        n = int(latent["size"][0])
        index = latent.get("batch_index")
        index = list(index) if index is not None else list(range(seen, seen + n))
        if len(index) != n:
            raise NodeError(f"RebatchLatents: a latent of {n} rows has {len(index)} batch indices")
        seen += n
        run = _Run(latent, _mask_of(latent), index)
        if current is None:
            current = run
        elif run.pixel_size() != current.pixel_size():
            out.append(current.cut(0, min(size, current.rows)))
            current = run
        else:
            current = current.join(run)
        if current.rows > size:
            whole = current.rows // size
            out.extend(current.cut(i * size, (i + 1) * size) for i in range(whole))
            current = None if whole * size == current.rows else _Run(*_rest(current, whole * size))
    if current is not None:
        out.append(current.cut(0, min(size, current.rows)))
    return (out,)


def _rest(run: _Run, start: int) -> tuple[dict[str, Any], torch.Tensor | None, list[int]]:
    latent = run.cut(start, run.rows)
    mask = None if run.mask is None else run.mask[start:]
    return latent, mask, run.index[start:]


def rebatch_images(ctx: RunContext, images: list[torch.Tensor], batch_size: Any) -> tuple[Any]:
    """ComfyUI's RebatchImages: the list's images one after another, in batches of ``batch_size`` (the images of a
    batch must share a size)."""
    size = _batch_size(batch_size)
    rows: list[torch.Tensor] = []
    for img in images:
        if not isinstance(img, torch.Tensor) or img.ndim != 4:
            raise NodeError("RebatchImages: an element of the list is not an image batch")
        rows.extend(img[i : i + 1] for i in range(img.shape[0]))
    out = []
    for i in range(0, len(rows), size):
        part = rows[i : i + size]
        shapes = {tuple(r.shape[1:]) for r in part}
        if len(shapes) > 1:
            shown = ", ".join(f"{s[1]}x{s[0]}" for s in sorted(shapes))
            raise NodeError(f"RebatchImages: images of different sizes ({shown}) in one batch of {size}")
        out.append(torch.cat(part))
    return (out,)


def _int(name: str, default: int, lo: int, hi: int) -> Input:
    return Input(name, "INT", default, lo, hi, 1)


LIST_NODES: dict[str, NodeDef] = {
    n.name: n
    for n in (
        NodeDef(
            "RebatchLatents",
            "Rebatch Latents",
            "latent/batch",
            (Input("latents", "LATENT"), _int("batch_size", 1, 1, 4096)),
            ("LATENT",),
            rebatch_latents,
            output_is_list=(True,),
            input_is_list=True,
            description="The list's latent rows in batches of `batch_size`, a list (each batch runs the nodes "
            "after it once); rows keep their noise (`batch_index`) and noise mask; a new size starts a new batch.",
        ),
        NodeDef(
            "RebatchImages",
            "Rebatch Images",
            "image/batch",
            (Input("images", "IMAGE"), _int("batch_size", 1, 1, 4096)),
            ("IMAGE",),
            rebatch_images,
            output_is_list=(True,),
            input_is_list=True,
            description="The list's images in batches of `batch_size`, a list (each batch runs the nodes after it "
            "once, a SaveImage saving each); the images of a batch must share a size.",
        ),
    )
}
