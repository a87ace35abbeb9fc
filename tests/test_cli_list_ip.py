"""``sdengine list clip-vision|ip-adapters``: the files of ``--clip-vision-dir`` / ``--ip-adapters-dir`` by the names
the server lists them by, with what their shapes say (an encoder's width, layers, projection; an adapter's kind and
the CLIP width it reads), in ``list``'s ``--json`` shape; tiny random adapters and encoders (tests/_ip_models.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import sdengine
from _ip_models import random_adapter, random_encoder
from sdengine.cli import main
from sdengine.weights.ip_adapter_file import save_ip_adapter

safetensors_torch = pytest.importorskip("safetensors.torch")

EMBED, HIDDEN = 16, 64  # the plain adapter's image embedding width, Plus's / full's hidden width


def _json(capsys, *args: str) -> list[dict]:
    assert main(["list", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def folders(tiny_sd1_folder, tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("list_ip")
    cv, ipa = tmp / "clip_vision", tmp / "ipadapter"
    (cv / "sub").mkdir(parents=True)
    (ipa / "sd15").mkdir(parents=True)
    unet = sdengine.load_pipeline(tiny_sd1_folder, device="cpu").unet
    small = dict(width=64, depth=2, heads=1, queries=4)
    save_ip_adapter(random_adapter(unet, "plain", EMBED, 1, **small), ipa / "plain.safetensors")
    save_ip_adapter(random_adapter(unet, "plus", HIDDEN, 2, **small), ipa / "sd15" / "plus.safetensors")
    save_ip_adapter(random_adapter(unet, "full", 48, 3, **small), ipa / "full.bin")  # the release's pickle layout
    (ipa / "broken.safetensors").write_bytes(b"not a safetensors file")
    (ipa / "notes.txt").write_text("not an adapter")
    for path, enc in (
        (cv / "tiny.safetensors", random_encoder(HIDDEN, EMBED, 0, layers=2, heads=1, intermediate=40)),
        (cv / "sub" / "wide.safetensors", random_encoder(128, 24, 1, layers=3, heads=2, intermediate=40)),
    ):
        safetensors_torch.save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(path))
    return cv, ipa


def test_ip_adapters_list_their_kind_and_the_width_they_read(folders, capsys):
    _, ipa = folders
    rows = _json(capsys, "ip-adapters", "--ip-adapters-dir", str(ipa))
    by = {r["name"]: r for r in rows}
    assert list(by) == ["broken.safetensors", "full.bin", "plain.safetensors", "sd15/plus.safetensors"]
    for r in rows:  # the other kinds' shape, and this kind's fields
        assert set(r) == {"name", "kind", "source", "path", "detail", "adapter_kind", "reads_width", "error"}, r
        assert r["kind"] == "ip-adapters" and r["source"] == str(ipa) and Path(r["path"]).is_file()
    assert (by["plain.safetensors"]["adapter_kind"], by["plain.safetensors"]["reads_width"]) == ("plain", EMBED)
    assert (by["sd15/plus.safetensors"]["adapter_kind"], by["sd15/plus.safetensors"]["reads_width"]) == ("plus", 64)
    assert (by["full.bin"]["adapter_kind"], by["full.bin"]["reads_width"]) == ("full", 48)
    assert by["plain.safetensors"]["detail"].startswith("IP-Adapter, reads CLIP image embedding of width 16")
    assert all(by[n]["error"] is None for n in ("full.bin", "plain.safetensors", "sd15/plus.safetensors"))
    broken = by["broken.safetensors"]
    assert broken["adapter_kind"] is None and broken["error"] and "\n" not in broken["error"]
    assert main(["list", "ip-adapters", "--ip-adapters-dir", str(ipa)]) == 0  # the table, the broken one said
    out = capsys.readouterr()
    assert "IP-Adapter Plus, reads CLIP hidden states of width 64" in out.out and "unreadable: " in out.out
    assert "1 file(s) could not be read" in out.err


def test_clip_vision_encoders_list_width_layers_and_projection(folders, capsys):
    cv, _ = folders
    rows = _json(capsys, "clip-vision", "--clip-vision-dir", str(cv))
    assert [(r["name"], r["width"], r["layers"], r["projection"]) for r in rows] == [
        ("sub/wide.safetensors", 128, 3, 24),
        ("tiny.safetensors", HIDDEN, 2, EMBED),
    ]
    for r in rows:
        assert set(r) == {"name", "kind", "source", "path", "detail", "width", "layers", "projection", "error"}, r
        assert r["kind"] == "clip-vision" and r["error"] is None
    assert rows[1]["detail"].startswith("CLIP vision, width 64, 2 layers, projection 16")


def test_an_encoder_folder_and_no_projection(tmp_path, capsys):
    """A diffusers image_encoder folder (config.json beside its weights) is one entry; a tower without a
    projection says so (projection null)."""
    enc = random_encoder(HIDDEN, EMBED, 0, layers=1, heads=1, intermediate=40)
    folder = tmp_path / "image_encoder"
    enc.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in enc.state_dict().items() if not k.startswith("visual_projection")}
    safetensors_torch.save_file(state, str(tmp_path / "tower.safetensors"))
    rows = _json(capsys, "clip-vision", "--clip-vision-dir", str(tmp_path))
    assert [(r["name"], r["width"], r["layers"], r["projection"]) for r in rows] == [
        ("image_encoder", HIDDEN, 1, EMBED),
        ("tower.safetensors", HIDDEN, 1, None),
    ]
    assert "no projection" in rows[1]["detail"] and rows[0]["detail"].endswith("folder")


def _refused(capsys, *args: str) -> str:
    rc = main(["list", *args])
    out = capsys.readouterr()
    assert rc == 2 and out.out == "" and out.err.count("\n") == 1, out
    return out.err


def test_bad_folders_and_flags_are_one_line(tmp_path, folders, capsys):
    cv, ipa = folders
    assert "IP-Adapters folder" in _refused(capsys, "ip-adapters", "--ip-adapters-dir", str(tmp_path / "nope"))
    err = _refused(capsys, "ip-adapters", "--ip-adapters-dir", str(ipa), "--clip-vision-dir", str(cv))
    assert "--clip-vision-dir is where CLIP vision encoders are: it changes nothing in 'list ip-adapters'" in err
    assert "did you mean 'sdengine list clip-vision --clip-vision-dir DIR'?" in err
    err = _refused(capsys, "models", "--ip-adapters-dir", str(ipa))
    assert "--ip-adapters-dir is where IP-Adapters are: it changes nothing in 'list models'" in err
    assert _json(capsys, "clip-vision") == []  # no folder given: nothing, and the flag named
    assert main(["list", "clip-vision"]) == 0
    assert "give --clip-vision-dir FOLDER" in capsys.readouterr().err
