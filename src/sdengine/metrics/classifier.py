"""A small Fashion-MNIST CNN: the feature extractor for the Frechet distance and a class checker.

No Inception weights exist offline here, so FID-style numbers for the Fashion-MNIST models use this
network's 128-d penultimate layer instead ("FD_fmnist"). Numbers are comparable only between runs
that use the same shipped weights; they are not comparable to published FIDs.

Shipped weights: ``sdengine/assets/fmnist_classifier/model.safetensors`` (fp16, ~0.6 MB) with
``config.json`` beside it recording the architecture, the training command and the test accuracy.
They were trained on CPU with one thread (torch 2.13) by::

    python -m sdengine.metrics.classifier --out src/sdengine/assets/fmnist_classifier --epochs 8 --seed 0

Test accuracy on the 10,000 test images: 93.07% (fp16 weights as shipped; recorded in
``config.json``). Training took 38 min wall-clock on a shared, heavily loaded 2-core machine (about
2.5 min per epoch on an idle core).

Input convention is the diffusion models' one: float ``(N, 1, 32, 32)`` in ``[-1, 1]``, background
-1, the 28x28 image centred with 2 px padding (``(N, 1, 28, 28)`` is accepted and padded).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = [
    "DEFAULT_WEIGHTS_DIR",
    "ClassifierConfig",
    "FashionClassifier",
    "evaluate",
    "features",
    "load_classifier",
    "predict",
    "prepare_images",
    "train_classifier",
]

DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "assets" / "fmnist_classifier"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


@dataclass(frozen=True)
class ClassifierConfig:
    """Widths of the three conv stages, the feature size and the class count."""

    channels: tuple[int, int, int] = (32, 64, 128)
    feature_dim: int = 128
    num_classes: int = 10
    image_size: int = 32


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    # BatchNorm lets a few CPU epochs reach >92%; in eval mode it is a fixed affine map.
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class FashionClassifier(nn.Module):
    """Three conv stages (32 -> 16 -> 8 -> 4 px), global average pool, 128-d feature, linear head."""

    def __init__(self, config: ClassifierConfig = ClassifierConfig()) -> None:
        super().__init__()
        self.config = config
        c1, c2, c3 = config.channels
        self.stage1 = nn.Sequential(_conv_bn(1, c1), nn.MaxPool2d(2))  # (B, c1, 16, 16)
        self.stage2 = nn.Sequential(_conv_bn(c1, c2), _conv_bn(c2, c2), nn.MaxPool2d(2))  # (B, c2, 8, 8)
        self.stage3 = nn.Sequential(_conv_bn(c2, c3), _conv_bn(c3, c3), nn.MaxPool2d(2))  # (B, c3, 4, 4)
        self.fc = nn.Linear(c3, config.feature_dim)
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations ``(B, feature_dim)``: post-ReLU, like Inception's pool3 for FID."""
        h = self.stage3(self.stage2(self.stage1(x)))  # (B, c3, 4, 4)
        h = h.mean(dim=(2, 3))  # (B, c3)
        return F.relu(self.fc(h))  # (B, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))  # (B, num_classes) logits


def prepare_images(images: torch.Tensor) -> torch.Tensor:
    """Check / coerce to float32 ``(N, 1, 32, 32)`` in ``[-1, 1]`` (28x28 is padded with -1)."""
    x = torch.as_tensor(images)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4 or x.shape[1] != 1 or x.shape[2:] not in ((32, 32), (28, 28)):
        raise ValueError(f"expected images (N, 1, 32, 32) or (N, 1, 28, 28), got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        raise ValueError("expected float images in [-1, 1], got uint8 (see to_model_range)")
    x = x.to(torch.float32)
    if x.shape[-1] == 28:
        x = F.pad(x, (2, 2, 2, 2), value=-1.0)
    return x


def _load_from_dir(directory: Path) -> FashionClassifier:
    weights, cfg_path = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"classifier weights not found: {weights}")
    cfg_fields: dict[str, Any] = {}
    if cfg_path.is_file():
        raw = json.loads(cfg_path.read_text())["model"]
        cfg_fields = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    model = FashionClassifier(ClassifierConfig(**cfg_fields))
    state = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in load_file(weights).items()}
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


@functools.lru_cache(maxsize=4)
def _cached(directory: str) -> FashionClassifier:
    return _load_from_dir(Path(directory))


def load_classifier(directory: str | Path | None = None) -> FashionClassifier:
    """The classifier from ``directory`` (default: the shipped weights), in eval mode, frozen.

    Cached per directory (the model is read-only); call ``.to(device)`` on it as needed.
    """
    return _cached(str(Path(directory or DEFAULT_WEIGHTS_DIR).resolve()))


