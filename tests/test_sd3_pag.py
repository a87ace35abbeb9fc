"""Perturbed-attention guidance on SD3's MMDiT against diffusers' StableDiffusion3PAGPipeline and
StableDiffusion3PAGImg2ImgPipeline on a tiny random SD3 folder (txt2img with CFG and alone, img2img, the default
and a named layer, the adaptive scale), the perturbed joint attention against a masked attention written here, the
layer rule on SD3 Medium's 24 blocks, the CLI with its infotext, and the refusals."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _sd3_models import SIZE, make_sd3_folder  # noqa: E402
from sdengine.errors import GenerationError, SdengineError  # noqa: E402
from sdengine.models.mmdit import (  # noqa: E402
    SD3_MEDIUM,
    TINY_MMDIT,
    MMDiT,
    pag_joint_layers,
    perturbed_attention,
)

TOL = 1e-4  # mean absolute difference on 0..1 pixels (measured: 1.5e-7 to 2.2e-7)
STEPS = 3
PROMPT, NEGATIVE = "a red apple on a table", "blurry, dark"
SEED = 3


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    folder = make_sd3_folder(tmp_path_factory.mktemp("sd3pag") / "tiny-sd3")
    return folder, sdengine.load_pipeline(folder, device="cpu")


def _diffusers(folder, kind: str, layers: str):
    import diffusers

    cls = diffusers.StableDiffusion3PAGPipeline if kind == "txt2img" else diffusers.StableDiffusion3PAGImg2ImgPipeline
    pipe = cls.from_pretrained(folder, local_files_only=True, pag_applied_layers=layers.split(","))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pair(sd3, *, kind="txt2img", layers=None, cfg=5.0, pag=3.0, adaptive=0.0, **extra):
    """(sdengine's, diffusers') 0..1 pixels for the same settings; ``layers`` None: each side's default."""
    folder, pipe = sd3
    ref = _diffusers(folder, kind, "blocks.1" if layers is None else layers)
    theirs = ref(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=cfg,
        pag_scale=pag,
        pag_adaptive_scale=adaptive,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="np",
        **({"width": SIZE, "height": SIZE} if kind == "txt2img" else {"image": extra["init_image"], "strength": 0.6}),
    ).images[0]
    ours = pipe(
        PROMPT,
        NEGATIVE,
        steps=STEPS,
        sampler="euler",
        cfg_scale=cfg,
        seed=SEED,
        width=SIZE,
        height=SIZE,
        pag_scale=pag,
        **({} if layers is None else {"pag_layers": layers}),
        **({"sd3": {"pag_adaptive_scale": adaptive}} if adaptive else {}),
        **({"init_image": extra["init_image"], "strength": 0.6} if kind == "img2img" else {}),
        progress=False,
    )
    return ours, theirs


def _mad(ours, theirs) -> float:
    return float(np.abs(ours.arrays[0].astype(np.float64) - theirs.astype(np.float64)).mean())


def _plain_differs(sd3, ours, **kw) -> None:
    """PAG changed the image (the parity is not that of two unperturbed runs)."""
    _, pipe = sd3
    plain = pipe(PROMPT, NEGATIVE, steps=STEPS, sampler="euler", seed=SEED, width=SIZE, height=SIZE, **kw)
    assert np.abs(plain.arrays[0] - ours.arrays[0]).mean() > 1e-3


def test_txt2img_default_layers_with_cfg_matches_diffusers(sd3):
    ours, theirs = _pair(sd3)  # sdengine's default "mid" runs as diffusers' SD3 default "blocks.1"
    assert _mad(ours, theirs) < TOL
    assert "PAG scale: 3" in ours.infotexts[0] and "PAG layers: blocks.1" in ours.infotexts[0]
    _plain_differs(sd3, ours, cfg_scale=5.0, progress=False)


def test_txt2img_named_full_block_and_adaptive_scale_match_diffusers(sd3):
    # block 0 has a context output (block 1 is the last, "pre only"); the scale falls with the step
    ours, theirs = _pair(sd3, layers="blocks.0", adaptive=0.002)
    assert _mad(ours, theirs) < TOL
    assert "PAG adaptive scale: 0.002" in ours.infotexts[0]


