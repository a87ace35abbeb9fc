"""The model-hash cache: one hash per file version, written atomically with the umask's mode."""

from __future__ import annotations

import json
import os
import stat

from sdengine.pipeline.infotext import cached_hash, hash_cache_file


def test_hash_is_computed_once_per_file_version(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"abc")
    calls: list[str] = []

    def compute(f):
        calls.append(f.name)
        return f"h{len(calls)}"

    old = os.umask(0o022)
    try:
        assert cached_hash(model, compute) == "h1"
    finally:
        os.umask(old)
    assert cached_hash(model, compute) == "h1" and calls == ["model.safetensors"]
    cache = hash_cache_file()
    assert list(json.loads(cache.read_text()).values()) == ["h1"]
    assert [p.name for p in cache.parent.iterdir()] == ["model_hashes.json"]
    assert stat.S_IMODE(cache.stat().st_mode) == 0o644
    model.write_bytes(b"abcd")  # a new size: a new version of the file, hashed again
    assert cached_hash(model, compute) == "h2" and len(json.loads(cache.read_text())) == 2
