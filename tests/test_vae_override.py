"""A separate VAE (`load_pipeline(..., vae=FILE)`, `generate --vae`): every file kind A1111 and diffusers users
bring gives the images of diffusers' pipeline with that VAE swapped in; the infotext names it as A1111 does;
a VAE that does not fit is refused in one line."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _pipeline_models import diffusers_pipeline, diffusers_scheduler  # noqa: E402
from sdengine.cli import main  # noqa: E402
from sdengine.metadata import parse_parameters, read_png_parameters, to_generate_kwargs  # noqa: E402
from sdengine.weights import UnsafeCheckpointError, WeightsError, load_file, save_safetensors  # noqa: E402
from sdengine.weights.detect import vae_layout_from_diffusers  # noqa: E402
from sdengine.weights.keymaps import vae_diffusers_to_ldm  # noqa: E402
from sdengine.weights.vae_file import VAEMismatchError  # noqa: E402

SIZE, STEPS, SEED = 32, 4, 11
PROMPT, NEGATIVE = "a red apple", "blurry"
TOL = 1e-5  # mean abs on 0..1 pixels


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """Another VAE for the tiny model's 4-channel latents (LDM's 32-group norms, as every LDM VAE file has
    them: the file does not say), in every file kind."""
    from diffusers import AutoencoderKL

    tmp = tmp_path_factory.mktemp("other-vae")
    folder = tmp / "other-model"
    torch.manual_seed(7)
    vae = AutoencoderKL(
        block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=32,
        layers_per_block=1,
        sample_size=32,
    )
    _perturb(vae, 8).save_pretrained(folder / "vae")
    sd, _ = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    ldm, bad = vae_diffusers_to_ldm(sd, vae_layout_from_diffusers(sd))
    assert not bad
    files = {"folder": folder / "vae", "model_folder": folder}
    files["ldm"] = _save(ldm, tmp / "other.vae.safetensors")
    files["prefixed"] = _save({f"first_stage_model.{k}": v for k, v in ldm.items()}, tmp / "pref.safetensors")
    pt = tmp / "other.vae.pt"  # A1111's .vae.pt: a pickle with state_dict, training-only loss.* keys kept in
    torch.save({"state_dict": {**ldm, "loss.logvar": torch.zeros(())}, "global_step": 1}, pt)
    files["pt"] = pt
    files["diffusers_file"] = _save(sd, tmp / "diffusers_layout.safetensors")
    return folder, files, ldm


@pytest.fixture(scope="module")
def reference(tiny_sd1_folder, other):
    """diffusers' pipeline of the base model with the other model's VAE swapped in (from_pretrained and
    from_single_file agree on it), euler, fixed seed."""
    from diffusers import AutoencoderKL

    folder, files, _ = other
    vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True)
    single = AutoencoderKL.from_single_file(
        str(files["ldm"]), config=str(folder), subfolder="vae", local_files_only=True
    )
    for k, v in vae.state_dict().items():
        assert torch.equal(v, single.state_dict()[k]), k
    pipe = diffusers_pipeline(tiny_sd1_folder)
    base = _theirs(pipe, tiny_sd1_folder)
    pipe.vae = single
    return _theirs(pipe, tiny_sd1_folder), base


def _theirs(pipe, folder):
    pipe.scheduler = diffusers_scheduler(folder, "euler")
    gen = torch.Generator("cpu").manual_seed(SEED)
    return pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=7.0,
        generator=gen,
        width=SIZE,
        height=SIZE,
        output_type="np",
    ).images


def _ours(pipe):
    return pipe(
        PROMPT,
        NEGATIVE,
        steps=STEPS,
        sampler="euler",
        schedule="normal",
        cfg_scale=7.0,
        seed=SEED,
        width=SIZE,
        height=SIZE,
        progress=False,
    )


def _perturb(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return module


def _save(tensors, path):
    save_safetensors(tensors, path)
    return path


def _mad(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean())


@pytest.mark.parametrize("kind", ["ldm", "prefixed", "pt", "folder", "model_folder", "diffusers_file"])
def test_each_vae_file_kind_matches_diffusers_with_that_vae(tiny_sd1_folder, other, reference, kind):
    _, files, _ = other
    theirs, base = reference
    assert _mad(theirs, base) > 1e-3  # the other VAE really decodes differently
    pipe = sdengine.load_pipeline(tiny_sd1_folder, device="cpu", vae=files[kind])
    res = _ours(pipe)
    err = _mad(res.arrays, theirs)
    print(f"{kind}: mean abs difference to diffusers {err:.2e}")
    assert err <= TOL
    # A1111's fields: the file name and the first 10 hex digits of the hashed file's SHA-256
    hashed = files[kind] if files[kind].is_file() else files["folder"] / "diffusion_pytorch_model.safetensors"
    digest = hashlib.sha256(hashed.read_bytes()).hexdigest()[:10]
    name = {"folder": "other-model", "model_folder": "other-model"}.get(kind, files[kind].name)
    fields = parse_parameters(res.infotexts[0])
    assert fields["VAE"] == name and fields["VAE hash"] == digest
    assert f"Model: tiny-sd, VAE hash: {digest}, VAE: {name}" in res.infotexts[0]  # A1111's order
    assert to_generate_kwargs(fields)["seed"] == SEED  # descriptive fields: read back without complaint


def test_no_vae_override_writes_no_vae_fields(tiny_sd1_folder):
    res = _ours(sdengine.load_pipeline(tiny_sd1_folder, device="cpu"))
    assert "VAE" not in parse_parameters(res.infotexts[0])


def test_single_file_model_with_another_vae(tiny_sd1_folder, other, reference, tmp_path):
    single = sdengine.weights.convert(tiny_sd1_folder, tmp_path / "tiny-sd.safetensors")
    pipe = sdengine.load_pipeline(single, device="cpu", vae=other[1]["pt"])
    assert _mad(_ours(pipe).arrays, reference[0]) <= TOL
    # A1111's "Automatic": NAME.vae.pt beside NAME.safetensors is used when no VAE is given
    assert sdengine.load_pipeline(single, device="cpu").vae_name() is None
    shutil.copy(other[1]["pt"], tmp_path / "tiny-sd.vae.pt")
    res = _ours(sdengine.load_pipeline(single, device="cpu"))
    assert _mad(res.arrays, reference[0]) <= TOL
    assert parse_parameters(res.infotexts[0])["VAE"] == "tiny-sd.vae.pt"


def test_cli_vae_and_from_png(tiny_sd1_folder, other, tmp_path, caplog):
    _, files, _ = other
    out = tmp_path / "a.png"
    args = ["--model", str(tiny_sd1_folder), "--steps", "2", "--width", "32", "--height", "32", "--no-progress"]
    assert main(["generate", PROMPT, *args, "--vae", str(files["ldm"]), "--out", str(out)]) == 0
    fields = parse_parameters(read_png_parameters(out) or "")
    assert fields["VAE"] == "other.vae.safetensors"
    # --from-png: the VAE's name is no path here, so the model's own VAE decodes it, with a warning
    again = tmp_path / "b.png"
    assert main(["generate", "--from-png", str(out), "--model", str(tiny_sd1_folder), "--out", str(again)]) == 0
    assert "other.vae.safetensors" in caplog.text and "VAE" not in parse_parameters(read_png_parameters(again) or "")
    # ... and where the name is a path (run from the VAE's folder), it is used again
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(files["ldm"].parent)
        third = tmp_path / "c.png"
        assert main(["generate", "--from-png", str(out), "--model", str(tiny_sd1_folder), "--out", str(third)]) == 0
    assert parse_parameters(read_png_parameters(third) or "")["VAE hash"] == fields["VAE hash"]
    assert np.array_equal(np.asarray(_png(third)), np.asarray(_png(out)))


def _png(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB").copy()


# ------------------------------------------------------------------------------------------------ refusals


def test_vae_of_another_latent_width_is_refused(tiny_sd1_folder, tmp_path):
    from diffusers import AutoencoderKL

    AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=16,
        norm_num_groups=8,
        layers_per_block=1,
    ).save_pretrained(tmp_path / "vae16")
    with pytest.raises(VAEMismatchError, match=r"vae16: this VAE makes 16-channel latents .* works on 4") as e:
        sdengine.load_pipeline(tiny_sd1_folder, device="cpu", vae=tmp_path / "vae16")
    assert "\n" not in str(e.value)


def test_unknown_keys_and_whole_checkpoints_are_refused(tiny_sd1_folder, other, tmp_path):
    _, _, ldm = other
    bad = _save({**ldm, "encoder.extra_block.weight": torch.zeros(2)}, tmp_path / "bad.vae.safetensors")
    with pytest.raises(WeightsError, match=r"bad\.vae\.safetensors: unexpected VAE keys: encoder\.extra_block\.weight"):
        sdengine.load_pipeline(tiny_sd1_folder, device="cpu", vae=bad)
    whole = sdengine.weights.convert(tiny_sd1_folder, tmp_path / "whole.safetensors")
    with pytest.raises(WeightsError, match="a whole checkpoint .* not a VAE file"):
        sdengine.load_pipeline(tiny_sd1_folder, device="cpu", vae=whole)
    noise = _save({"foo.weight": torch.zeros(2)}, tmp_path / "foo.safetensors")
    with pytest.raises(WeightsError, match="not a VAE"):
        sdengine.load_pipeline(tiny_sd1_folder, device="cpu", vae=noise)


class _Payload:
    def __reduce__(self):
        return (shutil.rmtree, ("/nonexistent-sdengine-test",))


def test_vae_pickle_goes_through_the_safe_loader(tiny_sd1_folder, other, tmp_path):
    _, _, ldm = other
    evil = tmp_path / "evil.vae.pt"
    torch.save({"state_dict": ldm, "payload": _Payload()}, evil)
    with pytest.raises(UnsafeCheckpointError):
        sdengine.load_pipeline(tiny_sd1_folder, device="cpu", vae=evil)


def test_pixel_model_takes_no_vae(other):
    with pytest.raises(sdengine.pipeline.GenerationError, match="pixel-space model has no VAE"):
        sdengine.load_pipeline("fashion-mnist", device="cpu", vae=other[1]["ldm"])


def test_serve_vae_reaches_every_loaded_model(tiny_sd1_folder, other, tmp_path, capsys):
    pytest.importorskip("fastapi")
    from sdengine.server.app import default_loader

    pipe = default_loader(None, vae=other[1]["ldm"])(str(tiny_sd1_folder), "cpu")
    assert pipe.vae_name() == "other.vae.safetensors" and pipe.vae.config.block_out_channels == (32, 32)
    assert main(["serve", "--vae", str(tmp_path / "missing.vae.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--vae" in err and "missing.vae.pt" in err and "\n" not in err


def test_a1111_info_names_the_vae_and_its_hash(tiny_sd1_folder, other, tmp_path):
    """serve --vae: the A1111 route's info carries sd_vae_name / sd_vae_hash (and the model hash) as the
    image's infotext records them."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")

    from _live_server import live_server, server_config
    from sdengine.server.app import default_loader

    vae = other[1]["ldm"]
    config = server_config(tmp_path, model=str(tiny_sd1_folder), vae=vae)
    with live_server(config, loader=default_loader(None, vae=vae)) as server:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            body = {"prompt": "a dog", "steps": 2, "width": 32, "height": 32, "seed": 7}
            r = c.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    recorded = parse_parameters(info["infotexts"][0])
    assert info["sd_vae_name"] == "other.vae.safetensors" == recorded["VAE"]
    assert info["sd_vae_hash"] == recorded["VAE hash"] and len(info["sd_vae_hash"]) == 10


