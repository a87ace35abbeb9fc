"""SD3 / SD3.5 end to end against diffusers' StableDiffusion3Pipeline (and its img2img / inpaint siblings) on tiny
random SD3 folders saved by diffusers: loading (folders, Stability's single files, separate text encoders), the
conditioning (CLIP-L, bigG, T5 or zeros), txt2img with CFG and a negative prompt, img2img, inpainting, the shift,
the CLI with its infotext and --from-png, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _sd3_models import SIZE, diffusers_sd3, make_sd3_folder, write_single_file  # noqa: E402
from sdengine.errors import GenerationError, SdengineError  # noqa: E402
from sdengine.pipeline.sd3 import SD3Pipeline  # noqa: E402

TOL = 1e-5  # mean absolute difference on 0..1 pixels (measured: 1.7e-7 to 2e-7)
STEPS = 4
PROMPT, NEGATIVE = "a red apple on a table", "blurry, dark"
SEED = 3
CFG = 5.0
EMOJI_LORA = Path(sdengine.__file__).parent / "assets" / "loras" / "emoji-fruit.safetensors"  # a U-Net LoRA


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    folder = make_sd3_folder(tmp_path_factory.mktemp("sd3") / "tiny-sd3")
    return folder, sdengine.load_pipeline(folder, device="cpu")


@pytest.fixture(scope="module")
def single(sd3, tmp_path_factory):
    folder, _ = sd3
    return write_single_file(folder, tmp_path_factory.mktemp("sd3file") / "tiny_sd3.safetensors")


@pytest.fixture(scope="module")
def sd3_ref(sd3):
    """diffusers' txt2img pipeline of the tiny folder, loaded once for the tests that only read it."""
    return diffusers_sd3(sd3[0])


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def _ours(pipe, prompt: str = PROMPT, negative: str = NEGATIVE, **kw):
    args = dict(steps=STEPS, sampler="euler", cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE, progress=False)
    args.update(kw)
    return pipe(prompt, negative, **args)


def _theirs(ref, prompt: str = PROMPT, negative: str = NEGATIVE, **kw):
    args = dict(
        negative_prompt=negative,
        num_inference_steps=STEPS,
        guidance_scale=CFG,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="np",
        width=SIZE,
        height=SIZE,
    )
    args.update(kw)
    return ref(prompt, **args).images


def _picture(seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8))


def test_loads_as_sd3(sd3):
    folder, pipe = sd3
    assert isinstance(pipe, SD3Pipeline) and pipe.text_kind == "sd3" and pipe.has_t5
    assert pipe.latent_channels == 16 and pipe.vae.config.shift_factor == pytest.approx(0.0609)
    assert pipe.noise_schedule.shift == 3.0  # scheduler/scheduler_config.json
    assert pipe.default_size == SIZE  # the MMDiT's sample size x the VAE factor (1024 for the real models)
    assert pipe.size_multiple == 4  # VAE factor 2 x patch 2
    assert pipe.transformer is pipe.unet


def test_conditioning_equals_diffusers_encode_prompt(sd3, sd3_ref):
    folder, pipe = sd3
    ref = sd3_ref
    cond, uncond = pipe.conditioner.pair(PROMPT, NEGATIVE)
    with torch.no_grad():
        pe, ne, pp, npp = ref.encode_prompt(PROMPT, None, None, negative_prompt=NEGATIVE, device="cpu")
    assert cond["crossattn"].shape == pe.shape == (1, 77 + 256, 160)
    assert float((cond["crossattn"] - pe).abs().max()) < 1e-4
    assert float((uncond["crossattn"] - ne).abs().max()) < 1e-4
    assert float((cond["vector"] - pp).abs().max()) < 1e-5
    assert float((uncond["vector"] - npp).abs().max()) < 1e-5
    # the CLIP part is 64 + 64 = 128 wide, zero-padded to the joint width 160; T5 fills its 256 tokens
    assert float(cond["crossattn"][:, :77, 128:].abs().max()) == 0.0
    assert float(cond["crossattn"][:, 77:].abs().max()) > 0


