"""ComfyUI's string, morphology, YUV, mask-preview, latent concat / cut and latent-operation nodes (nodes_tools.py):
each against its ComfyUI formula recomputed here (plain Python, NumPy, float64 loops), the refusals in one line, and
a workflow through the ComfyUI HTTP API chaining them (a string's length linked into an image's width, the image
through morphology and YUV and back, a .latent file through a latent operation, a cut and a concat)."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from _comfy_live import live_client, run_prompt, view_image
from _live_server import server_config
from sdengine.server.comfy import nodes_tools as nt
from sdengine.server.comfy.nodes import NodeError, RunContext
from sdengine.server.comfy.registry import NODES

CTX = RunContext(pipeline=lambda ref: None, catalog=None, folders=None)  # type: ignore[arg-type]


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def lat(z: torch.Tensor, f: int = 8, **extra: object) -> dict:
    return {"samples": z, "size": (z.shape[0], z.shape[2] * f, z.shape[3] * f), **extra}


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, NodeError)
    return msg


# ------------------------------------------------------------------------------------------------ strings


def test_string_nodes_are_pythons_string_operations():
    s = "  A cat, a Hat  "
    assert nt.string_substring(CTX, "abcdef", 1, -1) == ("bcde",)
    assert nt.string_substring(CTX, "abcdef", 4, 2) == ("",)
    assert nt.string_length(CTX, "héllo\n") == (6,)
    assert nt.case_converter(CTX, "a cAT hat", "UPPERCASE") == ("A CAT HAT",)
    assert nt.case_converter(CTX, "a cAT hat", "lowercase") == ("a cat hat",)
    assert nt.case_converter(CTX, "a cAT hat", "Capitalize") == ("A cat hat",)
    assert nt.case_converter(CTX, "a cAT hat", "Title Case") == ("A Cat Hat",)
    assert nt.string_trim(CTX, s, "Both") == ("A cat, a Hat",)
    assert nt.string_trim(CTX, s, "Left") == ("A cat, a Hat  ",)
    assert nt.string_trim(CTX, s, "Right") == ("  A cat, a Hat",)
    assert nt.string_contains(CTX, s, "hat", True) == (False,)
    assert nt.string_contains(CTX, s, "hat", False) == (True,)
    assert nt.string_compare(CTX, "Cathedral", "cat", "Starts With", True) == (False,)
    assert nt.string_compare(CTX, "Cathedral", "cat", "Starts With", False) == (True,)
    assert nt.string_compare(CTX, "Cathedral", "RAL", "Ends With", False) == (True,)
    assert nt.string_compare(CTX, "ab", "ab", "Equal", True) == (True,)


def test_regex_nodes_follow_comfyuis_modes():
    text = "cat=1, dog=22\nCow=333"
    assert nt.regex_match(CTX, text, r"^cow", True, True, False) == (True,)  # multiline: ^ at each line
    assert nt.regex_match(CTX, text, r"^cow", True, False, False) == (False,)
    assert nt.regex_match(CTX, text, r"^cow", False, True, False) == (False,)  # case sensitive
    assert nt.regex_match(CTX, text, r"22.Cow", True, False, True) == (True,)  # dotall: . takes the newline
    pat = r"([a-z]+)=(\d+)"
    assert nt.regex_extract(CTX, text, pat, "First Match", True, False, False, 1) == ("cat=1",)
    # findall with groups gives tuples: ComfyUI keeps each match's first group
    assert nt.regex_extract(CTX, text, pat, "All Matches", True, False, False, 1) == ("cat\ndog\nCow",)
    assert nt.regex_extract(CTX, text, r"\d+", "All Matches", True, False, False, 1) == ("1\n22\n333",)
    assert nt.regex_extract(CTX, text, pat, "First Group", True, False, False, 2) == ("1",)
    assert nt.regex_extract(CTX, text, pat, "First Group", True, False, False, 3) == ("",)  # fewer groups
    assert nt.regex_extract(CTX, text, pat, "All Groups", True, False, False, 2) == ("1\n22\n333",)
    assert nt.regex_extract(CTX, text, r"\b" + pat, "All Groups", False, False, False, 2) == ("1\n22",)
    assert nt.regex_extract(CTX, text, r"x(\d)?y", "All Groups", True, False, False, 1) == ("",)  # no match
    assert nt.regex_extract(CTX, "xy x1y", r"x(\d)?y", "All Groups", True, False, False, 1) == ("\n1",)
    assert nt.regex_replace(CTX, text, pat, r"\2:\1", True, False, False, 0) == ("1:cat, 22:dog\n333:Cow",)
    assert nt.regex_replace(CTX, text, pat, r"\2:\1", True, False, False, 1) == ("1:cat, dog=22\nCow=333",)
    assert nt.regex_replace(CTX, "aAa", "a", "-") == ("---",)  # the optional flags' defaults: case-insensitive
    want = re.sub(pat, "#", text, count=2, flags=re.IGNORECASE)
    assert nt.regex_replace(CTX, text, pat, "#", True, False, False, 2) == (want,)


def test_bad_regexes_and_modes_are_one_line_errors():
    for fn, args in (
        (nt.regex_match, ("abc", "a(b", True, False, False)),
        (nt.regex_extract, ("abc", "[", "First Match", True, False, False, 1)),
        (nt.regex_replace, ("abc", "*a", "x")),
    ):
        with pytest.raises(NodeError) as e:
            fn(CTX, *args)
        assert "is not a valid regular expression" in one_line(e)
    with pytest.raises(NodeError) as e:
        nt.regex_replace(CTX, "abc", "(b)", r"\2")
    assert "does not fit the pattern" in one_line(e)
    with pytest.raises(NodeError) as e:
        nt.case_converter(CTX, "a", "Sponge Case")
    assert "unknown mode 'Sponge Case'" in one_line(e)
    with pytest.raises(NodeError) as e:
        nt.string_length(CTX, 3)  # type: ignore[arg-type]
    assert "must be a STRING" in one_line(e)


def test_a_pattern_that_backtracks_without_end_is_stopped_in_one_line(monkeypatch):
    """`(a|aa)+$` on a run of a's and one b backtracks exponentially (hours with Python's re at 40 a's): each node
    stops it after REGEX_SECONDS with a one-line node error instead of holding the worker."""
    import time

    monkeypatch.setattr(nt, "REGEX_SECONDS", 0.2)
    evil, s = "(a|aa)+$", "a" * 40 + "b"
    for fn, args in (
        (nt.regex_match, (s, evil, False, False, False)),
        (nt.regex_extract, (s, evil, "All Groups", False, False, False, 1)),
        (nt.regex_replace, (s, evil, "x")),
    ):
        t0 = time.monotonic()
        with pytest.raises(NodeError) as e:
            fn(CTX, *args)
        assert time.monotonic() - t0 < 10
        assert "took over 0.2 s" in one_line(e) and "(a|aa)+$" in one_line(e)
    # an ordinary pattern under the same limit still answers
    assert nt.regex_replace(CTX, "a cat", "c(a)t", r"d\1g")[0] == "a dag"


# ------------------------------------------------------------------------------------------------- images


def _morph_ref(x: np.ndarray, k: int, op: str) -> np.ndarray:
    """(B, H, W, C) float64 grey-scale max / min over each k x k window of in-image pixels: ComfyUI's max_pool2d
    with stride 1 and padding k // 2 (the window of output i covers input rows i - k // 2 .. i - k // 2 + k - 1)."""
    b, h, w, c = x.shape
    p = k // 2
    oh, ow = h + 2 * p - k + 1, w + 2 * p - k + 1
    out = np.empty((b, oh, ow, c))
    for i in range(oh):
        for j in range(ow):
            r0, c0 = max(0, i - p), max(0, j - p)
            r1, c1 = min(h, i - p + k), min(w, j - p + k)
            win = x[:, r0:r1, c0:c1, :]
            out[:, i, j, :] = win.max(axis=(1, 2)) if op == "max" else win.min(axis=(1, 2))
    return out


