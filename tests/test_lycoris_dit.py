"""LyCORIS files on FLUX.2 [klein] and Z-Image against LyCORIS itself (``lycoris_lora``), on tiny random models.

The oracle is LyCORIS' own network: ``lycoris.create_lycoris`` wraps diffusers' transformer (as SimpleTuner does),
its factors are set to random numbers, it is applied to the transformer and saved with its own ``save_weights``, so
the file carries LyCORIS' own names (``lycoris_`` + the module path with underscores: ``lycoris_transformer_blocks_0_
attn_to_q.lokr_w1``) and its own alpha. sdengine loads that file into its own transformer; the transformer's output
(max abs) and the images of the whole pipeline (mean abs on 0..1 pixels) are compared with diffusers' with the
LyCORIS network applied. The kinds: LoHa; LoKr with a whole ``w1`` and ``w2`` as a low-rank pair (alpha / rank
applies), with ``w1`` as a low-rank pair (``decompose_both``) and a whole ``w2``, with both factors whole
(``full_matrix``: no alpha scale, whatever alpha the file says); a LoRA with DoRA (``dora_wd``: ``dora_scale``) and
a LoKr with DoRA. For FLUX.2, diffusers' own ``Flux2KleinPipeline.load_lora_weights`` reads such a LoKr file too (its
``_convert_lycoris_flux2_lokr_to_diffusers``, the blocks' layers only): compared as well; for Z-Image it reads a LoKr
in the dotted names (ai-toolkit's), compared with the same factors under LyCORIS' names.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("diffusers")
lycoris = pytest.importorskip("lycoris")

import sdengine  # noqa: E402
from _flux2_models import diffusers_klein_folder, make_klein_folder  # noqa: E402
from _z_image_models import Z_TRANSFORMER, diffusers_z, make_z_folder  # noqa: E402
from sdengine.weights.io import load_safetensors, save_safetensors  # noqa: E402
from sdengine.weights.lora import LoRAFileError, apply_loras  # noqa: E402

logging.getLogger("LyCORIS").setLevel(logging.ERROR)
_DEFAULT_TARGETS = list(lycoris.LycorisNetwork.TARGET_REPLACE_MODULE)

TOL = 1e-4  # mean absolute difference on 0..1 pixels (fp32, CPU)
PROMPT = "a red apple on a table"
SEED, STEPS, CFG = 3, 3, 3.0
DIM, ALPHA, WEIGHT = 2, 1.0, 0.7  # LyCORIS' linear_dim / linear_alpha (scale 0.5 where a rank applies); the weight

# LyCORIS' settings -> parts its file must hold (some layer of it)
VARIANTS = {
    "loha": (dict(algo="loha"), {"hada_w1_a", "hada_w2_b"}),
    "lokr": (dict(algo="lokr", factor=4), {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    "lokr_both_pairs": (dict(algo="lokr", decompose_both=True, factor=8), {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a"}),
    "lokr_full": (dict(algo="lokr", full_matrix=True), {"lokr_w1", "lokr_w2"}),
    "dora": (dict(algo="lora", dora_wd=True), {"lora_down.weight", "dora_scale"}),
    "lokr_dora": (dict(algo="lokr", factor=4, dora_wd=True), {"lokr_w2_a", "dora_scale"}),
}


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def _weight(settings: dict) -> float:
    """The weight a variant is compared at: DoRA's at 1. At another weight m sdengine keeps A1111's and ComfyUI's rule
    ``W + m (W' - W)``; LyCORIS' own forward and merge rescale ``W + dW`` by ``m (s / ||W + dW|| - 1) + 1`` (``dW``
    unscaled: at m = 0 it still adds ``dW``), so the two agree at 1 only."""
    return 1.0 if settings.get("dora_wd") else WEIGHT


def _network(transformer: torch.nn.Module, settings: dict, seed: int, preset: Path | None = None):
    """LyCORIS' network on diffusers' transformer, applied, its factors random (DoRA magnitudes: the layer's norms,
    each moved by up to ~10%)."""
    extra = {"preset": str(preset)} if preset is not None else {}
    try:
        net = lycoris.create_lycoris(
            transformer, _weight(settings), linear_dim=DIM, linear_alpha=ALPHA, **settings, **extra
        )
    finally:  # a preset stays on LyCORIS' class: back to its default targets (every Linear)
        lycoris.LycorisNetwork.TARGET_REPLACE_MODULE = _DEFAULT_TARGETS
    net.apply_to()  # (the modules are the network's parameters from here on)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("dora_scale"):
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net


def _save(net, path: Path, parts: set[str]) -> Path:
    net.save_weights(str(path), torch.float32, None)
    sd = load_safetensors(path)
    assert all(k.startswith("lycoris_") for k in sd), sorted(sd)[:3]
    got = {k.split(".", 1)[1] for k in sd}
    assert parts <= got, (parts, sorted(got))
    return path


def _complete(pipe, path: Path, layers: int) -> None:
    with apply_loras(pipe.transformer, None, [(path, 1.0)]) as h:
        rep = h.reports[0]
        assert rep.complete and len(rep.matched) == layers, rep.summary()


# ------------------------------------------------------------------------------------------------- FLUX.2 [klein]

W, H = 32, 48


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    folder = make_klein_folder(tmp_path_factory.mktemp("kleinlyco") / "klein-tiny", seed=5)
    return sdengine.load_pipeline(folder, device="cpu"), diffusers_klein_folder(folder), folder


def _klein_ours(pipe, **kw) -> np.ndarray:
    args = dict(negative_prompt="", cfg_scale=CFG, steps=STEPS, seed=SEED, width=W, height=H)
    return pipe(PROMPT, progress=False, **{**args, **kw}).arrays


def _klein_theirs(ref) -> np.ndarray:
    with torch.no_grad():
        return ref(prompt=PROMPT, guidance_scale=CFG, height=H, width=W, num_inference_steps=STEPS,
                   generator=torch.Generator().manual_seed(SEED), output_type="np").images  # fmt: skip


def _klein_velocity(
    transformer, ref, guidance: torch.Tensor | None = None, lora: tuple[Path, float] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """sdengine's transformer (with ``lora`` applied for the call) and diffusers' on one random latent and text."""
    from diffusers import Flux2KleinPipeline as P

    g = torch.Generator().manual_seed(9)
    latent = torch.randn(1, ref.config.in_channels, 3, 5, generator=g)
    text = torch.randn(1, 7, ref.config.joint_attention_dim, generator=g)
    sigma = torch.tensor([0.6])
    ids = P._prepare_latent_ids(latent)
    with torch.no_grad():
        out = ref(hidden_states=P._pack_latents(latent), encoder_hidden_states=text, timestep=sigma, img_ids=ids,
                  txt_ids=P._prepare_text_ids(text), guidance=guidance, return_dict=False)[0]  # fmt: skip
        want = P._unpack_latents_with_ids(out, ids, 3, 5)
        if lora is None:
            return transformer(latent, sigma * 1000, text, guidance=guidance), want
        with apply_loras(transformer, None, [lora]):
            return transformer(latent, sigma * 1000, text, guidance=guidance), want


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_flux2_lycoris_file_matches_lycoris(klein, tmp_path, variant):
    pipe, oracle, _ = klein
    settings, parts = VARIANTS[variant]
    plain = _klein_ours(pipe)
    net = _network(oracle.transformer, settings, seed=7)
    try:
        path = _save(net, tmp_path / f"{variant}.safetensors", parts)
        if variant == "lokr_full":  # two whole factors: LyCORIS applies no alpha scale, whatever alpha says
            sd = load_safetensors(path)
            path = tmp_path / "lokr_full_alpha.safetensors"
            save_safetensors({k: (torch.tensor(0.25) if k.endswith(".alpha") else v) for k, v in sd.items()}, path)
        _complete(pipe, path, len(net.loras))
        got, want = _klein_velocity(pipe.transformer, oracle.transformer, lora=(path, _weight(settings)))
        before = _klein_velocity(pipe.transformer, oracle.transformer)[0]
        err = float((got - want).abs().max())
        ours, theirs = _klein_ours(pipe, loras=[(path, _weight(settings))]), _klein_theirs(oracle)
    finally:
        net.restore()
    print(f"FLUX.2 {variant} vs LyCORIS: transformer max {err:.2e}, image mean {_mad(ours, theirs):.2e}")
    assert err < 2e-5 * max(1.0, float(want.abs().max())), err
    assert float((got - before).abs().max()) > 1e-2  # the file acts (sdengine's model without it: before)
    assert _mad(ours, theirs) < TOL
    assert _mad(ours, plain) > 3e-3
    np.testing.assert_allclose(_klein_theirs(oracle), _klein_ours(pipe), atol=1e-4)  # both back to the plain model


def test_flux2_lycoris_lokr_matches_diffusers_load_lora_weights(klein, tmp_path):
    """LyCORIS' LoKr on the blocks only (SimpleTuner's preset: ``Flux2TransformerBlock`` /
    ``Flux2SingleTransformerBlock``), both LoKr layouts: diffusers' loader reads the ``lycoris_`` names itself."""
    pipe, oracle, folder = klein
    preset = tmp_path / "blocks.toml"
    preset.write_text('target_module = ["Flux2TransformerBlock", "Flux2SingleTransformerBlock"]\n')
    files = {}
    # (the both-pairs LoKr of factor 8 is left out: diffusers' loader finds no decompose_factor for it and refuses)
    for variant in ("lokr", "lokr_full"):
        settings, parts = VARIANTS[variant]
        net = _network(oracle.transformer, settings, seed=8, preset=preset)
        try:
            path = _save(net, tmp_path / f"blocks_{variant}.safetensors", parts)
            assert all(k.startswith(("lycoris_transformer_blocks_", "lycoris_single_transformer_blocks_"))
                       for k in load_safetensors(path))  # fmt: skip
            files[variant] = path, _klein_theirs(oracle)
        finally:
            net.restore()
    loader = diffusers_klein_folder(folder)  # its own copy: PEFT's layers stay in a model once loaded
    for variant, (path, lycoris_image) in files.items():
        ours = _klein_ours(pipe, loras=[(path, WEIGHT)])
        loader.load_lora_weights(str(path), adapter_name=variant)
        loader.set_adapters([variant], [WEIGHT])
        theirs = _klein_theirs(loader)
        loader.delete_adapters(variant)
        print(f"FLUX.2 {variant} (blocks) vs diffusers load_lora_weights: mean {_mad(ours, theirs):.2e}")
        assert _mad(ours, theirs) < TOL, variant
        assert _mad(ours, lycoris_image) < TOL, variant


