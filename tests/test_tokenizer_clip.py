"""CLIP tokenizer: parity with transformers' CLIPTokenizer, padding rules, A1111 chunking, vocab files."""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
import types
import unicodedata
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdengine.text import (
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    SD1_PAD_TOKEN_ID,
    SD2_PAD_TOKEN_ID,
    CLIPTokenizer,
    chunk_tokens,
)
from sdengine.text.clip_tokenizer import read_merges, read_vocab

ASSETS = Path(__file__).resolve().parents[1] / "src" / "sdengine" / "assets" / "clip"

HANDWRITTEN = [
    "",
    " ",
    "a photo of a cat",
    "A PHOTO OF A CAT",
    "a red apple, highly detailed, 8k, trending on artstation",
    "masterpiece, best quality, (1girl:1.2), [blurry], ((sharp focus))",
    "it's, don't, they're, we've, I'm, you'll, she'd, IT'S, Don'T",
    "''s ''t 's 't rock'n'roll o'clock",
    "l'été à Paris, café crème, naïve façade, Øresund, Åland, Straße",
    "Crème brûlée vs. CRÈME BRÛLÉE",
    "e\u0301te\u0301 (decomposed accents) vs \u00e9t\u00e9",
    "东京的夜景, 日本語のテキスト, 한국어 문장",
    "Привет мир, Ελληνικά, עברית, العربية, हिन्दी",
    "emoji 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇯🇵 ❤️ ✨🔥",
    "🐱🐶🦊 cat dog fox",
    "numbers 1234567890 3.14159 1,000,000 -42 +7 1e-5 0x1F",
    "Ⅻ ½ ² ³ ٣ ४ 五",
    "punctuation!!! ??? ... --- ___ *** ### @@@ $$$ %%% ^^^ &&& ~~~ ```",
    "brackets ( ) [ ] { } < > (( )) [[ ]] {{ }}",
    "quotes \"double\" 'single' “curly” ‘curly’ «guillemets» „low“",
    "rock &amp; roll &lt;3 &#39;html&#39; &quot;ent&quot;",
    "whitespace   runs\t\ttabs\nnewlines\r\n\r\ncrlf",
    "\u00a0nbsp\u00a0\u2003em-space\u3000ideographic\u200bzero-width\ufeffbom",
    "   leading and trailing   ",
    "\x1c\x1d\x1e\x1f control separators \x00 nul \x07 bell",
    "soft\u00adhyphen and ligature ﬁne ﬂow and fullwidth ＡＢＣ１２３",
    "İstanbul ǅ ǈ ΣΑΣ ß ẞ",
    "<|startoftext|>a cat<|endoftext|>",
    "<|ENDOFTEXT|> <|StartOfText|> <|endoftext",
    "a<|endoftext|>b<|startoftext|>c",
    "</w> <w> </w>word",
    "url https://example.com/path?q=1&r=2#frag and email me@example.org",
    "snake_case camelCase kebab-case PascalCase SCREAMING_CASE",
    "hyper-realistic, ultra-detailed, 4k, 8k, HDR, f/1.8, 85mm, ISO 100",
    "a" * 300,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "pneumonoultramicroscopicsilicovolcanoconiosis" * 3,
    "x" + "y" * 120 + "z",
    " ".join(["word"] * 120),
    ", ".join(f"tag{i}" for i in range(80)),
    "photo of a (beautiful:1.3) woman, BREAK, city street at night, neon lights, rain",
    "\\(escaped\\) \\[brackets\\] back\\slash",
    "tab\tseparated\tvalues\tand\u2028line\u2029separators\x85nel",
    "ﷺ ﷽ ꧁꧂ ༄ ∞ ≈ ≠ ± × ÷ √ ∑ ∫",
    "zalgo t̸̨̛e̴͇̓x̵̛̺t̷̰͝",
    "mixed日本語english混合text123",
    "a photo of a cat" * 20,
    "Ω Ω ohm sign vs omega, K K kelvin, Å Å angstrom",
]


