"""The model files users bring, in the layouts diffusers, transformers and A1111 write them: each loads, with
the oracle's tensors, and a broken variant is a one-line error."""

from __future__ import annotations

import torch

from sdengine.weights import load_checkpoint


def test_fp16_sharded_variant_folder_loads(tmp_path, tiny_sd1_folder):
    # diffusers' save_pretrained(variant="fp16", max_shard_size=...) names the index
    # `diffusion_pytorch_model.safetensors.index.fp16.json` (transformers: `model.safetensors.index.fp16.json`)
    from _pipeline_models import diffusers_pipeline

    dst = tmp_path / "fp16-sharded"
    diffusers_pipeline(tiny_sd1_folder).to(torch.float16).save_pretrained(dst, variant="fp16", max_shard_size="20KB")
    assert (dst / "unet" / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    assert (dst / "text_encoder" / "model.safetensors.index.fp16.json").is_file()
    got = load_checkpoint(dst)
    want = load_checkpoint(tiny_sd1_folder)
    for comp in ("unet", "vae", "text_encoder"):
        assert got.state_dicts[comp].keys() == want.state_dicts[comp].keys(), comp
        for k, v in want.state_dicts[comp].items():
            assert got.state_dicts[comp][k].dtype == torch.float16
            assert torch.equal(got.state_dicts[comp][k], v.half()), (comp, k)
