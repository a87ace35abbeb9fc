"""The emoji recogniser: which of the emoji of :class:`~sdengine.data.emoji.EmojiDataset` is an image?

The measuring instrument of ``sdengine eval emoji``: prompt adherence of the emoji text-to-image model
is the share of generated images that this network recognises as the emoji that was asked for, and
its penultimate layer is the feature space of the emoji Frechet distance ("FD_emoji"). Numbers are
comparable only between runs that use the same shipped weights.

There is one render per emoji, so the network learns from augmentation alone, and the augmentation
is strong on purpose: generated images are blurrier, colour-shifted, slightly moved/scaled and
noisier than the renders (see :func:`augment`).

Classes are identified by the emoji *character*: ``config.json`` stores the ordered list of chars
(and names), so the mapping survives changes to the data set; use :meth:`EmojiRecogniser.class_index`.

Shipped weights: ``sdengine/assets/emoji_recogniser/model.safetensors`` (fp16) with ``config.json``
beside it recording the architecture, the classes, the training command and facts, and the clean and
augmented accuracies on the renders. They (1.71M parameters, 3.4 MB) were trained on CPU with one
thread (torch 2.13, bf16 autocast) in 580 s wall-clock on a shared, loaded 2-core machine by::

    python -m sdengine.metrics.emoji_recogniser train --out src/sdengine/assets/emoji_recogniser \
        --steps 1400 --seed 0 --clean-fraction 0.3

``python -m sdengine.metrics.emoji_recogniser score`` prints the accuracies of the shipped weights on
the 1,899 renders: clean top-1 98.84% / top-5 100%; one augmented copy (seed 1234, not a training
seed) top-1 97.10% / top-5 99.95% (seed 7: 97.16% / 100%). The 22 clean misses are near-identical
pairs (10 country flags, gendered person / fantasy-person variants, geometric shapes of one colour).

Input convention is the diffusion models' one: float ``(B, 3, H, W)`` in ``[-1, 1]`` on a white
(+1) background; images that are not 64x64 are resized to 64x64 (bilinear, antialiased) inside.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = [
    "DEFAULT_WEIGHTS_DIR",
    "AugmentConfig",
    "EmojiRecogniser",
    "RecogniserConfig",
    "augment",
    "load_emoji_recogniser",
    "recogniser_features",
    "recogniser_logits",
    "save_emoji_recogniser",
    "score",
    "topk_accuracy",
    "train_emoji_recogniser",
]

DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "assets" / "emoji_recogniser"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
SCORE_SEED = 1234  # the augmented copy of the renders that `score` reports (not a training seed)
CLEAN_FRACTION = 0.3  # share of each training batch left un-augmented


@dataclass(frozen=True)
class RecogniserConfig:
    """Stage widths (one residual block each, stage i at 32 / 2**i px), the class count, the input size."""

    channels: tuple[int, ...] = (32, 64, 128, 256)
    num_classes: int = 1899
    image_size: int = 64
    dropout: float = 0.1

    @property
    def feature_dim(self) -> int:
        return self.channels[-1]


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the training augmentation (all per image, uniform unless said otherwise)."""

    scale: tuple[float, float] = (0.75, 1.15)  # glyph size relative to the render
    shift_px: float = 6.0  # translation, +- px at 64x64
    rotate_deg: float = 12.0  # +- degrees
    brightness: float = 0.15  # +- added (in [-1, 1] units)
    contrast: tuple[float, float] = (0.7, 1.3)  # around the image mean
    saturation: tuple[float, float] = (0.6, 1.4)  # blend with grey
    colour_cast: float = 0.1  # +- added per channel
    blur_prob: float = 0.6  # Gaussian blur with sigma in blur_sigma
    blur_sigma: tuple[float, float] = (0.3, 1.6)
    downscale_prob: float = 0.3  # downscale to 32/24 px and back up (bilinear)
    noise_std: tuple[float, float] = (0.0, 0.12)  # Gaussian pixel noise


