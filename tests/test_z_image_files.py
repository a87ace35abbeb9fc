"""Z-Image transformer files: diffusers folders (sharded), the original / ComfyUI single-file layout (checked
against diffusers' own single-file conversion), diffusers' names in one file; wrong files refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from _z_image_models import Z_TRANSFORMER, z_transformer
from sdengine.weights.io import WeightsError
from sdengine.weights.z_image_file import is_z_image_state_dict, load_z_image_transformer


def original_layout(sd: dict[str, torch.Tensor], prefix: str = "model.diffusion_model.") -> dict[str, torch.Tensor]:
    """diffusers' names -> the original Z-Image / ComfyUI names (q, k, v fused into qkv)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if ".attention.to_k." in k or ".attention.to_v." in k:
            continue
        if ".attention.to_q." in k:
            base = k.split(".attention.to_q.")[0]
            out[f"{base}.attention.qkv.weight"] = torch.cat(
                [sd[f"{base}.attention.to_{n}.weight"] for n in ("q", "k", "v")]
            )
            continue
        k = k.replace("all_x_embedder.2-1.", "x_embedder.").replace("all_final_layer.2-1.", "final_layer.")
        k = k.replace(".attention.to_out.0.", ".attention.out.")
        k = k.replace(".attention.norm_q.", ".attention.q_norm.").replace(".attention.norm_k.", ".attention.k_norm.")
        out[k] = v.clone().contiguous()
    return {prefix + k: v for k, v in out.items()}


def _inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randn(1, 16, 6, 8, generator=g), torch.tensor([0.4]), torch.randn(1, 9, 48, generator=g)


@pytest.fixture(scope="module")
def ref():
    # 128-wide heads (the release's; a single file's config assumes them): one head, RoPE 32 + 48 + 48
    return z_transformer(seed=4, dim=128, n_heads=1, n_kv_heads=1, axes_dims=[32, 48, 48])


def _ref_out(ref, x, t, cap):
    with torch.no_grad():
        return ref([x[0].unsqueeze(1)], t, [cap[0]], return_dict=False)[0][0].squeeze(1)


def test_sharded_folder_loads(tmp_path: Path, ref) -> None:
    ref.save_pretrained(tmp_path / "transformer", max_shard_size="100KB")
    assert len(list((tmp_path / "transformer").glob("*.safetensors"))) > 1  # really sharded
    model = load_z_image_transformer(tmp_path)
    x, t, cap = _inputs()
    with torch.no_grad():
        got = model(x, t, cap)
    assert (got[0] - _ref_out(ref, x, t, cap)).abs().max().item() < 5e-6
    assert model.config.n_layers == Z_TRANSFORMER["n_layers"]


def test_original_single_file_loads(tmp_path: Path, ref) -> None:
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    orig = original_layout(ref.state_dict())
    orig["model.diffusion_model.norm_final.weight"] = torch.ones(128)  # unused; dropped as diffusers drops it
    orig["vae.decoder.conv_in.weight"] = torch.zeros(1)  # a bundled part beside it is left unread
    # the layout written here is the one diffusers' own conversion reads
    back = convert_z_image_transformer_checkpoint_to_diffusers({k: v for k, v in orig.items() if "vae." not in k})
    want = ref.state_dict()
    assert back.keys() == want.keys() and all(torch.equal(back[k], want[k]) for k in want)
    assert is_z_image_state_dict(orig)
    save_file(orig, tmp_path / "z_image_turbo_bf16.safetensors")
    model = load_z_image_transformer(tmp_path / "z_image_turbo_bf16.safetensors")
    assert model.config.dim == 128 and model.config.n_refiner_layers == 2 and model.config.cap_feat_dim == 48
    assert model.config.axes_lens == (1536, 512, 512)  # the release's, not in the shapes
    ours = model.state_dict()
    assert ours.keys() == want.keys() and all(torch.equal(ours[k], want[k]) for k in want)
    # diffusers' names in one file, no prefix: the same weights
    save_file({k: v.contiguous() for k, v in want.items()}, tmp_path / "diffusers_names.safetensors")
    same = load_z_image_transformer(tmp_path / "diffusers_names.safetensors").state_dict()
    assert all(torch.equal(same[k], want[k]) for k in want)


