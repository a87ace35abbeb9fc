"""Self-attention guidance (Hong et al. 2023): sdengine's pipeline against diffusers' StableDiffusionSAGPipeline on the
same tiny random weights (the oracle; DDIM, the scheduler that pipeline's x0 and re-noising assume), the attention mass
against a float64 softmax, the blur against a float64 Gaussian, ComfyUI's rule re-derived, the recorded loop's plan
key, the request's checks and the infotext read back.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _comfy_live import patched_graph, prompt_image, run_prompt  # noqa: E402
from _cpu_graphs import CPUBackend  # noqa: E402
from _pipeline_models import diffusers_scheduler  # noqa: E402
from sdengine.diffusion.denoisers import Denoiser  # noqa: E402
from sdengine.diffusion.guidance import CFGDenoiser  # noqa: E402
from sdengine.diffusion.sag import attention_mask, gaussian_blur  # noqa: E402
from sdengine.errors import SdengineError  # noqa: E402
from sdengine.metadata import parse_parameters, to_generate_kwargs  # noqa: E402
from sdengine.nn.attention import Attention, AttentionMass  # noqa: E402
from sdengine.nn.transformer import middle_attention_mass  # noqa: E402
from sdengine.pipeline import GenerationError  # noqa: E402
from sdengine.pipeline.request import GenerationRequest  # noqa: E402

TOL = 1e-4  # mean absolute difference on 0..1 pixels; seen: 1e-7 to 4e-7
SIZE, STEPS, SEED = 32, 6, 3
PROMPT, NEGATIVE = "a red apple on a table", "blurry, dark"


@pytest.fixture(scope="module")
def sd1(tiny_sd1_folder):
    return tiny_sd1_folder, sdengine.load_pipeline(tiny_sd1_folder, device="cpu", fast_path="none")


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def _ours(pipe: Any, **kw: Any) -> Any:
    args: dict[str, Any] = dict(
        steps=STEPS, sampler="ddim", schedule="normal", cfg_scale=7.5, seed=SEED, width=SIZE, height=SIZE
    )
    args.update(kw)
    return pipe(PROMPT, NEGATIVE, progress=False, **args)


def _diffusers_sag(folder: Any, **kw: Any) -> np.ndarray:
    from diffusers import StableDiffusionSAGPipeline

    ref = StableDiffusionSAGPipeline.from_pretrained(
        folder, local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers_scheduler(folder, kw.get("sampler", "ddim"))
    return ref(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=kw.get("cfg_scale", 7.5),
        sag_scale=kw["sag_scale"],
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="np",
        width=SIZE,
        height=SIZE,
    ).images


@pytest.mark.parametrize(
    "kw",
    [
        dict(sag_scale=0.75),
        dict(sag_scale=2.0, cfg_scale=1.0),  # no CFG: the conditional rows' map, x0 and conditioning
        dict(sag_scale=1.5, cfg_scale=4.0),
        dict(sag_scale=0.75, sampler="dpmpp_2m"),  # any sampler: the guidance lives in the denoiser
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_sag_matches_diffusers_sag_pipeline(sd1, kw):
    folder, pipe = sd1
    theirs = _diffusers_sag(folder, **kw)
    ours = _ours(pipe, **kw).arrays  # diffusers' blur sigma is 1.0, the request's default
    assert ours.std() > 0.05
    assert _mad(ours, theirs) < TOL
    plain = _ours(pipe, **{k: v for k, v in kw.items() if not k.startswith("sag")}).arrays
    assert _mad(ours, plain) > 1e-3  # the guidance changed the image


def test_sag_matches_diffusers_on_a_v_prediction_model(tiny_sd2_folder):
    """v-prediction: the term is in the network's own output space (v), which is not x0's difference there."""
    pipe = sdengine.load_pipeline(tiny_sd2_folder, device="cpu", fast_path="none")
    theirs = _diffusers_sag(tiny_sd2_folder, sag_scale=1.5)
    ours = _ours(pipe, sag_scale=1.5).arrays
    assert _mad(ours, theirs) < TOL
    assert _mad(ours, _ours(pipe).arrays) > 1e-3


def test_sag_runs_one_degraded_pass_after_the_batched_call(sd1, monkeypatch):
    _, pipe = sd1
    rows: list[int] = []
    forward = pipe.unet.forward
    monkeypatch.setattr(pipe.unet, "forward", lambda x, *a, **k: rows.append(x.shape[0]) or forward(x, *a, **k))
    _ours(pipe, sag_scale=1.0, steps=2)
    _ours(pipe, sag_scale=1.0, pag_scale=2.0, steps=1)
    assert rows == [2, 1, 2, 1, 3, 1]  # [cond, uncond] then [degraded]; with PAG [cond, uncond, perturbed]


def test_attention_mass_is_the_head_mean_softmax_summed_over_queries(monkeypatch):
    torch.manual_seed(0)
    attn = Attention(16, 2, 8).eval()
    x = torch.randn(3, 10, 16)
    monkeypatch.setattr("sdengine.nn.attention.CHUNK_SCORES", 480)  # queries in chunks of 480 // 4 // (2 * 2 * 10) = 3
    probe = AttentionMass(1, 2)
    attn.map_probe = probe
    with torch.no_grad():
        out = attn(x)
        attn.map_probe = None
        plain = attn(x)
    torch.testing.assert_close(out, plain)  # recording leaves the output alone
    q = attn.to_q(x[1:3]).double().view(2, 10, 2, 8).transpose(1, 2)
    k = attn.to_k(x[1:3]).double().view(2, 10, 2, 8).transpose(1, 2)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)  # (2, h, Lq, Lk)
    want = p.mean(1).sum(1)
    assert probe.mass is not None
    torch.testing.assert_close(probe.mass.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probe.mass.sum(-1), torch.full((2,), 10.0))  # each query's row sums to 1


def test_the_probe_reads_the_middle_block_and_lets_go(sd1):
    _, pipe = sd1
    unet = pipe.unet
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([500, 500])
    ctx = torch.randn(2, 7, unet.config.cross_attention_dim)
    with torch.no_grad():
        with middle_attention_mass(unet, 1, 1) as probe:
            out = unet(x, t, encoder_hidden_states=ctx)
        plain = unet(x, t, encoder_hidden_states=ctx)
    torch.testing.assert_close(out, plain)  # recording leaves the output alone
    assert probe.size == (8, 8) and probe.mass is not None and probe.mass.shape == (1, 64)
    attn1 = unet.mid_block.attentions[0].transformer_blocks[0].attn1
    assert attn1.map_probe is None and unet.mid_block.attentions[0].map_probe is None
    with pytest.raises(RuntimeError), middle_attention_mass(unet, 0, 1):
        raise RuntimeError
    assert attn1.map_probe is None


def test_blur_and_mask_match_a_float64_derivation():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 11, 13)
    sigma = 1.7
    got = gaussian_blur(x, sigma)
    g = np.exp(-0.5 * (np.arange(-4, 5) / sigma) ** 2)
    g /= g.sum()
    pad = np.pad(x.double().numpy(), ((0, 0), (0, 0), (4, 4), (4, 4)), mode="reflect")
    want = np.zeros(x.shape)
    for i in range(9):
        for j in range(9):
            want += g[i] * g[j] * pad[:, :, i : i + 11, j : j + 13]
    np.testing.assert_allclose(got.double().numpy(), want, atol=1e-5)
    mass = torch.tensor([[0.5, 1.5, 1.0, 2.0, 0.2, 0.9]])  # a 2 x 3 map
    m = attention_mask(mass, (2, 3), (4, 6))
    want_m = torch.tensor([[0, 1, 0], [1, 0, 0]], dtype=torch.float32).repeat_interleave(2, 0).repeat_interleave(2, 1)
    torch.testing.assert_close(m[0, 0], want_m)  # above 1 only, nearest-neighbour upsampled


class _Model:
    """A stand-in network: an x0-denoiser's inner model whose output depends on x nonlinearly, with a probe."""

    def __init__(self) -> None:
        self.probe: AttentionMass | None = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        if self.probe is not None:  # a fixed attention mass: the left half of an 4 x 4 map attended
            self.probe.size = (4, 4)
            m = torch.tensor([2.0, 2.0, 0.0, 0.0] * 4)
            self.probe.mass = m.expand(self.probe.count, 16).clone()
        return torch.tanh(x) * cond["c"].reshape(-1, 1, 1, 1) + 0.01 * t.reshape(-1, 1, 1, 1).float() / 1000


