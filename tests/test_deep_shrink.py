"""Deep Shrink (kohya-ss's high-resolution fix; ComfyUI's PatchModelAddDownscale, Forge's Kohya HRFix Integrated).

A U-Net call with the patch against the same blocks called by hand with ``F.interpolate`` at ComfyUI's places (input
block N's output shrunk before or after its skip is kept; the hidden state resized to a skip of another size before
the up blocks concatenate it), the window of sigmas against a float64 re-derivation of ComfyUI's percent rule, factor
1 or an empty window = the plain image bit for bit, the request's, CLI's, infotext's and recorded loop's handling,
ComfyUI's node and Forge's script through the HTTP APIs, and bad values as one line.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import re
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import sdengine
from _comfy_live import live_client, output_image, run_prompt
from _cpu_graphs import images_per_recorded_loop
from _live_server import server_config, shared_loader, wait_job
from sdengine.cli import main
from sdengine.diffusion.denoisers import Denoiser
from sdengine.errors import SdengineError
from sdengine.metadata import parse_parameters, to_generate_kwargs
from sdengine.models.unet import SD15, UNet, UNetConfig
from sdengine.models.unet_sdxl import SDXL_BASE
from sdengine.nn.deep_shrink import DeepShrink, DeepShrinkDenoiser, deep_shrink_applied, input_block_count
from sdengine.nn.resize import bislerp
from sdengine.pipeline import GenerationError
from sdengine.pipeline.request import GenerationRequest
from sdengine.pipeline.unet_adapter import UNetAdapter

PROMPT = "a red apple on a table"
# two levels of two layers: input blocks 1, 2 (level 0), 3 (its downsample), 4, 5 (level 1)
SMALL = UNetConfig(
    in_channels=4,
    out_channels=4,
    sample_size=16,
    block_out_channels=(16, 32),
    layers_per_block=2,
    attention=("cross", "none"),
    num_heads=(2, 2),
    cross_attention_dim=16,
    norm_num_groups=8,
)


def _small_unet() -> UNet:
    torch.manual_seed(0)
    unet = UNet(SMALL).eval()
    with torch.no_grad():  # random, not zero-initialised, output layers: every path shows in the result
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return unet


def _resize(x: torch.Tensor, size: tuple[int, int], method: str) -> torch.Tensor:
    if method == "bislerp":
        return bislerp(x, size[1], size[0])
    corners = {"align_corners": False} if method in ("bilinear", "bicubic") else {}
    return F.interpolate(x, size=size, mode=method, **corners)


def _by_hand(unet: UNet, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, s: DeepShrink) -> torch.Tensor:
    """One call of ``unet`` with the patch, its blocks called here in ComfyUI's order (input blocks numbered from
    conv_in = 0; the output blocks' upsample to the next skip's size, nearest)."""
    emb = unet.embed(x, t)
    hs: list[torch.Tensor] = []
    n = 0

    def keep(h: torch.Tensor) -> torch.Tensor:
        nonlocal n
        shrink = n == s.block
        new = (round(h.shape[-2] * (1.0 / s.factor)), round(h.shape[-1] * (1.0 / s.factor)))
        if shrink and not s.after_skip:
            h = _resize(h, new, s.downscale_method)
        hs.append(h)
        if shrink and s.after_skip:
            h = _resize(h, new, s.downscale_method)
        n += 1
        return h

    h = keep(unet.conv_in(x))
    for blk in unet.down_blocks:
        for i, res in enumerate(blk.resnets):
            h = res(h, emb)
            if blk.attentions is not None:
                h = blk.attentions[i](h, ctx)
            h = keep(h)
        if blk.downsamplers is not None:
            h = keep(blk.downsamplers[0](h))
    assert unet.mid_block is not None
    h = unet.mid_block(h, emb, ctx)
    for blk in unet.up_blocks:
        for i, res in enumerate(blk.resnets):
            skip = hs.pop()
            if h.shape[-2:] != skip.shape[-2:]:
                h = _resize(h, tuple(skip.shape[-2:]), s.upscale_method)
            h = res(torch.cat([h, skip], dim=1), emb)
            if blk.attentions is not None:
                h = blk.attentions[i](h, ctx)
        if blk.upsamplers is not None:
            h = blk.upsamplers[0].conv(F.interpolate(h, size=tuple(hs[-1].shape[-2:]), mode="nearest"))
    return unet.conv_out(F.silu(unet.conv_norm_out(h)))


def test_input_blocks_are_numbered_as_comfyuis_input_blocks():
    with torch.device("meta"):
        assert input_block_count(UNet(SD15)) == 12  # SD 1.x: input_blocks 0 .. 11
        assert input_block_count(UNet(SDXL_BASE)) == 9  # SDXL: 0 .. 8
    assert input_block_count(_small_unet()) == 6


@pytest.mark.parametrize(
    "settings",
    [
        DeepShrink(3, 2.0),
        DeepShrink(3, 2.0, after_skip=False),
        DeepShrink(1, 1.5, downscale_method="bilinear", upscale_method="area"),
        DeepShrink(2, 2.0, after_skip=False, downscale_method="bislerp", upscale_method="nearest-exact"),
        DeepShrink(4, 3.0, downscale_method="area", upscale_method="bislerp"),
        DeepShrink(5, 0.5, after_skip=False),  # below 1 the hidden state grows
        DeepShrink(5, 2.0),
    ],
)
def test_a_patched_call_equals_the_blocks_called_by_hand(settings):
    unet = _small_unet()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 14, 10, generator=g)  # odd halves: 7 x 5 below the downsample
    t = torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 5, 16, generator=g)
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=ctx)
        with deep_shrink_applied(unet, settings):
            got = unet(x, t, encoder_hidden_states=ctx)
        want = _by_hand(unet, x, t, ctx, settings)
        again = unet(x, t, encoder_hidden_states=ctx)  # restored after the block
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert float((got - plain).abs().mean()) > 1e-3  # it did something
    assert torch.equal(again, plain)
    with torch.no_grad(), deep_shrink_applied(unet, DeepShrink(settings.block, 1.0)):
        assert torch.equal(unet(x, t, encoder_hidden_states=ctx), plain)  # factor 1: the plain call


def _window_sigma(log_sigmas: torch.Tensor, percent: float) -> float:
    """ComfyUI's percent_to_sigma, re-derived in float64: above everything at 0, 0 at 1, else the sigma at timestep
    (1 - percent) * 999, linear in log-sigma between the neighbouring table entries."""
    if percent <= 0:
        return math.inf
    if percent >= 1:
        return 0.0
    ls = log_sigmas.double().tolist()
    t = (1 - percent) * 999
    lo = math.floor(t)
    hi = min(lo + 1, len(ls) - 1)
    return math.exp((1 - (t - lo)) * ls[lo] + (t - lo) * ls[hi])


def test_the_hidden_state_is_shrunk_inside_the_window_only(tiny_sd1_folder):
    """A hook on the middle block of tiny random weights: its input has the shrunk size in the calls whose sigma lies
    between the window's sigmas, the full size in the others (the denoiser called at sigmas across the schedule, and
    a whole generation)."""
    pipe = sdengine.load_pipeline(tiny_sd1_folder, device="cpu", fast_path="none")
    sizes: list[tuple[int, int]] = []
    handle = pipe.unet.mid_block.register_forward_pre_hook(lambda m, args: sizes.append(tuple(args[0].shape[-2:])))
    try:
        settings = DeepShrink(2, 2.0, 0.2, 0.6)  # block 2: level 0's downsample (32 x 32 latents: 16 -> 8)
        hi, lo = _window_sigma(pipe.noise_schedule.log_sigmas, 0.2), _window_sigma(pipe.noise_schedule.log_sigmas, 0.6)
        den = DeepShrinkDenoiser(
            Denoiser(UNetAdapter(pipe.unet, torch.float32), pipe.noise_schedule), pipe.unet, settings
        )
        sigmas = [14.0, hi * 1.001, hi * 0.999, 3.0, 2.0, lo * 1.001, lo * 0.999, 0.05]
        x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
        crossattn = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            for s in sigmas:
                den(x, torch.tensor([s]), crossattn=crossattn)
        want = [(8, 8) if lo <= s <= hi else (16, 16) for s in sigmas]
        assert want.count((8, 8)) == 4 and sizes == want, (sizes, hi, lo)

        sizes.clear()
        seen: list[float] = []
        pipe(PROMPT, steps=6, sampler="euler", schedule="normal", seed=1, width=64, height=64, progress=False,
             deep_shrink=settings, callback=lambda info: seen.append(info.sigma))  # fmt: skip
        # Euler: one (CFG-batched) call per step, at the sigma the step starts from
        assert all(min(abs(s - hi), abs(s - lo)) > 1e-3 * s for s in seen), seen  # none on an edge
        want = [(8, 8) if lo <= s <= hi else (16, 16) for s in seen]
        assert sizes == want and 0 < want.count((8, 8)) < len(want), (sizes, seen)
    finally:
        handle.remove()


def test_both_hires_passes_run_deep_shrink(tiny_sd1_folder):
    """The hires fix's first pass (32 x 32 latents: 16 below block 2) and second pass (64 x 64: 32) are both
    shrunk over the whole schedule."""
    pipe = sdengine.load_pipeline(tiny_sd1_folder, device="cpu", fast_path="none")
    sizes: list[tuple[int, int]] = []
    handle = pipe.unet.mid_block.register_forward_pre_hook(lambda m, args: sizes.append(tuple(args[0].shape[-2:])))
    try:
        pipe(PROMPT, steps=2, sampler="euler", seed=1, width=64, height=64, enable_hr=True, hr_scale=2, strength=0.5,
             progress=False, deep_shrink=(2, 2.0, 0.0, 1.0))  # fmt: skip
    finally:
        handle.remove()
    assert set(sizes) == {(8, 8), (16, 16)} and sizes[0] == (8, 8) and sizes[-1] == (16, 16), sizes


@pytest.fixture(scope="module")
def sd1(tiny_sd1_folder):
    return tiny_sd1_folder, sdengine.load_pipeline(tiny_sd1_folder, device="cpu", fast_path="none")


def _gen(pipe: Any, **kw: Any) -> Any:
    args: dict[str, Any] = dict(steps=3, sampler="euler", seed=5, width=64, height=64, progress=False)
    return pipe(PROMPT, **{**args, **kw})


def test_factor_one_or_an_empty_window_is_the_plain_image(sd1):
    _, pipe = sd1
    plain = _gen(pipe).arrays
    np.testing.assert_array_equal(_gen(pipe, deep_shrink=(2, 1.0, 0.0, 1.0)).arrays, plain)
    np.testing.assert_array_equal(_gen(pipe, deep_shrink={"block": 2, "factor": 2.0, "start": 0.7, "end": 0.3}).arrays,
                                  plain)  # fmt: skip
    shrunk = _gen(pipe, deep_shrink=(2, 2.0, 0.0, 0.5)).arrays
    assert float(np.abs(shrunk.astype(np.float64) - plain).mean()) > 1e-3


def test_the_infotext_writes_forges_fields_and_reads_them_back(sd1):
    _, pipe = sd1
    res = _gen(pipe, deep_shrink=DeepShrink(2, 1.5, 0.1, 0.5, False, "bislerp", "area"))
    text = res.infotexts[0]
    assert (
        "kohya_hrfix_enabled: True, kohya_hrfix_block_number: 2, kohya_hrfix_downscale_factor: 1.5, "
        "kohya_hrfix_start_percent: 0.1, kohya_hrfix_end_percent: 0.5, kohya_hrfix_downscale_after_skip: False, "
        "kohya_hrfix_downscale_method: bislerp, kohya_hrfix_upscale_method: area"
    ) in text, text
    kwargs = to_generate_kwargs(parse_parameters(text))
    assert DeepShrink.coerce(kwargs["deep_shrink"]) == DeepShrink(2, 1.5, 0.1, 0.5, False, "bislerp", "area")
    np.testing.assert_array_equal(pipe(**{**kwargs, "progress": False}).arrays, res.arrays)
    # Forge's text as its script writes it (floats with ".0"); disabled it is no Deep Shrink
    forge = "x\nSteps: 3, Seed: 5, Size: 64x64, kohya_hrfix_enabled: True, kohya_hrfix_block_number: 3, "
    forge += "kohya_hrfix_downscale_factor: 2.0, kohya_hrfix_start_percent: 0.0, kohya_hrfix_end_percent: 0.35, "
    forge += "kohya_hrfix_downscale_after_skip: True, kohya_hrfix_downscale_method: bicubic, "
    forge += "kohya_hrfix_upscale_method: bicubic"
    assert DeepShrink.coerce(to_generate_kwargs(parse_parameters(forge))["deep_shrink"]) == DeepShrink()
    off = forge.replace("kohya_hrfix_enabled: True", "kohya_hrfix_enabled: False")
    assert "deep_shrink" not in to_generate_kwargs(parse_parameters(off))
    plain = _gen(pipe).infotexts[0]
    assert "kohya" not in plain


def test_the_cli_runs_deep_shrink_and_reads_it_back_from_png(sd1, tmp_path):
    folder, pipe = sd1
    out = tmp_path / "d.png"
    common = ["--model", str(folder), "--steps", "2", "--width", "64", "--height", "64", "--seed", "7"]
    common += ["--sampler", "euler", "--no-progress"]
    args = ["--deep-shrink", "2,2,0,0.5", "--deep-shrink-skip", "before", "--deep-shrink-method", "bilinear,area"]
    assert main(["generate", PROMPT, *common, *args, "--out", str(out)]) == 0
    want = pipe(PROMPT, steps=2, width=64, height=64, seed=7, sampler="euler", progress=False,
                deep_shrink=DeepShrink(2, 2.0, 0.0, 0.5, False, "bilinear", "area"))  # fmt: skip
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(want.images[0]))
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(out), "--model", str(folder), "--no-progress", "--out", str(again)]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))
    off = tmp_path / "off.png"
    assert main(["generate", "--from-png", str(out), "--model", str(folder), "--no-progress", "--deep-shrink", "off",
                 "--out", str(off)]) == 0  # fmt: skip
    plain = pipe(PROMPT, steps=2, width=64, height=64, seed=7, sampler="euler", progress=False)
    np.testing.assert_array_equal(np.asarray(Image.open(off).convert("RGB")), np.asarray(plain.images[0]))


@pytest.mark.parametrize(
    "value,why",
    [
        ((0, 2.0), "deep shrink block must be an input block number in [1, 32]"),
        ((3.5, 2.0), "deep shrink block must be an input block number"),
        ((3, 10.0), "deep shrink factor must be a number in [0.1, 9]"),
        ((3, float("nan")), "deep shrink factor must be a number"),
        ((3, 2.0, -0.1, 0.5), "deep shrink start must be a number in [0, 1]"),
        ((3, 2.0, 0.0, 1.5), "deep shrink end must be a number in [0, 1]"),
        ((3, 2.0, 0.0, 0.5, "yes"), "deep shrink after_skip must be true or false"),
        ((3, 2.0, 0.0, 0.5, True, "lanczos"), "unknown deep shrink downscale_method 'lanczos'"),
        ((3,), "deep shrink takes (block, factor"),
        ("3,2", "deep shrink takes (block, factor"),
        ({"block": 3, "scale": 2}, "unknown deep shrink setting 'scale'"),
    ],
)
def test_bad_deep_shrink_values_are_one_line_errors(value, why):
    with pytest.raises(GenerationError, match=why.replace("(", r"\(").replace("[", r"\[")) as e:
        GenerationRequest(prompt="x", deep_shrink=value).validate()
    assert "\n" not in str(e.value)


def test_the_model_decides_the_block_range_and_controlnets_are_refused(sd1):
    _, pipe = sd1  # tiny SD: input blocks 1 to 3
    said = "deep shrink block 4 is not an input block of this U-Net: it has blocks 1 to 3"
    with pytest.raises(GenerationError, match=said) as e:
        _gen(pipe, deep_shrink=(4, 2.0))
    assert "\n" not in str(e.value)
    unit = {"model": "x", "image": Image.new("RGB", (64, 64))}
    with pytest.raises(GenerationError, match="deep shrink cannot run with ControlNets"):
        GenerationRequest(prompt="x", deep_shrink=(3, 2.0), controlnets=[unit]).validate()


def test_latent_sampling_refuses_a_controlnet_and_a_missing_block(sd1):
    """ComfyUI's samplers (sdengine.latent_sampling): Deep Shrink with a ControlNet, or with a block the model does not
    have, is one line before any model call."""
    from sdengine.latent_sampling import ControlHint, LatentSamplingError, encode_text, sample_latents

    _, pipe = sd1
    pos, neg = encode_text(pipe, "a cat"), encode_text(pipe, "")
    latent = torch.zeros(1, pipe.latent_channels, 16, 16)
    hinted = dataclasses.replace(pos, controls=(ControlHint("no-such-controlnet", torch.zeros(1, 3, 64, 64)),))
    for positive, shrink, said in (
        (hinted, DeepShrink(2, 2.0), "Deep Shrink (PatchModelAddDownscale) cannot run with a ControlNet"),
        (pos, DeepShrink(4, 2.0), "deep shrink block 4 is not an input block of this U-Net: it has blocks 1 to 3"),
    ):
        with pytest.raises(LatentSamplingError, match=re.escape(said)) as e:
            sample_latents(pipe, [positive], [neg], latent, seed=1, steps=2, cfg=5.0, deep_shrink=shrink)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "args,why",
    [
        (["--deep-shrink", "3"], "--deep-shrink takes BLOCK,FACTOR"),
        (["--deep-shrink", "3.5,2"], "--deep-shrink takes BLOCK,FACTOR"),
        (["--deep-shrink", "3,20"], "deep shrink factor must be a number in [0.1, 9]"),
        (["--deep-shrink-skip", "before"], "--deep-shrink-skip has no effect without --deep-shrink"),
        (["--deep-shrink", "3,2", "--deep-shrink-method", "a,b,c"], "--deep-shrink-method takes METHOD or DOWN,UP"),
        (["--deep-shrink", "3,2", "--deep-shrink-method", "lanczos"], "unknown deep shrink downscale_method"),
    ],
)
def test_bad_deep_shrink_flags_are_one_line_errors(tmp_path, capsys, args, why):
    rc = main(["generate", "x", "--model", str(tmp_path / "none"), *args, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and why in err, err


def test_the_recorded_loop_keys_deep_shrink_and_replays_its_images(tiny_sd1_folder):
    """Two Deep Shrink settings never share a recorded loop (the stand-in recorder replays the first plan of a key),
    and each replay is the plain path's image."""
    pipe = sdengine.load_pipeline(tiny_sd1_folder, device="cpu", dtype="fp32", fast_path="none")
    settings = [{}, {"deep_shrink": (2, 2.0)}, {"deep_shrink": (2, 2.0, 0.0, 0.7)}, {"deep_shrink": (1, 2.0)}]
    images_per_recorded_loop(pipe, settings, steps=3, seed=3, width=32, height=32, progress=False)


