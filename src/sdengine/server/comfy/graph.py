"""A ComfyUI API-format prompt: validation (ComfyUI's error shape), order, and execution with a cache.

A prompt is ``{node_id: {"class_type": str, "inputs": {name: value | [node_id, output_index]}}}``.
:func:`validate` checks every node the output nodes depend on (unknown class, missing input, wrong value
type or range, value not in a list, dangling link, link of the wrong type, cycle) and answers ComfyUI's
``{"error": {...}, "node_errors": {id: {"errors": [...], "dependent_outputs": [...], "class_type": ...}}}``.
:class:`Executor` runs the nodes in topological order; a node whose class and inputs (recursively) are
those of a node of the previous prompt is not run again, its outputs are reused (ComfyUI's
``execution_cached``).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from sdengine.errors import SdengineError
from sdengine.server.comfy.nodes import (
    ANY_TYPE,
    Input,
    NodeDef,
    NodeError,
    RunContext,
    choices_of,
    input_max,
    input_spec,
)
from sdengine.server.comfy.registry import NODES

Prompt = dict[str, dict[str, Any]]


class PromptInvalid(SdengineError, ValueError):
    """A prompt that failed validation; ``body`` is ComfyUI's 400 answer."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(body["error"]["message"])
        self.body = body


class NodeFailed(SdengineError):
    """A node raised while running: names the node; ``executed``: the nodes this prompt ran before it (not
    those reused from the cache, as ComfyUI counts them); ``inputs``: the node's inputs, shown as ComfyUI's
    ``current_inputs``; ``cached``: the nodes whose outputs the prompt reused (ComfyUI's ``current_outputs``)."""

    def __init__(
        self,
        node_id: str,
        class_type: str,
        exc: BaseException,
        executed: list[str] | None = None,
        inputs: dict[str, list[Any]] | None = None,
        cached: list[str] | None = None,
    ) -> None:
        super().__init__(f"node {node_id} ({class_type}): {exc}")
        self.node_id = node_id
        self.class_type = class_type
        self.exc = exc
        self.executed = list(executed or [])
        self.inputs = dict(inputs or {})
        self.cached = list(cached or [])
        self.outputs: dict[str, Any] = {}  # the UI outputs of the output nodes run (or reused) before it


class Interrupted(SdengineError):
    """The prompt was stopped at ``node_id``; ``executed``: the nodes it ran before (see NodeFailed)."""

    def __init__(self, node_id: str | None, class_type: str | None, executed: list[str] | None = None) -> None:
        super().__init__("interrupted")
        self.node_id = node_id
        self.class_type = class_type
        self.executed = list(executed or [])
        self.outputs: dict[str, Any] = {}  # see NodeFailed


def _with_outputs(e: NodeFailed | Interrupted, outputs: dict[str, Any]) -> NodeFailed | Interrupted:
    e.outputs = dict(outputs)
    return e


def is_link(v: Any) -> bool:
    return (
        isinstance(v, list)
        and len(v) == 2
        and isinstance(v[0], str | int)
        and isinstance(v[1], int)
        and not isinstance(v[1], bool)
    )


MAX_TEXT = 32000  # characters of a STRING input (a prompt): the longest prompt any route of the server takes


def _err(kind: str, message: str, details: str = "", **extra: Any) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


def _received(value: Any) -> Any:
    """``received_value`` of an error: the value as sent (ComfyUI's), its short text when it is long or a list."""
    if isinstance(value, float) and not math.isfinite(value):  # NaN, Infinity: no JSON number (the answer once
        return repr(value)  # failed to render: a 500 and the connection dropped)
    if value is None or isinstance(value, bool | int | float) or (isinstance(value, str) and len(value) <= 200):
        return value
    return repr(value)[:200]


