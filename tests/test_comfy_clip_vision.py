"""ComfyUI's CLIPVisionLoader / CLIPVisionEncode (nodes_clip_vision.py) and the server's CLIP vision and IP-Adapter
folders (serve --clip-vision-dir / --ip-adapters-dir): ComfyUI's preprocessing re-derived in float64 numpy, the
encoder's outputs against transformers' CLIPVisionModelWithProjection on those pixels, the folder listings and
names, and the nodes through the live /prompt API."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from _comfy_live import live_client, run_prompt
from _live_server import server_config
from sdengine.server.catalog import Catalog
from sdengine.server.comfy import nodes_clip_vision as ncv
from sdengine.server.comfy.nodes import NodeDef, NodeError, RunContext
from sdengine.server.errors import BadRequest

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])


# ------------------------------------------------------------------------------- ComfyUI's rule in numpy


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (the antialiased bicubic filter's, as PIL's)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _aa_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of an antialiased bicubic resize with half-pixel centres: the kernel stretched by the
    scale when shrinking, the taps beyond the edge dropped and each row normalised to sum 1."""
    scale = n_in / n_out
    support = 2.0 * scale if scale >= 1 else 2.0
    inv = 1.0 / scale if scale >= 1 else 1.0
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = scale * (i + 0.5)
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), n_in)
        j = np.arange(lo, hi)
        w = _cubic((j - centre + 0.5) * inv)
        m[i, lo:hi] = w / w.sum()
    return m


def _preprocess_np(image: np.ndarray, size: int, crop: bool) -> np.ndarray:
    """ComfyUI's clip_preprocess, re-derived: (B, H, W, C) in [0, 1] -> (B, 3, size, size), in float64."""
    x = image[..., :3].astype(np.float64).transpose(0, 3, 1, 2)
    h, w = x.shape[2:]
    if (h, w) != (size, size):
        if crop:
            s = size / min(h, w)
            th, tw = round(s * h), round(s * w)
        else:
            th, tw = size, size
        x = np.einsum("oh,bchw,pw->bcop", _aa_matrix(h, th), x, _aa_matrix(w, tw))
        top, left = (th - size) // 2, (tw - size) // 2
        x = x[:, :, top : top + size, left : left + size]
    x = np.round(np.clip(255.0 * x, 0, 255)) / 255.0
    return (x - MEAN[:, None, None]) / STD[:, None, None]


