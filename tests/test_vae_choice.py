"""Choosing a VAE per generation: ``Pipeline.set_vae`` (read once, kept, undone with None), A1111's ``sd_vae``
(GET /sdapi/v1/sd-vae, override_settings, POST /sdapi/v1/options, an infotext's "VAE") through the real
``webuiapi`` client, and VAE files of a small VAE (no mid-block attention, 16 GroupNorm groups) in both the
diffusers and the original-SD key layout. The images equal ``load_pipeline(vae=FILE)``'s."""

from __future__ import annotations

import base64
import hashlib
import io
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import webuiapi
from PIL import Image
from safetensors.torch import save_file

from _live_server import live_server, server_config, shared_loader
from _vaes import ldm_layout, other_vae
from sdengine.errors import SdengineError
from sdengine.pipeline import load_pipeline

LORAS = Path(__file__).resolve().parent.parent / "src/sdengine/assets/loras"
GEN = {"seed": 3, "steps": 3, "width": 64, "height": 64, "sampler": "dpmpp_2m", "schedule": "karras"}
A1111 = {"seed": 3, "steps": 3, "width": 64, "height": 64, "cfg_scale": 7.5}


@pytest.fixture(scope="module")
def vaes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("vaes")
    alt = other_vae(1)
    save_file(alt, d / "alt.safetensors")  # diffusers layout
    save_file(ldm_layout(alt), d / "alt_ldm.vae.safetensors")  # the same weights, A1111's layout and name
    save_file(ldm_layout(other_vae(2)), d / "other.vae.safetensors")
    shutil.copy(next(LORAS.glob("*.safetensors")), d / "lora.safetensors")  # not a VAE
    bad = dict(alt)
    bad["decoder.conv_out.weight"] = bad["decoder.conv_out.weight"][:, :16].contiguous()  # a wrong shape
    save_file(bad, d / "wrong_shape.safetensors")
    wide = {k: v for k, v in alt.items()}  # 8-channel latents: another model family's VAE
    wide["decoder.conv_in.weight"] = torch.zeros(wide["decoder.conv_in.weight"].shape[0], 8, 3, 3)
    wide["post_quant_conv.weight"] = torch.zeros(8, 8, 1, 1)
    wide["post_quant_conv.bias"] = torch.zeros(8)
    wide["quant_conv.weight"] = torch.zeros(16, 16, 1, 1)
    wide["quant_conv.bias"] = torch.zeros(16)
    wide["encoder.conv_out.weight"] = torch.zeros(16, wide["encoder.conv_out.weight"].shape[1], 3, 3)
    wide["encoder.conv_out.bias"] = torch.zeros(16)
    save_file(wide, d / "eight_channels.safetensors")
    return d


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].convert("RGB"))


@pytest.fixture(scope="module")
def alt_pipe(vaes: Path):
    return load_pipeline("emoji", device="cpu", vae=vaes / "alt.safetensors")


@pytest.fixture(scope="module")
def refs(vaes: Path, alt_pipe) -> dict[str, np.ndarray]:
    """The images of load_pipeline(vae=FILE) (a fresh pipeline each), and the model's own."""
    out = {"own": pixels(shared_loader("emoji", "cpu")("a red apple", progress=False, **GEN))}
    out["alt.safetensors"] = pixels(alt_pipe("a red apple", progress=False, **GEN))
    other = load_pipeline("emoji", device="cpu", vae=vaes / "other.vae.safetensors")
    out["other.vae.safetensors"] = pixels(other("a red apple", progress=False, **GEN))
    return out


