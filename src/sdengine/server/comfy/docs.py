"""The node list of docs/comfyui.md, generated from ``/object_info``.

``python -m sdengine.server.comfy.docs docs/comfyui.md`` rewrites the part of the file between the
``<!-- nodes:begin -->`` and ``<!-- nodes:end -->`` markers; tests/test_server_comfy_docs.py checks that the
file is up to date. The object info is that of a server with the built-in models only and an empty input
folder, so that the text does not depend on the machine.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- nodes:begin -->", "<!-- nodes:end -->"


def builtin_object_info() -> dict[str, Any]:
    """``/object_info`` of a server with built-in models only and an empty input folder (no worker runs)."""
    from fastapi.testclient import TestClient

    from sdengine.server.app import create_app
    from sdengine.server.config import ServerConfig

    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(ServerConfig(outputs_dir=Path(tmp) / "outputs"), loader=lambda ref, dev: None, preload=False)
        client = TestClient(app, base_url="http://127.0.0.1")  # no lifespan: the workers do not start
        r = client.get("/object_info")
        r.raise_for_status()
        return r.json()


# What an input's choices are when the documented server (built-ins only, no --tiny-vae) lists none
EMPTY_CHOICES = {
    "vae_name": "`taesd` when the server runs with `--tiny-vae`",
    "model_name": "the files of `--upscalers-dir`",
    "clip_name": "the encoders of `--clip-vision-dir`",
    "ipadapter_file": "the files of `--ip-adapters-dir`",
    "unet_name": "the files of `--models-dir`'s `diffusion_models/` and `unet/`",
    "clip_name1": "the files of `--models-dir`'s `text_encoders/` and `clip/`",
    "clip_name2": "the files of `--models-dir`'s `text_encoders/` and `clip/`",
    "clip_name3": "the files of `--models-dir`'s `text_encoders/` and `clip/`",
}


def _spec(spec: list[Any], name: str = "") -> tuple[str, str]:
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    if isinstance(kind, list):
        shown = ", ".join(f"`{c}`" for c in kind) if kind else EMPTY_CHOICES.get(name, "files in the input folder")
        return "choice", shown + (f" (default `{opts['default']}`)" if "default" in opts else "")
    parts = []
    if "default" in opts:
        parts.append(
            f"default `{opts['default']!r}`" if isinstance(opts["default"], str) else f"default {opts['default']}"
        )
    if "min" in opts or "max" in opts:
        parts.append(f"{opts.get('min', '')} .. {opts.get('max', '')}")
    if opts.get("multiline"):
        parts.append("multiline")
    return str(kind), ", ".join(parts)


def render_nodes(info: dict[str, Any]) -> str:
    out = [BEGIN, ""]
    for name in sorted(info):
        node = info[name]
        out.append(f"### {name}")
        out.append("")
        line = f"*{node['display_name']}* ({node['category']})"
        if node.get("output_node"):
            line += ", output node"
        if node.get("is_input_list"):
            line += ", takes its inputs as whole lists"
        if node.get("description"):
            line += f". {node['description']}"
        out.append(line)
        out.append("")
        out.append("| input | type | default, range, choices |")
        out.append("|---|---|---|")
        for group in ("required", "optional"):
            for iname, spec in node["input"].get(group, {}).items():
                kind, rest = _spec(spec, iname)
                out.append(f"| `{iname}`{' (optional)' if group == 'optional' else ''} | {kind} | {rest} |")
        listed = node.get("output_is_list") or [False] * len(node["output"])
        outs = (
            ", ".join(
                f"{t}" + (f" (`{n}`)" if n != t else "") + (", a list" if is_list else "")
                for t, n, is_list in zip(node["output"], node["output_name"], listed, strict=True)
            )
            or "none"
        )
        out.append("")
        out.append(f"Outputs: {outs}.")
        out.append("")
    out.append(END)
    return "\n".join(out)


def update(text: str, info: dict[str, Any]) -> str:
    """``text`` with its node section replaced by the one rendered from ``info``."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"the document has no {BEGIN} ... {END} section")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + render_nodes(info) + tail


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0] if args else "docs/comfyui.md")
    path.write_text(update(path.read_text(encoding="utf-8"), builtin_object_info()), encoding="utf-8")
    print(f"wrote the node list of {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
