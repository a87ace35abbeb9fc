"""InstructPix2Pix (Brooks et al. 2023): sdengine's pipeline on an 8-channel U-Net against diffusers'
StableDiffusionInstructPix2PixPipeline on the same tiny random weights (the oracle), the three-way guidance's rows
and formula, A1111's rule, the single-file load, the CLI and the A1111 route against the Python call, and the
one-line errors (docs/instruct-pix2pix.md).
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _ip2p import NEGATIVE, PROMPT, SEED, SIZE, STEPS, comfy_and_pipeline_latents, comfy_conditioning, mad, run_ip2p  # noqa: E402
from _pipeline_models import diffusers_pipeline, diffusers_scheduler, make_sd_folder, picture  # noqa: E402
from sdengine.diffusion.guidance import ImageCFGDenoiser  # noqa: E402
from sdengine.errors import SdengineError  # noqa: E402
from sdengine.metadata import parse_parameters, to_generate_kwargs  # noqa: E402

TOL = 1e-4  # mean absolute difference on 0..1 pixels; seen: 7e-8 to 3e-7


@pytest.fixture(scope="module")
def ip2p(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    folder = make_sd_folder(tmp_path_factory.mktemp("ip2p") / "tiny-ip2p", kind="ip2p")
    return folder, sdengine.load_pipeline(folder, device="cpu", fast_path="none")


@pytest.fixture(scope="module")
def image() -> Any:
    return picture(SIZE, SIZE)


def _theirs(folder: Path, image: Any, sampler: str, cfg: float, image_cfg: float) -> np.ndarray:
    ref = diffusers_pipeline(folder, "ip2p")
    ref.scheduler = diffusers_scheduler(folder, sampler, "normal")
    return ref(
        PROMPT,
        image=image,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=cfg,
        image_guidance_scale=image_cfg,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="np",
    ).images


@pytest.mark.parametrize(
    "sampler,cfg,image_cfg",
    [
        ("euler", 7.5, 1.5),  # diffusers' defaults
        ("dpmpp_2m", 7.5, 1.5),
        ("euler", 4.0, 2.5),
        ("dpmpp_2m", 5.0, 1.0),  # image scale 1: CFG with the image in both rows
        ("euler", 3.0, 0.5),  # image scale below 1: diffusers guides not at all (the prompt's rows alone)
        ("dpmpp_2m", 1.0, 2.0),  # cfg 1: the same
    ],
)
def test_matches_diffusers_instruct_pix2pix(ip2p, image, sampler, cfg, image_cfg):
    folder, pipe = ip2p
    theirs = _theirs(folder, image, sampler, cfg, image_cfg)
    res = run_ip2p(pipe, image, sampler=sampler, cfg_scale=cfg, image_cfg_scale=image_cfg)
    assert res.arrays.std() > 0.05
    assert mad(res.arrays, theirs) < TOL
    fields = parse_parameters(res.infotexts[0])
    assert float(fields["Image CFG scale"]) == image_cfg
    assert "Denoising strength" not in fields  # diffusers' rule: pure noise, the strength is not used


def test_the_image_scale_changes_the_image_and_none_is_diffusers_default(ip2p, image):
    _, pipe = ip2p
    at_1 = run_ip2p(pipe, image, image_cfg_scale=1.0).arrays
    at_15 = run_ip2p(pipe, image, image_cfg_scale=1.5).arrays
    assert mad(at_1, at_15) > 1e-3
    default = run_ip2p(pipe, image)
    np.testing.assert_array_equal(default.arrays, at_15)
    assert parse_parameters(default.infotexts[0])["Image CFG scale"] == "1.5"
    # another init image changes the edit (the image reaches the U-Net through its extra channels)
    other = run_ip2p(pipe, picture(SIZE, SIZE, seed=2)).arrays
    assert mad(other, at_15) > 1e-3


def test_the_three_way_guidance_stacks_the_rows_as_diffusers_and_a1111():
    seen: dict[str, Any] = {}

    class Inner:
        takes_row_kinds = True
        schedule = None
        prediction = "epsilon"

        def __call__(self, x, sigma, *, crossattn, concat, row_kinds):
            seen.update(crossattn=crossattn, concat=concat, row_kinds=row_kinds, x=x)
            # an answer that depends on the text and the image channels, row by row
            return x + crossattn.mean(dim=(1, 2))[:, None, None, None] + 10 * concat.mean(dim=1, keepdim=True)

    b = 2
    x = torch.randn(b, 4, 3, 3)
    cond = torch.randn(b, 5, 8)
    uncond = torch.randn(1, 5, 8)
    img = torch.randn(b, 4, 3, 3)
    den = ImageCFGDenoiser(Inner(), 6.0, 1.7, {"crossattn": uncond})
    out = den(x, torch.tensor(1.0), crossattn=cond, concat=img)
    assert seen["row_kinds"] == ("cond",) * b + ("uncond",) * (2 * b)
    torch.testing.assert_close(seen["crossattn"], torch.cat([cond, uncond.expand(b, -1, -1), uncond.expand(b, -1, -1)]))
    torch.testing.assert_close(seen["concat"], torch.cat([img, img, torch.zeros_like(img)]))
    c = x + cond.mean(dim=(1, 2))[:, None, None, None] + 10 * img.mean(dim=1, keepdim=True)
    i = x + uncond.mean() + 10 * img.mean(dim=1, keepdim=True)
    u = x + uncond.mean()
    torch.testing.assert_close(out, u + 6.0 * (c - i) + 1.7 * (i - u))


def test_a1111_rule_runs_img2img_with_the_strength_and_its_default_image_scale_1(ip2p, image):
    _, pipe = ip2p
    kw = dict(strength_rule="a1111", cfg_scale=6.0, strength=0.6)
    none = run_ip2p(pipe, image, **kw)
    one = run_ip2p(pipe, image, image_cfg_scale=1.0, **kw)
    np.testing.assert_array_equal(none.arrays, one.arrays)  # A1111's API None: plain CFG, the image in both rows
    fields = parse_parameters(none.infotexts[0])
    assert fields["Image CFG scale"] == "1" and fields["Denoising strength"] == "0.6"
    three = run_ip2p(pipe, image, image_cfg_scale=1.5, **kw).arrays
    assert mad(three, one.arrays) > 1e-3
    # the strength matters under A1111's rule (img2img from the init latent), not under diffusers'
    assert mad(run_ip2p(pipe, image, image_cfg_scale=1.5, **{**kw, "strength": 0.9}).arrays, three) > 1e-3
    plain = run_ip2p(pipe, image, cfg_scale=6.0)
    assert np.array_equal(plain.arrays, run_ip2p(pipe, image, cfg_scale=6.0, strength=0.3).arrays)


def test_a_single_file_is_detected_and_makes_the_folders_images(ip2p, image, tmp_path):
    from sdengine.weights import convert, load_checkpoint

    folder, pipe = ip2p
    single = convert(folder, tmp_path / "ip2p.safetensors")
    assert load_checkpoint(single).configs["unet"]["in_channels"] == 8  # once refused: "not supported"
    other = sdengine.load_pipeline(single, device="cpu", fast_path="none")
    assert other.instruct_pix2pix and not other.inpainting
    np.testing.assert_allclose(run_ip2p(other, image).arrays, run_ip2p(pipe, image).arrays, rtol=0, atol=1e-6)
    back = convert(single, tmp_path / "folder")
    index = json.loads((back / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInstructPix2PixPipeline"


def test_detection_describes_the_8_channel_unet():
    from sdengine.weights.detect import Detected

    det = Detected("sd1", False, "clip", "epsilon", {"in_channels": 8}, None, None, {})
    assert det.instruct_pix2pix and det.description == "SD 1.x instruct-pix2pix (epsilon)"


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "kw,why",
    [
        (dict(init_image=None), "is an instruct-pix2pix model: it edits an init image, give one"),
        (dict(mask="MASK"), "is an instruct-pix2pix model: it does not take a mask (inpainting)"),
        (dict(init_latent_resize=True, init_image="SMALL"), "it does not take init_latent_resize"),
        (dict(sag_scale=0.5), "sag_scale does not combine"),
        (dict(pag_scale=2.0), "pag_scale does not combine with instruct-pix2pix's image guidance"),
        (dict(guidance_rescale=0.5), "guidance_rescale does not combine"),
        (dict(image_cfg_scale=-1.0), "image_cfg_scale must be a number in [0, 100]"),
        (dict(image_cfg_scale=float("nan")), "image_cfg_scale must be a number in [0, 100]"),
        (dict(image_cfg_scale="2"), "image_cfg_scale must be a number"),
    ],
)
def test_bad_requests_are_one_line_errors(ip2p, image, kw, why):
    from _pipeline_models import mask_picture

    _, pipe = ip2p
    if kw.get("mask") == "MASK":
        kw = {**kw, "mask": mask_picture(SIZE, SIZE)}
    if kw.get("init_image") == "SMALL":
        kw = {**kw, "init_image": picture(SIZE // 2, SIZE // 2)}
    with pytest.raises(SdengineError) as e:
        run_ip2p(pipe, image, **kw)
    assert why in str(e.value) and "\n" not in str(e.value)


def test_image_cfg_scale_on_another_model_is_an_error_or_a1111s_ignored_note(tiny_sd1_folder, image):
    pipe = sdengine.load_pipeline(tiny_sd1_folder, device="cpu", fast_path="none")
    with pytest.raises(SdengineError, match="image_cfg_scale guides an instruct-pix2pix model .* is not one"):
        run_ip2p(pipe, image, image_cfg_scale=1.5)
    with pytest.raises(SdengineError, match="image_cfg_scale guides towards an init image: it needs one"):
        pipe(PROMPT, steps=2, width=SIZE, height=SIZE, image_cfg_scale=1.5, progress=False)
    kw = dict(strength_rule="a1111", strength=0.5, steps=3)
    ignored = run_ip2p(pipe, image, image_cfg_scale=1.5, **kw)
    assert any("image_cfg_scale is not used" in n for n in ignored.notes)
    np.testing.assert_array_equal(ignored.arrays, run_ip2p(pipe, image, **kw).arrays)
    assert "Image CFG scale" not in ignored.infotexts[0]


# ------------------------------------------------------------------------------------------------ the CLI


def _cli(*args: str) -> int:
    from sdengine.cli import main

    return main(["generate", *args, "--no-progress"])


def test_the_cli_equals_the_python_call_and_reads_back(ip2p, image, tmp_path):
    from PIL import Image

    folder, _ = ip2p
    init = tmp_path / "init.png"
    image.save(init)
    common = [PROMPT, "--negative", NEGATIVE, "--model", str(folder), "--steps", str(STEPS), "--sampler", "euler"]
    common += ["--seed", str(SEED), "--width", str(SIZE), "--height", str(SIZE), "--init-image", str(init)]
    assert _cli(*common, "--cfg", "6", "--image-cfg-scale", "1.3", "--out", str(tmp_path / "a.png")) == 0
    text = Image.open(tmp_path / "a.png").info["parameters"]
    assert "Image CFG scale: 1.3" in text
    pixels = np.asarray(Image.open(tmp_path / "a.png").convert("RGB"))
    pipe = sdengine.load_pipeline(folder, device="cpu")  # as the command loads it (its default fast path)
    direct = run_ip2p(pipe, image, cfg_scale=6.0, image_cfg_scale=1.3, schedule="auto")
    np.testing.assert_array_equal(pixels, np.asarray(direct.images[0]))
    again = ["--from-png", str(tmp_path / "a.png"), "--model", str(folder), "--init-image", str(init)]
    assert _cli(*again, "--out", str(tmp_path / "b.png")) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "b.png").convert("RGB")), pixels)
    assert to_generate_kwargs(parse_parameters(text))["image_cfg_scale"] == 1.3


def test_the_cli_refuses_an_image_scale_without_an_init_image(ip2p, tmp_path, capsys):
    folder, _ = ip2p
    args = ["x", "--model", str(folder), "--steps", "2", "--image-cfg-scale", "1.5", "--out", str(tmp_path / "o.png")]
    assert _cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert "--image-cfg-scale has no effect without --init-image" in err and len(err.splitlines()) == 1
    assert _cli("x", "--model", str(folder), "--steps", "2", "--out", str(tmp_path / "o.png")) != 0
    err = capsys.readouterr().err.strip()
    assert "it edits an init image" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o.png").exists()


# ------------------------------------------------------------------------------------------------ A1111's route


def _b64(img: Any) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_the_a1111_img2img_route_and_the_native_job_equal_the_python_call(ip2p, image, tmp_path):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from PIL import Image

    from _live_server import live_server, run_job, server_config
    from sdengine.server.app import default_loader

    folder, pipe = ip2p
    body = {
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE,
        "steps": STEPS,
        "width": SIZE,
        "height": SIZE,
        "seed": SEED,
        "cfg_scale": 6,
        "sampler_name": "Euler",
        "init_images": [_b64(image)],
        "denoising_strength": 0.7,
    }
    with live_server(server_config(tmp_path, model=str(folder)), loader=default_loader(None)) as server:
        with httpx.Client(base_url=server.url, timeout=300) as c:
            answers = [c.post("/sdapi/v1/img2img", json={**body, **extra}) for extra in ({"image_cfg_scale": 1.6}, {})]
            text = json.loads(answers[0].json()["info"])["infotexts"][0]
            pasted = c.post("/sdapi/v1/img2img", json={"init_images": body["init_images"], "infotext": text})
            job = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": STEPS, "width": SIZE, "height": SIZE,
                   "seed": SEED, "sampler": "euler", "cfg_scale": 6, "init_image": body["init_images"][0],
                   "image_cfg_scale": 1.4}  # fmt: skip
            native, native_job = run_job(c, job)
            native_text = Image.open(io.BytesIO(c.get(native_job["images"][0]["url"]).content)).info["parameters"]
    assert "Image CFG scale: 1.4" in native_text  # the native job's field
    direct = pipe(init_image=image, progress=False, **to_generate_kwargs(parse_parameters(native_text)))
    np.testing.assert_array_equal(native, np.asarray(direct.images[0]))
    assert pasted.status_code == 200, pasted.text
    assert json.loads(pasted.json()["info"])["infotexts"][0] == text  # A1111's infotext field reads it back
    assert pasted.json()["images"][0] == answers[0].json()["images"][0]
    got = []
    for r in answers:
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert "image_cfg_scale" not in info.get("ignored", [])
        text = info["infotexts"][0]
        pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
        kw = to_generate_kwargs(parse_parameters(text))
        direct = pipe(init_image=image, progress=False, **kw)
        np.testing.assert_array_equal(pixels, np.asarray(direct.images[0]))
        got.append((pixels, parse_parameters(text)["Image CFG scale"]))
    assert got[0][1] == "1.6" and got[1][1] == "1"  # A1111's None: 1 (plain CFG)
    assert mad(got[0][0], got[1][0]) > 0.1  # on 0..255 pixels


def test_comfyuis_node_samples_as_the_pipeline_at_image_scale_1(ip2p, image):
    """InstructPixToPixConditioning + ComfyUI's sampling (plain CFG, the image in both halves) under the sdengine
    seed rule: the pipeline's latent at image_cfg_scale 1 (its three-way formula at 1 is that CFG)."""
    from sdengine.latent_sampling import sample_latents

    _, pipe = ip2p
    z, ours, (pos, neg, latent) = comfy_and_pipeline_latents(pipe, image, cfg=6.0, schedule="normal")
    assert float(latent["samples"].abs().max()) == 0.0 and latent["samples"].shape[-1] == SIZE // pipe.vae_scale_factor
    assert float((z - ours).abs().max()) < 1e-4
    # the image matters: without it (zeros in both halves, ComfyUI's rule for an entry with none) another latent
    bare = [replace_cond(e) for e in pos], [replace_cond(e) for e in neg]
    z0 = sample_latents(pipe, *bare, latent["samples"], seed=SEED, steps=STEPS, cfg=6.0, sampler="euler",
                        schedule="normal", seed_rule="sdengine")  # fmt: skip
    assert float((z0 - z).abs().mean()) > 1e-3


