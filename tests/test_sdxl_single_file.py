"""SDXL single files (sgm layout): written by sdengine's convert, read by diffusers' from_single_file with
the same images, and read back by sdengine; configs synthesised from the shapes of the full-size networks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _sdxl_models import make_sdxl_folder  # noqa: E402
from sdengine.models.clip_text import SD1, SDXL_G, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402
from sdengine.models.unet import UNet, UNetConfig  # noqa: E402
from sdengine.models.unet_sdxl import SDXL_BASE, SDXL_REFINER  # noqa: E402
from sdengine.weights import keymaps as km  # noqa: E402
from sdengine.weights.io import load_file  # noqa: E402
from sdengine.weights.loading import convert  # noqa: E402
from sdengine.weights.sdxl_files import (  # noqa: E402
    BIGG_PREFIX,
    CLIP_L_PREFIX,
    sdxl_unet_config_from_ldm,
    unet_table,
)

TOL = 1e-3
SIZE, STEPS, SEED = 32, 4, 7
PROMPT, NEGATIVE = "a red apple on a table", "blurry"


def _mad(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-single")
    folder = make_sdxl_folder(root / "tiny-sdxl")
    path = convert(folder, root / "tiny-sdxl.safetensors")
    return folder, path


def _diffusers_images(pipe, sampler_cls=None):
    import diffusers

    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator("cpu").manual_seed(SEED)
    return pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        width=SIZE,
        height=SIZE,
        generator=gen,
        output_type="np",
    ).images


def test_written_file_has_sgm_names(files):
    _, path = files
    sd, _ = load_file(path)
    assert "model.diffusion_model.label_emb.0.0.weight" in sd and "model.diffusion_model.label_emb.0.2.bias" in sd
    assert CLIP_L_PREFIX + "text_model.final_layer_norm.weight" in sd
    assert BIGG_PREFIX + "transformer.resblocks.0.attn.in_proj_weight" in sd
    assert sd[BIGG_PREFIX + "text_projection"].shape == (48, 32)  # (width, projection): x @ P
    assert not any(k.startswith(("cond_stage_model.", "unet.", "text_encoder")) for k in sd)


def test_diffusers_from_single_file_makes_the_same_images(files):
    import diffusers

    folder, path = files
    ref = _diffusers_images(diffusers.StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True))
    single = diffusers.StableDiffusionXLPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    got = _diffusers_images(single)
    mad = _mad(got, ref)
    print(f"diffusers from_single_file(sdengine's SDXL file) vs the folder: mean abs {mad:.2e}")
    assert mad < TOL
    ours = sdengine.load_pipeline(path, device="cpu", config=folder)
    mine = ours(
        PROMPT,
        NEGATIVE,
        steps=STEPS,
        sampler="euler",
        schedule="normal",
        cfg_scale=5.0,
        seed=SEED,
        width=SIZE,
        height=SIZE,
        progress=False,
    ).arrays
    mad = _mad(mine, ref)
    print(f"sdengine on the single file vs diffusers on the folder: mean abs {mad:.2e}")
    assert mad < TOL


def _ldm_unet(cfg: UNetConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        sd = UNet(cfg).state_dict()
    ldm, bad = km.rename_keys(sd, unet_table(km.UNetLayout.from_config(cfg.to_diffusers())), to_diffusers=False)
    assert not bad
    return ldm


@pytest.mark.parametrize("cfg", [SDXL_BASE, SDXL_REFINER], ids=["base", "refiner"])
def test_full_size_unet_config_is_read_off_the_shapes(cfg):
    synthesised = sdxl_unet_config_from_ldm(_ldm_unet(cfg))
    assert UNetConfig.from_diffusers(synthesised) == cfg


def test_full_size_text_encoder_configs_are_read_off_the_shapes():
    from sdengine.weights.sdxl_files import sdxl_ldm_to_components

    with torch.device("meta"):
        te1 = CLIPTextModel(SD1).state_dict()
        te2 = CLIPTextModelWithProjection(SDXL_G).state_dict()
    big, _ = km.openclip_diffusers_to_ldm(
        {k: v for k, v in te2.items() if k != "text_projection.weight"}, pad_unused_last_block=False
    )
    big["text_projection"] = te2["text_projection.weight"].t()
    flat = {CLIP_L_PREFIX + k: v for k, v in te1.items()}
    flat.update({BIGG_PREFIX + k: v for k, v in big.items()})
    flat.update({km.UNET_PREFIX + k: v for k, v in _ldm_unet(SDXL_BASE).items()})
    comps, cfgs, family, _ = sdxl_ldm_to_components(flat)
    assert family == "sdxl"
    assert CLIPTextConfig.from_transformers(cfgs["text_encoder"]) == SD1
    assert CLIPTextConfig.from_transformers(cfgs["text_encoder_2"]) == SDXL_G
    assert set(comps["text_encoder_2"]) == set(te2)


def test_single_file_converts_to_a_folder_diffusers_loads(files, tmp_path):
    """single file -> diffusers folder (no config given: tokenizers are written, configs read off the shapes
    where the file's metadata does not carry them) -> the same images in diffusers and sdengine."""
    import diffusers

    folder, path = files
    out = convert(path, tmp_path / "from-single")
    ref = _diffusers_images(diffusers.StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True))
    again = diffusers.StableDiffusionXLPipeline.from_pretrained(out, local_files_only=True)
    assert again.config.force_zeros_for_empty_prompt is True
    mad = _mad(_diffusers_images(again), ref)
    print(f"diffusers on convert(single file -> folder) vs the original folder: mean abs {mad:.2e}")
    assert mad < TOL
    ours = sdengine.load_pipeline(out, device="cpu")
    assert ours.vae.config.scaling_factor == pytest.approx(0.13025)


def test_refiner_single_file_round_trip(tmp_path):
    """The refiner's file has bigG alone under conditioner.embedders.0.model.; back to a folder it loads as
    a refiner again and makes the same image."""
    folder = make_sdxl_folder(tmp_path / "tiny-refiner", refiner=True, seed=5)
    path = convert(folder, tmp_path / "tiny-refiner.safetensors")
    sd, _ = load_file(path)
    assert "conditioner.embedders.0.model.text_projection" in sd
    assert not any(k.startswith((CLIP_L_PREFIX, BIGG_PREFIX)) for k in sd)
    a = sdengine.load_pipeline(folder, device="cpu")
    b = sdengine.load_pipeline(path, device="cpu", config=folder)
    c = sdengine.load_pipeline(convert(path, tmp_path / "back"), device="cpu")
    from _pipeline_models import picture

    kw = dict(steps=4, sampler="euler", seed=SEED, init_image=picture(SIZE, SIZE), strength=0.5, progress=False)
    ia, ib, ic = (p(PROMPT, NEGATIVE, **kw).arrays for p in (a, b, c))
    assert b.refiner and c.refiner
    assert _mad(ia, ib) < 1e-5 and _mad(ia, ic) < 1e-5  # same tensors; memory layout may differ (transposes)
