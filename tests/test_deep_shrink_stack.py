"""Chained Deep Shrink patches (ComfyUI's PatchModelAddDownscale nodes one after another) stack as ComfyUI's patch
lists do: checked against a U-Net forward written here in ComfyUI's order (openaimodel.py: at input block k, every
``input_block_patch`` in order, the skip kept, every ``input_block_patch_after_skip`` in order; at each output block
every ``output_block_patch`` in order, the first resizing the hidden state to the skip's size where they differ)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _comfy_live import live_client, output_image, run_prompt
from _live_server import server_config, shared_loader
from sdengine.diffusion.schedules import NoiseSchedule
from sdengine.errors import SdengineError
from sdengine.models.unet import UNet, UNetConfig
from sdengine.nn.deep_shrink import DeepShrink, DeepShrinkDenoiser, deep_shrink_applied, deep_shrink_chain
from sdengine.nn.resize import bislerp

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


def small_unet() -> UNet:
    torch.manual_seed(0)
    unet = UNet(SMALL).eval()
    with torch.no_grad():  # random, not zero-initialised, output layers: every path shows in the result
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return unet


def resize(x: torch.Tensor, size: tuple[int, int], method: str) -> torch.Tensor:
    if method == "bislerp":
        return bislerp(x, size[1], size[0])
    corners = {"align_corners": False} if method in ("bilinear", "bicubic") else {}
    return F.interpolate(x, size=size, mode=method, **corners)


def comfy_forward(
    unet: UNet, x: torch.Tensor, t: Any, ctx: torch.Tensor, chain: list[DeepShrink], labels: Any = None
) -> torch.Tensor:
    """One call of ``unet`` with every setting of ``chain`` patched in (all in their windows), the blocks called here
    in ComfyUI's order with its patch lists (module docstring); the output blocks' upsample goes to the next skip's
    size, nearest."""
    emb = unet.embed(x, t, labels)
    before = [s for s in chain if not s.after_skip]
    after = [s for s in chain if s.after_skip]
    hs: list[torch.Tensor] = []
    n = 0

    def shrink(h: torch.Tensor, s: DeepShrink) -> torch.Tensor:
        if n != s.block:
            return h
        new = (round(h.shape[-2] * (1.0 / s.factor)), round(h.shape[-1] * (1.0 / s.factor)))
        return h if new == tuple(h.shape[-2:]) else resize(h, new, s.downscale_method)

    def keep(h: torch.Tensor) -> torch.Tensor:
        nonlocal n
        for s in before:
            h = shrink(h, s)
        hs.append(h)
        for s in after:
            h = shrink(h, s)
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
    if unet.mid_block is not None:
        h = unet.mid_block(h, emb, ctx)
    for blk in unet.up_blocks:
        for i, res in enumerate(blk.resnets):
            skip = hs.pop()
            for s in chain:  # every output_block_patch in order: the first that sees a difference resizes
                if h.shape[-2:] != skip.shape[-2:]:
                    h = resize(h, tuple(skip.shape[-2:]), s.upscale_method)
            h = res(torch.cat([h, skip], dim=1), emb)
            if blk.attentions is not None:
                h = blk.attentions[i](h, ctx)
        if blk.upsamplers is not None:
            h = blk.upsamplers[0].conv(F.interpolate(h, size=tuple(hs[-1].shape[-2:]), mode="nearest"))
    return unet.conv_out(F.silu(unet.conv_norm_out(h)))


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 14, 10, generator=g)  # odd halves: 7 x 5 below the downsample
    return x, torch.tensor([500.0, 500.0]), torch.randn(2, 5, 16, generator=g)


CHAINS = [
    # two blocks of one down block (one slot there could hold only one)
    [DeepShrink(3, 2.0), DeepShrink(1, 1.5, after_skip=False, downscale_method="bilinear", upscale_method="area")],
    # one block shrunk after its skip, then (a later node) before it: the "before" one runs first
    [DeepShrink(3, 2.0, upscale_method="bilinear"), DeepShrink(3, 1.5, after_skip=False, downscale_method="bislerp")],
    # one block twice after its skip, in chain order; the up blocks resize with the first node's method
    [DeepShrink(2, 1.5, downscale_method="area"), DeepShrink(2, 1.4, upscale_method="nearest-exact")],
    # the last block (its output goes into the middle block), and a growing one before it
    [DeepShrink(5, 2.0), DeepShrink(4, 0.5, after_skip=False, upscale_method="bislerp")],
    # three nodes
    [DeepShrink(1, 1.3), DeepShrink(3, 1.5, after_skip=False), DeepShrink(4, 1.5, downscale_method="nearest-exact")],
]


@pytest.mark.parametrize("chain", CHAINS)
def test_a_chain_equals_comfyuis_patch_lists_by_hand_and_neither_node_alone(chain):
    unet = small_unet()
    x, t, ctx = _inputs()
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=ctx)
        with deep_shrink_applied(unet, chain):
            got = unet(x, t, encoder_hidden_states=ctx)
        want = comfy_forward(unet, x, t, ctx, chain)
        alone = []
        for s in chain:
            with deep_shrink_applied(unet, s):
                alone.append(unet(x, t, encoder_hidden_states=ctx))
        again = unet(x, t, encoder_hidden_states=ctx)
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for one in alone:  # the last node alone (what sdengine ran before) or any other is another image
        assert float((got - one).abs().mean()) > 1e-4
    assert torch.equal(again, plain)  # the hooks and slots are gone after the block
    assert all(b.regrow is None for b in unet.up_blocks) and all(b.shrink is None for b in unet.down_blocks)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())


@pytest.mark.parametrize(
    "single",
    [DeepShrink(3, 2.0), DeepShrink(1, 1.5, after_skip=False, downscale_method="bicubic"), DeepShrink(5, 2.0)],
)
def test_the_hooks_of_a_chain_run_one_setting_as_the_single_slot_does(single):
    """A chain whose second node changes no size (factor 1) runs through the hooks: the same numbers as the one
    setting through the down block's slot."""
    unet = small_unet()
    x, t, ctx = _inputs()
    with torch.no_grad():
        with deep_shrink_applied(unet, single):
            slot = unet(x, t, encoder_hidden_states=ctx)
        with deep_shrink_applied(unet, [single, DeepShrink(2, 1.0, after_skip=not single.after_skip)]):
            hooked = unet(x, t, encoder_hidden_states=ctx)
    torch.testing.assert_close(hooked, slot, rtol=0, atol=1e-6)