def _conv_bn(cin: int, cout: int, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class _Block(nn.Module):
    """Basic residual block; a strided 1x1 projection on the skip when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, stride)
        self.conv2 = _conv_bn(cout, cout, relu=False)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.skip(x))


class EmojiRecogniser(nn.Module):
    """A compact ResNet: stride-2 stem (64 -> 32 px), one block per stage (32 -> 16 -> 8 -> 4 px),
    global average pool (the features), dropout, linear head over the emoji classes."""

    def __init__(self, config: RecogniserConfig = RecogniserConfig(), classes: Sequence[str] | None = None) -> None:
        super().__init__()
        if classes is not None and len(classes) != config.num_classes:
            raise ValueError(f"{len(classes)} classes given for num_classes={config.num_classes}")
        self.config = config
        self.classes: list[str] = list(classes) if classes is not None else []
        self._index = {c: i for i, c in enumerate(self.classes)}
        ch = config.channels
        self.stem = _conv_bn(3, ch[0], stride=2)  # (B, c0, 32, 32)
        self.stages = nn.Sequential(
            *[_Block(ch[max(i - 1, 0)], c, 1 if i == 0 else 2) for i, c in enumerate(ch)]
        )  # (B, c_last, 32 / 2**(len-1), ...)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def class_index(self, char: str) -> int:
        """The class id of an emoji character (``KeyError`` if it is not one of the classes)."""
        try:
            return self._index[char]
        except KeyError:
            raise KeyError(f"not a class of this recogniser: {char!r}") from None

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Float ``(B, 3, H, W)`` in [-1, 1] -> ``(B, 3, 64, 64)`` (bilinear, antialiased resize)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"expected float images in [-1, 1], got {x.dtype}")
        s = self.config.image_size
        if tuple(x.shape[-2:]) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations ``(B, feature_dim)`` (post-ReLU, average pooled), float32."""
        h = self.stages(self.stem(self.prepare(x)))
        return h.mean(dim=(2, 3)).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))  # (B, num_classes) logits


