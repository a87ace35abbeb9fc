"""Picture of the emoji ControlNet against mismatched prompts (docs/results/emoji_controlnet_mismatched.png).

Eight of the 64 mismatched pairs that ``sdengine eval emoji --controlnet ...`` scores (every eighth): row 1 the
control (canny edges of a render), row 2 the other emoji's caption without ControlNet, row 3 with the ControlNet
at scale 1 (the default), row 4 the two-stage schedule (scale 0.4 for the first 75% of the steps, then 3). Same
seeds and settings as the evaluation (DPM++ 2M, 20 steps, guidance 5).

    python tools/emoji_controlnet_mismatched.py [OUT.png]
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from PIL import Image

from sdengine.control import load_controlnet
from sdengine.data.emoji import EmojiDataset
from sdengine.eval.emoji import canny_edges, evenly_spaced, generate_batch, resize_uint8
from sdengine.pipeline import load_pipeline
from sdengine.train.emoji import HELD_OUT_SUBGROUP

CONTROLNET = "src/sdengine/assets/models/emoji-controlnet-canny"


def main(out: str) -> None:
    torch.set_num_threads(1)
    pipe = load_pipeline("emoji", device="cpu")
    ds = EmojiDataset()
    base = [j for j, e in enumerate(ds.entries) if e.subgroup != HELD_OUT_SUBGROUP]
    net = load_controlnet(CONTROLNET, base=pipe.unet.config).eval().requires_grad_(False)
    idx = [base[i] for i in evenly_spaced(len(base), 64)]
    other = [idx[(k + 32) % 64] for k in range(64)]  # the evaluation's pairing: half the list away
    idx, other = idx[::8], other[::8]
    edges = np.stack([canny_edges(resize_uint8(ds.pixels[j], 64)) for j in idx])
    control = torch.from_numpy(edges).float().div(255.0)[:, None].expand(-1, 3, -1, -1).contiguous()
    prompts = [ds.captions[j] for j in other]
    rows = [np.concatenate([np.repeat(e[:, :, None], 3, 2) for e in edges], axis=1)]
    settings: list[dict] = [
        {},
        {"controlnet": net, "control_images": control, "control_scale": 1.0},
        {
            "controlnet": net,
            "control_images": control,
            "control_scale": 3.0,
            "control_start": 0.75,
            "control_early": 0.4,
        },
    ]
    for kw in settings:
        a = generate_batch(pipe, prompts, idx, steps=20, sampler="dpmpp_2m", cfg_scale=5.0, **kw)
        rows.append(np.concatenate(list((a * 255).round().astype(np.uint8)), axis=1))
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    grid.resize((grid.width * 2, grid.height * 2), Image.Resampling.NEAREST).save(out)
    print("prompts:", prompts)
    print("written", out)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "emoji_controlnet_mismatched.png")
