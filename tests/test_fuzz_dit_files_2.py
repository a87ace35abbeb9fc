"""Property tests of the single-file loaders :mod:`test_fuzz_dit_files` does not reach: FLUX.2 [dev] transformer files
(BFL's names, ComfyUI's prefix, ComfyUI's float8 mixed layout with ``.comfy_quant`` / ``.weight_scale`` /
``.input_scale``), ComfyUI's Mistral Small 3 text-encoder file (its tokenizer's tekken.json inside as ``tekken_model``;
plain and float8 mixed), the tekken.json itself, Qwen2.5-VL text-encoder files (Qwen-Image's: language model, vision
tower) and Qwen3 ones; and the bytes of every kind of file (Z-Image Union ControlNet, Z-Image / FLUX.2 LoRAs too)
truncated, their header length or header bytes wrong.

Each input is a valid tiny file with a few things broken: the tensor breakages of :mod:`test_fuzz_dit_files` (a
tensor dropped, misshapen, integer, unknown, renamed, empty, 0-d), a tensor made NaN / infinite / zero, a quantized
layer's marker, scale or weight broken, the file's bytes cut or its header garbled.

Whatever the input: a model that runs on a tiny input (finite outputs unless a weight was made non-finite), or one
line of a named sdengine error naming the file; never another exception. Some breakages must be refused (a cut file,
a quantized layer without a usable scale): a model from them would be silently wrong.

Bounded in `make test` (SDENGINE_FUZZ_EXAMPLES / 8: 12 inputs per loader by default); the ``*_many`` tests
(``slow``) run SDENGINE_FUZZ_SLOW_EXAMPLES (200) each.
"""

from __future__ import annotations

import copy
import json
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("diffusers")

from sdengine.errors import SdengineError  # noqa: E402
from sdengine.weights import save_safetensors  # noqa: E402
from test_fuzz_dit_files import _OPS, Built, _break  # noqa: E402

EXAMPLES = max(1, int(os.environ.get("SDENGINE_FUZZ_EXAMPLES", "100")) // 8)
SLOW_EXAMPLES = int(os.environ.get("SDENGINE_FUZZ_SLOW_EXAMPLES", "200"))
_COMMON = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck))
FUZZ = settings(max_examples=EXAMPLES, **_COMMON)
MANY = settings(max_examples=SLOW_EXAMPLES, **_COMMON)
SECONDS = 20.0  # one load (and run) of a tiny file: far less; more would be a hang in the making


class Refused(Exception):
    """Not raised: the marker of an input that must be refused."""


def _outcome(fn: Callable[[], Any], path: Path | None) -> Any:
    """fn()'s result, or the SdengineError it raised: one line, naming the file (``path``: what is loaded; None: a
    model run on an input, whose error names the input); any other exception fails."""
    start = time.monotonic()
    try:
        out = fn()
    except SdengineError as e:
        msg = str(e).strip()
        assert msg and "\n" not in msg, repr(msg)
        assert path is None or path.name in msg, f"the error does not name {path.name}: {msg}"
        out = e
    assert time.monotonic() - start < SECONDS, f"took {time.monotonic() - start:.1f} s"
    return out


# -- breaking a state dict (more ways than test_fuzz_dit_files'), quantized layers, bytes -------------------------

VALUE_OPS = ("nan", "inf", "zero")
_ALL_OPS = (*_OPS, *VALUE_OPS)
QUANT_OPS = (
    "marker other format",
    "marker e5m2",
    "marker not json",
    "marker list",
    "marker empty",
    "marker float",
    "drop marker",
    "drop scale",
    "drop input scale",
    "scale nan",
    "scale inf",
    "scale zero",
    "scale negative",
    "scale per row",
    "scale rows + 1",
    "scale int",
    "weight int",
    "weight 0-d",
    "weight 1-d",
)
# what a model from these would get wrong without a word: each must be refused
MUST_REFUSE_QUANT = {
    "marker other format",
    "marker not json",
    "marker list",
    "marker empty",
    "drop scale",
    "scale nan",
    "scale inf",
    "scale negative",
    "scale rows + 1",
    "scale int",
    "weight int",
    "weight 0-d",
}
BYTE_OPS = ("truncate", "header length", "header byte", "data byte")
MUST_REFUSE_BYTES = {"truncate", "header length"}


def _break_values(sd: dict[str, torch.Tensor], op: str, key: str) -> dict[str, torch.Tensor]:
    out = dict(sd)
    t = out[key]
    if not t.is_floating_point() or not t.numel():
        return out
    fill = {"nan": float("nan"), "inf": float("inf"), "zero": 0.0}[op]
    out[key] = torch.full_like(t.float(), fill).to(t.dtype)
    return out


def _marker(text: bytes) -> torch.Tensor:
    return torch.tensor(list(text), dtype=torch.uint8)


