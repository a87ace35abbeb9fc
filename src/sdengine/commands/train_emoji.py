"""``sdengine train emoji``: the built-in emoji model from nothing (see train/emoji.py for the stages)."""

from __future__ import annotations

import argparse
import json


def run(a: argparse.Namespace) -> int:
    from ..devices import resolve_device
    from ..train.emoji import EmojiRecipe, train_emoji

    _refuse_flags_without_effect(a)
    if a.write_folders:
        from ..data.emoji import EmojiDataset
        from ..train.emoji import write_caption_folders

        counts = write_caption_folders(EmojiDataset(), a.write_folders)
        for part, n in counts.items():
            print(f"{n} captioned renders in {a.write_folders}/{part}")
        return 0
    recipe = EmojiRecipe(
        seed=a.seed,
        mixed_precision=a.mixed_precision,
        vae_steps=a.vae_steps,
        unet_steps=a.unet_steps,
        unet_batch=a.batch_size,
        unet_lr=a.lr,
        unet_pooled_from=a.pooled_from,
        captions=a.captions,
    )
    summary = train_emoji(
        a.out,
        recipe,
        device=resolve_device(a.device),
        export_to=a.export,
        max_minutes_vae=a.max_minutes_vae,
        max_minutes_unet=a.max_minutes_unet,
        init_unet=a.init_unet,
    )
    print(json.dumps(summary, indent=2))
    print(f"model written to {summary['export']}; load it with load_pipeline('{summary['export']}')")
    return 0


# The flags each mode leaves unused; a value other than the default there would change nothing (once ignored).
TRAINING_FLAGS = (
    "out",
    "export",
    "vae_steps",
    "unet_steps",
    "batch_size",
    "lr",
    "pooled_from",
    "captions",
    "init_unet",
    "mixed_precision",
    "seed",
    "max_minutes_vae",
    "max_minutes_unet",
    "device",
)
NOT_WITH_INIT_UNET = ("vae_steps", "pooled_from", "max_minutes_vae")  # no VAE stage; the pooled vector is there


def _refuse_flags_without_effect(a: argparse.Namespace) -> None:
    from ..errors import UsageError

    defaults = a.flag_defaults

    def flags(names: tuple[str, ...]) -> list[str]:
        return ["--" + n.replace("_", "-") for n in names if getattr(a, n) != defaults.get(n)]

    if a.write_folders:
        given = flags(TRAINING_FLAGS)
        if given:
            raise UsageError(
                f"--write-folders only writes the renders and trains nothing: {', '.join(given)} would change "
                "nothing (drop them, or --write-folders)"
            )
    elif a.init_unet is not None:
        given = flags(NOT_WITH_INIT_UNET)
        if given:
            raise UsageError(
                f"--init-unet continues an exported model (its VAE kept, its pooled vector there): "
                f"{', '.join(given)} would change nothing"
            )


def register(sub: argparse._SubParsersAction, train: argparse._SubParsersAction | None = None) -> None:
    if train is None:
        return
    from ..train import emoji_defaults as r  # torch-free: --help stays fast

    p = train.add_parser(
        "emoji",
        help="train the built-in emoji text-to-image model (VAE, then U-Net) from the Noto emoji renders",
        description="Stages: VAE (OUT/vae), MiniLM caption states and sentence vectors (OUT/text_states.pt, "
        "OUT/text_pooled.pt), U-Net (OUT/unet), export "
        "(OUT/model, or --export). Rerunning continues each stage from its checkpoint. The defaults reproduce "
        "the shipped model (docs/models/emoji.md).",
    )
    p.add_argument("--out", default="runs/emoji")
    p.add_argument("--export", default=None, help="folder to write the model to (default OUT/model)")
    p.add_argument("--vae-steps", type=int, default=r.VAE_STEPS)
    p.add_argument("--unet-steps", type=int, default=r.UNET_STEPS)
    p.add_argument("--batch-size", type=int, default=r.UNET_BATCH, help="U-Net batch size")
    p.add_argument("--lr", type=float, default=r.UNET_LR, help="U-Net learning rate")
    p.add_argument(
        "--pooled-from",
        type=int,
        default=r.UNET_POOLED_FROM,
        metavar="STEP",
        help="train the U-Net on the token states alone up to STEP, then add the pooled sentence "
        "vector (zero-initialised) and go on; 0: the pooled vector from the start",
    )
    p.add_argument(
        "--captions",
        choices=["templates", "cldr", "names"],
        default=r.CAPTIONS,
        help="the U-Net's captions: the six caption templates; cldr: those and 4 more per emoji composed from "
        "CLDR's emoji annotations (Debian unicode-cldr-core); names: those and 2 more from Unicode's character "
        "names and the names list's aliases (Debian unicode-data)",
    )
    p.add_argument(
        "--init-unet",
        default=None,
        metavar="MODEL_FOLDER",
        help="continue an exported emoji model (e.g. src/sdengine/assets/models/emoji): no VAE training (its VAE "
        "is kept), its U-Net weights start --unet-steps more steps with a fresh optimizer; --vae-steps and "
        "--pooled-from are unused",
    )
    p.add_argument("--mixed-precision", choices=["auto", "no", "bf16"], default=r.MIXED_PRECISION)
    p.add_argument("--seed", type=int, default=r.SEED)
    p.add_argument("--max-minutes-vae", type=float, default=None, help="stop the VAE stage (and save) after this")
    p.add_argument("--max-minutes-unet", type=float, default=None, help="stop the U-Net stage after this")
    p.add_argument(
        "--write-folders",
        default=None,
        metavar="DIR",
        help="only write the renders as caption folders DIR/base and DIR/food-fruit (for 'sdengine train "
        "controlnet' and 'sdengine train lora') and stop",
    )
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps")
    p.set_defaults(func=run, flag_defaults={n: p.get_default(n) for n in TRAINING_FLAGS})
