"""sd-webui-controlnet's control modes on a ControlNet unit (``ControlUnit.mode``): "My prompt is more important"
(the soft weights: residual i of 13 times 0.825 ** (12 - i)), "ControlNet is more important" (those weights, on
the conditional rows of classifier-free guidance only), and the extension's ``pixel_perfect`` resolution."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sdengine.errors import ControlNetError
from sdengine.metadata import MetadataError, parse_parameters, recorded_controlnets
from sdengine.models.controlnet import ControlNet, ControlNetConfig
from sdengine.models.unet import TINY_SD, UNet
from sdengine.pipeline import control as PC
from sdengine.server.a1111 import control_units, pixel_perfect_resolution


class Recorder(torch.nn.Module):
    """A U-Net that records the residuals it is handed."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.unet = UNet(TINY_SD).eval()
        self.calls: list[dict] = []

    def forward(self, x, t, **kw):
        self.calls.append(kw)
        return self.unet(x, t, **kw)


def _net() -> ControlNet:
    torch.manual_seed(1)
    net = ControlNet(ControlNetConfig.from_unet(TINY_SD, conditioning_embedding_out_channels=(8, 16))).eval()
    with torch.no_grad():  # zero convolutions of a fresh net give zero residuals: make them say something
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net


def _run(mode: str, scale: float = 0.8, guess: bool = False):
    net, rec = _net(), Recorder()
    img = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    unit = PC.ControlUnit(net, img, scale, mode=mode)
    m = PC.build_controlled_unet(rec, [unit], width=16, height=16, grid=torch.tensor([500.0]), guess_mode=guess)
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 32, generator=g)
    t = torch.tensor(500.0)
    with torch.no_grad():
        m(x, t, encoder_hidden_states=ctx, step=0, row_kinds=("cond", "uncond"))
        plain = net(x, t, m.units[0].image.expand(2, -1, -1, -1), encoder_hidden_states=ctx, scale=scale)
    kw = rec.calls[-1]
    return [*kw["down_block_additional_residuals"], kw["mid_block_additional_residual"]], [*plain[0], plain[1]]


def test_prompt_mode_hands_the_unet_the_soft_weighted_residuals() -> None:
    got, plain = _run("prompt")
    n = len(plain)
    assert n == 5  # the tiny U-Net's 4 skips and its middle block
    # the extension zips its 13 factors 0.825 ** (12 - i) with the residuals, highest resolution first
    for i, (g, p) in enumerate(zip(got, plain, strict=True)):
        assert p.abs().max() > 1e-3
        torch.testing.assert_close(g, p * 0.825 ** float(12 - i), rtol=1e-4, atol=1e-6)
    balanced, plain = _run("balanced")
    for g, p in zip(balanced, plain, strict=True):
        torch.testing.assert_close(g, p, rtol=1e-4, atol=1e-6)
    assert PC.soft_scales(13)[-1] == 1.0 and PC.soft_scales(13)[0] == pytest.approx(0.825**12)
    assert PC.soft_scales(4, adapter=True) == [0.25, 0.62, 0.825, 1.0]


def test_controlnet_mode_controls_the_conditional_rows_only_with_the_soft_weights() -> None:
    got, plain = _run("controlnet")
    for i, (g, p) in enumerate(zip(got, plain, strict=True)):
        assert torch.equal(g[1], torch.zeros_like(g[1]))  # the unconditional row: no control
        torch.testing.assert_close(g[0], p[0] * 0.825 ** float(12 - i), rtol=1e-4, atol=1e-6)
    prompt, _ = _run("prompt")
    assert all(p[1].abs().max() > 0 for p in prompt)  # "My prompt is more important" controls both rows
    # diffusers' guess mode (the logspace 0.1 .. 1 weights) is not the extension's mode
    guess, _ = _run("balanced", guess=True)
    assert not torch.allclose(guess[0][0], got[0][0])


def test_control_mode_names_round_trip_and_bad_modes_are_refused() -> None:
    unit = PC.ControlUnit("x.safetensors", None, 0.5, mode="controlnet")
    text = f'a\nSteps: 2, Seed: 1, ControlNet 0: "{unit.infotext()}"'
    assert "Control Mode: ControlNet is more important" in unit.infotext()
    assert [r.mode for r in recorded_controlnets(parse_parameters(text))] == ["controlnet"]
    hr = dataclasses.replace(unit, mode="balanced", hires_mode="prompt")
    text = f'a\nSteps: 2, Seed: 1, ControlNet 0: "{hr.infotext()}"'
    assert [(r.mode, r.hires_mode) for r in recorded_controlnets(parse_parameters(text))] == [("balanced", "prompt")]
    assert "Control Mode" not in dataclasses.replace(unit, mode="balanced").infotext()
    a1111 = 'a\nSteps: 2, Seed: 1, ControlNet 0: "Module: canny, Model: x [abcdef12], Weight: 1, Control Mode: Strong"'
    with pytest.raises(MetadataError, match="ControlNet 0: unknown Control Mode 'Strong'; known: Balanced, My prompt"):
        recorded_controlnets(parse_parameters(a1111))
    with pytest.raises(ControlNetError, match="unknown ControlNet control mode 'guess'; use one of: balanced"):
        PC.ControlUnit("x", None, mode="guess")


