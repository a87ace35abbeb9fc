"""Load-time and memory benchmark: a full-size SD 1.5 checkpoint (random weights), sdengine vs diffusers.

    python benchmarks/load.py [--dir /tmp/sdengine-bench] [--dtype fp16|fp32] [--cases ...]

Creates once (cached in --dir) a full-size random SD 1.5 diffusers folder (UNet 860M, VAE 84M, CLIP-L 123M
parameters; fp16 by default = 2.1 GB, fp32 = 4.3 GB) and the same weights as one LDM single file written by
`sdengine.weights.convert`. Then each case runs in its own subprocess and reports wall time, peak RSS right
after loading, and RSS after every weight has been read once (a checksum over all parameters), against the
size of the weights. Page cache is warm (the files were just written or read), as on a second run.
"""

from __future__ import annotations

import argparse
import json
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
    te_cfg = CLIPTextConfig(hidden_act="quick_gelu", projection_dim=768, hidden_size=768, intermediate_size=3072,
                            num_hidden_layers=12, num_attention_heads=12, bos_token_id=0, eos_token_id=2,
                            pad_token_id=1)
    sd15_unet = dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8)
    sd15_vae = dict(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                    sample_size=512)
    parts = {
        "unet": (lambda: UNet2DConditionModel(**sd15_unet, sample_size=64), "diffusion_pytorch_model"),
        "vae": (lambda: AutoencoderKL(**sd15_vae), "diffusion_pytorch_model"),
        "text_encoder": (lambda: CLIPTextModel(te_cfg), "model"),
    }
    for comp, (factory, stem) in parts.items():
        with parameters_on_meta():
            model = factory()  # shapes and config only; values are drawn below
        sd = {k: (torch.randn(v.shape, generator=g) * 0.02).to(torch_dtype) for k, v in model.state_dict().items()
              if v.is_floating_point()}
        if comp == "text_encoder":
            sd = {f"text_model.{k}": v for k, v in sd.items()}
            model.config.save_pretrained(folder / comp)
        else:
            model.save_config(folder / comp)
        save_safetensors(sd, folder / comp / f"{stem}.safetensors", metadata={"format": "pt"})
        del sd
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                  set_alpha_to_one=False, steps_offset=1).save_pretrained(folder / "scheduler")
    _write_tokenizer(folder / "tokenizer")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False}, indent=2))
    t1 = time.perf_counter()
    convert(folder, single)
    print(f"created {folder} in {t1 - t0:.1f} s; converted to {single.name} in {time.perf_counter() - t1:.1f} s",
          flush=True)
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
            pipe = StableDiffusionPipeline.from_single_file(str(single), config=str(folder), torch_dtype=td,
                                                            local_files_only=True, safety_checker=None)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=td, local_files_only=True,
                                                           safety_checker=None)
        modules = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
    seconds = time.perf_counter() - t0
    rss_loaded, peak_loaded = _rss_now() - base, _peak_rss()
    for m in modules.values():
        tensors += list(m.parameters())
    with torch.no_grad():
        checksum = float(sum(t.float().sum() for t in tensors))  # reads every weight once
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    return {"case": case, "seconds": seconds, "weights_gb": nbytes / GB, "rss_loaded_gb": rss_loaded / GB,
            "rss_touched_gb": (_rss_now() - base) / GB, "peak_gb": _peak_rss() / GB, "peak_loaded_gb": peak_loaded / GB,
            "baseline_gb": base / GB, "checksum": checksum, "note": note}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/sdengine-bench"))
    ap.add_argument("--dtype", default="fp16", choices=("fp16", "fp32", "bf16"))
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--case", help=argparse.SUPPRESS)  # child process mode
    args = ap.parse_args()
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
    print(f"\n{'case':22} {'load s':>7} {'weights GB':>10} {'RSS loaded':>10} {'RSS touched':>11} {'peak':>6} "
          f"{'peak/weights':>12}")
    for r in rows:
        print(f"{r['case']:22} {r['seconds']:7.2f} {r['weights_gb']:10.2f} {r['rss_loaded_gb']:10.2f} "
              f"{r['rss_touched_gb']:11.2f} {r['peak_gb'] - r['baseline_gb']:6.2f} "
              f"{(r['peak_gb'] - r['baseline_gb']) / r['weights_gb']:12.2f} {r['note']}")
    print("\nRSS columns are above the interpreter's baseline after imports; 'touched' = after reading every weight.")


if __name__ == "__main__":
    main()
