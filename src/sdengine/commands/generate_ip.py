"""``sdengine generate``'s IP-Adapter flags (docs/ip-adapter.md, Command line): ``--ip-adapter FILE`` with its
``--ip-image IMAGE[+IMAGE...]`` (paired in order, as ``--controlnet`` with ``--control``), ``--ip-scale``,
``--clip-vision``, ``--ip-negative-rule`` (one for all, or one per ``--ip-adapter``), and ``--from-png``'s
``IP-Adapter N`` fields: the files looked up in ``--ip-adapters-dir`` / ``--clip-vision-dir`` (or named again), the
pictures given again (a PNG does not hold them)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import GenerationError, UsageError
from ..names import did_you_mean, unknown_name

if TYPE_CHECKING:
    from ..pipeline.ip_adapter import IPAdapterUnit

# what the IP-Adapter flags are called (for the "has no effect without --ip-adapter" line)
_FOLLOWERS = (("--ip-scale", "ip_scale"), ("--clip-vision", "clip_vision"), ("--ip-negative-rule", "ip_negative_rule"))


def register(p: argparse.ArgumentParser) -> None:
    """The IP-Adapter flags of ``sdengine generate``."""
    p.add_argument(
        "--ip-adapter",
        action="append",
        default=None,
        metavar="FILE",
        help="an IP-Adapter file (.safetensors / .bin of h94/IP-Adapter: plain, Plus, full face; XLabs' "
        "flux-ip-adapter on FLUX.1; repeatable; pairs with --ip-image in order)",
    )
    p.add_argument(
        "--ip-image",
        action="append",
        default=None,
        metavar="IMAGE[+IMAGE...]",
        help="the picture(s) of an --ip-adapter, one flag per --ip-adapter in order; several pictures joined by + "
        "are taken together (their tokens side by side)",
    )
    p.add_argument(
        "--ip-scale",
        action="append",
        type=float,
        default=None,
        metavar="S",
        help="an --ip-adapter's weight (default 1; 0: no effect); one for all, or one per --ip-adapter in order",
    )
    p.add_argument(
        "--clip-vision",
        action="append",
        default=None,
        metavar="FILE_OR_FOLDER",
        help="the CLIP vision encoder the --ip-image pictures go through (ComfyUI's clip_vision_h.safetensors, a "
        "diffusers image_encoder folder); one for all, or one per --ip-adapter in order",
    )
    p.add_argument(
        "--ip-negative-rule",
        action="append",
        default=None,
        metavar="RULE",
        help="what the negative-prompt rows see: diffusers (default; zeros for a plain adapter, an all-zero pixel "
        "tensor's hidden states for Plus / full face) or comfyui (ComfyUI_IPAdapter_plus: a black picture's); one "
        "for all, or one per --ip-adapter",
    )
    p.add_argument(
        "--ip-adapters-dir",
        default=None,
        metavar="FOLDER",
        help="where --from-png looks up the IP-Adapter files a PNG names (else give --ip-adapter FILE)",
    )
    p.add_argument(
        "--clip-vision-dir",
        default=None,
        metavar="FOLDER",
        help="where --from-png looks up the CLIP vision encoder a PNG names (else give --clip-vision)",
    )


def _missing(flag: str, text: str, what: str = "no such file") -> UsageError:
    """``--flag PATH: no such file; did you mean 'NAME'?`` (the names beside it in its folder)."""
    path = Path(text)
    try:
        beside = [q.name for q in path.parent.iterdir()] if path.parent.is_dir() else []
    except OSError:
        beside = []
    return UsageError(f"{flag} {text}: {what}{did_you_mean(path.name, beside)}")


def _existing(flag: str, text: str, *, folder: bool = False) -> str:
    path = Path(text)
    if path.is_file() or (folder and path.is_dir()):
        return text
    if path.is_dir():
        raise UsageError(f"{flag} {text} is a folder: give the file")
    raise _missing(flag, text)


def split_images(text: str) -> list[str]:
    """``--ip-image``'s value: one picture, or several joined by ``+`` (a file whose own name has a ``+`` is that
    one picture); each must be a file."""
    if Path(text).is_file():
        return [text]
    parts = text.split("+")
    if any(not part for part in parts):
        raise UsageError(f"--ip-image {text!r}: an empty picture name (give IMAGE or IMAGE+IMAGE+...)")
    return [_existing("--ip-image", part) for part in parts]


def negative_rule(text: str, what: str = "--ip-negative-rule") -> str:
    from ..pipeline.ip_adapter import NEGATIVE_RULES

    rule = text.strip().lower()
    if rule not in NEGATIVE_RULES:
        raise unknown_name(
            "IP-Adapter negative rule", text, NEGATIVE_RULES, hint=f"{what} takes {' or '.join(NEGATIVE_RULES)}"
        )
    return rule


def _per_unit(flag: str, values: list[Any], n: int) -> list[Any]:
    """A flag's values for ``n`` units: one for all, or one each."""
    if len(values) not in (1, n):
        raise UsageError(f"{len(values)} {flag} for {n} --ip-adapter: give one for all, or one per --ip-adapter")
    return values * n if len(values) == 1 else list(values)


