"""LyCORIS files (LoHa, LoKr, (IA)^3, LoCon with a Tucker core, DoRA): parity with the `lycoris-lora` package and
PEFT on the tiny SD1 U-Net and text encoder, stacking with LoRAs, fuse/unfuse, and the refusals.

The oracle builds its own modules (LyCORIS' LohaModule, LokrModule, ...) on copies of sdengine's layers, fills them
with random values, and writes the file from their state dicts under kohya names, as kohya's trainer driving
LyCORIS does; its patched model gives the reference outputs and its merge the reference weights.
"""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdengine.models.clip_text import CLIPTextConfig, CLIPTextModel
from sdengine.models.unet import UNet, UNetConfig
from sdengine.weights import save_safetensors
from sdengine.weights.lora import LoRAError, LoRAFile, LycorisLayer, apply_loras, kohya_name
from test_weights_common import randomize, state, tiny_clip, tiny_unet

pytest.importorskip("lycoris")

from lycoris.modules.dylora import DyLoraModule  # noqa: E402
from lycoris.modules.full import FullModule  # noqa: E402
from lycoris.modules.ia3 import IA3Module  # noqa: E402
from lycoris.modules.locon import LoConModule  # noqa: E402
from lycoris.modules.loha import LohaModule  # noqa: E402
from lycoris.modules.lokr import LokrModule  # noqa: E402

logging.getLogger("lycoris").setLevel(logging.ERROR)

TOL = 1e-5  # relative to the largest output value
# U-Net layers: Linear (attention, feed-forward, time embedding), 3x3 convolutions, 1x1 proj_in/shortcut
UNET_LAYERS = ["attn1.to_q", "attn2.to_k", "attn2.to_v", "ff.net.2", "resnets.0.conv1", "proj_in", "time_emb_proj"]
TE_LAYERS = ["self_attn.q_proj", "self_attn.out_proj", "mlp.fc1"]


# ------------------------------------------------------------------------------------------------- helpers

_BASE: dict = {}


def fresh_models(kind: str = "sd1") -> tuple[nn.Module, nn.Module]:
    """sdengine's tiny SD1 (or SD2: Linear proj_in/proj_out) U-Net and CLIP text encoder on fixed random weights
    (built once, copied per call)."""
    if kind not in _BASE:
        unet_ref, te_ref = randomize(tiny_unet(kind), 1).eval(), randomize(tiny_clip(kind), 2).eval()
        unet = UNet(UNetConfig.from_diffusers(dict(unet_ref.config)))
        unet.load_state_dict(unet_ref.state_dict(), strict=True)
        te = CLIPTextModel.from_state_dict(state(te_ref), CLIPTextConfig.from_transformers(te_ref.config.to_dict()))
        _BASE[kind] = (unet.eval(), te.eval())
    return copy.deepcopy(_BASE[kind])


def targets(unet: nn.Module, te: nn.Module) -> list[tuple[str, nn.Module]]:
    """(kohya name, module) of the adapted layers."""
    out = []
    for comp, model, suffixes in (("unet", unet, UNET_LAYERS), ("text_encoder", te, TE_LAYERS)):
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear | nn.Conv2d) and any(name.endswith(s) for s in suffixes):
                out.append((kohya_name(comp, name), m))  # type: ignore[arg-type]
    assert any(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for _, m in out)
    return out


INPUTS: dict = {}


def inputs() -> dict:
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
def run(unet: nn.Module, te: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    i = inputs()
    return unet(i["x"], i["t"], encoder_hidden_states=i["ctx"]), te(i["ids"]).last_hidden_state


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


def oracle(cls, kwargs: dict, *, seed: int, multiplier=1.0, alpha=2.0, rank=4, on=None, kind="sd1"):
    """LyCORIS modules on a copy of the models (or on the models ``on``) with random factors: (file state dict,
    ref outputs, ref models, modules by kohya name)."""
    unet, te = fresh_models(kind) if on is None else on
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for name, m in targets(unet, te):
        mod = cls(name, m, multiplier, rank, alpha, **kwargs)
        with torch.no_grad():
            for pname, p in mod.named_parameters():
                if pname == "dora_scale":  # the magnitude: near the base norms, not equal (else DoRA is a no-op)
                    p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        mod.apply_to()
        mods[name] = mod
    sd = {}
    for name, mod in mods.items():
        own = mod.custom_state_dict()
        own = own if own is not None else {"weight": mod.weight, "on_input": mod.on_input}  # (IA)^3 has none
        for k, v in own.items():
            sd[f"{name}.{k}"] = v.detach().clone().contiguous()
    ref = run(unet, te)
    return sd, ref, (unet, te), mods


CASES = {
    "loha": (LohaModule, {}),
    "loha-tucker": (LohaModule, {"use_tucker": True}),
    "lokr": (LokrModule, {"factor": 4}),
    "lokr-decompose-both": (LokrModule, {"factor": 4, "decompose_both": True}),
    "lokr-full": (LokrModule, {"full_matrix": True}),
    "lokr-tucker": (LokrModule, {"factor": 4, "use_tucker": True}),
    "locon-tucker": (LoConModule, {"use_tucker": True}),
    "ia3": (IA3Module, {}),
    "ia3-on-input": (IA3Module, {"train_on_input": True}),
    "full": (FullModule, {}),  # `diff` and `diff_b`: the whole weight and bias differences
}
DORA_CASES = {
    "dora-lora": (LoConModule, {"weight_decompose": True}),
    "dora-loha": (LohaModule, {"weight_decompose": True}),
    "dora-lokr-in-axis": (LokrModule, {"factor": 4, "weight_decompose": True, "wd_on_out": False}),
}


def keys_of(sd: dict, part: str) -> list[str]:
    return [k for k in sd if k.endswith("." + part)]


# --------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_equal_lycoris(case):
    cls, kwargs = CASES[case]
    sd, ref, _, _ = oracle(cls, kwargs, seed=list(CASES).index(case), multiplier=0.7)
    base = run(*fresh_models())
    lf = LoRAFile.from_state_dict(sd, name=case)
    assert lf.lycoris and not lf.unknown
    assert not lf.layers or case == "locon-tucker"  # Tucker cores are on 3x3 convolutions only
    unet, te = fresh_models()
    with apply_loras(unet, te, [(lf, 0.7)]) as h:
        assert h.reports[0].complete and len(h.reports[0].matched) == len(lf.lycoris) + len(lf.layers)
        patched = run(unet, te)
        h.fuse()
        fused = run(unet, te)
    for ours, fz, r, b in zip(patched, fused, ref, base, strict=True):
        assert rel(r, b) > 1e-3  # the adapter changes the outputs: the comparison means something
        assert rel(ours, r) <= TOL
        assert rel(fz, r) <= TOL
    assert all(torch.equal(a, b) for a, b in zip(run(unet, te), base, strict=True))  # removed: exactly the base


@pytest.mark.parametrize("case", ["loha", "lokr", "locon-tucker"])
def test_an_integer_alpha_is_read_as_its_number(case):
    """A LyCORIS layer whose alpha was saved as an integer tensor (torch.tensor(2) from a trainer given an int)
    was refused ("alpha has dtype torch.int64, not floating point") while a plain LoRA layer takes one; it is the
    number, as A1111 and ComfyUI read it (.item()): the outputs equal LyCORIS' with alpha 2."""
    cls, kwargs = CASES[case]
    sd, ref, _, _ = oracle(cls, kwargs, seed=5, multiplier=0.7, alpha=2.0)
    alphas = [k for k in sd if k.endswith(".alpha") and float(sd[k]).is_integer()]  # LyCORIS writes 2.0 or r
    assert len(alphas) >= 3
    sd = {k: torch.tensor(int(v)) if k in alphas else v for k, v in sd.items()}
    unet, te = fresh_models()
    with apply_loras(unet, te, [(LoRAFile.from_state_dict(sd, name=case), 0.7)]) as h:
        assert h.reports[0].complete
        got = run(unet, te)
    for ours, r in zip(got, ref, strict=True):
        assert rel(ours, r) <= TOL


@pytest.mark.parametrize("case", ["loha", "lokr-decompose-both", "lokr-tucker", "locon-tucker", "ia3", "dora-loha"])
def test_fused_weights_equal_lycoris_merge(case):
    """alpha = rank (scale 1): LyCORIS' merge_to multiplies alpha / rank in twice for LoHa/LoKr, which agrees with
    its own forward only at scale 1."""
    cls, kwargs = {**CASES, **DORA_CASES}[case]
    sd, _, (ref_unet, ref_te), mods = oracle(cls, kwargs, seed=7, alpha=4.0)
    unet, te = fresh_models()
    with apply_loras(unet, te, [(LoRAFile.from_state_dict(sd), 1.0)]) as h:
        h.fuse()
        ours = {
            kohya_name("unet", n): m.weight for n, m in unet.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)
        }
        ours |= {kohya_name("text_encoder", n): m.weight for n, m in te.named_modules() if isinstance(m, nn.Linear)}
        for name, mod in mods.items():
            mod.restore()
            mod.merge_to(1.0)
            merged = mod.org_module[0].weight
            assert rel(ours[name], merged) <= TOL, name


