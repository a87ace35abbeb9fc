"""ComfyUI's file nodes (nodes_files.py): SaveLatent / LoadLatent round trips and hostile .latent files, and the
animated WebP / PNG savers, read back with the safetensors library and PIL (independent readers), through the
node functions and the live ComfyUI HTTP API."""

from __future__ import annotations

import io
import json
import struct
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import save_file

from _comfy_live import live_client, run_prompt, view_image
from _live_server import server_config
from sdengine.server.comfy import nodes_files as nf
from sdengine.server.comfy.nodes import NodeError, Outputs, RunContext


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _ctx(tmp: Path, **kw) -> RunContext:
    folders = Outputs(tmp / "out", tmp / "in", tmp / "temp")
    folders.input.mkdir(parents=True, exist_ok=True)
    return RunContext(pipeline=lambda ref: None, catalog=None, folders=folders, save_lock=threading.Lock(), **kw)


def _latent(z: torch.Tensor, f: int = 8) -> dict:
    return {"samples": z, "size": (z.shape[0], z.shape[2] * f, z.shape[3] * f), "posterior": None, "noise_mask": None}


# ------------------------------------------------------------------------------------------------ latents


def test_save_latent_writes_comfyuis_file_and_load_latent_reads_it_back(tmp_path):
    ctx = _ctx(tmp_path, prompt={"1": {"class_type": "SaveLatent"}}, extra_pnginfo={"workflow": {"nodes": [1]}})
    z = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(1))
    out = nf.save_latent(ctx, _latent(z, 4), "latents/ComfyUI")
    assert out["ui"] == {"latents": [{"filename": "ComfyUI_00001_.latent", "subfolder": "latents", "type": "output"}]}
    assert out["result"][0]["samples"] is z  # passed on
    raw = (ctx.folders.output / "latents" / "ComfyUI_00001_.latent").read_bytes()
    tensors = st_load(raw)  # the safetensors library reads it: ComfyUI's two keys
    assert set(tensors) == {"latent_tensor", "latent_format_version_0"}
    assert torch.equal(tensors["latent_tensor"], z) and tensors["latent_format_version_0"].numel() == 0
    (n,) = struct.unpack("<Q", raw[:8])
    meta = json.loads(raw[8 : 8 + n])["__metadata__"]
    assert json.loads(meta["prompt"]) == ctx.prompt and json.loads(meta["workflow"]) == {"nodes": [1]}
    # the counter goes on; another prefix starts at 1
    again = nf.save_latent(ctx, _latent(z, 4), "latents/ComfyUI")["ui"]["latents"][0]["filename"]
    assert again == "ComfyUI_00002_.latent"
    # LoadLatent of the annotated output name: the same values, the size in the model's pixels (factor 4 kept)
    (back,) = nf.load_latent(ctx, "latents/ComfyUI_00001_.latent [output]")
    assert torch.equal(back["samples"], z) and back["size"] == (2, 24, 20)
    # the input folder's .latent files are LoadLatent's choices (subfolders as sub/name, nothing else)
    (ctx.folders.input / "sub").mkdir()
    (ctx.folders.input / "sub" / "b.latent").write_bytes(raw)
    (ctx.folders.input / "a.latent").write_bytes(raw)
    (ctx.folders.input / "c.png").write_bytes(b"x")
    assert nf.latent_files(ctx) == ["a.latent", "sub/b.latent"]
    assert torch.equal(nf.load_latent(ctx, "sub/b.latent")[0]["samples"], z)


def test_an_old_format_file_is_scaled_by_comfyuis_rule(tmp_path):
    ctx = _ctx(tmp_path)
    t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    save_file({"latent_tensor": t.half()}, str(ctx.folders.input / "old.latent"))
    save_file({"latent_tensor": t, "latent_format_version_0": torch.tensor([])}, str(ctx.folders.input / "new.latent"))
    (old,) = nf.load_latent(ctx, "old.latent")
    want = t.half().double().numpy() / 0.18215  # float64 of ComfyUI's x.float() * (1 / 0.18215)
    assert old["samples"].dtype == torch.float32
    np.testing.assert_allclose(old["samples"].double().numpy(), want, rtol=1e-6)
    assert old["size"] == (1, 64, 64)  # no factor recorded: ComfyUI's SD factor 8
    assert torch.equal(nf.load_latent(ctx, "new.latent")[0]["samples"], t)