def test_flux2_lycoris_names_of_another_model_are_refused(klein, tmp_path):
    """A ``lycoris_`` name that is no module of this transformer (a bigger model's block), and a [dev] file's guidance
    embedder on klein: one line, nothing applied; before, the other layers applied and the name was only listed in
    the report (a warning)."""
    pipe, oracle, _ = klein
    net = _network(oracle.transformer, VARIANTS["lokr"][0], seed=9)
    try:
        sd = load_safetensors(_save(net, tmp_path / "lokr.safetensors", set()))
    finally:
        net.restore()
    extra = {k.replace("lycoris_transformer_blocks_0_", "lycoris_transformer_blocks_7_"): v
             for k, v in sd.items() if k.startswith("lycoris_transformer_blocks_0_attn_to_q.")}  # fmt: skip
    bad = tmp_path / "bigger.safetensors"
    save_safetensors({**sd, **extra}, bad)
    plain = _klein_ours(pipe)
    with pytest.raises(LoRAFileError) as e:
        _klein_ours(pipe, loras=[(bad, 1.0)])
    msg = str(e.value)
    assert "\n" not in msg
    assert (
        "1 of its layers match no layer of this FLUX.2 transformer (e.g. lycoris_transformer_blocks_7_attn_to_q)" in msg
    )
    np.testing.assert_array_equal(_klein_ours(pipe), plain)  # nothing was applied
    # a [dev] file's guidance embedder on klein (which has none), in diffusers' names: the same one line
    src = "lycoris_time_guidance_embed_timestep_embedder_linear_1."
    dev = {"transformer.time_guidance_embed.guidance_embedder.linear_1." + k.removeprefix(src): v
           for k, v in sd.items() if k.startswith(src)}  # fmt: skip
    save_safetensors({**sd, **dev}, bad)
    with pytest.raises(LoRAFileError, match=r"1 of its layers match no layer of this FLUX.2 transformer \(e\.g\. "
                       r"transformer\.time_guidance_embed\.guidance_embedder\.linear_1\)"):  # fmt: skip
        _klein_ours(pipe, loras=[(bad, 1.0)])


