"""``sdengine demo`` (``make demo``): what the built-in ``emoji`` model does, in four pictures under ``outputs/``.

1. ``emoji_grid.png``: :data:`GRID_PROMPTS` (faces, animals, food, vehicles, weather, objects, symbols), one
   image each with its prompt under it; every image also as ``emoji/<slug>.png``.
2. ``img2img.png``: a rendered emoji (init) | the same picture redrawn with another prompt at strength 0.6.
3. ``controlnet.png``: canny edges of a rendered emoji | the prompt without ControlNet | with the
   ``emoji-controlnet-canny`` ControlNet at weights 0.5, 1 and 1.5 (same seed); a second row the same with the
   empty prompt, where the outline can only come from the ControlNet.
4. ``lora.png``: a fruit prompt without | with the ``emoji-fruit`` LoRA (the base model never saw fruit).

Every generated image is also written alone as a PNG carrying its A1111 ``parameters`` text (the writer
``sdengine generate`` uses), so ``sdengine generate --from-png FILE`` makes it again. A missing ControlNet
or LoRA asset skips its part with one line saying so; a missing emoji model falls back to the
class-conditional Fashion-MNIST grid of the built-in pixel DDPM.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from sdengine.errors import UsageError

from .pipeline import ASSETS, BUILTIN_SD

CONTROLNET_ASSET = ASSETS / "models" / "emoji-controlnet-canny"
LORA_ASSET = ASSETS / "loras" / "emoji-fruit.safetensors"

# Emoji names as the model's captions spell them (emoji-test.txt / the `emoji` package), no fruit (held out).
GRID_PROMPTS: tuple[str, ...] = (
    "grinning face",
    "smiling face with sunglasses",
    "ghost",
    "cat face",
    "panda",
    "unicorn",
    "pizza",
    "doughnut",
    "rocket",
    "automobile",
    "sun behind cloud",
    "rainbow",
    "soccer ball",
    "guitar",
    "red heart",
    "crown",
)
GRID_COLUMNS = 4
SCALE = 3  # nearest-neighbour upscaling of the 64x64 images in the comparison pictures

IMG2IMG_SOURCE = ("\U0001f600", "grinning face")  # rendered with Noto Color Emoji as the init image
IMG2IMG_PROMPT = "cat face"
IMG2IMG_STRENGTH = 0.6
CONTROL_SOURCE = ("\U0001f431", "cat face")  # its canny edges are the control map
CONTROL_PROMPT = "tiger face"
CONTROL_SCALES = (0.5, 1.0, 1.5)  # the ControlNet's weight in the demo's columns
LORA_PROMPT = "red apple"

EMOJI_CFG = 5.0
FMNIST_CFG = 2.0  # the pixel DDPM's class guidance (its measured best, README)
FMNIST_PER_CLASS = 8


@dataclass
class DemoResult:
    out_dir: Path
    files: list[Path] = field(default_factory=list)  # every file written, in order
    timings: dict[str, float] = field(default_factory=dict)  # seconds per part ("load", "grid", ...)
    skipped: list[str] = field(default_factory=list)  # one line per part that could not run
    fallback: bool = False  # the emoji model was missing: the Fashion-MNIST grid was made instead
    total_seconds: float = 0.0


def slug(text: str) -> str:
    """``"Sun behind cloud!"`` -> ``"sun-behind-cloud"`` (file-name safe)."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s or "image"


# ------------------------------------------------------------------------------------------------ pictures