def test_wrong_files_are_refused(tmp_path: Path, ref) -> None:
    sd = {k: v.clone().contiguous() for k, v in ref.state_dict().items()}
    bad = dict(sd)
    bad["layers.1.feed_forward.w1.weight"] = torch.zeros(3, 128)
    save_file(bad, tmp_path / "bad_shape.safetensors")
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)}, tmp_path / "flux.safetensors")
    short = {k: v for k, v in sd.items() if not k.startswith("layers.1.feed_forward.w2")}
    save_file(short, tmp_path / "short.safetensors")
    for name, why in (
        ("bad_shape.safetensors", "w1"),
        ("flux.safetensors", "not a Z-Image transformer"),
        ("short.safetensors", "w2"),
    ):
        with pytest.raises(WeightsError, match=why) as e:
            load_z_image_transformer(tmp_path / name)
        assert "\n" not in str(e.value)
    folder = tmp_path / "folder" / "transformer"
    ref.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "n_layers": 3}))
    with pytest.raises(WeightsError, match="layers.2") as e:
        load_z_image_transformer(folder.parent)
    assert "\n" not in str(e.value)
    (folder / "config.json").write_text(json.dumps({**cfg, "cap_feat_dim": 40}))
    with pytest.raises(WeightsError, match="cap_feat_dim=40"):
        load_z_image_transformer(folder.parent)


def test_comfyui_files_give_the_folders_image(tmp_path: Path) -> None:
    """ComfyUI's three files (diffusion model in the original layout, Qwen3 as one file with its tokenizer folder
    beside it, the VAE as one file) load through ``load_pipeline`` and give the folder's image."""
    import shutil

    import numpy as np
    from safetensors.torch import load_file

    import sdengine
    from _z_image_models import make_z_folder
    from sdengine.errors import GenerationError

    folder = make_z_folder(tmp_path / "z", wide_heads=True)
    files = tmp_path / "comfy"
    (files / "text_encoders").mkdir(parents=True)
    (files / "vae").mkdir()
    (files / "diffusion_models").mkdir()
    transformer = load_file(next((folder / "transformer").glob("*.safetensors")))
    model_file = files / "diffusion_models" / "z_image_turbo_bf16.safetensors"
    save_file(original_layout(transformer), model_file)
    te_file = files / "text_encoders" / "qwen_3_tiny.safetensors"
    save_file(load_file(next((folder / "text_encoder").glob("*.safetensors"))), te_file)
    shutil.copytree(folder / "tokenizer", files / "text_encoders" / "qwen25_tokenizer")
    vae_file = files / "vae" / "ae.safetensors"
    save_file(load_file(next((folder / "vae").glob("*.safetensors"))), vae_file)

    run = {"prompt": "a red apple", "negative_prompt": "blurry", "cfg_scale": 2.5, "steps": 2, "seed": 3,
           "width": 32, "height": 32, "progress": False}  # fmt: skip
    want = sdengine.load_pipeline(folder, device="cpu")(**run).arrays
    pipe = sdengine.load_pipeline(model_file, device="cpu", qwen_text=te_file, vae=vae_file)
    assert pipe.variant == "z_image" and pipe.name == "z_image_turbo_bf16"
    got = pipe(**run).arrays
    assert np.abs(got - want).max() < 1e-6
    with pytest.raises(GenerationError, match="holds no Qwen3 text encoder: give it with --qwen-text") as e:
        sdengine.load_pipeline(model_file, device="cpu", vae=vae_file)
    assert "\n" not in str(e.value)
    with pytest.raises(GenerationError, match="holds no VAE: give it with --vae"):
        sdengine.load_pipeline(model_file, device="cpu", qwen_text=te_file)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from _z_image_models import QWEN3_TEXT

    narrow = Qwen3ForCausalLM(Qwen3Config(**{**QWEN3_TEXT, "hidden_size": 32}, vocab_size=400))
    other_te = files / "text_encoders" / "qwen_3_narrow.safetensors"
    save_file({k: v.contiguous() for k, v in narrow.state_dict().items()}, other_te)
    with pytest.raises(GenerationError, match="a 32-wide text encoder, but the Z-Image transformer reads 48-wide"):
        sdengine.load_pipeline(model_file, device="cpu", qwen_text=other_te, vae=vae_file)
