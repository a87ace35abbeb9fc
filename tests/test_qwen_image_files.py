"""Qwen-Image from ComfyUI's three files: the diffusion-model file (``diffusion_models/qwen_image_*.safetensors``,
diffusers' names behind ``model.diffusion_model.``), the Qwen2.5-VL text encoder (``text_encoders/``) and the VAE
(``vae/qwen_image_vae.safetensors``, the original Wan names), written from a tiny random diffusers folder with the
releases' 128-wide heads (a single file's config comes from its shapes). Loaded with ``--qwen-text`` / ``--vae`` /
``--qwen-tokenizer`` they give the folder's image exactly; what is missing or does not apply is one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from _qwen_models import make_qwen_folder
from sdengine.errors import GenerationError

SIZE = 32
SETTINGS = dict(prompt="a red apple on a table", negative_prompt="blurry", cfg_scale=3.0, steps=2, seed=5,
                width=SIZE, height=SIZE, progress=False)  # fmt: skip


def write_comfy_files(folder: Path, root: Path) -> dict[str, Path]:
    """ComfyUI's release layout from a diffusers folder: models/diffusion_models, text_encoders (its tokenizer folder
    beside it in ComfyUI's qwen25_tokenizer layout: vocab.json + merges.txt), vae."""
    from sdengine.weights.qwen_vae_file import diffusers_to_original

    files = {
        "model": root / "diffusion_models" / "qwen_image_tiny.safetensors",
        "text": root / "text_encoders" / "qwen_2.5_vl_tiny.safetensors",
        "vae": root / "vae" / "qwen_image_vae.safetensors",
    }
    for f in files.values():
        f.parent.mkdir(parents=True, exist_ok=True)
    sd = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    save_file({"model.diffusion_model." + k: v for k, v in sd.items()}, str(files["model"]))
    shutil.copy(folder / "text_encoder" / "model.safetensors", files["text"])  # model.layers.*, visual.*, lm_head
    vae = load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    save_file({k: v.contiguous() for k, v in diffusers_to_original(vae).items()}, str(files["vae"]))
    files["tokenizer"] = write_comfy_tokenizer(folder / "tokenizer", root / "text_encoders" / "qwen25_tokenizer")
    return files


