"""Flux.1's transformer: the same numbers as diffusers' ``FluxTransformer2DModel`` on tiny random weights (guidance
on and off, non-square latents, batch 2; float32, bf16 and fp16), its files (a diffusers ``transformer/`` folder,
plain and sharded; BFL's single-file layout with and without ComfyUI's prefix, cross-checked with diffusers' own
converter; float8 and scaled float8 weights), the config read from the shapes, and one-line errors for bad inputs,
configs and files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from sdengine.errors import UsageError
from sdengine.models.config_checks import ConfigError
from sdengine.models.flux import (
    FLUX_DEV,
    FLUX_SCHNELL,
    FluxConfig,
    FluxTransformer,
    image_ids,
    pack_latents,
    unpack_latents,
)
from sdengine.weights.detect import UnsupportedModelError, check_supported, model_family
from sdengine.weights.flux_file import (
    bfl_to_diffusers,
    config_from_shapes,
    diffusers_to_bfl,
    is_flux_state_dict,
    load_flux_transformer,
)
from sdengine.weights.io import WeightsError, save_safetensors

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5

# 2 double-stream and 2 single-stream blocks, 2 heads of 16 (RoPE axes 4 + 6 + 6), 4-channel latents
TINY = FluxConfig(
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=24,
    axes_dims_rope=(4, 6, 6),
)
TINY_DEV = dataclasses.replace(TINY, guidance_embeds=True)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (the RMS norms' weights too, so that a misplaced norm shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):  # the RMS norms' scales
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def _diffusers_model(cfg: FluxConfig, seed: int = 0) -> torch.nn.Module:
    kwargs = {k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}
    model = diffusers.FluxTransformer2DModel(**kwargs).eval()
    _randomize(model, seed)
    return model


def _ours(reference: torch.nn.Module, cfg: FluxConfig) -> FluxTransformer:
    model = FluxTransformer(cfg).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    return model


def _inputs(cfg: FluxConfig, batch: int, h: int, w: int, text: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(batch, cfg.latent_channels, h, w, generator=g)
    context = torch.randn(batch, text, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=g)
    # timesteps whose /1000 is exact in binary, so that diffusers' t * 1000 gives back the same numbers
    t = torch.tensor([875.0, 250.0, 500.0, 62.5][:batch])
    return latent, context, pooled, t


def _diffusers_pack(latents: torch.Tensor) -> torch.Tensor:
    """diffusers' FluxPipeline._pack_latents."""
    return diffusers.FluxPipeline._pack_latents(latents, *latents.shape[:2], *latents.shape[2:])


