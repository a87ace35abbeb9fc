"""Image-prompt units on the wire (IP-Adapter's and Redux's): a list of unit objects as a JSON body sends it, or a
form field's JSON string, read into plain mappings with one-line 400s for another shape. What a unit's values mean
is each kind's own business (:mod:`sdengine.server.ip_adapters`, :mod:`sdengine.server.redux`)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from sdengine.server.errors import BadRequest


def unit_objects(raw: Any, what: str, keys: Sequence[str], most: int | None = None) -> list[Mapping[str, Any]]:
    """``raw`` (None, a list, or a JSON string of a list) -> its unit objects, each with only ``keys`` and a
    non-empty string ``model`` and ``image``; at most ``most`` of them. Anything else: one-line 400 naming
    ``what[k].field``."""
    if raw is None:
        return []
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raise BadRequest(
                f"{what} must be a JSON list of units ({{model, image, ...}}), got {raw[:100]!r}"
            ) from None
    if not isinstance(raw, list | tuple):
        raise BadRequest(f"{what} must be a list of units ({{{', '.join(keys)}}})")
    if most is not None and len(raw) > most:
        raise BadRequest(f"at most {most} {what} units per request, got {len(raw)}")
    for k, u in enumerate(raw):
        if not isinstance(u, Mapping):
            raise BadRequest(f"{what}[{k}] must be an object {{model, image, ...}}, got {type(u).__name__}")
        unknown = sorted(set(u) - set(keys))
        if unknown:
            raise BadRequest(f"{what}[{k}]: unknown field {unknown[0]!r}; a unit takes {', '.join(keys)}")
        for key in ("model", "image"):
            if not isinstance(u.get(key), str) or not u.get(key):
                raise BadRequest(f"{what}[{k}].{key} must be a non-empty string")
    return list(raw)


__all__ = ["unit_objects"]
