"""T2I-Adapter: the network against diffusers' T2IAdapter (full, light, SDXL kinds), the U-Net's intra-block
residuals against UNet2DConditionModel's ``down_intrablock_additional_residuals``, the three file formats (diffusers
folder, diffusers-named file, original TencentARC names as ComfyUI reads them, ``.pth`` wrapped in ``adapter``), the
pipeline against StableDiffusion(XL)AdapterPipeline (``adapter_conditioning_scale``/``_factor``), and bad files."""

from __future__ import annotations

import dataclasses
import logging
import re

import numpy as np
import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")

import _pipeline_models as _models  # noqa: E402
import sdengine  # noqa: E402
from _sdxl_models import make_sdxl_folder  # noqa: E402
from sdengine import control as C  # noqa: E402
from sdengine.errors import ControlNetError  # noqa: E402
from sdengine.models.t2i_adapter import T2IAdapter, T2IAdapterConfig  # noqa: E402
from sdengine.models.unet import TINY_SD, UNet, UNetConfig  # noqa: E402
from sdengine.models.unet_sdxl import TINY_SDXL  # noqa: E402
from sdengine.weights.io import save_safetensors  # noqa: E402

for _name in ("diffusers", "transformers"):
    logging.getLogger(_name).setLevel(logging.ERROR)

SIZE, STEPS, SEED = 32, 5, 3
PROMPT, NEGATIVE = "a red apple on a table", "blurry, dark"
# a three-level SDXL U-Net, so that the SDXL adapter's last feature reaches the middle block
TINY_SDXL3 = dataclasses.replace(
    TINY_SDXL,
    block_out_channels=(32, 64, 64),
    attention=("none", "cross", "cross"),
    num_heads=(2, 4, 4),
    transformer_layers_per_block=(1, 2, 2),
)
KINDS = {  # (adapter_type, channels, downscale_factor) that fit the tiny U-Nets (VAE factor 2)
    "full": ("full_adapter", (32, 64), 2),
    "light": ("light_adapter", (32, 64), 2),
    "xl": ("full_adapter_xl", (32, 64, 64, 64), 4),
}


def _adapter(kind: str, seed: int = 0, in_channels: int = 3):
    adapter_type, channels, f = KINDS[kind]
    torch.manual_seed(seed)
    ref = diffusers.T2IAdapter(
        in_channels=in_channels,
        channels=list(channels),
        num_res_blocks=2,
        downscale_factor=f,
        adapter_type=adapter_type,
    )
    _models._perturb(ref, seed, 0.05)
    return ref.eval()


