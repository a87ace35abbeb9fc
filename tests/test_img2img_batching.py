"""Batched img2img and inpainting: ``Pipeline`` takes an init image (and mask) per row, and the server runs
compatible queued img2img / inpainting jobs as ONE call, each row its own job's image, mask and seed.

A batched row equals the same job run alone up to float32 summation-order noise of the batched U-Net (the
VAE encodes each row's image alone, with the row's generator, as the job alone does): at most ``ROW_TOL`` on
[0, 1] arrays, the bar of the txt2img batches (tests/test_server_batching.py).
"""

from __future__ import annotations

import base64
import io
import time
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from _live_server import Recorder, live_server, server_config, shared_loader, wait_job
from sdengine.errors import GenerationError, SdengineError
from sdengine.server.jobs import Job, batch_key
from sdengine.server.requests import Generation

ROW_TOL = 1e-4  # measured: at most 4.9e-6 (img2img) and 2.5e-6 (inpainting) on the emoji model, 3 rows
BASE = {"prompt": "a red apple", "steps": 4, "width": 64, "height": 64, "cfg_scale": 5.0, "strength": 0.6}
BLOCKER = {"prompt": "a hold", "steps": 1, "width": 64, "height": 64, "seed": 0}  # steps differ: runs alone


def ramp(w: int = 64, h: int = 64) -> Image.Image:
    return Image.fromarray(np.tile(np.linspace(0, 255, w, dtype=np.uint8)[None, :, None], (h, 1, 3)))


