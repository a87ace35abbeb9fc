"""FLUX.1 Redux units of ``generate``: from ``--redux-image`` / ``--redux-model`` / ``--redux-siglip`` /
``--redux-strength``, or made again from a PNG's ``Redux N`` fields (``--from-png``).

A PNG cannot hold a unit's image: it names the file and the hash of its pixels
(:func:`sdengine.pipeline.redux.image_hash`). ``--from-png`` takes ``--redux-image`` where given (one per recorded
unit), else finds each image by its recorded name beside the PNG or in the working folder, with the same pixel
hash; the models from ``--redux-model`` (and ``--redux-siglip`` where the PNG names a SigLIP file), whose hash must
be the recorded one; the strength the recorded one unless ``--redux-strength`` gives another. Anything missing or
different: one line."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import GenerationError


def units_from_cli(a: argparse.Namespace) -> list[Any] | None:
    """The flags' units (None without ``--redux-image``): each image a unit of the same models and strength."""
    if not a.redux_image:
        return None
    if not a.redux_model:
        raise GenerationError(
            "--redux-image needs --redux-model (flux1-redux-dev.safetensors with --redux-siglip, or a "
            "FLUX.1-Redux-dev diffusers folder)"
        )
    from ..pipeline.redux import ReduxUnit

    strength = 1.0 if a.redux_strength is None else a.redux_strength
    return [ReduxUnit(a.redux_model, x, a.redux_siglip, strength) for x in a.redux_image]


def _find_image(name: str, digest: str | None, png: str) -> str:
    from ..pipeline.redux import image_hash

    places = [Path(png).parent / name, Path.cwd() / name] if Path(name).name == name else []
    for path in dict.fromkeys(places):
        if path.is_file() and (digest is None or image_hash(path) == digest):
            return str(path)
    raise GenerationError(
        f"{png} was made with the Redux image {name!r} [{digest}], which is not beside it or in the working folder "
        "with those pixels: give it with --redux-image (a PNG does not hold it)"
    )


def _check_hash(path: str, digest: str | None, what: str, recorded: str, png: str) -> None:
    from ..pipeline.redux import REDUX_WEIGHTS, weights_named

    if digest is None:
        return
    weights = REDUX_WEIGHTS if what == "--redux-model" else ("model.safetensors",)
    _, got = weights_named(path, weights)
    if got != digest:
        raise GenerationError(
            f"{png} was made with the Redux {'model' if what == '--redux-model' else 'SigLIP encoder'} {recorded!r} "
            f"[{digest}], but {what} {path} has hash [{got or 'unknown'}]: give the same file"
        )


def units_from_png(a: argparse.Namespace, parsed: dict[str, str]) -> list[Any] | None:
    """The Redux units a PNG records, made again (see the module docstring); a PNG without them: the flags'."""
    from ..metadata import recorded_redux
    from ..pipeline.redux import ReduxUnit

    recorded = recorded_redux(parsed)
    png = str(a.from_png)
    if not recorded:
        return units_from_cli(a)
    n = len(recorded)
    if any(r.image is None for r in recorded):
        raise GenerationError(f"{png} was made with Redux units given SigLIP tokens, which a PNG cannot name again")
    if a.redux_image and len(a.redux_image) != n:
        raise GenerationError(f"{png} records {n} Redux unit(s), --redux-image gives {len(a.redux_image)}")
    if not a.redux_model:
        models = ", ".join(dict.fromkeys(r.model for r in recorded))
        raise GenerationError(f"{png} was made with the Redux model {models}: give it with --redux-model")
    units = []
    for k, r in enumerate(recorded):
        assert r.image is not None
        image = a.redux_image[k] if a.redux_image else _find_image(r.image, r.image_hash, png)
        _check_hash(a.redux_model, r.model_hash, "--redux-model", r.model, png)
        if r.siglip is not None and not a.redux_siglip:
            raise GenerationError(f"{png} was made with the SigLIP encoder {r.siglip!r}: give it with --redux-siglip")
        if r.siglip is not None:
            _check_hash(a.redux_siglip, r.siglip_hash, "--redux-siglip", r.siglip, png)
        strength = r.strength if a.redux_strength is None else a.redux_strength
        units.append(ReduxUnit(a.redux_model, image, a.redux_siglip, strength))
    return units


__all__ = ["units_from_cli", "units_from_png"]