def _image(b: int, h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    """Smooth content plus noise (a resize of pure noise would test little but the kernel's edges)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = 0.5 + 0.4 * np.sin(
        6 * xx[None, :, :, None] + 4 * yy[None, :, :, None] + np.arange(c) + np.arange(b)[:, None, None, None]
    )
    return np.clip(base + 0.08 * rng.standard_normal((b, h, w, c)), 0, 1)


@pytest.mark.parametrize(
    ("shape", "size", "crop"),
    [
        ((2, 50, 37), 32, True),  # shrink, portrait: the height is cut
        ((1, 37, 50), 32, True),  # shrink, landscape: the width is cut
        ((1, 20, 13), 32, True),  # enlarge
        ((1, 50, 37), 32, False),  # squashed to the square
        ((1, 45, 90), 24, False),
        ((1, 32, 32), 32, True),  # already the size: only the 8-bit rounding and normalisation
        ((1, 33, 100), 32, True),  # round(32 / 33 * 100) = 97: the centre cut of an odd width
    ],
)
def test_preprocess_is_comfyuis_rule_rederived_in_float64(shape, size, crop):
    img = _image(*shape)
    want = _preprocess_np(img, size, crop)
    got = ncv.comfy_clip_preprocess(torch.from_numpy(img), size, crop)  # float64 in, float64 out
    assert got.dtype == torch.float64 and tuple(got.shape) == (shape[0], 3, size, size)
    assert np.abs(got.numpy() - want).max() <= 1e-9
    # the float32 IMAGE ComfyUI passes: the same 8-bit levels but where the resize lands within float32 rounding
    # of a level's edge (at most one level apart there, at few pixels)
    f32 = ncv.comfy_clip_preprocess(torch.from_numpy(img).float(), size, crop).double().numpy()
    levels = np.abs((f32 - want) * STD[:, None, None] * 255)
    assert levels.max() <= 1.0 + 1e-4 and (levels > 0.5).mean() <= 0.01


def test_preprocess_drops_alpha_and_refuses_other_images():
    rgba = _image(1, 40, 30, c=4, seed=2)
    got = ncv.comfy_clip_preprocess(torch.from_numpy(rgba), 32, True).numpy()
    assert np.abs(got - _preprocess_np(rgba[..., :3], 32, True)).max() <= 1e-9
    for bad in (torch.rand(1, 8, 8, 1), torch.rand(8, 8, 3), torch.zeros(1, 8, 8, 3, dtype=torch.uint8)):
        with pytest.raises(NodeError) as e:
            ncv.comfy_clip_preprocess(bad, 32, True)
        assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------ the encoders


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g) / (p.shape[-1] if p.ndim else 1) ** 0.25)


def _hf(hidden: int, heads: int, act: str, seed: int):
    cfg = transformers.CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=40, num_hidden_layers=2, num_attention_heads=heads, patch_size=8,
        image_size=32, projection_dim=16, hidden_act=act, layer_norm_eps=1e-5,
    )  # fmt: skip
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.CLIPVisionModelWithProjection(cfg).eval()
    _randomize(model, seed + 1)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory):
    """--clip-vision-dir: a bare 64-wide file (one head and gelu by the width rule), a sub-folder's diffusers
    image_encoder folder (32 wide, 4 heads, quick_gelu, from its config.json), a broken file, files that are not
    listed; --ip-adapters-dir: two adapter files and some that are not listed."""
    root = tmp_path_factory.mktemp("clipv")
    cv, ipa = root / "clip_vision", root / "ipadapter"
    cv.mkdir()
    ipa.mkdir()
    bare = _hf(64, 1, "gelu", 0)
    sd = {k: v.contiguous() for k, v in bare.state_dict().items()}
    safetensors_torch.save_file(sd, str(cv / "clip_vision_tiny.safetensors"))
    folder = _hf(32, 4, "quick_gelu", 5)
    folder.save_pretrained(cv / "sd15" / "image_encoder")
    (cv / "broken.safetensors").write_bytes(b"not a safetensors file")
    (cv / "notes.txt").write_text("x")
    (cv / ".hidden.safetensors").write_bytes(b"")
    outside = root / "outside.safetensors"
    safetensors_torch.save_file(sd, str(outside))
    os.symlink(outside, cv / "link_out.safetensors")
    for n in ("ip-adapter_sd15.bin", "sub/ip-adapter-plus_sd15.safetensors", "readme.md", "x.ckpt"):
        (ipa / n).parent.mkdir(parents=True, exist_ok=True)
        (ipa / n).write_bytes(b"\0")
    return root, {"clip_vision_tiny.safetensors": bare, "sd15/image_encoder": folder}


CLIP_NAMES = ["broken.safetensors", "clip_vision_tiny.safetensors", "sd15/image_encoder"]
IPA_NAMES = ["ip-adapter_sd15.bin", "sub/ip-adapter-plus_sd15.safetensors"]


def _catalog(root: Path) -> Catalog:
    return Catalog(None, None, None, clip_vision_dir=root / "clip_vision", ip_adapters_dir=root / "ipadapter")


def test_the_folders_list_by_path_and_resolve_inside_only(folders):
    root, _ = folders
    cat = _catalog(root)
    assert [e.name for e in cat.clip_visions()] == CLIP_NAMES  # no .txt, hidden file, link out, inner files
    assert [e.name for e in cat.ip_adapters()] == IPA_NAMES  # no .md, no .ckpt
    assert cat.resolve_clip_vision("sd15/image_encoder") == (root / "clip_vision" / "sd15" / "image_encoder").resolve()
    assert cat.resolve_ip_adapter("ip-adapter_sd15.bin") == (root / "ipadapter" / "ip-adapter_sd15.bin").resolve()
    bad = {
        "../outside.safetensors": "'..'",
        str(root / "outside.safetensors"): "absolute",
        "link_out.safetensors": "outside",
        "notes.txt": "available: broken.safetensors, clip_vision_tiny.safetensors, sd15/image_encoder",
        "clip_vision_tiny": "unknown CLIP vision",  # ComfyUI's names keep their suffix
        "sd15/image_encoder/model.safetensors": "unknown CLIP vision",
        "sd15": "unknown CLIP vision",
    }
    for name, said in bad.items():
        with pytest.raises(BadRequest) as e:
            cat.resolve_clip_vision(name)
        assert said in str(e.value) and "\n" not in str(e.value), (name, str(e.value))
    with pytest.raises(BadRequest, match="unknown IP-Adapter 'x.ckpt'"):
        cat.resolve_ip_adapter("x.ckpt")
    none = Catalog(None, None, None)
    assert none.clip_visions() == [] and none.ip_adapters() == []
    with pytest.raises(BadRequest, match="serve --ip-adapters-dir DIR"):
        none.resolve_ip_adapter("ip-adapter_sd15.bin")


def _ctx(root: Path) -> RunContext:
    return RunContext(pipeline=lambda ref: None, catalog=_catalog(root), folders=None)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["clip_vision_tiny.safetensors", "sd15/image_encoder"])
@pytest.mark.parametrize("crop", ["center", "none"])
def test_encode_equals_transformers_on_comfyuis_pixels(folders, name, crop):
    root, hf = folders
    ctx = _ctx(root)
    (handle,) = ncv.clip_vision_loader(ctx, name)
    assert handle.image_size == 32 and handle.name == name and str(root) not in repr(handle)
    img = _image(2, 45, 70, seed=7)
    (out,) = ncv.clip_vision_encode(ctx, handle, torch.from_numpy(img).float(), crop)
    pixels = torch.from_numpy(_preprocess_np(img, 32, crop == "center")).float()
    with torch.no_grad():
        ref = hf[name](pixel_values=pixels, output_hidden_states=True)
    for got, want in (
        (out.image_embeds, ref.image_embeds),
        (out["last_hidden_state"], ref.last_hidden_state),
        (out.penultimate_hidden_states, ref.hidden_states[-2]),
    ):
        assert got.shape == want.shape and got.dtype == torch.float32 and got.device.type == "cpu"
        assert (got - want).abs().max().item() <= 1e-5
    assert out.image_sizes == ((3, 32, 32), (3, 32, 32))
    # the rows are the two images' (a model that ignored the pixels would match only by chance)
    assert (out.image_embeds[0] - out.image_embeds[1]).abs().max().item() > 1e-3


def test_the_loader_keeps_the_model_until_its_file_changes(folders, tmp_path):
    root, hf = folders
    cv = tmp_path / "clip_vision"
    cv.mkdir()
    src = root / "clip_vision" / "clip_vision_tiny.safetensors"
    (cv / "a.safetensors").write_bytes(src.read_bytes())
    ctx = RunContext(pipeline=lambda ref: None, catalog=Catalog(None, None, None, clip_vision_dir=cv), folders=None)  # type: ignore[arg-type]
    (h,) = ncv.clip_vision_loader(ctx, "a.safetensors")
    first = ncv.clip_vision_model(ctx, h.path, h.name)
    assert ncv.clip_vision_model(ctx, h.path, h.name) is first  # kept
    token = ncv.clip_vision_file_token(ctx, {"clip_name": "a.safetensors"})
    other = _hf(64, 1, "gelu", 11)  # another file under the same name: read again
    safetensors_torch.save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(cv / "a.safetensors"))
    os.utime(cv / "a.safetensors", ns=(1, 10**18))
    assert ncv.clip_vision_file_token(ctx, {"clip_name": "a.safetensors"}) != token
    second = ncv.clip_vision_model(ctx, h.path, h.name)
    assert second is not first
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert (second(x).image_embeds - other(pixel_values=x).image_embeds).abs().max().item() <= 1e-5
    ncv.forget_clip_visions()
    assert ncv.clip_vision_model(ctx, h.path, h.name) is not second


def test_bad_files_and_inputs_are_one_line_node_errors(folders):
    root, _ = folders
    ctx = _ctx(root)
    with pytest.raises(NodeError) as e:
        ncv.clip_vision_loader(ctx, "broken.safetensors")
    assert "is invalid and does not contain a valid vision model" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(NodeError, match="'..' is not allowed"):
        ncv.clip_vision_loader(ctx, "../outside.safetensors")
    (h,) = ncv.clip_vision_loader(ctx, "clip_vision_tiny.safetensors")
    image = torch.rand(1, 40, 40, 3)
    with pytest.raises(NodeError, match="must come from CLIPVisionLoader"):
        ncv.clip_vision_encode(ctx, "clip_vision_tiny.safetensors", image, "center")
    with pytest.raises(NodeError, match="crop must be one of center, none"):
        ncv.clip_vision_encode(ctx, h, image, "top")


# --------------------------------------------------------------------------------------- through the API


def _probe_node(seen: list) -> NodeDef:
    """A test-only output node that takes a CLIP_VISION_OUTPUT (no node of sdengine consumes one yet): what
    CLIPVisionEncode gave, kept for the test."""

    def probe(ctx, clip_vision_output):
        seen.append(clip_vision_output)
        return {"ui": {"text": [repr(clip_vision_output)]}, "result": ()}

    from sdengine.server.comfy.nodes import Input

    return NodeDef("ProbeClipVisionOutput", "probe", "testing", (Input("clip_vision_output", "CLIP_VISION_OUTPUT"),),
                   (), probe, output_node=True)  # fmt: skip


@pytest.fixture(scope="module")
def api(folders, tmp_path_factory: pytest.TempPathFactory):
    root, _ = folders
    config = server_config(
        tmp_path_factory.mktemp("clipv_server"),
        clip_vision_dir=root / "clip_vision",
        ip_adapters_dir=root / "ipadapter",
    )
    with live_client(config) as (_, c):
        yield c


def test_folder_lists_and_object_info(api, folders):
    root, _ = folders
    c = api
    assert {"clip_vision", "ipadapter"} <= set(c.get("/models").json())
    assert c.get("/models/clip_vision").json() == CLIP_NAMES
    assert c.get("/models/ipadapter").json() == IPA_NAMES
    assert c.get("/v1/clip_vision").json() == {"clip_vision": [{"name": n} for n in CLIP_NAMES]}
    assert c.get("/v1/ip_adapters").json() == {"ip_adapters": [{"name": n} for n in IPA_NAMES]}
    assert str(root) not in c.get("/v1/clip_vision").text + c.get("/models/ipadapter").text
    info = c.get("/object_info/CLIPVisionLoader").json()["CLIPVisionLoader"]
    assert info["input"]["required"]["clip_name"][0] == CLIP_NAMES and info["output"] == ["CLIP_VISION"]
    enc = c.get("/object_info/CLIPVisionEncode").json()["CLIPVisionEncode"]
    assert list(enc["input"]["required"]) == ["clip_vision", "image", "crop"]
    assert enc["input"]["required"]["crop"][0] == ["center", "none"] and enc["output"] == ["CLIP_VISION_OUTPUT"]


def _upload(c: httpx.Client, img: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray((img * 255).round().astype(np.uint8)).save(buf, format="PNG")
    r = c.post("/upload/image", files={"image": ("face.png", buf.getvalue(), "image/png")}, data={"overwrite": "true"})
    assert r.status_code == 200, r.text
    return r.json()["name"]


def _graph(image: str, clip_name: str, crop: str = "center", probe: bool = True) -> dict:
    g = {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": clip_name}},
        "3": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["2", 0], "image": ["1", 0], "crop": crop}},
    }
    if probe:
        g["4"] = {"class_type": "ProbeClipVisionOutput", "inputs": {"clip_vision_output": ["3", 0]}}
    return g


def test_a_graph_ending_in_the_encoder_is_refused_as_comfyui_does(api, folders):
    """No output node: ComfyUI's 400 prompt_no_outputs (the encoder's output goes nowhere, nothing would run)."""
    name = _upload(api, _image(1, 40, 52, seed=3)[0])
    r = api.post("/prompt", json={"prompt": _graph(name, "clip_vision_tiny.safetensors", probe=False)})
    assert r.status_code == 400 and r.json()["error"]["type"] == "prompt_no_outputs", r.text


def test_loader_and_encode_run_through_the_api(api, folders, monkeypatch):
    from sdengine.server.comfy import registry

    root, hf = folders
    seen: list = []
    monkeypatch.setitem(registry.NODES, "ProbeClipVisionOutput", _probe_node(seen))
    img = _image(1, 40, 52, seed=3)
    name = _upload(api, img[0])
    h = run_prompt(api, _graph(name, "sd15/image_encoder", "none"))
    assert h["status"]["status_str"] == "success", h["status"]
    (out,) = seen
    # LoadImage's IMAGE is the PNG's 8-bit levels: the same pixels here, then ComfyUI's rule
    levels = (img * 255).round() / 255
    pixels = torch.from_numpy(_preprocess_np(levels, 32, False)).float()
    with torch.no_grad():
        ref = hf["sd15/image_encoder"](pixel_values=pixels, output_hidden_states=True)
    assert (out.image_embeds - ref.image_embeds).abs().max().item() <= 1e-5
    assert (out.penultimate_hidden_states - ref.hidden_states[-2]).abs().max().item() <= 1e-5
    assert h["outputs"]["4"]["text"] == [repr(out)]
    # bad names: ComfyUI's validation error naming the value, before anything runs
    for bad in ("nope.safetensors", "../outside.safetensors", "notes.txt", "link_out.safetensors"):
        r = api.post("/prompt", json={"prompt": _graph(name, bad)})
        assert r.status_code == 400, r.text
        (err,) = r.json()["node_errors"]["2"]["errors"]
        assert err["type"] == "value_not_in_list" and bad in err["details"], err
    r = api.post("/prompt", json={"prompt": _graph(name, "clip_vision_tiny.safetensors", "top")})
    assert r.status_code == 400 and r.json()["node_errors"]["3"]["errors"][0]["type"] == "value_not_in_list"
    # a listed file that is no encoder fails at its loader, one line, no server path
    h = run_prompt(api, _graph(name, "broken.safetensors"))
    assert h["status"]["status_str"] == "error"
    failed = [m[1] for m in h["status"]["messages"] if m[0] == "execution_error"][0]
    assert failed["node_type"] == "CLIPVisionLoader" and "invalid" in failed["exception_message"]
    assert str(root) not in json.dumps(failed)
    assert len(seen) == 1


@pytest.mark.parametrize("flag", ["--clip-vision-dir", "--ip-adapters-dir"])
def test_serve_refuses_a_missing_folder(flag, tmp_path, capsys):
    from sdengine.cli import main

    rc = main(["serve", flag, str(tmp_path / "nope"), "--outputs-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and flag in err, err
