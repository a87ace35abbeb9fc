"""LoRA loading: parity with diffusers' load_lora_weights (PEFT and kohya files), stacking, fuse/unfuse, reports and
bad input. Tiny random SD1-shaped models; diffusers/transformers/peft are the oracles.

Version note (docs/CONTRACTS.md, Test oracles): transformers >= 5.24 asks for peft >= 0.22 before it loads a
text-encoder LoRA while the newest peft here is 0.21.2. The `relaxed_peft_check` fixture lowers transformers'
MIN_PEFT_VERSION to the installed peft for the tests that load a text-encoder LoRA into transformers'
CLIPTextModel (nothing else is changed; with transformers 5.23 the check already passes and the fixture does
nothing).
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import pytest
import torch

from sdengine.models.clip_text import CLIPTextConfig, CLIPTextModel
from sdengine.models.unet import UNet, UNetConfig
from sdengine.weights import CorruptFileError, save_safetensors
from sdengine.weights.lora import (
    LoRAError,
    LoRAFile,
    LoRAWeight,
    LoRAWeightWarning,
    apply_loras,
    kohya_name,
    list_lora_dir,
    resolve_lora,
)
from test_weights_common import randomize, state, tiny_clip, tiny_unet

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.0.proj", "conv1", "time_emb_proj"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
TOL = 1e-4


@pytest.fixture
def relaxed_peft_check(monkeypatch):
    """See the module docstring: accept the installed peft for transformers' text-encoder LoRA loading."""
    import importlib.metadata

    import transformers.integrations.peft as tp
    from packaging import version

    installed = importlib.metadata.version("peft")
    if version.parse(installed) < version.parse(tp.MIN_PEFT_VERSION):
        monkeypatch.setattr(tp, "MIN_PEFT_VERSION", installed)


# ------------------------------------------------------------------------------------------------- helpers


def diffusers_models():
    """A fresh pair of random diffusers/transformers models (always the same weights)."""
    return randomize(tiny_unet("sd1"), 1).eval(), randomize(tiny_clip("sd1"), 2).eval()


def sdengine_models(unet_ref, te_ref):
    ours = UNet(UNetConfig.from_diffusers(dict(unet_ref.config)))
    ours.load_state_dict(unet_ref.state_dict(), strict=True)
    te = CLIPTextModel.from_state_dict(state(te_ref), CLIPTextConfig.from_transformers(te_ref.config.to_dict()))
    return ours.eval(), te.eval()


_BASE: dict = {}


def fresh_models():
    """sdengine models on the same random weights as `diffusers_models()` (built once, copied per test)."""
    if not _BASE:
        _BASE["models"] = sdengine_models(*diffusers_models())
    return copy.deepcopy(_BASE["models"])


def make_lora(tmp: Path, seed: int, *, r: int = 4, alpha: float = 2.0, te_alpha: float = 8.0, models=None) -> dict:
    """A random LoRA (non-zero up matrices) written by diffusers itself (PEFT format) and, with the same tensors,
    in kohya format. Returns {"peft": path, "kohya": path, "unet": {module: (down, up)}, "te": {...}}."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet, te = copy.deepcopy(models) if models is not None else diffusers_models()
    torch.manual_seed(seed)  # peft's init_lora_weights=False draws both matrices at random
    unet.add_adapter(LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False, target_modules=UNET_TARGETS))
    te.add_adapter(LoraConfig(r=r, lora_alpha=te_alpha, init_lora_weights=False, target_modules=TE_TARGETS))
    usd, tsd = get_peft_model_state_dict(unet), get_peft_model_state_dict(te)
    folder = tmp / f"peft{seed}"
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=usd,
        text_encoder_lora_layers=tsd,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=te.peft_config["default"].to_dict(),
    )
    pairs = {"unet": {}, "te": {}}
    for comp, sd in (("unet", usd), ("te", tsd)):
        for k in sd:
            if k.endswith(".lora_A.weight"):
                mod = k.removesuffix(".lora_A.weight")
                pairs[comp][mod] = (sd[k].clone(), sd[f"{mod}.lora_B.weight"].clone())
    kohya = {}
    for comp, a in (("unet", alpha), ("te", te_alpha)):
        for mod, (down, up) in pairs[comp].items():
            name = kohya_name("unet", mod) if comp == "unet" else kohya_name("text_encoder", f"text_model.{mod}")
            kohya[f"{name}.lora_down.weight"] = down
            kohya[f"{name}.lora_up.weight"] = up
            kohya[f"{name}.alpha"] = torch.tensor(a)
    kpath = tmp / f"kohya{seed}.safetensors"
    save_safetensors(kohya, kpath, metadata={"ss_network_dim": str(r), "ss_network_alpha": str(alpha)})
    return {"peft": folder / "pytorch_lora_weights.safetensors", "kohya": kpath, **pairs}


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loras")
    return [make_lora(tmp, 10), make_lora(tmp, 11, r=2, alpha=1.0, te_alpha=3.0)]


def diffusers_load(unet, te, path: Path, name: str) -> None:
    from diffusers import StableDiffusionPipeline

    sd, alphas, meta = StableDiffusionPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    StableDiffusionPipeline.load_lora_into_unet(sd, alphas, unet, adapter_name=name, metadata=meta)
    StableDiffusionPipeline.load_lora_into_text_encoder(sd, alphas, te, adapter_name=name, metadata=meta)


def diffusers_weights(unet, te, names: list[str], weights: list[float]) -> None:
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters

    unet.set_adapters(names, weights)
    set_weights_and_activate_adapters(te, names, weights)


INPUTS = {}


def inputs():
    if not INPUTS:
        g = torch.Generator().manual_seed(0)
        INPUTS.update(
            x=torch.randn(2, 4, 8, 8, generator=g),
            t=torch.tensor([10, 500]),
            ctx=torch.randn(2, 7, 32, generator=g),
            ids=torch.randint(0, 500, (2, 9), generator=g),
        )
    return INPUTS


@torch.no_grad()
def run_ref(unet, te):
    i = inputs()
    return unet(i["x"], i["t"], i["ctx"]).sample, te(i["ids"]).last_hidden_state


@torch.no_grad()
def run_ours(unet, te):
    i = inputs()
    return unet(i["x"], i["t"], encoder_hidden_states=i["ctx"]), te(i["ids"]).last_hidden_state


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_parity_with_diffusers(loras, fmt, relaxed_peft_check):
    """U-Net and text-encoder outputs with one LoRA at weight 0.7 equal diffusers' load_lora_weights."""
    ref_unet, ref_te = diffusers_models()
    ours_unet, ours_te = sdengine_models(ref_unet, ref_te)
    base = run_ours(ours_unet, ours_te)
    diffusers_load(ref_unet, ref_te, loras[0][fmt], "a")
    diffusers_weights(ref_unet, ref_te, ["a"], [0.7])
    handle = apply_loras(ours_unet, ours_te, [(loras[0][fmt], 0.7)])
    rep = handle.reports[0]
    assert rep.format == fmt and rep.complete and rep.ranks == [4]
    n_unet = len(loras[0]["unet"])
    assert len([m for m in rep.matched if m.startswith("unet:")]) == n_unet
    assert len([m for m in rep.matched if m.startswith("text_encoder:")]) == len(loras[0]["te"])
    ref, ours = run_ref(ref_unet, ref_te), run_ours(ours_unet, ours_te)
    err_unet, err_te = max_err(ref[0], ours[0]), max_err(ref[1], ours[1])
    print(f"{fmt}: max abs error U-Net {err_unet:.2e}, text encoder {err_te:.2e}")
    assert err_unet < TOL and err_te < TOL
    # the LoRA really changed both outputs (non-zero up matrices), and remove() gives the base back exactly
    assert max_err(ours[0], base[0]) > 1e-3 and max_err(ours[1], base[1]) > 1e-3
    handle.remove()
    after = run_ours(ours_unet, ours_te)
    assert torch.equal(after[0], base[0]) and torch.equal(after[1], base[1])


