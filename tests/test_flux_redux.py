"""FLUX.1 Redux on the Flux pipeline against diffusers' FluxPriorReduxPipeline (with the text encoders) whose
prompt embeds are handed to FluxPipeline, on a tiny random Flux [dev] folder and a tiny SigLIP / Redux encoder;
the strength rule (ComfyUI's "multiply": the image's tokens only), several units side by side, the units given
SigLIP tokens, and the one-line refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import sdengine  # noqa: E402
from _flux_models import diffusers_flux, make_flux_folder  # noqa: E402
from _pipeline_models import picture  # noqa: E402
from sdengine.errors import GenerationError, SdengineError  # noqa: E402
from sdengine.pipeline.redux import ReduxUnit, redux_tokens  # noqa: E402
from sdengine.weights.redux_file import load_redux, load_siglip_vision  # noqa: E402
from test_siglip_redux import _randomize, hf_siglip  # noqa: E402

TOL = 1e-4  # mean absolute difference on 0..1 pixels (fp32, CPU)
PROMPT = "a red apple"
SEED = 3
W, H = 32, 32
SIGLIP_SIZE = 32  # the tiny SigLIP's image side (so400m's is 384): 8 x 8 patches of 4


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


@pytest.fixture(scope="module")
def redux(tmp_path_factory):
    """(flux folder, our pipeline, diffusers' FluxPipeline, diffusers' prior, the prior's folder)."""
    import diffusers
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder

    root = tmp_path_factory.mktemp("redux")
    folder = make_flux_folder(root / "tiny-flux", guidance=True, seed=4)
    flux = diffusers_flux(folder)
    siglip = hf_siglip(seed=7, hidden=48, image=SIGLIP_SIZE)
    torch.manual_seed(0)
    embedder = ReduxImageEncoder(redux_dim=48, txt_in_features=32).eval()  # the tiny T5's width
    _randomize(embedder, 9)
    prior = diffusers.FluxPriorReduxPipeline(
        image_encoder=siglip,
        feature_extractor=transformers.SiglipImageProcessor(size={"height": SIGLIP_SIZE, "width": SIGLIP_SIZE}),
        image_embedder=embedder,
        text_encoder=flux.text_encoder,
        tokenizer=flux.tokenizer,
        text_encoder_2=flux.text_encoder_2,
        tokenizer_2=flux.tokenizer_2,
    )
    prior.set_progress_bar_config(disable=True)
    prior_folder = root / "tiny-redux"
    prior.save_pretrained(prior_folder)
    return folder, sdengine.load_pipeline(folder, device="cpu"), flux, prior, prior_folder


def _theirs(flux, prior, image, *, steps=3) -> np.ndarray:
    out = prior(image, prompt=PROMPT, prompt_2=PROMPT)
    return flux(
        prompt_embeds=out.prompt_embeds,
        pooled_prompt_embeds=out.pooled_prompt_embeds,
        num_inference_steps=steps,
        width=W,
        height=H,
        generator=torch.Generator().manual_seed(SEED),
        output_type="np",
    ).images


def test_redux_matches_diffusers_prior_and_flux(redux):
    _, pipe, flux, prior, prior_folder = redux
    image = picture(45, 29, seed=2)  # squashed to 32 x 32 as SiglipImageProcessor does
    ours = pipe(PROMPT, steps=3, seed=SEED, width=W, height=H, redux=[ReduxUnit(prior_folder, image)], progress=False)
    want = _theirs(flux, prior, image)
    assert _mad(ours.arrays, want) < TOL
    plain = pipe(PROMPT, steps=3, seed=SEED, width=W, height=H, progress=False)
    assert _mad(ours.arrays, plain.arrays) > 10 * TOL  # the image's tokens change the picture


def test_strength_scales_the_image_tokens_only_and_units_join(redux):
    _, pipe, _, prior, prior_folder = redux
    embedder = load_redux(prior_folder / "image_embedder")
    siglip = load_siglip_vision(prior_folder / "image_encoder")
    a, b = picture(40, 40, seed=1), picture(33, 50, seed=5)
    one = redux_tokens([ReduxUnit(embedder, a, siglip)], 32, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        want = prior.image_embedder(prior.encode_image(a, "cpu", 1)).image_embeds
    assert one.shape == (1, 64, 32) and (one - want).abs().max().item() < 1e-5
    both = redux_tokens(
        [ReduxUnit(embedder, a, siglip, strength=0.5), ReduxUnit(embedder, b, siglip, strength=2.0)],
        32,
        torch.device("cpu"),
        torch.float32,
    )
    two = redux_tokens([ReduxUnit(embedder, b, siglip)], 32, torch.device("cpu"), torch.float32)
    assert both.shape == (1, 128, 32)
    assert torch.allclose(both[:, :64], 0.5 * one, atol=1e-6) and torch.allclose(both[:, 64:], 2 * two, atol=1e-6)
    # SigLIP's tokens given in place of the image: the same picture
    with torch.no_grad():
        states = siglip(prior.feature_extractor(a, return_tensors="pt").pixel_values)
    args = dict(steps=2, seed=SEED, width=W, height=H, progress=False)
    by_image = pipe(PROMPT, redux=[ReduxUnit(embedder, a, siglip, strength=0.7)], **args)
    by_tokens = pipe(PROMPT, redux=[ReduxUnit(embedder, siglip_tokens=states[0], strength=0.7)], **args)
    np.testing.assert_allclose(by_image.arrays, by_tokens.arrays, atol=1e-6)
    zero = pipe(PROMPT, redux=[ReduxUnit(embedder, a, siglip, strength=0.0)], **args)
    assert _mad(zero.arrays, by_image.arrays) > 10 * TOL


def test_true_cfg_runs_the_longer_positive_apart_as_diffusers(redux):
    """cfg_scale above 1 with a negative prompt: the positive (T5 + Redux tokens) and the negative (T5 only) run
    as two transformer calls, as diffusers' FluxPipeline runs true CFG (``true_cfg_scale``, the negative's own
    embeds and text ids, its two passes apart) given FluxPriorReduxPipeline's prompt embeds; two rows with their
    own seeds (the negative given as text: diffusers asks embeds given for both of one shape)."""
    _, pipe, flux, prior, prior_folder = redux
    image = picture(45, 29, seed=2)
    ours = pipe(
        [PROMPT, PROMPT],
        "blurry",
        steps=3,
        seed=[SEED, 8],
        width=W,
        height=H,
        cfg_scale=2.5,
        redux=[ReduxUnit(prior_folder, image, strength=0.8)],
        progress=False,
    )
    out = prior(image, prompt=PROMPT, prompt_2=PROMPT)
    embeds, pooled = out.prompt_embeds, out.pooled_prompt_embeds
    t5 = flux.encode_prompt(PROMPT, PROMPT)[0]
    embeds = torch.cat([embeds[:, : t5.shape[1]], 0.8 * embeds[:, t5.shape[1] :]], dim=1)  # the strength
    for row, seed in enumerate((SEED, 8)):
        want = flux(
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            negative_prompt="blurry",
            true_cfg_scale=2.5,
            num_inference_steps=3,
            width=W,
            height=H,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        ).images
        assert _mad(ours.arrays[row : row + 1], want) < TOL
    plain = pipe(PROMPT, "blurry", steps=3, seed=SEED, width=W, height=H, cfg_scale=2.5, progress=False)
    assert _mad(ours.arrays[:1], plain.arrays) > 10 * TOL
    # a CFG++ sampler reads the unconditional pass at scale 1: it runs too
    pp = pipe(PROMPT, steps=2, seed=SEED, width=W, height=H, sampler="euler_cfg_pp",
              redux=[ReduxUnit(prior_folder, image)], progress=False)  # fmt: skip
    assert np.isfinite(pp.arrays).all()


def _switched_reference(pipe, monkeypatch, x: str, y: str, switch: int, **kw) -> np.ndarray:
    """The plain prompt ``x`` with Redux, its conditional rows' T5 tokens and pooled vector swapped for ``y``'s from
    sampler step ``switch`` on (the steps told apart by their timestep): A1111's ``[x:y:when]`` run by hand."""
    from sdengine.pipeline import flux as flux_module

    real = flux_module.FluxAdapter.__call__
    with torch.no_grad():
        xs, ys = pipe.conditioner.text(x), pipe.conditioner.text(y)
    n = xs["crossattn"].shape[1]
    seen: list[float] = []

    def call(self, x_, t, *, crossattn, vector, **more):
        key = float(t.reshape(-1)[0])
        if key not in seen:
            seen.append(key)
        if seen.index(key) >= switch:
            crossattn, vector = crossattn.clone(), vector.clone()
            for row in range(crossattn.shape[0]):
                if torch.equal(crossattn[row, :n], xs["crossattn"][0].to(crossattn.dtype)):
                    crossattn[row, :n] = ys["crossattn"][0]
                    vector[row] = ys["vector"][0]
        return real(self, x_, t, crossattn=crossattn, vector=vector, **more)

    with monkeypatch.context() as m:
        m.setattr(flux_module.FluxAdapter, "__call__", call)
        out = pipe(x, **kw).arrays
    assert len(seen) == kw["steps"]
    return out


@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_prompt_editing_adds_the_redux_tokens_to_every_steps_positive(redux, monkeypatch, cfg):
    """``[x:y:0.5]`` with Redux: each step's positive T5 tokens with the image's tokens after them (the negative
    without), at cfg 1 and under true CFG (the longer positive run apart): equal to a run that swaps x's text for
    y's at the switch; an edit between two equal texts gives the plain prompt's image."""
    _, pipe, _, _, prior_folder = redux
    unit = ReduxUnit(prior_folder, picture(45, 29, seed=2), strength=0.8)
    kw = dict(steps=4, seed=SEED, width=W, height=H, cfg_scale=cfg, redux=[unit], progress=False)
    kw["negative_prompt"] = "blurry"
    plain = pipe(PROMPT, **kw).arrays
    same = pipe(f"[{PROMPT}:{PROMPT}:0.5]", **kw).arrays
    assert np.abs(same - plain).max() <= 1e-6
    edited = pipe(f"[{PROMPT}:a green pear:0.5]", **kw).arrays
    # A1111's schedule: [(2, x), (4, y)], a step reads the first entry whose end is >= its 0-based index
    want = _switched_reference(pipe, monkeypatch, PROMPT, "a green pear", 3, **kw)
    assert np.abs(edited - want).max() <= 1e-5
    assert _mad(want, _switched_reference(pipe, monkeypatch, PROMPT, "a green pear", 4, **kw)) > TOL  # it swaps
    assert _mad(edited, plain) > 10 * TOL  # the second text changes the picture
    without = pipe(f"[{PROMPT}:a green pear:0.5]", **{**kw, "redux": None}).arrays
    assert _mad(edited, without) > 10 * TOL  # the Redux tokens are there after the switch too


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"redux": ReduxUnit("x")}, "redux must be a list of ReduxUnit, got ReduxUnit"),
        ({"redux": ["x"]}, "redux takes ReduxUnit values, got str"),
        ({"redux": [ReduxUnit("x", picture(8, 8), "y", strength=-1)]}, "redux strength must be a number from 0 to 10"),
        ({"redux": [ReduxUnit("x")]}, "a Redux unit takes an image or siglip_tokens"),
        ({"redux": [ReduxUnit("/nonexistent", picture(8, 8))]}, "a Redux unit's image needs the SigLIP encoder"),
        ({"redux": [ReduxUnit("/nonexistent/r.safetensors", picture(8, 8), "/x")]}, "no such Redux file or folder"),
        ({"redux": [ReduxUnit("x", siglip_tokens=torch.zeros(2, 3, 4))]}, r"siglip_tokens must be a tensor \(N, C\)"),
    ],
)
def test_refusals(redux, kwargs, message):
    _, pipe, _, _, prior_folder = redux
    args = {"prompt": PROMPT, "redux": [ReduxUnit(prior_folder, picture(20, 20))], "steps": 1, "width": W, "height": H}
    args.update(kwargs)
    with pytest.raises(SdengineError, match=message):  # WeightsError for a file, GenerationError else
        pipe(progress=False, **args)


