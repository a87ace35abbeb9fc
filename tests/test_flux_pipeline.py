"""Flux.1 end to end against diffusers' FluxPipeline / FluxImg2ImgPipeline / FluxInpaintPipeline on tiny random
Flux folders ([dev] with the guidance embedding, [schnell] without): loading (diffusers folders, BFL's transformer
file with ``ae``-style VAE and text-encoder files, ComfyUI's all-in-one checkpoint), conditioning, images, img2img,
inpainting, the CLI and its ``--from-png``, and the one-line refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _flux_models import diffusers_flux, make_flux_folder  # noqa: E402
from _pipeline_models import mask_picture, picture  # noqa: E402
from sdengine.cli import main  # noqa: E402
from sdengine.errors import GenerationError  # noqa: E402
from sdengine.pipeline.flux import FluxPipeline  # noqa: E402

TOL = 1e-4  # mean absolute difference on 0..1 pixels (fp32, CPU)
PROMPT, NEGATIVE = "a red apple on a table", "blurry, dark"
SEED = 3
W, H = 48, 32  # non-square; the tiny VAE is 2x: multiples of 4 (16 for Flux.1's 8x VAE)


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    folder = make_flux_folder(tmp_path_factory.mktemp("flux") / "tiny-flux-dev", guidance=True)
    return folder, sdengine.load_pipeline(folder, device="cpu"), diffusers_flux(folder)


@pytest.fixture(scope="module")
def schnell(tmp_path_factory):
    folder = make_flux_folder(tmp_path_factory.mktemp("flux") / "tiny-flux-schnell", guidance=False, seed=1)
    return folder, sdengine.load_pipeline(folder, device="cpu"), diffusers_flux(folder)


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def _theirs(ref, prompt: str = PROMPT, **kw) -> np.ndarray:
    args = dict(num_inference_steps=4, height=H, width=W, generator=torch.Generator().manual_seed(SEED))
    args.update(kw)
    return ref(prompt, output_type="np", **args).images


# -- loading and conditioning ----------------------------------------------------------------------------------


def test_loads_as_flux(dev, schnell):
    _, pipe, _ = dev
    assert isinstance(pipe, FluxPipeline) and pipe.variant == "dev" and pipe.text_kind == "flux"
    assert schnell[1].variant == "schnell"
    assert pipe.vae.config.scaling_factor == pytest.approx(0.3611)
    assert pipe.vae.config.shift_factor == pytest.approx(0.1159)
    assert pipe.latent_channels == 16 and pipe.size_multiple == 4  # 2 x the VAE's 2x (16 for Flux.1's 8x)
    assert pipe.family_defaults == {
        "steps": 28,
        "cfg_scale": 1.0,
        "sampler": "euler",
        "schedule": "normal",
        "distilled_cfg_scale": 3.5,
    }
    assert schnell[1].family_defaults["steps"] == 4 and "distilled_cfg_scale" not in schnell[1].family_defaults


def test_conditioning_matches_diffusers_encode_prompt(dev):
    _, pipe, ref = dev
    with torch.no_grad():
        states, pooled, _ = ref.encode_prompt(PROMPT, None, max_sequence_length=512)
    cond, uncond = pipe.conditioner.pair(PROMPT, "", guidance=3.5)
    assert cond["crossattn"].shape == (1, 512, 32) and cond["vector"].shape == (1, 64)
    assert float((cond["crossattn"] - states).abs().max()) < 1e-5
    assert float((cond["vector"] - pooled).abs().max()) < 1e-5
    assert cond["guidance"].tolist() == [3.5] and uncond["guidance"].tolist() == [3.5]


def test_schedule_is_diffusers_flux_grid(dev):
    """[dev]'s sigmas at 48x32: linspace(1, 1/n, n) shifted by mu of (32/2/2)*(48/2/2) = 96 tokens."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from sdengine.diffusion.flow import flow_grid

    _, pipe, ref = dev
    mu = calculate_shift(96, 256, 4096, 0.5, 1.15)
    ref.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6), mu=mu)
    grid = flow_grid(pipe.flow_schedule(W, H), 6)
    assert torch.allclose(grid.sigmas.double(), ref.scheduler.sigmas.double(), atol=1e-6)