def _long_prompts() -> list[str]:
    words = "masterpiece best quality portrait of a knight in ornate armor dramatic lighting".split()
    return [" ".join(words[i % len(words)] for i in range(n)) + "," * (n % 3) for n in (74, 75, 76, 150, 400)]


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer.load()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("clip_tok")
    (d / "vocab.json").write_bytes(gzip.decompress((ASSETS / "vocab.json.gz").read_bytes()))
    (d / "merges.txt").write_bytes(gzip.decompress((ASSETS / "merges.txt.gz").read_bytes()))
    return d


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(str(hf_dir))


@pytest.fixture(scope="module")
def hf_tok_sd2(hf_dir):
    # SD 2.x folders ship the same vocab with pad_token "!" (id 0).
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(str(hf_dir), pad_token="!")


# ---------------------------------------------------------------- vocabulary files


def test_vocab_shape_and_special_ids():
    vocab = read_vocab()
    merges = read_merges()
    assert len(vocab) == 49408
    assert len(merges) == 48894
    assert sorted(vocab.values()) == list(range(49408))
    assert vocab["<|startoftext|>"] == BOS_TOKEN_ID == 49406
    assert vocab["<|endoftext|>"] == EOS_TOKEN_ID == 49407
    assert vocab["!"] == SD2_PAD_TOKEN_ID == 0
    assert vocab[",</w>"] == 267
    # The standard construction: vocab id of merge k is 512 + k.
    assert all(vocab[a + b] == 512 + k for k, (a, b) in enumerate(merges))


def test_shipped_files_are_reproducible_from_open_clip(tmp_path):
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open-clip-torch not installed (only needed to rebuild the vocabulary)")
    tool = Path(__file__).resolve().parents[1] / "tools" / "make_clip_vocab.py"
    mod_spec = importlib.util.spec_from_file_location("make_clip_vocab", tool)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    src = mod.default_source()
    merges, vocab = mod.build(gzip.open(src).read().decode("utf-8").split("\n"))
    assert read_merges() == merges
    assert read_vocab() == vocab
    # Byte-identical output (gzip without timestamp).
    sys_argv = sys.argv
    try:
        sys.argv = ["make_clip_vocab", "--src", str(src), "--out", str(tmp_path)]
        mod.main()
    finally:
        sys.argv = sys_argv
    for name in ("vocab.json.gz", "merges.txt.gz"):
        assert (tmp_path / name).read_bytes() == (ASSETS / name).read_bytes()


def test_load_from_plain_files(hf_dir, tok):
    other = CLIPTokenizer.load(hf_dir / "vocab.json", hf_dir / "merges.txt")
    text = "a photo of an astronaut riding a horse"
    assert other.encode(text) == tok.encode(text)
    assert json.loads((hf_dir / "vocab.json").read_text("utf-8")) == tok.vocab


