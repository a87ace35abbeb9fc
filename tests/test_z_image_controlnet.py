"""Z-Image's ControlNets (alibaba-pai's Z-Image-Turbo-Fun-Controlnet-Union as diffusers runs it) against diffusers'
ZImageControlNetModel + ZImageTransformer2DModel and its ZImageControlNetPipeline / ZImageControlNetInpaintPipeline,
on tiny random weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from _z_image_models import Z_TRANSFORMER, perturb, z_transformer
from sdengine.control.dit_files import read_dit_controlnet
from sdengine.models.z_image import ZImageConfig, ZImageTransformer
from sdengine.models.z_image_controlnet import ZImageControlNet, ZImageControlNetConfig

KINDS = {
    "1.0": dict(control_layers_places=[0, 1], control_in_dim=16),
    "2.0": dict(
        control_layers_places=[0, 1],
        control_refiner_layers_places=[0, 1],
        control_in_dim=33,
        add_control_noise_refiner="control_layers",
    ),
    "2.1": dict(
        control_layers_places=[0, 1],
        control_refiner_layers_places=[0, 1],
        control_in_dim=33,
        add_control_noise_refiner="control_noise_refiner",
    ),
}


def z_controlnet(seed: int, **cfg):
    """A tiny random diffusers ``ZImageControlNetModel`` for the transformer of ``_z_image_models`` (fp32, eval)."""
    import diffusers

    torch.manual_seed(seed)
    shape = {k: Z_TRANSFORMER[k] for k in ("dim", "n_refiner_layers", "n_heads", "n_kv_heads", "norm_eps", "qk_norm")}
    net = diffusers.ZImageControlNetModel(**shape, **cfg)
    return perturb(net, seed + 1).eval()


def save_controlnet(dst: Path, seed: int, **cfg) -> Path:
    z_controlnet(seed, **cfg).save_pretrained(dst)
    return dst


@pytest.mark.parametrize("kind", list(KINDS))
def test_residuals_and_the_transformer_with_them_match_diffusers(kind: str) -> None:
    """A batch of two with captions of different lengths (the shorter row masked), a 6 x 10 latent (60 tokens padded
    to 64), scale 0.6: the whole controlled transformer against diffusers' ControlNet + transformer."""
    ref = z_transformer(seed=1)
    cn = z_controlnet(5, **KINDS[kind])
    ours = ZImageTransformer(ZImageConfig.from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    net = ZImageControlNet(ZImageControlNetConfig.from_diffusers(dict(cn.config))).eval()
    net.load_state_dict(cn.state_dict(), strict=True)
    g = torch.Generator().manual_seed(3)
    latent = torch.randn(2, 16, 6, 10, generator=g)
    control = torch.randn(2, KINDS[kind]["control_in_dim"], 6, 10, generator=g)
    lengths = (7, 40)
    caps = [torch.randn(n, Z_TRANSFORMER["cap_feat_dim"], generator=g) for n in lengths]
    t = torch.tensor([0.3, 0.7865])
    import diffusers

    diffusers.ZImageControlNetModel.from_transformer(cn, ref)
    with torch.no_grad():
        xs = list(latent.unsqueeze(2).unbind(0))
        samples = cn(xs, t, caps, list(control.unsqueeze(2).unbind(0)), conditioning_scale=0.6)
        want = torch.stack(ref(xs, t, caps, controlnet_block_samples=samples, return_dict=False)[0]).squeeze(2)
        plain = torch.stack(ref(xs, t, caps, return_dict=False)[0]).squeeze(2)
    states = torch.zeros(2, max(lengths), Z_TRANSFORMER["cap_feat_dim"])
    mask = torch.zeros(2, max(lengths), dtype=torch.bool)
    for i, c in enumerate(caps):
        states[i, : len(c)], mask[i, : len(c)] = c, True
    with torch.no_grad():
        got = ours(latent, t, states, mask, control=lambda s, x: net(ours, s, x, control, 0.6))
    diff = (got - want).abs().max().item()
    assert diff < 5e-6, diff
    assert (want - plain).abs().max().item() > 1e-2  # the ControlNet changes the output


# ----------------------------------------------------------------------------------------------------------
# The pipeline against diffusers' ZImageControlNetPipeline / ZImageControlNetInpaintPipeline

SIZE = 32  # 16 x 16 latents, 8 x 8 tokens
SEED = 7
PROMPT = "a red apple on a table"
TOL = 1e-4  # mean abs difference on 0..1 pixels


def _picture(seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8))