def check_flags(a: argparse.Namespace, recorded: int = 0) -> None:
    """The flags' counts and values, before any file is read: ``recorded`` units of a ``--from-png`` stand in for
    ``--ip-adapter`` flags."""
    adapters, images = a.ip_adapter or [], a.ip_image or []
    n = len(adapters) or recorded
    if not n:
        if images:
            raise UsageError("--ip-image is the picture of an --ip-adapter: give --ip-adapter FILE too")
        for flag, key in _FOLLOWERS:
            if getattr(a, key, None):
                raise UsageError(f"{flag} has no effect without --ip-adapter: drop it, or add --ip-adapter FILE")
        return
    if recorded and adapters and len(adapters) != recorded:
        raise UsageError(
            f"{a.from_png} records {recorded} IP-Adapter(s) but {len(adapters)} --ip-adapter were given: give one "
            "per recorded IP-Adapter, in order (or none: they are looked up in --ip-adapters-dir)"
        )
    if len(images) != n and not (recorded and not images):
        raise UsageError(
            f"{n} --ip-adapter but {len(images)} --ip-image: give one --ip-image IMAGE[+IMAGE...] per --ip-adapter, "
            "in order"
        )
    for flag, key in _FOLLOWERS:
        _per_unit(flag, getattr(a, key, None) or [None], n)
    for s in a.ip_scale or []:
        if not math.isfinite(s):
            raise UsageError(f"--ip-scale {s}: give a finite number (1: the adapter's full weight, 0: none)")
    for rule in a.ip_negative_rule or []:
        negative_rule(rule)


def units_from_cli(a: argparse.Namespace) -> list[IPAdapterUnit]:
    """The IP-Adapter units of ``--ip-adapter`` / ``--ip-image`` / ``--ip-scale`` / ``--clip-vision`` /
    ``--ip-negative-rule`` (no ``--from-png``): every file checked to be there (one line naming it, with the closest
    name beside it); the files are read, the pictures encoded, at the call."""
    from ..pipeline.ip_adapter import IPAdapterUnit

    check_flags(a)
    adapters = [_existing("--ip-adapter", f) for f in a.ip_adapter or []]
    if not adapters:
        return []
    n = len(adapters)
    if not a.clip_vision:
        raise UsageError(
            "--ip-adapter needs the CLIP vision encoder its pictures go through: give --clip-vision FILE_OR_FOLDER "
            "(ComfyUI's clip_vision_h.safetensors, or a diffusers image_encoder folder)"
        )
    pictures = [split_images(text) for text in a.ip_image]
    encoders = [_existing("--clip-vision", e, folder=True) for e in _per_unit("--clip-vision", a.clip_vision, n)]
    scales = _per_unit("--ip-scale", a.ip_scale or [1.0], n)
    rules = [negative_rule(r) for r in _per_unit("--ip-negative-rule", a.ip_negative_rule or ["diffusers"], n)]
    return [
        IPAdapterUnit(adapter, scale=float(s), images=images, clip_vision=enc, negative_rule=rule)
        for adapter, images, s, enc, rule in zip(adapters, pictures, scales, encoders, rules, strict=True)
    ]


def _lookup(name: str, digest: str | None, folder: str | None, *, what: str, flag: str, dir_flag: str, png: str) -> str:
    """The file (or folder) a PNG names, in ``folder``: ``NAME``, ``NAME.safetensors`` or ``NAME.bin``; where the PNG
    records a hash, the file found must have it."""
    from ..metadata import model_hash

    path = None
    if folder is not None and Path(name).name == name and name not in ("", ".", ".."):  # a plain name only
        base = Path(folder)
        path = next((p for p in (base / name, base / f"{name}.safetensors", base / f"{name}.bin") if p.exists()), None)
    if path is None:
        where = (
            f"not in {dir_flag} {folder} (give {flag})" if folder else f"not found: give {dir_flag} FOLDER or {flag}"
        )
        raise GenerationError(f"{png} was made with {what} {name!r}, which is {where}")
    if digest is not None:
        weights = path
        if path.is_dir():
            weights = next((q for q in (path / "model.safetensors", path / "pytorch_model.bin") if q.is_file()), path)
        got = model_hash(weights) if weights.is_file() else ""
        k = min(len(digest), len(got))
        if not k or got[:k] != digest[:k]:
            raise GenerationError(
                f"{png} was made with {what} {name!r} [{digest}], but {path} has hash "
                f"[{got[: len(digest)] or 'unknown'}]: give the same file with {flag}"
            )
    return str(path)


