"""SDXL InstructPix2Pix (8-channel SDXL U-Nets, diffusers' StableDiffusionXLInstructPix2PixPipeline): sdengine's
pipeline against diffusers' on the same tiny random weights (the oracle), SDXL's micro-conditioning in every row,
the single file both ways, and ComfyUI's InstructPixToPixConditioning on it (docs/instruct-pix2pix.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _ip2p import NEGATIVE, PROMPT, SEED, SIZE, STEPS, comfy_and_pipeline_latents, mad, run_ip2p  # noqa: E402
from _pipeline_models import diffusers_scheduler, picture  # noqa: E402
from _sdxl_models import diffusers_sdxl, make_sdxl_folder  # noqa: E402
from sdengine.metadata import parse_parameters  # noqa: E402

TOL = 1e-4  # mean absolute difference on 0..1 pixels; seen: 3e-8 to 2e-7


@pytest.fixture(scope="module")
def xl_ip2p(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    folder = make_sdxl_folder(tmp_path_factory.mktemp("xlip2p") / "tiny-sdxl-ip2p", ip2p=True, seed=5)
    return folder, sdengine.load_pipeline(folder, device="cpu", fast_path="none")


@pytest.fixture(scope="module")
def image() -> Any:
    return picture(SIZE, SIZE)


def _theirs(folder: Path, image: Any, sampler: str, cfg: float, image_cfg: float, negative: str, **kw: Any) -> Any:
    ref = diffusers_sdxl(folder, ip2p=True)
    ref.scheduler = diffusers_scheduler(folder, sampler, "normal")
    return ref(
        PROMPT,
        image=image,
        negative_prompt=negative or None,  # diffusers zeroes the negative rows for None only (sdengine: "" too)
        num_inference_steps=STEPS,
        guidance_scale=cfg,
        image_guidance_scale=image_cfg,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="np",
        height=SIZE,
        width=SIZE,
        **kw,
    ).images


@pytest.mark.parametrize(
    "sampler,cfg,image_cfg,negative",
    [
        ("euler", 7.5, 1.5, NEGATIVE),  # diffusers' defaults: the three-way guidance
        ("dpmpp_2m", 5.0, 1.0, ""),  # image scale 1, the empty negative prompt zeroed (force_zeros_for_empty_prompt)
        ("euler", 3.0, 0.5, NEGATIVE),  # image scale below 1: diffusers guides not at all
    ],
)
def test_matches_diffusers_sdxl_instruct_pix2pix(xl_ip2p, image, sampler, cfg, image_cfg, negative):
    folder, pipe = xl_ip2p
    assert pipe.instruct_pix2pix and pipe.text_kind == "sdxl"
    theirs = _theirs(folder, image, sampler, cfg, image_cfg, negative)
    res = run_ip2p(pipe, image, negative, sampler=sampler, cfg_scale=cfg, image_cfg_scale=image_cfg)
    assert res.arrays.std() > 0.05
    assert mad(res.arrays, theirs) < TOL
    assert float(parse_parameters(res.infotexts[0])["Image CFG scale"]) == image_cfg


def test_sdxl_micro_conditioning_reaches_all_three_rows(xl_ip2p, image):
    folder, pipe = xl_ip2p
    sizes = {"original_size": (64, 48), "crops_coords_top_left": (4, 8), "target_size": (32, 40)}
    theirs = _theirs(folder, image, "euler", 6.0, 1.5, NEGATIVE, **sizes)
    ours = run_ip2p(pipe, image, cfg_scale=6.0, image_cfg_scale=1.5, sdxl={k: list(v) for k, v in sizes.items()})
    assert mad(ours.arrays, theirs) < TOL
    assert mad(ours.arrays, run_ip2p(pipe, image, cfg_scale=6.0, image_cfg_scale=1.5).arrays) > 1e-4


def test_the_image_matters_and_a1111s_rule_runs_img2img(xl_ip2p, image):
    _, pipe = xl_ip2p
    base = run_ip2p(pipe, image, cfg_scale=6.0).arrays
    assert mad(run_ip2p(pipe, picture(SIZE, SIZE, seed=2), cfg_scale=6.0).arrays, base) > 1e-3
    kw = dict(strength_rule="a1111", cfg_scale=6.0, image_cfg_scale=1.5)
    assert (
        mad(run_ip2p(pipe, image, strength=0.5, **kw).arrays, run_ip2p(pipe, image, strength=0.9, **kw).arrays) > 1e-3
    )


def test_a_single_file_loads_as_the_folder_and_converts_back_to_its_pipeline_class(xl_ip2p, image, tmp_path):
    from sdengine.weights import convert, load_checkpoint

    folder, pipe = xl_ip2p
    single = convert(folder, tmp_path / "xl-ip2p.safetensors")
    assert load_checkpoint(single).configs["unet"]["in_channels"] == 8
    other = sdengine.load_pipeline(single, device="cpu", fast_path="none")
    assert other.instruct_pix2pix and other.text_kind == "sdxl"
    np.testing.assert_allclose(run_ip2p(other, image).arrays, run_ip2p(pipe, image).arrays, rtol=0, atol=1e-5)
    back = convert(single, tmp_path / "folder")
    index = json.loads((back / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLInstructPix2PixPipeline"


def test_comfyuis_node_on_sdxl_samples_as_the_pipeline_at_image_scale_1(xl_ip2p, image):
    _, pipe = xl_ip2p
    z, ours, _ = comfy_and_pipeline_latents(pipe, image, cfg=6.0, schedule="normal")
    assert float((z - ours).abs().max()) < 1e-4


def test_an_edm_v_prediction_file_cosxl_edit_runs_as_an_edm_model(xl_ip2p, image, tmp_path):
    """ComfyUI's edm_vpred.* markers (Stability's CosXL Edit) make the file an EDM v-prediction model (sigma_data 1,
    the file's sigma range) with the image latent scaled as diffusers' is_cosxl_edit; never an epsilon model.
    Parity with diffusers: tests/test_edm.py."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from sdengine.diffusion.edm import EDMSchedule
    from sdengine.errors import SdengineError
    from sdengine.weights import convert

    ours = convert(xl_ip2p[0], tmp_path / "xl.safetensors")
    with safe_open(str(ours), "pt") as f:
        configs = json.loads(f.metadata()["sdengine.configs"])
    configs.pop("scheduler")  # the tiny networks' configs stay; the markers alone say how it samples
    sd = load_file(ours)
    sd.update({"edm_vpred.sigma_max": torch.tensor(120.0), "edm_vpred.sigma_min": torch.tensor(0.002)})
    save_file(sd, tmp_path / "cosxl_edit.safetensors", metadata={"sdengine.configs": json.dumps(configs)})
    pipe = sdengine.load_pipeline(tmp_path / "cosxl_edit.safetensors", device="cpu", fast_path="none")
    sched = pipe.noise_schedule
    assert isinstance(sched, EDMSchedule) and pipe.instruct_pix2pix
    assert (sched.prediction, sched.sigma_min, sched.sigma_max, sched.sigma_data) == ("v_prediction", 0.002, 120.0, 1.0)
    assert pipe.scheduler_config["_class_name"] == "EDMEulerScheduler"
    edm = np.asarray(run_ip2p(pipe, image, cfg_scale=5.0).images[0])
    vp = np.asarray(run_ip2p(xl_ip2p[1], image, cfg_scale=5.0).images[0])
    assert mad(edm, vp) > 1.0  # not the epsilon model's images
    with pytest.raises(SdengineError, match="sampler 'ddim' cannot run on an EDM model") as err:
        run_ip2p(pipe, image, sampler="ddim")
    assert "\n" not in str(err.value)
