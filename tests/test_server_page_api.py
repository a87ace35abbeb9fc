"""The routes the web page needs beyond the native job API (sizes, ControlNet preprocess preview, gallery) and
the page's files, against a live server (no generation: these run in milliseconds)."""

from __future__ import annotations

import base64
import io
import os

import httpx
import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from _live_server import live_server, server_config


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("page_api")
    with live_server(server_config(tmp)) as s:
        yield s


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_the_page_and_its_files_are_served(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/static/app.js">' in r.text
    for name, kind in (
        ("app.js", "javascript"),
        ("pnginfo.js", "javascript"),
        ("mask.js", "javascript"),
        ("style.css", "text/css"),
    ):
        f = client.get(f"/static/{name}")
        assert f.status_code == 200 and kind in f.headers["content-type"], name
    assert client.get("/static/../page_api.py").status_code == 404
    assert client.get("/static/%2e%2e/page_api.py").status_code == 404
    assert "/" not in client.get("/openapi.json").json()["paths"]  # the page is not an API route


def test_the_pages_files_are_revalidated_on_every_load(client):
    """The static files had no Cache-Control: a browser could keep an older app.js by heuristic caching after an
    upgrade, beside the new index.html (no-cache). Now every file is no-cache, and an unchanged one is a 304."""
    for name in ("app.js", "mask.js", "pnginfo.js", "style.css"):
        r = client.get(f"/static/{name}")
        assert r.headers["cache-control"] == "no-cache" and r.headers["x-content-type-options"] == "nosniff", name
        again = client.get(f"/static/{name}", headers={"If-None-Match": r.headers["etag"]})
        assert again.status_code == 304 and again.content == b"", name
    assert client.get("/").headers["cache-control"] == "no-cache"


def test_sizes_are_each_models_default_and_multiple(client):
    sizes = client.get("/v1/sizes").json()
    assert sizes["models"]["emoji"] == {"width": 64, "height": 64, "multiple": 8}
    assert sizes["limits"] == {"steps": 150, "side": 2048, "batch_size": 8}  # the server's (the page's maxima)


def test_controlnet_preprocess_equals_the_python_preprocessor(client):
    from sdengine.control import preprocess

    src = Image.new("RGB", (64, 48), "white")
    src.paste((0, 0, 0), (10, 10, 30, 40))
    up = client.post("/v1/uploads", content=png(src), headers={"content-type": "image/png"}).json()["id"]
    for body, kind, options in (
        ({"preprocessor": "canny", "low": 50, "high": 150}, "canny", {"low": 50, "high": 150}),
        ({"preprocessor": "invert"}, "invert", {}),
    ):
        r = client.post("/v1/controlnets/preprocess", json={"image": up, **body})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
        got = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
        np.testing.assert_array_equal(got, np.asarray(preprocess(kind, src, **options).convert("RGB")))
    b64 = base64.b64encode(png(src)).decode()
    assert client.post("/v1/controlnets/preprocess", json={"image": b64, "preprocessor": "none"}).status_code == 200
    r = client.post("/v1/controlnets/preprocess", json={"image": up, "preprocessor": "depth"})
    assert r.status_code == 400 and "unknown preprocessor" in r.json()["detail"]
    r = client.post("/v1/controlnets/preprocess", json={"image": "https://example.com/a.png"})
    assert r.status_code == 400 and "not fetched" in r.json()["detail"]


def test_gallery_lists_outputs_newest_first_paged_with_parameters(client, server):
    from sdengine.metadata import save_png

    out = server.services.config.outputs_dir
    names = [f"{k:05d}-{k}.png" for k in range(5)]
    for k, name in enumerate(names):
        save_png(
            Image.new("RGB", (16, 8), (k * 40, 0, 0)), out / name, f"prompt {k}\nSteps: {k + 1}, Seed: {k}, Size: 16x8"
        )
        os.utime(out / name, ns=(10**18 + k * 10**9, 10**18 + k * 10**9))
    (out / "notes.txt").write_text("not an image")
    (out / ".hidden.png").write_bytes(png(Image.new("RGB", (4, 4))))
    first = client.get("/v1/gallery", params={"limit": 2}).json()
    assert first["total"] == 5 and [i["name"] for i in first["items"]] == [names[4], names[3]]
    item = first["items"][0]
    assert item["url"] == f"/v1/images/{names[4]}" and (item["width"], item["height"]) == (16, 8)
    assert item["parameters"].startswith("prompt 4\nSteps: 5")
    assert client.get(item["url"]).status_code == 200
    rest = client.get("/v1/gallery", params={"offset": 2, "limit": 10}).json()
    assert [i["name"] for i in rest["items"]] == [names[2], names[1], names[0]]
    assert client.get("/v1/gallery", params={"limit": 0}).status_code == 422
    assert client.get("/v1/gallery", params={"offset": -1}).status_code == 422


def test_with_a_key_only_the_page_is_public(tmp_path):
    with live_server(server_config(tmp_path, api_key="k3y")) as s:
        assert httpx.get(s.url + "/").status_code == 200
        assert httpx.get(s.url + "/static/app.js").status_code == 200
        assert httpx.head(s.url + "/static/style.css").status_code == 200
        for method, path in (
            ("POST", "/"),
            ("POST", "/static/app.js"),
            ("GET", "/v1/sizes"),
            ("GET", "/v1/gallery"),
            ("POST", "/v1/controlnets/preprocess"),
            ("DELETE", "/v1/images/00000-1.png"),
            ("GET", "/sdapi/v1/embeddings"),
            ("GET", "/staticx"),
            ("GET", "/v1/models"),
        ):
            assert httpx.request(method, s.url + path).status_code == 401, (method, path)
        assert httpx.get(s.url + "/v1/sizes", headers={"Authorization": "Bearer k3y"}).status_code == 200
    with live_server(server_config(tmp_path)) as s:  # no key: the page still refuses a foreign Host (rebinding)
        assert httpx.get(s.url + "/", headers={"Host": "evil.example:80"}).status_code == 403


def test_delete_removes_only_images_the_server_wrote(tmp_path):
    """There was no way to remove a generated image. DELETE /v1/images/{name} removes one the server wrote (its
    NNNNN-SEED.png with its parameters, or a ComfyUI SaveImage file with its prompt), and refuses any other file
    of the folder, a link, a path out of it, a missing name; the gallery says which items it may delete."""
    from sdengine.metadata import save_png

    with live_server(server_config(tmp_path)) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        out = s.services.config.outputs_dir
        out.mkdir(parents=True, exist_ok=True)
        ours = s.services.manager.save(Image.new("RGB", (8, 8)), 5, "a cat\nSteps: 1, Seed: 5, Size: 8x8")
        comfy = PngInfo()
        comfy.add_text("prompt", '{"1": {"class_type": "SaveImage", "inputs": {}}}')
        Image.new("RGB", (8, 8)).save(out / "ComfyUI_00001_.png", pnginfo=comfy)
        save_png(Image.new("RGB", (8, 8)), out / "holiday.png", "a photo\nSteps: 1, Seed: 1, Size: 8x8")
        (out / "00007-7.png").write_bytes(png(Image.new("RGB", (8, 8))))  # our kind of name, no metadata
        outside = tmp_path / "elsewhere.png"
        save_png(Image.new("RGB", (8, 8)), outside, "x\nSteps: 1, Seed: 1, Size: 8x8")
        (out / "00008-8.png").symlink_to(outside)
        listed = {i["name"]: i["deletable"] for i in c.get("/v1/gallery").json()["items"]}
        assert listed == {ours: True, "ComfyUI_00001_.png": True, "holiday.png": False, "00007-7.png": False}
        for name, status in (
            ("holiday.png", 403),
            ("00007-7.png", 403),
            ("00008-8.png", 403),
            ("nothere.png", 404),
            ("..%2Felsewhere.png", 400),
            ("%2E%2E%252Felsewhere.png", 400),
            ("notes.txt", 400),
        ):
            r = c.delete(f"/v1/images/{name}")
            assert r.status_code == status, (name, r.text)
            assert isinstance(r.json()["detail"], str) and len(r.json()["detail"]) > 10
        assert (out / "holiday.png").is_file() and (out / "00007-7.png").is_file() and outside.is_file()
        assert (out / "00008-8.png").is_symlink()
        # A foreign page's request is refused before anything is touched (CSRF), as for every writing route.
        assert c.delete(f"/v1/images/{ours}", headers={"Origin": "http://evil.example"}).status_code == 403
        assert (out / ours).is_file()
        for name in (ours, "ComfyUI_00001_.png"):
            r = c.delete(f"/v1/images/{name}")
            assert r.status_code == 200 and r.json() == {"deleted": name}
            assert not (out / name).exists() and c.get(f"/v1/images/{name}").status_code == 404
        assert c.delete(f"/v1/images/{ours}").status_code == 404
        assert c.get("/v1/gallery").json()["total"] == 2
    with live_server(server_config(tmp_path, api_key="k3y")) as s:
        ours = s.services.manager.save(Image.new("RGB", (8, 8)), 6, "a dog\nSteps: 1, Seed: 6, Size: 8x8")
        assert httpx.delete(f"{s.url}/v1/images/{ours}").status_code == 401 and (out / ours).is_file()
        r = httpx.delete(f"{s.url}/v1/images/{ours}", headers={"Authorization": "Bearer k3y"})
        assert r.status_code == 200 and not (out / ours).exists()
