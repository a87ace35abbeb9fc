"""sdengine eval emoji: the paraphrases, the metric pieces, evaluate_emoji end to end on a tiny random model with a
tiny random recogniser stand-in, and the CLI's one-line errors."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from sdengine.data.emoji import CAPTION_TEMPLATES, EmojiDataset, make_caption  # noqa: E402
from sdengine.data.emoji_paraphrases import FRUIT_PARAPHRASES, PARAPHRASES  # noqa: E402
from sdengine.eval.emoji import (  # noqa: E402
    ControlSetting,
    canny_edges,
    edge_f1,
    evaluate_emoji,
    evenly_spaced,
    format_report,
    generate_batch,
    resize_uint8,
    topk_hits,
)
from sdengine.train.emoji import HELD_OUT_SUBGROUP  # noqa: E402


@pytest.fixture(scope="module")
def dataset():
    return EmojiDataset()


# ---------------------------------------------------------------------------------------------- paraphrases


def test_paraphrases_are_valid_and_not_captions(dataset):
    by_char = {e.char: e for e in dataset.entries}
    captions = {make_caption(e, template=k).lower() for e in dataset.entries for k in range(len(CAPTION_TEMPLATES))}
    assert len(PARAPHRASES) >= 100
    assert 8 <= len(FRUIT_PARAPHRASES) <= 20
    for table, fruit in ((PARAPHRASES, False), (FRUIT_PARAPHRASES, True)):
        prompts = [p.lower() for p, _ in table]
        assert len(set(prompts)) == len(prompts), "duplicate prompts"
        for prompt, char in table:
            assert char in by_char, f"{prompt!r}: {char!r} is not in the dataset"
            assert prompt.strip() and prompt == prompt.strip()
            assert prompt.lower() not in captions, f"{prompt!r} is a caption"
            assert (by_char[char].subgroup == HELD_OUT_SUBGROUP) == fruit, prompt
    # Spread over many groups.
    assert len({by_char[c].group for _, c in PARAPHRASES}) >= 8
    assert len({p.lower() for p, _ in PARAPHRASES} & {p.lower() for p, _ in FRUIT_PARAPHRASES}) == 0


# ---------------------------------------------------------------------------------------------- metric pieces


def test_edge_f1():
    a = np.zeros((16, 16), np.uint8)
    a[4, 2:12] = 255
    assert edge_f1(a, a) == 1.0
    assert edge_f1(a, a, tolerance=0) == 1.0
    far = np.zeros_like(a)
    far[12, 2:12] = 255
    assert edge_f1(a, far) == 0.0
    assert edge_f1(a, far, tolerance=0) == 0.0
    # One pixel off: a miss when exact, a match within the 1-pixel tolerance.
    near = np.zeros_like(a)
    near[5, 2:12] = 255
    assert edge_f1(a, near, tolerance=0) == 0.0
    assert edge_f1(a, near) == 1.0
    # Half the edge found: precision 1, recall 0.5.
    half = np.zeros_like(a)
    half[4, 2:7] = 255
    assert edge_f1(a, half, tolerance=0) == pytest.approx(2 * 0.5 / 1.5)
    assert edge_f1(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert edge_f1(a, np.zeros_like(a)) == 0.0
    assert edge_f1(np.stack([a] * 3, -1), a) == 1.0  # RGB maps read from one channel
    with pytest.raises(ValueError, match="size"):
        edge_f1(a, a[:8])


def test_topk_hits_and_evenly_spaced():
    logits = torch.tensor([[0.1, 0.9, 0.3, 0.0], [0.5, 0.1, 0.2, 0.4], [0.0, 0.1, 0.2, 0.3]])
    targets = torch.tensor([1, 3, 0])
    assert topk_hits(logits, targets, 1).tolist() == [True, False, False]
    assert topk_hits(logits, targets, 2).tolist() == [True, True, False]
    assert topk_hits(logits, targets, 4).tolist() == [True, True, True]
    assert topk_hits(logits, targets, 99).tolist() == [True, True, True]
    with pytest.raises(ValueError):
        topk_hits(logits, targets[:2], 1)
    assert evenly_spaced(10, None) == list(range(10))
    assert evenly_spaced(10, 50) == list(range(10))
    assert evenly_spaced(10, 3) == [0, 4, 9] or evenly_spaced(10, 3) == [0, 5, 9]
    assert evenly_spaced(1879, 200)[0] == 0 and evenly_spaced(1879, 200)[-1] == 1878
    assert len(evenly_spaced(1879, 200)) == 200


# ---------------------------------------------------------------------------------------------- end to end


class StandInRecogniser(nn.Module):
    """The emoji recogniser's interface with tiny random weights: forward -> logits over ``chars``, features."""

    def __init__(self, chars: list[str], dims: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.chars = list(chars)
        self._index = {c: i for i, c in enumerate(self.chars)}
        self.body = nn.Sequential(
            nn.Conv2d(3, dims, 4, stride=4), nn.GELU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * dims, dims)
        )
        self.head = nn.Linear(dims, len(self.chars))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1:] == (3, 64, 64) and float(x.min()) >= -1.0 - 1e-5 and float(x.max()) <= 1.0 + 1e-5
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def class_index(self, char: str) -> int:
        return self._index[char]