def _probe_of(model: _Model) -> Any:
    from contextlib import contextmanager

    @contextmanager
    def attention_map(start: int, count: int):
        model.probe = AttentionMass(start, count)
        try:
            yield model.probe
        finally:
            model.probe = None

    return attention_map


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_comfyui_rule_is_its_post_cfg_function(prediction):
    """ComfyUI: cfg_result + scale * (blurred - x0(x - uncond + blurred)), the unconditional rows at cfg 1 too, the x0
    terms whatever the model predicts; re-derived here from the denoiser's calls."""
    from sdengine.diffusion.schedules import NoiseSchedule

    model = _Model()
    schedule = NoiseSchedule.from_config(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    den = Denoiser(model, schedule, prediction)
    x = torch.randn(2, 4, 8, 8) * 3
    sigma = torch.tensor(2.5)
    cond, unc = {"c": torch.tensor([1.0, 0.8])}, {"c": torch.tensor([0.5])}
    for cfg in (1.0, 5.0):
        g = CFGDenoiser(
            den, cfg, unc, rule="comfyui", sag_scale=0.7, sag_blur_sigma=2.0, attention_map=_probe_of(model)
        )
        got = g(x, sigma, **cond)
        x0_c = den(x, sigma, c=cond["c"])
        x0_u = den(x, sigma, c=unc["c"].expand(2))
        mask = torch.zeros(1, 1, 8, 8)
        mask[..., :4] = 1  # the left half of the 4 x 4 map, upsampled
        blurred = gaussian_blur(x0_u, 2.0) * mask + x0_u * (1 - mask)
        deg = den(x - x0_u + blurred, sigma, c=unc["c"].expand(2))
        want = x0_u + cfg * (x0_c - x0_u) + 0.7 * (blurred - deg)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    tiny = torch.randn(1, 4, 4, 4)
    g = CFGDenoiser(den, 5.0, unc, rule="comfyui", sag_scale=0.7, attention_map=_probe_of(model))
    torch.testing.assert_close(
        g(tiny, sigma, c=cond["c"][:1]), CFGDenoiser(den, 5.0, unc)(tiny, sigma, c=cond["c"][:1])
    )
    g = CFGDenoiser(den, 5.0, unc, sag_scale=0.7, attention_map=_probe_of(model))
    with pytest.raises(SdengineError, match="at least 5 x 5"):  # diffusers' rule: a one-line error
        g(tiny, sigma, c=cond["c"][:1])


def test_sag_rule_places_only_sags_term():
    """``sag_rule`` "comfyui" under the diffusers rule: the rescale is diffusers' (of the CFG result alone), ComfyUI's
    SAG term in x0 is added after it; under "diffusers" the term is added before the rescale (another result)."""
    from sdengine.diffusion.schedules import NoiseSchedule

    model = _Model()
    schedule = NoiseSchedule.from_config(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    den = Denoiser(model, schedule, "epsilon")
    x = torch.randn(2, 4, 8, 8) * 3
    sigma = torch.tensor(2.5)
    cond, unc = {"c": torch.tensor([1.0, 0.8])}, {"c": torch.tensor([0.5])}
    probe = _probe_of(model)
    got = CFGDenoiser(den, 5.0, unc, 0.7, sag_rule="comfyui", sag_scale=0.7, sag_blur_sigma=2.0, attention_map=probe)
    x0_u = den(x, sigma, c=unc["c"].expand(2))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1
    blurred = gaussian_blur(x0_u, 2.0) * mask + x0_u * (1 - mask)
    deg = den(x - x0_u + blurred, sigma, c=unc["c"].expand(2))
    rescaled = CFGDenoiser(den, 5.0, unc, 0.7)(x, sigma, **cond)  # diffusers' rescale of the CFG result alone
    want = rescaled + 0.7 * (blurred - deg)
    torch.testing.assert_close(got(x, sigma, **cond), want, atol=1e-5, rtol=1e-5)
    assert got.off_grid.sag_rule == "comfyui"  # kept over another inner denoiser
    before = CFGDenoiser(den, 5.0, unc, 0.7, sag_scale=0.7, sag_blur_sigma=2.0, attention_map=probe)(x, sigma, **cond)
    assert (before - want).abs().max() > 1e-3
    with pytest.raises(SdengineError, match="unknown SAG rule 'a1111'"):
        CFGDenoiser(den, 5.0, unc, sag_rule="a1111")


@pytest.mark.parametrize(
    "kw,why",
    [
        (dict(sag_scale=1.0, sag_rule="forge"), "unknown sag_rule 'forge'; use one of: diffusers, comfyui"),
        (dict(sag_scale=11.0), "sag_scale must be a number in"),
        (dict(sag_scale=float("nan")), "sag_scale must be a number in"),
        (dict(sag_scale="1"), "sag_scale must be a number in"),
        (dict(sag_scale=1.0, sag_blur_sigma=0.0), "sag_blur_sigma must be a number in"),
        (dict(sag_scale=1.0, sag_blur_sigma=-1.0), "sag_blur_sigma must be a number in"),
        (dict(sag_scale=1.0, sag_blur_sigma=float("inf")), "sag_blur_sigma must be a number in"),
    ],
)
def test_bad_sag_settings_are_one_line_errors(kw, why):
    with pytest.raises(GenerationError, match=why):
        GenerationRequest(prompt="x", **kw).validate()


def test_sag_refuses_a_latent_too_small_and_a_unet_without_middle_attention(sd1):
    _, pipe = sd1
    with pytest.raises(SdengineError, match="at least 5 x 5 latent pixels") as e:
        _ours(pipe, sag_scale=1.0, width=8, height=8)
    assert "\n" not in str(e.value)
    mid = pipe.unet.mid_block
    saved, mid.attentions = mid.attentions, None  # a U-Net whose middle block has no attention (DDPM-style)
    try:
        with pytest.raises(SdengineError, match="middle-block transformer") as e:
            _ours(pipe, sag_scale=1.0, steps=1)
    finally:
        mid.attentions = saved
    assert "\n" not in str(e.value)


def test_the_infotext_records_sag_and_reads_back(sd1):
    _, pipe = sd1
    res = _ours(pipe, sag_scale=0.5, sag_blur_sigma=2.0, steps=2)
    text = res.infotexts[0]
    assert "SAG scale: 0.5, SAG blur sigma: 2," in text
    kwargs = to_generate_kwargs(parse_parameters(text))
    assert (kwargs["sag_scale"], kwargs["sag_blur_sigma"]) == (0.5, 2.0)
    again = pipe(**{**kwargs, "progress": False}).arrays
    np.testing.assert_array_equal(again, res.arrays)
    plain = _ours(pipe, steps=2).infotexts[0]
    assert "SAG" not in plain and "sag_scale" not in to_generate_kwargs(parse_parameters(plain))


def test_comfyuis_rule_skips_a_tiny_latent_and_reads_the_unconditional_rows_at_cfg_1(sd1):
    _, pipe = sd1
    tiny = dict(sag_scale=1.0, sag_rule="comfyui", width=8, height=8, steps=2)  # diffusers' rule: an error (above)
    np.testing.assert_array_equal(_ours(pipe, **tiny).arrays, _ours(pipe, width=8, height=8, steps=2).arrays)
    one = dict(sag_scale=2.0, cfg_scale=1.0, steps=2)
    assert _mad(_ours(pipe, **one, sag_rule="comfyui").arrays, _ours(pipe, **one).arrays) > 1e-3


def test_the_infotext_records_the_sag_rule_and_reads_back(sd1, caplog):
    _, pipe = sd1
    res = _ours(pipe, sag_scale=0.5, sag_blur_sigma=2.0, sag_rule="comfyui", guidance_rescale=0.7, steps=2)
    text = res.infotexts[0]
    assert "SAG scale: 0.5, SAG blur sigma: 2, SAG rule: comfyui" in text
    kwargs = to_generate_kwargs(parse_parameters(text))
    assert (kwargs["sag_scale"], kwargs["sag_blur_sigma"], kwargs["sag_rule"]) == (0.5, 2.0, "comfyui")
    np.testing.assert_array_equal(pipe(**{**kwargs, "progress": False}).arrays, res.arrays)
    other = _ours(pipe, sag_scale=0.5, sag_blur_sigma=2.0, guidance_rescale=0.7, steps=2)
    assert "SAG rule" not in other.infotexts[0] and _mad(other.arrays, res.arrays) > 1e-4  # the rule mattered
    # Forge's SAG script's keys: ComfyUI's rule; its default mask threshold is reproduced, another warned of
    forge = "a red apple\nSteps: 2, Sampler: DDIM, CFG scale: 7.5, Seed: 3, Size: 32x32, sag_enabled: True, "
    caplog.clear()
    found = to_generate_kwargs(parse_parameters(forge + "sag_scale: 0.5, sag_blur_sigma: 2.0, sag_threshold: 1.0"))
    assert (found["sag_scale"], found["sag_blur_sigma"], found["sag_rule"]) == (0.5, 2.0, "comfyui")
    assert "not reproduced" not in caplog.text
    to_generate_kwargs(parse_parameters(forge + "sag_scale: 0.5, sag_blur_sigma: 2.0, sag_threshold: 1.5"))
    assert "not reproduced by sdengine (the image may differ): sag_threshold" in caplog.text
    with pytest.raises(SdengineError, match="SAG rule: 'forge' is not one of diffusers, comfyui"):
        to_generate_kwargs(parse_parameters(text.replace("SAG rule: comfyui", "SAG rule: forge")))


def test_the_recorded_loop_keys_sag_and_replays_its_images(tiny_sd1_folder):
    """Two SAG settings never share a recorded loop (the stand-in recorder replays the first plan of a key)."""
    pipe = sdengine.load_pipeline(tiny_sd1_folder, device="cpu", dtype="fp32", fast_path="none")
    args: dict[str, Any] = dict(steps=2, seed=3, width=32, height=32, progress=False)

    def plain(**kw: Any) -> np.ndarray:
        graphs, pipe.cuda_graphs = pipe.cuda_graphs, None
        try:
            return pipe("a red cube", "blurry", **args, **kw).arrays
        finally:
            pipe.cuda_graphs = graphs

    pipe.enable_loop_graph(backend=CPUBackend(), device_type="cpu", record_after=0)
    loop = pipe.cuda_graphs["loop"]
    settings: list[dict[str, Any]] = [{"sag_scale": 1.0}, {"sag_scale": 2.0}, {"sag_scale": 2.0, "sag_blur_sigma": 3.0}]
    # the rule: another recording (where the term goes is baked in; with a rescale the images differ)
    settings += [{"sag_scale": 2.0, "guidance_rescale": 0.7}, {"sag_scale": 2.0, "guidance_rescale": 0.7,
                                                               "sag_rule": "comfyui"}]  # fmt: skip
    images = []
    for n, kw in enumerate(settings, start=1):
        images.append(pipe("a red cube", "blurry", **args, **kw).arrays)
        assert loop.recordings == n
        np.testing.assert_array_equal(images[-1], plain(**kw))
    assert pipe.cuda_graphs["unet"].replays == 0
    for a, b in zip(images, images[1:], strict=False):
        assert not np.array_equal(a, b)


def test_sag_bypasses_the_step_graphs(tiny_sd1_folder):
    """A step graph would replay the U-Net without the probe: with SAG the plain network runs."""
    pipe = sdengine.load_pipeline(tiny_sd1_folder, device="cpu", dtype="fp32", fast_path="none")
    args: dict[str, Any] = dict(steps=2, seed=3, width=32, height=32, progress=False, sag_scale=1.0)
    want = pipe("a red cube", **args).arrays
    pipe.enable_cuda_graphs(backend=CPUBackend(), device_type="cpu")
    got = [pipe("a red cube", **args).arrays for _ in range(2)]
    assert pipe.cuda_graphs["unet"].recordings == 0
    for g in got:
        np.testing.assert_array_equal(g, want)


# ------------------------------------------------------------------------------------------------ the CLI


def _cli(*args: str) -> int:
    from sdengine.cli import main

    return main(["generate", *args, "--no-progress"])


def test_sag_flags_write_the_infotext_and_read_back(tiny_sd1_folder, tmp_path):
    from PIL import Image

    common = ["a red apple", "--model", str(tiny_sd1_folder), "--steps", "3", "--sampler", "euler", "--seed", "4"]
    common += ["--width", "32", "--height", "32"]
    assert (
        _cli(*common, "--sag-scale", "2", "--sag-rule", "comfyui", "--cfg", "1", "--out", str(tmp_path / "c.png")) == 0
    )
    assert "SAG scale: 2, SAG blur sigma: 1, SAG rule: comfyui" in Image.open(tmp_path / "c.png").info["parameters"]
    again = ["--from-png", str(tmp_path / "c.png"), "--model", str(tiny_sd1_folder), "--out", str(tmp_path / "d.png")]
    assert _cli(*again) == 0
    comfy = np.asarray(Image.open(tmp_path / "c.png").convert("RGB"))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "d.png").convert("RGB")), comfy)
    assert _cli(*common, "--sag-scale", "0.75", "--sag-blur-sigma", "1.5", "--out", str(tmp_path / "s.png")) == 0
    text = Image.open(tmp_path / "s.png").info["parameters"]
    assert "SAG scale: 0.75, SAG blur sigma: 1.5" in text
    pipe = sdengine.load_pipeline(tiny_sd1_folder, device="cpu")
    direct = pipe("a red apple", steps=3, sampler="euler", seed=4, width=32, height=32, sag_scale=0.75,
                  sag_blur_sigma=1.5, progress=False)  # fmt: skip
    pixels = np.asarray(Image.open(tmp_path / "s.png").convert("RGB"))
    np.testing.assert_array_equal(pixels, np.asarray(direct.images[0]))
    again = ["--from-png", str(tmp_path / "s.png"), "--model", str(tiny_sd1_folder), "--out", str(tmp_path / "r.png")]
    assert _cli(*again) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "r.png").convert("RGB")), pixels)


