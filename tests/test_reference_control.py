"""Reference control without a model (sd-webui-controlnet's ``reference_only``, ``reference_adain``,
``reference_adain+attn``; sdengine.nn.reference): the attention of one layer and AdaIN against their formulas on
fixed tensors; the controlled U-Net's call against a test-side re-implementation of the extension's rule built
from forward hooks on a plain U-Net (the recorded self-attention inputs concatenated to keys and values by hand,
the block statistics transferred by hand); whole images on a tiny random SD1 pipeline (weight 0 is no unit bit for
bit, the image changes, style fidelity acts on the unconditional rows only, the control modes' fidelity); the A1111
route's ``webuiapi.ControlNetUnit(module="reference_only", model="None")`` against the Python call; one-line
errors."""

from __future__ import annotations

import dataclasses
import math

import httpx
import numpy as np
import pytest
import torch
import webuiapi
from PIL import Image

from _live_server import live_server, server_config, shared_loader
from sdengine.errors import ControlNetError, GenerationError
from sdengine.metadata import REFERENCE_MODULES
from sdengine.models.unet import TINY_SD, UNet, UNetConfig
from sdengine.nn.attention import Attention
from sdengine.nn.reference import (
    REFERENCE_KINDS,
    AttentionTap,
    NormTap,
    ReferenceMachine,
    adain,
    attention_layers,
)
from sdengine.nn.transformer import BasicTransformerBlock
from sdengine.pipeline import ControlUnit
from sdengine.pipeline import control as PC

# SD1's layout (4 levels of 2 layers, the last without attention) at a tiny width: the AdaIN points exist
SD1_LAYOUT = UNetConfig(
    in_channels=4,
    out_channels=4,
    sample_size=16,
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=2,
    attention=("cross", "cross", "cross", "none"),
    num_heads=(1, 1, 1, 1),
    cross_attention_dim=12,
    norm_num_groups=4,
)


def picture(w: int = 32, h: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))


