"""Property tests of the textual-inversion embedding reader: A1111's ``.pt`` (``string_to_param``, a dict or the
original code's ``nn.ParameterDict``), A1111/kohya ``.safetensors`` (``emb_params``) and diffusers' learned_embeds
(``.bin``/``.safetensors``). Random structures (tensors of any shape, dtype and value, odd containers, extra keys,
any names), mutated bytes (flipped, replaced, truncated) and crafted headers that claim absurd sizes are read
through :func:`read_embedding` and through a tiny SD 1.x pipeline's ``embeddings_dir``. Whatever the file: a usable
``(n, width)`` embedding, or one line of :class:`EmbeddingError` / :class:`WeightsError`; never another exception,
a hang, an allocation the file cannot back, or a pipeline changed by a refused file.

Bounded in `make test` (SDENGINE_FUZZ_EXAMPLES, 100 by default); `make fuzz` runs more.
"""

from __future__ import annotations

import collections
import io as pyio
import json
import math
import os
import resource
import struct
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

import sdengine
from sdengine.errors import SdengineError
from sdengine.text.embeddings import MAX_VECTORS, EmbeddingError, list_embedding_files, read_embedding
from sdengine.weights import save_safetensors
from sdengine.weights.io import WeightsError, load_file

EXAMPLES = int(os.environ.get("SDENGINE_FUZZ_EXAMPLES", "100"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
SECONDS = 5.0  # per input, on a loaded 2-core machine
WIDTH = 32  # the tiny models' text width
GROWTH_MB = 512  # the most the process' peak memory may grow over one whole fuzz test


def _event(text: str) -> None:
    try:
        event(text)  # counted by --hypothesis-show-statistics (make fuzz)
    except InvalidArgument:
        pass  # called outside a hypothesis test (the parametrized cases)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _usable_or_named_error(fn):
    """fn()'s result, or the named error it raised (one line); anything else fails the test."""
    t0 = time.perf_counter()
    try:
        out = fn()
    except SdengineError as e:
        assert isinstance(e, EmbeddingError | WeightsError), f"{type(e).__name__}: {e}"
        assert "\n" not in str(e).strip(), str(e)
        out = e
    assert time.perf_counter() - t0 < SECONDS
    _event(f"outcome: {type(out).__name__}")
    return out


def _check_vectors(vec: torch.Tensor) -> None:
    assert vec.dtype == torch.float32 and vec.ndim == 2
    assert 1 <= vec.shape[0] <= MAX_VECTORS and vec.shape[1] == WIDTH
    assert bool(torch.isfinite(vec).all())


# ------------------------------------------------------------------------------------------ random structures

KINDS = ["a1111_pt", "ldm_pt", "a1111_safetensors", "diffusers_safetensors", "diffusers_bin"]
SUFFIX = {"a1111_pt": ".pt", "ldm_pt": ".pt", "a1111_safetensors": ".safetensors"}
SUFFIX |= {"diffusers_safetensors": ".safetensors", "diffusers_bin": ".bin"}
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8, torch.bool]
_dim = st.one_of(st.integers(0, 3), st.sampled_from([WIDTH, 16, MAX_VECTORS, MAX_VECTORS + 1]))
_shape = st.one_of(
    st.tuples(st.integers(1, 4), st.just(WIDTH)),  # the usable shapes, often
    st.tuples(st.just(WIDTH)),
    st.tuples(st.integers(1, 3), st.just(1024)),  # SD 2.x width
    # small enough (at most 77^3 numbers) that the peak-memory check measures the reader, not the test
    st.lists(_dim, max_size=3).map(tuple),
)
_fill = st.one_of(st.none(), st.sampled_from([0.0, 1e30, -1e30, math.inf, -math.inf, math.nan, 1e4, 1.5e4, 1e-40]))


@st.composite
def tensors(draw) -> torch.Tensor:
    shape = draw(_shape)
    dtype = draw(st.sampled_from(_DTYPES))
    fill = draw(_fill)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    t = torch.randn(shape, generator=g) * 0.5
    if fill is not None and t.numel():
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = fill
    return t.to(dtype) if dtype.is_floating_point else t.abs().to(dtype)


_name = st.one_of(
    st.sampled_from(["*", "emb_params", "<cat-toy>", "", "string_to_param", "clip_l"]), st.text(max_size=6)
)
_junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.lists(st.integers(), max_size=3),
    st.tuples(st.integers(), st.text(max_size=2)),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
# Containers a weights-only unpickler can build, as the odd files of the field hold them.
_param_container = st.one_of(
    st.dictionaries(_name, tensors(), max_size=3),
    st.dictionaries(_name, st.one_of(tensors(), _junk), max_size=3),
    st.dictionaries(st.one_of(st.integers(), st.tuples(st.integers())), tensors(), max_size=2),
    st.dictionaries(st.one_of(st.sampled_from(["0", "1"]), st.integers(0, 1)), tensors(), max_size=3),  # 0 and "0"
    st.lists(tensors(), max_size=2),
    st.lists(tensors(), max_size=2).map(tuple),
    st.dictionaries(_name, tensors(), max_size=2).map(collections.OrderedDict),
    tensors(),
    _junk,
)


@st.composite
def embedding_files(draw) -> tuple[str, object]:
    """(suffix, content): a file of one of the formats with random contents; content is a dict of tensors for
    .safetensors, any picklable object for .pt/.bin."""
    kind = draw(st.sampled_from(KINDS))
    extra = draw(
        st.dictionaries(st.sampled_from(["name", "step", "string_to_token", "x", "emb_params"]), _junk, max_size=3)
    )
    if kind == "a1111_pt":
        obj: object = {"string_to_param": draw(_param_container), **extra}
        if draw(st.booleans()):
            obj = draw(st.one_of(_junk, st.lists(st.just(obj), max_size=1)))  # not even a mapping at the top
    elif kind == "ldm_pt":
        params = draw(
            st.dictionaries(st.text(min_size=1, max_size=4).filter(lambda s: "." not in s), tensors(), max_size=2)
        )
        pd = torch.nn.ParameterDict(
            {k: torch.nn.Parameter(v, requires_grad=v.is_floating_point()) for k, v in params.items()}
        )
        obj = {"string_to_token": {"*": 265}, "string_to_param": pd, **extra}
    elif kind == "a1111_safetensors":
        obj = {"emb_params": draw(tensors())}
        obj |= {k: draw(tensors()) for k in draw(st.lists(st.sampled_from(["x", "emb", "clip_g"]), max_size=2))}
    elif kind == "diffusers_safetensors":
        obj = draw(st.dictionaries(_name, tensors(), min_size=0, max_size=3))
    else:
        obj = draw(st.one_of(st.dictionaries(_name, tensors(), max_size=3), st.dictionaries(_name, _junk, max_size=2)))
    return SUFFIX[kind], obj


def _write(path: Path, obj: object) -> None:
    if path.suffix == ".safetensors":
        assert isinstance(obj, dict)
        save_safetensors({str(k): v.contiguous() for k, v in obj.items()}, path)
    else:
        torch.save(obj, path)


def _the_one_tensor(obj: object) -> torch.Tensor | None:
    """The tensor an accepted file must have given: the only tensor in the file's one place for it."""
    if not isinstance(obj, dict):
        return None
    place = obj.get("string_to_param", obj) if "string_to_param" in obj else obj
    place = getattr(place, "_parameters", place)
    if not isinstance(place, dict):
        return None
    found = [v for v in place.values() if isinstance(v, torch.Tensor)]
    return found[0] if len(found) == 1 else None


@pytest.fixture
def peak():
    before = _peak_mb()
    yield
    assert _peak_mb() - before < GROWTH_MB, f"peak memory grew by {_peak_mb() - before:.0f} MB"


@FUZZ
@given(embedding_files())
def test_random_embedding_files_give_vectors_or_a_named_error(tmp_path, peak, file):
    suffix, obj = file
    path = tmp_path / f"fuzz{suffix}"
    _write(path, obj)
    out = _usable_or_named_error(lambda: read_embedding(path, width=WIDTH))
    if isinstance(out, torch.Tensor):
        _check_vectors(out)
        want = _the_one_tensor(obj)
        assert want is not None, "accepted a file without exactly one embedding tensor"
        want = want.detach().float().reshape(out.shape)
        assert torch.equal(out, want)  # the file's own numbers, not something else
    path.unlink()


# ------------------------------------------------------------------------------------------ mutated bytes


def _valid_bytes(kind: str, n: int, seed: int) -> bytes:
    vec = torch.randn(n, WIDTH, generator=torch.Generator().manual_seed(seed)) * 0.5
    buf = pyio.BytesIO()
    if kind == "a1111_pt":
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "x", "step": 3}, buf)
    elif kind == "ldm_pt":
        torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vec)})}, buf)
    elif kind == "legacy_pt":
        torch.save({"string_to_param": {"*": vec}}, buf, _use_new_zipfile_serialization=False)
    elif kind == "a1111_safetensors":
        import safetensors.torch as st_lib

        return st_lib.save({"emb_params": vec})
    elif kind == "diffusers_safetensors":
        import safetensors.torch as st_lib

        return st_lib.save({"<x>": vec[0]})
    else:
        torch.save({"<x>": vec[0]}, buf)
    return buf.getvalue()