def test_morphology_is_max_and_min_over_the_window():
    x = rand(2, 7, 9, 3, seed=1)
    xd = x.double().numpy()
    for k in (3, 5):
        dil, ero = _morph_ref(xd, k, "max"), _morph_ref(xd, k, "min")
        opened = _morph_ref(_morph_ref(xd, k, "min"), k, "max")
        closed = _morph_ref(_morph_ref(xd, k, "max"), k, "min")
        want = {
            "dilate": dil,
            "erode": ero,
            "open": opened,
            "close": closed,
            "gradient": dil - ero,
            "top_hat": xd - opened,
            "bottom_hat": closed - xd,
        }
        for op, w in want.items():
            (got,) = nt.morphology(CTX, x, op, k)
            assert got.shape == x.shape, op
            assert np.allclose(got.double().numpy(), w, atol=1e-6), (op, k)
    # an even kernel grows the image one pixel a side per pass, as ComfyUI's padding k // 2 does
    (even,) = nt.morphology(CTX, x, "dilate", 4)
    assert even.shape == (2, 8, 10, 3)
    assert np.allclose(even.double().numpy(), _morph_ref(xd, 4, "max"), atol=1e-6)
    assert nt.morphology(CTX, x, "open", 4)[0].shape == (2, 9, 11, 3)
    with pytest.raises(NodeError) as e:
        nt.morphology(CTX, x, "top_hat", 4)
    assert "needs an odd kernel_size, got 4" in one_line(e)
    with pytest.raises(NodeError) as e:
        nt.morphology(CTX, torch.zeros(1, 4, 4), "erode", 3)
    assert "must be an IMAGE" in one_line(e)


