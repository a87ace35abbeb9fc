"""Property tests of the newer diffusion-transformer loaders: Z-Image transformer files and folders, FLUX.2
transformer / VAE files and folders, Qwen3 text-encoder files and folders, Z-Image Union ControlNet files and folders,
and LoRAs in FLUX.2 / Z-Image / Qwen-Image names. Each input is a valid tiny file (built once per module from the
tiny models of ``_z_image_models`` / ``_flux2_models`` / ``_qwen_models``) with a few things broken: a tensor dropped,
one of its dimensions one more or one less, two dimensions swapped, a dimension added, an integer dtype, an unknown
tensor, a renamed prefix; a folder's ``config.json`` with a field of the wrong type, negative, zero, huge or missing.

Whatever the input: a model that runs on a tiny input, or one line of a named sdengine error; never another
exception.

Bounded in `make test` (SDENGINE_FUZZ_EXAMPLES / 8: 12 inputs per loader by default; `make fuzz` runs more).
"""

from __future__ import annotations

import json
import os
import re
import shutil
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
from sdengine.weights.io import load_file  # noqa: E402

# an eighth of the other fuzz files' (each example here writes and loads a model): 12 by default
EXAMPLES = max(1, int(os.environ.get("SDENGINE_FUZZ_EXAMPLES", "100")) // 8)
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def _outcome(fn: Callable[[], Any]) -> Any:
    """fn()'s result, or the SdengineError it raised (its message one line); any other exception fails the test."""
    try:
        return fn()
    except SdengineError as e:
        assert "\n" not in str(e).strip(), str(e)
        assert str(e).strip(), type(e).__name__
        return e


# -- breaking a state dict --------------------------------------------------------------------------------

_OPS = ("drop", "grow", "shrink", "swap", "unsqueeze", "int", "bool", "unknown", "rename", "empty", "scalar")


def _break(sd: dict[str, torch.Tensor], op: str, key: str, pick: int) -> dict[str, torch.Tensor]:
    out = dict(sd)
    t = out[key]
    d = pick % max(t.ndim, 1)
    if op == "drop":
        del out[key]
    elif op in ("grow", "shrink") and t.ndim:
        shape = list(t.shape)
        shape[d] = shape[d] + 1 if op == "grow" else max(shape[d] - 1, 1 if shape[d] > 1 else 0)
        out[key] = torch.randn(shape) * 0.05
    elif op == "swap" and t.ndim >= 2:
        out[key] = t.transpose(d, (d + 1) % t.ndim).contiguous()
    elif op == "unsqueeze":
        out[key] = t.unsqueeze(d).contiguous()
    elif op == "int":
        out[key] = t.to(torch.int64)
    elif op == "bool":
        out[key] = t != 0
    elif op == "unknown":
        stem = key.rsplit(".", 1)[0]
        out[[f"{stem}.extra.weight", "unexpected.weight", f"{key}x", "layers.99.attention.to_q.weight"][pick % 4]] = t
    elif op == "rename":
        parts = key.split(".")
        new = ".".join(["renamed", *parts[1:]]) if pick % 2 else ".".join([*parts[:-1], "kernel"])
        out[new] = out.pop(key)
    elif op == "empty":
        out[key] = torch.zeros([0] * max(t.ndim, 1))
    elif op == "scalar":
        out[key] = torch.tensor(1.0)
    return out


@st.composite
def breakages(draw, keys: list[str]) -> list[tuple[str, str, int]]:
    """One or two (operation, tensor, which dimension / spelling) steps; half of the tensors drawn are top-level
    or in block 0 (the ones a config is read from)."""
    hot = [k for k in keys if not re.search(r"\.[1-9]\d*\.", k)] or keys
    n = draw(st.integers(1, 2))
    return [
        (draw(st.sampled_from(_OPS)), draw(st.sampled_from(hot) | st.sampled_from(keys)), draw(st.integers(0, 7)))
        for _ in range(n)
    ]


def _broken(sd: dict[str, torch.Tensor], steps: list[tuple[str, str, int]]) -> dict[str, torch.Tensor]:
    for op, key, pick in steps:
        if key in sd:
            sd = _break(sd, op, key, pick)
    return sd


# -- breaking a config.json -------------------------------------------------------------------------------

_BAD_VALUES = st.sampled_from(["x", None, True, False, [], [1], {}, 1.5, -1, 0, 1, 3, 10**9, 10**30, -(10**9), 1e308])


@st.composite
def config_breakages(draw, fields: list[str]) -> list[tuple[str, Any]]:
    n = draw(st.integers(1, 2))
    out = []
    for _ in range(n):
        field = draw(st.sampled_from(fields))
        value = draw(st.one_of(st.just("<missing>"), _BAD_VALUES, st.lists(_BAD_VALUES, max_size=4)))
        out.append((field, value))
    return out


def _write_config(folder: Path, base: dict[str, Any], changes: list[tuple[str, Any]]) -> None:
    raw = dict(base)
    for field, value in changes:
        if value == "<missing>":
            raw.pop(field, None)
        else:
            raw[field] = value
    (folder / "config.json").write_text(json.dumps(raw))


def _copy_folder(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


# -- the valid tiny files ---------------------------------------------------------------------------------


class Built(dict):
    """A module fixture's files and tensors (a short repr: hypothesis prints the arguments of a failing example)."""

    def __repr__(self) -> str:
        return f"<{', '.join(self)}>"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzzdit")


@pytest.fixture(scope="module")
def z_image(root: Path) -> Built:
    from _z_image_models import WIDE_TRANSFORMER, z_transformer

    ref = z_transformer(seed=4, **WIDE_TRANSFORMER)
    ref.save_pretrained(root / "z" / "transformer")
    sd = {k: v.clone().contiguous() for k, v in ref.state_dict().items()}
    return Built(folder=root / "z" / "transformer", sd=sd)


@pytest.fixture(scope="module")
def flux2(root: Path) -> Built:
    from _flux2_models import FILE_TRANSFORMER, FILE_VAE, flux2_transformer, flux2_vae

    net = flux2_transformer(seed=3, **FILE_TRANSFORMER)
    net.save_pretrained(root / "f2" / "transformer")
    vae = flux2_vae(seed=5, **FILE_VAE)
    vae.save_pretrained(root / "f2" / "vae")
    return Built(
        folder=root / "f2" / "transformer",
        vae_folder=root / "f2" / "vae",
        sd={k: v.clone().contiguous() for k, v in net.state_dict().items()},
        vae_sd={k: v.clone().contiguous() for k, v in vae.state_dict().items()},
    )


def _z_image_inputs(model) -> tuple[torch.Tensor, ...]:
    c = model.config
    return torch.randn(1, c.in_channels, 4, 4), torch.tensor([0.5]), torch.randn(1, 3, c.cap_feat_dim)


def _run_z_image(model) -> None:
    with torch.no_grad():
        out = model(*_z_image_inputs(model))
    assert out.shape[-2:] == (4, 4)


def _run_flux2(model) -> None:
    c = model.config
    g = torch.tensor([3.5]) if c.guidance_embeds else None
    with torch.no_grad():
        out = model(
            torch.randn(1, c.in_channels, 2, 2), torch.tensor([500.0]), torch.randn(1, 3, c.joint_attention_dim), g
        )
    assert out.shape[-2:] == (2, 2)


def _run_flux2_vae(vae) -> None:
    c = vae.config
    with torch.no_grad():
        z = vae.encode(torch.randn(1, c.in_channels, 8, 8)).mean
        vae.decode(z)


def _load_and_run(load: Callable[[], Any], run: Callable[[Any], None]) -> None:
    model = _outcome(load)
    if not isinstance(model, SdengineError):
        _outcome(lambda: run(model))


# -- Z-Image transformer ----------------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_z_image_single_files_load_or_give_a_named_error(z_image, root, data) -> None:
    from sdengine.weights.z_image_file import load_z_image_transformer
    from test_z_image_files import original_layout

    sd = z_image["sd"]
    layout = data.draw(st.sampled_from(["diffusers", "original", "comfy"]))
    if layout != "diffusers":
        sd = original_layout(sd, "model.diffusion_model." if layout == "comfy" else "")
    sd = _broken(sd, data.draw(breakages(sorted(sd))))
    path = root / "z_broken.safetensors"
    save_safetensors(sd, path)
    _load_and_run(lambda: load_z_image_transformer(path), _run_z_image)


@FUZZ
@given(data=st.data())
def test_z_image_folders_load_or_give_a_named_error(z_image, root, data) -> None:
    from sdengine.weights.z_image_file import load_z_image_transformer

    folder = _copy_folder(z_image["folder"], root / "z_broken" / "transformer")
    base = json.loads((z_image["folder"] / "config.json").read_text())
    if data.draw(st.booleans()):
        _write_config(folder, base, data.draw(config_breakages(sorted(base))))
    else:
        weights = next(folder.glob("*.safetensors"))
        sd, _ = load_file(weights)
        save_safetensors(_broken(sd, data.draw(breakages(sorted(sd)))), weights)
    _load_and_run(lambda: load_z_image_transformer(folder.parent), _run_z_image)


# -- FLUX.2 transformer and VAE ---------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_flux2_single_files_load_or_give_a_named_error(flux2, root, data) -> None:
    from sdengine.weights.flux2_file import load_flux2_transformer
    from test_flux2_files import bfl_layout

    sd = flux2["sd"]
    layout = data.draw(st.sampled_from(["diffusers", "bfl", "comfy"]))
    if layout != "diffusers":
        sd = bfl_layout(sd, "model.diffusion_model." if layout == "comfy" else "")
    sd = _broken(sd, data.draw(breakages(sorted(sd))))
    path = root / "f2_broken.safetensors"
    save_safetensors(sd, path)
    _load_and_run(lambda: load_flux2_transformer(path), _run_flux2)


@FUZZ
@given(data=st.data())
def test_flux2_folders_load_or_give_a_named_error(flux2, root, data) -> None:
    from sdengine.weights.flux2_file import load_flux2_transformer

    folder = _copy_folder(flux2["folder"], root / "f2_broken" / "transformer")
    base = json.loads((flux2["folder"] / "config.json").read_text())
    if data.draw(st.booleans()):
        _write_config(folder, base, data.draw(config_breakages(sorted(base))))
    else:
        weights = next(folder.glob("*.safetensors"))
        sd, _ = load_file(weights)
        save_safetensors(_broken(sd, data.draw(breakages(sorted(sd)))), weights)
    _load_and_run(lambda: load_flux2_transformer(folder.parent), _run_flux2)


@FUZZ
@given(data=st.data())
def test_flux2_vae_files_and_folders_load_or_give_a_named_error(flux2, root, data) -> None:
    from sdengine.weights.flux2_file import load_flux2_vae
    from test_flux2_files import comfy_vae_layout

    kind = data.draw(st.sampled_from(["diffusers file", "comfy file", "folder config", "folder weights"]))
    if kind.endswith("file"):
        sd = flux2["vae_sd"] if kind == "diffusers file" else comfy_vae_layout(flux2["vae_sd"])
        path = root / "vae_broken.safetensors"
        save_safetensors(_broken(sd, data.draw(breakages(sorted(sd)))), path)
    else:
        path = _copy_folder(flux2["vae_folder"], root / "vae_broken" / "vae")
        base = json.loads((flux2["vae_folder"] / "config.json").read_text())
        if kind == "folder config":
            _write_config(path, base, data.draw(config_breakages(sorted(base))))
        else:
            weights = next(path.glob("*.safetensors"))
            sd, _ = load_file(weights)
            save_safetensors(_broken(sd, data.draw(breakages(sorted(sd)))), weights)
    _load_and_run(lambda: load_flux2_vae(path), _run_flux2_vae)


# -- Qwen3 / Qwen2.5-VL / Mistral 3 text encoders -------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen3(root: Path) -> Built:
    from _flux2_dev_models import mistral3_text_encoder
    from _qwen_models import qwen_text_encoder
    from _z_image_models import qwen3_text_encoder

    model = qwen3_text_encoder(7, 400)
    model.save_pretrained(root / "qwen3")
    sd = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    qwen_text_encoder(8, 400).save_pretrained(root / "qwen2.5-vl")  # Qwen-Image's (a vision tower beside it)
    mistral3_text_encoder(400, 9).save_pretrained(root / "mistral3")  # FLUX.2 [dev]'s
    folders = {"qwen3": root / "qwen3", "qwen2.5-vl": root / "qwen2.5-vl", "mistral": root / "mistral3"}
    return Built(folder=root / "qwen3", sd=sd, folders=folders)


def _run_text(model) -> None:
    with torch.no_grad():
        out = model(torch.tensor([[1, 5, 9]]))
    assert out.shape[:2] == (1, 3)


@FUZZ
@given(data=st.data())
def test_qwen_text_files_and_folders_load_or_give_a_named_error(qwen3, root, data) -> None:
    """Qwen3 files (``model.*`` names, bare names) and Qwen3 / Qwen2.5-VL / Mistral 3 transformers folders."""
    from sdengine.weights.qwen_text_file import load_qwen_text_encoder

    kind = data.draw(st.sampled_from(["file", "bare file", "folder config", "folder weights"]))
    if kind.endswith("file"):
        sd = qwen3["sd"]
        if kind == "bare file":  # the language model saved alone (no model. prefix, no LM head)
            sd = {k.removeprefix("model."): v for k, v in sd.items() if k.startswith("model.")}
        path = root / "qwen3_broken.safetensors"
        save_safetensors(_broken(sd, data.draw(breakages(sorted(sd)))), path)
    else:
        src = qwen3["folders"][data.draw(st.sampled_from(sorted(qwen3["folders"])))]
        path = _copy_folder(src, root / "text_broken")
        base = json.loads((src / "config.json").read_text())
        if kind == "folder config":
            _write_config(path, base, data.draw(config_breakages(sorted(base))))
        else:
            weights = next(path.glob("*.safetensors"))
            sd, _ = load_file(weights)
            save_safetensors(_broken(sd, data.draw(breakages(sorted(sd)))), weights)
    family = data.draw(st.sampled_from([None, "qwen3", "qwen2.5-vl", "mistral"]))
    _load_and_run(lambda: load_qwen_text_encoder(path, family=family), _run_text)


# -- Z-Image Union ControlNet ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def z_control(root: Path) -> Built:
    from _z_image_models import Z_TRANSFORMER
    from sdengine.models.z_image import ZImageConfig, ZImageTransformer
    from test_z_image_controlnet import KINDS, z_controlnet

    folders = {}
    for kind in ("1.0", "2.1"):
        z_controlnet(11, **KINDS[kind]).save_pretrained(root / f"zc-{kind}")
        folders[kind] = root / f"zc-{kind}"
    release = z_controlnet(12, control_layers_places=list(range(0, 30, 5)), control_in_dim=16)  # Union 1.0's file
    torch.manual_seed(13)
    cfg = {k: v for k, v in Z_TRANSFORMER.items() if k not in ("all_patch_size", "all_f_patch_size")}
    transformer = ZImageTransformer(ZImageConfig(**cfg)).eval()
    return Built(
        folders=folders,
        sd={k: v.clone().contiguous() for k, v in release.state_dict().items()},
        transformer=transformer,
    )


def _run_control(transformer) -> Callable[[Any], None]:
    def run(net) -> None:
        x, t, cap = _z_image_inputs(transformer)
        with torch.no_grad():
            state = transformer.embed(x, t, cap)
            refined = transformer.refine_image(state, None)
            net(transformer, state, refined, torch.randn(1, net.config.control_in_dim, 4, 4), 0.8)

    return run


@FUZZ
@given(data=st.data())
def test_z_image_controlnets_load_or_give_a_named_error(z_control, root, data) -> None:
    from sdengine.control.dit_files import read_dit_controlnet

    kind = data.draw(st.sampled_from(["file", "folder config", "folder weights"]))
    if kind == "file":
        sd = z_control["sd"]
        path = root / "zc_broken.safetensors"
        save_safetensors(_broken(sd, data.draw(breakages(sorted(sd)))), path)
    else:
        src = z_control["folders"][data.draw(st.sampled_from(["1.0", "2.1"]))]
        path = _copy_folder(src, root / "zc_broken")
        base = json.loads((src / "config.json").read_text())
        if kind == "folder config":
            _write_config(path, base, data.draw(config_breakages(sorted(base))))
        else:
            weights = next(path.glob("*.safetensors"))
            sd, _ = load_file(weights)
            save_safetensors(_broken(sd, data.draw(breakages(sorted(sd)))), weights)
    _load_and_run(lambda: read_dit_controlnet(path), _run_control(z_control["transformer"]))


# -- LoRAs in FLUX.2 / Z-Image / Qwen-Image names -----------------------------------------------------------


@pytest.fixture(scope="module")
def dits() -> Built:
    """Tiny sdengine transformers of the three families (random weights: the LoRAs' names and shapes are what is
    tested) with their LoRA routes."""
    from _flux2_models import FLUX2_TRANSFORMER
    from _qwen_models import QWEN_TRANSFORMER
    from _z_image_models import Z_TRANSFORMER
    from sdengine.models.flux2 import Flux2Config, Flux2Transformer
    from sdengine.models.qwen_image import QwenImageConfig, QwenImageTransformer
    from sdengine.models.z_image import ZImageConfig, ZImageTransformer
    from sdengine.weights.lora_dit_keys import dit_routes

    torch.manual_seed(0)
    z_cfg = {k: v for k, v in Z_TRANSFORMER.items() if k not in ("all_patch_size", "all_f_patch_size")}
    models = {
        "z_image": ZImageTransformer(ZImageConfig(**z_cfg)).eval(),
        "flux2": Flux2Transformer(Flux2Config(**FLUX2_TRANSFORMER)).eval(),
        "qwen_image": QwenImageTransformer(QwenImageConfig(**QWEN_TRANSFORMER)).eval(),
    }
    # the routes onto Linear layers: the LoRA pairs drawn here (a q/k norm's route takes a 1-d diff only)
    routes = {
        k: {n: rs for n, rs in dit_routes(m).items() if isinstance(m.get_submodule(rs[0].target), torch.nn.Linear)}
        for k, m in models.items()
    }
    return Built(models=models, routes=routes)


def _run_dit(name: str, model) -> None:
    with torch.no_grad():
        if name == "z_image":
            _run_z_image(model)
        elif name == "flux2":
            _run_flux2(model)
        else:
            c = model.config
            model(
                torch.randn(1, c.out_channels or 16, 4, 4),
                torch.tensor([500.0]),
                torch.randn(1, 3, c.joint_attention_dim),
            )


_LAYOUTS = ("peft", "kohya", "comfy")


@st.composite
def dit_loras(draw, model, routes: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A LoRA on a few of the model's layers (any of the names they come in) with the right shapes, then broken."""
    names = sorted(routes)
    out: dict[str, torch.Tensor] = {}
    for name in draw(st.lists(st.sampled_from(names), min_size=1, max_size=4, unique=True)):
        rs = routes[name]
        first = model.get_submodule(rs[0].target)
        rows = sum(b - a for r in rs for a, b in (r.rows or ((0, model.get_submodule(r.target).out_features),)))
        rank = draw(st.integers(1, 4))
        stem = name
        for prefix in ("transformer.", "diffusion_model.", "base_model.model."):
            stem = stem.removeprefix(prefix)
        layout = draw(st.sampled_from(_LAYOUTS))
        down = torch.randn(rank, first.in_features) * 0.1
        up = torch.randn(rows, rank) * 0.1
        kohya_parts = ("lora_down.weight", "lora_up.weight")
        a, b = kohya_parts if layout != "peft" else ("lora_A.weight", "lora_B.weight")
        if name.startswith(("lora_", "lycoris_")):
            key, a, b = name, *kohya_parts
        elif name.startswith(("diffusion_model.", "transformer.", "base_model.model.")):
            key = name
        elif layout == "kohya":
            key = "lora_unet_" + stem.replace(".", "_")
        else:
            key = f"transformer.{name}" if layout == "peft" else f"diffusion_model.{stem}"
        out[f"{key}.{a}"], out[f"{key}.{b}"] = down, up
        if draw(st.booleans()):
            out[f"{key}.alpha"] = torch.tensor(float(draw(st.sampled_from([1, 2, 4, 0, -1]))))
    return _broken(out, draw(breakages(sorted(out)))) if draw(st.booleans()) else out


@FUZZ
@given(data=st.data())
def test_dit_loras_apply_or_give_a_named_error(dits, root, data) -> None:
    from sdengine.weights.lora import apply_loras
    from sdengine.weights.lora_file import LoRAFile

    family = data.draw(st.sampled_from(sorted(dits["models"])))
    model = dits["models"][family]
    tensors = data.draw(dit_loras(model, dits["routes"][family]))
    path = root / "lora_broken.safetensors"
    save_safetensors(tensors, path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lf = _outcome(lambda: LoRAFile.load(path))
    if isinstance(lf, LoRAFile):
        handle = _outcome(lambda: apply_loras(model, None, [(lf, 0.7)]))
        if not isinstance(handle, SdengineError):
            _outcome(lambda: _run_dit(family, model))
            handle.remove()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # applied and removed, or never touched


def test_the_unbroken_inputs_load_and_run(z_image, flux2, qwen3, z_control, root) -> None:
    """What the property tests break is valid: every layout of every tiny file and folder loads and runs."""
    from sdengine.control.dit_files import read_dit_controlnet
    from sdengine.weights.flux2_file import load_flux2_transformer, load_flux2_vae
    from sdengine.weights.qwen_text_file import load_qwen_text_encoder
    from sdengine.weights.z_image_file import load_z_image_transformer
    from test_flux2_files import bfl_layout, comfy_vae_layout
    from test_z_image_files import original_layout

    path = root / "valid.safetensors"
    _run_z_image(load_z_image_transformer(z_image["folder"].parent))
    for sd in (z_image["sd"], original_layout(z_image["sd"]), original_layout(z_image["sd"], "")):
        save_safetensors(sd, path)
        _run_z_image(load_z_image_transformer(path))
    _run_flux2(load_flux2_transformer(flux2["folder"].parent))
    for sd in (flux2["sd"], bfl_layout(flux2["sd"]), bfl_layout(flux2["sd"], "model.diffusion_model.")):
        save_safetensors(sd, path)
        _run_flux2(load_flux2_transformer(path))
    _run_flux2_vae(load_flux2_vae(flux2["vae_folder"]))
    for sd in (flux2["vae_sd"], comfy_vae_layout(flux2["vae_sd"])):
        save_safetensors(sd, path)
        _run_flux2_vae(load_flux2_vae(path))
    for folder in qwen3["folders"].values():
        _run_text(load_qwen_text_encoder(folder))
    save_safetensors(qwen3["sd"], path)
    _run_text(load_qwen_text_encoder(path))
    for folder in z_control["folders"].values():
        _run_control(z_control["transformer"])(read_dit_controlnet(folder))
    save_safetensors(z_control["sd"], path)
    assert read_dit_controlnet(path).config.control_layers_places == (0, 5, 10, 15, 20, 25)


# -- what the fuzz tests found (each was another exception before) ------------------------------------------


def _one_line_error(fn: Callable[[], Any], match: str) -> None:
    with pytest.raises(SdengineError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "cls, raw, match",
    [
        ("flux2", {"num_layers": [1]}, "FLUX.2 transformer config: num_layers=\\[1\\] is not an integer"),
        ("z_image", {"n_layers": [1]}, "Z-Image transformer config: n_layers=\\[1\\] is not an integer"),
        ("flux2_vae", {"latent_channels": [4]}, "FLUX.2 VAE config: latent_channels=\\[4\\] is not an integer"),
        ("flux2_vae", {"sample_size": []}, "sample_size has 0 entries"),
        ("flux2_vae", {"block_out_channels": 1.5}, "block_out_channels=1.5 is not a list"),
    ],
)
def test_a_list_for_a_count_is_one_config_line(cls: str, raw: dict[str, Any], match: str) -> None:
    """A list where a config takes one integer (TypeError deep in the build before; an empty ``sample_size`` list an
    IndexError), a number where it takes a list (TypeError)."""
    from sdengine.models.flux2 import Flux2Config
    from sdengine.models.flux2_vae import Flux2VAEConfig
    from sdengine.models.z_image import ZImageConfig

    reader = {"flux2": Flux2Config, "z_image": ZImageConfig, "flux2_vae": Flux2VAEConfig}[cls]
    _one_line_error(lambda: reader.from_diffusers(raw), match)


def test_flux2_files_with_integer_or_shapeless_tensors_are_one_line(flux2, root) -> None:
    """A FLUX.2 VAE file with an integer tensor (RuntimeError in load_state_dict before), a transformer file whose
    embedder is empty (ZeroDivisionError) or whose fused qkv is a 0-d tensor (IndexError)."""
    from sdengine.weights.flux2_file import load_flux2_transformer, load_flux2_vae
    from test_flux2_files import bfl_layout

    vae = root / "vae_int.safetensors"
    save_safetensors(_break(flux2["vae_sd"], "int", "decoder.conv_in.bias", 0), vae)
    _one_line_error(lambda: load_flux2_vae(vae), "decoder.conv_in.bias holds torch.int64, not floating-point")
    bfl = bfl_layout(flux2["sd"])
    for op, key, match in (
        ("empty", "img_in.weight", "width 0 is not a positive multiple of 128"),
        ("scalar", "double_blocks.0.txt_attn.qkv.weight", "double_blocks.0.txt_attn.qkv.weight is not q, k and v"),
        ("scalar", "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.weight is not"),
    ):
        path = root / "f2_shapeless.safetensors"
        save_safetensors(_break(bfl, op, key, 0), path)
        _one_line_error(lambda: load_flux2_transformer(path), match)  # noqa: B023


def test_z_image_controlnet_files_with_misshapen_tensors_are_one_line(z_control, root) -> None:
    """A Z-Image ControlNet file with a tensor one wider than its config (a multi-line RuntimeError from
    load_state_dict before), an integer tensor, or a 0-d / 3-d tensor the config is read from (IndexError /
    ValueError)."""
    from sdengine.control.dit_files import read_dit_controlnet

    for op, key, match in (
        ("grow", "control_all_x_embedder.2-1.bias", "control_all_x_embedder.2-1.bias is \\(65,\\), a Z-Image"),
        ("int", "control_layers.3.attention.to_q.weight", "control_layers.3.attention.to_q.weight holds torch.int64"),
        ("scalar", "control_layers.0.attention.norm_q.weight", "norm_q.weight should be 1-d, it is \\(\\)"),
        ("unsqueeze", "control_all_x_embedder.2-1.weight", "control_all_x_embedder.2-1.weight should be 2-d"),
    ):
        path = root / "zc_misshapen.safetensors"
        save_safetensors(_break(z_control["sd"], op, key, 0), path)
        _one_line_error(lambda: read_dit_controlnet(path), match)  # noqa: B023


def test_vae_and_text_encoder_files_with_odd_shapes_are_one_line(flux2, qwen3, root) -> None:
    """A FLUX.2 VAE file in LDM names whose mid-attention 1x1 convolution is 1x2 (a RuntimeError from reshape
    before), a Qwen3 file whose q norm is empty (ZeroDivisionError)."""
    from sdengine.weights.flux2_file import load_flux2_vae
    from sdengine.weights.qwen_text_file import load_qwen_text_encoder
    from test_flux2_files import comfy_vae_layout

    vae = root / "vae_odd.safetensors"
    save_safetensors(_break(comfy_vae_layout(flux2["vae_sd"]), "grow", "decoder.mid.attn_1.proj_out.weight", 2), vae)
    _one_line_error(lambda: load_flux2_vae(vae), "decoder.mid_block.attentions.0.to_out.0.weight")
    text = root / "qwen3_odd.safetensors"
    save_safetensors(_break(qwen3["sd"], "empty", "model.layers.0.self_attn.q_norm.weight", 0), text)
    _one_line_error(lambda: load_qwen_text_encoder(text), "not multiples of the head width 0")


@pytest.mark.parametrize(
    "key",
    [
        "lora_unet_single_blocks_1_linear2",
        "diffusion_model.single_blocks.1.linear2",
        "transformer.single_transformer_blocks.1.attn.to_out",
    ],
)
def test_a_flux2_lora_on_single_blocks_only_applies(dits, root, key: str) -> None:
    """A FLUX.2 LoRA adapting only single blocks' output projections (kohya's, ComfyUI's or diffusers' names) was
    refused as "a LoRA for Flux.1" (its names read as Flux.1's once split onto the model's); found by the fuzz
    test."""
    from sdengine.weights.lora import apply_loras
    from sdengine.weights.lora_file import LoRAFile

    model = dits["models"]["flux2"]
    layer = model.single_transformer_blocks[1].attn.to_out
    a, b = (
        ("lora_A.weight", "lora_B.weight") if key.startswith("transformer.") else ("lora_down.weight", "lora_up.weight")
    )
    path = root / "flux2_single.safetensors"
    save_safetensors(
        {f"{key}.{a}": torch.randn(2, layer.in_features), f"{key}.{b}": torch.randn(layer.out_features, 2)}, path
    )
    handle = apply_loras(model, None, [(LoRAFile.load(path), 1.0)])
    try:
        assert handle.reports[0].matched == ["unet:single_transformer_blocks.1.attn.to_out"]
        _run_flux2(model)
    finally:
        handle.remove()