@pytest.mark.parametrize("case", list(DORA_CASES))
def test_dora_outputs_equal_lycoris(case):
    cls, kwargs = DORA_CASES[case]
    sd, ref, _, _ = oracle(cls, kwargs, seed=11)
    assert keys_of(sd, "dora_scale")
    lf = LoRAFile.from_state_dict(sd)
    assert "DoRA" in " ".join(lf.algorithms)
    base = run(*fresh_models())
    unet, te = fresh_models()
    with apply_loras(unet, te, [(lf, 1.0)]) as h:
        patched = run(unet, te)
        h.fuse()
        fused = run(unet, te)
    for ours, fz, r, b in zip(patched, fused, ref, base, strict=True):
        assert rel(r, b) > 1e-3
        assert rel(ours, r) <= TOL
        assert rel(fz, r) <= TOL


@pytest.mark.parametrize("case", ["dora-loha", "lokr-tucker"])
def test_sd2_layout_equals_lycoris(case):
    """SD2's U-Net has Linear proj_in/proj_out where SD1 has 1x1 convolutions."""
    cls, kwargs = {**CASES, **DORA_CASES}[case]
    sd, ref, (ref_unet, _), _ = oracle(cls, kwargs, seed=5, kind="sd2")
    assert isinstance(next(m for n, m in ref_unet.named_modules() if n.endswith("proj_in")), nn.Linear)
    base = run(*fresh_models("sd2"))
    unet, te = fresh_models("sd2")
    with apply_loras(unet, te, [(LoRAFile.from_state_dict(sd), 1.0)]) as h:
        assert h.reports[0].complete and any(m.endswith("proj_in") for m in h.reports[0].matched)
        ours = run(unet, te)
    for o, r, b in zip(ours, ref, base, strict=True):
        assert rel(r, b) > 1e-3
        assert rel(o, r) <= TOL


def test_dora_weight_scales_the_update_linearly():
    """At weight w the layer is W + w (W_dora - W) (A1111's and ComfyUI's rule): 0 is the base, 1 is LyCORIS'."""
    sd, _, _, mods = oracle(*DORA_CASES["dora-loha"], seed=3)
    lf = LoRAFile.from_state_dict(sd)
    unet, te = fresh_models()
    base = {id(m): m.weight.detach().clone() for m in unet.modules() if isinstance(m, nn.Linear | nn.Conv2d)}
    full = {}
    with apply_loras(unet, te, [(lf, 1.0)], fuse=True):
        full = {id(m): m.weight.detach().clone() for m in unet.modules() if isinstance(m, nn.Linear | nn.Conv2d)}
    changed = [k for k in base if not torch.equal(base[k], full[k])]
    assert changed
    with apply_loras(unet, te, [(lf, 0.5)], fuse=True):
        for m in unet.modules():
            if id(m) in changed:
                want = base[id(m)] + 0.5 * (full[id(m)] - base[id(m)])
                assert rel(m.weight, want) <= TOL
    with apply_loras(unet, te, [(lf, 0.0)]):
        assert all(torch.equal(a, b) for a, b in zip(run(unet, te), run(*fresh_models()), strict=True))