def test_yuv_split_and_join_are_kornias_ycbcr():
    x = rand(2, 5, 6, 4, seed=2)  # RGBA: the alpha is dropped
    y, u, v = nt.image_rgb_to_yuv(CTX, x)
    r, g, b = (x[..., i].double().numpy() for i in range(3))
    wy = 0.299 * r + 0.587 * g + 0.114 * b
    wu = (b - wy) * 0.564 + 0.5
    wv = (r - wy) * 0.713 + 0.5
    for got, want in ((y, wy), (u, wu), (v, wv)):
        assert got.shape == (2, 5, 6, 3)
        for c in range(3):
            assert np.allclose(got[..., c].double().numpy(), want, atol=1e-6)
    (rgb,) = nt.image_yuv_to_rgb(CTX, y, u, v)
    back = np.stack(
        [wy + 1.403 * (wv - 0.5), wy - 0.714 * (wv - 0.5) - 0.344 * (wu - 0.5), wy + 1.773 * (wu - 0.5)], axis=-1
    ).clip(0, 1)
    assert np.allclose(rgb.double().numpy(), back, atol=1e-6)
    assert np.abs(rgb.numpy() - x[..., :3].numpy()).max() < 2e-3  # kornia's rounded constants: near the image
    # the join reads each input's RGB mean: a coloured Y is its grey level
    coloured = rand(2, 5, 6, 3, seed=3)
    (rgb2,) = nt.image_yuv_to_rgb(CTX, coloured, u, v)
    m = coloured.double().mean(-1).numpy()
    assert np.allclose(rgb2[..., 0].double().numpy(), np.clip(m + 1.403 * (wv - 0.5), 0, 1), atol=1e-6)
    with pytest.raises(NodeError) as e:
        nt.image_yuv_to_rgb(CTX, y, u[:1], v)
    assert "one size and batch" in one_line(e)


# ------------------------------------------------------------------------------------------------ latents


def test_latent_concat_joins_along_width_or_height():
    a, b = rand(2, 4, 3, 5, seed=4), rand(1, 4, 3, 2, seed=5)
    mask = torch.ones(1, 1, 24, 40)
    (x,) = nt.latent_concat(CTX, lat(a, noise_mask=mask, batch_index=[3, 4]), lat(b), "x")
    want = np.concatenate([a.numpy(), np.repeat(b.numpy(), 2, axis=0)], axis=3)
    assert np.array_equal(x["samples"].numpy(), want)
    assert x["size"] == (2, 24, 56) and x["noise_mask"] is mask and x["batch_index"] == [3, 4]
    (mx,) = nt.latent_concat(CTX, lat(a), lat(b), "-x")
    assert np.array_equal(mx["samples"].numpy(), np.concatenate([np.repeat(b.numpy(), 2, axis=0), a.numpy()], 3))
    c = rand(2, 4, 2, 5, seed=6)
    (y,) = nt.latent_concat(CTX, lat(a), lat(c), "-y")
    assert np.array_equal(y["samples"].numpy(), np.concatenate([c.numpy(), a.numpy()], axis=2))
    assert y["size"] == (2, 40, 40)
    # an empty latent is zeros in the other's channels; two empty ones stay empty at the joined size
    (e,) = nt.latent_concat(CTX, lat(a), {"samples": None, "size": (2, 24, 16)}, "x")
    assert np.array_equal(e["samples"].numpy(), np.concatenate([a.numpy(), np.zeros((2, 4, 3, 2))], 3))
    (ee,) = nt.latent_concat(CTX, {"samples": None, "size": (1, 64, 64)}, {"samples": None, "size": (1, 64, 32)}, "x")
    assert ee["samples"] is None and ee["size"] == (1, 64, 96)
    with pytest.raises(NodeError) as err:
        nt.latent_concat(CTX, lat(a), lat(c), "x")
    assert "need one height; got 24 and 16 pixels" in one_line(err)
    with pytest.raises(NodeError) as err:
        nt.latent_concat(CTX, lat(a), lat(a), "t")
    assert "time axis" in one_line(err)
    with pytest.raises(NodeError) as err:
        nt.latent_concat(CTX, lat(torch.zeros(1, 4, 200, 200)), lat(torch.zeros(1, 4, 200, 200)), "x")
    assert "over the server's limit" in one_line(err)


