"""Fused query/key/value projections (sdengine.nn.attention.enable_fused_qkv, fast-path option ``fused_qkv``).

The reference is always the same module run with its three separate products (fusion off, or a deep copy that
never had it): the fused product computes the same rows of the same matrix products, so outputs agree to fp32
rounding. The traps checked: the stacked weight going stale after a weight change of any kind (in place, swapped
by LoRA fusing, re-weighting, unfusing, ``.to()``, a copy), hooks that must see their own layer's call, and
gradients in training.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import sdengine
from sdengine.fastpath import apply_fast_path, parse_options
from sdengine.nn.attention import (
    Attention,
    SpatialSelfAttention,
    clear_fused_cache,
    enable_fused_qkv,
    fused_qkv_layers,
    identity_attention,
)
from sdengine.weights import load_safetensors, save_safetensors


def _perturbed(m: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return m.eval()


def _fused_used(m: Attention) -> set[str]:
    return set(m._fused_cache)


def attn_layers(module: nn.Module) -> list[Attention]:
    return [m for m in module.modules() if isinstance(m, Attention)]


def _max(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("upcast", [False, True])
def test_fused_self_and_cross_attention_equal_the_separate_products(upcast):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 37, 48, generator=g)
    ctx = torch.randn(2, 7, 24, generator=g)
    self_attn = _perturbed(Attention(48, 4, 12, upcast=upcast), 1)
    cross = _perturbed(Attention(48, 4, 12, cross_attention_dim=24, upcast=upcast), 2)
    spatial = _perturbed(SpatialSelfAttention(32, 2, norm_groups=8), 3)  # the VAE's: biases on q, k and v
    img = torch.randn(2, 32, 5, 6, generator=g)
    with torch.no_grad():
        ref = self_attn(x), cross(x, ctx), spatial(img)
        assert enable_fused_qkv(self_attn) == enable_fused_qkv(cross) == enable_fused_qkv(spatial) == 1
        got = self_attn(x), cross(x, ctx), spatial(img)
    assert _fused_used(self_attn) == {"qkv"} and _fused_used(cross) == {"kv"}
    assert _fused_used(spatial) == {"qkv"}
    for r, o in zip(ref, got, strict=True):
        assert _max(r, o) <= 1e-6, _max(r, o)
    # an attention mask and perturbed-attention guidance's identity rows take the fused path too
    mask = torch.randn(2, 1, 37, 37, generator=g)
    with torch.no_grad():
        enable_fused_qkv(self_attn, False)
        assert not _fused_used(self_attn)
        with identity_attention([self_attn], 1):
            ref_pag = self_attn(x, mask=mask)
        enable_fused_qkv(self_attn)
        with identity_attention([self_attn], 1):
            got_pag = self_attn(x, mask=mask)
    assert _max(ref_pag, got_pag) <= 1e-6


def test_every_kind_of_weight_change_reaches_the_fused_product():
    """In place (``load_state_dict``, ``mul_``), swapped (``weight.data = ...``), moved (``.to``), copied (a
    deep copy, as ControlNet makes): each time the fused layer equals a never-fused twin with the same weights."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 20, 16, generator=g)
    fused = _perturbed(Attention(16, 2, 8, bias=True), 5)
    plain = copy.deepcopy(fused)
    enable_fused_qkv(fused)

    def same(a: nn.Module = fused, b: nn.Module = plain, inp: torch.Tensor = x) -> float:
        with torch.no_grad():
            return _max(a(inp), b(inp))

    assert same() <= 1e-6
    new = {k: v + 0.05 for k, v in plain.state_dict().items()}
    plain.load_state_dict(new)
    fused.load_state_dict(new)  # copies into the same tensors: only the version counters move
    assert same() <= 1e-6
    with torch.no_grad():
        for m in (fused, plain):
            m.to_v.weight.mul_(-2.0)
            m.to_k.bias.add_(1.0)
    assert same() <= 1e-6
    for m in (fused, plain):
        m.to_q.weight.data = m.to_q.weight.data * 0.5  # a new tensor, as LoRA fusing swaps it
    assert same() <= 1e-6
    fused64, plain64 = fused.to(torch.float64), plain.to(torch.float64)
    assert same(fused64, plain64, x.double()) <= 1e-12
    twin = copy.deepcopy(fused64)
    with torch.no_grad():
        twin.to_k.weight.mul_(3.0)
        plain_twin = copy.deepcopy(plain64)
        plain_twin.to_k.weight.mul_(3.0)
    assert same(twin, plain_twin, x.double()) <= 1e-12
    assert same(fused64, plain64, x.double()) <= 1e-12  # the original untouched by its copy's change
    # the one change no version counter sees: through .data in place; clear_fused_cache is the documented remedy
    for m in (fused64, plain64):
        m.to_v.weight.data.mul_(0.25)
    assert same(fused64, plain64, x.double()) > 1e-3  # stale, as documented
    clear_fused_cache(fused64)
    assert same(fused64, plain64, x.double()) <= 1e-12