def test_peft_dora_equals_peft(tmp_path, relaxed_peft_check):
    """A PEFT use_dora LoRA on the tiny diffusers U-Net, saved by diffusers, equals PEFT's own output."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    unet_ref = randomize(tiny_unet("sd1"), 1).eval()
    cfg = LoraConfig(
        r=4, lora_alpha=8, use_dora=True, init_lora_weights=False, target_modules=["to_q", "to_v", "conv1", "ff.net.2"]
    )
    unet_ref.add_adapter(cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in unet_ref.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
            elif "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    i = inputs()
    with torch.no_grad():
        ref = unet_ref(i["x"], i["t"], i["ctx"]).sample
    lora_sd = get_peft_model_state_dict(unet_ref)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=lora_sd, unet_lora_adapter_metadata=cfg.to_dict(), safe_serialization=True
    )
    path = tmp_path / "pytorch_lora_weights.safetensors"
    lf = LoRAFile.load(path)
    assert lf.format == "peft" and lf.algorithms == ["DoRA"]
    assert any("lora_magnitude_vector" in k for k in __import__("safetensors.torch").torch.load_file(path))
    unet, te = fresh_models()
    base = run(unet, te)[0]
    with apply_loras(unet, None, [(path, 1.0)]) as h:
        assert h.reports[0].complete
        ours = unet(i["x"], i["t"], encoder_hidden_states=i["ctx"])
        h.fuse()
        fused = unet(i["x"], i["t"], encoder_hidden_states=i["ctx"])
    assert rel(ref, base) > 1e-3
    assert rel(ours.detach(), ref) <= TOL
    assert rel(fused.detach(), ref) <= TOL


@pytest.fixture
def relaxed_peft_check(monkeypatch):
    import importlib.metadata

    import transformers.integrations.peft as tp
    from packaging import version

    installed = importlib.metadata.version("peft")
    if version.parse(installed) < version.parse(tp.MIN_PEFT_VERSION):
        monkeypatch.setattr(tp, "MIN_PEFT_VERSION", installed)


def dylora_oracle(seed: int, multiplier: float, *, alpha: float = 2.0, rank: int = 4, block_size: int = 2):
    """LyCORIS' DyLoraModule on every target layer, random factors: (file state dict, its update per layer).

    The file is what DyLoRA saves (``custom_state_dict``: its rank blocks joined; a convolution's up stays 2-d,
    (out, r)). The update is DyLoRA's own at its full rank, whose scale LyCORIS takes as alpha / (blocks + 1) in
    training; a file's reader (A1111, ComfyUI, LyCORIS' loader) takes alpha / rank, so it is rescaled to that."""
    unet, te = fresh_models()
    g = torch.Generator().manual_seed(seed)
    sd, deltas = {}, {}
    for name, m in targets(unet, te):
        mod = DyLoraModule(name, m, 1.0, lora_dim=rank, alpha=alpha, block_size=block_size)
        with torch.no_grad():
            for p in mod.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            for k, v in mod.custom_state_dict().items():
                sd[f"{name}.{k}"] = v.detach().clone().contiguous()
            w, _ = mod.get_diff_weight(multiplier * (mod.block_count + 1) / rank, rank=rank)
        deltas[name] = w.detach().clone()
    return sd, deltas


def test_dylora_with_convolutions_equals_lycoris():
    """A DyLoRA file's convolution layers (a 2-d up beside a 4-d down) read as A1111 and ComfyUI read them: the
    fused weights are DyLoRA's update, and the outputs those of LyCORIS' LoCon module on the same factors."""
    sd, deltas = dylora_oracle(seed=21, multiplier=0.7)
    conv_ups = [k for k, v in sd.items() if k.endswith("lora_up.weight") and v.ndim == 2 and "conv1" in k]
    assert conv_ups and sd[conv_ups[0].replace("lora_up", "lora_down")].shape[2:] == (3, 3)
    lf = LoRAFile.from_state_dict(sd, name="dylora")  # was: "down (4, 32, 3, 3) and up (32, 4) are not a LoRA pair"
    assert not lf.unknown and len(lf.layers) == len(deltas)
    ref_unet, ref_te = fresh_models()
    for name, m in targets(ref_unet, ref_te):  # the oracle: LyCORIS' LoCon on the factors (a conv up as 1x1)
        up, down, alpha = (sd[f"{name}.{k}"] for k in ("lora_up.weight", "lora_down.weight", "alpha"))
        up = up.reshape(*up.shape, 1, 1) if down.ndim == 4 else up
        mod = LoConModule.make_module_from_state_dict(name, m, up, down, None, alpha, None)
        mod.multiplier = 0.7
        mod.apply_to()
    ref, base = run(ref_unet, ref_te), run(*fresh_models())
    unet, te = fresh_models()
    before = {name: m.weight.detach().clone() for name, m in targets(unet, te)}
    with apply_loras(unet, te, [(lf, 0.7)]) as h:
        assert h.reports[0].complete and len(h.reports[0].matched) == len(deltas)
        patched = run(unet, te)
        h.fuse()
        for name, m in targets(unet, te):
            assert rel(m.weight - before[name], deltas[name]) <= TOL, name
    for ours, r, b in zip(patched, ref, base, strict=True):
        assert rel(r, b) > 1e-3
        assert rel(ours, r) <= TOL


# ------------------------------------------------------------------------------------------ stacking, fusing


def test_stacks_with_plain_lora_and_with_each_other():
    """A LoHa, a LoKr+DoRA and a plain LoRA (LyCORIS' LoCon) on the same layers equal LyCORIS with all three."""
    files = []
    ref_models = fresh_models()
    cases = [CASES["loha"], DORA_CASES["dora-lokr-in-axis"], (LoConModule, {})]
    for seed, ((cls, kwargs), w) in enumerate(zip(cases, (0.8, 1.0, 1.2), strict=True)):
        sd, ref, _, _ = oracle(cls, kwargs, seed=20 + seed, multiplier=w, on=ref_models)
        files.append(LoRAFile.from_state_dict(sd, name=f"f{seed}"))
    assert files[2].layers and not files[2].lycoris  # the plain LoRA goes through the LoRA path
    unet, te = fresh_models()
    with apply_loras(unet, te, [(files[0], 0.8), (files[1], 1.0), (files[2], 1.2)]) as h:
        both = run(unet, te)
        h.fuse()
        fused = run(unet, te)
        h.unfuse()
        h.set_weight(1, 0.0)
        without = run(unet, te)
    for k in range(2):
        assert rel(both[k], ref[k]) <= TOL
        assert rel(fused[k], ref[k]) <= TOL
    unet, te = fresh_models()
    with apply_loras(unet, te, [(files[0], 0.8), (files[2], 1.2)]):
        want = run(unet, te)
    assert all(rel(a, b) <= TOL for a, b in zip(without, want, strict=True))


def test_fuse_unfuse_restores_the_weights_bit_for_bit():
    sd, _, _, _ = oracle(*DORA_CASES["dora-lokr-in-axis"], seed=4)
    unet, te = fresh_models()
    before = {k: v.clone() for k, v in {**unet.state_dict(), **te.state_dict()}.items()}
    h = apply_loras(unet, te, [(LoRAFile.from_state_dict(sd), 1.0)], fuse=True)
    assert any(not torch.equal(before[k], v) for k, v in unet.state_dict().items())
    h.set_weight(0, 0.3)  # recomputed from the originals
    h.unfuse()
    h.remove()
    assert all(torch.equal(before[k], v) for k, v in {**unet.state_dict(), **te.state_dict()}.items())


# ------------------------------------------------------------------------------------------- file, refusals


def test_lycoris_file_loads_by_name_through_the_pipeline_paths(tmp_path, tiny_sd1_folder):
    """A LoHa file in the LoRA folder works as `<lora:name:w>` in a prompt, like a LoRA."""
    from sdengine import load_pipeline

    pipe = load_pipeline(tiny_sd1_folder)
    unet_layer = next(n for n, m in pipe.unet.named_modules() if n.endswith("attn2.to_k"))
    mod = pipe.unet.get_submodule(unet_layer)
    name = kohya_name("unet", unet_layer)
    g = torch.Generator().manual_seed(0)
    out_f, in_f = mod.weight.shape
    sd = {
        f"{name}.hada_w1_a": torch.randn(out_f, 2, generator=g),
        f"{name}.hada_w1_b": torch.randn(2, in_f, generator=g),
        f"{name}.hada_w2_a": torch.randn(out_f, 2, generator=g),
        f"{name}.hada_w2_b": torch.randn(2, in_f, generator=g),
        f"{name}.alpha": torch.tensor(1.0),
    }
    loras = tmp_path / "loras"
    loras.mkdir()
    save_safetensors(sd, loras / "myloha.safetensors")
    kw = dict(steps=2, width=64, height=64, seed=1, lora_dir=loras)
    plain = pipe("a cat", **kw).images[0]
    tagged = pipe("a cat <lora:myloha:1>", **kw)
    assert tagged.images[0].tobytes() != plain.tobytes()
    assert "myloha" in tagged.parameters["lora_hashes"]
    again = pipe("a cat", **kw).images[0]
    assert again.tobytes() == plain.tobytes()


def test_lycoris_file_for_another_architecture_is_refused(tmp_path):
    """A LoHa for a 64-wide cross attention (an SD2-like model) on the 32-wide model: the shape report."""
    unet, te = fresh_models()
    name = kohya_name("unet", next(n for n, _ in unet.named_modules() if n.endswith("attn2.to_k")))
    sd = {
        f"{name}.hada_w1_a": torch.ones(32, 2),
        f"{name}.hada_w1_b": torch.ones(2, 64),
        f"{name}.hada_w2_a": torch.ones(32, 2),
        f"{name}.hada_w2_b": torch.ones(2, 64),
    }
    with pytest.raises(LoRAError, match=r"shapes do not match this model: unet\..*attn2\.to_k \(LoHa maps 64 -> 32"):
        apply_loras(unet, te, [(LoRAFile.from_state_dict(sd), 1.0)])
    te2 = "lora_te2_text_model_encoder_layers_0_mlp_fc1"  # SDXL's second text encoder, with a fitting LoHa
    sdxl = {f"{te2}.lokr_w1": torch.ones(2, 2), f"{te2}.lokr_w2": torch.ones(4, 4)}
    sdxl |= {k: v[:, :32] if k.endswith("_b") else v for k, v in sd.items()}
    with pytest.raises(LoRAError, match="SDXL"):
        apply_loras(unet, te, [(LoRAFile.from_state_dict(sdxl), 1.0)])


def test_unknown_lycoris_keys_are_reported(caplog):
    sd, _, _, _ = oracle(*CASES["loha"], seed=2)
    sd["lora_unet_not_a_layer.hada_w1_a"] = torch.ones(4, 2)  # incomplete: no w1_b, w2_*
    sd["lora_unet_down_blocks_9_x.hada_w1_a"] = torch.ones(4, 2)
    sd["lora_unet_down_blocks_9_x.hada_w1_b"] = torch.ones(2, 4)
    sd["lora_unet_down_blocks_9_x.hada_w2_a"] = torch.ones(4, 2)
    sd["lora_unet_down_blocks_9_x.hada_w2_b"] = torch.ones(2, 4)
    lf = LoRAFile.from_state_dict(sd)
    unet, te = fresh_models()
    with caplog.at_level(logging.WARNING), apply_loras(unet, te, [(lf, 1.0)]) as h:
        r = h.reports[0]
        assert not r.complete
        assert "lora_unet_down_blocks_9_x" in r.unmatched
        assert any(u.startswith("lora_unet_not_a_layer (has hada_w1_a but no") for u in r.unmatched)
    assert "LoHa" in caplog.text and "2 unmatched" in caplog.text


def test_nothing_matching_is_an_error():
    sd = {"lora_unet_nowhere.lokr_w1": torch.ones(2, 2), "lora_unet_nowhere.lokr_w2": torch.ones(2, 2)}
    with pytest.raises(LoRAError, match="none of its 1 layers match"):
        apply_loras(*fresh_models(), [(LoRAFile.from_state_dict(sd), 1.0)])


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"hada_w1_a": torch.full((4, 2), float("nan"))}, "NaN or inf"),
        ({"hada_w1_a": torch.full((4, 2), 1e6)}, "over 1e"),
        ({"hada_w1_a": torch.ones(4, 2, dtype=torch.int64)}, "not floating point"),
        ({"hada_w1_b": torch.ones(0, 4), "hada_w1_a": torch.ones(4, 0)}, "rank 0"),
        ({"alpha": torch.ones(3)}, "alpha has 3 values"),
    ],
)
def test_bad_values_are_refused(bad, match):
    sd = {"lora_unet_x.hada_w1_a": torch.ones(4, 2), "lora_unet_x.hada_w1_b": torch.ones(2, 4)}
    sd |= {"lora_unet_x.hada_w2_a": torch.ones(4, 2), "lora_unet_x.hada_w2_b": torch.ones(2, 4)}
    sd |= {f"lora_unet_x.{k}": v for k, v in bad.items()}
    with pytest.raises(LoRAError, match=match):
        LoRAFile.from_state_dict(sd)