def test_pag_alone_at_cfg_1_matches_diffusers(sd3):
    ours, theirs = _pair(sd3, cfg=1.0, layers="transformer_blocks.0.attn,blocks.1")
    assert _mad(ours, theirs) < TOL
    _plain_differs(sd3, ours, cfg_scale=1.0, progress=False)


def test_img2img_matches_diffusers(sd3):
    from PIL import Image

    rng = np.random.default_rng(0)
    init = Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8))
    ours, theirs = _pair(sd3, kind="img2img", init_image=init)
    assert _mad(ours, theirs) < TOL


def _heads(attn, t, norm=None):
    """(1, L, heads * d) -> (1, heads, L, d), RMS-normed per head by ``norm`` where given."""
    t = t.view(1, -1, attn.heads, attn.head_dim)
    return (t if norm is None else norm(t)).transpose(1, 2)


def test_perturbed_joint_attention_is_the_masked_attention_and_leaves_other_rows():
    """On TINY_MMDIT (q/k RMS norms, an MMDiT-X block): the perturbed rows of a call equal attention under
    diffusers' mask (image tokens see only themselves among the image tokens, and every text token), and the rows
    before them are the unperturbed ones."""
    torch.manual_seed(0)
    model = MMDiT(TINY_MMDIT).eval()
    for attn in (model.transformer_blocks[1].attn, model.transformer_blocks[2].attn):  # full block, pre only
        x, ctx = torch.randn(2, 9, 24), torch.randn(2, 5, 24)
        plain = attn(x, ctx)
        with perturbed_attention([attn], 1):
            got = attn(x, ctx)
        assert torch.equal(got[0][:1], plain[0][:1])
        # the reference: the joint attention with an additive mask, computed here
        heads = partial(_heads, attn)
        q = torch.cat([heads(attn.to_q(x[1:]), attn.norm_q), heads(attn.add_q_proj(ctx[1:]), attn.norm_added_q)], 2)
        k = torch.cat([heads(attn.to_k(x[1:]), attn.norm_k), heads(attn.add_k_proj(ctx[1:]), attn.norm_added_k)], 2)
        v = torch.cat([heads(attn.to_v(x[1:])), heads(attn.add_v_proj(ctx[1:]))], 2)
        mask = torch.zeros(14, 14)
        mask[:9, :9] = float("-inf")
        mask[:9, :9].fill_diagonal_(0)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(1, 14, -1)
        torch.testing.assert_close(got[0][1:], attn.to_out[0](out[:, :9]), atol=1e-6, rtol=1e-5)
        if attn.to_add_out is not None:
            assert got[1] is not None and plain[1] is not None
            assert torch.equal(got[1][:1], plain[1][:1])
            torch.testing.assert_close(got[1][1:], attn.to_add_out(out[:, 9:]), atol=1e-6, rtol=1e-5)
        assert attn.perturbed_rows == 0  # switched back


def test_layer_names_follow_diffusers_rule_on_sd3_medium():
    with torch.device("meta"):
        model = MMDiT(SD3_MEDIUM)
    index = {id(b.attn): i for i, b in enumerate(model.transformer_blocks)}

    def blocks(*patterns: str) -> list[int]:
        return [index[id(m)] for m in pag_joint_layers(model, list(patterns))]

    assert blocks("blocks.1") == [1, *range(10, 20)]  # diffusers' default: "." is any character, 1x matches too
    assert blocks("blocks.1.attn$") == [1] and blocks("13") == [13] and blocks("blocks.(2|3)\\.") == [2, 3]
    assert blocks("blocks.23", "blocks.0.") == [0, 23]


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ("mid_block", "PAG layer 'mid_block' matches no joint-attention layer of the MMDiT"),
        ("blocks.(", "PAG layer 'blocks.(' is not a regular expression"),
        ("attn2", "PAG layer 'attn2' matches no joint-attention layer"),
        ("blocks.1,", "pag_layers holds an empty layer name"),
    ],
)
def test_bad_layer_names_are_one_line_errors(sd3, layers, message):
    _, pipe = sd3
    with pytest.raises(SdengineError, match=message.replace("(", r"\(").replace(".", r"\.")) as e:
        pipe(PROMPT, steps=1, pag_scale=3.0, pag_layers=layers, width=SIZE, height=SIZE, progress=False)
    assert "\n" not in str(e.value)