@pytest.mark.parametrize("variant", ["loha", "lokr", "lokr_full", "lokr_dora"])
def test_flux2_dev_transformer_lycoris_matches_lycoris(tmp_path, variant):
    """FLUX.2 [dev]'s transformer (the guidance embedder's two layers too): the velocity with LyCORIS' file loaded
    vs diffusers' transformer with LyCORIS' network applied."""
    from _flux2_models import flux2_transformer
    from sdengine.models.flux2 import Flux2Config, Flux2Transformer

    ref = flux2_transformer(seed=3, guidance_embeds=True)
    ours = Flux2Transformer(Flux2Config.from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict())
    settings, parts = VARIANTS[variant]
    net = _network(ref, settings, seed=10)
    try:
        path = _save(net, tmp_path / f"{variant}.safetensors", parts)
        assert any("guidance_embedder" in k for k in load_safetensors(path))
        got, want = _klein_velocity(ours, ref, guidance=torch.tensor([3.5]), lora=(path, _weight(settings)))
    finally:
        net.restore()
    before = _klein_velocity(ours, ref, guidance=torch.tensor([3.5]))[0]
    err = float((got - want).abs().max())
    print(f"FLUX.2 [dev] {variant} vs LyCORIS: transformer max {err:.2e}")
    assert err < 2e-5 * max(1.0, float(want.abs().max())), err
    assert float((got - before).abs().max()) > 1e-2


