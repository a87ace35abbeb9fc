"""A full difference (``diff``) on the q/k RMS norms of FLUX.1 and FLUX.2 transformers (their scale vectors).

LyCORIS itself never writes one (its wrapper targets Linear / Conv / GroupNorm / LayerNorm modules, and its base
module marks any other kind ``not_supported``), but ComfyUI reads a 1-d ``.diff`` on any weight it maps, the q/k
norms' scales among them (diffusers' ``attn.norm_q`` and BFL's ``img_attn.norm.query_norm``), and files with them
exist. Before, such a file was refused as "a LoRA for Flux.1" (no routes for norm layers). Now its names route onto
the norm modules in BFL's, diffusers' and LyCORIS' vocabularies, and the image equals the hand-computed W + diff's
(the norm weights changed in place), patched and fused; a ``diff_b`` there (RMSNorm has no bias) is one line.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _flux2_models import make_klein_folder  # noqa: E402
from _flux_models import make_flux_folder  # noqa: E402
from sdengine.weights.io import save_safetensors  # noqa: E402
from sdengine.weights.lora import LoRAFileError, apply_loras  # noqa: E402

W, H, STEPS, SEED, CFG = 32, 32, 2, 3, 3.0
WEIGHT = 0.8
TOL = 1e-4  # images, [0, 1]: float32 order of the patched term vs the changed weight (measured below 1e-6)


def _images(pipe, **kw) -> np.ndarray:
    args = dict(steps=STEPS, seed=SEED, width=W, height=H, progress=False)
    return pipe("a red apple", **{**args, **kw}).arrays


# (file name, module of sdengine's transformer): BFL's names (diffusion_model. / kohya), diffusers' (transformer.),
# LyCORIS' own wrapper on diffusers' transformer (lycoris_)
NAMES = [
    ("diffusion_model.double_blocks.0.img_attn.norm.query_norm", "transformer_blocks.0.attn.norm_q"),
    ("lora_unet_double_blocks_0_txt_attn_norm_key_norm", "transformer_blocks.0.attn.norm_added_k"),
    ("diffusion_model.single_blocks.0.norm.key_norm", "single_transformer_blocks.0.attn.norm_k"),
    ("transformer.transformer_blocks.0.attn.norm_k", "transformer_blocks.0.attn.norm_k"),
    ("lycoris_single_transformer_blocks_0_attn_norm_q", "single_transformer_blocks.0.attn.norm_q"),
]


def _check(pipe, tmp_path, **kw) -> float:
    gen = torch.Generator().manual_seed(11)
    diffs = {}
    for file_name, module in NAMES:
        n = pipe.transformer.get_submodule(module).weight.shape[0]
        diffs[file_name] = (torch.rand(n, generator=gen) * 0.8 - 0.4, module)
    path = tmp_path / "qk_norm_diff.safetensors"
    save_safetensors({f + ".diff": d for f, (d, _) in diffs.items()}, path)
    plain = _images(pipe, **kw)
    patched = _images(pipe, loras=[(path, WEIGHT)], **kw)
    with apply_loras(pipe.transformer, None, [(path, WEIGHT)], fuse=True):  # folded into the weights
        fused = _images(pipe, **kw)
    saved = {m: pipe.transformer.get_submodule(m).weight.detach().clone() for _, (_, m) in diffs.items()}
    try:
        with torch.no_grad():
            for d, m in diffs.values():
                pipe.transformer.get_submodule(m).weight.add_(WEIGHT * d)
        want = _images(pipe, **kw)
    finally:
        with torch.no_grad():
            for m, w in saved.items():
                pipe.transformer.get_submodule(m).weight.copy_(w)
    np.testing.assert_array_equal(_images(pipe, **kw), plain)  # nothing stays
    err = max(float(np.abs(patched - want).max()), float(np.abs(fused - want).max()))
    print(f"{type(pipe.transformer).__name__}: patched / fused vs W + diff: max {err:.2e}")
    assert err <= TOL
    assert float(np.abs(patched - plain).max()) > 1e-3  # the file acts
    bad = tmp_path / "bias.safetensors"
    save_safetensors({"diffusion_model.double_blocks.0.img_attn.norm.query_norm.diff_b": torch.ones(4)}, bad)
    with pytest.raises(LoRAFileError, match="a bias difference") as e:
        _images(pipe, loras=[(bad, 1.0)], **kw)
    assert "\n" not in str(e.value)
    return err


def test_flux1_qk_norm_diff_is_w_plus_diff(tmp_path):
    pipe = sdengine.load_pipeline(make_flux_folder(tmp_path / "tiny-flux", guidance=True, seed=2), device="cpu")
    _check(pipe, tmp_path)


def test_flux2_qk_norm_diff_is_w_plus_diff(tmp_path):
    pipe = sdengine.load_pipeline(make_klein_folder(tmp_path / "klein-tiny", seed=5), device="cpu")
    _check(pipe, tmp_path, negative_prompt="", cfg_scale=CFG)


def test_chroma_qk_norm_diff_is_w_plus_diff(tmp_path):
    """Chroma's blocks are Flux's (the same q/k norm names)."""
    from _chroma_models import make_chroma_folder

    pipe = sdengine.load_pipeline(make_chroma_folder(tmp_path / "tiny-chroma", seed=4), device="cpu")
    _check(pipe, tmp_path, negative_prompt="", cfg_scale=CFG)
