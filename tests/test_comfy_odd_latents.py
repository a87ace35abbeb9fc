"""Latent sides that are not a multiple of the 2 x 2 patches on sdengine's ComfyUI route, for every DiT family.

ComfyUI runs them (``comfy/ldm/common_dit.py`` ``pad_to_patch_size``: the latent padded at the bottom and right,
``circular`` mode, at every model call; each model's forward cuts its output back to the latent's size: SD3's MMDiT,
Flux, Chroma, Qwen-Image, Lumina2 / Z-Image). FLUX.2's transformer reads one token a latent pixel (patch size 1):
nothing to pad. The reference below is ComfyUI's rule written out here: the same graph with the model call
replaced by this file's own pad (the first row / column appended, built with ``torch.cat``), call, crop."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from test_comfy_chroma import chroma, chroma_graph  # noqa: E402, F401
from test_comfy_dit_controlnet import flux_cn, sd3_cn  # noqa: E402, F401
from test_comfy_flux2 import klein  # noqa: E402, F401
from test_comfy_qwen_controlnet import qwen_cn  # noqa: E402, F401
from test_comfy_qwen_image import qwen, qwen_graph  # noqa: E402, F401
from test_comfy_sd3_flux import (  # noqa: E402, F401
    _node_error,
    _run,
    flux,
    flux_graph,
    sd3,
    sd3_graph,
    sd3_parts,
)
from test_comfy_z_image import z_graph, zimg  # noqa: E402, F401
from test_comfy_z_image_controlnet import zcn  # noqa: E402, F401

WIDTH, HEIGHT = 72, 40  # EmptySD3LatentImage: a 9 x 5 latent (both sides odd)
LATENT = (HEIGHT // 8, WIDTH // 8)


class ComfyPad:
    """ComfyUI's rule around one flow network: the odd bottom row / right column filled with the first (circular
    padding of one), the network called on the even grid, its output cut back; ``seen``: the shapes it was given."""

    def __init__(self, network: Any, seen: list[tuple[int, ...]]) -> None:
        self.network, self.seen = network, seen

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["network"], name)

    @staticmethod
    def pad(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] % 2:
            x = torch.cat([x, x[..., :1, :]], dim=-2)
        if x.shape[-1] % 2:
            x = torch.cat([x, x[..., :1]], dim=-1)
        return x

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        h, w = x.shape[-2:]
        cond = {k: self.pad(v) if torch.is_tensor(v) and v.ndim == 4 and v.shape[-2:] == (h, w) else v
                for k, v in cond.items()}  # fmt: skip
        self.seen.append(tuple(self.pad(x).shape))
        return self.network(self.pad(x), t, **cond)[..., :h, :w]


def comfy_reference(monkeypatch: pytest.MonkeyPatch, seen: list[tuple[int, ...]]) -> None:
    """The sampler's flow network wrapped in :class:`ComfyPad` in place of sdengine's own padding."""
    from sdengine.server.comfy import nodes_sd3_flux

    def comfy_sides(flow: Any, family: str, z: torch.Tensor, controls: list, model: Any) -> Any:
        return replace(flow, network=ComfyPad(flow.network, seen))

    monkeypatch.setattr(nodes_sd3_flux, "odd_sides", comfy_sides)


def _odd(graph: dict[str, Any], node: str) -> dict[str, Any]:
    graph[node] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 1}}
    return graph


CASES = {  # family: (fixture, the graph at the odd size, the sampler node)
    "sd3": ("sd3", lambda: _odd(sd3_graph(sd3_parts(), ["10", 0], ["2", 0], ["9", 0]), "5"), "6"),
    "flux": ("flux", lambda: _odd(flux_graph(), "7"), "8"),
    "chroma": ("chroma", lambda: _odd(chroma_graph(), "7"), "8"),
    "qwen_image": ("qwen", lambda: _odd(qwen_graph(), "58"), "3"),
    "z_image": ("zimg", lambda: _odd(z_graph(), "13"), "3"),
}


@pytest.mark.parametrize("family", sorted(CASES))
def test_an_odd_latent_runs_as_comfyui_pads_it(family, request, monkeypatch):
    """72 x 40 pixels: a 9 x 5 latent, padded circularly to 10 x 6 at every model call and cut back, as ComfyUI."""
    fixture, make, sampler = CASES[family]
    root = request.getfixturevalue(fixture)[0]
    out = _run(root, make())
    ours = out[sampler][0]["samples"]
    assert tuple(ours.shape[-2:]) == LATENT and bool(torch.isfinite(ours).all())
    seen: list[tuple[int, ...]] = []
    comfy_reference(monkeypatch, seen)
    theirs = _run(root, make())[sampler][0]["samples"]
    assert seen and all(s[-2:] == (LATENT[0] + 1, LATENT[1] + 1) for s in seen), seen
    gap = (ours - theirs).abs().max().item()
    assert gap < 1e-5, gap
    # the padding's mode counts: zeros in the padded row / column (not ComfyUI's) give another latent
    monkeypatch.setattr(
        ComfyPad, "pad", staticmethod(lambda x: torch.nn.functional.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2)))
    )
    zeros = _run(root, make())[sampler][0]["samples"]
    assert (ours - zeros).abs().max().item() > 1e-4


def _picture(root: Any, name: str, width: int, height: int) -> str:
    from _pipeline_models import picture

    (root / "in").mkdir(exist_ok=True)
    picture(width, height, seed=1).save(root / "in" / name)
    return name


def test_flux_kontext_odd_reference_and_latent_as_comfyui(flux, monkeypatch):  # noqa: F811 (the imported fixture)
    """FLUX.1 Kontext (ReferenceLatent) with a 26 x 18 picture: a 13 x 9 reference latent out of the tiny 2x VAE,
    beside the 9 x 5 latent; ComfyUI pads both circularly (the reference in ``process_img``), one reference at
    offset 0 (its layout counts no padding)."""
    from sdengine.pipeline.flux import FluxAdapter

    root = flux[0]

    def make() -> dict[str, Any]:
        g = _odd(flux_graph(), "7")
        g["20"] = {"class_type": "LoadImage", "inputs": {"image": _picture(root, "odd_ref.png", 26, 18)}}
        g["21"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["20", 0], "vae": ["9", 0]}}
        g["22"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["3", 0], "latent": ["21", 0]}}
        g["4"]["inputs"]["conditioning"] = ["22", 0]
        return g

    out = _run(root, make())
    assert tuple(out["21"][0]["samples"].shape[-2:]) == (9, 13)
    ours = out["8"][0]["samples"]
    seen: list[tuple[int, ...]] = []
    comfy_reference(monkeypatch, seen)
    call = FluxAdapter.__call__

    def padded_refs(self: Any, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        refs = self.references
        self.references = [ComfyPad.pad(r) for r in refs or ()]
        try:
            return call(self, x, t, **cond)
        finally:
            self.references = refs

    monkeypatch.setattr(FluxAdapter, "__call__", padded_refs)
    theirs = _run(root, make())["8"][0]["samples"]
    assert seen
    gap = (ours - theirs).abs().max().item()
    assert gap < 1e-5, gap
    no_ref = _run(root, _odd(flux_graph(), "7"))["8"][0]["samples"]
    assert (ours - no_ref).abs().max().item() > 1e-3  # the reference counts


def test_qwen_edit_odd_reference_and_latent_as_comfyui(qwen, monkeypatch):  # noqa: F811
    """Qwen-Image with ReferenceLatent (Edit's reference, frame 1) of a 26 x 18 picture (a 13 x 9 reference latent
    out of the tiny 2x VAE) beside the 9 x 5 latent: both padded circularly, as ComfyUI's ``process_img``."""
    from sdengine.server.comfy import nodes_qwen

    root = qwen[0]

    def make() -> dict[str, Any]:
        g = _odd(qwen_graph(), "58")
        g["20"] = {"class_type": "LoadImage", "inputs": {"image": _picture(root, "odd_ref.png", 26, 18)}}
        g["21"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["20", 0], "vae": ["39", 0]}}
        g["22"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["6", 0], "latent": ["21", 0]}}
        g["23"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["7", 0], "latent": ["21", 0]}}
        g["3"]["inputs"]["positive"], g["3"]["inputs"]["negative"] = ["22", 0], ["23", 0]
        return g

    out = _run(root, make())
    assert tuple(out["21"][0]["samples"].shape[-2:]) == (9, 13)
    ours = out["3"][0]["samples"]
    seen: list[tuple[int, ...]] = []
    comfy_reference(monkeypatch, seen)
    monkeypatch.setattr(nodes_qwen, "references_for", lambda refs, method="index": [ComfyPad.pad(r) for r in refs])
    theirs = _run(root, make())["3"][0]["samples"]
    assert seen
    gap = (ours - theirs).abs().max().item()
    assert gap < 1e-5, gap
    no_ref = _run(root, _odd(qwen_graph(), "58"))["3"][0]["samples"]
    assert (ours - no_ref).abs().max().item() > 1e-3