def test_a_forward_hook_sees_its_own_call_and_fp8_layers_fall_back():
    x = torch.randn(1, 9, 16)
    m = _perturbed(Attention(16, 2, 8), 6)
    enable_fused_qkv(m)
    seen = []
    h = m.to_k.register_forward_hook(lambda mod, args, out: seen.append(out.shape) or out * 2)
    plain = copy.deepcopy(m)
    enable_fused_qkv(plain, False)
    with torch.no_grad():
        got, ref = m(x), plain(x)
    assert len(seen) == 2 and _max(got, ref) <= 1e-6 and not _fused_used(m)  # the hook ran, the product did not fuse
    h.remove()
    from sdengine.nn import fp8

    net = nn.Sequential()
    net.add_module("transformer_blocks", nn.ModuleList([_perturbed(Attention(16, 2, 8), 7)]))
    assert fp8.to_fp8(net) == 4
    with torch.no_grad():
        ref = net[0][0](x)
        enable_fused_qkv(net)
        assert _max(net[0][0](x), ref) == 0.0  # the fp8 layers run as they are


def test_gradients_flow_to_the_separate_weights_when_training():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 11, 16, generator=g)
    ctx = torch.randn(2, 5, 8, generator=g)
    a = _perturbed(Attention(16, 2, 8), 9)
    c = _perturbed(Attention(16, 2, 8, cross_attention_dim=8), 10)
    grads = []
    for on in (False, True):
        enable_fused_qkv(a, on)
        enable_fused_qkv(c, on)
        a.zero_grad()
        c.zero_grad()
        (a(x).square().sum() + c(x, ctx).square().sum()).backward()
        grads.append([p.grad.clone() for p in (*a.parameters(), *c.parameters())])
        assert not _fused_used(a)  # a live stack while training, never a cache
    for r, f in zip(*grads, strict=True):
        assert _max(r, f) <= 1e-5


@pytest.fixture(scope="module")
def tiny_pipes(tiny_sd1_folder):
    plain = sdengine.load_pipeline(str(tiny_sd1_folder), fast_path="none")
    fused = sdengine.load_pipeline(str(tiny_sd1_folder), fast_path="fused_qkv")
    return plain, fused


KW = dict(prompt="a red apple", width=32, height=32, steps=4, sampler="euler", cfg_scale=7.5, seed=3, progress=False)


def test_a_tiny_sd1_image_is_the_same_with_fused_projections(tiny_pipes):
    plain, fused = tiny_pipes
    layers = fused_qkv_layers(fused.unet)
    assert layers > 0 and fused_qkv_layers(plain.unet) == 0
    ref = plain(**KW).arrays.astype("float64")  # 0..1
    got = fused(**KW).arrays.astype("float64")
    used = [m for m in fused.unet.modules() if isinstance(m, Attention) and _fused_used(m)]
    assert len(used) == layers  # every attention of the U-Net ran fused
    assert abs(ref - got).mean() <= 1e-5


def _lora_file(unet: nn.Module, path, seed: int, kind: str = "lora"):
    """A kohya LoRA (rank 2), or a LyCORIS LoHa (``kind="loha"``), on every attention's q, k and v projection."""
    from sdengine.weights.lora_keys import kohya_name

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in unet.named_modules():
        if isinstance(m, nn.Linear) and name.endswith(("to_q", "to_k", "to_v")):
            key = kohya_name("unet", name)
            if kind == "loha":  # delta = (w1_a w1_b) * (w2_a w2_b) * alpha / rank, elementwise
                for w in ("w1", "w2"):
                    out[f"{key}.hada_{w}_a"] = torch.randn(m.out_features, 2, generator=g) * 0.7
                    out[f"{key}.hada_{w}_b"] = torch.randn(2, m.in_features, generator=g) * 0.7
            else:
                out[f"{key}.lora_down.weight"] = torch.randn(2, m.in_features, generator=g) * 0.5
                out[f"{key}.lora_up.weight"] = torch.randn(m.out_features, 2, generator=g) * 0.5
            out[f"{key}.alpha"] = torch.tensor(2.0)
    save_safetensors(out, path)
    return path