def arr(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB")).astype(np.int64)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    b, lq, inner = q.shape
    d = inner // heads
    q = q.view(b, lq, heads, d).transpose(1, 2)
    k = k.view(b, k.shape[1], heads, d).transpose(1, 2)
    v = v.view(b, v.shape[1], heads, d).transpose(1, 2)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (w @ v).transpose(1, 2).reshape(b, lq, inner)


def _attn_by_hand(layer: Attention, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """``to_out(softmax(q k^T / sqrt(d)) v)`` with q from ``x``, k and v from ``kv``: written out."""
    h = _sdpa(layer.to_q(x), layer.to_k(kv), layer.to_v(kv), layer.heads)
    return layer.to_out[0](h)


# -- the formulas on fixed tensors ------------------------------------------------------------------------------


def test_adain_moves_mean_and_std_onto_the_references() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 4, generator=g) * 3 + 1
    ref = torch.randn(2, 3, 5, 4, generator=g) * 0.5 - 2
    var_r, mean_r = torch.var_mean(ref, dim=(2, 3), keepdim=True, correction=0)
    y = adain(x, mean_r, var_r)
    # the formula, per row and channel: (x - mean) / std * std_ref + mean_ref, population statistics
    for b in range(2):
        for c in range(3):
            xs = x[b, c].double()
            m, s = xs.mean(), xs.pow(2).mean().sub(xs.mean() ** 2).sqrt()
            rs = ref[b, c].double()
            mr, sr = rs.mean(), rs.pow(2).mean().sub(rs.mean() ** 2).sqrt()
            np.testing.assert_allclose(y[b, c].double().numpy(), ((xs - m) / s * sr + mr).numpy(), atol=1e-5)
    var_y, mean_y = torch.var_mean(y, dim=(2, 3), keepdim=True, correction=0)
    torch.testing.assert_close(mean_y, mean_r, atol=1e-5, rtol=0)
    torch.testing.assert_close(var_y, var_r, atol=1e-4, rtol=1e-4)
    # a flat channel: the variance is clamped at 1e-6 before the root (no division by zero)
    flat = torch.full((1, 1, 2, 2), 3.0)
    out = adain(flat, torch.tensor(5.0).reshape(1, 1, 1, 1), torch.tensor(4.0).reshape(1, 1, 1, 1))
    assert torch.equal(out, torch.full((1, 1, 2, 2), 5.0))


def test_one_attention_layer_attends_to_the_recorded_tokens_as_the_formula() -> None:
    torch.manual_seed(0)
    layer = Attention(8, 2, 4).eval()
    g = torch.Generator().manual_seed(1)
    x_ref, x = torch.randn(2, 6, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    machine = ReferenceMachine()
    machine.uncond_rows = [1]
    for f in (0.0, 0.3, 1.0):
        tap = AttentionTap(machine, weight=0.5)
        layer.reference = tap
        with torch.no_grad():
            machine.write("reference_only", 0.75, f)  # 0.75 > 0.5: this layer records
            wrote = layer(x_ref)
            plain_ref = _attn_by_hand(layer, x_ref, x_ref)
            machine.read()
            got = layer(x)
            assert tap.bank == []  # a read empties the bank, as the extension's layers do
            again = layer(x)
            layer.reference = None
            plain = layer(x)
            want_ref = _attn_by_hand(layer, x, torch.cat([x, x_ref], dim=1))
        torch.testing.assert_close(wrote, plain_ref, atol=1e-5, rtol=1e-5)  # the write pass answers plainly
        torch.testing.assert_close(got[0], want_ref[0], atol=1e-5, rtol=1e-5)  # cond rows: the reference's answer
        # the unconditional row: f * plain + (1 - f) * reference
        torch.testing.assert_close(got[1], f * plain[1] + (1 - f) * want_ref[1], atol=1e-5, rtol=1e-5)
        assert torch.equal(again, plain)  # nothing recorded: exactly the plain layer
    # a weight not above the layer's: nothing recorded
    tap = AttentionTap(machine, weight=0.5)
    layer.reference = tap
    machine.write("reference_only", 0.5, 0.5)
    layer(x_ref)
    machine.read()
    assert tap.bank == []
    layer.reference = None


def test_norm_tap_blends_the_unconditional_rows_by_fidelity() -> None:
    g = torch.Generator().manual_seed(2)
    ref, x = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g) * 2
    machine = ReferenceMachine()
    machine.uncond_rows = [0]
    tap = NormTap(machine, weight=0.4)
    machine.write("reference_adain", 0.5, 0.25)
    assert torch.equal(tap(ref), ref)
    machine.read()
    got = tap(x)
    var_r, mean_r = torch.var_mean(ref, dim=(2, 3), keepdim=True, correction=0)
    moved = adain(x, mean_r, var_r)
    torch.testing.assert_close(got[1], moved[1])
    torch.testing.assert_close(got[0], 0.25 * x[0] + 0.75 * moved[0])
    assert torch.equal(tap(x), x)  # read once: the bank is empty again


def test_layer_order_and_weights_follow_the_extension() -> None:
    torch.manual_seed(0)
    unet = UNet(SD1_LAYOUT).eval()
    layers = attention_layers(unet)
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    widths = [int(b.norm1.normalized_shape[0]) for b in blocks]
    want = [blocks[i].attn1 for i in sorted(range(len(blocks)), key=lambda i: -widths[i])]  # stable: module order
    assert [id(a) for a in layers] == [id(a) for a in want]
    assert [a.to_q.in_features for a in layers] == sorted((w for w in widths), reverse=True)


# -- the controlled U-Net against a hand-composed re-implementation ------------------------------------------------


def _schedule() -> object:
    from sdengine.diffusion.schedules import NoiseSchedule

    return NoiseSchedule.from_betas(torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2)


def _controlled(unet: UNet, unit: ControlUnit, latent: torch.Tensor, seed: int = 7) -> PC.ControlledUNet:
    return PC.build_controlled_unet(
        unet,
        [unit],
        width=16,
        height=16,
        grid=torch.tensor([500.0]),
        noise_schedule=_schedule(),
        encode_reference=lambda img: latent,
        reference_seed=seed,
    )


def _hand_reference(
    unet: UNet,
    x: torch.Tensor,
    t: torch.Tensor,
    ctx: torch.Tensor,
    latent: torch.Tensor,
    *,
    kind: str,
    weight: float,
    fidelity: float,
    uncond: list[int],
    seed: int,
) -> torch.Tensor:
    """The extension's rule written out on a plain U-Net with forward hooks: the reference latent noised with the
    same generator's draw, one pass recording, one pass reading."""
    ac = _schedule().alphas_cumprod.double()  # type: ignore[attr-defined]
    a = ac[int(torch.round(t.reshape(-1)[0]).item())]
    noise = torch.randn((x.shape[0], *latent.shape[1:]), generator=torch.Generator().manual_seed(seed))
    ref_x = (a.sqrt() * latent + (1 - a).sqrt() * noise).float()
    blocks = sorted(
        (m for m in unet.modules() if isinstance(m, BasicTransformerBlock)), key=lambda b: -b.norm1.normalized_shape[0]
    )
    chosen_attn = (
        [b.attn1 for i, b in enumerate(blocks) if weight > i / len(blocks)] if kind != "reference_adain" else []
    )
    # the AdaIN points of SD1's layout: LDM input_blocks 4, 5 (level 1), 7, 8 (level 2), 10, 11 (level 3, resnets),
    # the middle block, output_blocks 0, 1, 2 (level 3's resnets, the upsampler), 3..5, 6, 7 (attention levels)
    chosen_gn: list[torch.nn.Module] = []
    if kind != "reference_only":
        d, u = unet.down_blocks, unet.up_blocks
        inputs = [d[1].attentions[0], d[1].attentions[1], d[2].attentions[0], d[2].attentions[1], d[3].resnets[0]]
        inputs.append(d[3].resnets[1])
        outputs = [u[0].resnets[0], u[0].resnets[1], u[0].upsamplers[0], u[1].attentions[0], u[1].attentions[1]]
        outputs += [u[1].upsamplers[0], u[2].attentions[0], u[2].attentions[1]]
        points = [(unet.mid_block, 0.0)]
        points += [(m, 2 * (1 - w / 6)) for w, m in enumerate(inputs)]
        points += [(m, 2 * (w / 8)) for w, m in enumerate(outputs)]
        chosen_gn = [m for m, gw in points if weight > gw]
    banks: dict[int, torch.Tensor] = {}
    stats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a: banks.__setitem__(id(m), a[0].clone())) for m in chosen_attn]
    hooks += [
        m.register_forward_hook(
            lambda m, a, out: stats.__setitem__(id(m), torch.var_mean(out, dim=(2, 3), keepdim=True, correction=0))
        )
        for m in chosen_gn
    ]
    with torch.no_grad():
        unet(ref_x, t, encoder_hidden_states=ctx)
    for h in hooks:
        h.remove()

    def attn_hook(m: Attention, args: tuple, out: torch.Tensor) -> torch.Tensor:
        xin = args[0]
        r = _attn_by_hand(m, xin, torch.cat([xin, banks[id(m)]], dim=1))
        c = r.clone()
        if uncond and fidelity > 1e-5:
            c[uncond] = _attn_by_hand(m, xin[uncond], xin[uncond])
        return fidelity * c + (1 - fidelity) * r

    def gn_hook(m: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        var_r, mean_r = stats[id(m)]
        var, mean = torch.var_mean(out, dim=(2, 3), keepdim=True, correction=0)
        r = (out - mean) / var.clamp(min=1e-6).sqrt() * var_r.clamp(min=1e-6).sqrt() + mean_r
        c = r.clone()
        if uncond and fidelity > 1e-5:
            c[uncond] = out[uncond]
        return fidelity * c + (1 - fidelity) * r

    hooks = [m.register_forward_hook(attn_hook) for m in chosen_attn]
    hooks += [m.register_forward_hook(gn_hook) for m in chosen_gn]
    try:
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=ctx)
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize(
    ("config", "kind", "weight", "fidelity"),
    [
        (TINY_SD, "reference_only", 0.6, 0.5),
        (TINY_SD, "reference_only", 1.0, 0.0),
        (SD1_LAYOUT, "reference_adain", 1.0, 0.5),
        (SD1_LAYOUT, "reference_adain+attn", 1.3, 0.8),
    ],
)
def test_controlled_unet_equals_the_hand_composed_rule(config, kind, weight, fidelity) -> None:
    torch.manual_seed(3)
    unet = UNet(config).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    g = torch.Generator().manual_seed(4)
    latent = torch.randn(1, 4, 16, 16, generator=g)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 3, config.cross_attention_dim, generator=g)
    t = torch.tensor([400.3, 400.3])
    unit = ControlUnit(kind, picture(16, 16), weight, style_fidelity=fidelity)
    m = _controlled(unet, unit, latent, seed=7)
    with torch.no_grad():
        got = m(x, t, encoder_hidden_states=ctx, step=0, row_kinds=("cond", "uncond"))
        plain = unet(x, t, encoder_hidden_states=ctx)
    want = _hand_reference(unet, x, t, ctx, latent, kind=kind, weight=weight, fidelity=fidelity, uncond=[1], seed=7)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)  # seen 8e-7 .. 1.9e-6
    assert (got - plain).abs().max() > 1e-3  # it does something
    # the slots are set only inside the call
    assert all(a.reference is None for a in attention_layers(unet))
    assert all(getattr(b, "reference_norm", None) is None for b in [*unet.down_blocks, unet.mid_block, *unet.up_blocks])