def _diffusers_forward(model, latent, context, pooled, t, guidance=None) -> torch.Tensor:
    B, C, H, W = latent.shape
    img_ids = diffusers.FluxPipeline._prepare_latent_image_ids(B, H // 2, W // 2, "cpu", torch.float32)
    txt_ids = torch.zeros(context.shape[1], 3)
    out = model(
        hidden_states=_diffusers_pack(latent),
        encoder_hidden_states=context,
        pooled_projections=pooled,
        timestep=t / 1000,
        img_ids=img_ids,
        txt_ids=txt_ids,
        guidance=guidance,
        return_dict=False,
    )[0]
    return diffusers.FluxPipeline._unpack_latents(out, H * 8, W * 8, 8)


# ---------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize(
    ("cfg", "batch", "size"),
    [(TINY, 2, (6, 10)), (TINY_DEV, 2, (8, 4)), (TINY_DEV, 1, (4, 4))],
    ids=["schnell-like-6x10", "dev-like-8x4", "dev-like-batch1"],
)
def test_matches_diffusers(cfg: FluxConfig, batch: int, size: tuple[int, int]) -> None:
    reference = _diffusers_model(cfg)
    ours = _ours(reference, cfg)
    latent, context, pooled, t = _inputs(cfg, batch, *size)
    guidance = torch.tensor([3.5, 1.25][:batch]) if cfg.guidance_embeds else None
    with torch.no_grad():
        want = _diffusers_forward(reference, latent, context, pooled, t, guidance)
        got = ours(latent, t, context, pooled, guidance)
    assert got.shape == latent.shape
    assert (got - want).abs().max().item() <= TOL
    assert want.abs().max().item() > 0.1  # not a trivially small output


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("cfg", [TINY, TINY_DEV], ids=["schnell-like", "dev-like"])
def test_half_precision_matches_diffusers(cfg: FluxConfig, dtype: torch.dtype) -> None:
    """In bf16 the timestep and guidance reach the sinusoid rounded as diffusers (and BFL) round them (875 ->
    876, 3500 -> 3504): without that rounding the outputs differ by a third of their size. Seen: up to 0.28% of
    the largest output in bf16, 0.035% in fp16."""
    reference = _diffusers_model(cfg).to(dtype)
    ours = _ours(_diffusers_model(cfg), cfg).to(dtype)
    latent, context, pooled, t = _inputs(cfg, 2, 6, 10)
    latent, context, pooled = latent.to(dtype), context.to(dtype), pooled.to(dtype)
    guidance = torch.tensor([3.5, 1.25]) if cfg.guidance_embeds else None
    with torch.no_grad():
        want = _diffusers_forward(reference, latent, context, pooled, t, guidance).float()
        got = ours(latent, t, context, pooled, guidance).float()
    assert got.dtype == want.dtype
    assert (got - want).abs().max().item() <= 0.01 * want.abs().max().item()


def test_guidance_changes_the_output_of_a_dev_model() -> None:
    ours = FluxTransformer(TINY_DEV).eval()
    _randomize(ours, 2)
    latent, context, pooled, t = _inputs(TINY_DEV, 1, 4, 4)
    with torch.no_grad():
        a = ours(latent, t, context, pooled, torch.tensor([3.5]))
        b = ours(latent, t, context, pooled, 2.0)  # a number is taken for every row
    assert (a - b).abs().max().item() > 1e-3


def test_pack_and_ids_follow_diffusers() -> None:
    latent = torch.randn(2, 4, 6, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pack_latents(latent), _diffusers_pack(latent))
    assert torch.equal(unpack_latents(pack_latents(latent), 6, 10), latent)
    want = diffusers.FluxPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32)
    assert torch.equal(image_ids(3, 5), want)


# ---------------------------------------------------------------------------------------------------- errors


