"""ComfyUI's UI-format workflow (what its page saves, and the ``workflow`` text of its PNGs) -> an API-format prompt.

The page keeps a graph ``{nodes: [{id, type, inputs, outputs, widgets_values, mode, ...}], links, groups, ...}``
and turns it into the API format (``{id: {class_type, inputs}}``) only when a prompt is queued. This module
does that turn offline, following the facts of ComfyUI's frontend (``graphToPrompt``), written down in
docs/comfyui.md ("UI-format workflows and `sdengine comfy run`"):

* a node's ``widgets_values`` are its widget inputs' values in the node definition's order (required inputs,
  then optional ones); an INT input named ``seed`` or ``noise_seed`` has one more widget right after it,
  ``control_after_generate`` ("fixed", "randomize", ...), which is the page's and is not sent; an image-upload
  input (LoadImage) is followed by its upload button's value (``"image"``), not sent either, and absent from a
  list that ends there; a ``widgets_values`` object (``{name: value}``) is read by name; with ``object_info``
  (a ``GET /object_info`` body) the widgets are those it lists, else the registry's;
* an input entry with a ``link`` (a link input, or a widget converted to an input) takes its value from the link;
  a converted widget whose link leads nowhere (a Reroute or a bypassed node's input fed by nothing) keeps its
  widget value;
* ``Reroute`` nodes are followed to the node that feeds them; a ``PrimitiveNode``'s value (its first widget value)
  becomes the literal value of every input it feeds; ``Note`` and ``MarkdownNote`` are dropped;
* a muted node (mode 2) is dropped, and every input linked to it is left out (as the page's last pass does);
* a bypassed node (mode 4) is dropped and passed through: an input linked to it reads the bypassed node's input
  of the same type as the consuming input, trying its input at the output's index first, then each in order;
  with none of that type, the input is left out;
* groups, the canvas state and every other key are ignored. ``links`` is a list of arrays
  ``[id, from_node, from_slot, to_node, to_slot, type]`` (schema 0.4) or of objects ``{id, origin_id,
  origin_slot, target_id, target_slot, type}`` (schema 1).

A node type the registry lacks, a widget list of the wrong length, a link that is not in the list or that names
an absent node: :class:`WorkflowError`, one line naming the node id and type. Nothing here imports FastAPI.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdengine.errors import SdengineError
from sdengine.server.comfy.nodes import NodeDef
from sdengine.server.comfy.registry import NODES

SEED_WIDGETS = ("seed", "noise_seed")  # INT inputs the page gives a control_after_generate widget
CONTROL = "control_after_generate"
UPLOAD = "upload"  # the upload button after an image_upload COMBO (LoadImage)
NOTES = ("Note", "MarkdownNote")
REROUTE = "Reroute"
PRIMITIVE = "PrimitiveNode"
MUTED, BYPASSED = 2, 4
MAX_HOPS = 10_000  # Reroutes and bypassed nodes followed from one input (a loop of Reroutes is an error)


class WorkflowError(SdengineError, ValueError):
    """A UI-format workflow that cannot become an API prompt (one line, naming the node where there is one)."""


def is_ui_workflow(data: Any) -> bool:
    """A UI-format graph (``nodes`` a list) rather than an API prompt (``{id: {class_type, inputs}}``)."""
    return isinstance(data, dict) and isinstance(data.get("nodes"), list)


def widget_names(ndef: NodeDef) -> list[str]:
    """The names of a node's widgets in the order of its ``widgets_values``: each value input (required ones,
    then optional ones), ``control_after_generate`` after an INT seed, ``upload`` after an image-upload input."""
    names: list[str] = []
    ordered = [i for i in ndef.inputs if not i.optional] + [i for i in ndef.inputs if i.optional]
    for inp in ordered:
        if inp.is_link_type:
            continue
        names.append(inp.name)
        if inp.type == "INT" and (inp.name in SEED_WIDGETS or inp.control):
            names.append(CONTROL)
        if inp.upload:
            names.append(UPLOAD)
    return names


VALUE_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def widget_names_from_info(info: dict[str, Any]) -> list[str]:
    """:func:`widget_names` of a node as ``GET /object_info`` describes it (this server's or ComfyUI's, custom
    nodes included): ``input_order`` (else the order of ``input``), value types and lists of choices are widgets
    unless ``forceInput``; ``control_after_generate`` after an INT ``seed`` / ``noise_seed`` or an input with that
    option; ``upload`` after an ``image_upload`` input."""
    names: list[str] = []
    raw_inputs, raw_order = info.get("input"), info.get("input_order")
    inputs: dict[str, Any] = raw_inputs if isinstance(raw_inputs, dict) else {}
    order: dict[str, Any] = raw_order if isinstance(raw_order, dict) else {}
    for section in ("required", "optional"):
        raw_specs = inputs.get(section)
        specs: dict[str, Any] = raw_specs if isinstance(raw_specs, dict) else {}
        listed = order.get(section)
        for name in listed if isinstance(listed, list) else list(specs):
            spec = specs.get(name)
            if not isinstance(spec, list) or not spec:
                continue
            kind, opts = spec[0], spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if not (isinstance(kind, list) or kind in VALUE_TYPES) or opts.get("forceInput"):
                continue
            names.append(str(name))
            if (kind == "INT" and name in SEED_WIDGETS) or opts.get(CONTROL):
                names.append(CONTROL)
            if opts.get("image_upload"):
                names.append(UPLOAD)
    return names


def _node_label(node: dict[str, Any]) -> str:
    return f"node {node.get('id')} ({node.get('type')})"


def _parse_links(raw: Any) -> dict[str, tuple[str, int, str, int, Any]]:
    """link id -> (origin id, origin slot, target id, target slot, type), from either list format."""
    if raw is None:
        return {}
    if not isinstance(raw, list):
        raise WorkflowError("workflow 'links' must be a list")
    out: dict[str, tuple[str, int, str, int, Any]] = {}
    for k, entry in enumerate(raw):
        if entry is None:  # the page writes null for a removed link in some versions
            continue
        try:
            if isinstance(entry, list):
                lid, origin, oslot, target, tslot = entry[:5]
                kind = entry[5] if len(entry) > 5 else None
            elif isinstance(entry, dict):
                lid, origin, oslot = entry["id"], entry["origin_id"], entry["origin_slot"]
                target, tslot, kind = entry["target_id"], entry["target_slot"], entry.get("type")
            else:
                raise TypeError
            if isinstance(oslot, bool) or isinstance(tslot, bool):
                raise TypeError
            out[str(lid)] = (str(origin), int(oslot), str(target), int(tslot), kind)
        except (KeyError, TypeError, ValueError):
            raise WorkflowError(
                f"workflow link #{k} is malformed: want [id, from_node, from_slot, to_node, to_slot, type] or "
                "{id, origin_id, origin_slot, target_id, target_slot, type}"
            ) from None
    return out


def _widget_values(node: dict[str, Any], names: list[str]) -> dict[str, Any]:
    raw = node.get("widgets_values", [])
    if raw is None:
        raw = []
    if isinstance(raw, dict):  # {name: value}, as some pages write it
        return {k: v for k, v in raw.items() if k in names and k not in (CONTROL, UPLOAD)}
    if not isinstance(raw, list):
        raise WorkflowError(f"{_node_label(node)}: widgets_values must be a list")
    # A last upload button's value may be absent (a page that leaves out widgets it does not serialize writes a
    # sparse list: a trailing one is simply not there)
    trimmed = list(names)
    while trimmed and trimmed[-1] == UPLOAD:
        trimmed.pop()
    if len(raw) not in (len(names), len(trimmed)):
        shown = ", ".join(names) or "none"
        raise WorkflowError(
            f"{_node_label(node)}: {len(raw)} widget values for {len(names)} widgets ({shown}); "
            "the workflow was saved for another version of this node"
        )
    present = names[: len(raw)]
    return {n: v for n, v in zip(present, raw, strict=True) if n not in (CONTROL, UPLOAD)}


def convert(workflow: Any, object_info: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The API-format prompt of a UI-format workflow (see the module's text for the rules). The nodes' widgets
    are this server's (the registry), or those of ``object_info`` (the body of a ``GET /object_info``) when given."""
    if not is_ui_workflow(workflow):
        raise WorkflowError("not a ComfyUI UI-format workflow: no 'nodes' list")
    links = _parse_links(workflow.get("links"))
    nodes: dict[str, dict[str, Any]] = {}
    for k, node in enumerate(workflow["nodes"]):
        if not isinstance(node, dict) or "id" not in node or not isinstance(node.get("type"), str):
            raise WorkflowError(f"workflow node #{k} is malformed: want an object with 'id' and 'type'")
        nid = str(node["id"])
        if nid in nodes:
            raise WorkflowError(f"{_node_label(node)}: node id {nid} appears twice")
        nodes[nid] = node
    definitions = workflow.get("definitions")
    raw_subgraphs = definitions.get("subgraphs") if isinstance(definitions, dict) else None
    subgraphs = {str(s.get("id")) for s in (raw_subgraphs or []) if isinstance(s, dict)}

    def inputs_of(node: dict[str, Any]) -> list[dict[str, Any]]:
        raw = node.get("inputs") or []
        if not isinstance(raw, list) or not all(isinstance(e, dict) for e in raw):
            raise WorkflowError(f"{_node_label(node)}: inputs must be a list of objects")
        return raw

    def resolve(node: dict[str, Any], name: str, link_id: Any, want: Any) -> tuple[str, Any] | None:
        """("link", [origin, slot]) or ("value", v) for an input fed by ``link_id``; ("drop", None): the input is
        left out (linked to a muted node, or to a bypassed one without an input of its type); None: the link
        leads nowhere (a Reroute or bypassed input fed by nothing) and a widget keeps its own value, as the page."""
        for _ in range(MAX_HOPS):
            link = links.get(str(link_id))
            if link is None:
                raise WorkflowError(f"{_node_label(node)}: input '{name}' uses link {link_id}, which is not in 'links'")
            origin_id, origin_slot = link[0], link[1]
            origin = nodes.get(origin_id)
            if origin is None:
                raise WorkflowError(
                    f"{_node_label(node)}: input '{name}' is linked to node {origin_id}, which is not in the workflow"
                )
            kind = origin["type"]
            if kind == REROUTE:
                ins = inputs_of(origin)
                link_id = ins[0].get("link") if ins else None
                if link_id is None:
                    return None
                continue
            if kind == PRIMITIVE:
                values = origin.get("widgets_values")
                if not isinstance(values, list) or not values:
                    raise WorkflowError(f"{_node_label(origin)}: a PrimitiveNode without a value (widgets_values)")
                return ("value", values[0])
            if kind in NOTES:
                raise WorkflowError(f"{_node_label(node)}: input '{name}' is linked to a {kind}, which has no outputs")
            mode = origin.get("mode", 0)
            if mode == MUTED:
                return ("drop", None)
            if mode == BYPASSED:
                ins = inputs_of(origin)
                order = [origin_slot, *range(len(ins))]
                chosen = next((i for i in order if 0 <= i < len(ins) and ins[i].get("type") == want), None)
                if chosen is None:
                    return ("drop", None)
                link_id = ins[chosen].get("link")
                if link_id is None:
                    return None
                continue
            return ("link", [origin_id, origin_slot])
        raise WorkflowError(f"{_node_label(node)}: input '{name}' goes round a loop of Reroute or bypassed nodes")

    prompt: dict[str, dict[str, Any]] = {}
    for nid, node in nodes.items():
        kind = node["type"]
        if kind in (*NOTES, REROUTE, PRIMITIVE) or node.get("mode", 0) in (MUTED, BYPASSED):
            continue
        definition = _definition(kind, object_info)
        if definition is None:
            what = "a subgraph, which is not supported" if kind in subgraphs else "a node type sdengine does not have"
            if object_info is not None and kind not in subgraphs:
                what = "a node type the object_info does not list"
            raise WorkflowError(f"{_node_label(node)}: unknown node type: {what}")
        display_name, names = definition
        inputs = _widget_values(node, names)
        for entry in inputs_of(node):
            widget = entry.get("widget")
            name = str(widget["name"]) if isinstance(widget, dict) and "name" in widget else str(entry.get("name"))
            if entry.get("link") is None:
                continue
            got = resolve(node, name, entry["link"], entry.get("type"))
            if got is None:
                continue
            if got[0] == "drop":
                inputs.pop(name, None)
                continue
            inputs[name] = got[1]
        title = node.get("title")
        prompt[nid] = {
            "inputs": inputs,
            "class_type": kind,
            "_meta": {"title": title if isinstance(title, str) else display_name},
        }
    # the page's last pass: an input linked to a node that is not sent (muted) is left out
    for entry in prompt.values():
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and value[0] not in prompt:
                del entry["inputs"][name]
    return prompt