def _tiny_pipeline():
    """A random pipeline in the tiny emoji model's shape (tests/_emoji_models.py: 16x16 images, 2x VAE), with a
    tiny CLIP text encoder in place of MiniLM (evaluate_emoji only needs the ordinary Pipeline)."""
    from _emoji_models import TINY_EMOJI_UNET, TINY_EMOJI_VAE
    from sdengine.models.clip_text import CLIPTextConfig, CLIPTextModel
    from sdengine.models.unet import UNet
    from sdengine.models.vae import AutoencoderKL
    from sdengine.pipeline import Pipeline
    from sdengine.text.clip_tokenizer import CLIPTokenizer
    from sdengine.train.emoji import SCHEDULER_CONFIG

    torch.manual_seed(0)
    text_cfg = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    unet = UNet(
        dataclasses.replace(TINY_EMOJI_UNET, cross_attention_dim=32, projection_class_embeddings_input_dim=None)
    )
    with torch.no_grad():  # zero-initialised output layers would make every image the same
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return Pipeline(
        unet=unet,
        vae=AutoencoderKL(TINY_EMOJI_VAE),
        text_encoder=CLIPTextModel(text_cfg),
        tokenizer=CLIPTokenizer.load(),
        scheduler_config=SCHEDULER_CONFIG,
        prediction_type="epsilon",
        pad_token_id=49407,
        device=torch.device("cpu"),
        dtype=torch.float32,
        name="tiny-emoji",
    )


@pytest.fixture(scope="module")
def pipe():
    return _tiny_pipeline()


@pytest.fixture(scope="module")
def recogniser(dataset):
    return StandInRecogniser([e.char for e in dataset.entries]).eval()


def test_generate_batch_rows_equal_single_calls(pipe):
    prompts = ["red heart", "a little red sports car", "a pink tulip"]
    seeds = [5, 6, 7]
    batch = generate_batch(pipe, prompts, seeds, steps=3, sampler="dpmpp_2m", cfg_scale=3.0)
    assert batch.shape == (3, 16, 16, 3) and batch.dtype == np.float32
    for i, (p, s) in enumerate(zip(prompts, seeds, strict=True)):
        one = pipe(p, steps=3, sampler="dpmpp_2m", cfg_scale=3.0, seed=s, progress=False).arrays[0]
        np.testing.assert_allclose(batch[i], one, atol=2e-5)
    assert not np.allclose(batch[0], batch[1])