def test_input_errors() -> None:
    model = FluxTransformer(TINY_DEV).eval()
    latent, context, pooled, t = _inputs(TINY_DEV, 2, 4, 6)
    g = torch.tensor([3.5, 3.5])
    with pytest.raises(UsageError, match=r"height and width must be even .* got 5x6"):
        model(torch.zeros(2, 4, 5, 6), t, context, pooled, g)
    with pytest.raises(UsageError, match=r"must be a \(B, 4, H, W\) latent, got \(2, 3, 4, 6\)"):
        model(latent[:, :3], t, context, pooled, g)
    with pytest.raises(UsageError, match=r"guidance-distilled .* pass guidance"):
        model(latent, t, context, pooled)
    with pytest.raises(UsageError, match=r"encoder_hidden_states must be \(B=2, L, 32\)"):
        model(latent, t, context[..., :8], pooled, g)
    with pytest.raises(UsageError, match=r"pooled_projections must be \(2, 24\)"):
        model(latent, t, context, pooled[:1], g)
    with pytest.raises(UsageError, match=r"timestep must be a number or have shape \(2,\)"):
        model(latent, t[:1].repeat(3), context, pooled, g)
    with pytest.raises(UsageError, match=r"timestep must be finite, got \[1\.0, nan\]"):
        model(latent, torch.tensor([1.0, float("nan")]), context, pooled, g)
    with pytest.raises(UsageError, match=r"guidance must be finite"):
        model(latent, t, context, pooled, float("inf"))
    schnell = FluxTransformer(TINY).eval()
    with pytest.raises(UsageError, match="takes no guidance scale"):
        schnell(latent, t, context, pooled, g)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"axes_dims_rope": (4, 6, 8)}, r"adds up to 18, not attention_head_dim=16"),
        ({"axes_dims_rope": (5, 5, 6)}, r"three even numbers"),
        ({"axes_dims_rope": 16}, r"axes_dims_rope=16 is not a list"),
        ({"patch_size": 2}, r"patch_size=2 is not supported"),
        ({"in_channels": 18}, r"in_channels=18 is not a multiple of 4"),
        ({"num_layers": 1000}, r"num_layers=1000 is out of range"),
        ({"guidance_embeds": 1}, r"guidance_embeds=1 is not true/false"),
        (
            {"num_layers": 100, "num_single_layers": 200, "num_attention_heads": 64, "attention_head_dim": 128},
            r"at least 4\.43e\+11 parameters \(limit 3e\+10\); refusing to build it",
        ),
    ],
)
def test_config_errors(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(TINY, **change)


def test_config_from_diffusers() -> None:
    raw = {"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.30.0", **TINY_DEV.to_diffusers()}
    assert FluxConfig.from_diffusers(raw) == TINY_DEV
    with pytest.raises(ConfigError, match="unknown Flux transformer config options: bogus"):
        FluxConfig.from_diffusers({**raw, "bogus": 1})
    with pytest.raises(ConfigError, match="not a Flux transformer config"):
        FluxConfig.from_diffusers({**raw, "_class_name": "SD3Transformer2DModel"})
    with pytest.raises(ConfigError, match="joint_attention_dim=0 is out of range"):
        FluxConfig.from_diffusers({**raw, "joint_attention_dim": 0})


@pytest.mark.parametrize("cfg", [FLUX_DEV, FLUX_SCHNELL], ids=["dev", "schnell"])
def test_full_size_names_and_shapes_are_diffusers(cfg: FluxConfig) -> None:
    """FLUX.1's real sizes, built on the meta device (no memory): every parameter name and shape is diffusers'."""
    kwargs = {k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}
    with torch.device("meta"):
        ours = FluxTransformer(cfg)
        reference = diffusers.FluxTransformer2DModel(**kwargs)
    want = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want
    assert sum(v.numel() for v in ours.parameters()) == (11_901_408_320 if cfg.guidance_embeds else 11_891_178_560)


# ------------------------------------------------------------------------------------------------------ files


def _run(model: torch.nn.Module, cfg: FluxConfig, seed: int = 1) -> torch.Tensor:
    latent, context, pooled, t = _inputs(cfg, 2, 6, 4, seed=seed)
    guidance = torch.tensor([3.5, 2.0]) if cfg.guidance_embeds else None
    with torch.no_grad():
        return model(latent, t, context, pooled, guidance)


def _diffusers_converter(bfl: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """diffusers' convert_flux_transformer_checkpoint_to_diffusers on a BFL state dict. It splits a single
    block's linear1 with FLUX.1's sizes written in (3 x 3072 + 12288 rows); for a tiny model those sizes are
    replaced by the same split at the model's width (3 x hidden + 4 x hidden), nothing else is touched."""
    from diffusers.loaders import single_file_utils

    real_split = torch.split

    def split(t, sizes, dim=0):
        if isinstance(sizes, tuple) and sizes == (3072, 3072, 3072, 12288) and t.shape[0] != sum(sizes):
            h = t.shape[0] // 7
            sizes = (h, h, h, 4 * h)
        return real_split(t, sizes, dim)

    class _Torch:
        def __getattr__(self, name):
            return split if name == "split" else getattr(torch, name)

    monkeypatch.setattr(single_file_utils, "torch", _Torch())
    return single_file_utils.convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))