@pytest.mark.parametrize(
    "flags,why",
    [
        (["--sag-blur-sigma", "2"], "--sag-blur-sigma has no effect without a --sag-scale"),
        (["--sag-rule", "comfyui"], "--sag-rule has no effect without a --sag-scale"),
        (["--sag-scale", "20"], "sag_scale must be a number in [-10, 10]"),
        (["--sag-scale", "1", "--sag-blur-sigma", "0"], "sag_blur_sigma must be a number in (0, 10]"),
        (["--sag-scale", "1", "--width", "8", "--height", "8"], "needs at least 5 x 5 latent pixels"),
    ],
)
def test_bad_sag_flags_are_one_line_errors(tiny_sd1_folder, tmp_path, capsys, flags, why):
    args = ["x", "--model", str(tiny_sd1_folder), "--steps", "2", *flags, "--out", str(tmp_path / "o.png")]
    assert _cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert why in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o.png").exists()


# ------------------------------------------------------------------------------------ ComfyUI's node


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    import httpx

    from _live_server import live_server, server_config

    with live_server(server_config(tmp_path_factory.mktemp("comfy_sag"), max_queue=8)) as s:
        with httpx.Client(base_url=s.url, timeout=120) as c:
            yield c


SDENGINE_RULE = {"extra_data": {"sdengine": {"seed_rule": "sdengine"}}}


