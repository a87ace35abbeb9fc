"""sdengine's Qwen-Image pipeline against diffusers' QwenImagePipeline on a tiny random folder.

``test_loop_matches_diffusers`` runs sdengine's transformer, schedule, true CFG, noise and latent handling with the
oracle's own text encoder and VAE plugged in (what the pipeline takes from them is checked on its own in
``test_qwen_text.py`` and ``test_qwen_vae.py``); the folder tests load everything with sdengine.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from _qwen_models import diffusers_qwen, make_qwen_folder
from sdengine.errors import GenerationError
from sdengine.pipeline.qwen_image import QwenImagePipeline, norm_preserving_cfg
from sdengine.weights.qwen_image_file import load_qwen_image_transformer

SIZE = 32  # 16x16 latents (the tiny VAE's 2x), 8x8 tokens


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_qwen_folder(tmp_path_factory.mktemp("qwen") / "qwen-tiny")


@pytest.fixture(scope="module")
def oracle(folder: Path):
    return diffusers_qwen(folder)


class OracleVAE(torch.nn.Module):
    """diffusers' AutoencoderKLQwenImage seen as an image VAE (one frame), with its pipeline's latent scaling."""

    def __init__(self, vae) -> None:
        super().__init__()
        self.vae = vae
        c = vae.config
        self.config = SimpleNamespace(
            latent_channels=c.z_dim, downscale_factor=2 ** len(c.temperal_downsample), sample_size=1024,
            out_channels=3, block_out_channels=[c.base_dim * m for m in c.dim_mult], scaling_factor=1.0,
        )  # fmt: skip
        self.mean = torch.tensor(c.latents_mean).view(1, -1, 1, 1)
        self.inv_std = 1.0 / torch.tensor(c.latents_std).view(1, -1, 1, 1)

    def encode(self, x):
        from sdengine.models.vae import DiagonalGaussian

        dist = self.vae.encode(x.unsqueeze(2)).latent_dist
        return DiagonalGaussian(torch.cat([dist.mean[:, :, 0], dist.logvar[:, :, 0]], dim=1))

    def decode(self, z):
        return self.vae.decode(z.unsqueeze(2)).sample[:, :, 0]

    def scale_latents(self, z):
        return (z - self.mean) * self.inv_std

    def unscale_latents(self, z):
        return z / self.inv_std + self.mean


def _oracle_parts_pipeline(folder: Path, ref) -> QwenImagePipeline:
    def encode(texts: list[str]):
        with torch.no_grad():
            return ref._get_qwen_prompt_embeds(texts, device="cpu", dtype=torch.float32)

    vae = OracleVAE(ref.vae)
    return QwenImagePipeline(
        transformer=load_qwen_image_transformer(folder),
        text_encode=encode,
        vae=vae,
        scheduler_config=json.loads((folder / "scheduler" / "scheduler_config.json").read_text()),
        device=torch.device("cpu"),
        dtype=torch.float32,
        name="qwen-tiny",
    )


def _want(ref, prompt, negative, cfg, seed, steps=3):
    with torch.no_grad():
        return ref(
            prompt,
            negative_prompt=negative if cfg > 1 else None,
            true_cfg_scale=cfg,
            height=SIZE,
            width=SIZE,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        ).images


@pytest.mark.parametrize(("negative", "cfg"), [("", 4.0), ("blurry, low quality", 2.5), ("", 1.0)])
def test_loop_matches_diffusers(folder: Path, oracle, negative: str, cfg: float) -> None:
    pipe = _oracle_parts_pipeline(folder, oracle)
    got = pipe(
        "a red apple on a table", negative_prompt=negative, cfg_scale=cfg, steps=3, seed=7, width=SIZE, height=SIZE
    )
    want = _want(oracle, "a red apple on a table", negative, cfg, 7)
    diff = np.abs(got.arrays - want)
    assert diff.mean() < 1e-5 and diff.max() < 1e-4, (diff.mean(), diff.max())


def test_rows_of_different_lengths_batch_as_alone(folder: Path, oracle) -> None:
    """Two prompts of different token counts in one call: each row equals its own call (the padding is masked)."""
    pipe = _oracle_parts_pipeline(folder, oracle)
    both = pipe(["a cat", "a photo of a dog sitting in the sun"], negative_prompt="", cfg_scale=3.0, steps=2,
                seed=[1, 2], width=SIZE, height=SIZE)  # fmt: skip
    alone = pipe("a photo of a dog sitting in the sun", negative_prompt="", cfg_scale=3.0, steps=2, seed=2,
                 width=SIZE, height=SIZE)  # fmt: skip
    assert np.abs(both.arrays[1] - alone.arrays[0]).max() < 1e-5
    want = _want(oracle, "a cat", "", 3.0, 1, steps=2)
    assert np.abs(both.arrays[0] - want[0]).max() < 1e-4


def test_norm_preserving_cfg_keeps_each_patch_norm() -> None:
    g = torch.Generator().manual_seed(0)
    c, u = torch.randn(2, 16, 4, 6, generator=g), torch.randn(2, 16, 4, 6, generator=g)
    out = norm_preserving_cfg(c, u, 4.0)
    from sdengine.models.flux import pack_latents

    assert torch.allclose(pack_latents(out).norm(dim=-1), pack_latents(c).norm(dim=-1), atol=1e-5)
    direction = pack_latents(u + 4.0 * (c - u))
    cos = torch.nn.functional.cosine_similarity(pack_latents(out), direction, dim=-1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"distilled_cfg_scale": 3.5}, "distilled_cfg_scale"),
        ({"sampler": "euler_cfg_pp"}, "CFG\\+\\+"),
        ({"sampler": "ddim"}, "flow model"),
        ({"pag_scale": 3.0}, "pag_scale"),
        ({"guidance_rescale": 0.7}, "guidance_rescale"),
        ({"prompt": "a [cat:dog:0.5]"}, "prompt editing"),
    ],
)
def test_refusals(folder: Path, oracle, kwargs: dict, match: str) -> None:
    pipe = _oracle_parts_pipeline(folder, oracle)
    settings = {"prompt": "a cat", "steps": 2, "seed": 1, "width": SIZE, "height": SIZE, **kwargs}
    with pytest.raises(GenerationError, match=match):
        pipe(**settings)


# ----------------------------------------------------------------------------------------------------------
# The whole folder, loaded by sdengine (its text encoder, tokenizer, VAE, transformer, scheduler)


@pytest.fixture(scope="module")
def loaded(folder: Path):
    import sdengine

    return sdengine.load_pipeline(folder, device="cpu")


@pytest.mark.parametrize(("negative", "cfg"), [("", 4.0), ("blurry, low quality", 2.5)])
def test_folder_matches_diffusers(loaded, oracle, negative: str, cfg: float) -> None:
    """End to end: mean abs difference on 0..1 pixels below 1e-4 (measured: see docs/qwen-image.md)."""
    got = loaded("a red apple on a table", negative_prompt=negative, cfg_scale=cfg, steps=3, seed=7, width=SIZE,
                 height=SIZE, progress=False)  # fmt: skip
    want = _want(oracle, "a red apple on a table", negative, cfg, 7)
    diff = np.abs(got.arrays - want)
    assert diff.mean() < 1e-4 and diff.max() < 1e-3, (diff.mean(), diff.max())


def test_folder_defaults_and_infotext(loaded) -> None:
    assert loaded.family_defaults == {"steps": 50, "cfg_scale": 4.0, "sampler": "euler", "schedule": "normal"}
    assert loaded.text_kind == "qwen_image"
    r = loaded("a cat", steps=2, seed=3, width=SIZE, height=SIZE, progress=False)
    assert r.parameters["cfg_scale"] == 4.0 and r.parameters["sampler"] == "euler"


def test_cli_generate_with_a_qwen_image_folder(folder: Path, oracle, tmp_path: Path) -> None:
    from PIL import Image

    from sdengine.cli import main
    from sdengine.metadata import parse_parameters, read_png_parameters

    out = tmp_path / "a.png"
    args = ["generate", "--model", str(folder), "a red apple on a table", "--steps", "3", "--seed", "7"]
    assert main([*args, "--width", str(SIZE), "--height", str(SIZE), "--out", str(out), "--no-progress"]) == 0
    parsed = parse_parameters(read_png_parameters(out))
    assert float(parsed["CFG scale"]) == 4.0 and parsed["Sampler"] == "Euler" and parsed["Steps"] == "3"
    got = np.asarray(Image.open(out), dtype=np.float32) / 255
    want = _want(oracle, "a red apple on a table", "", 4.0, 7)[0]
    assert np.abs(got - want).mean() < 1.0 / 255


def test_img2img_matches_diffusers(loaded, folder: Path) -> None:
    from PIL import Image

    ref = diffusers_qwen(folder, img2img=True)
    g = np.random.default_rng(0)
    image = Image.fromarray(g.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    got = loaded("a red apple", negative_prompt="", init_image=image, strength=0.6, steps=5, seed=4, width=SIZE,
                 height=SIZE, progress=False)  # fmt: skip
    with torch.no_grad():
        want = ref("a red apple", negative_prompt="", image=image, strength=0.6, true_cfg_scale=4.0, height=SIZE,
                   width=SIZE, num_inference_steps=5, generator=torch.Generator().manual_seed(4),
                   output_type="np").images  # fmt: skip
    diff = np.abs(got.arrays - want)
    assert diff.mean() < 1e-4, (diff.mean(), diff.max())


def test_other_qwen_pipelines_and_overrides_are_refused(folder: Path, tmp_path: Path) -> None:
    import shutil

    import sdengine

    edit = tmp_path / "edit"
    shutil.copytree(folder, edit)
    index = json.loads((edit / "model_index.json").read_text())
    (edit / "model_index.json").write_text(json.dumps({**index, "_class_name": "QwenImageLayeredPipeline"}))
    with pytest.raises(GenerationError, match="QwenImageLayeredPipeline is not supported"):
        sdengine.load_pipeline(edit, device="cpu")
    with pytest.raises(GenerationError, match="no such file"):
        sdengine.load_pipeline(folder, device="cpu", vae=str(tmp_path / "missing.safetensors"))
    with pytest.raises(GenerationError, match="t5"):
        sdengine.load_pipeline(folder, device="cpu", t5=str(folder / "text_encoder"))
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(GenerationError, match="tokenizer.json"):
        sdengine.load_pipeline(broken, device="cpu")


def test_inpainting_matches_diffusers(loaded, folder: Path) -> None:
    import diffusers
    from PIL import Image

    ref = diffusers.QwenImageInpaintPipeline.from_pretrained(folder, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    g = np.random.default_rng(1)
    image = Image.fromarray(g.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = Image.fromarray((np.arange(SIZE)[None, :].repeat(SIZE, 0) >= SIZE // 2).astype(np.uint8) * 255)
    got = loaded("a red apple", negative_prompt="", init_image=image, mask=mask, mask_blur=0, strength=0.8, steps=5,
                 seed=4, width=SIZE, height=SIZE, progress=False)  # fmt: skip
    with torch.no_grad():
        want = ref("a red apple", negative_prompt="", image=image, mask_image=mask, strength=0.8, true_cfg_scale=4.0,
                   height=SIZE, width=SIZE, num_inference_steps=5, generator=torch.Generator().manual_seed(4),
                   output_type="np").images  # fmt: skip
    diff = np.abs(got.arrays - want)
    assert diff.mean() < 1e-4, (diff.mean(), diff.max())


def test_vae_given_apart(loaded, folder: Path) -> None:
    """--vae: another Qwen-Image VAE (here the folder's own, as a folder given apart) decodes the same image."""
    import sdengine

    other = sdengine.load_pipeline(folder, device="cpu", vae=str(folder / "vae"))
    settings = dict(prompt="a cat", steps=2, seed=3, width=SIZE, height=SIZE, progress=False)
    assert np.array_equal(other(**settings).arrays, loaded(**settings).arrays)


def test_refusals_without_a_model() -> None:
    """What the server asks before a worker holds the model: IP-Adapters, Kontext references, FreeU (ControlNets
    run: tests/test_qwen_controlnet.py)."""
    from PIL import Image

    from sdengine.pipeline.ip_adapter import IPAdapterUnit
    from sdengine.pipeline.qwen_image import qwen_refusals
    from sdengine.pipeline.request import GenerationRequest

    im = Image.new("RGB", (SIZE, SIZE))
    for kwargs, needle in (
        ({"ip_adapters": [IPAdapterUnit("ip.safetensors", images=[im])]}, "IP-Adapters are not supported"),
        ({"reference_images": [im]}, "Kontext"),
        ({"freeu": (1.1, 1.2, 0.9, 0.2)}, "FreeU"),
    ):
        reasons = qwen_refusals(GenerationRequest(prompt="a cat", **kwargs))
        assert reasons and needle in reasons[0], reasons
    assert qwen_refusals(GenerationRequest(prompt="a cat")) == []
    assert qwen_refusals(GenerationRequest(prompt="a cat", controlnets=[("some-controlnet", im, 1.0)])) == []


def test_tiny_vae_and_per_call_vae_are_refused(loaded) -> None:
    """No TAESD decodes Qwen-Image's latents (taef1's have the same shapes, another space): refused, one line."""
    from sdengine.catalog import TINY_VAE_FOLDER
    from sdengine.pipeline import BUILTIN_SD

    tiny = Path(BUILTIN_SD["emoji"]) / TINY_VAE_FOLDER
    with pytest.raises(GenerationError, match="tiny VAE .* not supported for Qwen-Image"):
        loaded.set_tiny_vae(tiny)
    with pytest.raises(GenerationError, match="when loading the model"):
        loaded.set_vae("some.vae.safetensors")
    loaded.set_vae(None)  # the loaded VAE again: nothing to do
    assert loaded.tiny_vae is None


def test_text_states_are_remembered(loaded) -> None:
    """The text encoder runs once per distinct text while its weights stay (sdengine.text.encode_cache)."""
    from sdengine.text.encode_cache import clear

    conditioner = loaded.conditioner
    calls: list[list[str]] = []
    encode = conditioner.encode_texts
    conditioner.encode_texts = lambda texts: (calls.append(texts), encode(texts))[1]
    try:
        clear()
        settings = dict(negative_prompt="dark", steps=2, seed=1, width=SIZE, height=SIZE, progress=False)
        first = loaded("a red apple", **settings)
        again = loaded("a red apple", **settings)
    finally:
        conditioner.encode_texts = encode
    assert sorted(t[0] for t in calls) == ["a red apple", "dark"]
    assert np.array_equal(first.arrays, again.arrays)


def test_one_step_is_refused_in_one_line_not_nan(folder: Path, oracle) -> None:
    """Qwen-Image's schedule is stretched to end at shift_terminal 0.02: a one-step grid has nothing to stretch
    (diffusers' rule divides 0 by 0, NaN latents; once "latents went non-finite" after the step). One line instead."""
    from sdengine.errors import SdengineError

    pipe = _oracle_parts_pipeline(folder, oracle)
    with pytest.raises(SdengineError, match="needs at least 2 steps, got 1") as e:
        pipe(prompt="a cat", steps=1, seed=1, width=SIZE, height=SIZE)
    assert "\n" not in str(e.value)