def test_latent_cut_takes_comfyuis_clamped_window():
    z = rand(1, 4, 6, 10, seed=7)
    post = (z * 2, z * 3)
    for dim, axis, n in (("x", 3, 10), ("y", 2, 6)):
        for index, amount in ((0, 1), (2, 3), (8, 5), (50, 2), (-3, 2), (-3, 9), (-40, 2)):
            # ComfyUI's clamping, written out
            if index >= 0:
                i = min(index, n - 1)
                k = min(n - i, amount)
            else:
                i = max(index, -n)
                k = min(-i, amount)
                i += n
            (out,) = nt.latent_cut(CTX, lat(z, posterior=post), dim, index, amount)
            want = z.numpy().take(range(i, i + k), axis=axis)
            assert np.array_equal(out["samples"].numpy(), want), (dim, index, amount)
            assert np.array_equal(out["posterior"][1].numpy(), post[1].numpy().take(range(i, i + k), axis=axis))
            assert out["size"] == ((1, 48, 8 * k) if dim == "x" else (1, 8 * k, 80))
    (e,) = nt.latent_cut(CTX, {"samples": None, "size": (2, 64, 128)}, "x", -4, 3)
    assert e["samples"] is None and e["size"] == (2, 64, 24)
    with pytest.raises(NodeError) as err:
        nt.latent_cut(CTX, lat(z), "t", 0, 1)
    assert "time axis" in one_line(err)


def test_latent_operations_are_comfyuis_formulas():
    z = torch.randn(2, 4, 12, 14, generator=torch.Generator().manual_seed(8))
    zd = z.double().numpy()
    (tone,) = nt.latent_operation_tonemap_reinhard(CTX, 0.7)
    (out,) = nt.latent_apply_operation(CTX, lat(z, posterior=(z, z)), tone)
    m = np.sqrt((zd**2).sum(axis=1, keepdims=True)) + 1e-10
    top = np.stack([(m[i].std(ddof=1) * 5 + m[i].mean()) * 0.7 for i in range(2)])[:, None, None, None]
    want = zd / m * (m / top) / (m / top + 1.0) * top
    assert np.allclose(out["samples"].double().numpy(), want, atol=1e-5)
    assert out["posterior"] is None  # the samples changed: the VAE posterior no longer describes them
    (sharp,) = nt.latent_operation_sharpen(CTX, 2, 1.3, 0.4)
    (s,) = nt.latent_apply_operation(CTX, lat(z), sharp)
    # the kernel: exp(-d^2 / 2 sigma^2) on a 5 x 5 grid over [-1, 1], normalised, times -10 alpha, centre raised
    t = np.linspace(-1, 1, 5)
    g = np.exp(-(t[:, None] ** 2 + t[None, :] ** 2) / (2 * 1.3**2))
    k = g / g.sum() * -4.0
    k[2, 2] += 1.0 - k.sum()
    lum = np.sqrt((zd**2).sum(axis=1, keepdims=True)) + 1e-6
    pad = np.pad(zd / lum, ((0, 0), (0, 0), (2, 2), (2, 2)), mode="reflect")
    conv = np.zeros_like(zd)
    for i in range(12):
        for j in range(14):
            conv[:, :, i, j] = (pad[:, :, i : i + 5, j : j + 5] * k).sum(axis=(2, 3))
    assert np.allclose(s["samples"].double().numpy(), lum * conv, atol=1e-5)
    empty = {"samples": None, "size": (1, 64, 64)}
    assert nt.latent_apply_operation(CTX, empty, sharp)[0] == empty  # zeros stay zeros: still empty
    (big,) = nt.latent_operation_sharpen(CTX, 12, 1.0, 0.1)
    with pytest.raises(NodeError) as err:
        nt.latent_apply_operation(CTX, lat(z), big)
    assert "a radius of 12 needs a latent larger than 12" in one_line(err)


