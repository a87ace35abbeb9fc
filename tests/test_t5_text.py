"""The T5 text encoder (SD3's and Flux's T5-XXL): the same numbers as transformers' ``T5EncoderModel`` on tiny random
weights, its files in every accepted layout (folder, sharded folder, pipeline folder, single file, fp8, scaled fp8,
SD3 single file), the tokenizer against ``T5TokenizerFast`` (a tokenizer built here and the shipped T5 v1.1
vocabulary), and one-line errors for the rest."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from sdengine.errors import UsageError
from sdengine.models.config_checks import ConfigError
from sdengine.models.t5_text import T5Config, T5Encoder, relative_position_buckets
from sdengine.text.t5_tokenizer import (
    T5Tokenizer,
    T5TokenizerError,
    load_t5_tokenizer,
    shipped_tokenizer_path,
)
from sdengine.weights.io import WeightsError
from sdengine.weights.t5_file import SD3_PREFIX, T5FileError, config_from_shapes, load_t5_encoder

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
tokenizers = pytest.importorskip("tokenizers")

TOL = 1e-5
VOCAB = 300


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (the norms and the position table too, so that a misplaced one shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif "relative_attention_bias" in name:
                p.copy_(2.0 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def _hf_t5(ff: str = "gated-gelu", layers: int = 3, *, seed: int = 0, buckets: int = 8, max_distance: int = 128):
    cfg = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=layers,
        num_heads=4,
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=max_distance,
        feed_forward_proj=ff,
        dropout_rate=0.0,
    )
    model = transformers.T5EncoderModel(cfg).eval()
    _randomize(model, seed)
    return model


def _ours(hf) -> T5Encoder:
    model = T5Encoder(T5Config.from_transformers(hf.config.to_dict())).eval()
    model.load_state_dict(hf.state_dict(), strict=True)
    return model


def _batch(length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, length), generator=g)
    mask = torch.ones(3, length, dtype=torch.long)
    mask[1, length // 2 + 1 :] = 0  # padding at the end of row 1
    mask[2, 1:] = 0  # row 2: one real token
    return ids, mask


# ------------------------------------------------------------------------------------------------------ network


@pytest.mark.parametrize("ff", ["gated-gelu", "relu"])
def test_forward_matches_transformers(ff: str) -> None:
    hf = _hf_t5(ff, buckets=8, max_distance=20)
    ours = _ours(hf)
    for length in (1, 6, 37):  # 37 > max_distance: the last, shared bucket is used
        ids, mask = _batch(length, seed=length)
        with torch.no_grad():
            for m in (mask, None):
                want = hf(input_ids=ids, attention_mask=m).last_hidden_state
                got = ours(ids, m)
                assert got.shape == (3, length, 32)
                assert (got - want).abs().max().item() <= TOL, (ff, length, m is None)


def test_padding_changes_only_what_it_should() -> None:
    """A padded row's real tokens equal the unpadded text's encoding (the mask really hides the padding)."""
    ours = _ours(_hf_t5())
    ids, _ = _batch(10, seed=3)
    short = ids[:1, :4]
    padded = torch.cat([short, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 4 + [0] * 6])
    with torch.no_grad():
        alone = ours(short)
        inside = ours(padded, mask)[:, :4]
        unmasked = ours(padded)[:, :4]
    assert (alone - inside).abs().max().item() <= TOL
    assert (alone - unmasked).abs().max().item() > 1e-3  # without the mask the padding is attended to


def test_relative_position_buckets_match_transformers() -> None:
    ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    for buckets, distance in ((32, 128), (8, 20), (6, 7)):
        for lq, lk in ((1, 1), (9, 9), (300, 300), (5, 40)):
            rel = torch.arange(lk)[None, :] - torch.arange(lq)[:, None]
            want = ref(rel, bidirectional=True, num_buckets=buckets, max_distance=distance)
            got = relative_position_buckets(lq, lk, buckets, distance)
            assert torch.equal(got, want), (buckets, distance, lq, lk)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_finite_and_close(dtype: torch.dtype) -> None:
    hf = _hf_t5()
    ours = _ours(hf)
    with torch.no_grad():  # feed-forward outputs far past float16's 65504, as T5-XXL's
        for block in ours.encoder.block:
            block.layer[1].DenseReluDense.wo.weight.mul_(3e4)
    ids, mask = _batch(12, seed=5)
    with torch.no_grad():
        want = ours(ids, mask)
        half = ours.set_dtype(dtype)
        wo = half.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype
        assert wo == (torch.float32 if dtype == torch.float16 else dtype)  # transformers' _keep_in_fp32_modules
        assert half.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == dtype
        got = half(ids, mask)
    assert got.dtype == dtype
    assert torch.isfinite(got).all()
    assert (got.float() - want).abs().max().item() < 0.1 * want.abs().max().item()


def test_forward_errors() -> None:
    ours = T5Encoder(T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4))
    with pytest.raises(UsageError, match=r"token id 300 is outside the vocabulary \(0 to 299\)"):
        ours(torch.tensor([[1, 300]]))
    with pytest.raises(UsageError, match=r"attention_mask is \(1, 3\), input_ids \(1, 2\)"):
        ours(torch.tensor([[1, 2]]), torch.ones(1, 3))
    with pytest.raises(UsageError, match="must be a \\(batch, length\\) integer tensor"):
        ours(torch.zeros(1, 2))


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match="unsupported feed_forward_proj 'gated-silu'"):
        T5Config(feed_forward_proj="gated-silu")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"d_model=0 is out of range \(1 to 16384\)"):
        T5Config.from_transformers({"d_model": 0})
    with pytest.raises(ConfigError, match="d_ff=1.5 is not an integer"):
        T5Config.from_transformers({"d_ff": 1.5})
    with pytest.raises(ConfigError, match="model_type 'umt5'"):
        T5Config.from_transformers({"model_type": "umt5"})
    with pytest.raises(ConfigError, match="at least .* parameters"):
        T5Config(d_model=16384, d_ff=65536, num_layers=128, num_heads=256)
    hf = _hf_t5("relu", max_distance=20)
    assert T5Config.from_transformers(hf.config.to_dict()) == T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4, relative_attention_num_buckets=8,
        relative_attention_max_distance=20, feed_forward_proj="relu",
    )  # fmt: skip
    # the defaults are T5-XXL's, which transformers' T5Config with that file's numbers describes
    assert T5Config.from_transformers(T5Config().to_transformers()) == T5Config()


# ------------------------------------------------------------------------------------------------------- files


def _sd(hf) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone().contiguous() for k, v in hf.state_dict().items() if k != "encoder.embed_tokens.weight"
    }


def _same_weights(model: T5Encoder, hf, *, dtype: torch.dtype = torch.float32) -> None:
    want = {k: v.to(dtype) for k, v in _sd(hf).items()}
    got = model.state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.equal(got[k].to(dtype), v), k


def test_file_layouts_load_the_same_weights(tmp_path: Path) -> None:
    hf = _hf_t5()  # max_distance 128 and eps 1e-6: the numbers a file without a config implies
    real = T5Config.from_transformers(hf.config.to_dict())
    ids, mask = _batch(9, seed=1)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).last_hidden_state

    hf.save_pretrained(tmp_path / "folder")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    pipe = tmp_path / "pipe"
    hf.save_pretrained(pipe / "text_encoder_3")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    single = tmp_path / "t5xxl_fp32.safetensors"
    safetensors_torch.save_file(_sd(hf), str(single))
    alias = tmp_path / "t5_alias.safetensors"  # the embedding only under its tied name
    safetensors_torch.save_file(
        {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v for k, v in _sd(hf).items()}, str(alias)
    )
    sd3 = tmp_path / "sd3_medium_incl_clips_t5xxlfp16.safetensors"
    others = {
        "model.diffusion_model.x_embedder.proj.weight": torch.zeros(4, 4),
        "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.zeros(4),
        "first_stage_model.decoder.conv_in.weight": torch.zeros(2),
    }
    safetensors_torch.save_file({**others, **{SD3_PREFIX + k: v for k, v in _sd(hf).items()}}, str(sd3))

    full = transformers.T5ForConditionalGeneration(hf.config).eval()  # encoder and decoder: the encoder is read
    full.encoder.load_state_dict(hf.encoder.state_dict())
    full.shared.load_state_dict(hf.shared.state_dict())
    both = tmp_path / "t5_full.safetensors"
    safetensors_torch.save_file(
        {k: v.detach().clone().contiguous() for k, v in full.state_dict().items() if "embed_tokens" not in k}, str(both)
    )
    assert any(k.startswith("decoder.") for k in safetensors_torch.load_file(str(both)))
    pickle = tmp_path / "t5xxl.bin"  # a weights-only pickle
    torch.save(_sd(hf), pickle)

    for path in (tmp_path / "folder", tmp_path / "sharded", pipe, single, alias, sd3, both, pickle):
        model = load_t5_encoder(path)
        assert model.config == real, path
        _same_weights(model, hf)
        with torch.no_grad():
            assert (model(ids, mask) - want).abs().max().item() <= TOL, path

    half = load_t5_encoder(single, dtype="fp16")
    assert half.encoder.block[1].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    assert half.shared.weight.dtype == torch.float16
    assert load_t5_encoder(single, dtype=torch.bfloat16).encoder.block[1].layer[1].DenseReluDense.wo.weight.dtype == (
        torch.bfloat16
    )


def test_config_from_shapes_equals_the_real_config() -> None:
    for ff in ("gated-gelu", "relu"):
        hf = _hf_t5(ff, layers=4, buckets=16)
        shapes = {k: tuple(v.shape) for k, v in _sd(hf).items()}
        assert config_from_shapes(shapes) == T5Config.from_transformers(hf.config.to_dict())


def test_fp8_files(tmp_path: Path) -> None:
    hf = _hf_t5()
    sd = _sd(hf)
    plain = tmp_path / "t5xxl_fp8_e4m3fn.safetensors"
    safetensors_torch.save_file({k: v.to(torch.float8_e4m3fn) for k, v in sd.items()}, str(plain))
    model = load_t5_encoder(plain, dtype="bf16")
    for k, v in sd.items():
        assert torch.equal(model.state_dict()[k], v.to(torch.float8_e4m3fn).to(torch.bfloat16)), k

    # ComfyUI's scaled fp8: weight / scale stored in fp8, the scale beside it, the marker tensor
    scaled: dict[str, torch.Tensor] = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    expected = {}
    for k, v in sd.items():
        if k.endswith((".q.weight", ".wo.weight", ".wi_0.weight")):
            s = v.abs().max() / 448.0
            scaled[k] = (v / s).to(torch.float8_e4m3fn)
            scaled[k[: -len(".weight")] + ".scale_weight"] = s.reshape(1)
            scaled[k[: -len(".weight")] + ".scale_input"] = torch.ones(1)
            expected[k] = scaled[k].float() * s
        else:
            scaled[k] = v
            expected[k] = v
    path = tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"
    safetensors_torch.save_file(scaled, str(path))
    model = load_t5_encoder(path)
    for k, v in expected.items():
        assert torch.equal(model.state_dict()[k], v), k
    q = "encoder.block.0.layer.0.SelfAttention.q.weight"
    assert (model.state_dict()[q] - sd[q]).abs().max() <= 0.07 * sd[q].abs().max()  # e4m3's 3 mantissa bits

    del scaled["scaled_fp8"]
    safetensors_torch.save_file(scaled, str(tmp_path / "nomarker.safetensors"))
    with pytest.raises(T5FileError, match="scale_(weight|input) without the scaled_fp8 marker"):
        load_t5_encoder(tmp_path / "nomarker.safetensors")


def test_file_errors(tmp_path: Path) -> None:
    hf = _hf_t5()
    sd = _sd(hf)

    def save(name: str, tensors: dict[str, torch.Tensor]) -> Path:
        path = tmp_path / name
        safetensors_torch.save_file(tensors, str(path))
        return path

    clip = save("clip_l.safetensors", {"text_model.final_layer_norm.weight": torch.ones(4)})
    with pytest.raises(T5FileError, match=r"clip_l.safetensors: a CLIP text encoder \(text_model\.\*\), not a T5"):
        load_t5_encoder(clip)
    other = save("x.safetensors", {"conv.weight": torch.ones(4)})
    with pytest.raises(T5FileError, match=r"not a T5 encoder \(no encoder.block.N.\* keys; it has conv.weight\)"):
        load_t5_encoder(other)
    sd3 = save(
        "sd3_medium.safetensors", {"model.diffusion_model.a": torch.ones(1), "text_encoders.clip_g.x": torch.ones(1)}
    )
    with pytest.raises(T5FileError, match=r"without T5 weights .* it has text_encoders.clip_g\)"):
        load_t5_encoder(sd3)
    gap = save("gap.safetensors", {k: v for k, v in sd.items() if not k.startswith("encoder.block.1.")})
    with pytest.raises(T5FileError, match="block 1 is missing"):
        load_t5_encoder(gap)
    cut = save("cut.safetensors", {k: v for k, v in sd.items() if not k.endswith("block.2.layer.1.layer_norm.weight")})
    with pytest.raises(T5FileError, match="without encoder.block.2.layer.1.layer_norm.weight"):
        load_t5_encoder(cut)
    umt5 = dict(sd)
    umt5["encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"] = torch.zeros(8, 4)
    with pytest.raises(T5FileError, match="UMT5"):
        load_t5_encoder(save("umt5.safetensors", umt5))
    extra = save("extra.safetensors", {**sd, "something.else": torch.ones(1)})
    with pytest.raises(T5FileError, match="unexpected keys beside the T5 encoder: something.else"):
        load_t5_encoder(extra)
    ints = save("ints.safetensors", {**sd, "encoder.final_layer_norm.weight": torch.ones(32, dtype=torch.int32)})
    with pytest.raises(T5FileError, match="holds torch.int32, not floating-point weights"):
        load_t5_encoder(ints)

    hf.save_pretrained(tmp_path / "folder")
    cfg = json.loads((tmp_path / "folder" / "config.json").read_text())
    (tmp_path / "folder" / "config.json").write_text(json.dumps({**cfg, "num_heads": 8, "d_kv": 4}))
    with pytest.raises(T5FileError, match="config.json says d_kv=4 but the weights have 8"):
        load_t5_encoder(tmp_path / "folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(T5FileError, match="no config.json"):
        load_t5_encoder(tmp_path / "empty")
    with pytest.raises(T5FileError, match="no such T5 encoder file or folder"):
        load_t5_encoder(tmp_path / "missing.safetensors")
    assert issubclass(T5FileError, WeightsError)


# --------------------------------------------------------------------------------------------------- tokenizer

WORDS = "a photo of the cat dog on red blue green house tree with and in painting portrait sky".split()
TEXTS = [
    "a photo of a cat",
    "",
    "   a  red\thouse\n\nwith a tree   ",
    "Zebra QUIZ xylophone ünïcödé 🐱 日本",  # letters outside the pieces: <unk>
    "a <pad> b </s> c",  # special tokens written in a prompt are read as those tokens
    "a photo of the cat " * 40,  # truncated
]


def _small_tokenizer(path: Path) -> Path:
    """A Unigram tokenizer.json shaped like T5's: <pad>, </s>, <unk> first, Metaspace pieces, a few hundred."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    letters = "abcdefghijklmnopqrstuvwxyz"
    pieces += [(c, -5.0) for c in letters] + [("▁" + c, -4.5) for c in letters]
    pieces += [(c, -6.0) for c in letters.upper() + "0123456789,.:()"]
    pieces += [("▁" + w, -3.0 - 0.1 * i) for i, w in enumerate(WORDS)]
    pairs = [a + b for a in "aeiou" for b in "nrstl"] + [b + a for a in "aeiou" for b in "nrstlph"]
    pieces += [(p, -5.5) for p in pairs] + [("▁" + p, -5.2) for p in pairs]
    pieces = list(dict(reversed(pieces)).items())[::-1]  # each piece once (its first score)
    assert 200 <= len(pieces) <= 400
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    tok.enable_padding(length=7)  # settings of the file that must not leak into the encoding
    tok.enable_truncation(5)
    tok.save(str(path))
    return path