def _graph(*patches: tuple[str, dict[str, Any]], cfg: float = 5.0) -> dict:
    """txt2img on the emoji model (64 x 64: a 16 x 16 latent) with model patches between the loader and KSampler."""
    return patched_graph(*patches, cfg=cfg, seed=11, steps=4, prefix="sag")


def _direct(**kw: Any) -> np.ndarray:
    from _live_server import shared_loader

    pipe = shared_loader("emoji", "cpu")
    args: dict[str, Any] = dict(steps=4, sampler="dpmpp_2m", schedule="karras", cfg_scale=5.0, seed=11)
    args.update(kw)
    res = pipe("a red apple", "blurry", width=64, height=64, progress=False, **args)
    return np.asarray(res.images[0].convert("RGB"))


def test_the_sag_node_is_listed_with_comfyuis_inputs(client):
    info = client.get("/object_info").json()["SelfAttentionGuidance"]
    req = info["input"]["required"]
    assert (req["scale"][1]["default"], req["scale"][1]["min"], req["scale"][1]["max"]) == (0.5, -2, 5)
    blur = req["blur_sigma"][1]
    assert (blur["default"], blur["min"], blur["max"]) == (2.0, 0, 10)
    assert info["output"] == ["MODEL"] and info["display_name"] == "Self-Attention Guidance"