def test_flux2_odd_latent_and_reference_run_unpadded(monkeypatch, request):
    """FLUX.2's transformer reads one token a latent pixel (ComfyUI's patch size 1): EmptyFlux2LatentImage 80 x 48
    is a 5 x 3 latent of 128 channels, run as it is, and a 72 x 88 picture a 9 x 11 reference latent; both equal
    sdengine's FLUX.2 pipeline at that size (40 x 24 pixels out of the tiny VAE)."""
    from test_comfy_flux2 import PROMPT, SEED, STEPS, TOL, _pixels, klein_graph

    def _image(pipe: Any, **kw: Any) -> np.ndarray:  # the pipeline at 40 x 24 pixels
        out = pipe(PROMPT, "", steps=STEPS, seed=SEED, width=40, height=24, sampler="euler", cfg_scale=1.0,
                   schedule="normal", progress=False, **kw)  # fmt: skip
        return out.arrays[0].astype(np.float64)

    root, pipe, _ = request.getfixturevalue("klein")
    seen: list[tuple[int, ...]] = []
    forward = type(pipe.transformer).forward

    def spy(self: Any, x: torch.Tensor, *a: Any, **kw: Any) -> Any:
        seen.append(tuple(x.shape))
        return forward(self, x, *a, **kw)

    monkeypatch.setattr(type(pipe.transformer), "forward", spy)
    g = klein_graph()
    g["66"]["inputs"].update(width=80, height=48)
    g["62"]["inputs"].update(width=80, height=48)
    out = _run(root, g)
    assert tuple(out["64"][0]["samples"].shape) == (1, 128, 3, 5)
    assert seen and all(s[-2:] == (3, 5) for s in seen), seen
    gap = np.abs(_pixels(out["65"][0]) - _image(pipe))
    assert gap.mean() < TOL and gap.max() < 1e-4, (gap.mean(), gap.max())
    name = _picture(root, "odd_klein_ref.png", 72, 88)
    g["80"] = {"class_type": "LoadImage", "inputs": {"image": name}}
    g["81"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["80", 0], "vae": ["72", 0]}}
    g["82"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["74", 0], "latent": ["81", 0]}}
    g["63"]["inputs"]["positive"] = ["82", 0]
    out = _run(root, g)
    assert tuple(out["81"][0]["samples"].shape[-2:]) == (11, 9)
    ours = _pixels(out["65"][0])
    gap = np.abs(ours - _image(pipe, reference_images=[str(root / "in" / name)]))
    assert gap.mean() < TOL and gap.max() < 1e-4, (gap.mean(), gap.max())


