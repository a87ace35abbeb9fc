"""LoRAs on the diffusion transformers (SD3's MMDiT, Flux.1's transformer) against diffusers, on tiny random models.

Oracles: diffusers' own LoRA loaders where they read the format -- ``load_lora_adapter`` for diffusers/PEFT names,
``FluxLoraLoaderMixin.lora_state_dict`` (its kohya / ComfyUI converter: fused projections split, the final
modulation swapped) for kohya's and BFL's names -- and, for SD3's Stability names (which diffusers' LoRA loader does
not read), the LoRA merged into the model's Stability-layout weights, which diffusers' single-file converter then
splits. Outputs agree within 1e-4 (float32); fused equals patched, unfuse restores every weight bit for bit.
"""

from __future__ import annotations

import dataclasses
import re
import types
from pathlib import Path

import pytest
import torch

from sdengine.models.clip_text import CLIPTextConfig, CLIPTextModel
from sdengine.models.flux import FluxConfig, FluxTransformer
from sdengine.models.mmdit import TINY_MMDIT, MMDiT
from sdengine.weights.flux_file import diffusers_to_bfl
from sdengine.weights.io import save_safetensors
from sdengine.weights.lora import LoRAError, LoRAFile, apply_loras
from sdengine.weights.lora_dit_keys import FLUX_FAMILY, SD3_FAMILY, dit_routes
from sdengine.weights.mmdit_file import sdengine_to_stability

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

TOL = 1e-4
RANK = 4
FLUX = FluxConfig(
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=24,
    axes_dims_rope=(4, 6, 6),
    guidance_embeds=True,
)
SD3 = TINY_MMDIT  # qk norm, MMDiT-X's second attention in block 0, a pre-only last block


def _kwargs(cfg) -> dict:
    return {k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):  # norm scales
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)