def test_clip_skip_is_diffusers_clip_skip_plus_one(sd3, sd3_ref):
    """sdengine's clip_skip 2 reads hidden_states[-3] of both CLIP encoders: diffusers' clip_skip=1 (which it
    applies to the prompt only; sdengine to the negative prompt too)."""
    folder, pipe = sd3
    ref = sd3_ref
    cond, _ = pipe.conditioner.pair(PROMPT, NEGATIVE, clip_skip=2)
    with torch.no_grad():
        pe, _, pp, _ = ref.encode_prompt(PROMPT, None, None, negative_prompt=NEGATIVE, device="cpu", clip_skip=1)
    assert float((cond["crossattn"] - pe).abs().max()) < 1e-4
    assert float((cond["vector"] - pp).abs().max()) < 1e-5
    default, _ = pipe.conditioner.pair(PROMPT, NEGATIVE)
    assert not torch.equal(default["crossattn"][:, :77], cond["crossattn"][:, :77])
    with pytest.raises(GenerationError, match=r"clip_skip must be an integer in 0\.\.2 for SD3, got 3"):
        pipe.conditioner.pair(PROMPT, NEGATIVE, clip_skip=3)


def test_txt2img_with_cfg_and_negative_matches_diffusers(sd3, sd3_ref):
    folder, pipe = sd3
    result = _ours(pipe)
    theirs = _theirs(sd3_ref)
    assert result.arrays.std() > 0.02
    mad = _mad(result.arrays, theirs)
    print(f"sd3 txt2img: mean abs {mad:.2e}")
    assert mad < TOL
    assert "Shift: 3" in result.infotexts[0] and "Sampler: Euler" in result.infotexts[0]


def test_auto_schedule_is_the_flow_grid_unless_the_sampler_names_one(sd3):
    _, pipe = sd3
    assert "Schedule type: Normal" in _ours(pipe, steps=2, schedule="auto").infotexts[0]
    text = _ours(pipe, steps=2, sampler="DPM++ 2M Karras").infotexts[0]
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in text


def test_a1111_rules_run_txt2img_as_the_diffusers_rule(sd3):
    """The server's A1111 routes set A1111's step rules and clip skip rule: on an SD3 txt2img with a sampler they do
    not change, the image is the diffusers rule's (and the rule is not written into the infotext)."""
    _, pipe = sd3
    a1111 = _ours(pipe, strength_rule="a1111", clip_skip_rule="a1111", clip_skip=2)
    np.testing.assert_array_equal(a1111.arrays, _ours(pipe).arrays)
    assert "Strength rule" not in a1111.infotexts[0]
    assert any("Clip skip 2 not applied" in n for n in a1111.notes)


def test_shift_of_a_request_matches_diffusers_with_that_shift(sd3):
    import diffusers

    folder, pipe = sd3
    ref = diffusers_sd3(folder)
    ref.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.5)
    result = _ours(pipe, shift=1.5)
    mad = _mad(result.arrays, _theirs(ref))
    print(f"sd3 txt2img shift 1.5: mean abs {mad:.2e}")
    assert mad < TOL
    assert "Shift: 1.5" in result.infotexts[0]
    assert pipe.noise_schedule.shift == 3.0  # the model's own again after the call
    assert _mad(result.arrays, _ours(pipe).arrays) > 1e-3  # the shift changed the image


def test_img2img_matches_diffusers(sd3):
    folder, pipe = sd3
    init = _picture()
    ours = _ours(pipe, init_image=init, strength=0.6, steps=5).arrays
    theirs = _theirs(diffusers_sd3(folder, "img2img"), image=init, strength=0.6, num_inference_steps=5)
    mad = _mad(ours, theirs)
    print(f"sd3 img2img strength 0.6: mean abs {mad:.2e}")
    assert mad < TOL


