"""LoRAs on FLUX.2 [klein] against diffusers, on the tiny random klein folder of ``tests/_flux2_models.py``.

One random LoRA on every Linear of the transformer (the blocks' attention and SwiGLU MLPs, the single blocks' fused
projections, the shared modulations, the embedders, the final layer) written in the layouts FLUX.2 LoRAs come in:
diffusers / PEFT (``transformer.<module>.lora_A.weight``), ai-toolkit (BFL's names behind ``diffusion_model.``,
``lora_A`` / ``lora_B``) and kohya (``lora_unet_double_blocks_0_img_attn_qkv``, ``alpha``), each against diffusers'
``Flux2KleinPipeline.load_lora_weights`` on the layers its conversion reads; and ComfyUI's (BFL's names behind
``diffusion_model.`` with ``lora_down`` / ``lora_up`` / ``alpha``, every layer, the final modulation's (shift, scale)
halves swapped) against the same LoRA in diffusers' names.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _flux2_models import diffusers_klein_folder, make_klein_folder  # noqa: E402
from sdengine.weights.io import save_safetensors  # noqa: E402
from sdengine.weights.lora import LoRAFileError, apply_loras  # noqa: E402

TOL = 1e-4  # mean absolute difference on 0..1 pixels (fp32, CPU)
PROMPT = "a red apple on a table"  # the negative: empty, as diffusers' klein pipeline (it takes no text for it)
SEED, STEPS, W, H, CFG = 3, 3, 32, 48, 3.0
RANK, ALPHA = 4, 2.0

_DOUBLE = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
}
_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
# the layers diffusers' kohya conversion for FLUX.2 reads (no modulations, no final modulation)
_KOHYA_SKIPS = ("modulation", "norm_out")


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    folder = make_klein_folder(tmp_path_factory.mktemp("kleinlora") / "klein-tiny", seed=5)
    return folder, sdengine.load_pipeline(folder, device="cpu")


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def _pairs(model: torch.nn.Module, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A random (down, up) for every Linear of the transformer; q, k and v of a block share ``down`` (so that the
    fused qkv of BFL's names is the same LoRA)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        shared = name
        for p in ("to_k", "to_v"):
            shared = shared.replace(f".attn.{p}", ".attn.to_q")
        for p in ("add_k_proj", "add_v_proj"):
            shared = shared.replace(f".attn.{p}", ".attn.add_q_proj")
        down = out[shared][0] if shared != name and shared in out else None
        if down is None:
            down = torch.randn(RANK, m.in_features, generator=g) * 0.3 / m.in_features**0.5
        out[name] = (down, torch.randn(m.out_features, RANK, generator=g) * 0.3)
    return out


def _bfl(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The same LoRA on BFL's layers: q, k, v fused (ups stacked), the final modulation's halves swapped."""
    out = {}
    for name, (down, up) in pairs.items():
        if name.startswith("transformer_blocks."):
            _, n, rest = name.split(".", 2)
            if rest in ("attn.to_q", "attn.add_q_proj"):
                names = ("to_q", "to_k", "to_v") if rest == "attn.to_q" else ("add_q_proj", "add_k_proj", "add_v_proj")
                kind = "img" if rest == "attn.to_q" else "txt"
                out[f"double_blocks.{n}.{kind}_attn.qkv"] = (down, torch.cat([pairs[f"{name[: -len(rest)]}attn.{x}"][1]
                                                                             for x in names]))  # fmt: skip
            elif rest in _DOUBLE:
                out[f"double_blocks.{n}.{_DOUBLE[rest]}"] = (down, up)
        elif name.startswith("single_transformer_blocks."):
            _, n, rest = name.split(".", 2)
            out[f"single_blocks.{n}.{'linear1' if rest == 'attn.to_qkv_mlp_proj' else 'linear2'}"] = (down, up)
        elif name == "norm_out.linear":
            scale, shift = up.chunk(2)
            out[_TOP[name]] = (down, torch.cat([shift, scale]))
        else:
            out[_TOP[name]] = (down, up)
    return out


def _layout(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], layout: str) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    alpha = torch.tensor(ALPHA)
    if layout == "diffusers":
        for name, (down, up) in pairs.items():
            sd[f"transformer.{name}.lora_A.weight"], sd[f"transformer.{name}.lora_B.weight"] = down, up * (ALPHA / RANK)
    elif layout == "ai_toolkit":
        for name, (down, up) in _bfl(pairs).items():
            sd[f"diffusion_model.{name}.lora_A.weight"] = down
            sd[f"diffusion_model.{name}.lora_B.weight"] = up * (ALPHA / RANK)
    elif layout == "kohya":
        for name, (down, up) in _bfl(pairs).items():
            k = "lora_unet_" + name.replace(".", "_")
            sd[f"{k}.lora_down.weight"], sd[f"{k}.lora_up.weight"], sd[f"{k}.alpha"] = down, up, alpha
    else:  # ComfyUI's
        for name, (down, up) in _bfl(pairs).items():
            k = f"diffusion_model.{name}"
            sd[f"{k}.lora_down.weight"], sd[f"{k}.lora_up.weight"], sd[f"{k}.alpha"] = down, up, alpha
    return {k: v.contiguous() for k, v in sd.items()}