def _definition(kind: str, object_info: dict[str, Any] | None) -> tuple[str, list[str]] | None:
    """(display name, widget names) of a node type, or None when it is unknown."""
    if object_info is not None:
        info = object_info.get(kind)
        if not isinstance(info, dict):
            return None
        shown = info.get("display_name")
        return (shown if isinstance(shown, str) and shown else kind), widget_names_from_info(info)
    ndef = NODES.get(kind)
    return None if ndef is None else (ndef.display_name, widget_names(ndef))


def read_workflow_file(
    path: str | Path, object_info: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(API prompt, UI workflow or None) of a file: an API-format .json, a UI-format .json (converted), or a
    ComfyUI PNG (its ``prompt`` text, else its ``workflow`` text converted)."""
    from sdengine.image_info import png_text_chunks

    p = Path(path)
    if not p.is_file():
        raise WorkflowError(f"{p}: no such file")
    chunks = png_text_chunks(p)
    if chunks is not None:
        if "prompt" in chunks:
            api = _api(_json(chunks["prompt"], f"{p}: its 'prompt' text"), f"{p}: its 'prompt' text")
            try:  # the workflow goes on into the images written (SaveImage's PNG text), when it reads
                ui = json.loads(chunks.get("workflow", "null"))
            except (json.JSONDecodeError, RecursionError):
                ui = None
            return api, ui if is_ui_workflow(ui) else None
        if "workflow" in chunks:
            ui = _json(chunks["workflow"], f"{p}: its 'workflow' text")
            return convert(ui, object_info), ui
        raise WorkflowError(f"{p}: a PNG without ComfyUI's 'prompt' or 'workflow' text")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise WorkflowError(f"{p}: neither JSON text nor a PNG") from None
    data = _json(text, str(p))
    if is_ui_workflow(data):
        return convert(data, object_info), data
    return _api(data, str(p)), None


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise WorkflowError(f"{where} is not JSON: {e}") from None


def _api(data: Any, where: str) -> dict[str, Any]:
    """An API prompt as read (a ``{"prompt": ...}`` body too); its nodes are checked by graph.validate."""
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict) and "class_type" not in data["prompt"]:
        data = data["prompt"]
    if not isinstance(data, dict) or not data or not all(isinstance(n, dict) for n in data.values()):
        raise WorkflowError(
            f"{where}: not a ComfyUI workflow: want an API-format prompt {{id: {{class_type, inputs}}}} "
            "or a UI-format workflow {nodes, links}"
        )
    return data


__all__ = [
    "WorkflowError",
    "convert",
    "is_ui_workflow",
    "read_workflow_file",
    "widget_names",
    "widget_names_from_info",
]