@pytest.mark.parametrize("kind", ["lora", "loha"])
def test_lora_applied_reweighted_fused_and_removed_while_fused(tiny_pipes, tmp_path, kind):
    """The stale-weight trap: a LoRA (or a LyCORIS LoHa) patched (hooks: the separate products run), fused into
    the weights (the stack is rebuilt from them), re-weighted while fused, unfused and removed; at every stage the
    fused pipeline's U-Net equals the plain pipeline's with the same LoRA, and after removal the base output again."""
    from sdengine.weights.lora import apply_loras

    plain, fused = tiny_pipes
    path = _lora_file(plain.unet, tmp_path / f"qkv_{kind}.safetensors", 12, kind)
    g = torch.Generator().manual_seed(13)
    x = torch.randn(2, 4, 4, 4, generator=g)
    t = torch.tensor([999.0, 300.0])
    ctx = torch.randn(2, 77, plain.unet.config.cross_attention_dim, generator=g)

    def outputs() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return plain.unet(x, t, encoder_hidden_states=ctx), fused.unet(x, t, encoder_hidden_states=ctx)

    base, base_fused = outputs()
    assert _max(base, base_fused) <= 1e-5
    hp = apply_loras(plain.unet, None, [(path, 0.8)], part="unet")
    hf = apply_loras(fused.unet, None, [(path, 0.8)], part="unet")
    report = hf.reports[0]
    assert report.complete and len(report.matched) == 3 * len(attn_layers(fused.unet))
    assert report.algorithms == (["LoHa"] if kind == "loha" else ["LoRA"])
    stages = []
    stages.append(("patched", *outputs()))
    hp.fuse()
    hf.fuse()
    stages.append(("fused", *outputs()))
    # fused LoRAs keep the fused products (their hooks pass through)
    assert all(_fused_used(m) for m in attn_layers(fused.unet))
    hp.set_weight(0, -0.4)
    hf.set_weight(0, -0.4)
    stages.append(("re-weighted while fused", *outputs()))
    hp.unfuse()
    hf.unfuse()
    stages.append(("unfused", *outputs()))
    hp.fuse()
    hf.fuse()
    hp.remove()
    hf.remove()
    stages.append(("removed while fused", *outputs()))
    for name, ref, got in stages:
        assert _max(ref, got) <= 1e-5, name
    assert _max(stages[0][1], base) > 1e-2  # the LoRA changed the output (q, k and v of every attention)
    assert _max(stages[1][1], stages[2][1]) > 1e-2  # and re-weighting changed it again
    assert _max(stages[-1][2], base) <= 1e-5  # back to the base model, fused stack included


def test_state_dict_keys_and_saving_are_unchanged(tiny_pipes, tmp_path):
    plain, fused = tiny_pipes
    with torch.no_grad():
        fused.unet(
            torch.zeros(1, 4, 4, 4),
            torch.tensor([1.0]),
            encoder_hidden_states=torch.zeros(1, 3, plain.unet.config.cross_attention_dim),
        )
    assert any(_fused_used(m) for m in fused.unet.modules() if isinstance(m, Attention))
    keys = list(fused.unet.state_dict())
    assert keys == list(plain.unet.state_dict())
    assert any(k.endswith("attn1.to_q.weight") for k in keys) and not any("fused" in k for k in keys)
    save_safetensors(dict(fused.unet.state_dict()), tmp_path / "unet.safetensors")  # no shared or extra tensors
    back = load_safetensors(tmp_path / "unet.safetensors")
    assert all(torch.equal(back[k], v) for k, v in plain.unet.state_dict().items())
    buf = io.BytesIO()
    torch.save(fused.unet.state_dict(), buf)
    assert len(torch.load(io.BytesIO(buf.getvalue()), weights_only=True)) == len(keys)


def test_the_fast_path_option():
    assert parse_options("fused_qkv,fp8") == ("fp8", "fused_qkv")  # fp8 first: its layers then run as they are

    class Pipe:
        unet = nn.Sequential(Attention(8, 2, 4), Attention(8, 2, 4, cross_attention_dim=4))
        device = "cpu"

    notes = apply_fast_path(Pipe(), ["fused_qkv"])
    assert notes == ["fused_qkv: 2 attention layers of the U-Net with one query/key/value product"]
    assert fused_qkv_layers(Pipe.unet) == 2