def units_from_png(a: argparse.Namespace, parsed: dict[str, str]) -> list[IPAdapterUnit]:
    """The IP-Adapters a PNG records (``IP-Adapter N``), made again: the pictures from ``--ip-image`` (one per
    recorded unit, in order: a PNG does not hold them); the adapters from ``--ip-adapter`` or, by their recorded
    name and hash, ``--ip-adapters-dir``; the encoders from ``--clip-vision`` or ``--clip-vision-dir``; weight and
    negative rule the recorded ones unless ``--ip-scale`` / ``--ip-negative-rule`` give others. A PNG without
    them takes the flags as a run without ``--from-png`` does."""
    from ..metadata import recorded_ip_adapters
    from ..pipeline.ip_adapter import IPAdapterUnit

    recorded = recorded_ip_adapters(parsed)
    if not recorded:
        if a.ip_adapters_dir is not None or a.clip_vision_dir is not None:
            flag = "--ip-adapters-dir" if a.ip_adapters_dir is not None else "--clip-vision-dir"
            raise UsageError(f"{flag} has no effect: {a.from_png} records no IP-Adapter")
        return units_from_cli(a)
    png, n = a.from_png, len(recorded)
    names = ", ".join(r.name for r in recorded)
    if not a.ip_image:
        raise GenerationError(
            f"{png} was made with IP-Adapter {names}: give its picture(s) with --ip-image IMAGE[+IMAGE...] (one per "
            "IP-Adapter, in order; the PNG does not hold them)"
        )
    check_flags(a, recorded=n)
    pictures = [split_images(text) for text in a.ip_image]
    for k, (r, pics) in enumerate(zip(recorded, pictures, strict=True)):
        if r.images is not None and r.images != len(pics):
            raise GenerationError(
                f"{png}: IP-Adapter {k} ({r.name}) took {r.images} picture(s), --ip-image gives {len(pics)}: join "
                "them with + in one --ip-image"
            )
    if a.ip_adapter:
        adapters = [_existing("--ip-adapter", f) for f in a.ip_adapter]
    else:
        adapters = [
            _lookup(
                r.name,
                r.hash,
                a.ip_adapters_dir,
                what="IP-Adapter",
                flag="--ip-adapter FILE",
                dir_flag="--ip-adapters-dir",
                png=png,
            )
            for r in recorded
        ]
    given = _per_unit("--clip-vision", a.clip_vision, n) if a.clip_vision else [None] * n
    encoders = []
    for r, enc in zip(recorded, given, strict=True):
        if enc is not None:
            encoders.append(_existing("--clip-vision", enc, folder=True))
        elif r.clip_vision is None:
            raise GenerationError(
                f"{png}: IP-Adapter {r.name} was given CLIP vision outputs, not pictures (no CLIP vision recorded): "
                "give --clip-vision FILE_OR_FOLDER with --ip-image"
            )
        else:
            encoders.append(
                _lookup(
                    r.clip_vision,
                    r.clip_vision_hash,
                    a.clip_vision_dir,
                    what="the CLIP vision encoder",
                    flag="--clip-vision FILE_OR_FOLDER",
                    dir_flag="--clip-vision-dir",
                    png=png,
                )
            )
    scales = _per_unit("--ip-scale", a.ip_scale, n) if a.ip_scale else [r.weight for r in recorded]
    if a.ip_negative_rule:
        rules = [negative_rule(x) for x in _per_unit("--ip-negative-rule", a.ip_negative_rule, n)]
    else:
        rules = [negative_rule(r.negative_rule or "diffusers", f"{png}: Negative rule") for r in recorded]
    return [
        IPAdapterUnit(
            adapter,
            scale=float(s),
            images=pics,
            clip_vision=enc,
            negative_rule=rule,
            start=r.start,
            end=r.end,
            layer_scales=r.layer_scales,
            scaling=r.scaling,
        )
        for adapter, pics, s, enc, rule, r in zip(adapters, pictures, scales, encoders, rules, recorded, strict=True)
    ]


def refuse_a1111_ip_adapter(recorded_controlnets: list[Any], png: str) -> None:
    """An A1111 image whose ControlNet extension ran an IP-Adapter (``ControlNet N: "Module: ip-adapter_clip_sd15,
    Model: ip-adapter_sd15 [hash], ..."``) is not a ControlNet: one line instead of asking for a control image."""
    for r in recorded_controlnets:
        module = (r.module or "").strip().lower()
        if module.startswith("ip-adapter") or (not module and r.name.lower().startswith("ip-adapter")):
            raise GenerationError(
                f"{png} ran IP-Adapter {r.name!r} through A1111's ControlNet extension (Module {r.module or 'none'}), "
                "whose IP-Adapter sdengine does not reproduce: make a new image with --ip-adapter FILE --ip-image "
                "IMAGE --clip-vision FILE (without --from-png)"
            )


__all__ = ["check_flags", "negative_rule", "refuse_a1111_ip_adapter", "register", "split_images", "units_from_cli"]