def test_the_nodes_are_registered_with_comfyuis_inputs():
    for name in (
        "StringSubstring", "StringLength", "CaseConverter", "StringTrim", "StringContains", "StringCompare",
        "RegexMatch", "RegexExtract", "RegexReplace", "Morphology", "ImageRGBToYUV", "ImageYUVToRGB", "MaskPreview",
        "LatentConcat", "LatentCut", "LatentApplyOperation", "LatentOperationTonemapReinhard",
        "LatentOperationSharpen", "OptimalStepsScheduler", "ModelSamplingContinuousEDM", "PreviewAny",
        "LoadImageOutput", "TorchCompileModel",
    ):  # fmt: skip
        assert NODES[name] is nt.TOOL_NODES[name]
    km = NODES["Morphology"].input("kernel_size")
    assert km is not None and (km.default, km.min, km.max) == (3, 3, 999)
    sr = NODES["LatentOperationSharpen"].input("sharpen_radius")
    assert sr is not None and (sr.default, sr.min, sr.max) == (9, 1, 31)
    assert [i.name for i in NODES["RegexReplace"].inputs if i.optional] == [
        "case_insensitive",
        "multiline",
        "dotall",
        "count",
    ]


# --------------------------------------------------------------------------------------- through the API


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    with live_client(server_config(tmp_path_factory.mktemp("comfytools"))) as (_, c):
        yield c


def test_a_workflow_of_the_tool_nodes_equals_the_nodes_called_in_turn(client):
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    rgb = (rand(1, 12, 16, 3, seed=9)[0].numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG")
    r = client.post("/upload/image", files={"image": ("tools.png", buf.getvalue(), "image/png")})
    assert r.status_code == 200, r.text
    z = torch.randn(1, 4, 6, 8, generator=torch.Generator().manual_seed(10))
    data = st_save({"latent_tensor": z, "latent_format_version_0": torch.tensor([])})
    r = client.post("/upload/image", files={"image": ("tools.latent", data, "application/octet-stream")})
    assert r.status_code == 200, r.text
    g = {
        # "  a cat  " -> trimmed, "cat" -> "kitten": "a kitten" is 8 long -> an 8-wide empty image
        "1": {"class_type": "PrimitiveString", "inputs": {"value": "  a cat  "}},
        "2": {"class_type": "StringTrim", "inputs": {"string": ["1", 0], "mode": "Both"}},
        "3": {"class_type": "RegexReplace", "inputs": {"string": ["2", 0], "regex_pattern": "c[a]t",
                                                       "replace": "kitten"}},
        "4": {"class_type": "StringLength", "inputs": {"string": ["3", 0]}},
        "5": {"class_type": "EmptyImage", "inputs": {"width": ["4", 0], "height": 4, "batch_size": 1,
                                                     "color": 0xFF0000}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "len"}},
        "10": {"class_type": "LoadImage", "inputs": {"image": "tools.png"}},
        "11": {"class_type": "Morphology", "inputs": {"image": ["10", 0], "operation": "close", "kernel_size": 3}},
        "12": {"class_type": "ImageRGBToYUV", "inputs": {"image": ["11", 0]}},
        "13": {"class_type": "ImageYUVToRGB", "inputs": {"Y": ["12", 0], "U": ["12", 1], "V": ["12", 2]}},
        "14": {"class_type": "SaveImage", "inputs": {"images": ["13", 0], "filename_prefix": "yuv"}},
        "15": {"class_type": "ImageToMask", "inputs": {"image": ["12", 0], "channel": "red"}},
        "16": {"class_type": "MaskPreview", "inputs": {"mask": ["15", 0]}},
        "20": {"class_type": "LoadLatent", "inputs": {"latent": "tools.latent"}},
        "21": {"class_type": "LatentOperationTonemapReinhard", "inputs": {"multiplier": 0.5}},
        "22": {"class_type": "LatentApplyOperation", "inputs": {"samples": ["20", 0], "operation": ["21", 0]}},
        "23": {"class_type": "LatentCut", "inputs": {"samples": ["22", 0], "dim": "x", "index": -3, "amount": 2}},
        "24": {"class_type": "LatentConcat", "inputs": {"samples1": ["22", 0], "samples2": ["23", 0],
                                                        "dim": "-x"}},
        "25": {"class_type": "SaveLatent", "inputs": {"samples": ["24", 0], "filename_prefix": "tools"}},
    }  # fmt: skip
    h = run_prompt(client, g)
    assert h["status"]["status_str"] == "success", h["status"]
    assert view_image(client, h["outputs"]["6"]["images"][0]).shape == (4, 8, 3)
    # the image chain, recomputed through the node functions
    img = torch.from_numpy(rgb.astype(np.float32) / 255)[None]
    y, u, v = nt.image_rgb_to_yuv(CTX, nt.morphology(CTX, img, "close", 3)[0])
    want = nt.image_yuv_to_rgb(CTX, y, u, v)[0][0].numpy()
    got = view_image(client, h["outputs"]["14"]["images"][0])
    assert np.abs(got.astype(int) - (want * 255).round().astype(int)).max() <= 1  # PNG's 8 bits of the same
    (preview,) = h["outputs"]["16"]["images"]
    assert preview["type"] == "temp"
    grey = view_image(client, preview)
    assert np.abs(grey[..., 0].astype(int) - (y[0, ..., 0].numpy() * 255).round().astype(int)).max() <= 1
    # the latent chain: tonemap, the last 3..2 columns cut, put in front
    (item,) = h["outputs"]["25"]["latents"]
    r = client.get("/view", params={"filename": item["filename"], "subfolder": item["subfolder"], "type": "output"})
    saved = st_load(r.content)["latent_tensor"]
    toned = nt.latent_operation_tonemap_reinhard(CTX, 0.5)[0](z)
    assert saved.shape == (1, 4, 6, 10)
    assert torch.allclose(saved, torch.cat([toned[..., 5:7], toned], dim=3), atol=1e-6)


