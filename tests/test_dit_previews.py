"""Live previews and the tiny VAE for the 16-channel latents of SD3 and Flux.1.

* the cheap latent -> RGB maps (ComfyUI's SD3 and Flux factors and biases), chosen by the pipeline's model
  family, and the grey fall-back for a latent space with no map (never an error mid-generation);
* TAESD3 / TAEF1's architecture (diffusers' ``AutoencoderTiny`` with ``latent_channels=16``) against diffusers on
  the same random weights, from a diffusers folder and from TAESD's own ``taef1_decoder`` / ``taesd3_decoder``
  file layout;
* a Flux and an SD3 pipeline with such a tiny VAE: ``vae_decode="tiny"`` against diffusers' ``FluxPipeline`` /
  ``StableDiffusion3Pipeline`` with ``vae=AutoencoderTiny(...)`` (what madebyollin's TAEF1 / TAESD3 model cards
  show), the step callback's previews against ``AutoencoderTiny.decode`` of the same latent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import AutoencoderTiny  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import sdengine  # noqa: E402
from _flux_models import diffusers_flux, make_flux_folder  # noqa: E402
from _pipeline_models import picture  # noqa: E402
from _sd3_models import SIZE as SD3_SIZE  # noqa: E402
from _sd3_models import diffusers_sd3, make_sd3_folder  # noqa: E402
from sdengine import vae_utils  # noqa: E402
from sdengine.errors import GenerationError  # noqa: E402
from sdengine.pipeline.result import StepInfo  # noqa: E402
from sdengine.weights.tiny_vae_file import load_tiny_vae  # noqa: E402

TOL = 1e-4  # mean absolute difference on 0..1 pixels, as tests/test_flux_pipeline.py (fp32, CPU)
W, H = 48, 32  # the tiny Flux VAE is 2x: multiples of 4
PROMPT = "a red apple on a table"
SEED = 3

# TAESD's architecture at the tiny test VAEs' 2x (two levels), 16 latent channels, 32 wide
TINY_2X = dict(
    latent_channels=16,
    encoder_block_out_channels=(32, 32),
    decoder_block_out_channels=(32, 32),
    num_encoder_blocks=(1, 2),
    num_decoder_blocks=(2, 1),
)


def reference_tiny(seed: int = 0, **config) -> AutoencoderTiny:
    """A diffusers AutoencoderTiny with random weights of a trained-like scale (its own init is near identity)."""
    torch.manual_seed(seed)
    ref = AutoencoderTiny(**config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.05)
    return ref


def taesd_files(ref: AutoencoderTiny, folder: Path, name: str) -> Path:
    """TAESD's own layout (``NAME_decoder.safetensors`` beside ``NAME_encoder.safetensors``): bare Sequential
    indices, the decoder's behind its parameter-free clamp at index 0. Returns the decoder file."""
    dec, enc = {}, {}
    for k, v in ref.state_dict().items():
        part, _, i, rest = k.split(".", 3)
        if part == "decoder":
            dec[f"{int(i) + 1}.{rest}"] = v.clone().contiguous()
        else:
            enc[f"{i}.{rest}"] = v.clone().contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(enc, folder / f"{name}_encoder.safetensors")
    save_file(dec, folder / f"{name}_decoder.safetensors")
    return folder / f"{name}_decoder.safetensors"


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def _their_rgb(ref: AutoencoderTiny, latents: torch.Tensor) -> np.ndarray:
    """uint8 (B, H, W, 3) of diffusers' tiny decode, as a preview shows it."""
    with torch.no_grad():
        img = ref.decode(latents.float()).sample
    return (img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).mul(255).round().to(torch.uint8).numpy()


# -- the latent -> RGB maps -----------------------------------------------------------------------------------