def flux_pair(seed: int = 0):
    ref = diffusers.FluxTransformer2DModel(**_kwargs(FLUX)).eval()
    _randomize(ref, seed)
    ours = FluxTransformer(FLUX).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def sd3_pair(seed: int = 0):
    ref = diffusers.SD3Transformer2DModel(**_kwargs(SD3)).eval()
    _randomize(ref, seed)
    ours = MMDiT(SD3).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def run_flux(model: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    latent = torch.randn(2, FLUX.latent_channels, 6, 4, generator=g)
    context = torch.randn(2, 5, FLUX.joint_attention_dim, generator=g)
    pooled = torch.randn(2, FLUX.pooled_projection_dim, generator=g)
    t, guidance = torch.tensor([875.0, 250.0]), torch.tensor([3.5, 2.0])
    with torch.no_grad():
        if isinstance(model, FluxTransformer):
            return model(latent, t, context, pooled, guidance)
        B, C, H, W = latent.shape
        pack = diffusers.FluxPipeline._pack_latents
        ids = diffusers.FluxPipeline._prepare_latent_image_ids(B, H // 2, W // 2, "cpu", torch.float32)
        out = model(
            hidden_states=pack(latent, B, C, H, W),
            encoder_hidden_states=context,
            pooled_projections=pooled,
            timestep=t / 1000,
            img_ids=ids,
            txt_ids=torch.zeros(5, 3),
            guidance=guidance,
            return_dict=False,
        )[0]
        return diffusers.FluxPipeline._unpack_latents(out, H * 8, W * 8, 8)


def run_sd3(model: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, SD3.in_channels, 6, 10, generator=g)
    t = torch.tensor([700.0, 120.0])
    ctx = torch.randn(2, 5, SD3.joint_attention_dim, generator=g)
    pooled = torch.randn(2, SD3.pooled_projection_dim, generator=g)
    with torch.no_grad():
        if isinstance(model, MMDiT):
            return model(x, t, ctx, pooled)
        return model(x, ctx, pooled, t).sample


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _pair(g: torch.Generator, out: int, inp: int, kernel: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    down = torch.randn(RANK, inp, *kernel, generator=g) * 0.4 / (inp * max(1, len(kernel))) ** 0.5
    up = torch.randn(out, RANK, *(1 for _ in kernel), generator=g) * 0.4 / RANK**0.5
    return down, up


def peft_lora(ref: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """diffusers/PEFT names: ``transformer.<module>.lora_A/lora_B.weight`` on every Linear/Conv2d (alpha = rank)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in ref.named_modules():
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d):
            kernel = tuple(m.kernel_size) if isinstance(m, torch.nn.Conv2d) else ()
            down, up = _pair(g, m.weight.shape[0], m.weight.shape[1], kernel)
            sd[f"transformer.{name}.lora_A.weight"], sd[f"transformer.{name}.lora_B.weight"] = down, up
    return sd


def native_layers(native_sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """The original layout's adaptable layers (name -> weight shape): 2-d and 4-d weights, not norms."""
    return {
        k[: -len(".weight")]: tuple(v.shape) for k, v in native_sd.items() if k.endswith(".weight") and v.ndim in (2, 4)
    }


def native_lora(layers: dict[str, tuple[int, ...]], seed: int, style: str, alpha: float = 2.0) -> dict:
    """A random LoRA on the original layout's layers, named kohya's way (``lora_unet_<name_with_underscores>``,
    ``.alpha``), ComfyUI's (``diffusion_model.<name>.lora_down``, ``.alpha``) or PEFT's on BFL names
    (``diffusion_model.<name>.lora_A``, alpha = rank). The final layer gets no alpha (diffusers ignores it there)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for name, shape in layers.items():
        down, up = _pair(g, shape[0], shape[1], shape[2:])
        if style == "kohya":
            base, d, u = "lora_unet_" + name.replace(".", "_"), "lora_down.weight", "lora_up.weight"
        elif style == "comfy":
            base, d, u = "diffusion_model." + name, "lora_down.weight", "lora_up.weight"
        else:
            base, d, u = "diffusion_model." + name, "lora_A.weight", "lora_B.weight"
        sd[f"{base}.{d}"], sd[f"{base}.{u}"] = down, up
        if style != "peft" and not name.startswith("final_layer"):
            sd[f"{base}.alpha"] = torch.tensor(alpha)
    return sd


def _kohya_converter(hidden: int):
    """diffusers' ``_convert_kohya_flux_lora_to_diffusers`` with FLUX.1's width written into it (3072, 12288 rows
    of a single block's linear1) replaced by the tiny model's: nothing else changes."""
    from diffusers.loaders import lora_conversion_utils as lcu

    sizes = {3072: hidden, 12288: 4 * hidden}

    def fix(code: types.CodeType) -> types.CodeType:
        consts = []
        for c in code.co_consts:
            if isinstance(c, types.CodeType):
                c = fix(c)
            elif type(c) is int:
                c = sizes.get(c, c)
            elif isinstance(c, tuple) and any(type(x) is int and x in sizes for x in c):
                c = tuple(sizes.get(x, x) for x in c)
            consts.append(c)
        return code.replace(co_consts=tuple(consts))

    f = lcu._convert_kohya_flux_lora_to_diffusers
    return types.FunctionType(fix(f.__code__), f.__globals__, f.__name__, f.__defaults__, f.__closure__)


def diffusers_flux_lora(ref, sd: dict, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Load a Flux LoRA file's tensors into diffusers' model the way FluxPipeline.load_lora_weights does: its
    lora_state_dict converts kohya/ComfyUI names. (Its kohya converter leaves the non-block layers -- x_embedder,
    norm_out, ... -- without the ``transformer.`` prefix, so load_lora_adapter would skip them: the prefix is added.)"""
    from diffusers.loaders import lora_pipeline

    monkeypatch.setattr(lora_pipeline, "_convert_kohya_flux_lora_to_diffusers", _kohya_converter(FLUX.hidden_size))
    if any(".lora_A." in k for k in sd) and any(k.startswith("diffusion_model.") for k in sd):
        # BFL names with PEFT's part names: diffusers reads BFL names through its kohya/ComfyUI path
        sd = {k.replace(".lora_A.", ".lora_down.").replace(".lora_B.", ".lora_up."): v for k, v in sd.items()}
    conv = lora_pipeline.FluxLoraLoaderMixin.lora_state_dict(dict(sd))
    conv = {k if k.startswith(("transformer.", "text_encoder.")) else f"transformer.{k}": v for k, v in conv.items()}
    ref.load_lora_adapter(conv, prefix="transformer", adapter_name=name)


def write(tmp: Path, name: str, sd: dict) -> Path:
    path = tmp / f"{name}.safetensors"
    save_safetensors(sd, path)
    return path


# ------------------------------------------------------------------------------------------------------ Flux


FLUX_STYLES = ["peft", "kohya", "comfy", "bfl_peft"]


def flux_lora(ref, style: str, seed: int) -> dict:
    if style == "peft":
        return peft_lora(ref, seed)
    return native_lora(native_layers(diffusers_to_bfl(ref.state_dict())), seed, style.removeprefix("bfl_"))


@pytest.mark.parametrize("style", FLUX_STYLES)
def test_flux_lora_matches_diffusers(style: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref, ours = flux_pair()
    base = run_flux(ours)
    assert err(base, run_flux(ref)) < 1e-5
    sd = flux_lora(ref, style, seed=5)
    path = write(tmp_path, style, sd)
    if style == "peft":
        ref.load_lora_adapter(dict(sd), prefix="transformer", adapter_name="a")
    else:
        diffusers_flux_lora(ref, sd, "a", monkeypatch)
    want = run_flux(ref)
    with apply_loras(ours, None, [(path, 1.0)]) as h:
        rep = h.reports[0]
        got = run_flux(ours)
    assert rep.complete and not rep.unmatched
    # every Linear of the model is adapted (the fused layers of the file split onto q, k, v and the MLP)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in ours.modules())
    assert len(rep.matched) == n_linear
    assert err(want, base) > 1e-2  # the LoRA acts
    assert err(got, want) < TOL, err(got, want)
    assert torch.equal(run_flux(ours), base)  # removed: the model as it was


def test_flux_kohya_weights_stack_fuse_and_unfuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref, ours = flux_pair(seed=2)
    a, b = flux_lora(ref, "kohya", seed=7), flux_lora(ref, "peft", seed=8)
    diffusers_flux_lora(ref, a, "a", monkeypatch)
    ref.load_lora_adapter(dict(b), prefix="transformer", adapter_name="b")
    ref.set_adapters(["a", "b"], [0.7, -0.5])
    want = run_flux(ref)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    ptrs = {k: v.data_ptr() for k, v in ours.state_dict().items()}
    h = apply_loras(ours, None, [(write(tmp_path, "a", a), 0.7), (write(tmp_path, "b", b), -0.5)])
    patched = run_flux(ours)
    assert err(patched, want) < TOL, err(patched, want)
    h.fuse()
    fused = run_flux(ours)
    assert err(fused, patched) < 1e-5
    assert (
        ours.state_dict()["single_transformer_blocks.0.proj_mlp.weight"].data_ptr()
        != ptrs["single_transformer_blocks.0.proj_mlp.weight"]
    )
    h.set_weight(1, 0.0)  # recomputed from the originals while fused: only the kohya file at 0.7 now
    ref.set_adapters(["a", "b"], [0.7, 0.0])
    assert err(run_flux(ours), run_flux(ref)) < TOL
    h.unfuse()
    h.remove()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]) and v.data_ptr() == ptrs[k], k


def test_flux_xlabs_lora_matches_diffusers(tmp_path: Path) -> None:
    """XLabs' processor LoRAs (``double_blocks.<i>.processor.qkv_lora1/2``, ``proj_lora1/2``, a single block's
    ``qkv_lora``), read by diffusers' own XLabs converter."""
    from diffusers.loaders import lora_pipeline

    ref, ours = flux_pair(seed=5)
    d = FLUX.hidden_size
    g = torch.Generator().manual_seed(11)
    sd = {}
    for i in range(FLUX.num_layers):
        for part, rows in (("qkv_lora1", 3 * d), ("qkv_lora2", 3 * d), ("proj_lora1", d), ("proj_lora2", d)):
            down, up = _pair(g, rows, d)
            (
                sd[f"double_blocks.{i}.processor.{part}.down.weight"],
                sd[f"double_blocks.{i}.processor.{part}.up.weight"],
            ) = (
                down,
                up,
            )
    down, up = _pair(g, 3 * d, d)
    sd["single_blocks.1.processor.qkv_lora.down.weight"], sd["single_blocks.1.processor.qkv_lora.up.weight"] = down, up
    conv = lora_pipeline.FluxLoraLoaderMixin.lora_state_dict(dict(sd))
    ref.load_lora_adapter(conv, prefix="transformer", adapter_name="x")
    want = run_flux(ref)
    with apply_loras(ours, None, [(write(tmp_path, "xlabs", sd), 1.0)]) as h:
        rep = h.reports[0]
        got = run_flux(ours)
    assert rep.complete and len(rep.matched) == FLUX.num_layers * 8 + 3
    assert err(want, run_flux(ours)) > 1e-2
    assert err(got, want) < TOL, err(got, want)


def test_flux_split_rows_follow_diffusers_routes() -> None:
    """The routes of the fused and swapped layers: q, k, v (and the MLP) take consecutive row blocks of up;
    the final modulation's halves swap."""
    _, ours = flux_pair()
    d = FLUX.hidden_size
    routes = dit_routes(ours)
    linear1 = routes["lora_unet_single_blocks_1_linear1"]
    assert [(r.target, r.rows) for r in linear1] == [
        ("single_transformer_blocks.1.attn.to_q", ((0, d),)),
        ("single_transformer_blocks.1.attn.to_k", ((d, 2 * d),)),
        ("single_transformer_blocks.1.attn.to_v", ((2 * d, 3 * d),)),
        ("single_transformer_blocks.1.proj_mlp", ((3 * d, 7 * d),)),
    ]
    assert routes["diffusion_model.final_layer.adaLN_modulation.1"][0].rows == ((d, 2 * d), (0, d))
    assert routes["transformer.transformer_blocks.0.attn.to_q"][0].rows == ()
    assert (
        routes["lora_transformer_single_transformer_blocks_0_attn_to_q"]
        == routes["transformer.single_transformer_blocks.0.attn.to_q"]
    )


def test_flux_full_and_bias_differences_split_by_rows(tmp_path: Path) -> None:
    """ComfyUI's whole-weight (``diff``) and bias (``diff_b``) differences on BFL's fused qkv and swapped final
    modulation: the same model as the differences added to the BFL-layout weights and converted."""
    from sdengine.weights.flux_file import bfl_to_diffusers

    ref, ours = flux_pair(seed=4)
    bfl = diffusers_to_bfl(ref.state_dict())
    g = torch.Generator().manual_seed(9)
    sd, merged = {}, dict(bfl)
    for name in ("double_blocks.0.img_attn.qkv", "single_blocks.1.linear1", "final_layer.adaLN_modulation.1"):
        w, b = bfl[f"{name}.weight"], bfl[f"{name}.bias"]
        dw, db = 0.05 * torch.randn(w.shape, generator=g), 0.05 * torch.randn(b.shape, generator=g)
        sd[f"diffusion_model.{name}.diff"], sd[f"diffusion_model.{name}.diff_b"] = dw, db
        merged[f"{name}.weight"], merged[f"{name}.bias"] = w + 0.6 * dw, b + 0.6 * db
    want_model = FluxTransformer(FLUX).eval()
    want_model.load_state_dict(bfl_to_diffusers(merged), strict=True)
    want = run_flux(want_model)
    with apply_loras(ours, None, [(write(tmp_path, "diff", sd), 0.6)]) as h:
        assert h.reports[0].complete and len(h.reports[0].matched) == 3 + 4 + 1
        got = run_flux(ours)
        h.fuse()
        fused = run_flux(ours)
    assert err(got, want) < TOL and err(fused, want) < TOL
    assert err(want, run_flux(ours)) > 1e-3


def test_flux_lycoris_on_one_to_one_layer(tmp_path: Path) -> None:
    """A LoKr layer on a layer both layouts have as one module (``img_attn.proj`` = ``attn.to_out.0``) applies:
    the model equals the base with ``kron(w1, w2) * alpha / rank`` added to that weight."""
    ref, ours = flux_pair(seed=6)
    d = FLUX.hidden_size
    g = torch.Generator().manual_seed(3)
    w1, w2 = torch.randn(4, 4, generator=g), 0.05 * torch.randn(d // 4, d // 4, generator=g)
    key = "lora_unet_double_blocks_1_img_attn_proj"
    sd = {f"{key}.lokr_w1": w1, f"{key}.lokr_w2": w2}
    want_model = FluxTransformer(FLUX).eval()
    want_sd = ref.state_dict()
    want_sd["transformer_blocks.1.attn.to_out.0.weight"] = want_sd[
        "transformer_blocks.1.attn.to_out.0.weight"
    ] + 0.8 * torch.kron(w1, w2)
    want_model.load_state_dict(want_sd)
    with apply_loras(ours, None, [(write(tmp_path, "lokr", sd), 0.8)]) as h:
        assert h.reports[0].matched == ["unet:transformer_blocks.1.attn.to_out.0"]
        assert h.reports[0].algorithms == ["LoKr"]
        got = run_flux(ours)
    assert err(got, run_flux(want_model)) < TOL


def test_flux_loha_and_lokr_on_fused_and_swapped_layers(tmp_path: Path) -> None:
    """LoKr and LoHa on BFL's fused ``img_attn.qkv`` / ``linear1`` and on the (shift, scale) final modulation: each
    part of the model takes its rows of the update; the same model as the update added to the BFL-layout weights
    (``kron(w1, w2)``, ``(w1a w1b) * (w2a w2b)``, times alpha / rank) and converted. Patched, fused, removed."""
    from sdengine.weights.flux_file import bfl_to_diffusers

    ref, ours = flux_pair(seed=8)
    d = FLUX.hidden_size
    bfl = diffusers_to_bfl(ref.state_dict())
    merged = dict(bfl)
    g = torch.Generator().manual_seed(12)
    sd: dict[str, torch.Tensor] = {}
    w = 0.7
    # LoKr: w1 (a, c) x w2 (b, e) = (a b, c e); whole w2, no alpha (scale 1)
    for name, rows_a in (("double_blocks.1.img_attn.qkv", 3), ("single_blocks.0.linear1", 7)):
        k = "lora_unet_" + name.replace(".", "_")
        w1, w2 = torch.randn(rows_a, 4, generator=g), 0.05 * torch.randn(d, d // 4, generator=g)
        sd[f"{k}.lokr_w1"], sd[f"{k}.lokr_w2"] = w1, w2
        merged[f"{name}.weight"] = merged[f"{name}.weight"] + w * torch.kron(w1, w2)
    # LoHa (rank 2, alpha 1: scale 0.5) on the final modulation, whose halves swap
    name, k = "final_layer.adaLN_modulation.1", "diffusion_model.final_layer.adaLN_modulation.1"
    f = [0.3 * torch.randn(*s_, generator=g) for s_ in ((2 * d, 2), (2, d), (2 * d, 2), (2, d))]
    sd.update({f"{k}.hada_w1_a": f[0], f"{k}.hada_w1_b": f[1], f"{k}.hada_w2_a": f[2], f"{k}.hada_w2_b": f[3]})
    sd[f"{k}.alpha"] = torch.tensor(1.0)
    merged[f"{name}.weight"] = merged[f"{name}.weight"] + w * 0.5 * (f[0] @ f[1]) * (f[2] @ f[3])
    want_model = FluxTransformer(FLUX).eval()
    want_model.load_state_dict(bfl_to_diffusers(merged), strict=True)
    want = run_flux(want_model)
    base = run_flux(ours)
    before = {k_: v.clone() for k_, v in ours.state_dict().items()}
    with apply_loras(ours, None, [(write(tmp_path, "lyco", sd), w)]) as h:
        rep = h.reports[0]
        got = run_flux(ours)
        h.fuse()
        fused = run_flux(ours)
        h.unfuse()
    assert rep.complete and len(rep.matched) == 3 + 4 + 1 and rep.algorithms == ["LoHa", "LoKr"]
    assert err(want, base) > 1e-2
    assert err(got, want) < TOL, err(got, want)
    assert err(fused, want) < TOL, err(fused, want)
    assert all(torch.equal(v, before[k_]) for k_, v in ours.state_dict().items())


def test_flux_text_encoder_layers_and_unknown_keys_are_reported(tmp_path: Path) -> None:
    """kohya's CLIP-L layers (``lora_te1_``) go to the text encoder given; T5 layers (``lora_te3_``), with no T5
    given, are listed unmatched in the report, never dropped silently."""
    _, ours = flux_pair()
    te = _tiny_clip(32)
    g = torch.Generator().manual_seed(2)
    sd = native_lora({"double_blocks.0.img_attn.qkv": (3 * FLUX.hidden_size, FLUX.hidden_size)}, 1, "kohya")
    te_key = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    sd[f"{te_key}.lora_down.weight"], sd[f"{te_key}.lora_up.weight"] = _pair(g, 32, 32)
    t5_key = "lora_te3_encoder_block_0_layer_0_SelfAttention_q"
    sd[f"{t5_key}.lora_down.weight"], sd[f"{t5_key}.lora_up.weight"] = _pair(g, 64, 64)
    with apply_loras(ours, te, [(write(tmp_path, "te", sd), 1.0)]) as h:
        rep = h.reports[0]
    assert rep.matched == [
        "text_encoder:text_model.encoder.layers.0.self_attn.q_proj",
        "unet:transformer_blocks.0.attn.to_k",
        "unet:transformer_blocks.0.attn.to_q",
        "unet:transformer_blocks.0.attn.to_v",
    ]
    assert rep.unmatched == [t5_key] and not rep.complete
    assert "1 unmatched: lora_te3_encoder_block_0_layer_0_SelfAttention_q" in rep.summary()


def test_flux_t5_layers_apply_to_the_t5_given_as_second_encoder(tmp_path: Path) -> None:
    """Flux's T5 given as ``text_encoder_2`` (the Flux pipeline's layout, diffusers' name for it): kohya's
    ``lora_te3_`` and ComfyUI's ``text_encoders.t5xxl.transformer.`` layers adapt it; its output equals the T5
    with ``W + alpha/r up @ down`` written into the weights (diffusers' Flux loader reads no T5 layers)."""
    from sdengine.models.t5_text import TINY as T5_TINY
    from sdengine.models.t5_text import T5Encoder

    _, ours = flux_pair()
    t5 = T5Encoder(T5_TINY).eval()
    _randomize(t5, 3)
    g = torch.Generator().manual_seed(4)
    sd = native_lora({"double_blocks.0.img_attn.proj": (FLUX.hidden_size, FLUX.hidden_size)}, 1, "kohya")
    merged = {k: v.clone() for k, v in t5.state_dict().items()}
    for key, name, alpha in (
        ("lora_te3_encoder_block_1_layer_0_SelfAttention_v", "encoder.block.1.layer.0.SelfAttention.v", 2.0),
        (
            "text_encoders.t5xxl.transformer.encoder.block.0.layer.1.DenseReluDense.wi_1",
            "encoder.block.0.layer.1.DenseReluDense.wi_1",
            None,
        ),
    ):
        w = merged[f"{name}.weight"]
        down, up = _pair(g, w.shape[0], w.shape[1])
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
        if alpha is not None:
            sd[f"{key}.alpha"] = torch.tensor(alpha)
        merged[f"{name}.weight"] = w + (alpha or RANK) / RANK * 0.9 * (up @ down)
    want_t5 = T5Encoder(T5_TINY).eval()
    want_t5.load_state_dict(merged)
    ids = torch.tensor([[3, 40, 200, 1]])
    with torch.no_grad():
        want = want_t5(ids)
        with apply_loras(ours, None, [(write(tmp_path, "t5", sd), 0.9)], text_encoder_2=t5) as h:
            got = t5(ids)
        base = t5(ids)
    assert h.reports[0].complete
    assert [m for m in h.reports[0].matched if m.startswith("text_encoder_2:")] == [
        "text_encoder_2:encoder.block.0.layer.1.DenseReluDense.wi_1",
        "text_encoder_2:encoder.block.1.layer.0.SelfAttention.v",
    ]
    assert err(got, want) < 1e-5 and err(want, base) > 1e-3


# ------------------------------------------------------------------------------------------------------- SD3


def test_sd3_peft_lora_matches_diffusers(tmp_path: Path) -> None:
    ref, ours = sd3_pair()
    base = run_sd3(ours)
    assert err(base, run_sd3(ref)) < 1e-5
    sd = peft_lora(ref, seed=3)
    ref.load_lora_adapter(dict(sd), prefix="transformer", adapter_name="a")
    want = run_sd3(ref)
    with apply_loras(ours, None, [(write(tmp_path, "peft", sd), 1.0)]) as h:
        rep = h.reports[0]
        got = run_sd3(ours)
    n = sum(isinstance(m, torch.nn.Linear | torch.nn.Conv2d) for m in ours.modules())
    assert rep.complete and len(rep.matched) == n  # pos_embed.proj's convolution too
    assert err(want, base) > 1e-2
    assert err(got, want) < TOL, err(got, want)


def test_sd3_lora_saved_by_diffusers_with_peft_alpha(tmp_path: Path) -> None:
    """A LoRA trained the diffusers way (PEFT ``LoraConfig(r=4, lora_alpha=8)`` on the attention projections), saved
    by ``StableDiffusion3Pipeline.save_lora_weights`` with its adapter metadata, loaded back by diffusers: sdengine
    reads the alpha from ``lora_adapter_metadata`` (scale 2) and gives the same output."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    ref, ours = sd3_pair(seed=3)
    base = run_sd3(ours)
    trained = diffusers.SD3Transformer2DModel(**_kwargs(SD3)).eval()
    trained.load_state_dict(ref.state_dict())
    torch.manual_seed(0)
    config = LoraConfig(
        r=RANK, lora_alpha=8, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"]
    )
    trained.add_adapter(config)
    diffusers.StableDiffusion3Pipeline.save_lora_weights(
        tmp_path,
        transformer_lora_layers=get_peft_model_state_dict(trained),
        transformer_lora_adapter_metadata=config.to_dict(),
        weight_name="trained.safetensors",
    )
    path = tmp_path / "trained.safetensors"
    # diffusers' pipeline loader reads the file's metadata (load_lora_adapter on a path alone would not: scale 1)
    components = dict.fromkeys(["scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                                "text_encoder_3", "tokenizer_3"])  # fmt: skip
    diffusers.StableDiffusion3Pipeline(transformer=ref, **components).load_lora_weights(path, adapter_name="t")
    want = run_sd3(ref)
    assert err(want, run_sd3(trained)) < TOL  # ... the model the LoRA was trained on
    with apply_loras(ours, None, [(path, 1.0)]) as h:
        rep = h.reports[0]
        got = run_sd3(ours)
        layers = list(h.loras[0].layers)
    assert rep.complete and rep.format == "peft" and len(rep.matched) == 4 * 3 + 4 * 1  # 3 blocks + attn2 of block 0
    assert {layer.scale for layer in layers} == {2.0}
    assert err(want, base) > 1e-2
    assert err(got, want) < TOL, err(got, want)


def _sd3_merged(ref, layers: dict[str, tuple[int, ...]], sd: dict, style: str, weight: float):
    """diffusers' model with the LoRA merged into its Stability-layout weights (W + weight * alpha/r * up @ down,
    in Stability's own names), converted back by diffusers' single-file converter."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    stability = sdengine_to_stability(ref.state_dict(), SD3)
    for name in layers:
        base = "lora_unet_" + name.replace(".", "_") if style == "kohya" else "diffusion_model." + name
        d, u = (".lora_A.weight", ".lora_B.weight") if style == "peft" else (".lora_down.weight", ".lora_up.weight")
        down, up = sd[base + d], sd[base + u]
        alpha = float(sd[base + ".alpha"]) if base + ".alpha" in sd else RANK
        delta = torch.einsum("or,rihw->oihw", up.flatten(1), down) if down.ndim == 4 else up @ down
        stability[f"{name}.weight"] = stability[f"{name}.weight"] + weight * alpha / RANK * delta
    model = diffusers.SD3Transformer2DModel(**_kwargs(SD3)).eval()
    model.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(stability), strict=True)
    return model


@pytest.mark.parametrize("style", ["kohya", "comfy", "peft"])
def test_sd3_stability_names_match_merged_diffusers(style: str, tmp_path: Path) -> None:
    ref, ours = sd3_pair(seed=1)
    layers = native_layers(sdengine_to_stability(ref.state_dict(), SD3))
    assert "joint_blocks.0.x_block.attn2.qkv" in layers and "x_embedder.proj" in layers
    sd = native_lora(layers, seed=4, style=style, alpha=3.0)
    want = run_sd3(_sd3_merged(ref, layers, sd, style, 0.75))
    with apply_loras(ours, None, [(write(tmp_path, style, sd), 0.75)]) as h:
        rep = h.reports[0]
        got = run_sd3(ours)
        h.fuse()
        fused = run_sd3(ours)
    n = sum(isinstance(m, torch.nn.Linear | torch.nn.Conv2d) for m in ours.modules())
    assert rep.complete and len(rep.matched) == n
    assert err(want, run_sd3(ref)) > 1e-2
    assert err(got, want) < TOL, err(got, want)
    assert err(fused, want) < TOL


def _tiny_clip(width: int) -> CLIPTextModel:
    cfg = CLIPTextConfig(vocab_size=100, hidden_size=width, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, projection_dim=16)  # fmt: skip
    return CLIPTextModel(cfg).eval()


def test_sd3_kohya_file_with_both_clip_encoders(tmp_path: Path) -> None:
    """sd-scripts' SD3 files: ``lora_te1_`` is CLIP-L, ``lora_te2_`` CLIP-G (not a hint of SDXL on SD3); each
    goes to its encoder, the MMDiT's layers to the MMDiT. (T5, ``lora_te3_``, is not adapted: reported.)"""
    ref, ours = sd3_pair()
    clip_l, clip_g = _tiny_clip(32), _tiny_clip(48)
    g = torch.Generator().manual_seed(6)
    sd = native_lora({"joint_blocks.1.context_block.attn.qkv": (3 * SD3.inner_dim, SD3.inner_dim)}, 2, "kohya")
    for prefix, width in (("lora_te1_", 32), ("lora_te2_", 48)):
        key = prefix + "text_model_encoder_layers_1_mlp_fc1"
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = _pair(g, 37, width)
    key = "lora_te3_encoder_block_0_layer_0_SelfAttention_q"
    sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = _pair(g, 64, 64)
    ids = torch.tensor([[0, 5, 17, 99]])
    with torch.no_grad():
        base_g = clip_g(ids).last_hidden_state
    with apply_loras(ours, clip_l, [(write(tmp_path, "sd3te", sd), 1.0)], text_encoder_2=clip_g) as h:
        rep = h.reports[0]
        with torch.no_grad():
            assert err(clip_g(ids).last_hidden_state, base_g) > 1e-4
    assert rep.matched == [
        "text_encoder:text_model.encoder.layers.1.mlp.fc1",
        "text_encoder_2:text_model.encoder.layers.1.mlp.fc1",
        "unet:transformer_blocks.1.attn.add_k_proj",
        "unet:transformer_blocks.1.attn.add_q_proj",
        "unet:transformer_blocks.1.attn.add_v_proj",
    ]
    assert rep.unmatched == [key]


# ------------------------------------------------------------------------------------------------------ errors


def test_a_lora_of_the_other_transformer_is_refused(tmp_path: Path) -> None:
    ref_f, flux = flux_pair()
    ref_s, sd3 = sd3_pair()
    flux_file = write(tmp_path, "flux", flux_lora(ref_f, "kohya", 1))
    sd3_file = write(
        tmp_path, "sd3", native_lora(native_layers(sdengine_to_stability(ref_s.state_dict(), SD3)), 1, "kohya")
    )
    before = {k: v.clone() for k, v in sd3.state_dict().items()}
    with pytest.raises(LoRAError, match=re.escape(f"a LoRA for {FLUX_FAMILY}; the model is {SD3_FAMILY}")):
        apply_loras(sd3, None, [(flux_file, 1.0)])
    with pytest.raises(LoRAError, match=re.escape(f"a LoRA for {SD3_FAMILY}; the model is {FLUX_FAMILY}")):
        apply_loras(flux, None, [(sd3_file, 1.0)])
    assert all(torch.equal(v, before[k]) for k, v in sd3.state_dict().items())
    assert not any(m._forward_hooks for m in sd3.modules())


def test_a_lora_for_another_size_is_refused(tmp_path: Path) -> None:
    _, ours = flux_pair()
    big = dataclasses.replace(FLUX, num_attention_heads=4)  # hidden 64
    other = FluxTransformer(big)
    sd = native_lora(native_layers(diffusers_to_bfl(other.state_dict())), 1, "kohya")
    with pytest.raises(LoRAError, match=r"output rows, this model's .* have .*: a LoRA for another size of Flux\.1"):
        apply_loras(ours, None, [(write(tmp_path, "big", sd), 1.0)])


def test_lycoris_on_a_fused_layer_and_two_layers_on_one_module_are_refused(tmp_path: Path) -> None:
    _, ours = flux_pair()
    d = FLUX.hidden_size
    key = "lora_unet_double_blocks_0_img_attn_qkv"
    ia3 = {f"{key}.weight": torch.ones(3 * d), f"{key}.on_input": torch.tensor(False)}
    with pytest.raises(LoRAError, match=r"img_attn_qkv is a \(IA\)\^3 layer on a fused layer .*cannot be cut"):
        apply_loras(ours, None, [(write(tmp_path, "ia3", ia3), 1.0)])
    g = torch.Generator().manual_seed(0)
    twice = native_lora({"double_blocks.0.img_attn.qkv": (3 * d, d)}, 1, "kohya")
    q = "transformer.transformer_blocks.0.attn.to_q"
    twice[f"{q}.lora_A.weight"], twice[f"{q}.lora_B.weight"] = _pair(g, d, d)
    with pytest.raises(LoRAError, match=r"two layers of the file adapt transformer_blocks\.0\.attn\.to_q"):
        apply_loras(ours, None, [(write(tmp_path, "twice", twice), 1.0)])
    assert not any(m._forward_hooks for m in ours.modules())


def test_a_control_lora_that_widens_the_input_is_refused(tmp_path: Path) -> None:
    """BFL's Canny/Depth control LoRAs widen ``img_in`` (twice the latent channels) and replace the qk-norm
    scales: the input layer's shape does not fit this model, so the file is refused, not half applied."""
    _, ours = flux_pair()
    d = FLUX.hidden_size
    g = torch.Generator().manual_seed(0)
    sd = native_lora({"double_blocks.0.img_attn.proj": (d, d)}, 1, "peft")
    sd["diffusion_model.img_in.lora_A.weight"], sd["diffusion_model.img_in.lora_B.weight"] = _pair(
        g, d, 2 * FLUX.in_channels
    )
    sd["diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale"] = torch.ones(FLUX.attention_head_dim)
    with pytest.raises(
        LoRAError, match=r"shapes do not match this model: unet\.x_embedder \(LoRA maps 32 -> 32, layer 16"
    ):
        apply_loras(ours, None, [(write(tmp_path, "canny", sd), 1.0)])
    assert not any(m._forward_hooks for m in ours.modules())


def test_an_sd_unet_lora_on_a_transformer_names_no_match(tmp_path: Path) -> None:
    _, ours = flux_pair()
    key = "lora_unet_down_blocks_0_attentions_0_proj_in"
    sd = {f"{key}.lora_down.weight": torch.ones(4, 32), f"{key}.lora_up.weight": torch.ones(32, 4)}
    with pytest.raises(LoRAError, match=r"none of its 1 layers match this model's layer names"):
        apply_loras(ours, None, [(write(tmp_path, "sd1", sd), 1.0)])
    # parsed as before: the file layer keeps its name until it meets a transformer
    assert list(LoRAFile.from_state_dict(sd).layers) == [key]


# -------------------------------------------------------------------------------------------- the Flux pipeline


def test_flux_pipeline_with_a_kohya_lora_tag_matches_diffusers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kohya Flux LoRA (BFL names, alpha) named by a ``<lora:...:0.8>`` tag in a tiny FLUX.1 [dev] pipeline: the
    image is diffusers' FluxPipeline's with load_lora_weights and the adapter at 0.8; the infotext names the file,
    and the model is its own again after the call. A name that finds no file is a one-line error."""
    import numpy as np

    import sdengine
    from _flux_models import diffusers_flux, make_flux_folder
    from sdengine.weights.lora import LoRAFileError

    folder = make_flux_folder(tmp_path / "tiny-flux-dev", guidance=True)
    pipe, ref = sdengine.load_pipeline(folder, device="cpu"), diffusers_flux(folder)
    layers = native_layers(diffusers_to_bfl(ref.transformer.state_dict()))
    sd = native_lora(layers, 5, "kohya", alpha=8.0)
    (tmp_path / "loras").mkdir()
    write(tmp_path / "loras", "flux-style", sd)
    size = dict(width=48, height=32)
    ours = pipe(
        "a red apple <lora:flux-style:0.8>", steps=3, seed=3, lora_dir=tmp_path / "loras", progress=False, **size
    )
    plain = pipe("a red apple", steps=3, seed=3, progress=False, **size).arrays
    # diffusers' loader, with its kohya converter at the tiny width (see _kohya_converter)
    from diffusers.loaders import lora_pipeline

    monkeypatch.setattr(
        lora_pipeline,
        "_convert_kohya_flux_lora_to_diffusers",
        _kohya_converter(ref.transformer.config.num_attention_heads * ref.transformer.config.attention_head_dim),
    )
    conv = lora_pipeline.FluxLoraLoaderMixin.lora_state_dict(dict(sd))
    conv = {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in conv.items()}
    ref.transformer.load_lora_adapter(conv, prefix="transformer", adapter_name="style")
    ref.transformer.set_adapters(["style"], [0.8])
    theirs = ref(
        "a red apple",
        num_inference_steps=3,
        guidance_scale=3.5,
        output_type="np",
        generator=torch.Generator().manual_seed(3),
        **size,
    ).images
    mad = float(np.abs(ours.arrays.astype(np.float64) - theirs).mean())
    print(f"flux LoRA tag (kohya, 0.8): mean abs {mad:.2e}")
    assert mad < 1e-4, mad
    assert float(np.abs(ours.arrays - plain).mean()) > 1e-3  # the LoRA changed the image
    assert "Lora hashes: " in ours.infotexts[0] and "<lora:flux-style:0.8>" in ours.infotexts[0]
    np.testing.assert_array_equal(pipe("a red apple", steps=3, seed=3, progress=False, **size).arrays, plain)
    with pytest.raises(LoRAFileError, match="LoRA 'nope' not found in"):
        pipe("a <lora:nope:1>", steps=1, lora_dir=tmp_path / "loras", progress=False, **size)
