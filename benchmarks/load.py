"""Load-time and memory benchmark: a full-size SD 1.5 checkpoint (random weights), sdengine vs diffusers.

    python benchmarks/load.py [--dir /tmp/sdengine-bench] [--dtype fp16|fp32] [--cases ...]

Creates once (cached in --dir) a full-size random SD 1.5 diffusers folder (UNet 860M, VAE 84M, CLIP-L 123M
parameters; fp16 by default = 2.1 GB, fp32 = 4.3 GB) and the same weights as one LDM single file written by
`sdengine.weights.convert`. Then each case runs in its own subprocess and reports wall time, peak RSS right
after loading, and RSS after every weight has been read once (a checksum over all parameters), against the
size of the weights. Page cache is warm (the files were just written or read), as on a second run.

    python benchmarks/load.py --readers [--dir /tmp/sdengine-bench] [--repeats 5]

compares the two ways to read one .safetensors file, each in its own subprocess, alternated, median of
--repeats runs: sdengine's own reader (`weights.io.load_safetensors`: header validated in Python, tensors
are views into one private memory map) against the safetensors library (`safe_open(...).get_tensor` for
every name, and `safetensors.torch.load_file`). The file is a random SD 1.5 U-Net state dict in fp16
(1.7 GB, written once with the library's own writer). "open" = every tensor object exists, "ready" =
open plus one read of every 4 KiB page of every tensor (so lazily mapped pages are paid for too).

    python benchmarks/load.py --sdxl [--dir /tmp/sdengine-bench] [--repeats 2] [--keep]

A full-size SDXL base single file (random weights, fp16, 6.46 GiB: U-Net 2.57 B, CLIP-L 123 M, OpenCLIP bigG
695 M, VAE 84 M parameters) in sgm's layout, written by the writer of `sdengine convert`
(`weights.loading.save_single_file`, which streams one tensor at a time): the shapes come from sdengine's
models built on the meta device, the values are drawn tensor by tensor in fp16, so creating it peaks near
the file's size. Beside it, a diffusers folder holding only the configs and tokenizers (no weights). Each
run is a fresh subprocess, the engines alternated: `sdengine.load_pipeline(file, device="cpu",
dtype="fp16")` against diffusers' `StableDiffusionXLPipeline.from_single_file(file, config=folder,
torch_dtype=torch.float16, local_files_only=True)`. Timed after the imports, and the engine's imports apart
(`import sdengine` is lazy: its loading pays for the modules it imports, diffusers' import has done that);
peak RSS is the child's VmHWM after loading and reading every weight once. The file is deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

CASES = ("sdengine-single", "sdengine-folder", "sdengine-statedicts", "diffusers-single", "diffusers-folder")
GB = 1024**3


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss() -> int:
    # VmHWM, not ru_maxrss: a child's ru_maxrss can carry its parent's peak across fork+exec.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------------------------------ file creation


def _write_tokenizer(dst: Path) -> None:
    import gzip

    from transformers import CLIPTokenizer

    assets = Path(__file__).resolve().parents[1] / "src" / "sdengine" / "assets" / "clip"
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        (dst / name).write_bytes(gzip.decompress((assets / f"{name}.gz").read_bytes()))
    CLIPTokenizer(str(dst / "vocab.json"), str(dst / "merges.txt"), model_max_length=77).save_pretrained(dst)


def ensure_files(root: Path, dtype: str) -> tuple[Path, Path]:
    """The cached random SD 1.5 folder and single file for this dtype (created on first use)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdengine.weights import convert, save_safetensors
    from sdengine.weights.io import parse_dtype
    from sdengine.weights.loading import parameters_on_meta

    folder = root / f"sd15-random-{dtype}"
    single = root / f"sd15-random-{dtype}.safetensors"
    if (folder / "model_index.json").is_file() and single.is_file():
        return folder, single
    root.mkdir(parents=True, exist_ok=True)
    torch_dtype = parse_dtype(dtype)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    te_cfg = CLIPTextConfig(
        hidden_act="quick_gelu",
        projection_dim=768,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    sd15_unet = dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8)
    sd15_vae = dict(
        block_out_channels=(128, 256, 512, 512),
        latent_channels=4,
        layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=512,
    )
    parts = {
        "unet": (lambda: UNet2DConditionModel(**sd15_unet, sample_size=64), "diffusion_pytorch_model"),
        "vae": (lambda: AutoencoderKL(**sd15_vae), "diffusion_pytorch_model"),
        "text_encoder": (lambda: CLIPTextModel(te_cfg), "model"),
    }
    for comp, (factory, stem) in parts.items():
        with parameters_on_meta():
            model = factory()  # shapes and config only; values are drawn below
        sd = {
            k: (torch.randn(v.shape, generator=g) * 0.02).to(torch_dtype)
            for k, v in model.state_dict().items()
            if v.is_floating_point()
        }
        if comp == "text_encoder":
            sd = {f"text_model.{k}": v for k, v in sd.items()}
            model.config.save_pretrained(folder / comp)
        else:
            model.save_config(folder / comp)
        save_safetensors(sd, folder / comp / f"{stem}.safetensors", metadata={"format": "pt"})
        del sd
    PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    ).save_pretrained(folder / "scheduler")
    _write_tokenizer(folder / "tokenizer")
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": "0.42.1",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "PNDMScheduler"],
                "safety_checker": [None, None],
                "feature_extractor": [None, None],
                "requires_safety_checker": False,
            },
            indent=2,
        )
    )
    t1 = time.perf_counter()
    convert(folder, single)
    print(
        f"created {folder} in {t1 - t0:.1f} s; converted to {single.name} in {time.perf_counter() - t1:.1f} s",
        flush=True,
    )
    return folder, single