def test_controlled_unet_weight_zero_and_inactive_steps_are_the_plain_unet() -> None:
    torch.manual_seed(3)
    unet = UNet(SD1_LAYOUT).eval()
    g = torch.Generator().manual_seed(4)
    latent, x = torch.randn(1, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ctx, t = torch.randn(2, 3, 12, generator=g), torch.tensor(300.0)
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=ctx)
        zero = _controlled(unet, ControlUnit("reference_adain+attn", picture(), 0.0), latent)
        assert torch.equal(zero(x, t, encoder_hidden_states=ctx, step=0, row_kinds=("cond", "uncond")), plain)
        m = PC.build_controlled_unet(
            unet,
            [ControlUnit("reference_only", picture(), 1.0, 0.5, 1.0, rule="a1111")],
            width=16,
            height=16,
            grid=torch.arange(4.0),
            noise_schedule=_schedule(),
            encode_reference=lambda img: latent,
        )
        assert torch.equal(m(x, t, encoder_hidden_states=ctx, step=1, row_kinds=("cond", "uncond")), plain)
        assert not torch.equal(m(x, t, encoder_hidden_states=ctx, step=2, row_kinds=("cond", "uncond")), plain)


def test_fidelity_rule_of_the_modes() -> None:
    assert PC.reference_fidelity("balanced", 0.3) == 0.3
    assert PC.reference_fidelity("balanced", 0.5, sdxl=True) == 0.125  # the extension's SDXL cube
    assert PC.reference_fidelity("prompt", 0.7) == 0.0
    assert PC.reference_fidelity("controlnet", 0.2) == 1.0
    assert PC.reference_fidelity("balanced", 0.7, hires=True) == 0.0
    assert PC.reference_fidelity("controlnet", 0.2, hires=True) == 1.0
    assert tuple(REFERENCE_MODULES) == REFERENCE_KINDS


