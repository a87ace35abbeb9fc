"""Property tests of two more readers of outside data: LoRA files (kohya and PEFT names, any shapes, alphas
and metadata, then applied to a U-Net) and infotext turned into a generation request (``--from-png``). Whatever
the input: a result, or one line of a named sdengine error; never another exception or a hang, and a LoRA
that was refused leaves the U-Net's weights as they were.

Bounded in `make test` (SDENGINE_FUZZ_EXAMPLES, 100 by default; `make fuzz` runs more).
"""

from __future__ import annotations

import json
import math
import os
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdengine.errors import SdengineError
from sdengine.metadata import parse_parameters, to_generate_kwargs
from sdengine.models.unet import TINY_SD, UNet
from sdengine.pipeline.request import GenerationRequest
from sdengine.prompts import extract_lora_tags, parse_prompt_attention
from sdengine.weights import save_safetensors
from sdengine.weights.lora import apply_loras
from sdengine.weights.lora_file import LoRAFile

EXAMPLES = int(os.environ.get("SDENGINE_FUZZ_EXAMPLES", "100"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
SECONDS = 5.0  # per input, on a loaded 2-core machine


def _result_or_one_line(fn):
    t0 = time.perf_counter()
    try:
        out = fn()
    except SdengineError as e:
        assert "\n" not in str(e).strip(), str(e)
        out = e
    assert time.perf_counter() - t0 < SECONDS
    return out


# -- LoRA files -------------------------------------------------------------------------------------------

# Real layer names of the tiny U-Net (kohya spelling) plus near misses and junk.
_LAYERS = [
    "lora_unet_down_blocks_0_attentions_0_proj_in",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    "lora_unet_mid_block_resnets_0_conv1",
    "lora_unet_up_blocks_1_attentions_0_proj_out",
    "lora_unet_nothing_here",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
    "unet.down_blocks.0.attentions.0.proj_in",
    "",
]
_PARTS = ["lora_down.weight", "lora_up.weight", "alpha", "lora_A.weight", "lora_B.weight", "dora_scale", "x"]
_dim = st.one_of(st.integers(0, 4), st.sampled_from([32, 64]))
_value = st.one_of(st.floats(-2, 2), st.sampled_from([0.0, 1e30, -1e30, math.inf, -math.inf, math.nan, 1e4, 2.0, 8.0]))


@st.composite
def lora_dicts(draw):
    out = {}
    for _ in range(draw(st.integers(0, 5))):
        layer, part = draw(st.sampled_from(_LAYERS)), draw(st.sampled_from(_PARTS))
        shape = draw(st.lists(_dim, min_size=0, max_size=4))
        dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool]))
        t = torch.full(shape, draw(_value)).to(dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)
        out[f"{layer}.{part}" if layer else part] = t
    return out


_meta_values = st.one_of(
    st.text(max_size=20),
    st.builds(json.dumps, st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.floats(), st.text()))),
    st.sampled_from(
        [
            '{"unet.lora_alpha": 1e400}',
            '{"unet.r": 0, "unet.lora_alpha": "x"}',
            '{"unet.alpha_pattern": "x"}',
            '{"unet.alpha_pattern": {"(a+)+$": 2}}',
            '{"unet.alpha_pattern": {"proj_in": 1e30}}',
            "[]",
            "[1, 2]",
            "{",
        ]
    ),
)
_metadata = st.one_of(
    st.none(),
    st.dictionaries(
        st.sampled_from(["lora_adapter_metadata", "ss_network_alpha", "ss_network_dim", "modelspec.title", "x"]),
        _meta_values,
        max_size=3,
    ),
)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet(TINY_SD).eval()


@FUZZ
@given(tensors=lora_dicts(), metadata=_metadata)
def test_lora_files_load_and_apply_or_give_a_named_error(tmp_path, unet, tensors, metadata):
    path = tmp_path / "fuzz.safetensors"
    save_safetensors(tensors, path, metadata=metadata)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    lf = _result_or_one_line(lambda: LoRAFile.load(path))
    if isinstance(lf, LoRAFile):
        handle = _result_or_one_line(lambda: apply_loras(unet, None, [(lf, 0.5)]))
        if not isinstance(handle, SdengineError):
            x = torch.randn(1, TINY_SD.in_channels, 8, 8)
            ctx = torch.randn(1, 4, TINY_SD.cross_attention_dim)
            with torch.no_grad():
                unet(x, torch.tensor([10]), ctx)  # the patched model runs
            handle.remove()
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # applied and removed, or never touched


# -- infotext -> request ----------------------------------------------------------------------------------

_FIELD_NAMES = ["Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Denoising strength", "Clip skip",
                "Mask blur", "CFG Rescale phi", "Variation seed", "Variation seed strength", "Model"]  # fmt: skip
_FIELD_VALUES = st.one_of(
    st.sampled_from(
        [
            "20",
            "7.5",
            "1e308",
            "nan",
            "inf",
            "-1",
            "18446744073709551616",
            "1.5",
            "64x64",
            "0x0",
            "99999999x1",
            "Euler a",
            "DPM++ 2M",
            "Karras",
            "",
            "x",
            "(heart:1e39)",
        ]
    ),  # fmt: skip
    st.text(max_size=8),
)


@st.composite
def infotexts(draw):
    prompt = draw(
        st.one_of(st.sampled_from(["a red heart", "(x:1.3) BREAK y", "<lora:a:1e30>", ""]), st.text(max_size=30))
    )
    fields = draw(st.lists(st.tuples(st.sampled_from(_FIELD_NAMES), _FIELD_VALUES), max_size=8))
    last = ", ".join(f"{k}: {v}" for k, v in fields)
    negative = draw(st.one_of(st.just(""), st.text(max_size=20)))
    return prompt + (f"\nNegative prompt: {negative}" if negative else "") + "\n" + last


@FUZZ
@given(infotexts())
def test_infotext_becomes_a_valid_request_or_a_named_error(text):
    def read():
        kwargs = to_generate_kwargs(parse_parameters(text))
        for key in ("prompt", "negative_prompt"):  # as generate reads them before loading a model
            parse_prompt_attention(extract_lora_tags(kwargs.get(key, ""))[0])
        return GenerationRequest(**kwargs).validate()

    r = _result_or_one_line(read)
    if isinstance(r, GenerationRequest):
        assert isinstance(r.prompt, str) and math.isfinite(r.cfg_scale) and isinstance(r.steps, int)


@pytest.mark.parametrize(
    "meta, refused",
    [
        ("[]", False),  # found by the fuzz test: a JSON list crashed with AttributeError; now ignored (warned)
        ('{"unet.alpha_pattern": "x"}', True),
        ('{"unet.alpha_pattern": {"(a+)+$": 2}}', True),  # a regex that could backtrack: refused
        ('{"unet.lora_alpha": 4, "unet.alpha_pattern": {"proj_in": 2}}', False),
    ],
)
def test_odd_peft_metadata_is_ignored_or_refused_by_name(tmp_path, meta, refused):
    layer = "unet.down_blocks.0.attentions.0.proj_in"
    tensors = {f"{layer}.lora_A.weight": torch.ones(2, 32), f"{layer}.lora_B.weight": torch.ones(32, 2)}
    save_safetensors(tensors, tmp_path / "p.safetensors", metadata={"lora_adapter_metadata": meta})
    out = _result_or_one_line(lambda: LoRAFile.load(tmp_path / "p.safetensors"))
    assert isinstance(out, SdengineError) == refused, out