def test_wrong_widths_and_models_are_refused(redux, tmp_path, tiny_sd1_folder):
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder

    _, pipe, _, _, prior_folder = redux
    wide = ReduxImageEncoder(redux_dim=48, txt_in_features=40)
    wide.save_pretrained(tmp_path / "wide")
    unit = ReduxUnit(tmp_path / "wide", picture(20, 20), prior_folder / "image_encoder")
    with pytest.raises(GenerationError, match="makes 40-wide tokens, the Flux transformer reads 32-wide T5 tokens"):
        pipe(PROMPT, redux=[unit], steps=1, width=W, height=H, progress=False)
    narrow = ReduxImageEncoder(redux_dim=24, txt_in_features=32)
    narrow.save_pretrained(tmp_path / "narrow")
    unit = ReduxUnit(tmp_path / "narrow", picture(20, 20), prior_folder / "image_encoder")
    with pytest.raises(GenerationError, match="the image tokens are 48-wide, the Redux encoder takes 24"):
        pipe(PROMPT, redux=[unit], steps=1, width=W, height=H, progress=False)
    sd = sdengine.load_pipeline(tiny_sd1_folder, device="cpu")
    with pytest.raises(
        GenerationError, match="redux .FLUX.1 Redux image prompts. applies to FLUX.1 models; .* not one"
    ):
        sd(PROMPT, steps=1, redux=[ReduxUnit(prior_folder, picture(20, 20))], progress=False)