# -- whole images ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(tiny_sd1_folder):
    import sdengine

    return sdengine.load_pipeline(tiny_sd1_folder, device="cpu")


KW = {"prompt": "a cat", "negative_prompt": "ugly", "steps": 3, "seed": 1, "width": 32, "height": 32}


def test_whole_image_rules(pipe) -> None:
    ref = picture(40, 24, seed=5)
    kw = {**KW, "sampler": "euler", "progress": False}
    base = pipe(**kw).images[0]

    def run(**unit):
        return pipe(**kw, controlnets=[ControlUnit("reference_only", ref, rule="a1111", **unit)])

    zero = run(scale=0.0).images[0]
    assert np.array_equal(arr(zero), arr(base))  # weight 0: no layer records, the image is the plain one
    one = run(style_fidelity=1.0)
    half = run()
    none = run(style_fidelity=0.0)
    assert np.abs(arr(half.images[0]) - arr(base)).max() > 0  # the reference image changes the output
    assert len({arr(r.images[0]).tobytes() for r in (one, half, none)}) == 3  # fidelity moves the uncond rows
    # the control modes set the fidelity: "prompt" 0, "controlnet" 1 (the extension's soft / cfg injection)
    assert np.array_equal(arr(run(mode="prompt", style_fidelity=0.9).images[0]), arr(none.images[0]))
    assert np.array_equal(arr(run(mode="controlnet", style_fidelity=0.1).images[0]), arr(one.images[0]))
    info = half.infotexts[0]
    assert (
        'ControlNet 0: "Module: reference_only, Model: None, Weight: 1, Threshold A: 0.5, Guidance Start: 0, '
        'Guidance End: 1"' in info
    )
    # img2img takes it too
    i2i = pipe(**kw, init_image=picture(32, 32, seed=3), strength=0.6, controlnets=[ControlUnit("reference_only", ref)])
    i2i_plain = pipe(**kw, init_image=picture(32, 32, seed=3), strength=0.6)
    assert np.abs(arr(i2i.images[0]) - arr(i2i_plain.images[0])).max() > 0