@torch.no_grad()
def _batched(
    fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int, device: torch.device
) -> torch.Tensor:
    x = prepare_images(images)
    outs = [fn(x[i : i + batch_size].to(device)).cpu() for i in range(0, x.shape[0], batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)


def features(images: torch.Tensor, model: FashionClassifier | None = None, batch_size: int = 500) -> torch.Tensor:
    """128-d penultimate features ``(N, 128)`` float32 on CPU, of images in ``[-1, 1]``."""
    model = model if model is not None else load_classifier()
    device = next(model.parameters()).device
    return _batched(model.eval().features, images, batch_size, device)


def predict(images: torch.Tensor, model: FashionClassifier | None = None, batch_size: int = 500) -> torch.Tensor:
    """Predicted class ids ``(N,)`` int64 (see ``data.fashion_mnist.CLASS_NAMES``)."""
    model = model if model is not None else load_classifier()
    device = next(model.parameters()).device
    return _batched(model.eval(), images, batch_size, device).argmax(dim=1)


def evaluate(model: FashionClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in ``[0, 1]``."""
    return (predict(images, model) == torch.as_tensor(labels)).float().mean().item()


def augment(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random shifts of up to ``max_shift`` px (filled with background) and horizontal flips."""
    b, _, h, w = x.shape
    xp = F.pad(x, (max_shift,) * 4, value=-1.0)  # (B, 1, H + 2s, W + 2s)
    oy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
    cols = (ox[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
    out = xp[torch.arange(b)[:, None, None], 0, rows, cols].unsqueeze(1)  # (B, 1, H, W)
    flip = torch.rand(b, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def _log(msg: str) -> None:
    print(msg, flush=True)  # flushed so progress shows when stdout is a log file


def train_classifier(
    out_path: str | Path,
    epochs: int = 8,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 3e-3,
    root: str | Path | None = None,
    threads: int | None = 1,
    limit: int | None = None,
    log: Callable[[str], None] = _log,
) -> dict[str, float]:
    """Train on the Fashion-MNIST train split, write ``model.safetensors`` + ``config.json`` to ``out_path``.

    AdamW with a one-cycle schedule, light augmentation (shifts, flips). ``threads=1`` by default so
    it does not starve a shared machine. Returns ``{"test_accuracy", "train_seconds"}``.
    """
    # Imported here so that loading the metric does not need the dataset module's deps at import time.
    from sdengine.data.fashion_mnist import CLASS_NAMES, FashionMNIST

    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)  # parameter init only; batches and augmentation use `gen` below
    gen = torch.Generator().manual_seed(seed)
    train = FashionMNIST("train", root=root, limit=limit)
    test = FashionMNIST("test", root=root)
    config = ClassifierConfig()
    model = FashionClassifier(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(train), generator=gen)
        total, n = 0.0, 0
        for i in range(0, len(train), batch_size):
            idx = perm[i : i + batch_size]
            x = augment(train.images[idx], gen)
            loss = F.cross_entropy(model(x), train.labels[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * idx.numel()
            n += idx.numel()
        acc = evaluate(model, test.images, test.labels)
        elapsed = time.perf_counter() - t0
        log(f"epoch {epoch + 1}/{epochs}  loss {total / n:.4f}  test acc {acc:.4f}  {elapsed:.0f}s")
    seconds = time.perf_counter() - t0
    out = Path(out_path)
    out.mkdir(parents=True, exist_ok=True)
    # fp16 storage keeps the shipped file under 1 MB (295k parameters); the accuracy reported is the
    # one of the fp16 weights read back, i.e. exactly what load_classifier() gives.
    state = {
        k: (v.detach().half() if v.is_floating_point() else v.detach()).contiguous()
        for k, v in model.state_dict().items()
    }
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps({"model": asdict(config)}) + "\n")
    acc = evaluate(_load_from_dir(out), test.images, test.labels)
    command = f"python -m sdengine.metrics.classifier --out {out_path} --epochs {epochs} --seed {seed}"
    if limit is not None:
        command += f" --limit {limit}"
    meta = {
        "model": asdict(config),
        "classes": CLASS_NAMES,
        "input": "float32 (N, 1, 32, 32) in [-1, 1], 28x28 Fashion-MNIST padded by 2 px of -1",
        "test_accuracy": round(acc, 4),
        "weights_dtype": "float16 (loaded as float32)",
        "train": {
            "command": command,
            "epochs": epochs,
            "seed": seed,
            "batch_size": batch_size,
            "lr": lr,
            "threads": threads,
            "train_images": len(train),
            "train_seconds": round(seconds, 1),
            "torch": torch.__version__,
        },
    }
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    _cached.cache_clear()
    return {"test_accuracy": acc, "train_seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train the Fashion-MNIST feature classifier (CPU).")
    p.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS_DIR, help="output folder")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch default)")
    p.add_argument("--root", type=Path, default=None, help="Fashion-MNIST folder (IDX .gz files)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    a = p.parse_args(argv)
    res = train_classifier(
        a.out,
        epochs=a.epochs,
        seed=a.seed,
        batch_size=a.batch_size,
        lr=a.lr,
        root=a.root,
        threads=a.threads or None,
        limit=a.limit,
    )
    print(f"test accuracy {res['test_accuracy']:.4f}  ({res['train_seconds']:.0f}s)  -> {a.out}")


if __name__ == "__main__":
    main()