@pytest.mark.slow
def test_checkpoint_vae_reads_the_models_own_vae_where_it_was_loaded_with_another(alt_pipe, refs) -> None:
    """A1111's sd_vae "None": the VAE the model carries, even where it was loaded with another (vae=, or the
    NAME.vae.safetensors beside it); None again: the one it was loaded with."""
    try:
        alt_pipe.set_vae(None, checkpoint_vae=True)
        r = alt_pipe("a red apple", progress=False, **GEN)
        np.testing.assert_array_equal(pixels(r), refs["own"])
        assert "VAE" not in r.infotexts[0]
        alt_pipe.set_vae(None)
        r = alt_pipe("a red apple", progress=False, **GEN)
        np.testing.assert_array_equal(pixels(r), refs["alt.safetensors"])
        assert "VAE: alt.safetensors" in r.infotexts[0]
    finally:
        alt_pipe.set_vae(None)


@pytest.mark.slow
def test_set_vae_equals_loading_with_that_vae_and_none_undoes_it(vaes: Path, refs) -> None:
    pipe = shared_loader("emoji", "cpu")
    try:
        assert not np.array_equal(refs["alt.safetensors"], refs["own"])
        for name in ("alt.safetensors", "alt_ldm.vae.safetensors"):  # both key layouts, the same weights
            pipe.set_vae(vaes / name)
            r = pipe("a red apple", progress=False, **GEN)
            np.testing.assert_array_equal(pixels(r), refs["alt.safetensors"])
            digest = hashlib.sha256((vaes / name).read_bytes()).hexdigest()[:10]
            assert f"VAE hash: {digest}, VAE: {name}," in r.infotexts[0]
        kept = pipe.vae
        pipe.set_vae(vaes / "alt_ldm.vae.safetensors")
        assert pipe.vae is kept  # read once, kept
        pipe.set_vae(None)
        r = pipe("a red apple", progress=False, **GEN)
        np.testing.assert_array_equal(pixels(r), refs["own"])
        assert "VAE" not in r.infotexts[0]
        pipe.set_vae(None, checkpoint_vae=True)  # the model's own (it was loaded with it): the same image
        np.testing.assert_array_equal(pixels(pipe("a red apple", progress=False, **GEN)), refs["own"])
    finally:
        pipe.set_vae(None)


def test_bad_vae_files_are_one_line_errors_that_change_nothing(vaes: Path) -> None:
    pipe = shared_loader("emoji", "cpu")
    before = pipe.vae
    cases = {
        "lora.safetensors": "not a VAE",
        "wrong_shape.safetensors": "decoder.conv_out.weight",
        "eight_channels.safetensors": "8-channel latents",
        "missing.safetensors": "cannot be read",
    }
    try:
        for name, said in cases.items():
            with pytest.raises(SdengineError, match=said) as e:
                pipe.set_vae(vaes / name)
            assert "\n" not in str(e.value)
            assert pipe.vae is before and pipe.vae_source is None
    finally:
        pipe.set_vae(None)