def test_cli_redux_image_equals_the_pipeline(redux, tmp_path, capsys):
    from PIL import Image

    from sdengine.cli import main

    folder, pipe, _, _, prior_folder = redux
    src = tmp_path / "style.png"
    picture(36, 28, seed=4).save(src)
    out = tmp_path / "a.png"
    args = ["generate", "--model", str(folder), PROMPT, "--steps", "2", "--seed", str(SEED), "--no-progress"]
    args += ["--width", str(W), "--height", str(H)]
    redux_args = ["--redux-image", str(src), "--redux-model", str(prior_folder), "--redux-strength", "0.6"]
    assert main([*args, *redux_args, "--out", str(out)]) == 0
    got = np.asarray(Image.open(out), dtype=np.float32) / 255
    unit = ReduxUnit(prior_folder, Image.open(src), strength=0.6)
    want = pipe(PROMPT, steps=2, seed=SEED, width=W, height=H, redux=[unit], progress=False).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(want))
    assert got.shape == (H, W, 3)

    def refused(argv: list[str]) -> str:
        capsys.readouterr()
        assert main(argv) == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    assert "--redux-image needs --redux-model" in refused(
        [*args, "--redux-image", str(src), "--out", str(tmp_path / "b.png")]
    )
    assert "--redux-strength has no effect without --redux-image" in refused(
        [*args, "--redux-strength", "0.5", "--out", str(tmp_path / "c.png")]
    )
    assert "is the --redux-image image this run reads" in refused([*args, *redux_args, "--out", str(src)])


