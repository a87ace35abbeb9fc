"""``sdengine train embedding --model M --data DIR --name WORD``: a textual-inversion embedding (train/embedding.py)."""

from __future__ import annotations

import argparse

from .common import add_force_resume, add_train_args
from .help_format import DefaultsHelpFormatter


def run(a: argparse.Namespace) -> int:
    from ..train.embedding import EmbeddingSpec, train_embedding
    from .common import device, train_config

    spec = EmbeddingSpec(
        model=a.model,
        data=a.data,
        name=a.name,
        vectors=a.vectors,
        init_text=a.init_text,
        template=a.template,
        resolution=a.resolution,
    )
    cfg = train_config(a, sample_every=0)
    _, path = train_embedding(
        spec, cfg, a.out, device=device(a), resume=a.resume, overwrite=a.overwrite, force_resume=a.force_resume
    )
    print(f"embedding written to {path}")
    return 0


def register(sub: argparse._SubParsersAction, train: argparse._SubParsersAction | None = None) -> None:
    if train is None:
        return
    p = train.add_parser(
        "embedding",
        formatter_class=DefaultsHelpFormatter,
        help="train a textual-inversion embedding for an SD model on a folder of images",
        description="Learns the token vectors of a new word (the model stays frozen). Writes OUT/NAME.safetensors "
        "({'emb_params': (n, D)}); A1111, diffusers' load_textual_inversion and '--embeddings-dir' read it.",
    )
    p.add_argument("--model", required=True, help="a diffusers folder or an SD 1.x/2.x .safetensors/.ckpt file")
    p.add_argument("--data", required=True, help="folder of images (.txt captions optional, see --template)")
    p.add_argument("--name", required=True, help="the word to learn; also the file name")
    p.add_argument("--vectors", type=int, default=1, help="vectors per word (A1111's 'number of vectors per token')")
    p.add_argument("--init-text", default="*", help="the vectors start from this text's token embeddings")
    p.add_argument(
        "--template",
        default="a photo of [name]",
        help="caption of every image: [name] is the word, [filewords] the image's .txt caption",
    )
    p.add_argument("--resolution", type=int, default=None, help="training size in pixels (default: the model's)")
    add_train_args(
        p,
        out="runs/embedding",
        steps=1000,
        batch_size=1,
        lr=5e-3,
        warmup=0,
        ema_decay=0.999,
        checkpoint_every=500,
        ema_help="kept in the checkpoint; the file holds the last vectors",
    )
    add_force_resume(p)
    p.set_defaults(func=run)
