"""sdengine's FLUX.2 VAE and transformer against diffusers' ``AutoencoderKLFlux2`` / ``Flux2Transformer2DModel`` on
tiny random weights saved in diffusers' folder layout (fp32), and their configs' one-line refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _flux2_models import FLUX2_TRANSFORMER, flux2_transformer, flux2_vae
from sdengine.errors import UsageError
from sdengine.models.config_checks import ConfigError
from sdengine.models.flux2 import Flux2Config, Flux2Transformer
from sdengine.models.flux2_vae import Flux2VAE, Flux2VAEConfig, patchify, unpatchify
from sdengine.weights.flux2_file import load_flux2_transformer, load_flux2_vae
from sdengine.weights.io import WeightsError


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, object]:
    root = tmp_path_factory.mktemp("flux2")
    vae, transformer = flux2_vae(1), flux2_transformer(2, guidance_embeds=True)
    vae.save_pretrained(root / "vae")
    transformer.save_pretrained(root / "transformer")
    return root, vae, transformer


# -- the VAE ---------------------------------------------------------------------------------------------


def test_vae_matches_diffusers(saved) -> None:
    """Encode mean and logvar, decode, and the pipeline's patchify + batch-norm normalisation both ways, on a
    non-square image: equal to diffusers' AutoencoderKLFlux2 and Flux2KleinPipeline's own helpers."""
    from diffusers import Flux2KleinPipeline

    root, ref, _ = saved
    ours = load_flux2_vae(root)  # the pipeline folder: its vae/
    assert isinstance(ours, Flux2VAE) and ours.config.decoder_block_out_channels == (8, 16, 32)
    x = torch.rand(2, 3, 24, 40, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        want = ref.encode(x).latent_dist
        got = ours.encode(x)
        assert (got.mean - want.mean).abs().max() < 1e-6
        assert (got.logvar - want.logvar).abs().max() < 1e-6
        z = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(4))
        assert (ours.decode(z) - ref.decode(z).sample).abs().max() < 1e-6
        # the pipeline's latent: _patchify_latents then (z - running_mean) / sqrt(running_var + eps)
        bn = ref.bn
        p = Flux2KleinPipeline._patchify_latents(z)
        want_scaled = (p - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(
            bn.running_var.view(1, -1, 1, 1) + ref.config.batch_norm_eps
        )
        scaled = ours.scale_latents(z)
        assert scaled.shape == (2, 16, 4, 6)
        assert (scaled - want_scaled).abs().max() < 1e-6
        assert torch.equal(unpatchify(patchify(z)), z)
        assert torch.equal(Flux2KleinPipeline._unpatchify_latents(p), unpatchify(p))
        assert (ours.unscale_latents(scaled) - z).abs().max() < 1e-5


def test_vae_stays_in_eval_and_config_round_trip(saved) -> None:
    root, ref, _ = saved
    ours = load_flux2_vae(root / "vae")
    ours.train()
    assert not ours.bn.training  # its statistics are the released ones: never updated
    cfg = Flux2VAEConfig.from_diffusers(dict(ref.config))
    assert Flux2VAEConfig.from_diffusers(cfg.to_diffusers()) == cfg
    assert (cfg.downscale_factor, cfg.diffusion_factor, cfg.diffusion_channels) == (4, 8, 16)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"_class_name": "AutoencoderKL"}, "not a FLUX.2 VAE config: _class_name='AutoencoderKL'"),
        ({"patch_size": [1, 1]}, "patch_size=[1, 1] is not supported"),
        ({"decoder_block_out_channels": [8, 16]}, "decoder_block_out_channels=(8, 16) must be a list of 3 widths"),
        ({"batch_norm_eps": 0}, "batch_norm_eps=0 must be a number in (0, 1)"),
        ({"up_block_types": ["AttnUpDecoderBlock2D"] * 3}, "block types"),
        ({"latent_channels": 1000}, "latent_channels=1000 is out of range"),
        ({"frobnicate": 1}, "options not supported by sdengine: frobnicate"),
    ],
)
def test_vae_config_refusals(saved, change: dict, message: str) -> None:
    _, ref, _ = saved
    with pytest.raises(ConfigError) as e:
        Flux2VAEConfig.from_diffusers({**dict(ref.config), "_class_name": "AutoencoderKLFlux2", **change})
    assert message in str(e.value) and "\n" not in str(e.value)


# -- the transformer -------------------------------------------------------------------------------------


def _diffusers_velocity(model, latent, text, sigma, guidance=None, references=()):
    """diffusers' transformer as Flux2KleinPipeline calls it: packed tokens, its position ids, t in 0..1."""
    from diffusers import Flux2KleinPipeline as P

    B, _, H, W = latent.shape
    ids = P._prepare_latent_ids(latent)
    tokens = P._pack_latents(latent)
    all_ids = ids
    if references:
        ref_ids = P._prepare_image_ids(list(references))
        tokens = torch.cat([tokens, *[P._pack_latents(r).expand(B, -1, -1) for r in references]], dim=1)
        all_ids = torch.cat([ids, ref_ids.expand(B, -1, -1)], dim=1)
    out = model(
        hidden_states=tokens,
        encoder_hidden_states=text,
        timestep=sigma,
        img_ids=all_ids,
        txt_ids=P._prepare_text_ids(text),
        guidance=guidance,
        return_dict=False,
    )[0][:, : H * W]
    return P._unpack_latents_with_ids(out, ids, H, W)