MUTABLE = {
    "a1111_pt": ".pt",
    "ldm_pt": ".pt",
    "legacy_pt": ".pt",
    "a1111_safetensors": ".safetensors",
    "diffusers_safetensors": ".safetensors",
    "diffusers_bin": ".bin",
}
VALID = {kind: _valid_bytes(kind, 2, 0) for kind in MUTABLE}


@st.composite
def mutated_files(draw) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(sorted(MUTABLE)))
    blob = bytearray(VALID[kind])
    for _ in range(draw(st.integers(0, 6))):
        at = draw(st.integers(0, len(blob) - 1))
        how = draw(st.sampled_from(["flip", "replace", "insert", "delete"]))
        if how == "flip":
            blob[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "replace":
            blob[at : at + 1] = draw(st.binary(min_size=1, max_size=4))
        elif how == "insert":
            blob[at:at] = draw(st.binary(min_size=1, max_size=4))
        else:
            del blob[at : at + draw(st.integers(1, 8))]
    cut = draw(st.one_of(st.none(), st.integers(0, len(blob))))
    # a foreign suffix too: a .safetensors named .pt and the other way round
    suffix = draw(st.one_of(st.just(MUTABLE[kind]), st.sampled_from([".pt", ".bin", ".safetensors"])))
    return suffix, bytes(blob[:cut] if cut is not None else blob)


@FUZZ
@given(st.one_of(mutated_files(), st.tuples(st.sampled_from([".pt", ".bin", ".safetensors"]), st.binary(max_size=300))))
@example((".pt", b""))
@example((".safetensors", b"\xff" * 8))
@example((".pt", VALID["legacy_pt"][:40]))
def test_mutated_embedding_files_give_vectors_or_a_named_error(tmp_path, peak, file):
    suffix, blob = file
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(blob)
    out = _usable_or_named_error(lambda: read_embedding(path, width=WIDTH))
    if isinstance(out, torch.Tensor):
        _check_vectors(out)
    path.unlink()


# ------------------------------------------------------------------------------------------ claimed sizes


def _safetensors_claiming(shape: list[int], dtype: str = "F32", data: bytes = b"\0" * 64) -> bytes:
    header = json.dumps({"emb_params": {"dtype": dtype, "shape": shape, "data_offsets": [0, len(data)]}}).encode()
    return struct.pack("<Q", len(header)) + header + data


def _legacy_pt_claiming(numel: int) -> bytes:
    """A legacy (pre-zip) torch file whose one storage claims ``numel`` elements after its real 64."""
    blob = bytearray(VALID["legacy_pt"])
    real = struct.pack("<q", 2 * WIDTH)  # the storage's element count, written before its bytes
    at = blob.rfind(real)
    assert at > 0
    blob[at : at + 8] = struct.pack("<q", numel)
    return bytes(blob)


@pytest.mark.parametrize(
    "suffix, blob",
    [
        (".safetensors", _safetensors_claiming([MAX_VECTORS, 2**40])),
        (".safetensors", _safetensors_claiming([2**62, 2**62])),
        (".safetensors", _safetensors_claiming([2, WIDTH], data=b"\0" * 16)),
        (".safetensors", struct.pack("<Q", 2**60) + b"{}"),
        (".pt", _legacy_pt_claiming(2**40)),
        (".pt", _legacy_pt_claiming(2**31)),
        (".pt", _legacy_pt_claiming(-1)),
    ],
    ids=["st-wide", "st-overflow", "st-short-data", "st-header-length", "legacy-4tb", "legacy-8gb", "legacy-negative"],
)
def test_claimed_sizes_never_allocate(tmp_path, suffix, blob):
    path = tmp_path / f"claim{suffix}"
    path.write_bytes(blob)
    before = _peak_mb()
    out = _usable_or_named_error(lambda: read_embedding(path, width=WIDTH))
    assert isinstance(out, SdengineError)
    assert _peak_mb() - before < 256, f"peak memory grew by {_peak_mb() - before:.0f} MB"


# ------------------------------------------------------------------------------------------ through the pipeline


@pytest.fixture(scope="module")
def sd1_emb(tiny_sd1_folder, tmp_path_factory):
    pytest.importorskip("diffusers")  # the tiny folder is written with diffusers' classes
    emb_dir = tmp_path_factory.mktemp("fuzz-emb")
    pipe = sdengine.load_pipeline(tiny_sd1_folder, device="cpu", embeddings_dir=emb_dir)
    plain = pipe.encode_prompt("a red apple", "blurry")
    return emb_dir, pipe, plain, [0]


@FUZZ
@given(st.one_of(embedding_files(), mutated_files()))
def test_fuzzed_files_in_an_embeddings_folder(sd1_emb, peak, file):
    emb_dir, pipe, plain, counter = sd1_emb
    suffix, content = file
    for old in emb_dir.iterdir():
        old.unlink()
    path = emb_dir / f"fuzzword{suffix}"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        _write(path, content)
    counter[0] += 1
    # unique mtimes: the folder's tells the library to list it again, the file's to read it again
    os.utime(path, ns=(counter[0], counter[0]))
    os.utime(emb_dir, ns=(counter[0], counter[0]))
    out = _usable_or_named_error(lambda: pipe.encode_prompt("a fuzzword, b", "fuzzword"))
    if not isinstance(out, SdengineError):
        cond, uncond = out
        assert cond.shape == uncond.shape and bool(torch.isfinite(cond).all())
    # a refused (or used) file leaves every prompt that does not name it as it was
    again = pipe.encode_prompt("a red apple", "blurry")
    assert all(torch.equal(a, b) for a, b in zip(again, plain, strict=True))


# ------------------------------------------------------------------------------------------ found by the fuzz tests


@pytest.mark.parametrize(
    "params, message",
    [
        # a key with a newline made the refusal two lines long (test_random_embedding_files_...)
        ({"\n": torch.zeros(1, WIDTH), "": torch.zeros(1, WIDTH)}, r"holds 2 'string_to_param' entries \('', '\\n'\)"),
        # the keys 0 and "0" were one name once turned to text: one of two tensors was taken silently
        ({0: torch.zeros(1, WIDTH), "0": torch.ones(1, WIDTH)}, "holds 2 'string_to_param' entries"),
    ],
    ids=["newline-key", "int-and-str-key"],
)
def test_refusals_found_by_fuzzing(tmp_path, params, message):
    path = tmp_path / "found.pt"
    torch.save({"string_to_param": params}, path)
    with pytest.raises(EmbeddingError, match=message) as e:
        read_embedding(path, width=WIDTH)
    assert "\n" not in str(e.value)


def test_zip64_record_claiming_several_disks(tmp_path):
    # Found by test_mutated_embedding_files_...: zipfile.is_zipfile raised BadZipFile ("zipfiles that span multiple
    # disks are not supported") before torch's reader was reached, for embeddings and .ckpt files alike.
    blob = bytearray(VALID["a1111_pt"])
    at = blob.rfind(b"PK\x06\x07")  # the zip64 end-of-central-directory locator torch writes
    assert at > 0
    blob[at + 16 : at + 20] = struct.pack("<I", 3)  # "total number of disks"
    for name in ("disks.pt", "disks.ckpt"):
        path = tmp_path / name
        path.write_bytes(bytes(blob))
        with pytest.raises(WeightsError, match=name.replace(".", r"\.")) as e:
            read_embedding(path, width=WIDTH) if name.endswith(".pt") else load_file(path)
        assert "\n" not in str(e.value)


def test_embeddings_folder_with_links_back_to_itself_is_listed_once(tmp_path):
    # Two links to the folder itself made list_embedding_files walk an exponential tree (a hang); each real
    # folder is now listed once, and a linked folder elsewhere is still followed.
    emb = tmp_path / "emb"
    (emb / "sub").mkdir(parents=True)
    other = tmp_path / "other"
    other.mkdir()
    save_safetensors({"emb_params": torch.zeros(1, WIDTH)}, emb / "sub" / "cat.safetensors")
    save_safetensors({"emb_params": torch.zeros(1, WIDTH)}, other / "dog.safetensors")
    for name in ("a", "b", "c"):
        (emb / name).symlink_to(emb, target_is_directory=True)
    (emb / "sub" / "up").symlink_to(emb, target_is_directory=True)
    (emb / "linked").symlink_to(other, target_is_directory=True)
    t0 = time.perf_counter()
    files = list_embedding_files(emb)
    assert time.perf_counter() - t0 < SECONDS
    assert sorted(files) == ["cat", "dog"] and all(len(paths) == 1 for paths in files.values())
