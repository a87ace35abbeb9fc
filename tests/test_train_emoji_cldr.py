"""The emoji trainer's CLDR captions and its continuation of an exported model (`--init-unet`), at toy size."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from _emoji_models import make_tiny_emoji_folder
from sdengine.cli import main
from sdengine.data.emoji import CAPTION_TEMPLATES, make_caption
from sdengine.data.emoji_cldr import CLDR_CAPTION_COUNT, Annotation, annotation_key
from sdengine.train.emoji import (
    HELD_OUT_SUBGROUP,
    EmojiRecipe,
    EmojiTrainError,
    EmojiTrainSpec,
    caption_table,
    load_init_model,
    prepare_text_states,
    train_emoji,
    training_indices,
)

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def small_dataset(emoji_subset):
    return emoji_subset(12)


def _annotations(ds):
    """A hand-made annotation for every emoji of ``ds`` (the held-out fruit too): words no template has."""
    return {
        annotation_key(e.char): Annotation(f"cldrname{i}", (f"kwa{i}", f"kwb{i}", f"kwc{i}"))
        for i, e in enumerate(ds.entries)
    }


def test_cldr_caption_table_widens_the_axis_and_never_captions_the_held_out_fruit(small_dataset):
    ds = small_dataset
    templates = caption_table(ds, "templates")
    assert templates == [[make_caption(e, template=t) for e in ds.entries] for t in range(len(CAPTION_TEMPLATES))]
    table = caption_table(ds, "cldr", HELD_OUT_SUBGROUP, annotations=_annotations(ds))
    assert len(table) == len(CAPTION_TEMPLATES) + CLDR_CAPTION_COUNT and all(len(r) == len(ds.entries) for r in table)
    assert table[: len(CAPTION_TEMPLATES)] == templates  # the templates first, unchanged
    keep = set(training_indices(ds, HELD_OUT_SUBGROUP))
    for i, e in enumerate(ds.entries):
        extra = [row[i] for row in table[len(CAPTION_TEMPLATES) :]]
        if e.subgroup == HELD_OUT_SUBGROUP:
            assert i not in keep
            assert extra == [make_caption(e, template=t) for t in range(CLDR_CAPTION_COUNT)]
            assert not any("cldr" in c or "kw" in c for c in extra)
        else:
            assert all(f"kwa{i}" in c or f"cldrname{i}" in c for c in extra), extra
    assert sum(1 for e in ds.entries if e.subgroup == HELD_OUT_SUBGROUP) == 3
    with pytest.raises(EmojiTrainError, match="captions must be one of templates, cldr"):
        caption_table(ds, "nope")


def test_text_state_cache_is_keyed_by_the_extended_caption_list(tmp_path, small_dataset):
    ds = small_dataset
    path = tmp_path / "text_states.pt"
    six, empty = prepare_text_states(ds, path, torch.device("cpu"))
    assert six.shape[:2] == (len(CAPTION_TEMPLATES), len(ds.entries))
    table = caption_table(ds, "cldr", HELD_OUT_SUBGROUP, annotations=_annotations(ds))
    ten, _ = prepare_text_states(ds, path, torch.device("cpu"), table)  # same file: recomputed, not reused
    assert ten.shape[:2] == (len(CAPTION_TEMPLATES) + CLDR_CAPTION_COUNT, len(ds.entries))
    assert torch.equal(ten[: len(CAPTION_TEMPLATES)], six)
    assert not torch.equal(ten[len(CAPTION_TEMPLATES)], ten[0])  # the CLDR rows are other captions' states
    again, _ = prepare_text_states(ds, path, torch.device("cpu"), table)
    assert torch.equal(again, ten)


def test_template_cache_key_is_the_one_earlier_runs_wrote(tmp_path, small_dataset):
    """A run folder's text_states.pt from before the caption option stays valid (not recomputed)."""
    import hashlib

    from sdengine.train.emoji import TEXT_LENGTH

    ds = small_dataset
    old = "\n".join(make_caption(e, template=t) for t in range(len(CAPTION_TEMPLATES)) for e in ds.entries)
    key = hashlib.sha256(old.encode()).hexdigest()[:16] + f"-{TEXT_LENGTH}"
    sentinel = torch.full((len(CAPTION_TEMPLATES), len(ds.entries), TEXT_LENGTH, 384), 7.0, dtype=torch.float16)
    torch.save({"key": key, "states": sentinel, "empty": torch.zeros(TEXT_LENGTH, 384)}, tmp_path / "t.pt")
    states, _ = prepare_text_states(ds, tmp_path / "t.pt", torch.device("cpu"), caption_table(ds, "templates"))
    assert torch.equal(states, sentinel)


