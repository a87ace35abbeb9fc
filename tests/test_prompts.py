"""Prompts: A1111's attention parser, <lora:> tags, emphasis maths, long-prompt chunks, and parity of
plain prompts with diffusers' StableDiffusionPipeline.encode_prompt on the same random CLIP."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch

from sdengine.models.clip_text import TINY_SD1, TINY_SD2, CLIPTextModel, add_text_model_prefix
from sdengine.nn.lora import LoRAWeight
from sdengine.prompts import (
    apply_emphasis,
    encode_prompt,
    encode_prompt_pair,
    extract_lora_tags,
    parse_prompt_attention,
    prompt_chunks,
)
from sdengine.text import BOS_TOKEN_ID, EOS_TOKEN_ID, SD1_PAD_TOKEN_ID, SD2_PAD_TOKEN_ID, CLIPTokenizer

ASSETS = Path(__file__).resolve().parents[1] / "src" / "sdengine" / "assets" / "clip"
TOL = 1e-5

# ------------------------------------------------------------------------------ parser: A1111 facts

# The examples of A1111's parse_prompt_attention docstring, with its outputs (floats as A1111 gets them).
A1111_DOCSTRING_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]


@pytest.mark.parametrize(("text", "expected"), A1111_DOCSTRING_EXAMPLES)
def test_parse_a1111_docstring_examples(text, expected):
    # Exact float equality: the multiplications happen in A1111's order.
    assert parse_prompt_attention(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", [("", 1.0)]),
        ("(word)", [("word", 1.1)]),
        ("((word))", [("word", 1.1 * 1.1)]),
        ("(((word)))", [("word", 1.1 * 1.1 * 1.1)]),
        ("[word]", [("word", 1 / 1.1)]),
        ("[[word]]", [("word", (1 / 1.1) * (1 / 1.1))]),
        ("(word:1.3)", [("word", 1.3)]),
        ("(word: 1.3 )", [("word", 1.3)]),  # A1111 >= 1.0 allows spaces around the number
        ("(word:-0.5)", [("word", -0.5)]),
        ("(word:+.5)", [("word", 0.5)]),
        ("((word:1.3))", [("word", 1.3 * 1.1)]),
        ("([word])", [("word", (1 / 1.1) * 1.1)]),
        ("(a [b] c)", [("a ", 1.1), ("b", (1 / 1.1) * 1.1), (" c", 1.1)]),
        ("(a (b:1.5) c)", [("a ", 1.1), ("b", 1.5 * 1.1), (" c", 1.1)]),
        ("a, (b:1.2), c", [("a, ", 1.0), ("b", 1.2), (", c", 1.0)]),
        # escapes and backslashes
        ("\\(a\\) \\[b\\]", [("(a) [b]", 1.0)]),
        ("a\\\\b", [("a\\b", 1.0)]),  # \\ is one literal backslash
        ("a\\b", [("ab", 1.0)]),  # a lone backslash vanishes (A1111 appends its empty remainder)
        ("(\\(x\\))", [("(x)", 1.1)]),
        # unbalanced
        ("a) b", [("a) b", 1.0)]),  # a closer with no opener is text
        ("a] b", [("a] b", 1.0)]),
        ("[unbalanced", [("unbalanced", 1 / 1.1)]),
        ("a (b [c", [("a ", 1.0), ("b ", 1.1), ("c", (1 / 1.1) * 1.1)]),
        ("(a]", [("a]", 1.1)]),  # ']' without '[' is text, '(' closes at the end
        # colons
        ("a: b", [("a: b", 1.0)]),
        ("a:1.5) b", [("a:1.5) b", 1.0)]),  # weight-close with no opener is text
        ("(a:b)", [("a:b", 1.1)]),  # not a number: ':' is text and ')' a normal close
        ("(a:1.2", [("a:1.2", 1.1)]),
        # empty brackets leave nothing
        ("a () b", [("a  b", 1.0)]),
    ],
)
def test_parse_rules(text, expected):
    assert parse_prompt_attention(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("a\nBREAK\nb", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("BREAK a", [("", 1.0), ("BREAK", -1.0), ("a", 1.0)]),
        ("a BREAK", [("a", 1.0), ("BREAK", -1.0), ("", 1.0)]),
        ("a BREAK BREAK b", [("a", 1.0), ("BREAK", -1.0), ("", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("a break b", [("a break b", 1.0)]),  # only upper case
        ("aBREAK BREAKb BREAK_x", [("aBREAK BREAKb BREAK_x", 1.0)]),  # only a whole word
        ("a, BREAK, b", [("a,", 1.0), ("BREAK", -1.0), (", b", 1.0)]),
        ("(x) BREAK (y)", [("x", 1.1), ("", 1.0), ("BREAK", -1.0), ("", 1.0), ("y", 1.1)]),
        # inside brackets the marker's weight is multiplied too, and it is then no BREAK (as in A1111)
        ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
    ],
)
def test_parse_break(text, expected):
    assert parse_prompt_attention(text) == expected


def test_parse_bad_weight_is_a_clear_error():
    with pytest.raises(ValueError, match="1.2.3"):
        parse_prompt_attention("(a:1.2.3)")


# ------------------------------------------------------------------------------ lora tags


@pytest.mark.parametrize(
    ("prompt", "text", "loras"),
    [
        ("a cat", "a cat", []),
        ("a cat <lora:foo:0.5>", "a cat ", [("foo", 0.5)]),
        ("<lora:foo>a cat", "a cat", [("foo", 1.0)]),
        ("a, <lora:foo:0.5>, b <lora:bar:-1>", "a, , b ", [("foo", 0.5), ("bar", -1.0)]),
        ("<lora:my lora v1.2:.8>", "", [("my lora v1.2", 0.8)]),
        ("<lora:foo:0.7:0.7>", "", [("foo", 0.7)]),
        ("<lora:foo:0.5:1>", "", [("foo", LoRAWeight(0.5, 1.0))]),  # A1111's text-encoder, U-Net multipliers
        ("<lora:foo:te=0.5:unet=1>", "", [("foo", LoRAWeight(0.5, 1.0))]),
        ("<lora:foo:unet=2>", "", [("foo", LoRAWeight(1.0, 2.0))]),
        ("<lora:foo:te=0.3>", "", [("foo", 0.3)]),  # UNET defaults to TE
        ("<lora:foo:1:te=0.3>", "", [("foo", 0.3)]),  # the named one wins, as in A1111
        ("<lyco:foo:0.3>", "", [("foo", 0.3)]),
        ("<lora:foo:1><lora:foo:1>", "", [("foo", 1.0), ("foo", 1.0)]),
        ("(a <lora:x:2> b:1.2)", "(a  b:1.2)", [("x", 2.0)]),
        ("a <b> c", "a <b> c", []),  # not an extra-network tag
    ],
)
def test_extract_lora_tags(prompt, text, loras):
    assert extract_lora_tags(prompt) == (text, loras)


@pytest.mark.parametrize(
    ("prompt", "match"),
    [
        ("<lora:foo:abc>", "not a number"),
        ("<lora:foo:te=abc>", "te 'abc' is not a number"),
        ("<lora:foo:unet=1:unet=2>", "unet= is given twice"),
        ("<lora:foo:foo=1>", "unknown multiplier 'foo'"),
        ("<lora:foo:dyn=4>", "DyLoRA"),
        ("<lora:foo:1:1:4>", "DyLoRA"),
        ("<lora:foo:1:1:1:1>", "expected"),
        ("<lora: :1>", "no name"),
        ("<hypernet:foo:1>", "unsupported"),
    ],
)
def test_extract_lora_tags_errors(prompt, match):
    with pytest.raises(ValueError, match=match):
        extract_lora_tags(prompt)


# ------------------------------------------------------------------------------ models


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer.load()


def _random_hf_clip(cfg, seed: int):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.CLIPTextConfig(**cfg.to_transformers())
    torch.manual_seed(seed)
    model = transformers.CLIPTextModel(hf_cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():  # perturb LN gains and biases so they matter
            if name.endswith("weight") and "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def encoders(request):
    """(kind, pad id, transformers CLIPTextModel, sdengine CLIPTextModel with the same weights)."""
    cfg, pad = (TINY_SD1, SD1_PAD_TOKEN_ID) if request.param == "sd1" else (TINY_SD2, SD2_PAD_TOKEN_ID)
    hf = _random_hf_clip(cfg, seed=5)
    ours = CLIPTextModel.from_state_dict(add_text_model_prefix(hf.state_dict()), cfg).eval()
    return request.param, pad, hf, ours


@pytest.fixture(scope="module")
def sd1():
    return CLIPTextModel.from_state_dict(add_text_model_prefix(_random_hf_clip(TINY_SD1, 7).state_dict()), TINY_SD1)


def _diffusers_pipe(kind: str, hf_text_encoder, tmp_dir: Path):
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    (tmp_dir / "vocab.json").write_bytes(gzip.decompress((ASSETS / "vocab.json.gz").read_bytes()))
    (tmp_dir / "merges.txt").write_bytes(gzip.decompress((ASSETS / "merges.txt.gz").read_bytes()))
    # SD 2.x folders ship the same vocabulary with pad_token "!" (id 0).
    extra: dict = {"pad_token": "!"} if kind == "sd2" else {}
    hf_tok = transformers.CLIPTokenizer.from_pretrained(str(tmp_dir), model_max_length=77, **extra)
    d = hf_text_encoder.config.hidden_size
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=d,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, layers_per_block=1)
    return diffusers.StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=hf_text_encoder,
        tokenizer=hf_tok,
        scheduler=diffusers.DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


PLAIN_PAIRS = [
    ("a photo of a cat", ""),
    ("masterpiece, best quality, a castle on a hill at sunset, highly detailed", "blurry, lowres, watermark"),
    ("", "ugly"),
    (" ".join(["tree"] * 75), " ".join(["rock,"] * 37)),  # exactly 75 / 74 tokens: no truncation
]


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_plain_prompts_equal_diffusers_encode_prompt(encoders, tok, clip_skip, tmp_path):
    kind, pad, hf, ours = encoders
    pipe = _diffusers_pipe(kind, hf, tmp_path)
    # diffusers 0.42.1 reads `text_encoder.text_model.final_layer_norm` on its clip_skip path;
    # transformers 5's CLIPTextModel has no `.text_model` level. Alias it (outside nn.Module's
    # registry, so no module cycle) instead of changing either library.
    object.__setattr__(hf, "text_model", hf)
    skip = None if clip_skip == 1 else clip_skip - 1  # diffusers counts from 0: ours - 1
    for prompt, negative in PLAIN_PAIRS:
        assert len(tok.encode(prompt)) <= 75 and len(tok.encode(negative)) <= 75
        with torch.no_grad():
            ref_c, ref_u = pipe.encode_prompt(
                prompt,
                torch.device("cpu"),
                1,
                True,
                negative_prompt=negative,
                clip_skip=skip,
            )
            # diffusers applies clip_skip to the prompt only, its negative always uses the last
            # layer; A1111 (and sdengine) encode both alike. So the negative's reference is
            # diffusers' encoding of it as a prompt.
            ref_u_skip, _ = pipe.encode_prompt(negative, torch.device("cpu"), 1, False, clip_skip=skip)
            cond, uncond = encode_prompt_pair(ours, tok, prompt, negative, clip_skip=clip_skip, pad_token_id=pad)
        assert cond.shape == ref_c.shape == (1, 77, hf.config.hidden_size)
        assert uncond.shape == ref_u.shape
        torch.testing.assert_close(cond, ref_c, atol=TOL, rtol=0)
        torch.testing.assert_close(uncond, ref_u_skip, atol=TOL, rtol=0)
        if clip_skip == 1:
            torch.testing.assert_close(uncond, ref_u, atol=TOL, rtol=0)
        else:
            assert not torch.allclose(uncond, ref_u, atol=1e-3)  # the diffusers quirk above


def test_plain_prompt_is_exactly_the_encoder_output(encoders, tok):
    # All weights 1: no emphasis arithmetic at all, bit-identical to the encoder on the ids.
    _, pad, _, ours = encoders
    prompt = "a red apple on a wooden table, soft light"
    with torch.no_grad():
        got = encode_prompt(ours, tok, prompt, clip_skip=2, pad_token_id=pad)
        ref = ours(tok(prompt, pad_token_id=pad), clip_skip=2).last_hidden_state
    assert torch.equal(got, ref)


def test_plain_prompt_ids_equal_tokenizer_call(tok):
    for pad in (SD1_PAD_TOKEN_ID, SD2_PAD_TOKEN_ID):
        for prompt, negative in PLAIN_PAIRS:
            for text in (prompt, negative):
                (chunk,) = prompt_chunks(tok, text, pad_token_id=pad)
                assert chunk.ids == tok(text, pad_token_id=pad)[0].tolist()
                assert chunk.weights == [1.0] * 77


# ------------------------------------------------------------------------------ emphasis maths


def test_apply_emphasis_formula():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 77, 8, generator=g) + 0.3
    w = torch.ones(1, 77)
    w[0, 3:6] = 1.5
    w[0, 10] = 0.5
    out = apply_emphasis(z, w)
    expected = z * w[..., None]
    expected = expected * (z.mean() / expected.mean())
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.mean(), z.mean(), atol=1e-6, rtol=1e-5)
    # The ratio between a weighted and an unweighted token is the weight.
    torch.testing.assert_close(out[0, 4] / out[0, 20], 1.5 * z[0, 4] / z[0, 20], atol=1e-5, rtol=1e-5)


def test_weighted_prompt_matches_hand_computation(sd1, tok):
    prompt = "a (red:1.5) apple, [blurry]"
    (chunk,) = prompt_chunks(tok, prompt, pad_token_id=SD1_PAD_TOKEN_ID)
    # Expected weights, token by token: A1111 tokenises each piece on its own.
    pieces = [("a ", 1.0), ("red", 1.5), (" apple, ", 1.0), ("blurry", 1 / 1.1)]
    want_ids, want_w = [BOS_TOKEN_ID], [1.0]
    for text, w in pieces:
        ids = tok.encode(text)
        want_ids += ids
        want_w += [w] * len(ids)
    n = len(want_ids)
    assert chunk.ids[:n] == want_ids and chunk.ids[n] == EOS_TOKEN_ID
    assert chunk.weights == want_w + [1.0] * (77 - n)

    with torch.no_grad():
        got = encode_prompt(sd1, tok, prompt, pad_token_id=SD1_PAD_TOKEN_ID)
        z = sd1(torch.tensor([chunk.ids])).last_hidden_state
    w = torch.tensor(chunk.weights)[None, :, None]
    expected = z * w * (z.mean() / (z * w).mean())
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(got, z, atol=1e-3)


def test_emphasis_is_per_chunk(sd1, tok):
    # A weight in chunk 2 leaves chunk 1 exactly as without it (A1111 encodes and rescales chunk by chunk).
    with torch.no_grad():
        plain = encode_prompt(sd1, tok, "a cat BREAK a dog", pad_token_id=SD1_PAD_TOKEN_ID)
        weighted = encode_prompt(sd1, tok, "a cat BREAK a (dog:1.4)", pad_token_id=SD1_PAD_TOKEN_ID)
    assert plain.shape == weighted.shape == (1, 154, TINY_SD1.hidden_size)
    assert torch.equal(plain[:, :77], weighted[:, :77])
    assert not torch.allclose(plain[:, 77:], weighted[:, 77:], atol=1e-3)
    torch.testing.assert_close(weighted[:, 77:].mean(), plain[:, 77:].mean(), atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------ long prompts, BREAK


def a1111_tokenize_line(tok: CLIPTokenizer, line: str, pad: int, backtrack: int = 20) -> list[list[int]]:
    """A transcription of A1111's FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line (no textual
    inversion), with process_tokens' SD2 padding: the oracle for long prompts (docs/CONTRACTS.md, Test oracles)."""
    parsed = parse_prompt_attention(line)
    tokenized = [tok.encode(text) for text, _ in parsed]
    chunks: list[list[int]] = []
    chunk: list[int] = []
    last_comma = -1

    def next_chunk() -> None:
        nonlocal chunk, last_comma
        toks = chunk + [EOS_TOKEN_ID] * (75 - len(chunk))
        toks = [BOS_TOKEN_ID, *toks, EOS_TOKEN_ID]
        if pad != EOS_TOKEN_ID:  # process_tokens: everything after the first EOS becomes the pad id
            first = toks.index(EOS_TOKEN_ID)
            toks = toks[: first + 1] + [pad] * (76 - first)
        chunks.append(toks)
        chunk, last_comma = [], -1

    for tokens, (text, weight) in zip(tokenized, parsed, strict=True):
        if text == "BREAK" and weight == -1:
            next_chunk()
            continue
        for token in tokens:
            if token == tok.comma_token_id:
                last_comma = len(chunk)
            elif backtrack != 0 and len(chunk) == 75 and last_comma != -1 and len(chunk) - last_comma <= backtrack:
                reloc = chunk[last_comma + 1 :]
                chunk = chunk[: last_comma + 1]
                next_chunk()
                chunk = reloc
            if len(chunk) == 75:
                next_chunk()
            chunk.append(token)
    if chunk or not chunks:
        next_chunk()
    return chunks