# ----------------------------------------------------------------------------------------------- augmentation


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image separable Gaussian blur (``sigma`` (B,), px); edge pixels replicated."""
    b, c, h, w = x.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None, :] / sigma[:, None].clamp_min(1e-3)) ** 2)  # (B, K)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (B*C, K)
    y = F.pad(x.reshape(1, b * c, h, w), (radius,) * 4, mode="replicate")
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)  # vertical
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)  # horizontal
    return y.reshape(b, c, h, w)


def augment(x: torch.Tensor, generator: torch.Generator, cfg: AugmentConfig = AugmentConfig()) -> torch.Tensor:
    """A randomly distorted copy of ``x`` (float ``(B, 3, H, W)`` in [-1, 1], white background).

    Affine (scale, rotation, translation; white fill), colour (brightness, contrast, saturation,
    per-channel cast), blur (Gaussian and/or down-and-up sampling), Gaussian noise; clamped to
    [-1, 1]. All randomness comes from ``generator``: the same generator state gives the same output.
    """
    b, _, h, w = x.shape
    x = x.float()
    g = generator
    # Affine. theta maps output coords to input coords, so the glyph is drawn `scale` times larger.
    scale = _uniform(b, *cfg.scale, g)
    angle = _uniform(b, -cfg.rotate_deg, cfg.rotate_deg, g) * (math.pi / 180)
    tx = _uniform(b, -cfg.shift_px, cfg.shift_px, g) * (2 / w)
    ty = _uniform(b, -cfg.shift_px, cfg.shift_px, g) * (2 / h)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, -tx], 1), torch.stack([sin, cos, -ty], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, [b, 3, h, w], align_corners=False)
    # Zero padding of (x - 1) is white fill in x.
    x = F.grid_sample(x - 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 1.0
    # Colour.
    grey = x.mean(dim=1, keepdim=True)
    sat = _uniform(b, *cfg.saturation, g)[:, None, None, None]
    x = grey + sat * (x - grey)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    con = _uniform(b, *cfg.contrast, g)[:, None, None, None]
    x = mean + con * (x - mean)
    x = x + _uniform(b, -cfg.brightness, cfg.brightness, g)[:, None, None, None]
    x = x + (_uniform(b * 3, -cfg.colour_cast, cfg.colour_cast, g)).reshape(b, 3, 1, 1)
    # Blur.
    sigma = _uniform(b, *cfg.blur_sigma, g)
    blur = torch.rand(b, generator=g) < cfg.blur_prob
    if bool(blur.any()):
        x = torch.where(blur[:, None, None, None], _gaussian_blur(x, torch.where(blur, sigma, 1.0)), x)
    down = torch.rand(b, generator=g) < cfg.downscale_prob
    size = torch.where(torch.rand(b, generator=g) < 0.5, 32, 24)
    for s in (32, 24):
        m = down & (size == s)
        if bool(m.any()):
            small = F.interpolate(x[m], size=(s, s), mode="bilinear", antialias=True, align_corners=False)
            x[m] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    # Noise.
    std = _uniform(b, *cfg.noise_std, g)[:, None, None, None]
    x = x + std * torch.randn(x.shape, generator=g)
    return x.clamp(-1.0, 1.0)


# ----------------------------------------------------------------------------------------------- metrics, I/O


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, k: int = 1) -> float:
    """Share of rows whose target is among the ``k`` largest logits, in [0, 1]."""
    if logits.shape[0] == 0:
        return float("nan")
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices  # (N, k)
    return (top == torch.as_tensor(targets, device=top.device)[:, None]).any(dim=1).float().mean().item()


@torch.no_grad()
def _batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int, device: Any) -> torch.Tensor:
    outs = [fn(x[i : i + batch_size].to(device).float()).float().cpu() for i in range(0, x.shape[0], batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def recogniser_logits(
    images: torch.Tensor, model: EmojiRecogniser | None = None, batch_size: int = 256
) -> torch.Tensor:
    """Logits ``(N, num_classes)`` float32 on CPU of images ``(N, 3, H, W)`` in [-1, 1]."""
    model = model if model is not None else load_emoji_recogniser()
    return _batched(model.eval(), images, batch_size, _device(model))


def recogniser_features(
    images: torch.Tensor, model: EmojiRecogniser | None = None, batch_size: int = 256
) -> torch.Tensor:
    """Penultimate features ``(N, feature_dim)`` float32 on CPU (for the emoji Frechet distance)."""
    model = model if model is not None else load_emoji_recogniser()
    return _batched(model.eval().features, images, batch_size, _device(model))


def save_emoji_recogniser(model: EmojiRecogniser, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write fp16 ``model.safetensors`` and ``config.json`` (architecture, classes, ``extra``)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu()).contiguous()
        for k, v in model.state_dict().items()
    }
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    meta = {"model": asdict(model.config), "classes": model.classes, **(extra or {})}
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


def load_emoji_recogniser(device: str | torch.device | None = None, path: str | Path | None = None) -> EmojiRecogniser:
    """The recogniser in ``path`` (a folder; default: the shipped weights), eval mode, frozen, float32."""
    directory = Path(path) if path is not None else DEFAULT_WEIGHTS_DIR
    weights, cfg_path = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    if not weights.is_file() or not cfg_path.is_file():
        raise FileNotFoundError(
            f"emoji recogniser weights not found in {directory} (need {WEIGHTS_NAME} and {CONFIG_NAME}; "
            "train them with `python -m sdengine.metrics.emoji_recogniser train`)"
        )
    meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["model"].items()}
    cfg = RecogniserConfig(**fields)
    model = EmojiRecogniser(cfg, classes=meta.get("classes") or None)
    state = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in load_file(weights).items()}
    model.load_state_dict(state, strict=True)
    model = model.eval().requires_grad_(False)
    return model.to(device) if device is not None else model


# ----------------------------------------------------------------------------------------------- training


class _EmojiLike(Protocol):
    # Read-only members (properties), so that a dataset holding a list of entries matches Sequence[Any].
    @property
    def images(self) -> torch.Tensor: ...  # (N, 3, 64, 64) in [-1, 1]

    @property
    def entries(self) -> Sequence[Any]: ...  # each with a .char


def _log(msg: str) -> None:
    print(msg, flush=True)  # flushed so progress shows when stdout is a log file


def train_emoji_recogniser(
    dataset: _EmojiLike,
    *,
    steps: int = 1400,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    progress: Callable[[str], None] | None = _log,
    config: RecogniserConfig | None = None,
    augment_config: AugmentConfig = AugmentConfig(),
    clean_fraction: float = CLEAN_FRACTION,
    bf16: bool = True,
    log_every: int = 250,
    history: list[float] | None = None,
) -> EmojiRecogniser:
    """Train a recogniser on ``dataset`` (one class per entry, by ``entry.char``); returns it in eval mode.

    Each step draws ``batch_size`` entries (a fresh permutation each epoch) and a fresh
    :func:`augment` of them, except a ``clean_fraction`` of the batch that stays as rendered (without
    it, clean renders are out of the training distribution and score lower than augmented ones).
    AdamW, one-cycle LR, label smoothing 0.1, bf16 autocast on CPU when ``bf16``. All randomness
    (init, batches, augmentation) follows ``seed``. ``history``, when given, receives each step's loss.
    """
    classes = [e.char for e in dataset.entries]
    if len(set(classes)) != len(classes):
        raise ValueError("duplicate emoji characters in the data set")
    images = dataset.images.float()
    n = images.shape[0]
    config = config or RecogniserConfig(num_classes=n)
    if config.num_classes != n:
        config = RecogniserConfig(**{**asdict(config), "num_classes": n})
    torch.manual_seed(seed)  # parameter init; batches and augmentation use `gen`
    gen = torch.Generator().manual_seed(seed)
    model = EmojiRecogniser(config, classes)
    decay = [p for name, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for name, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    device_type = images.device.type
    model.train()
    perm, pos = torch.randperm(n, generator=gen), 0
    t0, running = time.perf_counter(), 0.0
    for step in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.cat([perm[pos:], torch.randperm(n, generator=gen)]), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        x = augment(images[idx], gen, augment_config)
        n_clean = round(clean_fraction * idx.numel())
        if n_clean:
            x[:n_clean] = images[idx[:n_clean]]
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), idx, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        value = loss.item()
        running += value
        if history is not None:
            history.append(value)
        if progress is not None and ((step + 1) % log_every == 0 or step + 1 == steps):
            k = (step % log_every) + 1
            progress(f"step {step + 1}/{steps}  loss {running / k:.4f}  {time.perf_counter() - t0:.0f}s")
            running = 0.0
    return model.eval()


def score(model: EmojiRecogniser, images: torch.Tensor, seed: int = SCORE_SEED) -> dict[str, float]:
    """Top-1 / top-5 on ``images`` (class i = row i) clean and with one :func:`augment` draw from ``seed``."""
    targets = torch.arange(images.shape[0])
    gen = torch.Generator().manual_seed(seed)
    aug = torch.cat([augment(images[i : i + 256], gen) for i in range(0, images.shape[0], 256)])
    clean, augd = recogniser_logits(images, model), recogniser_logits(aug, model)
    return {
        "clean_top1": round(topk_accuracy(clean, targets, 1), 4),
        "clean_top5": round(topk_accuracy(clean, targets, 5), 4),
        "augmented_top1": round(topk_accuracy(augd, targets, 1), 4),
        "augmented_top5": round(topk_accuracy(augd, targets, 5), 4),
    }


def _check_classes(model: EmojiRecogniser, dataset: _EmojiLike) -> None:
    chars = [e.char for e in dataset.entries]
    if chars != model.classes:
        raise SystemExit("the data set's emoji differ from the recogniser's classes; retrain it")


def main(argv: list[str] | None = None) -> None:
    from sdengine.data.emoji import EmojiDataset

    p = argparse.ArgumentParser(prog="python -m sdengine.metrics.emoji_recogniser", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train on the emoji renders and write the weights (CPU)")
    t.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS_DIR)
    t.add_argument("--steps", type=int, default=1400)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch default)")
    t.add_argument("--clean-fraction", type=float, default=CLEAN_FRACTION, help="un-augmented share of a batch")
    t.add_argument("--no-bf16", action="store_true", help="train in float32")
    s = sub.add_parser("score", help="print clean and augmented top-1/top-5 on the renders")
    s.add_argument("--path", type=Path, default=None, help="weights folder (default: the shipped one)")
    s.add_argument("--seed", type=int, default=SCORE_SEED, help="seed of the augmented copy")
    a = p.parse_args(argv)
    if a.cmd == "score":
        model = load_emoji_recogniser(path=a.path)
        ds = EmojiDataset()
        _check_classes(model, ds)
        print(json.dumps(score(model, ds.images, a.seed)))
        return
    if a.threads:
        torch.set_num_threads(a.threads)
    ds = EmojiDataset()
    t0 = time.perf_counter()
    model = train_emoji_recogniser(
        ds,
        steps=a.steps,
        batch_size=a.batch_size,
        lr=a.lr,
        seed=a.seed,
        clean_fraction=a.clean_fraction,
        bf16=not a.no_bf16,
    )
    seconds = time.perf_counter() - t0
    command = f"python -m sdengine.metrics.emoji_recogniser train --out {a.out} --steps {a.steps} --seed {a.seed}"
    if a.batch_size != 128 or a.lr != 3e-3:
        command += f" --batch-size {a.batch_size} --lr {a.lr}"
    if a.clean_fraction != CLEAN_FRACTION:
        command += f" --clean-fraction {a.clean_fraction}"
    extra = {
        "names": [e.name for e in ds.entries],
        "input": "float32 (B, 3, H, W) in [-1, 1], white background; resized to 64x64 (bilinear, antialias)",
        "weights_dtype": "float16 (loaded as float32)",
        "train": {
            "command": command,
            "steps": a.steps,
            "batch_size": a.batch_size,
            "lr": a.lr,
            "seed": a.seed,
            "optimizer": "AdamW (wd 5e-4 on weights), one-cycle LR (15% warm-up), label smoothing 0.1",
            "bf16_autocast": not a.no_bf16,
            "threads": a.threads,
            "augmentation": asdict(AugmentConfig()),
            "clean_fraction": a.clean_fraction,
            "train_images": len(ds),
            "train_seconds": round(seconds, 1),
            "torch": torch.__version__,
        },
    }
    save_emoji_recogniser(model, a.out, extra)
    # The accuracies recorded are those of the fp16 weights read back, i.e. what load gives.
    acc = score(load_emoji_recogniser(path=a.out), ds.images)
    extra["accuracy"] = {**acc, "augmented_seed": SCORE_SEED, "on": f"the {len(ds)} renders"}
    save_emoji_recogniser(model, a.out, extra)
    print(json.dumps(acc), f"({seconds:.0f}s) -> {a.out}", flush=True)


if __name__ == "__main__":
    main()