def _old_diffusers_layout(lora: dict) -> dict[str, torch.Tensor]:
    """The same tensors as diffusers wrote before PEFT: attention-processor names on the U-Net
    (`attn1.processor.to_q_lora.down.weight`), `lora_linear_layer` on the text encoder; no alpha."""
    old = {}
    for mod, (down, up) in lora["unet"].items():
        block, _, proj = mod.removesuffix(".0").rpartition(".")  # attn1.to_out.0 -> attn1, to_out
        if ".attn" in block and proj in ("to_q", "to_k", "to_v", "to_out"):
            old[f"unet.{block}.processor.{proj}_lora.down.weight"] = down
            old[f"unet.{block}.processor.{proj}_lora.up.weight"] = up
    for mod, (down, up) in lora["te"].items():
        old[f"text_encoder.{mod}.lora_linear_layer.down.weight"] = down
        old[f"text_encoder.{mod}.lora_linear_layer.up.weight"] = up
    assert any(".processor.to_out_lora." in k for k in old)
    return old


@pytest.mark.parametrize("variant", ["kohya-fp16", "kohya-bf16", "diffusers-old-layout"])
def test_half_precision_and_old_diffusers_files_equal_diffusers(loras, variant, tmp_path, relaxed_peft_check):
    """Files as users get them: a kohya LoRA saved in fp16 or bf16 (most Civitai files) on an fp32 model, and
    diffusers' pre-PEFT layout; U-Net and text-encoder outputs equal diffusers' load_lora_weights of the same file."""
    from safetensors.torch import load_file

    if variant == "diffusers-old-layout":
        sd = _old_diffusers_layout(loras[0])
    else:
        dtype = torch.float16 if variant == "kohya-fp16" else torch.bfloat16
        sd = {k: v.to(dtype) for k, v in load_file(str(loras[0]["kohya"])).items()}
    path = tmp_path / f"{variant}.safetensors"
    save_safetensors(sd, path)
    ref_unet, ref_te = diffusers_models()
    ours_unet, ours_te = sdengine_models(ref_unet, ref_te)
    base = run_ours(ours_unet, ours_te)
    diffusers_load(ref_unet, ref_te, path, "a")
    diffusers_weights(ref_unet, ref_te, ["a"], [0.8])
    with apply_loras(ours_unet, ours_te, [(path, 0.8)]) as h:
        assert h.reports[0].complete
        ours = run_ours(ours_unet, ours_te)
    ref = run_ref(ref_unet, ref_te)
    assert max_err(ref[0], ours[0]) < TOL and max_err(ref[1], ours[1]) < TOL
    assert max_err(ours[0], base[0]) > 1e-3 and max_err(ours[1], base[1]) > 1e-3


def test_two_loras_with_weights_match_diffusers_set_adapters(loras, relaxed_peft_check):
    """Two LoRAs (one PEFT, one kohya) at 0.8 and 0.5, then re-weighted without reloading, as set_adapters."""
    ref_unet, ref_te = diffusers_models()
    ours_unet, ours_te = sdengine_models(ref_unet, ref_te)
    diffusers_load(ref_unet, ref_te, loras[0]["peft"], "a")
    diffusers_load(ref_unet, ref_te, loras[1]["kohya"], "b")
    handle = apply_loras(ours_unet, ours_te, [(loras[0]["peft"], 0.8), (loras[1]["kohya"], 0.5)])
    for weights in ([0.8, 0.5], [0.3, -1.0]):
        diffusers_weights(ref_unet, ref_te, ["a", "b"], weights)
        handle.set_weights(weights)
        ref, ours = run_ref(ref_unet, ref_te), run_ours(ours_unet, ours_te)
        assert max_err(ref[0], ours[0]) < TOL and max_err(ref[1], ours[1]) < TOL, weights
    handle.remove()


def test_kohya_ldm_names_load_like_diffusers_names(loras, tmp_path):
    """SDXL-style kohya names (`lora_unet_input_blocks_1_1_...`) reach the same layers as diffusers-style ones;
    the LDM spelling is cross-checked against diffusers' own sgm -> diffusers block mapper."""
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    from sdengine.weights.lora import unet_ldm_names

    ref_unet, ref_te = diffusers_models()
    ours_unet, ours_te = sdengine_models(ref_unet, ref_te)
    ldm = unet_ldm_names(ours_unet)
    sd = LoRAFile.load(loras[0]["kohya"]).layers
    renamed = {}
    for key, w in sd.items():
        mod = key.removeprefix("lora_unet_")
        if key.startswith("lora_unet_"):
            dotted = next(m for m in ldm if m.replace(".", "_") == mod)
            key = "lora_unet_" + ldm[dotted].replace(".", "_")
        renamed[f"{key}.lora_down.weight"] = w.down
        renamed[f"{key}.lora_up.weight"] = w.up
        renamed[f"{key}.alpha"] = torch.tensor(w.alpha)
    assert any("input_blocks_1_1_transformer_blocks_0_attn1_to_q" in k for k in renamed)
    assert any("output_blocks_5_0_in_layers_2" in k for k in renamed)  # a resnet conv1 in LDM spelling
    # diffusers maps the LDM block numbers back to exactly the names sdengine started from
    unet_keys = {k: v for k, v in renamed.items() if k.startswith("lora_unet_")}
    back = _maybe_map_sgm_blocks_to_diffusers(dict(unet_keys), ref_unet.config)
    spelled = {"input_blocks": "down_blocks", "middle_block": "mid_block", "output_blocks": "up_blocks"}
    for old, new in spelled.items():
        back = {k.replace(old, new): v for k, v in back.items()}
    transformer_keys = {k for k in back if "attentions" in k}
    original = {f"{k}.{p}" for k in sd for p in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert len(transformer_keys) > 50 and transformer_keys <= original

    path = tmp_path / "ldm.safetensors"
    save_safetensors(renamed, path)
    base = apply_loras(ours_unet, ours_te, [(loras[0]["kohya"], 0.9)])
    expect = run_ours(ours_unet, ours_te)
    base.remove()
    with apply_loras(ours_unet, ours_te, [(path, 0.9)]) as h:
        assert h.reports[0].complete
        got = run_ours(ours_unet, ours_te)
    assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[1])