# -- images ------------------------------------------------------------------------------------------------------


def test_dev_txt2img_matches_diffusers(dev):
    _, pipe, ref = dev
    ours = pipe(PROMPT, steps=4, seed=SEED, width=W, height=H, progress=False)
    theirs = _theirs(ref, guidance_scale=3.5)
    assert _mad(ours.arrays, theirs) < TOL
    assert ours.parameters["Distilled CFG Scale"] == 3.5 and ours.parameters["cfg_scale"] == 1.0


def test_dev_distilled_guidance_matches_diffusers(dev):
    _, pipe, ref = dev
    ours = pipe(PROMPT, steps=3, seed=SEED, width=W, height=H, distilled_cfg_scale=6.0, progress=False)
    theirs = _theirs(ref, guidance_scale=6.0, num_inference_steps=3)
    assert _mad(ours.arrays, theirs) < TOL
    plain = pipe(PROMPT, steps=3, seed=SEED, width=W, height=H, progress=False)
    assert _mad(ours.arrays, plain.arrays) > 10 * TOL  # the guidance is an input that changes the image


def test_true_cfg_matches_diffusers(dev):
    """cfg_scale above 1 with a negative prompt: diffusers' true_cfg_scale (two passes, the same guidance)."""
    _, pipe, ref = dev
    ours = pipe(PROMPT, NEGATIVE, steps=3, seed=SEED, width=W, height=H, cfg_scale=2.5, progress=False)
    theirs = _theirs(ref, negative_prompt=NEGATIVE, true_cfg_scale=2.5, guidance_scale=3.5, num_inference_steps=3)
    assert _mad(ours.arrays, theirs) < TOL


def test_schnell_txt2img_matches_diffusers(schnell):
    _, pipe, ref = schnell
    ours = pipe(PROMPT, seed=SEED, width=W, height=H, progress=False)  # schnell's 4 steps by default
    theirs = _theirs(ref)
    assert ours.parameters["steps"] == 4 and "Distilled CFG Scale" not in ours.parameters
    assert _mad(ours.arrays, theirs) < TOL


def test_batch_rows_match_diffusers_generators(dev):
    _, pipe, ref = dev
    ours = pipe([PROMPT, "a dog"], seed=[SEED, 7], steps=2, width=W, height=H, progress=False)
    gens = [torch.Generator().manual_seed(s) for s in (SEED, 7)]
    theirs = ref([PROMPT, "a dog"], num_inference_steps=2, height=H, width=W, generator=gens, output_type="np").images
    assert _mad(ours.arrays, theirs) < TOL


def test_img2img_matches_diffusers(dev):
    folder, pipe, _ = dev
    ref = diffusers_flux(folder, img2img=True)
    init = picture(W, H)
    ours = pipe(PROMPT, steps=5, seed=SEED, width=W, height=H, init_image=init, strength=0.6, progress=False)
    theirs = _theirs(ref, image=init, strength=0.6, num_inference_steps=5, guidance_scale=3.5)
    assert _mad(ours.arrays, theirs) < TOL
    assert ours.parameters["strength"] == 0.6


