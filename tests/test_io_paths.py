"""Names from outside resolve inside their folder or are refused (path traversal, symlinks, encodings)."""

import os

import pytest

from sdengine.errors import SdengineError
from sdengine.io.paths import UnsafePathError, is_inside, resolve_inside


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "loras"
    (root / "sub").mkdir(parents=True)
    (root / "a.safetensors").write_bytes(b"x")
    (root / "sub" / "b.safetensors").write_bytes(b"y")
    (tmp_path / "secret.safetensors").write_bytes(b"s")
    os.symlink(tmp_path / "secret.safetensors", root / "link.safetensors")
    return root


def test_names_inside_resolve(tree):
    assert resolve_inside(tree, "a", suffixes=("", ".safetensors")) == (tree / "a.safetensors").resolve()
    assert resolve_inside(tree, "sub/b.safetensors") == (tree / "sub" / "b.safetensors").resolve()


@pytest.mark.parametrize(
    "name",
    [
        "../secret.safetensors",
        "sub/../../secret.safetensors",
        "/etc/passwd",
        "%2e%2e/secret.safetensors",
        "%252e%252e%252fsecret.safetensors",
        "..\\secret.safetensors",
        "C:secret",
        "a\x00b",
        "",
    ],
)
def test_escapes_refused(tree, name):
    with pytest.raises(UnsafePathError) as e:
        resolve_inside(tree, name, "LoRA", suffixes=("", ".safetensors"))
    assert isinstance(e.value, SdengineError) and "\n" not in str(e.value)


def test_symlink_out_refused(tree):
    with pytest.raises(UnsafePathError, match="outside"):
        resolve_inside(tree, "link.safetensors")


def test_missing_names_the_folder_only(tree):
    with pytest.raises(FileNotFoundError, match="not found in") as e:
        resolve_inside(tree, "nope", suffixes=("", ".safetensors"))
    assert "secret" not in str(e.value)


def test_is_inside(tree, tmp_path):
    assert is_inside(tree, tree / "a.safetensors")
    assert not is_inside(tree, tmp_path / "secret.safetensors")
    assert not is_inside(tree, tree / "link.safetensors")
    assert not is_inside(tmp_path / "lo", tree)  # prefix of a name is not containment