def test_refusals(sd3):
    _, pipe = sd3
    kw = dict(steps=1, width=SIZE, height=SIZE, progress=False)
    with pytest.raises(GenerationError, match="pag_scale .* and skip-layer guidance together are not supported"):
        pipe(PROMPT, pag_scale=3.0, sd3={"skip_guidance_layers": [0]}, **kw)
    with pytest.raises(GenerationError, match=r"sd3 pag_adaptive_scale must be in \[0, 1\], got -0.5"):
        pipe(PROMPT, pag_scale=3.0, sd3={"pag_adaptive_scale": -0.5}, **kw)
    with pytest.raises(GenerationError, match="pag_scale must be a number"):
        pipe(PROMPT, pag_scale=-1.0, **kw)


def test_cli_runs_pag_on_sd3_and_from_png_again(sd3, tmp_path):
    from PIL import Image

    from sdengine.cli import main
    from sdengine.metadata import parse_parameters

    folder, pipe = sd3
    out = tmp_path / "a"
    args = ["generate", PROMPT, "--model", str(folder), "--seed", "5", "--no-progress", "--steps", "2"]
    pag = ["--pag-scale", "2.5", "--pag-layers", "blocks.0", "--pag-adaptive-scale", "0.001"]
    assert main([*args, *pag, "--out", str(out)]) == 0
    made = next(out.glob("*.png"))
    fields = parse_parameters(Image.open(made).info["parameters"])
    assert (fields["PAG scale"], fields["PAG layers"], fields["PAG adaptive scale"]) == ("2.5", "blocks.0", "0.001")
    direct = pipe(PROMPT, steps=2, seed=5, sampler="euler", schedule="normal", cfg_scale=7.0, pag_scale=2.5,
                  pag_layers="blocks.0", sd3={"pag_adaptive_scale": 0.001}, progress=False)  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(made)), np.asarray(direct.images[0]))
    again = tmp_path / "b"
    assert (
        main(["generate", "--from-png", str(made), "--model", str(folder), "--out", str(again), "--no-progress"]) == 0
    )
    assert np.array_equal(np.asarray(Image.open(made)), np.asarray(Image.open(next(again.glob("*.png")))))


@pytest.mark.parametrize(
    ("flags", "why"),
    [
        (["--pag-adaptive-scale", "0.001"], "--pag-adaptive-scale has no effect without a --pag-scale above 0"),
        (["--pag-scale", "2", "--pag-layers", "mid_block"], "PAG layer 'mid_block' matches no joint-attention layer"),
        (["--pag-scale", "2", "--pag-adaptive-scale", "2"], "sd3 pag_adaptive_scale must be in [0, 1], got 2.0"),
        (["--pag-scale", "2", "--slg", "0"], "and skip-layer guidance together are not supported"),
    ],
)
def test_bad_cli_pag_flags_on_sd3_are_one_line_errors(sd3, tmp_path, capsys, flags, why):
    from sdengine.cli import main

    folder, _ = sd3
    out = tmp_path / "o"
    assert main(["generate", "x", "--model", str(folder), "--steps", "1", *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert why in err and len(err.splitlines()) == 1, err
    assert not list(tmp_path.rglob("*.png"))


def test_the_recorded_loop_keys_pag_and_its_adaptive_scale(sd3):
    """On the whole-loop graph (recorded with the tests' CPU stand-in, which replays the first plan of a key) every
    PAG setting, the adaptive scale and the call's shift included, has a recording of its own and the eager image."""
    from _cpu_graphs import images_per_recorded_loop

    folder, _ = sd3
    pipe = sdengine.load_pipeline(folder, device="cpu", dtype="fp32", fast_path="none")
    pag = {"pag_scale": 3.0, "pag_layers": "blocks.0"}
    settings = [
        {},
        pag,
        {**pag, "sd3": {"pag_adaptive_scale": 0.002}},
        {**pag, "sd3": {"pag_adaptive_scale": 0.002}, "shift": 2.0},
    ]
    images, loop = images_per_recorded_loop(pipe, settings, steps=2, seed=3, width=SIZE, height=SIZE, progress=False)
    assert loop.recordings == len(settings)