@pytest.mark.parametrize("cfg", [TINY, TINY_DEV], ids=["schnell-like", "dev-like"])
def test_diffusers_folder_loads(cfg: FluxConfig, tmp_path: Path) -> None:
    reference = _diffusers_model(cfg, seed=3)
    reference.save_pretrained(tmp_path / "pipe" / "transformer")
    want = _run(_ours(reference, cfg), cfg)
    for path in (tmp_path / "pipe", tmp_path / "pipe" / "transformer"):  # the pipeline folder or its transformer/
        model = load_flux_transformer(path, dtype=torch.float32)
        assert model.config == cfg  # config.json as written (out_channels null)
        assert torch.equal(_run(model, cfg), want)


def test_sharded_folder_loads(tmp_path: Path) -> None:
    reference = _diffusers_model(TINY_DEV, seed=4)
    reference.save_pretrained(tmp_path / "transformer", max_shard_size="20KB")
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "transformer").glob("*.safetensors"))) > 2
    model = load_flux_transformer(tmp_path / "transformer")
    assert model.dtype == torch.float32
    assert torch.equal(_run(model, TINY_DEV), _run(_ours(reference, TINY_DEV), TINY_DEV))
    half = load_flux_transformer(tmp_path / "transformer", dtype="bf16")  # converted as read
    assert half.dtype == torch.bfloat16
    assert torch.equal(_run(half, TINY_DEV), _run(_ours(reference, TINY_DEV).to(torch.bfloat16), TINY_DEV))


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."], ids=["bfl", "comfyui"])
@pytest.mark.parametrize("cfg", [TINY, TINY_DEV], ids=["schnell-like", "dev-like"])
def test_bfl_single_file_loads(cfg: FluxConfig, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = _diffusers_model(cfg, seed=5)
    state = reference.state_dict()
    bfl = diffusers_to_bfl(state)
    assert is_flux_state_dict(bfl) and "final_layer.adaLN_modulation.1.weight" in bfl
    # the inverse mapping agrees with diffusers' own converter, tensor for tensor
    back = _diffusers_converter(bfl, monkeypatch)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    assert bfl_to_diffusers(bfl).keys() == state.keys()
    extra = {"vae.decoder.conv_in.weight": torch.zeros(1)} if prefix else {}  # ComfyUI bundles other parts
    path = tmp_path / "flux1-tiny.safetensors"
    save_safetensors({**{prefix + k: v for k, v in bfl.items()}, **extra}, path)
    model = load_flux_transformer(path, axes_dims_rope=cfg.axes_dims_rope)
    assert model.name == "flux1-tiny.safetensors" and model.config.guidance_embeds == cfg.guidance_embeds
    assert torch.equal(_run(model, cfg), _run(_ours(reference, cfg), cfg))


def test_float8_file_is_upcast(tmp_path: Path) -> None:
    reference = _diffusers_model(TINY_DEV, seed=6)
    rounded = {k: v.to(torch.float8_e4m3fn).float() for k, v in reference.state_dict().items()}
    path = tmp_path / "flux1-tiny-fp8.safetensors"
    save_safetensors({k: v.to(torch.float8_e4m3fn) for k, v in diffusers_to_bfl(rounded).items()}, path)
    model = load_flux_transformer(path, axes_dims_rope=(4, 6, 6), dtype="fp32")
    want = FluxTransformer(TINY_DEV).eval()
    want.load_state_dict(rounded)
    assert torch.equal(_run(model, TINY_DEV), _run(want, TINY_DEV))
    assert load_flux_transformer(path, axes_dims_rope=(4, 6, 6)).dtype == torch.bfloat16  # fp8's default


def test_scaled_float8_file_is_multiplied_out(tmp_path: Path) -> None:
    """ComfyUI's scaled float8: weight / scale stored in float8, the scale beside it as ``scale_weight``."""
    reference = _diffusers_model(TINY, seed=7)
    bfl = diffusers_to_bfl(reference.state_dict())
    stored, want = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}, {}
    for k, v in bfl.items():
        if k.endswith(".weight") and v.ndim == 2:
            scale = v.abs().max() / 448
            stored[k] = (v / scale).to(torch.float8_e4m3fn)
            stored[k[: -len("weight")] + "scale_weight"] = scale.reshape(1)
            stored[k[: -len("weight")] + "scale_input"] = torch.ones(1)
            want[k] = stored[k].float() * scale
        else:
            stored[k] = want[k] = v
    path = tmp_path / "flux1-tiny-fp8-scaled.safetensors"
    save_safetensors({"model.diffusion_model." + k: v for k, v in stored.items()}, path)
    model = load_flux_transformer(path, axes_dims_rope=(4, 6, 6), dtype=torch.float32)
    expected = FluxTransformer(TINY).eval()
    expected.load_state_dict(bfl_to_diffusers(want))
    assert torch.equal(_run(model, TINY), _run(expected, TINY))
    # in bf16 (float8's default) the float32 scale multiplies before the one rounding to bf16
    half = load_flux_transformer(path, axes_dims_rope=(4, 6, 6))
    assert half.dtype == torch.bfloat16
    got = half.transformer_blocks[0].ff.net[2].weight
    assert torch.equal(got, want["double_blocks.0.img_mlp.2.weight"].to(torch.bfloat16))


