"""The whole sampling loop replayed as one graph (sdengine.pipeline.loop_graph, fast-path ``cuda_graph_loop``).

On the CPU the recording backend is the stand-in of tests/_cpu_graphs.py: its replay runs the recorded Python
again, on the static input buffers, with the plan the recording was made for (the loop graph keeps the first plan
of each key). So a setting missing from the plan's key shows here as a wrong image, as it would on a GPU, where
the replay repeats the recorded kernels with the recorded coefficients.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import sdengine
from _cpu_graphs import CPUBackend, HostTraffic
from sdengine.pipeline import Cancelled
from sdengine.pipeline.loop_graph import LoopPlan


@pytest.fixture(scope="module")
def tiny_pipe(tiny_sd1_folder):
    return sdengine.load_pipeline(tiny_sd1_folder, device="cpu", dtype="fp32", fast_path="none")


def _gen(pipe, prompt: str = "a red cube", **kw: Any) -> np.ndarray:
    # 32x32: the tiny VAE's 16x16 latents, the tiny U-Net's sample size (what a replay must equal needs no more)
    args: dict[str, Any] = {"steps": 4, "seed": 3, "width": 32, "height": 32, "progress": False}
    args.update(kw)
    return pipe(prompt, "blurry", **args).arrays


@pytest.fixture
def looped(tiny_pipe):
    # record_after=0: recorded at the first call, so each test's first image already comes from the loop graph
    tiny_pipe.enable_loop_graph(backend=CPUBackend(), device_type="cpu", record_after=0)
    try:
        yield tiny_pipe
    finally:
        tiny_pipe.cuda_graphs = None


def _plain(pipe, **kw: Any) -> np.ndarray:
    graphs, pipe.cuda_graphs = pipe.cuda_graphs, None
    try:
        return _gen(pipe, **kw)
    finally:
        pipe.cuda_graphs = graphs


def test_loop_replays_give_the_plain_images_for_new_prompts_and_seeds(looped):
    loop, unet = looped.cuda_graphs["loop"], looped.cuda_graphs["unet"]
    first = _gen(looped, batch_size=2)
    other = _gen(looped, "a blue ball", seed=11, batch_size=2)
    assert (loop.recordings, loop.replays) == (1, 2)  # one recording serves both: prompts and seeds are inputs
    assert unet.replays == 0  # the loop runs the plain network inside its own recording
    np.testing.assert_array_equal(first, _plain(looped, batch_size=2))
    np.testing.assert_array_equal(other, _plain(looped, prompt="a blue ball", seed=11, batch_size=2))
    assert not np.array_equal(first, other)


@pytest.mark.parametrize(
    "change",
    [
        {"cfg_scale": 3.0},
        {"steps": 6},
        {"sampler": "euler"},
        {"schedule": "exponential"},
        {"guidance_rescale": 0.7},
        {"sampler": "lms", "sampler_options": {"order": 2}},
    ],
    ids=lambda c: ",".join(c),
)
def test_every_setting_the_loop_bakes_in_keys_a_new_recording(looped, change):
    loop = looped.cuda_graphs["loop"]
    _gen(looped)
    assert loop.recordings == 1
    changed = _gen(looped, **change)
    assert loop.recordings == 2  # a replay of the first recording would have given the first settings' image
    np.testing.assert_array_equal(changed, _plain(looped, **change))


def test_img2img_replays_with_its_strength_in_the_key(looped):
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    loop = looped.cuda_graphs["loop"]
    half = _gen(looped, init_image=init, strength=0.5)
    most = _gen(looped, init_image=init, strength=0.8)
    assert loop.recordings == 2 and loop.replays == 2
    np.testing.assert_array_equal(half, _plain(looped, init_image=init, strength=0.5))
    np.testing.assert_array_equal(most, _plain(looped, init_image=init, strength=0.8))


@pytest.mark.parametrize(
    "kw",
    [
        {"sampler": "euler_a"},
        {"sampler": "dpm2_a"},
        {"sampler": "dpmpp_2m_sde"},
        {"sampler": "dpmpp_sde"},  # two draws a step
        {"sampler": "ddpm"},
        {"sampler": "ddim", "sampler_options": {"eta": 0.5}},
        {"sampler": "euler_a", "init": True},
    ],
    ids=lambda kw: "-".join(str(v) for v in kw.values()),
)
def test_samplers_that_draw_noise_every_step_replay_with_the_same_numbers(looped, kw):
    """Their per-step noise is drawn before the replay from the rows' generators, in the sampler's order."""
    kw = dict(kw)
    if kw.pop("init", False):
        rng = np.random.default_rng(1)
        kw.update(init_image=Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)), strength=0.7)
    loop = looped.cuda_graphs["loop"]
    first = _gen(looped, batch_size=2, **kw)
    other = _gen(looped, "a blue ball", seed=11, batch_size=2, **kw)
    assert (loop.recordings, loop.replays) == (1, 2)
    np.testing.assert_array_equal(first, _plain(looped, batch_size=2, **kw))
    np.testing.assert_array_equal(other, _plain(looped, prompt="a blue ball", seed=11, batch_size=2, **kw))


def test_what_a_graph_cannot_replay_runs_as_before(looped):
    loop = looped.cuda_graphs["loop"]
    rng = np.random.default_rng(2)
    init = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    mask = Image.fromarray(np.pad(np.full((16, 16), 255, np.uint8), 8))
    for kw in (
        {"prompt": "a [red:blue:2] cube"},  # prompt editing: the text changes per step
        {"init_image": init, "mask": mask, "strength": 0.8},  # inpainting's blend with the init image each step
        {"sampler": "dpm_adaptive"},  # its steps and noise draws depend on the model's answers
    ):
        image = _gen(looped, **kw)
        assert loop.recordings == 0 and loop.replays == 0, kw
        np.testing.assert_array_equal(image, _plain(looped, **kw))


def test_a_lora_hook_sends_the_loop_back_to_the_plain_path(looped):
    loop = looped.cuda_graphs["loop"]
    _gen(looped)
    lin = next(m for n, m in looped.unet.named_modules() if n.endswith("attn1.to_q"))
    handle = lin.register_forward_hook(lambda mod, i, o: o * 1.5)
    try:
        hooked = _gen(looped)
        assert loop.replays == 1  # only the first call
        np.testing.assert_array_equal(hooked, _plain(looped))
    finally:
        handle.remove()
    assert not np.array_equal(hooked, _gen(looped))


def test_the_step_callback_runs_once_after_the_last_step_and_can_still_cancel(looped):
    seen: list[tuple[int, int]] = []
    final: dict[str, torch.Tensor] = {}

    def keep(info: Any) -> None:
        seen.append((info.step, info.steps))
        final.update(x=info.latents.clone(), sigma=info.sigma)

    _gen(looped, callback=keep)
    assert seen == [(4, 4)]
    x_plain: dict[str, Any] = {}

    def keep_plain(info: Any) -> None:
        if info.step == info.steps:
            x_plain.update(x=info.latents.clone(), sigma=info.sigma)

    _plain(looped, callback=keep_plain)
    torch.testing.assert_close(final["x"], x_plain["x"], rtol=0, atol=0)  # the last step's sample, as before
    assert final["sigma"] == x_plain["sigma"] > 0  # the noise level the last step started from
    with pytest.raises(Cancelled):
        _gen(looped, callback=lambda info: False)


def test_plan_keys_follow_every_setting():
    base = dict(
        sampler="dpmpp_2m",
        steps=20,
        schedule="karras",
        scheduler_config={"beta_end": 0.012},
        cfg_scale=7.0,
        rescale=0.0,
        sampler_options=None,
        strength=1.0,
        start_step=None,
        dtype=torch.float16,
    )
    key = LoopPlan.of(**base).key
    assert LoopPlan.of(**base).key == key
    for field, value in [("cfg_scale", 7.5), ("steps", 21), ("scheduler_config", {"beta_end": 0.02})]:
        assert LoopPlan.of(**{**base, field: value}).key != key


def test_the_fast_path_option_is_cuda_only_and_implies_graphs(tiny_sd1_folder):
    from sdengine.fastpath import CUDA_ONLY, parse_options

    assert "cuda_graph_loop" in CUDA_ONLY
    assert parse_options("cuda_graph_loop,cuda_graphs") == ("cuda_graphs", "cuda_graph_loop")
    pipe = sdengine.load_pipeline(tiny_sd1_folder, device="cpu", dtype="fp32", fast_path="cuda_graph_loop")
    assert pipe.cuda_graphs is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "kw", [{}, {"sampler": "euler_a"}, {"guidance_rescale": 0.7}], ids=["dpmpp_2m", "euler_a", "rescale"]
)
def test_real_loop_graph_equals_the_step_graphs(tiny_sd1_folder, kw):  # pragma: no cover - CI has no GPU
    pipe = sdengine.load_pipeline(tiny_sd1_folder, device="cuda", dtype="fp16", fast_path="cuda_graphs")
    steps = _gen(pipe, batch_size=2, **kw)
    pipe.enable_loop_graph(record_after=0)
    loop = pipe.cuda_graphs["loop"]
    first, again = _gen(pipe, batch_size=2, **kw), _gen(pipe, "a blue ball", seed=11, batch_size=2, **kw)
    assert loop.recordings == 1 and loop.replays == 2 and not loop.refused
    assert float(np.abs(first - steps).mean()) < 2e-3
    pipe.cuda_graphs = None
    plain = _gen(pipe, "a blue ball", seed=11, batch_size=2, **kw)
    assert float(np.abs(again - plain).mean()) < 2e-3


def test_the_loop_joins_recorded_step_graphs_and_leaves_again(tiny_pipe):
    try:
        tiny_pipe.enable_cuda_graphs(backend=CPUBackend(), device_type="cpu")
        _gen(tiny_pipe)
        unet = tiny_pipe.cuda_graphs["unet"]
        assert unet.recordings == 1 and not tiny_pipe.enable_loop_graph()  # a CPU pipeline: not for CUDA
        assert tiny_pipe.enable_loop_graph(backend=CPUBackend(), device_type="cpu", record_after=0)
        assert tiny_pipe.cuda_graphs["unet"] is unet  # the step graphs kept, with their recordings
        _gen(tiny_pipe)
        assert tiny_pipe.cuda_graphs["loop"].replays == 1 and unet.replays == 4  # only the first call's steps
        tiny_pipe.cuda_graphs = {k: v for k, v in tiny_pipe.cuda_graphs.items() if k != "loop"}
        _gen(tiny_pipe)
        assert unet.replays == 8
    finally:
        tiny_pipe.cuda_graphs = None


def test_a_loop_that_cannot_be_recorded_warns_once_and_goes_back_to_the_step_graphs(tiny_pipe, caplog):
    def refuses(fn, warmup):
        raise RuntimeError("operation not permitted when stream is capturing")

    try:
        tiny_pipe.enable_cuda_graphs(backend=CPUBackend(), device_type="cpu")
        tiny_pipe.enable_loop_graph(backend=refuses, device_type="cpu", record_after=0)
        loop, unet = tiny_pipe.cuda_graphs["loop"], tiny_pipe.cuda_graphs["unet"]
        with caplog.at_level("WARNING"):
            first = _gen(tiny_pipe)  # ran plainly inside the loop graph's fall-back: the right image
            second = _gen(tiny_pipe)
        assert [r.getMessage() for r in caplog.records if "sampling loop" in r.getMessage()] == [
            "sampling loop: CUDA graph not recorded (RuntimeError: operation not permitted when stream is "
            "capturing); running it without one"
        ]
        assert loop.recordings == 0 and unet.replays == 4  # the second image: the step graphs, 4 steps
        np.testing.assert_array_equal(first, _plain(tiny_pipe))
        np.testing.assert_array_equal(second, first)
    finally:
        tiny_pipe.cuda_graphs = None


@pytest.fixture(scope="module")
def meta_pipe(tiny_sd1_folder):
    """The tiny pipeline with its U-Net on the meta device (the device: shapes, no data), loaded once."""
    import copy

    pipe = sdengine.load_pipeline(tiny_sd1_folder, device="cpu", dtype="fp32", fast_path="none")
    pipe.unet = copy.deepcopy(pipe.unet).to("meta")
    return pipe


@pytest.mark.parametrize(
    "sampler,extra",
    [
        ("dpmpp_2m", {}),
        ("euler", {}),
        ("heun", {}),
        ("dpm2", {}),
        ("lms", {}),
        ("unipc", {}),
        ("ddim", {}),
        ("plms", {}),
        ("dpmpp_2m", {"rescale": 0.7}),
        ("euler", {"img2img": True}),
        ("euler_a", {}),
        ("dpmpp_sde", {}),
        ("ddim", {"eta": 0.5}),
    ],
    ids=lambda v: v if isinstance(v, str) else ",".join(v) or "-",
)
def test_a_recorded_loop_never_reads_the_device_nor_copies_from_the_host(meta_pipe, sampler, extra):
    pipe = meta_pipe
    steps, img2img = 5, bool(extra.get("img2img"))
    plan = LoopPlan.of(
        sampler=sampler,
        steps=steps,
        schedule="karras" if sampler in ("dpmpp_2m", "euler") else "normal",
        scheduler_config=pipe.scheduler_config,
        cfg_scale=6.0,
        rescale=float(extra.get("rescale", 0.0)),
        sampler_options={"eta": extra["eta"]} if "eta" in extra else None,
        strength=0.6 if img2img else 1.0,
        start_step=2 if img2img else None,
        dtype=pipe.dtype,
    )
    width = pipe.unet.config.cross_attention_dim
    noise = torch.zeros(2, 4, 8, 8, device="meta")
    init = torch.zeros(2, 4, 8, 8, device="meta") if img2img else None
    cond = {"crossattn": torch.zeros(2, 77, width, device="meta")}
    uncond = {"crossattn": torch.zeros(2, 77, width, device="meta")}
    k = pipe.noise_draws(plan)
    assert (k > 0) == (sampler in ("euler_a", "dpmpp_sde") or "eta" in extra)
    draws = torch.zeros(k, 2, 4, 8, 8, device="meta") if k else None
    with torch.inference_mode(), HostTraffic() as traffic:
        out = pipe.run_loop_plan(plan, noise, init, cond, uncond, draws)
    assert out.device.type == "meta" and out.shape == noise.shape
    assert traffic.seen == []


def test_sdxl_loops_replay_with_their_pooled_vector(tmp_path):
    from _sdxl_models import make_sdxl_folder

    pipe = sdengine.load_pipeline(make_sdxl_folder(tmp_path / "tiny-sdxl"), device="cpu", fast_path="none")
    kw: dict[str, Any] = {"steps": 3, "width": 32, "height": 32, "progress": False, "sampler": "euler_a"}
    plain = [pipe("a red apple", "blurry", seed=s, **kw).arrays for s in (2, 3)]
    pipe.enable_loop_graph(backend=CPUBackend(), device_type="cpu", record_after=0)
    looped = [pipe("a red apple", "blurry", seed=s, **kw).arrays for s in (2, 3)]
    loop = pipe.cuda_graphs["loop"]
    assert (loop.recordings, loop.replays) == (1, 2)
    for a, b in zip(looped, plain, strict=True):
        np.testing.assert_array_equal(a, b)


def test_settings_are_recorded_once_they_come_back(tiny_pipe):
    """By default the first call of a plan and shapes runs the step graphs; the second records the loop."""
    try:
        tiny_pipe.enable_loop_graph(backend=CPUBackend(), device_type="cpu")  # the step graphs with it
        loop, unet = tiny_pipe.cuda_graphs["loop"], tiny_pipe.cuda_graphs["unet"]
        images = [_gen(tiny_pipe, seed=s) for s in (1, 2, 3)]
        assert (unet.replays, loop.recordings, loop.replays) == (4, 1, 2)  # 4 steps, then the loop twice
        once = _gen(tiny_pipe, cfg_scale=4.0)  # settings seen once: step graphs, nothing recorded
        assert (unet.replays, loop.recordings) == (8, 1)
    finally:
        tiny_pipe.cuda_graphs = None
    for s, image in zip((1, 2, 3), images, strict=True):
        np.testing.assert_array_equal(image, _gen(tiny_pipe, seed=s))
    np.testing.assert_array_equal(once, _gen(tiny_pipe, cfg_scale=4.0))


# ---------------------------------------------------------------------------------------------------
# The controlled U-Net (ControlNets + U-Net) replayed per step from graphs made per generation
# ---------------------------------------------------------------------------------------------------


def _edges() -> Image.Image:
    a = np.zeros((64, 64, 3), np.uint8)
    a[16:48, 20] = a[16:48, 44] = a[16, 20:45] = a[47, 20:45] = 255
    return Image.fromarray(a)


@pytest.mark.parametrize("guess_mode", [False, True])
def test_controlnet_steps_replay_from_graphs_with_the_same_image(guess_mode):
    from sdengine.pipeline import ControlUnit

    pipe = sdengine.load_pipeline("emoji", fast_path="none")
    unit = ControlUnit("emoji-controlnet-canny", _edges(), scale=0.8, start=0.0, end=0.6)
    kw: dict[str, Any] = {"steps": 6, "seed": 4, "progress": False, "controlnets": [unit], "guess_mode": guess_mode}
    plain = pipe("a red apple", **kw).arrays
    backend = CPUBackend()
    try:
        pipe.enable_cuda_graphs(backend=backend, device_type="cpu")
        first = pipe("a red apple", **kw).arrays
        recorded, replayed = backend.recorded, backend.replayed
        again = pipe("a red apple", **kw).arrays  # a new generation records its own controlled step graphs
        # on for steps 0-2, off for 3-5: two signatures, each recorded once and replayed for its three steps;
        # the VAE decode replays once (the text encoders' output is cached)
        assert (backend.recorded - recorded, backend.replayed - replayed) == (2, 7)
        assert pipe.cuda_graphs["unet"].replays == 0  # the U-Net runs inside the controlled step's graph
    finally:
        pipe.cuda_graphs = None
    np.testing.assert_array_equal(first, plain)
    np.testing.assert_array_equal(again, plain)


def test_a_controlled_step_never_reads_the_device_nor_copies_from_the_host():
    import copy

    from sdengine.diffusion.samplers import SamplerStep
    from sdengine.pipeline.control import build_controlled_unet

    pipe = sdengine.load_pipeline("emoji", fast_path="none")
    grid = torch.arange(6)
    controlled = build_controlled_unet(
        pipe.unet,
        [("emoji-controlnet-canny", _edges(), 0.8, 0.0, 1.0)],
        width=64,
        height=64,
        grid=grid,
        guess_mode=True,
        device="cpu",
    )
    controlled.unet = copy.deepcopy(pipe.unet).to("meta")
    for u in controlled.units:
        u.net = copy.deepcopy(u.net).to("meta")
        u.image = torch.zeros_like(u.image, device="meta")
    cond, _ = pipe.conditioner.pair("a cat", "")
    extra = {"class_labels": torch.zeros(2, *cond["vector"].shape[1:], device="meta")} if "vector" in cond else {}
    ctx = torch.zeros(2, *cond["crossattn"].shape[1:], device="meta")
    side = 64 // pipe.vae_scale_factor
    with torch.inference_mode(), HostTraffic() as traffic:
        out = controlled(
            torch.zeros(2, 4, side, side, device="meta"),
            torch.full((2,), 500.0, device="meta"),
            encoder_hidden_states=ctx,
            step=SamplerStep(0),
            row_kinds=("cond", "uncond"),
            **extra,
        )
    assert out.shape == (2, 4, side, side) and traffic.seen == []


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_controlled_step_graphs_equal_plain_calls(tiny_sd1_folder):  # pragma: no cover - CI has no GPU
    from sdengine.models.controlnet import ControlNet
    from sdengine.pipeline import ControlUnit

    # the tiny model (the device copy of the tree leaves the shipped models out), a ControlNet of its U-Net
    pipe = sdengine.load_pipeline(tiny_sd1_folder, device="cuda", dtype="fp16", fast_path="cuda_graphs")
    torch.manual_seed(0)
    net = ControlNet.from_unet(pipe.unet.float().cpu(), conditioning_embedding_out_channels=(8, 16))
    pipe.unet.to("cuda", torch.float16)
    with torch.no_grad():
        for p in net.parameters():  # its zero convolutions made non-zero: residuals that change the image
            p.add_(torch.randn_like(p) * 0.02)
    unit = ControlUnit(net, _edges(), scale=0.8, start=0.0, end=0.6)
    kw: dict[str, Any] = {"steps": 6, "seed": 4, "progress": False, "controlnets": [unit], "guess_mode": True}
    graphed = pipe("a red apple", **kw).arrays
    pipe.cuda_graphs = None
    plain = pipe("a red apple", **kw).arrays
    assert float(np.abs(graphed - plain).mean()) < 2e-3