def test_bad_inputs_through_the_api_fail_the_node_in_one_line(client):
    g = {
        "1": {"class_type": "PrimitiveString", "inputs": {"value": "abc"}},
        "2": {"class_type": "RegexExtract", "inputs": {"string": ["1", 0], "regex_pattern": "(", "mode": "First Match",
                                                       "case_insensitive": True, "multiline": False, "dotall": False,
                                                       "group_index": 1}},
        "3": {"class_type": "StringLength", "inputs": {"string": ["2", 0]}},
        "4": {"class_type": "EmptyImage", "inputs": {"width": ["3", 0], "height": 4, "batch_size": 1, "color": 0}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
    }  # fmt: skip
    h = run_prompt(client, g)
    assert h["status"]["status_str"] == "error"
    (err,) = [m[1] for m in h["status"]["messages"] if m[0] == "execution_error"]
    assert err["node_id"] == "2" and "is not a valid regular expression" in err["exception_message"]
    assert "\n" not in err["exception_message"]
    g2 = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "Morphology", "inputs": {"image": ["1", 0], "operation": "erode", "kernel_size": 1}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }
    r = client.post("/prompt", json={"prompt": g2})
    assert r.status_code == 400 and r.json()["node_errors"]["2"]["errors"][0]["type"] == "value_smaller_than_min"


def test_optimal_steps_scheduler_is_comfyuis_loglinear_table():
    def loglinear(levels: list[float], n: int) -> np.ndarray:  # ComfyUI's loglinear_interp, in NumPy
        xs = np.linspace(0, 1, len(levels))
        ys = np.log(levels[::-1])
        return np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1].copy()

    for model_type, steps, denoise in (
        ("FLUX", 10, 1.0),  # 11 levels: the table as it is
        ("FLUX", 20, 1.0),
        ("Chroma", 7, 1.0),
        ("Wan", 12, 0.5),
        ("FLUX", 9, 0.34),
    ):
        levels = list(nt.OPTIMAL_STEPS_LEVELS[model_type])
        want = np.array(levels) if steps + 1 == len(levels) else loglinear(levels, steps + 1)
        run = steps if denoise >= 1.0 else round(steps * denoise)
        want = want[-(run + 1) :].copy()
        want[-1] = 0
        (got,) = nt.optimal_steps_scheduler(CTX, model_type, steps, denoise)
        assert got.values.dtype == torch.float32 and got.values.shape == (run + 1,)
        assert np.array_equal(got.values.numpy(), want.astype(np.float32)), (model_type, steps, denoise)
    assert nt.optimal_steps_scheduler(CTX, "FLUX", 10, 0.0)[0].values.numel() == 0
    assert nt.OPTIMAL_STEPS_LEVELS["FLUX"][7] == 0.8287 and len(nt.OPTIMAL_STEPS_LEVELS["Chroma"]) == 41
    with pytest.raises(NodeError) as e:
        nt.optimal_steps_scheduler(CTX, "FLUX", 151, 1.0)
    assert "over the server's limit of 150" in one_line(e)