def test_folders_with_the_same_files_share_one_tokenizer_and_other_files_get_their_own(hf_dir, tmp_path):
    """Building CLIP's BPE tables took a quarter of a second per model folder; the same vocab.json and merges.txt
    (in another folder too) now give the one tokenizer built for them."""
    first = CLIPTokenizer.load(hf_dir / "vocab.json", hf_dir / "merges.txt")
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (copy / name).write_bytes((hf_dir / name).read_bytes())
    assert CLIPTokenizer.load(copy / "vocab.json", copy / "merges.txt") is first
    # another vocabulary (the ids of two words swapped): its own tokenizer, which reads its own table
    vocab = json.loads((hf_dir / "vocab.json").read_text("utf-8"))
    vocab["cat</w>"], vocab["dog</w>"] = vocab["dog</w>"], vocab["cat</w>"]
    (copy / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    other = CLIPTokenizer.load(copy / "vocab.json", copy / "merges.txt")
    assert other is not first and other.encode("a cat") == first.encode("a dog")
    assert CLIPTokenizer.load(hf_dir / "vocab.json", hf_dir / "merges.txt") is first


# ---------------------------------------------------------------- parity with transformers


def test_transformers_fast_and_slow_are_one_class():
    # In transformers 5 the Python ("slow") CLIP tokenizer is gone: CLIPTokenizerFast is an alias of
    # the tokenizers-backed CLIPTokenizer, the oracle here. OpenAI's original Python BPE is checked
    # separately (test_matches_openai_bpe_algorithm_on_clean_text).
    transformers = pytest.importorskip("transformers")
    assert transformers.CLIPTokenizerFast is transformers.CLIPTokenizer


def test_known_ids(tok):
    # Ids of the real CLIP ViT-L/14 tokenizer (openai/clip-vit-large-patch14).
    assert tok.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert tok.encode("A photo of a CAT, dog") == [320, 1125, 539, 320, 2368, 267, 1929]


@pytest.mark.parametrize("text", HANDWRITTEN + _long_prompts())
def test_encode_matches_transformers_handwritten(tok, hf_tok, text):
    assert tok.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"]


# Characters that exercise the pipeline's edges: apostrophes, digits of several scripts, accents
# (composed and combining), whitespace of many kinds, emoji with joiners/modifiers, the
# characters of the special tokens, and CJK.
EDGE_ALPHABET = list(
    "abcxyzABCXYZ0123456789'’`\",.;:!?-_()[]{}<>|/\\@#&*+=~^%$ \t\n\r\x0b\x0c"
    "\u00a0\u2003\u3000\u200b\u200d\ufeff\x1c\x1f\x85"
    "éÉèüÜñÑçÇøØåÅßẞİı\u0301\u0308ǅﬁＡ１"
    "东京日本語한국어ПриветΣσς٣४½²"
    "😀👍🏽👨‍👩🇯🇵❤️✨"
) + ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "<|endoftext|>", "<|startoftext|>", "</w>", "&amp;"]

