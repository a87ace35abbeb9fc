"""Perturbed-attention guidance (Ahn et al. 2024): sdengine's pipeline against diffusers' StableDiffusionPAGPipeline
on the same tiny random weights (the oracle), the layers it perturbs, the identity attention map, the recorded loop's
plan key, the request's checks and the infotext read back.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _cpu_graphs import CPUBackend, images_per_recorded_loop  # noqa: E402
from _pipeline_models import diffusers_scheduler  # noqa: E402
from sdengine.errors import SdengineError  # noqa: E402
from sdengine.metadata import parse_parameters, to_generate_kwargs  # noqa: E402
from sdengine.nn.attention import Attention, identity_attention, pag_layers  # noqa: E402
from sdengine.pipeline import GenerationError  # noqa: E402
from sdengine.pipeline.request import GenerationRequest  # noqa: E402

TOL = 1e-3  # mean absolute difference on 0..1 pixels (docs/CONTRACTS.md, Test oracles); seen: ~2e-7
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
        steps=STEPS, sampler="euler", schedule="normal", cfg_scale=7.5, seed=SEED, width=SIZE, height=SIZE
    )
    args.update(kw)
    return pipe(PROMPT, NEGATIVE, progress=False, **args)


@pytest.mark.parametrize(
    "kw",
    [
        dict(pag_scale=3.0),
        dict(pag_scale=3.0, cfg_scale=1.0),  # no CFG: cond + scale * (cond - perturbed)
        dict(pag_scale=2.0, guidance_rescale=0.7),  # diffusers rescales after adding the PAG term
        dict(pag_scale=3.0, pag_layers=["mid", "up"]),
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_pag_matches_diffusers_pag_pipeline(sd1, kw):
    from diffusers import StableDiffusionPAGPipeline

    folder, pipe = sd1
    layers = kw.get("pag_layers", "mid")
    ref = StableDiffusionPAGPipeline.from_pretrained(
        folder, pag_applied_layers=layers, local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers_scheduler(folder, "euler")
    theirs = ref(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=kw.get("cfg_scale", 7.5),
        pag_scale=kw["pag_scale"],
        guidance_rescale=kw.get("guidance_rescale", 0.0),
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="np",
        width=SIZE,
        height=SIZE,
    ).images
    ours = _ours(pipe, **kw).arrays
    assert ours.std() > 0.05
    assert _mad(ours, theirs) < TOL
    plain = _ours(pipe, **{k: v for k, v in kw.items() if not k.startswith("pag")}).arrays
    assert _mad(ours, plain) > 1e-3  # the guidance changed the image


def test_pag_runs_the_perturbed_rows_in_the_same_batched_call(sd1, monkeypatch):
    _, pipe = sd1
    rows: list[int] = []
    forward = pipe.unet.forward
    monkeypatch.setattr(pipe.unet, "forward", lambda x, *a, **k: rows.append(x.shape[0]) or forward(x, *a, **k))
    _ours(pipe, pag_scale=3.0, steps=2)
    _ours(pipe, pag_scale=3.0, cfg_scale=1.0, steps=2)
    assert rows == [3, 3, 2, 2]  # [cond, uncond, perturbed]; without CFG [cond, perturbed]


def test_pag_layers_follow_diffusers_rule(sd1):
    _, pipe = sd1
    names = {id(m): n for n, m in pipe.unet.named_modules()}

    def chosen(*patterns: str) -> list[str]:
        return sorted(names[id(m)] for m in pag_layers(pipe.unet, patterns))

    assert chosen("mid") == ["mid_block.attentions.0.transformer_blocks.0.attn1"]
    assert chosen("up") == [
        "up_blocks.1.attentions.0.transformer_blocks.0.attn1",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn1",
    ]
    assert chosen("mid", "mid_block") == chosen("mid")  # a layer named twice is perturbed once
    assert all(n.endswith("attn1") for n in chosen("down", "mid", "up"))  # self-attention only, never attn2
    for bad, why in [("nosuch", "matches no self-attention layer"), ("mid(", "is not a regular expression")]:
        with pytest.raises(SdengineError, match=why):
            pag_layers(pipe.unet, [bad])
        with pytest.raises(SdengineError, match=why):  # checked before any model runs
            _ours(pipe, pag_scale=2.0, pag_layers=bad)


def test_identity_attention_answers_the_value_projection_for_the_last_rows_only():
    torch.manual_seed(0)
    attn = Attention(16, 2, 8).eval()
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        plain = attn(x)
        with identity_attention([attn], 1):
            mixed = attn(x)
        after = attn(x)
        value = attn.to_out[0](attn.to_v(x[2:]))
    torch.testing.assert_close(mixed[:2], plain[:2])
    torch.testing.assert_close(mixed[2:], value)
    assert not torch.allclose(plain[2:], value)
    torch.testing.assert_close(after, plain)  # switched back when the block ends
    with pytest.raises(RuntimeError), identity_attention([attn], 2):  # and after an error inside it
        raise RuntimeError
    assert attn.identity_rows == 0


@pytest.mark.parametrize(
    "kw,why",
    [
        (dict(pag_scale=-1.0), "pag_scale must be a number in"),
        (dict(pag_scale=1e9), "pag_scale must be a number in"),
        (dict(pag_scale=float("nan")), "pag_scale must be a number in"),
        (dict(pag_scale="3"), "pag_scale must be a number in"),
        (dict(pag_scale=2.0, pag_layers=""), "pag_layers holds an empty layer name"),
        (dict(pag_scale=2.0, pag_layers=["mid", 3]), "pag_layers must be a string or a list of strings"),
    ],
)
def test_bad_pag_settings_are_one_line_errors(kw, why):
    with pytest.raises(GenerationError, match=why):
        GenerationRequest(prompt="x", **kw).validate()


def test_the_infotext_records_pag_and_reads_back(sd1):
    _, pipe = sd1
    res = _ours(pipe, pag_scale=2.5, pag_layers="mid,up_blocks.1", steps=2)
    text = res.infotexts[0]
    assert "PAG scale: 2.5" in text and 'PAG layers: "mid,up_blocks.1"' in text
    kwargs = to_generate_kwargs(parse_parameters(text))
    assert (kwargs["pag_scale"], kwargs["pag_layers"]) == (2.5, "mid,up_blocks.1")
    again = pipe(**{**kwargs, "progress": False}).arrays
    np.testing.assert_array_equal(again, res.arrays)
    plain = _ours(pipe, steps=2).infotexts[0]
    assert "PAG" not in plain
    assert "pag_scale" not in to_generate_kwargs(parse_parameters(plain))
    default_layers = _ours(pipe, pag_scale=1.0, steps=2).infotexts[0]
    assert "PAG scale: 1" in default_layers and "PAG layers" not in default_layers  # "mid" is the default


def test_the_recorded_loop_keys_pag_and_replays_its_images(tiny_sd1_folder):
    """Two PAG settings never share a recorded loop (the stand-in recorder replays the first plan of a key, so a
    setting missing from the key would show as the other setting's image)."""
    pipe = sdengine.load_pipeline(tiny_sd1_folder, device="cpu", dtype="fp32", fast_path="none")
    args: dict[str, Any] = dict(steps=3, seed=3, width=32, height=32, progress=False)
    settings = [{}, {"pag_scale": 2.0}, {"pag_scale": 3.0}, {"pag_scale": 3.0, "pag_layers": "mid,up"}]
    images, loop = images_per_recorded_loop(pipe, settings, **args)
    assert pipe.cuda_graphs["unet"].replays == 0
    again = pipe("a red cube", "blurry", **args, pag_scale=2.0).arrays  # replayed from its own recording
    assert loop.recordings == len(settings) and loop.replays == len(settings) + 1
    np.testing.assert_array_equal(again, images[1])


def test_pag_bypasses_the_step_graphs(tiny_sd1_folder):
    """A step graph would replay the U-Net's attention unperturbed: with PAG the plain network runs."""
    pipe = sdengine.load_pipeline(tiny_sd1_folder, device="cpu", dtype="fp32", fast_path="none")
    args: dict[str, Any] = dict(steps=2, seed=3, width=32, height=32, progress=False, pag_scale=3.0)
    want = pipe("a red cube", **args).arrays
    pipe.enable_cuda_graphs(backend=CPUBackend(), device_type="cpu")
    got = [pipe("a red cube", **args).arrays for _ in range(2)]
    assert pipe.cuda_graphs["unet"].recordings == 0
    for g in got:
        np.testing.assert_array_equal(g, want)