def test_comfyui_layout_loads_like_the_kohya_file(loras, tmp_path):
    """ComfyUI's own layout (its LoraSave node: `diffusion_model.<LDM name>` and
    `text_encoders.clip_l.transformer.<CLIP name>` with kohya's `lora_up`/`lora_down`, fp16, no alpha) once found
    "no LoRA layers"; it gives what the kohya file (diffusers-checked above) with the same tensors gives. A clip_g
    layer (SDXL's second encoder) on an SD1 model names SDXL, and a DiT's `diffusion_model.` names still do."""
    from sdengine.weights.lora import unet_ldm_names

    unet, te = fresh_models()
    ldm = unet_ldm_names(unet)
    comfy, kohya = {}, {}
    for key, w in LoRAFile.load(loras[0]["kohya"]).layers.items():
        if key.startswith("lora_unet_"):
            dotted = next(m for m in ldm if kohya_name("unet", m) == key)
            name = "diffusion_model." + ldm[dotted]
        else:
            dotted = next(m for m, _ in te.named_modules() if kohya_name("text_encoder", m) == key)
            name = "text_encoders.clip_l.transformer." + dotted
        assert name.startswith(("diffusion_model.", "text_encoders.clip_l.transformer.text_model."))
        for part, t in (("lora_down.weight", w.down), ("lora_up.weight", w.up)):
            comfy[f"{name}.{part}"] = kohya[f"{key}.{part}"] = t.half()
    assert any(k.startswith("text_encoders.clip_l.transformer.text_model.encoder.") for k in comfy)
    save_safetensors(comfy, tmp_path / "comfy.safetensors")
    save_safetensors(kohya, tmp_path / "kohya.safetensors")
    with apply_loras(unet, te, [(tmp_path / "kohya.safetensors", 0.7)]):
        want = run_ours(unet, te)
    with apply_loras(unet, te, [(tmp_path / "comfy.safetensors", 0.7)]) as h:
        assert h.reports[0].complete and len(h.reports[0].matched) == len(comfy) // 2
        got = run_ours(unet, te)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert max_err(got[0], run_ours(unet, te)[0]) > 1e-3  # the LoRA acts

    g = "text_encoders.clip_g.transformer.text_model.encoder.layers.0.self_attn.q_proj"
    dit = "diffusion_model.blocks.0.self_attn.q"  # a Wan-style DiT
    for layer, d_in, family in ((g, 1280, "SDXL"), (dit, 3072, "a diffusion transformer")):
        other = {**comfy, f"{layer}.lora_down.weight": torch.ones(4, d_in), f"{layer}.lora_up.weight": torch.ones(8, 4)}
        save_safetensors(other, tmp_path / "other.safetensors")
        with pytest.raises(LoRAError, match=f"a LoRA for {family}"):
            apply_loras(unet, te, [(tmp_path / "other.safetensors", 1.0)])


# ---------------------------------------------------------------------------------------------- fuse, weights


def test_fuse_unfuse_restores_base_and_weight_zero_is_base(loras):
    unet, te = fresh_models()
    before = {k: v.clone() for k, v in {**unet.state_dict(), **te.state_dict()}.items()}
    ptrs = {k: v.data_ptr() for k, v in {**unet.state_dict(), **te.state_dict()}.items()}
    base = run_ours(unet, te)
    handle = apply_loras(unet, te, [(loras[0]["kohya"], 0.8), (loras[1]["peft"], 0.5)])
    patched = run_ours(unet, te)
    handle.fuse()
    fused = run_ours(unet, te)
    assert max_err(fused[0], patched[0]) < 1e-5 and max_err(fused[1], patched[1]) < 1e-5
    changed = [k for k, v in unet.state_dict().items() if not torch.equal(v, before[k])]
    assert changed  # fused into the weights this time
    handle.set_weight(0, 0.2)  # re-weighting while fused recomputes from the originals
    handle.unfuse()
    after = {**unet.state_dict(), **te.state_dict()}
    worst = max((after[k] - before[k]).abs().max().item() for k in before)
    assert worst <= 1e-6 and all(after[k].data_ptr() == ptrs[k] for k in before)  # the very same tensors
    handle.set_weights([0.0, 0.0])
    zero = run_ours(unet, te)
    assert torch.equal(zero[0], base[0]) and torch.equal(zero[1], base[1])
    handle.remove()
    handle.remove()  # idempotent


def test_set_weight_equals_fresh_apply(loras):
    unet, te = fresh_models()
    with apply_loras(unet, te, [(loras[0]["peft"], 0.3)]):
        fresh = run_ours(unet, te)
    with apply_loras(unet, te, [(loras[0]["peft"], 1.0)]) as h:
        h.set_weight("pytorch_lora_weights", 0.3)
        again = run_ours(unet, te)
    assert torch.equal(fresh[0], again[0]) and torch.equal(fresh[1], again[1])


def test_scale_is_weight_times_alpha_over_rank(loras):
    """kohya: scale = weight x alpha / rank; a file without alpha means alpha = rank."""
    lf = LoRAFile.load(loras[0]["kohya"])
    w = next(v for k, v in lf.layers.items() if k.startswith("lora_unet_"))
    assert w.rank == 4 and math.isclose(w.scale, 2.0 / 4)
    no_alpha = LoRAFile.from_state_dict(
        {"lora_unet_x.lora_down.weight": torch.ones(3, 5), "lora_unet_x.lora_up.weight": torch.ones(2, 3)}
    )
    assert no_alpha.layers["lora_unet_x"].scale == 1.0
    peft = LoRAFile.load(loras[0]["peft"])
    te_layer = next(v for k, v in peft.layers.items() if k.startswith("text_encoder."))
    unet_layer = next(v for k, v in peft.layers.items() if k.startswith("unet."))
    assert math.isclose(te_layer.scale, 8.0 / 4) and math.isclose(unet_layer.scale, 2.0 / 4)


# --------------------------------------------------------------------------------------------------- reports