def test_metadata_json_is_not_needed():
    """LyCORIS writes its settings (`ss_network_args`) as metadata; sdengine reads the tensors only."""
    sd, _, _, _ = oracle(*CASES["lokr"], seed=9)
    meta = {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "lokr", "factor": "4"})}
    assert LoRAFile.from_state_dict(sd, meta).algorithms == ["LoKr"]


def test_cli_lora_flag_takes_a_lokr_file(tmp_path, tiny_sd1_folder, capsys):
    """`sdengine generate --lora FILE:W` with a LoKr file: the image changes and the infotext names the file."""
    from PIL import Image

    from sdengine.cli import main

    layer = "lora_unet_down_blocks_0_attentions_0_proj_in"
    g = torch.Generator().manual_seed(1)
    path = tmp_path / "kron.safetensors"
    save_safetensors({f"{layer}.lokr_w1": torch.randn(4, 4, generator=g), f"{layer}.lokr_w2": torch.randn(8, 8)}, path)
    common = ["--model", str(tiny_sd1_folder), "--steps", "2", "--width", "32", "--height", "32", "--no-progress"]
    assert main(["generate", "x", *common, "--out", str(tmp_path / "a")]) == 0
    assert main(["generate", "x", "--lora", f"{path}:0.8", *common, "--out", str(tmp_path / "b")]) == 0
    (a,), (b,) = sorted((tmp_path / "a").glob("*.png")), sorted((tmp_path / "b").glob("*.png"))
    with Image.open(a) as ia, Image.open(b) as ib:
        assert ia.tobytes() != ib.tobytes()
        assert "kron" in ib.info["parameters"] and "<lora:kron:0.8>" in ib.info["parameters"]
    capsys.readouterr()


def test_malformed_factor_shapes_give_named_errors():
    """Random shapes (0-d, empty, mismatched, wrong kernels) for every layout: a LoRAError, never an IndexError or
    a RuntimeError from deep inside, and never a half-patched model."""
    import random

    unet, te = fresh_models()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    name = kohya_name("unet", next(n for n, _ in unet.named_modules() if n.endswith("attn2.to_k")))
    layouts = [
        ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"],
        ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"],
        ["lokr_w1", "lokr_w2"],
        ["lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"],
        ["lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2"],
        ["weight", "on_input"],
        ["lora_down.weight", "lora_mid.weight", "lora_up.weight"],
        ["lora_down.weight", "lora_up.weight", "dora_scale"],
    ]
    shapes = [(), (0,), (3,), (32,), (2, 2), (32, 2), (2, 32), (4, 8), (8, 4), (2, 2, 3, 3), (1, 32, 1, 1), (5, 0)]
    rng = random.Random(0)
    loaded = 0
    for _ in range(400):
        sd = {f"{name}.{p}": torch.randn(rng.choice(shapes)) for p in rng.choice(layouts)}
        if f"{name}.on_input" in sd:
            sd[f"{name}.on_input"] = torch.tensor(rng.choice([0, 1]))
        if rng.random() < 0.3:
            sd[f"{name}.alpha"] = torch.randn(rng.choice([(), (1,), (2,)]))
        try:
            with apply_loras(unet, te, [(LoRAFile.from_state_dict(sd), 1.0)]) as h:
                h.fuse()
                h.unfuse()
                loaded += 1
        except LoRAError:
            pass
    assert 0 < loaded < 400
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())


def test_text_encoder_names_without_text_model_are_matched():
    """Kohya names LyCORIS writes from transformers >= 5 modules lack `text_model_` (lora_te_encoder_layers_0_...):
    once all unmatched (a warning, the text encoder left out); now the same outputs as LyCORIS."""
    sd, ref, _, _ = oracle(*CASES["loha"], seed=21)
    renamed = {k.replace("lora_te_text_model_", "lora_te_"): v for k, v in sd.items()}
    assert renamed.keys() != sd.keys()
    unet, te = fresh_models()
    with apply_loras(unet, te, [(LoRAFile.from_state_dict(renamed, name="new-names"), 1.0)]) as h:
        assert h.reports[0].complete and not h.reports[0].unmatched, h.reports[0].summary()
        for ours, r in zip(run(unet, te), ref, strict=True):
            assert rel(ours, r) <= TOL