def _long_prompt(tok: CLIPTokenizer, n_tokens: int) -> str:
    words = ["red", "apple", "tree", "house", "blue", "sky", "river", "stone", "cloud"]
    parts, count, i = [], 0, 0
    while count < n_tokens:
        phrase = f"{words[i % 9]} {words[(i * 4 + 1) % 9]} {words[(i * 7 + 2) % 9]}"
        parts.append(phrase)
        count = len(tok.encode(", ".join(parts)))
        i += 1
    return ", ".join(parts)


@pytest.mark.parametrize("pad", [SD1_PAD_TOKEN_ID, SD2_PAD_TOKEN_ID])
def test_200_token_prompt_three_chunks(sd1, tok, pad):
    prompt = _long_prompt(tok, 200)
    assert 200 <= len(tok.encode(prompt)) < 204
    chunks = prompt_chunks(tok, prompt, pad_token_id=pad)
    ref = a1111_tokenize_line(tok, prompt, pad)
    assert [c.ids for c in chunks] == ref
    assert len(chunks) == 3
    # Phrases are 4 tokens ("red apple tree,"). Chunk 1 is full and the next token is a comma: no
    # backtracking. Chunk 2 would cut a phrase: it ends at the last comma and the phrase moves on.
    lengths = [c.ids.index(EOS_TOKEN_ID, 1) - 1 for c in chunks]
    assert lengths == [75, 73, len(tok.encode(prompt)) - 148]
    assert chunks[1].ids[73] == tok.comma_token_id
    no_backtrack = a1111_tokenize_line(tok, prompt, pad, backtrack=0)
    assert [ids.index(EOS_TOKEN_ID, 1) - 1 for ids in no_backtrack][:2] == [75, 75]
    # Nothing lost, nothing duplicated.
    body = [t for c in chunks for t in c.ids[1 : c.ids.index(EOS_TOKEN_ID, 1)]]
    assert body == tok.encode(prompt)

    with torch.no_grad():
        cond, uncond = encode_prompt_pair(sd1, tok, prompt, "blurry", pad_token_id=pad)
        # Each chunk is its own CLIP context: the same as encoding the chunks one by one.
        per_chunk = torch.cat([sd1(torch.tensor([ids])).last_hidden_state for ids in ref], dim=1)
        empty = sd1(tok("", pad_token_id=pad)).last_hidden_state
        neg = sd1(tok("blurry", pad_token_id=pad)).last_hidden_state
    assert cond.shape == uncond.shape == (1, 3 * 77, TINY_SD1.hidden_size)
    torch.testing.assert_close(cond, per_chunk, atol=1e-6, rtol=0)
    # The shorter negative is padded with the empty prompt's encoding, as A1111's pad_cond_uncond.
    torch.testing.assert_close(uncond, torch.cat([neg, empty, empty], dim=1), atol=1e-6, rtol=0)


