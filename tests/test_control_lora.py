"""Control-LoRA (Stability's ``control-lora-*-rank*.safetensors``): a file of original ControlNet names with full
tensors (hint encoder, zero convolutions, norms) and ``up``/``down`` pairs against the base U-Net, marked by
``lora_controlnet``, as ComfyUI's ControlLora reads it. Checked against a ControlNet built by hand from the same
parts on a tiny SDXL model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import _pipeline_models as _models
import sdengine
from _sdxl_models import make_sdxl_folder
from sdengine import control as C
from sdengine.errors import ControlNetError
from sdengine.models.controlnet import ControlNet, ControlNetConfig
from sdengine.models.unet import TINY_SD, UNet
from sdengine.models.unet_sdxl import TINY_SDXL
from sdengine.weights import controlnet_keys as ck
from sdengine.weights.io import save_safetensors

HINT = (16, 32)


def _parts(unet, seed: int = 0):
    """(the hand-built ControlNet's state dict, the file's tensors by original names)."""
    base = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    cfg = ControlNetConfig.from_unet(unet.config, conditioning_embedding_out_channels=HINT)
    g = torch.Generator().manual_seed(seed)
    shapes = {k: v.shape for k, v in ControlNet(cfg).state_dict().items()}
    expected, full, ups, downs = {}, {}, {}, {}
    for i, (k, shape) in enumerate(sorted(shapes.items())):
        if k.startswith(("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")) or (
            "norm" in k and i % 3 == 0
        ):
            full[k] = torch.randn(shape, generator=g) * 0.1  # replaced outright
            expected[k] = full[k]
        elif k.endswith(".weight") and len(shape) >= 2 and i % 2 == 0:
            rank = 2
            up = torch.randn((shape[0], rank, *([1] * (len(shape) - 2))), generator=g) * 0.1
            down = torch.randn((rank, *shape[1:]), generator=g) * 0.1
            layer = k.removesuffix(".weight")
            ups[f"{layer}.up"], downs[f"{layer}.down"] = up, down
            expected[k] = base[k] + (up.flatten(1) @ down.flatten(1)).reshape(shape)
        else:
            expected[k] = base[k]
    layout = C.controlnet_layout(cfg)
    named, bad = ck.controlnet_diffusers_to_original({**full, **ups, **downs}, layout, len(HINT), sdxl=True)
    assert not bad and ups and downs
    return cfg, expected, {**named, "lora_controlnet": torch.zeros(1)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("control-lora")
    torch.manual_seed(0)
    unet = UNet(TINY_SDXL).eval()
    cfg, expected, tensors = _parts(unet)
    save_safetensors(tensors, root / "control-lora-canny-rank2.safetensors")
    return unet, cfg, expected, tensors, root


def test_control_lora_is_the_base_unet_plus_its_changes(setup):
    unet, cfg, expected, _, root = setup
    net = C.load_control_model(root / "control-lora-canny-rank2.safetensors", base=unet.config, base_unet=unet)
    assert isinstance(net, ControlNet) and net.config == cfg
    got = net.state_dict()
    assert set(got) == set(expected)
    worst = max((got[k].float() - expected[k].float()).abs().max().item() for k in expected)
    assert worst < 1e-6


@pytest.mark.slow
def test_control_lora_in_the_pipeline_equals_the_hand_built_controlnet(tmp_path):
    pipe = sdengine.load_pipeline(make_sdxl_folder(tmp_path / "tiny-sdxl"), device="cpu")
    cfg, expected, tensors = _parts(pipe.unet, seed=1)
    root = tmp_path
    save_safetensors(tensors, root / "control-lora-canny-rank2.safetensors")
    hand = ControlNet(cfg).eval()
    hand.load_state_dict(expected)
    cmap = C.preprocess("canny", _models.picture(32, 32, seed=1), low=30, high=90)
    kw = dict(steps=3, sampler="euler", seed=3, width=32, height=32, progress=False, cfg_scale=5.0)
    ours = pipe("an apple", "blurry", controlnets=[(root / "control-lora-canny-rank2.safetensors", cmap, 0.9)], **kw)
    want = pipe("an apple", "blurry", controlnets=[(hand, cmap, 0.9)], **kw)
    plain = pipe("an apple", "blurry", **kw)
    assert np.abs(ours.arrays[0] - want.arrays[0]).max() < 1e-5
    assert np.abs(ours.arrays[0] - plain.arrays[0]).mean() > 1e-3  # it acted


def test_control_lora_bad_files_name_the_file(setup, tmp_path):
    unet, _, _, tensors, root = setup
    path = root / "control-lora-canny-rank2.safetensors"
    with pytest.raises(ControlNetError, match=r"rank2\.safetensors: a Control-LoRA holds only its changes"):
        C.load_control_model(path)  # no base model
    with pytest.raises(ControlNetError, match=r"rank2\.safetensors: a Control-LoRA holds only its changes"):
        C.load_controlnet(path)
    half = dict(tensors)
    half.pop(next(k for k in tensors if k.endswith(".down")))
    save_safetensors(half, tmp_path / "half.safetensors")
    with pytest.raises(ControlNetError, match=r"half\.safetensors: Control-LoRA layer .* only one of its up/down"):
        C.load_control_model(tmp_path / "half.safetensors", base=unet.config, base_unet=unet)
    save_safetensors({**tensors, "output_blocks.0.0.up": torch.zeros(2)}, tmp_path / "odd.safetensors")
    with pytest.raises(ControlNetError, match=r"odd\.safetensors: unexpected Control-LoRA keys: output_blocks"):
        C.load_control_model(tmp_path / "odd.safetensors", base=unet.config, base_unet=unet)
    sd1 = UNet(TINY_SD)  # another base model: shapes do not fit
    with pytest.raises(ControlNetError, match=r"rank2\.safetensors"):
        C.load_control_model(path, base=sd1.config, base_unet=sd1)