def test_a_whole_factor_lokr_with_lycoris_huge_alpha_loads():
    """Full-rank LoKr: LyCORIS writes alpha = its 'rank' (e.g. 100000) and never uses it (scale 1); the magnitude
    limit once refused such files as hostile."""
    sd, ref, _, _ = oracle(LokrModule, {"full_matrix": True}, seed=22, alpha=1e5, rank=100000)
    assert max(float(v) for k, v in sd.items() if k.endswith(".alpha")) >= 1e5
    unet, te = fresh_models()
    with apply_loras(unet, te, [(LoRAFile.from_state_dict(sd, name="lokr-full-rank"), 1.0)]) as h:
        assert h.reports[0].complete
        for ours, r in zip(run(unet, te), ref, strict=True):
            assert rel(ours, r) <= TOL


@pytest.mark.parametrize(
    "extra, match",
    [
        ("diff", "mixes Full \\(diff\\) and LoCon \\(Tucker\\) parts in one layer"),
        ("w_norm", "mixes LoCon \\(Tucker\\) and Norm layer \\(diff\\) parts in one layer"),
    ],
)
def test_a_file_with_parts_sdengine_cannot_apply_is_refused_whole(extra, match):
    """LoCon layers beside full differences (`diff`) or norm-layer parts (`w_norm`) in the same layer: once the rest
    was applied and the part skipped with a warning (another image than the file's); now refused in one line."""
    sd, _, _, _ = oracle(*CASES["locon-tucker"], seed=23)
    name = next(iter(sd)).split(".")[0]
    sd[f"{name}.{extra}"] = torch.zeros(4)
    unet, te = fresh_models()
    with pytest.raises(LoRAError, match=match):
        apply_loras(unet, te, [(LoRAFile.from_state_dict(sd, name="mixed"), 1.0)])


@pytest.mark.parametrize(
    "layer, extra, match",
    [
        # a norm layer's 1-d diff (ComfyUI's extractor and trainer) of the wrong size, on a Linear, a LoRA on a norm
        ("lora_unet_down_blocks_0_resnets_0_norm1", {"diff": torch.zeros(31)}, "weight difference \\(31,\\)"),
        ("lora_unet_down_blocks_0_resnets_0_conv2", {"diff_b": torch.zeros(31)}, "diff_b \\(31,\\)"),
        ("lora_unet_time_embedding_linear_1", {"w_norm": torch.zeros(32)}, "norm layer's 1-d weight difference"),
        (
            "lora_unet_down_blocks_0_resnets_0_norm1",
            {f"hada_{p}": torch.zeros(32 if p[-1] == "a" else 1, 1) for p in ("w1_a", "w1_b", "w2_a", "w2_b")},
            "LoHa update on a norm",
        ),
        (
            "lora_unet_down_blocks_0_resnets_0_norm2",
            {"lora_down.weight": torch.zeros(1, 32), "lora_up.weight": torch.zeros(32, 1)},
            "a LoRA pair on a GroupNorm",
        ),
        (
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",  # a Linear without a bias
            {"diff": torch.zeros(32, 32), "diff_b": torch.zeros(32)},
            "layer without a bias",
        ),
        ("lora_unet_down_blocks_0_resnets_0_conv1", {"diff": torch.zeros(32, 32, 1, 1)}, "kernel"),
    ],
)
def test_full_differences_that_do_not_fit_are_refused_whole(layer, extra, match):
    """Full (`diff`) layers beside good ones: each misfit refuses the whole file in one line naming it."""
    sd, _, _, _ = oracle(*CASES["full"], seed=24)
    sd.update({f"{layer}.{k}": v for k, v in extra.items()})
    unet, te = fresh_models()
    with pytest.raises(LoRAError, match=match) as e:
        apply_loras(unet, te, [(LoRAFile.from_state_dict(sd, name="full"), 1.0)])
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ norm layers


def norm_oracle(seed: int, multiplier: float):
    """LyCORIS' NormModule (``w_norm``/``b_norm``) on every GroupNorm/LayerNorm of a copy of the models."""
    from lycoris.modules.norms import NormModule

    unet, te = fresh_models()
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for comp, model in (("unet", unet), ("text_encoder", te)):
        for name, m in list(model.named_modules()):
            if not isinstance(m, nn.GroupNorm | nn.LayerNorm):
                continue
            key = kohya_name(comp, name)  # type: ignore[arg-type]
            mod = NormModule(key, m, multiplier)
            with torch.no_grad():
                for p in mod.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            mod.apply_to()
            sd.update({f"{key}.{k}": v.detach().clone() for k, v in mod.state_dict().items()})
    return sd, run(unet, te)


def test_norm_layers_equal_lycoris_patched_fused_and_removed_exactly():
    """LyCORIS norm training (`w_norm`/`b_norm` on every GroupNorm and LayerNorm of the U-Net and the text encoder):
    once refused whole; now patched and fused with LyCORIS' outputs, the weight changeable, removed bit for bit."""
    sd, ref = norm_oracle(seed=30, multiplier=0.7)
    assert keys_of(sd, "w_norm") and keys_of(sd, "b_norm")
    base = run(*fresh_models())
    lf = LoRAFile.from_state_dict(sd, name="norms")
    assert lf.algorithms == ["Norm layer (diff)"] and not lf.unknown and not lf.unsupported
    unet, te = fresh_models()
    before = {k: v.clone() for k, v in {**unet.state_dict(), **te.state_dict()}.items()}
    h = apply_loras(unet, te, [(lf, 0.35)])
    assert h.reports[0].complete and len(h.reports[0].matched) == len(keys_of(sd, "w_norm"))
    h.set_weight(0, 0.7)  # patched: the next forward uses the new weight
    patched = run(unet, te)
    h.fuse()
    fused = run(unet, te)
    h.set_weight(0, 0.0)  # fused at weight 0: the base model's weights again
    assert all(torch.equal(before[k], v) for k, v in {**unet.state_dict(), **te.state_dict()}.items())
    h.set_weight(0, 0.7)
    h.unfuse()
    assert all(torch.equal(before[k], v) for k, v in {**unet.state_dict(), **te.state_dict()}.items())
    h.remove()
    for ours, fz, r, b in zip(patched, fused, ref, base, strict=True):
        assert rel(r, b) > 1e-2  # the norm differences change the outputs
        assert rel(ours, r) <= TOL
        assert rel(fz, r) <= TOL
    assert all(torch.equal(a, b) for a, b in zip(run(unet, te), base, strict=True))