def test_pair_pads_the_shorter_cond_too(sd1, tok):
    with torch.no_grad():
        cond, uncond = encode_prompt_pair(sd1, tok, "cat", _long_prompt(tok, 100), pad_token_id=SD1_PAD_TOKEN_ID)
        empty = encode_prompt(sd1, tok, "", pad_token_id=SD1_PAD_TOKEN_ID)
    assert cond.shape == uncond.shape == (1, 154, TINY_SD1.hidden_size)
    assert torch.equal(cond[:, 77:], empty)


@pytest.mark.parametrize("n_tokens", [74, 75, 76, 150, 151, 300])
def test_chunking_matches_a1111_rule(tok, n_tokens):
    words = " ".join(f"w{i}" for i in range(400))  # "w", digits: several tokens each, no commas
    ids = tok.encode(words)[:n_tokens]
    prompt = tok.decode(ids)
    assert tok.encode(prompt) == ids
    chunks = prompt_chunks(tok, prompt, pad_token_id=SD1_PAD_TOKEN_ID)
    assert [c.ids for c in chunks] == a1111_tokenize_line(tok, prompt, SD1_PAD_TOKEN_ID)
    assert len(chunks) == max(1, -(-n_tokens // 75))


def test_long_weighted_prompt_with_break_matches_a1111_rule(tok):
    prompt = f"({_long_prompt(tok, 90)}:1.2) BREAK [a dog], {_long_prompt(tok, 40)} BREAK BREAK x"
    chunks = prompt_chunks(tok, prompt, pad_token_id=SD2_PAD_TOKEN_ID)
    assert [c.ids for c in chunks] == a1111_tokenize_line(tok, prompt, SD2_PAD_TOKEN_ID)
    assert len(chunks) == 5  # 90 tokens -> 2 | "[a dog], ..." -> 1 | "" -> 1 (empty) | "x" -> 1
    assert chunks[3].ids[:2] == [BOS_TOKEN_ID, EOS_TOKEN_ID]
    assert set(chunks[0].weights[1:76]) == {1.2}


def test_break_starts_a_new_chunk(sd1, tok):
    chunks = prompt_chunks(tok, "a cat BREAK a dog", pad_token_id=SD1_PAD_TOKEN_ID)
    assert [c.ids[:4] for c in chunks] == [
        [BOS_TOKEN_ID, *tok.encode("a cat"), EOS_TOKEN_ID],
        [BOS_TOKEN_ID, *tok.encode("a dog"), EOS_TOKEN_ID],
    ]
    # A leading BREAK gives an empty first chunk; lower-case "break" is a word.
    assert len(prompt_chunks(tok, "BREAK a dog", pad_token_id=SD1_PAD_TOKEN_ID)) == 2
    assert len(prompt_chunks(tok, "a break dog", pad_token_id=SD1_PAD_TOKEN_ID)) == 1
    with torch.no_grad():
        out = encode_prompt(sd1, tok, "a cat BREAK a dog", pad_token_id=SD1_PAD_TOKEN_ID)
        cat = encode_prompt(sd1, tok, "a cat", pad_token_id=SD1_PAD_TOKEN_ID)
        dog = encode_prompt(sd1, tok, "a dog", pad_token_id=SD1_PAD_TOKEN_ID)
    assert torch.equal(out, torch.cat([cat, dog], dim=1))


def test_lora_tags_do_not_reach_the_encoder(sd1, tok):
    with torch.no_grad():
        a = encode_prompt(sd1, tok, "a cat <lora:foo:0.5>", pad_token_id=SD1_PAD_TOKEN_ID)
        b = encode_prompt(sd1, tok, "a cat ", pad_token_id=SD1_PAD_TOKEN_ID)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------
# Prompt styles (A1111's styles.csv)
# ---------------------------------------------------------------------------------------------------


def test_styles_file_and_merge_as_a1111(tmp_path):
    from sdengine.prompts import PromptError, PromptStyle, apply_styles, merge_style, read_styles

    f = tmp_path / "styles.csv"
    f.write_text(
        'name, prompt, negative_prompt\n"Film","film still of {prompt}, grain",blurry\n#off,x,y\n,nameless,z\n'
        "Sharp, sharp focus\nFilm,later wins,\n",
        encoding="utf-8-sig",
    )
    styles = read_styles(f)
    assert list(styles) == ["Film", "Sharp"]
    assert styles["Film"] == PromptStyle("Film", "later wins", "") and styles["Sharp"].negative_prompt == ""
    old = tmp_path / "old.csv"  # A1111's older "name,text" columns
    old.write_text("name,text\nA,alpha\n")
    assert read_styles(old)["A"] == PromptStyle("A", "alpha", "")
    assert merge_style("film of {prompt}, {prompt}", "a cat") == "film of a cat, a cat"
    assert merge_style("grain", " a cat ") == "a cat, grain" and merge_style("grain", "") == "grain"
    assert merge_style("", "a cat") == "a cat"
    film, sharp = PromptStyle("f", "film of {prompt}", "blurry"), PromptStyle("s", "sharp", "")
    assert apply_styles("a cat", "ugly", [film, sharp]) == ("film of a cat, sharp", "ugly, blurry")
    assert apply_styles("a cat", "ugly", [sharp, film]) == ("film of a cat, sharp", "ugly, blurry")
    assert apply_styles("a cat", "", [PromptStyle("g", "{prompt} x", "{prompt}, bad")]) == ("a cat x", ", bad")
    bad = tmp_path / "bad.csv"
    for content, message in (
        (b"a,b\n1,2\n", "its first line must name the columns name,prompt,negative_prompt"),
        (b"", "got nothing"),
        (b"name,prompt\n\xff\xfe,x\n", "not UTF-8 text"),
    ):
        bad.write_bytes(content)
        with pytest.raises(PromptError, match=message) as info:
            read_styles(bad)
        assert "\n" not in str(info.value)
    with pytest.raises(PromptError, match="No such file"):
        read_styles(tmp_path / "missing.csv")