def test_hires_latent_second_pass_is_img2img_of_the_upscaled_latent(dev):
    """The hires fix: the first pass's latent upscaled (bilinear, "Latent"), then img2img at the larger size from
    the same seed, its schedule shifted by the larger size's token count ([dev])."""
    import torch.nn.functional as F

    from sdengine.pipeline.request import GenerationRequest

    _, pipe, _ = dev
    base = dict(prompt=PROMPT, steps=4, seed=SEED, width=W, height=H, distilled_cfg_scale=3.5, cfg_scale=1.0)
    base.update(sampler="euler", schedule="normal", progress=False)
    out = pipe(**base, enable_hr=True, hr_scale=2, hr_upscaler="Latent", strength=0.6, hr_second_pass_steps=5)
    assert out.arrays.shape == (1, 2 * H, 2 * W, 3) and "Hires upscaler: Latent" in out.infotexts[0]
    with torch.inference_mode():
        first = pipe.sample_latents(pipe.prepare(GenerationRequest(**base)))
        f = pipe.vae_scale_factor
        up = F.interpolate(first, size=(2 * H // f, 2 * W // f), mode="bilinear", antialias=False)
        p2 = pipe.prepare(GenerationRequest(**{**base, "steps": 5, "width": 2 * W, "height": 2 * H, "strength": 0.6}))
        want = pipe.decode_latents(p2, pipe.sample_latents(p2, up))
    np.testing.assert_allclose(out.arrays[0], want[0].permute(1, 2, 0).numpy(), atol=1e-6, rtol=0)


def test_hires_pixel_second_pass_is_img2img_of_the_lanczos_resized_first_image(dev):
    from PIL import Image

    _, pipe, _ = dev
    base = dict(steps=3, seed=SEED, width=W, height=H, progress=False)
    out = pipe(PROMPT, **base, enable_hr=True, hr_upscaler="Lanczos", hr_resize_x=2 * W, strength=0.5)
    big = pipe(PROMPT, **base).images[0].resize((2 * W, 2 * H), Image.Resampling.LANCZOS)
    want = pipe(PROMPT, **{**base, "width": 2 * W, "height": 2 * H}, init_image=big, strength=0.5)
    np.testing.assert_allclose(out.arrays[0], want.arrays[0], atol=1e-6, rtol=0)
    assert not np.allclose(out.arrays[0], np.asarray(big, np.float32) / 255, atol=0.05)  # the pass changed it


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_inpainting_matches_diffusers(dev, strength):
    """A mask on the plain model: the known region put back on the flow's path before every step after the first
    (FluxInpaintPipeline's blend after each step), the clean init latent at the end."""
    import diffusers

    folder, pipe, _ = dev
    ref = diffusers.FluxInpaintPipeline.from_pretrained(folder, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    init, mask = picture(W, H), mask_picture(W, H)
    ours = pipe(
        PROMPT, steps=4, seed=SEED, width=W, height=H, init_image=init, mask=mask, strength=strength, progress=False
    )
    theirs = _theirs(ref, image=init, mask_image=mask, strength=strength, guidance_scale=3.5)
    assert _mad(ours.arrays, theirs) < TOL


def test_graphs_replay_the_same_images(dev):
    """CUDA graphs' paths (recorded with the CPU stand-in): the transformer's step graph and the whole loop as one
    graph give the eager images; the distilled guidance is an input of the recorded loop, not baked in."""
    from _cpu_graphs import CPUBackend

    pipe = sdengine.load_pipeline(dev[0], device="cpu", fast_path="none")
    args = dict(steps=2, seed=SEED, width=W, height=H, progress=False)
    want = {g: pipe(PROMPT, distilled_cfg_scale=g, **args).arrays for g in (3.5, 6.0)}
    pipe.enable_cuda_graphs(backend=CPUBackend(), device_type="cpu")
    np.testing.assert_array_equal(pipe(PROMPT, **args).arrays, want[3.5])
    assert pipe.cuda_graphs["unet"].replays > 0
    pipe.cuda_graphs = None
    pipe.enable_loop_graph(backend=CPUBackend(), device_type="cpu", record_after=0)
    for g in (3.5, 6.0):
        np.testing.assert_array_equal(pipe(PROMPT, distilled_cfg_scale=g, **args).arrays, want[g])
    assert pipe.cuda_graphs["loop"].recordings == 1


def test_emphasis_is_read_as_plain_text_with_a_note(dev):
    _, pipe, _ = dev
    args = dict(steps=2, seed=SEED, width=W, height=H, progress=False)
    weighted = pipe("a (red:1.3) apple on a [table]", **args)
    np.testing.assert_array_equal(weighted.arrays, pipe("a red apple on a table", **args).arrays)
    assert any("without its emphasis weights" in n for n in weighted.notes)


def test_prompt_editing(dev):
    """A1111's prompt editing: each text encoded once (T5 and CLIP, with the call's distilled guidance), switched per
    step. Two texts that read the same to Flux (emphasis is taken out) give the plain prompt's image exactly; a
    real switch gives neither prompt's image."""
    _, pipe, _ = dev
    args = dict(steps=4, seed=SEED, width=W, height=H, progress=False)
    cat = pipe("a cat photo", **args).arrays
    same = pipe("[a (cat:1.0) photo:a cat photo:0.5]", **args).arrays
    np.testing.assert_allclose(same, cat, atol=1e-6, rtol=0)
    dog = pipe("a dog photo", **args).arrays
    switched = pipe("[a cat photo:a dog photo:0.5]", **args).arrays
    assert _mad(switched, cat) > 10 * TOL and _mad(switched, dog) > 10 * TOL
    with_cfg = pipe("[a cat photo:a dog photo:0.5]", "blurry", cfg_scale=2.0, **args).arrays
    assert _mad(with_cfg, switched) > 10 * TOL


# -- single files ------------------------------------------------------------------------------------------------


def _single_files(folder, dst):
    """The folder's weights as BFL / ComfyUI ship them: flux1 transformer, ae.safetensors, clip_l, t5xxl."""
    from safetensors.torch import load_file, save_file

    from sdengine.weights import keymaps as km
    from sdengine.weights.detect import vae_layout_from_diffusers
    from sdengine.weights.flux_file import diffusers_to_bfl

    dst.mkdir(exist_ok=True)
    transformer = diffusers_to_bfl(load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    vae = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    ae, unknown = km.vae_diffusers_to_ldm(vae, vae_layout_from_diffusers(vae))
    assert not unknown
    clip = load_file(folder / "text_encoder" / "model.safetensors")
    clip = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in clip.items()}
    t5 = load_file(folder / "text_encoder_2" / "model.safetensors")
    files = {"flux1": transformer, "ae": ae, "clip_l": clip, "t5xxl": t5}
    for name, sd in files.items():
        save_file({k: v.contiguous() for k, v in sd.items()}, dst / f"{name}.safetensors")
    return files


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_bfl_files_match_diffusers(dev, schnell, tmp_path, variant):
    """The diffusion-model file has no scheduler: [dev]'s (dynamic shift) comes from its guidance embedding,
    [schnell]'s (none) from its lack of one."""
    folder, _, ref = dev if variant == "dev" else schnell
    _single_files(folder, tmp_path)
    pipe = sdengine.load_pipeline(
        tmp_path / "flux1.safetensors",
        device="cpu",
        vae=tmp_path / "ae.safetensors",
        clip_l=tmp_path / "clip_l.safetensors",
        t5=tmp_path / "t5xxl.safetensors",
    )
    assert isinstance(pipe, FluxPipeline) and pipe.variant == variant
    ours = pipe(PROMPT, steps=3, seed=SEED, width=W, height=H, progress=False)
    assert _mad(ours.arrays, _theirs(ref, guidance_scale=3.5, num_inference_steps=3)) < TOL
    assert ours.parameters["vae"] == "ae.safetensors" and ours.parameters["vae_hash"]


def test_comfyui_all_in_one_matches_diffusers(dev, tmp_path):
    from safetensors.torch import save_file

    folder, _, ref = dev
    parts = _single_files(folder, tmp_path / "parts")
    one = {f"model.diffusion_model.{k}": v for k, v in parts["flux1"].items()}
    one.update({f"vae.{k}": v for k, v in parts["ae"].items()})
    one.update({f"text_encoders.clip_l.transformer.{k}": v for k, v in parts["clip_l"].items()})
    one.update({f"text_encoders.t5xxl.transformer.{k}": v for k, v in parts["t5xxl"].items()})
    save_file({k: v.contiguous() for k, v in one.items()}, tmp_path / "flux1-dev-comfy.safetensors")
    pipe = sdengine.load_pipeline(tmp_path / "flux1-dev-comfy.safetensors", device="cpu")
    ours = pipe(PROMPT, steps=2, seed=SEED, width=W, height=H, progress=False)
    assert _mad(ours.arrays, _theirs(ref, guidance_scale=3.5, num_inference_steps=2)) < TOL


def test_missing_parts_name_their_flag(dev, tmp_path):
    folder, _, _ = dev
    _single_files(folder, tmp_path)
    model = tmp_path / "flux1.safetensors"
    parts = {"vae": tmp_path / "ae.safetensors", "clip_l": tmp_path / "clip_l.safetensors"}
    parts["t5"] = tmp_path / "t5xxl.safetensors"
    for left_out, flag in (("vae", "--vae"), ("clip_l", "--clip-l"), ("t5", "--t5")):
        given = {k: v for k, v in parts.items() if k != left_out}
        with pytest.raises(GenerationError, match=f"flux1.safetensors holds no .* give it with {flag} FILE"):
            sdengine.load_pipeline(model, device="cpu", **given)
    with pytest.raises(GenerationError, match="--clip-l nope.safetensors: no such file or folder"):
        sdengine.load_pipeline(model, device="cpu", **{**parts, "clip_l": "nope.safetensors"})


# -- refusals ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"guess_mode": True}, "guess_mode: guess_mode is a U-Net ControlNet setting"),
        ({"pag_scale": 1.0}, "pag_scale: perturbed-attention guidance"),
        ({"clip_skip": 2}, "clip_skip 2 does not apply to Flux"),
        ({"width": 50}, "width 50 is not a multiple of 4"),
        ({"distilled_cfg_scale": -1.0}, r"distilled_cfg_scale must be in \[0, 100\]"),
        ({"sampler": "ddim"}, "sampler 'ddim' cannot run on a flow model"),
        ({"strength_rule": "a1111", "init_image": picture(W, H)}, "strength_rule 'a1111': A1111's step rules"),
        ({"shift": 2.0}, "shift: Flux .dev. shifts its schedule by the image size"),
    ],
)
def test_refuses_what_flux_does_not_take(dev, kwargs, message):
    _, pipe, _ = dev
    args = {"prompt": PROMPT, "steps": 2, "width": W, "height": H, "progress": False, **kwargs}
    with pytest.raises(GenerationError, match=message):
        pipe(**args)


def test_hires_on_another_model_is_refused(dev, schnell):
    with pytest.raises(GenerationError, match="hr_model: the hires fix's second pass runs on tiny-flux-dev itself"):
        dev[1](PROMPT, steps=2, width=W, height=H, enable_hr=True, hr_model=schnell[1], progress=False)


def test_schnell_refuses_distilled_guidance(schnell):
    with pytest.raises(GenerationError, match=r"distilled_cfg_scale \(--guidance\) applies to FLUX.1 \[dev\]"):
        schnell[1](PROMPT, steps=1, width=W, height=H, distilled_cfg_scale=3.5, progress=False)


def test_sd_model_refuses_distilled_guidance(tiny_sd1_folder):
    pipe = sdengine.load_pipeline(tiny_sd1_folder, device="cpu")
    with pytest.raises(GenerationError, match=r"distilled_cfg_scale \(--guidance\) applies to FLUX.1 .dev. only"):
        pipe(PROMPT, steps=1, distilled_cfg_scale=3.5, progress=False)


def test_text_encoder_flags_refused_for_sd(tiny_sd1_folder):
    with pytest.raises(
        GenerationError, match="--t5 give an SD3 model's text encoders; this is not an SD3 model, nor a Flux one"
    ):
        sdengine.load_pipeline(tiny_sd1_folder, device="cpu", t5="t5xxl.safetensors")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prediction_type": "epsilon"}, "prediction_type: a Flux transformer predicts the flow's velocity"),
        ({"config": "x.yaml"}, "config= does not apply"),
        ({"embeddings_dir": "."}, "textual-inversion embeddings"),
        ({"clip_g": "clip_g.safetensors"}, "clip_g .--clip-g. is SD3's OpenCLIP bigG"),
    ],
)
def test_flux_load_refusals(dev, kwargs, message):
    with pytest.raises(GenerationError, match=rf"tiny-flux-dev \(Flux\): {message}"):
        sdengine.load_pipeline(dev[0], device="cpu", **kwargs)