def test_evaluate_emoji_tiny(pipe, recogniser, dataset, tmp_path):
    from sdengine.models.controlnet import ControlNet

    cn = ControlNet.from_unet(pipe.unet, conditioning_embedding_out_channels=(8, 16)).eval()
    kw = dict(
        n=6,
        steps=2,
        seed=3,
        batch_size=4,
        cfg_sweep=(1, 5),
        sweep_n=3,
        paraphrase_n=5,
        control_n=2,
        controlnet=cn,
        progress=False,
        dataset=dataset,
    )
    res = evaluate_emoji(pipe, recogniser, **kw)
    assert set(res) >= {
        "model",
        "settings",
        "captions",
        "paraphrases",
        "fd",
        "cfg_sweep",
        "controlnet",
        "lora",
        "images_generated",
        "timings",
    }
    assert res["captions"]["n"] == 6 and res["paraphrases"]["n"] == 5
    for r in (res["captions"], res["paraphrases"], *res["cfg_sweep"]):
        assert 0.0 <= r["top1"] <= r["top5"] <= 1.0
    assert [r["cfg"] for r in res["cfg_sweep"]] == [1.0, 5.0] and all(r["n"] == 3 for r in res["cfg_sweep"])
    base = sum(e.subgroup != HELD_OUT_SUBGROUP for e in dataset.entries)
    assert res["settings"]["base_emoji"] == base and res["fd"]["n_real"] == base
    assert res["fd"]["n_generated"] == 6 and res["fd"]["value"] >= 0
    c = res["controlnet"]
    assert c["n"] == 2 and 0.0 <= c["f1_with"] <= 1.0 and 0.0 <= c["f1_exact_without"] <= 1.0
    assert 0.0 <= c["f1_empty_with"] <= 1.0 and 0.0 <= c["f1_exact_empty_without"] <= 1.0
    # the mismatched prompt (another emoji's caption): F1 against the control, and whose emoji the result is
    assert 0.0 <= c["f1_mismatched_with"] <= 1.0
    shares = [c[f"mismatched_top5_{w}"] for w in ("prompt", "control", "either")]
    assert all(0.0 <= v <= 1.0 for v in shares) and shares[2] >= max(shares[:2])
    assert res["lora"] is None
    # captions 6 + paraphrases 5 + sweep (cfg 1: 3 new; cfg 5 = the main scale: the captions of the main run
    # reused) + ControlNet 2 x 2 with the captions, 2 x 2 with the empty prompt, 2 with mismatched prompts
    reused = len(set(evenly_spaced(base, 3)) & set(evenly_spaced(base, 6)))
    assert reused >= 2
    assert res["images_generated"] == 6 + 5 + 3 + (3 - reused) + 4 + 4 + 2
    json.dumps(res)  # JSON-able
    report = format_report(res)
    assert "| canonical captions" in report and "cfg 1" in report and "ControlNet" in report
    assert "mismatched prompt" in report

    again = evaluate_emoji(pipe, recogniser, **kw)
    strip = lambda r: {k: v for k, v in r.items() if k != "timings"}  # noqa: E731
    assert strip(again) == strip(res)


