"""FreeU (Si et al. 2023): sdengine's SD1 pipeline against diffusers' ``enable_freeu`` on the same tiny random weights
(the oracle), version 2 against a float64 reference written here, off = the plain image, the request's and the CLI's
checks, the recorded loop's plan key and the infotext read back by ``--from-png``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _cpu_graphs import images_per_recorded_loop  # noqa: E402
from _pipeline_models import diffusers_scheduler  # noqa: E402
from sdengine.cli import main  # noqa: E402
from sdengine.errors import SdengineError  # noqa: E402
from sdengine.metadata import parse_parameters, to_generate_kwargs  # noqa: E402
from sdengine.nn.freeu import FreeU, freeu_concat  # noqa: E402
from sdengine.pipeline import GenerationError  # noqa: E402
from sdengine.pipeline.request import GenerationRequest  # noqa: E402

SIZE, STEPS, SEED = 32, 4, 5
PROMPT, NEGATIVE = "a red apple on a table", "blurry, dark"
FACTORS = (1.5, 1.6, 0.9, 0.2)


@pytest.fixture(scope="module")
def sd1(tiny_sd1_folder):
    return tiny_sd1_folder, sdengine.load_pipeline(tiny_sd1_folder, device="cpu", fast_path="none")


def _ours(pipe: Any, **kw: Any) -> Any:
    args: dict[str, Any] = dict(
        steps=STEPS, sampler="euler", schedule="normal", cfg_scale=7.5, seed=SEED, width=SIZE, height=SIZE
    )
    args.update(kw)
    return pipe(PROMPT, NEGATIVE, progress=False, **args)


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def test_freeu_v1_matches_diffusers_enable_freeu(sd1):
    from diffusers import StableDiffusionPipeline

    folder, pipe = sd1
    ref = StableDiffusionPipeline.from_pretrained(
        folder, local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers_scheduler(folder, "euler")
    b1, b2, s1, s2 = FACTORS
    ref.enable_freeu(s1=s1, s2=s2, b1=b1, b2=b2)

    def theirs() -> np.ndarray:
        return ref(
            PROMPT,
            negative_prompt=NEGATIVE,
            num_inference_steps=STEPS,
            guidance_scale=7.5,
            generator=torch.Generator("cpu").manual_seed(SEED),
            output_type="np",
            width=SIZE,
            height=SIZE,
        ).images

    with_freeu = theirs()
    ours = _ours(pipe, freeu=FACTORS, freeu_version=1, freeu_rule="diffusers").arrays
    plain = _ours(pipe).arrays
    assert _mad(ours, with_freeu) < 1e-4
    assert _mad(plain, with_freeu) > 10 * _mad(ours, with_freeu)  # FreeU changed the image, as theirs


def _v2_reference(h: torch.Tensor, skip: torch.Tensor, b: float, s: float) -> torch.Tensor:
    """Version 2 in float64: the first half of h's channels times 1 + (b - 1) * (min-max normalised channel mean),
    the skip's centred 2 x 2 shifted FFT frequencies times s."""
    h64, skip64 = h.double(), skip.double()
    mean = h64.mean(dim=1, keepdim=True)
    out = torch.empty_like(h64)
    for i in range(h64.shape[0]):
        m = mean[i]
        m = (m - m.min()) / (m.max() - m.min())
        out[i] = h64[i]
        half = h64.shape[1] // 2
        out[i, :half] = h64[i, :half] * (1 + (b - 1) * m)
    f = torch.fft.fftshift(torch.fft.fft2(skip64), dim=(-2, -1))
    hh, ww = f.shape[-2] // 2, f.shape[-1] // 2
    f[..., hh - 1 : hh + 1, ww - 1 : ww + 1] *= s
    skip_out = torch.fft.ifft2(torch.fft.ifftshift(f, dim=(-2, -1))).real
    return torch.cat([out, skip_out], dim=1)


@pytest.mark.parametrize("shape", [(2, 8, 6, 6), (1, 6, 5, 7)])
def test_freeu_v2_concat_matches_a_float64_reference(shape):
    g = torch.Generator().manual_seed(0)
    h, skip = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    got = freeu_concat(h, skip, 1.4, 0.3, version=2)
    want = _v2_reference(h, skip, 1.4, 0.3)
    assert float((got.double() - want).abs().max()) < 1e-5
    plain = torch.cat([h, skip], dim=1)
    assert float((got - plain).abs().mean()) > 1e-2  # it did something


def test_freeu_off_is_bit_identical_and_v2_differs(sd1):
    _, pipe = sd1
    plain = _ours(pipe, steps=2)
    again = _ours(pipe, steps=2, freeu=None)
    np.testing.assert_array_equal(plain.arrays, again.arrays)
    neutral = _ours(pipe, steps=2, freeu=(1.0, 1.0, 1.0, 1.0), freeu_version=1)  # every factor 1: the plain image
    np.testing.assert_array_equal(plain.arrays, neutral.arrays)
    v2 = _ours(pipe, steps=2, freeu=FACTORS)
    assert _mad(v2.arrays, plain.arrays) > 1e-4