def test_the_sag_node_equals_the_pipelines_sag(client):
    node = ("SelfAttentionGuidance", {"scale": 0.5, "blur_sigma": 2.0})
    a = prompt_image(client, _graph(node), **SDENGINE_RULE)
    assert np.array_equal(a, _direct(sag_scale=0.5, sag_blur_sigma=2.0, sag_rule="comfyui"))
    plain = prompt_image(client, _graph(), **SDENGINE_RULE)
    assert np.abs(a.astype(int) - plain).mean() > 0.5  # the guidance changed the image
    # ComfyUI's rule: its own term (tested against its formula above), a valid image that differs from plain
    b = prompt_image(client, _graph(node))
    assert b.std() > 5 and not np.array_equal(b, prompt_image(client, _graph()))


@pytest.mark.parametrize("cfg,rescale", [(1.0, 0.0), (5.0, 0.7)], ids=["cfg1", "rescale"])
def test_the_sag_node_is_the_pipelines_comfyui_rule(client, cfg, rescale):
    """Where the two rules differ (cfg 1: which rows; a rescale: before or after it), the node under sdengine's seed
    rule gives the pipeline's image under sag_rule "comfyui", and not under "diffusers"."""
    patches: list[tuple[str, dict[str, Any]]] = [("RescaleCFG", {"multiplier": rescale})] if rescale else []
    patches.append(("SelfAttentionGuidance", {"scale": 1.5, "blur_sigma": 2.0}))
    got = prompt_image(client, _graph(*patches, cfg=cfg), **SDENGINE_RULE)
    kw: dict[str, Any] = dict(cfg_scale=cfg, guidance_rescale=rescale, sag_scale=1.5, sag_blur_sigma=2.0)
    np.testing.assert_array_equal(got, _direct(**kw, sag_rule="comfyui"))
    assert np.abs(got.astype(int) - _direct(**kw)).mean() > 0.05