def test_evaluate_emoji_bad_inputs(pipe, recogniser, dataset):
    with pytest.raises(ValueError, match="steps"):
        evaluate_emoji(pipe, recogniser, steps=0, dataset=dataset)
    with pytest.raises(ValueError, match="n must be"):
        evaluate_emoji(pipe, recogniser, n=1, dataset=dataset)
    with pytest.raises(ValueError, match="guidance"):
        evaluate_emoji(pipe, recogniser, cfg=-1, dataset=dataset)
    with pytest.raises(FileNotFoundError, match="LoRA"):
        evaluate_emoji(pipe, recogniser, lora="/nonexistent/x.safetensors", dataset=dataset)


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_missing_model_is_one_line(capsys, tmp_path):
    from sdengine.cli import main

    rc = main(["eval", "emoji", "--model", str(tmp_path / "nothing"), "--n", "4"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("sdengine: error:") and "nothing" in err


def test_cli_bad_numbers_are_one_line(capsys):
    from sdengine.cli import main

    for args, word in (
        (["--n", "1"], "--n"),
        (["--steps", "0"], "--steps"),
        (["--cfg", "-2"], "--cfg"),
        (["--lora", "/nonexistent/l.safetensors"], "--lora"),
    ):
        rc = main(["eval", "emoji", *args])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and word in err, (args, err)


def _random_lora(unet: nn.Module, path: Path, r: int = 2) -> Path:
    """A kohya-format LoRA with random down and up matrices on the U-Net's attention projections."""
    from safetensors.torch import save_file

    from sdengine.weights.lora import kohya_name, lora_targets

    g = torch.Generator().manual_seed(1)
    sd = {}
    for name, m in lora_targets(unet):
        if isinstance(m, nn.Linear) and name.endswith(("to_q", "to_k", "to_v")):
            k = kohya_name("unet", name)
            sd[f"{k}.lora_down.weight"] = torch.randn(r, m.in_features, generator=g) * 0.5
            sd[f"{k}.lora_up.weight"] = torch.randn(m.out_features, r, generator=g) * 0.5
            sd[f"{k}.alpha"] = torch.tensor(float(r))
    assert sd
    save_file(sd, str(path))
    return path


def test_controlnet_rows_and_lora_section(pipe, recogniser, dataset, tmp_path):
    from sdengine.models.controlnet import ControlNet

    cn = ControlNet.from_unet(pipe.unet, conditioning_embedding_out_channels=(8, 16)).eval()
    with torch.no_grad():  # non-zero zero-convs, so that the control image changes the output
        for p in cn.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    control = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts, seeds = ["red heart", "a pink tulip"], [1, 2]
    batch = generate_batch(
        pipe, prompts, seeds, steps=2, sampler="dpmpp_2m", cfg_scale=3.0, controlnet=cn, control_images=control
    )
    plain = generate_batch(pipe, prompts, seeds, steps=2, sampler="dpmpp_2m", cfg_scale=3.0)
    assert not np.allclose(batch, plain, atol=1e-4)
    for i in range(2):
        one = pipe(
            prompts[i],
            steps=2,
            sampler="dpmpp_2m",
            cfg_scale=3.0,
            seed=seeds[i],
            progress=False,
            controlnets=[(cn, control[i : i + 1], 1.0)],
        ).arrays[0]
        np.testing.assert_allclose(batch[i], one, atol=2e-5)

    lora = _random_lora(pipe.unet, tmp_path / "fruit.safetensors")
    before = [p.clone() for p in pipe.unet.parameters()]
    res = evaluate_emoji(
        pipe,
        recogniser,
        n=2,
        steps=2,
        batch_size=16,
        cfg_sweep=None,
        paraphrase_n=2,
        lora=lora,
        progress=False,
        dataset=dataset,
    )
    lo = res["lora"]
    held = sum(e.subgroup == HELD_OUT_SUBGROUP for e in dataset.entries)
    assert lo["captions_without"]["n"] == lo["captions_with"]["n"] == held
    assert lo["paraphrases_without"]["n"] == lo["paraphrases_with"]["n"] == len(FRUIT_PARAPHRASES)
    assert res["cfg_sweep"] is None and res["settings"]["sweep_n"] == 0
    assert res["images_generated"] == 2 + 2 + 2 * (held + len(FRUIT_PARAPHRASES))
    assert all(torch.equal(a, b) for a, b in zip(before, pipe.unet.parameters(), strict=True))  # LoRA removed
    assert "with LoRA" in format_report(res)


def test_cli_prints_report_and_writes_json(monkeypatch, capsys, tmp_path, pipe, recogniser):
    import types

    import sdengine.pipeline
    from sdengine.cli import main

    fake = types.ModuleType("sdengine.metrics.emoji_recogniser")
    fake.load_emoji_recogniser = lambda device=None, path=None: recogniser
    monkeypatch.setitem(sys.modules, "sdengine.metrics.emoji_recogniser", fake)
    monkeypatch.setattr(sdengine.pipeline, "load_pipeline", lambda name, device="auto", dtype=None: pipe)
    out = tmp_path / "res" / "emoji.json"
    rc = main(
        [
            "eval",
            "emoji",
            "--n",
            "2",
            "--paraphrase-n",
            "2",
            "--steps",
            "1",
            "--no-sweep",
            "--device",
            "cpu",
            "--quiet",
            "--json",
            str(out),
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0 and "| canonical captions" in text and str(out) in text
    res = json.loads(out.read_text())
    assert res["captions"]["n"] == 2 and res["settings"]["steps"] == 1 and res["cfg_sweep"] is None
    assert [p.name for p in out.parent.iterdir()] == ["emoji.json"]  # written atomically, no temporary file left


def test_evaluate_emoji_on_the_emoji_folder_with_the_real_recogniser_class(dataset, tmp_path, tiny_emoji_folder):
    """The tiny emoji-format folder through load_pipeline (MiniLM text encoder) and sdengine's EmojiRecogniser
    (random weights, small widths)."""
    from sdengine.metrics.emoji_recogniser import EmojiRecogniser, RecogniserConfig
    from sdengine.pipeline import load_pipeline

    pipe = load_pipeline(tiny_emoji_folder, device="cpu")
    torch.manual_seed(0)
    chars = [e.char for e in dataset.entries]
    rec = EmojiRecogniser(RecogniserConfig(channels=(8, 8, 16, 16), num_classes=len(chars)), classes=chars).eval()
    kw = dict(n=3, steps=1, batch_size=32, cfg_sweep=None, paraphrase_n=3, progress=False, dataset=dataset)
    prompts, seeds = ["red heart", "a pink tulip"], [4, 9]
    batch = generate_batch(pipe, prompts, seeds, steps=2, sampler="dpmpp_2m", cfg_scale=5.0)
    for i in range(2):
        one = pipe(prompts[i], steps=2, sampler="dpmpp_2m", cfg_scale=5.0, seed=seeds[i], progress=False).arrays[0]
        np.testing.assert_allclose(batch[i], one, atol=2e-5)
    lora = _random_lora(pipe.unet, tmp_path / "fruit.safetensors")
    res = evaluate_emoji(pipe, rec, lora=lora, **kw)
    assert res["lora"]["captions_with"]["n"] == sum(e.subgroup == HELD_OUT_SUBGROUP for e in dataset.entries)
    assert res["captions"]["n"] == 3 and res["paraphrases"]["n"] == 3 and res["fd"]["dims"] == 16
    assert res["captions"]["unknown_to_recogniser"] == 0
    assert res["settings"]["image_size"] == 16


def test_control_sweep_rescores_the_mismatched_images_at_other_scales_and_ends(pipe, recogniser, dataset):
    """--control-sweep: each (scale, end) makes the mismatched-prompt images again and scores them as the main
    row does; (1, 1) is the main row itself, scale 0 is the model without the ControlNet."""
    from sdengine.io.images import to_uint8
    from sdengine.models.controlnet import ControlNet

    cn = ControlNet.from_unet(pipe.unet, conditioning_embedding_out_channels=(8, 16)).eval()
    with torch.no_grad():
        for p in cn.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    sweep = ((1.0, 1.0), (0.0, 1.0), (1.0, 0.5))
    kw = dict(n=2, steps=2, batch_size=8, cfg_sweep=None, paraphrase_n=1, control_n=2, progress=False)
    res = evaluate_emoji(pipe, recogniser, controlnet=cn, control_sweep=sweep, dataset=dataset, **kw)
    c = res["controlnet"]
    rows = c["mismatched_sweep"]
    assert [(r["scale"], r["end"]) for r in rows] == list(sweep)
    main_row = {
        "f1": c["f1_mismatched_with"],
        **{w: c[f"mismatched_top5_{w}"] for w in ("prompt", "control", "either")},
    }
    assert {k: rows[0][k] for k in main_row} == main_row
    assert rows[1]["f1"] != rows[0]["f1"] or rows[2]["f1"] != rows[0]["f1"]  # the settings change the images
    # scale 0: the mismatched prompts without any ControlNet
    base = [j for j, e in enumerate(dataset.entries) if e.subgroup != HELD_OUT_SUBGROUP]
    idx = [base[i] for i in evenly_spaced(len(base), 2)]
    other = [idx[1], idx[0]]
    plain = generate_batch(
        pipe,
        [dataset.captions[j] for j in other],
        [j for j in idx],
        steps=2,
        sampler="dpmpp_2m",
        cfg_scale=res["settings"]["cfg"],
    )
    size = int(pipe.default_size)
    expected = np.mean(
        [
            edge_f1(canny_edges(resize_uint8(dataset.pixels[j], size)), canny_edges(to_uint8(a)))
            for j, a in zip(idx, plain, strict=True)
        ]
    )
    assert rows[1]["f1"] == pytest.approx(expected, abs=1e-9)
    assert res["images_generated"] == 2 + 1 + 2 * 4 + 2 * (1 + len(sweep))
    assert "first 50% of the steps" in format_report(res)
    with pytest.raises(ValueError, match="control_sweep"):
        evaluate_emoji(pipe, recogniser, controlnet=cn, control_sweep=((1.0, 0.0),), dataset=dataset, **kw)
    with pytest.raises(ValueError, match="needs a controlnet"):
        evaluate_emoji(pipe, recogniser, control_sweep=((1.0, 1.0),), dataset=dataset, **kw)


def test_cli_bad_control_sweep_is_one_line(capsys, tmp_path):
    from sdengine.cli import main

    cn = tmp_path / "cn"
    cn.mkdir()
    for args, word in (
        (["--controlnet", str(cn), "--control-sweep", "1"], "SCALE:END"),
        (["--controlnet", str(cn), "--control-sweep", "1:1.5"], "END in (0, 1]"),
        (["--controlnet", str(cn), "--control-sweep=-1:1"], "SCALE must be >= 0"),
        (["--control-sweep", "1:1"], "needs --controlnet"),
    ):
        rc = main(["eval", "emoji", *args])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and word in err, (args, err)


@pytest.mark.filterwarnings("ignore:ControlNet 2. weight 3.0 is outside the usual range")
def test_control_sweep_guidance_and_guess_mode_points_are_those_generations(pipe, recogniser, dataset):
    """A sweep point with its own guidance scale and guess mode scores exactly the images that generate_batch
    makes with those settings; guess mode changes them (the unconditional rows lose the control)."""
    from sdengine.io.images import to_uint8
    from sdengine.models.controlnet import ControlNet

    cn = ControlNet.from_unet(pipe.unet, conditioning_embedding_out_channels=(8, 16)).eval()
    with torch.no_grad():
        for p in cn.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel() + 1)) * 0.05)
    sweep = (
        (1.0, 1.0, 2.0, True),
        ControlSetting(1.0, 1.0, None, True),
        (1.0, 1.0, 2.0),
        ControlSetting(3.0, 1.0, 2.0, start=0.5, early=0.4),
    )
    kw = dict(n=2, steps=2, batch_size=8, cfg_sweep=None, paraphrase_n=1, control_n=2, progress=False)
    res = evaluate_emoji(pipe, recogniser, controlnet=cn, control_sweep=sweep, dataset=dataset, **kw)
    rows = res["controlnet"]["mismatched_sweep"]
    main_cfg = res["settings"]["cfg"]
    assert [(r["cfg"], r["guess_mode"]) for r in rows] == [(2.0, True), (main_cfg, True), (2.0, False), (2.0, False)]
    assert (rows[3]["start"], rows[3]["early"]) == (0.5, 0.4)
    base = [j for j, e in enumerate(dataset.entries) if e.subgroup != HELD_OUT_SUBGROUP]
    idx = [base[i] for i in evenly_spaced(len(base), 2)]
    other = [idx[1], idx[0]]
    size = int(pipe.default_size)
    edges = [canny_edges(resize_uint8(dataset.pixels[j], size)) for j in idx]
    control = torch.from_numpy(np.stack(edges)).float().div(255.0)[:, None].expand(-1, 3, -1, -1).contiguous()
    arrays = {}
    for cfg, guess in ((2.0, True), (2.0, False), (main_cfg, True)):
        arrays[cfg, guess] = generate_batch(
            pipe,
            [dataset.captions[j] for j in other],
            list(idx),
            steps=2,
            sampler="dpmpp_2m",
            cfg_scale=cfg,
            controlnet=cn,
            control_images=control,
            guess_mode=guess,
        )
    assert not np.allclose(arrays[2.0, True], arrays[2.0, False])  # guess mode is not ignored
    # scale 0.4 for the first half of the steps, then 3: two units of the same net
    arrays["two"] = generate_batch(
        pipe,
        [dataset.captions[j] for j in other],
        list(idx),
        steps=2,
        sampler="dpmpp_2m",
        cfg_scale=2.0,
        controlnet=cn,
        control_images=control,
        control_scale=3.0,
        control_start=0.5,
        control_early=0.4,
    )
    assert not np.allclose(arrays["two"], arrays[2.0, False])
    for r, key in zip(rows, ((2.0, True), (main_cfg, True), (2.0, False), "two"), strict=True):
        f1 = np.mean([edge_f1(e, canny_edges(to_uint8(a))) for e, a in zip(edges, arrays[key], strict=True)])
        assert r["f1"] == pytest.approx(f1, abs=1e-9), key
    report = format_report(res)
    assert "cfg 2, guess mode" in report and f"cfg {main_cfg:g}, guess mode" in report
    assert "scale 3 from 50% to 100% of the steps (scale 0.4 before), cfg 2" in report
    with pytest.raises(ValueError, match="guess_mode needs a ControlNet"):
        generate_batch(pipe, ["a"], [0], steps=1, sampler="euler", cfg_scale=2.0, guess_mode=True)
    for bad in (
        (1.0, 1.0, -1.0),
        (1.0, 1.0, 2.0, "yes"),
        (1.0,),
        ControlSetting(1.0, 0.0),
        ControlSetting(1.0, 0.5, start=0.5),
        ControlSetting(1.0, 1.0, start=0.5, early=-1.0),
        ControlSetting(1.0, 1.0, early=0.4),  # an early scale with no steps before the start
    ):
        with pytest.raises(ValueError, match="control_sweep"):
            evaluate_emoji(pipe, recogniser, controlnet=cn, control_sweep=(bad,), dataset=dataset, **kw)


def test_cli_control_sweep_bad_points_are_one_line(capsys, tmp_path):
    from sdengine.cli import main

    cn = tmp_path / "cn"
    cn.mkdir()
    for bad in (
        "1:1:2:3",
        "1:guess",
        "1:1:x",
        "1:1:-2",
        "1:1:2:guess:1",
        "scale=3,start=1",
        "scale=3,scale=2",
        "scale=x",
        "guess=yes",
        "strength=1",
        "early=-1,start=0.5",
        "scale=3,early=0.4",
    ):
        rc = main(["eval", "emoji", "--controlnet", str(cn), "--control-sweep", bad])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and "--control-sweep" in err, (bad, err)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--no-sweep", "--cfg-sweep", "2", "4"], "--cfg-sweep is a setting of the guidance sweep, which --no-sweep"),
        (["--no-sweep", "--sweep-n", "10"], "--sweep-n is a setting of the guidance sweep, which --no-sweep skips"),
        (["--control-n", "8"], "--control-n is a setting of the ControlNet check: give --controlnet"),
        (["--lora-weight", "0.5"], "--lora-weight is a setting of the LoRA check: give --lora"),
    ],
)
def test_cli_settings_of_a_part_that_does_not_run_are_refused(capsys, tmp_path, args, message):
    """Each was once ignored without a word (the sweep skipped, no ControlNet or LoRA to check)."""
    from sdengine.cli import main

    rc = main(["eval", "emoji", "--model", str(tmp_path / "nothing"), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err
