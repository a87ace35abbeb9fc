"""End-to-end ControlNet: sdengine's pipeline with ``controlnets=[...]`` against diffusers'
StableDiffusionControlNet(Img2Img|Inpaint)Pipeline on the same tiny random weights, fp32 CPU, batch 1
(mean absolute difference on 0..1 pixels < 1e-3, the bar of docs/CONTRACTS.md, Test oracles); an
original-layout file and the diffusers folder of the same weights give the same image.

docs/CONTRACTS.md, Test oracles: DDIM built from an SD 1.5 scheduler config defaults to clip_sample=True and
diffusers' ControlNet pipeline (unlike its SD pipelines) does not turn it off; the scheduler handed to diffusers
here is the one sdengine's sampler table names (clip_sample=False), so like is compared with like.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import _pipeline_models as _models  # noqa: E402
import sdengine  # noqa: E402
from sdengine import control as C  # noqa: E402

TOL = 1e-3
SIZE = 32  # tiny VAE: 2x, so a 16x16 latent; the ControlNets' hint encoder has 2 levels to match
STEPS = 6
PROMPT, NEGATIVE = "a red apple on a table", "blurry, dark"
SEED = 3


def _controlnet(unet, seed: int):
    net = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    _models._perturb(net, seed, 0.05)  # zero convs non-zero, so the ControlNet matters
    return net.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_sd1_folder):
    root = tmp_path_factory.mktemp("cn")
    folder = tiny_sd1_folder
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
    nets = [_controlnet(unet, 100 + k) for k in range(2)]
    paths = []
    for k, net in enumerate(nets):
        net.save_pretrained(root / f"cn{k}")
        paths.append(root / f"cn{k}")
    pipe = sdengine.load_pipeline(folder, device="cpu")
    # control maps: canny edges of a picture of another size (both sides resize to 32x32)
    maps = [C.preprocess("canny", _models.picture(40, 36, seed=k), low=30, high=90) for k in range(2)]
    maps[1] = C.preprocess("softedge", _models.picture(40, 36, seed=5))
    return folder, pipe, nets, paths, maps


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def _ref(cls_name: str, folder, nets):
    cls = getattr(diffusers, cls_name)
    ref = cls.from_pretrained(
        folder,
        controlnet=nets if len(nets) > 1 else nets[0],
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
    )
    ref.set_progress_bar_config(disable=True)
    return ref


def _pair(
    setup,
    sampler: str,
    n: int,
    scales,
    starts,
    ends,
    *,
    guess: bool = False,
    cls_name: str = "StableDiffusionControlNetPipeline",
    ours_kw=None,
    theirs_kw=None,
    cfg: float = 7.5,
):
    folder, pipe, nets, paths, maps = setup
    units = [(paths[k], maps[k], scales[k], starts[k], ends[k]) for k in range(n)]
    ours = pipe(
        PROMPT,
        NEGATIVE,
        steps=STEPS,
        sampler=sampler,
        schedule="normal",
        cfg_scale=cfg,
        seed=SEED,
        width=SIZE,
        height=SIZE,
        progress=False,
        controlnets=units,
        guess_mode=guess,
        **(ours_kw or {}),
    ).arrays
    ref = _ref(cls_name, folder, nets[:n])
    ref.scheduler = _models.diffusers_scheduler(folder, sampler)
    one = n == 1
    theirs = ref(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=cfg,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="np",
        height=SIZE,
        width=SIZE,
        controlnet_conditioning_scale=scales[0] if one else list(scales[:n]),
        control_guidance_start=starts[0] if one else list(starts[:n]),
        control_guidance_end=ends[0] if one else list(ends[:n]),
        guess_mode=guess,
        **(theirs_kw or {"image": maps[0] if one else maps[:n]}),
    ).images
    return ours, theirs


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "ddim"])
def test_one_controlnet_txt2img_matches_diffusers(setup, sampler):
    ours, theirs = _pair(setup, sampler, 1, [0.8], [0.0], [1.0])
    assert ours.std() > 0.05
    assert _mad(ours, theirs) < TOL


@pytest.mark.parametrize("sampler", ["euler", "unipc"])
def test_two_controlnets_with_scales_and_start_end_match_diffusers(setup, sampler):
    ours, theirs = _pair(setup, sampler, 2, [1.2, 0.5], [0.0, 0.3], [0.6, 1.0])
    assert _mad(ours, theirs) < TOL
    # the start/end windows matter: the same scales over all steps give another picture
    full, _ = _pair(setup, sampler, 2, [1.2, 0.5], [0.0, 0.0], [1.0, 1.0])
    assert _mad(ours, full) > 10 * _mad(ours, theirs)


def test_guess_mode_matches_diffusers(setup):
    ours, theirs = _pair(setup, "euler", 2, [1.0, 0.7], [0.0, 0.0], [1.0, 1.0], guess=True, cfg=4.0)
    assert _mad(ours, theirs) < TOL


def test_img2img_with_controlnet_matches_diffusers(setup):
    init = _models.picture(SIZE, SIZE, seed=2)
    maps = setup[4]
    ours, theirs = _pair(
        setup,
        "dpmpp_2m",
        1,
        [1.0],
        [0.1],
        [0.9],
        cls_name="StableDiffusionControlNetImg2ImgPipeline",
        ours_kw={"init_image": init, "strength": 0.7},
        theirs_kw={"image": init, "control_image": maps[0], "strength": 0.7},
    )
    assert _mad(ours, theirs) < TOL


def test_inpainting_with_controlnet_matches_diffusers(setup):
    img, mask = _models.picture(SIZE, SIZE, seed=4), _models.mask_picture(SIZE, SIZE)
    maps = setup[4]
    ours, theirs = _pair(
        setup,
        "euler",
        1,
        [0.9],
        [0.0],
        [1.0],
        cls_name="StableDiffusionControlNetInpaintPipeline",
        ours_kw={"init_image": img, "mask": mask, "strength": 1.0},
        theirs_kw={"image": img, "mask_image": mask, "control_image": maps[0], "strength": 1.0},
    )
    assert _mad(ours, theirs) < TOL


def test_original_layout_file_gives_the_same_image_as_the_diffusers_folder(setup, tmp_path):
    folder, pipe, nets, paths, maps = setup
    original = C.save_controlnet(C.load_controlnet(paths[0]), tmp_path / "control_tiny.safetensors", layout="original")
    from safetensors.torch import load_file, save_file

    published_like = tmp_path / "control_published.safetensors"  # no sdengine metadata: shapes + base only
    save_file(load_file(original), published_like)
    kw = dict(steps=4, sampler="euler", schedule="normal", seed=SEED, width=SIZE, height=SIZE, progress=False)
    a = pipe(PROMPT, NEGATIVE, controlnets=[(paths[0], maps[0], 0.9)], **kw).arrays
    for path in (original, published_like):
        b = pipe(PROMPT, NEGATIVE, controlnets=[(path, maps[0], 0.9)], **kw).arrays
        assert np.abs(a - b).max() < 1e-5  # the same weights; memory-map alignment may change the last bit


def test_a_fresh_controlnet_leaves_the_image_exactly_unchanged(setup, tmp_path):
    from sdengine.models.controlnet import ControlNet

    folder, pipe, nets, paths, maps = setup
    fresh = ControlNet.from_unet(pipe.unet, conditioning_embedding_out_channels=(16, 32))
    kw = dict(steps=4, sampler="dpmpp_2m", seed=SEED, width=SIZE, height=SIZE, progress=False)
    a = pipe(PROMPT, NEGATIVE, **kw).arrays
    b = pipe(PROMPT, NEGATIVE, controlnets=[(fresh, maps[0], 1.0)], **kw).arrays
    assert np.array_equal(a, b)


def test_bad_controlnet_settings_are_one_clear_error(setup, tmp_path):
    folder, pipe, nets, paths, maps = setup
    kw = dict(steps=2, sampler="euler", seed=SEED, width=SIZE, height=SIZE, progress=False)
    with pytest.raises(ValueError, match="start .* must be less than end"):
        pipe(PROMPT, controlnets=[(paths[0], maps[0], 1.0, 0.5, 0.5)], **kw)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"nope")
    with pytest.raises(ValueError, match="broken.png"):
        pipe(PROMPT, controlnets=[(paths[0], str(bad), 1.0)], **kw)
    with pytest.warns(UserWarning, match="outside the usual range"):
        pipe(PROMPT, controlnets=[(paths[0], maps[0], 2.5)], **kw)


def test_a_controlnet_acting_on_no_step_is_a_note(setup):
    folder, pipe, nets, paths, maps = setup
    kw = dict(steps=4, sampler="euler", seed=SEED, width=SIZE, height=SIZE, progress=False)
    r = pipe(PROMPT, controlnets=[(paths[0], maps[0], 1.0, 0.3, 0.45)], **kw)  # 4 steps: 0.25 apart
    assert [n for n in r.notes if "acts on no step" in n] == [
        f"ControlNet {paths[0].name}: guidance start 0.3 and end 0.45 hold no step of the 4 that run "
        "(step i acts when start <= i/4 and (i+1)/4 <= end, as diffusers counts): it acts on no step; "
        "widen the window or use more steps"
    ]
    assert np.array_equal(r.arrays, pipe(PROMPT, **kw).arrays)  # indeed: the image without the ControlNet
