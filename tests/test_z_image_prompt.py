"""Z-Image's prompt encoding (Qwen3, the chat template, hidden_states[-2], the real tokens) against diffusers'
``ZImagePipeline._encode_prompt`` on the tiny folder's Qwen3 and tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _z_image_models import diffusers_z, make_z_folder
from sdengine.text.qwen_tokenizer import load_qwen_tokenizer
from sdengine.text.z_image_prompt import CHAT_TEMPLATE, encode_prompt_z_image
from sdengine.weights.qwen_text_file import load_qwen_text_encoder

PROMPTS = ["a red apple on a table", "", "a cat sitting in the sun, blurry low quality {} <think>"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_z_folder(tmp_path_factory.mktemp("zprompt") / "z-image-tiny")


def test_template_is_the_tokenizers(folder: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder / "tokenizer")
    for p in PROMPTS:
        text = tok.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=True
        )
        assert text == CHAT_TEMPLATE.replace("{}", p, 1)


def test_states_match_diffusers(folder: Path) -> None:
    ref = diffusers_z(folder)
    encoder = load_qwen_text_encoder(folder / "text_encoder", family="qwen3")
    tok = load_qwen_tokenizer(folder / "tokenizer")
    states, mask = encode_prompt_z_image(encoder, tok, PROMPTS, cache=False)
    with torch.no_grad():
        want = ref._encode_prompt(list(PROMPTS), device="cpu", max_sequence_length=512)
    for i, w in enumerate(want):
        n = int(mask[i].sum())
        assert n == len(w)
        assert (states[i, :n] - w).abs().max().item() < 1e-6
        assert not states[i, n:].any()


def test_long_prompt_cut_as_diffusers_cuts_it(folder: Path) -> None:
    """A prompt over 512 tokens (template included): the first 512 states, as diffusers' truncating tokenizer, and a
    note saying so."""
    from sdengine.pipeline.z_image import ZImageConditioner
    from sdengine.pipeline.z_image_loading import load_text_side

    ref = diffusers_z(folder)
    encoder, encode = load_text_side(folder / "text_encoder", folder / "tokenizer", torch.float32, torch.device("cpu"))
    cond = ZImageConditioner(encode, joint_attention_dim=48, dtype=torch.float32, device=torch.device("cpu"))
    long = " ".join(["a red apple on a table"] * 120)
    notes: list[str] = []
    got = cond.text(long, note=notes.append)
    with torch.no_grad():
        (want,) = ref._encode_prompt([long], device="cpu", max_sequence_length=512)
    assert len(want) == 512 and bool(got["text_mask"].all())
    assert (got["crossattn"][0] - want).abs().max().item() < 2e-6
    assert notes == ["Z-Image reads the first 512 tokens of the prompt; the rest is cut off"]


def test_refusals(folder: Path) -> None:
    from sdengine.errors import UsageError

    encoder = load_qwen_text_encoder(folder / "text_encoder", family="qwen3")
    tok = load_qwen_tokenizer(folder / "tokenizer")
    for prompts, kw, why in (
        ([], {}, "non-empty"),
        ([3], {}, "must be a string"),
        (["a cat"], {"max_length": 0}, "max_length"),
    ):
        with pytest.raises(UsageError, match=why) as e:
            encode_prompt_z_image(encoder, tok, prompts, **kw)
        assert "\n" not in str(e.value)