@pytest.mark.parametrize(
    "kw,why",
    [
        (dict(freeu=(1.0, 1.0, 1.0)), "freeu must be four numbers"),
        (dict(freeu="1,1,1,1"), "freeu must be four numbers"),
        (dict(freeu=(1.0, 1.0, -1.0, 1.0)), "freeu s1 must be a number in"),
        (dict(freeu=(1.0, float("nan"), 1.0, 1.0)), "freeu b2 must be a number in"),
        (dict(freeu=(1.0, 1.0, 1.0, 11.0)), "freeu s2 must be a number in"),
        (dict(freeu=FACTORS, freeu_version=3), "freeu_version must be 1 or 2"),
        (dict(freeu=FACTORS, freeu_rule="all"), "unknown freeu_rule"),
    ],
)
def test_bad_freeu_settings_are_one_line_errors(kw, why):
    with pytest.raises(GenerationError, match=why) as e:
        GenerationRequest(prompt="x", **kw).validate()
    assert "\n" not in str(e.value)


def test_freeu_settings_check_their_values():
    with pytest.raises(SdengineError, match="FreeU version must be 1 or 2"):
        FreeU(1.0, 1.0, 1.0, 1.0, version=0)
    assert FreeU(*FreeU(1.3, 1.4, 0.9, 0.2, version=1).key) == FreeU(1.3, 1.4, 0.9, 0.2, version=1)


def test_the_infotext_records_freeu_and_reads_back(sd1):
    _, pipe = sd1
    res = _ours(pipe, steps=2, freeu=FACTORS, freeu_version=1, freeu_rule="diffusers")
    text = res.infotexts[0]
    assert 'FreeU: "1.5,1.6,0.9,0.2"' in text and "FreeU version: 1" in text and "FreeU rule: diffusers" in text, text
    kwargs = to_generate_kwargs(parse_parameters(text))
    assert kwargs["freeu"] == FACTORS and kwargs["freeu_version"] == 1 and kwargs["freeu_rule"] == "diffusers"
    np.testing.assert_array_equal(pipe(**{**kwargs, "progress": False}).arrays, res.arrays)
    plain = _ours(pipe, steps=2).infotexts[0]
    assert "FreeU" not in plain and "freeu" not in to_generate_kwargs(parse_parameters(plain))


def test_the_cli_runs_freeu_and_reads_it_back_from_png(sd1, tmp_path):
    folder, pipe = sd1
    out = tmp_path / "f.png"
    common = ["--model", str(folder), "--steps", "2", "--width", "32", "--height", "32", "--seed", "7"]
    common += ["--sampler", "euler", "--no-progress"]
    assert (
        main(["generate", PROMPT, *common, "--freeu", "1.5,1.6,0.9,0.2", "--freeu-version", "1", "--out", str(out)])
        == 0
    )
    want = pipe(PROMPT, steps=2, width=32, height=32, seed=7, sampler="euler", freeu=FACTORS, freeu_version=1)
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(want.images[0]))
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(out), "--model", str(folder), "--no-progress", "--out", str(again)]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))


@pytest.mark.parametrize(
    "args,why",
    [
        (["--freeu", "1,2"], "--freeu takes four numbers"),
        (["--freeu", "1,1,1,20"], "freeu s2 must be a number in"),
        (["--freeu-version", "1"], "--freeu-version has no effect without --freeu"),
    ],
)
def test_bad_freeu_flags_are_one_line_errors(tmp_path, capsys, args, why):
    rc = main(["generate", "x", "--model", str(tmp_path / "none"), *args, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and why in err, err


def test_the_recorded_loop_keys_freeu_and_replays_its_images(tiny_sd1_folder):
    """Two FreeU settings never share a recorded loop (the stand-in recorder replays the first plan of a key)."""
    pipe = sdengine.load_pipeline(tiny_sd1_folder, device="cpu", dtype="fp32", fast_path="none")
    settings = [{}, {"freeu": FACTORS}, {"freeu": FACTORS, "freeu_version": 1}, {"freeu": (1.2, 1.2, 0.5, 0.5)}]
    images_per_recorded_loop(pipe, settings, steps=3, seed=3, width=32, height=32, progress=False)


def test_forges_whole_run_window_is_read_and_another_is_warned_of(caplog):
    """Forge writes its FreeU window (``freeu_start``/``freeu_end``, fractions of the steps); 0 and 1 are the whole
    run, which is what sdengine's FreeU does: read without a warning (once warned of as "not reproduced"); a
    narrower window is named in the warning, the image may differ."""
    forge = (
        "a red apple\nSteps: 4, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, freeu_enabled: True, "
        "freeu_b1: 1.3, freeu_b2: 1.4, freeu_s1: 0.9, freeu_s2: 0.2, freeu_start: {start}, freeu_end: 1.0"
    )
    with caplog.at_level("WARNING", logger="sdengine.metadata"):
        kwargs = to_generate_kwargs(parse_parameters(forge.format(start="0.0")))
    assert kwargs["freeu"] == (1.3, 1.4, 0.9, 0.2) and "not reproduced" not in caplog.text, caplog.text
    with caplog.at_level("WARNING", logger="sdengine.metadata"):
        to_generate_kwargs(parse_parameters(forge.format(start="0.3")))
    assert "not reproduced" in caplog.text and "freeu_start" in caplog.text and "freeu_end" not in caplog.text
