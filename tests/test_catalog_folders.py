"""`sdengine list` over the folders users keep: what it lists is what the loaders take by name."""

from __future__ import annotations

import os

from sdengine.catalog import folder_entries, list_entries


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_a_models_vae_beside_it_is_not_listed_as_a_model(tmp_path):
    # A1111 pairs NAME.vae.safetensors with NAME.safetensors (docs/model-files.md) and leaves .vae.* files out
    # of its checkpoint list; they are VAEs, not models
    for name in ("my model.safetensors", "my model.vae.safetensors", "other.vae.ckpt", "other.ckpt", "ünï.safetensors"):
        _touch(tmp_path / name)
    names = sorted(e.name for e in folder_entries("models", tmp_path))
    assert names == ["my model", "other", "ünï"]


def test_loras_in_sub_folders_are_listed_by_the_name_the_lora_tag_takes(tmp_path):
    from sdengine.weights.lora_file import resolve_lora

    _touch(tmp_path / "style" / "ink.safetensors")
    _touch(tmp_path / "top.pt")
    _touch(tmp_path / "dreambooth" / "pytorch_lora_weights.bin")  # diffusers' pickle LoRA file
    entries = folder_entries("loras", tmp_path)
    assert [e.name for e in entries] == ["dreambooth/pytorch_lora_weights", "style/ink", "top"]
    for e in entries:  # each listed name selects the listed file
        assert resolve_lora(e.name, tmp_path).resolve() == (tmp_path / e.path).resolve()


def test_embeddings_in_sub_folders_are_listed_as_the_library_reads_them(tmp_path):
    from sdengine.text.embeddings import list_embedding_files

    _touch(tmp_path / "negative" / "easynegative.safetensors")
    _touch(tmp_path / "pekora.pt")
    _touch(tmp_path / "empty.pt", b"")  # skipped by A1111 and the library
    os.symlink(tmp_path / "negative", tmp_path / "loop")  # a linked folder is followed once
    entries = list_entries("embeddings", tmp_path)
    assert [e.name for e in entries] == ["easynegative", "pekora"]
    assert sorted(list_embedding_files(tmp_path)) == ["easynegative", "pekora"]


def test_the_servers_model_list_leaves_out_a_models_vae(tmp_path):
    from sdengine.server.catalog import Catalog

    for name in ("anime.safetensors", "anime.vae.safetensors"):
        _touch(tmp_path / name)
    catalog = Catalog(tmp_path, None, None)
    assert [e.name for e in catalog.models() if not e.builtin] == ["anime.safetensors"]


def test_a_lora_deeper_in_the_folder_is_found_with_its_suffix_too(tmp_path):
    # resolve_lora takes a name "with or without suffix, at any depth": `<lora:my lora ü.safetensors:1>` names the
    # file in a sub-folder as `<lora:my lora ü:1>` does
    from sdengine.io.paths import ExternalName
    from sdengine.weights.lora_file import resolve_lora

    f = _touch(tmp_path / "sub dir" / "my lora ü.safetensors")
    for name in ("my lora ü", "MY LORA Ü", "my lora ü.safetensors", "sub dir/my lora ü.safetensors"):
        assert resolve_lora(ExternalName(name), tmp_path).resolve() == f.resolve(), name


def test_the_servers_model_list_offers_only_what_it_can_select(tmp_path):
    # a symlink out of --models-dir is refused when a request names it, so it is not listed either
    from sdengine.server.catalog import Catalog

    outside = _touch(tmp_path / "elsewhere" / "secret.safetensors")
    models = tmp_path / "models"
    _touch(models / "in.safetensors")
    os.symlink(outside, models / "out.safetensors")
    os.symlink(models / "in.safetensors", models / "alias.safetensors")
    catalog = Catalog(models, None, None)
    listed = [e.name for e in catalog.models() if not e.builtin]
    assert listed == ["alias.safetensors", "in.safetensors"]
    for name in listed:
        assert catalog.resolve_model(name) == str((models / "in.safetensors").resolve())