def test_odd_sides_pads_every_network_with_or_without_controlnets():
    """:func:`odd_sides` wraps the (controlled or plain) network in :class:`PatchPadded` on an odd side of a 2 x 2
    patch family, leaves an even latent and FLUX.2 as they are; ZImageFunControlnet's patch runs at the padded size
    (:func:`patch_grid`)."""
    from sdengine.latent_sampling import FlowModel
    from sdengine.server.comfy.nodes import ModelHandle
    from sdengine.server.comfy.nodes_sd3_flux import PatchPadded, odd_sides, patch_grid

    flow = FlowModel(lambda x, t, **c: x * 2, None, 16, "cpu", "tiny.safetensors")
    z = torch.zeros(1, 16, 5, 9)
    assert patch_grid("z_image", 5, 9) == (6, 10) and patch_grid("z_image", 4, 8) == (4, 8)
    assert patch_grid("flux2", 5, 9) == (5, 9)
    assert isinstance(odd_sides(flow, "flux", z, [object()], ModelHandle("m")).network, PatchPadded)  # ControlNets
    assert odd_sides(flow, "flux", torch.zeros(1, 16, 4, 8), [object()], ModelHandle("m")) is flow  # even: as is
    assert odd_sides(flow, "flux2", z, [], ModelHandle("m")) is flow  # FLUX.2: patch size 1
    padded = odd_sides(flow, "sd3", z, [], ModelHandle("m")).network
    assert isinstance(padded, PatchPadded)
    skipping = replace(flow, skipping=lambda layers, single: flow.network)  # SD3's skip-layer guidance: padded too
    assert isinstance(odd_sides(skipping, "sd3", z, [], ModelHandle("m")).skipping((1,), ()), PatchPadded)
    x = torch.arange(45.0).reshape(1, 1, 5, 9)
    seen: list[tuple[int, ...]] = []
    wrapped = PatchPadded(lambda x, t, concat: (seen.append(tuple(concat.shape)), x + concat)[1])
    assert torch.equal(wrapped(x, torch.zeros(1), concat=x), 2 * x) and seen == [(1, 1, 6, 10)]