def test_partial_match_is_reported(loras, tmp_path, caplog):
    sd = {k: v for k, v in LoRAFile.load(loras[0]["kohya"]).layers.items()}
    tensors = {}
    for k, w in sd.items():
        tensors[f"{k}.lora_down.weight"], tensors[f"{k}.lora_up.weight"] = w.down, w.up
    tensors["lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 32)
    tensors["lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight"] = torch.zeros(32, 4)
    tensors["something_else.weight"] = torch.zeros(3)
    path = tmp_path / "partial.safetensors"
    save_safetensors(tensors, path)
    unet, te = fresh_models()
    with caplog.at_level(logging.WARNING, logger="sdengine.weights.lora"):
        h = apply_loras(unet, te, [(path, 1.0)])
    rep = h.reports[0]
    assert not rep.complete and len(rep.matched) == len(sd)
    assert rep.unmatched == ["lora_unet_down_blocks_7_attentions_0_proj_in", "something_else.weight"]
    assert "2 unmatched" in caplog.text and "down_blocks_7" in caplog.text
    h.remove()


def test_text_encoder_none_leaves_te_keys_unmatched(loras):
    unet, _ = fresh_models()
    with apply_loras(unet, None, [(loras[0]["kohya"], 1.0)]) as h:
        rep = h.reports[0]
        assert len(rep.matched) == len(loras[0]["unet"]) and len(rep.unmatched) == len(loras[0]["te"])


# ------------------------------------------------------------------------------------------------- bad input


def _kohya(path: Path, layers: dict[str, tuple[torch.Tensor, torch.Tensor]], **extra) -> Path:
    t = {}
    for k, (d, u) in layers.items():
        t[f"{k}.lora_down.weight"], t[f"{k}.lora_up.weight"], t[f"{k}.alpha"] = d, u, torch.tensor(1.0)
    t.update(extra)
    save_safetensors(t, path)
    return path


def test_sdxl_lora_on_sd1_model_names_the_mismatch(tmp_path):
    unet, te = fresh_models()
    path = _kohya(
        tmp_path / "xl.safetensors",
        {
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (torch.ones(4, 2048), torch.ones(640, 4)),
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (torch.ones(4, 1280), torch.ones(1280, 4)),
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (torch.ones(4, 768), torch.ones(768, 4)),
        },
    )
    with pytest.raises(LoRAError, match=r"SDXL.*second text encoder.*model is a custom model"):
        apply_loras(unet, te, [(path, 1.0)])


def test_sd2_lora_on_sd1_shapes_name_the_mismatch(tmp_path):
    """Same names, other widths: an SD2 LoRA (cross-attention 1024) on a model with 32-wide text states."""
    unet, te = fresh_models()
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    path = _kohya(tmp_path / "sd2.safetensors", {name: (torch.ones(4, 1024), torch.ones(32, 4))})
    with pytest.raises(
        LoRAError,
        match=r"shapes do not match.*attn2\.to_k \(LoRA maps 1024 -> 32, layer 32 -> 32\)"
        r".*LoRA for SD2\.x",
    ):
        apply_loras(unet, te, [(path, 1.0)])


def test_nothing_matches_is_an_error(tmp_path):
    unet, te = fresh_models()
    path = _kohya(tmp_path / "other.safetensors", {"lora_unet_foo_bar": (torch.ones(2, 3), torch.ones(3, 2))})
    with pytest.raises(LoRAError, match=r"none of its 1 layers match"):
        apply_loras(unet, te, [(path, 1.0)])


def test_nan_and_inf_are_refused(tmp_path):
    unet, te = fresh_models()
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    for bad in (float("nan"), float("inf")):
        down = torch.ones(4, 32)
        down[1, 2] = bad
        path = _kohya(tmp_path / "nan.safetensors", {name: (down, torch.ones(32, 4))})
        with pytest.raises(LoRAError, match=rf"refused: NaN or inf values in {name} \(down\)"):
            apply_loras(unet, te, [(path, 1.0)])


def test_weight_outside_range_warns_and_nonfinite_weight_fails(loras):
    unet, te = fresh_models()
    with pytest.warns(LoRAWeightWarning, match=r"weight 5 is outside \[-4, 4\]"):
        apply_loras(unet, te, [(loras[0]["kohya"], 5.0)]).remove()
    with pytest.raises(LoRAError, match="not finite"):
        apply_loras(unet, te, [(loras[0]["kohya"], float("nan"))])


def test_corrupt_file_is_one_clear_error(loras, tmp_path):
    unet, te = fresh_models()
    data = Path(loras[0]["kohya"]).read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match=r"cut\.safetensors: truncated") as e:
        apply_loras(unet, te, [(path, 1.0)])
    assert "\n" not in str(e.value)
    path.write_bytes(b"garbage")
    with pytest.raises(CorruptFileError):
        apply_loras(unet, te, [(path, 1.0)])


def test_unsupported_adapter_kinds_are_named(tmp_path):
    unet, te = fresh_models()
    # (LoHa, LoKr, DoRA, GLoRA and OFT/BOFT's oft_blocks are read: tests/test_lycoris.py)
    path = tmp_path / "oft.safetensors"  # an early LyCORIS' oft_diag: the rotation, or its difference from I?
    save_safetensors({"lora_unet_x.oft_diag": torch.ones(2, 2, 2), "lora_unet_x.alpha": torch.tensor(1.0)}, path)
    with pytest.raises(LoRAError, match=r"OFT of an early LyCORIS version \(oft_diag\) adapters are not supported"):
        apply_loras(unet, te, [(path, 1.0)])
    save_safetensors({"unet.x.boft_R.default.weight": torch.ones(2, 2, 2)}, path)
    with pytest.raises(LoRAError, match=r"PEFT OFT/BOFT \(orthogonal finetuning\) adapters are not supported"):
        apply_loras(unet, te, [(path, 1.0)])


def test_error_leaves_model_untouched(loras, tmp_path):
    """Files are all checked before anything is patched."""
    unet, te = fresh_models()
    base = run_ours(unet, te)
    bad = _kohya(tmp_path / "bad.safetensors", {"lora_unet_foo": (torch.ones(2, 3), torch.ones(3, 2))})
    with pytest.raises(LoRAError):
        apply_loras(unet, te, [(loras[0]["kohya"], 1.0), (bad, 1.0)])
    assert all(not m._forward_hooks for m in unet.modules())
    assert torch.equal(run_ours(unet, te)[0], base[0])


# ---------------------------------------------------------------------------------------------- lora folder


def test_names_resolve_in_lora_dir_and_missing_name_lists_it(loras, tmp_path):
    d = tmp_path / "loras"
    (d / "styles").mkdir(parents=True)
    (d / "styles" / "inky.safetensors").write_bytes(Path(loras[0]["kohya"]).read_bytes())
    (d / "Other.safetensors").write_bytes(Path(loras[1]["kohya"]).read_bytes())
    assert list_lora_dir(d) == ["Other", "styles/inky"]
    assert resolve_lora("inky", d) == d / "styles" / "inky.safetensors"
    assert resolve_lora("styles/inky", d) == d / "styles" / "inky.safetensors"
    assert resolve_lora("other", d) == d / "Other.safetensors"
    with pytest.raises(LoRAError, match=r"LoRA 'nope' not found in .*loras; it holds: Other, styles/inky"):
        resolve_lora("nope", d)
    unet, te = fresh_models()
    with apply_loras(unet, te, [("inky", 0.5)], lora_dir=d) as h:
        assert h.reports[0].name == "inky" and h.reports[0].complete