@pytest.mark.parametrize("cfg", [FLUX_DEV, FLUX_SCHNELL], ids=["dev", "schnell"])
def test_config_from_shapes_of_flux1(cfg: FluxConfig) -> None:
    """FLUX.1's real shapes (meta tensors, no memory) through BFL's layout: the config comes back."""
    kwargs = {k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}
    with torch.device("meta"):
        bfl = diffusers_to_bfl(diffusers.FluxTransformer2DModel(**kwargs).state_dict())
        assert tuple(bfl["single_blocks.0.linear1.weight"].shape) == (21504, 3072)
        assert (tuple(bfl["double_blocks.18.img_attn.qkv.weight"].shape), len(bfl)) == (
            (9216, 3072),
            776 + 4 * cfg.guidance_embeds,  # flux1-dev.safetensors: 780,
        )
        got = config_from_shapes(bfl_to_diffusers(bfl))
    assert got == dataclasses.replace(cfg, out_channels=64)


def test_detection() -> None:
    bfl = diffusers_to_bfl(_diffusers_model(TINY).state_dict())
    assert is_flux_state_dict(bfl)
    assert is_flux_state_dict({"model.diffusion_model." + k: v for k, v in bfl.items()})
    assert not is_flux_state_dict(["double_blocks.0.img_attn.qkv.lora_A.weight", "x.weight"])  # a LoRA for Flux
    assert not is_flux_state_dict(["model.diffusion_model.input_blocks.0.0.weight"])
    assert model_family(bfl) == "flux" and model_family(k for k in bfl) == "flux"
    with pytest.raises(UnsupportedModelError, match=r"looks like Flux \(FLUX.1's transformer\), not an SD checkp"):
        check_supported(bfl)