@pytest.fixture
def init_folder(tmp_path):
    folder = make_tiny_emoji_folder(tmp_path / "init", seed=3)
    index = json.loads((folder / "model_index.json").read_text())
    index["sdengine"] = {"held_out_subgroup": HELD_OUT_SUBGROUP, "vae_steps": 7, "unet_steps": 100}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def _recipe(**kw) -> EmojiRecipe:
    base = dict(
        unet_steps=2,
        unet_batch=8,
        unet_warmup=1,
        mixed_precision="no",
        spec=EmojiTrainSpec(vae_crop=8),
        vae_steps=1000,  # unused: the init's VAE is kept
    )
    return EmojiRecipe(**{**base, **kw})


@pytest.mark.slow  # trimmed from make test (time); make test-all runs it
def test_init_unet_starts_from_the_model_and_exports_with_its_vae(tmp_path, small_dataset, init_folder):
    kw = dict(device="cpu", progress=False, dataset=small_dataset, init_unet=init_folder)
    init_unet = load_file(str(init_folder / "unet" / WEIGHTS))
    init_vae = load_file(str(init_folder / "vae" / WEIGHTS))
    # A learning rate too small to move an fp16 weight: the export is the init's U-Net, bit for bit.
    still = train_emoji(tmp_path / "still", _recipe(unet_lr=1e-12), **kw)
    assert still["unet"]["steps"] == 2 and still["vae"]["steps"] == 0
    assert not (tmp_path / "still" / "vae").exists()  # no VAE training
    model = tmp_path / "still" / "model"
    out_unet = load_file(str(model / "unet" / WEIGHTS))
    assert out_unet.keys() == init_unet.keys() and all(torch.equal(out_unet[k], init_unet[k]) for k in init_unet)
    # the init's VAE and scaling factor, unchanged
    out_vae = load_file(str(model / "vae" / WEIGHTS))
    assert all(torch.equal(out_vae[k], init_vae[k]) for k in init_vae)
    vcfg = json.loads((model / "vae" / "config.json").read_text())
    assert vcfg["scaling_factor"] == json.loads((init_folder / "vae" / "config.json").read_text())["scaling_factor"]
    assert still["vae"]["scaling_factor"] == vcfg["scaling_factor"] == 0.5
    extra = json.loads((model / "model_index.json").read_text())["sdengine"]
    assert extra["unet_steps"] == 102 and extra["vae_steps"] == 7
    assert extra["unet_continuations"] == [
        {
            "init_unet_steps": 100,
            "steps": 2,
            "captions": "templates",
            "cldr_captions_per_emoji": 0,
            "name_captions_per_emoji": 0,
            "batch": 8,
            "lr": 1e-12,
            "warmup": 1,
            "seed": 0,
        }
    ]

    # A real learning rate: the same first loss (step 0 sees the init's weights), then the weights move.
    moved = train_emoji(tmp_path / "moved", _recipe(unet_lr=1e-3), **kw)
    assert moved["unet"]["first_loss"] == still["unet"]["first_loss"]
    fresh = train_emoji(
        tmp_path / "fresh",
        _recipe(unet_lr=1e-3, vae_steps=2, vae_batch=8, unet_pooled_from=0),
        **{**kw, "init_unet": None, "unet_config": load_init_model(init_folder).unet_config},
    )
    assert fresh["unet"]["first_loss"] != moved["unet"]["first_loss"]  # a random U-Net starts elsewhere
    base_extra = json.loads((tmp_path / "fresh" / "model" / "model_index.json").read_text())["sdengine"]
    assert base_extra["captions"] == "templates" and base_extra["unet_pooled_from"] == 0
    assert "unet_continuations" not in base_extra
    moved_unet = load_file(str(tmp_path / "moved" / "model" / "unet" / WEIGHTS))
    assert any(not torch.equal(moved_unet[k], init_unet[k]) for k in init_unet)
    # resumable: more steps continue the checkpoint; the history holds one continuation of 3 steps
    more = train_emoji(tmp_path / "moved", _recipe(unet_lr=1e-3, unet_steps=3), **kw)
    assert more["unet"]["steps"] == 3
    extra = json.loads((tmp_path / "moved" / "model" / "model_index.json").read_text())["sdengine"]
    assert extra["unet_steps"] == 103 and [c["steps"] for c in extra["unet_continuations"]] == [3]
    # a run folder is continued only from the model it started from
    with pytest.raises(EmojiTrainError, match="was started from .*init: use another --out"):
        train_emoji(tmp_path / "moved", _recipe(unet_steps=4), **{**kw, "init_unet": None})
    with pytest.raises(EmojiTrainError, match="was started from a random U-Net"):
        train_emoji(tmp_path / "fresh", _recipe(unet_steps=4), **kw)