def test_maps_hold_comfyuis_numbers_one_row_per_channel():
    """Rows are channels, columns R, G, B, plus the bias (spot checks against ComfyUI's comfy/latent_formats.py)."""
    sd3, flux = vae_utils.SD3_LATENT_RGB, vae_utils.FLUX_LATENT_RGB
    assert (sd3.channels, flux.channels, vae_utils.SD_LATENT_RGB.channels) == (16, 16, 4)
    assert sd3.factors[2] == (0.1994, 0.0927, 0.0458) and sd3.factors[15] == (-0.1448, -0.1463, -0.1189)
    assert sd3.bias == (0.2394, 0.2135, 0.1925)
    assert flux.factors[9] == (0.1008, 0.0755, -0.0421) and flux.factors[15] == (-0.1262, -0.0982, -0.0778)
    assert flux.bias == (-0.0329, -0.0718, -0.0851)
    assert set(vae_utils.LATENT_RGB_MAPS) == {"sd", "sd3", "flux", "qwen_image", "flux2"}
    # a latent of 1 on channel 2 only, 0 elsewhere: its pixel is that channel's row plus the bias, to 0..255
    z = torch.zeros(1, 16, 1, 1)
    z[0, 2] = 1.0
    for m in (sd3, flux):
        want = [round((min(max(f + b, -1), 1) + 1) / 2 * 255) for f, b in zip(m.factors[2], m.bias, strict=True)]
        assert vae_utils.latent_rgb(z, m)[0, 0, 0].tolist() == want


def test_sixteen_channels_without_a_map_are_grey_and_with_one_are_not():
    """What a 16-channel latent got before this change (and still gets with no map): the channel mean in grey.
    A map of another channel count, or a latent space with none (8 channels), falls back the same way."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 16, 5, 7, generator=g)
    grey = vae_utils.latent_rgb(z)
    assert (
        grey.shape == (2, 5, 7, 3)
        and torch.equal(grey[..., 0], grey[..., 1])
        and torch.equal(grey[..., 1], grey[..., 2])
    )
    mean = ((z.mean(1) + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8)
    assert torch.equal(grey[..., 0], mean)
    flux = vae_utils.latent_rgb(z, vae_utils.FLUX_LATENT_RGB)
    want = torch.einsum("bchw,cr->bhwr", z, torch.tensor(vae_utils.FLUX_LATENT_RGB.factors))
    want = want + torch.tensor(vae_utils.FLUX_LATENT_RGB.bias)
    assert torch.equal(flux, ((want + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8))
    assert not torch.equal(flux[..., 0], flux[..., 2])  # a colour picture
    assert not torch.equal(flux, vae_utils.latent_rgb(z, vae_utils.SD3_LATENT_RGB))  # each family its own map
    # the SD map given a 16-channel latent: no error, the grey fall-back; an 8-channel latent: grey
    assert torch.equal(vae_utils.latent_rgb(z, vae_utils.SD_LATENT_RGB), grey)
    eight = vae_utils.latent_rgb(z[:, :8], vae_utils.SD3_LATENT_RGB)
    assert torch.equal(eight[..., 0], eight[..., 2])
    # 4-channel latents keep SD's map with or without it named
    assert torch.equal(vae_utils.latent_rgb(z[:, :4]), vae_utils.latent_rgb(z[:, :4], vae_utils.SD_LATENT_RGB))
    info = StepInfo(1, 2, 1.0, z, z, None, vae_utils.SD3_LATENT_RGB)
    assert np.array_equal(info.preview_array(), vae_utils.latent_rgb(z, vae_utils.SD3_LATENT_RGB).numpy())
    previewer = vae_utils.LatentPreviewer(vae_utils.latent_rgb_for(vae_utils.FLUX_LATENT_RGB))
    previewer.submit(z, "t")
    tag, frame = previewer.take()  # type: ignore[misc]
    assert tag == "t" and np.array_equal(frame, flux.numpy())


# -- the tiny VAE's architecture for 16 channels ---------------------------------------------------------------


@pytest.mark.parametrize("config", [{"latent_channels": 16}, TINY_2X], ids=["taef1-8x", "16ch-2x"])
def test_sixteen_channel_tiny_vae_equals_autoencoder_tiny(tmp_path, config):
    """From a diffusers folder and from TAESD's own two files (named as TAEF1's / TAESD3's): decode and encode
    within 1e-5 max abs of diffusers' AutoencoderTiny(latent_channels=16) on the same random weights."""
    ref = reference_tiny(**config)
    ref.save_pretrained(tmp_path / "folder")
    for name in ("taef1", "taesd3"):
        dec_file = taesd_files(ref, tmp_path / name, name)
        for source in (tmp_path / "folder", dec_file):
            model = load_tiny_vae(source)
            assert model.config.latent_channels == 16 and model.encoder is not None
            f = model.config.downscale_factor
            g = torch.Generator().manual_seed(1)
            z = torch.randn(2, 16, 6, 10, generator=g)
            x = torch.rand(2, 3, 6 * f, 10 * f, generator=g) * 2 - 1
            with torch.no_grad():
                torch.testing.assert_close(model.decode(z), ref.decode(z).sample, rtol=0, atol=1e-5)
                torch.testing.assert_close(model.encode(x), ref.encode(x).latents, rtol=0, atol=1e-5)