@pytest.fixture(scope="module")
def api(vaes: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("vae_server")
    with live_server(server_config(tmp, vaes_dir=vaes)) as s:
        yield webuiapi.WebUIApi(host="127.0.0.1", port=s.port, sampler="DPM++ 2M", scheduler="Karras")


def image(r) -> np.ndarray:
    return np.asarray(r.images[0].convert("RGB"))


@pytest.mark.slow
def test_sd_vae_per_request_and_as_an_option_through_webuiapi(api, vaes: Path, refs) -> None:
    listed = api.get_sd_vae()
    assert {"model_name": "alt.safetensors", "filename": "alt.safetensors"} in listed  # no server path told
    assert [v["model_name"] for v in listed] == sorted(p.name for p in vaes.iterdir())
    r = api.txt2img(prompt="a red apple", override_settings={"sd_vae": "alt.safetensors"}, **A1111)
    np.testing.assert_array_equal(image(r), refs["alt.safetensors"])
    digest = hashlib.sha256((vaes / "alt.safetensors").read_bytes()).hexdigest()[:10]
    assert f"VAE hash: {digest}, VAE: alt.safetensors," in r.info["infotexts"][0]
    # the next job names none: the model's own VAE, untouched by the last job's
    np.testing.assert_array_equal(image(api.txt2img(prompt="a red apple", **A1111)), refs["own"])
    api.set_options({"sd_vae": "other.vae.safetensors"})
    try:
        assert api.get_options()["sd_vae"] == "other.vae.safetensors"
        r = api.txt2img(prompt="a red apple", **A1111)
        np.testing.assert_array_equal(image(r), refs["other.vae.safetensors"])
        # an override wins over the option; "None" is the model's own VAE
        r = api.txt2img(prompt="a red apple", override_settings={"sd_vae": "None"}, **A1111)
        np.testing.assert_array_equal(image(r), refs["own"])
        # an infotext's "VAE" becomes sd_vae, as A1111 pastes it
        made = api.txt2img(prompt="a red apple", override_settings={"sd_vae": "alt.safetensors"}, **A1111)
        r = httpx.post(f"{api.baseurl}/txt2img", json={"infotext": made.info["infotexts"][0]}, timeout=120)
        assert r.status_code == 200, r.text
        got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
        np.testing.assert_array_equal(np.asarray(got.convert("RGB")), refs["alt.safetensors"])
        unknown = made.info["infotexts"][0].replace("VAE: alt.safetensors", "VAE: gone.safetensors")
        r = httpx.post(f"{api.baseurl}/txt2img", json={"infotext": unknown}, timeout=120)
        assert r.status_code == 400 and "unknown VAE 'gone.safetensors'" in r.json()["detail"], r.text
    finally:
        api.set_options({"sd_vae": "Automatic"})


@pytest.mark.slow
def test_automatic_takes_the_vae_named_as_the_model(api, vaes: Path, refs) -> None:
    named = vaes / "emoji.safetensors"
    shutil.copy(vaes / "alt.safetensors", named)
    try:
        r = api.txt2img(prompt="a red apple", **A1111)
        np.testing.assert_array_equal(image(r), refs["alt.safetensors"])
        assert "VAE: emoji.safetensors" in r.info["infotexts"][0]
        r = api.txt2img(prompt="a red apple", override_settings={"sd_vae": "None"}, **A1111)
        np.testing.assert_array_equal(image(r), refs["own"])
    finally:
        named.unlink()


def test_bad_sd_vae_values_are_400s(api, vaes: Path) -> None:
    body = {"prompt": "a red apple", **A1111}
    cases = {
        "../alt.safetensors": "'..' is not allowed",
        "/etc/passwd": "absolute paths are not allowed",
        "nope.safetensors": "unknown VAE 'nope.safetensors'; available: Automatic, None, alt.safetensors",
        "lora.safetensors": "not a VAE",
        "x.ckpt": "pickle files are not loaded",
        3: "sd_vae must be",
    }
    for value, said in cases.items():
        r = httpx.post(f"{api.baseurl}/txt2img", json={**body, "override_settings": {"sd_vae": value}}, timeout=60)
        assert r.status_code == 400 and said in r.json()["detail"], (value, r.text)
        assert "\n" not in r.json()["detail"] and str(vaes) not in r.text
        r = httpx.post(f"{api.baseurl}/options", json={"sd_vae": value}, timeout=60)
        assert r.status_code == 400 and said in r.json()["detail"], (value, r.text)
    assert httpx.get(f"{api.baseurl}/options").json()["sd_vae"] == "Automatic"  # a refused option changes nothing
    # a file that reads as a VAE but does not fit the model: its job fails with one line (a 400)
    for value, said in (("wrong_shape.safetensors", "decoder.conv_out.weight"), ("eight_channels.safetensors", "8")):
        r = httpx.post(f"{api.baseurl}/txt2img", json={**body, "override_settings": {"sd_vae": value}}, timeout=60)
        assert r.status_code == 400 and said in r.json()["detail"] and "\n" not in r.json()["detail"], r.text
        assert str(vaes) not in r.text  # the server's paths are not told


def test_jobs_of_different_vaes_never_share_a_batch() -> None:
    from sdengine.server.jobs import Job, batch_key
    from sdengine.server.requests import Generation

    def job(**vae) -> Job:
        kw = {"prompt": "a", "negative_prompt": "", "seed": 1, "batch_size": 1, "steps": 2, "width": 64}
        return Job(Generation(model="emoji", model_name="emoji", kwargs=kw, **vae))

    plain = batch_key(job())
    assert plain is not None and batch_key(job()) == plain
    assert batch_key(job(vae="/v/a.safetensors", vae_name="a.safetensors")) != plain
    assert batch_key(job(vae="/v/a.safetensors")) != batch_key(job(vae="/v/b.safetensors"))
    assert batch_key(job(checkpoint_vae=True)) != plain


@pytest.mark.slow
def test_a_chosen_vae_never_decodes_through_the_models_recorded_graph(vaes: Path, refs) -> None:
    """The VAE decode's CUDA graph replays the model's own VAE: a chosen VAE runs without it (else its image
    would be the own VAE's), and set_vae(None) brings the same graph back."""
    from _cpu_graphs import CPUBackend

    pipe = shared_loader("emoji", "cpu")
    try:
        assert pipe.enable_cuda_graphs(backend=CPUBackend(), device_type="cpu")
        graph = pipe.cuda_graphs["vae"]
        np.testing.assert_array_equal(pixels(pipe("a red apple", progress=False, **GEN)), refs["own"])
        assert graph.replays + graph.recordings >= 1
        pipe.set_vae(vaes / "alt.safetensors")
        assert "vae" not in pipe.cuda_graphs
        np.testing.assert_array_equal(pixels(pipe("a red apple", progress=False, **GEN)), refs["alt.safetensors"])
        pipe.set_vae(None)
        assert pipe.cuda_graphs["vae"] is graph
        np.testing.assert_array_equal(pixels(pipe("a red apple", progress=False, **GEN)), refs["own"])
    finally:
        pipe.set_vae(None)
        pipe.cuda_graphs = None


@pytest.mark.slow
def test_a_chosen_vae_gets_the_fast_path_of_the_pipelines_own(vaes: Path) -> None:
    """The fast path's channels-last weights (sdengine.fastpath; Winograd convolutions likewise, which the emoji
    VAE is too narrow for) reach a VAE set later too: the image equals that of a pipeline loaded with the VAE
    and the same fast path."""
    fast = "winograd,channels_last"
    pipe = load_pipeline("emoji", device="cpu", fast_path=fast)
    pipe.set_vae(vaes / "alt.safetensors")
    conv = pipe.vae.decoder.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    got = pixels(pipe("a red apple", progress=False, **GEN))
    want = load_pipeline("emoji", device="cpu", fast_path=fast, vae=vaes / "alt.safetensors")
    np.testing.assert_array_equal(got, pixels(want("a red apple", progress=False, **GEN)))


@pytest.mark.slow
def test_img2img_encodes_and_decodes_with_the_chosen_vae(api, alt_pipe) -> None:
    """img2img's init image is encoded by the job's VAE too: the image equals the Python API's with that VAE."""
    x = np.linspace(0, 255, 64, dtype=np.uint8)
    blue = np.full((64, 64), 90, np.uint8)
    init = Image.fromarray(np.stack([np.tile(x, (64, 1)), np.tile(x[:, None], (1, 64)), blue], -1))
    r = api.img2img(
        images=[init], prompt="a blue ball", denoising_strength=0.5, override_settings={"sd_vae": "alt.safetensors"},
        **A1111,
    )  # fmt: skip
    want = alt_pipe(
        "a blue ball", init_image=init, strength=0.5, strength_rule="a1111", progress=False, cfg_scale=7.5, **GEN
    )
    np.testing.assert_array_equal(image(r), pixels(want))
    own = shared_loader("emoji", "cpu")
    plain = own("a blue ball", init_image=init, strength=0.5, strength_rule="a1111", progress=False, **GEN)
    assert not np.array_equal(pixels(want), pixels(plain))