def _convert(
    inp: Input, value: Any, env: Any, choices_cache: dict[Any, list[str]] | None = None
) -> tuple[Any, dict[str, Any] | None]:
    """A literal input value converted as ComfyUI does, or an error entry."""
    name = inp.name
    received = value
    try:
        if inp.type == "INT":
            if isinstance(value, bool):
                raise ValueError
            value = int(value)  # as ComfyUI's validation (int()): a number such as 2.7 is truncated to 2
        elif inp.type == "FLOAT":
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
            if not math.isfinite(value):
                raise ValueError
        elif inp.type == "STRING":
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise ValueError
            value = str(value)
            value.encode("utf-8")  # a lone surrogate is not text (UnicodeEncodeError, a ValueError)
        elif inp.type == "BOOLEAN":
            if not isinstance(value, bool):
                raise ValueError
    except (ValueError, TypeError, OverflowError):
        return None, _err(
            "invalid_input_type",
            f"Failed to convert an input value to a {inp.type} value",
            f"{name}, {received!r}",
            input_name=name,
            input_config=input_spec(inp, env, []),
            received_value=_received(received),
        )
    if inp.type == "STRING" and len(value) > MAX_TEXT:
        # a prompt of megabytes (the body limit allows 50 MB) once went to the text encoder as it was: thousands of
        # 75-token chunks, a conditioning the sampler's attention cannot hold
        return None, _err(
            "value_too_long",
            f"Value of {len(value)} characters longer than max of {MAX_TEXT}",
            f"{name}",
            input_name=name,
            input_config=input_spec(inp, env),
            received_value=_received(value),
        )
    if inp.type in ("INT", "FLOAT"):
        if inp.min is not None and value < inp.min:
            return None, _err(
                "value_smaller_than_min",
                f"Value {value} smaller than min of {inp.min}",
                f"{name}",
                input_name=name,
                input_config=input_spec(inp, env),
                received_value=value,
            )
        top = input_max(inp, env)
        if top is not None and value > top:
            return None, _err(
                "value_bigger_than_max",
                f"Value {value} bigger than max of {top}",
                f"{name}",
                input_name=name,
                input_config=input_spec(inp, env),
                received_value=value,
            )
    if inp.type == "COMBO":
        # each list is made once per prompt (the input folder's files were once listed again for every LoadImage)
        cache = {} if choices_cache is None else choices_cache
        if inp.choices not in cache:
            cache[inp.choices] = choices_of(inp, env)
        choices = cache[inp.choices]
        if isinstance(value, str) and value not in choices:
            # ComfyUI lists model files with their suffix ("x.safetensors"), sdengine some without ("x"): a
            # workflow written for either names the same file
            other = value[: -len(".safetensors")] if value.endswith(".safetensors") else value + ".safetensors"
            value = other if other in choices else value
        if (
            isinstance(value, str)
            and value not in choices
            and inp.also_valid is not None
            and inp.also_valid(env, value)
        ):
            return value, None
        if not isinstance(value, str) or value not in choices:
            shown = ", ".join(choices[:20]) + (", ..." if len(choices) > 20 else "")
            return None, _err(
                "value_not_in_list",
                "Value not in list",
                f"{name}: '{value}' not in [{shown}]",
                input_name=name,
                input_config=input_spec(inp, env, choices),
                received_value=_received(value),
            )
    return value, None


def output_nodes(prompt: Prompt) -> list[str]:
    return [
        i
        for i, n in prompt.items()
        if isinstance(n, dict) and n.get("class_type") in NODES and NODES[n["class_type"]].output_node
    ]