def test_init_unet_bad_folders_are_one_line_errors(tmp_path, init_folder):
    with pytest.raises(EmojiTrainError, match="no such model folder"):
        load_init_model(tmp_path / "missing")
    broken = tmp_path / "broken"
    shutil.copytree(init_folder, broken)
    (broken / "vae" / WEIGHTS).unlink()
    with pytest.raises(EmojiTrainError, match="not an emoji model folder \\(no vae/"):
        load_init_model(broken)
    index = json.loads((init_folder / "model_index.json").read_text())
    index["sdengine"]["held_out_subgroup"] = "animal-mammal"
    (init_folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(EmojiTrainError, match="held out 'animal-mammal'"):
        train_emoji(tmp_path / "run", _recipe(), device="cpu", progress=False, init_unet=init_folder)


def test_cli_bad_captions_and_missing_init_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "emoji", "--captions", "nope"])
    assert e.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    rc = main(["train", "emoji", "--init-unet", str(tmp_path / "missing"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("sdengine: error: --init-unet") and err.count("\n") == 1
    assert "no such model folder" in err and not (tmp_path / "run").exists()


def test_cldr_continuation_trains_on_ten_captions_per_emoji(tmp_path, small_dataset, init_folder):
    from sdengine.data.emoji_cldr import DEFAULT_ANNOTATIONS

    if not DEFAULT_ANNOTATIONS.is_file():
        pytest.skip(f"{DEFAULT_ANNOTATIONS} is absent: install the Debian package unicode-cldr-core")
    kw = dict(device="cpu", progress=False, dataset=small_dataset, init_unet=init_folder)
    summary = train_emoji(tmp_path / "run", _recipe(unet_steps=1, captions="cldr"), **kw)
    assert summary["captions_per_emoji"] == len(CAPTION_TEMPLATES) + CLDR_CAPTION_COUNT
    saved = torch.load(tmp_path / "run" / "text_states.pt", weights_only=True)
    assert saved["states"].shape[:2] == (len(CAPTION_TEMPLATES) + CLDR_CAPTION_COUNT, len(small_dataset.entries))
    extra = json.loads((tmp_path / "run" / "model" / "model_index.json").read_text())["sdengine"]
    assert extra["unet_continuations"][-1]["captions"] == "cldr"
    assert extra["unet_continuations"][-1]["cldr_captions_per_emoji"] == CLDR_CAPTION_COUNT
