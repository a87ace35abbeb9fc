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
  becomes the literal value of every input it feeds; ``Note`` and ``MarkdownNote`` are dropped; a PreviewAny's
  display widgets (up to three nulls after its inputs' widget values) are no inputs;
* a muted node (mode 2) is dropped, and every input linked to it is left out (as the page's last pass does);
* a bypassed node (mode 4) is dropped and passed through: an input linked to it reads the bypassed node's input
  of the same type as the consuming input, trying its input at the output's index first, then each in order;
  with none of that type, the input is left out;
* subgraphs (``definitions.subgraphs``; an instance is a node whose ``type`` is a definition's ``id``) are
  flattened as the page's ``ExecutableNodeDTO`` does: each inner node is sent with the id ``INSTANCE:INNER``
  (nested: ``A:B:C``); a link from the subgraph's input node (-10) slot k reads what feeds the instance's input
  k, else the instance's promoted widget value of that input (its ``widgets_values``, one per input entry with
  a ``widget``), else nothing; an input linked to the instance's output k reads the inner link into the output
  node (-20) slot k (the definition's ``outputs[k].linkIds``); a muted or bypassed instance is handled as a
  muted or bypassed node and none of its inner nodes is sent;
* group nodes (``workflow>NAME`` / ``workflow/NAME`` with ``extra.groupNodes[NAME]``) are turned into such a
  subgraph per instance, as the page's GroupNodeConfig lays out the group's widgets, inputs and outputs
  (inner ids ``INSTANCE:INDEX``);
* groups, the canvas state and every other key are ignored. ``links`` is a list of arrays
  ``[id, from_node, from_slot, to_node, to_slot, type]`` (schema 0.4) or of objects ``{id, origin_id,
  origin_slot, target_id, target_slot, type}`` (schema 1).

A node type the registry lacks, a widget list of the wrong length, a link that is not in the list or that names
an absent node, a subgraph that is not defined, subgraphs that contain each other, a group node that is not in
``extra.groupNodes``: :class:`WorkflowError`, one line naming the node id (its path) and type.
Nothing here imports FastAPI.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
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
# node types whose page adds display-only widgets after their inputs' (PreviewAny's text preview: saved as up to
# three nulls in widgets_values); those values are no inputs and are dropped
PAGE_ONLY_WIDGETS = {"PreviewAny": 3}
MAX_HOPS = 10_000  # Reroutes and bypassed nodes followed from one input (a loop of Reroutes is an error)
SUBGRAPH_IN, SUBGRAPH_OUT = "-10", "-20"  # the ids of a subgraph's input and output nodes in its links
GROUP_PREFIXES = ("workflow>", "workflow/")  # a group node's type: the prefix and its name in extra.groupNodes
MAX_DEPTH = 64  # subgraphs nested in each other
MAX_NODES = 100_000  # inner nodes of all subgraph instances together
UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


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


def _parse_links(raw: Any, where: str = "workflow") -> dict[str, tuple[str, int, str, int, Any]]:
    """link id -> (origin id, origin slot, target id, target slot, type), from either list format."""
    if raw is None:
        return {}
    if isinstance(raw, dict):  # {id: link}, as some saved subgraphs hold them
        raw = list(raw.values())
    if not isinstance(raw, list):
        raise WorkflowError(f"{where} 'links' must be a list")
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
                f"{where} link #{k} is malformed: want [id, from_node, from_slot, to_node, to_slot, type] or "
                "{id, origin_id, origin_slot, target_id, target_slot, type}"
            ) from None
    return out


def _widget_values(node: dict[str, Any], names: list[str], label: str, optional: int = 0) -> dict[str, Any]:
    """``optional``: how many of the last ``names`` are optional inputs' widgets, which a workflow saved before the
    node had them leaves out (DualCLIPLoader's ``device``)."""
    raw = node.get("widgets_values", [])
    if raw is None:
        raw = []
    if isinstance(raw, dict):  # {name: value}, as some pages write it
        return {k: v for k, v in raw.items() if k in names and k not in (CONTROL, UPLOAD)}
    if not isinstance(raw, list):
        raise WorkflowError(f"{label}: widgets_values must be a list")
    # A last upload button's value may be absent (a page that leaves out widgets it does not serialize writes a
    # sparse list: a trailing one is simply not there)
    trimmed = list(names)
    while trimmed and trimmed[-1] == UPLOAD:
        trimmed.pop()
    if len(raw) not in (len(names), len(trimmed)) and not (optional and len(raw) == len(names) - optional):
        shown = ", ".join(names) or "none"
        raise WorkflowError(
            f"{label}: {len(raw)} widget values for {len(names)} widgets ({shown}); "
            "the workflow was saved for another version of this node"
        )
    present = names[: len(raw)]
    return {n: v for n, v in zip(present, raw, strict=True) if n not in (CONTROL, UPLOAD)}


@dataclass
class _Scope:
    """One graph of the workflow: the root graph, or one instance of a subgraph (or of a group node)."""

    path: tuple[str, ...]  # the ids of the instance nodes from the root graph down to this graph's instance
    nodes: dict[str, dict[str, Any]]
    links: dict[str, tuple[str, int, str, int, Any]]
    where: str = ""  # "" at the root, else " in subgraph NAME" (for errors)
    parent: _Scope | None = None
    instance: dict[str, Any] | None = None  # the node of the parent graph this graph is an instance of
    inputs: list[list[str]] = field(default_factory=list)  # per input of the subgraph: its inner link ids
    outer: list[dict[str, Any]] = field(default_factory=list)  # per input: the instance's input entry ({}: none)
    outputs: list[list[str]] = field(default_factory=list)  # per output: the link ids into it
    promoted: dict[int, Any] = field(default_factory=dict)  # input index -> the instance's widget value for it
    children: dict[str, _Scope] = field(default_factory=dict)  # instance node id -> its graph

    def exec_id(self, nid: str) -> str:
        """The node's id in the API prompt: the instance ids down to it and its own, joined by ':' (the page's)."""
        return ":".join((*self.path, nid))

    def label(self, node: dict[str, Any]) -> str:
        return f"node {self.exec_id(str(node.get('id')))} ({node.get('type')})"


def convert(workflow: Any, object_info: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The API-format prompt of a UI-format workflow (see the module's text for the rules). The nodes' widgets
    are this server's (the registry), or those of ``object_info`` (the body of a ``GET /object_info``) when given."""
    if not is_ui_workflow(workflow):
        raise WorkflowError("not a ComfyUI UI-format workflow: no 'nodes' list")
    root = _Scope((), _parse_nodes(workflow["nodes"], "workflow"), _parse_links(workflow.get("links")))
    subgraphs = _collect_subgraphs(workflow)
    extra = workflow.get("extra")
    raw_groups = extra.get("groupNodes") if isinstance(extra, dict) else None
    groups: dict[str, Any] = raw_groups if isinstance(raw_groups, dict) else {}
    expanded = [0]

    def inputs_of(scope: _Scope, node: dict[str, Any]) -> list[dict[str, Any]]:
        raw = node.get("inputs") or []
        if not isinstance(raw, list) or not all(isinstance(e, dict) for e in raw):
            raise WorkflowError(f"{scope.label(node)}{scope.where}: inputs must be a list of objects")
        return raw

    def build(scope: _Scope, stack: tuple[str, ...]) -> None:
        """Expand every subgraph / group node instance of ``scope`` that runs (not muted, not bypassed)."""
        for nid, node in scope.nodes.items():
            kind = node["type"]
            if node.get("mode", 0) in (MUTED, BYPASSED):
                continue  # its contents are not sent (the page's rule since ComfyUI_frontend PR 8494)
            label = f"{scope.label(node)}{scope.where}"
            if kind in subgraphs:
                definition, key = subgraphs[kind], kind
                name = definition.get("name") if isinstance(definition.get("name"), str) else kind
                child = _Scope(
                    (*scope.path, nid),
                    _parse_nodes(definition.get("nodes"), f"subgraph {name}"),
                    _parse_links(definition.get("links"), f"subgraph {name}"),
                    f" in subgraph {name}",
                    scope,
                    node,
                )
                ios = _io_slots(definition.get("inputs"), f"subgraph {name}", "inputs")
                child.inputs = [ids for _, _, ids in ios]
                child.outputs = [
                    ids for _, _, ids in _io_slots(definition.get("outputs"), f"subgraph {name}", "outputs")
                ]
                child.outer = _align(inputs_of(scope, node), ios)
                child.promoted = promoted_values(child)
            elif kind.startswith(GROUP_PREFIXES):
                name = kind[len(GROUP_PREFIXES[0]) :]
                if name not in groups:
                    raise WorkflowError(f"{label}: group node '{name}' is not in the workflow's extra.groupNodes")
                key = kind
                parts = _expand_group(name, groups[name], node, inputs_of(scope, node), label, object_info)
                child = _Scope((*scope.path, nid), parts[0], parts[1], f" in group node {name}", scope, node)
                child.outer, child.inputs, child.outputs, child.promoted = parts[2], parts[3], parts[4], parts[5]
            else:
                continue
            if key in stack:
                names = [_sub_name(subgraphs, k) for k in (*stack[stack.index(key) :], key)]
                raise WorkflowError(f"{label}: subgraphs contain each other: {' -> '.join(names)}")
            if len(stack) >= MAX_DEPTH:
                raise WorkflowError(f"{label}: subgraphs nested more than {MAX_DEPTH} deep")
            expanded[0] += len(child.nodes)
            if expanded[0] > MAX_NODES:
                raise WorkflowError(f"{label}: the subgraphs expand to more than {MAX_NODES} nodes")
            scope.children[nid] = child
            build(child, (*stack, key))

    def promoted_values(child: _Scope) -> dict[int, Any]:
        """The instance's widget values of the subgraph's inputs that feed a widget (promoted widgets): one value
        per such input, in order (a list one longer per seed's control_after_generate is read too). The promoted
        inputs are the instance's input entries with a ``widget``; an instance that has none (as pages before
        about 1.26 saved it, leaving those inputs out) promotes each input that feeds an inner widget."""
        instance = child.instance or {}
        ins = inputs_of(child.parent or child, instance)
        if any("widget" in e for e in ins):
            promoted = [k for k, e in enumerate(child.outer) if isinstance(e.get("widget"), dict)]
        else:
            promoted = [k for k in range(len(child.inputs)) if targets(child, k)]
        raw = instance.get("widgets_values")
        if isinstance(raw, dict):
            names = [str(child.outer[k].get("name")) for k in promoted]
            return {k: raw[n] for k, n in zip(promoted, names, strict=True) if n in raw and raw[n] is not None}
        if not isinstance(raw, list):
            return {}
        controls = len(raw) > len(promoted)
        out: dict[int, Any] = {}
        j = 0
        for k in promoted:
            if j >= len(raw):
                break
            if raw[j] is not None:
                out[k] = raw[j]
            j += 1
            if controls and any(has_control(child, t) for t in targets(child, k)):
                j += 1
        return out

    def targets(child: _Scope, k: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(inner node, its input entry) of each widget input subgraph input ``k`` feeds."""
        found = []
        for lid in child.inputs[k]:
            link = child.links.get(lid)
            node = child.nodes.get(link[2]) if link else None
            if link is None or node is None:
                continue
            ins = inputs_of(child, node)
            if 0 <= link[3] < len(ins) and isinstance(ins[link[3]].get("widget"), dict):
                found.append((node, ins[link[3]]))
        return found

    def has_control(child: _Scope, target: tuple[dict[str, Any], dict[str, Any]]) -> bool:
        node, entry = target
        definition = _definition(node["type"], object_info)
        names = definition[1] if definition else []
        name = str(entry["widget"].get("name"))
        return name in names and names.index(name) + 1 < len(names) and names[names.index(name) + 1] == CONTROL

    def resolve(scope: _Scope, node: dict[str, Any], name: str, link_id: Any, want: Any) -> tuple[str, Any] | None:
        """("link", [origin, slot]) or ("value", v) for an input fed by ``link_id``; ("drop", None): the input is
        left out (linked to a muted node, or to a bypassed one without an input of its type); None: the link
        leads nowhere (a Reroute or bypassed input fed by nothing, a subgraph input or output connected to
        nothing) and a widget keeps its own value, as the page."""
        where = f"{scope.label(node)}{scope.where}: input '{name}'"
        for _ in range(MAX_HOPS):
            link = scope.links.get(str(link_id))
            if link is None:
                raise WorkflowError(f"{where} uses link {link_id}, which is not in the links of its graph")
            origin_id, origin_slot = link[0], link[1]
            if origin_id == SUBGRAPH_IN and scope.parent is not None and scope.instance is not None:
                # out through the subgraph's input to what feeds the instance's input of that index
                if not 0 <= origin_slot < len(scope.inputs):
                    raise WorkflowError(
                        f"{where} uses link {link_id} from subgraph input {origin_slot}, which is absent"
                    )
                outer_link = scope.outer[origin_slot].get("link") if origin_slot < len(scope.outer) else None
                if outer_link is None:
                    return ("value", scope.promoted[origin_slot]) if origin_slot in scope.promoted else None
                scope, link_id = scope.parent, outer_link
                continue
            origin = scope.nodes.get(origin_id)
            if origin is None:
                raise WorkflowError(f"{where} is linked to node {origin_id}, which is not in its graph{scope.where}")
            kind = origin["type"]
            if kind == REROUTE:
                ins = inputs_of(scope, origin)
                link_id = ins[0].get("link") if ins else None
                if link_id is None:
                    return None
                continue
            if kind == PRIMITIVE:
                values = origin.get("widgets_values")
                if not isinstance(values, list) or not values:
                    raise WorkflowError(f"{scope.label(origin)}: a PrimitiveNode without a value (widgets_values)")
                return ("value", values[0])
            if kind in NOTES:
                raise WorkflowError(f"{where} is linked to a {kind}, which has no outputs")
            mode = origin.get("mode", 0)
            if mode == MUTED:
                return ("drop", None)
            if mode == BYPASSED:
                ins = inputs_of(scope, origin)
                order = [origin_slot, *range(len(ins))]
                chosen = next((i for i in order if 0 <= i < len(ins) and ins[i].get("type") == want), None)
                if chosen is None:
                    return ("drop", None)
                link_id = ins[chosen].get("link")
                if link_id is None:
                    return None
                continue
            child = scope.children.get(origin_id)
            if child is not None:  # into the subgraph, to what feeds its output of that index
                if not 0 <= origin_slot < len(child.outputs):
                    raise WorkflowError(f"{where} reads output {origin_slot} of {scope.label(origin)}, which has none")
                if not child.outputs[origin_slot]:
                    return None
                scope, link_id = child, child.outputs[origin_slot][0]
                continue
            return ("link", [scope.exec_id(origin_id), origin_slot])
        raise WorkflowError(f"{where} goes round a loop of Reroute, bypassed or subgraph nodes")

    build(root, ())
    prompt: dict[str, dict[str, Any]] = {}

    def emit(scope: _Scope) -> None:
        for nid, node in scope.nodes.items():
            if nid in scope.children:
                emit(scope.children[nid])
                continue
            kind = node["type"]
            if kind in (*NOTES, REROUTE, PRIMITIVE) or node.get("mode", 0) in (MUTED, BYPASSED):
                continue
            label = f"{scope.label(node)}{scope.where}"
            definition = _definition(kind, object_info)
            if definition is None:
                if UUID.match(kind):
                    raise WorkflowError(
                        f"{label}: uses subgraph {kind}, which is not in the workflow's definitions.subgraphs"
                    )
                what = "a node type sdengine does not have"
                if object_info is not None:
                    what = "a node type the object_info does not list"
                raise WorkflowError(f"{label}: unknown node type: {what}")
            display_name, names = definition
            raw_values = node.get("widgets_values")
            shown = PAGE_ONLY_WIDGETS.get(kind, 0)
            if shown and isinstance(raw_values, list) and len(names) < len(raw_values) <= len(names) + shown:
                node = {**node, "widgets_values": raw_values[: len(names)]}  # the page's display widgets: no inputs
            inputs = _widget_values(node, names, label, _optional_widgets(kind, object_info))
            for entry in inputs_of(scope, node):
                widget = entry.get("widget")
                name = str(widget["name"]) if isinstance(widget, dict) and "name" in widget else str(entry.get("name"))
                if entry.get("link") is None:
                    continue
                got = resolve(scope, node, name, entry["link"], entry.get("type"))
                if got is None:
                    continue
                if got[0] == "drop":
                    inputs.pop(name, None)
                    continue
                inputs[name] = got[1]
            title = node.get("title")
            prompt[scope.exec_id(nid)] = {
                "inputs": inputs,
                "class_type": kind,
                "_meta": {"title": title if isinstance(title, str) else display_name},
            }

    emit(root)
    # the page's last pass: an input linked to a node that is not sent (muted) is left out
    for entry in prompt.values():
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and value[0] not in prompt:
                del entry["inputs"][name]
    return prompt


def _parse_nodes(raw: Any, where: str) -> dict[str, dict[str, Any]]:
    if not isinstance(raw, list):
        raise WorkflowError(f"{where}: 'nodes' must be a list")
    nodes: dict[str, dict[str, Any]] = {}
    for k, node in enumerate(raw):
        if not isinstance(node, dict) or "id" not in node or not isinstance(node.get("type"), str):
            raise WorkflowError(f"{where}: node #{k} is malformed: want an object with 'id' and 'type'")
        nid = str(node["id"])
        if nid in nodes:
            raise WorkflowError(f"{where}: {_node_label(node)}: node id {nid} appears twice")
        nodes[nid] = node
    return nodes


def _collect_subgraphs(workflow: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """id -> definition of every subgraph of ``definitions.subgraphs``, those nested in a definition's own
    ``definitions`` too."""
    found: dict[str, dict[str, Any]] = {}
    pending: list[Any] = [workflow]
    while pending:
        holder = pending.pop()
        definitions = holder.get("definitions")
        raw = definitions.get("subgraphs") if isinstance(definitions, dict) else None
        if raw is None:
            continue
        if not isinstance(raw, list):
            raise WorkflowError("workflow 'definitions.subgraphs' must be a list")
        for k, sub in enumerate(raw):
            if (
                not isinstance(sub, dict)
                or not isinstance(sub.get("id"), str)
                or not isinstance(sub.get("nodes"), list)
            ):
                raise WorkflowError(f"subgraph definition #{k} is malformed: want an object with 'id' and 'nodes'")
            if sub["id"] not in found:
                found[sub["id"]] = sub
                pending.append(sub)
    return found


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _sub_name(subgraphs: dict[str, dict[str, Any]], key: str) -> str:
    name = subgraphs.get(key, {}).get("name")
    return name if isinstance(name, str) and name else key


def _io_slots(raw: Any, where: str, what: str) -> list[tuple[Any, Any, list[str]]]:
    """(name, type, link ids) of each of a subgraph's ``inputs`` / ``outputs`` (``linkIds``)."""
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(e, dict) for e in raw):
        raise WorkflowError(f"{where}: '{what}' must be a list of objects")
    out = []
    for k, entry in enumerate(raw):
        ids = entry.get("linkIds") or []
        if not isinstance(ids, list):
            raise WorkflowError(f"{where}: {what}[{k}].linkIds must be a list")
        out.append((entry.get("name"), entry.get("type"), [str(i) for i in ids]))
    return out


def _align(entries: list[dict[str, Any]], ios: list[tuple[Any, Any, list[str]]]) -> list[dict[str, Any]]:
    """The instance's input entry of each subgraph input ({} where it has none): the one of the same name and
    type, else of the same name (the page rebinds an instance's inputs so), else the one at the same index when
    the instance has as many inputs as the subgraph."""
    used: set[int] = set()
    out: list[dict[str, Any]] = []
    for k, (name, kind, _) in enumerate(ios):
        free = [j for j in range(len(entries)) if j not in used]
        pick = next((j for j in free if entries[j].get("name") == name and entries[j].get("type") == kind), None)
        if pick is None:
            pick = next((j for j in free if entries[j].get("name") == name), None)
        if pick is None and len(entries) == len(ios) and k in free:
            pick = k
        if pick is None:
            out.append({})
        else:
            used.add(pick)
            out.append(entries[pick])
    return out


def _signature(
    kind: str, object_info: dict[str, Any] | None
) -> tuple[list[tuple[str, list[str]]], list[tuple[str, str]], int] | None:
    """(value inputs with the extra widgets after each, link inputs (name, type), number of outputs) of a node
    type, or None when it is unknown."""
    definition = _definition(kind, object_info)
    if definition is None:
        return None
    values: list[tuple[str, list[str]]] = []
    for name in definition[1]:
        if name in (CONTROL, UPLOAD) and values:
            values[-1][1].append(name)
        else:
            values.append((name, []))
    widgets = {n for n, _ in values}
    links: list[tuple[str, str]] = []
    if object_info is not None:
        info = object_info[kind]
        raw_inputs = info.get("input")
        sections = raw_inputs if isinstance(raw_inputs, dict) else {}
        for section in ("required", "optional"):
            specs = sections.get(section)
            for name, spec in (specs if isinstance(specs, dict) else {}).items():
                if name not in widgets and isinstance(spec, list) and spec:
                    links.append((str(name), str(spec[0])))
        outputs = info.get("output")
        return values, links, len(outputs) if isinstance(outputs, list) else 0
    ndef = NODES[kind]
    ordered = [i for i in ndef.inputs if not i.optional] + [i for i in ndef.inputs if i.optional]
    links = [(i.name, i.type) for i in ordered if i.name not in widgets]
    return values, links, len(ndef.outputs)


def _expand_group(
    name: str,
    config: Any,
    instance: dict[str, Any],
    instance_inputs: list[dict[str, Any]],
    label: str,
    object_info: dict[str, Any] | None,
) -> tuple[
    dict[str, dict[str, Any]],
    dict[str, tuple[str, int, str, int, Any]],
    list[dict[str, Any]],
    list[list[str]],
    list[list[str]],
    dict[int, Any],
]:
    """A group node instance as a subgraph: (inner nodes, links, the instance's input entry of each group
    input, input link ids, output link ids, promoted values), laid out as the page's GroupNodeConfig builds the
    group node's definition: per inner node, its widgets not converted to inputs and its link inputs not linked
    inside the group; after all nodes, their converted widgets not linked inside (a widget and an input each)."""
    where = f"{label}: group node '{name}'"
    if not isinstance(config, dict) or not isinstance(config.get("nodes"), list):
        raise WorkflowError(f"{where}: its extra.groupNodes entry has no 'nodes' list")
    links_to: dict[int, dict[int, tuple[int, int]]] = {}
    links_from: dict[int, set[int]] = {}
    raw_links, raw_external = config.get("links") or [], config.get("external") or []
    if not isinstance(raw_links, list) or not isinstance(raw_external, list):
        raise WorkflowError(f"{where}: its 'links' and 'external' must be lists")
    for k, raw in enumerate(raw_links):
        try:
            src, sslot, tgt, tslot = raw[:4]
            if src is None:
                continue  # a link from outside the group: one of the group node's inputs
            src, sslot, tgt, tslot = int(src), int(sslot), int(tgt), int(tslot)
        except (TypeError, ValueError):
            raise WorkflowError(f"{where}: link #{k} is malformed: want [from, from_slot, to, to_slot, ...]") from None
        links_to.setdefault(tgt, {})[tslot] = (src, sslot)
        links_from.setdefault(src, set()).add(sslot)
    external = set()
    for ext in raw_external:
        if isinstance(ext, list) and len(ext) >= 2:
            external.add((str(ext[0]), str(ext[1])))
    raw_custom = config.get("config")
    custom_all: dict[str, Any] = raw_custom if isinstance(raw_custom, dict) else {}
    seen: dict[str, int] = {}

    def input_name(index: int, node: dict[str, Any], input_name: str) -> tuple[str, dict[str, Any]]:
        custom = _dict(_dict(_dict(custom_all.get(str(index))).get("input")).get(input_name))
        shown = next((e.get("label") for e in node.get("inputs") or [] if e.get("name") == input_name), None)
        result = custom.get("name") or shown or input_name
        key = result
        if result in seen:
            prefix = f"{node.get('title') or node['type']} "
            key = result = f"{prefix}{input_name}"
            if result in seen:
                result = f"{prefix}{seen[result]} {input_name}"
        seen[key] = seen.get(key, 1) + 1
        return result, custom

    nodes: dict[str, dict[str, Any]] = {}
    widgets: list[tuple[int, str]] = []  # the group node's widgets: (inner node, input) or (-1, CONTROL/UPLOAD)
    group_inputs: list[tuple[str, int, int, str | None]] = []  # (name, inner node, its input index, widget)
    deferred = []
    sigs = {}
    for i, node in enumerate(config["nodes"]):
        if not isinstance(node, dict) or not isinstance(node.get("type"), str):
            raise WorkflowError(f"{where}: node #{i} is malformed: want an object with 'type'")
        kind = node["type"]
        if kind in NOTES:
            continue
        if kind in (REROUTE, PRIMITIVE):
            raise WorkflowError(
                f"{where}: its {kind} (node #{i}) is not supported; convert the group node to nodes or a subgraph"
            )
        sig = _signature(kind, object_info)
        if sig is None:
            raise WorkflowError(f"{where}: node #{i} ({kind}): unknown node type")
        sigs[i] = sig
        values, slots, _ = sig
        own = node.get("inputs") or []
        if not isinstance(own, list) or not all(isinstance(e, dict) for e in own):
            raise WorkflowError(f"{where}: node #{i} ({kind}): inputs must be a list of objects")
        converted: dict[int, tuple[str, list[str]]] = {}
        for wname, extras in values:
            pos = next(
                (
                    p
                    for p, e in enumerate(own)
                    if isinstance(e, dict) and e.get("name") == wname and (e.get("widget") or {}).get("name") == wname
                ),
                -1,
            )
            if pos >= 0:
                converted[pos] = (wname, extras)
                continue
            input_name(i, node, wname)
            widgets += [(i, wname), *((-1, x) for x in extras)]
        inner_links = links_to.get(i, {})
        entries = []
        for k, (sname, stype) in enumerate(slots):
            typed = next((e.get("type") for e in own if isinstance(e, dict) and e.get("name") == sname), stype)
            entries.append({"name": sname, "type": typed, "link": None})
            if k in inner_links:
                continue
            gname, custom = input_name(i, node, sname)
            if custom.get("visible") is False:
                continue
            group_inputs.append((gname, i, k, None))
        for pos in sorted(converted):
            wname = converted[pos][0]
            entries.append({"name": wname, "type": None, "widget": {"name": wname}, "link": None})
        deferred.append((i, node, len(slots), [converted[p] for p in sorted(converted)], inner_links))
        nodes[str(i)] = {**node, "id": i, "inputs": entries}
    for i, node, first, converted_list, inner_links in deferred:
        for j, (wname, extras) in enumerate(converted_list):
            if first + j in inner_links:
                continue
            gname, _ = input_name(i, node, wname)
            group_inputs.append((gname, i, first + j, wname))
            widgets += [(i, wname), *((-1, x) for x in extras)]
    links: dict[str, tuple[str, int, str, int, Any]] = {}
    for tgt, by_slot in links_to.items():
        for tslot, (src, sslot) in by_slot.items():
            target = nodes.get(str(tgt))
            if target is None or str(src) not in nodes or not 0 <= tslot < len(target["inputs"]):
                raise WorkflowError(
                    f"{where}: an inner link {src}:{sslot} -> {tgt}:{tslot} names an absent node or input"
                )
            lid = f"inner{tgt}:{tslot}"
            links[lid] = (str(src), sslot, str(tgt), tslot, None)
            target["inputs"][tslot]["link"] = lid
    inputs: list[list[str]] = []
    for g, (_, i, pos, _) in enumerate(group_inputs):
        lid = f"in{g}"
        links[lid] = (SUBGRAPH_IN, g, str(i), pos, None)
        nodes[str(i)]["inputs"][pos]["link"] = lid
        inputs.append([lid])
    outputs: list[list[str]] = []
    for i, (_, _, count) in sigs.items():
        for slot in range(count):
            custom = _dict(_dict(_dict(custom_all.get(str(i))).get("output")).get(str(slot)))
            inside = slot in links_from.get(i, set()) and (str(i), str(slot)) not in external
            if custom.get("visible", not inside):
                lid = f"out{len(outputs)}"
                links[lid] = (str(i), slot, SUBGRAPH_OUT, len(outputs), None)
                outputs.append([lid])
    # the group node's widget values go to the inner nodes' widgets
    raw = instance.get("widgets_values") or []
    names = [w for _, w in widgets]
    trimmed = list(names)
    while trimmed and trimmed[-1] == UPLOAD:
        trimmed.pop()
    if not isinstance(raw, list) or len(raw) not in (len(names), len(trimmed)):
        shown = len(raw) if isinstance(raw, list) else "no list of"
        raise WorkflowError(
            f"{where}: {shown} widget values for its {len(names)} widgets ({', '.join(names) or 'none'})"
        )
    overrides: dict[int, dict[str, Any]] = {}
    for (i, wname), value in zip(widgets, raw, strict=False):
        if i >= 0:
            overrides.setdefault(i, {})[wname] = value
    for key, inner in nodes.items():
        known = _definition(inner["type"], object_info)
        base = _widget_values(inner, known[1] if known else [], f"{where}: node #{key} ({inner['type']})")
        inner["widgets_values"] = {**base, **overrides.get(int(key), {})}
    promoted = {
        g: overrides[i][w] for g, (_, i, _, w) in enumerate(group_inputs) if w is not None and w in overrides.get(i, {})
    }
    # the instance's inputs in the group's order: by name, else by position
    ordered = _align(instance_inputs, [(gname, None, []) for gname, *_ in group_inputs])
    return nodes, links, ordered, inputs, outputs, promoted


def _optional_widgets(kind: str, object_info: dict[str, Any] | None) -> int:
    """How many widgets of a node type come from its optional inputs (the last ones of :func:`widget_names`)."""
    if object_info is not None:
        info = object_info.get(kind)
        if not isinstance(info, dict):
            return 0
        raw = info.get("input")
        optional = raw.get("optional") if isinstance(raw, dict) else None
        if not isinstance(optional, dict):
            return 0
        order = info.get("input_order")
        listed = order.get("optional") if isinstance(order, dict) else None
        part = {"input": {"optional": optional}, "input_order": {"optional": listed}} if listed else {
            "input": {"optional": optional}}  # fmt: skip
        return len(widget_names_from_info(part))
    ndef = NODES.get(kind)
    if ndef is None:
        return 0
    return len(widget_names(replace(ndef, inputs=tuple(i for i in ndef.inputs if i.optional))))


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
