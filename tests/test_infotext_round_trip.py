"""Writing an image's infotext and reading it back gives the settings that made it (no model runs).

The settings go through the pipeline's own writer (``sdengine.pipeline.infotext.call_parameters``, the row
fields the pipeline adds, ``sdengine.metadata.format_parameters``) and back through the readers
``--from-png`` uses (``parse_parameters``, ``to_generate_kwargs``, ``recorded_controlnets``,
``extract_lora_tags``): every sampler of the registry, every schedule it takes, on an SD 1.x and an SDXL model.
"""

from __future__ import annotations

import inspect
import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdengine.diffusion import sampling
from sdengine.metadata import (
    HIRES_UPSCALERS,
    format_parameters,
    parse_parameters,
    recorded_controlnets,
    to_generate_kwargs,
)
from sdengine.nn.lora import LoRAWeight
from sdengine.pipeline.control import ControlUnit
from sdengine.pipeline.infotext import call_parameters
from sdengine.prompts import extract_lora_tags, merge_style

_WORD = st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8)
_PHRASE = st.lists(_WORD, min_size=1, max_size=4).map(" ".join)
# prompts as people write them: phrases, emphasis, commas, several lines (no line of its own starts "Negative prompt:")
_PROMPT = st.lists(
    st.one_of(_PHRASE, _PHRASE.map(lambda p: f"({p}:1.2)"), _PHRASE.map(lambda p: f"[{p}]")), min_size=1, max_size=5
).flatmap(lambda parts: st.sampled_from([", ", ",\n", " BREAK "]).map(lambda sep: sep.join(parts)))
# any float a setting may take: exact values such as 0.1234567 must come back exact, not rounded to 6 digits
_FRACTION = st.floats(0, 1, allow_nan=False)
_WEIGHT = st.floats(-4, 4, allow_nan=False).filter(lambda w: w != 0)
_SCHEDULED = st.sampled_from(sorted(sampling.SAMPLERS)).flatmap(
    lambda s: st.tuples(st.just(s), st.sampled_from(sampling.SAMPLERS[s].schedules))
)


@st.composite
def _controlnet(draw):
    module = draw(st.sampled_from(["none", "canny", "threshold", "scribble", "softedge", "invert"]))
    from sdengine.control.preprocess import option_defaults

    options = {name: float(draw(st.integers(0, 255))) for name in option_defaults(module)}
    start = draw(st.floats(0, 0.99, allow_nan=False))
    end = draw(st.floats(start, 1, allow_nan=False).filter(lambda e: e > start))
    return ControlUnit(
        f"/models/{draw(_WORD)}-control.safetensors",
        None,
        draw(st.floats(0, 2, allow_nan=False)),
        start,
        end,
        draw(st.sampled_from(["diffusers", "a1111"])),
        module=module,
        module_options=options,
        processor_res=draw(st.none() | st.integers(64, 2048)),
        mode=draw(st.sampled_from(["balanced", "prompt", "controlnet"])),
        hires_mode=draw(st.none() | st.sampled_from(["balanced", "prompt", "controlnet"])),
    )


def _option_defaults(sampler: str) -> dict[str, object]:
    fn = sampling.SAMPLERS[sampler].fn
    params = inspect.signature(fn).parameters
    return {name: params[name].default for name in sampling.sampler_option_names(sampler)}


@st.composite
def _settings(draw):
    sdxl = draw(st.booleans())
    sampler, asked = draw(_SCHEDULED)
    schedule = sampling.resolve(sampler, asked, sdxl=sdxl)[1]  # what the pipeline runs
    style = draw(st.none() | _PHRASE | _PHRASE.map(lambda p: f"{p}, {{prompt}}"))
    prompt = draw(_PROMPT)
    numeric = [
        name
        for name, default in _option_defaults(sampler).items()
        if isinstance(default, float) and not isinstance(default, bool)
    ]
    options = draw(st.dictionaries(st.sampled_from(numeric), st.floats(0, 10, allow_nan=False))) if numeric else {}
    s = {
        "sdxl": sdxl,
        "sampler_options": options,
        "prompt": merge_style(style, prompt) if style else prompt,  # A1111 writes the styled prompt
        "negative_prompt": draw(st.just("") | _PROMPT),
        "steps": draw(st.integers(1, 150)),
        "sampler": sampler,
        "schedule": schedule,
        "cfg_scale": draw(st.floats(0, 30, allow_nan=False)),
        "seed": draw(st.integers(0, 2**64 - 1)),
        "width": draw(st.integers(8, 256)) * 8,
        "height": draw(st.integers(8, 256)) * 8,
        "clip_skip": draw(st.integers(0 if sdxl else 1, 12)),
        "clip_skip_rule": draw(st.sampled_from(["sdengine", "a1111", *(["a1111_sdxl_clip_l"] if sdxl else [])])),
        "strength": draw(st.none() | _FRACTION.filter(lambda x: x > 0)),
        "strength_rule": draw(st.sampled_from(["diffusers", "a1111"])),
        "loras": draw(
            st.lists(
                st.tuples(_WORD, st.one_of(_WEIGHT, st.tuples(_WEIGHT, _WEIGHT).map(lambda t: LoRAWeight(*t)))),
                max_size=3,
                unique_by=lambda t: t[0],
            )
        ),
        "subseed": draw(st.none() | st.integers(0, 2**32 - 1)),
        "subseed_strength": draw(_FRACTION),
        "controlnets": draw(st.lists(_controlnet(), max_size=3)),
        "guess_mode": draw(st.booleans()),
        "hires": None,
    }
    if draw(st.booleans()):
        hr_sampler, hr_asked = draw(_SCHEDULED)
        s["hires"] = {
            "hr_scale": draw(st.floats(1, 4, allow_nan=False)),
            "hr_resize": draw(st.none() | st.tuples(st.integers(0, 512), st.integers(0, 512))),
            "hr_second_pass_steps": draw(st.integers(0, 150)),
            "hr_upscaler": draw(st.sampled_from(HIRES_UPSCALERS)),
            "hr_sampler": hr_sampler,
            "hr_schedule": sampling.resolve(hr_sampler, hr_asked, sdxl=sdxl)[1],
            "hr_prompt": draw(st.none() | _PROMPT),
            "hr_negative_prompt": draw(st.none() | _PROMPT),
        }
        s["strength"] = draw(_FRACTION.filter(lambda x: x > 0))  # the second pass's
    return s


