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
from _pipeline_models import diffusers_scheduler, picture  # noqa: E402
from _sdxl_models import diffusers_sdxl, make_sdxl_folder  # noqa: E402
from sdengine.metadata import parse_parameters  # noqa: E402

TOL = 1e-4  # mean absolute difference on 0..1 pixels; seen: 3e-8 to 2e-7
SIZE, STEPS, SEED = 32, 5, 3
PROMPT, NEGATIVE = "make it red", "blurry"


@pytest.fixture(scope="module")
def xl_ip2p(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    folder = make_sdxl_folder(tmp_path_factory.mktemp("xlip2p") / "tiny-sdxl-ip2p", ip2p=True, seed=5)
    return folder, sdengine.load_pipeline(folder, device="cpu", fast_path="none")


@pytest.fixture(scope="module")
def image() -> Any:
    return picture(SIZE, SIZE)


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def _ours(pipe: Any, image: Any, negative: str = NEGATIVE, **kw: Any) -> Any:
    args: dict[str, Any] = dict(
        init_image=image, steps=STEPS, sampler="euler", schedule="normal", seed=SEED, width=SIZE, height=SIZE
    )
    args.update(kw)
    return pipe(PROMPT, negative, progress=False, **args)


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
    res = _ours(pipe, image, negative, sampler=sampler, cfg_scale=cfg, image_cfg_scale=image_cfg)
    assert res.arrays.std() > 0.05
    assert _mad(res.arrays, theirs) < TOL
    assert float(parse_parameters(res.infotexts[0])["Image CFG scale"]) == image_cfg


def test_sdxl_micro_conditioning_reaches_all_three_rows(xl_ip2p, image):
    folder, pipe = xl_ip2p
    sizes = {"original_size": (64, 48), "crops_coords_top_left": (4, 8), "target_size": (32, 40)}
    theirs = _theirs(folder, image, "euler", 6.0, 1.5, NEGATIVE, **sizes)
    ours = _ours(pipe, image, cfg_scale=6.0, image_cfg_scale=1.5, sdxl={k: list(v) for k, v in sizes.items()})
    assert _mad(ours.arrays, theirs) < TOL
    assert _mad(ours.arrays, _ours(pipe, image, cfg_scale=6.0, image_cfg_scale=1.5).arrays) > 1e-4


def test_the_image_matters_and_a1111s_rule_runs_img2img(xl_ip2p, image):
    _, pipe = xl_ip2p
    base = _ours(pipe, image, cfg_scale=6.0).arrays
    assert _mad(_ours(pipe, picture(SIZE, SIZE, seed=2), cfg_scale=6.0).arrays, base) > 1e-3
    kw = dict(strength_rule="a1111", cfg_scale=6.0, image_cfg_scale=1.5)
    assert _mad(_ours(pipe, image, strength=0.5, **kw).arrays, _ours(pipe, image, strength=0.9, **kw).arrays) > 1e-3


def test_a_single_file_loads_as_the_folder_and_converts_back_to_its_pipeline_class(xl_ip2p, image, tmp_path):
    from sdengine.weights import convert, load_checkpoint

    folder, pipe = xl_ip2p
    single = convert(folder, tmp_path / "xl-ip2p.safetensors")
    assert load_checkpoint(single).configs["unet"]["in_channels"] == 8
    other = sdengine.load_pipeline(single, device="cpu", fast_path="none")
    assert other.instruct_pix2pix and other.text_kind == "sdxl"
    np.testing.assert_allclose(_ours(other, image).arrays, _ours(pipe, image).arrays, rtol=0, atol=1e-5)
    back = convert(single, tmp_path / "folder")
    index = json.loads((back / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLInstructPix2PixPipeline"


def test_comfyuis_node_on_sdxl_samples_as_the_pipeline_at_image_scale_1(xl_ip2p, image):
    from sdengine.latent_sampling import encode_text, sample_latents
    from sdengine.pipeline.request import GenerationRequest
    from sdengine.server.comfy.nodes import RunContext, VaeHandle, image_to_tensor
    from sdengine.server.comfy.nodes_edit import instruct_pix_to_pix_conditioning

    _, pipe = xl_ip2p
    ctx = RunContext(pipeline=lambda ref: pipe, catalog=None, folders=None)  # type: ignore[arg-type]
    pos, neg = [encode_text(pipe, PROMPT)], [encode_text(pipe, NEGATIVE)]
    pos, neg, latent = instruct_pix_to_pix_conditioning(ctx, pos, neg, VaeHandle("m"), image_to_tensor(image))
    z = sample_latents(pipe, pos, neg, latent["samples"], seed=SEED, steps=STEPS, cfg=6.0, sampler="euler",
                       schedule="normal", seed_rule="sdengine")  # fmt: skip
    kw = dict(steps=STEPS, sampler="euler", schedule="normal", cfg_scale=6.0, seed=SEED, width=SIZE, height=SIZE)
    r = GenerationRequest(PROMPT, NEGATIVE, init_image=image, image_cfg_scale=1.0, progress=False, **kw)
    assert float((z - pipe.sample_latents(pipe.prepare(r))).abs().max()) < 1e-4


def test_an_edm_v_prediction_file_cosxl_is_refused_in_one_line(xl_ip2p, tmp_path):
    from safetensors.torch import load_file, save_file

    from sdengine.errors import SdengineError
    from sdengine.weights import convert

    sd = load_file(convert(xl_ip2p[0], tmp_path / "xl.safetensors"))
    sd.update({"edm_vpred.sigma_max": torch.tensor(120.0), "edm_vpred.sigma_min": torch.tensor(0.002)})
    save_file(sd, tmp_path / "cosxl_edit.safetensors")
    with pytest.raises(SdengineError, match=r"an EDM v-prediction SDXL model \(edm_vpred\.\* keys") as err:
        sdengine.load_pipeline(tmp_path / "cosxl_edit.safetensors", device="cpu")
    assert "\n" not in str(err.value)