# --------------------------------------------------------------------------------------- through the APIs


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    with live_client(server_config(tmp_path_factory.mktemp("deep_shrink")), timeout=300) as (_, c):
        yield c


def _workflow(patch: dict | None) -> dict:
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "emoji"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 96, "height": 96, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 3, "steps": 3, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "shrink"}},
    }  # fmt: skip
    if patch is not None:
        g["5"] = {"class_type": "PatchModelAddDownscale", "inputs": {"model": ["1", 0], **patch}}
        g["6"]["inputs"]["model"] = ["5", 0]
    return g


PATCH = {"block_number": 2, "downscale_factor": 2.0, "start_percent": 0.0, "end_percent": 1.0,
         "downscale_after_skip": True, "downscale_method": "bicubic", "upscale_method": "bicubic"}  # fmt: skip


def test_comfyuis_patch_node_through_the_api(client):
    """PatchModelAddDownscale over the whole schedule is the plain workflow run with the U-Net patched throughout
    (deep_shrink_applied around it: no window logic); factor 1 is the plain image; /object_info lists ComfyUI's
    inputs; bad values are ComfyUI's node errors."""
    plain = output_image(client, run_prompt(client, _workflow(None)), "8")
    got = output_image(client, run_prompt(client, _workflow(PATCH)), "8")
    pipe = shared_loader("emoji", "cpu")  # the server's worker runs this same pipeline in this process
    with deep_shrink_applied(pipe.unet, DeepShrink(2, 2.0, 0.0, 1.0)):
        want = output_image(client, run_prompt(client, _workflow(None)), "8")
    assert not np.array_equal(got, plain)
    np.testing.assert_array_equal(got, want)
    one = output_image(client, run_prompt(client, _workflow({**PATCH, "downscale_factor": 1.0})), "8")
    np.testing.assert_array_equal(one, plain)
    # a window of the first steps only: between the plain image and the whole-schedule one
    part = output_image(client, run_prompt(client, _workflow({**PATCH, "end_percent": 0.35})), "8")
    assert not np.array_equal(part, plain) and not np.array_equal(part, got)

    info = client.get("/object_info/PatchModelAddDownscale").json()["PatchModelAddDownscale"]
    req = info["input"]["required"]
    assert info["display_name"] == "PatchModelAddDownscale (Kohya Deep Shrink)" and info["output"] == ["MODEL"]
    assert req["block_number"][1]["default"] == 3 and req["end_percent"][1]["default"] == 0.35
    assert req["downscale_method"][0] == ["bicubic", "nearest-exact", "bilinear", "area", "bislerp"]
    for inputs, kind in (({"downscale_factor": 9.5}, "value_bigger_than_max"),
                         ({"block_number": 0}, "value_smaller_than_min"),
                         ({"upscale_method": "lanczos"}, "value_not_in_list")):  # fmt: skip
        r = client.post("/prompt", json={"prompt": _workflow({**PATCH, **inputs})})
        assert r.status_code == 400 and kind in [e["type"] for e in r.json()["node_errors"]["5"]["errors"]], r.text
    # a block the model does not have: the sampler's execution error, one line
    h = run_prompt(client, _workflow({**PATCH, "block_number": 9}))
    (err,) = [m[1] for m in h["status"]["messages"] if m[0] == "execution_error"]
    assert err["node_id"] == "6" and "deep shrink block 9 is not an input block" in err["exception_message"]
    assert "\n" not in err["exception_message"]


