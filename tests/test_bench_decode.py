"""`sdengine bench --decoders` on the tiny random model: sdengine's VAE and tiny VAE decodes agree with diffusers'
on the same weights, the tiny VAE's rule and shapes, a decoder-only TAESD file, the JSON report, and the
refusals of the other modes' flags."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sdengine import bench, bench_decode
from sdengine.cli import main
from sdengine.weights.io import save_safetensors
from sdengine.weights.tiny_vae_file import load_tiny_vae


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A work folder holding the random tiny model where ``--random tiny --workdir`` finds (and reuses) it."""
    root = tmp_path_factory.mktemp("decoders")
    bench.make_random_folder(root / "random-tiny", "tiny")
    return root


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_tiny_vae_levels_follow_the_downscale_factor():
    assert bench_decode.tiny_blocks(8) == ((3, 3, 3, 1), (1, 3, 3, 3))
    assert bench_decode.tiny_blocks(4) == ((3, 3, 1), (1, 3, 3))
    assert bench_decode.tiny_blocks(2) == ((3, 1), (1, 3))
    with pytest.raises(bench.BenchError, match="not a power of 2"):
        bench_decode.tiny_blocks(6)
    a = bench_decode.random_tiny_vae(4, 3, 8)
    b = bench_decode.random_tiny_vae(4, 3, 8)
    assert a.config.decoder_channels == (64, 64, 64, 64) and a.config.downscale_factor == 8
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name  # a fixed seed
    w = a.state_dict()["decoder.layers.0.weight"]
    assert abs(float(w.std()) - bench_decode.TINY_STD) < 0.01 and abs(float(w.mean())) < 0.01


def test_both_decoders_agree_with_diffusers(workdir):
    pytest.importorskip("diffusers")
    report = bench_decode.run_decoders(
        workdir / "random-tiny", model="tiny", workdir=workdir, batch=2, repeats=1, random_model=True
    )
    assert report.size == 32 and report.latent_shape == [2, 4, 16, 16]  # the model's own size, 2x latents
    for key in ("vae", "tiny_vae"):
        ours, theirs = report.outputs[f"{key} sdengine"], report.outputs[f"{key} diffusers"]
        assert ours.shape == theirs.shape == (2, 3, 32, 32)
        assert float(np.abs(ours).max()) > 0.1  # not all zeros: the agreement below means something
        assert float(np.abs(ours - theirs).max()) < 1e-4
        pair = report.pairs[key]
        assert pair.max_abs is not None and pair.max_abs < 1e-4
        assert pair.output_shape == [2, 3, 32, 32]
        assert pair.diffusers is not None and len(pair.sdengine.times_s) == len(pair.diffusers.times_s) == 1
        assert pair.ratio == pytest.approx(pair.diffusers.median_s / pair.sdengine.median_s)
    # diffusers decoded the very weights written to the work folder, which sdengine reads back the same
    tiny = load_tiny_vae(workdir / "tiny-vae-4ch-2x-diffusers")
    assert tiny.config.decoder_blocks == (3, 1)
    ref = bench_decode.random_tiny_vae(4, 3, 2)
    for name, p in ref.state_dict().items():
        assert torch.equal(p, tiny.state_dict()[name]), name
    assert report.full_vs_tiny_mean_abs > 0
    assert "random weights" in report.table() and report.random_weights


def test_a_decoder_only_taesd_file(workdir, tmp_path):
    pytest.importorskip("diffusers")
    decoder = bench_decode.random_tiny_vae(4, 3, 2, seed=7)
    # ComfyUI's combined layout, decoder half only: its index 0 is TAESD's clamp, so layer N is saved as N + 1
    state = {}
    for k, v in decoder.state_dict().items():
        if k.startswith("decoder.layers."):
            n, rest = k.removeprefix("decoder.layers.").split(".", 1)
            state[f"taesd_decoder.{int(n) + 1}.{rest}"] = v
    path = tmp_path / "taesd_decoder.safetensors"
    save_safetensors(state, path)
    report = bench_decode.run_decoders(
        workdir / "random-tiny", model="tiny", workdir=tmp_path / "work", tiny_vae=path, repeats=1
    )
    assert report.tiny_vae == str(path)
    assert report.pairs["tiny_vae"].max_abs is not None and report.pairs["tiny_vae"].max_abs < 1e-4
    with torch.inference_mode():
        latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        want = decoder.decode(latents).numpy()
    np.testing.assert_allclose(report.outputs["tiny_vae sdengine"], want, atol=1e-6)


