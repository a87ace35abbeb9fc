"""Checkpoint merging (sdengine.weights.merge, `sdengine merge`): A1111's Checkpoint Merger rules on tiny random
checkpoints in the SD single-file layout, every merged tensor checked against the formula re-derived in float64."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import sdengine
from sdengine.cli import main
from sdengine.weights import convert, load_file, save_safetensors
from sdengine.weights.io import SafetensorsReader, safetensors_metadata
from sdengine.weights.merge import MergeError, merge_checkpoints

VAE = "first_stage_model."


def _perturbed(src: Path, dst: Path, seed: int, scale: float = 0.05, **changes) -> Path:
    """``src``'s tensors plus noise (float ones), its metadata kept: another fine-tune of the same network."""
    sd, meta = load_file(src)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        out[k] = v + torch.randn(v.shape, generator=g).to(v.dtype) * scale if v.is_floating_point() else v.clone()
    out.update(changes.pop("add", {}))
    for k in changes.pop("drop", ()):
        out.pop(k)
    dtype = changes.pop("dtype", None)
    save_safetensors(out, dst, metadata=meta, dtype=dtype)
    return dst


@pytest.fixture(scope="module")
def files(tiny_sd1_folder, tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("merge")
    a = convert(tiny_sd1_folder, tmp / "a.safetensors")
    return {"a": a, "b": _perturbed(a, tmp / "b.safetensors", 1), "c": _perturbed(a, tmp / "c.safetensors", 2)}


def _f64(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_file(path)[0].items()}


def _mergeable(k: str) -> bool:  # A1111: names holding "model", position ids excepted
    return "model" in k and not k.endswith(".position_ids")


@pytest.mark.parametrize("method", ["weighted_sum", "add_difference"])
def test_merged_tensors_equal_the_formula(files, tmp_path, method):
    m = 0.3
    c = files["c"] if method == "add_difference" else None
    rep = merge_checkpoints(files["a"], files["b"], c, out=tmp_path / "m.safetensors", method=method, multiplier=m)
    a, b, out = _f64(files["a"]), _f64(files["b"]), _f64(rep.path)
    cc = _f64(files["c"])
    assert sorted(out) == sorted(a)
    merged = 0
    for k, ta in a.items():
        if not (_mergeable(k) and ta.is_floating_point()):
            assert torch.equal(out[k], ta), k
            continue
        x, y = ta.double(), b[k].double()
        want = x * (1 - m) + y * m if method == "weighted_sum" else x + (y - cc[k].double()) * m
        assert out[k].dtype == ta.dtype
        torch.testing.assert_close(out[k].double(), want, rtol=1e-6, atol=1e-6, msg=k)
        merged += not torch.equal(out[k], ta)
    assert merged == rep.merged > 100  # every network tensor changed (UNet, VAE, text encoder)
    assert not rep.kept_from_a and not rep.not_in_a


def test_multiplier_zero_gives_a_and_one_gives_b_bit_for_bit(files, tmp_path):
    a, b = _f64(files["a"]), _f64(files["b"])
    for m, want in ((0.0, a), (1.0, b)):
        out = _f64(merge_checkpoints(files["a"], files["b"], out=tmp_path / f"m{m}.safetensors", multiplier=m).path)
        diff = [k for k in a if _mergeable(k) and a[k].is_floating_point() and not torch.equal(out[k], want[k])]
        assert not diff, diff[:3]


def _image(model: Path) -> np.ndarray:
    pipe = sdengine.load_pipeline(model, device="cpu")
    res = pipe("a red apple", "", steps=3, sampler="euler", cfg_scale=5.0, seed=7, width=32, height=32)
    return np.asarray(res.arrays, np.float64)


def test_merged_model_loads_and_generates_and_m0_is_a(files, tmp_path):
    """M = 0: A's images exactly; M = 0.5: a working model whose images differ from both."""
    base = _image(files["a"])
    m0 = merge_checkpoints(files["a"], files["b"], out=tmp_path / "m0.safetensors", multiplier=0.0).path
    assert np.array_equal(_image(m0), base)
    half = merge_checkpoints(files["a"], files["b"], out=tmp_path / "half.safetensors", multiplier=0.5).path
    img = _image(half)
    assert np.isfinite(img).all() and np.abs(img - base).mean() > 1e-3
    assert np.abs(img - _image(files["b"])).mean() > 1e-3


def test_mixed_dtypes_promote_and_fp16_halves_float32(files, tmp_path):
    b16 = _perturbed(files["a"], tmp_path / "b16.safetensors", 3, dtype="fp16")
    out = merge_checkpoints(files["a"], b16, out=tmp_path / "p.safetensors", multiplier=0.5).path
    a, b, o = _f64(files["a"]), _f64(b16), _f64(out)
    k = next(k for k in a if k.startswith("model.diffusion_model.") and k.endswith("weight"))
    assert o[k].dtype == torch.float32  # A1111's arithmetic: fp32 A with fp16 B is fp32
    torch.testing.assert_close(o[k].double(), 0.5 * a[k].double() + 0.5 * b[k].double(), rtol=1e-6, atol=1e-6)
    half = merge_checkpoints(files["a"], files["b"], out=tmp_path / "h.safetensors", multiplier=0.5, fp16=True).path
    with SafetensorsReader(half) as r:
        assert {r.dtype(n) for n in r.names if r.dtype(n).is_floating_point} == {torch.float16}


def test_missing_extra_and_non_float_keys_follow_a1111(files, tmp_path):
    a = _f64(files["a"])
    gone = next(k for k in a if k.startswith("model.diffusion_model.") and k.endswith(".bias"))
    gone_c = next(k for k in a if k.startswith("cond_stage_model.") and k.endswith(".bias"))
    b = _perturbed(
        files["a"],
        tmp_path / "b.safetensors",
        4,
        drop=[gone],
        add={"model.diffusion_model.extra.weight": torch.ones(3), "model_ema.num_updates": torch.tensor(99)},
    )
    c = _perturbed(files["a"], tmp_path / "c.safetensors", 5, drop=[gone_c])
    a_file = _perturbed(
        files["a"], tmp_path / "a.safetensors", 6, scale=0.0, add={"model_ema.num_updates": torch.tensor(7)}
    )
    rep = merge_checkpoints(a_file, b, c, out=tmp_path / "m.safetensors", method="add_difference", multiplier=1.0)
    out, av = _f64(rep.path), _f64(a_file)
    assert torch.equal(out[gone], av[gone]) and rep.kept_from_a == [gone]  # not in B: A's
    assert torch.equal(out[gone_c], av[gone_c]) and rep.no_difference == [gone_c]  # not in C: no difference
    assert "model.diffusion_model.extra.weight" not in out  # B's own key: left out, the network is A's
    assert int(out["model_ema.num_updates"]) == 7  # integer tensors are never merged


def test_inpainting_a_is_merged_on_its_first_four_input_channels(files, tiny_inpaint_folder, tmp_path):
    inp = convert(tiny_inpaint_folder, tmp_path / "inpaint.safetensors")
    rep = merge_checkpoints(inp, files["a"], out=tmp_path / "m.safetensors", multiplier=0.25)
    k = "model.diffusion_model.input_blocks.0.0.weight"
    a, b, out = _f64(inp)[k].double(), _f64(files["a"])[k].double(), _f64(rep.path)[k].double()
    assert a.shape[1] == 9 and b.shape[1] == 4 and out.shape == a.shape
    torch.testing.assert_close(out[:, :4], 0.75 * a[:, :4] + 0.25 * b, rtol=1e-6, atol=1e-6)
    assert torch.equal(out[:, 4:], a[:, 4:])  # the masked-image and mask channels stay A's
    assert rep.inpainting and json.loads(safetensors_metadata(rep.path)["sd_merge_recipe"])["is_inpainting"] is True
    # the classic recipe: inpainting + (fine-tune - base) * 1
    diff = merge_checkpoints(
        inp, files["b"], files["a"], out=tmp_path / "d.safetensors", method="add_difference", multiplier=1.0
    )
    got = _f64(diff.path)[k].double()
    want = a[:, :4] + (_f64(files["b"])[k].double() - b)
    torch.testing.assert_close(got[:, :4], want, rtol=1e-6, atol=1e-6)
    with pytest.raises(MergeError, match="A must be the inpainting model"):
        merge_checkpoints(files["a"], inp, out=tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_bake_vae_discard_and_no_interpolation(files, tmp_path):
    b = _f64(files["b"])
    vae_file = tmp_path / "other.vae.safetensors"
    save_safetensors({k[len(VAE) :]: v for k, v in b.items() if k.startswith(VAE)}, vae_file)
    a_ema = _perturbed(
        files["a"], tmp_path / "a_ema.safetensors", 0, scale=0.0, add={"model_ema.decay": torch.tensor(0.9999)}
    )
    rep = merge_checkpoints(
        a_ema, out=tmp_path / "n.safetensors", method="no_interpolation", bake_vae=vae_file, discard_ema=True
    )
    out, a = _f64(rep.path), _f64(files["a"])
    assert "model_ema.decay" not in out and rep.discarded == 1
    for k in a:
        want = b[k] if k.startswith(VAE) else a[k]
        assert torch.equal(out[k], want), k
    assert rep.baked_vae == sum(k.startswith(VAE) for k in a) > 0
    recipe = json.loads(safetensors_metadata(rep.path)["sd_merge_recipe"])
    assert recipe["bake_in_vae"] == vae_file.name and recipe["interp_method"] == "No interpolation"
    assert recipe["discard_weights"] == r"^model_ema\."
    # a VAE of another shape is refused before anything is written
    bad = tmp_path / "bad.vae.safetensors"
    sd = {k[len(VAE) :]: v for k, v in b.items() if k.startswith(VAE)}
    sd["decoder.conv_out.weight"] = torch.zeros(3, 5, 3, 3)
    save_safetensors(sd, bad)
    with pytest.raises(MergeError, match="does not fit A's VAE"):
        merge_checkpoints(files["a"], out=tmp_path / "y.safetensors", method="no_interpolation", bake_vae=bad)


def test_pickle_input_and_recipe_metadata(files, tmp_path):
    a = _f64(files["a"])
    ckpt = tmp_path / "a.ckpt"
    torch.save({"state_dict": a, "global_step": 3}, ckpt)
    rep = merge_checkpoints(ckpt, files["b"], out=tmp_path / "m.safetensors", multiplier=0.5)
    meta = safetensors_metadata(rep.path)
    recipe, models = json.loads(meta["sd_merge_recipe"]), json.loads(meta["sd_merge_models"])
    sha_a = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    sha_b = hashlib.sha256(files["b"].read_bytes()).hexdigest()
    assert recipe["type"] == "sdengine" and recipe["primary_model_hash"] == sha_a
    assert recipe["secondary_model_hash"] == sha_b and recipe["tertiary_model_hash"] is None
    assert recipe["interp_method"] == "Weighted sum" and recipe["multiplier"] == 0.5
    legacy = hashlib.sha256(ckpt.read_bytes()[0x100000:0x110000]).hexdigest()[:8]
    assert models[sha_a] == {"name": "a.ckpt", "legacy_hash": legacy, "sd_merge_recipe": None}
    # a merge of a merge records the earlier recipe and its models
    again = merge_checkpoints(rep.path, files["c"], out=tmp_path / "m2.safetensors")
    models2 = json.loads(safetensors_metadata(again.path)["sd_merge_models"])
    sha_m = hashlib.sha256(rep.path.read_bytes()).hexdigest()
    assert models2[sha_m]["sd_merge_recipe"] == recipe and sha_a in models2
    # A's network configs (written by convert) stay with the result, which is A's network; a pickle A has none
    assert "sdengine.configs" not in meta
    own = safetensors_metadata(merge_checkpoints(files["a"], ckpt, out=tmp_path / "m3.safetensors").path)
    assert own["sdengine.configs"] == safetensors_metadata(files["a"])["sdengine.configs"]


def _sdxl_like(a: Path, dst: Path) -> Path:
    sd, _ = load_file(a)
    sd = {k.replace("cond_stage_model.transformer.", "conditioner.embedders.0.transformer."): v for k, v in sd.items()}
    sd["conditioner.embedders.1.model.ln_final.weight"] = torch.ones(32)
    save_safetensors(sd, dst)
    return dst


def test_different_architectures_and_non_models_are_refused_in_one_line(files, tiny_sd2_folder, tmp_path):
    sd2 = convert(tiny_sd2_folder, tmp_path / "sd2.safetensors")
    lora = tmp_path / "lora.safetensors"
    save_safetensors({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, lora)
    vae = tmp_path / "v.safetensors"
    save_safetensors({"encoder.down.0.block.0.conv1.weight": torch.zeros(2, 2)}, vae)
    cases = [
        ((files["a"], sd2), "A (a.safetensors) is SD 1.x layout (text width 32) and B (sd2.safetensors) is SD 2.x"),
        ((files["a"], _sdxl_like(files["a"], tmp_path / "xl.safetensors")), "is SDXL: different architectures"),
        ((files["a"], lora), "not a Stable Diffusion checkpoint: a LoRA"),
        ((vae, files["a"]), "not a Stable Diffusion checkpoint: a VAE"),
        ((files["a"], tmp_path / "missing.safetensors"), "no such file"),
    ]
    for (a, b), message in cases:
        with pytest.raises(MergeError) as e:
            merge_checkpoints(a, b, out=tmp_path / "o.safetensors")
        assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "o.safetensors").exists()
    # another shape in the same layout: named, not a tensor error
    odd = _perturbed(
        files["a"], tmp_path / "odd.safetensors", 1, add={"model.diffusion_model.out.2.bias": torch.zeros(5)}
    )
    with pytest.raises(
        MergeError, match=r"cannot merge model\.diffusion_model\.out\.2\.bias: \(4,\) in A, \(5,\) in B"
    ):
        merge_checkpoints(files["a"], odd, out=tmp_path / "o.safetensors")


def test_cli_merges_and_refuses_in_one_line(files, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    rc = main(["merge", str(files["a"]), str(files["b"]), "-M", "0.4", "--out", str(out), "--fp16"])
    assert rc == 0 and out.is_file()
    assert "A * (1 - 0.4) + B * 0.4" in capsys.readouterr().out
    a, b, o = _f64(files["a"]), _f64(files["b"]), _f64(out)
    k = "model.diffusion_model.out.2.weight"
    want = (0.6 * a[k].double() + 0.4 * b[k].double()).half()
    assert o[k].dtype == torch.float16 and torch.equal(o[k], want)
    bad = [
        (["--method", "add_difference"], "takes 3 models (A B C: A + (B - C) * M), got 2"),
        (["--method", "weighted_sun"], "did you mean 'weighted_sum'"),
        (["--out", str(tmp_path / "x.ckpt")], "written as .safetensors only"),
        (["--out", str(out)], "exists; give another name"),
        (["--discard-weights", "("], "is not a regular expression"),
        (["-M", "nan"], "--multiplier must be a finite number"),
    ]
    for extra, message in bad:
        argv = ["merge", str(files["a"]), str(files["b"]), "--out", str(tmp_path / "y.safetensors"), *extra]
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse's own refusals (a bad choice) exit from the parser
            rc = e.code
        assert rc == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_sdxl_files_merge_load_and_refuse_sd1(files, tmp_path):
    """A tiny SDXL base (sgm layout, two text encoders): merged at M = 0 it generates A's image exactly, at 0.5 its
    tensors are the formula; with an SD 1.x file it is refused."""
    from _sdxl_models import make_sdxl_folder

    xl = convert(make_sdxl_folder(tmp_path / "xl"), tmp_path / "xl.safetensors")
    xl_b = _perturbed(xl, tmp_path / "xl_b.safetensors", 7)
    rep = merge_checkpoints(xl, xl_b, out=tmp_path / "m.safetensors", multiplier=0.5)
    assert rep.architecture == "SDXL" and rep.merged > 100
    a, b, out = _f64(xl), _f64(xl_b), _f64(rep.path)
    for k in (k for k in a if k.startswith(("conditioner.embedders.1.model.", "model.diffusion_model.label_emb"))):
        if a[k].is_floating_point():
            torch.testing.assert_close(out[k].double(), 0.5 * a[k].double() + 0.5 * b[k].double(), rtol=1e-6, atol=1e-6)
    m0 = merge_checkpoints(xl, xl_b, out=tmp_path / "m0.safetensors", multiplier=0.0).path
    assert np.array_equal(_image(m0), _image(xl))
    assert np.isfinite(_image(rep.path)).all()
    with pytest.raises(MergeError, match=r"A \(a\.safetensors\) is SD 1\.x .* and B \(xl\.safetensors\) is SDXL"):
        merge_checkpoints(files["a"], xl, out=tmp_path / "x.safetensors")


def test_streaming_writer_and_reader_match_the_safetensors_library(tmp_path):
    """The merge's I/O: each tensor made once, in the file's order, and read back alone; the file is what the
    safetensors library reads (the oracle); a tensor of another shape than its header's writes nothing."""
    from safetensors.torch import load_file as st_load

    from sdengine.weights.io import WeightsError, write_safetensors_streaming

    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(3, 5, generator=g),
        "b.half": torch.randn(7, generator=g).half(),
        "c.int": torch.arange(4, dtype=torch.int64),
        "d.empty": torch.zeros(0),
    }
    calls: list[str] = []

    def produce(name: str) -> torch.Tensor:
        calls.append(name)
        return tensors[name]

    layout = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    path = tmp_path / "s.safetensors"
    write_safetensors_streaming(layout, produce, path, metadata={"k": "v"})
    assert sorted(calls) == sorted(tensors) and len(calls) == len(set(calls))
    theirs = st_load(str(path))
    with SafetensorsReader(path) as r:
        assert r.metadata == {"k": "v"}
        for k, v in tensors.items():
            assert torch.equal(theirs[k], v) and torch.equal(r.read(k), v) and r.shape(k) == tuple(v.shape)
    bad = tmp_path / "bad.safetensors"
    with pytest.raises(WeightsError, match="shape"):
        write_safetensors_streaming({"x": (torch.float32, (2, 2))}, lambda n: torch.zeros(3), bad)
    assert not bad.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary left
