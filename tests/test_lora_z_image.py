"""LoRAs on Z-Image against diffusers, on the tiny random Z-Image folder of ``tests/_z_image_models.py``.

One random LoRA on every Linear of the transformer's blocks and final layer (attention q/k/v/out, SwiGLU w1/w2/w3,
the modulation, the final linear and its modulation) written in the layouts Z-Image LoRAs come in: diffusers / PEFT
(``transformer.<module>.lora_A.weight``), ai-toolkit (``diffusion_model.<module>``, ``lora_A`` / ``lora_B``) and
kohya-style (``lora_unet_`` with underscores, ``alpha``; musubi-tuner), against diffusers'
``ZImagePipeline.load_lora_weights``; and ComfyUI's original layout (``diffusion_model.layers.N.attention.qkv`` fused,
``attention.out``, ``final_layer``), which diffusers' loader does not split, against the same LoRA unfused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("peft")

import sdengine  # noqa: E402
from _z_image_models import diffusers_z, make_z_folder  # noqa: E402
from sdengine.weights.io import save_safetensors  # noqa: E402
from sdengine.weights.lora import LoRAFileError, apply_loras  # noqa: E402

TOL = 1e-4  # mean absolute difference on 0..1 pixels (fp32, CPU)
PROMPT, NEGATIVE = "a red apple on a table", "blurry"
SEED, STEPS, SIZE, CFG = 3, 3, 32, 3.0
RANK, ALPHA = 4, 2.0


@pytest.fixture(scope="module")
def zimage(tmp_path_factory):
    folder = make_z_folder(tmp_path_factory.mktemp("zlora") / "z-image-tiny")
    return folder, sdengine.load_pipeline(folder, device="cpu")


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def _pairs(model: torch.nn.Module, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A random (down, up) for every Linear of the blocks and the final layer; q, k and v of a block share ``down``
    (so that the fused qkv layer of the original layout is the same LoRA)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or not name.startswith(("layers.", "noise_refiner.", "context_refiner.",
                                                                      "all_final_layer.")):  # fmt: skip
            continue
        shared = name.replace(".to_k", ".to_q").replace(".to_v", ".to_q")
        down = out[shared][0] if shared != name and shared in out else None
        if down is None:
            down = torch.randn(RANK, m.in_features, generator=g) * 0.3 / m.in_features**0.5
        out[name] = (down, torch.randn(m.out_features, RANK, generator=g) * 0.3)
    return out


def _layout(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], layout: str) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    alpha = torch.tensor(ALPHA)
    for name, (down, up) in pairs.items():
        if layout == "diffusers":
            sd[f"transformer.{name}.lora_A.weight"], sd[f"transformer.{name}.lora_B.weight"] = down, up * (ALPHA / RANK)
        elif layout == "ai_toolkit":
            sd[f"diffusion_model.{name}.lora_A.weight"] = down
            sd[f"diffusion_model.{name}.lora_B.weight"] = up * (ALPHA / RANK)
        elif layout == "kohya":
            k = "lora_unet_" + name.replace(".", "_")
            sd[f"{k}.lora_down.weight"], sd[f"{k}.lora_up.weight"], sd[f"{k}.alpha"] = down, up, alpha
        else:  # ComfyUI's original names: q, k, v fused, out, final_layer
            if ".attention.to_k" in name or ".attention.to_v" in name:
                continue
            if ".attention.to_q" in name:
                base = name.removesuffix(".to_q")
                ups = [pairs[f"{base}.to_{p}"][1] for p in "qkv"]
                k, up = f"diffusion_model.{base}.qkv", torch.cat(ups)
            else:
                k = "diffusion_model." + name.replace(".attention.to_out.0", ".attention.out").replace(
                    "all_final_layer.2-1.", "final_layer."
                )
            sd[f"{k}.lora_down.weight"], sd[f"{k}.lora_up.weight"], sd[f"{k}.alpha"] = down, up, alpha
    return {k: v.contiguous() for k, v in sd.items()}


def _write(sd: dict[str, torch.Tensor], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(sd, path)
    return path


def _ours(pipe, prompt: str = PROMPT, **kw) -> np.ndarray:
    args = dict(negative_prompt=NEGATIVE, cfg_scale=CFG, steps=STEPS, seed=SEED, width=SIZE, height=SIZE)
    return pipe(prompt, progress=False, **{**args, **kw}).arrays


def _theirs(ref) -> np.ndarray:
    with torch.no_grad():
        return ref(PROMPT, negative_prompt=NEGATIVE, guidance_scale=CFG - 1, height=SIZE, width=SIZE,
                   num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED),
                   output_type="np").images  # fmt: skip


def test_layouts_match_diffusers_load_lora_weights(zimage, tmp_path):
    folder, pipe = zimage
    oracle = diffusers_z(folder)
    pairs = _pairs(pipe.transformer, seed=11)
    plain = _ours(pipe)
    images = {}
    for layout in ("diffusers", "ai_toolkit", "kohya", "comfy"):
        path = _write(_layout(pairs, layout), tmp_path / f"{layout}.safetensors")
        images[layout] = _ours(pipe, loras=[(path, 0.8)])
        with apply_loras(pipe.transformer, pipe.text_encoder, [(path, 1.0)]) as h:
            assert h.reports[0].complete and len(h.reports[0].matched) == len(pairs), h.reports[0].summary()
        if layout == "comfy":  # diffusers' loader does not split the fused qkv
            continue
        oracle.load_lora_weights(_layout(pairs, layout), adapter_name=layout)
        oracle.set_adapters([layout], [0.8])
        theirs = _theirs(oracle)
        oracle.delete_adapters(layout)
        diff = np.abs(images[layout] - theirs)
        print(f"z-image LoRA ({layout}) vs diffusers load_lora_weights: mean {diff.mean():.2e}, max {diff.max():.2e}")
        assert _mad(images[layout], theirs) < TOL, layout
    assert _mad(images["diffusers"], plain) > 1e-3  # the LoRA acts
    for layout in ("ai_toolkit", "kohya", "comfy"):
        assert _mad(images[layout], images["diffusers"]) < 1e-6, layout
    np.testing.assert_array_equal(_ours(pipe), plain)  # removed after the call
    tagged = _ours(pipe, prompt=f"{PROMPT} <lora:diffusers:0.8>", lora_dir=tmp_path)
    np.testing.assert_allclose(tagged, images["diffusers"], atol=1e-6)


def test_other_families_loras_are_refused(zimage, tmp_path):
    _, pipe = zimage
    pairs = _pairs(pipe.transformer, seed=12)
    flux = _write({"diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight": torch.zeros(4, 64),
                   "diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight": torch.zeros(192, 4)},
                  tmp_path / "flux.safetensors")  # fmt: skip
    te = _write({**_layout(pairs, "kohya"), "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight":
                 torch.zeros(4, 48), "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight":
                 torch.zeros(48, 4)}, tmp_path / "te.safetensors")  # fmt: skip
    for path, why in ((flux, "a LoRA for Flux.1; the model is Z-Image"), (te, "adapts a text encoder")):
        with pytest.raises(LoRAFileError, match=why) as e:
            _ours(pipe, loras=[(path, 1.0)])
        assert "\n" not in str(e.value)
    # a Z-Image LoRA on another diffusion transformer
    from sdengine.models.flux import FluxConfig, FluxTransformer

    other = FluxTransformer(FluxConfig(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                       in_channels=16, joint_attention_dim=32, pooled_projection_dim=24,
                                       axes_dims_rope=(4, 6, 6))).eval()  # fmt: skip
    z = _write(_layout(pairs, "comfy"), tmp_path / "z.safetensors")
    with pytest.raises(LoRAFileError, match="a LoRA for Z-Image; the model is Flux.1"):
        with apply_loras(other, None, [(z, 1.0)]):
            pass