def test_forges_kohya_hrfix_script_in_a1111s_alwayson_scripts(client):
    """Forge's "Kohya HRFix Integrated" ({args: [enabled, block_number, downscale_factor, start_percent, end_percent,
    downscale_after_skip, downscale_method, upscale_method]}) on A1111's txt2img: the Python API's deep_shrink image
    with Forge's infotext; disabled the plain image; another shape or a bad value a one-line 400."""
    body = {"prompt": "a red apple", "seed": 3, "steps": 3, "width": 96, "height": 96, "cfg_scale": 7.0}
    body |= {"sampler_name": "Euler", "scheduler": "Karras"}

    def txt2img(scripts: dict) -> tuple[np.ndarray, dict]:
        r = client.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": scripts})
        assert r.status_code == 200, r.text
        image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
        return np.asarray(image.convert("RGB")), json.loads(r.json()["info"])

    def python_api(**kw: Any) -> np.ndarray:
        pipe = shared_loader("emoji", "cpu")
        r = pipe("a red apple", seed=3, steps=3, width=96, height=96, cfg_scale=7.0, sampler="euler",
                 schedule="karras", progress=False, **kw)  # fmt: skip
        return np.asarray(r.images[0].convert("RGB"))

    args = [True, 2, 2.0, 0.0, 0.5, False, "bicubic", "bilinear"]
    got, info = txt2img({"Kohya HRFix Integrated": {"args": args}})
    np.testing.assert_array_equal(got, python_api(deep_shrink=(2, 2.0, 0.0, 0.5, False, "bicubic", "bilinear")))
    text = info["infotexts"][0]
    assert "kohya_hrfix_enabled: True, kohya_hrfix_block_number: 2, kohya_hrfix_downscale_factor: 2," in text, text
    assert info["ignored"] == []
    plain, info = txt2img({"kohya hrfix integrated": {"args": [False, *args[1:]]}})
    np.testing.assert_array_equal(plain, python_api())
    assert "kohya" not in info["infotexts"][0]
    # as Forge's API: a shorter args list keeps the script's defaults (block 3, factor 2, 0 .. 0.35, after the skip)
    np.testing.assert_array_equal(
        txt2img({"Kohya HRFix Integrated": {"args": [True]}})[0], python_api(deep_shrink=(3, 2))
    )
    # the request's infotext sets the script's arguments (Forge reads its kohya_hrfix_* fields), the entry goes over it
    fields = ("Steps: 3", "Seed: 3", "Size: 96x96", "RNG: CPU", "kohya_hrfix_enabled: True",
              "kohya_hrfix_block_number: 2", "kohya_hrfix_downscale_factor: 2.0", "kohya_hrfix_end_percent: 0.5",
              "kohya_hrfix_downscale_after_skip: False")  # fmt: skip
    infotext = "a red apple\n" + ", ".join(fields)
    r = client.post("/sdapi/v1/txt2img", json={**body, "infotext": infotext})
    assert r.status_code == 200, r.text
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
    np.testing.assert_array_equal(image, python_api(deep_shrink=(2, 2.0, 0.0, 0.5, False)))
    r = client.post(
        "/sdapi/v1/txt2img",
        json={**body, "infotext": infotext, "alwayson_scripts": {"Kohya HRFix Integrated": {"args": [False]}}},
    )
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
    np.testing.assert_array_equal(image, plain)
    for bad, said in (
        ([*args, 1], "must be an object {args: [enabled, block_number, downscale_factor"),
        ([1, *args[1:]], "args[0] (enabled) must be true or false, got 1"),
        ([True, 2, 20.0, *args[3:]], "deep shrink factor must be a number in [0.1, 9], got 20.0"),
        ([True, 2, 2.0, 0.0, 0.5, False, "bicubic", "lanczos"], "unknown deep shrink upscale_method 'lanczos'"),
        ([True, 9, *args[2:]], "deep shrink block 9 is not an input block of this U-Net: it has blocks 1 to 5"),
    ):
        r = client.post(
            "/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"Kohya HRFix Integrated": {"args": bad}}}
        )
        assert r.status_code == 400 and said in r.text and "\n" not in r.json()["detail"], (bad, r.text)