def _same_as_transformers(ours: T5Tokenizer, file: Path, texts: list[str], lengths: tuple[int, ...]) -> None:
    ref = transformers.T5TokenizerFast(tokenizer_file=str(file))
    for length in lengths:
        want = ref(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        ids, mask = ours(texts, length)
        assert torch.equal(ids, want["input_ids"]), length
        assert torch.equal(mask, want["attention_mask"]), length


def test_tokenizer_matches_t5_tokenizer_fast(tmp_path: Path) -> None:
    path = _small_tokenizer(tmp_path / "tokenizer.json")
    ours = load_t5_tokenizer(tmp_path)  # a folder holding tokenizer.json
    _same_as_transformers(ours, path, TEXTS, (1, 2, 5, 16, 256))
    vocab = tokenizers.Tokenizer.from_file(str(path))
    words = [vocab.token_to_id("▁" + w) for w in "a photo of a cat".split()]
    assert ours.encode("a photo of a cat") == [*words, 1]
    ids, mask = ours(["a photo of a cat", "a photo of the cat " * 40], 8)
    assert ids[0].tolist() == [*words, 1, 0, 0] and mask[0].tolist() == [1] * 6 + [0] * 2
    assert ids[1, -1].item() == 1 and mask[1].tolist() == [1] * 8  # truncated: </s> still last
    assert ours.decode(ids[0]) == "a photo of a cat"


def test_shipped_tokenizer(tmp_path: Path) -> None:
    ours = load_t5_tokenizer(None)
    assert ours.vocab_size == 32100 and ours.pad_token_id == 0 and ours.eos_token_id == 1
    ids, mask = ours("a photo of a cat", 10)
    assert ids[0].tolist() == [3, 9, 1202, 13, 3, 9, 1712, 1, 0, 0]  # T5 v1.1's ids
    assert mask[0].tolist() == [1] * 8 + [0] * 2
    assert ours.decode(ids[0]) == "a photo of a cat"
    plain = tmp_path / "tokenizer.json"
    plain.write_bytes(gzip.decompress(shipped_tokenizer_path().read_bytes()))
    texts = [*TEXTS, "A photo of an astronaut riding a horse on Mars, (masterpiece:1.2), 8k, <extra_id_0>"]
    _same_as_transformers(ours, plain, texts, (3, 77, 256, 512))


def test_the_same_tokenizer_file_is_parsed_once(tmp_path: Path) -> None:
    """Every Flux, SD3 and Chroma folder ships T5 v1.1's tokenizer.json, parsed in 0.12 s each time a model was
    loaded; the same text (gzip or not, any folder) now shares one parsed tokenizer, another text gets its own."""
    shipped = load_t5_tokenizer(None)
    plain = tmp_path / "a" / "tokenizer.json"
    plain.parent.mkdir()
    plain.write_bytes(gzip.decompress(shipped_tokenizer_path().read_bytes()))
    again = load_t5_tokenizer(plain.parent)
    assert again._backend is shipped._backend and again.path == plain  # each keeps its own path for its errors
    small = load_t5_tokenizer(_small_tokenizer(tmp_path / "tokenizer.json"))
    assert small._backend is not shipped._backend and small.vocab_size != shipped.vocab_size
    assert again("a photo of a cat", 10)[0].tolist() == shipped("a photo of a cat", 10)[0].tolist()


def test_tokenizer_errors(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models

    ours = load_t5_tokenizer(_small_tokenizer(tmp_path / "tokenizer.json"))
    with pytest.raises(T5TokenizerError, match="max_length=0 must be an integer 1 to 4096"):
        ours("a cat", 0)
    with pytest.raises(T5TokenizerError, match="every prompt must be a string"):
        ours(["a cat", 3], 8)  # type: ignore[list-item]
    bert = tmp_path / "bert.json"
    Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(bert))
    with pytest.raises(T5TokenizerError, match=r"bert.json: no </s> token in this tokenizer \(not a T5 vocabulary\)"):
        load_t5_tokenizer(bert)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(T5TokenizerError, match="bad.json: not a tokenizers tokenizer.json"):
        load_t5_tokenizer(bad)
    folder = tmp_path / "tokenizer_3"
    folder.mkdir()
    (folder / "spiece.model").write_bytes(b"x")
    with pytest.raises(T5TokenizerError, match="has spiece.model but no tokenizer.json"):
        load_t5_tokenizer(folder)
    with pytest.raises(T5TokenizerError, match="no such tokenizer file or folder"):
        load_t5_tokenizer(tmp_path / "nope.json")
