"""SDXL models trained with EDM noise conditioning (sdengine.diffusion.edm): Playground v2.5-like (EDM "epsilon", the
VAE's latents_mean / latents_std), CosXL-like (EDM v-prediction) and CosXL Edit-like (the same on an 8-channel
instruct-pix2pix U-Net) tiny random models, against diffusers' StableDiffusionXLPipeline /
StableDiffusionXLInstructPix2PixPipeline(is_cosxl_edit=True) with EDMEulerScheduler and
EDMDPMSolverMultistepScheduler (the oracle); single files with ComfyUI's markers both ways (docs/edm.md).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _pipeline_models import picture  # noqa: E402
from _sdxl_models import diffusers_sdxl, make_sdxl_folder  # noqa: E402
from sdengine.diffusion.edm import COSXL_SCHEDULER, PLAYGROUND_SCHEDULER, EDMDenoiser, EDMSchedule, edm_grid  # noqa: E402
from sdengine.errors import SdengineError  # noqa: E402

TOL = 1e-4  # mean absolute difference on 0..1 pixels
SIZE, STEPS, SEED = 32, 6, 4
PROMPT, NEGATIVE = "a red fox in the snow", "blurry"
# Playground v2.5's VAE statistics (its vae/config.json) and scaling factor
PLAYGROUND_MEAN = [-1.6574, 1.886, -1.383, 2.5155]
PLAYGROUND_STD = [8.4927, 5.9022, 6.5498, 5.2299]


def _edm_folder(dst: Path, kind: str) -> Path:
    """A tiny SDXL folder made EDM: "playground" (eps, EDMDPMSolverMultistepScheduler, VAE stats), "cosxl" (v,
    EDMEulerScheduler), "cosxl_edit" (the same, 8-channel instruct-pix2pix U-Net)."""
    folder = make_sdxl_folder(dst, ip2p=kind == "cosxl_edit", seed=11)
    sched = dict(PLAYGROUND_SCHEDULER if kind == "playground" else COSXL_SCHEDULER)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched), encoding="utf-8")
    if kind == "playground":
        vae_cfg = folder / "vae" / "config.json"
        cfg = json.loads(vae_cfg.read_text(encoding="utf-8"))
        cfg.update(latents_mean=PLAYGROUND_MEAN, latents_std=PLAYGROUND_STD, scaling_factor=0.5)
        vae_cfg.write_text(json.dumps(cfg), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    root = tmp_path_factory.mktemp("edm")
    out = {}
    for kind in ("playground", "cosxl", "cosxl_edit"):
        folder = _edm_folder(root / kind, kind)
        out[kind] = (folder, sdengine.load_pipeline(folder, device="cpu", fast_path="none"))
    return out


def _mad(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).mean())


def _scheduler(folder: Path, cls_name: str, sigma_schedule: str) -> Any:
    import diffusers

    cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    cfg.pop("_class_name")
    if cls_name == "EDMEulerScheduler":
        cfg = {k: v for k, v in cfg.items() if k not in ("solver_order",)}
    cfg["sigma_schedule"] = sigma_schedule
    return getattr(diffusers, cls_name)(**cfg)


def _theirs(folder: Path, cls_name: str, sigma_schedule: str, ip2p: bool = False, image: Any = None) -> np.ndarray:
    ref = diffusers_sdxl(folder, ip2p=ip2p)
    ref.scheduler = _scheduler(folder, cls_name, sigma_schedule)
    kw: dict[str, Any] = {}
    if ip2p:
        ref.is_cosxl_edit = True
        kw = dict(image=image, image_guidance_scale=1.5)
    out = ref(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        height=SIZE,
        width=SIZE,
        generator=torch.Generator().manual_seed(SEED),
        output_type="np",
        **kw,
    )
    return out.images[0]


def _ours(pipe: Any, sampler: str, schedule: str, **kw: Any) -> np.ndarray:
    img = pipe(
        PROMPT,
        NEGATIVE,
        steps=STEPS,
        sampler=sampler,
        schedule=schedule,
        cfg_scale=5.0,
        seed=SEED,
        width=SIZE,
        height=SIZE,
        progress=False,
        **kw,
    ).images[0]
    return np.asarray(img, dtype=np.float64) / 255.0


def _ours_float(pipe: Any, sampler: str, schedule: str, **kw: Any) -> np.ndarray:
    from sdengine.pipeline.request import GenerationRequest

    r = GenerationRequest(
        PROMPT,
        NEGATIVE,
        steps=STEPS,
        sampler=sampler,
        schedule=schedule,
        cfg_scale=5.0,
        seed=SEED,
        width=SIZE,
        height=SIZE,
        progress=False,
        **kw,
    )
    p = pipe.prepare(r)
    x = pipe.sample_latents(p)
    return pipe.decode_latents(p, x)[0].permute(1, 2, 0).double().numpy()


@pytest.mark.parametrize(
    ("kind", "cls_name", "sampler", "schedule", "sigma_schedule"),
    [
        ("playground", "EDMDPMSolverMultistepScheduler", "dpmpp_2m", "normal", "karras"),
        ("playground", "EDMEulerScheduler", "euler", "karras", "karras"),
        ("playground", "EDMEulerScheduler", "euler", "exponential", "exponential"),
        ("cosxl", "EDMEulerScheduler", "euler", "normal", "karras"),
        ("cosxl", "EDMEulerScheduler", "euler", "exponential", "exponential"),
        ("cosxl", "EDMDPMSolverMultistepScheduler", "dpmpp_2m", "karras", "karras"),
    ],
)
def test_edm_txt2img_matches_diffusers(models, kind, cls_name, sampler, schedule, sigma_schedule):
    folder, pipe = models[kind]
    if cls_name != pipe.scheduler_config["_class_name"]:  # the same model with the other EDM scheduler's config
        other = folder.parent / f"{folder.name}-{cls_name}"
        if not other.exists():
            shutil.copytree(folder, other)
            cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
            cfg["_class_name"] = cls_name
            (other / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg), encoding="utf-8")
        folder, pipe = other, sdengine.load_pipeline(other, device="cpu", fast_path="none")
    theirs = _theirs(folder, cls_name, sigma_schedule)
    ours = _ours_float(pipe, sampler, schedule)
    assert _mad(ours, theirs) < TOL


def test_cosxl_edit_matches_diffusers_is_cosxl_edit(models):
    folder, pipe = models["cosxl_edit"]
    image = picture(SIZE, SIZE)
    theirs = _theirs(folder, "EDMEulerScheduler", "karras", ip2p=True, image=image)
    ours = _ours_float(pipe, "euler", "normal", init_image=image, image_cfg_scale=1.5)
    assert _mad(ours, theirs) < TOL
