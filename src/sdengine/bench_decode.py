"""``sdengine bench --decoders``: the cost of turning latents into pixels, sdengine's VAE decode and its tiny VAE
decode, each against diffusers' equivalent on the same weights, in one run.

* The full VAE: the model folder's ``vae/``, built as the pipeline builds it (:func:`sdengine.load_pipeline`, fp32
  on the CPU, no fast path) and called through :func:`sdengine.vae_utils.decode` with tiling off (it divides the
  latents by the VAE's ``scaling_factor`` itself); diffusers' ``AutoencoderKL`` from the same folder, called
  with ``vae.decode(latents / scaling_factor).sample``.
* The tiny VAE (TAESD's architecture, :mod:`sdengine.models.tiny_vae`): a given file or folder
  (:func:`sdengine.weights.tiny_vae_file.load_tiny_vae`), or a random one with as many levels as the VAE's
  downscale factor needs (64 channels; decoder blocks (3, 3, 3, 1) for 8x, (3, 3, 1) for 4x, (3, 1) for 2x),
  every parameter drawn from N(0, 0.05) with a fixed seed. Either is written as a diffusers ``AutoencoderTiny``
  folder in the work folder (:func:`sdengine.weights.tiny_vae_file.save_tiny_vae`), which diffusers'
  ``AutoencoderTiny.from_pretrained`` loads: the very same weights for both engines. A decoder-only file gets
  a random encoder there (diffusers loads a folder only with both halves; the decode never runs it).
* The latents: ``torch.randn(batch, C, size / f, size / f)`` from a seeded generator, the diffusion model's
  (scaled) latents. Both engines decode the whole batch in one call (the pipeline decodes a batch one image at
  a time; here both do the same work).
* Timing, as :func:`sdengine.bench.interleaved`: one warm-up call each (its output kept), then ``repeats`` timed
  calls, the two engines of a pair taking turns; medians, all in ``torch.inference_mode()``. Times only: no
  FLOP counts.
* With ``encoders`` (``--encoders``), the other direction too: images ``torch.rand(batch, 3, size, size) * 2 - 1``
  from the same seed, encoded by sdengine's VAE (:func:`sdengine.vae_utils.encode_moments`, tiling off: the
  posterior mean, scaled as the diffusion model sees it) against diffusers' ``vae.encode(x).latent_dist.mean``
  times the scaling factor, and by the tiny VAE's encoder against ``AutoencoderTiny.encode(x).latents`` (the
  tiny VAE must then have an encoder).
* Agreement: the max absolute difference of sdengine's and diffusers' outputs (images in [-1, 1], latents) for
  each pair; and the mean absolute difference of sdengine's full and tiny decodes, only reported (with random weights
  it says nothing about the tiny decoder's quality).

diffusers is only reached through ``benchmarks/peer_diffusers.py`` (:func:`sdengine.bench.peer_module`). torch is
imported inside the functions, as in the other bench modules.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdengine.bench import BenchError, EngineTimes, interleaved, load_now, peer_module

TINY_CHANNELS = 64  # TAESD's width at every level
TINY_STD = 0.05  # the random tiny VAE's weights: N(0, TINY_STD)
TINY_SEED = 0
PAIRS = ("vae", "tiny_vae")
ENCODER_PAIRS = ("vae_encode", "tiny_vae_encode")
ROW_NAMES = {
    "vae": "VAE decode",
    "tiny_vae": "tiny VAE decode",
    "vae_encode": "VAE encode",
    "tiny_vae_encode": "tiny VAE encode",
}


# ---------------------------------------------------------------------------------------------------
# The tiny VAE
# ---------------------------------------------------------------------------------------------------


def tiny_blocks(factor: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(decoder blocks, encoder blocks) per level of a TAESD-architecture tiny VAE of ``factor`` pixels per
    latent (:func:`sdengine.models.tiny_vae.taesd_config`); TAESD's (3, 3, 3, 1) / (1, 3, 3, 3) at 8x."""
    from sdengine.models.config_checks import ConfigError
    from sdengine.models.tiny_vae import taesd_config

    try:
        cfg = taesd_config(factor)
    except ConfigError as e:
        raise BenchError(f"the VAE's {e}") from None
    return cfg.decoder_blocks, cfg.encoder_blocks


