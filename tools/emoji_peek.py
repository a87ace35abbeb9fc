"""Look at a U-Net checkpoint of a running ``sdengine train emoji``: export its EMA weights with the run's VAE
into a temporary folder and measure adherence on a few captions (recogniser top-1/top-5), writing a grid.

    python tools/emoji_peek.py runs/emoji --n 100 --out outputs/peek.png
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--paraphrases", type=int, default=40)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--out", type=Path, default=Path("outputs/peek.png"))
    ap.add_argument("--checkpoint", type=Path, default=None, help="a U-Net checkpoint (default RUN/unet/checkpoint.pt)")
    a = ap.parse_args()

    from sdengine.eval_emoji import evaluate_emoji, format_report

    from sdengine.data.emoji import EmojiDataset
    from sdengine.metrics.emoji_recogniser import load_emoji_recogniser
    from sdengine.models.unet import UNet
    from sdengine.models.vae import AutoencoderKL
    from sdengine.pipeline import load_pipeline
    from sdengine.train.checkpoint import load_checkpoint
    from sdengine.train.emoji import (
        EMOJI_UNET,
        EMOJI_UNET_TOKENS_ONLY,
        EMOJI_VAE,
        encode_latents,
        export_folder,
        latent_scaling,
        with_scaling,
    )

    ds = EmojiDataset()
    vae = AutoencoderKL(EMOJI_VAE)
    vae.load_state_dict(load_checkpoint(a.run / "vae" / "checkpoint.pt")["ema"]["model"])
    vae.eval()
    mean, _ = encode_latents(vae, ds.images)
    vae = with_scaling(vae, latent_scaling(mean))
    state = load_checkpoint(a.checkpoint or a.run / "unet" / "checkpoint.pt")
    pooled = "class_embedding.linear_1.weight" in state["ema"]["model"]
    unet = UNet(EMOJI_UNET if pooled else EMOJI_UNET_TOKENS_ONLY)
    unet.load_state_dict(state["ema"]["model"])
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_folder(vae, unet.eval(), Path(tmp) / "m")
        pipe = load_pipeline(folder, device="cpu")
        res = evaluate_emoji(
            pipe, load_emoji_recogniser(), n=a.n, cfg=a.cfg, cfg_sweep=(), paraphrase_n=a.paraphrases, progress=False
        )
        print(f"step {state['step']}")
        print(format_report(res))
        prompts = ["grinning face", "red heart", "pizza", "rocket", "cat face", "sun", "soccer ball", "rainbow"]
        imgs = [pipe(p, seed=0, steps=20, cfg_scale=a.cfg).images[0] for p in prompts]
        from PIL import Image

        grid = Image.new("RGB", (64 * len(imgs), 64), "white")
        for i, im in enumerate(imgs):
            grid.paste(im, (64 * i, 0))
        a.out.parent.mkdir(parents=True, exist_ok=True)
        grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(a.out)
        print(json.dumps({k: res[k] for k in res if k in ("captions", "paraphrases")}, default=str)[:2000])


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
