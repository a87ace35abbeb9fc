"""Qwen-Image's tokenizer and prompt encoding: the tokenizer against transformers' ``Qwen2Tokenizer`` on a byte-level
BPE vocabulary trained here (vocab.json + merges.txt + tokenizer_config.json's added tokens, and the tokenizer.json
transformers writes), and ``encode_prompt_qwen`` against diffusers' ``QwenImagePipeline.encode_prompt`` on a tiny
random Qwen2.5-VL text encoder; one-line errors for the rest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sdengine.errors import NonFiniteError, UsageError
from sdengine.text.qwen_prompt import PROMPT_TEMPLATE, TEMPLATE_DROP, encode_prompt_qwen
from sdengine.text.qwen_tokenizer import SPLIT_REGEX, QwenTokenizer, QwenTokenizerError, load_qwen_tokenizer
from sdengine.weights.qwen_text_file import load_qwen_text_encoder
from test_qwen_text import hf_qwen

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
diffusers = pytest.importorskip("diffusers")

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CORPUS = [
    PROMPT_TEMPLATE.format("a red apple on a wooden table"),
    "A photo of a cat sitting on the windowsill, golden hour, 35mm film, bokeh.",
    "Ein Hund läuft über die Straße; café crème, naïve façade. 1234567890 dollars!",
    "   leading spaces and\ttabs\n\nnew lines   ",
    "It's what they'd've said: we're here, you'll see, I'm sure.",
    "日本語のテキストと emoji 🍎🐱 mixed in",
]
PROBES = [
    "",
    "a red apple",
    "  two  spaces   and trailing ",
    "Caf\u0065\u0301 (decomposed) vs Café",  # NFC folds the decomposed é
    "numbers 3.14159 and 2026-12-03",
    "You'LL see, it'S fine",
    "line one\r\nline two\n\n\nend",
    "unseen bytes: \u00ff\u2603 \U0001f600 ok",
    "a prompt naming <|im_end|> and <|im_start|>user inside",
    "x" * 300,
]


def _train_vocab(folder: Path) -> int:
    """A byte-level BPE vocabulary trained on CORPUS with Qwen2's pre-tokenizer; returns its size."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=420, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(folder))
    return tok.get_vocab_size()


