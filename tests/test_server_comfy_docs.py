"""docs/comfyui.md lists every ComfyUI node with its inputs as /object_info describes them."""

from __future__ import annotations

from pathlib import Path

from sdengine.server.comfy.docs import builtin_object_info, render_nodes, update
from sdengine.server.comfy.registry import NODES  # every family's nodes

DOC = Path(__file__).resolve().parent.parent / "docs" / "comfyui.md"


def test_docs_node_list_is_generated_from_object_info():
    info = builtin_object_info()
    assert set(info) == set(NODES)
    text = DOC.read_text(encoding="utf-8")
    assert update(text, info) == text, "regenerate: python -m sdengine.server.comfy.docs docs/comfyui.md"
    rendered = render_nodes(info)
    for name, node in info.items():
        assert f"### {name}\n" in rendered
        for iname in node["input"]["required"]:
            assert f"| `{iname}` |" in rendered.split(f"### {name}\n", 1)[1].split("###", 1)[0]
    assert "`dpmpp_2m`" in rendered and "`karras`" in rendered and "`emoji-fruit`" in rendered