def test_a_sharded_vae_folder_has_a_vae_hash_of_its_shards(tiny_sd1_folder, other, reference, tmp_path):
    # a VAE folder saved with max_shard_size (diffusion_pytorch_model-0000N-of-0000M.safetensors + index) wrote no
    # "VAE hash": the hashed file was looked up as diffusion_pytorch_model.safetensors only. The hash of several
    # files is the SHA-256 of their bytes one after the other, in shard order (docs/model-files.md).
    from diffusers import AutoencoderKL

    _, files, _ = other
    theirs, _ = reference
    sharded = tmp_path / "sharded-vae"
    AutoencoderKL.from_pretrained(files["folder"]).save_pretrained(sharded, max_shard_size="100KB")
    shards = sorted(sharded.glob("diffusion_pytorch_model-*-of-*.safetensors"))
    assert len(shards) > 1 and (sharded / "diffusion_pytorch_model.safetensors.index.json").is_file()
    res = _ours(sdengine.load_pipeline(tiny_sd1_folder, device="cpu", vae=sharded))
    assert _mad(res.arrays, theirs) <= TOL  # the same VAE, so the same images
    h = hashlib.sha256()
    for f in shards:
        h.update(f.read_bytes())
    fields = parse_parameters(res.infotexts[0])
    assert fields["VAE"] == "sharded-vae" and fields["VAE hash"] == h.hexdigest()[:10]
    one = hashlib.sha256((files["folder"] / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()[:10]
    assert fields["VAE hash"] != one  # another file set, another hash (a hash names the files, not the tensors)