def test_a1111_units_map_control_mode_and_pixel_perfect() -> None:
    ignored: list[str] = []
    base = {"image": "aGk=", "model": "emoji-controlnet-canny", "module": "canny"}
    args = [
        {**base, "control_mode": 1},
        {**base, "control_mode": "ControlNet is more important", "pixel_perfect": True, "processor_res": 512},
        {**base, "control_mode": 0, "pixel_perfect": True, "module": "none"},
    ]
    units, _, res = control_units(args, None, ignored)
    assert [u.mode for u in units] == ["prompt", "controlnet", "balanced"] and ignored == []
    # pixel perfect (0: from the image's size) wins over processor_res; module none: no scale; none sent: 512
    assert res == {0: 512, 1: 0}
    with pytest.raises(Exception, match="pixel_perfect must be true or false"):
        control_units([{**base, "pixel_perfect": "yes"}], None, [])


def test_a1111_unit_processor_res_of_minus_one_is_the_preprocessors_default_512() -> None:
    """The extension's -1 (and a unit that sends none) is its preprocessor's default resolution, 512 for every
    preprocessor that scales the image (once: the image was not scaled at all); invert and none take the image
    as it is, whatever processor_res says (the extension's invert has no resolution)."""
    base = {"image": "aGk=", "model": "emoji-controlnet-canny", "module": "canny"}
    args = [
        {**base, "processor_res": -1, "threshold_a": -1, "threshold_b": -1},
        base,
        {**base, "module": "threshold", "processor_res": -1},
        {**base, "processor_res": 256},
        {**base, "module": "invert (from white bg & black line)", "processor_res": 256},
        {**base, "module": "none", "processor_res": -1},
    ]
    units, _, res = control_units(args, None, [])
    assert res == {0: 512, 1: 512, 2: 512, 3: 256}
    assert units[0].options == {"low": 100.0, "high": 200.0} and units[2].options == {}  # -1: the defaults


def test_pixel_perfect_resolution_is_the_extensions() -> None:
    # a 300x200 (w x h) image for a 512x768 output: k_h 3.84, k_w 1.7067; the short side 200 times the larger
    # (Just Resize, Crop and Resize) or the smaller (Resize and Fill)
    assert pixel_perfect_resolution((300, 200), 512, 768, 0) == 768
    assert pixel_perfect_resolution((300, 200), 512, 768, 1) == 768
    assert pixel_perfect_resolution((300, 200), 512, 768, 2) == 341
    assert pixel_perfect_resolution((64, 64), 64, 64, 1) == 64


@pytest.mark.slow  # two hires generations of the shipped emoji model
def test_the_hires_pass_runs_a_units_hires_mode(monkeypatch) -> None:
    """sd-webui-controlnet forces its soft weights on a canny unit in the hires fix's second pass: the A1111 route
    gives its canny units hires_mode "prompt", which the second pass runs (the first keeps the unit's mode)."""
    import numpy as np
    from PIL import Image

    import sdengine
    from sdengine.pipeline import core

    seen: list[list[str]] = []
    real = core.build_controlled_unet

    def spy(unet, units, **kw):
        seen.append([PC.ControlUnit.coerce(u).mode for u in units])
        return real(unet, units, **kw)

    monkeypatch.setattr(core, "build_controlled_unet", spy)
    edges = np.zeros((32, 32, 3), np.uint8)
    edges[8:24, 10] = edges[8:24, 22] = 255
    pipe = sdengine.load_pipeline("emoji", fast_path="none")
    unit = PC.ControlUnit("emoji-controlnet-canny", Image.fromarray(edges), hires_mode="prompt")
    kw = {"steps": 2, "seed": 4, "width": 32, "height": 32, "progress": False, "strength": 0.5, "enable_hr": True}
    soft = pipe("a red apple", controlnets=[unit], **kw).arrays
    assert seen == [["balanced"], ["prompt"]]
    plain = pipe("a red apple", controlnets=[dataclasses.replace(unit, hires_mode=None)], **kw).arrays
    assert seen[2:] == [["balanced"], ["balanced"]] and not np.array_equal(soft, plain)


def test_a1111_canny_units_take_the_soft_weights_in_the_hires_pass() -> None:
    canny = {"image": "aGk=", "model": "emoji-controlnet-canny", "module": "canny"}
    units, _, _ = control_units([canny, {**canny, "module": "none"}, {**canny, "control_mode": 2}], None, [])
    assert [u.hires_mode for u in units] == ["prompt", None, None]