def test_nine_channel_inpainting_takes_a_reference(tiny_inpaint_folder) -> None:
    """A 9-channel U-Net's reference pass gets an empty mask and the reference latent as its extra channels (the
    extension's inpaint hijack): it runs, weight 0 is the plain image, weight 1 another."""
    import sdengine

    inpaint = sdengine.load_pipeline(tiny_inpaint_folder, device="cpu")
    mask = np.zeros((32, 32), np.float32)
    mask[8:24, 8:24] = 1
    kw = {**KW, "sampler": "euler", "progress": False, "init_image": picture(32, 32, seed=3), "mask": mask}
    plain = arr(inpaint(**kw).images[0])
    zero = arr(inpaint(**kw, controlnets=[ControlUnit("reference_only", picture(seed=6), 0.0)]).images[0])
    one = arr(inpaint(**kw, controlnets=[ControlUnit("reference_only", picture(seed=6), 1.0)]).images[0])
    assert np.array_equal(zero, plain) and np.abs(one - plain).max() > 0


def test_errors_are_one_line(pipe) -> None:
    img = picture()
    cases = [
        (lambda: ControlUnit("reference_only", img, style_fidelity=1.5), "style_fidelity must be a number in [0, 1]"),
        (lambda: ControlUnit("some.safetensors", img, style_fidelity=0.5), "style_fidelity is a reference unit's"),
        (lambda: ControlUnit("Reference_Only", img, style_fidelity=0.5), "spelt 'reference_only'"),
        (lambda: ControlUnit("reference_only", img, module="canny"), "no preprocessor"),
        (lambda: ControlUnit("reference_only", img, mode="loud"), "unknown ControlNet control mode"),
    ]
    for make, text in cases:
        with pytest.raises(ControlNetError) as e:
            make()
        assert text in str(e.value) and "\n" not in str(e.value)
    # AdaIN needs SD1/SD2's or SDXL's layout: the tiny pipeline's U-Net has 2 levels of 1 layer
    with pytest.raises(ControlNetError, match="reference_adain is defined for SD1/SD2") as e:
        pipe(**KW, progress=False, controlnets=[ControlUnit("reference_adain", img)])
    assert "\n" not in str(e.value)
    with pytest.raises(GenerationError, match="reference control and PAG"):
        pipe(**KW, progress=False, pag_scale=1.0, controlnets=[ControlUnit("reference_only", img)])


def test_hires_second_pass_runs_with_fidelity_zero(pipe) -> None:
    """The extension's reference units run with style fidelity 0 in the hires fix's second pass ("ControlNet is
    more important": 1): the second pass of fidelity 0.8 equals that of fidelity 0 when the first passes agree."""
    from sdengine.pipeline import hires
    from sdengine.pipeline.request import GenerationRequest

    hr = {**KW, "enable_hr": True, "hr_scale": 2, "strength": 0.5}
    r = pipe.prepare(GenerationRequest(**hr, controlnets=[ControlUnit("reference_only", picture())]))
    second = hires.second_prepared(r)
    assert [u.style_fidelity for u in second.request.control_units()] == [0.0]
    unit = ControlUnit("reference_only", picture(), mode="controlnet", style_fidelity=0.2)
    r = pipe.prepare(GenerationRequest(**hr, controlnets=[unit]))
    assert [u.style_fidelity for u in hires.second_prepared(r).request.control_units()] == [0.2]