def _escape_setup(loras, tmp_path):
    """tmp/loras/{inside,link->outside}.safetensors, tmp/loras/sub -> tmp/outside, tmp/outside/secret.safetensors."""
    d, out = tmp_path / "loras", tmp_path / "outside"
    d.mkdir()
    out.mkdir()
    (d / "inside.safetensors").write_bytes(Path(loras[0]["kohya"]).read_bytes())
    secret = out / "secret.safetensors"
    secret.write_bytes(Path(loras[1]["kohya"]).read_bytes())
    (d / "link.safetensors").symlink_to(secret)
    (d / "sub").symlink_to(out, target_is_directory=True)
    return d, secret


ESCAPES = [
    "../outside/secret",
    "../outside/secret.safetensors",
    "sub/../../outside/secret",
    "%2e%2e/outside/secret",
    "%2E%2E%2Foutside%2Fsecret",
    "%252e%252e%252foutside%252fsecret",
    "link",
    "sub/secret",
    "{abs}",
    "{abs_stem}",
]


@pytest.mark.parametrize("name", ESCAPES)
def test_prompt_tag_cannot_select_a_file_outside_the_lora_dir(loras, tmp_path, monkeypatch, name):
    """A `<lora:NAME:W>` name only ever selects a file inside the LoRA folder: `..`, absolute names,
    percent-encoded escapes and symlinks out are refused, even where the file exists relative to the
    working directory (as the old path-first lookup would have taken it)."""
    from sdengine.io.paths import UnsafePathError
    from sdengine.prompts import extract_lora_tags
    from sdengine.weights.lora import UnsafeLoRANameError

    d, secret = _escape_setup(loras, tmp_path)
    monkeypatch.chdir(d)  # "../outside/secret.safetensors" exists from here
    name = name.format(abs=secret, abs_stem=secret.with_suffix(""))
    text, tags = extract_lora_tags(f"a cat <lora:{name}:0.7>")
    assert text == "a cat " and len(tags) == 1
    with pytest.raises(UnsafeLoRANameError) as err:
        apply_loras(None, None, tags, lora_dir=d)
    assert isinstance(err.value, LoRAError) and isinstance(err.value, UnsafePathError)
    with pytest.raises(UnsafeLoRANameError):
        resolve_lora(tags[0][0], d)


def test_prompt_tag_inside_the_dir_works_and_caller_paths_stay_allowed(loras, tmp_path):
    from sdengine.prompts import extract_lora_tags

    d, secret = _escape_setup(loras, tmp_path)
    _, tags = extract_lora_tags("a cat <lora:inside:0.5>")
    unet, te = fresh_models()
    with apply_loras(unet, te, tags, lora_dir=d) as h:
        assert h.reports[0].name == "inside" and h.reports[0].weight == 0.5 and h.reports[0].complete
    # The Python caller's own path is not a name from a prompt: a file outside the folder is fine.
    with apply_loras(unet, te, [(str(secret), 0.5)], lora_dir=d) as h:
        assert h.reports[0].path == str(secret)
    assert resolve_lora(secret, d) == secret
    # A tag name with no folder to look it up in is an error, not a path.
    ((outside_tag, _),) = extract_lora_tags(f"<lora:{secret}>")[1]
    with pytest.raises(LoRAError, match="no LoRA folder was given"):
        resolve_lora(outside_tag)
    # The listing offers only what a name can select: the symlink out of the folder is left out.
    assert list_lora_dir(d) == ["inside"]


# ------------------------------------------------------------------------------------------------ end to end


def test_end_to_end_images_two_loras_match_diffusers_set_adapters(tmp_path, relaxed_peft_check, tiny_sd1_folder):
    """Images from sdengine's pipeline with two LoRAs (0.8 PEFT, 0.5 kohya) equal diffusers' pipeline with
    load_lora_weights + set_adapters (1e-3 mean abs), and weight 0 gives the base image."""
    import sdengine
    from _pipeline_models import diffusers_pipeline, diffusers_scheduler
    from sdengine.weights.lora import UnsafeLoRANameError

    folder = tiny_sd1_folder
    pipe = diffusers_pipeline(folder)
    pipe.scheduler = diffusers_scheduler(folder, "euler")
    a = make_lora(tmp_path, 20, models=(pipe.unet, pipe.text_encoder))
    b = make_lora(tmp_path, 21, r=2, alpha=1.0, te_alpha=3.0, models=(pipe.unet, pipe.text_encoder))
    kw = dict(width=32, height=32, cfg_scale=7.5, seed=42, steps=4, sampler="euler", schedule="normal", progress=False)
    ours = sdengine.load_pipeline(str(folder))
    base = ours(prompt="a red apple", **kw).arrays
    zero = ours(prompt="a red apple", loras=[(a["peft"], 0.0)], **kw).arrays
    assert abs(zero - base).max() == 0.0
    # A prompt tag cannot reach a file outside the LoRA folder, although ../kohya20.safetensors exists.
    inner = tmp_path / "loras"
    inner.mkdir()
    assert (inner / f"../{a['kohya'].name}").is_file()
    with pytest.raises(UnsafeLoRANameError):
        ours(prompt=f"a red apple <lora:../{a['kohya'].stem}:1>", lora_dir=inner, **kw)
    got = ours(prompt="a red apple", loras=[(a["peft"], 0.8), (b["kohya"], 0.5)], **kw).arrays
    pipe.load_lora_weights(str(a["peft"]), adapter_name="a")
    pipe.load_lora_weights(str(b["kohya"]), adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.8, 0.5])
    ref = pipe(
        "a red apple",
        num_inference_steps=4,
        guidance_scale=7.5,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(42),
    ).images
    err = abs(got - ref).mean()
    print(f"end-to-end mean abs error {err:.2e} (LoRA effect {abs(got - base).mean():.2e})")
    assert err < 1e-3 and abs(got - base).mean() > 1e-2


def test_two_handles_stack_and_remove_separately(loras):
    """Two handles on one model stack; each removes only its own hooks."""
    unet, te = fresh_models()
    base = run_ours(unet, te)
    h1 = apply_loras(unet, te, [(loras[0]["kohya"], 0.5)])
    one = run_ours(unet, te)
    h2 = apply_loras(unet, te, [(loras[1]["kohya"], 0.5)])
    h2.remove()
    assert torch.equal(run_ours(unet, te)[0], one[0])
    h1.remove()
    assert torch.equal(run_ours(unet, te)[0], base[0])