@pytest.mark.parametrize("family", ["sd3", "flux", "qwen_image"])
def test_an_odd_latent_with_a_controlnet_runs_as_comfyui(family, request, monkeypatch):
    """ControlNetApplyAdvanced (SD3 / Flux / Qwen-Image ControlNets) on a 9 x 5 latent: ComfyUI's ``get_control``
    scales the hint to the latent's size x 8 (72 x 40) and VAE-encodes it to a 9 x 5 latent, and its ControlNet's
    forward pads that hint latent circularly to the patches as it pads the latent (Flux: ``pad_to_patch_size``;
    SD3: ``pos_embed_input``'s PatchEmbed, circular; Qwen-Image: ``process_img``); the residuals join the padded
    transformer's tokens, the output cut back. The reference: that rule written out here (this file's ``ComfyPad``
    around the controlled network, the hint latent padded by ``ComfyPad.pad``)."""
    import test_comfy_dit_controlnet as dc
    import test_comfy_qwen_controlnet as qc
    from sdengine.server.comfy import nodes_sd3_flux

    run = dc._run
    if family == "sd3":
        root = request.getfixturevalue("sd3_cn")[0]
        make, latent_node, sampler = dc.sd3_cn_graph, "5", "6"
    elif family == "flux":
        root = request.getfixturevalue("flux_cn")[0]
        make, latent_node, sampler = (lambda: dc._flux_cn_graph("flux-cn")), "7", "8"
    else:
        root, run = request.getfixturevalue("qwen_cn")[0], qc._run
        make, latent_node, sampler = qc.cn_graph, "58", "3"
    ours = run(root, _odd(make(), latent_node))[sampler][0]["samples"]
    assert tuple(ours.shape[-2:]) == LATENT and bool(torch.isfinite(ours).all())
    plain = make()  # the same graph without the ControlNet: the hint acts
    plain[sampler]["inputs"]["positive"], plain[sampler]["inputs"]["negative"] = (
        plain["a"]["inputs"]["positive"],
        plain["a"]["inputs"]["negative"],
    )
    for node in ("a", "c", "h"):
        plain.pop(node)
    bare = run(root, _odd(plain, latent_node))[sampler][0]["samples"]
    assert (ours - bare).abs().max().item() > 1e-4
    seen: list[tuple[int, ...]] = []
    hints: list[tuple[int, ...]] = []

    def comfy_hints(units: list[Any]) -> list[Any]:
        hints.extend(tuple(u.latent.shape[-2:]) for u in units)
        return [replace(u, latent=ComfyPad.pad(u.latent)) for u in units]

    comfy_reference(monkeypatch, seen)
    monkeypatch.setattr(nodes_sd3_flux, "pad_control_latents", comfy_hints)
    theirs = run(root, _odd(make(), latent_node))[sampler][0]["samples"]
    assert hints == [LATENT], hints  # the hint encoded at the latent's own (odd) size
    assert seen and all(s[-2:] == (LATENT[0] + 1, LATENT[1] + 1) for s in seen), seen
    gap = (ours - theirs).abs().max().item()
    print(f"{family} ControlNet on a 9x5 latent vs ComfyUI's rule: max abs {gap:.2e}")
    assert gap < 1e-5, gap
    # zeros in the hint's padded row / column (not ComfyUI's) give another latent
    monkeypatch.setattr(
        nodes_sd3_flux,
        "pad_control_latents",
        lambda units: [replace(u, latent=torch.nn.functional.pad(u.latent, (0, 1, 0, 1))) for u in units],
    )
    zeros = run(root, _odd(make(), latent_node))[sampler][0]["samples"]
    print(f"{family}: zeros in the hint's pad: max abs {(ours - zeros).abs().max().item():.2e}")
    assert (ours - zeros).abs().max().item() > 1e-6


