"""FLUX.2 [klein]'s text side and whole folders: the prompt encoding against diffusers'
``Flux2KleinPipeline.encode_prompt`` (Qwen3's layers 9, 18, 27 stacked per token, padding positions included), a
saved ``Flux2KleinPipeline`` folder through ``load_pipeline`` and through ``sdengine generate`` against diffusers'
whole pipeline with prompt strings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _flux2_models import diffusers_klein_folder, make_klein_folder, save_parts
from sdengine.errors import GenerationError
from sdengine.pipeline import load_pipeline
from sdengine.pipeline.flux2 import Flux2Pipeline
from sdengine.text.flux2_prompt import PROMPT_TEMPLATE, encode_prompt_flux2, template_tokens
from sdengine.text.qwen_tokenizer import load_qwen_tokenizer

W, H = 24, 40  # 3 x 5 diffusion latents with the tiny VAE's 4x


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_klein_folder(tmp_path_factory.mktemp("flux2") / "klein-tiny")


@pytest.fixture(scope="module")
def oracle(folder: Path):
    return diffusers_klein_folder(folder)


@pytest.fixture(scope="module")
def loaded(folder: Path) -> Flux2Pipeline:
    pipe = load_pipeline(str(folder), device="cpu", dtype=torch.float32)
    assert isinstance(pipe, Flux2Pipeline)
    return pipe


def test_template_is_qwen3s_without_thinking(oracle) -> None:
    """The chat template text is the tokenizer's own ``apply_chat_template(..., enable_thinking=False)``, and the
    tokens (padded to max length, truncated) are the tokenizer's with ``padding="max_length", truncation=True``."""
    tok = load_qwen_tokenizer(Path(oracle.tokenizer.name_or_path))
    for prompt in ("a red apple", "{braces} and \\n stay"):
        text = oracle.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        assert text == PROMPT_TEMPLATE.replace("{}", prompt)
        for length in (40, 9):  # padded; cut inside the template
            want = oracle.tokenizer(text, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
            ids, mask = template_tokens(tok, prompt, length)
            assert torch.equal(ids, want["input_ids"]) and torch.equal(mask, want["attention_mask"])


def test_prompt_states_match_diffusers(oracle, loaded) -> None:
    """Two prompts of different lengths at max_sequence_length 40 and a cut one at 9: every position equal to
    diffusers' (the padding's too: the transformer reads them)."""
    tok = load_qwen_tokenizer(Path(oracle.tokenizer.name_or_path))
    prompts = ["a red apple on a table", "a cat"]
    with torch.no_grad():
        for length in (40, 9):
            want, _ = oracle.encode_prompt(prompts, max_sequence_length=length)
            got = encode_prompt_flux2(loaded.text_encoder, tok, prompts, max_sequence_length=length)
            assert got.shape == want.shape == (2, length, 48)
            assert float((got - want).abs().max()) < 1e-5
            assert float(want[:, -1].abs().max()) > 0.1  # the last (padding) position carries numbers


def test_vae_given_apart(folder: Path, loaded) -> None:
    """``vae=`` another FLUX.2 VAE folder: loaded in the folder's VAE's place, named as the VAE's source."""
    pipe = load_pipeline(str(folder), device="cpu", dtype=torch.float32, vae=str(folder / "vae"))
    assert pipe.vae_source == folder / "vae"
    got = pipe("a cat", steps=2, seed=1, width=W, height=H).arrays[0]
    assert np.array_equal(got, loaded("a cat", steps=2, seed=1, width=W, height=H).arrays[0])


@pytest.mark.parametrize(("negative", "cfg"), [("", 1.0), ("", 3.0)])
def test_folder_matches_diffusers(oracle, loaded, negative: str, cfg: float) -> None:
    """The whole folder, prompt strings in: no CFG, and CFG with diffusers' empty negative; mean abs difference on
    0..1 pixels under 1e-4."""
    want = oracle(
        prompt="a red apple on a table",
        guidance_scale=cfg,
        height=H,
        width=W,
        num_inference_steps=3,
        generator=torch.Generator("cpu").manual_seed(3),
        output_type="np",
    ).images[0]
    got = loaded("a red apple on a table", negative, cfg_scale=cfg, steps=3, seed=3, width=W, height=H).arrays[0]
    assert float(np.abs(got - want).mean()) < 1e-4


def test_bfloat16_folder_is_near_diffusers(folder: Path) -> None:
    """The whole folder in bfloat16 against diffusers' in bfloat16: close, not equal (diffusers keeps the latents in
    bfloat16 between steps, sdengine in float32); measured 3.4e-3 mean abs on 0..1 pixels."""
    pipe = load_pipeline(str(folder), device="cpu", dtype=torch.bfloat16)
    got = pipe("a red apple", steps=3, seed=1, width=W, height=H, cfg_scale=3.0).arrays[0]
    oracle = diffusers_klein_folder(folder).to(torch.bfloat16)
    want = oracle(
        prompt="a red apple",
        guidance_scale=3.0,
        height=H,
        width=W,
        num_inference_steps=3,
        generator=torch.Generator("cpu").manual_seed(1),
        output_type="np",
    ).images[0]
    assert np.isfinite(got).all() and float(np.abs(got - want).mean()) < 1e-2


def test_long_prompt_is_cut_with_a_note(folder: Path, oracle) -> None:
    """max_sequence_length 9 (inside the template): the prompt's states cut as diffusers' tokenizer cuts them, the
    image diffusers' with the same max_sequence_length, and a note saying so."""
    from sdengine.pipeline.flux2_loading import load_flux2_pipeline

    pipe = load_flux2_pipeline(folder, device=torch.device("cpu"), dtype=torch.float32, max_sequence_length=9)
    prompt = "a red apple on a table"
    result = pipe(prompt, steps=2, seed=4, width=W, height=H, cfg_scale=1.0)
    assert any("reads the first 9 tokens of the prompt" in n for n in result.notes)
    want = oracle(
        prompt=prompt,
        guidance_scale=1.0,
        height=H,
        width=W,
        num_inference_steps=2,
        generator=torch.Generator("cpu").manual_seed(4),
        max_sequence_length=9,
        output_type="np",
    ).images[0]
    assert float(np.abs(result.arrays[0] - want).mean()) < 1e-4


def test_cli_generate_with_a_klein_folder(folder: Path, oracle, tmp_path: Path) -> None:
    """``sdengine generate --model FOLDER``: the base model's defaults (CFG 4, Euler) and diffusers' image to the
    PNG's rounding; then with ``--reference-image`` (klein edit) against diffusers' ``image=``."""
    from PIL import Image

    from sdengine.cli import main
    from sdengine.metadata import parse_parameters, read_png_parameters

    out = tmp_path / "a.png"
    args = ["generate", "--model", str(folder), "a red apple on a table", "--steps", "3", "--seed", "7"]
    assert main([*args, "--width", str(W), "--height", str(H), "--out", str(out), "--no-progress"]) == 0
    parsed = parse_parameters(read_png_parameters(out))
    assert float(parsed["CFG scale"]) == 4.0 and parsed["Sampler"] == "Euler" and parsed["Steps"] == "3"
    got = np.asarray(Image.open(out), dtype=np.float32) / 255
    want = oracle(
        prompt="a red apple on a table",
        height=H,
        width=W,
        num_inference_steps=3,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="np",
    ).images[0]
    assert got.shape == want.shape
    assert float(np.abs(got - want).mean()) < 1.0 / 255
    # klein edit from the command line: --reference-image, the output at the reference's fitted size (88x64)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(tmp_path / "ref.png")
    out2 = tmp_path / "edit.png"
    edit = ["generate", "--model", str(folder), "make it green", "--steps", "2", "--seed", "9", "--cfg", "2.5"]
    assert main([*edit, "--reference-image", str(tmp_path / "ref.png"), "--out", str(out2), "--no-progress"]) == 0
    got = np.asarray(Image.open(out2), dtype=np.float32) / 255
    want = oracle(
        image=[Image.open(tmp_path / "ref.png").convert("RGB")],
        prompt="make it green",
        guidance_scale=2.5,
        num_inference_steps=2,
        generator=torch.Generator("cpu").manual_seed(9),
        output_type="np",
    ).images[0]
    assert got.shape == want.shape == (64, 88, 3)
    assert float(np.abs(got - want).mean()) < 1.0 / 255


def test_folder_refusals(folder: Path, tmp_path: Path) -> None:
    """Another family's encoder flag, and a text encoder whose stacked width is not the transformer's: one line
    each, before the transformer is read (FLUX.2 [dev]'s folders: tests/test_flux2_dev.py)."""
    with pytest.raises(GenerationError, match=r"\(FLUX.2\): --clip-l"):
        load_pipeline(str(folder), device="cpu", t5=str(folder))
    from sdengine.weights.io import save_safetensors

    bfl = tmp_path / "flux-2-klein-4b.safetensors"  # BFL's names: FLUX.1's double_blocks, FLUX.2's shared modulation
    save_safetensors(
        {
            "double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 1),
            "single_stream_modulation.lin.weight": torch.zeros(3, 1),
        },
        bfl,
    )
    with pytest.raises(GenerationError, match=r"holds no Qwen3 text encoder: give it with --qwen-text"):
        load_pipeline(str(bfl), device="cpu")
    sd_vae = tmp_path / "sd-vae"
    sd_vae.mkdir()
    (sd_vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(GenerationError, match=r"not a FLUX.2 VAE config: _class_name='AutoencoderKL'") as e:
        load_pipeline(str(folder), device="cpu", vae=str(sd_vae))
    assert "\n" not in str(e.value)
    wrong = save_parts(tmp_path / "wrong")  # a transformer taking 24-wide text states
    for part in ("text_encoder", "tokenizer"):
        (wrong / part).symlink_to(folder / part)
    (wrong / "model_index.json").write_text((folder / "model_index.json").read_text())
    with pytest.raises(GenerationError) as e:
        load_pipeline(str(wrong), device="cpu", dtype=torch.float32)
    assert "gives 3 x 16 = 48 numbers per token from layers [9, 18, 27]; the transformer takes 24" in str(e.value)
    assert "\n" not in str(e.value)


def test_text_states_are_remembered(loaded) -> None:
    """A prompt encoded once is not encoded again while the encoder's weights stay (the cache of encode_cache)."""
    calls: list[list[str]] = []
    conditioner = loaded.conditioner
    encode = conditioner.encode_texts
    conditioner.encode_texts = lambda texts: calls.append(texts) or encode(texts)
    try:
        with torch.no_grad():  # as in a generation
            first = conditioner.text("a green pear")["crossattn"]
            again = conditioner.text("a green pear")["crossattn"]
    finally:
        conditioner.encode_texts = encode
    assert calls == [["a green pear"]] and torch.equal(first, again)