def test_chroma_refuses_redux(redux, tmp_path):
    """Chroma is a FluxPipeline subclass (T5 tokens too) without Redux: refused in one line."""
    from _chroma_models import make_chroma_folder

    _, _, _, _, prior_folder = redux
    pipe = sdengine.load_pipeline(make_chroma_folder(tmp_path / "tiny-chroma"), device="cpu")
    with pytest.raises(
        GenerationError, match="redux .FLUX.1 Redux image prompts. applies to FLUX.1 models; .* not one"
    ):
        pipe(PROMPT, steps=1, width=W, height=H, redux=[ReduxUnit(prior_folder, picture(20, 20))], progress=False)


def test_infotext_records_redux_and_from_png_makes_the_image_again(redux, tmp_path, capsys, monkeypatch):
    """``Redux N``: the image's file name and pixel hash, the strength, the model's name and hash; ``--from-png``
    finds the image beside the PNG by that name and hash (or takes --redux-image), the model from --redux-model
    (its hash checked), and makes the same pixels; a missing image or another model: one line."""
    import shutil

    from PIL import Image

    from sdengine.cli import main
    from sdengine.metadata import parse_parameters, read_png_parameters, recorded_redux
    from sdengine.pipeline.redux import image_hash

    folder, _, _, _, prior_folder = redux
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "style.png"
    picture(36, 28, seed=4).save(src)
    out = tmp_path / "a.png"
    args = ["generate", "--model", str(folder), "--seed", str(SEED), "--no-progress", "--steps", "2"]
    first = [*args, PROMPT, "--width", str(W), "--height", str(H), "--cfg", "2", "--negative", "dull"]
    redux_args = ["--redux-image", str(src), "--redux-model", str(prior_folder), "--redux-strength", "0.6"]
    assert main([*first, *redux_args, "--out", str(out)]) == 0
    text = read_png_parameters(out)
    (r,) = recorded_redux(parse_parameters(text))
    assert (r.image, r.image_hash, r.strength, r.model) == ("style.png", image_hash(src), 0.6, "tiny-redux")
    assert r.model_hash is not None and r.siglip is None
    again = tmp_path / "b.png"
    assert main(["generate", "--from-png", str(out), "--model", str(folder), "--redux-model", str(prior_folder),
                 "--no-progress", "--out", str(again)]) == 0  # fmt: skip
    np.testing.assert_array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))

    def refused(argv: list[str]) -> str:
        capsys.readouterr()
        assert main(argv) == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(out, elsewhere / "a.png")
    monkeypatch.chdir(elsewhere)
    base = ["generate", "--from-png", str(elsewhere / "a.png"), "--model", str(folder), "--no-progress"]
    base += ["--out", str(elsewhere / "c.png")]
    assert "was made with the Redux image 'style.png'" in refused([*base, "--redux-model", str(prior_folder)])
    assert "give it with --redux-model" in refused(base)
    picture(36, 28, seed=5).save(elsewhere / "style.png")  # the same name, other pixels
    assert "not beside it or in the working folder with those pixels" in refused(
        [*base, "--redux-model", str(prior_folder)]
    )
    other = tmp_path / "other-redux"
    shutil.copytree(prior_folder, other)
    w = other / "image_embedder" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:-4] + b"\0\0\0\0")
    assert "but --redux-model" in refused([*base, "--redux-image", str(src), "--redux-model", str(other)])


@pytest.mark.parametrize(
    "value, message",
    [
        ("Image: a.png [0123456789], Strength: 1", "no Redux model or image recorded"),
        ("Strength: 1, Model: r [0123456789]", "no Redux model or image recorded"),
        ("Image: a.png, Strength: much, Model: r", "Strength must be a number from 0 to 10"),
        ("Image: a.png, Strength: 11, Model: r", "Strength must be a number from 0 to 10"),
    ],
)
def test_recorded_redux_refuses_fields_it_cannot_run_again(value, message):
    from sdengine.metadata import MetadataError, format_redux, recorded_redux

    with pytest.raises(MetadataError, match=message):
        recorded_redux({"Redux 0": value})
    text = format_redux(image="a, b.png", image_hash="0123456789", strength=0.25, model="r:x", siglip="s")
    (r,) = recorded_redux({"Redux 0": text})  # separators removed from the names, as A1111's readers split on them
    assert (r.image, r.image_hash, r.strength, r.model, r.siglip) == ("a b.png", "0123456789", 0.25, "rx", "s")