def write_qwen_tokenizer(folder: Path) -> int:
    """A Qwen2 tokenizer folder as Qwen-Image ships one (vocab.json, merges.txt, tokenizer_config.json with the chat
    markers as added tokens after the vocabulary); returns the vocabulary size with them."""
    size = _train_vocab(folder)
    added = {
        str(size + i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, t in enumerate(SPECIALS)
    }
    config = {
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 131072,
        "errors": "replace",
        "split_special_tokens": False,
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "Qwen2Tokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return size + len(SPECIALS)


@pytest.fixture(scope="module")
def tok_folder(tmp_path_factory) -> tuple[Path, int]:
    folder = tmp_path_factory.mktemp("qwen_tok") / "tokenizer"
    return folder, write_qwen_tokenizer(folder)


def _hf_tokenizer(folder: Path):
    return transformers.Qwen2Tokenizer.from_pretrained(str(folder))


def test_tokenizer_matches_transformers(tok_folder, tmp_path):
    folder, vocab = tok_folder
    ref = _hf_tokenizer(folder)
    ours = load_qwen_tokenizer(folder)
    assert ours.vocab_size == vocab == len(ref)
    assert ours.pad_token_id == ref.pad_token_id == ours.token_id("<|endoftext|>")
    for text in PROBES:
        assert ours.encode(text) == ref(text)["input_ids"], text
    assert ours.token_id("<|im_end|>") in ours.encode(PROBES[-2])  # the chat markers stay one token each
    # the batch rule: truncation, padding to the longest row, mask
    for max_length in (5, 40, 1058):
        ids, mask = ours(PROBES, max_length=max_length)
        want = ref(PROBES, max_length=max_length, padding=True, truncation=True, return_tensors="pt")
        assert torch.equal(ids, want["input_ids"]) and torch.equal(mask, want["attention_mask"]), max_length
    # the tokenizer.json transformers writes reads the same
    ref.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "tokenizer.json").is_file()
    again = load_qwen_tokenizer(tmp_path / "saved")
    for text in PROBES:
        assert again.encode(text) == ours.encode(text), text


def test_left_padding_when_the_config_says_so(tok_folder, tmp_path):
    folder, _ = tok_folder
    left = tmp_path / "left"
    left.mkdir()
    for f in folder.iterdir():
        (left / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((left / "tokenizer_config.json").read_text())
    (left / "tokenizer_config.json").write_text(json.dumps({**cfg, "padding_side": "left"}))
    ours = load_qwen_tokenizer(left)
    ref = _hf_tokenizer(left)
    ids, mask = ours(PROBES[:4], max_length=50)
    want = ref(PROBES[:4], max_length=50, padding=True, truncation=True, return_tensors="pt")
    assert torch.equal(ids, want["input_ids"]) and torch.equal(mask, want["attention_mask"])


def _oracle_pipeline(hf_encoder, hf_tokenizer):
    """diffusers' QwenImagePipeline with only the parts encode_prompt reads (no transformer, VAE or scheduler)."""
    cls = diffusers.QwenImagePipeline
    pipe = object.__new__(cls)
    for name, value in (
        ("text_encoder", hf_encoder),
        ("tokenizer", hf_tokenizer),
        ("tokenizer_max_length", 1024),
        ("prompt_template_encode", PROMPT_TEMPLATE),
        ("prompt_template_encode_start_idx", TEMPLATE_DROP),
    ):
        object.__setattr__(pipe, name, value)
    return pipe


@pytest.fixture(scope="module")
def encoders(tok_folder, tmp_path_factory):
    folder, vocab = tok_folder
    hf = hf_qwen(vocab_size=vocab, seed=7)
    te = tmp_path_factory.mktemp("qwen_prompt_te") / "text_encoder"
    hf.save_pretrained(te)
    return hf, load_qwen_text_encoder(te), _hf_tokenizer(folder), load_qwen_tokenizer(folder)


def test_encode_prompt_matches_diffusers(encoders):
    hf, ours, hf_tok, tok = encoders
    pipe = _oracle_pipeline(hf, hf_tok)
    prompts = ["a red apple", "A photo of a cat sitting on the windowsill, golden hour, 35mm film, bokeh.", ""]
    with torch.no_grad():
        ref, ref_mask = diffusers.QwenImagePipeline.encode_prompt(pipe, prompts, device=torch.device("cpu"))
    assert ref_mask is not None
    # the padded batch, as diffusers runs it: the same numbers
    states, mask = encode_prompt_qwen(ours, tok, prompts, max_sequence_length=1024, together=True)
    assert states.shape == ref.shape and states.dtype == ref.dtype and torch.equal(mask, ref_mask)
    err = float((states - ref).abs().max())
    assert err < 2e-5, err
    # each prompt alone (the default): equal to float rounding, and a row never depends on the others
    alone, alone_mask = encode_prompt_qwen(ours, tok, prompts, max_sequence_length=1024)
    assert torch.equal(alone_mask, ref_mask) and float((alone - ref).abs().max()) < 2e-5
    with torch.no_grad():
        one, one_mask = diffusers.QwenImagePipeline.encode_prompt(pipe, prompts[1], device=torch.device("cpu"))
    assert one_mask is None  # diffusers' all-ones mask becomes None; ours stays a mask of ones
    s1, m1 = encode_prompt_qwen(ours, tok, prompts[1], max_sequence_length=1024)
    assert bool(m1.all()) and float((s1 - one).abs().max()) < 2e-5
    assert torch.equal(s1[0], alone[1, : s1.shape[1]])


def test_prompts_are_remembered(encoders):
    from sdengine.text.encode_cache import cache_info, clear

    _, ours, _, tok = encoders
    clear(ours)
    first, _ = encode_prompt_qwen(ours, tok, ["a red apple", "a cat"])
    again, _ = encode_prompt_qwen(ours, tok, ["a cat", "a red apple"])
    info = cache_info(ours)
    assert (info["misses"], info["hits"]) == (2, 2), info
    assert torch.equal(again[0], first[1]) and torch.equal(again[1], first[0])
    fresh, _ = encode_prompt_qwen(ours, tok, ["a red apple", "a cat"], cache=False)
    assert torch.equal(fresh, first) and cache_info(ours)["hits"] == 2


def test_max_sequence_length_and_long_prompts(encoders):
    hf, ours, hf_tok, tok = encoders
    pipe = _oracle_pipeline(hf, hf_tok)
    prompts = ["a cat " * 700, "a dog"]  # past 1024 + 34 tokens: truncated by the tokenizer, the template's end too
    with torch.no_grad():
        ref, ref_mask = diffusers.QwenImagePipeline.encode_prompt(
            pipe, prompts, device=torch.device("cpu"), max_sequence_length=512
        )
    states, mask = encode_prompt_qwen(ours, tok, prompts)  # the pipeline's default 512
    assert states.shape == ref.shape == (2, 512, 32)
    assert torch.equal(mask, ref_mask)
    assert float((states - ref).abs().max()) < 2e-5
    short, short_mask = encode_prompt_qwen(ours, tok, prompts, max_sequence_length=7)
    assert short.shape == (2, 7, 32) and torch.equal(short, states[:, :7]) and bool(short_mask.all())


def test_bfloat16_states(encoders, tok_folder, tmp_path):
    hf, _, hf_tok, tok = encoders
    hf.save_pretrained(tmp_path / "te")
    ours16 = load_qwen_text_encoder(tmp_path / "te", dtype=torch.bfloat16)
    states, _ = encode_prompt_qwen(ours16, tok, ["a red apple"])
    assert states.dtype == torch.bfloat16
    hf16 = hf_qwen(vocab_size=tok_folder[1], seed=7).to(torch.bfloat16)
    with torch.no_grad():
        ref, _ = diffusers.QwenImagePipeline.encode_prompt(
            _oracle_pipeline(hf16, hf_tok), ["a red apple"], device=torch.device("cpu")
        )
    assert ref.dtype == torch.bfloat16 and float((states.float() - ref.float()).abs().max()) < 0.1


def test_refusals(encoders, tok_folder, tmp_path):
    _, ours, _, tok = encoders
    for kwargs, words in (
        ({"prompts": []}, "non-empty"),
        ({"prompts": ["ok", 3]}, "must be a string"),
        ({"prompts": "x", "max_sequence_length": 0}, "max_sequence_length"),
        ({"prompts": "x", "max_sequence_length": 1025}, "max_sequence_length"),
        ({"prompts": "x", "template": "no slot"}, "exactly one"),
        ({"prompts": "x", "drop": -1}, "drop"),
        ({"prompts": "x", "drop": 100_000}, "not more than the 100000 template tokens"),
    ):
        with pytest.raises(UsageError, match=words):
            encode_prompt_qwen(ours, tok, **kwargs)
    with pytest.raises(QwenTokenizerError, match="max_length"):
        tok(["x"], max_length=0)
    folder, _ = tok_folder
    broken = tmp_path / "broken"
    broken.mkdir()
    with pytest.raises(QwenTokenizerError, match="no tokenizer.json, nor vocab.json"):
        QwenTokenizer.from_folder(broken)
    for f in folder.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((broken / "tokenizer_config.json").read_text())
    first = min(cfg["added_tokens_decoder"], key=int)
    moved = {str(int(k) + 5): v for k, v in cfg["added_tokens_decoder"].items()}
    (broken / "tokenizer_config.json").write_text(json.dumps({**cfg, "added_tokens_decoder": moved}))
    with pytest.raises(QwenTokenizerError, match=f"is id {int(first) + 5} in the config"):
        load_qwen_tokenizer(broken)
    (broken / "tokenizer_config.json").write_text(json.dumps({**cfg, "pad_token": "<|nope|>"}))
    with pytest.raises(QwenTokenizerError, match="no pad token"):
        load_qwen_tokenizer(broken)
    (broken / "tokenizer_config.json").write_text(json.dumps({**cfg, "padding_side": "middle"}))
    with pytest.raises(QwenTokenizerError, match="padding_side"):
        load_qwen_tokenizer(broken)
    (broken / "tokenizer_config.json").write_text(json.dumps(cfg))
    (broken / "merges.txt").write_text("#version: 0.2\nonly_one_piece\n")
    with pytest.raises(QwenTokenizerError, match="two pieces"):
        load_qwen_tokenizer(broken)
    (broken / "merges.txt").write_text("#version: 0.2\nzzq qqz\n")
    with pytest.raises(QwenTokenizerError, match="do not fit"):
        load_qwen_tokenizer(broken)
    (broken / "vocab.json").write_text("[1, 2]")
    with pytest.raises(QwenTokenizerError, match="not a vocabulary"):
        load_qwen_tokenizer(broken)
    with pytest.raises(QwenTokenizerError, match="no such"):
        load_qwen_tokenizer(tmp_path / "nothing")


def test_overflow_is_refused_not_returned(encoders, tok_folder, tmp_path):
    """float16 states that overflow (weights scaled up here; Qwen2.5-VL's real activations can exceed float16's
    range) are a NonFiniteError, not NaN states handed to the transformer."""
    hf, _, _, tok = encoders
    hf.save_pretrained(tmp_path / "te")
    ours16 = load_qwen_text_encoder(tmp_path / "te", dtype=torch.float16)
    states, _ = encode_prompt_qwen(ours16, tok, ["a red apple"])
    assert states.dtype == torch.float16 and torch.isfinite(states).all()
    with torch.no_grad():
        for layer in ours16.blocks:
            layer.mlp.down_proj.weight.mul_(1e5)
    for together in (False, True):
        with pytest.raises(NonFiniteError, match="overflowed in torch.float16"):
            encode_prompt_qwen(ours16, tok, ["a red apple"], together=together)


def test_added_tokens_json_alone(tok_folder, tmp_path):
    """Older folders list the chat markers in added_tokens.json (token -> id) rather than the config's
    added_tokens_decoder: the same ids either way."""
    folder, _ = tok_folder
    other = tmp_path / "older"
    other.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (other / name).write_bytes((folder / name).read_bytes())
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    table = {v["content"]: int(k) for k, v in cfg.pop("added_tokens_decoder").items()}
    (other / "added_tokens.json").write_text(json.dumps(table))
    (other / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours, ref = load_qwen_tokenizer(other), load_qwen_tokenizer(folder)
    for text in PROBES:
        assert ours.encode(text) == ref.encode(text), text
    assert ours.token_id("<|im_start|>") == table["<|im_start|>"]