# -- Flux -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """A tiny random FLUX.1 [schnell] folder, a 16-channel 2x tiny VAE beside it, sdengine's pipeline with it."""
    root = tmp_path_factory.mktemp("fluxtiny")
    folder = make_flux_folder(root / "tiny-flux-schnell", guidance=False, seed=1)
    tiny_ref = reference_tiny(5, **TINY_2X)
    tiny_ref.save_pretrained(root / "taef1")
    pipe = sdengine.load_pipeline(folder, device="cpu", tiny_vae=root / "taef1")
    return folder, pipe, tiny_ref, root


def test_flux_tiny_decode_matches_diffusers_flux_pipeline_with_autoencoder_tiny(flux):
    folder, pipe, tiny_ref, _ = flux
    ours = pipe(PROMPT, steps=2, seed=SEED, width=W, height=H, vae_decode="tiny", progress=False)
    ref = diffusers_flux(folder)
    ref.vae = tiny_ref  # madebyollin's TAEF1 card: pipe.vae = AutoencoderTiny.from_pretrained("madebyollin/taef1")
    theirs = ref(
        PROMPT,
        num_inference_steps=2,
        height=H,
        width=W,
        generator=torch.Generator().manual_seed(SEED),
        output_type="np",
    ).images
    assert _mad(ours.arrays, theirs) < TOL
    assert ours.parameters["Tiny VAE"] == "taef1" and "Tiny VAE: taef1" in ours.infotexts[0]
    full = pipe(PROMPT, steps=2, seed=SEED, width=W, height=H, progress=False)
    assert _mad(ours.arrays, full.arrays) > 100 * TOL  # another decoder: the tiny one did decode