def _err(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def _original_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' names -> TencentARC's, written out as ComfyUI's load_t2i_adapter maps them back."""
    out = {}
    light = "adapter.conv_in.weight" not in sd
    for k, v in sd.items():
        k = k.removeprefix("adapter.")
        if light:
            k = re.sub(r"^body\.(\d+)\.resnets\.(\d+)\.", r"body.\1.body.\2.", k)
        else:
            k = re.sub(r"^body\.(\d+)\.resnets\.(\d+)\.", lambda m: f"body.{int(m[1]) * 2 + int(m[2])}.", k)
            k = re.sub(r"^body\.(\d+)\.in_conv\.", lambda m: f"body.{int(m[1]) * 2}.in_conv.", k)
        out[k] = v.contiguous()
    return out


# ------------------------------------------------------------------------------------------ the network


@pytest.mark.parametrize("kind", ["full", "light", "xl"])
def test_adapter_features_match_diffusers_in_every_format(tmp_path, kind):
    ref = _adapter(kind, seed=1)
    ref.save_pretrained(tmp_path / "folder")
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_safetensors(sd, tmp_path / "diffusers-names.safetensors")
    save_safetensors(_original_names(sd), tmp_path / "original.safetensors")
    torch.save({"adapter": _original_names(sd)}, tmp_path / "t2iadapter_x_sd15v2.pth")
    image = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want = ref(image)
        base = TINY_SDXL if kind == "xl" else TINY_SD
        for name in ("folder", "diffusers-names.safetensors", "original.safetensors", "t2iadapter_x_sd15v2.pth"):
            ours = C.load_control_model(tmp_path / name, base=base)
            assert isinstance(ours, T2IAdapter), name
            assert ours.config.adapter_type == KINDS[kind][0], name
            got = ours(image)
            assert len(got) == len(want) and _err(got, want) < 1e-6, name


@pytest.mark.parametrize("kind", ["full", "xl"])
def test_original_adapters_with_conv_downsampling_or_3x3_kernels_match_diffusers_so_modified(tmp_path, kind):
    """The original code's use_conv (``body.{k}.down_opt.op``: a 3x3 stride-2 conv halves, not the average pool)
    and ksize 3 (3x3 in_conv and block2): diffusers' T2IAdapter with those modules swapped in (its block runs
    downsample -> in_conv -> resnets) is the reference, on random weights, in the original names and sdengine's
    own folder and file (once: refused as a layout sdengine does not read)."""
    ref = _adapter(kind, seed=3)
    torch.manual_seed(4)
    sd: dict[str, torch.Tensor] = {}
    for block in ref.adapter.body:
        if block.downsample is not None:
            ch = block.in_conv.in_channels if block.in_conv is not None else block.resnets[0].block1.in_channels
            block.downsample = torch.nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        if block.in_conv is not None:
            block.in_conv = torch.nn.Conv2d(block.in_conv.in_channels, block.in_conv.out_channels, 3, padding=1)
        for r in block.resnets:
            r.block2 = torch.nn.Conv2d(r.block2.in_channels, r.block2.out_channels, 3, padding=1)
    _models._perturb(ref, 5, 0.05)
    for k, v in ref.state_dict().items():
        sd[re.sub(r"\.downsample\.", ".down_conv.", k)] = v.contiguous()
    original = {
        re.sub(r"^body\.(\d+)\.down_conv\.", lambda m: f"body.{int(m[1]) * 2}.down_opt.op.", k): v
        for k, v in _original_names(sd).items()
    }
    assert any(".down_opt.op.weight" in k for k in original) and "body.0.block2.weight" in original
    save_safetensors(original, tmp_path / "original.safetensors")
    image = torch.rand(2, 3, 32, 32)
    base = TINY_SDXL if kind == "xl" else TINY_SD
    with torch.no_grad():
        want = ref(image)
        ours = C.load_control_model(tmp_path / "original.safetensors", base=base)
        assert isinstance(ours, T2IAdapter)
        assert (ours.config.kernel_size, ours.config.conv_downsample) == (3, True)
        assert _err(ours(image), want) < 1e-5
        for layout, name in (("diffusers", "folder"), ("original", "again.safetensors")):
            C.save_t2i_adapter(ours, tmp_path / name, layout=layout)
            back = C.load_control_model(tmp_path / name, base=base)
            assert back.config == ours.config and _err(back(image), want) < 1e-5, layout


def test_original_sd15_sizes_are_told_apart_from_sdxl_by_the_unshuffle():
    """No base model: a first conv of 3x8x8 inputs is an SD adapter, of 3x16x16 an SDXL one (ComfyUI's rule)."""
    for folded, kind in ((192, "full_adapter"), (768, "full_adapter_xl"), (64, "full_adapter")):
        sd = {
            "adapter.conv_in.weight": torch.zeros(8, folded, 3, 3),
            **{
                f"adapter.body.{i}.resnets.{j}.block1.weight": torch.zeros(8, 8, 3, 3) for i in range(4) for j in (0, 1)
            },
        }
        cfg = C.adapter_config_from_weights(sd)
        assert cfg.adapter_type == kind and cfg.in_channels == (1 if folded == 64 else 3)
        assert cfg.downscale_factor == (16 if folded == 768 else 8)


@pytest.mark.parametrize("kind", ["full", "light", "xl"])
def test_unet_intrablock_residuals_match_diffusers(kind):
    cfg = TINY_SDXL3 if kind == "xl" else TINY_SD
    d = cfg.to_diffusers()
    d.pop("_class_name", None)
    torch.manual_seed(0)
    ref_unet = _models._perturb(diffusers.UNet2DConditionModel(**d).eval(), 0, 0.02)
    unet = UNet(UNetConfig.from_diffusers(dict(ref_unet.config))).eval()
    unet.load_state_dict(ref_unet.state_dict(), strict=True)
    adapter = T2IAdapter(T2IAdapterConfig.from_diffusers(dict(_adapter(kind, seed=2).config))).eval()
    adapter.load_state_dict(_adapter(kind, seed=2).state_dict())
    latent, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 5, cfg.cross_attention_dim)
    extra, kw = {}, {}
    if kind == "xl":
        pooled, ids = torch.randn(2, 32), torch.randn(2, 6)
        extra = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}
        kw = {"class_labels": torch.cat([pooled, ref_unet.add_time_proj(ids.flatten()).reshape(2, -1)], 1)}
    with torch.no_grad():
        feats = adapter(torch.rand(2, 3, 32, 32))
        if kind == "xl":  # the last feature goes after the middle block
            assert feats[-1].shape[1:] == (64, 4, 4)
        want = ref_unet(latent, 10, ctx, down_intrablock_additional_residuals=[f.clone() for f in feats], **extra)
        plain = ref_unet(latent, 10, ctx, **extra).sample
        got = unet(latent, 10, encoder_hidden_states=ctx, down_intrablock_additional_residuals=feats, **kw)
    assert (got - want.sample).abs().max().item() < 1e-4
    assert (want.sample - plain).abs().max().item() > 0.05  # the features matter