def _mask():
    from PIL import Image

    m = np.zeros((SIZE, SIZE), dtype=np.uint8)
    m[SIZE // 4 : 3 * SIZE // 4, SIZE // 8 : SIZE // 2] = 255
    return Image.fromarray(m)


@pytest.fixture(scope="module")
def zimage(tmp_path_factory):
    import sdengine
    from _z_image_models import make_z_folder

    root = tmp_path_factory.mktemp("zimagecn")
    folder = make_z_folder(root / "z-image-tiny")
    nets = {kind: save_controlnet(root / f"cn-{kind}", 40 + i, **KINDS[kind]) for i, kind in enumerate(KINDS)}
    return folder, sdengine.load_pipeline(folder, device="cpu"), nets


def _theirs(folder: Path, net: Path, *, scale: float, cfg: float, negative: str | None, steps: int = 3, **kw):
    import diffusers

    from _z_image_models import diffusers_z

    base = diffusers_z(folder)
    cn = diffusers.ZImageControlNetModel.from_pretrained(net)
    inpaint = "mask_image" in kw
    cls = diffusers.ZImageControlNetInpaintPipeline if inpaint else diffusers.ZImageControlNetPipeline
    pipe = cls(**base.components, controlnet=cn)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(
            PROMPT,
            negative_prompt=negative,
            guidance_scale=cfg - 1.0,
            height=SIZE,
            width=SIZE,
            num_inference_steps=steps,
            controlnet_conditioning_scale=scale,
            generator=torch.Generator().manual_seed(SEED),
            output_type="np",
            **kw,
        ).images


def _ours(pipe, units, *, cfg: float, negative: str, steps: int = 3):
    return pipe(PROMPT, negative_prompt=negative, cfg_scale=cfg, steps=steps, seed=SEED, width=SIZE, height=SIZE,
                controlnets=units, progress=False)  # fmt: skip


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    value = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())
    print(f"mean abs difference {value:.2e}")
    return value


@pytest.mark.parametrize(
    ("kind", "scale", "cfg", "negative"),
    [("1.0", 1.0, 1.0, ""), ("2.1", 0.6, 3.0, "blurry"), ("2.0", 0.6, 1.0, ""), ("1.0", 0.6, 4.0, "")],
)
def test_text_to_image_matches_diffusers(zimage, kind: str, scale: float, cfg: float, negative: str) -> None:
    """The folder by sdengine (its own prompt encoding) with one unit against ``ZImageControlNetPipeline``; a 2.x
    ControlNet without a mask reads zeros after the control latent."""
    from sdengine.pipeline.control import ControlUnit

    folder, pipe, nets = zimage
    control = _picture(1)
    got = _ours(pipe, [ControlUnit(str(nets[kind]), control, scale)], cfg=cfg, negative=negative)
    want = _theirs(folder, nets[kind], scale=scale, cfg=cfg, negative=negative, control_image=control)
    assert _mad(got.arrays, want) < TOL
    plain = pipe(PROMPT, negative_prompt=negative, cfg_scale=cfg, steps=3, seed=SEED, width=SIZE, height=SIZE,
                 progress=False)  # fmt: skip
    assert _mad(plain.arrays, want) > 50 * TOL  # the ControlNet changes the image


@pytest.mark.parametrize(("scale", "cfg"), [(1.0, 3.0), (0.6, 1.0)])
def test_inpainting_matches_diffusers(zimage, scale: float, cfg: float) -> None:
    """A 2.1 unit with ``mask`` and ``inpaint_image`` against ``ZImageControlNetInpaintPipeline``."""
    from sdengine.pipeline.control import ControlUnit

    folder, pipe, nets = zimage
    control, photo, mask = _picture(1), _picture(2), _mask()
    unit = ControlUnit(str(nets["2.1"]), control, scale, mask=mask, inpaint_image=photo)
    got = _ours(pipe, [unit], cfg=cfg, negative="blurry")
    want = _theirs(folder, nets["2.1"], scale=scale, cfg=cfg, negative="blurry", control_image=control, image=photo,
                   mask_image=mask)  # fmt: skip
    assert _mad(got.arrays, want) < TOL
    no_mask = _ours(pipe, [ControlUnit(str(nets["2.1"]), control, scale)], cfg=cfg, negative="blurry")
    assert _mad(no_mask.arrays, want) > 10 * TOL  # the mask and the picture are read
