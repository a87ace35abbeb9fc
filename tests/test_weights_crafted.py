"""Crafted and broken weight files: every one is refused with a one-line error naming the file, and never
allocates what its header claims. The safetensors library is the oracle for what a valid file is."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import safetensors.torch as st
import torch

from sdengine.errors import SdengineError
from sdengine.weights import io


def _write(path, header: object, data: bytes = b"", *, raw_header: bytes | None = None):
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _refused(path, match: str) -> str:
    with pytest.raises(io.CorruptFileError, match=match) as e:
        io.load_file(path)
    msg = str(e.value)
    assert "\n" not in msg and path.name in msg
    return msg


F32x4 = {"dtype": "F32", "shape": [4]}

# (case name, header, data bytes, message pattern); each is a file the safetensors library refuses too.
CRAFTED = [
    ("overlap", {"a": {**F32x4, "data_offsets": [0, 16]}, "b": {**F32x4, "data_offsets": [8, 24]}}, 24, "overlap"),
    ("same-bytes", {"a": {**F32x4, "data_offsets": [0, 16]}, "b": {**F32x4, "data_offsets": [0, 16]}}, 16, "overlap"),
    ("hole", {"a": {**F32x4, "data_offsets": [0, 16]}, "b": {**F32x4, "data_offsets": [32, 48]}}, 48, "gap|hole"),
    ("tail", {"a": {**F32x4, "data_offsets": [0, 16]}}, 20, "after the last"),
    ("past-end", {"a": {**F32x4, "data_offsets": [16, 32]}}, 16, "truncated|past|ends"),
    ("negative-begin", {"a": {**F32x4, "data_offsets": [-16, 0]}}, 16, "offset"),
    ("negative-shape", {"a": {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}}, 16, "shape"),
    ("float-shape", {"a": {"dtype": "F32", "shape": [2.5, 2], "data_offsets": [0, 20]}}, 20, "shape"),
    ("string-shape", {"a": {"dtype": "F32", "shape": ["4"], "data_offsets": [0, 16]}}, 16, "shape"),
    ("bool-offset", {"a": {"dtype": "U8", "shape": [1], "data_offsets": [False, True]}}, 1, "offset"),
    ("huge-shape", {"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}, 16, "needs"),
    ("shape-bytes-mismatch", {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, 12, "needs 16"),
    ("unknown-dtype", {"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, 16, "dtype"),
    ("entry-not-object", {"a": [1, 2, 3]}, 0, "entry"),
    ("three-offsets", {"a": {**F32x4, "data_offsets": [0, 8, 16]}}, 16, "entry|offset"),
    ("metadata-list", {"__metadata__": ["a", "b"]}, 0, "__metadata__"),
    ("metadata-int-value", {"__metadata__": {"a": 1}}, 0, "__metadata__"),
    ("header-is-list", [1, 2], 0, "JSON object"),
]


@pytest.mark.parametrize("name,header,nbytes,match", CRAFTED, ids=[c[0] for c in CRAFTED])
def test_crafted_safetensors_refused_like_the_library(tmp_path, name, header, nbytes, match):
    p = _write(tmp_path / f"{name}.safetensors", header, b"\0" * nbytes)
    with pytest.raises(Exception):  # noqa: B017 - the oracle: the reference library refuses this file too
        st.load_file(p)
    _refused(p, match)


def test_duplicate_tensor_names_refused(tmp_path):
    raw = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}'
    p = _write(tmp_path / "dup.safetensors", None, b"\0\0", raw_header=raw)
    _refused(p, "duplicate")


@pytest.mark.parametrize("raw", [b"[" * 200_000, b'{"a":' * 100_000], ids=["list-bomb", "object-bomb"])
def test_deeply_nested_header_refused(tmp_path, raw):
    p = _write(tmp_path / "deep.safetensors", None, raw_header=raw)
    _refused(p, "corrupt")


@pytest.mark.parametrize(
    "raw,match",
    [(b"", "corrupt"), (b"\xff\xfe{}", "corrupt"), (b'{"a": NaN}', "corrupt|entry")],
    ids=["empty-header", "not-utf8", "nan"],
)
def test_bad_json_header_names_the_file(tmp_path, raw, match):
    p = _write(tmp_path / "badjson.safetensors", None, raw_header=raw)
    _refused(p, match)


@pytest.mark.parametrize("claimed", [2**63, 2**64 - 1, 100 * 1024 * 1024 + 1, 10**9])
def test_absurd_header_length_refused_without_reading(tmp_path, claimed):
    p = tmp_path / "absurd.safetensors"
    p.write_bytes(struct.pack("<Q", claimed) + b"{}")
    _refused(p, "header")


def test_unaligned_tensors_load_with_the_right_values(tmp_path):
    # A 3-byte tensor first puts the float32 one at an odd offset: valid (the library reads it), so read it.
    p = tmp_path / "odd.safetensors"
    sd = {"a": torch.tensor([1, 2, 3], dtype=torch.uint8), "b": torch.tensor([1.5, -2.0])}
    header = {
        "a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]},
    }
    _write(p, header, sd["a"].numpy().tobytes() + sd["b"].numpy().tobytes())
    ref = st.load_file(p)
    got = io.load_safetensors(p)
    for k in sd:
        assert torch.equal(got[k], ref[k]) and torch.equal(got[k], sd[k])


def test_header_padding_and_empty_tensors_still_load(tmp_path):
    p = tmp_path / "pad.safetensors"
    header = {
        "e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]},
        "a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]},
    }
    raw = json.dumps(header).encode() + b"    "
    _write(p, None, torch.tensor([1.0, 2.0]).half().numpy().tobytes(), raw_header=raw)
    assert st.load_file(p)["a"].tolist() == [1.0, 2.0]
    got = io.load_safetensors(p)
    assert got["a"].tolist() == [1.0, 2.0] and got["e"].shape == (0, 3)


# ------------------------------------------------------------------------------------------- pickles


@pytest.mark.parametrize(
    "data",
    [b"", b"\x80", b"garbage", b"PK\x03\x04" + b"\0" * 30, pickle.dumps([1, 2])[:3]],
    ids=["zero-bytes", "one-byte", "garbage", "broken-zip", "truncated-pickle"],
)
@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_broken_pickle_files_give_one_named_line(tmp_path, data, suffix):
    p = tmp_path / f"broken{suffix}"
    p.write_bytes(data)
    with pytest.raises(io.WeightsError) as e:
        io.load_file(p)
    msg = str(e.value)
    assert "\n" not in msg and p.name in msg and "weights_only" not in msg


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_refusing_a_raw_pickle_never_suggests_weights_only_false(tmp_path, protocol):
    for i, write in enumerate(
        (
            lambda p: torch.save({"x": _Payload()}, p),
            lambda p: p.write_bytes(pickle.dumps({"x": _Payload()}, protocol=protocol)),
        )
    ):
        p = tmp_path / f"raw{i}.pt"
        write(p)
        with pytest.raises(io.UnsafeCheckpointError) as e:
            io.load_file(p)
        msg = str(e.value)
        assert "weights_only" not in msg and "False" not in msg and "\n" not in msg, msg
        assert p.name in msg and "refusing" in msg


def test_refusal_names_the_global(tmp_path):
    p = tmp_path / "g.pt"
    torch.save({"x": _Payload()}, p)
    with pytest.raises(io.UnsafeCheckpointError, match="'print'"):
        io.load_file(p)


def test_weights_errors_are_sdengine_errors():
    assert issubclass(io.CorruptFileError, SdengineError) and issubclass(io.UnsafeCheckpointError, io.WeightsError)


def test_numpy_scalars_dtypes_and_arrays_in_a_ckpt_load(tmp_path):
    # Training scripts store global_step / metrics as numpy values next to the weights (A1111's safe unpickler
    # accepts numpy scalars, dtypes and arrays); they rebuild values only, so they load.
    import numpy as np

    p = tmp_path / "np.ckpt"
    sd = {"w": torch.arange(4.0)}
    extra = {"global_step": np.int64(875000), "loss": np.float64(0.5), "dt": np.dtype("float16"), "hist": np.arange(3)}
    torch.save({"state_dict": sd, **extra}, p)
    tensors, info = io.load_file(p)
    assert torch.equal(tensors["w"], sd["w"])
    assert info["global_step"] == 875000 and type(info["global_step"]) is int and info["loss"] == 0.5
    # numpy 1.x wrote the same globals as numpy.core.multiarray.* (a legacy-format file keeps them as plain text)
    old = tmp_path / "np1.ckpt"
    torch.save({"state_dict": sd, **extra}, old, _use_new_zipfile_serialization=False)
    raw = old.read_bytes()
    assert raw.count(b"numpy._core.multiarray") >= 2
    old.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert io.load_file(old)[1]["global_step"] == 875000


def test_numpy_in_the_allow_list_does_not_open_code_execution(tmp_path, capsys):
    import numpy as np

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    class EvilArray:  # an object array smuggling a call
        def __reduce__(self):
            return (np.array, ([Evil()],))

    for i, obj in enumerate((Evil(), EvilArray(), np.array([1, "x"], dtype=object), np.float64(2.0))):
        p = tmp_path / f"evil{i}.pt"
        torch.save({"w": torch.zeros(1), "scalar": np.float64(1.0), "x": obj}, p)
        if i == 3:  # the control: the same file with a harmless numpy value loads
            assert io.load_file(p)[1]["x"] == 2.0
            continue
        with pytest.raises(io.UnsafeCheckpointError, match=("'print'", "'numpy.*array'", "ObjectDType")[i]):
            io.load_file(p)
    assert "must never run" not in capsys.readouterr().out


@pytest.mark.parametrize("zip_format", [False, True], ids=["legacy", "zip"])
def test_a_protocol_4_checkpoint_is_named_as_such(tmp_path, zip_format):
    p = tmp_path / "p4.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, p, pickle_protocol=4, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(io.UnsafeCheckpointError, match=r"pickle protocol 4 .*re-save it") as e:
        io.load_file(p)
    assert "opcode" not in str(e.value) and "\n" not in str(e.value)
