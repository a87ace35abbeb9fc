"""FLUX.1 Redux's parts: the SigLIP vision encoder against transformers' ``SiglipVisionModel`` on tiny random
weights, SigLIP's preprocessing against ``SiglipImageProcessor``, the Redux image encoder against diffusers'
``ReduxImageEncoder``, their files in every accepted layout and one-line errors for the others."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdengine.errors import UsageError
from sdengine.models.siglip_vision import SiglipVisionConfig, SiglipVisionModel, siglip_image_tensor
from sdengine.weights.io import WeightsError
from sdengine.weights.redux_file import is_siglip_state, load_redux, load_siglip_vision, siglip_from_state

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

TOL = 1e-5


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g) / (p.shape[-1] if p.ndim else 1) ** 0.25)


def hf_siglip(seed: int = 0, *, hidden: int = 32, layers: int = 2, image: int = 16, patch: int = 4, heads: int = 4):
    cfg = transformers.SiglipVisionConfig(
        hidden_size=hidden,
        intermediate_size=40,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        patch_size=patch,
        image_size=image,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.SiglipVisionModel(cfg).eval()
    _randomize(model, seed + 1)
    return model


def test_siglip_matches_transformers(tmp_path):
    hf = hf_siglip()
    path = tmp_path / "sigclip.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(path))
    with pytest.raises(WeightsError, match="head count of a 32-wide SigLIP"):
        load_siglip_vision(path)
    ours = load_siglip_vision(path, num_heads=4)
    assert ours.config == SiglipVisionConfig(
        hidden_size=32, intermediate_size=40, num_layers=2, num_heads=4, patch_size=4, image_size=16
    )
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf(pixel_values=x).last_hidden_state
        got = ours(x)
    assert got.shape == (2, 16, 32)
    assert (got - want).abs().max().item() <= TOL


def test_siglip_folder_and_prefixless_file(tmp_path):
    hf = hf_siglip(seed=5)
    folder = tmp_path / "image_encoder"
    hf.save_pretrained(folder)
    ours = load_siglip_vision(folder)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(pixel_values=x).last_hidden_state
        assert (ours(x) - want).abs().max().item() <= TOL
        plain = {k.removeprefix("vision_model."): v for k, v in hf.state_dict().items()}
        assert (siglip_from_state(plain, num_heads=4)(x) - want).abs().max().item() <= TOL


def test_siglip_preprocessing_matches_processor():
    proc = transformers.SiglipImageProcessor(size={"height": 384, "width": 384})  # Redux's preprocessor_config
    rng = np.random.default_rng(0)
    pics = [
        Image.fromarray(rng.integers(0, 256, (61, 97, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (500, 300, 4), dtype=np.uint8), "RGBA"),
        Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8), "L"),
    ]
    want = proc(images=pics, return_tensors="pt", do_convert_rgb=True).pixel_values
    got = siglip_image_tensor(pics)
    assert got.shape == want.shape == (3, 3, 384, 384)
    assert (got - want).abs().max().item() <= 1e-6


def test_redux_matches_diffusers_in_both_layouts(tmp_path):
    torch.manual_seed(0)
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder

    ref = ReduxImageEncoder(redux_dim=32, txt_in_features=24).eval()
    _randomize(ref, 2)
    folder = tmp_path / "image_embedder"
    ref.save_pretrained(folder)
    single = tmp_path / "flux1-redux-dev.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(single))
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = ref(x).image_embeds
        for src in (folder, single):
            got = load_redux(src)(x)
            assert got.shape == (2, 5, 24)
            assert (got - want).abs().max().item() <= 1e-6


def test_refusals(tmp_path):
    clip = transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=4,
            patch_size=4,
            image_size=16,
        )
    )
    clip_file = tmp_path / "clip_vision.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(clip_file))
    with pytest.raises(WeightsError, match="a CLIP vision encoder .*not SigLIP"):
        load_siglip_vision(clip_file)
    assert not is_siglip_state(clip.state_dict())
    hf = hf_siglip()
    assert is_siglip_state(hf.state_dict())
    sig_file = tmp_path / "sig.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(sig_file))
    with pytest.raises(WeightsError, match="a vision encoder, not a FLUX.1 Redux file"):
        load_redux(sig_file)
    redux_file = tmp_path / "redux.safetensors"
    safetensors_torch.save_file(
        {"redux_up.weight": torch.zeros(9, 4), "redux_up.bias": torch.zeros(9), "redux_down.weight": torch.zeros(3, 9)},
        str(redux_file),
    )
    with pytest.raises(WeightsError, match="without redux_down.bias"):
        load_redux(redux_file)
    with pytest.raises(WeightsError, match="a FLUX.1 Redux .*not a SigLIP"):
        load_siglip_vision(redux_file)
    bad = tmp_path / "bad.safetensors"
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    sd["encoder.layers.1.mlp.fc2.weight"] = torch.zeros(32, 41)
    safetensors_torch.save_file(sd, str(bad))
    with pytest.raises(WeightsError, match=r"fc2.weight is \(32, 41\), expected \(32, 40\)"):
        load_siglip_vision(bad, num_heads=4)
    folder = tmp_path / "enc"
    hf.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, model_type="clip_vision_model")))
    with pytest.raises(WeightsError, match="not a SigLIP vision config"):
        load_siglip_vision(folder)
    model = SiglipVisionModel(
        SiglipVisionConfig(hidden_size=32, intermediate_size=40, num_layers=1, num_heads=4, patch_size=4, image_size=16)
    )
    with pytest.raises(UsageError, match=r"pixel values of shape \(B, 3, 16, 16\)"):
        model(torch.zeros(1, 3, 32, 32))