def box(x0: int, y0: int, x1: int, y1: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    m = Image.new("L", size, 0)
    m.paste(255, (x0, y0, x1, y1))
    return m


def png_b64(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def pipe() -> Any:
    return shared_loader("emoji", "cpu")


# -- the Python API ----------------------------------------------------------------------------------------------


A1111_INPAINT = {"strength_rule": "a1111", "masked_content": "latent noise", "noise_multiplier": 0.9, "mask_blur": 2}


@pytest.mark.parametrize(
    ("inpaint", "options"),
    [(False, {}), (True, {}), (True, A1111_INPAINT), (True, {"strength_rule": "a1111", "mask_round": False})],
    ids=["img2img", "inpaint", "a1111-latent-noise", "a1111-grey-mask"],
)
def test_per_row_init_images_equal_each_row_alone(pipe, inpaint, options):
    a, b = ramp(), Image.new("RGB", (64, 64), "red")
    ma, mb = box(16, 16, 48, 48), box(0, 0, 32, 64)
    kw = dict(steps=4, width=64, height=64, cfg_scale=5.0, strength=0.6, progress=False, **options)
    batch = pipe(["x", "y", "y"], seed=[3, 7, 8], init_image=[a, b, b], mask=[ma, mb, mb] if inpaint else None, **kw)
    one = pipe("x", seed=3, init_image=a, mask=ma if inpaint else None, **kw)
    two = pipe("y", seed=7, batch_size=2, init_image=b, mask=mb if inpaint else None, **kw)
    assert float(np.abs(batch.arrays[:1] - one.arrays).max()) <= ROW_TOL
    assert float(np.abs(batch.arrays[1:] - two.arrays).max()) <= ROW_TOL
    assert batch.infotexts == one.infotexts + two.infotexts
    assert not np.allclose(batch.arrays[0], batch.arrays[1], atol=0.05)  # the rows did take their own images
    if inpaint:  # one mask for every row beside a list of init images: each row's image under that mask
        shared = pipe(["x", "y"], seed=[3, 7], init_image=[a, b], mask=ma, **kw)
        alone = pipe("y", seed=7, init_image=b, mask=ma, **kw)
        assert float(np.abs(shared.arrays[:1] - one.arrays).max()) <= ROW_TOL
        assert float(np.abs(shared.arrays[1:] - alone.arrays).max()) <= ROW_TOL


def test_per_row_init_images_on_a_nine_channel_inpainting_model(tmp_path):
    from _pipeline_models import make_sd_folder
    from sdengine.pipeline import load_pipeline

    p9 = load_pipeline(make_sd_folder(tmp_path / "inp", kind="inpaint"), device="cpu")
    assert p9.inpainting
    a, b = ramp(32, 32), Image.new("RGB", (32, 32), "blue")
    ma, mb = box(8, 8, 24, 24, (32, 32)), box(0, 0, 16, 32, (32, 32))
    kw = dict(steps=3, width=32, height=32, cfg_scale=4.0, strength=0.8, progress=False)
    batch = p9(["x", "y"], seed=[5, 6], init_image=[a, b], mask=[ma, mb], **kw)
    for k, (img, m, prompt, seed) in enumerate(((a, ma, "x", 5), (b, mb, "y", 6))):
        alone = p9(prompt, seed=seed, init_image=img, mask=m, **kw)
        assert float(np.abs(batch.arrays[k : k + 1] - alone.arrays).max()) <= ROW_TOL


def test_an_instruct_pix2pix_model_refuses_per_row_init_images(tmp_path):
    from _pipeline_models import make_sd_folder
    from sdengine.pipeline import load_pipeline

    ip2p = load_pipeline(make_sd_folder(tmp_path / "ip2p", kind="ip2p"), device="cpu")
    assert ip2p.instruct_pix2pix
    a = ramp(32, 32)
    with pytest.raises(GenerationError) as e:
        ip2p(["x", "y"], seed=[1, 2], init_image=[a, a], steps=2, width=32, height=32, progress=False)
    assert str(e.value).endswith("is an instruct-pix2pix model: it takes one init image, not one per row")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"init_image": "three"},
            "init_image holds 3 images for 2 rows: give one per row (or one image for every row)",
        ),
        ({"mask": "three"}, "mask holds 3 images for 2 rows: give one per row (or one image for every row)"),
        ({"init_image": "none"}, "init_image holds an empty entry (None): give one image per row"),
        (
            {"init_image": "one", "mask": "two"},
            "a list of masks (one per row) needs a list of init images (one per row)",
        ),
        (
            {"init_latent_resize": True},
            "init_latent_resize takes one init image for the call, not one per row (a list)",
        ),
        ({"mask": "two", "differential_diffusion": 1.0}, "differential_diffusion takes one init image for the call"),
        ({"mask": "two", "soft_inpainting": True}, "soft_inpainting takes one init image for the call"),
        ({"init_image": "sizes"}, "the init images of one call must have one size: row 0's is 64x64, row 1's 48x64"),
        ({"mask": "sizes"}, "the masks of one call must have one size: row 0's is 64x64, row 1's 64x32"),
    ],
)
def test_per_row_init_images_refusals(pipe, changes, message):
    a = ramp()
    images = {
        "one": a,
        "two": [a, a],
        "three": [a, a, a],
        "none": [a, None],
        "sizes": [a, ramp(48, 64)],
    }
    masks = {
        "two": [box(0, 0, 8, 8)] * 2,
        "three": [box(0, 0, 8, 8)] * 3,
        "sizes": [box(0, 0, 8, 8), box(0, 0, 8, 8, (64, 32))],
    }
    kw: dict[str, Any] = dict(steps=2, width=64, height=64, strength=0.5, progress=False, init_image=[a, a])
    for k, v in changes.items():
        kw[k] = images[v] if k == "init_image" else masks[v] if k == "mask" else v
    with pytest.raises(SdengineError) as e:
        pipe(["x", "y"], seed=[1, 2], **kw)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_one_init_image_per_call_families_refuse_a_list():
    """The DiT families (SD3, FLUX.1 and the ones built on its pipeline) take one init image per call."""
    from types import SimpleNamespace

    from sdengine.pipeline import GenerationRequest
    from sdengine.pipeline.core import Pipeline
    from sdengine.pipeline.flux import FluxPipeline
    from sdengine.pipeline.qwen_image import QwenImagePipeline
    from sdengine.pipeline.sd3 import SD3Pipeline
    from sdengine.pipeline.sdxl import SDXLPipeline

    a = ramp()
    r = GenerationRequest(prompt=["x", "y"], init_image=[a, a])
    for cls in (FluxPipeline, SD3Pipeline, QwenImagePipeline):
        fake: Any = SimpleNamespace(per_row_init_images=cls.per_row_init_images, name="m")
        with pytest.raises(GenerationError, match=r"^init_image / mask as a list \(one per row\) is for U-Net"):
            Pipeline.refuse_row_images(fake, r)
        Pipeline.refuse_row_images(fake, GenerationRequest(init_image=a))  # one image: fine
    assert Pipeline.per_row_init_images and SDXLPipeline.per_row_init_images  # the U-Net models take it