def validate(prompt: Any, env: Any, targets: list[str] | None = None) -> tuple[Prompt, list[str], dict[str, Any]]:
    """(the prompt with literal inputs converted, the output node ids to run, node errors); PromptInvalid if
    no output can run. As ComfyUI: ``targets`` (``partial_execution_targets``) keeps only the output nodes it
    names; an output whose nodes have errors is left out while the others run (the node errors returned list
    its errors), and the prompt fails only when no output is left."""

    def fail(error: dict[str, Any], node_errors: dict[str, Any] | None = None) -> PromptInvalid:
        return PromptInvalid({"error": error, "node_errors": node_errors or {}})

    if not isinstance(prompt, dict) or not prompt:
        raise fail(_err("invalid_prompt", "The prompt must be an object of nodes: {id: {class_type, inputs}}"))
    node_errors: dict[str, Any] = {}
    for nid, node in prompt.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            raise fail(
                _err("invalid_prompt", f"Cannot execute because node {nid} has no class_type.", f"Node ID '#{nid}'"),
                {
                    str(nid): {
                        "errors": [_err("invalid_prompt", "Node has no class_type")],
                        "dependent_outputs": [],
                        "class_type": None,
                    }
                },
            )
        if node["class_type"] not in NODES:
            ct = node["class_type"]
            raise fail(
                _err("invalid_prompt", f"Cannot execute because node {ct} does not exist.", f"Node ID '#{nid}'"),
                {
                    str(nid): {
                        "errors": [
                            _err("missing_node_type", f"Node '{ct}' not found", f"Node ID '#{nid}'", class_type=ct)
                        ],
                        "dependent_outputs": [],
                        "class_type": ct,
                    }
                },
            )
        if not isinstance(node.get("inputs", {}), dict):
            raise fail(_err("invalid_prompt", f"Node {nid}: inputs must be an object", f"Node ID '#{nid}'"))
    outputs = [o for o in output_nodes(prompt) if targets is None or o in targets]
    if not outputs:
        raise fail(_err("prompt_no_outputs", "Prompt has no outputs", "add a SaveImage or PreviewImage node"))

    # Every node the outputs depend on, each checked once; links to absent nodes and cycles found here.
    converted: Prompt = {}
    choices_cache: dict[Any, list[str]] = {}
    dependents: dict[str, set[str]] = {}

    def add(nid: str, kind: str, message: str, details: str, **extra: Any) -> None:
        entry = node_errors.setdefault(
            nid, {"errors": [], "dependent_outputs": [], "class_type": prompt[nid]["class_type"]}
        )
        entry["errors"].append(_err(kind, message, details, **extra))

    def check(nid: str) -> list[str]:
        """Check node ``nid``'s inputs (errors into node_errors), keep it converted; its valid links."""
        node = prompt[nid]
        ndef: NodeDef = NODES[node["class_type"]]
        inputs = node.get("inputs", {})
        values: dict[str, Any] = {}
        links: list[str] = []
        for inp in ndef.inputs:
            if inp.name not in inputs:
                if not inp.optional:
                    add(nid, "required_input_missing", "Required input is missing", inp.name, input_name=inp.name)
                continue
            v = inputs[inp.name]
            if is_link(v):
                src = str(v[0])
                if src not in prompt:
                    add(
                        nid,
                        "invalid_link",
                        "Input links to a node that is not in the prompt",
                        f"{inp.name} -> node '{src}'",
                        input_name=inp.name,
                        linked_node=src,
                    )
                    continue
                src_def = NODES.get(prompt[src].get("class_type"))
                if src_def is None:
                    continue
                if not 0 <= v[1] < len(src_def.outputs):
                    add(
                        nid,
                        "invalid_link",
                        "Input links to an output the node does not have",
                        f"{inp.name} -> node '{src}' output {v[1]} ({src_def.name} has {len(src_def.outputs)})",
                        input_name=inp.name,
                        linked_node=src,
                    )
                    continue
                got = src_def.outputs[v[1]]
                want = inp.type if inp.is_link_type else inp.type
                if got != want and want != ANY_TYPE:  # ComfyUI's "*" input (PreviewAny's) takes any output
                    add(
                        nid,
                        "return_type_mismatch",
                        "Return type mismatch between linked nodes",
                        f"{inp.name}, received_type({got}) mismatch input_type({want})",
                        input_name=inp.name,
                        received_type=got,
                        linked_node=src,
                    )
                    continue
                values[inp.name] = [src, v[1]]
                links.append(src)
            elif inp.is_link_type:
                add(
                    nid,
                    "invalid_input_type",
                    f"Input must be a link to a {inp.type} output",
                    f"{inp.name}, got {repr(v)[:100]}",
                    input_name=inp.name,
                )
            else:
                value, error = _convert(inp, v, env, choices_cache)
                if error is not None:
                    node_errors.setdefault(
                        nid, {"errors": [], "dependent_outputs": [], "class_type": node["class_type"]}
                    )["errors"].append(error)
                else:
                    values[inp.name] = value
        converted[nid] = {"class_type": node["class_type"], "inputs": values, "_links": links}
        return links

    # Depth-first from each output with an explicit stack (a chain of thousands of nodes is no recursion limit);
    # each node is checked once, a link back to a node on the current path is a cycle.
    state: dict[str, int] = {}  # 1: on the path, 2: done
    for out in outputs:
        if state.get(out) == 2:
            continue
        state[out] = 1
        path, stack = [out], [iter(check(out))]
        while stack:
            src = next(stack[-1], None)
            if src is None:
                stack.pop()
                state[path.pop()] = 2
                continue
            if state.get(src) == 2:
                continue
            if state.get(src) == 1:
                cycle = path[path.index(src) :] + [src]
                add(src, "dependency_cycle", "Dependency cycle detected", " -> ".join(f"#{c}" for c in cycle))
                continue
            state[src] = 1
            path.append(src)
            stack.append(iter(check(src)))
    # Which outputs each node serves: one walk per output, each node once (a graph of shared inputs, a diamond
    # upon a diamond, was once walked once per path: 2**depth steps).
    for out in outputs:
        seen, todo = {out}, [out]
        while todo:
            n = todo.pop()
            dependents.setdefault(n, set()).add(out)
            for src in converted.get(n, {}).get("_links", []):
                if src not in seen:
                    seen.add(src)
                    todo.append(src)
    for nid, entry in node_errors.items():
        entry["dependent_outputs"] = sorted(dependents.get(nid, ()))
    bad = {o for entry in node_errors.values() for o in entry["dependent_outputs"]}
    good = [o for o in outputs if o not in bad]
    if not good:
        details = "\n".join(f"{e['message']}: {e['details']}" for n in node_errors.values() for e in n["errors"])
        raise fail(_err("prompt_outputs_failed_validation", "Prompt outputs failed validation", details), node_errors)
    graph = {nid: node for nid, node in converted.items() if dependents.get(nid, set()) & set(good)}
    return graph, good, node_errors