def random_tiny_vae(latent_channels: int, image_channels: int, factor: int, *, seed: int = TINY_SEED) -> Any:
    """A TinyAutoencoder (both halves, :func:`sdengine.models.tiny_vae.taesd_config`) for ``factor`` x latents of
    ``latent_channels``, every parameter drawn from N(0, :data:`TINY_STD`) by a generator seeded with ``seed``."""
    from sdengine.models.tiny_vae import TinyAutoencoder, taesd_config

    tiny_blocks(factor)  # a factor no tiny VAE fits: BenchError
    cfg = taesd_config(factor, latent_channels, channels=TINY_CHANNELS, image_channels=image_channels)
    model = randomized(TinyAutoencoder(cfg), seed)
    model.name = f"random tiny VAE (seed {seed})"
    return model.eval().requires_grad_(False)


def randomized(model: Any, seed: int) -> Any:
    """``model`` with every parameter drawn from N(0, :data:`TINY_STD`), in parameter order, from ``seed``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * TINY_STD)
    return model


def given_tiny_vae(path: str | Path, latent_channels: int, image_channels: int, factor: int) -> Any:
    """``--tiny-vae``: a TAESD file or ``AutoencoderTiny`` folder, refused in one line unless it decodes the
    VAE's latents (channels, pixels per latent) to its image channels."""
    from sdengine.errors import SdengineError
    from sdengine.weights.tiny_vae_file import load_tiny_vae

    try:
        tiny = load_tiny_vae(path)
    except SdengineError as e:
        raise BenchError(f"--tiny-vae: {e}") from None
    cfg = tiny.config
    if not cfg.has_decoder:
        raise BenchError(f"--tiny-vae {path}: it has no decoder (give its taesd_decoder file)")
    if (cfg.latent_channels, cfg.image_channels, cfg.downscale_factor) != (latent_channels, image_channels, factor):
        raise BenchError(
            f"--tiny-vae {path}: it decodes {cfg.latent_channels}-channel latents at {cfg.downscale_factor}x to "
            f"{cfg.image_channels} channels, but the model's VAE does {latent_channels}-channel at {factor}x to "
            f"{image_channels}: use the tiny VAE made for this model family"
        )
    return tiny.eval().requires_grad_(False)


def diffusers_tiny_folder(tiny: Any, dst: Path) -> Path:
    """Write ``tiny`` as an ``AutoencoderTiny`` folder at ``dst`` for diffusers (its files replaced). A model
    without an encoder gets a random one (diffusers loads a folder only with both halves; decoding never runs it)."""
    import dataclasses

    from sdengine.models.tiny_vae import TinyAutoencoder
    from sdengine.weights.tiny_vae_file import save_tiny_vae

    cfg = tiny.config
    if not cfg.has_encoder:
        _, enc = tiny_blocks(cfg.downscale_factor)
        both_cfg = dataclasses.replace(cfg, has_encoder=True, encoder_channels=cfg.decoder_channels, encoder_blocks=enc)
        both = randomized(TinyAutoencoder(both_cfg), TINY_SEED)
        both.load_state_dict(tiny.state_dict(), strict=False)  # the decoder's weights: all of ``tiny``'s
        tiny = both
    return save_tiny_vae(tiny, dst)


# ---------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------


@dataclass
class DecoderPair:
    """One decoder: sdengine's times, diffusers' (None with ``--compare none``) and their agreement."""

    name: str
    sdengine: EngineTimes
    diffusers: EngineTimes | None = None
    max_abs: float | None = None  # max |sdengine - diffusers| of the warm-up outputs, images in [-1, 1]
    output_shape: list[int] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        """diffusers' median time / sdengine's (above 1: sdengine is faster)."""
        return None if self.diffusers is None else self.diffusers.median_s / self.sdengine.median_s

    def to_json(self) -> dict[str, Any]:
        def times(e: EngineTimes | None) -> dict[str, Any] | None:
            if e is None:
                return None
            return {"warmup_s": e.warmup_s, "times_s": list(e.times_s), "median_s": e.median_s, "best_s": e.best_s}

        return {
            "name": self.name,
            "sdengine": times(self.sdengine),
            "diffusers": times(self.diffusers),
            "speedup_vs_diffusers": self.ratio,
            "max_abs_vs_diffusers": self.max_abs,
            "output_shape": list(self.output_shape),
        }