@pytest.mark.parametrize(
    "patches,why",
    [
        ([("SelfAttentionGuidance", {"scale": 0.5, "blur_sigma": 0.0})], "blur_sigma must be above 0"),
        (
            [("SelfAttentionGuidance", {"scale": 0.5, "blur_sigma": 2.0})] * 2,
            "the model already has one",
        ),
    ],
)
def test_bad_sag_nodes_are_node_errors(client, patches, why):
    h = run_prompt(client, _graph(*patches))
    assert h["status"]["status_str"] == "error" and why in str(h["status"]["messages"])


def test_the_sag_node_refuses_area_conditioning(client):
    g = _graph(("SelfAttentionGuidance", {"scale": 0.5, "blur_sigma": 2.0}))
    g["20"] = {"class_type": "ConditioningSetArea", "inputs": {"conditioning": ["6", 0], "width": 64, "height": 64,
                                                                "x": 0, "y": 0, "strength": 0.5}}  # fmt: skip
    g["3"]["inputs"]["positive"] = ["20", 0]
    h = run_prompt(client, g)
    assert h["status"]["status_str"] == "error" and "no area, mask or strength" in str(h["status"]["messages"])


# ------------------------------------------------------------------------------ the native API and OpenAI's


GEN = {"seed": 3, "steps": 3, "width": 64, "height": 64, "sampler": "dpmpp_2m", "schedule": "karras"}


