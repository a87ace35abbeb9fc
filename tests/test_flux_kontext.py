"""FLUX.1 Kontext (reference images on the Flux pipeline) against diffusers' FluxKontextPipeline on a tiny random
Flux [dev] folder (Kontext [dev] has FLUX.1 [dev]'s shapes): images with a non-square reference (auto-resize off
and on), true CFG and a batch with a reference, the reference positions (diffusers' one, ComfyUI's "offset" layout
of several), the infotext and the command line, and the one-line refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _flux_models import make_flux_folder  # noqa: E402
from _pipeline_models import picture  # noqa: E402
from sdengine.cli import main  # noqa: E402
from sdengine.errors import GenerationError  # noqa: E402
from sdengine.models.flux import reference_ids  # noqa: E402
from sdengine.pipeline import flux_kontext  # noqa: E402

TOL = 1e-4  # mean absolute difference on 0..1 pixels (fp32, CPU)
PROMPT, NEGATIVE = "make the apple green", "blurry, dark"
SEED = 3
W, H = 48, 32  # the output; the tiny VAE is 2x: multiples of 4 (16 for Flux.1's 8x VAE)


@pytest.fixture(scope="module")
def kontext(tmp_path_factory):
    import diffusers

    folder = make_flux_folder(tmp_path_factory.mktemp("kontext") / "tiny-flux-kontext", guidance=True, seed=2)
    ref = diffusers.FluxKontextPipeline.from_pretrained(folder, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    return folder, sdengine.load_pipeline(folder, device="cpu"), ref


def _reference(width: int = 42, height: int = 26):
    """A non-square reference image whose sides are not multiples of 4 (floored to 40x24 without auto-resize)."""
    return picture(width, height, seed=1)


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def _theirs(ref, image, prompt=PROMPT, *, width=W, height=H, seeds=(SEED,), **kw) -> np.ndarray:
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    args = dict(num_inference_steps=3, height=height, width=width, max_area=width * height, output_type="np")
    args.update(kw)
    return ref(image=image, prompt=prompt, generator=gens if len(gens) > 1 else gens[0], **args).images


def test_kontext_matches_diffusers_without_auto_resize(kontext):
    _, pipe, ref = kontext
    image = _reference()
    ours = pipe(PROMPT, steps=3, seed=SEED, width=W, height=H, reference_images=image, reference_auto_resize=False)
    assert _mad(ours.arrays, _theirs(ref, image, _auto_resize=False)) < TOL
    assert ours.parameters["Reference images"] == 1 and ours.parameters["Reference image size"] == "40x24"
    assert ours.parameters["Reference resize"] == "off" and ours.parameters["Distilled CFG Scale"] == 3.5
    assert any("reference image 0 42x26 resized to 40x24" in n for n in ours.notes)
    plain = pipe(PROMPT, steps=3, seed=SEED, width=W, height=H, progress=False)
    assert _mad(ours.arrays, plain.arrays) > 10 * TOL  # the reference's tokens change the image


def test_kontext_auto_resize_matches_diffusers(kontext, monkeypatch):
    """Auto-resize picks the preferred resolution of the floored image's aspect ratio. The real table is about 1 MP
    (too big for a CPU test): both pipelines get the same table at 1/16 of its sides; the output takes the
    reference's size here (diffusers': width / height at max_area, given to it)."""
    import diffusers.pipelines.flux.pipeline_flux_kontext as theirs_module

    _, pipe, ref = kontext
    small = [(w // 16, h // 16) for w, h in flux_kontext.PREFERRED_KONTEXT_RESOLUTIONS]
    monkeypatch.setattr(flux_kontext, "PREFERRED_KONTEXT_RESOLUTIONS", tuple(small))
    monkeypatch.setattr(theirs_module, "PREFERRED_KONTEXT_RESOLUTIONS", small)
    image = _reference(50, 30)  # floored 48x28 (1.71): nearest 1328x800 (1.66) -> 83x50 -> 80x48
    ours = pipe(PROMPT, steps=2, seed=SEED, reference_images=[image], progress=False)
    assert (ours.parameters["width"], ours.parameters["height"]) == (80, 48)
    assert ours.parameters["Reference image size"] == "80x48" and "Reference resize" not in ours.parameters
    theirs = _theirs(ref, image, width=80, height=48, num_inference_steps=2)
    assert _mad(ours.arrays, theirs) < TOL


def test_preferred_resolutions_are_diffusers_and_the_nearest_is_taken():
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    assert flux_kontext.PREFERRED_KONTEXT_RESOLUTIONS == tuple(PREFERRED_KONTEXT_RESOLUTIONS)
    assert flux_kontext.kontext_size(1000, 600, 16, True) == (1328, 800)  # floored 992x592: 1.676, 1328/800 = 1.66
    assert flux_kontext.kontext_size(600, 1000, 16, True) == (800, 1328)
    assert flux_kontext.kontext_size(512, 512, 16, True) == (1024, 1024)
    assert flux_kontext.kontext_size(1000, 600, 16, False) == (992, 592)


def test_true_cfg_and_batch_with_a_reference_match_diffusers(kontext):
    """cfg_scale above 1 with a negative prompt (diffusers' true_cfg_scale: the reference in both passes), two
    rows with their own seeds."""
    _, pipe, ref = kontext
    image = _reference()
    ours = pipe(
        [PROMPT, "a dog"],
        NEGATIVE,
        steps=2,
        seed=[SEED, 7],
        width=W,
        height=H,
        cfg_scale=2.5,
        reference_images=image,
        reference_auto_resize=False,
        progress=False,
    )
    theirs = _theirs(
        ref,
        image,
        [PROMPT, "a dog"],
        seeds=(SEED, 7),
        negative_prompt=[NEGATIVE, NEGATIVE],
        true_cfg_scale=2.5,
        num_inference_steps=2,
        _auto_resize=False,
    )
    assert _mad(ours.arrays, theirs) < TOL


def test_reference_positions_one_as_diffusers_several_as_comfyui_offset():
    one = reference_ids([(4, 6)])
    assert one[:, 0].tolist() == [1.0] * 6  # the first id 1 (the image's are 0)
    assert one[:, 1:].tolist() == [[r, c] for r in range(2) for c in range(3)]
    two = reference_ids([(4, 6), (6, 4)])  # the second is not taller than the box is wide: below it, 4 rows = 2
    assert two[6:, 1:].tolist() == [[r, c] for r in range(2, 5) for c in range(2)]
    tall = reference_ids([(4, 4), (8, 2)])  # taller (8 + 4 > 2 + 4): right of the box, 4 columns = 2 patches
    assert tall[4:, 1:].tolist() == [[r, c] for r in range(4) for c in range(2, 3)]
    index = reference_ids([(4, 6), (6, 4)], method="index")  # ComfyUI's "index": ids 1, 2, no shift
    assert index[:6, 0].tolist() == [1.0] * 6 and index[6:, 0].tolist() == [2.0] * 6
    assert index[6:, 1:].tolist() == [[r, c] for r in range(3) for c in range(2)]
    uxo = reference_ids([(4, 6), (6, 4)], method="uxo", image=(8, 10))  # id 0, past the 8 x 10 image (4 x 5 patches)
    assert uxo[:, 0].tolist() == [0.0] * 12
    assert uxo[:6, 1:].tolist() == [[r, c] for r in range(4, 6) for c in range(5, 8)]
    assert uxo[6:, 1:].tolist() == [[r, c] for r in range(6, 9) for c in range(8, 10)]  # and past the first one
    with pytest.raises(sdengine.errors.UsageError, match="unknown reference method 'diagonal'"):
        reference_ids([(4, 4)], method="diagonal")


def test_two_references_run_and_differ_from_one(kontext):
    _, pipe, _ = kontext
    kw = dict(steps=2, seed=SEED, width=W, height=H, reference_auto_resize=False, progress=False)
    one = pipe(PROMPT, reference_images=[_reference()], **kw)
    two = pipe(PROMPT, reference_images=[_reference(), picture(24, 40, seed=5)], **kw)
    assert two.parameters["Reference images"] == 2 and two.parameters["Reference image size"] == "40x24, 24x40"
    assert np.isfinite(two.arrays).all() and _mad(one.arrays, two.arrays) > 10 * TOL


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"init_image": picture(W, H), "init_latent_resize": True}, "and init_latent_resize cannot run together"),
        ({"enable_hr": True}, r"reference_images \(FLUX.1 Kontext\) and the hires fix cannot run together"),
        ({"controlnets": [("cn", picture(W, H), 1.0)]}, "reference_images .* and Flux ControlNets cannot run"),
        ({"control_image": picture(W, H)}, "control_image"),  # Depth / Canny's map: not with references either
        ({"reference_images": [picture(8, 8)] * 5}, "5 reference images: at most 4"),
        ({"reference_images": [None]}, r"reference_images holds an empty entry \(None\)"),
        ({"reference_auto_resize": "no"}, "reference_auto_resize must be true or false, got 'no'"),
        ({"reference_images": None, "reference_auto_resize": False}, "reference_auto_resize applies to reference_imag"),
        ({"reference_images": picture(2, 2)}, "reference image 2x2 is smaller than 4x4 pixels"),
        ({"reference_images": "/nonexistent/ref.png"}, "reference image 0 not found: /nonexistent/ref.png"),
    ],
)
def test_refusals(kontext, kwargs, message):
    _, pipe, _ = kontext
    args = {"reference_images": _reference(), "steps": 2, "width": W, "height": H, "progress": False, **kwargs}
    with pytest.raises(GenerationError, match=message):
        pipe(PROMPT, **args)


def test_sd_model_refuses_reference_images(tiny_sd1_folder):
    pipe = sdengine.load_pipeline(tiny_sd1_folder, device="cpu")
    with pytest.raises(GenerationError, match=r"reference_images \(--reference-image\) are FLUX.1 Kontext's; .* not a"):
        pipe(PROMPT, steps=1, reference_images=_reference(), progress=False)


def _b64_png(image) -> str:
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _refused(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().splitlines()[-1].startswith("sdengine: error: "), err
    return err.strip().splitlines()[-1]


def test_cli_reference_image_infotext_and_from_png(kontext, tmp_path, capsys):
    from PIL import Image

    from sdengine.metadata import parse_parameters, read_png_parameters

    folder, _, ref = kontext
    src = tmp_path / "ref.png"
    _reference().save(src)
    out = tmp_path / "a.png"
    args = ["generate", "--model", str(folder), PROMPT, "--steps", "3", "--seed", str(SEED), "--no-progress"]
    size = ["--width", str(W), "--height", str(H)]
    assert main([*args, *size, "--reference-image", str(src), "--no-reference-resize", "--out", str(out)]) == 0
    parsed = parse_parameters(read_png_parameters(out))
    assert parsed["Reference images"] == "1" and parsed["Reference resize"] == "off"
    first = np.asarray(Image.open(out), dtype=np.float32) / 255
    assert _mad(first, _theirs(ref, Image.open(src), _auto_resize=False)[0]) < 1.0 / 255
    err = _refused(
        capsys, ["generate", "--from-png", str(out), "--model", str(folder), "--out", str(tmp_path / "b.png")]
    )
    assert "was made with 1 reference image(s) (FLUX.1 Kontext): give the same --reference-image" in err
    again = tmp_path / "c.png"
    from_png = ["generate", "--from-png", str(out), "--model", str(folder), "--reference-image", str(src)]
    assert main([*from_png, "--out", str(again), "--no-progress"]) == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))
    err = _refused(capsys, [*args, *size, "--no-reference-resize", "--out", str(tmp_path / "d.png")])
    assert "--no-reference-resize has no effect without --reference-image" in err
    err = _refused(capsys, [*args, *size, "--reference-image", str(src), "--out", str(src)])
    assert "is the --reference-image image this run reads" in err


def test_transformer_reference_input_errors(kontext):
    _, pipe, _ = kontext
    net = pipe.transformer
    x = torch.zeros(2, 16, 4, 6)
    args = dict(
        timestep=500.0,
        encoder_hidden_states=torch.zeros(2, 3, 32),
        pooled_projections=torch.zeros(2, 64),
        guidance=3.5,
    )
    with pytest.raises(sdengine.errors.UsageError, match=r"reference latent 0 must be \(1 or 2, 16, h, w\)"):
        net(x, reference_latents=[torch.zeros(3, 16, 4, 4)], **args)
    block = [torch.zeros(2, 12, 128)]
    with pytest.raises(sdengine.errors.UsageError, match="reference latents .Kontext. and ControlNet residuals"):
        net(x, reference_latents=[torch.zeros(1, 16, 4, 4)], controlnet_block_samples=block, **args)
    with torch.no_grad():
        out = net(x, reference_latents=[torch.zeros(1, 16, 4, 4)], **args)
    assert out.shape == x.shape  # the references' output dropped


def test_server_native_job_takes_reference_images(kontext, tiny_sd1_folder, tmp_path):
    """``reference_images`` on the native job (base64 PNGs): the pipeline's image, at the reference's size where
    width and height are null; what does not combine answers a one-line 400 before the job is queued."""
    pytest.importorskip("fastapi")
    import base64
    import io
    import shutil

    import httpx

    from _live_server import live_server, run_job, server_config

    folder, pipe, _ = kontext
    models = tmp_path / "models"
    shutil.copytree(folder, models / "tiny-kontext")
    shutil.copytree(tiny_sd1_folder, models / "tiny-sd")
    buf = io.BytesIO()
    _reference().save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    want = pipe(PROMPT, steps=2, seed=5, reference_images=_reference(), reference_auto_resize=False, progress=False)
    body = {"prompt": PROMPT, "steps": 2, "seed": 5, "width": None, "height": None, "model": "tiny-kontext"}
    body.update(sampler="euler", schedule="normal", cfg_scale=1.0)
    with live_server(server_config(tmp_path, models_dir=models)) as server:
        with httpx.Client(base_url=server.url, timeout=300) as client:
            pixels, _ = run_job(client, {**body, "reference_images": [b64], "reference_auto_resize": False})
            assert pixels.shape == (24, 40, 3)  # the reference's 42 x 26, floored
            np.testing.assert_array_equal(pixels, np.asarray(want.images[0]))
            # Kontext inpainting: init_image + mask + reference_images, at the init image's size
            init, mask = picture(W, H, seed=4), picture(W, H, seed=6).convert("L")
            want = pipe(PROMPT, steps=2, seed=5, init_image=init, mask=mask, strength=0.6,
                        reference_images=_reference(), reference_auto_resize=False, progress=False)  # fmt: skip
            job = {"init_image": _b64_png(init), "mask": _b64_png(mask), "strength": 0.6}
            pixels, _ = run_job(client, {**body, **job, "reference_images": [b64], "reference_auto_resize": False})
            np.testing.assert_array_equal(pixels, np.asarray(want.images[0]))
            for change, message in [
                ({"reference_auto_resize": False}, "reference_auto_resize applies to reference_images"),
                ({"reference_images": [b64] * 5}, "at most 4 reference_images, got 5"),
                ({"reference_images": [b64], "hires": {}}, "and the hires fix cannot run together"),
                ({"reference_images": [b64], "model": "tiny-sd"}, "reference_images are FLUX.1 Kontext's; tiny-sd"),
            ]:
                r = client.post("/v1/jobs", json={**body, "width": 48, "height": 32, **change})
                assert r.status_code == 400 and message in r.json()["detail"], r.text


def test_graphs_are_not_used_with_references_and_replay_after(kontext):
    """A call with reference images runs the transformer as it is (its step graph and the recorded loop take no
    reference tokens): the eager image; the graphs are back for the next call without references."""
    from _cpu_graphs import CPUBackend

    folder = kontext[0]
    pipe = sdengine.load_pipeline(folder, device="cpu", fast_path="none")
    args = dict(steps=2, seed=SEED, width=W, height=H, progress=False)
    ref_args = dict(reference_images=_reference(), reference_auto_resize=False, **args)
    want, plain = pipe(PROMPT, **ref_args).arrays, pipe(PROMPT, **args).arrays
    pipe.enable_loop_graph(backend=CPUBackend(), device_type="cpu", record_after=0)
    np.testing.assert_array_equal(pipe(PROMPT, **ref_args).arrays, want)
    assert pipe.cuda_graphs["unet"].replays == 0 and pipe.cuda_graphs["loop"].recordings == 0
    np.testing.assert_array_equal(pipe(PROMPT, **args).arrays, plain)
    assert pipe.cuda_graphs["loop"].recordings == 1
    np.testing.assert_array_equal(pipe(PROMPT, **ref_args).arrays, want)  # the recorded loop is not replayed


def test_chroma_refuses_reference_images(tmp_path):
    """Chroma is a FluxPipeline subclass with its own transformer: reference images are refused in one line (the
    network takes none), and its plain calls run (the Kontext hooks' defaults are the class's)."""
    from _chroma_models import make_chroma_folder

    pipe = sdengine.load_pipeline(make_chroma_folder(tmp_path / "tiny-chroma"), device="cpu")
    with pytest.raises(GenerationError, match="reference_images .--reference-image. are FLUX.1 Kontext's; .* not a"):
        pipe(PROMPT, steps=1, width=W, height=H, reference_images=_reference(), progress=False)
    assert np.isfinite(pipe(PROMPT, steps=1, width=W, height=H, progress=False).arrays).all()


def test_an_odd_reference_is_padded_circularly_as_comfyui(kontext):
    """ComfyUI's ``process_img`` pads a reference's odd side circularly (bottom / right) to the 2 x 2 patches; its
    layouts count the unpadded sizes (``(offset + 1) // 2`` patches)."""
    from sdengine.models.flux import reference_ids

    _, pipe, _ = kontext
    net = pipe.transformer
    g = torch.Generator().manual_seed(4)
    x, ref = torch.randn(1, 16, 4, 6, generator=g), torch.randn(1, 16, 5, 3, generator=g)
    args = dict(timestep=500.0, encoder_hidden_states=torch.randn(1, 3, 32, generator=g),
                pooled_projections=torch.randn(1, 64, generator=g), guidance=3.5)  # fmt: skip
    padded = torch.cat([ref, ref[:, :, :1]], dim=2)
    padded = torch.cat([padded, padded[..., :1]], dim=3)  # 6 x 4: the first row and column repeated
    with torch.no_grad():
        odd = net(x, reference_latents=[ref], **args)
        even = net(x, reference_latents=[padded], **args)
    assert (odd - even).abs().max().item() < 1e-6
    # three 5 x 5 references laid out "uxo" beside a 10 x 10 image: ComfyUI's h_offset = 10 + (0, 5, 10), w alike,
    # each (offset + 1) // 2 patches: rows start at 5, 8, 10 (padded sizes would give 5, 8, 11); 3 x 3 tokens each
    ids = reference_ids([(5, 5)] * 3, method="uxo", image=(10, 10))
    assert ids.shape == (27, 3)
    assert [int(ids[9 * k, 1]) for k in range(3)] == [5, 8, 10]
    assert [int(ids[9 * k, 2]) for k in range(3)] == [5, 8, 10]