@dataclass
class DecodeReport:
    model: str
    size: int
    batch: int
    repeats: int
    seed: int
    threads: str
    load: str
    latent_shape: list[int]
    tiny_vae: str  # where the tiny VAE's weights came from
    tiny_config: dict[str, Any]
    random_weights: bool  # the model's VAE or the tiny VAE has random weights
    pairs: dict[str, DecoderPair]
    full_vs_tiny_mean_abs: float
    device: str = "cpu"
    dtype: str = "fp32"
    # the warm-up outputs, (B, 3, H, W) in [-1, 1]: "<pair> <engine>" -> array; not in the JSON
    outputs: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def tiny_speedup(self) -> float:
        """sdengine's full decode median / its tiny decode median (above 1: the tiny one is faster)."""
        return self.pairs["vae"].sdengine.median_s / self.pairs["tiny_vae"].sdengine.median_s

    @property
    def tiny_encode_speedup(self) -> float | None:
        """The same for the encoders (None without ``--encoders``)."""
        if "vae_encode" not in self.pairs:
            return None
        return self.pairs["vae_encode"].sdengine.median_s / self.pairs["tiny_vae_encode"].sdengine.median_s

    def note(self) -> str:
        quality = (
            "random weights, so it says nothing about the tiny VAE's quality"
            if self.random_weights
            else "how far the tiny VAE's picture is from the full VAE's on random latents"
        )
        return (
            f"full vs tiny decode (sdengine): mean |difference| {self.full_vs_tiny_mean_abs:.3g} ([-1, 1]; {quality})"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": "decoders",
            "model": self.model,
            "size": self.size,
            "batch": self.batch,
            "repeats": self.repeats,
            "seed": self.seed,
            "device": self.device,
            "dtype": self.dtype,
            "threads": self.threads,
            "load": self.load,
            "latent_shape": list(self.latent_shape),
            "tiny_vae": self.tiny_vae,
            "tiny_config": self.tiny_config,
            "random_weights": self.random_weights,
            "decoders": {k: p.to_json() for k, p in self.pairs.items() if k in PAIRS},
            "encoders": {k: p.to_json() for k, p in self.pairs.items() if k in ENCODER_PAIRS} or None,
            "tiny_speedup_vs_full": self.tiny_speedup,
            "tiny_encode_speedup_vs_full": self.tiny_encode_speedup,
            "full_vs_tiny_mean_abs": self.full_vs_tiny_mean_abs,
            "note": self.note(),
        }

    def table(self) -> str:
        b, c, h, w = self.latent_shape
        cfg = self.tiny_config
        lines = [
            f"{self.model}: VAE {'decoders and encoders' if self.tiny_encode_speedup is not None else 'decoders'}, "
            f"{self.size}x{self.size} (latents {c}x{h}x{w}), batch {b}, {self.dtype} {self.device}, both engines "
            "take the whole batch in one call",
            f"threads: {self.threads}; warm-up + {self.repeats} interleaved repeats, medians; "
            f"load at start: {self.load}",
            f"tiny VAE: {self.tiny_vae} ({cfg['decoder_channels'][0]} channels, decoder blocks "
            f"{','.join(str(n) for n in cfg['decoder_blocks'])})",
            f"{'decoder':16s} {'sdengine s':>11s} {'diffusers s':>12s} {'ratio':>7s} {'max abs vs diffusers':>21s}",
        ]
        for p in self.pairs.values():
            theirs = f"{p.diffusers.median_s:12.3f}" if p.diffusers is not None else f"{'-':>12s}"
            ratio = f"{p.ratio:6.2f}x" if p.ratio is not None else f"{'-':>7s}"
            diff = f"{p.max_abs:21.2e}" if p.max_abs is not None else f"{'-':>21s}"
            lines.append(f"{p.name:16s} {p.sdengine.median_s:11.3f} {theirs} {ratio} {diff}")
        lines += [
            "ratio: diffusers s / sdengine s (above 1: sdengine is faster)",
            "tiny / full (sdengine): " + tiny_vs_full("decode", self.tiny_speedup),
        ]
        if self.tiny_encode_speedup is not None:
            lines.append("tiny / full encode (sdengine): " + tiny_vs_full("encode", self.tiny_encode_speedup))
        lines += [
            "note: " + self.note(),
        ]
        return "\n".join(lines)