def test_inpainting_matches_diffusers_latents(sd3):
    """diffusers' SD3 inpaint pipeline (0.42.1) decodes ``latents / scaling_factor`` without adding the VAE's
    ``shift_factor`` (its txt2img and img2img pipelines add it): its latents are taken and decoded as those do."""
    from PIL import Image

    folder, pipe = sd3
    ref = diffusers_sd3(folder, "inpaint")
    init = _picture()
    mask = Image.fromarray(((np.arange(SIZE)[None, :].repeat(SIZE, 0) >= SIZE // 2) * 255).astype(np.uint8))
    ours = _ours(pipe, init_image=init, mask=mask, strength=0.6, steps=5).arrays
    latents = _theirs(ref, image=init, mask_image=mask, strength=0.6, num_inference_steps=5, output_type="latent")
    with torch.no_grad():
        vae = ref.vae
        image = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
    theirs = ref.image_processor.postprocess(image, output_type="np")
    mad = _mad(ours, theirs)
    print(f"sd3 inpaint strength 0.6: mean abs {mad:.2e}")
    assert mad < TOL
    # the known (left) half stays the init image's (as far as the VAE's round trip goes)
    left = _ours(pipe, init_image=init, mask=mask, strength=0.6, steps=5, prompt="a cat").arrays
    assert _mad(left[:, :, : SIZE // 4], ours[:, :, : SIZE // 4]) < 0.05


def test_without_t5_matches_diffusers(tmp_path):
    folder = make_sd3_folder(tmp_path / "no-t5", seed=1, t5=False)
    assert json.loads((folder / "model_index.json").read_text())["text_encoder_3"] == [None, None]
    pipe = sdengine.load_pipeline(folder, device="cpu")
    assert not pipe.has_t5
    cond, _ = pipe.conditioner.pair(PROMPT, NEGATIVE)
    assert float(cond["crossattn"][:, 77:].abs().max()) == 0.0  # 256 tokens of zeros in T5's place
    mad = _mad(_ours(pipe).arrays, _theirs(diffusers_sd3(folder, t5=False)))
    print(f"sd3 txt2img without T5: mean abs {mad:.2e}")
    assert mad < TOL


def test_sd35_blocks_match_diffusers(tmp_path):
    """SD3.5 Medium's MMDiT-X block (a second self-attention) and RMS-normed queries and keys."""
    folder = make_sd3_folder(tmp_path / "sd35", seed=2, sd35=True)
    pipe = sdengine.load_pipeline(folder, device="cpu")
    assert pipe.transformer.config.dual_attention_layers == (0,)
    mad = _mad(_ours(pipe).arrays, _theirs(diffusers_sd3(folder)))
    print(f"sd3.5 txt2img: mean abs {mad:.2e}")
    assert mad < TOL


def test_skip_layer_guidance_matches_diffusers(sd3, sd3_ref):
    """SD3.5's skip-layer guidance (diffusers' skip_guidance_layers): with start 0.01 and stop 0.5 of 6 steps the
    steps 1 and 2 run the conditional rows again without block 0."""
    folder, pipe = sd3
    sd3_opts = {"skip_guidance_layers": [0], "skip_layer_guidance_start": 0.01, "skip_layer_guidance_stop": 0.5}
    result = _ours(pipe, steps=6, sd3=sd3_opts)
    theirs = _theirs(
        sd3_ref,
        num_inference_steps=6,
        skip_guidance_layers=[0],
        skip_layer_guidance_start=0.01,
        skip_layer_guidance_stop=0.5,
    )
    mad = _mad(result.arrays, theirs)
    print(f"sd3 skip-layer guidance: mean abs {mad:.2e}")
    assert mad < TOL
    assert _mad(result.arrays, _ours(pipe, steps=6).arrays) > 1e-3  # it changed the image
    text = result.infotexts[0]
    assert "Skip layer guidance: 2.8, Skip layers: 0, Skip layer start: 0.01, Skip layer stop: 0.5" in text
    from sdengine.metadata import parse_parameters, to_generate_kwargs

    again = to_generate_kwargs(parse_parameters(text))
    assert again["sd3"] == {**sd3_opts, "skip_layer_guidance_scale": 2.8}
    assert np.array_equal(pipe(**again, progress=False).arrays, result.arrays)


def test_hires_fix_second_pass_is_an_sd3_img2img(sd3):
    """The hires fix on SD3: with a pixel upscaler the second pass is the img2img of the Lanczos-resized first image
    (its first step by diffusers' SD3 rule); with the latent upscaler the flow latent is interpolated and noised."""
    from PIL import Image

    _, pipe = sd3
    big = 2 * SIZE
    hr = dict(enable_hr=True, hr_upscaler="Lanczos", hr_resize_x=big, strength=0.55, hr_second_pass_steps=5)
    out = _ours(pipe, **hr)
    assert out.images[0].size == (big, big)
    first = _ours(pipe).images[0]  # the first pass as it would be saved (8 bits)
    want = _ours(
        pipe,
        init_image=first.resize((big, big), Image.Resampling.LANCZOS),
        strength=0.55,
        steps=5,
        width=big,
        height=big,
    )
    np.testing.assert_allclose(out.arrays[0], want.arrays[0], atol=1e-6, rtol=0)
    assert "Hires upscaler: Lanczos" in out.infotexts[0] and "Shift: 3" in out.infotexts[0]
    latent = _ours(pipe, enable_hr=True, hr_scale=2, strength=0.55, hr_second_pass_steps=5)
    assert latent.images[0].size == (big, big) and latent.arrays.std() > 0.02
    assert _mad(latent.arrays, out.arrays) > 1e-3  # another start: the first pass's latent, not its pixels


def test_prompt_editing_switches_the_sd3_conditioning(sd3):
    """A1111's prompt editing on SD3: each scheduled text's CLIP part padded to the call's most chunks (T5's tokens
    stay last), the texts switched per step. An alternation of one text is that text's image exactly; a switch
    halfway is neither text's image."""
    _, pipe = sd3
    plain = _ours(pipe, "a red apple", steps=4).arrays
    same = _ours(pipe, "[a red apple|a red apple]", steps=4).arrays
    np.testing.assert_array_equal(same, plain)
    switched = _ours(pipe, "[a red apple:a green pear:2]", steps=4).arrays
    assert _mad(switched, plain) > 1e-5 and _mad(switched, _ours(pipe, "a green pear", steps=4).arrays) > 1e-5
    long_text = "a red apple on a table, " * 16  # two chunks against one: padded before T5's tokens
    mixed = _ours(pipe, f"[{long_text}|{long_text}]", "[blurry|blurry]", steps=2).arrays
    np.testing.assert_allclose(mixed, _ours(pipe, long_text, "blurry", steps=2).arrays, atol=1e-6, rtol=0)


def test_single_file_gives_the_folders_image(sd3, single):
    folder, pipe = sd3
    from_file = sdengine.load_pipeline(single, device="cpu")
    assert isinstance(from_file, SD3Pipeline) and from_file.has_t5
    assert from_file.noise_schedule.shift == 3.0
    a, b = _ours(pipe).arrays, _ours(from_file).arrays
    # the same weights, laid out apart in memory: float32 rounding in BLAS may differ (1.1e-6 seen once under load)
    assert float(np.abs(a - b).max()) < 5e-6
    assert from_file.model_hash() != pipe.model_hash()  # the file's bytes, the folder's transformer weights


def test_single_file_without_text_encoders_needs_the_clip_flags(sd3, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, pipe = sd3
    bare = write_single_file(folder, tmp_path / "bare.safetensors", clips=False, t5=False)
    with pytest.raises(GenerationError, match=r"no clip_l and no clip_g text encoder: give --clip-l FILE and --clip-g"):
        sdengine.load_pipeline(bare, device="cpu")
    # ComfyUI's separate files: transformers' names without a prefix
    for sub, name in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")):
        save_file(load_file(folder / sub / "model.safetensors"), str(tmp_path / f"{name}.safetensors"))
    with pytest.raises(GenerationError, match=r"no clip_g text encoder: give --clip-g FILE"):
        sdengine.load_pipeline(bare, device="cpu", clip_l=tmp_path / "clip_l.safetensors")
    no_t5 = sdengine.load_pipeline(
        bare, device="cpu", clip_l=tmp_path / "clip_l.safetensors", clip_g=tmp_path / "clip_g.safetensors"
    )
    assert not no_t5.has_t5
    with_t5 = sdengine.load_pipeline(
        bare,
        device="cpu",
        clip_l=tmp_path / "clip_l.safetensors",
        clip_g=folder / "text_encoder_2",  # a diffusers text_encoder_2/ folder does as well
        t5=folder / "text_encoder_3",
    )
    assert float(np.abs(_ours(with_t5).arrays - _ours(pipe).arrays).max()) < 1e-6
    # the folder's model run without its T5 gives what the T5-less load gives
    assert _mad(_ours(no_t5).arrays, _ours(pipe).arrays) > 1e-3


def test_encoder_files_are_checked(sd3, single, tmp_path):
    from safetensors.torch import load_file, save_file

    from sdengine.weights.io import WeightsError

    folder, _ = sd3
    with pytest.raises(GenerationError, match=r"--t5 .*missing\.safetensors: no such file or folder"):
        sdengine.load_pipeline(single, device="cpu", t5=tmp_path / "missing.safetensors")
    sd = load_file(single)
    save_file({k: v for k, v in sd.items() if k.startswith("text_encoders.clip_g.")}, str(tmp_path / "g.safetensors"))
    with pytest.raises(WeightsError, match=r"g\.safetensors: holds SD3's clip_g, not its clip_l"):
        sdengine.load_pipeline(single, device="cpu", clip_l=tmp_path / "g.safetensors")
    plain = {k: v for k, v in load_file(folder / "text_encoder" / "model.safetensors").items() if "projection" not in k}
    save_file(plain, str(tmp_path / "no_proj.safetensors"))
    with pytest.raises(WeightsError, match=r"not a CLIP text encoder with a projection"):
        sdengine.load_pipeline(single, device="cpu", clip_l=tmp_path / "no_proj.safetensors")
    with pytest.raises(GenerationError, match=r"\(SD3\): a separate VAE \(vae= / --vae\) is not supported for SD3 yet"):
        sdengine.load_pipeline(single, device="cpu", vae=folder / "vae")


def test_a_folder_missing_a_listed_component_is_refused(sd3, tmp_path):
    import shutil

    from sdengine.weights.io import WeightsError

    folder, _ = sd3
    copy = tmp_path / "broken"
    shutil.copytree(folder, copy)
    shutil.rmtree(copy / "text_encoder_3")  # model_index.json still lists it: never run without T5 silently
    with pytest.raises(WeightsError, match=r"model_index.json lists text_encoder_3 but the folder has no"):
        sdengine.load_pipeline(copy, device="cpu")
    shutil.rmtree(copy / "vae")
    with pytest.raises(WeightsError, match=r"missing vae/config.json"):
        sdengine.load_pipeline(copy, device="cpu", t5=folder / "text_encoder_3")


def test_text_encoder_flags_are_refused_for_other_models(tiny_sd1_folder):
    with pytest.raises(GenerationError, match=r"--clip-l, --t5 give an SD3 model's text encoders; this is not an SD3"):
        sdengine.load_pipeline(tiny_sd1_folder, device="cpu", clip_l="x", t5="y")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"loras": [("x.safetensors", 1.0)]}, "LoRA file 'x.safetensors' does not exist"),
        ({"prompt": "a cat <lora:foo:0.5>"}, "LoRA 'foo': no LoRA folder was given to look the name up in"),
        (
            {"loras": [(EMOJI_LORA, 1.0)]},
            "none of its 145 layers match .* a LoRA for a model with .*, the model is SD3",
        ),
        ({"pag_scale": 2.0, "sd3": {"skip_guidance_layers": [0]}}, "pag_scale .* and skip-layer guidance together"),
        ({"enable_hr": True, "hr_sampler": "ddim"}, "sampler 'ddim' cannot run on a flow model"),
        (
            {"strength_rule": "a1111", "init_image": "x.png"},
            "A1111's step rules are not supported for SD3 with an init",
        ),
        ({"strength_rule": "a1111", "sampler": "dpmpp_2m_sde"}, "A1111's step rules are not supported for SD3"),
        ({"zero_terminal_snr": True}, "zero_terminal_snr rescales a VP schedule"),
        ({"guess_mode": True}, "guess_mode is a U-Net ControlNet setting"),
        ({"freeu": [1.1, 1.2, 0.9, 0.2]}, "FreeU scales U-Net decoder features"),
        ({"shift": 0.0}, r"shift must be a number in \(0, 100\]"),
        ({"sampler": "ddim"}, "ddim"),
        ({"sd3": {"skip_guidance_layers": [5]}}, r"sd3 skip_guidance_layers 5 is not a joint block of this MMDiT"),
        ({"sd3": {"skip_layers": [1]}}, "unknown sd3 settings: skip_layers"),
        ({"sd3": {"skip_guidance_layers": [0, 0]}}, r"sd3 skip_guidance_layers repeats a block: \[0, 0\]"),
        (
            {"sd3": {"skip_guidance_layers": [0], "skip_layer_guidance_start": 0.5, "skip_layer_guidance_stop": 0.2}},
            "must be fractions of the steps with start <= stop",
        ),
    ],
)
def test_settings_made_for_unets_are_refused_in_one_line(sd3, settings, message):
    _, pipe = sd3
    calls = []
    pipe.conditioner.text = lambda *a, **k: calls.append(a)  # noqa: ARG005 -- nothing may be encoded before
    try:
        kw = dict(steps=2, seed=1, width=SIZE, height=SIZE, progress=False)
        kw.update(settings)
        prompt = kw.pop("prompt", "a cat")
        with pytest.raises(SdengineError, match=message) as err:  # GenerationError; LoRAFileError for LoRAs
            pipe(prompt, **kw)
        assert "\n" not in str(err.value)
    finally:
        del pipe.conditioner.text
    assert calls == []


def test_shift_is_refused_for_a_unet_model(tiny_sd1_folder):
    pipe = sdengine.load_pipeline(tiny_sd1_folder, device="cpu")
    with pytest.raises(GenerationError, match=r"shift applies to flow models \(SD3\) only"):
        pipe("a cat", steps=1, shift=2.0, width=32, height=32, progress=False)
    with pytest.raises(GenerationError, match=r"sd3 settings apply to SD3 models only"):
        pipe("a cat", steps=1, sd3={"skip_guidance_layers": [1]}, width=32, height=32, progress=False)


def test_cli_generates_sd3_with_its_defaults_and_from_png_runs_it_again(sd3, tmp_path):
    from PIL import Image

    from sdengine.cli import main
    from sdengine.metadata import parse_parameters

    folder, pipe = sd3
    out = tmp_path / "a"
    args = ["generate", PROMPT, "--model", str(folder), "--negative", NEGATIVE, "--seed", "5", "--no-progress"]
    assert main([*args, "--steps", "3", "--shift", "2.5", "--out", str(out)]) == 0
    made = next(out.glob("*.png"))
    text = Image.open(made).info["parameters"]
    fields = parse_parameters(text)
    # the CLI's SD3 defaults: Euler on the normal flow grid, cfg 7 (diffusers'); the shift asked for
    assert fields["Sampler"] == "Euler" and fields["CFG scale"] == "7" and fields["Shift"] == "2.5"
    direct = pipe(PROMPT, NEGATIVE, steps=3, seed=5, sampler="euler", schedule="normal", cfg_scale=7.0, shift=2.5)
    assert np.array_equal(np.asarray(Image.open(made)), np.asarray(direct.images[0]))
    again = tmp_path / "b"
    assert (
        main(["generate", "--from-png", str(made), "--model", str(folder), "--out", str(again), "--no-progress"]) == 0
    )
    remade = next(again.glob("*.png"))
    assert np.array_equal(np.asarray(Image.open(made)), np.asarray(Image.open(remade)))
    assert Image.open(remade).info["parameters"] == text


def test_images_equal_with_recorded_graphs(sd3):
    """The CUDA-graph path (on by default on a GPU in half precision: sdengine.fastpath) recorded on the CPU with the
    test stand-in: the MMDiT replays (with skip-layer guidance's second call too) and the image is the eager one."""
    from _cpu_graphs import CPUBackend

    _, pipe = sd3
    slg = {"skip_guidance_layers": [0], "skip_layer_guidance_stop": 0.5}
    plain, plain_slg = _ours(pipe).arrays, _ours(pipe, steps=6, sd3=slg).arrays
    try:
        assert pipe.enable_cuda_graphs(backend=CPUBackend(), device_type="cpu")
        np.testing.assert_array_equal(_ours(pipe).arrays, plain)
        net = pipe.cuda_graphs["unet"]
        assert net.replays > 0
        np.testing.assert_array_equal(_ours(pipe, steps=6, sd3=slg).arrays, plain_slg)
    finally:
        pipe.cuda_graphs = None


def test_long_and_weighted_prompts(sd3):
    """A prompt past 75 CLIP tokens takes a second 77-token chunk on the CLIP side (A1111's rule), T5 keeps its 256
    tokens; emphasis acts on the CLIP states only, and T5 reads the text without the brackets (both said in notes)."""
    from sdengine.text.sd3_conditioner import t5_text

    _, pipe = sd3
    long_prompt = "a red apple on a table, " * 16  # about 100 CLIP tokens
    notes: list[str] = []
    cond, uncond = pipe.conditioner.pair(long_prompt, "blurry", note=notes.append)
    assert cond["crossattn"].shape == uncond["crossattn"].shape == (1, 2 * 77 + 256, 160)
    assert t5_text("a (red:1.3) apple BREAK on [a] table <lora:x:1>") == ("a red apple on a table ", True)
    plain, _ = pipe.conditioner.pair("a red apple", "")
    weighted, _ = pipe.conditioner.pair("a (red:1.3) apple", "", note=notes.append)
    assert not torch.equal(weighted["crossattn"][:, :77], plain["crossattn"][:, :77])  # CLIP's states weighted
    assert torch.equal(weighted["crossattn"][:, 77:], plain["crossattn"][:, 77:])  # T5's the plain text's
    assert any("T5 reads the prompt without its emphasis weights" in n for n in notes)
    result = _ours(pipe, long_prompt, steps=2)
    assert result.arrays.shape == (1, SIZE, SIZE, 3)


def test_latent_sampling_refuses_sd3_in_one_line(sd3):
    """The ComfyUI route's sampler (sdengine.latent_sampling) builds U-Net denoisers: SD3 is refused there."""
    from sdengine.latent_sampling import LatentSamplingError, TextCondition, sample_latents

    _, pipe = sd3
    cond, uncond = pipe.conditioner.pair(PROMPT, NEGATIVE)
    latent = torch.zeros(1, 16, SIZE // 2, SIZE // 2)
    with pytest.raises(LatentSamplingError, match=r"SD3 / flow models are not supported here yet; run the pipeline"):
        sample_latents(pipe, [TextCondition(cond)], [TextCondition(uncond)], latent, seed=1, steps=2, cfg=5.0)


def test_server_native_and_a1111_txt2img_routes_run_sd3(sd3, tmp_path):
    """``sdengine serve`` with an SD3 folder in its models folder: a native job gives the pipeline's image; A1111's
    txt2img route runs with a flow scheduler, and its "Automatic" is the flow grid (Euler's A1111 uniform grid is
    no flow schedule): the native job's image."""
    pytest.importorskip("fastapi")
    import base64
    import io
    import shutil

    import httpx
    from PIL import Image

    from _live_server import live_server, run_job, server_config

    folder, pipe = sd3
    models = tmp_path / "models"
    shutil.copytree(folder, models / "tiny-sd3")
    body = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": 3, "width": SIZE, "height": SIZE, "seed": 5}
    body["cfg_scale"] = 7.5  # the pipeline's default (a native job that leaves it out runs SD3's 7.0, as the CLI)
    want = pipe(PROMPT, NEGATIVE, steps=3, seed=5, width=SIZE, height=SIZE, sampler="euler", progress=False)
    with live_server(server_config(tmp_path, models_dir=models)) as server:
        with httpx.Client(base_url=server.url, timeout=300) as client:
            pixels, _ = run_job(client, {**body, "model": "tiny-sd3", "sampler": "euler", "schedule": "normal"})
            np.testing.assert_array_equal(pixels, np.asarray(want.images[0]))
            a1111 = {**body, "override_settings": {"sd_model_checkpoint": "tiny-sd3"}, "sampler_name": "Euler"}
            r = client.post("/sdapi/v1/txt2img", json={**a1111, "scheduler": "Simple"})
            assert r.status_code == 200, r.text
            image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
            assert "Shift: 3" in image.info["parameters"] and "Schedule type: Simple" in image.info["parameters"]
            r = client.post("/sdapi/v1/txt2img", json=a1111)  # "Automatic": the flow grid, as Forge runs SD3
            assert r.status_code == 200, r.text
            image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
            np.testing.assert_array_equal(np.asarray(image.convert("RGB")), np.asarray(want.images[0]))


def test_batch_rows_equal_the_same_seed_alone_and_a_callback_cancels(sd3):
    """The core's contracts hold for SD3: row i of a batch is seed i's image alone (1e-5, BLAS), a variation seed at
    strength 0 changes nothing, and a callback returning False cancels with the steps done."""
    from sdengine.pipeline.result import Cancelled

    _, pipe = sd3
    both = _ours(pipe, seed=[3, 4], steps=3).arrays
    np.testing.assert_allclose(both[1], _ours(pipe, seed=4, steps=3).arrays[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(
        both[0], _ours(pipe, seed=3, steps=3, subseed=9, subseed_strength=0.0).arrays[0], atol=1e-5
    )
    with pytest.raises(Cancelled) as stop:
        _ours(pipe, steps=3, callback=lambda info: info.step < 2)
    assert stop.value.step == 2


def test_diffusers_lora_on_the_mmdit_and_both_clip_encoders_matches_diffusers(sd3, tmp_path):
    """A LoRA in diffusers' SD3 format (PEFT names behind ``transformer.``, ``text_encoder.``, ``text_encoder_2.``),
    made with peft and saved by ``StableDiffusion3Pipeline.save_lora_weights``, applied for one call: the image is
    diffusers' with ``load_lora_weights``, and the model is its own again after the call."""
    import diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    folder, pipe = sd3
    maker = diffusers_sd3(folder)
    torch.manual_seed(0)
    mmdit = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_out"]
    maker.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=mmdit, init_lora_weights=False))
    clip = ["q_proj", "k_proj", "v_proj", "out_proj"]
    maker.text_encoder.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=clip, init_lora_weights=False))
    maker.text_encoder_2.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=clip, init_lora_weights=False))
    diffusers.StableDiffusion3Pipeline.save_lora_weights(
        tmp_path,
        transformer_lora_layers=get_peft_model_state_dict(maker.transformer),
        text_encoder_lora_layers=get_peft_model_state_dict(maker.text_encoder),
        text_encoder_2_lora_layers=get_peft_model_state_dict(maker.text_encoder_2),
    )
    ref = diffusers_sd3(folder)
    ref.load_lora_weights(tmp_path)
    plain = _ours(pipe).arrays
    result = _ours(pipe, loras=[(tmp_path / "pytorch_lora_weights.safetensors", 1.0)])
    mad = _mad(result.arrays, _theirs(ref))
    print(f"sd3 LoRA (MMDiT + CLIP-L + bigG): mean abs {mad:.2e}")
    assert mad < TOL
    assert _mad(result.arrays, plain) > 1e-3  # the LoRA changed the image
    assert "Lora hashes: " in result.infotexts[0]
    np.testing.assert_array_equal(_ours(pipe).arrays, plain)  # and is gone after the call