def test_shipped_lora_resolves_by_name_without_a_folder(tmp_path, monkeypatch):
    from sdengine.catalog import ASSETS
    from sdengine.io.paths import ExternalName
    from sdengine.weights.lora import LoRAFileError, UnsafeLoRANameError, resolve_lora

    monkeypatch.chdir(tmp_path)  # not from the repository root
    shipped = ASSETS / "loras" / "emoji-fruit.safetensors"
    assert resolve_lora("emoji-fruit") == shipped  # --lora emoji-fruit
    assert resolve_lora(ExternalName("emoji-fruit")) == shipped  # <lora:emoji-fruit:1>, no --lora-dir
    (tmp_path / "mine").mkdir()
    assert resolve_lora(ExternalName("emoji-fruit"), tmp_path / "mine") == shipped  # the folder lacks it
    save_safetensors({"x": torch.zeros(1)}, tmp_path / "mine" / "emoji-fruit.safetensors")
    assert resolve_lora(ExternalName("emoji-fruit"), tmp_path / "mine") == tmp_path / "mine" / "emoji-fruit.safetensors"
    # names from prompts still never leave a folder, shipped one included
    for bad in ("../loras/emoji-fruit", str(shipped), "..%2femoji-fruit", "loras/emoji-fruit"):
        with pytest.raises(LoRAFileError, match="no LoRA folder"):
            resolve_lora(ExternalName(bad))
        if bad != "loras/emoji-fruit":
            with pytest.raises(UnsafeLoRANameError):
                resolve_lora(ExternalName(bad), tmp_path / "mine")


# ------------------------------------------------------------------------------ absurd files and weights

_LAYER = "lora_unet_down_blocks_0_attentions_0_proj_in"


def _pair(rank: int = 4, down: float = 1.0, up: float = 1.0, alpha: float = 1.0) -> dict[str, torch.Tensor]:
    return {
        f"{_LAYER}.lora_down.weight": torch.full((rank, 32), down),
        f"{_LAYER}.lora_up.weight": torch.full((32, rank), up),
        f"{_LAYER}.alpha": torch.tensor(alpha),
    }