def _font(size: int = 12) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # an old Pillow or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(text: str, width: int, draw: ImageDraw.ImageDraw, font: Any) -> list[str]:
    """Greedy word wrap to ``width`` pixels (a word longer than a line gets a line of its own)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def captioned_grid(
    images: Sequence[Image.Image],
    captions: Sequence[str],
    ncols: int,
    *,
    scale: int = SCALE,
    pad: int = 6,
    font_size: int = 12,
) -> Image.Image:
    """Tile images (all of the first one's size, upscaled ``scale``x nearest) into ``ncols`` columns with each
    caption centred under its cell (wrapped to the cell width)."""
    if not images:
        raise UsageError("no images to put in a grid")
    if len(captions) != len(images):
        raise UsageError(f"{len(images)} images but {len(captions)} captions")
    w, h = images[0].size[0] * scale, images[0].size[1] * scale
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(c, w, probe, font) for c in captions]
    line_h = font_size + 3
    text_h = line_h * max(len(x) for x in wrapped) + 4
    nrows = (len(images) + ncols - 1) // ncols
    cols = min(ncols, len(images))
    grid = Image.new("RGB", (pad + cols * (w + pad), pad + nrows * (h + text_h + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, lines) in enumerate(zip(images, wrapped, strict=True)):
        r, c = divmod(i, ncols)
        x, y = pad + c * (w + pad), pad + r * (h + text_h + pad)
        grid.paste(img.convert("RGB").resize((w, h), Image.Resampling.NEAREST), (x, y))
        for k, line in enumerate(lines):
            tw = draw.textlength(line, font=font)
            draw.text((x + (w - tw) / 2, y + h + 3 + k * line_h), line, fill="black", font=font)
    return grid


def render(char: str, size: int = 64) -> Image.Image | None:
    """The emoji ``char`` drawn with Noto Color Emoji (as the training data), or None without the font."""
    from .data.emoji import EmojiDataError, load_font, render_emoji

    try:
        arr = render_emoji(char, load_font(), size=size)
    except EmojiDataError:
        return None
    return None if arr is None else Image.fromarray(arr)


# ------------------------------------------------------------------------------------------------ the demo


def model_available(model: str | Path) -> bool:
    """A built-in name whose folder has been shipped, or an existing path."""
    key = str(model)
    if key in BUILTIN_SD:
        return (BUILTIN_SD[key] / "model_index.json").is_file()
    return Path(model).exists()


def _asset_present(path: Path) -> bool:
    return (path / "config.json").is_file() if path.is_dir() else path.is_file()


def run_demo(
    out_dir: str | Path = "outputs",
    *,
    model: str | Path = "emoji",
    device: str = "auto",
    steps: int = 20,
    sampler: str = "dpmpp_2m",
    cfg: float | None = None,
    seed: int = 0,
    progress: bool = True,
    controlnet: str | Path | None = None,
    lora: str | Path | None = None,
    echo: Callable[[str], Any] = print,
) -> DemoResult:
    """Write the demo pictures under ``out_dir`` and return what was written and how long each part took.

    ``model``: the emoji model (built-in name or folder); when it is missing the built-in Fashion-MNIST
    grid is made instead. ``cfg``: None = 5.0 for the emoji model, 2.0 for the Fashion-MNIST fallback.
    ``controlnet``/``lora``: the shipped assets by default. ``echo`` gets one line per file written, one
    per skipped part and the total time."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    res = DemoResult(out)
    if not model_available(model):
        where = BUILTIN_SD.get(str(model), Path(model))
        echo(f"demo: the emoji model is not at {where} (not trained yet?): Fashion-MNIST grid instead")
        res.fallback = True
        _fashion_mnist(
            res,
            device=device,
            steps=steps,
            sampler=sampler,
            cfg=FMNIST_CFG if cfg is None else cfg,
            seed=seed,
            echo=echo,
        )
    else:
        _emoji(
            res,
            model=model,
            device=device,
            steps=steps,
            sampler=sampler,
            cfg=EMOJI_CFG if cfg is None else cfg,
            seed=seed,
            progress=progress,
            controlnet=Path(controlnet or CONTROLNET_ASSET),
            lora=Path(lora or LORA_ASSET),
            echo=echo,
        )
    res.total_seconds = time.perf_counter() - t0
    echo(f"demo: {len(res.files)} files in {res.total_seconds:.1f} s")
    return res


def _emoji(
    res: DemoResult,
    *,
    model: str | Path,
    device: str,
    steps: int,
    sampler: str,
    cfg: float,
    seed: int,
    progress: bool,
    controlnet: Path,
    lora: Path,
    echo: Callable[[str], Any],
) -> None:
    from .control import canny
    from .metadata import save_png
    from .pipeline import load_pipeline

    out = res.out_dir
    t = time.perf_counter()
    pipe = load_pipeline(model, device=device)
    res.timings["load"] = time.perf_counter() - t
    common = {"steps": steps, "sampler": sampler, "cfg_scale": cfg, "seed": seed, "progress": progress}

    def write(img: Image.Image, name: str, what: str, text: str | None = None) -> Path:
        path = save_png(img, out / name, text) if text is not None else _save(img, out / name)
        res.files.append(path)
        echo(f"  {path}  {what}")
        return path

    def gen(prompt: str, **kw: Any) -> tuple[Image.Image, str]:
        r = pipe(prompt, **{**common, **kw})
        return r.images[0], r.infotexts[0]

    # 1. the grid
    t = time.perf_counter()
    # One batched call (every row its own generator, all seeded with ``seed``): each image is the one that
    # ``sdengine generate --seed SEED PROMPT`` makes, and a batch of 16 runs in a fraction of 16 calls' time.
    grid = pipe(list(GRID_PROMPTS), **{**common, "seed": [seed] * len(GRID_PROMPTS)})
    tiles = list(grid.images)
    for prompt, img, text in zip(GRID_PROMPTS, tiles, grid.infotexts, strict=True):
        write(img, f"emoji/{slug(prompt)}.png", repr(prompt), text)
    write(
        captioned_grid(tiles, list(GRID_PROMPTS), GRID_COLUMNS),
        "emoji_grid.png",
        f"{len(tiles)} prompts, {steps} steps {sampler}, cfg {cfg:g}, seed {seed}",
    )
    res.timings["grid"] = time.perf_counter() - t
    size = tiles[0].size

    # 2. img2img
    t = time.perf_counter()
    init = render(IMG2IMG_SOURCE[0]) or tiles[0]
    init_name = IMG2IMG_SOURCE[1] if init is not tiles[0] else GRID_PROMPTS[0]
    init = init.convert("RGB").resize(size, Image.Resampling.LANCZOS)
    img, text = gen(IMG2IMG_PROMPT, init_image=init, strength=IMG2IMG_STRENGTH)
    write(img, "img2img_result.png", f"img2img {init_name!r} -> {IMG2IMG_PROMPT!r}", text)
    write(
        captioned_grid([init, img], [f"init: {init_name}", f"{IMG2IMG_PROMPT} (strength {IMG2IMG_STRENGTH:g})"], 2),
        "img2img.png",
        "init | result",
    )
    res.timings["img2img"] = time.perf_counter() - t

    # 3. ControlNet
    if not _asset_present(controlnet):
        _skip(res, echo, "controlnet.png", controlnet, "ControlNet")
    else:
        t = time.perf_counter()
        src = render(CONTROL_SOURCE[0]) or tiles[0]
        edges = canny(src.convert("RGB")).resize(size, Image.Resampling.NEAREST)
        # Two rows, each one batched call per column: the prompt (its usual emoji has another outline than the
        # control) and the empty prompt (the structure can only come from the ControlNet); without, then
        # with the ControlNet at CONTROL_SCALES.
        prompts = [CONTROL_PROMPT, ""]
        plain_rows = pipe(prompts, **common)
        columns = [pipe(prompts, **common, controlnets=[(controlnet, edges, w)]) for w in CONTROL_SCALES]
        main = CONTROL_SCALES.index(1.0)
        write(
            columns[main].images[0],
            "controlnet_result.png",
            f"{CONTROL_PROMPT!r} with the canny ControlNet",
            columns[main].infotexts[0],
        )
        tiles, labels = [], []
        for row, name in enumerate((repr(CONTROL_PROMPT), "empty prompt")):
            tiles += [edges, plain_rows.images[row], *[c.images[row] for c in columns]]
            labels += ["canny edges", f"{name}, no ControlNet", *[f"{name}, ControlNet {w:g}" for w in CONTROL_SCALES]]
        write(
            captioned_grid(tiles, labels, 2 + len(CONTROL_SCALES)),
            "controlnet.png",
            f"control | without | with at {' / '.join(f'{w:g}' for w in CONTROL_SCALES)}; the prompt, then empty",
        )
        res.timings["controlnet"] = time.perf_counter() - t

    # 4. LoRA
    if not lora.is_file():
        _skip(res, echo, "lora.png", lora, "LoRA")
    else:
        t = time.perf_counter()
        plain, _ = gen(LORA_PROMPT)
        tag = f"<lora:{lora.stem}:1>"
        img, text = gen(f"{LORA_PROMPT} {tag}", lora_dir=lora.parent)
        write(img, "lora_result.png", f"{LORA_PROMPT!r} with {tag}", text)
        write(
            captioned_grid([plain, img], [LORA_PROMPT, f"{LORA_PROMPT} + {lora.stem} LoRA"], 2),
            "lora.png",
            "without | with the LoRA",
        )
        res.timings["lora"] = time.perf_counter() - t


def _skip(res: DemoResult, echo: Callable[[str], Any], name: str, missing: Path, what: str) -> None:
    line = f"demo: skipping {name}: the {what} {missing} is missing"
    res.skipped.append(line)
    echo(line)


def _save(img: Image.Image, path: Path) -> Path:
    from .io.images import save_image_atomic

    return save_image_atomic(img, path)


def _fashion_mnist(
    res: DemoResult,
    *,
    device: str,
    steps: int,
    sampler: str,
    cfg: float,
    seed: int,
    echo: Callable[[str], Any],
) -> None:
    """The class-conditional Fashion-MNIST grid of the built-in pixel DDPM (the demo before the emoji model)."""
    from .ddpm import PixelDDPM
    from .devices import resolve_device
    from .io.images import make_grid, save_image_atomic

    t = time.perf_counter()
    m = PixelDDPM.load("fashion-mnist", device=str(resolve_device(device)))
    per = FMNIST_PER_CLASS
    labels = [c for c in range(m.num_classes) for _ in range(per)]
    imgs = m.generate(labels, sampler=sampler, steps=steps, seed=seed, guidance_scale=cfg)
    path = save_image_atomic(
        make_grid(imgs, per, row_labels=m.class_names, scale=3), res.out_dir / "fashion_mnist_grid.png"
    )
    res.files.append(path)
    res.timings["fashion_mnist"] = time.perf_counter() - t
    echo(f"  {path}  {len(labels)} class-conditional Fashion-MNIST samples ({sampler}, {steps} steps, cfg {cfg:g})")


__all__ = ["DemoResult", "GRID_PROMPTS", "captioned_grid", "model_available", "run_demo", "slug"]