def test_the_denoiser_runs_the_settings_whose_windows_hold_each_call():
    """Windows: the first node over the schedule's first half, the second from 20 % to 90 %. A call in both runs
    the two (stacked); a call in the second's only runs it with the first node's upscale method (ComfyUI's first
    output patch resizes); the others run what their windows say."""
    unet = small_unet()
    schedule = NoiseSchedule.from_config()
    first = DeepShrink(3, 2.0, 0.0, 0.5, upscale_method="nearest-exact")
    second = DeepShrink(1, 1.5, 0.2, 0.9, after_skip=False, upscale_method="bicubic")
    x, t, ctx = _inputs()
    seen: list[float] = []

    class Inner:
        def __init__(self) -> None:
            self.schedule = schedule

        def __call__(self, xx: torch.Tensor, sigma: torch.Tensor, **_: Any) -> torch.Tensor:
            seen.append(float(sigma.reshape(-1)[0]))
            return unet(xx, t, encoder_hidden_states=ctx)  # type: ignore[no-any-return]

    den = DeepShrinkDenoiser(Inner(), unet, [first, second])
    (a_hi, a_lo), (b_hi, b_lo) = den.windows
    assert a_hi > b_hi > a_lo > b_lo > 0  # the two overlap between the second's start and the first's end
    cases = {
        b_hi * 1.5: [first],  # the first's only (its window starts above everything)
        (a_lo + b_hi) / 2: [first, second],  # both
        (a_lo + b_lo) / 2: [second],  # the second's only
        b_lo * 0.5: [],  # neither
    }
    with torch.no_grad():
        for sigma, active in cases.items():
            got = den(x, torch.tensor([sigma, sigma]))
            ups = [DeepShrink(*s.key[:-1], first.upscale_method) for s in active]
            torch.testing.assert_close(got, comfy_forward(unet, x, t, ctx, ups), rtol=1e-5, atol=1e-5)
        assert seen == pytest.approx(list(cases), rel=1e-6)
    with pytest.raises(SdengineError, match="at least one setting"):
        DeepShrinkDenoiser(den.inner, unet, [])