# -- the server's batches ----------------------------------------------------------------------------------------


def serve(tmp, rec: Recorder, **kw: Any):
    return live_server(server_config(tmp, max_queue=16, **kw), loader=lambda ref, device: rec)


def submit(client: httpx.Client, body: dict) -> str:
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def pixels(client: httpx.Client, url: str) -> np.ndarray:
    r = client.get(url)
    assert r.status_code == 200
    return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))


def held(c: httpx.Client, rec: Recorder, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``bodies`` queued while a first job holds the worker; their finished records."""
    rec.gate.clear()
    blocker = submit(c, BLOCKER)
    ids = [submit(c, b) for b in bodies]
    rec.gate.set()
    assert wait_job(c, blocker, timeout=300)["state"] == "done"
    return [wait_job(c, i, timeout=300) for i in ids]


def test_img2img_and_inpainting_jobs_batch_and_each_equals_its_job_alone(tmp_path):
    rec = Recorder()
    red, ramp64 = Image.new("RGB", (64, 64), "red"), ramp()
    m1, m2 = box(16, 16, 48, 48), box(0, 0, 32, 64)
    img = [
        {**BASE, "prompt": "a red apple", "seed": 11, "init_image": png_b64(ramp64)},
        {**BASE, "prompt": "a blue car", "seed": 20, "batch_size": 2, "init_image": png_b64(red)},
        {**BASE, "prompt": "a tree", "seed": 31, "init_image": png_b64(ramp(48, 64))},  # another size: alone
        {**BASE, "prompt": "a star", "seed": 41, "init_image": png_b64(red), "strength": 0.5},  # other strength
    ]
    inp = [
        {**BASE, "prompt": "a cat", "seed": 5, "init_image": png_b64(ramp64), "mask": png_b64(m1), "mask_blur": 2},
        {**BASE, "prompt": "a dog", "seed": 6, "init_image": png_b64(red), "mask": png_b64(m2), "mask_blur": 2},
        {**BASE, "prompt": "a fox", "seed": 7, "init_image": png_b64(red), "mask_blur": 2},  # no mask: img2img
    ]
    with serve(tmp_path, rec) as s, httpx.Client(base_url=s.url, timeout=300) as c:
        done = held(c, rec, img + inp)
        assert [d["state"] for d in done] == ["done"] * len(done), done
        calls = [(k["prompt"], k["seed"]) for k in rec.calls[1:]]
        assert calls == [
            (["a red apple", "a blue car", "a blue car"], [11, 20, 21]),
            ("a tree", 31),
            ("a star", 41),
            (["a cat", "a dog"], [5, 6]),
            ("a fox", 7),
        ], calls
        kw = rec.calls[1]
        assert [im.size for im in kw["init_image"]] == [(64, 64)] * 3 and kw["mask"] is None
        assert kw["init_image"][1] is kw["init_image"][2]  # a job's image over its rows
        assert len(rec.calls[4]["mask"]) == 2
        for call, (bodies, images) in ((1, (img[:2], (ramp64, red))), (4, (inp[:2], (ramp64, red)))):
            batch, row = rec.results[call], 0
            for body, init in zip(bodies, images, strict=True):
                d = done[(img + inp).index(body)]
                n = body.get("batch_size", 1)
                assert len(d["images"]) == n and d["step"] == d["steps"] == 2  # int(4 * 0.6) steps
                mask = {id(inp[0]): m1, id(inp[1]): m2}.get(id(body))
                one = {k: v for k, v in rec.calls[call].items() if k not in ("callback", "progress")}
                one.update(prompt=body["prompt"], negative_prompt="", seed=body["seed"], batch_size=n)
                one.update(init_image=init, mask=mask)
                alone = rec.pipe(**one, progress=False)
                assert float(np.abs(batch.arrays[row : row + n] - alone.arrays).max()) <= ROW_TOL
                assert d["infotexts"] == alone.infotexts
                for k, im in enumerate(d["images"]):
                    assert np.array_equal(pixels(c, im["url"]), np.asarray(batch.images[row + k]))
                row += n


class FailingBatches(Recorder):
    """Fails every call with a list of init images (as an out-of-memory batch would), and every call of the
    prompt "a broken job"; single calls of other jobs run."""

    def __call__(self, **kw: Any) -> Any:
        self.calls.append(kw)
        assert self.gate.wait(120), "the test never opened the gate"
        if isinstance(kw.get("init_image"), list) or kw.get("prompt") == "a broken job":
            raise GenerationError("simulated failure")
        result = self.pipe(**kw)
        self.results.append(result)
        return result


def test_a_failed_img2img_batch_reruns_its_jobs_one_by_one(tmp_path):
    rec = FailingBatches()
    red = png_b64(Image.new("RGB", (64, 64), "red"))
    bodies = [
        {**BASE, "prompt": "a red apple", "seed": 1, "init_image": red},
        {**BASE, "prompt": "a broken job", "seed": 2, "init_image": red},
        {**BASE, "prompt": "a green pear", "seed": 3, "init_image": red},
    ]
    with serve(tmp_path, rec) as s, httpx.Client(base_url=s.url, timeout=300) as c:
        done = held(c, rec, bodies)
    assert [d["state"] for d in done] == ["done", "failed", "done"], done
    assert done[1]["error"] == "simulated failure"
    assert [k["prompt"] for k in rec.calls[1:]] == [
        ["a red apple", "a broken job", "a green pear"],  # the batch, failed
        "a red apple",
        "a broken job",
        "a green pear",
    ]
    assert [len(d["images"]) for d in done] == [1, 0, 1]


def test_cancel_of_one_batched_img2img_job_leaves_the_others_done(tmp_path):
    rec = Recorder()
    inits = [ramp(), Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "green")]
    bodies = [
        {**BASE, "steps": 16, "prompt": p, "seed": 50 + k, "init_image": png_b64(im)}
        for k, (p, im) in enumerate(zip(["a dog", "a cat", "a fox"], inits, strict=True))
    ]
    with serve(tmp_path, rec) as s, httpx.Client(base_url=s.url, timeout=300) as c:
        rec.gate.clear()
        blocker = submit(c, BLOCKER)
        ids = [submit(c, b) for b in bodies]
        rec.gate.set()
        assert wait_job(c, blocker)["state"] == "done"
        deadline = time.monotonic() + 120
        while c.get(f"/v1/jobs/{ids[1]}").json()["step"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        gone = c.delete(f"/v1/jobs/{ids[1]}").json()
        assert gone["state"] == "cancelled" and gone["images"] == []
        left = [wait_job(c, ids[0], timeout=300), wait_job(c, ids[2], timeout=300)]
        assert [d["state"] for d in left] == ["done", "done"]
    assert rec.calls[1]["prompt"] == ["a dog", "a cat", "a fox"]  # the batch that was stopped
    again = rec.calls[2]
    assert again["prompt"] == ["a dog", "a fox"] and again["seed"] == [50, 52]  # the others, again
    assert [im.convert("RGB").tobytes() for im in again["init_image"]] == [inits[0].tobytes(), inits[2].tobytes()]
    assert len(rec.calls) == 3
    for d in left:
        assert len(d["images"]) == 1 and d["step"] == d["steps"] == 9  # int(16 * 0.6)


def _job(**changes: Any) -> Job:
    kw: dict[str, Any] = {
        "prompt": "a",
        "negative_prompt": "",
        "steps": 3,
        "sampler": "dpmpp_2m",
        "schedule": "karras",
        "cfg_scale": 5.0,
        "seed": 1,
        "width": 64,
        "height": 64,
        "batch_size": 1,
        "init_image": Image.new("RGB", (64, 64)),
        "strength": 0.75,
        "mask": None,
        "mask_blur": 0.0,
        "controlnets": None,
        "loras": None,
        "clip_skip": 1,
    }
    kw.update(changes)
    return Job(Generation(model="emoji", model_name="emoji", kwargs=kw))


def test_batch_key_of_img2img_and_inpainting_jobs():
    base = batch_key(_job())
    assert base is not None
    # Another init image (of the same size), prompt or seed: the same batch.
    assert batch_key(_job(init_image=Image.new("RGB", (64, 64), "red"), prompt="b", seed=7)) == base
    masked = batch_key(_job(mask=Image.new("L", (64, 64))))
    assert masked is not None and masked != base  # inpainting never shares a call with img2img
    assert batch_key(_job(mask=Image.new("L", (64, 64), 255))) == masked
    for change in (
        {"init_image": Image.new("RGB", (48, 64))},  # another init size
        {"init_image": None},  # txt2img
        {"strength": 0.5},
        {"steps": 4},
        {"sampler": "euler"},
        {"cfg_scale": 6.0},
        {"mask_blur": 2.0},
        {"strength_rule": "a1111"},
        {"resize_mode": 1},
        {"masked_content": "latent noise"},
        {"mask_round": False},
        {"noise_multiplier": 0.9},
    ):
        assert batch_key(_job(**change)) != base, change
    assert batch_key(_job(mask=Image.new("L", (32, 32)))) != masked  # another mask size
    # Alone: an input that is not a decoded image, A1111's rules and other img2img options the key does not know.
    for change in (
        {"init_image": "/tmp/x.png"},
        {"mask": np.zeros((64, 64), np.float32)},
        {"init_latent_resize": True},
        {"soft_inpainting": True},
        {"controlnets": [("/c/cn.safetensors", Image.new("RGB", (64, 64)), 1.0, 0.0, 1.0)]},
    ):
        assert batch_key(_job(**change)) is None, change


def test_per_row_init_images_on_an_sdxl_model(tmp_path):
    from _sdxl_models import make_sdxl_folder
    from sdengine.pipeline import load_pipeline

    xl = load_pipeline(make_sdxl_folder(tmp_path / "xl"), device="cpu")
    assert xl.text_kind == "sdxl"
    a, b = ramp(32, 32), Image.new("RGB", (32, 32), "green")
    m = box(8, 8, 24, 24, (32, 32))
    kw = dict(steps=3, width=32, height=32, cfg_scale=4.0, strength=0.7, progress=False)
    for mask in (None, m):
        batch = xl(["x", "y"], seed=[5, 6], init_image=[a, b], mask=mask, **kw)
        for k, (img, prompt, seed) in enumerate(((a, "x", 5), (b, "y", 6))):
            alone = xl(prompt, seed=seed, init_image=img, mask=mask, **kw)
            assert float(np.abs(batch.arrays[k : k + 1] - alone.arrays).max()) <= ROW_TOL
    with pytest.raises(
        GenerationError, match=r"^a refiner hand-off takes one init image for the call, not one per row"
    ):
        xl.generate_with_refiner(xl, ["x", "y"], seed=[5, 6], init_image=[a, b], **kw)