# -- the A1111 route ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with live_server(server_config(tmp_path_factory.mktemp("reference"))) as s:
        yield s


@pytest.fixture()
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="DPM++ 2M", scheduler="Karras")


def test_native_job_reference_unit(server) -> None:
    import base64
    import io

    from _live_server import run_job, wait_job

    buf = io.BytesIO()
    picture(64, 64, seed=4).save(buf, format="PNG")
    image = base64.b64encode(buf.getvalue()).decode()
    gen = {"seed": 3, "steps": 3, "width": 64, "height": 64, "sampler": "dpmpp_2m", "schedule": "karras"}
    unit = {"model": "reference_adain+attn", "image": image, "weight": 0.9, "style_fidelity": 0.2}
    with httpx.Client(base_url=server.url, timeout=300) as c:
        # the emoji model's U-Net has 3 levels of 1 layer: AdaIN is refused in one line; attention runs
        r = c.post("/v1/jobs", json={"prompt": "a red apple", **gen, "controlnets": [unit]})
        assert r.status_code == 202, r.text
        failed = wait_job(c, r.json()["id"])
        assert failed["state"] == "failed" and "reference_adain is defined for SD1/SD2" in str(failed), failed
        got, _ = run_job(c, {"prompt": "a red apple", **gen, "controlnets": [{**unit, "model": "reference_only"}]})
        bad = c.post("/v1/jobs", json={"prompt": "a", **gen, "controlnets": [{**unit, "preprocessor": "canny"}]})
        assert bad.status_code == 400 and "takes the image as it is" in bad.text
        cn = {**unit, "model": "emoji-controlnet-canny"}
        bad = c.post("/v1/jobs", json={"prompt": "a", **gen, "controlnets": [cn]})
        assert bad.status_code == 400 and "style_fidelity is a reference unit's" in bad.text
        bad = c.post("/v1/jobs", json={"prompt": "a", **gen, "controlnets": [{**unit, "style_fidelity": 1.5}]})
        assert bad.status_code in (400, 422)
    want = shared_loader("emoji", "cpu")(
        "a red apple",
        **gen,
        progress=False,
        controlnets=[ControlUnit("reference_only", picture(64, 64, seed=4), 0.9, style_fidelity=0.2)],
    )
    np.testing.assert_array_equal(got, np.asarray(want.images[0].convert("RGB")))


