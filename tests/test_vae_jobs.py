"""A VAE chosen per job on every route besides A1111's ``sd_vae`` (tests/test_vae_choice.py): the native job's
``vae`` (GET /v1/vaes), OpenAI's ``vae`` extension through the real ``openai`` client, the hires fix's second pass
and the SDXL refiner decoding with it, and the CLI's ``--vae`` read back by ``sdengine pnginfo`` and A1111's
png-info route. The images equal those of ``load_pipeline(vae=FILE)``."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from _live_server import live_server, server_config, shared_loader, wait_job
from _vaes import ldm_layout, other_vae
from sdengine.cli import main
from sdengine.pipeline import load_pipeline

LORAS = Path(__file__).resolve().parent.parent / "src/sdengine/assets/loras"
GEN = {"seed": 3, "steps": 3, "width": 64, "height": 64, "sampler": "dpmpp_2m", "schedule": "karras"}
BODY = {"prompt": "a red apple", **GEN}
HIRES = {"enable_hr": True, "hr_scale": 2.0, "strength": 0.6, "hr_second_pass_steps": 2}


@pytest.fixture(scope="module")
def vaes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("job_vaes")
    alt = other_vae(1)
    save_file(alt, d / "alt.safetensors")
    save_file(ldm_layout(other_vae(2)), d / "other.vae.safetensors")
    shutil.copy(next(LORAS.glob("*.safetensors")), d / "lora.safetensors")  # not a VAE
    bad = dict(alt)
    bad["decoder.conv_out.weight"] = bad["decoder.conv_out.weight"][:, :16].contiguous()  # reads, does not fit
    save_file(bad, d / "wrong_shape.safetensors")
    return d


@pytest.fixture(scope="module")
def alt_pipe(vaes: Path):
    return load_pipeline("emoji", device="cpu", vae=vaes / "alt.safetensors")


@pytest.fixture(scope="module")
def server(vaes: Path, tmp_path_factory: pytest.TempPathFactory):
    with live_server(server_config(tmp_path_factory.mktemp("vae_jobs"), vaes_dir=vaes)) as s:
        yield s


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].convert("RGB"))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10]


def run_job(client: httpx.Client, body: dict) -> tuple[np.ndarray, dict, str]:
    """(pixels, the finished job, the saved PNG's own parameters text) of a native job."""
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    j = wait_job(client, r.json()["id"], timeout=300)
    assert j["state"] == "done", j
    png = Image.open(io.BytesIO(client.get(j["images"][0]["url"]).content))
    return np.asarray(png.convert("RGB")), j, png.info["parameters"]


def test_a_native_jobs_vae_makes_its_image_and_is_named(client, vaes: Path, alt_pipe) -> None:
    """POST /v1/jobs ``vae`` (a name of GET /v1/vaes) decodes the job: the image of load_pipeline(vae=FILE), the
    infotext and the saved PNG name it as A1111 does, the job answers it; the next job without it, and "None",
    get the model's own VAE again."""
    listed = client.get("/v1/vaes").json()
    assert [v["name"] for v in listed["vaes"]] == sorted(p.name for p in vaes.iterdir())
    assert listed["choices"] == ["Automatic", "None"]
    own = pixels(shared_loader("emoji", "cpu")("a red apple", progress=False, **GEN))
    want = pixels(alt_pipe("a red apple", progress=False, **GEN))
    assert not np.array_equal(own, want)

    got, job, saved = run_job(client, {**BODY, "vae": "alt.safetensors"})
    np.testing.assert_array_equal(got, want)
    named = f"VAE hash: {digest(vaes / 'alt.safetensors')}, VAE: alt.safetensors,"
    assert named in job["infotexts"][0] and named in saved
    assert job["vae"] == "alt.safetensors"

    got, job, saved = run_job(client, BODY)  # none named: the model's, untouched by the last job's
    np.testing.assert_array_equal(got, own)
    assert "VAE" not in saved and job["vae"] is None
    got, job, _ = run_job(client, {**BODY, "vae": "None"})
    np.testing.assert_array_equal(got, own)
    assert job["vae"] == "None"


def test_bad_native_vae_names_are_one_line_400s(client, vaes: Path) -> None:
    cases = {
        "nope.safetensors": "vae: unknown VAE 'nope.safetensors'; available: Automatic, None, alt.safetensors",
        "../alt.safetensors": "'..' is not allowed",
        "/etc/passwd": "absolute paths are not allowed",
        "lora.safetensors": "not a VAE",
        "x.ckpt": "pickle files are not loaded",
    }
    for value, said in cases.items():
        r = client.post("/v1/jobs", json={**BODY, "vae": value})
        assert r.status_code == 400 and said in r.json()["detail"], (value, r.text)
        assert "\n" not in r.json()["detail"] and str(vaes) not in r.text
    assert client.post("/v1/jobs", json={**BODY, "vae": 3}).status_code == 422
    # a file that reads as a VAE but does not fit the model: its job fails with one line, no server path
    r = client.post("/v1/jobs", json={**BODY, "vae": "wrong_shape.safetensors"})
    assert r.status_code == 202, r.text
    j = wait_job(client, r.json()["id"], timeout=300)
    assert j["state"] == "failed" and "decoder.conv_out.weight" in j["error"] and "\n" not in j["error"], j
    assert str(vaes) not in j["error"]


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_the_hires_fix_decodes_with_the_jobs_vae(client, alt_pipe, upscaler: str) -> None:
    """A native hires job with ``vae``: its second pass decodes with that VAE (and, with a pixel upscaler, the
    first pass's decode and the upscale's encode too): the image of load_pipeline(vae=FILE), not the model's."""
    hires = {"hr_scale": 2.0, "hr_upscaler": upscaler, "hr_second_pass_steps": 2}
    got, job, _ = run_job(client, {**BODY, "strength": 0.6, "hires": hires, "vae": "alt.safetensors"})
    kw = {**GEN, **HIRES, "hr_upscaler": upscaler}
    np.testing.assert_array_equal(got, pixels(alt_pipe("a red apple", progress=False, **kw)))
    own = pixels(shared_loader("emoji", "cpu")("a red apple", progress=False, **kw))
    assert got.shape == own.shape == (128, 128, 3) and not np.array_equal(got, own)
    assert "VAE: alt.safetensors" in job["infotexts"][0] and "Hires upscale: 2" in job["infotexts"][0]


@pytest.mark.slow
def test_a_chosen_vae_decodes_the_hires_second_pass_without_the_models_graph(vaes: Path, alt_pipe) -> None:
    """The hires fix's second pass on a pipeline with recorded CUDA graphs (CPU stand-in): a chosen VAE decodes
    it without the graph of the model's own VAE (which would give the own VAE's image), and the graph is back
    for the model's VAE after."""
    from _cpu_graphs import CPUBackend

    pipe = shared_loader("emoji", "cpu")
    kw = {**GEN, **HIRES, "hr_upscaler": "Latent"}
    try:
        assert pipe.enable_cuda_graphs(backend=CPUBackend(), device_type="cpu")
        graph = pipe.cuda_graphs["vae"]
        own = pixels(pipe("a red apple", progress=False, **kw))
        used = graph.replays + graph.recordings
        assert used >= 1
        pipe.set_vae(vaes / "alt.safetensors")
        got = pixels(pipe("a red apple", progress=False, **kw))
        np.testing.assert_array_equal(got, pixels(alt_pipe("a red apple", progress=False, **kw)))
        assert graph.replays + graph.recordings == used and not np.array_equal(got, own)
        pipe.set_vae(None)
        np.testing.assert_array_equal(pixels(pipe("a red apple", progress=False, **kw)), own)
        assert graph.replays + graph.recordings > used
    finally:
        pipe.set_vae(None)
        pipe.cuda_graphs = None


def test_openai_images_take_the_vae_extension(server, vaes: Path, alt_pipe) -> None:
    """OpenAI's images routes take ``vae`` as an sdengine extension (the client's extra_body), as seed and steps:
    the image is that VAE's; a bad name is OpenAI's 400 with ``param`` "vae"."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-test", max_retries=0, timeout=300)
    extra = {"seed": 3, "steps": 3, "sampler": "dpmpp_2m", "schedule": "karras", "vae": "alt.safetensors"}
    r = client.images.generate(model="emoji", prompt="a red apple", size="64x64", extra_body=extra)
    got = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
    want = pixels(alt_pipe("a red apple", progress=False, **GEN))
    np.testing.assert_array_equal(np.asarray(got.convert("RGB")), want)
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="emoji", prompt="a red apple", size="64x64", extra_body={**extra, "vae": "gone"})
    assert e.value.body["param"] == "vae" and "unknown VAE 'gone'" in e.value.body["message"]


def test_cli_vae_is_read_back_by_pnginfo_and_a1111s_png_info(vaes: Path, client, tmp_path: Path, capsys) -> None:
    """``generate --vae FILE`` writes A1111's VAE fields; ``sdengine pnginfo --json`` and POST
    /sdapi/v1/png-info read them back (the hash is the file's SHA-256, 10 hex digits)."""
    out = tmp_path / "a.png"
    size = ["--width", "64", "--height", "64", "--steps", "3", "--seed", "3", "--no-progress"]
    vae = vaes / "other.vae.safetensors"
    assert main(["generate", "a red apple", "--model", "emoji", "--vae", str(vae), *size, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["pnginfo", "--json", str(out)]) == 0
    fields = json.loads(capsys.readouterr().out)["fields"]
    assert fields["VAE"] == "other.vae.safetensors" and fields["VAE hash"] == digest(vae)
    r = client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(out.read_bytes()).decode()})
    assert r.status_code == 200, r.text
    assert f"VAE hash: {digest(vae)}, VAE: other.vae.safetensors" in r.json()["info"]
    assert r.json()["parameters"]["VAE"] == "other.vae.safetensors"
    assert r.json()["parameters"]["VAE hash"] == digest(vae)


# ------------------------------------------------------------------------------------------- SDXL refiner


@pytest.mark.slow
def test_the_sdxl_refiner_decodes_with_the_jobs_vae(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A1111's refiner_checkpoint with sd_vae: the job's VAE is set on the refiner too, whose VAE decodes the
    hand-off: the image is generate_with_refiner's with base and refiner both loaded with that VAE file, not
    the refiner's own VAE's, and the infotext names it."""
    from _sdxl_models import make_sdxl_folder

    models = tmp_path_factory.mktemp("sdxl_models")
    base_dir = make_sdxl_folder(models / "tiny-sdxl")
    refiner_dir = make_sdxl_folder(models / "tiny-sdxl-refiner", refiner=True)
    vae_dir = tmp_path_factory.mktemp("sdxl_vaes")
    g = torch.Generator().manual_seed(7)
    own = load_file(base_dir / "vae" / "diffusion_pytorch_model.safetensors")
    alt = {k: (v + 0.05 * v.std() * torch.randn(v.shape, generator=g) if v.numel() > 1 else v) for k, v in own.items()}
    save_file({k: v.contiguous() for k, v in alt.items()}, vae_dir / "xl_alt.safetensors")
    vae = vae_dir / "xl_alt.safetensors"

    kw = dict(steps=5, cfg_scale=5.0, seed=3, width=32, height=32, sampler="euler", schedule="normal", progress=False)
    b_alt, r_alt = load_pipeline(base_dir, device="cpu", vae=vae), load_pipeline(refiner_dir, device="cpu", vae=vae)
    kw.update(switch_at=0.7, switch_rule="a1111")  # a negative prompt: A1111's empty one is zeros on SDXL
    want = b_alt.generate_with_refiner(r_alt, "a red apple", "blurry", **kw)
    plain = load_pipeline(base_dir, device="cpu").generate_with_refiner(
        load_pipeline(refiner_dir, device="cpu"), "a red apple", "blurry", **kw
    )
    assert not np.array_equal(pixels(want), pixels(plain))

    body = dict(prompt="a red apple", negative_prompt="blurry", steps=5, cfg_scale=5.0, seed=3, width=32, height=32)
    body.update(sampler_name="Euler", scheduler="Normal", refiner_checkpoint="tiny-sdxl-refiner", refiner_switch_at=0.7)
    cfg = server_config(tmp_path_factory.mktemp("sdxl_out"), models_dir=models, vaes_dir=vae_dir)
    with live_server(cfg) as s, httpx.Client(base_url=s.url, timeout=300) as c:
        over = {"sd_model_checkpoint": "tiny-sdxl", "sd_vae": "xl_alt.safetensors"}
        r = c.post("/sdapi/v1/txt2img", json={**body, "override_settings": over})
        assert r.status_code == 200, r.text
        got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")
        np.testing.assert_array_equal(np.asarray(got), pixels(want))
        info = json.loads(r.json()["info"])["infotexts"][0]
        assert f"VAE hash: {digest(vae)}, VAE: xl_alt.safetensors" in info and "Refiner: tiny-sdxl-refiner" in info
        r = c.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_model_checkpoint": "tiny-sdxl"}})
        got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")
        np.testing.assert_array_equal(np.asarray(got), pixels(plain))  # the next job: the models' own again