# -- the command line --------------------------------------------------------------------------------------------


def test_cli_defaults_infotext_and_from_png(dev, tmp_path):
    from PIL import Image

    from sdengine.metadata import parse_parameters, read_png_parameters

    folder, _, ref = dev
    out = tmp_path / "a.png"
    args = ["generate", "--model", str(folder), PROMPT, "--steps", "3", "--seed", str(SEED)]
    assert main([*args, "--width", str(W), "--height", str(H), "--out", str(out), "--no-progress"]) == 0
    parsed = parse_parameters(read_png_parameters(out))
    assert float(parsed["Distilled CFG Scale"]) == 3.5 and float(parsed["CFG scale"]) == 1.0
    assert parsed["Sampler"] == "Euler" and parsed["Steps"] == "3"
    first = np.asarray(Image.open(out), dtype=np.float32) / 255
    assert _mad(first, _theirs(ref, guidance_scale=3.5, num_inference_steps=3)[0]) < 1.0 / 255
    again = tmp_path / "b.png"
    assert main(["generate", "--from-png", str(out), "--model", str(folder), "--out", str(again), "--no-progress"]) == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))
    guided = tmp_path / "c.png"
    assert (
        main([*args, "--width", str(W), "--height", str(H), "--guidance", "5", "--out", str(guided), "--no-progress"])
        == 0
    )
    assert float(parse_parameters(read_png_parameters(guided))["Distilled CFG Scale"]) == 5.0