def _break_quant(sd: dict[str, torch.Tensor], op: str, layer: str) -> dict[str, torch.Tensor]:
    """``layer`` (a quantized layer's name: ``<layer>.comfy_quant`` or, ComfyUI's older scaled-fp8 layout,
    ``<layer>.scale_weight`` is in ``sd``) broken by ``op``."""
    out = dict(sd)
    comfy = f"{layer}.comfy_quant" in sd
    w, s = f"{layer}.weight", f"{layer}.weight_scale" if comfy else f"{layer}.scale_weight"
    if not comfy and op == "drop marker":
        out.pop(SCALED_MARKER, None)
        return out
    rows = out[w].shape[0]
    if op.startswith("marker "):
        value = {
            "marker other format": _marker(b'{"format": "nvfp4"}'),
            "marker e5m2": _marker(b'{"format": "float8_e5m2"}'),
            "marker not json": _marker(b'{"format": float8'),
            "marker list": _marker(b'["float8_e4m3fn"]'),
            "marker empty": torch.zeros(0, dtype=torch.uint8),
            "marker float": _marker(b'{"format": "float8_e4m3fn"}').float(),
        }[op]
        out[f"{layer}.comfy_quant"] = value
    elif op == "drop marker":
        del out[f"{layer}.comfy_quant"]
    elif op == "drop scale":
        del out[s]
    elif op == "drop input scale":
        out.pop(f"{layer}.input_scale" if comfy else f"{layer}.scale_input", None)
    elif op.startswith("scale ") and op != "scale int":
        value = {"scale nan": float("nan"), "scale inf": float("inf"), "scale zero": 0.0, "scale negative": -0.01}
        if op in value:
            out[s] = torch.tensor(value[op])
        else:
            n = rows if op == "scale per row" else rows + 1
            out[s] = out[s].float().reshape(()) * torch.linspace(0.5, 1.5, n)
    elif op == "scale int":
        out[s] = out[s].to(torch.int64)
    elif op == "weight int":
        out[w] = out[w].float().to(torch.int64)
    elif op == "weight 0-d":
        out[w] = torch.tensor(1.0, dtype=torch.float8_e4m3fn)
    elif op == "weight 1-d":
        out[w] = out[w][0].contiguous()
    return out