def tiny_vs_full(what: str, speedup: float) -> str:
    """The table's words for ``speedup`` = the full VAE's median time / the tiny one's, saying which of the two is
    faster: a speed-up below 1 is written as the tiny one being slower, never as "0.05x faster"."""
    if speedup >= 1:
        return f"the tiny {what} is {speedup:.2f}x faster than the full one"
    return f"the tiny {what} is {1 / speedup:.2f}x SLOWER than the full one (speed-up {speedup:.2f}x)"


def write_json(report: DecodeReport, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return out


# ---------------------------------------------------------------------------------------------------
# The bench
# ---------------------------------------------------------------------------------------------------


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        raise BenchError(f"the engines decoded different shapes: {a.shape} vs {b.shape}")
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def run_decoders(
    folder: Path,
    *,
    model: str,
    workdir: Path,
    size: int | None = None,
    batch: int = 1,
    repeats: int = 3,
    seed: int = 0,
    tiny_vae: str | Path | None = None,
    compare: str | None = "diffusers",
    random_model: bool = False,
    encoders: bool = False,
) -> DecodeReport:
    """The bench: see the module docstring. ``workdir``: where the tiny VAE's diffusers folder is written;
    ``random_model``: the folder's weights are random (the note on the full-vs-tiny difference says so)."""
    import torch

    import sdengine
    from sdengine import vae_utils
    from sdengine.pipeline import Pipeline

    if repeats < 1:
        raise BenchError(f"--repeats must be at least 1, got {repeats}")
    if batch < 1:
        raise BenchError(f"--batch must be at least 1, got {batch}")
    if compare not in (None, "diffusers"):
        raise BenchError(f"--compare takes 'diffusers' or 'none', got {compare!r}")
    load = load_now()
    pipe = sdengine.load_pipeline(folder, device="cpu", dtype="fp32", fast_path="none")
    if not isinstance(pipe, Pipeline):
        raise BenchError(f"--decoders times a latent model's VAE; {folder} has none (a pixel-space model)")
    vae = pipe.vae
    factor = int(vae.config.downscale_factor)
    latent_c, image_c = int(vae.config.latent_channels), int(vae.config.out_channels)
    if size is None:
        size = int(pipe.default_size)
    del pipe  # the U-Net and the text encoder are not needed
    if size <= 0 or size % factor:
        raise BenchError(f"--size {size} is not a positive multiple of the VAE's downscale factor {factor}")

    if tiny_vae is not None:
        tiny = given_tiny_vae(tiny_vae, latent_c, image_c, factor)
        source = str(tiny_vae)
    else:
        tiny = random_tiny_vae(latent_c, image_c, factor)
        source = f"random TAESD architecture, N(0, {TINY_STD}), seed {TINY_SEED}"
    tiny_cfg = tiny.config
    if encoders and not tiny_cfg.has_encoder:
        raise BenchError(f"--encoders: the tiny VAE {source} has no encoder (give its taesd_encoder beside it)")
    tiny_config = {
        "latent_channels": tiny_cfg.latent_channels,
        "image_channels": tiny_cfg.image_channels,
        "decoder_channels": list(tiny_cfg.decoder_channels),
        "decoder_blocks": list(tiny_cfg.decoder_blocks),
    }

    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, latent_c, size // factor, size // factor, generator=g)

    def ours_full() -> np.ndarray:
        with torch.inference_mode():
            return vae_utils.decode(vae, latents, tiled=False, warn=False)[0].numpy()

    def ours_tiny() -> np.ndarray:
        with torch.inference_mode():
            return tiny.decode(latents).float().numpy()  # type: ignore[no-any-return]

    engines: dict[str, dict[str, Any]] = {
        "vae": {"sdengine VAE": ours_full},
        "tiny_vae": {"sdengine tiny VAE": ours_tiny},
    }
    if compare == "diffusers":
        workdir.mkdir(parents=True, exist_ok=True)
        tiny_folder = diffusers_tiny_folder(tiny, workdir / f"tiny-vae-{latent_c}ch-{factor}x-diffusers")
        peer = peer_module().Decoders(folder, tiny_folder)

        def theirs_full() -> np.ndarray:
            with torch.inference_mode():
                return peer.decode(latents).float().numpy()  # type: ignore[no-any-return]

        def theirs_tiny() -> np.ndarray:
            with torch.inference_mode():
                return peer.decode_tiny(latents).float().numpy()  # type: ignore[no-any-return]

        engines["vae"]["diffusers VAE"] = theirs_full
        engines["tiny_vae"]["diffusers tiny VAE"] = theirs_tiny
    if encoders:
        pixels = torch.rand(batch, image_c, size, size, generator=g) * 2 - 1

        def ours_encode() -> np.ndarray:
            with torch.inference_mode():
                return vae.scale_latents(vae_utils.encode_moments(vae, pixels, tiled=False).mean).numpy()

        def ours_tiny_encode() -> np.ndarray:
            with torch.inference_mode():
                return tiny.encode(pixels).float().numpy()  # type: ignore[no-any-return]

        engines["vae_encode"] = {"sdengine VAE encode": ours_encode}
        engines["tiny_vae_encode"] = {"sdengine tiny VAE encode": ours_tiny_encode}
        if compare == "diffusers":

            def theirs_encode() -> np.ndarray:
                with torch.inference_mode():
                    return peer.encode(pixels).float().numpy()  # type: ignore[no-any-return]

            def theirs_tiny_encode() -> np.ndarray:
                with torch.inference_mode():
                    return peer.encode_tiny(pixels).float().numpy()  # type: ignore[no-any-return]

            engines["vae_encode"]["diffusers VAE encode"] = theirs_encode
            engines["tiny_vae_encode"]["diffusers tiny VAE encode"] = theirs_tiny_encode

    pairs: dict[str, DecoderPair] = {}
    outputs: dict[str, np.ndarray] = {}
    for key in (*PAIRS, *(ENCODER_PAIRS if encoders else ())):
        times, images = interleaved(engines[key], repeats)
        ours_name, *theirs_name = list(engines[key])
        pair = DecoderPair(ROW_NAMES[key], times[ours_name], output_shape=list(images[ours_name].shape))
        outputs[f"{key} sdengine"] = images[ours_name]
        if theirs_name:
            pair.diffusers = times[theirs_name[0]]
            outputs[f"{key} diffusers"] = images[theirs_name[0]]
            pair.max_abs = _max_abs(images[ours_name], images[theirs_name[0]])
        pairs[key] = pair
    full_vs_tiny = float(
        np.abs(outputs["vae sdengine"].astype(np.float64) - outputs["tiny_vae sdengine"].astype(np.float64)).mean()
    )
    return DecodeReport(
        model=model,
        size=size,
        batch=batch,
        repeats=repeats,
        seed=seed,
        threads=f"{torch.get_num_threads()} torch thread(s)",
        load=load,
        latent_shape=list(latents.shape),
        tiny_vae=source,
        tiny_config=tiny_config,
        random_weights=random_model or tiny_vae is None,
        pairs=pairs,
        full_vs_tiny_mean_abs=full_vs_tiny,
        outputs=outputs,
    )


__all__ = [
    "DecodeReport",
    "DecoderPair",
    "diffusers_tiny_folder",
    "given_tiny_vae",
    "random_tiny_vae",
    "run_decoders",
    "tiny_blocks",
    "write_json",
]