def _write_header(path: Path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_hostile_latent_files_are_one_line_node_errors(tmp_path):
    ctx = _ctx(tmp_path, max_batch=4, max_side=512)
    d = ctx.folders.input
    d.joinpath("png.latent").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    d.joinpath("short.latent").write_bytes(b"abc")
    save_file({"samples": torch.zeros(1, 4, 8, 8)}, str(d / "key.latent"))
    save_file({"latent_tensor": torch.zeros(1, 17, 8, 8)}, str(d / "channels.latent"))
    save_file({"latent_tensor": torch.zeros(1, 4, 8, 8, dtype=torch.int32)}, str(d / "int.latent"))
    save_file({"latent_tensor": torch.zeros(4, 8, 8)}, str(d / "rank.latent"))
    save_file({"latent_tensor": torch.zeros(5, 4, 8, 8)}, str(d / "batch.latent"))
    save_file({"latent_tensor": torch.zeros(1, 4, 8, 65)}, str(d / "wide.latent"))  # 65 * 8 > 512
    save_file({"latent_tensor": torch.full((1, 4, 8, 8), float("nan"))}, str(d / "nan.latent"))
    # a header claiming a 100000 x 100000 latent over 64 bytes of data: refused from the header, nothing allocated
    _write_header(
        d / "huge.latent",
        {"latent_tensor": {"dtype": "F32", "shape": [1, 4, 100000, 100000], "data_offsets": [0, 160000000000]}},
        bytes(64),
    )
    with open(d / "big.latent", "wb") as f:  # a sparse file over the size limit (no disk used)
        f.truncate(nf.MAX_LATENT_BYTES + 1)
    outside = tmp_path / "secret.latent"
    save_file({"latent_tensor": torch.zeros(1, 4, 8, 8)}, str(outside))
    (d / "link.latent").symlink_to(outside)
    cases = {
        "png.latent": "is not a safetensors file",
        "short.latent": "is not a safetensors file",
        "key.latent": "has no 'latent_tensor' tensor (it holds 'samples')",
        "channels.latent": "has 17 channels",
        "int.latent": "is I32, not a float tensor",
        "rank.latent": "not (batch, channels, height, width)",
        "batch.latent": "holds 5 latents, over the server's batch limit of 4",
        "wide.latent": "over the server's limit of 512 pixels a side",
        "nan.latent": "holds NaN or infinite values",
        "huge.latent": "is not a safetensors file",
        "big.latent": "over the 67108864 a .latent file may have",
        "link.latent": "resolves outside",
        "../secret.latent": "'..' is not allowed",
        "/etc/passwd": "absolute paths are not allowed",
        "missing.latent": "is not in the input folder",
        "x.latent [output]": "is not in the output folder",
    }
    for name, message in cases.items():
        with pytest.raises(NodeError) as e:
            nf.load_latent(ctx, name)
        text = str(e.value)
        assert message in text, (name, text)
        assert "\n" not in text and (name == "link.latent" or str(tmp_path) not in text), (name, text)
    # the choices list no file that leaves the folder; annotated names outside it are not valid either
    assert "link.latent" not in nf.latent_files(ctx)
    assert not nf.annotated_latent_exists(ctx, "../secret.latent [input]")
    # an empty latent has no channels to save yet; a prefix out of the output folder is refused
    with pytest.raises(NodeError, match="still empty"):
        nf.save_latent(ctx, {"samples": None, "size": (1, 64, 64)}, "x")
    with pytest.raises(NodeError, match="'..' is not allowed"):
        nf.save_latent(ctx, _latent(torch.zeros(1, 4, 2, 2)), "../escape")
    assert not (tmp_path / "escape_00001_.latent").exists()


# --------------------------------------------------------------------------------------------- animations


def _frames(path: Path | io.BytesIO) -> tuple[list[np.ndarray], list[int], Image.Image]:
    im = Image.open(path)
    frames, durations = [], []
    for k in range(im.n_frames):
        im.seek(k)
        frames.append(np.asarray(im.convert("RGB")))
        durations.append(int(im.info["duration"]))
    return frames, durations, im


def test_animated_webp_and_png_hold_the_batch_as_frames(tmp_path):
    ctx = _ctx(tmp_path, prompt={"9": {"class_type": "SaveAnimatedPNG"}})
    images = rand(3, 20, 24, 3, seed=5)
    want = (images.numpy() * 255).round().astype(np.uint8)
    webp = nf.save_animated_webp(ctx, images, "anim/clip", 4.0, True, 80, "default")
    assert webp["ui"] == {
        "images": [{"filename": "clip_00001_.webp", "subfolder": "anim", "type": "output"}],
        "animated": [True],
    }
    frames, durations, im = _frames(ctx.folders.output / "anim" / "clip_00001_.webp")
    assert im.format == "WEBP" and im.size == (24, 20) and len(frames) == 3
    assert durations == [250, 250, 250]  # int(1000 / 4)
    assert all(np.array_equal(a, b) for a, b in zip(frames, want, strict=True))  # lossless
    assert im.getexif()[0x0110].startswith('prompt:{"9"')
    # the counter follows the prefix's files of any type, as ComfyUI's; int(1000 / 7) = 142 ms
    apng = nf.save_animated_png(ctx, images, "anim/clip", 7.0, 9)
    assert apng["ui"]["images"][0]["filename"] == "clip_00002_.png" and apng["ui"]["animated"] == [True]
    path = ctx.folders.output / "anim" / "clip_00002_.png"
    frames, durations, im = _frames(path)
    assert im.format == "PNG" and im.size == (24, 20) and durations == [142, 142, 142]
    assert all(np.array_equal(a, b) for a, b in zip(frames, want, strict=True))
    assert b'comfprompt\x00{"9": {"class_type": "SaveAnimatedPNG"}}' in path.read_bytes()
    # lossy WebP: close, not equal; one frame is no animation (no "animated" key); num_frames splits the batch
    ramp = torch.linspace(0, 1, 24)[None, None, :, None].expand(3, 20, 24, 3) * torch.tensor([1.0, 0.5, 0.25])
    lossy_out = nf.save_animated_webp(ctx, ramp.contiguous(), "q", 2.0, False, 90, "fastest")
    (lossy,) = _frames(ctx.folders.output / lossy_out["ui"]["images"][0]["filename"])[:1]
    err = np.abs(np.stack(lossy).astype(float) - (ramp.numpy() * 255).round()).mean()
    assert 0 < err < 4
    one = nf.save_animated_png(ctx, images[:1], "single", 6.0, 4)
    assert "animated" not in one["ui"] and len(one["ui"]["images"]) == 1
    split = nf.save_animated_webp(ctx, images, "split", 6.0, True, 80, "default", num_frames=2)["ui"]["images"]
    counts = [Image.open(ctx.folders.output / i["filename"]).n_frames for i in split]
    assert [i["filename"] for i in split] == ["split_00001_.webp", "split_00002_.webp"] and counts == [2, 1]
    with pytest.raises(NodeError, match="leaves the output folder|'..' is not allowed"):
        nf.save_animated_png(ctx, images, "../x", 6.0, 4)


# --------------------------------------------------------------------------------------- through the API


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    from sdengine.server.comfy.routes import state

    tmp = tmp_path_factory.mktemp("comfyfiles")
    with live_client(server_config(tmp)) as (s, c):
        folders = state(s.app).folders
        folders.input.mkdir(parents=True, exist_ok=True)
        yield c, folders


def _st_bytes(tensors: dict) -> bytes:
    from safetensors.torch import save

    return save(tensors)


def _view(client: httpx.Client, item: dict) -> httpx.Response:
    return client.get("/view", params={"filename": item["filename"], "subfolder": item["subfolder"], "type": "output"})


def test_a_latent_round_trips_through_the_api_and_decodes_as_the_sampled_one(server):
    client, folders = server
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "emoji"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 2}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 7, "steps": 2, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "latents/rt"}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "direct"}},
    }  # fmt: skip
    h = run_prompt(client, g)
    assert h["status"]["status_str"] == "success", h["status"]
    (item,) = h["outputs"]["6"]["latents"]
    assert item == {"filename": "rt_00001_.latent", "subfolder": "latents", "type": "output"}
    r = _view(client, item)  # /view serves the file as data, not as an image
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    assert r.headers["content-disposition"].startswith("attachment")
    saved = st_load(r.content)
    assert saved["latent_tensor"].shape == (2, 4, 8, 8)  # emoji: 4 channels, factor 4
    assert _view(client, {**item, "filename": item["filename"]}).content == r.content
    assert client.get("/view", params={**item, "preview": "webp;80"}).status_code == 400
    # LoadLatent of it (annotated) -> VAEDecode gives the images of decoding the sampled latent directly; a
    # SaveLatent of what it loaded holds the same tensor
    g2 = {
        "1": g["1"],
        "2": {"class_type": "LoadLatent", "inputs": {"latent": "latents/rt_00001_.latent [output]"}},
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "loaded"}},
        "5": {"class_type": "SaveLatent", "inputs": {"samples": ["2", 0], "filename_prefix": "latents/rt"}},
    }
    h2 = run_prompt(client, g2)
    assert h2["status"]["status_str"] == "success", h2["status"]
    (again,) = h2["outputs"]["5"]["latents"]
    assert again["filename"] == "rt_00002_.latent"
    assert torch.equal(st_load(_view(client, again).content)["latent_tensor"], saved["latent_tensor"])
    direct, loaded = h["outputs"]["8"]["images"], h2["outputs"]["4"]["images"]
    assert len(direct) == len(loaded) == 2
    for a, b in zip(direct, loaded, strict=True):
        assert np.array_equal(view_image(client, a), view_image(client, b))
    # an uploaded .latent file (ComfyUI's /upload/image takes any file) is listed by /object_info and loads by its
    # plain name
    up = client.post("/upload/image", files={"image": ("mine.latent", r.content, "application/octet-stream")})
    assert up.status_code == 200 and up.json() == {"name": "mine.latent", "subfolder": "", "type": "input"}
    assert (folders.input / "mine.latent").read_bytes() == r.content
    info = client.get("/object_info/LoadLatent").json()["LoadLatent"]
    assert "mine.latent" in info["input"]["required"]["latent"][0] and info["category"] == "_for_testing"
    g2["2"]["inputs"]["latent"] = "mine.latent"
    assert run_prompt(client, g2)["status"]["status_str"] == "success"


