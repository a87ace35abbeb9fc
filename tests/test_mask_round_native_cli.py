"""A1111's ``mask_round`` and ``latent_mask`` outside the A1111 route: the native job's fields ``mask_round`` /
``latent_mask`` and the CLI's ``--no-mask-round`` / ``--latent-mask FILE`` give the Python call's pixels (the
pipeline's ``GenerationRequest.mask_round`` / ``latent_mask``, which tests/test_a1111_mask_round.py holds against
A1111's formulas and the A1111 route), each another image than without it; misuse is one line."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image

from _live_server import live_server, server_config, shared_loader, wait_job
from sdengine.cli import main

KW = dict(seed=3, strength=0.8, strength_rule="a1111", sampler="euler", steps=3, width=64, height=64, cfg_scale=7.0)


def init_image() -> Image.Image:
    x = np.linspace(0, 255, 64, dtype=np.uint8)
    return Image.fromarray(
        np.stack([np.tile(x, (64, 1)), np.tile(x[:, None], (1, 64)), np.full((64, 64), 128, np.uint8)], -1)
    )


def mask_image() -> Image.Image:  # grey levels that round apart from their grey
    a = np.zeros((64, 64), np.uint8)
    a[12:52, 8:24], a[12:52, 24:40], a[12:52, 40:56] = 100, 200, 255
    return Image.fromarray(a, "L")


def latent_mask_image() -> Image.Image:  # a 40x40 separate mask: any size, shrunk to the latent from its own
    yy, xx = np.mgrid[0:40, 0:40]
    return Image.fromarray(np.where((xx > 12) & (yy > 3), 230, 20).astype(np.uint8), "L")


def python_call(**kw) -> np.ndarray:
    image = shared_loader("emoji", "cpu")(
        "a blue ball", init_image=init_image(), mask=mask_image(), progress=False, **KW, **kw
    ).images[0]
    return np.asarray(image.convert("RGB"))


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def plain() -> np.ndarray:
    return python_call()


def test_native_job_mask_round_and_latent_mask_are_the_python_calls(tmp_path, plain) -> None:
    with live_server(server_config(tmp_path, max_queue=4)) as s, httpx.Client(base_url=s.url, timeout=120) as c:

        def upload(im: Image.Image) -> str:
            return c.post("/v1/uploads", files={"file": ("x.png", png_bytes(im), "image/png")}).json()["id"]

        body = {"prompt": "a blue ball", **KW, "init_image": upload(init_image()), "mask": upload(mask_image())}
        lm = upload(latent_mask_image())
        for extra, kw in (
            ({"mask_round": False}, {"mask_round": False}),
            ({"latent_mask": lm}, {"latent_mask": latent_mask_image()}),
            ({"latent_mask": lm, "mask_round": False}, {"latent_mask": latent_mask_image(), "mask_round": False}),
        ):
            r = c.post("/v1/jobs", json={**body, **extra})
            assert r.status_code == 202, r.text
            j = wait_job(c, r.json()["id"])
            assert j["state"] == "done", j
            got = np.asarray(Image.open(io.BytesIO(c.get(j["images"][0]["url"]).content)).convert("RGB"))
            want = python_call(**kw)
            np.testing.assert_array_equal(got, want)
            assert not np.array_equal(got, plain), extra  # the field is not ignored
        for extra, says in (
            ({"mask_round": False, "strength_rule": "diffusers"}, "mask_round false is A1111's"),
            ({"latent_mask": lm, "mask": None}, "latent_mask needs a mask"),
        ):
            r = c.post("/v1/jobs", json={**body, **extra})
            detail = r.json()["detail"]
            assert r.status_code == 400 and says in detail and "\n" not in detail, r.text
        r = c.post("/v1/jobs", json={**body, "mask_round": "sometimes"})
        assert r.status_code == 422, r.text


def test_cli_no_mask_round_and_latent_mask_are_the_python_calls(tmp_path, plain, capsys) -> None:
    init, mask, lm = (tmp_path / n for n in ("init.png", "mask.png", "latent.png"))
    init_image().save(init)
    mask_image().save(mask)
    latent_mask_image().save(lm)
    args = ["a blue ball", "--model", "emoji", "--init-image", str(init), "--mask", str(mask), "--no-progress"]
    args += ["--seed", "3", "--strength", "0.8", "--strength-rule", "a1111", "--sampler", "euler", "--steps", "3"]
    args += ["--width", "64", "--height", "64", "--cfg", "7"]
    for flags, kw in (
        (["--no-mask-round"], {"mask_round": False}),
        (["--latent-mask", str(lm)], {"latent_mask": latent_mask_image()}),
    ):
        out = tmp_path / "out.png"
        assert main(["generate", *args, *flags, "--out", str(out)]) == 0
        got = np.asarray(Image.open(out).convert("RGB"))
        np.testing.assert_array_equal(got, python_call(**kw))
        assert not np.array_equal(got, plain), flags
    capsys.readouterr()
    no_mask = [a for a in args if a not in ("--mask", str(mask))]
    for flags, says in ((["--no-mask-round"], "--no-mask-round"), (["--latent-mask", str(lm)], "--latent-mask")):
        rc = main(["generate", *no_mask, *flags, "--out", str(tmp_path / "bad.png")])
        err = capsys.readouterr().err
        assert rc == 2 and says in err and "--mask" in err and err.count("\n") == 1, err
    rc = main(["generate", *args, "--strength-rule", "diffusers", "--no-mask-round", "--out", str(tmp_path / "b.png")])
    err = capsys.readouterr().err
    assert rc != 0 and "mask_round false is A1111's" in err and err.count("\n") == 1, err
