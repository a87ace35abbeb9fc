"""Where the ComfyUI route follows ComfyUI's own behaviour (docs/comfyui.md): a hint's fit (nearest-exact after a
centre cut), KSamplerAdvanced windows as fresh sampler runs on their sub-schedules, RescaleCFG and
PerturbedAttentionGuidance on regional conditioning, a client-chosen prompt_id used again.

The references are assembled here from sdengine's public functions on the tiny emoji model (64x64, few steps).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from _live_server import shared_loader


def _conds(pipe, text: str = "a star"):
    from sdengine.latent_sampling import encode_text

    return encode_text(pipe, text), encode_text(pipe, "")


# ------------------------------------------------------------------------------ ControlNet hints: ComfyUI's fit


def test_a_hint_of_another_size_is_cut_at_its_centre_and_resized_nearest_exact_as_comfyui():
    """ComfyUI fits a hint to the latent with common_upscale(hint, w, h, "nearest-exact", "center"): the source
    cut to the output's aspect around its centre (12 columns each side of a 64 x 40 hint for a square output),
    then resized nearest-exact. Under the comfyui seed rule the hint acts as that pre-fitted 64 x 64 map (it was
    Lanczos-resized); under sdengine's rule it keeps the native API's Lanczos."""
    from dataclasses import replace

    from sdengine.latent_sampling import ControlHint, sample_latents
    from sdengine.server.catalog import BUILTIN_CONTROLNETS

    pipe = shared_loader("emoji", "cpu")
    cn = str(BUILTIN_CONTROLNETS["emoji-controlnet-canny"])
    g = torch.Generator().manual_seed(4)
    hint = (torch.rand(1, 3, 40, 64, generator=g) > 0.8).float()  # a sparse edge-like map, wider than square
    fitted = F.interpolate(hint[:, :, :, 12:52], size=(64, 64), mode="nearest-exact")
    pos, neg = _conds(pipe)

    def run(h: torch.Tensor, rule: str) -> torch.Tensor:
        p = replace(pos, controls=(ControlHint(cn, h, 1.0),))
        with torch.inference_mode():
            return sample_latents(
                pipe, [p], [neg], torch.zeros(1, 4, 16, 16), seed=2, steps=3, cfg=5.0, sampler="euler",
                schedule="normal", seed_rule=rule,
            )  # fmt: skip

    assert torch.allclose(run(hint, "comfyui"), run(fitted, "comfyui"), atol=1e-5)
    # sdengine's rule: the Lanczos fit, which differs from the nearest one on a map this sharp
    assert not torch.allclose(run(hint, "sdengine"), run(fitted, "sdengine"), atol=1e-3)


def test_centre_cut_resize_rounds_the_cut_and_keeps_a_fitting_size():
    from sdengine.io.resize import centre_cut_resize

    t = torch.arange(2 * 3 * 5 * 9, dtype=torch.float32).reshape(2, 3, 5, 9)
    # aspect 9/5 to 1: (9 - 9 * (1 / 1.8)) / 2 = 2 columns cut each side, the 5 x 5 centre kept as it is
    assert torch.equal(centre_cut_resize(t, 5, 5), t[..., 2:7])
    # a 4 x 8 (w x h) target: (9 - 9 * (0.5 / 1.8)) / 2 = 3.25 -> 3 columns cut each side, then nearest-exact
    out = centre_cut_resize(t, 4, 8)
    assert torch.equal(out, F.interpolate(t[..., 3:6], size=(8, 4), mode="nearest-exact"))
    # a wide target from a tall source: rows cut, (9 - 9 * (5 / 9) / 2) ... here 9 x 5 -> 9 x 2: rows
    tall = t.transpose(-1, -2)  # 9 high, 5 wide; target 5 x 3 (aspect 5/3 > 5/9): (9 - 9 * (5/9) / (5/3)) / 2 = 3
    assert torch.equal(centre_cut_resize(tall, 5, 3), tall[..., 3:6, :])


# ------------------------------------------------------------------------------ KSamplerAdvanced windows


def _windows_vs_fresh_runs(sampler: str, options: dict, leftover: bool, discard: bool) -> tuple:
    """Two chained KSamplerAdvanced windows (0..3 with or without leftover noise, then 3..6 without noise) and
    the reference: a fresh run of the sampler on each window's sigmas (SamplerCustom's given list), the first
    window's last sigma 0 where the leftover noise is off (ComfyUI's force_full_denoise)."""
    from sdengine.diffusion import sampling
    from sdengine.latent_sampling import sample_latents

    pipe = shared_loader("emoji", "cpu")
    pos, neg = _conds(pipe)
    common = {"seed": 9, "cfg": 4.0, "sampler": sampler, "schedule": "karras", "sampler_options": options or None}
    zeros = torch.zeros(1, 4, 16, 16)
    with torch.inference_mode():
        first = sample_latents(
            pipe, [pos], [neg], zeros, steps=6, end_at_step=3, leftover_noise=leftover,
            discard_penultimate_sigma=discard, **common,
        )  # fmt: skip
        second = sample_latents(
            pipe, [pos], [neg], first, steps=6, start_at_step=3, add_noise=False,
            discard_penultimate_sigma=discard, **common,
        )  # fmt: skip
        name, sched = sampling.resolve(sampler, "karras")
        grid = sampling.make_grid(
            name, 6, pipe.noise_schedule, sched, pipe.scheduler_config, 1.0, discard_penultimate=discard,
            comfy_grid=True,
        )  # fmt: skip
        head = grid.sigmas[:4].clone()
        if not leftover:
            head[-1] = 0.0
        ref_first = sample_latents(pipe, [pos], [neg], zeros, steps=3, sigmas=head, **common)
        ref_second = sample_latents(
            pipe, [pos], [neg], ref_first, steps=3, sigmas=grid.sigmas[3:], add_noise=False, **common
        )
        whole = sample_latents(pipe, [pos], [neg], zeros, steps=6, discard_penultimate_sigma=discard, **common)
    return first, second, ref_first, ref_second, whole


def test_ksampler_advanced_windows_restart_uni_pc_as_fresh_runs():
    """ComfyUI's KSamplerAdvanced is a fresh sampler on its window's sigmas: UniPC (order 3, ComfyUI's bh1 with
    its 0.001 end) lowers its order at the window's end as at the end of any run. The window was once a part of
    the whole grid, keeping order 3 to its end (diffusers' hand-off), which another image."""
    from sdengine.server.comfy.nodes import SAMPLER_OPTIONS

    first, second, ref_first, ref_second, whole = _windows_vs_fresh_runs(
        "unipc", SAMPLER_OPTIONS["uni_pc"], leftover=True, discard=True
    )
    assert torch.allclose(first, ref_first, atol=1e-4)
    assert torch.allclose(second, ref_second, atol=1e-4)
    assert not torch.allclose(second, whole, atol=1e-3)  # the restart shows: not the one run of 6 steps


def test_ksampler_advanced_window_without_leftover_noise_walks_its_sampler_to_zero():
    """Without leftover noise ComfyUI sets the window's last sigma to 0 and its sampler steps there: a multistep
    sampler's last step uses its history (lms, uni_pc: not the last x0 estimate, which the window once gave)."""
    from sdengine.server.comfy.nodes import SAMPLER_OPTIONS

    for sampler, options, discard in (("lms", {}, False), ("unipc", SAMPLER_OPTIONS["uni_pc"], True)):
        first, second, ref_first, ref_second, _ = _windows_vs_fresh_runs(sampler, options, False, discard)
        assert torch.allclose(first, ref_first, atol=1e-4), sampler
        assert torch.allclose(second, ref_second, atol=1e-4), sampler


def test_ksampler_advanced_windows_of_a_single_step_sampler_are_unchanged():
    """dpmpp_2m (history from the window's start only): the two windows equal the fresh runs too."""
    for sampler in ("dpmpp_2m",):
        first, second, ref_first, ref_second, _ = _windows_vs_fresh_runs(sampler, {}, True, False)
        assert torch.allclose(first, ref_first, atol=1e-4), sampler
        assert torch.allclose(second, ref_second, atol=1e-4), sampler