def test_an_odd_latent_with_z_image_fun_controlnet_runs_as_comfyui(zcn, monkeypatch):  # noqa: F811
    """ZImageFunControlnet on a 9 x 5 latent: ComfyUI's Lumina2 ``_forward`` pads the latent to 10 x 6 and hands the
    patch that padded ``x``, so ``ZImageControlPatch`` scales its image to 10 x 6 x the VAE's factor and encodes it
    there (no hint padding); the output cut back. The reference: this file's ``ComfyPad`` around the controlled
    network, the control latents made at the padded size the test computes (6 x 10)."""
    import test_comfy_z_image_controlnet as zc
    from sdengine.server.comfy import nodes_z_image_control as zic

    root = zcn[0]
    ours = zc._run(root, _odd(zc.z_graph(), "13"))["3"][0]["samples"]
    assert tuple(ours.shape[-2:]) == LATENT and bool(torch.isfinite(ours).all())
    bare = zc._run(root, _odd(zc.z_graph(None), "13"))["3"][0]["samples"]
    assert (ours - bare).abs().max().item() > 1e-4  # the patch acts
    made = zic.controlled_flow
    sizes: list[tuple[int, int]] = []

    def comfy_sizes(ctx: Any, model: Any, flow: Any, height: int, width: int) -> Any:
        sizes.append((height, width))
        return made(ctx, model, flow, LATENT[0] + 1, LATENT[1] + 1)  # the padded latent ComfyUI's patch reads

    seen: list[tuple[int, ...]] = []
    comfy_reference(monkeypatch, seen)
    monkeypatch.setattr(zic, "controlled_flow", comfy_sizes)
    theirs = zc._run(root, _odd(zc.z_graph(), "13"))["3"][0]["samples"]
    assert sizes == [(LATENT[0] + 1, LATENT[1] + 1)], sizes  # sdengine asks for the padded size too
    assert seen and all(s[-2:] == (LATENT[0] + 1, LATENT[1] + 1) for s in seen), seen
    gap = (ours - theirs).abs().max().item()
    print(f"Z-Image Fun ControlNet on a 9x5 latent vs ComfyUI's rule: max abs {gap:.2e}")
    assert gap < 1e-5, gap
    # another rule (the image encoded at the odd 9 x 5 and its latent padded circularly) gives another latent
    latent_at = zic.control_latent
    monkeypatch.setattr(
        zic, "control_latent", lambda c, n, v, h, w: ComfyPad.pad(latent_at(c, n, v, LATENT[0], LATENT[1]))
    )
    other = zc._run(root, _odd(zc.z_graph(), "13"))["3"][0]["samples"]
    print(f"Z-Image: the hint encoded at 9x5 and padded instead: max abs {(ours - other).abs().max().item():.2e}")
    assert (ours - other).abs().max().item() > 1e-6