def _break_bytes(raw: bytes, op: str, pick: int) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    if op == "truncate":
        return raw[: [0, 4, 8, 8 + n // 2, 8 + n, len(raw) - 1, (8 + n + len(raw)) // 2][pick % 7]]
    if op == "header length":
        wrong = [0, 1, n - 1, n + 1, len(raw), 2**63, 2**64 - 1][pick % 7]
        return struct.pack("<Q", wrong) + raw[8:]
    if op == "header byte":
        at = 8 + (pick * 7919) % n
        return raw[:at] + bytes([b'{}[]",: x0\xff'[pick % 11]]) + raw[at + 1 :]
    at = 8 + n + (pick * 104729) % max(len(raw) - 8 - n, 1)  # data byte: flipped (a changed weight is not seen)
    return raw[:at] + bytes([raw[at] ^ 0x40]) + raw[at + 1 :] if at < len(raw) else raw


@st.composite
def tensor_steps(draw, keys: list[str]) -> list[tuple[str, str, int]]:
    """One or two (operation, tensor, pick) steps; half of the tensors drawn are top-level or in block / layer 0."""
    import re

    hot = [k for k in keys if not re.search(r"\.[1-9]\d*\.", k)] or keys
    return [
        (draw(st.sampled_from(_ALL_OPS)), draw(st.sampled_from(hot) | st.sampled_from(keys)), draw(st.integers(0, 7)))
        for _ in range(draw(st.integers(1, 2)))
    ]


def _apply_steps(
    sd: dict[str, torch.Tensor], steps: list[tuple[str, str, int]]
) -> tuple[dict[str, torch.Tensor], bool]:
    """(the broken state dict, whether a weight was made non-finite)."""
    nonfinite = False
    for op, key, pick in steps:
        if key not in sd:
            continue
        if op in VALUE_OPS:
            sd = _break_values(sd, op, key)
            nonfinite |= op != "zero" and sd[key].is_floating_point() and sd[key].numel() > 0
        else:
            sd = _break(sd, op, key, pick)
    return sd, nonfinite


class Case:
    """One broken file: how it was broken, whether it must be refused, whether its weights may be non-finite."""

    def __init__(self) -> None:
        self.must_refuse = False
        self.nonfinite = False


def _write_case(data: st.DataObject, sd: dict[str, torch.Tensor], path: Path, *, quant: bool) -> Case:
    """``sd`` broken one of the three ways (tensors, a quantized layer where ``quant``, bytes) and written to
    ``path``."""
    case = Case()
    kinds = ["tensors", "bytes"] + (["quant"] * 2 if quant else [])
    kind = data.draw(st.sampled_from(kinds), label="kind")
    if kind == "tensors":
        sd, case.nonfinite = _apply_steps(sd, data.draw(tensor_steps(sorted(sd)), label="steps"))
    elif kind == "quant":
        comfy = any(k.endswith(".comfy_quant") for k in sd)
        suffix = ".comfy_quant" if comfy else ".scale_weight"
        layer = data.draw(st.sampled_from(sorted(k[: -len(suffix)] for k in sd if k.endswith(suffix))), label="layer")
        ops = QUANT_OPS if comfy else [op for op in QUANT_OPS if not op.startswith("marker ")]
        op = data.draw(st.sampled_from(ops), label="quant op")
        sd = _break_quant(sd, op, layer)
        # (a scaled-fp8 layer without its scale is read at scale 1, as ComfyUI reads it)
        case.must_refuse = op in MUST_REFUSE_QUANT - ({"drop scale"} if not comfy else set()) or (
            not comfy and op == "drop marker"
        )
        case.nonfinite = op == "scale inf"
    save_safetensors(sd, path)
    if kind == "bytes":
        op = data.draw(st.sampled_from(BYTE_OPS), label="byte op")
        raw = _break_bytes(path.read_bytes(), op, data.draw(st.integers(0, 50), label="pick"))
        path.write_bytes(raw)
        case.must_refuse = op in MUST_REFUSE_BYTES
        case.nonfinite = op == "data byte"  # a flipped exponent bit can make an infinity
    return case


def _check(case: Case, path: Path, load: Callable[[], Any], run: Callable[[Any], torch.Tensor]) -> None:
    model = _outcome(load, path)
    if case.must_refuse:
        assert isinstance(model, SdengineError), f"{path.name}: loaded, but a model from it would be wrong"
    if isinstance(model, SdengineError):
        return
    out = _outcome(lambda: run(model), None)
    if isinstance(out, torch.Tensor) and not case.nonfinite:
        assert bool(torch.isfinite(out).all()), "a model with finite weights gave non-finite outputs"


def fp8_mixed(sd: dict[str, torch.Tensor], pick: Callable[[str, torch.Tensor], bool]) -> dict[str, torch.Tensor]:
    """ComfyUI's mixed-precision layout of ``sd``: the weights ``pick`` chooses float8 (weight / scale) with
    ``.weight_scale`` (amax / 448), ``.input_scale`` and ``.comfy_quant`` beside them."""
    marker = _marker(json.dumps({"format": "float8_e4m3fn"}).encode())
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if pick(k, v):
            layer = k[: -len(".weight")]
            scale = v.float().abs().max() / 448.0
            out[k] = (v.float() / scale).to(torch.float8_e4m3fn)
            out[f"{layer}.weight_scale"] = scale.reshape(())
            out[f"{layer}.input_scale"] = torch.tensor(1.0)
            out[f"{layer}.comfy_quant"] = marker.clone()
        else:
            out[k] = v
    return out


SCALED_MARKER = "scaled_fp8"


def fp8_scaled(sd: dict[str, torch.Tensor], pick: Callable[[str, torch.Tensor], bool]) -> dict[str, torch.Tensor]:
    """ComfyUI's older "scaled fp8" layout of ``sd``: the ``scaled_fp8`` marker, the weights ``pick`` chooses float8
    (weight / scale) with ``.scale_weight`` and ``.scale_input`` beside them."""
    out: dict[str, torch.Tensor] = {SCALED_MARKER: torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for k, v in sd.items():
        if pick(k, v):
            layer = k[: -len(".weight")]
            scale = v.float().abs().max() / 448.0
            out[k] = (v.float() / scale).to(torch.float8_e4m3fn)
            out[f"{layer}.scale_weight"] = scale.reshape(1)
            out[f"{layer}.scale_input"] = torch.ones(1)
        else:
            out[k] = v
    return out


# -- the valid tiny files -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzzdit2")


@pytest.fixture(scope="module")
def dev() -> Built:
    """A FLUX.2 [dev] transformer (guidance embedding, 128-wide heads) in BFL's names, ComfyUI's prefix and ComfyUI's
    float8 mixed layout (the blocks' Linear weights quantized)."""
    from _flux2_models import FILE_TRANSFORMER, flux2_transformer
    from test_flux2_files import bfl_layout

    net = flux2_transformer(seed=31, guidance_embeds=True, **FILE_TRANSFORMER)
    sd = {k: v.clone().contiguous() for k, v in net.state_dict().items()}
    comfy = bfl_layout(sd, "model.diffusion_model.")
    mixed = fp8_mixed(comfy, lambda k, v: "_blocks." in k and k.endswith(".weight") and v.ndim == 2)
    return Built(layouts={"bfl": bfl_layout(sd), "comfy": comfy, "fp8 mixed": mixed})


def _run_dev(model) -> torch.Tensor:
    c = model.config
    with torch.no_grad():
        return model(
            torch.randn(1, c.in_channels, 2, 2),
            torch.tensor([500.0]),
            torch.randn(1, 3, c.joint_attention_dim),
            torch.tensor([3.5]) if c.guidance_embeds else None,
        )


MISTRAL_FILE_TEXT = dict(num_attention_heads=1, num_key_value_heads=1, head_dim=128, num_hidden_layers=2)


def _qwen25_vl(seed: int):
    """A tiny ``Qwen2_5_VLForConditionalGeneration`` whose single file's configs read off the shapes: 128-wide text
    heads, a vision tower of the release's 16 heads (4 wide)."""
    import transformers

    from test_qwen_text import _randomize

    text = dict(
        vocab_size=300,
        hidden_size=256,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        rms_norm_eps=1e-6,
        bos_token_id=None,
        eos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
    )
    vision = dict(depth=1, hidden_size=64, intermediate_size=32, num_heads=16, out_hidden_size=256)
    model = transformers.Qwen2_5_VLForConditionalGeneration(
        transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision)
    ).eval()
    _randomize(model, seed)
    return model


@pytest.fixture(scope="module")
def texts(root: Path) -> Built:
    """ComfyUI's Mistral Small 3 file (``model.*``, ``lm_head``, ``tekken_model``) plain and float8 mixed; a
    Qwen2.5-VL file (Qwen-Image's: ``model.*``, ``visual.*``, ``lm_head``; 128-wide heads) plain and float8 mixed; a
    Qwen3 file (``model.*``, Z-Image's / klein's); the tekken.json."""
    from _flux2_dev_models import mistral3_text_encoder, tekken_json, write_mistral_processor
    from _z_image_models import qwen3_text_encoder
    from test_flux2_dev_files import comfy_mistral_layout
    from test_qwen_text import _old_layout_state

    tok = write_mistral_processor(root / "mistral_tokenizer")
    tekken = tekken_json(root / "mistral_tokenizer")
    mistral = comfy_mistral_layout(mistral3_text_encoder(len(tok), 41, MISTRAL_FILE_TEXT).state_dict(), tekken)
    qwen25 = _old_layout_state(_qwen25_vl(42))
    qwen3 = {k: v.clone().contiguous() for k, v in qwen3_text_encoder(43, 400).state_dict().items()}

    def linear(k: str, v: torch.Tensor) -> bool:
        return k.startswith("model.layers.") and k.endswith("_proj.weight")

    files = {
        "mistral": mistral,
        "mistral fp8 mixed": fp8_mixed(mistral, linear),
        "qwen2.5-vl": qwen25,
        "qwen2.5-vl fp8 mixed": fp8_mixed(qwen25, linear),
        "qwen2.5-vl scaled fp8": fp8_scaled(qwen25, linear),
        "qwen3": qwen3,
        "qwen3 fp8 mixed": fp8_mixed(qwen3, linear),
        "qwen3 scaled fp8": fp8_scaled(qwen3, linear),
    }
    return Built(files=files, tekken=json.loads(tekken))


def _run_text(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(torch.tensor([[1, 5, 9]]))
    assert out.shape[:2] == (1, 3)
    return out


def _run_vision(tower) -> torch.Tensor:
    from sdengine.models.qwen_vision import patch_rows

    c = tower.config
    side = c.patch_size * c.spatial_merge_size * 2
    pixels, grid = patch_rows(torch.rand(3, side, side), c)
    with torch.no_grad():
        return tower(pixels, [grid])


def test_the_unbroken_files_load_and_run(dev, texts, root) -> None:
    """What the property tests break is valid: each layout of each tiny file loads and runs (finite outputs), the
    Mistral file's tekken.json reads, the Qwen2.5-VL file's vision tower loads."""
    from sdengine.pipeline.flux2_loading import read_tekken
    from sdengine.weights.flux2_file import load_flux2_transformer
    from sdengine.weights.qwen_text_file import load_qwen_text_encoder
    from sdengine.weights.qwen_vision_file import load_qwen_vision_tower

    path = root / "valid.safetensors"
    for name, sd in dev["layouts"].items():
        save_safetensors(sd, path)
        model = load_flux2_transformer(path)
        assert model.config.guidance_embeds, name
        assert bool(torch.isfinite(_run_dev(model)).all()), name
    for name, sd in texts["files"].items():
        save_safetensors(sd, path)
        assert bool(torch.isfinite(_run_text(load_qwen_text_encoder(path))).all()), name
    save_safetensors(texts["files"]["mistral"], path)
    assert read_tekken(path).token_id("[SYSTEM_PROMPT]") == 17
    save_safetensors(texts["files"]["qwen2.5-vl"], path)
    assert bool(torch.isfinite(_run_vision(load_qwen_vision_tower(path))).all())


# -- FLUX.2 [dev] transformer files -------------------------------------------------------------------------------


def _dev_file(dev, root, data) -> None:
    from sdengine.weights.flux2_file import load_flux2_transformer

    layout = data.draw(st.sampled_from(sorted(dev["layouts"])), label="layout")
    path = root / "flux2-dev_broken.safetensors"
    case = _write_case(data, dev["layouts"][layout], path, quant=layout == "fp8 mixed")
    _check(case, path, lambda: load_flux2_transformer(path, dtype=torch.float32), _run_dev)


@FUZZ
@given(data=st.data())
def test_flux2_dev_files_load_or_give_a_named_error(dev, root, data) -> None:
    _dev_file(dev, root, data)


@pytest.mark.slow
@MANY
@given(data=st.data())
def test_flux2_dev_files_load_or_give_a_named_error_many(dev, root, data) -> None:
    _dev_file(dev, root, data)


# -- text-encoder files: Mistral Small 3 (FLUX.2 [dev]), Qwen2.5-VL (Qwen-Image), Qwen3 (Z-Image, klein) -----------


def _text_file(texts, root, data, names: list[str]) -> None:
    from sdengine.weights.qwen_text_file import load_qwen_text_encoder

    name = data.draw(st.sampled_from(names), label="file")
    path = root / f"{name.replace(' ', '_').replace('.', '')}_broken.safetensors"
    case = _write_case(data, texts["files"][name], path, quant="fp8" in name)
    family = data.draw(st.sampled_from([None, name.split()[0]]), label="family")
    _check(case, path, lambda: load_qwen_text_encoder(path, family=family), _run_text)


@FUZZ
@given(data=st.data())
def test_mistral_text_files_load_or_give_a_named_error(texts, root, data) -> None:
    _text_file(texts, root, data, ["mistral", "mistral fp8 mixed"])


@FUZZ
@given(data=st.data())
def test_qwen25_vl_and_qwen3_text_files_load_or_give_a_named_error(texts, root, data) -> None:
    _text_file(texts, root, data, [n for n in sorted(texts["files"]) if not n.startswith("mistral")])


@pytest.mark.slow
@MANY
@given(data=st.data())
def test_text_files_load_or_give_a_named_error_many(texts, root, data) -> None:
    _text_file(texts, root, data, sorted(texts["files"]))


def _vision_file(texts, root, data) -> None:
    from sdengine.weights.qwen_vision_file import load_qwen_vision_tower

    path = root / "qwen_25_vl_vision_broken.safetensors"
    sd = texts["files"]["qwen2.5-vl"]
    visual = sorted(k for k in sd if k.startswith("visual."))
    case = Case()
    if data.draw(st.booleans(), label="tensors"):
        sd, case.nonfinite = _apply_steps(sd, data.draw(tensor_steps(visual), label="steps"))
        save_safetensors(sd, path)
    else:
        case = _write_case(data, sd, path, quant=False)
    _check(case, path, lambda: load_qwen_vision_tower(path), _run_vision)


@FUZZ
@given(data=st.data())
def test_qwen25_vl_vision_towers_load_or_give_a_named_error(texts, root, data) -> None:
    _vision_file(texts, root, data)


@pytest.mark.slow
@MANY
@given(data=st.data())
def test_qwen25_vl_vision_towers_load_or_give_a_named_error_many(texts, root, data) -> None:
    _vision_file(texts, root, data)


# -- the tekken.json a Mistral file carries -----------------------------------------------------------------------

_JUNK = st.sampled_from(
    ["x", "", None, True, [], {}, 1.5, -1, 0, 1, 5, 19, 10**7, "YQ==", "!!", "<pad>", [1], {"a": 1}]
)


@st.composite
def tekken_breakages(draw, good: dict[str, Any]) -> dict[str, Any] | bytes:
    """The tekken.json with one or two things broken: a top-level entry, a config field, a special token, a vocab
    entry (missing, junk, a repeated or swapped entry); or its bytes cut."""
    raw = copy.deepcopy(good)
    if draw(st.integers(0, 9)) == 0:
        data = json.dumps(raw).encode()
        return data[: draw(st.integers(0, len(data) - 1))]
    for _ in range(draw(st.integers(1, 2))):
        where = draw(st.sampled_from(["top", "config", "special", "vocab", "vocab", "cut"]))
        value = copy.deepcopy(draw(st.one_of(st.just("<missing>"), _JUNK)))  # (a fresh {} or [] each time)
        if where == "cut":  # the vocabulary cut short, by its list or by default_vocab_size
            vocab, config = raw.get("vocab"), raw.get("config")
            n = draw(st.integers(0, 300))
            if isinstance(vocab, list) and draw(st.booleans()):
                raw["vocab"] = vocab[:n]
            elif isinstance(config, dict) and type(config.get("default_num_special_tokens")) is int:
                config["default_vocab_size"] = config["default_num_special_tokens"] + n
            continue
        if where == "top":
            target, field = raw, draw(st.sampled_from(["config", "vocab", "special_tokens"]))
        elif where == "config":
            target = raw["config"] if isinstance(raw.get("config"), dict) else raw
            field = draw(st.sampled_from(sorted(good["config"])))
        else:
            items = raw.get("special_tokens" if where == "special" else "vocab")
            if not isinstance(items, list) or not items:
                continue
            i = draw(st.integers(0, len(items) - 1))
            how = draw(st.sampled_from(["field", "field", "drop", "repeat", "swap"]))
            if how == "drop":
                del items[i]
                continue
            if how in ("repeat", "swap"):
                j = draw(st.integers(0, len(items) - 1))
                if how == "repeat":
                    items.insert(j, copy.deepcopy(items[i]))
                else:
                    items[i], items[j] = items[j], items[i]
                continue
            if not isinstance(items[i], dict):
                items[i] = value
                continue
            target = items[i]
            field = draw(
                st.sampled_from(["rank", "token_str", "is_control"] if where == "special" else ["rank", "token_bytes"])
            )
        if value == "<missing>":
            target.pop(field, None)
        else:
            target[field] = value
    return raw


def _tekken(texts, root, data) -> None:
    from sdengine.pipeline.flux2_loading import read_tekken

    broken = data.draw(tekken_breakages(texts["tekken"]), label="tekken")
    raw = broken if isinstance(broken, bytes) else json.dumps(broken).encode()
    sd = {k: v for k, v in texts["files"]["mistral"].items() if k != "tekken_model"}
    sd["tekken_model"] = (
        torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.zeros(0, dtype=torch.uint8)
    )
    path = root / "mistral_tekken_broken.safetensors"
    save_safetensors(sd, path)
    tok = _outcome(lambda: read_tekken(path), path)
    if isinstance(tok, SdengineError):
        return
    specials = [t.get("token_str") for t in broken.get("special_tokens", []) if isinstance(t, dict)]
    for text in (
        "a red apple on a wooden table",
        "héllo wörld ☃ 日本語 🍎 \x00\x7f",
        "[SYSTEM_PROMPT]x[/SYSTEM_PROMPT]",
    ):
        ids = _outcome(lambda: tok.encode(text), None)  # noqa: B023
        assert isinstance(ids, list) and all(isinstance(i, int) and i >= 0 for i in ids), ids
        if not any(isinstance(s, str) and s in text for s in specials):  # every byte of plain text is kept
            assert tok.decode(ids) == text, (text, ids)
    assert tok.pad_token_id == tok.token_id("<pad>")


@FUZZ
@given(data=st.data())
def test_tekken_tokenizers_read_or_give_a_named_error(texts, root, data) -> None:
    _tekken(texts, root, data)


@pytest.mark.slow
@MANY
@given(data=st.data())
def test_tekken_tokenizers_read_or_give_a_named_error_many(texts, root, data) -> None:
    _tekken(texts, root, data)


# -- the bytes of every kind of file: Z-Image ControlNet, Z-Image / FLUX.2 LoRAs, FLUX.2 VAE ------------------------


@pytest.fixture(scope="module")
def others() -> Built:
    """A Z-Image Union ControlNet file (1.0's six control blocks), a FLUX.2 LoRA (kohya names) and a Z-Image one
    (diffusers' names) with its model, the FLUX.2 VAE file (LDM names)."""
    from _flux2_models import FILE_VAE, FLUX2_TRANSFORMER, flux2_vae
    from _z_image_models import Z_TRANSFORMER
    from sdengine.models.flux2 import Flux2Config, Flux2Transformer
    from sdengine.models.z_image import ZImageConfig, ZImageTransformer
    from test_flux2_files import comfy_vae_layout
    from test_z_image_controlnet import z_controlnet

    release = z_controlnet(12, control_layers_places=list(range(0, 30, 5)), control_in_dim=16)
    torch.manual_seed(0)
    z_cfg = {k: v for k, v in Z_TRANSFORMER.items() if k not in ("all_patch_size", "all_f_patch_size")}
    models = {"z_image": ZImageTransformer(ZImageConfig(**z_cfg)).eval(),
              "flux2": Flux2Transformer(Flux2Config(**FLUX2_TRANSFORMER)).eval()}  # fmt: skip
    f2 = models["flux2"].transformer_blocks[0].attn.to_q
    z = models["z_image"].layers[0].attention.to_q
    g = torch.Generator().manual_seed(1)
    loras = {
        "flux2": {
            "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.randn(2, f2.in_features, generator=g),
            "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.randn(f2.out_features, 2, generator=g),
            "lora_unet_double_blocks_0_img_attn_proj.alpha": torch.tensor(2.0),
        },
        "z_image": {
            "transformer.layers.0.attention.to_q.lora_A.weight": torch.randn(2, z.in_features, generator=g),
            "transformer.layers.0.attention.to_q.lora_B.weight": torch.randn(z.out_features, 2, generator=g),
        },
    }
    vae = comfy_vae_layout({k: v.clone() for k, v in flux2_vae(seed=5, **FILE_VAE).state_dict().items()})
    return Built(control={k: v.clone().contiguous() for k, v in release.state_dict().items()}, loras=loras,
                 models=models, vae=vae)  # fmt: skip


def _run_lora_model(family: str, model) -> torch.Tensor:
    from test_fuzz_dit_files import _z_image_inputs

    if family == "flux2":
        return _run_dev(model)
    with torch.no_grad():
        return model(*_z_image_inputs(model))


def _other_file(others, root, data) -> None:
    from sdengine.control.dit_files import read_dit_controlnet
    from sdengine.weights.flux2_file import load_flux2_vae
    from sdengine.weights.lora import apply_loras
    from sdengine.weights.lora_file import LoRAFile

    kind = data.draw(st.sampled_from(["control", "flux2 lora", "z_image lora", "vae"]), label="file")
    path = root / f"{kind.replace(' ', '_')}_broken.safetensors"
    if kind == "control":
        case = _write_case(data, others["control"], path, quant=False)
        _check(case, path, lambda: read_dit_controlnet(path), lambda net: None)
    elif kind == "vae":
        case = _write_case(data, others["vae"], path, quant=False)

        def run(vae) -> torch.Tensor:
            with torch.no_grad():
                return vae.decode(vae.encode(torch.randn(1, vae.config.in_channels, 8, 8)).mean)

        _check(case, path, lambda: load_flux2_vae(path), run)
    else:
        family = kind.split()[0]
        model = others["models"][family]
        case = _write_case(data, others["loras"][family], path, quant=False)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        lf = _outcome(lambda: LoRAFile.load(path), path)
        if case.must_refuse:
            assert isinstance(lf, SdengineError), f"{path.name}: loaded, but it is cut or garbled"
        if isinstance(lf, LoRAFile):
            handle = _outcome(lambda: apply_loras(model, None, [(lf, 0.7)]), path)
            if not isinstance(handle, SdengineError):
                try:
                    out = _outcome(lambda: _run_lora_model(family, model), None)
                    if isinstance(out, torch.Tensor) and not case.nonfinite:
                        assert bool(torch.isfinite(out).all()), "a LoRA of finite weights gave non-finite outputs"
                finally:
                    handle.remove()
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)


@FUZZ
@given(data=st.data())
def test_controlnet_lora_and_vae_files_load_or_give_a_named_error(others, root, data) -> None:
    _other_file(others, root, data)


@pytest.mark.slow
@MANY
@given(data=st.data())
def test_controlnet_lora_and_vae_files_load_or_give_a_named_error_many(others, root, data) -> None:
    _other_file(others, root, data)


# -- what the fuzz tests found (each loaded a wrong model, or raised another exception, before) -----------------------


def _one_line_error(fn: Callable[[], Any], path: Path, match: str) -> None:
    import re

    with pytest.raises(SdengineError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and path.name in msg and re.search(match, msg), msg


_BAD_SCALES = [
    ("scale nan", r"weight_scale holds nan: a scale must be finite and not negative"),
    ("scale inf", r"weight_scale holds inf: a scale must be finite and not negative"),
    ("scale negative", r"weight_scale holds -0\.0\d*: a scale must be finite and not negative"),
    ("scale int", r"weight_scale holds torch.int64, not a floating-point scale"),
    ("scale rows + 1", r"weight_scale is \(\d+,\), not one scale or one per row of \(\d+, \d+\)"),
]


_BAD_WEIGHTS = [
    ("weight int", r"weight is torch.int64 \(\d+, \d+\), not a quantized"),
    ("weight 0-d", r"weight is torch\.\w+ \(\), not a quantized"),
]
_NO_SCALE = ("drop scale", r"comfy_quant marks layers.0.mlp.down_proj quantized, but it has no weight and weight_scale")


@pytest.mark.parametrize("op, match", [*_BAD_SCALES, *_BAD_WEIGHTS])
def test_a_flux2_dev_fp8_mixed_file_with_a_bad_scale_or_weight_is_one_line(dev, root, op: str, match: str) -> None:
    """A FLUX.2 [dev] float8 mixed file (``flux2_dev_fp8mixed``) whose layer's ``weight_scale`` is NaN, infinite,
    negative, an integer or one too many rows, or whose quantized weight is an integer or 0-d tensor: loaded as a
    transformer of NaN / zero / sign-flipped / truncated weights without a word before (a 0-d weight an IndexError);
    found by the fuzz test."""
    from sdengine.weights.flux2_file import load_flux2_transformer

    layer = "model.diffusion_model.double_blocks.0.img_attn.proj"
    path = root / "flux2_dev_fp8mixed_bad.safetensors"
    save_safetensors(_break_quant(dev["layouts"]["fp8 mixed"], op, layer), path)
    _one_line_error(
        lambda: load_flux2_transformer(path), path, f"{layer.removeprefix('model.diffusion_model.')}.{match}"
    )


@pytest.mark.parametrize("name", ["mistral fp8 mixed", "qwen2.5-vl fp8 mixed"])
@pytest.mark.parametrize("op, match", [*_BAD_SCALES, _NO_SCALE])
def test_a_mixed_text_encoder_file_without_a_usable_scale_is_one_line(
    texts, root, name: str, op: str, match: str
) -> None:
    """A Mistral Small 3 / Qwen2.5-VL float8 mixed file (``mistral_3_small_flux2_fp8``) whose layer has lost its
    ``weight_scale`` (its float8 weight was read as the weight: 448 times too large), or whose scale is NaN, infinite,
    0, negative, an integer or one too many rows: loaded as a wrong encoder without a word before; found by the fuzz
    test."""
    from sdengine.weights.qwen_text_file import load_qwen_text_encoder

    path = root / f"{name.split()[0].replace('.', '')}_fp8mixed_bad.safetensors"
    save_safetensors(_break_quant(texts["files"][name], op, "model.layers.0.mlp.down_proj"), path)
    _one_line_error(lambda: load_qwen_text_encoder(path), path, match)


def test_a_quantized_norm_with_a_scale_per_entry_is_scaled_entry_by_entry(texts, root) -> None:
    """A 1-d weight marked quantized with one scale per entry (the final norm) is weight x scale entry by entry
    (before: the scale reshaped to a column, a (n, n) outer product and a multi-line RuntimeError)."""
    from sdengine.weights.qwen_text_file import load_qwen_text_encoder

    sd = dict(texts["files"]["qwen2.5-vl fp8 mixed"])
    norm = sd["model.norm.weight"]
    scale = torch.linspace(0.5, 1.5, norm.shape[0])
    sd |= {"model.norm.weight_scale": scale, "model.norm.comfy_quant": sd["model.layers.0.mlp.down_proj.comfy_quant"]}
    path = root / "qwen_25_vl_norm_scaled.safetensors"
    save_safetensors(sd, path)
    got = load_qwen_text_encoder(path).state_dict()["norm.weight"]
    assert torch.equal(got, norm.float() * scale)


@pytest.mark.parametrize(
    "op, key, match",
    [
        ("drop", "control_all_x_embedder.2-1.bias", "not a Z-Image ControlNet of its config \\(missing"),
        ("scalar", "control_layers.0.attention.norm_q.weight", "norm_q.weight should be 1-d, it is \\(\\)"),
    ],
)
def test_z_image_controlnet_file_errors_name_the_file(others, root, op: str, key: str, match: str) -> None:
    """A Z-Image ControlNet file missing a tensor, or whose shapes say no config: the error named the file without
    its suffix, or not at all; found by the fuzz test."""
    from sdengine.control.dit_files import read_dit_controlnet

    path = root / "z_image_union_bad.safetensors"
    save_safetensors(_break(others["control"], op, key, 0), path)
    _one_line_error(lambda: read_dit_controlnet(path), path, f"^ControlNet z_image_union_bad.safetensors: .*{match}")


def test_tekken_files_that_would_tokenize_wrongly_are_one_line(texts) -> None:
    """A tekken.json whose vocabulary lacks single bytes (cut short by its list or by ``default_vocab_size``: text
    with those bytes was dropped without a word, "a red apple" encoded as no tokens), a special token given twice
    or empty (the later one silently won), ``default_num_special_tokens`` in the hundreds of thousands (a million
    added tokens took 11 s); found by the fuzz test."""
    from sdengine.text.tekken import TekkenError, tekken_tokenizer

    good = texts["tekken"]

    def with_config(**kw: Any) -> dict[str, Any]:
        return {**good, "config": {**good["config"], **kw}}

    cases = [
        ({**good, "vocab": good["vocab"][:50]}, "its 50 vocab tokens lack the byte 0x"),
        (with_config(default_vocab_size=19), "its 0 vocab tokens lack the byte 0x00; a tekken vocab holds all 256"),
        ({**good, "special_tokens": [*good["special_tokens"], {"rank": 5, "token_str": "<pad>"}]}, "given twice"),
        (
            {
                **good,
                "special_tokens": [{**t, "token_str": ""} if t["rank"] == 3 else t for t in good["special_tokens"]],
            },
            "a special token without token_str",
        ),  # fmt: skip
        (with_config(default_num_special_tokens=999_000, default_vocab_size=1_000_000), "not 0 to 100000"),
        (
            {
                **with_config(default_num_special_tokens=25),
                "special_tokens": [*good["special_tokens"], {"rank": 20, "token_str": "<SPECIAL_21>"}],
            },  # fmt: skip
            "special token '<SPECIAL_21>' is at two ranks",
        ),
    ]
    for raw, needle in cases:
        with pytest.raises(TekkenError) as e:
            tekken_tokenizer(json.dumps(raw).encode(), name="t.json")
        assert str(e.value).startswith("t.json: not a Mistral tekken tokenizer (") and needle in str(e.value)
        assert "\n" not in str(e.value)
    explicit = {**with_config(default_num_special_tokens=25),
                "special_tokens": [*good["special_tokens"], {"rank": 20, "token_str": "<SPECIAL_20>"}]}  # fmt: skip
    assert tekken_tokenizer(json.dumps(explicit).encode()).token_id("<SPECIAL_20>") == 20  # named as it would be


def test_a_scale_of_one_number_in_more_dimensions_scales_the_weight(texts, root) -> None:
    """A scaled-fp8 Qwen3 file whose ``scale_weight`` is one number stored as (1, 1, 1): the weight x that number
    (before: broadcast to a (1, 48, 96) weight, a multi-line ``RuntimeError`` from ``load_state_dict``); found by the
    fuzz test."""
    from sdengine.weights.qwen_text_file import load_qwen_text_encoder

    sd = dict(texts["files"]["qwen3 scaled fp8"])
    key = "model.layers.0.mlp.down_proj"
    sd[f"{key}.scale_weight"] = sd[f"{key}.scale_weight"].reshape(1, 1, 1)
    path = root / "qwen_3_scaled_fp8_3d_scale.safetensors"
    save_safetensors(sd, path)
    got = load_qwen_text_encoder(path).state_dict()["layers.0.mlp.down_proj.weight"]
    assert torch.equal(got, sd[f"{key}.weight"].float() * sd[f"{key}.scale_weight"].reshape(()))