def _write(s) -> str:
    """The infotext the pipeline writes for these settings (pipeline.core's row, pipeline.hires' fields)."""
    sdxl = s["sdxl"]
    row = call_parameters(
        prompt=s["prompt"],
        negative_prompt=s["negative_prompt"],
        steps=s["steps"],
        sampler=s["sampler"],
        schedule=sampling.infotext_schedule(s["schedule"], sdxl=sdxl),
        cfg_scale=s["cfg_scale"],
        seed=s["seed"],
        width=s["width"],
        height=s["height"],
        model="model",
        model_hash="0123456789",
        strength=s["strength"],
        clip_skip=s["clip_skip"],
        clip_skip_rule=s["clip_skip_rule"],
        guidance_rescale=0.0,
        loras=[(f"/loras/{name}.safetensors", w) for name, w in s["loras"]],
        n_tag_loras=0,
        lora_dir=None,
        controlnets=s["controlnets"],
        guess_mode=s["guess_mode"] and bool(s["controlnets"]),
        mask_blur=None,
        sampler_options=s["sampler_options"],
        strength_rule=s["strength_rule"] if s["strength"] is not None else "diffusers",
    )
    if s["subseed"] is not None:
        row.update({"Variation seed": s["subseed"], "Variation seed strength": s["subseed_strength"]})
    h = s["hires"]
    if h is not None:
        if h["hr_sampler"] != s["sampler"]:
            row["Hires sampler"] = sampling.SAMPLERS[h["hr_sampler"]].a1111
        if h["hr_schedule"] != s["schedule"]:
            label = sampling.infotext_schedule(h["hr_schedule"], sdxl=sdxl)
            row["Hires schedule type"] = sampling.SCHEDULE_A1111[label]
        for key, name in (("hr_prompt", "Hires prompt"), ("hr_negative_prompt", "Hires negative prompt")):
            if h[key] is not None:
                row[name] = h[key]
        if h["hr_resize"] is None or h["hr_resize"] == (0, 0):
            row["Hires upscale"] = h["hr_scale"]
        else:
            row["Hires resize"] = "{}x{}".format(*h["hr_resize"])
        if h["hr_second_pass_steps"]:
            row["Hires steps"] = h["hr_second_pass_steps"]
        row["Hires upscaler"] = h["hr_upscaler"]
    return format_parameters(row)


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _check_round_trip(s) -> None:
    parsed = parse_parameters(_write(s))
    seen = _Warnings()
    logger = logging.getLogger("sdengine.metadata")
    logger.addHandler(seen)
    try:
        kw = to_generate_kwargs(parsed, hires=True)
        units = recorded_controlnets(parsed)
    finally:
        logger.removeHandler(seen)
    assert seen.messages == []  # nothing sdengine writes is "not reproduced"
    sdxl = s["sdxl"]
    # the prompt, with the LoRAs given as arguments written into it as tags (A1111 keeps them there)
    prompt, tags = extract_lora_tags(kw["prompt"])
    assert prompt.rstrip() == s["prompt"].rstrip()
    assert tags == [(name, w) for name, w in s["loras"]]
    assert kw["negative_prompt"] == s["negative_prompt"]
    assert (kw["steps"], kw["seed"], kw["width"], kw["height"]) == (s["steps"], s["seed"], s["width"], s["height"])
    assert kw["cfg_scale"] == s["cfg_scale"]
    # the schedule the pipeline runs again on the same model
    assert sampling.resolve(kw["sampler"], kw["schedule"], sdxl=sdxl) == (s["sampler"], s["schedule"])
    assert kw["clip_skip"] == s["clip_skip"]
    # the sampler's options (A1111's "Sigma ..." fields are written where not the default)
    got = kw.get("sampler_options", {})
    defaults = _option_defaults(s["sampler"])
    assert {k: got.get(k, defaults[k]) for k in s["sampler_options"]} == s["sampler_options"]
    # UniPC's variant and order are always written (as A1111): read back, they are the values that ran
    extra = {k: v for k, v in got.items() if k not in s["sampler_options"]}
    assert extra == {k: defaults[k] for k in extra}
    if s["clip_skip"] != 1 or s["clip_skip_rule"] == "a1111_sdxl_clip_l":  # at 1 sdengine's and A1111's agree
        assert kw.get("clip_skip_rule", "sdengine") == s["clip_skip_rule"]
    assert kw.get("strength") == s["strength"]
    if s["strength"] is not None:
        assert kw.get("strength_rule", "diffusers") == s["strength_rule"]
    if s["subseed"] is None:
        assert "subseed" not in kw
    else:
        assert (kw["subseed"], kw["subseed_strength"]) == (s["subseed"], s["subseed_strength"])
    h = s["hires"]
    if h is None:
        assert "enable_hr" not in kw
    else:
        assert kw["enable_hr"] and kw["hr_upscaler"] == h["hr_upscaler"]
        if h["hr_resize"] is None or h["hr_resize"] == (0, 0):
            assert kw["hr_scale"] == h["hr_scale"] and "hr_resize_x" not in kw
        else:
            assert (kw["hr_resize_x"], kw["hr_resize_y"]) == h["hr_resize"]
        assert kw.get("hr_second_pass_steps", 0) == h["hr_second_pass_steps"]
        hr = sampling.resolve(kw.get("hr_sampler") or kw["sampler"], kw.get("hr_schedule") or kw["schedule"], sdxl=sdxl)
        assert hr == (h["hr_sampler"], h["hr_schedule"])
        assert (kw.get("hr_prompt"), kw.get("hr_negative_prompt")) == (h["hr_prompt"], h["hr_negative_prompt"])
    assert len(units) == len(s["controlnets"])
    for got, unit in zip(units, s["controlnets"], strict=True):
        assert got.name == unit.label
        assert (got.weight, got.start, got.end, got.rule) == (unit.scale, unit.start, unit.end, unit.rule)
        assert (got.preprocessor, dict(got.options)) == (unit.module, dict(unit.module_options))
        assert got.processor_res == unit.processor_res
        assert got.mode == unit.mode and got.hires_mode == (None if unit.hires_mode == unit.mode else unit.hires_mode)
    assert (parsed.get("ControlNet guess mode") == "True") == (s["guess_mode"] and bool(s["controlnets"]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_settings())
def test_an_images_infotext_reads_back_as_the_settings_that_made_it(s):
    _check_round_trip(s)


def _base(**changes):
    s = {
        "sdxl": False,
        "prompt": "a cat",
        "negative_prompt": "",
        "steps": 20,
        "sampler": "euler",
        "schedule": "normal",
        "cfg_scale": 7.0,
        "seed": 1,
        "width": 512,
        "height": 512,
        "clip_skip": 1,
        "clip_skip_rule": "sdengine",
        "strength": None,
        "strength_rule": "diffusers",
        "loras": [],
        "subseed": None,
        "subseed_strength": 0.0,
        "sampler_options": {},
        "controlnets": [],
        "guess_mode": False,
        "hires": None,
    }
    return {**s, **changes}


@pytest.mark.parametrize(
    "settings_",
    [
        # every schedule on an SD 1.x model, the SDXL Align Your Steps table too (it had A1111's one label)
        pytest.param(_base(schedule="align_your_steps_sdxl"), id="the_sdxl_ays_table_on_an_sd1_model"),
        pytest.param(_base(sdxl=True, schedule="align_your_steps_sdxl"), id="the_sdxl_ays_table_on_an_sdxl_model"),
        # a ControlNet's exact weight and guidance (written with 6 significant digits, read back rounded)
        pytest.param(
            _base(controlnets=[ControlUnit("/m/cn.safetensors", None, 0.1234567, 0.1234567, 0.7654321)]),
            id="a_controlnets_exact_weight_and_guidance",
        ),
        # a LoRA's exact weight, and its separate text-encoder / U-Net weights (rounded the same way)
        pytest.param(
            _base(loras=[("detail", 0.1234567), ("style", LoRAWeight(0.1234567, 1.7654321))]),
            id="a_loras_exact_weight_and_its_te_unet_weights",
        ),
    ],
)
def test_settings_that_once_came_back_changed_read_back_as_they_were(settings_):
    _check_round_trip(settings_)
