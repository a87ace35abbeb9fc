"""``sdengine comfy run|convert``: ComfyUI workflows without a server.

``run WORKFLOW``: an API-format ``.json``, a UI-format ``.json`` (converted by
:mod:`sdengine.server.comfy.workflow`) or a ComfyUI PNG (its ``prompt`` text, else its ``workflow`` text) is
validated and executed in this process by the same graph executor ``sdengine serve``'s ``POST /prompt`` uses
(:mod:`sdengine.server.comfy.graph`, ComfyUI's seed rule), and every SaveImage image is written to ``--out``, one
line per image on stdout. ``convert UI.json -o API.json``: the API-format prompt of a UI-format workflow.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

# The limits of a run on the command line: the nodes' own bounds (the server's --max-side, --max-steps and
# --max-batch-size do not apply to a local run)
MAX_SIDE = 16384
MAX_STEPS = 10000
MAX_BATCH = 64


class _Env:
    """What validation reads (the server's ``routes.Env``): the catalog, the folders, no server limits."""

    def __init__(self, catalog: Any, folders: Any) -> None:
        self.catalog = catalog
        self.folders = folders
        self.limits: dict[str, int] = {}


def _one_line_invalid(e: Any) -> str:
    """A PromptInvalid's body as one line: the message, then each node's first error with its id and type."""
    body = e.body
    parts = [str(body["error"]["message"])]
    for nid, entry in sorted(body.get("node_errors", {}).items()):
        errors = entry.get("errors") or [{}]
        first = errors[0]
        detail = f"{first.get('message', '')}: {first.get('details', '')}".strip(": ")
        parts.append(f"node {nid} ({entry.get('class_type')}): {detail}")
    if len(parts) == 1 and body["error"].get("details"):
        parts.append(str(body["error"]["details"]))
    return "; ".join(" ".join(p.split()) for p in parts)


def run_workflow(
    workflow: str | Path,
    out: str | Path,
    *,
    models_dir: Path | None = None,
    loras_dir: Path | None = None,
    controlnets_dir: Path | None = None,
    vaes_dir: Path | None = None,
    upscalers_dir: Path | None = None,
    clip_vision_dir: Path | None = None,
    ip_adapters_dir: Path | None = None,
    input_dir: Path | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    loader: Any = None,
    progress: bool = False,
) -> list[Path]:
    """Run a workflow file; the paths of the images its SaveImage nodes wrote (in the order of the nodes).
    ``progress``: a bar on stderr per sampling node."""
    from ..server.catalog import Catalog
    from ..server.comfy.graph import Executor, PromptInvalid, validate
    from ..server.comfy.nodes import Outputs, RunContext
    from ..server.comfy.workflow import WorkflowError, read_workflow_file

    prompt, ui = read_workflow_file(workflow)
    for folder, flag in (
        (models_dir, "--models-dir"),
        (loras_dir, "--loras-dir"),
        (controlnets_dir, "--controlnets-dir"),
        (vaes_dir, "--vaes-dir"),
        (upscalers_dir, "--upscalers-dir"),
        (clip_vision_dir, "--clip-vision-dir"),
        (ip_adapters_dir, "--ip-adapters-dir"),
        (input_dir, "--input-dir"),
    ):
        if folder is not None and not Path(folder).is_dir():
            raise WorkflowError(f"{flag} {folder}: no such folder")
    out = Path(out)
    catalog = Catalog(
        models_dir,
        loras_dir,
        controlnets_dir,
        vaes_dir=vaes_dir,
        upscalers_dir=upscalers_dir,
        clip_vision_dir=clip_vision_dir,
        ip_adapters_dir=ip_adapters_dir,
    )
    pipes: dict[str, Any] = {}

    def pipeline(ref: str) -> Any:
        if ref not in pipes:
            if loader is not None:
                pipes[ref] = loader(ref, device)
            else:
                from ..pipeline import load_pipeline

                pipes[ref] = load_pipeline(ref, device=device, dtype=dtype)
        return pipes[ref]

    with tempfile.TemporaryDirectory(prefix="sdengine-comfy-") as temp:
        folders = Outputs(out, Path(input_dir) if input_dir is not None else out / "input", Path(temp))
        try:
            graph, outputs, node_errors = validate(prompt, _Env(catalog, folders))
        except PromptInvalid as e:
            raise WorkflowError(_one_line_invalid(e)) from None
        for nid, entry in sorted(node_errors.items()):  # outputs left out while the others run, as ComfyUI
            first = (entry.get("errors") or [{}])[0]
            print(
                f"sdengine: warning: node {nid} ({entry.get('class_type')}): {first.get('message')}: "
                f"{first.get('details')}; its outputs are skipped",
                file=sys.stderr,
            )
        bars: dict[str | None, Any] = {}

        def show(step: int, steps: int, denoised: Any) -> bool:
            from tqdm.auto import tqdm

            node = ctx.current_node
            bar = bars.get(node)
            if bar is None or bar.total != steps or step < bar.n:
                if bar is not None:
                    bar.close()
                label = f"node {node} ({graph.get(str(node), {}).get('class_type')})"
                bar = bars[node] = tqdm(total=steps, desc=label, file=sys.stderr, leave=False)
            bar.update(step - bar.n)
            return True

        ctx = RunContext(
            pipeline=pipeline,
            progress=show if progress else None,
            catalog=catalog,
            folders=folders,
            seed_rule="comfyui",
            prompt=prompt,
            extra_pnginfo={"workflow": ui} if ui is not None else {},
            save_lock=threading.Lock(),
            max_steps=MAX_STEPS,
            max_side=MAX_SIDE,
            max_batch=MAX_BATCH,
            device=device,
        )
        try:
            results = Executor().run(graph, ctx, cancelled=lambda: False, event=lambda name, data: None)
        finally:
            for bar in bars.values():
                bar.close()
    paths: list[Path] = []
    for nid in outputs:
        for im in (results.get(nid) or {}).get("images", []):
            if im.get("type") == "output":
                paths.append(out / im["subfolder"] / im["filename"] if im["subfolder"] else out / im["filename"])
    return paths


def cmd_run(a: argparse.Namespace) -> int:
    from ..devices import resolve_device

    paths = run_workflow(
        a.workflow,
        a.out,
        models_dir=a.models_dir,
        loras_dir=a.loras_dir,
        controlnets_dir=a.controlnets_dir,
        vaes_dir=a.vaes_dir,
        upscalers_dir=a.upscalers_dir,
        clip_vision_dir=a.clip_vision_dir,
        ip_adapters_dir=a.ip_adapters_dir,
        input_dir=a.input_dir,
        device=str(resolve_device(a.device)),
        dtype=a.dtype,
        progress=not a.no_progress and sys.stderr.isatty(),
    )
    for p in paths:
        print(p)
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    from ..server.comfy.workflow import read_workflow_file

    object_info = None
    if a.object_info is not None:
        from ..server.comfy.workflow import WorkflowError

        try:
            object_info = json.loads(Path(a.object_info).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise WorkflowError(f"--object-info {a.object_info}: not JSON ({e})") from None
        if not isinstance(object_info, dict):
            raise WorkflowError(f"--object-info {a.object_info}: want GET /object_info's body, {{name: node}}")
    prompt, _ = read_workflow_file(a.workflow, object_info)
    text = json.dumps(prompt, indent=2, ensure_ascii=False) + "\n"
    if a.output in (None, "-"):
        sys.stdout.write(text)
    else:
        from ..io.atomic import write_text_atomic

        write_text_atomic(a.output, text)
        print(a.output)
    return 0


def register(sub: argparse._SubParsersAction, train: argparse._SubParsersAction | None = None) -> None:
    c = sub.add_parser(
        "comfy",
        help="run or convert a ComfyUI workflow (API or UI format, or a ComfyUI PNG) without a server",
        description="ComfyUI workflows on the command line (docs/comfyui.md).",
    )
    csub = c.add_subparsers(dest="what", required=True)
    r = csub.add_parser(
        "run",
        help="run a workflow: an API-format .json, a UI-format .json or a ComfyUI PNG",
        description="Validate and run a ComfyUI workflow in this process with the executor of `sdengine serve`'s "
        "POST /prompt; its SaveImage images go to --out, one line per image.",
    )
    r.add_argument("workflow", type=Path, help="API-format .json, UI-format .json, or a PNG with ComfyUI's text")
    r.add_argument("--out", type=Path, default=Path("outputs"), help="SaveImage's output folder")
    r.add_argument("--models-dir", type=Path, default=None, help="checkpoints CheckpointLoaderSimple may name")
    r.add_argument("--loras-dir", type=Path, default=None, help="LoRA files LoraLoader may name")
    r.add_argument("--controlnets-dir", type=Path, default=None, help="ControlNets ControlNetLoader may name")
    r.add_argument("--vaes-dir", type=Path, default=None, help="VAEs VAELoader may name")
    r.add_argument("--upscalers-dir", type=Path, default=None, help="upscaler models UpscaleModelLoader may name")
    r.add_argument("--clip-vision-dir", type=Path, default=None, help="CLIP vision encoders CLIPVisionLoader may name")
    r.add_argument("--ip-adapters-dir", type=Path, default=None, help="IP-Adapter files the IP-Adapter nodes may name")
    r.add_argument("--input-dir", type=Path, default=None, help="LoadImage's folder (default: OUT/input)")
    r.add_argument("--device", default="auto")
    r.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: the device's)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars (shown only on a terminal anyway)")
    r.set_defaults(func=cmd_run)
    v = csub.add_parser(
        "convert",
        help="write the API-format prompt of a UI-format workflow (or of a ComfyUI PNG)",
        description="Convert a ComfyUI UI-format workflow (what its page saves) to the API format POST /prompt "
        "takes, as ComfyUI's page does when it queues it.",
    )
    v.add_argument("workflow", type=Path, help="UI-format .json (an API-format one is written as it is)")
    v.add_argument("-o", "--output", default=None, help="the API-format .json to write (default: stdout)")
    v.add_argument(
        "--object-info",
        default=None,
        help="the nodes' definitions: a saved GET /object_info body (of a ComfyUI server, custom nodes included) "
        "instead of sdengine's own nodes",
    )
    v.set_defaults(func=cmd_convert)
