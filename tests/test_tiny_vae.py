"""The tiny VAE (TAESD's architecture): equal to diffusers' AutoencoderTiny on the same weights in every file
layout users bring, its architecture read off the shapes, one-line errors for what is not one, and its use by
the pipeline (``vae_decode="tiny"``, tiny previews, the model folder's ``vae_tiny/``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny
from safetensors.torch import save_file

from sdengine import load_pipeline
from sdengine.errors import GenerationError, SdengineError
from sdengine.models.tiny_vae import MissingHalfError, TinyAutoencoder, TinyVAEConfig
from sdengine.pipeline import GenerationRequest
from sdengine.vae_utils import LatentPreviewer, tiny_vae_rgb
from sdengine.weights.io import WeightsError
from sdengine.weights.tiny_vae_file import is_tiny_vae_state, load_tiny_vae, save_tiny_vae

SMALL = {  # a 3-level variant (4x, as the emoji model's VAE), other widths and block counts than TAESD's
    "encoder_block_out_channels": (24, 24, 24),
    "decoder_block_out_channels": (16, 16, 16),
    "num_encoder_blocks": (1, 2, 1),
    "num_decoder_blocks": (2, 1, 1),
}


def reference(seed: int = 0, **config) -> AutoencoderTiny:
    torch.manual_seed(seed)
    ref = AutoencoderTiny(**config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.05)  # random weights of a trained-like scale (diffusers' init is near identity)
    return ref


def original_layout(ref: AutoencoderTiny) -> tuple[dict, dict]:
    """(decoder, encoder) state dicts as TAESD's own files hold them: bare Sequential indices, the decoder's
    shifted by one for its parameter-free clamp at index 0."""
    sd = ref.state_dict()
    dec, enc = {}, {}
    for k, v in sd.items():
        part, _, i, rest = k.split(".", 3)
        if part == "decoder":
            dec[f"{int(i) + 1}.{rest}"] = v.clone()
        else:
            enc[f"{i}.{rest}"] = v.clone()
    return dec, enc


def agree(model: TinyAutoencoder, ref: AutoencoderTiny, *, decoder: bool = True, encoder: bool = True) -> None:
    g = torch.Generator().manual_seed(1)
    f = ref.config.upsampling_scaling_factor ** (len(ref.config.decoder_block_out_channels) - 1)
    z = torch.randn(2, ref.config.latent_channels, 6, 10, generator=g)
    x = torch.rand(2, 3, 6 * f, 10 * f, generator=g) * 2 - 1
    with torch.no_grad():
        if decoder:
            want = ref.decode(z).sample
            assert want.shape == (2, 3, 6 * f, 10 * f)
            torch.testing.assert_close(model.decode(z), want, rtol=0, atol=1e-5)
        if encoder:
            torch.testing.assert_close(model.encode(x), ref.encode(x).latents, rtol=0, atol=1e-5)


@pytest.mark.parametrize("config", [{}, SMALL, {"latent_channels": 16}], ids=["taesd", "small-4x", "16ch"])
def test_diffusers_folder_equals_autoencoder_tiny(tmp_path, config):
    ref = reference(**config)
    ref.save_pretrained(tmp_path)
    model = load_tiny_vae(tmp_path)
    assert model.config.latent_channels == ref.config.latent_channels
    assert model.config.decoder_blocks == tuple(ref.config.num_decoder_blocks)
    agree(model, ref)


def test_original_taesd_files_and_the_encoder_beside_the_decoder(tmp_path):
    ref = reference(3)
    dec, enc = original_layout(ref)
    save_file(dec, tmp_path / "taesd_decoder.safetensors")
    save_file(enc, tmp_path / "taesd_encoder.safetensors")
    model = load_tiny_vae(tmp_path / "taesd_decoder.safetensors")
    assert model.encoder is not None and model.name == "taesd_decoder.safetensors"
    agree(model, ref)
    # a pickled decoder alone (another prefix, no sibling): decodes, and encoding is a one-line error
    torch.save(dec, tmp_path / "taesdxl_decoder.pth")
    alone = load_tiny_vae(tmp_path / "taesdxl_decoder.pth")
    agree(alone, ref, encoder=False)
    with pytest.raises(MissingHalfError, match="has no encoder"):
        alone.encode(torch.zeros(1, 3, 16, 16))
    enc_only = load_tiny_vae(tmp_path / "taesd_encoder.safetensors")
    agree(enc_only, ref, decoder=False)
    with pytest.raises(MissingHalfError, match="has no decoder"):
        enc_only.decode(torch.zeros(1, 4, 2, 2))


def test_comfyui_combined_file_and_a_diffusers_layout_file(tmp_path):
    ref = reference(4, **SMALL)
    dec, enc = original_layout(ref)
    combined = {f"taesd_decoder.{k}": v for k, v in dec.items()} | {f"taesd_encoder.{k}": v for k, v in enc.items()}
    combined["vae_scale"] = torch.tensor(1.5)  # ComfyUI's latent-convention scalars are not weights
    save_file(combined, tmp_path / "taesd.safetensors")
    agree(load_tiny_vae(tmp_path / "taesd.safetensors"), ref)
    save_file(ref.state_dict(), tmp_path / "diffusers_layout.safetensors")
    agree(load_tiny_vae(tmp_path / "diffusers_layout.safetensors"), ref)


def test_saved_folder_loads_back_and_in_diffusers(tmp_path):
    torch.manual_seed(5)
    model = TinyAutoencoder(
        TinyVAEConfig(decoder_channels=(16, 16), decoder_blocks=(1, 2), encoder_channels=(8, 8), encoder_blocks=(1, 1))
    )
    save_tiny_vae(model, tmp_path / "tv")
    again = load_tiny_vae(tmp_path / "tv")
    z = torch.randn(1, 4, 5, 7)
    torch.testing.assert_close(again.decode(z), model.decode(z).detach(), rtol=0, atol=0)
    theirs = AutoencoderTiny.from_pretrained(tmp_path / "tv").eval()
    agree(again, theirs)
    assert load_tiny_vae(tmp_path / "tv", dtype="bf16").decoder.layers[0].weight.dtype == torch.bfloat16


def test_what_is_not_a_tiny_vae_is_one_line(tmp_path):
    ref = reference(6, **SMALL)
    dec, enc = original_layout(ref)
    cases = {
        "unknown key": ({**dec, "model.diffusion_model.x": torch.zeros(1)}, "unexpected keys"),
        "wrong shape": ({**dec, "2.conv.0.weight": torch.zeros(16, 16, 1, 1)}, "do not fit"),
        "uneven widths": ({**dec, "6.weight": torch.zeros(8, 16, 3, 3)}, "same width"),
        "layer after the end": ({**dec, "40.weight": torch.zeros(3, 3, 3, 3)}, "after its last convolution"),
        "gap in the order": ({k: v for k, v in dec.items() if not k.startswith("3.")}, "order"),
        "no first conv": ({k: v for k, v in dec.items() if not k.startswith("1.")}, "first convolution|order"),
        "mixed layouts": ({**dec, "decoder.layers.0.weight": torch.zeros(1)}, "mixed"),
    }
    for name, (sd, msg) in cases.items():
        f = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        save_file(sd, f)
        with pytest.raises(WeightsError, match=msg) as e:
            load_tiny_vae(f)
        assert "\n" not in str(e.value), name
    assert not is_tiny_vae_state(["encoder.down.0.block.0.conv1.weight"]) and is_tiny_vae_state(dec)
    with pytest.raises(WeightsError, match="no such"):
        load_tiny_vae(tmp_path / "missing.safetensors")
    # a folder: the config names another class; the config disagrees with the weights
    ref.save_pretrained(tmp_path / "folder")
    cfg = (tmp_path / "folder" / "config.json").read_text()
    (tmp_path / "folder" / "config.json").write_text(cfg.replace("AutoencoderTiny", "AutoencoderKL"))
    with pytest.raises(WeightsError, match="not 'AutoencoderTiny'"):
        load_tiny_vae(tmp_path / "folder")
    (tmp_path / "folder" / "config.json").write_text(cfg.replace('"latent_channels": 4', '"latent_channels": 16'))
    with pytest.raises(WeightsError, match="config.json says latent_channels=16"):
        load_tiny_vae(tmp_path / "folder")


def test_a_tiny_vae_given_as_the_vae_is_named(tmp_path, tiny_sd1_folder):
    dec, _ = original_layout(reference(7))
    save_file(dec, tmp_path / "taesd_decoder.safetensors")
    with pytest.raises(WeightsError, match="a tiny VAE \\(TAESD\\), not a full VAE"):
        load_pipeline(tiny_sd1_folder, vae=tmp_path / "taesd_decoder.safetensors", device="cpu")
    save_tiny_vae(TinyAutoencoder(TinyVAEConfig(has_encoder=False)), tmp_path / "folder")  # the folder form
    with pytest.raises(SdengineError, match="AutoencoderTiny.*give it as --tiny-vae"):
        load_pipeline(tiny_sd1_folder, vae=tmp_path / "folder", device="cpu")


# ----------------------------------------------------------------------------------------------------------
# In the pipeline (the tiny SD model's VAE is 2x: a 2-level tiny VAE fits it)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_sd1_folder) -> Path:
    folder = tmp_path_factory.mktemp("tiny-vae") / "tiny-sd"
    shutil.copytree(tiny_sd1_folder, folder)
    torch.manual_seed(8)
    tv = TinyAutoencoder(
        TinyVAEConfig(decoder_channels=(8, 8), decoder_blocks=(1, 1), encoder_channels=(8, 8), encoder_blocks=(1, 1))
    )
    with torch.no_grad():
        for p in tv.parameters():
            p.normal_(0, 0.2)
    save_tiny_vae(tv, folder / "vae_tiny")
    return folder


def test_model_folder_tiny_vae_decodes_when_asked(tiny_folder):
    pipe = load_pipeline(tiny_folder, device="cpu")
    assert pipe.tiny_vae is not None and pipe.tiny_vae.name == "vae_tiny"
    req = GenerationRequest(prompt=["a cat", "a dog"], steps=3, seed=[1, 2], progress=False)
    full = pipe(req)
    tiny = pipe(req.replace(vae_decode="tiny"))
    latents = pipe.sample_latents(pipe.prepare(req))
    want = pipe.decode_tiny(latents).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(tiny.arrays, want, rtol=0, atol=1e-6)
    assert np.abs(tiny.arrays - full.arrays).mean() > 1e-2  # another decoder, not the VAE
    assert "Tiny VAE: vae_tiny" in tiny.infotexts[1] and "Tiny VAE" not in full.infotexts[0]
    alone = pipe.decode_tiny(latents[1:]).permute(0, 2, 3, 1).numpy()  # a row's pixels do not depend on its batch
    np.testing.assert_array_equal(alone[0], want[1])


def test_tiny_previews_in_the_callback_and_the_server_previewer(tiny_folder):
    from sdengine.server.jobs import JobManager

    pipe = load_pipeline(tiny_folder, device="cpu")
    seen = []

    def callback(info):
        seen.append((info.preview_array("tiny"), info.preview_array(), info.denoised.clone()))

    pipe("a cat", steps=2, seed=3, callback=callback, progress=False)
    tiny_frame, latent_frame, denoised = seen[-1]
    assert tiny_frame.shape == (1, 32, 32, 3) and latent_frame.shape == (1, 16, 16, 3)
    direct = (pipe.tiny_vae.decode(denoised).clamp(-1, 1) + 1) / 2 * 255
    assert np.abs(tiny_frame.astype(float) - direct.permute(0, 2, 3, 1).numpy()).max() <= 0.5 + 1e-3
    manager = JobManager(loader=lambda ref, dev: pipe, devices=["cpu"], outputs_dir=Path("."), max_queue=1)
    previewer = LatentPreviewer(manager.preview_rgb(pipe))
    previewer.submit(denoised, 5)
    tag, frame = previewer.take()
    assert tag == 5 and np.array_equal(frame, tiny_frame)
    manager.preview = "latent"
    latent = manager.preview_rgb(pipe)  # the model's latent colour map, not its tiny VAE
    assert np.array_equal(latent(denoised).numpy(), latent_frame)
    assert np.array_equal(tiny_vae_rgb(pipe.tiny_vae)(denoised).numpy(), tiny_frame)


def test_pipeline_refusals(tiny_sd1_folder, tiny_folder):
    plain = load_pipeline(tiny_sd1_folder, device="cpu")
    with pytest.raises(GenerationError, match="has none loaded"):
        plain("a cat", steps=2, vae_decode="tiny", progress=False)
    with pytest.raises(GenerationError, match="vae_decode must be one of full, tiny"):
        plain("a cat", steps=2, vae_decode="taesd", progress=False)
    with pytest.raises(GenerationError, match="'tiny' preview"):
        plain("a cat", steps=1, callback=lambda info: info.preview_array("tiny"), progress=False)
    eight_x = TinyAutoencoder(TinyVAEConfig(has_encoder=False))  # TAESD's 8x on a 2x model
    with pytest.raises(GenerationError, match="4-channel latents at 8x, but tiny-sd's are 4-channel at 2x"):
        plain.set_tiny_vae(eight_x)
    assert plain.tiny_vae is None
    with pytest.raises(GenerationError, match="pixel DDPM"):
        load_pipeline("fashion-mnist", device="cpu", tiny_vae=tiny_folder / "vae_tiny")


def test_from_png_decodes_with_the_tiny_vae_again(tiny_folder, tiny_sd1_folder, tmp_path, capsys):
    from PIL import Image

    from sdengine.cli import main

    out = tmp_path / "a.png"
    base = ["generate", "a cat", "--model", str(tiny_folder), "--steps", "3", "--seed", "5"]
    assert main([*base, "--vae-decode", "tiny", "--out", str(out)]) == 0
    assert "Tiny VAE: vae_tiny" in Image.open(out).info["parameters"]
    again = tmp_path / "b.png"
    assert main(["generate", "--from-png", str(out), "--model", str(tiny_folder), "--out", str(again)]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    assert Image.open(out).info["parameters"] == Image.open(again).info["parameters"]
    capsys.readouterr()
    # a model without a tiny VAE cannot redo it: one line that says how
    plain = ["generate", "--from-png", str(out), "--model", str(tiny_sd1_folder), "--out", str(tmp_path / "c")]
    assert main(plain) == 2
    err = capsys.readouterr().err.strip()
    assert "needs a tiny VAE" in err and "--tiny-vae" in err and len(err.splitlines()) == 1, err


# ----------------------------------------------------------------------------------------------------------
# Encoding with it (vae_encode="tiny": A1111's "VAE type for encode: TAESD")


def test_tiny_encoder_makes_the_init_latent_and_the_noise_stays_the_seeds(tiny_folder):
    from _pipeline_models import picture
    from sdengine.io.images import image_tensor
    from sdengine.pipeline.latents import start_latents

    pipe = load_pipeline(tiny_folder, device="cpu")
    init = picture(32, 32, seed=3)
    common = dict(
        latent_channels=4, width=32, height=32, scale_factor=2, init=init, mask=None, mask_blur=0.0, strength=0.6
    )
    starts = {
        kind: start_latents(
            pipe.vae,
            generators=[torch.Generator().manual_seed(9), torch.Generator().manual_seed(10)],
            nine_channels=False,
            tiled=False,
            device=pipe.device,
            tiny=pipe.tiny_vae if kind == "tiny" else None,
            **common,
        )
        for kind in ("full", "tiny")
    }
    with torch.inference_mode():
        want = pipe.tiny_vae.encode(image_tensor(init))
    tiny, full = starts["tiny"], starts["full"]
    torch.testing.assert_close(tiny.init_latent, want.expand(2, -1, -1, -1), rtol=1e-6, atol=1e-6)  # no spread
    assert (tiny.init_latent - full.init_latent).abs().mean() > 1e-2  # another encoder than the VAE's
    torch.testing.assert_close(tiny.noise, full.noise, rtol=0, atol=0)  # each generator advanced alike


def test_img2img_with_the_tiny_encoder_and_its_infotext(tiny_folder, tmp_path):
    from _pipeline_models import picture
    from sdengine.metadata import parse_parameters, to_generate_kwargs

    pipe = load_pipeline(tiny_folder, device="cpu")
    req = GenerationRequest(
        prompt="a cat", init_image=picture(32, 32, seed=1), strength=0.5, steps=4, seed=6, progress=False
    )
    full, tiny, again = pipe(req), pipe(req.replace(vae_encode="tiny")), pipe(req.replace(vae_encode="tiny"))
    np.testing.assert_array_equal(tiny.arrays, again.arrays)
    assert np.abs(tiny.arrays - full.arrays).mean() > 1e-3
    assert "Tiny VAE encode: vae_tiny" in tiny.infotexts[0] and "Tiny VAE" not in full.infotexts[0]
    assert to_generate_kwargs(parse_parameters(tiny.infotexts[0]))["vae_encode"] == "tiny"
    # txt2img encodes nothing: the setting changes nothing and is not written
    plain = pipe(req.replace(init_image=None, strength=1.0))
    txt = pipe(req.replace(init_image=None, strength=1.0, vae_encode="tiny"))
    np.testing.assert_array_equal(plain.arrays, txt.arrays)
    assert "Tiny VAE" not in txt.infotexts[0]


def test_tiny_encoder_refusals(tiny_sd1_folder, tiny_folder, tmp_path):
    from _pipeline_models import picture

    init = picture(32, 32)
    plain = load_pipeline(tiny_sd1_folder, device="cpu")
    with pytest.raises(
        GenerationError, match="vae_encode='tiny' needs a tiny VAE with an encoder and tiny-sd has none"
    ):
        plain("a cat", init_image=init, steps=2, vae_encode="tiny", progress=False)
    with pytest.raises(GenerationError, match="vae_encode must be one of full, tiny, got 'taesd'"):
        plain("a cat", steps=2, vae_encode="taesd", progress=False)
    # nothing to encode (txt2img): the setting has nothing to act on, as A1111's global one
    np.testing.assert_array_equal(
        plain("a cat", steps=2, seed=1, vae_encode="tiny", progress=False).arrays,
        plain("a cat", steps=2, seed=1, progress=False).arrays,
    )
    with pytest.raises(GenerationError, match="vae_encode='tiny' needs"):  # the hires fix's pixel path encodes
        plain("a cat", steps=2, enable_hr=True, hr_upscaler="Lanczos", vae_encode="tiny", progress=False)
    decoder_only = TinyAutoencoder(TinyVAEConfig(decoder_channels=(8, 8), decoder_blocks=(1, 1), has_encoder=False))
    decoder_only.name = "dec-only"
    plain.set_tiny_vae(decoder_only)
    with pytest.raises(GenerationError, match=r"one without an encoder \(dec-only\)"):
        plain("a cat", init_image=init, steps=2, vae_encode="tiny", progress=False)


def test_cli_vae_encode_and_from_png(tiny_folder, tmp_path):
    from PIL import Image

    from _pipeline_models import picture
    from sdengine.cli import main

    init = tmp_path / "init.png"
    picture(32, 32, seed=2).save(init)
    out = tmp_path / "a.png"
    base = ["generate", "a cat", "--model", str(tiny_folder), "--steps", "3", "--seed", "5", "--init-image", str(init)]
    assert main([*base, "--strength", "0.5", "--vae-encode", "tiny", "--out", str(out)]) == 0
    assert "Tiny VAE encode: vae_tiny" in Image.open(out).info["parameters"]
    again = tmp_path / "b.png"
    redo = ["generate", "--from-png", str(out), "--model", str(tiny_folder), "--init-image", str(init)]
    assert main([*redo, "--out", str(again)]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    full = tmp_path / "c.png"
    assert main([*base, "--strength", "0.5", "--out", str(full)]) == 0
    assert not np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(full)))


def test_whether_a_tiny_vae_has_an_encoder_without_keeping_it(tmp_path, tiny_folder):
    from sdengine.weights.tiny_vae_file import tiny_vae_has_encoder

    assert tiny_vae_has_encoder(tiny_folder / "vae_tiny") is True
    dec = TinyAutoencoder(TinyVAEConfig(decoder_channels=(8, 8), decoder_blocks=(1, 1), has_encoder=False))
    save_tiny_vae(dec, tmp_path / "dec")
    assert tiny_vae_has_encoder(tmp_path / "dec") is False
    assert tiny_vae_has_encoder(tmp_path / "missing") is False
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    assert tiny_vae_has_encoder(tmp_path / "junk.safetensors") is False
    shutil.rmtree(tmp_path / "dec")  # the same path with other contents: answered afresh
    save_tiny_vae(load_tiny_vae(tiny_folder / "vae_tiny"), tmp_path / "dec")
    assert tiny_vae_has_encoder(tmp_path / "dec") is True


def test_the_tiny_decode_replays_from_graphs_set_before_or_after_them(tiny_folder):
    from _cpu_graphs import CPUBackend
    from sdengine.cuda_graphs import through

    pipe = load_pipeline(tiny_folder, device="cpu")
    req = GenerationRequest(prompt=["a cat", "a dog"], steps=2, seed=[1, 2], progress=False, vae_decode="tiny")
    plain = pipe(req).arrays
    try:
        pipe.enable_cuda_graphs(backend=CPUBackend(), device_type="cpu")
        tiny = pipe.cuda_graphs["tiny_vae"]
        np.testing.assert_array_equal(pipe(req).arrays, plain)
        assert (tiny.recordings, tiny.replays) == (1, 2)  # one row at a time, one shape
        kept = pipe.tiny_vae
        pipe.set_tiny_vae(None)
        assert "tiny_vae" not in pipe.cuda_graphs and "unet" in pipe.cuda_graphs
        pipe.set_tiny_vae(kept)  # set after the graphs: routed too
        np.testing.assert_array_equal(pipe(req).arrays, plain)
        again = pipe.cuda_graphs["tiny_vae"]
        assert again is not tiny and again.replays == 2
        seen = []  # the live previews decode through the same graphs

        def preview(info):
            seen.append(info.preview_array("tiny"))

        pipe(req.replace(vae_decode="full", callback=preview))
        assert len(seen) == 2 and again.replays == 4  # two steps, one batch of two rows each
    finally:
        pipe.cuda_graphs = None
    assert through(pipe.tiny_vae.decoder) is pipe.tiny_vae.decoder  # the route goes with the graphs