# ------------------------------------------------------------------------------------------ the pipeline


@pytest.fixture(scope="module")
def sd_setup(tmp_path_factory, tiny_sd1_folder):
    root = tmp_path_factory.mktemp("t2i")
    adapter = _adapter("full", seed=5)
    adapter.save_pretrained(root / "adapter")
    cmap = C.preprocess("canny", _models.picture(40, 36, seed=1), low=30, high=90)
    return tiny_sd1_folder, sdengine.load_pipeline(tiny_sd1_folder, device="cpu"), adapter, root / "adapter", cmap


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def _kw(sampler: str = "euler") -> dict:
    return dict(steps=STEPS, sampler=sampler, schedule="normal", seed=SEED, width=SIZE, height=SIZE, progress=False)


def _theirs(cls, folder, adapter, sampler, cmap, cfg, **kw):
    ref = cls.from_pretrained(folder, adapter=adapter, local_files_only=True, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = _models.diffusers_scheduler(folder, sampler)
    return ref(
        PROMPT,
        negative_prompt=NEGATIVE,
        image=cmap,
        num_inference_steps=STEPS,
        guidance_scale=cfg,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="np",
        height=SIZE,
        width=SIZE,
        **kw,
    ).images


@pytest.mark.slow
def test_sd_adapter_pipeline_matches_diffusers(sd_setup):
    folder, pipe, adapter, path, cmap = sd_setup
    ours = pipe(PROMPT, NEGATIVE, cfg_scale=7.5, controlnets=[(path, cmap, 0.8)], **_kw()).arrays
    plain = pipe(PROMPT, NEGATIVE, cfg_scale=7.5, **_kw()).arrays
    theirs = _theirs(
        diffusers.StableDiffusionAdapterPipeline, folder, adapter, "euler", cmap, 7.5, adapter_conditioning_scale=0.8
    )
    assert _mad(ours[0], theirs[0]) < 1e-3
    assert _mad(ours[0], plain[0]) > 5e-3  # the adapter changed the picture


@pytest.mark.slow
def test_sdxl_adapter_pipeline_matches_diffusers_with_conditioning_factor(tmp_path):
    folder = make_sdxl_folder(tmp_path / "tiny-sdxl")
    adapter = _adapter("xl", seed=7)
    adapter.save_pretrained(tmp_path / "adapter")
    cmap = C.preprocess("canny", _models.picture(40, 36, seed=2), low=30, high=90)
    pipe = sdengine.load_pipeline(folder, device="cpu")
    # adapter_conditioning_factor 0.6 of 5 steps: steps 0-2, which is the unit's end=0.6 under diffusers' rule
    ours = pipe(PROMPT, NEGATIVE, cfg_scale=5.0, controlnets=[(tmp_path / "adapter", cmap, 1.2, 0.0, 0.6)], **_kw())
    theirs = _theirs(
        diffusers.StableDiffusionXLAdapterPipeline,
        folder,
        adapter,
        "euler",
        cmap,
        5.0,
        adapter_conditioning_scale=1.2,
        adapter_conditioning_factor=0.6,
    )
    assert _mad(ours.arrays[0], theirs[0]) < 1e-3


# ------------------------------------------------------------------------------------------ bad inputs


def test_an_sdxl_adapter_on_an_sd_model_is_refused_by_name(sd_setup, tmp_path):
    _, pipe, _, _, cmap = sd_setup
    _adapter("xl").save_pretrained(tmp_path / "xl-adapter")
    with pytest.raises(ControlNetError, match="xl-adapter is an SDXL adapter but the model is not SDXL"):
        pipe(PROMPT, controlnets=[(tmp_path / "xl-adapter", cmap, 1.0)], **_kw())


def test_adapter_files_of_unknown_layout_name_the_file(tmp_path):
    sd = _original_names({k: v for k, v in _adapter("full").state_dict().items()})
    save_safetensors({**sd, "body.0.skep.weight": torch.zeros(32, 32, 1, 1)}, tmp_path / "v1.safetensors")
    with pytest.raises(ControlNetError, match=r"v1\.safetensors: a T2I-Adapter with skip convolutions"):
        C.load_control_model(tmp_path / "v1.safetensors", base=TINY_SD)
    save_safetensors({**sd, "body.0.extra.weight": torch.zeros(2)}, tmp_path / "odd.safetensors")
    with pytest.raises(ControlNetError, match=r"odd\.safetensors: unexpected T2I-Adapter keys: body\.0\.extra"):
        C.load_control_model(tmp_path / "odd.safetensors", base=TINY_SD)
    torch.save({"style_embedding": torch.zeros(1, 8, 16), "proj": torch.zeros(16, 8)}, tmp_path / "style.pth")
    with pytest.raises(ControlNetError, match=r"style\.pth: a T2I-Adapter style model"):
        C.load_control_model(tmp_path / "style.pth", base=TINY_SD)
    cut = {k: v for k, v in sd.items() if not k.startswith("body.3.")}  # a level's blocks lost
    save_safetensors(cut, tmp_path / "cut.safetensors")
    with pytest.raises(ControlNetError, match=r"cut\.safetensors"):
        C.load_control_model(tmp_path / "cut.safetensors", base=TINY_SD)
    wide = {**sd, "body.2.in_conv.weight": torch.zeros(48, 32, 1, 1)}  # shapes that do not fit together
    save_safetensors(wide, tmp_path / "wide.safetensors")
    with pytest.raises(ControlNetError, match=r"wide\.safetensors"):
        C.load_control_model(tmp_path / "wide.safetensors", base=TINY_SD)


def test_a_map_size_the_unet_cannot_take_is_refused(sd_setup):
    """An SD adapter whose levels do not halve where the U-Net's do: the feature named, not a shape crash."""
    _, pipe, _, _, cmap = sd_setup
    odd = T2IAdapter(T2IAdapterConfig(3, (32, 64), 2, 4, "full_adapter"))  # features at half the latent size
    with pytest.raises(ControlNetError, match=r"T2I-Adapter of unit 1: its feature 0 is \(32, 8, 8\)"):
        pipe(PROMPT, controlnets=[(odd, cmap, 1.0)], **_kw())


# ------------------------------------------------------------------------------------------ the command line


def _emoji_adapter(seed: int = 11) -> T2IAdapter:
    """An adapter that fits the shipped emoji model (three attention levels 64/128/256, 64x64 images, latent 16)."""
    torch.manual_seed(seed)
    net = T2IAdapter(T2IAdapterConfig(3, (64, 128, 256), 2, 4, "full_adapter")).eval()
    _models._perturb(net, seed, 0.05)
    return net


@pytest.mark.slow
def test_cli_takes_an_adapter_as_controlnet_in_every_format(tmp_path, capsys):
    from sdengine.cli import main

    net = _emoji_adapter()
    C.save_t2i_adapter(net, tmp_path / "adapter")
    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    torch.save({"adapter": _original_names(sd)}, tmp_path / "t2iadapter_x.pth")
    edges = tmp_path / "edges.png"
    _models.picture(64, 64, seed=4).save(edges)
    common = ["a star", "--steps", "2", "--seed", "5", "--width", "64", "--height", "64", "--no-progress"]
    outs = {}
    for name, model in (("folder", tmp_path / "adapter"), ("pth", tmp_path / "t2iadapter_x.pth"), ("none", None)):
        extra = ["--control", f"canny:{edges}:1.5", "--controlnet", str(model)] if model is not None else []
        out = tmp_path / f"{name}.png"
        assert main(["generate", *common, *extra, "--out", str(out)]) == 0, capsys.readouterr().err
        outs[name] = np.asarray(Image.open(out), dtype=np.float64)
    assert np.array_equal(outs["folder"], outs["pth"])
    assert np.abs(outs["folder"] - outs["none"]).mean() > 0.5  # the adapter acted


@pytest.mark.slow
def test_cli_refuses_an_adapter_of_another_model_in_one_line(tmp_path, capsys):
    from sdengine.cli import main

    _adapter("xl").save_pretrained(tmp_path / "sdxl-adapter")
    edges = tmp_path / "edges.png"
    _models.picture(64, 64).save(edges)
    rc = main(
        ["generate", "a star", "--steps", "1", "--no-progress", "--out", str(tmp_path / "o.png")]
        + ["--control", f"none:{edges}", "--controlnet", str(tmp_path / "sdxl-adapter")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "sdxl-adapter is an SDXL adapter but the model is not SDXL" in err[0], err
    assert not (tmp_path / "o.png").exists()


def test_list_controlnets_shows_adapter_folders(tmp_path, capsys):
    import json

    from sdengine.cli import main

    C.save_t2i_adapter(_emoji_adapter(), tmp_path / "t2i-canny")
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    assert main(["list", "controlnets", "--controlnets-dir", str(tmp_path), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert "T2I-Adapter" in rows["t2i-canny"]["detail"] and "not-a-model" not in rows


def test_adapters_and_controlnets_in_one_run_add_up():
    """Two adapter units sum their features, each times its weight (MultiAdapter with adapter_weights); a
    ControlNet unit beside them adds its residuals as before; a unit outside its window adds nothing."""
    from sdengine.models.controlnet import ControlNet, ControlNetConfig
    from sdengine.pipeline import control as PC

    torch.manual_seed(0)
    unet = UNet(TINY_SD).eval()
    cn = ControlNet(ControlNetConfig.from_unet(TINY_SD, conditioning_embedding_out_channels=(8, 16))).eval()
    _models._perturb(cn, 1, 0.05)
    adapter = T2IAdapter(T2IAdapterConfig(3, (32, 64), 2, 2, "full_adapter")).eval()
    _models._perturb(adapter, 2, 0.05)
    image = torch.rand(1, 3, 32, 32)
    units = [
        PC.ControlUnit(cn, image, 0.7),
        PC.ControlUnit(adapter, image, 1.3),
        PC.ControlUnit(adapter, image, 0.5, 0.0, 0.5),
    ]
    m = PC.build_controlled_unet(unet, units, width=32, height=32, grid=torch.tensor([900.0, 500.0]))
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 5, 32)
    with torch.no_grad():
        got = [m(x, 500.0, encoder_hidden_states=ctx, step=s) for s in (0, 1)]
        down, mid = cn(x, 500.0, image.expand(2, -1, -1, -1), encoder_hidden_states=ctx, scale=0.7)
        feats = adapter(image.expand(2, -1, -1, -1))
        for step, weight in ((0, 1.3 + 0.5), (1, 1.3)):  # the third unit acts on the first half only
            want = unet(
                x,
                500.0,
                encoder_hidden_states=ctx,
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
                down_intrablock_additional_residuals=[f * weight for f in feats],
            )
            assert (got[step] - want).abs().max().item() < 1e-5, step


def test_adapter_features_are_computed_once_per_generation(sd_setup, monkeypatch):
    """An adapter's features depend on its map alone: one network call per generation (CFG's two row kinds in
    one batch), not one per U-Net call, and the picture the same as when every call ran it."""
    folder, pipe, adapter, path, cmap = sd_setup
    calls = []
    forward = T2IAdapter.forward

    def counted(self, x):
        calls.append(tuple(x.shape))
        return forward(self, x)

    monkeypatch.setattr(T2IAdapter, "forward", counted)
    ours = pipe(PROMPT, NEGATIVE, cfg_scale=7.5, controlnets=[(path, cmap, 0.8)], **_kw()).arrays
    assert len(calls) == 1, calls
    monkeypatch.setattr(torch, "is_grad_enabled", lambda: True)  # the cache's off switch: every call runs it
    calls.clear()
    again = pipe(PROMPT, NEGATIVE, cfg_scale=7.5, controlnets=[(path, cmap, 0.8)], **_kw()).arrays
    assert len(calls) == STEPS
    assert np.array_equal(ours[0], again[0])