def test_cli_prompt_list_takes_flux_defaults(dev, tmp_path):
    """``generate --prompts``: each line runs with Flux's defaults where neither a flag nor the line sets them."""
    from sdengine.metadata import parse_parameters, read_png_parameters

    folder, _, _ = dev
    prompts = tmp_path / "list.txt"
    prompts.write_text(f"{PROMPT}\n--prompt 'a dog' --cfg_scale 2 --steps 2\n")
    args = ["generate", "--model", str(folder), "--prompts", str(prompts), "--width", str(W), "--height", str(H)]
    assert main([*args, "--steps", "3", "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    first, second = sorted((tmp_path / "out").glob("*.png"))
    a = parse_parameters(read_png_parameters(first))
    b = parse_parameters(read_png_parameters(second))
    assert (a["Steps"], float(a["CFG scale"]), a["Sampler"]) == ("3", 1.0, "Euler")  # the flag, Flux's cfg and sampler
    assert (b["Steps"], float(b["CFG scale"])) == ("2", 2.0)  # the line's


def test_server_native_job_runs_flux(dev, tmp_path):
    """``sdengine serve`` with a Flux folder in its models folder: a native job gives the pipeline's image, A1111's
    txt2img route runs it with a flow scheduler and Forge's ``distilled_cfg_scale`` (tests/test_server_dit.py tests
    the server's Flux and SD3 settings further)."""
    pytest.importorskip("fastapi")
    import base64
    import io
    import json
    import shutil

    import httpx
    from PIL import Image

    from _live_server import live_server, run_job, server_config

    folder, pipe, _ = dev
    models = tmp_path / "models"
    shutil.copytree(folder, models / "tiny-flux")
    body = {"prompt": PROMPT, "steps": 3, "width": W, "height": H, "seed": 5, "cfg_scale": 1.0}
    want = pipe(PROMPT, steps=3, seed=5, width=W, height=H, progress=False)
    with live_server(server_config(tmp_path, models_dir=models)) as server:
        with httpx.Client(base_url=server.url, timeout=300) as client:
            job = {**body, "model": "tiny-flux", "sampler": "euler", "schedule": "normal"}
            pixels, _ = run_job(client, job)
            np.testing.assert_array_equal(pixels, np.asarray(want.images[0]))
            a1111 = {**body, "override_settings": {"sd_model_checkpoint": "tiny-flux"}, "sampler_name": "Euler"}
            r = client.post("/sdapi/v1/txt2img", json={**a1111, "scheduler": "Simple", "distilled_cfg_scale": 5})
            assert r.status_code == 200, r.text
            image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
            text = image.info["parameters"]
            assert "Distilled CFG Scale: 5" in text and "Schedule type: Simple" in text and "CFG scale: 1," in text
            assert "distilled_cfg_scale" not in json.loads(r.json()["info"])["ignored"]  # Forge's field: run