# ------------------------------------------------------------------------------------------- one case


def run_case(case: str, folder: Path, single: Path, dtype: str) -> dict:
    import torch

    torch.set_num_threads(2)
    base = _rss_now()
    t0 = time.perf_counter()
    modules: dict[str, torch.nn.Module] = {}
    tensors: list[torch.Tensor] = []
    note = ""
    if case.startswith("sdengine"):
        from sdengine.weights import build_models, load_checkpoint

        ck = load_checkpoint(single if case == "sdengine-single" else folder)
        if case == "sdengine-statedicts":
            tensors = [t for sd in ck.state_dicts.values() for t in sd.values()]
        else:
            modules = build_models(ck)
            missing = [c for c in ("unet", "vae", "text_encoder") if c not in modules]
            if missing:  # model class not written yet: its renamed state dict still counts
                note = f"no sdengine model for {missing}: state dicts only"
                tensors = [t for c in missing for t in ck.state_dicts[c].values()]
    else:
        import logging

        from diffusers import StableDiffusionPipeline

        logging.getLogger("diffusers").setLevel(logging.ERROR)
        logging.getLogger("transformers").setLevel(logging.ERROR)
        td = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        if case == "diffusers-single":
            pipe = StableDiffusionPipeline.from_single_file(
                str(single), config=str(folder), torch_dtype=td, local_files_only=True, safety_checker=None
            )
        else:
            pipe = StableDiffusionPipeline.from_pretrained(
                folder, torch_dtype=td, local_files_only=True, safety_checker=None
            )
        modules = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
    seconds = time.perf_counter() - t0
    rss_loaded, peak_loaded = _rss_now() - base, _peak_rss()
    for m in modules.values():
        tensors += list(m.parameters())
    with torch.no_grad():
        checksum = float(sum(t.float().sum() for t in tensors))  # reads every weight once
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    return {
        "case": case,
        "seconds": seconds,
        "weights_gb": nbytes / GB,
        "rss_loaded_gb": rss_loaded / GB,
        "rss_touched_gb": (_rss_now() - base) / GB,
        "peak_gb": _peak_rss() / GB,
        "peak_loaded_gb": peak_loaded / GB,
        "baseline_gb": base / GB,
        "checksum": checksum,
        "note": note,
    }


# ------------------------------------------------------------------------------------ safetensors readers

READERS = ("sdengine", "safe_open", "load_file")


def ensure_unet_file(root: Path) -> Path:
    """A random SD 1.5 U-Net state dict, fp16, written once by the safetensors library (as files in the wild)."""
    import torch
    from safetensors.torch import save_file

    from sdengine.models.unet import SD15, UNet
    from sdengine.weights.loading import parameters_on_meta

    path = root / "sd15-unet-random-fp16.safetensors"
    if path.is_file():
        return path
    root.mkdir(parents=True, exist_ok=True)
    with parameters_on_meta():
        shapes = {k: v.shape for k, v in UNet(SD15).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.randn(shape, generator=g) * 0.02).half() for k, shape in shapes.items()}
    save_file(sd, str(path), metadata={"format": "pt"})
    return path