def test_transformer_matches_diffusers(saved) -> None:
    """Velocity of a non-square latent (3 x 5) with 7 text tokens at two timesteps, with and without the guidance
    embedding, and with two reference latents (their ids at t = 10, 20): equal to Flux2Transformer2DModel's."""
    root, _, ref = saved
    ours = load_flux2_transformer(root)
    assert isinstance(ours, Flux2Transformer) and ours.config.guidance_embeds
    g = torch.Generator().manual_seed(5)
    latent, text = torch.randn(2, 16, 3, 5, generator=g), torch.randn(2, 7, 24, generator=g)
    sigma = torch.tensor([0.8, 0.35])
    refs = (torch.randn(1, 16, 2, 4, generator=g), torch.randn(1, 16, 4, 2, generator=g))
    with torch.no_grad():
        for guidance, references in ((None, ()), (torch.tensor([3.5, 2.0]), ()), (None, refs)):
            want = _diffusers_velocity(ref, latent, text, sigma, guidance, references)
            got = ours(latent, sigma * 1000, text, guidance=guidance, reference_latents=list(references) or None)
            assert got.shape == latent.shape
            assert (got - want).abs().max() < 1e-5 * max(1.0, float(want.abs().max()))
            assert float(want.abs().max()) > 0.1  # a real signal, not zeros


def test_transformer_bf16_matches_diffusers(saved) -> None:
    """In bfloat16, timesteps rounded as Flux2KleinPipeline rounds them (the step's t in the latents' dtype, / 1000,
    x 1000 in the model): bit-equal to diffusers' bf16 transformer."""
    _, _, ref = saved
    ref16 = flux2_transformer(2, guidance_embeds=True).to(torch.bfloat16)
    ours = Flux2Transformer(Flux2Config.from_diffusers(dict(ref.config)))
    ours.load_state_dict(ref16.state_dict())
    ours = ours.to(torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    latent, text = torch.randn(2, 16, 3, 5, generator=g), torch.randn(2, 7, 24, generator=g)
    t = torch.tensor([875.3, 351.7])  # 875.3 is 876 in bfloat16
    with torch.no_grad():
        for guidance in (None, torch.tensor([3.5, 2.0])):
            g16 = None if guidance is None else guidance.bfloat16()
            want = _diffusers_velocity(ref16, latent.bfloat16(), text.bfloat16(), t.bfloat16() / 1000, g16)
            got = ours(latent, t, text, guidance=guidance)
            assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_transformer_config_and_input_refusals() -> None:
    base = {**FLUX2_TRANSFORMER, "_class_name": "Flux2Transformer2DModel"}
    cases = [
        ({"axes_dims_rope": [4, 4, 8]}, "axes_dims_rope=(4, 4, 8) must be four even numbers"),
        ({"axes_dims_rope": [4, 4, 4, 8]}, "adds up to 20, not attention_head_dim=16"),
        ({"patch_size": 2}, "patch_size=2 is not supported"),
        ({"mlp_ratio": -1}, "mlp_ratio=-1 must be a number in (0, 16]"),
        ({"num_layers": 100000}, "num_layers=100000 is out of range"),
        ({"in_channels": 5000}, "in_channels=5000 is out of range"),
        ({"guidance_embeds": "yes"}, "guidance_embeds='yes' is not true/false"),
        ({"_class_name": "FluxTransformer2DModel"}, "not a FLUX.2 transformer config"),
        ({"pooled_projection_dim": 768}, "unknown FLUX.2 transformer config options: pooled_projection_dim"),
        ({"num_attention_heads": 1024, "attention_head_dim": 4096, "axes_dims_rope": [1024] * 4}, "refusing to build"),
    ]
    for change, message in cases:
        with pytest.raises(ConfigError) as e:
            Flux2Config.from_diffusers({**base, **change})
        assert message in str(e.value) and "\n" not in str(e.value), (change, str(e.value))
    model = Flux2Transformer(Flux2Config.from_diffusers(base))  # guidance_embeds false
    x, text = torch.zeros(1, 16, 2, 2), torch.zeros(1, 3, 24)
    for call, message in (
        (lambda: model(x[:, :8], 500.0, text), "hidden_states must be a (B, 16, H, W) latent"),
        (lambda: model(x, 500.0, text[..., :8]), "encoder_hidden_states must be (B=1, L, 24)"),
        (lambda: model(x, 500.0, text, guidance=3.5), "no guidance embedding"),
        (lambda: model(x, float("nan"), text), "timestep must be finite"),
        (lambda: model(x, 500.0, text, reference_latents=[x[:, :4]]), "reference latent 0 must be"),
    ):
        with pytest.raises(UsageError, match="FLUX.2 transformer") as e:
            call()
        assert message in str(e.value)


def test_folder_refusals(tmp_path: Path, saved) -> None:
    root, _, _ = saved
    # a single file in diffusers' names is read with the release's RoPE axes, for 128-wide heads only (these are 16)
    with pytest.raises(WeightsError, match="16-wide heads: a single file's RoPE axes are read for FLUX.2's 128-wide"):
        load_flux2_transformer(root / "transformer" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(WeightsError, match="not a FLUX.2 VAE folder"):
        load_flux2_vae(tmp_path)
    bad = tmp_path / "vae"
    bad.mkdir()
    (bad / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    with pytest.raises(WeightsError, match="not a FLUX.2 VAE config"):
        load_flux2_vae(tmp_path)