def test_cli_writes_the_json_report(workdir, tmp_path, capsys, keep_threads):
    pytest.importorskip("diffusers")
    out = tmp_path / "decoders.json"
    args = ["--threads", "1", "bench", "--random", "tiny", "--workdir", str(workdir), "--decoders"]
    assert main([*args, "--size", "64", "--repeats", "2", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    rows = {ln.split("  ")[0]: ln for ln in table.splitlines()}
    assert "VAE decode" in rows and "tiny VAE decode" in rows
    assert "tiny / full (sdengine): the tiny decode is " in table
    raw = json.loads(out.read_text())
    assert raw["mode"] == "decoders" and raw["size"] == 64 and raw["batch"] == 1 and raw["repeats"] == 2
    assert raw["latent_shape"] == [1, 4, 32, 32] and raw["threads"] == "1 torch thread(s)"
    assert set(raw["decoders"]) == {"vae", "tiny_vae"}
    for row in raw["decoders"].values():
        for engine in ("sdengine", "diffusers"):
            assert len(row[engine]["times_s"]) == 2 and row[engine]["median_s"] > 0 and row[engine]["warmup_s"] > 0
        assert row["max_abs_vs_diffusers"] < 1e-4
        assert row["speedup_vs_diffusers"] == pytest.approx(row["diffusers"]["median_s"] / row["sdengine"]["median_s"])
        assert row["output_shape"] == [1, 3, 64, 64]
    vae, tiny = raw["decoders"]["vae"]["sdengine"]["median_s"], raw["decoders"]["tiny_vae"]["sdengine"]["median_s"]
    assert raw["tiny_speedup_vs_full"] == pytest.approx(vae / tiny)
    assert raw["full_vs_tiny_mean_abs"] > 0 and "random weights" in raw["note"]
    assert raw["tiny_config"]["decoder_blocks"] == [3, 1]


def report_with_medians(decode: tuple[float, float], encode: tuple[float, float] | None) -> bench_decode.DecodeReport:
    """A report whose sdengine medians are (full, tiny) seconds for the decoders and, if given, the encoders."""

    def pair(name: str, median: float) -> bench_decode.DecoderPair:
        return bench_decode.DecoderPair(name, bench.EngineTimes("sdengine", warmup_s=median, times_s=[median]))

    pairs = {"vae": pair("VAE decode", decode[0]), "tiny_vae": pair("tiny VAE decode", decode[1])}
    if encode is not None:
        pairs |= {"vae_encode": pair("VAE encode", encode[0]), "tiny_vae_encode": pair("tiny VAE encode", encode[1])}
    return bench_decode.DecodeReport(
        model="tiny",
        size=64,
        batch=1,
        repeats=1,
        seed=0,
        threads="1",
        load="idle",
        latent_shape=[1, 4, 32, 32],
        tiny_vae="random",
        tiny_config={"decoder_channels": [64], "decoder_blocks": [3, 1]},
        random_weights=True,
        pairs=pairs,
        full_vs_tiny_mean_abs=0.5,
    )


def test_the_table_says_which_of_tiny_and_full_is_faster():
    # the full decode takes 1 s, the tiny 0.1 s: 10x faster; the full encode 0.05 s, the tiny 1 s: 20x slower,
    # which the table once printed as "tiny / full encode (sdengine): 0.05x faster"
    lines = report_with_medians((1.0, 0.1), (0.05, 1.0)).table().splitlines()
    assert "tiny / full (sdengine): the tiny decode is 10.00x faster than the full one" in lines
    assert "tiny / full encode (sdengine): the tiny encode is 20.00x SLOWER than the full one (speed-up 0.05x)" in lines
    assert lines[0].startswith("tiny: VAE decoders and encoders,")
    # and the other way round
    table = report_with_medians((0.1, 1.0), (1.0, 0.25)).table()
    assert "the tiny decode is 10.00x SLOWER than the full one (speed-up 0.10x)" in table
    assert "the tiny encode is 4.00x faster than the full one" in table
    assert "0.10x faster" not in table and "0.05x faster" not in table
    assert report_with_medians((1.0, 0.5), None).table().splitlines()[0].startswith("tiny: VAE decoders,")


def test_encoders_agree_with_diffusers_too(workdir, tmp_path, capsys, keep_threads):
    pytest.importorskip("diffusers")
    out = tmp_path / "both.json"
    args = ["--threads", "1", "bench", "--random", "tiny", "--workdir", str(workdir), "--decoders", "--encoders"]
    assert main([*args, "--batch", "2", "--repeats", "1", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "VAE encode" in table and "tiny VAE encode" in table and "tiny / full encode (sdengine): " in table
    raw = json.loads(out.read_text())
    assert set(raw["decoders"]) == {"vae", "tiny_vae"} and set(raw["encoders"]) == {"vae_encode", "tiny_vae_encode"}
    for row in raw["encoders"].values():
        assert row["output_shape"] == [2, 4, 16, 16]  # latents of the 2x VAE
        assert row["max_abs_vs_diffusers"] < 1e-4
    enc = raw["encoders"]
    speedup = enc["vae_encode"]["sdengine"]["median_s"] / enc["tiny_vae_encode"]["sdengine"]["median_s"]
    assert raw["tiny_encode_speedup_vs_full"] == pytest.approx(speedup)
    # the latents are the VAE's own: sdengine's pipeline encoder gives the same posterior mean
    report = bench_decode.run_decoders(
        workdir / "random-tiny", model="tiny", workdir=workdir, repeats=1, encoders=True, compare=None
    )
    ours = report.outputs["vae_encode sdengine"]
    assert ours.shape == (1, 4, 16, 16) and float(np.abs(ours).max()) > 0.01
    # without --decoders, and a decoder-only tiny VAE: one line each
    assert main(["bench", "--random", "tiny", "--workdir", str(workdir), "--encoders"]) == 2
    assert "--encoders is an option of --decoders" in capsys.readouterr().err
    dec = bench_decode.random_tiny_vae(4, 3, 2)
    dec_only = tmp_path / "taesd_decoder.safetensors"
    state = {}
    for k, v in dec.state_dict().items():
        if k.startswith("decoder.layers."):
            n, rest = k.removeprefix("decoder.layers.").split(".", 1)
            state[f"{int(n) + 1}.{rest}"] = v  # TAESD's own decoder file: index 0 is its clamp
    save_safetensors(state, dec_only)
    assert main([*args[2:], "--tiny-vae", str(dec_only)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no encoder" in err, err


def test_compare_none_times_sdengine_alone(workdir, capsys, keep_threads):
    args = ["--threads", "1", "bench", "--random", "tiny", "--workdir", str(workdir), "--decoders"]
    assert main([*args, "--compare", "none", "--repeats", "1"]) == 0
    rows = [
        ln.split() for ln in capsys.readouterr().out.splitlines() if ln.startswith(("VAE decode ", "tiny VAE decode "))
    ]
    assert [r[-3:] for r in rows] == [["-", "-", "-"], ["-", "-", "-"]]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--decoders", "--scaling"], "--scaling does not apply to --decoders"),
        (["--decoders", "--device", "cuda"], "--device cuda does not apply to --decoders"),
        (["--decoders", "--dtype", "bf16"], "--dtype bf16 does not apply to --decoders"),
        (["--decoders", "--options", "channels_last"], "--options does not apply to --decoders"),
        # a generation's settings, once ignored without a word: the decoders' bench runs no generation
        (["--decoders", "--steps", "3"], "--steps 3 does not apply to --decoders"),
        (["--decoders", "--sampler", "euler"], "--sampler euler does not apply to --decoders"),
        (["--decoders", "--cfg", "2"], "--cfg 2 does not apply to --decoders"),
        (["--decoders", "--no-memory"], "--no-memory does not apply to --decoders"),
        (["--tiny-vae", "taesd_decoder.safetensors"], "--tiny-vae is an option of --decoders"),
        (["--decoders", "--size", "33"], "--size 33 is not a positive multiple of the VAE's downscale factor 2"),
    ],
)
def test_refusals_are_one_line(workdir, capsys, args, message):
    assert main(["bench", "--random", "tiny", "--workdir", str(workdir), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sdengine: error: ") and message in err, err


def test_a_tiny_vae_of_another_family_is_one_line(workdir, tmp_path, capsys):
    from sdengine.weights.tiny_vae_file import save_tiny_vae

    other = save_tiny_vae(bench_decode.random_tiny_vae(4, 3, 8), tmp_path / "taesd-8x")  # the model's VAE is 2x
    args = ["bench", "--random", "tiny", "--workdir", str(workdir), "--decoders", "--tiny-vae", str(other)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "decodes 4-channel latents at 8x" in err and "at 2x" in err, err
    missing = ["bench", "--random", "tiny", "--workdir", str(workdir), "--decoders", "--tiny-vae", "nowhere.pth"]
    assert main(missing) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--tiny-vae" in err and "nowhere.pth" in err, err