# ------------------------------------------------------------------------------------------------------- Z-Image

SIZE, NEGATIVE = 32, "blurry"


@pytest.fixture(scope="module")
def zimage(tmp_path_factory):
    folder = make_z_folder(tmp_path_factory.mktemp("zlyco") / "z-image-tiny")
    return sdengine.load_pipeline(folder, device="cpu"), diffusers_z(folder), folder


def _z_ours(pipe, **kw) -> np.ndarray:
    args = dict(negative_prompt=NEGATIVE, cfg_scale=CFG, steps=STEPS, seed=SEED, width=SIZE, height=SIZE)
    return pipe(PROMPT, progress=False, **{**args, **kw}).arrays


def _z_theirs(ref) -> np.ndarray:
    with torch.no_grad():
        return ref(PROMPT, negative_prompt=NEGATIVE, guidance_scale=CFG - 1, height=SIZE, width=SIZE,
                   num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED),
                   output_type="np").images  # fmt: skip


def _z_output(pipe, ref) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(9)
    latent = torch.randn(1, 16, 6, 8, generator=g)
    caps = torch.randn(1, 7, Z_TRANSFORMER["cap_feat_dim"], generator=g)
    t = torch.tensor([0.4])
    with torch.no_grad():
        want = torch.stack(ref(list(latent.unsqueeze(2).unbind(0)), t, list(caps), return_dict=False)[0]).squeeze(2)
        got = pipe.transformer(latent, t, caps, None)
    return got, want


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_z_image_lycoris_file_matches_lycoris(zimage, tmp_path, variant):
    pipe, oracle, _ = zimage
    settings, parts = VARIANTS[variant]
    plain = _z_ours(pipe)
    net = _network(oracle.transformer, settings, seed=7)
    try:
        path = _save(net, tmp_path / f"{variant}.safetensors", parts)
        _complete(pipe, path, len(net.loras))
        with apply_loras(pipe.transformer, None, [(path, _weight(settings))]):
            got, want = _z_output(pipe, oracle.transformer)
        before = _z_output(pipe, oracle.transformer)[0]
        err = float((got - want).abs().max())
        ours, theirs = _z_ours(pipe, loras=[(path, _weight(settings))]), _z_theirs(oracle)
    finally:
        net.restore()
    print(f"Z-Image {variant} vs LyCORIS: transformer max {err:.2e}, image mean {_mad(ours, theirs):.2e}")
    assert err < 2e-5 * max(1.0, float(want.abs().max())), err
    assert float((got - before).abs().max()) > 1e-2  # the file acts (sdengine's model without it: before)
    assert _mad(ours, theirs) < TOL
    assert _mad(ours, plain) > 3e-3
    np.testing.assert_allclose(_z_theirs(oracle), _z_ours(pipe), atol=1e-4)  # both back to the plain model