def test_files_that_share_a_name_are_listed_by_their_file_names_and_the_bare_name_is_refused(tmp_path):
    # `dup.safetensors` and `dup.ckpt` both listed as `dup` (and `dup` selected one of them silently); each is now
    # listed by the name that selects exactly it, and the bare name is a one-line error naming both
    import pytest

    from sdengine.io.paths import ExternalName
    from sdengine.server.catalog import Catalog
    from sdengine.server.errors import BadRequest
    from sdengine.weights.lora_file import LoRAFileError, resolve_lora

    models, loras = tmp_path / "models", tmp_path / "loras"
    for name in ("dup.safetensors", "dup.ckpt", "solo.safetensors", "pair.safetensors"):
        _touch(models / name)
    (models / "pair").mkdir()  # a diffusers folder and a file of the same stem
    _touch(models / "pair" / "model_index.json", b"{}")
    for name in ("style/ink.safetensors", "style/ink.pt", "one.safetensors"):
        _touch(loras / name)
    listed = {e.name: e.path for e in folder_entries("models", models)}
    assert listed == {
        "dup.ckpt": str(models / "dup.ckpt"),
        "dup.safetensors": str(models / "dup.safetensors"),
        "pair": str(models / "pair"),
        "pair.safetensors": str(models / "pair.safetensors"),
        "solo": str(models / "solo.safetensors"),
    }
    assert sorted(e.name for e in folder_entries("loras", loras)) == ["one", "style/ink.pt", "style/ink.safetensors"]

    catalog = Catalog(models, loras, None)
    want = r"model 'dup' is ambiguous: --models-dir holds dup.safetensors, dup.ckpt; name the file"
    with pytest.raises(BadRequest, match=want):
        catalog.resolve_model("dup")
    assert catalog.resolve_model("dup.safetensors") == str((models / "dup.safetensors").resolve())
    assert catalog.resolve_model("pair") == str((models / "pair").resolve())  # an exact name is never ambiguous
    assert catalog.resolve_model("solo") == str((models / "solo.safetensors").resolve())
    with pytest.raises(BadRequest, match="ambiguous"):
        Catalog(models, None, None, startup_model="dup")  # serve --model dup --models-dir models
    with pytest.raises(LoRAFileError, match=r"LoRA 'style/ink' is ambiguous: .* holds style/ink"):
        resolve_lora(ExternalName("style/ink"), loras)
    for name in ("style/ink.pt", "style/ink.safetensors"):  # each listed name selects its file
        assert resolve_lora(ExternalName(name), loras).resolve() == (loras / name).resolve()
    assert resolve_lora(ExternalName("one"), loras).resolve() == (loras / "one.safetensors").resolve()


def test_a_lora_name_at_several_depths_is_refused_not_picked(tmp_path):
    # a/x and b/x both answer to the bare name "x": picking the first silently would apply the wrong LoRA.
    import pytest

    from sdengine.io.paths import ExternalName
    from sdengine.weights.lora_file import LoRAFileError, resolve_lora

    loras = tmp_path / "loras"
    for name in ("a/x.safetensors", "b/x.safetensors", "c/deep/y.safetensors"):
        _touch(loras / name)
    for name in ("x", "x.safetensors", "X"):
        with pytest.raises(
            LoRAFileError,
            match=r"LoRA '(x|X)(\.safetensors)?' is ambiguous: .* holds a/x\.safetensors, b/x\.safetensors",
        ):
            resolve_lora(ExternalName(name), loras)
    assert sorted(e.name for e in folder_entries("loras", loras)) == ["a/x", "b/x", "c/deep/y"]  # the names to use
    for name in ("a/x", "b/x", "b/x.safetensors"):
        assert resolve_lora(ExternalName(name), loras).resolve() == (loras / name).with_suffix(".safetensors").resolve()
    assert resolve_lora(ExternalName("y"), loras).resolve() == (loras / "c/deep/y.safetensors").resolve()  # one: fine
