"""FP8 weight storage (sdengine/nn/fp8_storage.py; ComfyUI's UNETLoader ``weight_dtype``): the diffusion network's
Linear and Conv2d weights held in float8, cast to the compute dtype at each use.

Each family on a tiny random model (SD 1.x, SD 2.x, SDXL U-Nets, SD3's MMDiT, Flux's transformer): the image with
storage equals the same model whose weights were rounded to float8 and back (within float noise), differs from the
default image, and the network's parameter bytes drop. ComfyUI's UNETLoader with fp8_e4m3fn on a Flux / SD3 file
gives the Python API's image. LoRAs run patched over the stored weights; fusing, the fp8 fast path with storage,
unknown names and out-of-range weights are refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import sdengine
from sdengine.errors import SdengineError
from sdengine.nn.fp8_storage import (
    WEIGHT_DTYPES,
    StorageError,
    StoredConv2d,
    StoredLinear,
    has_storage,
    parameter_bytes,
    rounded_copy_state,
    storage_dtype,
    to_storage,
)

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
NOISE = 1e-5  # float noise between two runs of the same weights (fp32, CPU): max abs difference on 0..1 pixels


def _toy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.GroupNorm(2, 8),
        nn.Flatten(),
        nn.Linear(8 * 16, 32),
        nn.LayerNorm(32),
        nn.Linear(32, 4, bias=False),
    )


@pytest.mark.parametrize(("name", "dt"), [("fp8_e4m3fn", E4M3), ("fp8_e5m2", E5M2), ("fp8_e4m3fn_fast", E4M3)])
def test_layers_hold_float8_and_compute_as_the_rounded_model(name, dt):
    net, ref = _toy(), _toy()
    x = torch.randn(2, 3, 4, 4)
    before = parameter_bytes(net)
    full = net(x)
    ref.load_state_dict(rounded_copy_state(ref.state_dict(), ref, dt))
    assert to_storage(net, name) == 3
    conv, norm, _, lin, ln, last = net
    assert type(conv) is StoredConv2d and type(lin) is StoredLinear and type(last) is StoredLinear
    assert isinstance(lin, nn.Linear) and isinstance(conv, nn.Conv2d)  # LoRA matching and hooks still see them
    assert conv.weight.dtype == lin.weight.dtype == dt and not conv.weight.requires_grad
    assert conv.bias.dtype == lin.bias.dtype == norm.weight.dtype == ln.weight.dtype == torch.float32  # kept
    assert torch.equal(net(x), ref(x))  # the same values multiplied the same way
    assert (net(x) - full).abs().max() > 1e-4  # and not the full-precision model
    weights = sum(m.weight.numel() for m in (conv, lin, last))
    assert before - parameter_bytes(net) == 3 * weights  # 4 -> 1 byte per weight, nothing else changed
    # .to(dtype) moves the compute dtype, never the stored weight
    kept = lin.weight.detach().clone()
    net.to(torch.bfloat16)
    assert lin.weight.dtype == dt and lin.bias.dtype == torch.bfloat16 and lin.compute_dtype == torch.bfloat16
    assert net(x.bfloat16()).dtype == torch.bfloat16
    net.float()
    net.to(memory_format=torch.channels_last)  # the CUDA default fast path's channels_last keeps float8 too
    assert conv.weight.dtype == dt and conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert lin.weight.dtype == dt and torch.equal(lin.weight.float(), kept.float())  # float8 -> bf16 -> float8 exact


def test_names_and_refusals():
    assert WEIGHT_DTYPES == ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")  # ComfyUI's UNETLoader's
    assert storage_dtype("default") is None and storage_dtype(None) is None
    assert storage_dtype("fp8_e4m3fn_fast") == E4M3 and storage_dtype("FP8_E5M2") == E5M2
    with pytest.raises(StorageError, match=r"unknown weight dtype 'fp8_e4m3'.*fp8_e4m3fn") as e:
        storage_dtype("fp8_e4m3")
    assert "\n" not in str(e.value) and isinstance(e.value, SdengineError)
    net = _toy()
    with torch.no_grad():
        net[3].weight[0, 0] = 1000.0  # beyond e4m3's 448
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(StorageError, match=r"^3\.weight reaches 1000, beyond .*448.*fp8_e5m2"):
        to_storage(net, E4M3)
    assert not has_storage(net) and all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())  # untouched
    assert to_storage(net, E5M2) == 3  # e5m2 reaches 57344
    assert to_storage(net, E5M2) == 0  # twice: nothing left to convert


def test_fp8_fast_path_and_storage_are_refused_together(tmp_path):
    from sdengine.nn.fp8 import to_fp8

    with pytest.raises(StorageError, match=r"fp8 fast-path option both hold 8-bit weights .*: pick one"):
        sdengine.load_pipeline(tmp_path / "no-model", device="cpu", weight_dtype="fp8_e4m3fn", fast_path="fp8")
    net = nn.Sequential()
    net.add_module("transformer_blocks", nn.ModuleList([nn.Sequential(nn.Linear(16, 16))]))
    assert to_fp8(net) == 1
    with pytest.raises(StorageError, match="already multiplies in fp8"):
        to_storage(net, E4M3)
    with pytest.raises(SdengineError, match="weight_dtype fp8_e5m2 is for latent diffusion networks"):
        sdengine.load_pipeline("fashion-mnist", device="cpu", weight_dtype="fp8_e5m2")
    with pytest.raises(StorageError, match="unknown weight dtype 'fp16'"):
        sdengine.load_pipeline(tmp_path / "no-model", device="cpu", weight_dtype="fp16")


# -- the families ---------------------------------------------------------------------------------------------------


def _image(pipe, **kw) -> np.ndarray:
    args = dict(steps=3, seed=7, width=32, height=32, progress=False)
    args.update(kw)
    return pipe("a red apple", **args).arrays[0].astype(np.float64)


def _check_family(folder: Path, weight_dtype: str = "fp8_e4m3fn", **kw) -> tuple:
    """Storage vs the rounded model vs the default model; returns (stored pipe, rounded-reference pipe)."""
    stored = sdengine.load_pipeline(folder, device="cpu", weight_dtype=weight_dtype)
    ref = sdengine.load_pipeline(folder, device="cpu")
    assert stored.weight_dtype == weight_dtype and ref.weight_dtype == "default"
    assert has_storage(stored.unet) and not has_storage(ref.unet)
    assert parameter_bytes(stored.unet) < 0.4 * parameter_bytes(ref.unet)  # fp32 -> fp8: nearly 4x smaller
    default = _image(ref, **kw)
    ref.unet.load_state_dict(rounded_copy_state(ref.unet.state_dict(), ref.unet, storage_dtype(weight_dtype)))
    ours, theirs = _image(stored, **kw), _image(ref, **kw)
    assert np.abs(ours - theirs).max() < NOISE
    assert np.abs(ours - default).max() > 1e-3
    return stored, ref


def test_sd1_and_sd2_unets(tiny_sd1_folder, tiny_sd2_folder):
    _check_family(tiny_sd1_folder)
    _check_family(tiny_sd2_folder, "fp8_e5m2")


def test_sd1_lora_runs_patched_over_the_stored_weights(tiny_sd1_folder, tmp_path):
    from safetensors.torch import save_file

    from sdengine.nn.lora import LoRAError
    from sdengine.weights.lora import apply_loras
    from sdengine.weights.lora_keys import kohya_name

    stored, ref = _check_family(tiny_sd1_folder)
    g = torch.Generator().manual_seed(3)
    lora = {}
    for name, m in ref.unet.named_modules():
        if isinstance(m, nn.Linear) and name.endswith(("to_q", "to_v", "proj_out")) or name.endswith("conv_in"):
            key = kohya_name("unet", name)
            shape = (2, m.in_features) if isinstance(m, nn.Linear) else (2, m.in_channels, 3, 3)
            up = (m.out_features, 2) if isinstance(m, nn.Linear) else (m.out_channels, 2, 1, 1)
            lora[f"{key}.lora_down.weight"] = torch.randn(*shape, generator=g) * 0.5
            lora[f"{key}.lora_up.weight"] = torch.randn(*up, generator=g) * 0.5
            lora[f"{key}.alpha"] = torch.tensor(2.0)
    path = tmp_path / "l.safetensors"
    save_file(lora, str(path))
    plain = _image(stored)
    ours, theirs = _image(stored, loras=[(str(path), 0.8)]), _image(ref, loras=[(str(path), 0.8)])
    assert np.abs(ours - theirs).max() < NOISE  # the rounded model + the LoRA at full precision
    assert np.abs(ours - plain).max() > 1e-3
    assert np.abs(_image(stored) - plain).max() == 0  # removed after the call: nothing stale
    weights = {k: v.clone() for k, v in stored.unet.state_dict().items()}
    with pytest.raises(LoRAError, match="fp8-stored weights .* run patched, not fused"):
        apply_loras(stored.unet, None, [(str(path), 1.0)], fuse=True)
    assert not any(m._forward_hooks for m in stored.unet.modules())  # the refused fuse left no hook behind
    assert all(torch.equal(v, stored.unet.state_dict()[k]) for k, v in weights.items())


def test_sdxl_unet(tmp_path):
    pytest.importorskip("diffusers")
    from _sdxl_models import make_sdxl_folder

    _check_family(make_sdxl_folder(tmp_path / "sdxl"), width=64, height=64)


def test_sd3_mmdit(tmp_path):
    pytest.importorskip("diffusers")
    from _sd3_models import make_sd3_folder

    stored, _ = _check_family(make_sd3_folder(tmp_path / "sd3"), cfg_scale=4.0)
    assert stored.unet.pos_embed.proj.weight.dtype == E4M3  # the patch embedding's convolution too


def test_flux_transformer(tmp_path):
    pytest.importorskip("diffusers")
    from safetensors.torch import save_file

    from _flux_models import make_flux_folder
    from sdengine.fastpath import apply_fast_path

    stored, ref = _check_family(make_flux_folder(tmp_path / "flux", guidance=True), "fp8_e5m2")
    assert stored.unet.dtype == torch.float32  # inputs are cast to the compute dtype, not to float8
    g = torch.Generator().manual_seed(5)
    lora = {}  # diffusers/PEFT names on the attention projections of every block
    for name, m in ref.unet.named_modules():
        if isinstance(m, nn.Linear) and name.endswith(("attn.to_q", "attn.to_v")):
            lora[f"transformer.{name}.lora_A.weight"] = torch.randn(2, m.in_features, generator=g) * 0.3
            lora[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, 2, generator=g) * 0.3
    assert lora
    save_file(lora, str(tmp_path / "flux-lora.safetensors"))
    spec = [(str(tmp_path / "flux-lora.safetensors"), 1.0)]
    ours, theirs = _image(stored, loras=spec), _image(ref, loras=spec)
    assert np.abs(ours - theirs).max() < NOISE and np.abs(ours - _image(stored)).max() > 1e-3
    with pytest.raises(StorageError, match="fp8: the network's weights are held in fp8 .*pick one"):
        apply_fast_path(stored, ["fp8"])  # the fast path applied later: refused too
    assert has_storage(stored.unet)


def test_chroma_transformer(tmp_path):
    pytest.importorskip("diffusers")
    from _chroma_models import make_chroma_folder

    stored, _ = _check_family(make_chroma_folder(tmp_path / "chroma"), cfg_scale=4.0)
    assert stored.unet.dtype == torch.float32


def test_cli_weight_dtype(tiny_sd1_folder, tmp_path, capsys):
    from PIL import Image

    from sdengine.cli import main

    common = ["--model", str(tiny_sd1_folder), "--steps", "2", "--width", "32", "--height", "32", "--seed", "7"]
    common += ["--sampler", "euler", "--no-progress"]
    out = tmp_path / "a.png"
    assert main(["generate", "a red apple", *common, "--weight-dtype", "fp8_e4m3fn", "--out", str(out)]) == 0
    pipe = sdengine.load_pipeline(tiny_sd1_folder, device="cpu", weight_dtype="fp8_e4m3fn")
    want = pipe("a red apple", steps=2, width=32, height=32, seed=7, sampler="euler", progress=False)
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(want.images[0]))
    with pytest.raises(SystemExit):
        main(["generate", "x", *common, "--weight-dtype", "fp8", "--out", str(tmp_path / "b.png")])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err
    from sdengine.commands import generate  # the flag's choices are WEIGHT_DTYPES, written out (no torch import)

    assert '("' + '", "'.join(WEIGHT_DTYPES) + '")' in Path(generate.__file__).read_text()


# -- ComfyUI's UNETLoader -------------------------------------------------------------------------------------------


def test_comfy_unet_loader_fp8_equals_the_python_api(tmp_path_factory):
    pytest.importorskip("diffusers")
    from safetensors.torch import load_file

    import test_comfy_sd3_flux as comfy
    from _flux_models import make_flux_folder
    from sdengine.weights.flux_file import diffusers_to_bfl

    root = tmp_path_factory.mktemp("comfy_fp8")  # the layout of test_comfy_sd3_flux's flux fixture
    folder = make_flux_folder(root / "flux-folder", guidance=True)
    models = root / "models"
    bfl = diffusers_to_bfl(load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    comfy._save(bfl, models / "unet" / "flux1-tiny.safetensors")
    comfy._save(comfy._clip_file(folder, "text_encoder"), models / "text_encoders" / "clip_l.safetensors")
    comfy._save(
        load_file(folder / "text_encoder_2" / "model.safetensors"), models / "text_encoders" / "t5xxl.safetensors"
    )
    comfy._save(comfy._ldm_vae(folder), root / "vaes" / "ae.safetensors")
    ours = sdengine.load_pipeline(root / "flux-folder", device="cpu", weight_dtype="fp8_e4m3fn")
    want = comfy._pipeline_image(ours, schedule="simple", cfg_scale=1.0, distilled_cfg_scale=3.5)
    images = {}
    for choice in ("fp8_e4m3fn", "fp8_e4m3fn_fast", "default"):
        g = comfy.flux_graph()
        g["1"]["inputs"]["weight_dtype"] = choice
        images[choice] = comfy._pixels(comfy._run(root, g)["10"][0])
    assert np.abs(images["fp8_e4m3fn"] - want).max() < comfy.TOL
    assert np.array_equal(images["fp8_e4m3fn_fast"], images["fp8_e4m3fn"])  # storage alone, ComfyUI's fallback
    assert np.abs(images["default"] - want).max() > 1e-3


def test_comfy_unet_loader_fp8_on_sd3_equals_the_python_api(tmp_path_factory):
    pytest.importorskip("diffusers")
    import test_comfy_sd3_flux as comfy

    root = tmp_path_factory.mktemp("comfy_fp8_sd3")  # the layout of test_comfy_sd3_flux's sd3 fixture
    single = comfy.save_sd3_files(root)
    parts = comfy.sd3_parts("fp8_e5m2")
    out = comfy._run(root, comfy.sd3_graph(parts, ["10", 0], ["2", 0], ["9", 0]))
    ours = sdengine.load_pipeline(single, device="cpu", weight_dtype="fp8_e5m2")
    want = comfy._pipeline_image(ours, schedule="simple", cfg_scale=4.0)
    assert np.abs(comfy._pixels(out["7"][0]) - want).max() < comfy.TOL
    plain = sdengine.load_pipeline(single, device="cpu")
    assert np.abs(comfy._pipeline_image(plain, schedule="simple", cfg_scale=4.0) - want).max() > 1e-3


def test_server_loader_weight_dtype(tiny_sd1_folder, caplog):
    pytest.importorskip("fastapi")
    from sdengine.pipeline.pixel import PixelPipeline
    from sdengine.server.app import default_loader
    from sdengine.server.config import ServerConfig

    assert ServerConfig().weight_dtype == "default"
    load = default_loader(None, weight_dtype="fp8_e4m3fn")
    pipe = load(str(tiny_sd1_folder), "cpu")
    assert pipe.weight_dtype == "fp8_e4m3fn" and has_storage(pipe.unet)
    with caplog.at_level("WARNING"):
        pixel = load("fashion-mnist", "cpu")  # nothing to store: loaded plain, and said
    assert isinstance(pixel, PixelPipeline)
    assert "not using --weight-dtype fp8_e4m3fn" in caplog.text


def test_comfy_merges_refuse_a_stored_unet():
    pytest.importorskip("fastapi")
    from types import SimpleNamespace

    from sdengine.server.comfy import nodes_merge
    from sdengine.server.comfy.nodes import NodeError

    net = _toy()
    ctx = SimpleNamespace(pipeline=lambda ref: SimpleNamespace(unet=net))
    to_storage(net, E4M3)
    with pytest.raises(NodeError, match="holds them in fp8 .*without --weight-dtype"):
        nodes_merge.effective_weights(ctx, SimpleNamespace(ref="m", merges=()), "unet")