edge_text = st.lists(st.sampled_from(EDGE_ALPHABET), max_size=40).map("".join)
any_text = st.text(st.characters(codec="utf-8"), max_size=60)


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(text=edge_text)
def test_encode_matches_transformers_edge_strings(tok, hf_tok, text):
    assert tok.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"]


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(text=any_text)
def test_encode_matches_transformers_any_unicode(tok, hf_tok, text):
    assert tok.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize(
    ("pad", "fixture"), [(SD1_PAD_TOKEN_ID, "hf_tok"), (SD2_PAD_TOKEN_ID, "hf_tok_sd2")], ids=["sd1", "sd2"]
)
def test_call_matches_transformers_padding_and_truncation(tok, request, pad, fixture):
    hf = request.getfixturevalue(fixture)
    assert hf.pad_token_id == pad
    texts = ["", "a photo of a cat", *_long_prompts(), HANDWRITTEN[11], HANDWRITTEN[13]]
    ours = tok(texts, pad_token_id=pad)
    ref = hf(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    assert ours.dtype == torch.long and ours.shape == (len(texts), 77)
    assert torch.equal(ours, ref)


def test_padding_rules(tok):
    sd1 = tok("a photo of a cat", pad_token_id=SD1_PAD_TOKEN_ID)[0].tolist()
    sd2 = tok("a photo of a cat", pad_token_id=SD2_PAD_TOKEN_ID)[0].tolist()
    body = [BOS_TOKEN_ID, 320, 1125, 539, 320, 2368, EOS_TOKEN_ID]
    assert sd1 == body + [49407] * 70
    assert sd2 == body + [0] * 70
    # Truncation keeps BOS + 75 tokens + EOS.
    long = tok(" ".join(["cat"] * 100), pad_token_id=0)[0].tolist()
    assert long == [BOS_TOKEN_ID] + [2368] * 75 + [EOS_TOKEN_ID]
    # Other lengths; a str and a one-element list agree.
    assert tok("cat", pad_token_id=0, max_length=5).tolist() == [[49406, 2368, 49407, 0, 0]]
    assert torch.equal(tok("cat", 0), tok(["cat"], 0))
    with pytest.raises(ValueError):
        tok("cat", 0, max_length=1)


def test_decode_roundtrip(tok, hf_tok):
    for text in ["a photo of a cat", "Crème brûlée, 42!", "东京 😀"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == hf_tok.decode(ids)


def test_no_ftfy_html_cleanup_like_transformers(tok, hf_tok):
    # Documented choice: no ftfy/HTML clean-up (OpenAI CLIP would turn "&amp;" into "&" and
    # curly quotes into straight ones).
    assert tok.encode("rock &amp; roll") != tok.encode("rock & roll")
    assert tok.encode("“hi”") != tok.encode('"hi"')
    assert tok.encode("rock &amp; roll") == hf_tok("rock &amp; roll", add_special_tokens=False)["input_ids"]


def _open_clip_simple_tokenizer():
    """open_clip's pure-Python copy of OpenAI's tokenizer, loaded without torchvision.

    ftfy is replaced by NFC normalisation (what ftfy.fix_text does to text it finds nothing to fix
    in), so this oracle is valid only on such text.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open-clip-torch not installed (second oracle: OpenAI's original BPE code)")
    root = Path(next(iter(spec.submodule_search_locations)))
    saved = sys.modules.get("ftfy")
    sys.modules["ftfy"] = types.SimpleNamespace(fix_text=lambda t: unicodedata.normalize("NFC", t))
    try:
        mspec = importlib.util.spec_from_file_location("_open_clip_tokenizer", root / "tokenizer.py")
        mod = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(mod)
    finally:
        if saved is None:
            sys.modules.pop("ftfy", None)
        else:
            sys.modules["ftfy"] = saved
    return mod.SimpleTokenizer(str(root / "bpe_simple_vocab_16e6.txt.gz"))


def test_matches_openai_bpe_algorithm_on_clean_text(tok):
    ref = _open_clip_simple_tokenizer()
    # Text that ftfy, HTML unescaping and Python's whitespace rule leave alone, and no special tokens.
    texts = [t for t in HANDWRITTEN + _long_prompts() if "&" not in t and "<|" not in t and "“" not in t]
    texts = [t for t in texts if not any(c in t for c in "\x1c\x1d\x1e\x1f\x85\u2028\u2029ﬁﬂＡ‘’«„\u00ad")]
    # Known difference: Python's str.lower() gives a final sigma ("ΣΑΣ" -> "σας"), the tokenizers
    # library (and so transformers and sdengine) gives "σασ".
    texts = [t for t in texts if "Σ" not in t]
    assert len(texts) > 30
    for text in texts:
        assert tok.encode(text) == ref.encode(text), text


# ---------------------------------------------------------------- A1111 chunking

COMMA = 267


def _ids(n: int, start: int = 1000) -> list[int]:
    return list(range(start, start + n))


def test_chunk_short_prompt_equals_call(tok):
    for pad in (SD1_PAD_TOKEN_ID, SD2_PAD_TOKEN_ID):
        for text in ["", "a photo of a cat", " ".join(["cat"] * 75)]:
            chunks = tok.chunk(text, pad_token_id=pad)
            assert chunks.shape == (1, 77)
            assert torch.equal(chunks, tok(text, pad_token_id=pad))


def test_chunk_empty_prompt_is_one_padded_chunk():
    (c,) = chunk_tokens([], pad_token_id=0)
    assert c.ids == [BOS_TOKEN_ID, EOS_TOKEN_ID] + [0] * 75
    assert c.weights == [1.0] * 77


def test_chunk_lengths_without_commas():
    for n, n_chunks in [(1, 1), (75, 1), (76, 2), (150, 2), (151, 3)]:
        chunks = chunk_tokens([(_ids(n), 1.0)], pad_token_id=SD1_PAD_TOKEN_ID)
        assert len(chunks) == n_chunks, n
        flat = [i for c in chunks for i in c.ids[1:-1] if i != SD1_PAD_TOKEN_ID]
        assert flat == _ids(n)  # nothing lost, nothing reordered
        for c in chunks:
            assert len(c.ids) == 77 and len(c.weights) == 77
            assert c.ids[0] == BOS_TOKEN_ID
    c0, c1 = chunk_tokens([(_ids(76), 1.0)], pad_token_id=0)
    assert c0.ids == [BOS_TOKEN_ID, *_ids(75), EOS_TOKEN_ID]
    assert c1.ids == [BOS_TOKEN_ID, 1075, EOS_TOKEN_ID] + [0] * 74


def test_chunk_comma_backtrack():
    # 70 tokens, a comma (index 70), 10 more: the first chunk ends at the comma.
    ids = [*_ids(70), COMMA, *_ids(10, 2000)]
    c0, c1 = chunk_tokens([(ids, 1.0)], pad_token_id=0)
    assert c0.ids == [BOS_TOKEN_ID, *_ids(70), COMMA, EOS_TOKEN_ID] + [0] * 4
    assert c1.ids[: 1 + 10 + 1] == [BOS_TOKEN_ID, *_ids(10, 2000), EOS_TOKEN_ID]
    # Backtrack 0 turns it off: a plain cut at 75.
    c0, c1 = chunk_tokens([(ids, 1.0)], pad_token_id=0, comma_backtrack=0)
    assert c0.ids[1:-1] == ids[:75]
    # A comma more than 20 tokens back is ignored (54 -> 75 - 54 = 21 > 20).
    far = [*_ids(54), COMMA, *_ids(30, 2000)]
    c0, _ = chunk_tokens([(far, 1.0)], pad_token_id=0)
    assert c0.ids[1:-1] == far[:75]
    # Exactly 20 back (index 55) still moves.
    near = [*_ids(55), COMMA, *_ids(30, 2000)]
    c0, c1 = chunk_tokens([(near, 1.0)], pad_token_id=0)
    assert c0.ids[1:57] == near[:56] and c0.ids[57] == EOS_TOKEN_ID
    assert c1.ids[1:31] == near[56:]
    # A comma as the 76th token is not a reason to backtrack: it opens the next chunk.
    at_end = [*_ids(75), COMMA, 5]
    c0, c1 = chunk_tokens([(at_end, 1.0)], pad_token_id=0)
    assert c0.ids[1:-1] == _ids(75) and c1.ids[1:4] == [COMMA, 5, EOS_TOKEN_ID]


def test_chunk_break_and_weights():
    pieces = [(_ids(3), 1.0), None, (_ids(2, 5000), 1.5), (_ids(1, 6000), 0.5)]
    c0, c1 = chunk_tokens(pieces, pad_token_id=SD1_PAD_TOKEN_ID)
    assert c0.ids == [BOS_TOKEN_ID, *_ids(3), EOS_TOKEN_ID] + [EOS_TOKEN_ID] * 72
    assert c1.ids[:5] == [BOS_TOKEN_ID, 5000, 5001, 6000, EOS_TOKEN_ID]
    assert c1.weights[:5] == [1.0, 1.5, 1.5, 0.5, 1.0] and set(c1.weights[5:]) == {1.0}
    # BREAK at the start gives an empty first chunk (as A1111).
    chunks = chunk_tokens([None, (_ids(2), 1.0)], pad_token_id=0)
    assert len(chunks) == 2 and chunks[0].ids[:3] == [BOS_TOKEN_ID, EOS_TOKEN_ID, 0]
    # Weights travel with relocated tokens.
    ids = [*_ids(70), COMMA, *_ids(10, 2000)]
    _, c1 = chunk_tokens([(ids[:71], 1.0), (ids[71:], 1.3)], pad_token_id=0)
    assert c1.weights[1:11] == [1.3] * 10


def test_chunk_long_real_prompt(tok):
    text = ", ".join(f"detailed thing number {i}" for i in range(40))  # ~200 tokens with commas
    ids = tok.encode(text)
    chunks = tok.chunk(text, pad_token_id=0)
    assert chunks.shape[0] >= 3 and chunks.shape[1] == 77
    flat = [i for row in chunks.tolist() for i in row[1:] if i not in (0, EOS_TOKEN_ID)]
    assert flat == ids
    # Every chunk but the last ends right after a comma (the backtrack rule kept phrases whole).
    for row in chunks.tolist()[:-1]:
        eos = row.index(EOS_TOKEN_ID)
        assert row[eos - 1] == COMMA