def test_flux_step_previews_use_flux_map_and_the_tiny_vae(flux):
    _, pipe, tiny_ref, _ = flux
    seen: list[tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor]] = []

    def callback(info: StepInfo) -> None:
        assert info.rgb_map is vae_utils.FLUX_LATENT_RGB
        seen.append((info.preview_array(), info.preview_array("tiny"), info.preview_images("tiny")[0], info.denoised))

    pipe(PROMPT, steps=2, seed=SEED, width=W, height=H, callback=callback, progress=False)
    assert len(seen) == 2
    for latent_rgb, tiny_rgb, image, denoised in seen:
        assert denoised.shape == (1, 16, H // 2, W // 2)  # unpacked latents, not the transformer's 2x2 patches
        assert np.array_equal(latent_rgb, vae_utils.latent_rgb(denoised, vae_utils.FLUX_LATENT_RGB).numpy())
        theirs = _their_rgb(tiny_ref, denoised)
        assert tiny_rgb.shape == (1, H, W, 3)
        assert np.abs(tiny_rgb.astype(int) - theirs.astype(int)).max() <= 1  # one 8-bit level of rounding
        assert np.array_equal(np.asarray(image), tiny_rgb[0])


def test_flux_tiny_encode_runs_and_is_recorded(flux):
    """img2img through the tiny encoder (``vae_encode="tiny"``): the init latent is TAEF1's encode."""
    _, pipe, _, _ = flux
    init = picture(W, H)
    ours = pipe(
        PROMPT, init_image=init, strength=0.5, steps=2, seed=SEED, width=W, height=H, vae_encode="tiny", progress=False
    )
    full = pipe(PROMPT, init_image=init, strength=0.5, steps=2, seed=SEED, width=W, height=H, progress=False)
    assert "Tiny VAE encode: taef1" in ours.infotexts[0] and "Tiny VAE encode" not in full.infotexts[0]
    assert _mad(ours.arrays, full.arrays) > TOL


def test_a_tiny_vae_for_other_latents_is_refused_on_flux(flux):
    _, pipe, _, root = flux
    four = reference_tiny(latent_channels=4, **{k: v for k, v in TINY_2X.items() if k != "latent_channels"})
    four.save_pretrained(root / "taesd")
    with pytest.raises(GenerationError, match="decodes 4-channel latents at 2x.*16-channel.*taef1 for Flux.1"):
        pipe.set_tiny_vae(root / "taesd")
    eight_x = reference_tiny(latent_channels=16)  # 16 channels, but 8x: not this (2x) VAE's
    eight_x.save_pretrained(root / "taef1-8x")
    with pytest.raises(GenerationError, match="16-channel latents at 8x"):
        pipe.set_tiny_vae(root / "taef1-8x")
    # TAESD3 fits Flux's shapes (16 channels, here 2x) but not its latent space: its released name says so
    taesd_files(reference_tiny(**TINY_2X), root / "sd3files", "taesd3")
    with pytest.raises(
        GenerationError,
        match=r"taesd3_decoder.safetensors is named for SD3 \(taesd3\), but "
        r"tiny-flux-schnell is FLUX.1: its latents need taef1 \(taef1_decoder.safetensors\)",
    ):
        pipe.set_tiny_vae(root / "sd3files" / "taesd3_decoder.safetensors")
    assert pipe.tiny_vae is not None and pipe.tiny_vae.name == "taef1"  # the one it had is kept


# -- SD3 ------------------------------------------------------------------------------------------------------


def test_sd3_tiny_decode_and_previews_match_diffusers(tmp_path):
    folder = make_sd3_folder(tmp_path / "tiny-sd3")
    tiny_ref = reference_tiny(7, **TINY_2X)
    tiny_ref.save_pretrained(tmp_path / "taesd3")
    pipe = sdengine.load_pipeline(folder, device="cpu", tiny_vae=tmp_path / "taesd3")
    seen: list[tuple[np.ndarray, np.ndarray, torch.Tensor]] = []

    def callback(info: StepInfo) -> None:
        assert info.rgb_map is vae_utils.SD3_LATENT_RGB
        seen.append((info.preview_array(), info.preview_array("tiny"), info.denoised))

    args = dict(steps=2, sampler="euler", cfg_scale=5.0, seed=SEED, width=SD3_SIZE, height=SD3_SIZE, progress=False)
    ours = pipe(PROMPT, "blurry", vae_decode="tiny", callback=callback, **args)
    ref = diffusers_sd3(folder)
    ref.vae = tiny_ref  # madebyollin's TAESD3 card: pipe.vae = AutoencoderTiny(...), shift_factor 0
    theirs = ref(
        PROMPT,
        negative_prompt="blurry",
        num_inference_steps=2,
        guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="np",
        width=SD3_SIZE,
        height=SD3_SIZE,
    ).images
    assert _mad(ours.arrays, theirs) < TOL
    assert "Tiny VAE: taesd3" in ours.infotexts[0]
    taesd_files(tiny_ref, tmp_path / "fluxfiles", "taef1")
    with pytest.raises(GenerationError, match=r"taef1_decoder.safetensors is named for FLUX.1 \(taef1\), but tiny-sd3"):
        pipe.set_tiny_vae(tmp_path / "fluxfiles" / "taef1_decoder.safetensors")
    assert len(seen) == 2
    for latent_rgb, tiny_rgb, denoised in seen:
        assert np.array_equal(latent_rgb, vae_utils.latent_rgb(denoised, vae_utils.SD3_LATENT_RGB).numpy())
        assert np.abs(tiny_rgb.astype(int) - _their_rgb(tiny_ref, denoised).astype(int)).max() <= 1


def test_cli_tiny_vae_on_flux_and_from_png(flux, tmp_path):
    """``generate --tiny-vae`` on a Flux model decodes with it (as stable-diffusion.cpp's ``--taesd``), records it,
    and ``--from-png`` with the same ``--tiny-vae`` gives the same pixels."""
    from PIL import Image

    from sdengine.cli import main
    from sdengine.metadata import parse_parameters, read_png_parameters

    folder, pipe, _, root = flux
    out = tmp_path / "a.png"
    args = [
        "generate",
        "--model",
        str(folder),
        PROMPT,
        "--steps",
        "2",
        "--seed",
        str(SEED),
        "--tiny-vae",
        str(root / "taef1"),
    ]
    assert main([*args, "--width", str(W), "--height", str(H), "--out", str(out), "--no-progress"]) == 0
    assert parse_parameters(read_png_parameters(out))["Tiny VAE"] == "taef1"
    want = pipe(PROMPT, steps=2, seed=SEED, width=W, height=H, vae_decode="tiny", progress=False).images[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(want))
    again = tmp_path / "b.png"
    rerun = ["generate", "--from-png", str(out), "--model", str(folder), "--tiny-vae", str(root / "taef1")]
    assert main([*rerun, "--out", str(again), "--no-progress"]) == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))
