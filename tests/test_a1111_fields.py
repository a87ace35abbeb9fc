"""A1111's request fields that sdengine does not run are refused up front (a one-line 422 naming the field), never
a silently other image; requests a job could only fail on (a refiner on a non-SDXL model, a hires schedule over the
model's timesteps) are a 400 before any model loads. The field table is in docs/server.md."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from _emoji_models import make_tiny_emoji_folder
from _live_server import live_server, server_config, shared_loader

FACES = "Face restoration: CodeFormer"
SMALL = {"prompt": "a red apple", "steps": 2, "width": 16, "height": 16, "seed": 3, "sampler_name": "Euler"}


def _b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("a1111_fields")
    make_tiny_emoji_folder(tmp / "models" / "tiny")
    make_tiny_emoji_folder(tmp / "models" / "other", seed=1)
    shared_loader(str(tmp / "models" / "tiny"), "cpu")  # loaded once here, not inside the first test that runs
    return tmp


@pytest.fixture()
def counted(models: Path):
    """A live server whose loader counts the models it loads (a refusal up front loads none)."""
    loads: list[str] = []

    def loader(ref: str, device: str):
        loads.append(ref)
        return shared_loader(ref, device)

    with live_server(server_config(models, models_dir=models / "models", model="tiny"), loader=loader) as s:
        with httpx.Client(base_url=s.url, timeout=120) as client:
            yield client, loads


def _info(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text
    return json.loads(r.json()["info"])


def _image(r: httpx.Response) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))


def test_unimplemented_fields_are_a_422_naming_the_field_before_any_work(counted):
    """restore_faces, s_min_uncond, firstpass_image (hires), resize_mode 3, a latent_mask or mask_round not of
    A1111's types, an inpainting_fill A1111 lacks and a second init image were
    accepted and only listed in info["ignored"] (another image than A1111's); now each is a 422 naming it, and no
    model is loaded."""
    client, loads = counted
    init = _b64(Image.new("RGB", (16, 16), (200, 30, 30)))
    i2i = {"init_images": [init]}
    inpaint = {"init_images": [init], "mask": init}
    cases = [
        ("txt2img", {"restore_faces": True}, "restore_faces True: face restoration"),
        ("img2img", {**i2i, "restore_faces": True}, "restore_faces True"),
        ("txt2img", {"override_settings": {"face_restoration": True}}, "override_settings.face_restoration"),
        # an A1111 infotext's "Face restoration" sets its option, which A1111 reads when restore_faces is not sent
        ("txt2img", {"infotext": f"a\nSteps: 2, Seed: 1, Size: 16x16, {FACES}"}, "override_settings.face_restoration"),
        ("txt2img", {"s_min_uncond": 0.5}, "s_min_uncond 0.5"),
        ("txt2img", {"enable_hr": True, "firstpass_image": init}, "firstpass_image: the hires fix"),
        ("img2img", {**i2i, "resize_mode": 9}, "resize_mode 9"),
        ("img2img", {**i2i, "init_images": [init, init]}, "init_images: 2 images"),
        # (latent_mask and mask_round false run now, tests/test_a1111_mask_round.py; bad values are still 422s)
        ("img2img", {**inpaint, "latent_mask": 5}, "latent_mask 5: A1111's latent_mask is an image"),
        ("img2img", {**inpaint, "mask_round": "no"}, "mask_round 'no': A1111's mask_round is true"),
        ("img2img", {**inpaint, "inpainting_fill": 7}, "inpainting_fill 7"),
        ("txt2img", {"firstphase_width": 8}, "firstphase_width 8 and firstphase_height 0"),
    ]
    for route, extra, says in cases:
        r = client.post(f"/sdapi/v1/{route}", json={**SMALL, **extra})
        assert r.status_code == 422, (extra.keys(), r.text)
        detail = r.json()["detail"]
        assert detail.startswith(says) and "\n" not in detail, detail
    assert loads == []  # refused before any job: nothing loaded


def test_refiner_on_a_non_sdxl_model_is_refused_before_any_load(counted):
    """A1111's refiner_checkpoint with an SD 1.x / emoji base: it was a job that failed once the base and the
    refiner were loaded; now a 400 before the queue (by the model folder: no text_encoder_2)."""
    client, loads = counted
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "refiner_checkpoint": "other", "refiner_switch_at": 0.5})
    assert r.status_code == 400, r.text
    assert r.json()["detail"] == "refiner_checkpoint: a refiner needs an SDXL base model; 'tiny' is not one"
    assert loads == []


def test_a_schedule_over_the_models_timesteps_is_refused_before_any_load(counted):
    """A1111's rules make a schedule of steps / strength steps (the hires fix's second pass; img2img with
    img2img_fix_steps): over the model's 1000 timesteps the job failed once it ran (after the model's load);
    now a 400 up front, on the A1111 and the native routes."""
    client, loads = counted
    r = client.post(
        "/sdapi/v1/txt2img",
        json={**SMALL, "enable_hr": True, "hr_second_pass_steps": 150, "denoising_strength": 0.1},
    )
    assert r.status_code == 400 and "needs a schedule of 1500 steps" in r.text, r.text
    init = _b64(Image.new("RGB", (16, 16), (200, 30, 30)))
    body = {**SMALL, "steps": 150, "init_images": [init], "denoising_strength": 0.1}
    r = client.post("/sdapi/v1/img2img", json={**body, "override_settings": {"img2img_fix_steps": True}})
    assert r.status_code == 400 and "needs a schedule of 1500 steps" in r.text, r.text
    native = {"prompt": "a", "steps": 150, "width": 16, "height": 16, "strength": 0.1, "strength_rule": "a1111"}
    r = client.post("/v1/jobs", json={**native, "hires": {"hr_second_pass_steps": 150}})
    assert r.status_code == 400 and "needs a schedule of 1500 steps" in r.text, r.text
    assert loads == []


def test_steps_over_the_models_timesteps_are_refused_before_any_load(models):
    """A server whose --max-steps is over 1000 queued a job of 1200 steps that failed once the model was loaded
    ("steps must be at most 1000"); now a 400 up front."""
    loads: list[str] = []

    def loader(ref: str, device: str):
        loads.append(ref)
        return shared_loader(ref, device)

    config = server_config(models, models_dir=models / "models", model="tiny", max_steps=2000)
    with live_server(config, loader=loader) as s, httpx.Client(base_url=s.url, timeout=120) as client:
        r = client.post("/sdapi/v1/txt2img", json={**SMALL, "steps": 1200})
        assert r.status_code == 400 and "steps must be at most 1000" in r.json()["detail"], r.text
        r = client.post("/v1/jobs", json={"prompt": "a", "steps": 1200, "width": 16, "height": 16})
        assert r.status_code == 400 and "steps must be at most 1000" in r.json()["detail"], r.text
    assert loads == []


def test_firstphase_size_is_the_first_pass_size(counted):
    """firstphase_width / _height (A1111's __post_init__: the image, or the hires fix's first pass, has that size)
    were dropped without the hires fix and listed as ignored with it."""
    client, _ = counted
    want = client.post("/sdapi/v1/txt2img", json={**SMALL, "width": 8, "height": 24})
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "firstphase_width": 8, "firstphase_height": 24})
    assert _info(r)["ignored"] == [] and (_info(r)["width"], _info(r)["height"]) == (8, 24)
    np.testing.assert_array_equal(_image(r), _image(want))
    hires = {"enable_hr": True, "hr_scale": 2, "denoising_strength": 0.5}
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, **hires, "firstphase_width": 8, "firstphase_height": 24})
    assert _image(r).shape == (48, 16, 3) and _info(r)["ignored"] == []


def test_hr_checkpoint_of_the_same_model_and_fields_a1111_reads_not(counted):
    """hr_checkpoint_name naming the job's own model runs (A1111 reloads it: the same image). latent_mask without
    a mask and firstpass_image without the hires fix are read by A1111 neither: listed as ignored."""
    client, _ = counted
    hires = {"enable_hr": True, "hr_scale": 2, "denoising_strength": 0.5}
    plain = client.post("/sdapi/v1/txt2img", json={**SMALL, **hires})
    same = client.post("/sdapi/v1/txt2img", json={**SMALL, **hires, "hr_checkpoint_name": "tiny"})
    assert _info(same)["ignored"] == []
    np.testing.assert_array_equal(_image(same), _image(plain))
    init = _b64(Image.new("RGB", (16, 16), (200, 30, 30)))
    r = client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [init], "latent_mask": init})
    assert _info(r)["ignored"] == ["latent_mask"]
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "firstpass_image": init})
    assert _info(r)["ignored"] == ["firstpass_image"]
    # restore_faces false: A1111 restores no face whatever its option (webuiapi's default): it runs
    r = client.post(
        "/sdapi/v1/txt2img",
        json={**SMALL, "restore_faces": False, "infotext": f"a\nSteps: 2, Seed: 1, Size: 16x16, {FACES}"},
    )
    assert _info(r)["ignored"] == ["override_settings.face_restoration"]


def test_hr_checkpoint_of_another_model_runs_the_second_pass_on_it(counted, caplog):
    """hr_checkpoint_name naming another model (a 422 before): A1111 loads it for the second pass; the worker loads
    it beside the job's model and runs the second pass there: another image than the job's model alone, the
    same for the same call (the model kept), and its infotext says "Hires checkpoint". A LoRA with it is a 400
    (sdengine applies LoRAs to one model per call)."""
    client, loads = counted
    hires = {"enable_hr": True, "hr_scale": 2, "denoising_strength": 0.5}
    plain = client.post("/sdapi/v1/txt2img", json={**SMALL, **hires})
    other = client.post("/sdapi/v1/txt2img", json={**SMALL, **hires, "hr_checkpoint_name": "other"})
    assert _info(other)["ignored"] == [] and "Hires checkpoint: other" in _info(other)["infotexts"][0]
    assert np.abs(_image(other).astype(float) - _image(plain)).mean() > 1.0
    again = client.post("/sdapi/v1/txt2img", json={**SMALL, **hires, "hr_checkpoint_name": "other"})
    np.testing.assert_array_equal(_image(again), _image(other))
    assert [Path(m).name for m in loads].count("other") == 1  # kept beside the job's model
    text = _info(other)["infotexts"][0]  # its "Hires checkpoint" runs the same second pass again
    caplog.set_level("WARNING", logger="sdengine.metadata")
    pasted = client.post("/sdapi/v1/txt2img", json={"infotext": text})
    np.testing.assert_array_equal(_image(pasted), _image(other))
    # the route reproduces it (and "Hires refiner", A1111's option): not warned of as "not reproduced" (it was)
    client.post("/sdapi/v1/txt2img", json={"infotext": text + ", Hires refiner: first pass", "steps": 1})
    said = [r.getMessage() for r in caplog.records if "not reproduced" in r.getMessage()]
    assert not [m for m in said if "Hires checkpoint" in m or "Hires refiner" in m], said
    r = client.post(
        "/sdapi/v1/txt2img", json={**SMALL, **hires, "hr_checkpoint_name": "other", "prompt": "a <lora:emoji-fruit:1>"}
    )
    assert r.status_code == 400 and "LoRAs are not supported with another hires model" in r.text, r.text


def test_latent_upscale_resize_mode_resizes_the_init_latent(models):
    """A1111's img2img resize_mode 3, "Just resize (latent upscale)" (it was listed as ignored and the init image
    stretched as mode 0): the init image is encoded at its own size and its latent resized bilinearly to the
    output's, the pipeline's init_latent_resize (an init the VAE cannot encode at its size is refused)."""
    import torch
    import torch.nn.functional as F

    from sdengine.pipeline.latents import start_latents

    pipe = shared_loader(str(models / "models" / "tiny"), "cpu")
    small = Image.fromarray(np.random.default_rng(2).integers(0, 255, (8, 8, 3), dtype=np.uint8))

    def init_latent(size: int) -> torch.Tensor:
        start = start_latents(pipe.vae, generators=[torch.Generator().manual_seed(5)], latent_channels=4,
                              width=size, height=size, scale_factor=pipe.vae_scale_factor, init=small, mask=None,
                              mask_blur=0.0, strength=0.5, nine_channels=False, tiled=False,
                              device=torch.device("cpu"))  # fmt: skip
        assert start.init_latent is not None
        return start.init_latent

    f = pipe.vae_scale_factor
    own = init_latent(8)
    assert own.shape[-1] == 8 // f
    want = F.interpolate(own, size=(16 // f, 16 // f), mode="bilinear")
    np.testing.assert_allclose(init_latent(16).numpy(), want.numpy(), rtol=0, atol=1e-6)
    from sdengine.pipeline import GenerationError, GenerationRequest

    with pytest.raises(GenerationError, match="needs an init_image and takes no mask"):
        GenerationRequest(init_latent_resize=True).validate()
    with pytest.raises(GenerationError, match="init image 9x9 is encoded at its own size"):
        pipe(
            "x", init_image=small.resize((9, 9)), init_latent_resize=True, width=16, height=16, steps=2, progress=False
        )


def test_latent_upscale_resize_mode_on_the_a1111_route(models, counted):
    """resize_mode 3 on /sdapi/v1/img2img is the pipeline's init_latent_resize (another image than mode 0's), its
    infotext reads back; with a mask it is a 422 (A1111 fits the mask otherwise than the image)."""
    from sdengine.metadata import parse_parameters, to_generate_kwargs

    pipe = shared_loader(str(models / "models" / "tiny"), "cpu")
    small = Image.fromarray(np.random.default_rng(2).integers(0, 255, (8, 8, 3), dtype=np.uint8))
    client, _ = counted
    body = {**SMALL, "init_images": [_b64(small)], "denoising_strength": 0.6}
    r = client.post("/sdapi/v1/img2img", json={**body, "resize_mode": 3})
    info = _info(r)
    assert info["ignored"] == [] and "Resize mode: just resize (latent upscale)" in info["infotexts"][0]
    kw = dict(seed=3, steps=2, width=16, height=16, cfg_scale=7.0, sampler="euler", schedule="uniform")
    want = pipe("a red apple", init_image=small, strength=0.6, strength_rule="a1111", init_latent_resize=True,
                progress=False, **kw)  # fmt: skip
    np.testing.assert_array_equal(_image(r), np.asarray(want.images[0]))
    stretched = client.post("/sdapi/v1/img2img", json={**body, "resize_mode": 0})
    assert not np.array_equal(_image(stretched), _image(r))
    assert to_generate_kwargs(parse_parameters(info["infotexts"][0]))["init_latent_resize"] is True
    r = client.post("/sdapi/v1/img2img", json={**body, "resize_mode": 3, "mask": _b64(small)})
    assert r.status_code == 422 and r.json()["detail"].startswith("resize_mode 3: A1111's latent upscale takes no mask")


def test_an_infotexts_a1111_option_fields_become_overrides(counted):
    """An infotext's fields of A1111's image-changing options ("RNG", "Emphasis", "UniPC order", ...) become
    override_settings, as A1111's apply_infotext maps them: a value sdengine runs is run (UniPC's order), another is
    a 400 naming the option (it was dropped: another image, silently)."""
    client, loads = counted
    head = "a red apple\nSteps: 6, Sampler: UniPC, Seed: 3, Size: 16x16"  # order 3 needs 6 steps to show
    for field, said in (("RNG: TPU", "RNG: 'TPU'"), ("Emphasis: No norm", "emphasis 'No norm'")):
        r = client.post("/sdapi/v1/txt2img", json={"infotext": f"{head}, {field}"})
        assert r.status_code == 400 and said in r.json()["detail"], r.text
    assert loads == []  # refused before any work
    ours = client.post("/sdapi/v1/txt2img", json={"infotext": f"{head}, UniPC order: 2, RNG: CPU"})
    unipc = {**SMALL, "steps": 6, "sampler_name": "UniPC"}  # A1111's default order 3 where none is sent
    over = client.post("/sdapi/v1/txt2img", json={**unipc, "override_settings": {"uni_pc_order": 2}})
    plain = client.post("/sdapi/v1/txt2img", json=unipc)
    np.testing.assert_array_equal(_image(ours), _image(over))
    assert not np.array_equal(_image(ours), _image(plain))
    assert _info(ours)["ignored"] == []


def test_unipc_options_with_a_hires_sampler_that_has_none_are_listed_as_ignored(counted):
    """sdengine gives both passes of the hires fix the same sampler options: UniPC's order with a second-pass
    Euler is listed as ignored, as eta is (it was a 400 from the second pass: the sampler has no option order);
    so are A1111's default variant and order (bh1, 3), which are not sdengine's UniPC's own (bh2, 2)."""
    client, _ = counted
    body = {**SMALL, "sampler_name": "UniPC", "override_settings": {"uni_pc_order": 1}, "enable_hr": True}
    body.update(hr_scale=2, denoising_strength=0.5, hr_sampler_name="Euler")
    assert _info(client.post("/sdapi/v1/txt2img", json=body))["ignored"] == ["uni_pc_variant", "uni_pc_order"]
    body["override_settings"] = {"uni_pc_order": 2, "uni_pc_variant": "bh2"}  # sdengine's own: nothing lost
    assert _info(client.post("/sdapi/v1/txt2img", json=body))["ignored"] == []
    body["hr_sampler_name"] = "UniPC"
    assert _info(client.post("/sdapi/v1/txt2img", json=body))["ignored"] == []
