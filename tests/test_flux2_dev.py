"""FLUX.2 [dev] (diffusers' ``Flux2Pipeline``) on a tiny random folder in the release's layout
(:mod:`_flux2_dev_models`): Mistral Small 3's prompt states against diffusers' ``encode_prompt`` (BFL's system
message, layers 10, 20, 30, left padding read too), the whole folder through ``load_pipeline`` and ``sdengine
generate`` against diffusers' pipeline (the embedded guidance, a reference image), and what it refuses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from _flux2_dev_models import diffusers_dev_folder, make_dev_folder, write_mistral_processor
from sdengine.errors import GenerationError
from sdengine.models.config_checks import ConfigError
from sdengine.models.qwen_text import QwenTextConfig
from sdengine.pipeline import load_pipeline
from sdengine.pipeline.flux2 import Flux2Pipeline
from sdengine.text.flux2_prompt import (
    DEV_HIDDEN_LAYERS,
    DEV_PROMPT_TEMPLATE,
    DEV_SYSTEM_MESSAGE,
    dev_prompt,
    encode_prompt_flux2,
    template_tokens,
)
from sdengine.text.qwen_tokenizer import load_qwen_tokenizer
from sdengine.weights.qwen_text_file import load_qwen_text_encoder

W, H = 40, 24  # 5 x 3 diffusion latents with the tiny VAE's 4x


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dev_folder(tmp_path_factory.mktemp("flux2dev") / "dev-tiny")


@pytest.fixture(scope="module")
def oracle(folder: Path):
    return diffusers_dev_folder(folder)


@pytest.fixture(scope="module")
def loaded(folder: Path) -> Flux2Pipeline:
    pipe = load_pipeline(str(folder), device="cpu", dtype=torch.float32)
    assert isinstance(pipe, Flux2Pipeline) and pipe.dev and pipe.variant == "dev"
    return pipe


def _messages(prompt: str) -> list[dict]:
    """diffusers' ``format_input`` for one prompt without images."""
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    return format_input([prompt])[0]