def test_a_native_job_takes_deep_shrink(client):
    """POST /v1/jobs with ``deep_shrink`` (an object of the settings, ComfyUI's defaults for the ones left out) is the
    Python API's image, with Forge's infotext fields; bad values are 422s, a block the loaded model does not have a
    one-line 400 before anything is queued."""
    body = {"prompt": "a red apple", "seed": 3, "steps": 3, "width": 96, "height": 96, "sampler": "euler",
            "schedule": "karras"}  # fmt: skip
    r = client.post("/v1/jobs", json={**body, "deep_shrink": {"block": 2, "end": 0.5, "upscale_method": "bislerp"}})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"], timeout=300)
    assert job["state"] == "done", job
    got = np.asarray(Image.open(io.BytesIO(client.get(job["images"][0]["url"]).content)).convert("RGB"))
    pipe = shared_loader("emoji", "cpu")
    want = pipe("a red apple", seed=3, steps=3, width=96, height=96, sampler="euler", schedule="karras",
                progress=False, deep_shrink=DeepShrink(2, 2.0, 0.0, 0.5, upscale_method="bislerp"))  # fmt: skip
    np.testing.assert_array_equal(got, np.asarray(want.images[0].convert("RGB")))
    assert job["infotexts"][0] == want.infotexts[0] and "kohya_hrfix_upscale_method: bislerp" in want.infotexts[0]
    for bad in ({"factor": 10}, {"block": 0}, {"block": "3"}, {"upscale_method": "lanczos"}, {"scale": 2}):
        r = client.post("/v1/jobs", json={**body, "deep_shrink": bad})
        assert r.status_code == 422 and "deep_shrink" in r.text, (bad, r.text)
    buf = io.BytesIO()
    Image.new("RGB", (96, 96), (200, 30, 30)).save(buf, format="PNG")
    unit = {
        "model": "emoji-controlnet-canny",
        "image": base64.b64encode(buf.getvalue()).decode(),
        "preprocessor": "none",
    }
    r = client.post("/v1/jobs", json={**body, "deep_shrink": {"block": 2}, "controlnets": [unit]})
    assert r.status_code == 400 and "deep shrink cannot run with ControlNets" in r.json()["detail"], r.text
    r = client.post("/v1/jobs", json={**body, "deep_shrink": {"block": 9}})  # the model is loaded now
    assert r.status_code == 400 and "\n" not in r.json()["detail"], r.text
    assert "deep shrink block 9 is not an input block of this U-Net: it has blocks 1 to 5" in r.json()["detail"]
    assert client.get("/v1/jobs").json()["queued"] == 0


def test_deep_shrink_settings_round_trip_their_key():
    s = DeepShrink(4, 1.25, 0.1, 0.6, False, "area", "bislerp")
    assert DeepShrink(*s.key) == s
    assert DeepShrink.coerce({"block": 4, "factor": 1.25}) == DeepShrink(4, 1.25, 0.0, 0.35, True, "bicubic", "bicubic")
    with pytest.raises(SdengineError, match="deep shrink block must be"):
        DeepShrink(True, 2.0)  # type: ignore[arg-type]