def topological_order(graph: Prompt) -> list[str]:
    """Kahn's order, ties broken by node id (numbers numerically), so that runs are reproducible."""

    def key(n: str) -> tuple[int, Any]:
        return (0, int(n)) if n.isascii() and n.isdigit() else (1, n)  # "²" is a digit int() refuses

    indeg = {n: len(set(graph[n]["_links"])) for n in graph}
    users: dict[str, list[str]] = {n: [] for n in graph}
    for n in graph:
        for src in set(graph[n]["_links"]):
            users[src].append(n)
    # a heap of the ready nodes (re-sorting a list at each step took minutes for a node read by 20000 others)
    ready = [(key(n), n) for n, d in indeg.items() if d == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, n = heapq.heappop(ready)
        order.append(n)
        for u in users[n]:
            indeg[u] -= 1
            if indeg[u] == 0:
                heapq.heappush(ready, (key(u), u))
    return order


def _shown(value: Any) -> Any:
    """An input value as ComfyUI's ``current_inputs`` shows it: plain values as they are, others as short text."""
    if value is None or isinstance(value, bool | int | float | str):
        return value if not isinstance(value, str) or len(value) <= 1000 else value[:1000] + "..."
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


class _Limits:
    """The server's limits as ``input_max`` reads them (``env.limits``), from a prompt's run context."""

    def __init__(self, ctx: RunContext) -> None:
        self.limits = {"side": ctx.max_side, "steps": ctx.max_steps, "batch": ctx.max_batch}


def _check_linked(ndef: NodeDef, inputs: dict[str, Any], kwargs: dict[str, Any], ctx: RunContext) -> None:
    if ndef.input_is_list:  # each element of a list checked as a single value
        for name, v in inputs.items():
            if isinstance(v, list):
                items = list(kwargs[name])
                for j, item in enumerate(items):
                    one = {name: item}
                    _check_one(ndef, {name: v}, one, ctx)
                    items[j] = one[name]
                kwargs[name] = items
        return
    _check_one(ndef, inputs, kwargs, ctx)


def _check_one(ndef: NodeDef, inputs: dict[str, Any], kwargs: dict[str, Any], ctx: RunContext) -> None:
    """A value that reached a widget input (INT, FLOAT, STRING, BOOLEAN) through a link (a PrimitiveInt,
    GetImageSize's width) converted and checked as a literal is at validation (type, min, max, the server's
    limits, text length); a bad one fails the node in one line. ComfyUI checks only literals, passing a linked
    value through unchecked (a seed of -1, 0 steps reached the sampler)."""
    for name, v in inputs.items():
        inp = ndef.input(name)
        if not isinstance(v, list) or inp is None or inp.type not in ("INT", "FLOAT", "STRING", "BOOLEAN"):
            continue
        value, error = _convert(inp, kwargs[name], _Limits(ctx))
        if error is not None:
            raise NodeError(f"linked input {name}: {error['message']} ({_received(kwargs[name])!r})")
        kwargs[name] = value


@dataclass
class CacheEntry:
    """A node's outputs kept for the next prompt. ``lists``: each output as ComfyUI holds it, the list of what the
    node's calls returned (one element when it ran once on single values; an OUTPUT_IS_LIST output's lists joined);
    ``outputs``: each output's one value where its list has one element, else the list."""

    signature: str
    outputs: tuple[Any, ...]
    ui: dict[str, Any] | None
    lists: tuple[list[Any], ...] = ()


def _single(lists: tuple[list[Any], ...]) -> tuple[Any, ...]:
    return tuple(v[0] if len(v) == 1 else v for v in lists)


def _merge_ui(uis: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The UI outputs of a node's calls as ComfyUI joins them: each key's lists one after the other (a SaveImage
    run once per list element reports every image it saved)."""
    if not uis:
        return None
    if len(uis) == 1:
        return uis[0]
    merged: dict[str, Any] = {}
    for ui in uis:
        for k, v in ui.items():
            merged.setdefault(k, []).extend(v if isinstance(v, list | tuple) else [v])
    return merged


def node_calls(ndef: NodeDef, lists: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The keyword sets a node is called with (ComfyUI's ``_map_node_over_list``): an INPUT_IS_LIST node once with
    the whole lists; any other once per element of its longest input list, a shorter list giving its last
    element again; a node without inputs once."""
    for name, v in lists.items():
        if not v:
            raise NodeError(f"input {name} is an empty list: nothing to run the node on")
    if ndef.input_is_list:
        return [dict(lists)]
    n = max((len(v) for v in lists.values()), default=1)
    return [{k: v[min(i, len(v) - 1)] for k, v in lists.items()} for i in range(n)]


def _merge_results(ndef: NodeDef, results: list[tuple[Any, ...]]) -> tuple[list[Any], ...]:
    """Each output's list over the calls (ComfyUI's ``merge_result_data``): an OUTPUT_IS_LIST output's lists
    joined, any other's values one per call."""
    count = len(results[0]) if results else 0
    merged: list[list[Any]] = []
    for i in range(count):
        if ndef.is_list_output(i):
            value: list[Any] = []
            for r in results:
                if not isinstance(r[i], list | tuple):
                    raise NodeError(f"output {i} should be a list, got {type(r[i]).__name__}")
                value.extend(r[i])
            merged.append(value)
        else:
            merged.append([r[i] for r in results])
    return tuple(merged)


@dataclass
class Executor:
    """Runs validated prompts; keeps the outputs of the last prompt's nodes for the next (one per app)."""

    cache: dict[str, CacheEntry] = field(default_factory=dict)

    def clear(self) -> None:
        self.cache = {}

    @staticmethod
    def signatures(graph: Prompt, ctx: RunContext | None = None) -> dict[str, str]:
        """Each node's cache key: its class, literal inputs, the keys of the nodes it reads, and (with ``ctx``)
        what its ``changed`` hook says of the files it reads and the prompt's seed rule."""
        sig: dict[str, str] = {}
        for nid in topological_order(graph):
            node = graph[nid]
            parts = {
                k: (["link", sig[str(v[0])], v[1]] if isinstance(v, list) else v)
                for k, v in sorted(node["inputs"].items())
            }
            hook = NODES[node["class_type"]].changed if node["class_type"] in NODES else None
            changed = hook(ctx, node["inputs"]) if hook is not None and ctx is not None else ""
            rule = ctx.seed_rule if ctx is not None else ""  # another seed rule draws other noise: not the same node
            text = json.dumps([node["class_type"], parts, changed, rule], sort_keys=True, default=str)
            sig[nid] = hashlib.sha256(text.encode()).hexdigest()
        return sig

    def run(
        self,
        graph: Prompt,
        ctx: RunContext,
        *,
        cancelled: Callable[[], bool],
        event: Callable[[str, dict[str, Any]], None],
    ) -> dict[str, dict[str, Any]]:
        """Run ``graph``; ``event(name, data)`` for executing / executed / execution_cached. Returns the
        output nodes' UI outputs ``{node_id: {"images": [...]}}``. Raises NodeFailed or Interrupted."""
        order = topological_order(graph)
        sig = self.signatures(graph, ctx)
        values: dict[str, tuple[list[Any], ...]] = {}  # each output as a list, ComfyUI's way (see node_calls)
        cached = [n for n in order if n in self.cache and self.cache[n].signature == sig[n]]
        event("execution_cached", {"nodes": cached})
        executed: list[str] = []  # the nodes run (not reused) so far: ComfyUI's `executed` of an error
        ui_outputs: dict[str, dict[str, Any]] = {}
        new_cache: dict[str, CacheEntry] = {}
        for nid in order:
            node = graph[nid]
            ct = node["class_type"]
            if nid in cached:
                entry = self.cache[nid]
                values[nid] = entry.lists or tuple([v] for v in entry.outputs)
                new_cache[nid] = entry
                if entry.ui is not None:  # as ComfyUI: a cached output node still tells its client its images
                    ui_outputs[nid] = entry.ui
                    event("executed", {"node": nid, "display_node": nid, "output": entry.ui})
                continue
            if cancelled():
                raise _with_outputs(Interrupted(nid, ct, executed), ui_outputs)
            event("executing", {"node": nid, "display_node": nid})
            ndef = NODES[ct]
            lists = {k: (values[str(v[0])][v[1]] if isinstance(v, list) else [v]) for k, v in node["inputs"].items()}
            ctx.current_node = nid
            kwargs: dict[str, Any] = {}
            results: list[tuple[Any, ...]] = []
            uis: list[dict[str, Any]] = []
            try:
                for i, kwargs in enumerate(node_calls(ndef, lists)):
                    if i and cancelled():
                        raise Interrupted(nid, ct)
                    _check_linked(ndef, node["inputs"], kwargs, ctx)
                    result = ndef.fn(ctx, **kwargs)
                    if isinstance(result, dict):
                        if result.get("ui") is not None:
                            uis.append(result["ui"])
                        result = tuple(result.get("result", ()))
                    results.append(tuple(result))
                merged = _merge_results(ndef, results)
            except Interrupted as e:
                raise _with_outputs(Interrupted(e.node_id, e.class_type, executed), ui_outputs) from None
            except Exception as e:  # noqa: BLE001 - every failure is reported with its node
                from sdengine.latent_sampling import SamplingStopped

                if isinstance(e, SamplingStopped) or cancelled():
                    raise _with_outputs(Interrupted(nid, ct, executed), ui_outputs) from None
                self.cache = new_cache | {k: v for k, v in self.cache.items() if k not in new_cache}
                shown = {k: [_shown(x) for x in v] for k, v in lists.items()}
                raise _with_outputs(NodeFailed(nid, ct, e, executed, shown, cached), ui_outputs) from e
            ui = _merge_ui(uis)
            values[nid] = merged
            executed.append(nid)
            new_cache[nid] = CacheEntry(sig[nid], _single(merged), ui, merged)
            if ui is not None:
                ui_outputs[nid] = ui
                event("executed", {"node": nid, "display_node": nid, "output": ui})
        self.cache = new_cache
        return ui_outputs


__all__ = ["Executor", "Interrupted", "NodeError", "NodeFailed", "PromptInvalid", "topological_order", "validate"]