def test_template_is_mistrals_with_bfls_system_message(folder: Path, oracle) -> None:
    """The template text is what the tokenizer's chat template renders for diffusers' messages (BFL's system message,
    one user text block, no generation prompt), and the ids and mask (left-padded to max length, cut) are the
    tokenizer's ``apply_chat_template(..., padding="max_length", truncation=True)``."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    assert DEV_SYSTEM_MESSAGE == SYSTEM_MESSAGE
    tok = load_qwen_tokenizer(folder / "tokenizer")
    assert tok.padding_side == "left"
    for prompt in ("a red apple", "{braces} and \\n stay"):
        text = oracle.tokenizer.apply_chat_template(_messages(prompt), tokenize=False, add_generation_prompt=False)
        assert text == DEV_PROMPT_TEMPLATE.replace("{}", prompt)
        for length in (64, 9):  # padded; cut inside the system message
            want = oracle.tokenizer.apply_chat_template(
                [_messages(prompt)],
                add_generation_prompt=False,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                padding="max_length",
                truncation=True,
                max_length=length,
            )
            ids, mask = template_tokens(tok, prompt, length, DEV_PROMPT_TEMPLATE)
            assert torch.equal(ids, want["input_ids"]) and torch.equal(mask, want["attention_mask"])


@pytest.mark.parametrize("side", ["left", "right"])
def test_prompt_states_match_diffusers(folder: Path, oracle, tmp_path: Path, side: str) -> None:
    """Two prompts (one with Pixtral's ``[IMG]``, which diffusers takes out) at max_sequence_length 64 and one cut
    at 9, with the release's left padding and with right padding: every position equal to diffusers'
    ``_get_mistral_3_small_prompt_embeds`` (the padding's too: the transformer reads them; measured max abs 0)."""
    from transformers import PreTrainedTokenizerFast

    tok_dir = folder / "tokenizer"
    if side == "right":
        tok_dir = tmp_path / "tokenizer"
        write_mistral_processor(tok_dir, padding_side="right")
    ref_tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    tok = load_qwen_tokenizer(tok_dir)
    encoder = load_qwen_text_encoder(folder / "text_encoder", family="mistral")
    prompts = ["a red apple on a wooden table", "make it [IMG]green"]
    for length in (64, 9):
        with torch.no_grad():
            want = oracle._get_mistral_3_small_prompt_embeds(
                oracle.text_encoder, ref_tok, prompts, max_sequence_length=length
            )
        got = encode_prompt_flux2(
            encoder,
            tok,
            [dev_prompt(p) for p in prompts],
            max_sequence_length=length,
            hidden_layers=DEV_HIDDEN_LAYERS,
            template=DEV_PROMPT_TEMPLATE,
            cache=False,
        )
        assert got.shape == want.shape == (2, length, 48)
        assert float((got - want).abs().max()) == 0.0


def test_text_encoder_matches_transformers(folder: Path, oracle) -> None:
    """The language model alone against transformers' ``Mistral3ForConditionalGeneration`` (a left-padded row and
    a full one): every hidden state transformers returns, the last after the final norm, bit-equal."""
    encoder = load_qwen_text_encoder(folder, family="mistral")  # the pipeline folder: its text_encoder/
    assert encoder.config.rope_theta == 1e9 and not encoder.config.qk_norm and not encoder.config.attention_bias
    ids = torch.tensor([[11, 11, 11, 1, 17, 40, 50, 18, 3, 60, 4], [1, 17, 40, 50, 60, 70, 18, 3, 60, 80, 4]])
    mask = (ids != 11).long()
    with torch.no_grad():
        want = oracle.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    got = encoder(ids, mask, hidden_layers=list(range(31)))
    for k in range(31):
        assert torch.equal(got[k], want.hidden_states[k]), k


@pytest.mark.parametrize("guidance", [None, 2.5])
def test_folder_matches_diffusers(oracle, loaded, guidance: float | None) -> None:
    """The whole folder, prompt strings in: diffusers' default guidance 4 (sdengine's default too) and 2.5 given
    as ``distilled_cfg_scale``; mean abs difference on 0..1 pixels under 1e-4."""
    want = oracle(
        prompt="a red apple on a table",
        guidance_scale=4.0 if guidance is None else guidance,
        height=H,
        width=W,
        num_inference_steps=3,
        generator=torch.Generator("cpu").manual_seed(3),
        output_type="np",
    ).images[0]
    kw = {} if guidance is None else {"distilled_cfg_scale": guidance}
    result = loaded("a red apple on a table", steps=3, seed=3, width=W, height=H, **kw)
    got = result.arrays[0]
    assert got.shape == want.shape
    assert float(np.abs(got - want).mean()) < 1e-4
    assert f"Distilled CFG Scale: {4.0 if guidance is None else guidance:g}," in result.infotexts[0]


def test_bfloat16_folder_is_near_diffusers(folder: Path) -> None:
    """The whole folder in bfloat16 (Mistral and the transformer) against diffusers' in bfloat16: close, not equal
    (diffusers keeps the latents in bfloat16 between steps, sdengine in float32)."""
    pipe = load_pipeline(str(folder), device="cpu", dtype=torch.bfloat16)
    got = pipe("a red apple", steps=3, seed=1, width=W, height=H).arrays[0]
    oracle = diffusers_dev_folder(folder).to(torch.bfloat16)
    want = oracle(
        prompt="a red apple",
        height=H,
        width=W,
        num_inference_steps=3,
        generator=torch.Generator("cpu").manual_seed(1),
        output_type="np",
    ).images[0]
    assert np.isfinite(got).all() and float(np.abs(got - want).mean()) < 1e-2


def test_reference_image_matches_diffusers(oracle, loaded) -> None:
    """A reference image (FLUX.2's editing, as klein's): no size given, so the reference's fitted size (88 x 72);
    mean abs under 1e-4 against diffusers' ``image=``."""
    from PIL import Image

    rng = np.random.default_rng(0)
    ref = Image.fromarray(rng.integers(0, 256, (75, 90, 3), dtype=np.uint8))
    want = oracle(
        image=[ref],
        prompt="make it green",
        num_inference_steps=3,
        generator=torch.Generator("cpu").manual_seed(5),
        output_type="np",
    ).images[0]
    got = loaded("make it green", steps=3, seed=5, reference_images=[ref]).arrays[0]
    assert got.shape == want.shape == (72, 88, 3)
    assert float(np.abs(got - want).mean()) < 1e-4


def test_cli_generate_with_a_dev_folder(folder: Path, oracle, tmp_path: Path) -> None:
    """``sdengine generate --model FOLDER --guidance 3``: [dev]'s defaults (no CFG, Euler) and diffusers' image with
    ``guidance_scale=3`` to the PNG's rounding."""
    from PIL import Image

    from sdengine.cli import main
    from sdengine.metadata import parse_parameters, read_png_parameters

    out = tmp_path / "a.png"
    args = ["generate", "--model", str(folder), "a red apple", "--steps", "3", "--seed", "7", "--guidance", "3"]
    assert main([*args, "--width", str(W), "--height", str(H), "--out", str(out), "--no-progress"]) == 0
    parsed = parse_parameters(read_png_parameters(out))
    assert float(parsed["CFG scale"]) == 1.0 and parsed["Sampler"] == "Euler" and parsed["Steps"] == "3"
    assert float(parsed["Distilled CFG Scale"]) == 3.0
    got = np.asarray(Image.open(out), dtype=np.float32) / 255
    want = oracle(
        prompt="a red apple",
        guidance_scale=3.0,
        height=H,
        width=W,
        num_inference_steps=3,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="np",
    ).images[0]
    assert got.shape == want.shape
    assert float(np.abs(got - want).mean()) < 1.0 / 255


def test_defaults_and_refusals(loaded) -> None:
    """diffusers' defaults (50 steps, guidance 4, no CFG); CFG, a guidance out of range: one line each, before any
    model runs (img2img and inpainting run: tests/test_flux2_dev_inpaint.py)."""
    assert loaded.family_defaults == {
        "steps": 50,
        "cfg_scale": 1.0,
        "distilled_cfg_scale": 4.0,
        "sampler": "euler",
        "schedule": "normal",
    }
    from PIL import Image

    cases = [
        ({"cfg_scale": 3.0}, r"cfg_scale 3: FLUX.2 \[dev\] is guidance-distilled and runs without CFG"),
        ({"distilled_cfg_scale": -1.0}, r"distilled_cfg_scale must be in \[0, 100\], got -1.0"),
        ({"init_image": Image.new("RGB", (W, H)), "init_latent_resize": True}, r"init_latent_resize: A1111's latent"),
    ]
    for kw, message in cases:
        with pytest.raises(GenerationError, match=message) as e:
            loaded("a red apple", steps=1, width=W, height=H, **kw)
        assert "\n" not in str(e.value)


def test_folder_refusals(folder: Path, tmp_path: Path) -> None:
    """A [dev] folder whose transformer has no guidance embedding, a Qwen3 text encoder in a [dev] folder, a klein
    flag on a [dev] folder, Mistral configs this encoder does not run: one line each."""
    from _flux2_models import flux2_transformer, qwen3_text_encoder

    no_guidance = tmp_path / "no-guidance"  # klein's transformer (no guidance embedding) in a [dev] folder
    shutil.copytree(folder, no_guidance, ignore=shutil.ignore_patterns("transformer"))
    flux2_transformer(1, joint_attention_dim=48).save_pretrained(no_guidance / "transformer")
    with pytest.raises(GenerationError, match=r"folder whose transformer has no guidance embedding") as e:
        load_pipeline(str(no_guidance), device="cpu")
    assert "\n" not in str(e.value)
    qwen = tmp_path / "qwen-te"
    shutil.copytree(folder, qwen, ignore=shutil.ignore_patterns("text_encoder"))
    qwen3_text_encoder(400, 1).save_pretrained(qwen / "text_encoder")
    with pytest.raises(GenerationError, match=r"a Qwen3 text encoder .* but this model needs Mistral Small 3") as e:
        load_pipeline(str(qwen), device="cpu")
    assert "\n" not in str(e.value)
    with pytest.raises(GenerationError, match=r"--qwen-text does not apply to a FLUX.2 folder"):
        load_pipeline(str(folder), device="cpu", qwen_text=str(folder))
    from sdengine.weights.io import save_safetensors

    dev_file = tmp_path / "flux2-dev.safetensors"  # BFL's names: the shared modulation and the guidance embedding
    marks = ("single_stream_modulation.lin.weight", "guidance_in.in_layer.weight")
    save_safetensors({f"model.diffusion_model.{k}": torch.zeros(3, 1) for k in marks}, dev_file)
    with pytest.raises(GenerationError, match=r"holds no Mistral Small 3 text encoder: give it with --qwen-text") as e:
        load_pipeline(str(dev_file), device="cpu")  # a [dev] file: its parts (tests/test_flux2_dev_files.py)
    assert "\n" not in str(e.value)
    text = json.loads((folder / "text_encoder" / "config.json").read_text())
    for change, message in (
        ({"sliding_window": 1024}, r"sliding_window=1024; sliding-window attention narrower than 4096"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e9}}, r"rope_type 'yarn' is not supported"),
        ({"hidden_act": "gelu"}, r"hidden_act 'gelu' is not supported"),
    ):
        bad = {**text, "text_config": {**text["text_config"], **change}}
        with pytest.raises(ConfigError, match=message) as e:
            QwenTextConfig.from_transformers(bad)
        assert "\n" not in str(e.value)
    # no sliding_window key: transformers' default window (4096) changes nothing at FLUX.2's lengths
    plain = {k: v for k, v in text["text_config"].items() if k != "sliding_window"}
    assert QwenTextConfig.from_transformers({"model_type": "mistral", **plain}).num_hidden_layers == 30