def test_comfyui_extracted_file_with_bias_differences_equals_the_hand_computation():
    """ComfyUI's LoRA extractor with `bias_diff` on (its default) writes, in its own names, a LoRA pair and a
    `diff_b` for each Linear/Conv layer with a bias and a 1-d `diff` / `diff_b` for each norm layer; ComfyUI's
    loader adds each `diff` to its weight and each `diff_b` to its bias (times the strength). Once refused whole."""
    from sdengine.weights.lora import unet_ldm_names

    unet, te = fresh_models()
    ldm = unet_ldm_names(unet)
    g = torch.Generator().manual_seed(31)
    m = 0.6
    sd: dict[str, torch.Tensor] = {}
    want_unet, want_te = fresh_models()  # the hand computation: the weights changed in place
    want = dict(want_unet.named_modules())
    want_te_mods = dict(want_te.named_modules())
    picks = {
        "down_blocks.0.resnets.0.norm1": "norm",  # GroupNorm (LDM in_layers.0)
        "down_blocks.0.attentions.0.transformer_blocks.0.norm1": "norm",  # LayerNorm
        "down_blocks.0.resnets.0.conv1": "lora",  # a 3x3 convolution with a bias
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2": "lora",  # a Linear with a bias
    }
    with torch.no_grad():
        for name, kind in picks.items():
            key, mod = f"diffusion_model.{ldm[name]}", want[name]
            db = torch.randn(mod.bias.shape, generator=g) * 0.3
            sd[f"{key}.diff_b"] = db
            mod.bias += m * db
            if kind == "norm":
                dw = torch.randn(mod.weight.shape, generator=g) * 0.3
                sd[f"{key}.diff"] = dw
                mod.weight += m * dw
            else:
                w = mod.weight
                down = torch.randn(2, *w.shape[1:], generator=g) * 0.3
                up = torch.randn(w.shape[0], 2, *[1] * (w.ndim - 2), generator=g) * 0.3
                sd.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up})
                w += m * torch.einsum("or,ri...->oi...", up.flatten(1), down)
        te_name = "text_model.encoder.layers.0.layer_norm1"
        te_mod = want_te_mods[te_name]
        dw, db = (torch.randn(te_mod.weight.shape, generator=g) * 0.3 for _ in range(2))
        key = f"text_encoders.clip_l.transformer.{te_name}"
        sd.update({f"{key}.diff": dw, f"{key}.diff_b": db})
        te_mod.weight += m * dw
        te_mod.bias += m * db
    assert te_name in dict(te.named_modules())
    ref, base = run(want_unet, want_te), run(unet, te)
    lf = LoRAFile.from_state_dict(sd, name="ComfyUI_extracted_lora")
    assert not lf.unknown and not lf.unsupported
    before = {k: v.clone() for k, v in {**unet.state_dict(), **te.state_dict()}.items()}
    with apply_loras(unet, te, [(lf, m)]) as h:
        assert h.reports[0].complete and len(h.reports[0].matched) == len(picks) + 1
        patched = run(unet, te)
        h.fuse()
        fused = run(unet, te)
        h.unfuse()
        assert all(torch.equal(before[k], v) for k, v in {**unet.state_dict(), **te.state_dict()}.items())
    for ours, fz, r, b in zip(patched, fused, ref, base, strict=True):
        assert rel(r, b) > 1e-3
        assert rel(ours, r) <= TOL
        assert rel(fz, r) <= TOL
    assert all(torch.equal(a, b) for a, b in zip(run(unet, te), base, strict=True))


# ------------------------------------------------------------------------------------------------------ GLoRA


@pytest.mark.parametrize("layout", ["lycoris", "lycoris-weight-forward", "old"])
def test_glora_equals_lycoris_in_both_layouts(layout):
    """GLoRA (`a1`, `a2`, `b1`, `b2`: dW = W a1 a2 + b1 b2, times alpha / rank) on Linear layers, 3x3 and 1x1
    convolutions: once refused; now equal to LyCORIS' GLoRAModule (its bypass forward W(x + A x) + B x, the
    module's defining form, and its rebuilt-weight forward), patched and fused. The older layout (ComfyUI reads
    it as b2 b1 + W a2 a1) holds the same factors under swapped names, square layers included (ComfyUI's layout
    test)."""
    from lycoris.modules.glora import GLoRAModule

    bypass = layout != "lycoris-weight-forward"
    sd, ref, _, _ = oracle(GLoRAModule, {"bypass_mode": bypass}, seed=40, multiplier=0.7)
    if layout == "old":
        swap = {"a1.weight": "a2.weight", "a2.weight": "a1.weight", "b1.weight": "b2.weight", "b2.weight": "b1.weight"}
        sd = {f"{k.split('.', 1)[0]}.{swap.get(k.split('.', 1)[1], k.split('.', 1)[1])}": v for k, v in sd.items()}
    base = run(*fresh_models())
    lf = LoRAFile.from_state_dict(sd, name=f"glora-{layout}")
    assert lf.algorithms == ["GLoRA"] and not lf.unknown and not lf.unsupported
    unet, te = fresh_models()
    with apply_loras(unet, te, [(lf, 0.7)]) as h:
        assert h.reports[0].complete and len(h.reports[0].matched) == len(lf.lycoris)
        patched = run(unet, te)
        h.fuse()
        fused = run(unet, te)
    for ours, fz, r, b in zip(patched, fused, ref, base, strict=True):
        assert rel(r, b) > 1e-3
        assert rel(ours, r) <= TOL
        assert rel(fz, r) <= TOL
    assert all(torch.equal(a, b) for a, b in zip(run(unet, te), base, strict=True))


def test_glora_that_does_not_fit_and_a_tucker_glora_are_refused():
    """GLoRA factors of another layer's size are an error naming the layer, and so is a Tucker core (`bm.weight`)
    that does not fit its layer's factors (a Tucker GLoRA that fits is read: the test below)."""
    from lycoris.modules.glora import GLoRAModule

    sd, _, _, _ = oracle(GLoRAModule, {"bypass_mode": True}, seed=41)
    layer = next(k for k in sd if "time_emb_proj" in k).split(".")[0]  # a Linear of the file
    bad = dict(sd)
    bad[f"{layer}.a1.weight"] = torch.zeros(7, 4)
    bad[f"{layer}.a2.weight"] = torch.zeros(4, 7)
    bad[f"{layer}.b2.weight"] = torch.zeros(4, 7)
    unet, te = fresh_models()
    with pytest.raises(LoRAError, match="GLoRA factors .* do not fit a layer of weight") as e:
        apply_loras(unet, te, [(LoRAFile.from_state_dict(bad, name="glora"), 1.0)])
    assert "time_emb_proj" in str(e.value)
    # a Tucker core beside a 3x3 b2 (the kernel twice): refused by name, the layer and its factors in the message
    tucker = {**sd, "lora_unet_down_blocks_0_resnets_0_conv1.bm.weight": torch.zeros(4, 4, 3, 3)}
    with pytest.raises(LoRAError, match=r"resnets.0.conv1 \(GLoRA factors .*bm \(4, 4, 3, 3\) do not fit"):
        apply_loras(unet, te, [(LoRAFile.from_state_dict(tucker, name="glora"), 1.0)])
    flat = {**sd, "lora_unet_down_blocks_0_resnets_0_conv1.bm.weight": torch.zeros(4, 4)}
    with pytest.raises(LoRAError, match=r"GLoRA Tucker core bm \(4, 4\) is not \(r, r, kh, kw\)"):
        LoRAFile.from_state_dict(flat, name="glora")


def test_glora_with_a_tucker_core_equals_the_chain_of_convolutions():
    """GLoRA with a Tucker core (`bm.weight` (r, r, kh, kw) between 1x1 `b2` and `b1`, LyCORIS' use_tucker) was
    refused; now read. The fused layer's output equals GLoRA's definition run as convolutions here:
    W x + w s (W (a1 (a2 x)) + b1 (bm (b2 x))), s = alpha / rank."""
    g = torch.Generator().manual_seed(62)
    unet, te, name = layers_alone(g), None, "conv"
    conv = unet.get_submodule(name)
    r = 4
    f = {
        "a1.weight": torch.randn(32, r, 1, 1, generator=g) * 0.3,
        "a2.weight": torch.randn(r, 32, 1, 1, generator=g) * 0.3,
        "b1.weight": torch.randn(32, r, 1, 1, generator=g) * 0.3,
        "b2.weight": torch.randn(r, 32, 1, 1, generator=g) * 0.3,
        "bm.weight": torch.randn(r, r, 3, 3, generator=g) * 0.3,
    }
    sd = {f"lora_unet_{name}.{k}": v for k, v in {**f, "alpha": torch.tensor(2.0)}.items()}
    x = torch.randn(2, 32, 6, 6, generator=g)
    w, s = conv.weight.detach(), 2.0 / r
    a_term = F.conv2d(F.conv2d(F.conv2d(x, f["a2.weight"]), f["a1.weight"]), w, padding=1)
    b_term = F.conv2d(F.conv2d(F.conv2d(x, f["b2.weight"]), f["bm.weight"], padding=1), f["b1.weight"])
    want = conv(x) + 0.7 * s * (a_term + b_term)
    lf = LoRAFile.from_state_dict(sd, name="glora-tucker")
    assert lf.algorithms == ["GLoRA"] and not lf.unsupported
    with apply_loras(unet, te, [(lf, 0.7)]) as h:
        patched = conv(x)
        h.fuse()
        fused = conv(x)
    assert rel(want, conv(x)) > 1e-2
    assert rel(patched, want) <= TOL and rel(fused, want) <= TOL