def test_model_sampling_continuous_edm_passes_an_edm_model_stated_as_it_is():
    from types import SimpleNamespace

    from sdengine.diffusion.edm import EDMSchedule
    from sdengine.server.comfy.nodes import ModelHandle

    def ctx_of(pipe: object) -> RunContext:
        return RunContext(pipeline=lambda ref: pipe, catalog=None, folders=None)  # type: ignore[arg-type]

    plain_vae = SimpleNamespace(config=SimpleNamespace(latents_mean=None))
    stats_vae = SimpleNamespace(config=SimpleNamespace(latents_mean=[0.0] * 4))
    cosxl = SimpleNamespace(
        noise_schedule=EDMSchedule(sigma_min=0.002, sigma_max=120.0, sigma_data=1.0, prediction="v_prediction"),
        vae=plain_vae,
    )
    playground = SimpleNamespace(
        noise_schedule=EDMSchedule(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, prediction="epsilon"),
        vae=stats_vae,
    )
    vp = SimpleNamespace(noise_schedule=object(), vae=plain_vae)
    m = ModelHandle(ref="builtin:x")
    fn = nt.model_sampling_continuous_edm
    assert fn(ctx_of(cosxl), m, "v_prediction", 120.0, 0.002) == (m,)  # ComfyUI's defaults are CosXL's
    assert fn(ctx_of(playground), m, "edm_playground_v2.5", 80.0, 0.002) == (m,)
    for ctx, sampling, hi, lo, words in (
        (cosxl, "v_prediction", 80.0, 0.002, "v_prediction at sigma 0.002..80, sigma_data 1"),
        (cosxl, "edm", 120.0, 0.002, "epsilon at sigma 0.002..120, sigma_data 0.5"),
        (playground, "edm", 80.0, 0.002, "is an EDM model of epsilon at sigma 0.002..80, sigma_data 0.5, Playground"),
        (vp, "v_prediction", 120.0, 0.002, "has a discrete (VP) schedule"),
        (cosxl, "eps", 120.0, 0.002, "sampling 'eps' is not supported here"),
        (cosxl, "v_prediction", 0.002, 0.002, "needs 0 < sigma_min < sigma_max"),
    ):
        with pytest.raises(NodeError) as e:
            fn(ctx_of(ctx), m, sampling, hi, lo)
        assert words in one_line(e), (sampling, hi)
    info = NODES["ModelSamplingContinuousEDM"]
    assert [(i.name, i.default) for i in info.inputs[1:]] == [
        ("sampling", "v_prediction"),
        ("sigma_max", 120.0),
        ("sigma_min", 0.002),
    ]


def test_preview_any_gives_comfyuis_text():
    assert nt.preview_text("a\\ncat") == "a\\ncat"
    assert nt.preview_text(3) == "3" and nt.preview_text(2.5) == "2.5" and nt.preview_text(True) == "True"
    assert nt.preview_text(None) == "None"
    assert nt.preview_text({"a": [1, 2]}) == '{\n    "a": [\n        1,\n        2\n    ]\n}'  # JSON, indent 4
    t = torch.arange(20.0)
    text = nt.preview_text(t)
    # torch's print with 6 edge items: all 20 values (under torch's 1000-item summary threshold)
    assert text.startswith("tensor([ 0.,  1.,") and "19.])" in text
    # a long tensor: 6 values each side of the ellipsis; the default print options (3) are back afterwards
    assert nt.preview_text(torch.zeros(2000)) == "tensor([0., 0., 0., 0., 0., 0.,  ..., 0., 0., 0., 0., 0., 0.])"
    assert str(torch.zeros(2000)) == "tensor([0., 0., 0.,  ..., 0., 0., 0.])"
    assert nt.preview_any(CTX, 7) == {"ui": {"text": ["7"]}, "result": ("7",)}
    # a dict with tensors (a LATENT): Python's text of it, its tensors at 6 edge items too
    assert (
        nt.preview_text({"samples": torch.zeros(2000)})
        == "{'samples': tensor([0., 0., 0., 0., 0., 0.,  ..., 0., 0., 0., 0., 0., 0.])}"
    )


