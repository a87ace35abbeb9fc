"""SDXL-Turbo / SDXL-Lightning style folders: a scheduler config with ``timestep_spacing: "trailing"`` (Turbo's
EulerAncestralDiscreteScheduler, Lightning's EulerDiscreteScheduler), 1 and 4 steps, without guidance, against
diffusers' ``StableDiffusionXLPipeline`` on the same tiny random folder.

diffusers runs no guidance at ``guidance_scale`` <= 1 (Turbo's documented call passes 0.0): that is sdengine's
``cfg_scale`` 1 (no unconditional pass). sdengine's ``cfg_scale`` 0 is A1111's and ComfyUI's rule, uncond + 0 x
(cond - uncond): the negative prompt's prediction alone, checked here as diffusers' image of the negative prompt.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import sdengine
from _sdxl_models import diffusers_sdxl, make_sdxl_folder

BAR = 1e-4  # mean abs on 0..1 pixels
SIZE, SEED = 32, 3
PROMPT, NEGATIVE = "a red apple on a table", "blurry, dark"
KINDS = {  # our sampler: the scheduler class of the release (Turbo: Euler a; Lightning: Euler)
    "euler_a": "EulerAncestralDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
}


@pytest.fixture(scope="module", params=list(KINDS))
def turbo(request, tmp_path_factory):
    """(sampler, sdengine's pipeline, diffusers' pipeline) of a tiny SDXL folder whose scheduler is the kind's class
    with trailing timestep spacing (written in scheduler_config.json and model_index.json, as the releases ship)."""
    sampler = request.param
    folder = make_sdxl_folder(tmp_path_factory.mktemp("turbo") / "tiny-sdxl-turbo")
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config.update(_class_name=KINDS[sampler], timestep_spacing="trailing")
    path.write_text(json.dumps(config))
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", KINDS[sampler]]
    (folder / "model_index.json").write_text(json.dumps(index))
    ours = sdengine.load_pipeline(folder, device="cpu")
    theirs = diffusers_sdxl(folder)
    assert type(theirs.scheduler).__name__ == KINDS[sampler]
    assert theirs.scheduler.config.timestep_spacing == "trailing"
    assert ours.scheduler_config["timestep_spacing"] == "trailing"
    return sampler, ours, theirs


def _ours(pipe, sampler: str, steps: int, cfg: float) -> np.ndarray:
    kw = dict(steps=steps, sampler=sampler, schedule="normal", cfg_scale=cfg, seed=SEED, width=SIZE, height=SIZE)
    return pipe(PROMPT, NEGATIVE, progress=False, **kw).arrays[0].astype(np.float64)


def _theirs(pipe, steps: int, guidance: float, prompt: str = PROMPT) -> np.ndarray:
    gen = torch.Generator("cpu").manual_seed(SEED)
    kw = dict(num_inference_steps=steps, guidance_scale=guidance, generator=gen, output_type="np")
    return pipe(prompt, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, **kw).images[0].astype(np.float64)


@pytest.mark.parametrize("steps", [1, 4])
def test_trailing_spacing_without_guidance_matches_diffusers(turbo, steps):
    """Trailing spacing's grid (1 step: t = 999 from sigma_max, the start noise at sigma_max, not sqrt(1 +
    sigma_max^2)), Euler and Euler a, no guidance: diffusers' image at guidance_scale 0 and 1 alike."""
    sampler, ours, theirs = turbo
    got = _ours(ours, sampler, steps, 1.0)
    assert got.std() > 0.02
    for guidance in (0.0, 1.0):
        mad = float(np.abs(got - _theirs(theirs, steps, guidance)).mean())
        print(f"sdxl trailing {sampler} {steps} steps, diffusers guidance {guidance}: mean abs {mad:.2e}")
        assert mad < BAR


def test_cfg_scale_zero_is_the_negative_prompts_prediction(turbo):
    """sdengine's cfg_scale 0 (A1111's, ComfyUI's) is not diffusers' guidance_scale 0: it is the unconditional
    (negative prompt's) prediction, diffusers' image of the negative prompt without guidance."""
    sampler, ours, theirs = turbo
    got = _ours(ours, sampler, 1, 0.0)
    mad = float(np.abs(got - _theirs(theirs, 1, 0.0, prompt=NEGATIVE)).mean())
    print(f"sdxl trailing {sampler} cfg 0 vs diffusers on the negative prompt: mean abs {mad:.2e}")
    assert mad < BAR
    assert float(np.abs(got - _theirs(theirs, 1, 0.0)).mean()) > 10 * BAR