def test_geglu_gate_written_in_place_is_the_same_numbers_and_trains():
    from sdengine.nn.transformer import GEGLU

    g = torch.Generator().manual_seed(14)
    m = _perturbed(GEGLU(16, 24), 15)
    x = torch.randn(2, 9, 16, generator=g)

    def formula(inp: torch.Tensor) -> torch.Tensor:  # the published form, out of place
        a, gate = torch.nn.functional.linear(inp, m.proj.weight, m.proj.bias).chunk(2, dim=-1)
        return a * torch.nn.functional.gelu(gate)

    with torch.inference_mode():
        assert torch.equal(m(x), formula(x))
    with torch.no_grad():
        assert torch.equal(m(x), formula(x))
    out = m(x)  # autograd on: out of place, gradients as the formula's
    out.square().sum().backward()
    grad = m.proj.weight.grad.clone()
    m.zero_grad()
    formula(x).square().sum().backward()
    assert torch.equal(grad, m.proj.weight.grad)


def test_dropping_the_stack_changes_the_fingerprint_so_no_graph_replays_it():
    """A CUDA graph records the stacked weight's memory: switching fusion off (or clearing the stack) frees it,
    so the graphs' fingerprint must move (here the stand-in recorder of tests/test_cuda_graphs.py)."""
    from sdengine.cuda_graphs import GraphedCallable, module_fingerprint

    m = _perturbed(Attention(16, 2, 8), 16).requires_grad_(False)
    enable_fused_qkv(m)
    x = torch.randn(1, 6, 16)

    def backend(fn, warmup):
        for _ in range(warmup):
            fn()
        out = fn()
        return (lambda: out.copy_(fn())), out

    g = GraphedCallable(m, module=m, backend=backend, device_type="cpu")
    with torch.inference_mode():
        g(x)
        assert _fused_used(m) and len(g.graphs) == 1
        fp = module_fingerprint(m)
        assert g.usable() and len(g.graphs) == 1  # nothing changed: kept
        enable_fused_qkv(m)  # on again: nothing dropped, nothing moves
        assert module_fingerprint(m) == fp
        enable_fused_qkv(m, False)
        assert module_fingerprint(m) != fp and g.usable() and len(g.graphs) == 0
        enable_fused_qkv(m)
        g(x)
        fp = module_fingerprint(m)
        clear_fused_cache(m)
        assert module_fingerprint(m) != fp and g.usable() and len(g.graphs) == 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_cuda_graphs_with_fused_projections_and_a_fused_lora(tiny_sd1_folder, tmp_path):  # pragma: no cover
    """On a GPU in fp16, with real CUDA graphs: the fused image equals the unfused one, and a LoRA fused into the
    weights between generations (the stack rebuilt, the graphs recorded again) gives the unfused pipeline's image."""
    import numpy as np

    from sdengine.weights.lora import apply_loras

    kw = dict(prompt="a red apple", seed=4, steps=6, width=64, height=64, progress=False)
    plain = sdengine.load_pipeline(tiny_sd1_folder, device="cuda", dtype="fp16", fast_path="none")
    fused = sdengine.load_pipeline(tiny_sd1_folder, device="cuda", dtype="fp16", fast_path="fused_qkv,cuda_graphs")
    assert fused_qkv_layers(fused.unet) > 0
    ref = plain(**kw).arrays.astype(np.float64)
    got = fused(**kw).arrays.astype(np.float64)
    got = fused(**kw).arrays.astype(np.float64)  # replayed
    assert fused.cuda_graphs["unet"].replays >= 6
    assert float(np.abs(got - ref).mean()) < 2e-3
    path = _lora_file(plain.unet, tmp_path / "qkv.safetensors", 17)
    hp = apply_loras(plain.unet, None, [(path, 0.8)], part="unet", fuse=True)
    hf = apply_loras(fused.unet, None, [(path, 0.8)], part="unet", fuse=True)
    ref_l = plain(**kw).arrays.astype(np.float64)
    got_l = fused(**kw).arrays.astype(np.float64)
    assert float(np.abs(got_l - ref_l).mean()) < 2e-3 and float(np.abs(ref_l - ref).mean()) > 1e-2
    hp.remove()
    hf.remove()
    again = fused(**kw).arrays.astype(np.float64)
    assert float(np.abs(again - ref).mean()) < 2e-3


