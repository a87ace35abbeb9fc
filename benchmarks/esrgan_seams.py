"""How visible are the tile seams of the model upscalers? Random-weight ESRGAN-family networks (an RRDBNet and a
compact SRVGGNetCompact, small widths) upscale a synthetic image (gradients, a sinusoid, discs) whole and in
tiles, with A1111's rule (tiles of 192 overlapping by 8: ``upscale_tensor``) and ComfyUI's (512 / 32:
``upscale_tensor_comfyui`` where it exists, else ``upscale_tensor`` with ComfyUI's numbers, as the node once did).

Two numbers per case, on the [0, 1]-clamped outputs:

* ``max_err``: the largest difference between the tiled and the whole-image output (what any tiling of a network
  whose receptive field passes the overlap leaves; blending spreads it, it does not remove it);
* ``max_jump``: the largest extra step between two neighbouring output pixels, tiled against whole:
  ``max |(T[i+1] - T[i]) - (U[i+1] - U[i])|`` along rows and columns -- a hard seam is a step of about
  ``max_err``, a blended one a fraction of it.

    PYTHONPATH=src python benchmarks/esrgan_seams.py
"""

from __future__ import annotations

import argparse
import json

import torch

from sdengine.models import esrgan
from sdengine.models.esrgan import UpscalerSpec, build_upscaler, upscale_tensor


def _randomised(spec: UpscalerSpec, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_upscaler(spec)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 4:
                p.copy_(torch.randn_like(p) / (p[0].numel() ** 0.5))
            else:
                p.copy_(torch.randn_like(p) * 0.1 + 0.1)
    return model.eval()


def _image(h: int, w: int) -> torch.Tensor:
    y = torch.linspace(0, 1, h)[:, None].expand(h, w)
    x = torch.linspace(0, 1, w)[None, :].expand(h, w)
    r = 0.5 + 0.4 * torch.sin(12 * x + 5 * y)
    g = 0.3 + 0.5 * y
    b = 0.2 + 0.6 * x
    img = torch.stack([r, g, b])
    for cy, cx, rad in ((0.3, 0.35, 0.15), (0.7, 0.6, 0.2), (0.5, 0.9, 0.1)):
        disc = ((y - cy) ** 2 + (x - cx) ** 2) < rad**2
        img[:, disc] = torch.tensor([0.9, 0.1, 0.5])[:, None]
    return img.unsqueeze(0)


def _metrics(tiled: torch.Tensor, whole: torch.Tensor) -> dict[str, float]:
    t, u = tiled.clamp(0, 1).double(), whole.clamp(0, 1).double()
    jump_x = ((t[..., 1:] - t[..., :-1]) - (u[..., 1:] - u[..., :-1])).abs().max()
    jump_y = ((t[..., 1:, :] - t[..., :-1, :]) - (u[..., 1:, :] - u[..., :-1, :])).abs().max()
    return {"max_err": round(float((t - u).abs().max()), 5), "max_jump": round(float(max(jump_x, jump_y)), 5)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    comfy = getattr(esrgan, "upscale_tensor_comfyui", None)
    specs = {
        "rrdb": UpscalerSpec("esrgan", 4, 3, 3, 8, 1, grow=4),
        "compact": UpscalerSpec("compact", 4, 3, 3, 8, 16),  # realesr-animevideov3 depth: 18 pixels each way
    }
    rows = []
    for name, spec in specs.items():
        model = _randomised(spec, args.seed)
        for rule, (h, w) in (("a1111", (300, 400)), ("comfyui", (560, 600))):
            x = _image(h, w)
            whole = upscale_tensor(model, x, tile=0)
            if rule == "a1111":
                tiled = upscale_tensor(model, x)
            elif comfy is not None:
                tiled = comfy(model, x)
            else:
                tiled = upscale_tensor(model, x, tile=512, overlap=32)
            rows.append({"model": name, "rule": rule, "size": f"{w}x{h}", **_metrics(tiled, whole)})
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