def test_file_errors(tmp_path: Path) -> None:
    reference = _diffusers_model(TINY_DEV, seed=8)
    bfl = diffusers_to_bfl(reference.state_dict())

    def load(sd: dict, name: str = "f.safetensors", **kw):
        save_safetensors(sd, tmp_path / name)
        return load_flux_transformer(tmp_path / name, **kw)

    axes = {"axes_dims_rope": (4, 6, 6)}
    gone = {k: v for k, v in bfl.items() if k != "double_blocks.1.txt_attn.qkv.bias"}
    with pytest.raises(WeightsError, match=r"missing Flux tensor double_blocks\.1\.txt_attn\.qkv\.bias"):
        load(gone, **axes)
    renumbered = {k.replace("single_blocks.1.", "single_blocks.2."): v for k, v in bfl.items()}
    with pytest.raises(WeightsError, match=r"Flux single-stream block 1 is missing \(has blocks up to 2\)"):
        load(renumbered, **axes)
    with pytest.raises(WeightsError, match=r"unexpected tensors beside the Flux transformer: extra\.weight"):
        load({**bfl, "extra.weight": torch.zeros(2)}, **axes)
    short = {**bfl, "double_blocks.0.img_attn.qkv.weight": bfl["double_blocks.0.img_attn.qkv.weight"][:90]}
    with pytest.raises(WeightsError, match=r"double_blocks\.0\.img_attn\.qkv\.weight has 90 rows, expected 96"):
        load(short, **axes)
    with pytest.raises(WeightsError, match=r"cannot tell the RoPE split of a 16-wide head .* give axes_dims_rope"):
        load(bfl)
    with pytest.raises(WeightsError, match=r"float8 is a storage dtype"):
        load(bfl, dtype=torch.float8_e4m3fn, **axes)
    fill = {**bfl, "img_in.weight": torch.zeros(32, 96)}  # FLUX.1 Fill's shape: more in than out loads
    assert load(fill, **axes).config.in_channels == 96
    narrow = {**bfl, "img_in.weight": torch.zeros(32, 8)}
    with pytest.raises(WeightsError, match=r"8 numbers in and 16 out: not a Flux transformer"):
        load(narrow, **axes)
    chroma = {**bfl, "distilled_guidance_layer.in_proj.weight": torch.zeros(2, 2)}
    with pytest.raises(WeightsError, match=r"a Chroma model .* not supported"):
        load(chroma, **axes)
    with pytest.raises(WeightsError, match=r"an SD3 transformer \(joint_blocks\.\*\), not a Flux one"):
        load({"joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(2, 2)})
    with pytest.raises(WeightsError, match=r"not a Flux transformer \(no double_blocks"):
        load({"conv.weight": torch.zeros(2)})
    with pytest.raises(WeightsError, match=r"no such Flux transformer file or folder"):
        load_flux_transformer(tmp_path / "nothing.safetensors")
    with pytest.raises(WeightsError, match=r"not a Flux transformer folder"):
        load_flux_transformer(tmp_path)
    # a folder whose config.json does not describe its weights
    folder = tmp_path / "transformer"
    reference.save_pretrained(folder)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "num_single_layers": 3}))
    with pytest.raises(WeightsError, match=r"the config says num_single_layers=3, the weights 2"):
        load_flux_transformer(folder)
    (folder / "config.json").write_text(json.dumps({**raw, "num_layers": 1.5}))
    with pytest.raises(WeightsError, match=r"config\.json: Flux transformer config: num_layers=1\.5 is not an integer"):
        load_flux_transformer(folder)
    (folder / "config.json").write_text("{")
    with pytest.raises(WeightsError, match=r"cannot read the config"):
        load_flux_transformer(folder)


def test_rope_tables_follow_the_size() -> None:
    """The kept RoPE tables are rebuilt when the text length or the latent's size changes."""
    model = FluxTransformer(TINY).eval()
    _randomize(model, 9)
    for h, w, text in [(4, 4, 5), (6, 10, 5), (6, 10, 3), (4, 4, 5)]:
        latent, context, pooled, t = _inputs(TINY, 1, h, w, text=text)
        fresh = FluxTransformer(TINY).eval()  # a new module each time: nothing kept from a call before
        fresh.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert torch.equal(model(latent, t, context, pooled), fresh(latent, t, context, pooled))


def test_a_file_in_the_compute_dtype_is_not_copied(tmp_path: Path) -> None:
    """A bf16 file loaded in bf16: the parameters are views of the file's memory map (q/k/v split from the fused
    projections too), except the final modulation, whose halves are swapped into new tensors."""
    bfl = {k: v.to(torch.bfloat16) for k, v in diffusers_to_bfl(_diffusers_model(TINY, seed=10).state_dict()).items()}
    path = tmp_path / "flux1-tiny-bf16.safetensors"
    save_safetensors(bfl, path)
    model = load_flux_transformer(path, axes_dims_rope=(4, 6, 6))
    assert model.dtype == torch.bfloat16
    storages = {n: p.untyped_storage().data_ptr() for n, p in model.named_parameters()}
    shared = {ptr for n, ptr in storages.items() if not n.startswith("norm_out.")}
    assert len(shared) == 1 and model.x_embedder.weight.untyped_storage().nbytes() == path.stat().st_size