def test_z_image_lokr_matches_diffusers_load_lora_weights(zimage, tmp_path):
    """LyCORIS' LoKr saved by LyCORIS, and the same factors under the dotted names diffusers' Z-Image loader reads
    (``diffusion_model.layers.0.attention.to_q.lokr_w1``, ai-toolkit's): the same images, equal to diffusers'."""
    pipe, oracle, folder = zimage
    modules = {n.replace(".", "_"): n for n, _ in oracle.transformer.named_modules()}
    files = {}
    for variant in ("lokr", "lokr_full"):  # (diffusers finds no decompose_factor for the both-pairs one)
        settings, parts = VARIANTS[variant]
        net = _network(oracle.transformer, settings, seed=8)
        try:
            files[variant] = _save(net, tmp_path / f"{variant}.safetensors", parts)
        finally:
            net.restore()
    loader = diffusers_z(folder)  # its own copy: PEFT's layers stay in a model once loaded
    for variant, path in files.items():
        dotted = {}
        for k, v in load_safetensors(path).items():
            layer, part = k.split(".", 1)
            dotted[f"diffusion_model.{modules[layer.removeprefix('lycoris_')]}.{part}"] = v
        ours = _z_ours(pipe, loras=[(path, WEIGHT)])
        toolkit = tmp_path / f"toolkit_{variant}.safetensors"
        save_safetensors(dotted, toolkit)
        assert _mad(_z_ours(pipe, loras=[(toolkit, WEIGHT)]), ours) < 1e-6
        loader.load_lora_weights(dotted, adapter_name=variant)
        loader.set_adapters([variant], [WEIGHT])
        theirs = _z_theirs(loader)
        loader.delete_adapters(variant)
        print(f"Z-Image {variant} vs diffusers load_lora_weights: mean {_mad(ours, theirs):.2e}")
        assert _mad(ours, theirs) < TOL, variant


def test_z_image_names_of_another_model_are_refused(zimage, tmp_path):
    pipe, oracle, _ = zimage
    net = _network(oracle.transformer, VARIANTS["loha"][0], seed=9)
    try:
        sd = load_safetensors(_save(net, tmp_path / "loha.safetensors", set()))
    finally:
        net.restore()
    extra = {k.replace("lycoris_layers_0_", "lycoris_layers_30_"): v
             for k, v in sd.items() if k.startswith("lycoris_layers_0_attention_to_q.")}  # fmt: skip
    bad = tmp_path / "bigger.safetensors"
    save_safetensors({**sd, **extra}, bad)
    with pytest.raises(LoRAFileError) as e:
        _z_ours(pipe, loras=[(bad, 1.0)])
    assert "\n" not in str(e.value)
    assert "1 of its layers match no layer of this Z-Image transformer (e.g. lycoris_layers_30_attention_to_q)" in str(
        e.value
    )