def comfy_qwen_layout(shapes: list[tuple[int, int]], method: str = "index") -> tuple[tuple[int, int, int], ...]:
    """ComfyUI's Qwen-Image ``_forward`` over its reference latents, written out: "index" frames 1, 2, ...; every
    other method frame 1 with the box rule; ``process_img`` turns a shift to patches as ``(shift + 1) // 2``."""
    out, h, w, index = [], 0, 0, 0
    for rh, rw in shapes:
        if method == "index":
            index, h_offset, w_offset = index + 1, 0, 0
        else:
            index, h_offset, w_offset = 1, 0, 0
            if rh + h > rw + w:
                w_offset = w
            else:
                h_offset = h
            h, w = max(h, rh + h_offset), max(w, rw + w_offset)
        out.append((index, (h_offset + 1) // 2, (w_offset + 1) // 2))
    return tuple(out)


def test_qwen_reference_layouts_follow_comfyuis_rules():
    """Three reference latents of 9 x 13, 5 x 7 and 11 x 3: "offset" puts the second below the first (9 rows: 5
    patches), the third right of both (13 columns: 7 patches); the RoPE's rows / columns are ComfyUI's
    ``r - h_len // 2 + shift``."""
    from sdengine.models.qwen_image import ROPE_THETA, rope_tables
    from sdengine.server.comfy.nodes_qwen import reference_layout

    shapes = [(9, 13), (5, 7), (11, 3)]
    assert reference_layout(shapes, "offset") == comfy_qwen_layout(shapes, "offset") == ((1, 0, 0), (1, 5, 0),
                                                                                          (1, 0, 7))  # fmt: skip
    assert reference_layout(shapes, "uxo") == reference_layout(shapes, "offset")  # Qwen-Image has no uxo rule
    assert reference_layout(shapes, "index") == ((1, 0, 0), (2, 0, 0), (3, 0, 0))
    axes = (16, 56, 56)
    grids = tuple(((h + 1) // 2, (w + 1) // 2) for h, w in shapes)  # 5 x 7, 3 x 4, 6 x 2 patches
    cos, _ = rope_tables(2, 2, 1, axes, "comfyui", grids, reference_layout(shapes, "offset"))
    first = 1 + 4 + 5 * 7 + 3 * 4  # text 1, image 2 x 2, ref 1, ref 2: the third ref's token (0, 0)
    want = (1.0, 0 - 6 // 2 + 0, 0 - 2 // 2 + 7)  # frame 1, row r - h_len // 2, column c - w_len // 2 + 7
    expected = torch.cat([
        (p * (1.0 / torch.pow(ROPE_THETA, torch.arange(0, d, 2).float() / d))).cos().repeat_interleave(2)
        for p, d in zip(want, axes, strict=True)
    ])  # fmt: skip
    assert torch.allclose(cos[first], expected, atol=1e-6)


@pytest.mark.parametrize("method", ["offset", "uxo/uno"])
def test_qwen_several_references_in_offset_layouts_as_comfyui(qwen, monkeypatch, method):  # noqa: F811
    """Two ReferenceLatents (26 x 18 and 14 x 10 pictures: 13 x 9 and 7 x 5 latents, odd) laid out by
    FluxKontextMultiReferenceLatentMethod: the sampled latent equals the graph run with this file's ComfyUI layout;
    "index" (Qwen-Image's default) is another latent."""
    from sdengine.server.comfy import nodes_qwen

    root = qwen[0]

    def make(layout: str | None) -> dict[str, Any]:
        g = _odd(qwen_graph(), "58")
        g["3"]["inputs"]["cfg"] = 1.0
        for k, (name, w, h) in enumerate((("ref_a.png", 26, 18), ("ref_b.png", 14, 10))):
            g[f"2{k}"] = {"class_type": "LoadImage", "inputs": {"image": _picture(root, name, w, h)}}
            g[f"3{k}"] = {"class_type": "VAEEncode", "inputs": {"pixels": [f"2{k}", 0], "vae": ["39", 0]}}
        g["40"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["6", 0], "latent": ["30", 0]}}
        g["41"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["40", 0], "latent": ["31", 0]}}
        g["3"]["inputs"]["positive"] = ["41", 0]
        if layout:
            g["42"] = {"class_type": "FluxKontextMultiReferenceLatentMethod",
                       "inputs": {"conditioning": ["41", 0], "reference_latents_method": layout}}  # fmt: skip
            g["3"]["inputs"]["positive"] = ["42", 0]
        return g

    out = _run(root, make(method))
    assert [tuple(out[f"3{k}"][0]["samples"].shape[-2:]) for k in range(2)] == [(9, 13), (5, 7)]
    ours = out["3"][0]["samples"]
    index = _run(root, make(None))["3"][0]["samples"]
    assert (ours - index).abs().max().item() > 1e-4  # the layout counts
    monkeypatch.setattr(nodes_qwen, "reference_layout", comfy_qwen_layout)
    theirs = _run(root, make(method))["3"][0]["samples"]
    gap = (ours - theirs).abs().max().item()
    assert gap < 1e-5, gap