def run_reader(case: str, path: Path) -> dict:
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from sdengine.weights.io import load_safetensors

    torch.set_num_threads(1)
    base = _rss_now()
    t0 = time.perf_counter()  # imports are done: only the reading is timed
    if case == "sdengine":
        sd = load_safetensors(path)
    elif case == "safe_open":
        with safe_open(str(path), framework="pt", device="cpu") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    else:
        sd = load_file(str(path))
    t_open = time.perf_counter() - t0
    total = 0.0
    for t in sd.values():
        flat = t.reshape(-1)
        total += float(flat[:: max(4096 // t.element_size(), 1)].float().sum())  # one element per 4 KiB page
    t_ready = time.perf_counter() - t0
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    return {
        "case": case,
        "open_s": t_open,
        "ready_s": t_ready,
        "rss_gb": (_rss_now() - base) / GB,
        "gb": nbytes / GB,
        "n": len(sd),
        "checksum": total,
    }


def reader_benchmark(root: Path, repeats: int) -> None:
    import statistics

    path = ensure_unet_file(root)
    with open(path, "rb") as f:  # warm the page cache once, so every case reads from memory
        while f.read(1 << 24):
            pass
    print(f"file: {path} ({path.stat().st_size / GB:.2f} GB), {repeats} runs per reader, alternated")
    runs: dict[str, list[dict]] = {c: [] for c in READERS}
    for _ in range(repeats):
        for case in READERS:
            cmd = [sys.executable, __file__, "--reader-case", case, "--dir", str(root)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                raise SystemExit(f"{case}: failed\n{res.stderr[-2000:]}")
            runs[case].append(json.loads(res.stdout.strip().splitlines()[-1]))
    sums = {c: runs[c][0]["checksum"] for c in READERS}
    if len({round(v, 3) for v in sums.values()}) != 1:
        raise SystemExit(f"readers disagree on the data: {sums}")
    med = {c: {k: statistics.median(r[k] for r in runs[c]) for k in ("open_s", "ready_s", "rss_gb")} for c in READERS}
    ref = med["safe_open"]
    print(
        f"\n{'reader':10} {'open s':>8} {'ready s':>8} {'RSS GB':>7} {'open vs safe_open':>18} "
        f"{'ready vs safe_open':>19}"
    )
    for c in READERS:
        m = med[c]
        print(
            f"{c:10} {m['open_s']:8.3f} {m['ready_s']:8.3f} {m['rss_gb']:7.2f} {m['open_s'] / ref['open_s']:17.2f}x "
            f"{m['ready_s'] / ref['ready_s']:18.2f}x"
        )
    print("\nratios < 1: faster than safetensors.safe_open measured in the same run (median of the runs)")


# ------------------------------------------------------------------------------------- SDXL single file

SDXL_CASES = ("sdengine", "diffusers")
SDXL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def ensure_sdxl_files(root: Path) -> tuple[Path, Path]:
    """A full-size random SDXL base single file (fp16, sgm layout) and a config-only diffusers folder."""
    import dataclasses

    import torch

    from sdengine.models.clip_text import SD1, SDXL_G, CLIPTextModel, CLIPTextModelWithProjection
    from sdengine.models.unet import UNet
    from sdengine.models.unet_sdxl import SDXL_BASE
    from sdengine.models.vae import SD, AutoencoderKL
    from sdengine.weights.loading import LoadedCheckpoint, parameters_on_meta, save_single_file, write_clip_tokenizer
    from sdengine.weights.sdxl_files import SDXL_SCHEDULER, SDXL_VAE_SCALING_FACTOR

    folder, single = root / "sdxl-base-configs", root / "sdxl-base-random-fp16.safetensors"
    if (folder / "model_index.json").is_file() and single.is_file():
        return folder, single
    vae_cfg = dataclasses.replace(SD, scaling_factor=SDXL_VAE_SCALING_FACTOR, sample_size=1024)
    te2 = {**SDXL_G.to_transformers(), "architectures": ["CLIPTextModelWithProjection"]}
    configs = {
        "unet": SDXL_BASE.to_diffusers(),
        "vae": vae_cfg.to_diffusers(),
        "text_encoder": SD1.to_transformers(),
        "text_encoder_2": te2,
        "scheduler": dict(SDXL_SCHEDULER),
    }
    for comp in SDXL_COMPONENTS:
        _write_json(folder / comp / "config.json", configs[comp])
    _write_json(folder / "scheduler" / "scheduler_config.json", configs["scheduler"])
    write_clip_tokenizer(folder / "tokenizer")
    write_clip_tokenizer(folder / "tokenizer_2", pad="!")
    _write_json(
        folder / "model_index.json",
        {
            "_class_name": "StableDiffusionXLPipeline",
            "_diffusers_version": "0.42.1",
            "force_zeros_for_empty_prompt": True,
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "image_encoder": [None, None],
            "feature_extractor": [None, None],
        },
    )
    factories = {
        "unet": lambda: UNet(SDXL_BASE),
        "vae": lambda: AutoencoderKL(vae_cfg),
        "text_encoder": lambda: CLIPTextModel(SD1),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(SDXL_G),
    }
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    state_dicts = {}
    for comp, factory in factories.items():
        with parameters_on_meta():
            shapes = {k: v.shape for k, v in factory().state_dict().items() if v.is_floating_point()}
        # fp16 values drawn one tensor at a time: the peak is the file's size plus one fp32 temporary
        state_dicts[comp] = {k: (torch.randn(s, generator=g) * 0.02).half() for k, s in shapes.items()}
    ckpt = LoadedCheckpoint(
        source=folder,
        layout="diffusers",
        state_dicts=state_dicts,
        configs=configs,
        prediction_type="epsilon",
        family="sdxl",
    )
    t1 = time.perf_counter()
    save_single_file(ckpt, single)
    print(
        f"drew random fp16 weights in {t1 - t0:.1f} s, wrote {single} ({single.stat().st_size / GB:.2f} GB) "
        f"in {time.perf_counter() - t1:.1f} s",
        flush=True,
    )
    return folder, single


def run_sdxl_case(case: str, folder: Path, single: Path) -> dict:
    import logging

    import torch

    torch.set_num_threads(2)
    t_import = time.perf_counter()  # torch is imported; the engine's own imports are timed apart
    if case == "sdengine":
        import sdengine

        def load():
            return sdengine.load_pipeline(single, device="cpu", dtype="fp16")
    else:
        from diffusers import StableDiffusionXLPipeline

        logging.getLogger("diffusers").setLevel(logging.ERROR)
        logging.getLogger("transformers").setLevel(logging.ERROR)

        def load():
            return StableDiffusionXLPipeline.from_single_file(
                str(single), config=str(folder), torch_dtype=torch.float16, local_files_only=True
            )

    base = _rss_now()
    t0 = time.perf_counter()  # imports are done: only the loading is timed
    import_seconds = t0 - t_import
    pipe = load()
    seconds = time.perf_counter() - t0
    rss_loaded, peak_loaded = _rss_now() - base, _peak_rss()
    tensors = {id(p): p for c in SDXL_COMPONENTS for p in getattr(pipe, c).parameters()}.values()
    dtypes = sorted({str(t.dtype) for t in tensors})
    with torch.no_grad():
        checksum = float(sum(t.float().sum() for t in tensors))  # reads every weight once
    return {
        "case": case,
        "seconds": seconds,
        "import_seconds": import_seconds,
        "total_seconds": import_seconds + seconds,
        "params": sum(t.numel() for t in tensors),
        "dtypes": dtypes,
        "weights_gb": sum(t.numel() * t.element_size() for t in tensors) / GB,
        "rss_loaded_gb": rss_loaded / GB,
        "peak_loaded_gb": peak_loaded / GB,
        "peak_gb": _peak_rss() / GB,
        "baseline_gb": base / GB,
        "checksum": checksum,
    }


def sdxl_benchmark(root: Path, repeats: int, keep: bool) -> None:
    import statistics

    folder, single = ensure_sdxl_files(root)
    try:
        print(f"file: {single} ({single.stat().st_size / GB:.2f} GB fp16), {repeats} runs per engine, alternated")
        print(f"load average at the start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
        runs: dict[str, list[dict]] = {c: [] for c in SDXL_CASES}
        for i in range(repeats):
            for case in SDXL_CASES if i % 2 == 0 else SDXL_CASES[::-1]:
                cmd = [sys.executable, __file__, "--sdxl-case", case, "--dir", str(root)]
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode:
                    raise SystemExit(f"{case}: failed\n{res.stderr[-3000:]}")
                r = json.loads(res.stdout.strip().splitlines()[-1])
                print(
                    f"  run {i + 1} {case:9}: {r['seconds']:6.2f} s (+ import {r['import_seconds']:5.2f} s), "
                    f"peak RSS {r['peak_gb']:5.2f} GB "
                    f"(after loading {r['peak_loaded_gb']:5.2f}), {r['params'] / 1e9:.3f} B parameters {r['dtypes']}",
                    flush=True,
                )
                runs[case].append(r)
    finally:
        if not keep:
            single.unlink(missing_ok=True)
    sums = {c: runs[c][0]["checksum"] for c in SDXL_CASES}
    if abs(sums["sdengine"] - sums["diffusers"]) > 1e-3 * max(1.0, abs(sums["diffusers"])):
        raise SystemExit(f"the engines loaded different weights: checksums {sums}")
    keys = ("seconds", "total_seconds", "peak_loaded_gb", "peak_gb", "baseline_gb")
    med = {c: {k: statistics.median(r[k] for r in runs[c]) for k in keys} for c in SDXL_CASES}
    print(
        f"\n{'engine':10} {'load s':>7} {'import+load s':>14} {'peak RSS loaded GB':>19} {'peak RSS GB':>12} "
        f"{'after imports GB':>17}"
    )
    for c in SDXL_CASES:
        m = med[c]
        print(
            f"{c:10} {m['seconds']:7.2f} {m['total_seconds']:14.2f} {m['peak_loaded_gb']:19.2f} {m['peak_gb']:12.2f} "
            f"{m['baseline_gb']:17.2f}"
        )
    s, d = med["sdengine"], med["diffusers"]
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    print(
        f"\nsdengine / diffusers (median of {repeats}): load time {s['seconds'] / d['seconds']:.2f}x, "
        f"import + load {s['total_seconds'] / d['total_seconds']:.2f}x, "
        f"peak RSS {s['peak_gb'] / d['peak_gb']:.2f}x, peak RSS above the imports "
        f"{(s['peak_gb'] - s['baseline_gb']) / (d['peak_gb'] - d['baseline_gb']):.2f}x"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/sdengine-bench"))
    ap.add_argument("--dtype", default="fp16", choices=("fp16", "fp32", "bf16"))
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--case", help=argparse.SUPPRESS)  # child process mode
    ap.add_argument("--readers", action="store_true", help="compare safetensors readers (see above)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--reader-case", choices=READERS, help=argparse.SUPPRESS)  # child process mode
    ap.add_argument("--sdxl", action="store_true", help="full-size SDXL base single file (see above)")
    ap.add_argument("--keep", action="store_true", help="keep the SDXL file (deleted by default)")
    ap.add_argument("--sdxl-case", choices=SDXL_CASES, help=argparse.SUPPRESS)  # child process mode
    args = ap.parse_args()
    if args.sdxl_case:
        folder, single = args.dir / "sdxl-base-configs", args.dir / "sdxl-base-random-fp16.safetensors"
        print(json.dumps(run_sdxl_case(args.sdxl_case, folder, single)))
        return
    if args.sdxl:
        sdxl_benchmark(args.dir, args.repeats, args.keep)
        return
    if args.reader_case:
        print(json.dumps(run_reader(args.reader_case, args.dir / "sd15-unet-random-fp16.safetensors")))
        return
    if args.readers:
        reader_benchmark(args.dir, args.repeats)
        return
    folder, single = args.dir / f"sd15-random-{args.dtype}", args.dir / f"sd15-random-{args.dtype}.safetensors"
    if args.case:
        print(json.dumps(run_case(args.case, folder, single, args.dtype)))
        return
    folder, single = ensure_files(args.dir, args.dtype)
    print(f"single file: {single} ({single.stat().st_size / GB:.2f} GB, {args.dtype})")
    rows = []
    for case in args.cases:
        cmd = [sys.executable, __file__, "--case", case, "--dir", str(args.dir), "--dtype", args.dtype]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            print(f"{case}: failed\n{res.stderr[-2000:]}")
            continue
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(
        f"\n{'case':22} {'load s':>7} {'weights GB':>10} {'RSS loaded':>10} {'RSS touched':>11} {'peak':>6} "
        f"{'peak/weights':>12}"
    )
    for r in rows:
        print(
            f"{r['case']:22} {r['seconds']:7.2f} {r['weights_gb']:10.2f} {r['rss_loaded_gb']:10.2f} "
            f"{r['rss_touched_gb']:11.2f} {r['peak_gb'] - r['baseline_gb']:6.2f} "
            f"{(r['peak_gb'] - r['baseline_gb']) / r['weights_gb']:12.2f} {r['note']}"
        )
    print("\nRSS columns are above the interpreter's baseline after imports; 'touched' = after reading every weight.")


if __name__ == "__main__":
    main()
