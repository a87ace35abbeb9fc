"""The batched core: ``pipe(["a", "b", "c"], seed=[1, 2, 3])`` runs as one batch and each row equals the same
call alone (txt2img, img2img, ControlNet on a tiny random SD folder; txt2img on the emoji-format folder), and
the request object: ``pipe(request)`` is ``pipe(**fields)``, ``replace``/``from_dict``/``to_dict``, one-line
errors for batch shapes that do not fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sdengine
from _pipeline_models import make_sd_folder, picture
from sdengine.diffusion.denoisers import Denoiser
from sdengine.diffusion.guidance import CFGDenoiser
from sdengine.models.controlnet import ControlNet
from sdengine.pipeline import ControlUnit, GenerationError, GenerationRequest, Pipeline
from sdengine.text.conditioners import CLIPConditioner, cat_conditioning

SIZE = 32
FAST = {"steps": 4, "cfg_scale": 5.0, "width": SIZE, "height": SIZE, "progress": False}
PROMPTS = ["a red apple", "a blue car on a road", "a green tree"]
NEGATIVES = ["", "blurry", "dark, grainy"]
SEEDS = [1, 2, 3]
ROW_TOL = 1e-5


@pytest.fixture(scope="module")
def sd1(tmp_path_factory) -> Pipeline:
    folder = make_sd_folder(tmp_path_factory.mktemp("sd1b") / "model", size="tiny", kind="sd1")
    pipe = sdengine.load_pipeline(folder, device="cpu")
    assert isinstance(pipe, Pipeline)
    return pipe


def _rows_equal_single_calls(pipe: Pipeline, **kw) -> np.ndarray:
    batch = pipe(PROMPTS, negative_prompt=NEGATIVES, seed=SEEDS, **kw)
    assert batch.arrays.shape[0] == 3 and batch.seeds == SEEDS
    for i in range(3):
        row_kw = dict(kw)
        units = row_kw.get("controlnets")
        if units:
            row_kw["controlnets"] = [ControlUnit(u.model, u.image[i], u.scale, u.start, u.end) for u in units]
        one = pipe(PROMPTS[i], NEGATIVES[i], seed=SEEDS[i], **row_kw)
        assert float(np.abs(batch.arrays[i] - one.arrays[0]).max()) <= ROW_TOL, i
        assert batch.infotexts[i] == one.infotexts[0]  # its own prompt, negative and seed
    assert not np.allclose(batch.arrays[0], batch.arrays[1])
    return batch.arrays


def test_txt2img_batch_rows_equal_single_calls(sd1):
    _rows_equal_single_calls(sd1, **FAST)


def test_img2img_batch_rows_equal_single_calls(sd1):
    _rows_equal_single_calls(sd1, init_image=picture(SIZE, SIZE), strength=0.6, **FAST)


def test_controlnet_batch_rows_equal_single_calls(sd1):
    torch.manual_seed(0)
    cn = ControlNet.from_unet(sd1.unet, conditioning_embedding_out_channels=(16, 32)).eval()
    with torch.no_grad():  # non-zero zero-convs, so that the control maps change the output
        for p in cn.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    maps = [picture(SIZE, SIZE, seed=10 + i) for i in range(3)]
    arrays = _rows_equal_single_calls(sd1, controlnets=[ControlUnit(cn, maps, 0.8, 0.0, 0.75)], **FAST)
    plain = sd1(PROMPTS, negative_prompt=NEGATIVES, seed=SEEDS, **FAST).arrays
    assert np.abs(arrays - plain).max() > 1e-4


def test_long_prompts_run_in_their_own_sub_batch(sd1):
    long = " ".join(["a very detailed painting of a red apple"] * 12)  # more than one 75-token chunk
    prompts = ["a cat", long]
    batch = sd1(prompts, seed=[4, 5], **FAST).arrays
    for i, p in enumerate(prompts):
        assert float(np.abs(batch[i] - sd1(p, seed=4 + i, **FAST).arrays[0]).max()) <= ROW_TOL


def test_emoji_txt2img_batch_rows_equal_single_calls(tmp_path_factory):
    from sdengine.text.bert_tokenizer import find_minilm_files

    try:
        find_minilm_files()
    except FileNotFoundError:
        pytest.skip("all-MiniLM-L6-v2 not installed")
    from _emoji_models import make_tiny_emoji_folder

    pipe = sdengine.load_pipeline(make_tiny_emoji_folder(tmp_path_factory.mktemp("emoji") / "tiny"), device="cpu")
    batch = pipe(PROMPTS, seed=SEEDS, steps=3, cfg_scale=4.0, progress=False).arrays
    for i in range(3):
        one = pipe(PROMPTS[i], seed=SEEDS[i], steps=3, cfg_scale=4.0, progress=False).arrays[0]
        assert float(np.abs(batch[i] - one).max()) <= ROW_TOL


# ------------------------------------------------------------------------------------------- the request


def test_request_and_keywords_are_the_same_call(sd1):
    req = GenerationRequest(prompt="a red apple", negative_prompt="blurry", seed=7, **FAST)
    a = sd1(req)
    b = sd1("a red apple", "blurry", seed=7, **FAST)
    c = sd1(req.replace(seed=8))
    d = sd1(req, seed=8)  # keywords next to a request replace its fields
    assert np.array_equal(a.arrays, b.arrays) and a.infotexts == b.infotexts
    assert np.array_equal(c.arrays, d.arrays) and not np.array_equal(a.arrays, c.arrays)


def test_request_dict_round_trip_and_defaults():
    req = GenerationRequest(
        prompt=["a", "b"],
        seed=[1, 2],
        controlnets=[("cn", "edges.png", 0.5), ControlUnit("cn2", "map.png", 1.0, 0.0, 0.5, rule="a1111")],
        loras=[("x.safetensors", 0.7)],
    )
    d = req.to_dict()
    assert d["controlnets"] == [
        {"model": "cn", "image": "edges.png", "scale": 0.5, "start": 0.0, "end": 1.0, "rule": "diffusers"},
        {"model": "cn2", "image": "map.png", "scale": 1.0, "start": 0.0, "end": 0.5, "rule": "a1111"},
    ]
    back = GenerationRequest.from_dict(d)
    assert back.controlnets == (
        ControlUnit("cn", "edges.png", 0.5),
        ControlUnit("cn2", "map.png", 1.0, 0.0, 0.5, rule="a1111"),
    )
    assert back.seeds() == [1, 2]
    assert back.prompts() == ["a", "b"] and back.negative_prompts() == ["", ""] and back.n_rows == 2
    assert GenerationRequest.defaults()["steps"] == 25 and GenerationRequest().cfg_scale == 7.5
    assert GenerationRequest(seed=5, batch_size=3).seeds() == [5, 6, 7]
    with pytest.raises(GenerationError, match="unknown generation settings: stepz"):
        GenerationRequest.from_dict({"stepz": 3})


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"prompt": ["a", "b"], "seed": [1, 2, 3]}, "one value per row: prompt has 2, seed has 3"),
        ({"prompt": ["a", "b"], "batch_size": 3}, "batch_size 3 does not match the 2 rows"),
        ({"prompt": ["a", "b"], "seed": [1, -2]}, "seeds in a list must be integers >= 0"),
        ({"prompt": []}, "empty list for prompt"),
        ({"prompt": ["a", 3]}, "prompt must be a string or a list of strings"),
        ({"steps": 0}, "steps must be a positive integer"),
        ({"controlnets": [("only-a-model",)]}, r"each ControlNet is \(model_or_path, image"),
    ],
)
def test_request_errors_are_one_line(kw, message):
    with pytest.raises(sdengine.errors.SdengineError, match=message):
        GenerationRequest(**kw).validate()


def test_lora_tags_must_agree_across_a_batch(sd1):
    with pytest.raises(GenerationError, match="same <lora:...> tags"):
        sd1(["a <lora:x:1>", "b"], seed=[1, 2], **FAST)


# ------------------------------------------------------------------------------------------- conditioning


def test_clip_conditioner_for_trainers(sd1):
    c = sd1.conditioner
    assert isinstance(c, CLIPConditioner) and c.kind == "clip"
    out = c(["a cat", "a dog"])
    assert set(out) == {"crossattn"} and out["crossattn"].shape[:2] == (2, 77)
    assert torch.equal(out["crossattn"][:1], sd1.encode_prompt("a cat", "")[0])
    empty = c.empty(3)["crossattn"]
    assert empty.shape[0] == 3 and torch.equal(empty[1:2], sd1.encode_prompt("", "")[0])
    both = cat_conditioning([c(["a"]), c(["b"])])
    assert torch.equal(both["crossattn"], c(["a", "b"])["crossattn"])


def test_cfg_tags_rows_for_guess_mode():
    seen = {}

    def net(x, t, **kw):
        seen.update(kw)
        return torch.zeros_like(x)

    net.takes_row_kinds = True  # type: ignore[attr-defined]
    from sdengine.diffusion.schedules import NoiseSchedule

    ns = NoiseSchedule.from_config(num_train_timesteps=1000)
    den = CFGDenoiser(Denoiser(net, ns), 3.0, {"crossattn": torch.zeros(1, 2, 4)})
    den(torch.zeros(2, 4, 2, 2), torch.tensor([1.0, 1.0]), crossattn=torch.ones(2, 2, 4))
    assert seen["row_kinds"] == ("cond", "cond", "uncond", "uncond")