def _python_api(**kw: Any) -> tuple[np.ndarray, str]:
    from _live_server import shared_loader

    r = shared_loader("emoji", "cpu")("a red apple", progress=False, **{**GEN, **kw})
    return np.asarray(r.images[0].convert("RGB")), r.infotexts[0]


def test_a_native_jobs_sag_gives_the_python_apis_image(client) -> None:
    import io

    from PIL import Image

    from _live_server import wait_job

    def run_job(body: dict) -> tuple[np.ndarray, dict]:
        r = client.post("/v1/jobs", json=body)
        assert r.status_code == 202, r.text
        j = wait_job(client, r.json()["id"], timeout=300)
        assert j["state"] == "done", j
        png = Image.open(io.BytesIO(client.get(j["images"][0]["url"]).content))
        return np.asarray(png.convert("RGB")), j

    body = {"prompt": "a red apple", **GEN}
    want, text = _python_api(sag_scale=0.75, sag_blur_sigma=2.0)
    got, job = run_job({**body, "sag_scale": 0.75, "sag_blur_sigma": 2.0})
    np.testing.assert_array_equal(got, want)
    assert job["infotexts"][0] == text and "SAG scale: 0.75, SAG blur sigma: 2," in text
    got, job = run_job({**body, "sag_scale": 0, "sag_blur_sigma": 3.0})  # off: the blur does nothing
    np.testing.assert_array_equal(got, _python_api()[0])
    assert "SAG" not in job["infotexts"][0]
    for bad in ({"sag_scale": 10.5}, {"sag_scale": "x"}, {"sag_blur_sigma": 0}, {"sag_blur_sigma": 11}):
        r = client.post("/v1/jobs", json={**body, **bad})
        assert r.status_code == 422 and next(iter(bad)) in r.text, (bad, r.text)