# -------------------------------------------------------------------------------------------------- OFT, BOFT


def cayley_by_solve(blocks: torch.Tensor) -> torch.Tensor:
    """R = (I - Q)^-1 (I + Q) (the same matrix: the two factors commute) by a solve, per block."""
    q = blocks.double() - blocks.double().transpose(-1, -2)
    eye = torch.eye(q.shape[-1], dtype=torch.float64).expand_as(q)
    return torch.linalg.solve(eye - q, eye + q)


def butterfly_perm(rows: int, half_run: int) -> torch.Tensor:
    """The butterfly permutation of a stage: in each run of 2k rows, row j and row j + k become neighbours."""
    order = [c + g * half_run + j for c in range(0, rows, 2 * half_run) for j in range(half_run) for g in range(2)]
    return torch.eye(rows, dtype=torch.float64)[order]


def layers_alone(g: torch.Generator) -> nn.Module:
    """A U-Net stand-in of three layers (a LoRA file names them lora_unet_<name>): Linear 32 -> 32, a 3x3
    convolution 32 -> 32 and a Linear 128 -> 32, on random weights."""
    holder = nn.Module()
    holder.to_q, holder.conv, holder.ff = nn.Linear(32, 32), nn.Conv2d(32, 32, 3, padding=1), nn.Linear(128, 32)
    with torch.no_grad():
        for p in holder.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return holder.eval()


def fused_weight(unet, te, sd, weight, names):
    with apply_loras(unet, te, [(LoRAFile.from_state_dict(sd, name="oft"), weight)]) as h:
        assert h.reports[0].complete
        h.fuse()
        return {n: unet.get_submodule(n).weight.detach().clone() for n in names}


def test_oft_and_boft_equal_the_formulas_and_rotate_the_rows():
    """OFT (`oft_blocks` (n, b, b)) and BOFT (`oft_blocks` (m, n, b, b)) were refused; now read. Checked against
    the formulas computed here another way (Cayley transform by a solve, R block-diagonal, BOFT's butterfly
    permutations as matrices, in float64): W' = rescale * R^T W for OFT (kohya's `oft_unet_` names, LyCORIS'
    `lora_unet_`), the product of the stages for BOFT; the constraint alpha * out bounds ||Q||; the update at weight
    w is w (W' - W); without rescale each input column keeps its norm (R is orthogonal)."""
    g = torch.Generator().manual_seed(60)
    unet, te = layers_alone(g), None
    q_name, conv_name, ff_name = "to_q", "conv", "ff"
    base = {n: unet.get_submodule(n).weight.detach().double() for n in (q_name, conv_name, ff_name)}
    assert [tuple(b.shape) for b in base.values()] == [(32, 32), (32, 32, 3, 3), (32, 128)]
    oft = torch.randn(8, 4, 4, generator=g) * 0.3  # 8 blocks of 4 rows
    boft = torch.randn(3, 8, 4, 4, generator=g) * 0.3  # 3 butterfly stages of 8 blocks of 4 rows
    rescale = 1 + 0.2 * torch.randn(32, 1, 1, 1, generator=g)
    sd = {
        f"oft_unet_{q_name.replace('.', '_')}.oft_blocks": oft,  # kohya's OFT: its own prefix, alpha 0: no bound
        f"oft_unet_{q_name.replace('.', '_')}.alpha": torch.tensor(0.0),
        f"{kohya_name('unet', conv_name)}.oft_blocks": boft,
        f"{kohya_name('unet', conv_name)}.rescale": rescale,
        f"{kohya_name('unet', ff_name)}.oft_blocks": oft,
        f"{kohya_name('unet', ff_name)}.alpha": torch.tensor(1e-3),  # a bound of 1e-3 * 32 on ||Q||
    }
    assert LoRAFile.from_state_dict(sd).algorithms == ["BOFT", "OFT"]
    w = fused_weight(unet, te, sd, 0.7, base)

    r = torch.block_diag(*cayley_by_solve(oft))
    assert torch.allclose(r @ r.T, torch.eye(32, dtype=torch.float64), atol=1e-12)
    want_q = r.T @ base[q_name]
    assert torch.allclose(w[q_name].double(), base[q_name] + 0.7 * (want_q - base[q_name]), atol=1e-5)
    at_one = fused_weight(unet, te, sd, 1.0, base)  # (the first is removed: the model is the base again)
    assert torch.allclose(at_one[q_name].double().norm(dim=0), base[q_name].norm(dim=0), atol=1e-5)  # a rotation
    assert (at_one[q_name].double() - base[q_name]).abs().max() > 0.1

    flat = base[conv_name].flatten(1)
    for i in range(3):  # stage i rotates runs of 4 rows after pairing rows 2^i * 2 apart
        p = butterfly_perm(32, 2**i * 2)
        flat = p.T @ torch.block_diag(*cayley_by_solve(boft[i])) @ p @ flat
    want_conv = rescale.double().reshape(32, 1) * flat
    got_conv, base_conv = w[conv_name].double().flatten(1), base[conv_name].flatten(1)
    assert torch.allclose(got_conv, base_conv + 0.7 * (want_conv - base_conv), atol=1e-5)

    q = oft.double() - oft.double().transpose(-1, -2)
    bound = 1e-3 * 32
    assert q.norm() > bound  # the constraint acts
    q = q * bound / (q.norm() + 1e-8)
    eye = torch.eye(4, dtype=torch.float64).expand_as(q)
    r_bounded = torch.block_diag(*torch.linalg.solve(eye - q, eye + q))
    assert torch.allclose(at_one[ff_name].double(), r_bounded.T @ base[ff_name], atol=1e-5)


@pytest.mark.parametrize("algo", ["oft", "boft"])
def test_oft_and_boft_equal_lycoris(algo):
    """LyCORIS' DiagOFTModule and ButterflyOFTModule (constraint 0.01, so alpha * out bounds ||Q||, and rescale on)
    on the tiny U-Net and text encoder, their state dicts as the file: sdengine's outputs, patched and fused, equal
    LyCORIS' (weight 1; the layers whose width LyCORIS cannot split into butterfly blocks are left out, as its
    trainer would refuse them)."""
    from lycoris.modules.boft import ButterflyOFTModule
    from lycoris.modules.diag_oft import DiagOFTModule

    cls = DiagOFTModule if algo == "oft" else ButterflyOFTModule
    unet, te = fresh_models()
    g = torch.Generator().manual_seed(61)
    mods = {}
    for name, m in targets(unet, te):
        if m.weight.shape[0] % 4:  # (37-wide text-encoder layers)
            continue
        mod = cls(name, m, 1.0, 4, 1, constraint=0.01, rescaled=True)
        with torch.no_grad():
            for pname, p in mod.named_parameters():
                noise = torch.randn(p.shape, generator=g)
                p.copy_(1 + 0.2 * noise if pname == "rescale" else 0.3 * noise)
        mod.apply_to()
        mods[name] = mod
    sd = {f"{name}.{k}": v.detach().clone() for name, mod in mods.items() for k, v in mod.state_dict().items()}
    assert {k.rsplit(".", 1)[1] for k in sd} == {"oft_blocks", "rescale", "alpha"}
    ref = run(unet, te)
    base = run(*fresh_models())
    lf = LoRAFile.from_state_dict(sd, name=algo)
    assert lf.algorithms == [algo.upper()] and not lf.unknown
    unet, te = fresh_models()
    with apply_loras(unet, te, [(lf, 1.0)]) as h:
        assert h.reports[0].complete and len(h.reports[0].matched) == len(mods)
        patched = run(unet, te)
        h.fuse()
        fused = run(unet, te)
    for ours, fz, r, b in zip(patched, fused, ref, base, strict=True):
        assert rel(r, b) > 1e-2
        assert rel(ours, r) <= TOL
        assert rel(fz, r) <= TOL
    assert all(torch.equal(a, b) for a, b in zip(run(unet, te), base, strict=True))


