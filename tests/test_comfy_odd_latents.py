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

    def odd_sides(flow: Any, family: str, z: torch.Tensor, controls: list, model: Any) -> Any:
        return replace(flow, network=ComfyPad(flow.network, seen))

    monkeypatch.setattr(nodes_sd3_flux, "_odd_sides", odd_sides)


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