def test_openai_images_take_sag_in_extra_body(client) -> None:
    import base64
    import io

    openai = pytest.importorskip("openai")
    from PIL import Image

    api = openai.OpenAI(
        base_url=f"{str(client.base_url).rstrip('/')}/v1", api_key="sk-test", max_retries=0, timeout=300
    )
    extra = {"seed": 3, "steps": 3, "sampler": "dpmpp_2m", "schedule": "karras", "sag_scale": 0.75}
    r = api.images.generate(model="emoji", prompt="a red apple", size="64x64", extra_body=extra)
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))).convert("RGB"))
    np.testing.assert_array_equal(got, _python_api(sag_scale=0.75)[0])
    for field, value, said in (
        ("sag_scale", 11, "sag_scale must be in [-10, 10], got 11"),
        ("sag_blur_sigma", 0, "sag_blur_sigma must be above 0"),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            api.images.generate(model="emoji", prompt="a red apple", size="64x64", extra_body={**extra, field: value})
        assert e.value.body["param"] == field and said in e.value.body["message"], e.value.body


def test_sdxl_base_and_refiner_each_run_sag_on_their_own_unet(tmp_path, monkeypatch):
    """The SDXL hand-off: each model reads its own U-Net's middle block and runs its own degraded pass (the
    conditioning's pooled and size vectors ride along); the guidance changes the image."""
    from _sdxl_models import make_sdxl_folder

    base = sdengine.load_pipeline(make_sdxl_folder(tmp_path / "tiny-sdxl"), device="cpu")
    refiner = sdengine.load_pipeline(
        make_sdxl_folder(tmp_path / "tiny-sdxl-refiner", refiner=True, seed=5), device="cpu"
    )
    rows: dict[str, list[int]] = {"base": [], "refiner": []}
    for name, pipe in (("base", base), ("refiner", refiner)):
        forward = pipe.unet.forward
        monkeypatch.setattr(
            pipe.unet, "forward", lambda x, *a, _f=forward, _r=rows[name], **k: _r.append(x.shape[0]) or _f(x, *a, **k)
        )
    args: dict[str, Any] = dict(switch_at=0.5, steps=4, sampler="euler", cfg_scale=5.0, seed=SEED, progress=False)
    args |= dict(width=32, height=32)
    plain = base.generate_with_refiner(refiner, PROMPT, NEGATIVE, **args).arrays
    steps = {k: len(v) for k, v in rows.items()}
    assert steps["base"] >= 1 and steps["refiner"] >= 1 and set(rows["base"] + rows["refiner"]) == {2}
    rows["base"].clear()
    rows["refiner"].clear()
    sag = base.generate_with_refiner(refiner, PROMPT, NEGATIVE, sag_scale=1.0, **args)
    assert rows == {k: [2, 1] * n for k, n in steps.items()}  # each step: [cond, uncond], then [degraded]
    assert _mad(sag.arrays, plain) > 1e-3 and "SAG scale: 1" in sag.infotexts[0]
    # PAG too is named in a hand-off's infotext (it was left out there)
    pag = base.generate_with_refiner(refiner, PROMPT, NEGATIVE, pag_scale=2.0, pag_layers="mid,up", **args)
    assert 'PAG scale: 2, PAG layers: "mid,up"' in pag.infotexts[0]