def test_chains_read_as_settings_and_bad_chains_are_one_line_errors():
    assert deep_shrink_chain(None) == () and deep_shrink_chain([]) == ()
    assert deep_shrink_chain((3, 2.0)) == (DeepShrink(3, 2.0),)
    assert deep_shrink_chain({"block": 2}) == (DeepShrink(2),)
    assert deep_shrink_chain([(3, 2.0), {"block": 1, "factor": 1.5}]) == (DeepShrink(3, 2.0), DeepShrink(1, 1.5))
    for bad, why in (
        ([(3, 2.0)] * 17, "at most 16 chained deep shrink settings"),
        ([(3, 2.0), (40, 2.0)], "deep shrink block must be an input block number"),
        ([(3, 2.0), "x"], "deep shrink takes"),
    ):
        with pytest.raises(SdengineError, match=why) as e:
            deep_shrink_chain(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(SdengineError, match="deep shrink block 9 is not an input block"):
        with deep_shrink_applied(small_unet(), [DeepShrink(3, 2.0), DeepShrink(9, 2.0)]):
            pass


# --------------------------------------------------------------------------------------- through ComfyUI's API


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    with live_client(server_config(tmp_path_factory.mktemp("deep_shrink_stack")), timeout=300) as (_, c):
        yield c


def _workflow(*patches: dict) -> dict:
    g: dict[str, Any] = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "emoji"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 96, "height": 96, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 3, "steps": 3, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "stack"}},
    }  # fmt: skip
    model = ["1", 0]
    for i, patch in enumerate(patches):
        g[f"p{i}"] = {"class_type": "PatchModelAddDownscale", "inputs": {"model": model, **patch}}
        model = [f"p{i}", 0]
    g["6"]["inputs"]["model"] = model
    return g


def _patch(block: int, factor: float, after: bool, down: str, up: str) -> dict:
    return {"block_number": block, "downscale_factor": factor, "start_percent": 0.0, "end_percent": 1.0,
            "downscale_after_skip": after, "downscale_method": down, "upscale_method": up}  # fmt: skip


def test_two_chained_nodes_through_the_api_equal_the_u_net_patched_by_hand(client):
    """Two PatchModelAddDownscale nodes over the whole schedule: the image is the plain workflow's with the U-Net's
    forward replaced by :func:`comfy_forward` of both settings; it is neither node's image alone."""
    a, b = _patch(2, 2.0, True, "bicubic", "bilinear"), _patch(1, 1.5, False, "bilinear", "bicubic")
    got = output_image(client, run_prompt(client, _workflow(a, b)), "8")
    only_a = output_image(client, run_prompt(client, _workflow(a)), "8")
    only_b = output_image(client, run_prompt(client, _workflow(b)), "8")
    pipe = shared_loader("emoji", "cpu")  # the server's worker runs this same pipeline in this process
    unet = pipe.unet
    chain = [DeepShrink(2, 2.0, 0.0, 1.0, True, "bicubic", "bilinear"), DeepShrink(1, 1.5, 0.0, 1.0, False, "bilinear")]

    def by_hand(x: torch.Tensor, t: Any, *, encoder_hidden_states: torch.Tensor, **rest: Any) -> torch.Tensor:
        labels = rest.pop("class_labels", None)
        assert all(v is None for v in rest.values()), rest
        return comfy_forward(unet, x, t, encoder_hidden_states, chain, labels)

    unet.forward = by_hand
    try:
        want = output_image(client, run_prompt(client, _workflow()), "8")
    finally:
        del unet.forward
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, only_a) and not np.array_equal(got, only_b)


def test_the_node_appends_to_the_chain_and_stops_at_sixteen():
    from sdengine.server.comfy.nodes import ModelHandle, NodeError
    from sdengine.server.comfy.nodes_patches import patch_model_add_downscale

    model = ModelHandle(ref="emoji")
    for block in (3, 1):
        (model,) = patch_model_add_downscale(None, model, block, 2.0, 0.0, 0.35, True, "bicubic", "bilinear")  # type: ignore[arg-type]
    assert model.deep_shrink == (DeepShrink(3, 2.0, upscale_method="bilinear").key, DeepShrink(1, 2.0, 0.0, 0.35,
                                 upscale_method="bilinear").key)  # fmt: skip
    assert deep_shrink_chain(model.deep_shrink) == (DeepShrink(3, 2.0, upscale_method="bilinear"),
                                                    DeepShrink(1, 2.0, upscale_method="bilinear"))  # fmt: skip
    full = dataclasses.replace(model, deep_shrink=(DeepShrink().key,) * 16)
    with pytest.raises(NodeError, match="at most 16 chained PatchModelAddDownscale nodes") as e:
        patch_model_add_downscale(None, full, 3, 2.0, 0.0, 0.35, True, "bicubic", "bicubic")  # type: ignore[arg-type]
    assert "\n" not in str(e.value)


def test_the_pipeline_request_holds_one_setting_and_says_so_for_a_chain():
    from sdengine.pipeline import GenerationError
    from sdengine.pipeline.request import GenerationRequest

    with pytest.raises(GenerationError, match="takes one setting, not a chain") as e:
        GenerationRequest(prompt="a cat", deep_shrink=[(3, 2.0), (1, 1.5)]).validate()
    assert "\n" not in str(e.value)
    with pytest.raises(SdengineError, match="takes one setting, not a chain"):
        DeepShrink.coerce([DeepShrink(3, 2.0)])