def replace_cond(entry: Any) -> Any:
    from dataclasses import replace

    return replace(entry, cond={k: v for k, v in entry.cond.items() if k != "concat"})


def test_comfyuis_sampling_refuses_what_it_cannot_run_in_one_line(ip2p, image):
    from dataclasses import replace

    from sdengine.latent_sampling import sample_latents

    _, pipe = ip2p
    pos, neg, latent = comfy_conditioning(pipe, image)
    small = torch.zeros(1, 4, 2, 2)
    for p, n, z, why in (
        ([replace(pos[0], strength=0.5)], neg, latent["samples"], "samples with one plain positive and negative"),
        (pos, neg, small, "does not fit the sampled latent"),
    ):
        with pytest.raises(SdengineError) as e:
            sample_latents(pipe, p, n, z, seed=1, steps=2, cfg=5.0)
        assert why in str(e.value) and "\n" not in str(e.value)


def test_the_node_is_listed_in_the_registry():
    from sdengine.server.comfy.registry import NODES

    node = NODES["InstructPixToPixConditioning"]
    assert [i.name for i in node.inputs] == ["positive", "negative", "vae", "pixels"]
    assert node.outputs == ("CONDITIONING", "CONDITIONING", "LATENT")


def test_prompt_editing_runs_under_the_three_way_guidance(ip2p, image):
    """Prompt editing's text rows follow guidance's row kinds: the two unconditional blocks both take the negative."""
    _, pipe = ip2p

    def run(prompt: str) -> np.ndarray:
        return pipe(prompt, NEGATIVE, init_image=image, steps=STEPS, sampler="euler", seed=SEED, width=SIZE,
                    height=SIZE, progress=False).arrays  # fmt: skip

    red, blue, edited = run("make it red"), run("make it blue"), run("[make it red:make it blue:2]")
    assert mad(edited, red) > 1e-4 and mad(edited, blue) > 1e-4  # (the second unconditional block once failed:
    # prompt editing looked for a second row of texts)


def test_a_batch_row_is_the_row_generated_alone(ip2p, image):
    _, pipe = ip2p
    both = run_ip2p(pipe, image, seed=5, batch_size=2).arrays
    alone = run_ip2p(pipe, image, seed=6).arrays
    assert float(np.abs(both[1] - alone[0]).max()) < 1e-4  # the image latent on every row; seen: 1.4e-6
    assert mad(both[0], both[1]) > 1e-3
