"""Qwen-Image-Edit-2511: its transformer's ``zero_cond_t`` (the reference images' tokens modulated and gated by the
timestep-0 embedding, the generated latent's tokens and the text by the step's), against diffusers'
``QwenImageTransformer2DModel(zero_cond_t=True)`` and, end to end, ``QwenImageEditPlusPipeline`` on a tiny random
2511 folder (a 2509 folder of tests/_qwen_edit_models.py whose transformer config sets ``zero_cond_t``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from _qwen_models import QWEN_TRANSFORMER, qwen_transformer
from sdengine.models.flux import pack_latents
from sdengine.models.qwen_image import QwenImageConfig, QwenImageTransformer


def _ours(ref) -> QwenImageTransformer:
    model = QwenImageTransformer(QwenImageConfig.from_diffusers(dict(ref.config))).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return model


def test_zero_cond_t_transformer_matches_diffusers() -> None:
    """Two rows at different timesteps, a masked shorter prompt, two reference latents of other sizes."""
    ref = qwen_transformer(seed=5, zero_cond_t=True)
    ours = _ours(ref)
    assert ours.config.zero_cond_t
    g = torch.Generator().manual_seed(11)
    latent = torch.randn(2, 16, 6, 8, generator=g)
    refs = [torch.randn(2, 16, 4, 10, generator=g), torch.randn(2, 16, 8, 4, generator=g)]
    states = torch.randn(2, 7, QWEN_TRANSFORMER["joint_attention_dim"], generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    t = torch.tensor([700.0, 213.5])
    shapes = [[(1, 3, 4), (1, 2, 5), (1, 4, 2)]] * 2
    with torch.no_grad():
        packed = torch.cat([pack_latents(latent), *(pack_latents(r) for r in refs)], dim=1)
        want = ref(hidden_states=packed, encoder_hidden_states=states, encoder_hidden_states_mask=mask,
                   timestep=t / 1000, img_shapes=shapes, return_dict=False)[0][:, : 3 * 4]  # fmt: skip
        got = ours(latent, t, states, mask, reference=refs)
        # the same weights without zero_cond_t: the reference tokens' modulation changes the result
        plain = QwenImageTransformer(QwenImageConfig.from_diffusers({**dict(ref.config), "zero_cond_t": False}))
        plain.load_state_dict(ref.state_dict(), strict=True)
        other = plain.eval()(latent, t, states, mask, reference=refs)
        # without a reference every token is the generated image's: zero_cond_t changes nothing
        alone, alone_plain = ours(latent, t, states, mask), plain(latent, t, states, mask)
    diff = (pack_latents(got) - want).abs().max().item()
    assert diff < 1e-4, diff
    assert (got - other).abs().max().item() > 1e-3
    assert torch.equal(alone, alone_plain)


def test_zero_cond_t_must_be_a_bool() -> None:
    from sdengine.models.config_checks import ConfigError

    with pytest.raises(ConfigError, match="zero_cond_t='yes' is not true/false"):
        QwenImageConfig.from_diffusers({**QWEN_TRANSFORMER, "zero_cond_t": "yes"})


@pytest.fixture(scope="module")
def folder_2511(tmp_path_factory):
    from _qwen_edit_models import make_qwen_edit_folder

    folder = make_qwen_edit_folder(tmp_path_factory.mktemp("qwen_edit_2511") / "Qwen-Image-Edit-2511", plus=True)
    path = folder / "transformer" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "zero_cond_t": True}))
    return folder


def test_edit_2511_matches_diffusers(folder_2511):
    """The whole Edit Plus pipeline on a zero_cond_t transformer, two input images of different sizes, true CFG."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as module

    import sdengine
    from _qwen_edit_models import diffusers_qwen_edit
    from test_qwen_edit_plus import AREAS, CONDITION_AREA, EDIT_AREA, _image

    pipe = sdengine.load_pipeline(folder_2511, device="cpu")
    assert pipe.transformer.config.zero_cond_t
    pipe.edit_area, pipe.condition_area = EDIT_AREA, CONDITION_AREA
    images = [_image(130, 90), _image(60, 100, seed=1)]
    original = module.calculate_dimensions
    module.calculate_dimensions = lambda area, ratio: original(AREAS[area], ratio)
    try:
        oracle = diffusers_qwen_edit(folder_2511, plus=True)
        assert oracle.transformer.config.zero_cond_t
        with torch.no_grad():
            want = oracle(
                image=images,
                prompt="make the apple green",
                negative_prompt="blurry",
                true_cfg_scale=4.0,
                num_inference_steps=3,
                generator=torch.Generator().manual_seed(7),
                output_type="np",
            ).images
    finally:
        module.calculate_dimensions = original
    got = pipe("make the apple green", negative_prompt="blurry", reference_images=images, cfg_scale=4.0, steps=3,
               seed=7, progress=False)  # fmt: skip
    assert got.arrays.shape == want.shape
    diff = np.abs(got.arrays - want)
    assert diff.mean() < 1e-5 and diff.max() < 1e-4, (diff.mean(), diff.max())


def test_comfyui_single_file_marker_sets_zero_cond_t(tmp_path) -> None:
    """ComfyUI's 2511 single files carry an empty ``__index_timestep_zero__`` tensor: read as zero_cond_t (the
    model equals the diffusers folder's); the marker beside a config saying zero_cond_t=false is one line."""
    from safetensors.torch import save_file

    from sdengine.weights.io import WeightsError
    from sdengine.weights.qwen_image_file import ZERO_COND_MARKER, load_qwen_image_transformer, qwen_image_from_state

    ref = qwen_transformer(seed=5, zero_cond_t=True)
    sd = {f"model.diffusion_model.{k}": v.contiguous() for k, v in ref.state_dict().items()}
    save_file({**sd, f"model.diffusion_model.{ZERO_COND_MARKER}": torch.empty(0)}, str(tmp_path / "q.safetensors"))
    save_file(sd, str(tmp_path / "plain.safetensors"))
    axes = tuple(QWEN_TRANSFORMER["axes_dims_rope"])
    model = load_qwen_image_transformer(tmp_path / "q.safetensors", axes_dims_rope=axes)
    assert model.config.zero_cond_t
    without = load_qwen_image_transformer(tmp_path / "plain.safetensors", axes_dims_rope=axes).eval()
    assert not without.config.zero_cond_t
    g = torch.Generator().manual_seed(2)
    latent, reference = torch.randn(1, 16, 4, 4, generator=g), torch.randn(1, 16, 6, 4, generator=g)
    states = torch.randn(1, 5, QWEN_TRANSFORMER["joint_attention_dim"], generator=g)
    with torch.no_grad():
        got = model.eval()(latent, 500.0, states, reference=reference)
        want = _ours(ref)(latent, 500.0, states, reference=reference)
        other = without(latent, 500.0, states, reference=reference)
    assert (got - want).abs().max().item() < 1e-5
    assert (got - other).abs().max().item() > 1e-3
    plain = QwenImageConfig.from_diffusers({**dict(ref.config), "zero_cond_t": False})
    marked = {**ref.state_dict(), ZERO_COND_MARKER: torch.empty(0)}
    with pytest.raises(WeightsError, match="__index_timestep_zero__ .* zero_cond_t=false") as e:
        qwen_image_from_state(marked, "x", config=plain)
    assert "\n" not in str(e.value)