def test_bad_latents_through_the_api_are_comfyuis_errors(server):
    client, folders = server
    save_file({"latent_tensor": torch.zeros(1, 3, 8, 8)}, str(folders.input / "rgb.latent"))
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "emoji"}},
        "2": {"class_type": "LoadLatent", "inputs": {"latent": "rgb.latent"}},
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }
    h = run_prompt(client, g)  # a 3-channel latent reaches the 4-channel model's VAE: refused at the node, in one line
    (err,) = [m[1] for m in h["status"]["messages"] if m[0] == "execution_error"]
    assert err["node_id"] == "3" and err["exception_message"] == "the latent has 3 channels, emoji's latents have 4"
    folders.input.joinpath("junk.latent").write_bytes(b"not safetensors at all")
    # an upload LoadLatent would refuse is a 400 in one line, and nothing is stored
    for data, message in (
        (b"not safetensors at all", "is not a safetensors file"),
        (_st_bytes({"samples": torch.zeros(1, 4, 8, 8)}), "has no 'latent_tensor' tensor"),
        (_st_bytes({"latent_tensor": torch.zeros(9, 4, 8, 8)}), "over the server's batch limit of 8"),
    ):
        up = client.post("/upload/image", files={"image": ("bad.latent", data, "application/octet-stream")})
        assert up.status_code == 400 and message in up.text and "\n" not in up.json()["detail"], up.text
        assert "/tmp" not in up.text
    assert not (folders.input / "bad.latent").exists()
    g["2"]["inputs"]["latent"] = "junk.latent"
    h = run_prompt(client, g)
    (err,) = [m[1] for m in h["status"]["messages"] if m[0] == "execution_error"]
    assert err["node_id"] == "2" and "is not a safetensors file" in err["exception_message"]
    assert "\n" not in err["exception_message"] and str(folders.input) not in err["exception_message"]
    for bad in ("../outside.latent", "x.latent [output]", "../../etc/passwd [input]"):  # never a choice: a 400
        g["2"]["inputs"]["latent"] = bad
        r = client.post("/prompt", json={"prompt": g})
        assert r.status_code == 400, r.text
        assert r.json()["node_errors"]["2"]["errors"][0]["type"] == "value_not_in_list"
    g4 = {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
          "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "../up"}}}  # fmt: skip
    (err,) = [m[1] for m in run_prompt(client, g4)["status"]["messages"] if m[0] == "execution_error"]
    assert err["node_type"] == "SaveLatent"


def test_animations_through_the_api_have_comfyuis_history_shape(server):
    client, _ = server
    g = {
        # frames A B A (PIL, so ComfyUI, merges identical neighbouring frames into one longer frame)
        "4": {"class_type": "EmptyImage", "inputs": {"width": 24, "height": 16, "batch_size": 1, "color": 0xFF8000}},
        "5": {"class_type": "EmptyImage", "inputs": {"width": 24, "height": 16, "batch_size": 1, "color": 0x0000FF}},
        "6": {"class_type": "ImageBatch", "inputs": {"image1": ["4", 0], "image2": ["5", 0]}},
        "1": {"class_type": "ImageBatch", "inputs": {"image1": ["6", 0], "image2": ["4", 0]}},
        "2": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["1", 0], "filename_prefix": "api", "fps": 10.0,
                                                           "lossless": True, "quality": 80, "method": "slowest"}},
        "3": {"class_type": "SaveAnimatedPNG", "inputs": {"images": ["1", 0], "filename_prefix": "api", "fps": 10.0,
                                                          "compress_level": 4}},
    }  # fmt: skip
    h = run_prompt(client, g)
    assert h["status"]["status_str"] == "success", h["status"]
    names = sorted(h["outputs"][n]["images"][0]["filename"] for n in ("2", "3"))
    assert names == ["api_00001_.webp", "api_00002_.png"] or names == ["api_00001_.png", "api_00002_.webp"]
    for n in ("2", "3"):
        out = h["outputs"][n]
        assert out["animated"] == [True] and out["images"][0]["type"] == "output"
        r = _view(client, out["images"][0])
        assert r.status_code == 200 and r.headers["content-type"].startswith("image/")
        frames, durations, im = _frames(io.BytesIO(r.content))
        assert len(frames) == 3 and im.size == (24, 16) and durations == [100, 100, 100]
        assert [tuple(f[3, 3]) for f in frames] == [(255, 128, 0), (0, 0, 255), (255, 128, 0)]
    info = client.get("/object_info/SaveAnimatedWEBP").json()["SaveAnimatedWEBP"]
    assert info["input"]["required"]["method"] == [["default", "fastest", "slowest"]]
    assert info["input"]["required"]["fps"] == ["FLOAT", {"default": 6.0, "min": 0.01, "max": 1000.0, "step": 0.01}]
    assert info["output_node"] and info["category"] == "image/animation"
    g["2"]["inputs"]["fps"] = 0.0
    del g["3"]  # (with another valid output the prompt would run that one, as ComfyUI)
    r = client.post("/prompt", json={"prompt": g})
    assert r.status_code == 400 and r.json()["node_errors"]["2"]["errors"][0]["type"] == "value_smaller_than_min"