def test_rank_zero_lora_is_a_named_error(tmp_path):
    path = tmp_path / "r0.safetensors"
    save_safetensors(_pair(rank=0), path)
    with pytest.raises(LoRAError, match=rf"r0\.safetensors: {_LAYER} has rank 0") as e:
        LoRAFile.load(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "kw,part",
    [
        ({"down": 1e30}, "down"),
        ({"up": -1e30}, "up"),
        ({"alpha": 1e30}, "alpha"),
        ({"up": 2e4}, "up"),
        ({"alpha": -1e5}, "alpha"),
    ],
)
def test_absurd_lora_magnitudes_are_refused(tmp_path, kw, part):
    path = tmp_path / "huge.safetensors"
    save_safetensors(_pair(**kw), path)
    with pytest.raises(LoRAError, match=rf"huge\.safetensors: {_LAYER} {part} .*over 1e\+04") as e:
        LoRAFile.load(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("alpha", ['"inf"', "1e400", '"eight"', "true", "1e30", "[1]"])
def test_peft_lora_alpha_must_be_a_sane_number(alpha):
    sd = {"unet.down.proj_in.lora_A.weight": torch.ones(4, 32), "unet.down.proj_in.lora_B.weight": torch.ones(32, 4)}
    meta = {"lora_adapter_metadata": '{"unet.lora_alpha": ' + alpha + "}"}
    with pytest.raises(LoRAError, match=r"peft\.safetensors: unet\.down\.proj_in: lora_alpha .* is not") as e:
        LoRAFile.from_state_dict(sd, meta, name="peft", path=Path("peft.safetensors"))
    assert "\n" not in str(e.value)


def test_ordinary_lora_values_still_load():
    lf = LoRAFile.from_state_dict(_pair(down=0.5, up=-3.0, alpha=128.0), name="ok")
    assert lf.layers[_LAYER].scale == 32.0
    sd = {"unet.m.lora_A.weight": torch.ones(4, 32), "unet.m.lora_B.weight": torch.ones(32, 4)}
    lf = LoRAFile.from_state_dict(sd, {"lora_adapter_metadata": '{"unet.lora_alpha": 8}'}, name="p")
    assert lf.layers["unet.m"].scale == 2.0


@pytest.mark.parametrize("weight", [1e30, -101.0, 1e3])
def test_lora_weight_over_the_hard_bound_is_an_error(loras, weight):
    unet, te = fresh_models()
    with pytest.raises(LoRAError, match=r"weight .* is outside \[-100, 100\]") as e:
        apply_loras(unet, te, [(loras[0]["kohya"], weight)])
    assert "\n" not in str(e.value)
    assert all(not m._forward_hooks for m in unet.modules())


@pytest.mark.parametrize("entry", [("x",), (), ("x", 1.0, 2.0), ["x"], 3, None])
def test_malformed_lora_entry_is_a_usage_error(entry):
    from sdengine.errors import UsageError
    from sdengine.weights.lora import lora_entry

    unet, te = fresh_models()
    with pytest.raises(UsageError, match=r"loras: each entry is .*\(path_or_name, weight\)") as e:
        apply_loras(unet, te, [entry])
    assert "\n" not in str(e.value)
    with pytest.raises(UsageError):
        lora_entry(entry)


def test_lora_entry_accepts_the_documented_forms(tmp_path):
    from sdengine.weights.lora import lora_entry

    lf = LoRAFile.from_state_dict(_pair(), name="ok")
    assert lora_entry("a.safetensors") == ("a.safetensors", 1.0)
    assert lora_entry(tmp_path) == (tmp_path, 1.0)
    assert lora_entry(("a", 0.5)) == ("a", 0.5) and lora_entry(["a", 2]) == ("a", 2.0)
    assert lora_entry(lf) == (lf, 1.0) and lora_entry((lf, "0.25")) == (lf, 0.25)
    with pytest.raises(LoRAError, match="weight 'abc' is not a number"):
        lora_entry(("a", "abc"))


def test_alpha_with_several_values_is_refused():
    sd = _pair()
    sd[f"{_LAYER}.alpha"] = torch.ones(3)
    with pytest.raises(LoRAError, match=rf"x\.safetensors: {_LAYER} alpha has 3 values, not one"):
        LoRAFile.from_state_dict(sd, path=Path("x.safetensors"))


def test_api_lora_weight_over_the_bound_is_refused(tiny_sd1_folder, tmp_path):
    """The Python API: ``loras=[(path, 1e30)]`` is a one-line LoRAError, not a black image."""
    import sdengine

    path = tmp_path / "l.safetensors"
    save_safetensors(_pair(), path)
    pipe = sdengine.load_pipeline(str(tiny_sd1_folder))
    kw = dict(width=32, height=32, seed=1, steps=2, sampler="euler", progress=False)
    with pytest.raises(LoRAError, match=r"l: weight 1e\+30 is outside \[-100, 100\]") as e:
        pipe(prompt="a red apple", loras=[(path, 1e30)], **kw)
    assert "\n" not in str(e.value)


def test_pipeline_lora_entry_without_weight_is_a_usage_error():
    """``pipe(..., loras=[('x',)])`` is a one-line UsageError, not an IndexError (the API's loras go through
    ``lora_entry``)."""
    import sdengine
    from sdengine.errors import UsageError

    pipe = sdengine.load_pipeline("emoji")
    with pytest.raises(UsageError, match="loras: each entry"):
        pipe("a cat", loras=[("x",)], steps=1, progress=False)


# ---------------------------------------------------------------------------------- ComfyUI's LoraLoader


def _kohya_for(modules, component: str, seed: int) -> dict[str, torch.Tensor]:
    """A kohya LoRA (rank 2, alpha 1) on every attention q projection of ``modules`` (a U-Net or text encoder)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in modules.named_modules():
        if isinstance(m, torch.nn.Linear) and name.endswith(("attn1.to_q", "self_attn.q_proj")):
            key = kohya_name(component, name)
            out[f"{key}.lora_down.weight"] = torch.randn(2, m.in_features, generator=g) * 0.3
            out[f"{key}.lora_up.weight"] = torch.randn(m.out_features, 2, generator=g) * 0.3
            out[f"{key}.alpha"] = torch.tensor(1.0)
    assert out
    return out


def test_comfyui_lora_loader_takes_unet_only_and_text_encoder_only_loras(tmp_path, tiny_sd1_folder, caplog):
    """ComfyUI's LoraLoader puts a LoRA on the MODEL (strength_model) and on the CLIP (strength_clip); each side
    applies the file's layers of its own part. A U-Net-only LoRA (most SDXL LoRAs) with the default strength_clip 1
    once failed at CLIPTextEncode ("none of its layers match"), and a text-encoder-only one at the KSampler; a full
    LoRA logged its other part as unmatched on each side. Split in two, the parts give the whole LoRA's effect."""
    import sdengine
    from sdengine.latent_sampling import encode_text, sample_latents
    from sdengine.server.comfy.nodes import ClipHandle, RunContext, clip_text_encode

    pipe = sdengine.load_pipeline(str(tiny_sd1_folder), device="cpu")
    unet_part, te_part = _kohya_for(pipe.unet, "unet", 1), _kohya_for(pipe.text_encoder, "text_encoder", 2)
    paths = {}
    for name, sd in (("unet", unet_part), ("te", te_part), ("full", {**unet_part, **te_part})):
        paths[name] = str(tmp_path / f"{name}.safetensors")
        save_safetensors(sd, paths[name])
    ctx = RunContext(pipeline=lambda ref: pipe, catalog=None, folders=None)  # type: ignore[arg-type]
    args = {"seed": 3, "steps": 2, "cfg": 5.0, "sampler": "euler", "schedule": "normal"}
    empty = torch.zeros(1, 4, 8, 8)

    def run(model_loras, clip_loras):
        clip = ClipHandle("x", loras=tuple((p, 1.0) for p in clip_loras))
        pos, neg = (clip_text_encode(ctx, text, clip)[0][0] for text in ("a red apple", "blurry"))
        return sample_latents(pipe, [pos], [neg], empty, loras=[(p, 1.0) for p in model_loras], **args)

    with torch.inference_mode(), caplog.at_level(logging.WARNING):
        base = sample_latents(pipe, [encode_text(pipe, "a red apple")], [encode_text(pipe, "blurry")], empty, **args)
        assert torch.equal(run([], []), base)
        unet_only = run([paths["unet"]], [paths["unet"]])  # LoraLoader with a U-Net-only file, both strengths 1
        te_only = run([paths["te"]], [paths["te"]])
        full = run([paths["full"]], [paths["full"]])
        assert torch.equal(unet_only, run([paths["unet"]], []))  # its CLIP side adds nothing
        assert torch.equal(te_only, run([], [paths["te"]]))  # its MODEL side adds nothing
        assert torch.equal(full, run([paths["unet"]], [paths["te"]]))  # each side applies its own part
        with apply_loras(pipe.unet, pipe.text_encoder, [(paths["full"], 1.0)]):  # the pipeline's whole LoRA
            whole = sample_latents(
                pipe, [encode_text(pipe, "a red apple")], [encode_text(pipe, "blurry")], empty, **args
            )
    assert float((unet_only - base).abs().mean()) > 1e-3 and float((te_only - base).abs().mean()) > 1e-3
    assert float((full - whole).abs().max()) < 1e-5
    assert not [r for r in caplog.records if "unmatched" in r.getMessage()]  # no part is reported as missing


def test_each_part_of_a_lora_is_found_whatever_the_naming():
    """ComfyUI's LoraLoader applies the U-Net part on the MODEL and the text-encoder part on the CLIP
    (``apply_loras(part=...)``): a text-encoder layer is one whether it is named the kohya, PEFT, ComfyUI or bare
    CLIP way; a bare name (`text_model.encoder...`) once went to the U-Net side and was lost on the CLIP side."""
    from sdengine.weights.lora import lora_part

    unet, te = fresh_models()
    q = next(n for n, _ in te.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    assert q.startswith("text_model.")
    d, u = torch.full((2, 32), 0.1), torch.full((32, 2), 0.1)
    te_names = [kohya_name("text_encoder", q), f"text_encoder.{q}", f"text_encoders.clip_l.transformer.{q}", q]
    for name in te_names:
        a, b = ("lora_down", "lora_up") if name.startswith(("lora_", "text_encoders.")) else ("lora_A", "lora_B")
        lf = LoRAFile.from_state_dict({f"{name}.{a}.weight": d, f"{name}.{b}.weight": u}, name="te")
        assert list(lora_part(lf, "text_encoders").layers) == [name] and not lora_part(lf, "unet").layers, name
        with apply_loras(None, te, [(lf, 1.0)], part="text_encoders") as h:
            assert h.reports[0].matched == [f"text_encoder:{q}"], name


def test_alpha_shapes_and_rank_mismatch(tmp_path):
    """kohya writes alpha 0-d; other tools write it as a 1-element tensor, in fp16 or as an integer: the same
    scale. A down of rank 4 with an up of rank 8 is no LoRA pair: one line naming the layer and both shapes."""
    unet, te = fresh_models()
    outs = []
    for alpha in (torch.tensor(2.0), torch.tensor([2.0]), torch.tensor([2.0], dtype=torch.float16), torch.tensor(2)):
        lf = LoRAFile.from_state_dict(_pair(rank=4, down=0.2, up=0.3, alpha=1.0) | {f"{_LAYER}.alpha": alpha})
        assert lf.layers[_LAYER].scale == 0.5
        with apply_loras(unet, te, [(lf, 1.0)]):
            outs.append(run_ours(unet, te)[0])
    assert all(torch.equal(o, outs[0]) for o in outs) and max_err(outs[0], run_ours(unet, te)[0]) > 1e-4
    bad = {f"{_LAYER}.lora_down.weight": torch.ones(4, 32), f"{_LAYER}.lora_up.weight": torch.ones(32, 8)}
    save_safetensors(bad, tmp_path / "ranks.safetensors")
    with pytest.raises(LoRAError, match=rf"ranks.safetensors: {_LAYER}: down \(4, 32\) and up \(32, 8\) are not a"):
        apply_loras(unet, te, [(tmp_path / "ranks.safetensors", 1.0)])


def test_the_same_lora_named_twice_adds_up_and_says_so(loras, tmp_path, tiny_sd1_folder):
    """`<lora:a:0.5> <lora:a:1>`: sdengine applies each mention (0.5 + 1 act as 1.5, as two ComfyUI LoraLoader
    nodes of one file). A1111 reuses one network object per name and applies it once per mention at the last
    multiplier (1 + 1): the two tools differ, so the result carries a note saying what was done (once silent)."""
    import sdengine
    from sdengine.weights import save_safetensors as save

    unet, te = fresh_models()
    with apply_loras(unet, te, [(loras[0]["kohya"], 0.5), (loras[0]["kohya"], 1.0)]) as h:
        twice = run_ours(unet, te)
        (note,) = h.notes
    assert f"LoRA {loras[0]['kohya'].stem} is named 2 times (weights 0.5, 1)" in note
    assert "as weight 1.5 (A1111 would apply it at 2" in note
    with apply_loras(unet, te, [(loras[0]["kohya"], 1.5)]) as h:
        once = run_ours(unet, te)
        assert h.notes == []
    for a, b in zip(twice, once, strict=True):
        assert max_err(a, b) <= 1e-5 * b.abs().max().item()

    pipe = sdengine.load_pipeline(str(tiny_sd1_folder))
    layer = next(n for n, _ in pipe.unet.named_modules() if n.endswith("attn2.to_k"))
    out_f, in_f = pipe.unet.get_submodule(layer).weight.shape
    g = torch.Generator().manual_seed(3)
    folder = tmp_path / "dup"
    folder.mkdir()
    key = kohya_name("unet", layer)
    save(
        {f"{key}.lora_down.weight": torch.randn(2, in_f, generator=g), f"{key}.lora_up.weight": torch.randn(out_f, 2)},
        folder / "dup.safetensors",
    )
    kw = dict(steps=1, width=32, height=32, seed=1, lora_dir=folder, progress=False)
    result = pipe("a cat <lora:dup:0.5> <lora:dup:1>", **kw)
    assert any("LoRA dup is named 2 times (weights 0.5, 1)" in n for n in result.notes)
    assert not any("named" in n for n in pipe("a cat <lora:dup:1.5>", **kw).notes)


def test_the_summed_weight_of_a_lora_named_twice_is_bounded(loras):
    """`<lora:a:60> <lora:a:60>` acts as weight 120 (the mentions add up), but each mention was checked alone, so
    a weight refused when written once (120 > 100) passed when split in two, and 3 + 3 gave no warning. The sum is
    now held to the bounds of one weight: an error (nothing patched) and a warning; opposite weights may cancel."""
    unet, te = fresh_models()
    base = run_ours(unet, te)
    path = loras[0]["kohya"]
    with pytest.warns(LoRAWeightWarning):  # each 60 alone warns
        with pytest.raises(LoRAError, match=r"2 times, weights 60, 60: they add up\): weight 120 is outside") as e:
            apply_loras(unet, te, [(path, 60.0), (path, 60.0)])
    assert "\n" not in str(e.value)
    assert all(torch.equal(a, b) for a, b in zip(run_ours(unet, te), base, strict=True))
    with pytest.warns(LoRAWeightWarning, match=r"they add up\): weight 6 is outside \[-4, 4\]"):
        apply_loras(unet, te, [(path, 3.0), (path, 3.0)]).remove()
    with pytest.warns(LoRAWeightWarning) as record:
        apply_loras(unet, te, [(path, 60.0), (path, -59.0)]).remove()  # acts as 1: no warning of a sum
    assert not any("add up" in str(w.message) for w in record)


@pytest.mark.filterwarnings("ignore::sdengine.nn.lora.LoRAWeightWarning")  # (weights over 4: not the point here)
def test_set_weight_holds_a_file_named_twice_to_the_summed_bound(loras):
    """`set_weight` checked each weight alone: a file applied at 60 and 30 (sum 90, allowed) could be raised to
    60 + 60 = 120 after loading, which loading itself refuses. It now refuses it with loading's very line, and the
    handle (weights, reports, the model's outputs) is left as it was; `set_weights` checks the new values together
    (60 + 40 = 100 is allowed even though 60 + 60 passes through on the way), and a file's text-encoder and U-Net
    parts (`LoRAWeight`) are summed part by part, as loading sums them."""
    unet, te = fresh_models()
    path = loras[0]["kohya"]
    with pytest.raises(LoRAError) as loading:
        apply_loras(unet, te, [(path, 60.0), (path, 60.0)])
    with apply_loras(unet, te, [(path, 60.0), (path, 30.0)]) as h:
        before = run_ours(unet, te)
        with pytest.raises(LoRAError) as e:
            h.set_weight(1, 60.0)
        assert str(e.value) == str(loading.value) and "\n" not in str(e.value)
        with pytest.raises(LoRAError, match=r"weights 30, 80: they add up\): weight 110 is outside"):
            h.set_weights([30.0, 80.0])
        assert h.weights == [60.0, 30.0] and [r.weight for r in h.reports] == [60.0, 30.0]
        assert all(torch.equal(a, b) for a, b in zip(run_ours(unet, te), before, strict=True))
        h.set_weights([40.0, 60.0])  # 60 + 60 on the way, 100 in the end: allowed
        assert h.weights == [40.0, 60.0]
        h.set_weight(0, -59.0)  # opposite weights cancel, as in loading
    with apply_loras(unet, te, [(path, LoRAWeight(1.0, 50.0)), (path, 1.0)]) as h:
        assert [a.name for a in h.loras] == [path.stem] * 3  # its text-encoder part, its U-Net part, then both
        h.set_weight(0, 99.0)  # text encoders 99 + 1 = 100: allowed
        with pytest.raises(LoRAError, match=r"weights 99:99.5, 1: they add up\): weight 100.5 is outside"):
            h.set_weight(1, 99.5)  # U-Net 99.5 + 1
        assert h.weights == [99.0, 50.0, 1.0]