def write_comfy_tokenizer(src: Path, dst: Path) -> Path:
    """A tokenizer folder as ComfyUI ships Qwen2's (comfy/text_encoders/qwen25_tokenizer): ``vocab.json`` +
    ``merges.txt`` + ``tokenizer_config.json`` with ``added_tokens_decoder``, no ``tokenizer.json``."""
    import json

    full = json.loads((src / "tokenizer.json").read_text())
    config = json.loads((src / "tokenizer_config.json").read_text())
    dst.mkdir(parents=True)
    (dst / "vocab.json").write_text(json.dumps(full["model"]["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in full["model"]["merges"]]
    (dst / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    added = {str(t["id"]): {"content": t["content"], "special": t["special"]} for t in full["added_tokens"]}
    (dst / "tokenizer_config.json").write_text(json.dumps({**config, "added_tokens_decoder": added}))
    return dst


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("qwen_files")
    folder = make_qwen_folder(root / "qwen-tiny", wide_heads=True)
    return folder, write_comfy_files(folder, root / "models")


def test_comfy_files_give_the_folders_image(made) -> None:
    import sdengine

    folder, files = made
    want = sdengine.load_pipeline(folder, device="cpu")(**SETTINGS)
    pipe = sdengine.load_pipeline(files["model"], device="cpu", qwen_text=files["text"], vae=files["vae"],
                                  qwen_tokenizer=files["tokenizer"])  # fmt: skip
    assert pipe.name == "qwen_image_tiny" and pipe.family_defaults["steps"] == 50
    got = pipe(**SETTINGS)
    assert np.array_equal(got.arrays, want.arrays)
    assert got.parameters["cfg_scale"] == 3.0
    # the tokenizer found beside the text encoder file (text_encoders/qwen25_tokenizer), as ComfyUI keeps it
    beside = sdengine.load_pipeline(files["model"], device="cpu", qwen_text=files["text"], vae=files["vae"])
    assert np.array_equal(beside(**SETTINGS).arrays, want.arrays)


def test_cli_with_the_files(made, tmp_path: Path) -> None:
    from PIL import Image

    import sdengine
    from sdengine.cli import main

    folder, files = made
    out = tmp_path / "a.png"
    args = ["generate", "--model", str(files["model"]), "--qwen-text", str(files["text"]), "--vae", str(files["vae"]),
            "--qwen-tokenizer", str(files["tokenizer"]), "a cat", "--steps", "2", "--seed", "3", "--width", str(SIZE),
            "--height", str(SIZE), "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    want = sdengine.load_pipeline(folder, device="cpu")("a cat", steps=2, seed=3, width=SIZE, height=SIZE,
                                                        progress=False)  # fmt: skip
    got = np.asarray(Image.open(out), dtype=np.float32) / 255
    assert np.abs(got - want.arrays[0]).max() <= 1 / 255 + 1e-6


def test_missing_parts_and_wrong_flags_are_one_line(made, tmp_path: Path) -> None:
    import sdengine

    folder, files = made
    load = sdengine.load_pipeline
    with pytest.raises(GenerationError, match="holds no Qwen2.5-VL text encoder: give it with --qwen-text"):
        load(files["model"], device="cpu", vae=files["vae"])
    with pytest.raises(GenerationError, match="holds no VAE: give it with --vae"):
        load(files["model"], device="cpu", qwen_text=files["text"])
    lone = tmp_path / "lone.safetensors"  # a text encoder file with no tokenizer folder beside it
    shutil.copy(files["text"], lone)
    with pytest.raises(GenerationError, match="holds no Qwen2 tokenizer .*--qwen-tokenizer"):
        load(files["model"], device="cpu", qwen_text=lone, vae=files["vae"])
    with pytest.raises(GenerationError, match="--qwen-text .*: no such file"):
        load(files["model"], device="cpu", qwen_text=tmp_path / "nope.safetensors", vae=files["vae"])
    with pytest.raises(GenerationError, match="--clip-l / --clip-g / --t5 do not apply"):
        load(files["model"], device="cpu", qwen_text=files["text"], vae=files["vae"], t5=files["text"])
    with pytest.raises(GenerationError, match="--qwen-text give a Qwen-Image model's parts; this is not one"):
        load(files["vae"], device="cpu", qwen_text=files["text"])
    # a text encoder file that is not one: the loader's one line
    with pytest.raises(GenerationError, match="not a Qwen2.5-VL / Qwen3 language model"):
        load(files["model"], device="cpu", qwen_text=files["vae"], vae=files["vae"], qwen_tokenizer=files["tokenizer"])
    # a LoRA for the transformer is not the transformer
    from sdengine.pipeline.qwen_image_loading import is_qwen_image_state_dict

    assert not is_qwen_image_state_dict(["img_in.lora_A.weight", "txt_in.weight", "txt_norm.weight", "img_in.weight"])
    assert is_qwen_image_state_dict(["model.diffusion_model." + k for k in ("img_in.weight", "txt_in.weight",
                                                                            "txt_norm.weight")])  # fmt: skip


def test_folder_with_a_text_encoder_given_apart(made) -> None:
    """--qwen-text on a folder replaces its text encoder; the folder's tokenizer is kept."""
    import sdengine

    folder, files = made
    want = sdengine.load_pipeline(folder, device="cpu")(**SETTINGS)
    other = sdengine.load_pipeline(folder, device="cpu", qwen_text=files["text"])
    assert np.array_equal(other(**SETTINGS).arrays, want.arrays)


def test_comfy_unet_loader_refuses_a_qwen_file_in_one_line(made, tmp_path: Path) -> None:
    """ComfyUI's graph route runs Qwen-Image (tests/test_comfy_qwen_image.py): UNETLoader loads the file (family
    qwen_image); a Qwen-Image file with a tensor missing is refused in one line naming it."""
    from types import SimpleNamespace

    from sdengine.server.catalog import Catalog
    from sdengine.server.comfy.nodes import NodeError
    from sdengine.server.comfy.nodes_sd3_flux import forget_parts, unet_loader

    _, files = made
    forget_parts()
    ctx = SimpleNamespace(catalog=Catalog(files["model"].parent.parent, None, None), device="cpu")
    (handle,) = unet_loader(ctx, files["model"].name, "default")  # type: ignore[arg-type]
    assert handle.diffusion_model == str(files["model"])  # loaded (a file of no family is a node error)
    sd = load_file(str(files["model"]))
    sd.pop("model.diffusion_model.proj_out.weight")
    (tmp_path / "diffusion_models").mkdir()
    save_file(sd, str(tmp_path / "diffusion_models" / "qwen_image_broken.safetensors"))
    forget_parts()
    ctx = SimpleNamespace(catalog=Catalog(tmp_path, None, None), device="cpu")
    with pytest.raises(NodeError, match="qwen_image_broken.safetensors: .*proj_out.weight") as e:
        unet_loader(ctx, "qwen_image_broken.safetensors", "default")  # type: ignore[arg-type]
    assert "\n" not in str(e.value)
    forget_parts()
