"""Chroma end to end against diffusers' ChromaTransformer2DModel / ChromaPipeline / ChromaImg2ImgPipeline on a tiny
random Chroma folder: the transformer (with and without the text mask), loading (diffusers folder, Chroma single
file with a Flux VAE and a T5 file), detection, conditioning (T5 with its mask, one pad token kept), txt2img with
real CFG and a negative prompt, img2img, the CLI, and the one-line refusals.

diffusers 0.42's ChromaPipeline hands the transformer its 0/1 text mask as floats, which attention adds to the
scores instead of masking (diffusers issue #12116); sdengine masks (boolean), so the oracle here is given the same
masks as booleans through ``prompt_embeds`` / ``*_attention_mask``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _chroma_models import (  # noqa: E402
    bool_masked_embeds,
    chroma_transformer,
    diffusers_chroma,
    make_chroma_folder,
)
from _pipeline_models import picture  # noqa: E402
from sdengine.cli import main  # noqa: E402
from sdengine.errors import GenerationError  # noqa: E402
from sdengine.pipeline.chroma import ChromaPipeline  # noqa: E402

TOL = 1e-4  # mean absolute difference on 0..1 pixels (fp32, CPU)
PROMPT, NEGATIVE = "a red apple on a table", "blurry, dark"
SEED = 3
W, H = 48, 32


@pytest.fixture(scope="module")
def chroma(tmp_path_factory):
    folder = make_chroma_folder(tmp_path_factory.mktemp("chroma") / "tiny-chroma")
    return folder, sdengine.load_pipeline(folder, device="cpu"), diffusers_chroma(folder)


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def _theirs(ref, prompt: str = PROMPT, negative: str = "", **kw) -> np.ndarray:
    args = dict(num_inference_steps=4, height=H, width=W, generator=torch.Generator().manual_seed(SEED))
    args.update(kw)
    return ref(output_type="np", **bool_masked_embeds(ref, prompt, negative), **args).images


# -- the transformer ------------------------------------------------------------------------------------------


def test_transformer_matches_diffusers():
    from sdengine.models.chroma import ChromaConfig, ChromaTransformer
    from sdengine.models.flux import image_ids, pack_latents, unpack_latents

    ref = chroma_transformer(0, num_layers=2)
    ours = ChromaTransformer(ChromaConfig.from_diffusers(dict(ref.config)))
    ours.load_state_dict(ref.state_dict(), strict=True)
    B, h, w, L = 2, 8, 6, 10
    g = torch.Generator().manual_seed(0)
    x, txt = torch.randn(B, 16, h, w, generator=g), torch.randn(B, L, 32, generator=g)
    t = torch.tensor([700.0, 250.0])
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[0, :4], mask[1, :7] = True, True
    ids = dict(img_ids=image_ids(h // 2, w // 2), txt_ids=torch.zeros(L, 3), return_dict=False)
    with torch.no_grad():
        full = torch.cat([mask, torch.ones(B, h * w // 4, dtype=torch.bool)], dim=1)
        want = ref(
            hidden_states=pack_latents(x), encoder_hidden_states=txt, timestep=t / 1000, attention_mask=full, **ids
        )
        plain = ref(hidden_states=pack_latents(x), encoder_hidden_states=txt, timestep=t / 1000, **ids)
        got, got_plain = ours(x, t, txt, mask), ours(x, t, txt)
    assert float((unpack_latents(want[0], h, w) - got).abs().max()) < 1e-5
    assert float((unpack_latents(plain[0], h, w) - got_plain).abs().max()) < 1e-5
    assert float((got - got_plain).abs().max()) > 1e-2  # the mask matters


def test_config_refusals():
    from sdengine.models.chroma import ChromaConfig
    from sdengine.models.config_checks import ConfigError

    with pytest.raises(ConfigError, match="unknown Chroma transformer config options: pooled_projection_dim"):
        ChromaConfig.from_diffusers({"pooled_projection_dim": 768})
    with pytest.raises(ConfigError, match="not a Chroma transformer config"):
        ChromaConfig.from_diffusers({"_class_name": "FluxTransformer2DModel"})
    with pytest.raises(ConfigError, match="approximator_num_channels=10 is not a multiple of 4"):
        ChromaConfig(approximator_num_channels=10)


# -- loading and conditioning ---------------------------------------------------------------------------------


def test_loads_as_chroma(chroma):
    _, pipe, _ = chroma
    assert isinstance(pipe, ChromaPipeline) and pipe.text_kind == "chroma" and pipe.variant == "chroma"
    assert pipe.family_defaults == {"steps": 35, "cfg_scale": 5.0, "sampler": "euler", "schedule": "normal"}
    assert pipe.latent_channels == 16 and pipe.size_multiple == 4


def test_conditioning_matches_diffusers_encode_prompt(chroma):
    _, pipe, ref = chroma
    want = bool_masked_embeds(ref, PROMPT, "")
    cond, uncond = pipe.conditioner.pair(PROMPT, "")
    assert cond["crossattn"].shape == (1, 512, 32)
    assert float((cond["crossattn"] - want["prompt_embeds"].detach()).abs().max()) < 1e-5
    assert torch.equal(cond["text_mask"], want["prompt_attention_mask"])
    assert torch.equal(uncond["text_mask"], want["negative_prompt_attention_mask"])
    n = len(pipe.conditioner.t5_tokenizer.encode(PROMPT))  # pieces and </s>
    assert int(cond["text_mask"].sum()) == n + 1  # one pad token stays unmasked
    assert int(uncond["text_mask"].sum()) == 2  # "" is </s> and one pad


def test_detection_family():
    from sdengine.weights.detect import model_family

    assert model_family(["distilled_guidance_layer.in_proj.weight", "double_blocks.0.img_attn.qkv.weight"]) == "chroma"
    assert model_family(["model.diffusion_model.distilled_guidance_layer.in_proj.weight"]) == "chroma"
    assert model_family(["double_blocks.0.img_attn.qkv.weight"]) == "flux"


# -- images ---------------------------------------------------------------------------------------------------


def test_txt2img_with_negative_matches_diffusers(chroma):
    _, pipe, ref = chroma
    ours = pipe(PROMPT, NEGATIVE, steps=4, seed=SEED, width=W, height=H, progress=False)  # cfg 5 by default
    theirs = _theirs(ref, negative=NEGATIVE, guidance_scale=5.0)
    assert _mad(ours.arrays, theirs) < TOL
    assert ours.parameters["cfg_scale"] == 5.0


def test_cfg_one_is_one_pass_and_matches_diffusers(chroma):
    _, pipe, ref = chroma
    ours = pipe(PROMPT, steps=3, seed=SEED, width=W, height=H, cfg_scale=1.0, progress=False)
    assert _mad(ours.arrays, _theirs(ref, guidance_scale=1.0, num_inference_steps=3)) < TOL


def test_img2img_matches_diffusers(chroma):
    folder, pipe, _ = chroma
    ref = diffusers_chroma(folder, img2img=True)
    init = picture(W, H)
    ours = pipe(PROMPT, NEGATIVE, steps=5, seed=SEED, width=W, height=H, init_image=init, strength=0.6, progress=False)
    theirs = _theirs(ref, negative=NEGATIVE, image=init, strength=0.6, num_inference_steps=5, guidance_scale=5.0)
    assert _mad(ours.arrays, theirs) < TOL


def _single_files(folder, dst):
    """The folder's weights as they are shipped: the transformer as a Chroma single file (BFL's names plus
    ``distilled_guidance_layer.*``, ComfyUI's prefix), the VAE as Flux's ``ae.safetensors`` (LDM names), T5 as
    ComfyUI's ``t5xxl`` file (transformers' names)."""
    from safetensors.torch import load_file, save_file

    from sdengine.weights import keymaps as km
    from sdengine.weights.chroma_file import diffusers_to_bfl
    from sdengine.weights.detect import vae_layout_from_diffusers

    dst.mkdir(parents=True, exist_ok=True)
    sd = load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    vae = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    ae, unknown = km.vae_diffusers_to_ldm(vae, vae_layout_from_diffusers(vae))
    assert not unknown
    files = {
        "chroma": {f"model.diffusion_model.{k}": v for k, v in diffusers_to_bfl(sd).items()},
        "ae": ae,
        "t5xxl": load_file(folder / "text_encoder" / "model.safetensors"),
    }
    for name, part in files.items():
        save_file({k: v.contiguous() for k, v in part.items()}, dst / f"{name}.safetensors")
    return dst


def test_single_file_matches_diffusers(chroma, tmp_path):
    folder, _, ref = chroma
    d = _single_files(folder, tmp_path)
    pipe = sdengine.load_pipeline(
        d / "chroma.safetensors", device="cpu", vae=d / "ae.safetensors", t5=d / "t5xxl.safetensors"
    )
    assert isinstance(pipe, ChromaPipeline)
    ours = pipe(PROMPT, NEGATIVE, steps=3, seed=SEED, width=W, height=H, progress=False)
    assert _mad(ours.arrays, _theirs(ref, negative=NEGATIVE, guidance_scale=5.0, num_inference_steps=3)) < TOL


def test_all_in_one_file_matches_diffusers(chroma, tmp_path):
    """One file with the transformer (model.diffusion_model.*), the VAE (vae.*) and T5
    (text_encoders.t5xxl.transformer.*), as ComfyUI saves a checkpoint."""
    from safetensors.torch import load_file, save_file

    folder, _, ref = chroma
    d = _single_files(folder, tmp_path / "parts")
    one = dict(load_file(d / "chroma.safetensors"))
    one.update({f"vae.{k}": v for k, v in load_file(d / "ae.safetensors").items()})
    one.update({f"text_encoders.t5xxl.transformer.{k}": v for k, v in load_file(d / "t5xxl.safetensors").items()})
    save_file(one, tmp_path / "chroma-aio.safetensors")
    pipe = sdengine.load_pipeline(tmp_path / "chroma-aio.safetensors", device="cpu")
    ours = pipe(PROMPT, NEGATIVE, steps=2, seed=SEED, width=W, height=H, progress=False)
    assert _mad(ours.arrays, _theirs(ref, negative=NEGATIVE, guidance_scale=5.0, num_inference_steps=2)) < TOL


def test_inpainting_matches_diffusers(chroma):
    """A mask on the plain model (Flux's path: the known region put back on the flow's path before every step)
    against ChromaInpaintPipeline."""
    from _pipeline_models import mask_picture

    folder, pipe, _ = chroma
    ref = diffusers_chroma(folder, inpaint=True)
    init, mask = picture(W, H), mask_picture(W, H)
    ours = pipe(
        PROMPT, NEGATIVE, steps=4, seed=SEED, width=W, height=H, init_image=init, mask=mask, strength=0.6,
        progress=False,
    )  # fmt: skip
    theirs = _theirs(ref, negative=NEGATIVE, image=init, mask_image=mask, strength=0.6, guidance_scale=5.0)
    assert _mad(ours.arrays, theirs) < TOL


def test_single_file_missing_parts_name_their_flag(chroma, tmp_path):
    folder, _, _ = chroma
    d = _single_files(folder, tmp_path)
    model = d / "chroma.safetensors"
    with pytest.raises(GenerationError, match="chroma.safetensors holds no VAE: give it with --vae FILE"):
        sdengine.load_pipeline(model, device="cpu", t5=d / "t5xxl.safetensors")
    with pytest.raises(GenerationError, match="chroma.safetensors holds no T5 text encoder: give it with --t5 FILE"):
        sdengine.load_pipeline(model, device="cpu", vae=d / "ae.safetensors")
    with pytest.raises(GenerationError, match=r"\(Chroma\): clip_l \(--clip-l\) is Flux's"):
        sdengine.load_pipeline(model, device="cpu", clip_l=d / "t5xxl.safetensors")


def test_flux_loader_refuses_a_chroma_file(chroma, tmp_path):
    from sdengine.weights.flux_file import load_flux_transformer
    from sdengine.weights.io import WeightsError

    d = _single_files(chroma[0], tmp_path)
    with pytest.raises(WeightsError, match="a Chroma model"):
        load_flux_transformer(d / "chroma.safetensors")


# -- refusals and the CLI -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"distilled_cfg_scale": 3.5}, "distilled_cfg_scale .* Chroma takes no guidance input"),
        ({"pag_scale": 1.0}, "pag_scale: perturbed-attention guidance"),
        ({"clip_skip": 2}, "clip_skip 2 does not apply"),
        ({"shift": 2.0}, "shift: "),
        ({"sampler": "ddim"}, "sampler 'ddim' cannot run on a flow model"),
    ],
)
def test_refuses_what_chroma_does_not_take(chroma, kwargs, message):
    _, pipe, _ = chroma
    kwargs = {"prompt": PROMPT, **kwargs}
    with pytest.raises(GenerationError, match=message):
        pipe(steps=2, seed=SEED, width=W, height=H, progress=False, **kwargs)


def test_cli_generate_with_a_chroma_folder(chroma, tmp_path):
    from PIL import Image

    from sdengine.metadata import parse_parameters, read_png_parameters

    folder, _, ref = chroma
    out = tmp_path / "a.png"
    args = ["generate", "--model", str(folder), PROMPT, "--negative", NEGATIVE, "--steps", "3", "--seed", str(SEED)]
    assert main([*args, "--width", str(W), "--height", str(H), "--out", str(out), "--no-progress"]) == 0
    parsed = parse_parameters(read_png_parameters(out))
    assert float(parsed["CFG scale"]) == 5.0 and parsed["Sampler"] == "Euler" and parsed["Steps"] == "3"
    got = np.asarray(Image.open(out), dtype=np.float32) / 255
    assert _mad(got, _theirs(ref, negative=NEGATIVE, guidance_scale=5.0, num_inference_steps=3)[0]) < 1.0 / 255


def test_file_errors(chroma, tmp_path):
    """A Chroma file with a tensor missing, a gap in its blocks, a tensor left over, ComfyUI's scaled float8, a
    FLUX.1 file given as Chroma, a folder config that disagrees with the weights: one line each."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from sdengine.weights.chroma_file import chroma_from_state, load_chroma_transformer
    from sdengine.weights.io import WeightsError

    d = _single_files(chroma[0], tmp_path / "parts")
    bfl = {k.removeprefix("model.diffusion_model."): v for k, v in load_file(d / "chroma.safetensors").items()}
    cases = [
        ({k: v for k, v in bfl.items() if k != "txt_in.bias"}, "missing Chroma tensor txt_in.bias"),
        ({k: v for k, v in bfl.items() if not k.startswith("single_blocks.0.")}, "single-stream block 0 is missing"),
        ({**bfl, "extra.weight": torch.zeros(1)}, "unexpected tensors beside the Chroma transformer: extra.weight"),
        ({**bfl, "scaled_fp8": torch.zeros(1)}, "scaled float8 Chroma files are not supported"),
        ({k: v for k, v in bfl.items() if "distilled" not in k}, "a FLUX.1 transformer .*not Chroma"),
        ({**bfl, "single_blocks.0.linear1.weight": bfl["single_blocks.0.linear1.weight"][:5]}, "has 5 rows"),
    ]
    for sd, message in cases:
        with pytest.raises(WeightsError, match=message):
            chroma_from_state(sd, "x.safetensors")
    folder = tmp_path / "bad"
    shutil.copytree(chroma[0] / "transformer", folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "approximator_layers": 3}))
    with pytest.raises(WeightsError, match="the config says approximator_layers=3, the weights 2"):
        load_chroma_transformer(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "guidance_embeds": True}))
    with pytest.raises(WeightsError, match="unknown Chroma transformer config options: guidance_embeds"):
        load_chroma_transformer(folder)
    save_file({"weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(WeightsError, match="not a Chroma transformer"):
        load_chroma_transformer(tmp_path / "other.safetensors")


def test_input_errors():
    from _chroma_models import CHROMA_TRANSFORMER
    from sdengine.errors import UsageError
    from sdengine.models.chroma import ChromaConfig, ChromaTransformer

    model = ChromaTransformer(ChromaConfig.from_diffusers(CHROMA_TRANSFORMER)).eval()
    x, txt = torch.randn(1, 16, 4, 4), torch.randn(1, 5, 32)
    for args, message in [
        ((torch.randn(1, 16, 3, 4), 500.0, txt), "height and width must be even"),
        ((torch.randn(1, 8, 4, 4), 500.0, txt), r"hidden_states must be a \(B, 16, H, W\) latent"),
        ((x, 500.0, torch.randn(1, 5, 7)), "encoder_hidden_states must be"),
        ((x, 500.0, txt, torch.ones(1, 4, dtype=torch.bool)), "text_mask must be"),
        ((x, float("nan"), txt), "timestep must be finite"),
    ]:
        with pytest.raises(UsageError, match=message):
            model(*args)


def test_cli_generate_with_a_chroma_file(chroma, tmp_path):
    """``sdengine generate`` on a Chroma single file with ``--vae`` and ``--t5``: the folder's image; ``--guidance``
    refused in one line."""
    from PIL import Image

    folder, pipe, _ = chroma
    d = _single_files(folder, tmp_path / "parts")
    out = tmp_path / "a.png"
    args = ["generate", "--model", str(d / "chroma.safetensors"), "--vae", str(d / "ae.safetensors")]
    args += ["--t5", str(d / "t5xxl.safetensors"), PROMPT, "--negative", NEGATIVE, "--steps", "2", "--seed", "4"]
    args += ["--width", str(W), "--height", str(H), "--no-progress"]
    assert main([*args, "--out", str(out)]) == 0
    want = pipe(PROMPT, NEGATIVE, steps=2, seed=4, width=W, height=H, progress=False).images[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(want.convert("RGB")))
    assert main([*args, "--guidance", "3", "--out", str(tmp_path / "b.png")]) != 0
    assert not (tmp_path / "b.png").exists()


def test_convert_refuses_a_chroma_folder_and_file_in_one_line(chroma, tmp_path, capsys):
    """A Chroma model has Flux's blocks: convert must not write it as a FLUX.1 model (nor say "missing unet/")."""
    from sdengine.pipeline.dit_convert import convert_dit

    folder = chroma[0]
    files = sorted((folder / "transformer").glob("*.safetensors"))
    capsys.readouterr()
    for src in (folder, files[0]):
        for dst in (tmp_path / "out.safetensors", tmp_path / "out"):
            assert main(["convert", str(src), str(dst)]) == 2
            err = capsys.readouterr().err.strip()
            assert "a Chroma model; sdengine convert handles" in err and "\n" not in err, err
            assert not dst.exists()
    with pytest.raises(Exception, match="a Chroma model"):
        convert_dit(folder, tmp_path / "x.safetensors")
