"""sdengine's Qwen-Image transformer against diffusers' QwenImageTransformer2DModel on a tiny random config."""

from __future__ import annotations

import pytest
import torch

from _qwen_models import QWEN_TRANSFORMER, qwen_transformer
from sdengine.errors import UsageError
from sdengine.models.config_checks import ConfigError
from sdengine.models.flux import pack_latents
from sdengine.models.qwen_image import QwenImageConfig, QwenImageTransformer


def _ours(ref) -> QwenImageTransformer:
    model = QwenImageTransformer(QwenImageConfig.from_diffusers(dict(ref.config))).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return model.to(ref.dtype)


def _inputs(batch: int, h: int, w: int, text: int, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(batch, 16, h, w, generator=g)
    states = torch.randn(batch, text, QWEN_TRANSFORMER["joint_attention_dim"], generator=g)
    t = torch.tensor([700.0, 213.5][:batch])
    return latent, states, t


@pytest.mark.parametrize(("h", "w"), [(8, 8), (6, 10)])
def test_transformer_matches_diffusers(h: int, w: int) -> None:
    ref = qwen_transformer(seed=1)
    ours = _ours(ref)
    latent, states, t = _inputs(2, h, w, 7)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0  # the second prompt is shorter: its padding is masked out
    with torch.no_grad():
        want = ref(
            hidden_states=pack_latents(latent),
            encoder_hidden_states=states,
            encoder_hidden_states_mask=mask,
            timestep=t / 1000,
            img_shapes=[[(1, h // 2, w // 2)]] * 2,
            return_dict=False,
        )[0]
        got = ours(latent, t, states, mask)
        unmasked = ours(latent, t, states, None)
        want_unmasked = ref(
            hidden_states=pack_latents(latent),
            encoder_hidden_states=states,
            timestep=t / 1000,
            img_shapes=[[(1, h // 2, w // 2)]] * 2,
            return_dict=False,
        )[0]
    assert got.shape == (2, 16, h, w)
    diff = (pack_latents(got) - want).abs().max().item()
    assert diff < 2e-5, diff
    assert (pack_latents(unmasked) - want_unmasked).abs().max().item() < 2e-5
    assert (unmasked[1] - got[1]).abs().max().item() > 1e-4  # the mask changes the shorter prompt's row


def test_transformer_bf16_as_close_as_diffusers() -> None:
    """In bfloat16 both round; ours is no further from the float32 result than diffusers' bf16 run is."""
    ref = qwen_transformer(seed=2)
    latent, states, t = _inputs(1, 4, 4, 5)
    with torch.no_grad():
        truth = pack_latents(_ours(ref)(latent, t, states))
        ref = ref.to(torch.bfloat16)
        want = ref(
            hidden_states=pack_latents(latent).bfloat16(),
            encoder_hidden_states=states.bfloat16(),
            timestep=t / 1000,
            img_shapes=[[(1, 2, 2)]],
            return_dict=False,
        )[0].float()
        got = pack_latents(_ours(ref)(latent.bfloat16(), t, states.bfloat16()).float())
    theirs = (want - truth).abs().max().item()
    assert (got - truth).abs().max().item() < 2 * theirs + 0.02


def test_config_refusals() -> None:
    for key in ("use_additional_t_cond", "use_layer3d_rope", "guidance_embeds"):
        with pytest.raises(ConfigError, match=key.split("_")[0]):
            QwenImageConfig.from_diffusers({**QWEN_TRANSFORMER, key: True})
    with pytest.raises(ConfigError, match="unknown"):
        QwenImageConfig.from_diffusers({**QWEN_TRANSFORMER, "mystery": 1})
    with pytest.raises(ConfigError, match="axes_dims_rope"):
        QwenImageConfig.from_diffusers({**QWEN_TRANSFORMER, "axes_dims_rope": [8, 12, 10]})
    with pytest.raises(ConfigError, match="num_layers"):
        QwenImageConfig.from_diffusers({**QWEN_TRANSFORMER, "num_layers": 100000})


def test_input_refusals() -> None:
    model = QwenImageTransformer(QwenImageConfig.from_diffusers(QWEN_TRANSFORMER)).eval()
    latent, states, t = _inputs(1, 4, 4, 5)
    with pytest.raises(UsageError, match="hidden_states"):
        model(latent[:, :8], t, states)
    with pytest.raises(UsageError, match="even"):
        model(latent[:, :, :3], t, states)
    with pytest.raises(UsageError, match="encoder_hidden_states"):
        model(latent, t, states[..., :10])
    with pytest.raises(UsageError, match="mask"):
        model(latent, t, states, torch.ones(1, 3))


def test_loader_folder_and_single_file(tmp_path) -> None:
    from safetensors.torch import save_file

    from sdengine.weights.io import WeightsError
    from sdengine.weights.qwen_image_file import load_qwen_image_transformer

    ref = qwen_transformer(seed=4)
    ref.save_pretrained(tmp_path / "transformer", max_shard_size="100KB")  # sharded, with its index
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    latent, states, t = _inputs(1, 4, 4, 5)
    with torch.no_grad():
        want = _ours(ref)(latent, t, states)
        got = load_qwen_image_transformer(tmp_path)(latent, t, states)
    assert (got - want).abs().max().item() < 1e-6
    # a ComfyUI-style single file (its prefix): the config from the shapes, the RoPE split given (32-wide heads)
    sd = {"model.diffusion_model." + k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(sd, tmp_path / "qwen_image.safetensors")
    with pytest.raises(WeightsError, match="axes_dims_rope"):
        load_qwen_image_transformer(tmp_path / "qwen_image.safetensors")
    single = load_qwen_image_transformer(tmp_path / "qwen_image.safetensors", axes_dims_rope=(8, 12, 12))
    with torch.no_grad():
        assert (single(latent, t, states) - want).abs().max().item() < 1e-6
    # a file missing a block's tensor: one line
    del sd["model.diffusion_model.transformer_blocks.1.img_mlp.net.2.bias"]
    save_file(sd, tmp_path / "broken.safetensors")
    with pytest.raises(WeightsError, match="img_mlp"):
        load_qwen_image_transformer(tmp_path / "broken.safetensors", axes_dims_rope=(8, 12, 12))