@pytest.mark.parametrize(
    "parts, match",
    [
        ({"oft_blocks": torch.zeros(6, 4, 4)}, r"to_q \(OFT maps \? -> 24, layer 32 -> 32\)"),
        ({"oft_blocks": torch.zeros(8, 4, 3)}, r"oft_blocks \(8, 4, 3\) are not square blocks"),
        ({"oft_blocks": torch.zeros(32, 4)}, r"oft_blocks \(32, 4\) are neither OFT's \(n, b, b\) nor BOFT's"),
        ({"oft_blocks": torch.zeros(2, 8, 3, 3)}, r"BOFT blocks pair rows, their size must be even"),
        ({"oft_blocks": torch.zeros(5, 8, 4, 4)}, r"to_q \(BOFT factors oft_blocks \(5, 8, 4, 4\) do not fit a layer"),
        (
            {"oft_blocks": torch.zeros(8, 4, 4), "rescale": torch.ones(16, 1)},
            r"rescale \(16, 1\) does not scale the 32 rows of oft_blocks",
        ),
        ({"oft_blocks": torch.full((8, 4, 4), float("nan"))}, r"NaN or inf values in lora_unet_to_q \(oft_blocks\)"),
    ],
)
def test_oft_that_does_not_fit_is_refused(parts, match):
    """OFT/BOFT blocks of another width, of a shape neither reads, odd BOFT blocks (its stages pair rows), more
    butterfly stages than the width holds (5 stages of 4-row blocks need 64 rows), a rescale of another size, NaN:
    each one line naming the layer or the part, nothing applied."""
    unet = layers_alone(torch.Generator().manual_seed(63))
    before = unet.to_q.weight.detach().clone()
    sd = {f"lora_unet_to_q.{k}": v for k, v in parts.items()} | {"lora_unet_ff.oft_blocks": torch.zeros(8, 4, 4)}
    with pytest.raises(LoRAError, match=match) as e:
        apply_loras(unet, None, [(LoRAFile.from_state_dict(sd, name="oft"), 1.0)])
    assert "\n" not in str(e.value)
    assert torch.equal(unet.to_q.weight, before)


def oft_boft_file(g: torch.Generator) -> LoRAFile:
    """OFT on to_q and ff, BOFT (3 stages) with a rescale on the 3x3 convolution of `layers_alone`."""
    sd = {
        "lora_unet_to_q.oft_blocks": torch.randn(8, 4, 4, generator=g) * 0.3,
        "lora_unet_conv.oft_blocks": torch.randn(3, 8, 4, 4, generator=g) * 0.3,
        "lora_unet_conv.rescale": 1 + 0.2 * torch.randn(32, 1, 1, 1, generator=g),
        "lora_unet_ff.oft_blocks": torch.randn(8, 4, 4, generator=g) * 0.3,
        "lora_unet_ff.alpha": torch.tensor(1e-3),
    }
    return LoRAFile.from_state_dict(sd, name="ortho")


@torch.no_grad()
def run_layers(holder: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    return [holder.to_q(x[..., :32]), holder.conv(x.reshape(1, 32, 4, 4)), holder.ff(x.repeat(1, 4))]


def test_oft_update_is_built_once_per_weight_and_is_the_uncached_result_bit_for_bit(monkeypatch):
    """OFT/BOFT (and every LyCORIS update) rebuilt its dense dW (Cayley transform, rotation, butterfly) at every
    forward: an OFT image cost ~1.5x one at weight 0. The update is now kept per layer and weight: built once for
    many forwards, rebuilt after set_weight, a change of the base weight (in place, or moved to another dtype),
    never at weight 0; each output is bit-for-bit the uncached computation, base(x) + (multiplier * dW)(x)."""
    builds: list[int] = []
    real = LycorisLayer.delta_weight

    def counted(self):
        builds.append(id(self))
        return real(self)

    monkeypatch.setattr(LycorisLayer, "delta_weight", counted)
    g = torch.Generator().manual_seed(64)
    holder, lf = layers_alone(g), oft_boft_file(g)
    x = torch.randn(16, 32, generator=g)
    base = run_layers(holder, x)
    with apply_loras(holder, None, [(lf, 0.8)]) as h:
        first = run_layers(holder, x)
        assert len(builds) == 3
        for _ in range(3):
            again = run_layers(holder, x)
            assert all(torch.equal(a, b) for a, b in zip(again, first, strict=True))
        assert len(builds) == 3  # built once per layer, not per forward
        deltas = {tuple(layer.delta_weight().shape): layer.delta_weight() for layer in h.loras[0].layers}
        want = [  # the uncached computation, by hand (the three layers' weights differ in shape)
            base[0] + F.linear(x[..., :32], deltas[(32, 32)]),
            base[1] + F.conv2d(x.reshape(1, 32, 4, 4), deltas[(32, 32, 3, 3)], None, 1, 1),
            base[2] + F.linear(x.repeat(1, 4), deltas[(32, 128)]),
        ]
        assert all(torch.equal(a, w) for a, w in zip(first, want, strict=True))
        builds.clear()
        h.set_weight(0, 0.0)
        assert all(torch.equal(a, b) for a, b in zip(run_layers(holder, x), base, strict=True)) and not builds
        h.set_weight(0, 0.3)
        at_03 = run_layers(holder, x)
        assert len(builds) == 3
        kept = holder.ff.weight.detach().clone()
        with torch.no_grad():
            holder.ff.weight.mul_(1.5)  # the base weight changed in place: the updates built from it are stale
        changed = run_layers(holder, x)
        assert len(builds) == 4  # (only ff's)
        with torch.no_grad():
            holder.ff.weight.copy_(kept)
    with apply_loras(holder, None, [(lf, 0.3)]):
        fresh = run_layers(holder, x)  # a fresh load at 0.3: what set_weight gave
    assert all(torch.equal(a, b) for a, b in zip(at_03, fresh, strict=True))
    assert not torch.equal(changed[2], at_03[2])
    holder.double()
    with apply_loras(holder, None, [(lf, 0.3)]) as h:
        fresh64 = run_layers(holder, x.double())
    with apply_loras(holder, None, [(lf, 0.3)]) as h:
        holder.float()
        run_layers(holder, x)  # built in float32
        holder.double()  # moved: the updates are rebuilt in float64
        assert all(torch.equal(a, b) for a, b in zip(run_layers(holder, x.double()), fresh64, strict=True))