def test_preview_any_takes_any_link_through_the_api(client):
    g = {
        "1": {"class_type": "PrimitiveString", "inputs": {"value": "a cat"}},
        "2": {"class_type": "StringLength", "inputs": {"string": ["1", 0]}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
        "5": {"class_type": "EmptyImage", "inputs": {"width": 2, "height": 1, "batch_size": 1, "color": 0}},
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}},
    }
    h = run_prompt(client, g)
    assert h["status"]["status_str"] == "success", h["status"]
    assert h["outputs"]["3"] == {"text": ["5"]} and h["outputs"]["4"] == {"text": ["a cat"]}
    assert h["outputs"]["6"]["text"][0] == str(torch.zeros(1, 1, 2, 3))
    info = client.get("/object_info/PreviewAny").json()["PreviewAny"]
    assert info["input"]["required"]["source"][0] == "*" and info["output"] == ["STRING"] and info["output_node"]
    r = client.post("/prompt", json={"prompt": {"1": {"class_type": "PreviewAny", "inputs": {"source": "text"}}}})
    assert r.status_code == 400 and r.json()["node_errors"]["1"]["errors"][0]["type"] == "invalid_input_type"


def test_a_ui_workflows_preview_any_converts_without_its_display_widgets():
    from sdengine.server.comfy.workflow import convert

    def ui(values: list) -> dict:
        return {
            "nodes": [
                {"id": 1, "type": "PrimitiveString", "mode": 0, "widgets_values": ["a cat"],
                 "outputs": [{"name": "STRING", "type": "STRING", "links": [1]}]},
                {"id": 2, "type": "PreviewAny", "mode": 0, "widgets_values": values,
                 "inputs": [{"name": "source", "type": "*", "link": 1}],
                 "outputs": [{"name": "STRING", "type": "STRING", "links": None}]},
            ],
            "links": [[1, 1, 0, 2, 0, "STRING"]],
        }  # fmt: skip

    for values in ([], [None, None, None]):  # the page's saves: no values, or its three display widgets' nulls
        api = convert(ui(values))
        assert api["2"] == {
            "class_type": "PreviewAny",
            "inputs": {"source": ["1", 0]},
            "_meta": {"title": "Preview as Text"},
        }
    with pytest.raises(Exception) as e:
        convert(ui([None, None, None, None]))
    assert "4 widget values for 0 widgets" in str(e.value)


def test_load_image_output_lists_the_output_folder_and_loads_as_load_image(client):
    # a SaveImage puts an image in the output folder; LoadImageOutput offers it as "name [output]" and loads it
    g = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 6, "height": 4, "batch_size": 1, "color": 0x336699}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "again/out"}},
    }
    h = run_prompt(client, g)
    assert h["status"]["status_str"] == "success", h["status"]
    (saved,) = h["outputs"]["2"]["images"]
    name = f"{saved['subfolder']}/{saved['filename']} [output]"
    info = client.get("/object_info/LoadImageOutput").json()["LoadImageOutput"]
    choices = info["input"]["required"]["image"][0]
    assert choices[0] == name  # the newest first
    g2 = {
        "1": {"class_type": "LoadImageOutput", "inputs": {"image": name}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "inverted"}},
    }
    h2 = run_prompt(client, g2)
    assert h2["status"]["status_str"] == "success", h2["status"]
    got = view_image(client, h2["outputs"]["3"]["images"][0])
    assert got.shape == (4, 6, 3) and (got == [255 - 0x33, 255 - 0x66, 255 - 0x99]).all()
    # a name of no folder: 400 from /prompt, as LoadImage's
    g2["1"]["inputs"]["image"] = "missing.png [output]"
    r = client.post("/prompt", json={"prompt": g2})
    assert r.status_code == 400 and r.json()["node_errors"]["1"]["errors"][0]["type"] == "value_not_in_list"


def test_torch_compile_model_passes_the_model_through(client):
    from sdengine.server.comfy.nodes import ModelHandle

    m = ModelHandle(ref="builtin:x")
    assert nt.torch_compile_model(CTX, m, "cudagraphs") == (m,)
    with pytest.raises(NodeError) as e:
        nt.torch_compile_model(CTX, m, "eager")
    assert "unknown backend 'eager'" in one_line(e)
    sample = {"seed": 5, "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "emoji"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "5": {"class_type": "TorchCompileModel", "inputs": {"model": ["1", 0], "backend": "inductor"}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["5", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], **sample}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "compiled"}},
    }  # fmt: skip
    h = run_prompt(client, g)
    assert h["status"]["status_str"] == "success", h["status"]
    g["6"]["inputs"]["model"] = ["1", 0]
    del g["5"]
    h2 = run_prompt(client, g)
    assert h2["status"]["status_str"] == "success", h2["status"]
    a = view_image(client, h["outputs"]["8"]["images"][0])
    b = view_image(client, h2["outputs"]["8"]["images"][0])
    assert np.array_equal(a, b) and a.std() > 0