@pytest.mark.slow
@pytest.mark.parametrize("how", ["compile", "aot"])
def test_compiled_and_aot_networks_read_the_live_weights(tiny_sd1_folder, tmp_path, monkeypatch, how):
    """Traced (``torch.compile``) or exported (``aot``), the fused layer stacks the live parameters inside the
    graph: the image equals the plain pipeline's, also after a LoRA is fused into the weights."""
    import numpy as np

    from sdengine.weights.lora import apply_loras

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    plain = sdengine.load_pipeline(tiny_sd1_folder, device="cpu", dtype="fp32", fast_path="none")
    fused = sdengine.load_pipeline(tiny_sd1_folder, device="cpu", dtype="fp32", fast_path="fused_qkv")
    if how == "aot":
        fused.enable_aot(tmp_path / "aoti")
    else:
        fused.unet.compile()
    args = {"steps": 3, "seed": 2, "width": 64, "height": 64, "progress": False}
    ref = plain("a red cube", **args).arrays.astype(np.float64)
    got = fused("a red cube", **args).arrays.astype(np.float64)
    if how == "aot":
        assert fused.aot["unet"].compiled == 1 and not fused.aot["unet"].failed
    assert not any(_fused_used(m) for m in fused.unet.modules() if isinstance(m, Attention))  # no cache traced
    assert np.abs(got - ref).mean() <= 1e-4
    path = _lora_file(plain.unet, tmp_path / "qkv.safetensors", 18)
    apply_loras(plain.unet, None, [(path, 0.8)], part="unet", fuse=True)
    apply_loras(fused.unet, None, [(path, 0.8)], part="unet", fuse=True)
    ref_l = plain("a red cube", **args).arrays.astype(np.float64)
    got_l = fused("a red cube", **args).arrays.astype(np.float64)
    assert np.abs(ref_l - ref).mean() > 1e-2 and np.abs(got_l - ref_l).mean() <= 1e-4


def test_a_fused_unet_call_never_reads_the_device_nor_copies_from_the_host(tiny_pipes):
    """With ``meta`` playing the GPU (tests/_cpu_graphs.py), a fused U-Net call neither waits on the device nor
    copies from the host: what a CUDA graph needs to record it. The stack is built on the device."""
    from _cpu_graphs import HostTraffic

    plain, _ = tiny_pipes
    unet = copy.deepcopy(plain.unet).to("meta")
    assert enable_fused_qkv(unet) > 0
    ctx = torch.zeros(2, 77, unet.config.cross_attention_dim, device="meta")
    with torch.inference_mode(), HostTraffic() as traffic:
        out = unet(
            torch.zeros(2, 4, 8, 8, device="meta"), torch.full((2,), 500.0, device="meta"), encoder_hidden_states=ctx
        )
    assert out.shape == (2, 4, 8, 8) and traffic.seen == []
    assert all(_fused_used(m) for m in attn_layers(unet))
    stacks = [t for m in attn_layers(unet) for entry in m._fused_cache.values() for t in entry[2] if t is not None]
    assert stacks and all(t.device.type == "meta" for t in stacks)


def test_an_sdxl_unet_is_the_same_with_fused_projections():
    """SDXL's layout (two transformer blocks per level, linear projections, 80-wide text states): equal outputs."""
    from sdengine.models.unet import UNet
    from sdengine.models.unet_sdxl import TINY_SDXL, text_time_vector

    torch.manual_seed(19)
    unet = _perturbed(UNet(TINY_SDXL), 20)
    g = torch.Generator().manual_seed(21)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 9, TINY_SDXL.cross_attention_dim, generator=g)
    ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768.0, 1344, 16, 8, 832, 1216]])
    labels = text_time_vector(torch.randn(2, 32, generator=g), ids, TINY_SDXL)
    with torch.no_grad():
        ref = unet(x, torch.tensor([999.0, 17.0]), encoder_hidden_states=ctx, class_labels=labels)
        assert enable_fused_qkv(unet) == len(attn_layers(unet)) > 0
        got = unet(x, torch.tensor([999.0, 17.0]), encoder_hidden_states=ctx, class_labels=labels)
    assert all(_fused_used(m) for m in attn_layers(unet))
    assert _max(ref, got) <= 1e-5 and ref.abs().mean() > 1e-2


def test_hypertiles_attend_with_the_fused_product_too(tiny_pipes):
    """HyperTile's tiles go through the same projections: with fusion on, each tile's self-attention is the fused
    product, and the tiled image equals the unfused tiled image."""
    plain, fused = tiny_pipes
    tiled = dict(KW, width=64, height=64, hypertile=(32, 1, 0), hypertile_rule="comfyui", hypertile_scale_depth=False)
    ref = plain(**tiled).arrays.astype("float64")
    for m in attn_layers(fused.unet):
        m.drop_fused_cache()
    got = fused(**tiled).arrays.astype("float64")
    assert not (ref == plain(**dict(KW, width=64, height=64)).arrays).all()  # the tiles changed the image
    assert any("qkv" in _fused_used(m) for m in attn_layers(fused.unet))  # self-attention ran fused
    assert abs(ref - got).mean() <= 1e-5
