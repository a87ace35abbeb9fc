"""Loading folders and files that point elsewhere or carry broken JSON: refused with a WeightsError naming
the file, and nothing outside the model folder is ever read."""

from __future__ import annotations

import json
import os

import pytest
import torch

from sdengine.weights import io
from sdengine.weights import loading as ld

INDEX = "diffusion_pytorch_model.safetensors.index.json"


def _vae_folder(root):
    sub = root / "model" / "vae"
    sub.mkdir(parents=True)
    (sub / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    return sub


def _outside(root):
    p = root / "outside.safetensors"
    io.save_safetensors({"encoder.conv_in.weight": torch.ones(2)}, p)
    return p


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "encoded"])
def test_shard_index_cannot_leave_the_folder(tmp_path, monkeypatch, how):
    outside = _outside(tmp_path)
    sub = _vae_folder(tmp_path)
    name = {
        "dotdot": "../../outside.safetensors",
        "absolute": str(outside),
        "symlink": "link.safetensors",
        "encoded": "..%2f..%2foutside.safetensors",
    }[how]
    if how == "symlink":
        os.symlink(outside, sub / "link.safetensors")
    (sub / INDEX).write_text(json.dumps({"weight_map": {"encoder.conv_in.weight": name}}))
    read = []
    real = io.load_file
    monkeypatch.setattr(ld, "load_file", lambda p: read.append(p) or real(p))
    with pytest.raises(io.WeightsError, match=r"index\.json.*outside|index\.json.*not allowed") as e:
        ld.load_vae(sub)
    assert "\n" not in str(e.value)
    assert read == []  # refused before any shard was opened


@pytest.mark.parametrize(
    "text,match",
    [
        ("{not json", "cannot read"),
        ('{"weight_map": ["a.safetensors"]}', "weight_map"),
        ('{"metadata": {}}', "weight_map"),
        ('{"weight_map": {"a": 5}}', "weight_map"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_bad_shard_index_names_the_file(tmp_path, text, match):
    sub = _vae_folder(tmp_path)
    (sub / INDEX).write_text(text)
    with pytest.raises(io.WeightsError, match=match) as e:
        ld.load_vae(sub)
    assert INDEX in str(e.value) and "\n" not in str(e.value)


def test_missing_shard_is_named(tmp_path):
    sub = _vae_folder(tmp_path)
    (sub / INDEX).write_text(json.dumps({"weight_map": {"a": "part-1.safetensors"}}))
    with pytest.raises(io.WeightsError, match="part-1.safetensors.*not found"):
        ld.load_vae(sub)


def test_shards_inside_the_folder_still_load(tmp_path):
    sub = _vae_folder(tmp_path)
    (sub / "shards").mkdir()
    io.save_safetensors({"a": torch.ones(2)}, sub / "shards" / "p1.safetensors")
    io.save_safetensors({"b": torch.zeros(3)}, sub / "p2.safetensors")
    (sub / INDEX).write_text(json.dumps({"weight_map": {"a": "shards/p1.safetensors", "b": "p2.safetensors"}}))
    sd, cfg = ld.load_vae(sub)
    assert cfg["_class_name"] == "AutoencoderKL"
    assert torch.equal(sd["a"], torch.ones(2)) and torch.equal(sd["b"], torch.zeros(3))


def test_bad_config_json_in_file_metadata_names_the_file(tmp_path):
    p = tmp_path / "m.safetensors"
    io.save_safetensors({"x": torch.ones(1)}, p, metadata={ld.CONFIG_METADATA_KEY: "{broken"})
    with pytest.raises(io.WeightsError, match=r"m\.safetensors.*sdengine\.configs") as e:
        ld.load_single_file(p)
    assert "\n" not in str(e.value)


def test_bad_config_folder_json_names_the_file(tmp_path):
    p = tmp_path / "m.safetensors"
    io.save_safetensors({"x": torch.ones(1)}, p)
    cfg = tmp_path / "cfg"
    (cfg / "unet").mkdir(parents=True)
    (cfg / "unet" / "config.json").write_text("{oops")
    with pytest.raises(io.WeightsError, match=r"unet/config\.json"):
        ld.load_single_file(p, config=cfg)