def _write(sd: dict[str, torch.Tensor], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(sd, path)
    return path


def _ours(pipe, prompt: str = PROMPT, **kw) -> np.ndarray:
    args = dict(negative_prompt="", cfg_scale=CFG, steps=STEPS, seed=SEED, width=W, height=H)
    return pipe(prompt, progress=False, **{**args, **kw}).arrays


def _theirs(ref) -> np.ndarray:
    with torch.no_grad():
        return ref(prompt=PROMPT, guidance_scale=CFG, height=H, width=W,
                   num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED),
                   output_type="np").images  # fmt: skip


def test_layouts_match_diffusers_load_lora_weights(klein, tmp_path):
    folder, pipe = klein
    oracle = diffusers_klein_folder(folder)
    pairs = _pairs(pipe.transformer, seed=11)
    plain = _ours(pipe)
    np.testing.assert_allclose(plain, _theirs(oracle), atol=1e-4)  # the same model without LoRAs
    kohya_pairs = {k: v for k, v in pairs.items() if not any(s in k for s in _KOHYA_SKIPS)}
    # diffusers' conversion of BFL's names copies the final modulation without swapping its halves (the model
    # file's conversion swaps them): compared without it here, with it against diffusers' names below
    toolkit_pairs = {k: v for k, v in pairs.items() if k != "norm_out.linear"}
    images = {}
    for layout, chosen in (("diffusers", pairs), ("ai_toolkit", toolkit_pairs), ("kohya", kohya_pairs)):
        path = _write(_layout(chosen, layout), tmp_path / f"{layout}.safetensors")
        images[layout] = _ours(pipe, loras=[(path, 0.8)])
        with apply_loras(pipe.transformer, pipe.text_encoder, [(path, 1.0)]) as h:
            assert h.reports[0].complete, h.reports[0].summary()
        oracle.load_lora_weights(_layout(chosen, layout), adapter_name=layout)
        oracle.set_adapters([layout], [0.8])
        theirs = _theirs(oracle)
        oracle.delete_adapters(layout)
        diff = np.abs(images[layout] - theirs)
        print(f"FLUX.2 LoRA ({layout}) vs diffusers load_lora_weights: mean {diff.mean():.2e}, max {diff.max():.2e}")
        assert _mad(images[layout], theirs) < TOL, layout
        assert _mad(images[layout], plain) > 1e-3, layout  # the LoRA acts
    comfy = _write(_layout(pairs, "comfy"), tmp_path / "comfy.safetensors")
    with apply_loras(pipe.transformer, pipe.text_encoder, [(comfy, 1.0)]) as h:
        assert h.reports[0].complete and len(h.reports[0].matched) == len(pairs), h.reports[0].summary()
    assert _mad(_ours(pipe, loras=[(comfy, 0.8)]), images["diffusers"]) < 1e-6
    np.testing.assert_array_equal(_ours(pipe), plain)  # removed after the call
    tagged = _ours(pipe, prompt=f"{PROMPT} <lora:diffusers:0.8>", lora_dir=tmp_path)
    np.testing.assert_allclose(tagged, images["diffusers"], atol=1e-6)


def test_other_families_loras_are_refused(klein, tmp_path):
    _, pipe = klein
    pairs = _pairs(pipe.transformer, seed=12)
    flux1 = _write({"diffusion_model.double_blocks.0.img_mod.lin.lora_down.weight": torch.zeros(4, 32),
                    "diffusion_model.double_blocks.0.img_mod.lin.lora_up.weight": torch.zeros(192, 4)},
                   tmp_path / "flux1.safetensors")  # fmt: skip
    z = _write({"diffusion_model.layers.0.attention.qkv.lora_down.weight": torch.zeros(4, 32),
                "diffusion_model.layers.0.attention.qkv.lora_up.weight": torch.zeros(96, 4)},
               tmp_path / "z.safetensors")  # fmt: skip
    te = _write({**_layout(pairs, "kohya"), "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight":
                 torch.zeros(4, 48), "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight":
                 torch.zeros(48, 4)}, tmp_path / "te.safetensors")  # fmt: skip
    for path, why in (
        (flux1, "a LoRA for Flux.1: it adapts diffusion_model.double_blocks.0.img_mod.lin"),
        (z, "a LoRA for Z-Image; the model is FLUX.2"),
        (te, "adapts a text encoder"),
    ):
        with pytest.raises(LoRAFileError, match=why) as e:
            _ours(pipe, loras=[(path, 1.0)])
        assert "\n" not in str(e.value)
    # a FLUX.2 LoRA on FLUX.1's transformer
    from sdengine.models.flux import FluxConfig, FluxTransformer

    other = FluxTransformer(FluxConfig(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                       in_channels=16, joint_attention_dim=32, pooled_projection_dim=24,
                                       axes_dims_rope=(4, 6, 6))).eval()  # fmt: skip
    flux2 = _write(_layout(pairs, "comfy"), tmp_path / "flux2.safetensors")
    with pytest.raises(LoRAFileError, match="a LoRA for FLUX.2; the model is Flux.1"):
        with apply_loras(other, None, [(flux2, 1.0)]):
            pass