def test_a1111_reference_unit_equals_the_python_call(api) -> None:
    ref = picture(64, 64, seed=4)
    common = {"steps": 3, "width": 64, "height": 64, "cfg_scale": 7.0}
    unit = webuiapi.ControlNetUnit(image=ref, module="reference_only", model="None", weight=0.8, guidance_end=0.7)
    r = api.txt2img(prompt="a star", seed=9, controlnet_units=[unit], alwayson_scripts={}, **common)
    kw = {"sampler": "dpmpp_2m", "schedule": "karras", "strength_rule": "a1111", "progress": False, **common}
    want = shared_loader("emoji", "cpu")(
        "a star", seed=9, controlnets=[ControlUnit("reference_only", ref, 0.8, 0.0, 0.7, rule="a1111")], **kw
    )
    np.testing.assert_array_equal(arr(r.image), arr(want.images[0]))
    plain = shared_loader("emoji", "cpu")("a star", seed=9, **kw)
    assert np.abs(arr(r.image) - arr(plain.images[0])).max() > 0
    info = r.info["infotexts"][0]
    # webuiapi's threshold_a 64 is outside the slider's [0, 1]: the extension's default 0.5
    assert 'ControlNet 0: "Module: reference_only, Model: None, Weight: 0.8, Threshold A: 0.5' in info
    assert r.info["ignored"] == []
    # threshold_a in [0, 1] is the style fidelity; control_mode 1 ("My prompt is more important") sets it to 0
    unit = webuiapi.ControlNetUnit(image=ref, module="reference_only", model="None", threshold_a=0.0)
    r0 = api.txt2img(prompt="a star", seed=9, controlnet_units=[unit], alwayson_scripts={}, **common)
    unit = webuiapi.ControlNetUnit(image=ref, module="reference_only", model="None", threshold_a=0.9, control_mode=1)
    r1 = api.txt2img(prompt="a star", seed=9, controlnet_units=[unit], alwayson_scripts={}, **common)
    np.testing.assert_array_equal(arr(r0.image), arr(r1.image))
    assert (
        "Threshold A: 0.9" in r1.info["infotexts"][0]
        and "Control Mode: My prompt is more important" in (r1.info["infotexts"][0])
    )
    assert "reference_only" in api.controlnet_module_list()
    # AdaIN on the emoji model (3 levels of 1 layer): one line, no image
    unit = webuiapi.ControlNetUnit(image=ref, module="reference_adain", model="None")
    body = {"prompt": "a", "alwayson_scripts": {"controlnet": {"args": [unit.to_dict()]}}, **common}
    bad = httpx.post(f"{api.baseurl}/txt2img", json=body, timeout=120)
    assert bad.status_code >= 400 and "reference_adain is defined for SD1/SD2" in bad.text, bad.text


def test_dataclass_round_trip_keeps_the_fidelity() -> None:
    from sdengine.pipeline.request import GenerationRequest

    u = ControlUnit("reference_adain", picture(), 0.7, style_fidelity=0.25)
    r = GenerationRequest(prompt="x", controlnets=[u])
    d = r.to_dict()["controlnets"][0]
    assert d["style_fidelity"] == 0.25 and d["model"] == "reference_adain"
    assert ControlUnit.coerce(d) == dataclasses.replace(u, image=d["image"])


def test_cli_control_reference_needs_no_controlnet(pipe, tiny_sd1_folder, tmp_path, capsys) -> None:
    from sdengine.cli import main

    ref = tmp_path / "ref.png"
    picture(32, 32, seed=4).save(ref)
    out = tmp_path / "out.png"
    args = ["generate", "a cat", "--model", str(tiny_sd1_folder), "--steps", "2", "--width", "32", "--height", "32"]
    args += ["--seed", "1", "--no-progress", "--out", str(out)]
    assert main([*args, "--control", f"reference_only:{ref}:0.9", "--control-threshold-a", "0.3"]) == 0
    info = Image.open(out).info["parameters"]
    assert 'ControlNet 0: "Module: reference_only, Model: None, Weight: 0.9, Threshold A: 0.3' in info
    kw = {"sampler": "dpmpp_2m", "schedule": "karras", "progress": False, "steps": 2, "width": 32, "height": 32}
    want = pipe("a cat", seed=1, controlnets=[ControlUnit("reference_only", str(ref), 0.9, style_fidelity=0.3)], **kw)
    np.testing.assert_array_equal(arr(Image.open(out)), arr(want.images[0]))
    # a model-free control next to a modelled one: only the modelled one pairs with --controlnet
    capsys.readouterr()
    assert main([*args, "--control", f"reference_only:{ref}", "--control", f"canny:{ref}"]) != 0
    assert "1 --control but 0 --controlnet" in capsys.readouterr().err
    assert main([*args, "--control", f"reference_only:{ref}", "--control-res", "256"]) != 0
    assert "reference_only takes the image as it is" in capsys.readouterr().err
    assert main([*args, "--control", f"reference_only:{ref}", "--control-threshold-b", "5"]) != 0
    assert "reference_only has no threshold B" in capsys.readouterr().err
    again = ["generate", "--from-png", str(out), "--model", str(tiny_sd1_folder), "--no-progress"]
    assert main([*again, "--out", str(tmp_path / "again.png"), "--control", f"reference_only:{ref}"]) != 0
    err = capsys.readouterr().err
    assert "--from-png does not remake reference units" in err and len(err.strip().splitlines()) == 1, err
