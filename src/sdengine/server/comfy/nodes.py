"""The ComfyUI nodes sdengine runs: their inputs (for validation and ``/object_info``) and what they do.

Each node is a :class:`NodeDef`: typed inputs (with defaults, ranges and choices as ComfyUI describes
them), output types, and a function ``fn(ctx, **inputs) -> tuple`` (or ``{"result": tuple, "ui": {...}}``
for output nodes). Every function maps onto the engine's own public functions: the pipeline's text
encoding, :func:`sdengine.latent_sampling.sample_latents` (the engine's samplers), :mod:`sdengine.vae_utils`,
:mod:`sdengine.control` and LoRA application. Values passed between nodes:

* MODEL / CLIP / VAE: handles naming the loaded checkpoint (plus LoRAs and clip skip), never a copy of it (a VAE
  handle may also name the server's tiny VAE, VAELoader's "taesd");
* CONDITIONING: a list of :class:`sdengine.latent_sampling.TextCondition`;
* LATENT: ``{"samples": (B, C, h, w) | None, "size": (B, H, W), "posterior": (mean, std) | None (with
  ``"posterior_scaled": True`` when it is a tiny VAE's, in the diffusion model's units),
  "noise_mask": (B, 1, H, W) | None}``, and ``"batch_index"``: [int] * B when LatentFromBatch or RepeatLatentBatch
  set it (each row's row of the original batch, for its noise, as ComfyUI); ``samples`` None is an empty latent,
  made once the model (and so its VAE factor) is known;
* IMAGE: float (B, H, W, 3) in [0, 1] on the CPU; MASK: float (B, H, W), 1 = repaint.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo

from sdengine.errors import SdengineError
from sdengine.nn.deep_shrink import deep_shrink_chain
from sdengine.nn.freeu import MAX_FREEU_FACTOR, FreeU, freeu_applied
from sdengine.nn.hypertile import HyperTile, HyperTileRun, check_hypertile, hypertile_applied
from sdengine.nn.resize import resize_nchw as resize_by_method

MAX_SEED = 0xFFFFFFFFFFFFFFFF
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

# ComfyUI's sampler and scheduler names -> sdengine's (only those the engine has).
SAMPLER_NAMES = {
    "euler": "euler",
    "euler_cfg_pp": "euler_cfg_pp",
    "euler_ancestral": "euler_a",
    "euler_ancestral_cfg_pp": "euler_a_cfg_pp",
    "heun": "heun",
    "heunpp2": "heunpp2",
    "exp_heun_2_x0": "exp_heun_2_x0",
    "exp_heun_2_x0_sde": "exp_heun_2_x0_sde",
    "dpm_2": "dpm2",
    "dpm_2_ancestral": "dpm2_a",
    "lms": "lms",
    "dpm_fast": "dpm_fast",  # ComfyUI's order
    "dpm_adaptive": "dpm_adaptive",
    "dpmpp_sde": "dpmpp_sde",
    "dpmpp_2m": "dpmpp_2m",
    "dpmpp_2m_cfg_pp": "dpmpp_2m_cfg_pp",
    "dpmpp_2m_sde": "dpmpp_2m_sde",
    "dpmpp_2m_sde_heun": "dpmpp_2m_sde_heun",
    "dpmpp_2s_ancestral": "dpmpp_2s_a",
    "dpmpp_2s_ancestral_cfg_pp": "dpmpp_2s_a_cfg_pp",
    "dpmpp_3m_sde": "dpmpp_3m_sde",
    # ComfyUI's _gpu forms differ by where their Brownian tree draws (the CUDA generator); here it draws on the CPU
    "dpmpp_sde_gpu": "dpmpp_sde",
    "dpmpp_2m_sde_gpu": "dpmpp_2m_sde",
    "dpmpp_2m_sde_heun_gpu": "dpmpp_2m_sde_heun",
    "dpmpp_3m_sde_gpu": "dpmpp_3m_sde",
    "ipndm": "ipndm",
    "ipndm_v": "ipndm_v",
    "deis": "deis",
    "res_multistep": "res_multistep",
    "res_multistep_cfg_pp": "res_multistep_cfg_pp",
    "res_multistep_ancestral": "res_multistep_a",
    "res_multistep_ancestral_cfg_pp": "res_multistep_a_cfg_pp",
    "gradient_estimation": "gradient_estimation",
    "gradient_estimation_cfg_pp": "gradient_estimation_cfg_pp",
    "er_sde": "er_sde",
    "seeds_2": "seeds_2",
    "seeds_3": "seeds_3",
    "sa_solver": "sa_solver",
    "sa_solver_pece": "sa_solver_pece",
    "ddpm": "ddpm",
    "lcm": "lcm",
    "ddim": "ddim",
    "uni_pc": "unipc",
    "uni_pc_bh2": "unipc",  # both sdengine's UniPC, of order 3 as ComfyUI's; uni_pc is the bh1 variant
}
# The samplers ComfyUI's KSampler (and KSamplerAdvanced) runs on a grid made for one step more without its
# next-to-last sigma (its KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS; BasicScheduler's SIGMAS keep it).
DISCARD_PENULTIMATE_SAMPLERS = ("dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2")
# The options ComfyUI's KSampler runs a sampler with where they differ from sdengine's defaults (A1111's): its DPM
# fast / adaptive are k-diffusion's with eta 0 (deterministic), A1111 passes its ancestral eta, 1; its UniPC is of
# order 3, B(h) = -h ("bh1") under uni_pc and e^-h - 1 (diffusers' default, "bh2") under uni_pc_bh2; both walk a
# last sigma of 0 as 0.001 and answer the sample there (comfy/extra_samplers/uni_pc.py, sample_unipc). Its lcm takes
# the model's x0 as it is (k-diffusion's sample_lcm; LCM's consistency boundary c_skip / c_out is ComfyUI's only under
# a ModelSamplingDiscrete "lcm" node, which sdengine refuses): no timesteps, so no boundary condition.
SAMPLER_OPTIONS: dict[str, dict[str, Any]] = {
    "dpm_fast": {"eta": 0.0},
    "dpm_adaptive": {"eta": 0.0},
    "lcm": {"timesteps": None},
    "uni_pc": {"variant": "bh1", "order": 3, "zero_sigma": 0.001},
    "uni_pc_bh2": {"variant": "bh2", "order": 3, "zero_sigma": 0.001},
}
SCHEDULER_NAMES = {
    # each walked as ComfyUI's list of that name (sample_latents makes its grids with make_grid's comfy_grid: karras
    # and exponential between the model's sigma_min and sigma_max, not diffusers' Euler-family grids)
    # ComfyUI's normal_scheduler: timesteps linspace(t(sigma_max), t(sigma_min), steps) = 999 ... 0, their sigmas,
    # then 0: k-diffusion's get_sigmas, sdengine's "uniform" (its "normal" is diffusers' spacing: 901 ... 1 on SD 1.5)
    "normal": "uniform",
    "karras": "karras",
    "exponential": "exponential",
    "sgm_uniform": "sgm_uniform",
    "simple": "simple",
    "ddim_uniform": "ddim_uniform",
    "beta": "beta",
    "linear_quadratic": "linear_quadratic",  # ComfyUI's order
    "kl_optimal": "kl_optimal",
}
# SD3's and Flux's latents: a LATENT of 16 channels holds the VAE's raw latents, as ComfyUI's (the flow models scale
# them in and out with their own latent format while sampling: nodes_sd3_flux.py); the 4-channel ones the model's
RAW_LATENT_CHANNELS = 16
# the references of UNETLoader's MODEL and the CLIP loaders' CLIP (nodes_sd3_flux.py): parts, never a pipeline's
DIFFUSION_MODEL_REF = "diffusion-model:"
TEXT_ENCODERS_REF = "text-encoders:"
PART_REFS = (DIFFUSION_MODEL_REF, TEXT_ENCODERS_REF)
UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic")
LATENT_UPSCALE_METHODS = (*UPSCALE_METHODS, "bislerp")  # ComfyUI's latent nodes also slerp


class NodeError(SdengineError, ValueError):
    """A node that cannot run with its inputs (a clear line; the executor adds the node's id and type)."""


@dataclass(frozen=True)
class Input:
    """One input as ``/object_info`` describes it. ``type``: a value type (INT, FLOAT, STRING, BOOLEAN),
    a link type (MODEL, LATENT, ...) or COMBO with ``choices`` (a tuple or a function of the environment)."""

    name: str
    type: str
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: tuple[str, ...] | Callable[[Any], list[str]] | None = None
    multiline: bool = False
    optional: bool = False
    tooltip: str = ""
    # a value outside ``choices`` that is valid all the same (LoadImage's "name [output]"): (env, value) -> bool
    also_valid: Callable[[Any, str], bool] | None = None
    round: bool | None = None  # ComfyUI's "round" option of a FLOAT (False: the value is not rounded to the step)
    display: str | None = None  # ComfyUI's "display" option (EmptyImage's color: "color", its page's picker)
    upload: bool = False  # ComfyUI's image_upload flag (its page offers an upload button)
    # the server's limit that also bounds this input ("side": --max-side, "steps": --max-steps, "batch":
    # --max-batch-size): /object_info lists it and /prompt refuses a value over it, as ComfyUI does its own max
    limit: str | None = None
    # ComfyUI's control_after_generate option (PrimitiveInt's value): the page adds a widget after it ("fixed",
    # "randomize", ...), one more entry of a UI workflow's widgets_values; an INT named seed / noise_seed has it anyway
    control: bool = False

    @property
    def is_link_type(self) -> bool:
        return self.type not in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


ANY_TYPE = "*"  # ComfyUI's any-type input (PreviewAny's source): a link from any output


@dataclass(frozen=True)
class NodeDef:
    name: str
    display_name: str
    category: str
    inputs: tuple[Input, ...]
    outputs: tuple[str, ...]
    fn: Callable[..., Any]
    output_names: tuple[str, ...] = ()
    output_node: bool = False
    description: str = ""
    # What the node reads besides its inputs, as a token the executor's cache key includes (ComfyUI's
    # IS_CHANGED): a LoadImage whose file was replaced under the same name runs again.
    changed: Callable[[RunContext, dict[str, Any]], str] | None = None
    # ComfyUI's list semantics (see ``graph.Executor``): ``output_is_list[i]`` (OUTPUT_IS_LIST) when output ``i`` is
    # a list whose elements each run the nodes downstream once (() = none is); ``input_is_list`` (INPUT_IS_LIST)
    # when the node is called once with every input as the whole list (a widget's value as a list of one)
    output_is_list: tuple[bool, ...] = ()
    input_is_list: bool = False

    def is_list_output(self, i: int) -> bool:
        return i < len(self.output_is_list) and self.output_is_list[i]

    def input(self, name: str) -> Input | None:
        return next((i for i in self.inputs if i.name == name), None)


# ------------------------------------------------------------------------------------------ value types


@dataclass(frozen=True)
class ModelHandle:
    ref: str  # what the worker loads (catalog reference)
    loras: tuple[tuple[str, float], ...] = ()
    # ModelSamplingDiscrete: what the network predicts (None: the model's own) and whether its schedule is rescaled to
    # zero terminal SNR
    prediction: str | None = None
    zsnr: bool = False
    cfg_rescale: float = 0.0  # RescaleCFG's multiplier (the last one applied counts, as ComfyUI's)
    pag_scale: float = 0.0  # PerturbedAttentionGuidance's scale (several add up, as ComfyUI's post-CFG functions)
    # FreeU / FreeU_V2: (b1, b2, s1, s2, version, "width"), () = off (the last one applied counts, as ComfyUI's
    # output block patch, which replaces the one before)
    freeu: tuple[Any, ...] = ()
    # the merge nodes' weight patches, in order (nodes_merge.WeightPatch / LoraStep), applied while sampling
    merges: tuple[Any, ...] = ()
    # ComfyUI's PerpNeg model patch (nodes_sampling.py): (empty conditioning entries, neg_scale), () = off; its CFG
    # function replaces CFG wherever the model samples (the last patch applied counts, as ComfyUI's)
    perp_neg: tuple[Any, ...] = field(default=(), compare=False, repr=False)
    # SelfAttentionGuidance: (scale, blur_sigma), () = off (sdengine.server.comfy.nodes_guidance)
    sag: tuple[float, ...] = ()
    # PatchModelAddDownscale (Deep Shrink): the chained nodes' sdengine.nn.deep_shrink.DeepShrink.key each, first
    # applied first, () = off (they stack, as ComfyUI's patch lists: nodes_patches.py)
    deep_shrink: tuple[Any, ...] = ()
    # HyperTile: its settings' key (tile_size, swap_size, max_depth, "comfyui", scale_depth), () = off (the last node
    # applied counts; sdengine.server.comfy.nodes_hypertile)
    hypertile: tuple[Any, ...] = ()
    # ComfyUI_IPAdapter_plus's IPAdapter nodes: sdengine.pipeline.ip_adapter.IPAdapterUnit values, one per node in the
    # order applied (each adds its own, as the pack's attn2 patches add up; sdengine.server.comfy.nodes_ipadapter)
    ip_adapters: tuple[Any, ...] = field(default=(), compare=False, repr=False)
    # UNETLoader's file (a Flux or SD3 diffusion model alone: ``ref`` then names it, "diffusion-model:PATH"), and its
    # weight_dtype; ModelSamplingSD3 / ModelSamplingFlux's schedule settings, () = the family's own
    # (sdengine.server.comfy.nodes_sd3_flux)
    diffusion_model: str = ""
    weight_dtype: str = "default"
    flow_sampling: tuple[Any, ...] = ()
    # SkipLayerGuidanceSD3 / DiT: (double layers, scale, start, end[, rescaling, single layers]), () = off
    skip_layer_guidance: tuple[Any, ...] = ()
    # DifferentialDiffusion: its strength, None = off (the last node applied counts, as ComfyUI's one mask function;
    # sdengine.server.comfy.nodes_patches)
    differential: float | None = None
    # CFGNorm's strength (a flow model's post-CFG rescale, sdengine.latent_sampling._CFGNormed), None = off
    cfg_norm: float | None = None
    # ZImageFunControlnet's patches: sdengine.server.comfy.nodes_z_image_control.ZImageControl values, one per node in
    # the order applied (their residuals add up, as ComfyUI's patch lists)
    z_image_controls: tuple[Any, ...] = field(default=(), compare=False, repr=False)
    # ComfyUI's pre- / post-CFG functions of APG, TCFG, CFGZeroStar, Mahiro and Epsilon Scaling:
    # sdengine.diffusion.cfg_hooks.CFGHook values in the order applied (sdengine.server.comfy.nodes_guidance)
    cfg_hooks: tuple[Any, ...] = ()


@dataclass(frozen=True)
class ClipHandle:
    ref: str
    layer: int | None = None  # CLIPSetLastLayer's stop_at_clip_layer; None: the model's own layer
    loras: tuple[tuple[str, float], ...] = ()
    merges: tuple[Any, ...] = ()  # the CLIP merge nodes' weight patches (nodes_merge), applied while encoding
    # DualCLIPLoader / TripleCLIPLoader's text encoder files: (("clip_l", path), ("clip_g", path), ("t5xxl", path)),
    # and their type ("sd3", "flux"); ``ref`` then names them ("text-encoders:...": nodes_sd3_flux.py)
    encoders: tuple[tuple[str, str], ...] = ()
    clip_type: str = ""
    # T5TokenizerOptions' (min_padding, min_length) (nodes_sd3_flux.py: Chroma's T5); None: not set
    t5_options: tuple[int, int] | None = None

    def clip_skip(self, pipe: Any) -> int:
        """The pipeline's clip_skip for ComfyUI's layer. SD 1.x: -1 is the last layer (A1111's clip skip 1),
        -2 the penultimate, each with the final LayerNorm. SDXL: ComfyUI reads ``hidden_states[layer]`` of both
        encoders, raw, and its default (no CLIPSetLastLayer) is -2, SDXL's trained penultimate layer, which is
        sdengine's SDXL clip_skip 1; -1 is the last layer, raw (SDXL clip_skip 0).

        As ComfyUI (``SDClipModel.set_clip_options``), a layer past the encoder's depth (-24 on SD 1.x's 12-layer
        CLIP) reads the last layer, with the final LayerNorm: SD 1.x's clip_skip 1. For SDXL that is CLIP-L's
        last layer normed, which its encoder does not give here: a node error. MiniLM (the emoji model) has no
        CLIP layers: only -1 applies."""
        if self.layer is None:
            return 1
        layer = int(self.layer)
        cond: Any = getattr(pipe, "conditioner", None)
        kind = getattr(cond, "kind", None)
        name = getattr(pipe, "name", "this model")
        if kind == "minilm":
            if layer != -1:
                raise NodeError(
                    f"stop_at_clip_layer {layer} does not apply to {name}: its text encoder is MiniLM, not CLIP "
                    "(use -1, or no CLIPSetLastLayer)"
                )
            return 1
        if kind == "sdxl":
            for label, enc in (("CLIP-L", cond.text_encoder), ("OpenCLIP bigG", cond.text_encoder_2)):
                n = int(enc.config.num_hidden_layers) if enc is not None else None
                if n is not None and -layer > n:
                    raise NodeError(
                        f"stop_at_clip_layer {layer} is past {name}'s {label} depth of {n} layers: ComfyUI then "
                        f"reads its last layer with the final LayerNorm, which sdengine's SDXL encoder does not "
                        f"give (use -1 .. -{n})"
                    )
            return -layer - 1
        encoder = getattr(cond, "text_encoder", None)
        n_layers = getattr(getattr(encoder, "config", None), "num_hidden_layers", None)
        if n_layers is not None and -layer > int(n_layers):
            return 1  # ComfyUI: past the depth is the last layer (with the final LayerNorm)
        return -layer


@dataclass(frozen=True)
class VaeHandle:
    ref: str


@dataclass(frozen=True)
class VaeFileHandle:
    """VAELoader's file: a VAE from ``--vaes-dir`` (a ``.safetensors`` file or a diffusers folder)."""

    path: str


@dataclass(frozen=True)
class TinyVaeHandle:
    """VAELoader's "taesd": the server's tiny VAE (``--tiny-vae``), which works on any model's latents it fits."""

    path: str


def _preview_tag() -> str:
    """ComfyUI's PreviewImage names its files ``ComfyUI_temp_XXXXX_NNNNN_.png``, XXXXX five random letters: one
    tag per server here, so that servers sharing a temp folder neither number over nor clean up each other's."""
    import random

    return "".join(random.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5))


@dataclass
class Outputs:
    """Where nodes read and write files (``/view`` types)."""

    output: Path
    input: Path
    temp: Path
    tag: str = field(default_factory=_preview_tag)  # this server's PreviewImage names (see :func:`clean_temp`)
    _live: Any = field(default=None, repr=False, compare=False)  # the held lock file that says it is running
    _live_guard: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def root(self, kind: str) -> Path:
        if kind not in ("output", "input", "temp"):
            raise NodeError(f"folder type must be output, input or temp, got {kind!r}")
        return {"output": self.output, "input": self.input, "temp": self.temp}[kind]

    def make_root(self, kind: str) -> Path:
        """The folder of ``kind``, created when missing; a temp folder sdengine creates gets :data:`TEMP_MARKER`,
        which lets :func:`clean_temp` wipe it at the next start (a temp folder it did not create is the user's).
        Writing into the temp folder marks this server live there (:meth:`mark_live`)."""
        root = self.root(kind)
        if kind == "temp" and not root.exists():
            root.mkdir(parents=True, exist_ok=True)
            (root / TEMP_MARKER).write_text("sdengine created this folder: it is emptied at each server start\n")
        root.mkdir(parents=True, exist_ok=True)
        if kind == "temp":
            self.mark_live()
        return root

    def mark_live(self) -> None:
        """Hold ``TEMP/.sdengine-live-TAG`` locked while this server runs: another server starting on the same
        folder then leaves this one's files alone (the kernel drops the lock when the process ends)."""
        import os
        import weakref

        with self._live_guard:
            if self._live is not None:
                return
            try:
                fd = os.open(self.temp / f"{LIVE_PREFIX}{self.tag}", os.O_RDWR | os.O_CREAT, 0o644)
            except OSError:  # a read-only folder: nothing can be written there to protect either
                return
            if not _try_lock(fd):
                os.close(fd)
                return
            self._live = (fd, weakref.finalize(self, os.close, fd))

    def release(self) -> None:
        """The server stops: its lock file goes (its previews are cleaned by the next server to start)."""
        with self._live_guard:
            if self._live is None:
                return
            fd, closer = self._live
            self._live = None
        try:
            (self.temp / f"{LIVE_PREFIX}{self.tag}").unlink()
        except OSError:
            pass
        closer()


def _try_lock(fd: int) -> bool:
    """Take the exclusive lock of ``fd`` without waiting: False when another open file holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _held_by_a_live_server(path: Path) -> bool:
    """Whether another running server holds the lock file ``path`` (False: its server is gone)."""
    import os

    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        return not _try_lock(fd)
    finally:
        os.close(fd)


TEMP_MARKER = ".sdengine-temp"
LIVE_PREFIX = ".sdengine-live-"
# the names PreviewImage gives its files: ComfyUI's (and sdengine's) ComfyUI_temp_XXXXX_NNNNN_.png, and the
# untagged ComfyUI_temp_NNNNN_.png of older sdengine servers
PREVIEW_NAME = re.compile(r"ComfyUI_temp_(?:([a-z]{5})_)?\d{5,}_\.png")


def clean_temp(folder: Path, own_tag: str | None = None) -> int:
    """ComfyUI empties its temp folder at start; sdengine's may be a user's own ``OUTPUTS/temp``, so: a folder
    sdengine created (it holds :data:`TEMP_MARKER`) loses everything but the marker, another one only the files
    PreviewImage named (``ComfyUI_temp_XXXXX_NNNNN_.png``, top level). Another server that runs on the same folder
    (it holds its ``.sdengine-live-TAG`` file locked) keeps its files: then only the previews of servers that are
    gone are removed. Symlinks are removed, never followed. Returns how many entries were removed."""
    import shutil

    if not folder.is_dir() or folder.is_symlink():
        return 0
    live: set[str] = set()
    removed = 0
    for entry in list(folder.iterdir()):
        if entry.name.startswith(LIVE_PREFIX) and entry.is_file() and not entry.is_symlink():
            tag = entry.name[len(LIVE_PREFIX) :]
            if tag == own_tag or _held_by_a_live_server(entry):
                live.add(tag)
    others = live - {own_tag}
    ours = (folder / TEMP_MARKER).is_file() and not others
    for entry in list(folder.iterdir()):
        if entry.name == TEMP_MARKER or (entry.name.startswith(LIVE_PREFIX) and entry.name[len(LIVE_PREFIX) :] in live):
            continue
        try:
            if entry.is_symlink() or not entry.is_dir():
                preview = PREVIEW_NAME.fullmatch(entry.name)
                gone = entry.name.startswith(LIVE_PREFIX) or (
                    preview is not None and entry.is_file() and preview.group(1) not in live
                )
                if ours or gone:
                    entry.unlink()
                    removed += 1
            elif ours:
                shutil.rmtree(entry)
                removed += 1
        except OSError:  # a file another process holds: left for the next start
            pass
    return removed


@dataclass
class RunContext:
    """What node functions may use while a prompt runs (made by the executor)."""

    pipeline: Callable[[str], Any]  # model reference -> the loaded pipeline on this worker
    catalog: Any
    folders: Outputs
    seed_rule: str = "comfyui"
    # (step, steps, denoised[, rgb_map=]) -> go on? The DiT samplers add their family's latent -> RGB preview map
    progress: Callable[..., bool] | None = None
    prompt: dict[str, Any] = field(default_factory=dict)
    extra_pnginfo: dict[str, Any] = field(default_factory=dict)
    max_pixels: int = 4096 * 4096
    save_lock: Any = None
    current_node: str | None = None
    max_steps: int = 150  # the server's limits (ServerConfig), checked when the node runs
    max_side: int = 2048
    max_batch: int = 8
    device: str = "cpu"  # the worker's: where networks that belong to no pipeline (the tiny VAE) run
    # (PNG bytes, index, count) -> sent to the prompt's client as ComfyUI's progress and binary image frames
    send_image: Callable[[bytes, int, int], None] | None = None

    def __post_init__(self) -> None:
        # A MODEL from UNETLoader or a CLIP from the CLIP loaders is a part alone, not a pipeline the worker could load
        # (nodes_sd3_flux.py): a node that needs a checkpoint's pipeline says so, and the worker's model stays loaded
        load = self.pipeline

        def pipeline(ref: str) -> Any:
            if isinstance(ref, str) and ref.startswith(PART_REFS):
                raise NodeError(
                    "this node needs a checkpoint's model (CheckpointLoaderSimple); a MODEL from UNETLoader or a CLIP "
                    "from DualCLIPLoader / TripleCLIPLoader is a part alone, which it does not take"
                )
            return load(ref)

        self.pipeline = pipeline

    def check_size(self, width: int, height: int, batch: int = 1) -> None:
        if max(width, height) > self.max_side:
            raise NodeError(f"{width}x{height} is over the server's limit of {self.max_side} pixels a side")
        if batch > self.max_batch:
            raise NodeError(f"batch_size {batch} is over the server's limit of {self.max_batch}")


# -------------------------------------------------------------------------------------------- helpers


def input_files(env: Any) -> list[str]:
    """Image files in the input folder (subfolders as ``sub/name``), what LoadImage offers."""
    root = Path(env.folders.input)
    if not root.is_dir():
        return []
    base = root.resolve()
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and p.resolve().is_relative_to(base):
            out.append(p.relative_to(root).as_posix())
    return out


def _models(env: Any) -> list[str]:
    dit = {e.name for e in env.catalog.dit_models()}  # UNETLoader's files, not checkpoints
    return [e.name for e in env.catalog.models() if e.name not in dit]


def _loras(env: Any) -> list[str]:
    return [e.name for e in env.catalog.loras()]


def _controlnets(env: Any) -> list[str]:
    return [e.name for e in env.catalog.controlnets()]


TAESD_NAME = "taesd"  # ComfyUI's name for the tiny VAE of SD 1.x/2.x latents


def _vaes(env: Any) -> list[str]:
    taesd = [TAESD_NAME] if getattr(env.catalog, "tiny_vae", None) is not None else []
    return taesd + [e.name for e in env.catalog.vaes()]


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    a = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(a)[None]


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    # Rounded to 8 bits as the pipeline does, so that a graph's PNG equals the native API's.
    a = (images.float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(x) for x in a]


def latent_samples(latent: dict[str, Any], pipe: Any) -> torch.Tensor:
    """The latent tensor; an empty latent is made now, in the model's channels and VAE factor (a size off the
    factor rounded down, as ComfyUI's EmptyLatentImage takes width // 8 x height // 8)."""
    z = latent.get("samples")
    if z is not None:
        c = getattr(pipe, "latent_channels", None)
        if c is not None and z.shape[1] != c:  # a LoadLatent file of another model: refused, not a tensor error
            raise NodeError(f"the latent has {z.shape[1]} channels, {pipe.name}'s latents have {c}")
        return z
    b, h, w = latent["size"]
    f = pipe.vae_scale_factor
    if h < f or w < f:
        raise NodeError(f"an empty latent of {w}x{h} is smaller than {pipe.name}'s VAE factor {f}")
    return torch.zeros(b, pipe.latent_channels, h // f, w // f)


ANNOTATIONS = {" [input]": "input", " [output]": "output", " [temp]": "temp"}


def split_annotation(name: str) -> tuple[str, str]:
    """ComfyUI's annotated file names: "x.png [output]" is x.png of the output folder (also [input], [temp]);
    a plain name is of the input folder."""
    for suffix, kind in ANNOTATIONS.items():
        if name.endswith(suffix):
            return name[: -len(suffix)], kind
    return name, "input"


def _image_path(folders: Outputs, name: str) -> Path:
    """The image file a LoadImage value names (resolved inside its folder); UnsafePathError / FileNotFoundError."""
    from sdengine.io.paths import resolve_inside

    plain, kind = split_annotation(name)
    return resolve_inside(folders.root(kind), plain, "image")


def annotated_image_exists(env: Any, value: str) -> bool:
    """Whether an annotated LoadImage value ("x.png [output]") names an image file of its folder."""
    from sdengine.io.paths import UnsafePathError

    if split_annotation(value)[0] == value:
        return False
    try:
        return _image_path(env.folders, value).suffix.lower() in IMAGE_SUFFIXES
    except (UnsafePathError, OSError):
        return False


def input_file_token(ctx: RunContext, inputs: dict[str, Any]) -> str:
    """The content hash of the input folder's file named by ``inputs["image"]`` ("" when it cannot be read: the
    node then fails with its own message when it runs)."""
    import hashlib

    from sdengine.io.paths import UnsafePathError

    try:
        path = _image_path(ctx.folders, str(inputs.get("image", "")))
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except (UnsafePathError, OSError):
        return ""


def _load_input_image(ctx: RunContext, name: str, frames: bool = False) -> list[Image.Image]:
    """The image a LoadImage value names: its first frame, or (``frames``) every frame of an animated image of
    the first frame's size (ComfyUI's LoadImage: a batch; at most the server's batch limit)."""
    from sdengine.io.images import load_image as read_image
    from sdengine.io.paths import UnsafePathError
    from sdengine.server.security import decode_image

    try:
        path = _image_path(ctx.folders, name)
    except UnsafePathError as e:
        raise NodeError(str(e)) from None
    except FileNotFoundError:
        kind = split_annotation(name)[1]
        raise NodeError(f"image {name!r} is not in the {kind} folder (upload it with POST /upload/image)") from None
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise NodeError(f"image {name!r}: only PNG, JPEG and WebP files are read")
    raw = decode_image(path.read_bytes(), f"image {name!r}", ctx.max_pixels)
    count = int(getattr(raw, "n_frames", 1)) if frames and raw.format != "MPO" else 1  # MPO: ComfyUI's first only
    if count > ctx.max_batch:
        raise NodeError(f"image {name!r} has {count} frames, over the server's batch limit of {ctx.max_batch}")
    out: list[Image.Image] = []
    for k in range(count):
        if count > 1:
            raw.seek(k)
        img = ImageOps.exif_transpose(raw.copy() if count > 1 else raw)
        # the engine's reading of a PIL image: 16-bit grayscale scaled by its depth (convert("RGB") clips it: white)
        img = read_image(img, f"image {name!r}", error=NodeError)
        if img.mode == "P" and "transparency" in img.info:  # a palette's transparent colour is alpha (the mask)
            img = img.convert("RGBA")
        if out and img.size != out[0].size:  # ComfyUI leaves out frames of another size
            continue
        out.append(img)
    return out


# -------------------------------------------------------------------------------------------- loaders


def checkpoint_loader(ctx: RunContext, ckpt_name: str) -> tuple[Any, ...]:
    ref = ctx.catalog.resolve_model(ckpt_name)
    pipe = ctx.pipeline(ref)  # load now, so that a broken model fails at this node
    if getattr(pipe, "variant", None) == "qwen_image":
        from sdengine.server.comfy.nodes_qwen import refuse_checkpoint

        refuse_checkpoint(ckpt_name)
    if getattr(pipe, "variant", None) == "z_image":
        from sdengine.server.comfy import nodes_z_image

        nodes_z_image.refuse_checkpoint(ckpt_name)
    if str(getattr(pipe, "variant", "")).startswith("klein"):
        from sdengine.server.comfy import nodes_flux2

        nodes_flux2.refuse_checkpoint(ckpt_name)
    return ModelHandle(ref), ClipHandle(ref), VaeHandle(ref)


def vae_loader(ctx: RunContext, vae_name: str) -> tuple[Any]:
    tiny = getattr(ctx.catalog, "tiny_vae", None)
    if vae_name == TAESD_NAME and tiny is not None:
        tiny_handle = TinyVaeHandle(str(tiny))
        _tiny_vae(ctx, tiny_handle)  # load now, so that a broken file fails at this node
        return (tiny_handle,)
    handle = VaeFileHandle(str(ctx.catalog.resolve_vae(vae_name)))
    _vae_file(ctx, handle)
    return (handle,)


# VAEs loaded by VAELoader (files and the tiny VAE), kept for the next prompts: a few, each up to ~80M
# parameters in float32
_LOADED_VAES: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
_LOADED_VAES_LOCK = threading.Lock()
VAES_KEPT = 3


def _cached_vae(ctx: RunContext, path: str, load: Callable[[], Any]) -> Any:
    """``load()`` on the worker's device, once per file state (path, size, modification time) and device."""
    from sdengine.io.paths import file_state

    key = (path, ctx.device, *file_state(path))
    with _LOADED_VAES_LOCK:
        if key in _LOADED_VAES:
            _LOADED_VAES.move_to_end(key)
            return _LOADED_VAES[key]
    model = load().to(ctx.device).eval().requires_grad_(False)
    with _LOADED_VAES_LOCK:
        _LOADED_VAES[key] = model
        while len(_LOADED_VAES) > VAES_KEPT:
            _LOADED_VAES.popitem(last=False)
    return model


def _vae_file(ctx: RunContext, handle: VaeFileHandle) -> Any:
    """The VAE of ``handle``, in float32 (no half-precision overflow to guard against)."""
    from sdengine.errors import SdengineError
    from sdengine.models.vae import AutoencoderKL, VAEConfig
    from sdengine.weights.loading import build_on_meta, load_vae

    p = Path(handle.path)

    def load() -> Any:
        if _is_qwen_vae(p):  # Qwen-Image's (Wan 2.1's) VAE: raw 16-channel latents, as ComfyUI's
            from sdengine.weights.qwen_vae_file import load_qwen_vae

            return load_qwen_vae(p, dtype=torch.float32)
        if _is_flux2_vae(p):  # FLUX.2's VAE: latents in 2x2 patches, normalised (nodes_flux2)
            from sdengine.weights.flux2_file import load_flux2_vae

            return load_flux2_vae(p, dtype=torch.float32)
        sd, cfg = load_vae(p)
        vcfg = VAEConfig.from_diffusers(cfg)
        return build_on_meta(lambda: AutoencoderKL(vcfg), sd, name=f"VAE {p.name}", dtype=torch.float32)

    try:
        return _cached_vae(ctx, handle.path, load)
    except (OSError, SdengineError) as e:
        raise NodeError(f"VAE {p.name}: {e}") from None


def _is_flux2_vae(path: Path) -> bool:
    """A FLUX.2 VAE file (its batch norm's statistics beside a decoder), by its header."""
    from sdengine.weights.io import read_safetensors_header

    if path.is_dir() or path.suffix.lower() != ".safetensors":
        return False
    names, _, _ = read_safetensors_header(path)
    return "bn.running_var" in names and any(n.startswith("decoder.") for n in names)


def _diffusion_shape(vae: Any) -> tuple[int, int]:
    """(channels, pixels per latent pixel) of the LATENT a VAE decodes and encodes: FLUX.2's patches (128, 16),
    else its own latent's."""
    cfg = vae.config
    if hasattr(cfg, "diffusion_channels"):
        return int(cfg.diffusion_channels), int(cfg.diffusion_factor)
    return int(cfg.latent_channels), int(cfg.downscale_factor)


def _is_qwen_vae(path: Path) -> bool:
    """A Qwen-Image VAE file (Wan 2.1's names, or diffusers' with 3-D convolutions), by its header."""
    from sdengine.weights.io import read_safetensors_header
    from sdengine.weights.qwen_vae_file import is_original_layout

    if path.is_dir() or path.suffix.lower() != ".safetensors":
        return False
    names, _, _ = read_safetensors_header(path)
    conv_in = names.get("decoder.conv_in.weight")
    return is_original_layout(names) or (isinstance(conv_in, dict) and len(conv_in.get("shape") or ()) == 5)


def vae_module(ctx: RunContext, vae: VaeHandle | VaeFileHandle) -> Any:
    """The AutoencoderKL of a VAE handle: VAELoader's file, or a checkpoint's VAE."""
    return _vae_file(ctx, vae) if isinstance(vae, VaeFileHandle) else ctx.pipeline(vae.ref).vae


def _tiny_vae(ctx: RunContext, handle: TinyVaeHandle) -> Any:
    from sdengine.errors import SdengineError
    from sdengine.weights.tiny_vae_file import load_tiny_vae

    try:
        return _cached_vae(ctx, handle.path, lambda: load_tiny_vae(handle.path))
    except (OSError, SdengineError) as e:
        raise NodeError(f"taesd: {e}") from None


def lora_loader(
    ctx: RunContext, model: ModelHandle, clip: ClipHandle, lora_name: str, strength_model: float, strength_clip: float
) -> tuple[Any, ...]:
    path = str(ctx.catalog.resolve_lora(lora_name))
    if strength_model:
        model = replace(model, loras=(*model.loras, (path, float(strength_model))))
    if strength_clip:
        clip = replace(clip, loras=(*clip.loras, (path, float(strength_clip))))
    return model, clip


def lora_loader_model_only(ctx: RunContext, model: ModelHandle, lora_name: str, strength_model: float) -> tuple[Any]:
    return lora_loader(ctx, model, ClipHandle(model.ref), lora_name, strength_model, 0.0)[:1]


# ModelSamplingDiscrete's sampling choices -> sdengine's prediction types (None: refused, see model_sampling_discrete)
MODEL_SAMPLINGS: dict[str, str | None] = {"eps": "epsilon", "v_prediction": "v_prediction", "lcm": None, "x0": "sample"}


def model_sampling_discrete(ctx: RunContext, model: ModelHandle, sampling: str, zsnr: bool) -> tuple[Any]:
    """ComfyUI's ModelSamplingDiscrete: the model read as predicting ``sampling`` (eps, v_prediction, x0) on its own
    discrete schedule, rescaled to zero terminal SNR with ``zsnr`` (the same numbers as A1111's Zero Terminal SNR)."""
    prediction = MODEL_SAMPLINGS.get(sampling)
    if prediction is None:
        raise NodeError(
            f"sampling {sampling!r} is not supported: LCM's 50-timestep distilled schedule and consistency boundary "
            "are not implemented here (use eps, v_prediction or x0)"
        )
    return (replace(model, prediction=prediction, zsnr=bool(zsnr)),)


def rescale_cfg(ctx: RunContext, model: ModelHandle, multiplier: float) -> tuple[Any]:
    """ComfyUI's RescaleCFG: the guided prediction's std pulled towards the conditional one's by ``multiplier``,
    matched on the v-prediction (sdengine.diffusion.guidance, rule "comfyui"). It replaces a RenormCFG applied
    before it (ComfyUI's one CFG function)."""
    hooks = tuple(h for h in getattr(model, "cfg_hooks", ()) if h.kind != "renorm_cfg")
    return (replace(model, cfg_rescale=float(multiplier), cfg_hooks=hooks),)


def perturbed_attention_guidance(ctx: RunContext, model: ModelHandle, scale: float) -> tuple[Any]:
    """ComfyUI's PerturbedAttentionGuidance: ``scale * (cond - perturbed)`` added after CFG, the perturbed pass
    running the middle block's self-attention with the identity map (sdengine.nn.attention)."""
    after_post_cfg_hooks("PerturbedAttentionGuidance", model)
    return (replace(model, pag_scale=model.pag_scale + float(scale)),)


def after_post_cfg_hooks(node: str, model: ModelHandle) -> None:
    """A post-CFG patch that sdengine runs before the hooks of CFGZeroStar, Mahiro, Epsilon Scaling and
    TemporalScoreRescaling: refused on a model that has one of those already (ComfyUI would run it after them)."""
    if any(h.pre is False for h in getattr(model, "cfg_hooks", ())):
        raise NodeError(
            f"{node} after CFGZeroStar, Mahiro, Epsilon Scaling or TemporalScoreRescaling is not supported here: "
            f"apply {node} before them"
        )


def free_u(ctx: RunContext, model: ModelHandle, b1: float, b2: float, s1: float, s2: float) -> tuple[Any]:
    """ComfyUI's FreeU: at the up blocks' skip concatenations 4x / 2x the first level's width, the first half of the
    hidden channels times ``b1`` / ``b2`` and the skip's lowest frequencies times ``s1`` / ``s2``
    (sdengine.nn.freeu)."""
    return (replace(model, freeu=FreeU(b1, b2, s1, s2, version=1).key),)


def free_u_v2(ctx: RunContext, model: ModelHandle, b1: float, b2: float, s1: float, s2: float) -> tuple[Any]:
    """ComfyUI's FreeU_V2: FreeU with the backbone factor scaled by the hidden state's min-max normalised channel
    mean (sdengine.nn.freeu)."""
    return (replace(model, freeu=FreeU(b1, b2, s1, s2, version=2).key),)


def controlnet_loader(ctx: RunContext, control_net_name: str) -> tuple[Any]:
    return (str(ctx.catalog.resolve_controlnet(control_net_name)),)


# ---------------------------------------------------------------------------------------- conditioning


@contextmanager
def _clip_loras(pipe: Any, clip: ClipHandle, ctx: RunContext) -> Iterator[None]:
    """The CLIP merge nodes' weights and the CLIP part of the LoRAs a LoraLoader put on ``clip``, on the text
    encoders while encoding."""
    from sdengine.server.comfy.nodes_merge import merges_applied

    with merges_applied(ctx, pipe, clip, "clip"), _clip_loras_only(pipe, clip):
        yield


@contextmanager
def _clip_loras_only(pipe: Any, clip: ClipHandle) -> Iterator[None]:
    handle = None
    te2 = getattr(pipe, "text_encoder_2", None)  # SDXL's second encoder (the refiner's only one)
    if clip.loras and (isinstance(pipe.text_encoder, torch.nn.Module) or isinstance(te2, torch.nn.Module)):
        from sdengine.weights.lora import apply_loras

        handle = apply_loras(None, pipe.text_encoder, list(clip.loras), text_encoder_2=te2, part="text_encoders")
    try:
        with torch.inference_mode():
            yield
    finally:
        if handle is not None:
            handle.remove()


def clip_text_encode(ctx: RunContext, text: str, clip: ClipHandle) -> tuple[Any]:
    from sdengine.latent_sampling import encode_text
    from sdengine.server.comfy.nodes_sd3_flux import encode_flow, is_flow_clip

    if is_flow_clip(ctx, clip):  # SD3 / Flux: their conditioners (nodes_sd3_flux.py)
        return ([encode_flow(ctx, clip, text)],)
    pipe = ctx.pipeline(clip.ref)
    with _clip_loras(pipe, clip, ctx):
        return ([encode_text(pipe, text, clip.clip_skip(pipe))],)


def _sdxl_conditioner(pipe: Any, *, refiner: bool, node: str) -> Any:
    cond = pipe.conditioner
    if getattr(cond, "kind", None) != "sdxl" or bool(cond.refiner) != refiner:
        want = "an SDXL refiner's" if refiner else "an SDXL base model's"
        raise NodeError(f"{node} encodes with {want} CLIP; {getattr(pipe, 'name', 'this model')} is not one")
    return cond


def clip_text_encode_sdxl(
    ctx: RunContext,
    clip: ClipHandle,
    width: int,
    height: int,
    crop_w: int,
    crop_h: int,
    target_width: int,
    target_height: int,
    text_g: str,
    text_l: str,
) -> tuple[Any]:
    """ComfyUI's CLIPTextEncodeSDXL: text_l to CLIP-L, text_g to bigG (the shorter padded with the empty
    prompt's chunks), bigG's pooled text, and the given size numbers (not the latent's) in the vector."""
    from sdengine.latent_sampling import TextCondition

    pipe = ctx.pipeline(clip.ref)
    cond = _sdxl_conditioner(pipe, refiner=False, node="CLIPTextEncodeSDXL")
    with _clip_loras(pipe, clip, ctx):
        states, pooled = cond.text(text_l, text_g, clip.clip_skip(pipe))
        vector = cond.vector_of(pooled, [height, width, crop_h, crop_w, target_height, target_width])
    return ([TextCondition({"crossattn": states.to(cond.dtype), "vector": vector}, pooled_width=pooled.shape[-1])],)


def clip_text_encode_sdxl_refiner(
    ctx: RunContext, ascore: float, width: int, height: int, text: str, clip: ClipHandle
) -> tuple[Any]:
    """ComfyUI's CLIPTextEncodeSDXLRefiner: the refiner's bigG states and pooled text with the size, crop (0, 0)
    and the aesthetic score given (a negative prompt keeps its own score: ComfyUI uses the node's)."""
    from sdengine.latent_sampling import TextCondition

    pipe = ctx.pipeline(clip.ref)
    cond = _sdxl_conditioner(pipe, refiner=True, node="CLIPTextEncodeSDXLRefiner")
    with _clip_loras(pipe, clip, ctx):
        states, pooled = cond.text(text, text, clip.clip_skip(pipe))
        vector = cond.vector_of(pooled, [height, width, 0, 0, ascore])
    return ([TextCondition({"crossattn": states.to(cond.dtype), "vector": vector}, pooled_width=pooled.shape[-1])],)


def clip_set_last_layer(ctx: RunContext, clip: ClipHandle, stop_at_clip_layer: int) -> tuple[Any]:
    return (replace(clip, layer=int(stop_at_clip_layer)),)


MAX_CONDITIONINGS = 64  # entries of one combined conditioning: each is a model call per step


def conditioning_combine(ctx: RunContext, conditioning_1: list[Any], conditioning_2: list[Any]) -> tuple[Any]:
    combined = [*conditioning_1, *conditioning_2]
    if len(combined) > MAX_CONDITIONINGS:  # a chain combining a conditioning with itself doubles it each time
        raise NodeError(f"the combined conditioning has {len(combined)} entries, over the limit of {MAX_CONDITIONINGS}")
    return (combined,)


def _first_of(conditioning: list[Any], node: str) -> Any:
    if not conditioning:
        raise NodeError(f"{node}: conditioning_from has no entry")
    return conditioning[0]  # as ComfyUI: only the first entry of conditioning_from is used


def _same_width(a: torch.Tensor, b: torch.Tensor, node: str) -> None:
    if a.shape[-1] != b.shape[-1]:
        raise NodeError(
            f"{node}: the conditionings come from different text encoders (widths {a.shape[-1]} and {b.shape[-1]})"
        )


def conditioning_concat(ctx: RunContext, conditioning_to: list[Any], conditioning_from: list[Any]) -> tuple[Any]:
    """ComfyUI's ConditioningConcat: the first entry of ``conditioning_from``'s token states appended (along the
    tokens) to each entry of ``conditioning_to``, whose other tensors (pooled vectors) and ControlNets are kept."""
    src = _first_of(conditioning_from, "ConditioningConcat").cond["crossattn"]
    out = []
    for entry in conditioning_to:
        states = entry.cond["crossattn"]
        _same_width(states, src, "ConditioningConcat")
        joined = torch.cat([states, src.to(states.device, states.dtype)], dim=1)
        out.append(replace(entry, cond={**entry.cond, "crossattn": joined}))
    return (out,)


def conditioning_average(
    ctx: RunContext, conditioning_to: list[Any], conditioning_from: list[Any], conditioning_to_strength: float
) -> tuple[Any]:
    """ComfyUI's ConditioningAverage: each entry of ``conditioning_to`` becomes ``to * s + from * (1 - s)`` with the
    first entry of ``conditioning_from`` (its token states cut to, or padded with zeros to, ``to``'s length); the
    pooled vectors are averaged alike when both have them, ``from``'s taken when only it has one. ``to``'s
    ControlNets are kept."""
    s = float(conditioning_to_strength)
    src = _first_of(conditioning_from, "ConditioningAverage").cond
    out = []
    for entry in conditioning_to:
        cond = dict(entry.cond)
        t1 = cond["crossattn"]
        t0 = src["crossattn"].to(t1.device, t1.dtype)
        _same_width(t1, t0, "ConditioningAverage")
        t0 = t0[:, : t1.shape[1]]
        if t0.shape[1] < t1.shape[1]:
            pad = t1.new_zeros(t0.shape[0], t1.shape[1] - t0.shape[1], t1.shape[2])
            t0 = torch.cat([t0, pad], dim=1)
        cond["crossattn"] = t1 * s + t0 * (1.0 - s)
        for key, other in src.items():
            if key == "crossattn":
                continue
            if key not in cond:
                cond[key] = other
                continue
            mine = cond[key]
            if tuple(mine.shape) != tuple(other.shape):
                raise NodeError(f"ConditioningAverage: the conditionings' {key} differ in shape")
            cond[key] = mine * s + other.to(mine.device, mine.dtype) * (1.0 - s)
        out.append(replace(entry, cond=cond))
    return (out,)


def conditioning_set_area(
    ctx: RunContext, conditioning: list[Any], width: int, height: int, x: int, y: int, strength: float
) -> tuple[Any]:
    """ComfyUI's ConditioningSetArea: each entry predicts on the box (pixels, floored to the latent's grid when
    sampling: ComfyUI's // 8 on SD and SDXL) with weight ``strength``; the sampler sums the entries' predictions
    weighted so (see :mod:`sdengine.latent_sampling`)."""
    area = ("pixels", int(height), int(width), int(y), int(x))
    return ([replace(c, area=area, strength=float(strength)) for c in conditioning],)


def conditioning_set_area_percentage(
    ctx: RunContext, conditioning: list[Any], width: float, height: float, x: float, y: float, strength: float
) -> tuple[Any]:
    """ComfyUI's ConditioningSetAreaPercentage: the box in fractions of the latent's sides (rounded to latent
    pixels when sampling, each side at least 1)."""
    area = ("percentage", float(height), float(width), float(y), float(x))
    return ([replace(c, area=area, strength=float(strength)) for c in conditioning],)


def conditioning_set_area_strength(ctx: RunContext, conditioning: list[Any], strength: float) -> tuple[Any]:
    """ComfyUI's ConditioningSetAreaStrength: the entries' weight in the sampler's weighted sum."""
    return ([replace(c, strength=float(strength)) for c in conditioning],)


def conditioning_set_mask(
    ctx: RunContext, conditioning: list[Any], mask: torch.Tensor, strength: float, set_cond_area: str
) -> tuple[Any]:
    """ComfyUI's ConditioningSetMask: each entry's prediction weighted by the mask (resized to the latent when
    sampling) times ``strength``; "mask bounds" runs it on the mask's bounding box only."""
    m = mask.float()
    if m.ndim < 3:
        m = m[None]
    if m.ndim != 3 or m.numel() == 0:
        raise NodeError(f"ConditioningSetMask: a mask of shape {tuple(mask.shape)} is no (B, H, W) mask")
    bounds = set_cond_area != "default"
    return ([replace(c, mask=m, mask_strength=float(strength), mask_bounds=bounds) for c in conditioning],)


def conditioning_set_timestep_range(ctx: RunContext, conditioning: list[Any], start: float, end: float) -> tuple[Any]:
    """ComfyUI's ConditioningSetTimestepRange: the entries weigh in only at the model calls whose sigma lies between
    the schedule's sigmas at ``end`` and at ``start`` (percents of the denoising)."""
    return ([replace(c, start_percent=float(start), end_percent=float(end)) for c in conditioning],)


def conditioning_zero_out(ctx: RunContext, conditioning: list[Any]) -> tuple[Any]:
    """ComfyUI's ConditioningZeroOut: the token states and the pooled text zeroed (SDXL's ``vector`` is then made
    of zeros and the size numbers, as ComfyUI's pooled_output zeroed); the rest kept."""
    out = []
    for c in conditioning:
        cond = dict(c.cond)
        cond["crossattn"] = torch.zeros_like(cond["crossattn"])
        if "pooled_text" in cond:
            cond["pooled_text"] = torch.zeros_like(cond["pooled_text"])
        elif "vector" in cond and c.pooled_width:
            vector = cond["vector"].clone()
            vector[..., : c.pooled_width] = 0
            cond["vector"] = vector
        out.append(replace(c, cond=cond))
    return (out,)


def _hint_image(image: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) -> (B, 3, H, W): a batch of hints is one per latent row (the first alone was once kept)."""
    return image[..., :3].permute(0, 3, 1, 2).contiguous().float()  # an RGBA image's colour


@dataclass(frozen=True)
class UnionControlNet:
    """SetUnionControlNetType's CONTROL_NET: the ControlNet's path and ComfyUI's type number (its
    UNION_CONTROLNET_TYPES; None: "auto"). A plain CONTROL_NET is the path alone."""

    path: str
    type: int | None


def _control_parts(control_net: Any) -> tuple[str, int | None]:
    if isinstance(control_net, UnionControlNet):
        return control_net.path, control_net.type
    return control_net, None


def controlnet_apply(
    ctx: RunContext, conditioning: list[Any], control_net: Any, image: torch.Tensor, strength: float
) -> tuple[Any]:
    from sdengine.latent_sampling import ControlHint

    if strength == 0:
        return (conditioning,)
    path, union = _control_parts(control_net)
    hint = ControlHint(path, _hint_image(image), float(strength), union_type=union)
    return ([replace(c, controls=(*c.controls, hint)) for c in conditioning],)


def controlnet_apply_advanced(
    ctx: RunContext,
    positive: list[Any],
    negative: list[Any],
    control_net: Any,
    image: torch.Tensor,
    strength: float,
    start_percent: float,
    end_percent: float,
    vae: Any = None,
) -> tuple[Any, ...]:
    """ComfyUI's Apply ControlNet: the hint on both conditionings; ``vae`` (optional) encodes the hint of an SD3 /
    Flux ControlNet (nodes_sd3_flux.py), which needs it; U-Net ControlNets ignore it, as ComfyUI's."""
    from sdengine.latent_sampling import ControlHint

    if strength == 0:
        return positive, negative
    if not start_percent < end_percent:
        raise NodeError(f"start_percent ({start_percent}) must be below end_percent ({end_percent})")
    path, union = _control_parts(control_net)
    hint = ControlHint(path, _hint_image(image), float(strength), float(start_percent), float(end_percent), vae, union)
    return (
        [replace(c, controls=(*c.controls, hint)) for c in positive],
        [replace(c, controls=(*c.controls, hint)) for c in negative],
    )


# ------------------------------------------------------------------------------------------- sampling


def _sample(
    ctx: RunContext,
    model: ModelHandle,
    seed: int,
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    positive: list[Any],
    negative: list[Any],
    latent_image: dict[str, Any],
    denoise: float = 1.0,
    last_denoised: list[torch.Tensor] | None = None,
    options: tuple[tuple[str, float], ...] = (),
    discard_penultimate: bool | None = None,
    guidance_rule: Any = None,
    third: list[Any] | None = None,
    **window: Any,
) -> tuple[Any]:
    from sdengine.latent_sampling import sample_latents
    from sdengine.server.comfy.nodes_sd3_flux import is_flow_model, sample_flow

    if is_flow_model(ctx, model):  # SD3 / Flux: ComfyUI's flow sampling (nodes_sd3_flux.py)
        return sample_flow(
            ctx, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
            last_denoised, options, discard_penultimate, guidance_rule, third, **window,
        )  # fmt: skip
    if any(getattr(c, "references", ()) for c in [*positive, *negative]):
        raise NodeError("ReferenceLatent is FLUX.1 Kontext's; this model is a U-Net")
    if getattr(model, "skip_layer_guidance", ()):
        raise NodeError("SkipLayerGuidanceSD3 leaves out joint blocks of SD3's MMDiT; this model is a U-Net")
    if getattr(model, "cfg_norm", None) is not None:
        raise NodeError("CFGNorm runs on flow models here (Qwen-Image, SD3, Flux); this model is a U-Net")
    if any(getattr(h, "mask", None) is not None for c in [*positive, *negative] for h in getattr(c, "controls", ())):
        raise NodeError(
            "ControlNetInpaintingAliMamaApply is for SD3 / Qwen-Image inpainting ControlNets; this model is a U-Net"
        )
    if getattr(model, "perp_neg", ()):  # ComfyUI's PerpNeg patch: its CFG function in place of CFG (the node's cfg)
        if guidance_rule is not None:
            raise NodeError(f"{guidance_rule!r} cannot guide a model with the PerpNeg patch: use one or the other")
        from sdengine.diffusion.guidance import PerpNeg

        empty, neg_scale = model.perp_neg
        guidance_rule, third = PerpNeg(float(cfg), float(neg_scale), patch=True), list(empty)
    if steps > ctx.max_steps:
        raise NodeError(f"steps {steps} is over the server's limit of {ctx.max_steps}")
    if float(denoise) <= 0.0:  # ComfyUI: no step to run, the latent passes through unchanged
        return (dict(latent_image),)
    pipe = ctx.pipeline(model.ref)
    _check_text_width(pipe, [*positive, *negative])
    samples = latent_samples(latent_image, pipe)

    def report(r: Any) -> bool:
        if last_denoised is not None:
            last_denoised[:] = [r.denoised]
        return ctx.progress(r.step, r.steps, r.denoised) if ctx.progress is not None else True

    freeu = FreeU(*model.freeu) if model.freeu else None
    tiles = None
    if model.hypertile:  # HyperTile on the plain U-Net's self-attention, its draws seeded with the sampler's seed
        settings = HyperTile(*model.hypertile)
        check_hypertile(pipe.unet, settings)
        tiles = HyperTileRun(settings, int(seed), pipe.vae_scale_factor)
        tiles.latent = (int(samples.shape[-2]), int(samples.shape[-1]))
    from sdengine.server.comfy.nodes_merge import merges_applied

    # the merge nodes' weights, then FreeU / FreeU_V2 and HyperTile on the plain U-Net that latent_sampling calls
    # (LoRAs: in it)
    with (
        merges_applied(ctx, pipe, model, "unet"),
        freeu_applied(pipe.unet, freeu),
        hypertile_applied(pipe.unet, tiles),
    ):
        out = sample_latents(
            pipe,
            positive,
            negative,
            samples,
            seed=int(seed),
            steps=int(steps),
            cfg=float(cfg),
            sampler=SAMPLER_NAMES[sampler_name],
            schedule=SCHEDULER_NAMES[scheduler],
            denoise=float(denoise),
            seed_rule=ctx.seed_rule,
            posterior=latent_image.get("posterior"),
            posterior_scaled=bool(latent_image.get("posterior_scaled")),
            noise_mask=latent_image.get("noise_mask"),
            loras=model.loras,
            guidance_rescale=model.cfg_rescale,
            pag_scale=model.pag_scale,
            sag_scale=model.sag[0] if model.sag else 0.0,
            sag_blur_sigma=model.sag[1] if model.sag else 2.0,
            sag_rule="comfyui",  # the SelfAttentionGuidance node is ComfyUI's under either seed rule
            prediction=model.prediction,
            zero_terminal_snr=model.zsnr,
            deep_shrink=deep_shrink_chain(model.deep_shrink) or None,
            ip_adapters=getattr(model, "ip_adapters", ()),
            differential=model.differential,
            cfg_hooks=model.cfg_hooks,
            callback=report,
            batch_index=latent_image.get("batch_index"),
            guidance_rule=guidance_rule,
            third=third or (),
            sampler_options={**SAMPLER_OPTIONS.get(sampler_name, {}), **dict(options)} or None,
            # KSampler's rule unless told (SamplerCustom walks BasicScheduler's SIGMAS as they are)
            discard_penultimate_sigma=sampler_name in DISCARD_PENULTIMATE_SAMPLERS
            if discard_penultimate is None
            else discard_penultimate,
            **window,
        )
    from sdengine.pipeline.finite import require_finite

    # a window of a schedule (KSamplerAdvanced's steps, a zero-terminal-SNR model's sigma_max stand-in) or a model
    # that overflows: a non-finite latent is refused here, with the node named, not decoded into a black image
    require_finite(out, f"sampled latent ({sampler_name}, {scheduler}, {steps} steps)")
    return (
        {
            "samples": out.cpu(),
            "size": (out.shape[0], out.shape[2] * pipe.vae_scale_factor, out.shape[3] * pipe.vae_scale_factor),
            "posterior": None,
            "noise_mask": latent_image.get("noise_mask"),
            **({"batch_index": latent_image["batch_index"]} if "batch_index" in latent_image else {}),
        },
    )


def _check_text_width(pipe: Any, entries: list[Any]) -> None:
    """A U-Net's conditioning is its own CLIP's: token states of another width (a diffusion transformer's text
    encoder: T5, Qwen) are one line, not a matrix error inside the U-Net."""
    want = getattr(getattr(getattr(pipe, "unet", None), "config", None), "cross_attention_dim", None)
    if not isinstance(want, int):
        return
    for c in entries:
        x = getattr(c, "cond", {}).get("crossattn")
        if isinstance(x, torch.Tensor) and x.ndim == 3 and int(x.shape[-1]) != want:
            raise NodeError(
                f"this conditioning's token states are {int(x.shape[-1])} wide, {getattr(pipe, 'name', 'the model')}'s "
                f"U-Net reads {want}: encode it with this model's CLIP (not another model family's text encoder)"
            )


def ksampler(ctx: RunContext, **kw: Any) -> tuple[Any]:
    return _sample(ctx, **kw)


def ksampler_advanced(
    ctx: RunContext,
    add_noise: str,
    noise_seed: int,
    start_at_step: int,
    end_at_step: int,
    return_with_leftover_noise: str,
    **kw: Any,
) -> tuple[Any]:
    if int(start_at_step) >= min(int(end_at_step), int(kw["steps"])):
        # no step in the window: ComfyUI answers the latent as it came (a refiner stage set to "all steps done")
        return (dict(kw["latent_image"]),)
    return _sample(
        ctx,
        seed=noise_seed,
        add_noise=add_noise == "enable",
        start_at_step=int(start_at_step),
        end_at_step=int(end_at_step) if end_at_step < kw["steps"] else None,
        leftover_noise=return_with_leftover_noise == "enable",
        **kw,
    )


# ------------------------------------------------------------------------------- custom sampling (SIGMAS)


@dataclass(frozen=True)
class SigmaPlan:
    """Where a SIGMAS value came from when it is (a window of) a KSampler schedule: BasicScheduler's ``scheduler``,
    ``steps`` and ``denoise`` on model ``ref`` (``n`` steps in all), of which the window walks sigmas ``lo`` ..
    ``hi`` (SplitSigmas). SamplerCustom runs such a window on the sampler's own grid, as KSampler (Advanced) does."""

    ref: str
    scheduler: str
    steps: int
    denoise: float
    n: int
    lo: int
    hi: int


@dataclass(frozen=True, eq=False)
class Sigmas:
    """ComfyUI's SIGMAS: a 1-D float32 tensor of noise levels, highest first (the last usually 0); rising after a
    FlipSigmas, whose output of a whole BasicScheduler schedule at denoise 1 keeps that plan as ``flipped``."""

    values: torch.Tensor
    plan: SigmaPlan | None = None
    flipped: SigmaPlan | None = None

    def __repr__(self) -> str:
        return f"SIGMAS({[round(v, 4) for v in self.values.tolist()]})"


@dataclass(frozen=True)
class SamplerChoice:
    """ComfyUI's SAMPLER (KSamplerSelect): one of :data:`SAMPLER_NAMES`; ``options`` (name, value) pairs the
    sampler nodes with settings (SamplerEulerAncestral, SamplerLMS, ...) give the engine's sampler."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class NoiseSource:
    """ComfyUI's NOISE: RandomNoise's seed, or DisableNoise (``enabled`` False)."""

    seed: int
    enabled: bool = True


@dataclass(frozen=True, eq=False)
class Guider:
    """ComfyUI's GUIDER: CFGGuider (model, positive, negative, cfg) or BasicGuider (one conditioning, cfg 1); a guider
    over three conditionings (DualCFGGuider, PerpNegGuider, ``nodes_sampling.py``) also has its ``rule``
    (:mod:`sdengine.diffusion.guidance`'s DualCFG / PerpNeg, in place of CFG) and its ``third`` conditioning."""

    model: ModelHandle
    positive: list[Any]
    negative: list[Any] | None
    cfg: float
    rule: Any = None
    third: list[Any] | None = None

    def __repr__(self) -> str:
        if self.rule is not None:
            return f"GUIDER({self.model.ref}, {self.rule!r})"
        return f"GUIDER({self.model.ref}, cfg {self.cfg:g}, {'CFG' if self.negative is not None else 'basic'})"


def _check_steps(ctx: RunContext, steps: int) -> None:
    if steps > ctx.max_steps:
        raise NodeError(f"steps {steps} is over the server's limit of {ctx.max_steps}")


def _sigma_list(values: torch.Tensor) -> Sigmas:
    return Sigmas(values.detach().to("cpu", torch.float32).reshape(-1).clone())


def basic_scheduler(ctx: RunContext, model: ModelHandle, scheduler: str, steps: int, denoise: float) -> tuple[Any]:
    """ComfyUI's BasicScheduler: the KSampler schedule's sigmas; denoise < 1 the last ``steps`` + 1 of a schedule of
    ``int(steps / denoise)`` steps; denoise 0 none (a SamplerCustom then passes its latent through)."""

    steps, denoise = int(steps), float(denoise)
    _check_steps(ctx, steps)
    if denoise <= 0.0:
        return (Sigmas(torch.zeros(0)),)
    from sdengine.server.comfy.nodes_sd3_flux import flow_basic_scheduler, is_flow_model

    if is_flow_model(ctx, model):  # SD3 / Flux: ComfyUI's lists on the flow table
        return flow_basic_scheduler(ctx, model, scheduler, steps, denoise)  # type: ignore[no-any-return]
    with _model_schedule(ctx, model) as pipe:
        return _basic_scheduler(pipe, model, scheduler, steps, denoise)


@contextmanager
def _model_schedule(ctx: RunContext, model: ModelHandle) -> Iterator[Any]:
    """The model's pipeline, its ``noise_schedule`` rescaled to zero terminal SNR inside the block where a
    ModelSamplingDiscrete set zsnr (the schedulers read their sigmas from it, as ComfyUI's from model_sampling)."""
    from sdengine.pipeline.core import zero_snr_schedule

    pipe = ctx.pipeline(model.ref)
    with zero_snr_schedule(bool(getattr(model, "zsnr", False)), pipe):  # a handle without the field: no zsnr
        yield pipe


def _basic_scheduler(pipe: Any, model: ModelHandle, scheduler: str, steps: int, denoise: float) -> tuple[Any]:
    from sdengine.diffusion import sampling

    total = steps if denoise >= 1.0 else int(steps / denoise)
    limit = int(pipe.noise_schedule.num_train_timesteps)
    if total > limit:
        raise NodeError(
            f"denoise {denoise:g} with {steps} steps makes a {total}-step schedule, and the model has {limit} timesteps"
        )
    # the values: ComfyUI's list of that name (calculate_sigmas), the grid KSampler walks with every sampler
    sdxl = getattr(pipe, "text_kind", "") == "sdxl"
    name, sched = sampling.resolve("euler", SCHEDULER_NAMES[scheduler], sdxl=sdxl)
    grid = sampling.make_grid(name, total, pipe.noise_schedule, sched, pipe.scheduler_config, comfy_grid=True)
    values = grid.sigmas[-(steps + 1) :].clone()
    n = int(values.shape[0]) - 1
    return (Sigmas(values, SigmaPlan(model.ref, scheduler, steps, denoise, n, 0, n)),)


def _with_zero(values: torch.Tensor) -> torch.Tensor:
    return torch.cat([values.to(torch.float32), torch.zeros(1)])


def karras_scheduler(ctx: RunContext, steps: int, sigma_max: float, sigma_min: float, rho: float) -> tuple[Any]:
    from sdengine.diffusion.schedules import karras_sigmas

    _check_steps(ctx, int(steps))
    return (_sigma_list(_with_zero(karras_sigmas(int(steps), float(sigma_min), float(sigma_max), float(rho)))),)


def exponential_scheduler(ctx: RunContext, steps: int, sigma_max: float, sigma_min: float) -> tuple[Any]:
    from sdengine.diffusion.schedules import exponential_sigmas

    _check_steps(ctx, int(steps))
    if float(sigma_min) <= 0.0 or float(sigma_max) <= 0.0:
        raise NodeError("ExponentialScheduler: sigma_min and sigma_max must be above 0 (their logarithms are spaced)")
    return (_sigma_list(_with_zero(exponential_sigmas(int(steps), float(sigma_min), float(sigma_max)))),)


AYS_MODEL_TYPES = {"SD1": "align_your_steps", "SDXL": "align_your_steps_sdxl"}


def align_your_steps_scheduler(ctx: RunContext, model_type: str, steps: int, denoise: float) -> tuple[Any]:
    """ComfyUI's AlignYourStepsScheduler: the table's levels log-linearly interpolated to ``steps`` + 1 points; with
    denoise < 1 the last ``round(steps * denoise)`` steps of them; the last sigma 0."""
    from sdengine.diffusion.schedules import AYS_NOISE_LEVELS, align_your_steps_sigmas

    steps, denoise = int(steps), float(denoise)
    _check_steps(ctx, steps)
    if denoise <= 0.0:
        return (Sigmas(torch.zeros(0)),)
    run = steps if denoise >= 1.0 else round(steps * denoise)
    values = align_your_steps_sigmas(steps, AYS_NOISE_LEVELS[AYS_MODEL_TYPES[model_type]])[-(run + 1) :].clone()
    values[-1] = 0.0
    return (_sigma_list(values),)


def beta_sampling_scheduler(ctx: RunContext, model: ModelHandle, steps: int, alpha: float, beta: float) -> tuple[Any]:
    from sdengine.diffusion.schedules import beta_sigmas

    _check_steps(ctx, int(steps))
    if float(alpha) <= 0.0 or float(beta) <= 0.0:
        raise NodeError("BetaSamplingScheduler: alpha and beta must be above 0")
    with _model_schedule(ctx, model) as pipe:
        train = pipe.noise_schedule.sigmas.to(torch.float64)
    return (_sigma_list(_with_zero(beta_sigmas(int(steps), train, float(alpha), float(beta)))),)


def sd_turbo_scheduler(ctx: RunContext, model: ModelHandle, steps: int, denoise: float) -> tuple[Any]:
    """ComfyUI's SDTurboScheduler: the sigmas of timesteps 999, 899, ..., 99 (SD-Turbo's), ``steps`` of them from
    ``10 - int(10 * denoise)`` on, then 0."""
    with _model_schedule(ctx, model) as pipe:
        table = pipe.noise_schedule.sigmas.to(torch.float32)
    if int(table.shape[0]) != 1000:
        raise NodeError(f"SDTurboScheduler needs a model of 1000 timesteps, this one has {int(table.shape[0])}")
    start = 10 - int(10 * float(denoise))
    timesteps = list(range(999, 0, -100))[start : start + int(steps)]
    return (_sigma_list(_with_zero(table[torch.tensor(timesteps, dtype=torch.long)])),)


def _window(sigmas: Sigmas, values: torch.Tensor, lo: int, hi: int) -> Sigmas:
    """``values`` cut from ``sigmas``: its sigmas ``lo`` .. ``hi`` (relative), the plan's window moved alike."""
    p = sigmas.plan
    if p is None or values.shape[0] == 0 or hi - lo != values.shape[0] - 1:
        return Sigmas(values.clone())
    return Sigmas(values.clone(), replace(p, lo=p.lo + lo, hi=p.lo + hi))


def split_sigmas(ctx: RunContext, sigmas: Sigmas, step: int) -> tuple[Any, Any]:
    """ComfyUI's SplitSigmas: ``sigmas[:step + 1]`` and ``sigmas[step:]`` (they share the sigma at ``step``)."""
    v, step = sigmas.values, int(step)
    last = int(v.shape[0]) - 1
    return (_window(sigmas, v[: step + 1], 0, min(step, last)), _window(sigmas, v[step:], step, last))


def split_sigmas_denoise(ctx: RunContext, sigmas: Sigmas, denoise: float) -> tuple[Any, Any]:
    """ComfyUI's SplitSigmasDenoise: the last ``round(steps * denoise)`` steps as low_sigmas, the rest as
    high_sigmas (as in ComfyUI, high_sigmas is empty when no step is low)."""
    v = sigmas.values
    steps = max(int(v.shape[0]) - 1, 0)
    low = round(steps * float(denoise))
    high_v = v[:-low] if low else v[:0]
    return (_window(sigmas, high_v, 0, steps - low), _window(sigmas, v[-(low + 1) :], steps - low, steps))


def _flipped(values: torch.Tensor) -> torch.Tensor:
    v = values.flip(0).clone()
    if v.numel() and float(v[0]) == 0.0:
        v[0] = 0.0001
    return v


def flip_sigmas(ctx: RunContext, sigmas: Sigmas) -> tuple[Any]:
    """ComfyUI's FlipSigmas: the sigmas in reverse order, a first 0 made 0.0001 (a rising list from above 0, which
    SamplerCustom walks upward: unsampling); no sigma, none. The flip of a whole BasicScheduler schedule at denoise 1
    keeps its plan: SamplerCustom walks it as the reverse of the grid it walks that schedule on (the sampler's own,
    :func:`sampler_custom`), so that unsampling and sampling again with the same schedule meet."""
    p = sigmas.plan
    whole = p is not None and (p.lo, p.hi) == (0, p.n) and p.denoise >= 1.0
    return (Sigmas(_flipped(sigmas.values), flipped=p if whole else None),)


def _unsampling_grid(ctx: RunContext, sigmas: Sigmas, model: ModelHandle, sampler: SamplerChoice) -> torch.Tensor:
    """The sigmas SamplerCustom walks for a FlipSigmas output: for a whole BasicScheduler schedule of this model, the
    reverse of the grid the schedule itself is walked on with this sampler (KSampler's), else the values."""
    from sdengine.diffusion import sampling

    p = sigmas.flipped
    if p is None or p.ref != model.ref:
        return sigmas.values
    pipe = ctx.pipeline(p.ref)
    sdxl = getattr(pipe, "text_kind", "") == "sdxl"
    name, sched = sampling.resolve(SAMPLER_NAMES[sampler.name], SCHEDULER_NAMES[p.scheduler], sdxl=sdxl)
    if name in sampling.TIMESTEP_SAMPLERS:  # refused on rising sigmas anyway
        return sigmas.values
    grid = sampling.make_grid(name, p.steps, pipe.noise_schedule, sched, pipe.scheduler_config, comfy_grid=True)
    return _flipped(grid.sigmas.to(torch.float32))


def ksampler_select(ctx: RunContext, sampler_name: str) -> tuple[Any]:
    return (SamplerChoice(sampler_name),)


def _sampler_with(
    name: str, options: dict[str, float], unsupported: dict[str, tuple[float, float]] | None = None
) -> tuple[Any]:
    """A SAMPLER of ComfyUI's name ``name`` with ``options``; ``unsupported``: settings the engine's sampler has
    not, (value, the only value it runs), refused unless they are that value."""
    for key, (value, only) in (unsupported or {}).items():
        if float(value) != only:
            raise NodeError(f"{key} {value:g}: sdengine's {name} sampler runs only {key} {only:g}")
    # an INT setting (LMS's and DPM adaptive's order) stays an int: the samplers count with it
    return (SamplerChoice(name, tuple((k, v if isinstance(v, int) else float(v)) for k, v in options.items())),)


def sampler_euler_ancestral(ctx: RunContext, eta: float, s_noise: float) -> tuple[Any]:
    return _sampler_with("euler_ancestral", {"eta": eta}, {"s_noise": (s_noise, 1.0)})


def sampler_euler_ancestral_cfg_pp(ctx: RunContext, eta: float, s_noise: float) -> tuple[Any]:
    return _sampler_with("euler_ancestral_cfg_pp", {"eta": eta, "s_noise": s_noise})


def sampler_dpmpp_2s_ancestral(ctx: RunContext, eta: float, s_noise: float) -> tuple[Any]:
    return _sampler_with("dpmpp_2s_ancestral", {"eta": eta, "s_noise": s_noise})


def sampler_dpmpp_sde(ctx: RunContext, eta: float, s_noise: float, r: float, noise_device: str) -> tuple[Any]:
    # noise_device: sdengine draws the noise on the CPU either way (as KSampler's dpmpp_sde and dpmpp_sde_gpu)
    return _sampler_with("dpmpp_sde", {"eta": eta, "s_noise": s_noise}, {"r": (r, 0.5)})


def sampler_dpmpp_2m_sde(
    ctx: RunContext, solver_type: str, eta: float, s_noise: float, noise_device: str
) -> tuple[Any]:
    name = "dpmpp_2m_sde_heun" if solver_type == "heun" else "dpmpp_2m_sde"
    return _sampler_with(name, {"eta": eta, "s_noise": s_noise})


def sampler_dpmpp_3m_sde(ctx: RunContext, eta: float, s_noise: float, noise_device: str) -> tuple[Any]:
    return _sampler_with("dpmpp_3m_sde", {"eta": eta, "s_noise": s_noise})


def sampler_lms(ctx: RunContext, order: int) -> tuple[Any]:
    return _sampler_with("lms", {"order": order})


def sampler_dpm_adaptive(ctx: RunContext, **options: float) -> tuple[Any]:
    return _sampler_with("dpm_adaptive", options)


def random_noise(ctx: RunContext, noise_seed: int) -> tuple[Any]:
    return (NoiseSource(int(noise_seed)),)


def disable_noise(ctx: RunContext) -> tuple[Any]:
    return (NoiseSource(0, enabled=False),)


def cfg_guider(ctx: RunContext, model: ModelHandle, positive: list[Any], negative: list[Any], cfg: float) -> tuple[Any]:
    return (Guider(model, positive, negative, float(cfg)),)


def basic_guider(ctx: RunContext, model: ModelHandle, conditioning: list[Any]) -> tuple[Any]:
    return (Guider(model, conditioning, None, 1.0),)


def _plan_for(sigmas: Sigmas, model: ModelHandle) -> SigmaPlan | None:
    """The plan of ``sigmas`` when SamplerCustom can run it as KSampler (Advanced) runs that schedule: made for the
    same model; a window of a full schedule whose grid has the steps asked (denoise 1), or the whole of it."""
    p = sigmas.plan
    if p is None or p.ref != model.ref or not 0 <= p.lo < p.hi <= p.n:
        return None
    if (p.lo, p.hi) == (0, p.n):
        return p
    return p if p.denoise >= 1.0 and p.n == p.steps else None


def sampler_custom(
    ctx: RunContext,
    model: ModelHandle,
    add_noise: bool,
    noise_seed: int,
    cfg: float,
    positive: list[Any],
    negative: list[Any],
    sampler: SamplerChoice,
    sigmas: Sigmas,
    latent_image: dict[str, Any],
    guider: Guider | None = None,
) -> tuple[Any, Any]:
    """ComfyUI's SamplerCustom: ``sampler`` walks ``sigmas`` from the latent (plus the seed's noise at the first
    sigma when ``add_noise``). Outputs: the sample at the last sigma, and the last step's x0 estimate (the output
    itself when the last sigma is 0). SIGMAS from BasicScheduler (whole, or cut by SplitSigmas at denoise 1) on the
    same model run as KSampler / KSamplerAdvanced run that schedule, bit for bit; other sigma lists are walked as
    they are (the network at each sigma's fractional timestep); rising ones (FlipSigmas: unsampling) by the
    deterministic samplers that can walk upward (:data:`sdengine.diffusion.sampling.RISING_SIGMA_SAMPLERS`), others
    refused; the flip of a whole BasicScheduler schedule as the reverse of the grid that schedule is walked on."""
    from sdengine.diffusion import sampling

    if sampler.name == "lcm_upscale":  # SamplerLCMUpscale: its loop, one model call per step
        return _lcm_upscale_custom(
            ctx, model, add_noise, noise_seed, cfg, positive, negative, sampler, sigmas, latent_image, guider
        )
    from sdengine.server.comfy.nodes_sd3_flux import is_flow_model

    rising = sigmas.values.shape[0] > 1 and float(sigmas.values[-1]) > float(sigmas.values[0])
    if (sigmas.flipped is not None or rising) and is_flow_model(ctx, model):
        raise NodeError("unsampling (rising sigmas, FlipSigmas) is not supported on SD3 / Flux models here")
    values = _unsampling_grid(ctx, sigmas, model, sampler) if sigmas.flipped is not None else sigmas.values
    if values.shape[0] == 0:  # ComfyUI: no sigma, no sampling; the latent passes through
        return (dict(latent_image), dict(latent_image))
    if values.shape[0] == 1:
        if float(values[0]) == 0.0 or not add_noise:  # no step, no noise (SplitSigmas at the end of a schedule)
            return (dict(latent_image), dict(latent_image))
        raise NodeError(f"sigmas hold one value ({float(values[0]):g}): no step to run")
    problem = sampling.sigma_list_problem(values)
    if problem is not None:
        raise NodeError(f"{problem}, got {sigmas!r}")
    if sampling.sigmas_rise(values):  # FlipSigmas: unsampling, by the samplers that can walk upward
        why = sampling.rising_sigmas_problem(SAMPLER_NAMES[sampler.name], dict(sampler.options))
        if why is not None:
            can = ", ".join(n for n, e in SAMPLER_NAMES.items() if e in sampling.RISING_SIGMA_SAMPLERS)
            raise NodeError(f"sampler {sampler.name} cannot walk rising sigmas (unsampling): {why}; these can: {can}")
    last: list[torch.Tensor] = []
    common: dict[str, Any] = dict(
        model=model, seed=int(noise_seed), cfg=cfg, sampler_name=sampler.name, positive=positive,
        negative=negative, latent_image=latent_image, last_denoised=last, options=sampler.options,
        discard_penultimate=False,
    )  # fmt: skip
    if guider is not None and guider.rule is not None:  # SamplerCustomAdvanced's DualCFGGuider / PerpNegGuider
        common.update(guidance_rule=guider.rule, third=guider.third)
    plan = _plan_for(sigmas, model)
    if plan is not None and (plan.lo, plan.hi) == (0, plan.n):
        (out,) = _sample(ctx, steps=plan.steps, scheduler=plan.scheduler, denoise=plan.denoise, add_noise=add_noise,
                         **common)  # fmt: skip
    elif plan is not None:
        (out,) = _sample(
            ctx, steps=plan.steps, scheduler=plan.scheduler, add_noise=add_noise, start_at_step=plan.lo,
            end_at_step=plan.hi if plan.hi < plan.n else None, leftover_noise=True, **common,
        )  # fmt: skip
    else:
        engine = SAMPLER_NAMES[sampler.name]
        if engine in sampling.TIMESTEP_SAMPLERS:
            raise NodeError(
                f"sampler {sampler.name} walks its own timestep grid: it runs only SIGMAS of a BasicScheduler on the "
                "same model (whole, or split at denoise 1)"
            )
        n = int(values.shape[0]) - 1
        _check_steps(ctx, n)
        (out,) = _sample(ctx, steps=n, scheduler="normal", add_noise=add_noise, sigmas=values, **common)
    # ComfyUI's denoised_output is the last step's x0 estimate: the output itself where the last sigma is 0, except
    # after uni_pc / uni_pc_bh2, which walk a last 0 as 0.001 (their zero_sigma) and end there, as ComfyUI's
    zero_sigma = {**SAMPLER_OPTIONS.get(sampler.name, {}), **dict(sampler.options)}.get("zero_sigma", 0.0)
    at_x0 = float(values[-1]) == 0.0 and not zero_sigma
    denoised = out if at_x0 or not last else {**out, "samples": last[0].float().cpu()}
    return (out, dict(denoised))


def _lcm_upscale_custom(
    ctx: RunContext,
    model: ModelHandle,
    add_noise: bool,
    noise_seed: int,
    cfg: float,
    positive: list[Any],
    negative: list[Any],
    sampler: SamplerChoice,
    sigmas: Sigmas,
    latent_image: dict[str, Any],
    guider: Guider | None,
) -> tuple[Any, Any]:
    """SamplerCustom with SamplerLCMUpscale's sampler (ComfyUI's sample_lcm_upscale,
    :func:`~sdengine.server.comfy.nodes_sampling.lcm_upscale_loop`): each step's x0 is the guided model's at that
    sigma, taken from a one-step run of the sampler path on [sigma, 0] (the first with the seed's noise when
    ``add_noise``, as SamplerCustom starts any sampler; the later ones from the loop's latent as it is); the noise
    added between steps is drawn from a CPU generator seeded with noise_seed + 1 (ComfyUI draws it from torch's
    global generator, which no seed sets). Outputs: the last latent and the last x0 (before its upscale, as
    ComfyUI's denoised_output)."""
    from sdengine.diffusion import sampling
    from sdengine.server.comfy.nodes_sampling import lcm_upscale_loop

    opts = dict(sampler.options)
    values = sigmas.values.detach().to("cpu", torch.float32).reshape(-1)
    if values.shape[0] == 0:
        return (dict(latent_image), dict(latent_image))
    if values.shape[0] == 1:
        if float(values[0]) == 0.0 or not add_noise:
            return (dict(latent_image), dict(latent_image))
        raise NodeError(f"sigmas hold one value ({float(values[0]):g}): no step to run")
    problem = sampling.sigma_list_problem(values)
    if problem is not None:
        raise NodeError(f"{problem}, got {sigmas!r}")
    if sampling.sigmas_rise(values):
        raise NodeError("SamplerLCMUpscale cannot walk rising sigmas (unsampling): it denoises to x0 at each step")
    if latent_image.get("noise_mask") is not None:
        raise NodeError("SamplerLCMUpscale cannot sample with a noise mask: the latent changes size under it")
    n = int(values.shape[0]) - 1
    _check_steps(ctx, n)
    sig = [float(v) for v in values]
    pipe = ctx.pipeline(model.ref)
    f = int(pipe.vae_scale_factor)
    total = float(opts.get("total_upscale", 1.0))
    h0, w0 = latent_samples(latent_image, pipe).shape[-2:]
    if max(round(h0 * total), round(w0 * total)) * f > ctx.max_side:
        raise NodeError(f"scale_ratio {total:g} makes a latent over the server's limit of {ctx.max_side} pixels a side")
    last: list[torch.Tensor] = []
    x0: list[torch.Tensor] = []
    progress = ctx.progress
    extra: dict[str, Any] = {}
    if guider is not None and guider.rule is not None:
        extra.update(guidance_rule=guider.rule, third=guider.third)

    def denoise(x: torch.Tensor, i: int) -> torch.Tensor:
        step_ctx = ctx
        if progress is not None:
            step_ctx = replace(ctx, progress=lambda step, steps, d, **kw: progress(i + step, n, d, **kw))
        lat = latent_image if i == 0 else {**latent_image, "samples": x, "posterior": None, "noise_mask": None}
        _sample(
            step_ctx, model=model, seed=int(noise_seed), cfg=cfg, sampler_name="euler", positive=positive,
            negative=negative, latent_image=lat, last_denoised=last, discard_penultimate=False, steps=1,
            scheduler="normal", add_noise=add_noise and i == 0, sigmas=torch.tensor([sig[i], 0.0]), **extra,
        )  # fmt: skip
        d = last[0].float().cpu()
        x0[:] = [d]
        return d

    gen = torch.Generator().manual_seed((int(noise_seed) + 1) % 2**64)
    start = latent_samples(latent_image, pipe).float()
    out = lcm_upscale_loop(
        denoise,
        start,
        sig,
        total,
        int(opts.get("upscale_steps", -1)),
        str(opts.get("upscale_method", "bislerp")),
        lambda shape, i: torch.randn(shape, generator=gen),
    )
    from sdengine.pipeline.finite import require_finite

    require_finite(out, f"sampled latent (lcm_upscale, {n} steps)")

    def as_latent(z: torch.Tensor) -> dict[str, Any]:
        d: dict[str, Any] = {
            "samples": z.cpu(),
            "size": (z.shape[0], z.shape[2] * f, z.shape[3] * f),
            "posterior": None,
            "noise_mask": None,
        }
        if "batch_index" in latent_image:
            d["batch_index"] = latent_image["batch_index"]
        return d

    return (as_latent(out), as_latent(x0[0] if x0 else out))  # ComfyUI's denoised_output: the last x0


def sampler_custom_advanced(
    ctx: RunContext,
    noise: NoiseSource,
    guider: Guider,
    sampler: SamplerChoice,
    sigmas: Sigmas,
    latent_image: dict[str, Any],
) -> tuple[Any, Any]:
    """ComfyUI's SamplerCustomAdvanced: SamplerCustom with its noise (RandomNoise / DisableNoise) and guidance
    (CFGGuider / BasicGuider) given as nodes."""
    negative = guider.negative if guider.negative is not None else guider.positive  # cfg 1: never run
    return sampler_custom(
        ctx, guider.model, noise.enabled, noise.seed, guider.cfg, guider.positive, negative, sampler, sigmas,
        latent_image, guider,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ VAE


def vae_decode(
    ctx: RunContext,
    samples: dict[str, Any],
    vae: VaeHandle | VaeFileHandle | TinyVaeHandle,
    tiles: tuple[int, int] | None = None,
) -> tuple[Any]:
    """VAE Decode; ``tiles`` (tile size, overlap in pixels): VAEDecodeTiled's tiled decode (the tiny VAE decodes
    whole: it needs little memory)."""
    from sdengine import vae_utils

    if isinstance(vae, TinyVaeHandle):
        tiny = _tiny_vae(ctx, vae)
        if tiny.decoder is None:
            raise NodeError("taesd: the server's tiny VAE has no decoder")
        cfg = tiny.config
        z = _latent_or_zeros(samples, cfg.latent_channels, cfg.downscale_factor, "taesd")
        return (_decode_rows(tiny.decode, z, ctx.device),)  # as the pipeline's decode_tiny
    if isinstance(vae, VaeFileHandle):
        model = _vae_file(ctx, vae)
        c, f = _diffusion_shape(model)
        z = _latent_or_zeros(samples, c, f, f"VAE {Path(vae.path).name}")
        if c == RAW_LATENT_CHANNELS:  # SD3 / Flux: raw VAE latents, as ComfyUI's (decode unscales: undone first)
            z = model.scale_latents(z.float())
        kw = _tile_options(tiles, f)
        return (_decode_rows(lambda r: vae_utils.decode(model, r, warn=False, **kw)[0], z, ctx.device),)
    pipe = ctx.pipeline(vae.ref)
    z = latent_samples(samples, pipe)
    if z.shape[1] == RAW_LATENT_CHANNELS:  # SD3 / Flux: raw VAE latents, as ComfyUI's (decode unscales: undone first)
        z = pipe.vae.scale_latents(z.float())
    kw = _tile_options(tiles, vae_utils.downscale_factor(pipe.vae))
    decode = lambda r: vae_utils.decode(pipe.vae, r, upcast=pipe.vae_upcast, warn=False, **kw)[0]  # noqa: E731
    return (_decode_rows(decode, z, pipe.device),)


def _tile_options(tiles: tuple[int, int] | None, factor: int) -> dict[str, Any]:
    """vae_utils.decode's tiling of VAEDecodeTiled's pixel sizes, as ComfyUI: an overlap over a quarter of the
    tile is cut to a quarter; in latent pixels of the VAE's ``factor``."""
    if tiles is None:
        return {}
    tile_size, overlap = int(tiles[0]), int(tiles[1])
    if tile_size < overlap * 4:
        overlap = tile_size // 4
    return {"tiled": True, "tile": max(1, tile_size // factor), "overlap": overlap // factor}


def vae_decode_tiled(
    ctx: RunContext,
    samples: dict[str, Any],
    vae: VaeHandle | VaeFileHandle | TinyVaeHandle,
    tile_size: int,
    overlap: int,
    temporal_size: int = 64,
    temporal_overlap: int = 8,
) -> tuple[Any]:
    """ComfyUI's VAEDecodeTiled: the latent decoded in overlapping tiles (``tile_size`` and ``overlap`` pixels),
    blended; for large images within less memory. The temporal sizes are for video VAEs (none here)."""
    return vae_decode(ctx, samples, vae, (tile_size, overlap))


def _latent_or_zeros(samples: dict[str, Any], channels: int, factor: int, what: str) -> torch.Tensor:
    """The latent of ``samples`` for a VAE of ``channels`` at ``factor`` (an empty latent is made now)."""
    z = samples.get("samples")
    if z is None:
        b, h, w = samples["size"]
        z = torch.zeros(b, channels, h // factor, w // factor)
    if z.shape[1] != channels:
        raise NodeError(f"{what} decodes {channels}-channel latents, these have {z.shape[1]}")
    return z


def _decode_rows(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, device: Any) -> torch.Tensor:
    """IMAGE (B, H, W, 3) in [0, 1] of ``decode`` (latents -> images in [-1, 1]) run one row at a time, as the
    pipeline decodes: a row's pixels never depend on its batch."""
    from sdengine import vae_utils
    from sdengine.pipeline.finite import require_finite

    out = []
    with torch.inference_mode():
        for i in range(z.shape[0]):
            # NaN/inf pixels would be saved as a black image: refused, as the pipeline refuses them
            row = require_finite(decode(z[i : i + 1].to(device)).float(), "decoded image")
            out.append(vae_utils.to_unit(row).float().cpu())
    return torch.cat(out).permute(0, 2, 3, 1).contiguous()


def _pixel_row(pixels: torch.Tensor, i: int, device: Any) -> torch.Tensor:
    """Row ``i`` of IMAGE pixels as (1, 3, H, W) in [-1, 1] on ``device``, laid out as the pipeline lays out its
    init image (the convolutions' rounding depends on the memory layout), so that img2img gives its latents."""
    # an RGBA image (JoinImageWithAlpha's) is encoded by its colour, as ComfyUI's VAEEncode (pixels[..., :3])
    return pixels[i, ..., :3].float().contiguous().permute(2, 0, 1)[None].to(device) * 2.0 - 1.0


def _tiny_encode(ctx: RunContext, pixels: torch.Tensor, vae: TinyVaeHandle) -> dict[str, Any]:
    tiny = _tiny_vae(ctx, vae)
    if tiny.encoder is None:
        raise NodeError("taesd: the server's tiny VAE has no encoder (give its taesd_encoder beside the decoder)")
    pixels = _crop_to_factor(pixels, tiny.config.downscale_factor)
    b, h, w, _ = pixels.shape
    with torch.inference_mode():
        z = torch.cat([tiny.encode(_pixel_row(pixels, i, ctx.device)).float().cpu() for i in range(b)])
    # The posterior in the diffusion model's units, without spread: KSampler draws each row's eps as for the
    # VAE's posterior (so the seed's noise is the pipeline's with vae_encode="tiny") and adds nothing.
    return {
        "samples": z,
        "size": (b, h, w),
        "posterior": (z, torch.zeros_like(z)),
        "posterior_scaled": True,
        "noise_mask": None,
    }


def _crop_to_factor(pixels: torch.Tensor, f: int) -> torch.Tensor:
    """``pixels`` (B, H, W, C) cropped, centred, to a multiple of the VAE factor ``f``, as ComfyUI does."""
    _, h, w, _ = pixels.shape
    h8, w8 = h // f * f, w // f * f
    if h8 == 0 or w8 == 0:
        raise NodeError(f"an image of {w}x{h} is smaller than the VAE factor {f}")
    if (h8, w8) != (h, w):
        y, x = (h % f) // 2, (w % f) // 2
        pixels = pixels[:, y : y + h8, x : x + w8]
    return pixels


def _vae_factor(ctx: RunContext, vae: VaeHandle | VaeFileHandle | TinyVaeHandle) -> int:
    """How many pixels of a side one latent pixel of ``vae`` covers."""
    if isinstance(vae, TinyVaeHandle):
        return int(_tiny_vae(ctx, vae).config.downscale_factor)
    net = _vae_file(ctx, vae) if isinstance(vae, VaeFileHandle) else ctx.pipeline(vae.ref).vae
    return int(net.config.downscale_factor)


def _encode(ctx: RunContext, pixels: torch.Tensor, vae: VaeHandle | VaeFileHandle | TinyVaeHandle) -> dict[str, Any]:
    if isinstance(vae, TinyVaeHandle):
        return _tiny_encode(ctx, pixels, vae)
    if isinstance(vae, VaeFileHandle):
        return _vae_encode_rows(_vae_file(ctx, vae), torch.device(ctx.device), pixels)
    pipe = ctx.pipeline(vae.ref)
    return _vae_encode_rows(pipe.vae, pipe.device, pixels)


def _vae_encode_rows(vae: Any, device: torch.device, pixels: torch.Tensor, **tiling: Any) -> dict[str, Any]:
    """VAE Encode of each row (``tiling``: vae_utils.encode_moments' tile options, VAEEncodeTiled's)."""
    from sdengine import vae_utils

    pixels = _crop_to_factor(pixels, _diffusion_shape(vae)[1])
    b, h8, w8, _ = pixels.shape
    means, stds = [], []
    with torch.inference_mode():
        for i in range(b):
            post = vae_utils.encode_moments(vae, _pixel_row(pixels, i, device), **tiling)
            means.append(post.mean.float())
            stds.append(post.std.float())
        mean, std = torch.cat(means), torch.cat(stds)
        if int(vae.config.latent_channels) == RAW_LATENT_CHANNELS:  # SD3 / Flux: the raw mean, as ComfyUI's
            return {"samples": mean.cpu(), "size": (b, h8, w8), "posterior": None, "noise_mask": None}
        samples = vae.scale_latents(mean)
        if hasattr(vae.config, "diffusion_channels"):  # FLUX.2: the mean's patches, as ComfyUI's (no draw)
            return {"samples": samples.cpu(), "size": (b, h8, w8), "posterior": None, "noise_mask": None}
    return {"samples": samples.cpu(), "size": (b, h8, w8), "posterior": (mean.cpu(), std.cpu()), "noise_mask": None}


def vae_encode(ctx: RunContext, pixels: torch.Tensor, vae: VaeHandle | VaeFileHandle | TinyVaeHandle) -> tuple[Any]:
    return (_encode(ctx, pixels, vae),)


def vae_encode_tiled(
    ctx: RunContext,
    pixels: torch.Tensor,
    vae: VaeHandle | VaeFileHandle | TinyVaeHandle,
    tile_size: int,
    overlap: int,
    temporal_size: int = 64,
    temporal_overlap: int = 8,
) -> tuple[Any]:
    """ComfyUI's VAEEncodeTiled: the image encoded in overlapping tiles (``tile_size`` and ``overlap`` pixels; an
    overlap over a quarter of the tile cut to a quarter, as VAEDecodeTiled), the posteriors blended at the seams.
    The tiny VAE encodes whole; the temporal sizes are for video VAEs (none here)."""
    if isinstance(vae, TinyVaeHandle):
        return (_tiny_encode(ctx, pixels, vae),)
    tiling = _tile_options((tile_size, overlap), _vae_factor(ctx, vae))
    if isinstance(vae, VaeFileHandle):
        return (_vae_encode_rows(_vae_file(ctx, vae), torch.device(ctx.device), pixels, **tiling),)
    pipe = ctx.pipeline(vae.ref)
    return (_vae_encode_rows(pipe.vae, pipe.device, pixels, **tiling),)


def _mask4(mask: torch.Tensor) -> torch.Tensor:
    m = mask.float()
    return m[None, None] if m.ndim == 2 else m[:, None] if m.ndim == 3 else m


def vae_encode_for_inpaint(
    ctx: RunContext, pixels: torch.Tensor, vae: VaeHandle, mask: torch.Tensor, grow_mask_by: int
) -> tuple[Any]:
    b, h, w, _ = pixels.shape
    m = F.interpolate(_mask4(mask), size=(h, w), mode="bilinear")
    # as ComfyUI: the image and its mask cut (centred) to the VAE's factor first, so that the noise mask covers
    # the latent's pixels (the image alone was cut: a mask a few pixels off, stretched over the latent)
    f = _vae_factor(ctx, vae)
    pixels = _crop_to_factor(pixels, f)
    y, x = (h % f) // 2, (w % f) // 2
    h, w = pixels.shape[1], pixels.shape[2]
    m = m[:, :, y : y + h, x : x + w]
    hard = m.round()
    grown = hard
    g = int(grow_mask_by)
    if g > 0:  # as ComfyUI: a g x g box over the rounded mask (padding ceil((g - 1) / 2)), cut back to the image
        kernel = torch.ones((1, 1, g, g), dtype=hard.dtype)
        grown = F.conv2d(hard, kernel, padding=math.ceil((g - 1) / 2)).clamp(0, 1)[:, :, :h, :w]
    # only the mask itself is greyed out; the grown band is repainted from the image's own pixels
    grey = pixels * (1 - hard[:, 0, :, :, None]) + 0.5 * hard[:, 0, :, :, None]
    latent = _encode(ctx, grey, vae)
    latent["noise_mask"] = grown.round()
    return (latent,)


def set_latent_noise_mask(ctx: RunContext, samples: dict[str, Any], mask: torch.Tensor) -> tuple[Any]:
    return ({**samples, "noise_mask": _mask4(mask)},)


def empty_latent(ctx: RunContext, width: int, height: int, batch_size: int) -> tuple[Any]:
    ctx.check_size(width, height, batch_size)
    return (
        {"samples": None, "size": (int(batch_size), int(height), int(width)), "posterior": None, "noise_mask": None},
    )


def _center_box(w0: int, h0: int, w: int, h: int) -> tuple[int, int, int, int]:
    """The box (x0, y0, x1, y1) of a w0 x h0 image cut to the aspect of w x h around its centre (ComfyUI's)."""
    old_aspect, new_aspect = w0 / h0, w / h
    x, y = 0, 0
    if old_aspect > new_aspect:
        x = round((w0 - w0 * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((h0 - h0 * (old_aspect / new_aspect)) / 2)
    return x, y, w0 - x, h0 - y


def _target_size(w0: int, h0: int, width: int, height: int) -> tuple[int, int]:
    if width == 0 and height == 0:
        return w0, h0
    if width == 0:
        return max(1, round(w0 * height / h0)), height
    if height == 0:
        return width, max(1, round(h0 * width / w0))
    return width, height


def _resize_nchw(x: torch.Tensor, w: int, h: int, method: str, crop: str = "disabled") -> torch.Tensor:
    if crop == "center":
        x0, y0, x1, y1 = _center_box(x.shape[3], x.shape[2], w, h)
        x = x[:, :, y0:y1, x0:x1]
    return resize_by_method(x, w, h, method)


def _upscale_latent(samples: dict[str, Any], method: str, w: int, h: int, crop: str) -> dict[str, Any]:
    b, h0, w0 = samples["size"]
    if samples.get("samples") is None:
        return {**samples, "size": (b, h, w)}
    z = samples["samples"]
    f = h0 // z.shape[2]
    # ComfyUI's LatentUpscale takes width // 8 x height // 8 latent pixels: a size off the factor rounds down
    lw, lh = max(1, w // f), max(1, h // f)
    z = _resize_nchw(z.float(), lw, lh, method, crop)
    out = {"samples": z, "size": (b, lh * f, lw * f), "posterior": None, "noise_mask": samples.get("noise_mask")}
    if "batch_index" in samples:
        out["batch_index"] = samples["batch_index"]
    return out


def _rows_of(t: torch.Tensor | None, rows: list[int]) -> torch.Tensor | None:
    """Rows ``rows`` of a per-row tensor (one row given stands for every row, as ComfyUI's masks)."""
    if t is None or t.shape[0] == 1:
        return t
    return t[[r % t.shape[0] for r in rows]]


def _latent_rows(samples: dict[str, Any], rows: list[int], batch_index: list[int]) -> dict[str, Any]:
    """The latent made of rows ``rows`` of ``samples`` (its samples, posterior and noise mask alike)."""
    _, h, w = samples["size"]
    z = samples.get("samples")
    post = samples.get("posterior")
    out = {
        **samples,
        "samples": None if z is None else z[rows],
        "size": (len(rows), h, w),
        "posterior": None if post is None else tuple(_rows_of(t, rows) for t in post),
        "noise_mask": _rows_of(samples.get("noise_mask"), rows),
        "batch_index": batch_index,
    }
    return out


def _composite_latents(
    to: dict[str, Any], src: dict[str, Any], node: str
) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """The two latents' tensors for a composite (an empty one made in the other's channels) and the VAE factor
    (image pixels per latent pixel: ComfyUI's 8 on SD and SDXL); None when both are empty (zeros over zeros: the
    destination as it is)."""
    a, b = to.get("samples"), src.get("samples")
    if a is None and b is None:
        return None
    ref, ref_size = (a, to["size"]) if a is not None else (b, src["size"])
    assert ref is not None
    f = max(1, ref_size[1] // ref.shape[2])  # the VAE factor: pixels per latent pixel
    made = []
    for lat, z in ((to, a), (src, b)):
        if z is None:
            n, h, w = lat["size"]
            z = torch.zeros(n, ref.shape[1], max(1, h // f), max(1, w // f))
        made.append(z.float())
    if made[0].shape[1] != made[1].shape[1]:
        raise NodeError(f"{node}: the latents have {made[0].shape[1]} and {made[1].shape[1]} channels")
    return made[0], made[1], f


def _composited(to: dict[str, Any], z: torch.Tensor) -> dict[str, Any]:
    """``to`` with new samples ``z`` (its noise mask and rows kept; a VAE posterior no longer describes it)."""
    out = {**to, "samples": z, "posterior": None}
    out.pop("posterior_scaled", None)
    return out


def latent_composite(
    ctx: RunContext, samples_to: dict[str, Any], samples_from: dict[str, Any], x: int, y: int, feather: int
) -> tuple[Any]:
    """ComfyUI's LatentComposite: ``samples_from`` pasted into ``samples_to`` at (x, y) (pixels floored to latent
    pixels; cut to fit), its inner edges blended over ``feather`` pixels (floored to latent pixels)."""
    pair = _composite_latents(samples_to, samples_from, "LatentComposite")
    if pair is None:
        return (dict(samples_to),)
    dst, src, f = pair
    if src.shape[0] not in (1, dst.shape[0]):
        raise NodeError(f"LatentComposite: a batch of {src.shape[0]} does not fit into a batch of {dst.shape[0]}")
    x, y, fe = int(x) // f, int(y) // f, int(feather) // f
    out = dst.clone()
    src = src[:, :, : max(0, dst.shape[2] - y), : max(0, dst.shape[3] - x)]
    if src.numel() == 0:
        return (_composited(samples_to, out),)
    hs, ws = src.shape[2], src.shape[3]
    region = out[:, :, y : y + hs, x : x + ws]
    mask = torch.ones(1, 1, hs, ws)
    for t in range(fe):
        v = (t + 1) / fe
        if y != 0:
            mask[:, :, t : t + 1, :] *= v
        if y + hs < dst.shape[2]:
            mask[:, :, hs - 1 - t : hs - t, :] *= v
        if x != 0:
            mask[:, :, :, t : t + 1] *= v
        if x + ws < dst.shape[3]:
            mask[:, :, :, ws - 1 - t : ws - t] *= v
    out[:, :, y : y + hs, x : x + ws] = src * mask + region * (1 - mask)
    return (_composited(samples_to, out),)


def _to_batch(t: torch.Tensor, n: int) -> torch.Tensor:
    """ComfyUI's repeat_to_batch_size: the first ``n`` rows, or the rows repeated to ``n``."""
    if t.shape[0] >= n:
        return t[:n]
    return t.repeat(math.ceil(n / t.shape[0]), *([1] * (t.ndim - 1)))[:n]


def _composite_masked(
    dst: torch.Tensor, src: torch.Tensor, x: int, y: int, mask: torch.Tensor | None, factor: int, resize: bool
) -> torch.Tensor:
    """ComfyUI's composite (nodes_mask): ``src`` (B, C, h, w) over ``dst`` at (x, y) pixels (``factor`` pixels a
    cell), weighted by ``mask`` bilinearly resized to ``src``; ``resize``: ``src`` first resized to ``dst``."""
    if resize:
        src = F.interpolate(src, size=(dst.shape[-2], dst.shape[-1]), mode="bilinear")
    src = _to_batch(src, dst.shape[0])
    left, top = min(x, dst.shape[-1] * factor) // factor, min(y, dst.shape[-2] * factor) // factor
    if mask is None:
        m = torch.ones_like(src[:, :1])
    else:
        m = mask.float().reshape(-1, 1, mask.shape[-2], mask.shape[-1])
        m = _to_batch(F.interpolate(m, size=(src.shape[-2], src.shape[-1]), mode="bilinear"), src.shape[0])
    vh, vw = dst.shape[-2] - top, dst.shape[-1] - left
    part = src[..., :vh, :vw]
    m = m[..., :vh, :vw]
    out = dst.clone()
    region = out[..., top : top + part.shape[-2], left : left + part.shape[-1]]
    out[..., top : top + part.shape[-2], left : left + part.shape[-1]] = m * part + (1 - m) * region
    return out


# The helpers the node families (nodes_<family>.py) share, by public name.
repeat_to_batch = _to_batch
resize_nchw = _resize_nchw
composite_latents = _composite_latents
with_samples = _composited
center_box = _center_box
controlnet_names = _controlnets


def latent_composite_masked(
    ctx: RunContext,
    destination: dict[str, Any],
    source: dict[str, Any],
    x: int,
    y: int,
    resize_source: bool,
    mask: torch.Tensor | None = None,
) -> tuple[Any]:
    """ComfyUI's LatentCompositeMasked: ``source`` over ``destination`` at (x, y) (pixels, floored to latent
    pixels), weighted by the mask (bilinearly resized to the source); ``resize_source`` scales it to the
    destination first."""
    pair = _composite_latents(destination, source, "LatentCompositeMasked")
    if pair is None:
        return (dict(destination),)
    dst, src, f = pair
    return (_composited(destination, _composite_masked(dst, src, int(x), int(y), mask, f, bool(resize_source))),)


def image_composite_masked(
    ctx: RunContext,
    destination: torch.Tensor,
    source: torch.Tensor,
    x: int,
    y: int,
    resize_source: bool,
    mask: torch.Tensor | None = None,
) -> tuple[Any]:
    """ComfyUI's ImageCompositeMasked: ``source`` over ``destination`` at pixel (x, y), weighted by the mask."""
    dst = destination.float().movedim(-1, 1)
    src = source.float().movedim(-1, 1)[:, : dst.shape[1]]
    if src.shape[1] < dst.shape[1]:  # IMAGE is RGB here; an alpha source is cut to it, as ComfyUI's alpha fix
        raise NodeError(f"ImageCompositeMasked: a {src.shape[1]}-channel source over a {dst.shape[1]}-channel image")
    out = _composite_masked(dst, src, int(x), int(y), mask, 1, bool(resize_source))
    return (out.movedim(1, -1).clamp(0, 1).contiguous(),)


def latent_from_batch(ctx: RunContext, samples: dict[str, Any], batch_index: int, length: int) -> tuple[Any]:
    """ComfyUI's LatentFromBatch: ``length`` rows from ``batch_index`` on (both cut to the batch), each keeping
    its row of the original batch, so that it gets the noise it had there."""
    b = samples["size"][0]
    start = min(b - 1, int(batch_index))
    n = min(b - start, int(length))
    rows = list(range(start, start + n))
    known = samples.get("batch_index")
    return (_latent_rows(samples, rows, [known[r] for r in rows] if known else rows),)


def repeat_latent_batch(ctx: RunContext, samples: dict[str, Any], amount: int) -> tuple[Any]:
    """ComfyUI's RepeatLatentBatch: the batch ``amount`` times over; a batch that records its rows (LatentFromBatch)
    numbers each copy past the previous one's rows, as ComfyUI."""
    b, h, w = samples["size"]
    ctx.check_size(w, h, b * int(amount))
    rows = [r for _ in range(int(amount)) for r in range(b)]
    known = samples.get("batch_index")
    out = _latent_rows(samples, rows, [])
    if known:
        span = max(known) - min(known) + 1
        out["batch_index"] = [x + i * span for i in range(int(amount)) for x in known]
    else:
        del out["batch_index"]
    return (out,)


def latent_upscale(
    ctx: RunContext, samples: dict[str, Any], upscale_method: str, width: int, height: int, crop: str
) -> tuple[Any]:
    _, h0, w0 = samples["size"]
    w, h = _target_size(w0, h0, int(width), int(height))
    ctx.check_size(w, h)
    return (_upscale_latent(samples, upscale_method, w, h, crop),)


def latent_upscale_by(ctx: RunContext, samples: dict[str, Any], upscale_method: str, scale_by: float) -> tuple[Any]:
    b, h0, w0 = samples["size"]
    f = 8 if samples.get("samples") is None else h0 // samples["samples"].shape[2]
    w, h = max(f, round(w0 * scale_by / f) * f), max(f, round(h0 * scale_by / f) * f)
    ctx.check_size(w, h)
    return (_upscale_latent(samples, upscale_method, w, h, "disabled"),)


# ---------------------------------------------------------------------------------------------- images


def image_scale(
    ctx: RunContext, image: torch.Tensor, upscale_method: str, width: int, height: int, crop: str
) -> tuple[Any]:
    _, h0, w0, _ = image.shape
    w, h = _target_size(w0, h0, int(width), int(height))
    ctx.check_size(w, h)
    if upscale_method == "lanczos":  # ComfyUI: the centre cut first (to the target's aspect), then PIL's Lanczos
        if crop == "center":
            x0, y0, x1, y1 = _center_box(w0, h0, w, h)
            image = image[:, y0:y1, x0:x1, :]
        out = [image_to_tensor(p.resize((w, h), Image.Resampling.LANCZOS)) for p in tensor_to_pil(image)]
        return (torch.cat(out),)
    x = _resize_nchw(image.permute(0, 3, 1, 2).float(), w, h, upscale_method, crop)
    return (x.clamp(0, 1).permute(0, 2, 3, 1).contiguous(),)


def image_scale_by(ctx: RunContext, image: torch.Tensor, upscale_method: str, scale_by: float) -> tuple[Any]:
    """ComfyUI's ImageScaleBy: each side times ``scale_by``, rounded (Python's round, as ComfyUI), no crop."""
    _, h0, w0, _ = image.shape
    w, h = max(1, round(w0 * float(scale_by))), max(1, round(h0 * float(scale_by)))
    return image_scale(ctx, image, upscale_method, w, h, "disabled")


@dataclass(frozen=True)
class UpscaleModelHandle:
    """UpscaleModelLoader's model: an ESRGAN / Real-ESRGAN file of ``--upscalers-dir``."""

    path: str
    scale: int


def _upscale_models(env: Any) -> list[str]:
    """The files of ``--upscalers-dir`` by file name (ComfyUI lists its ``models/upscale_models`` so)."""
    return [Path(e.ref).name for e in env.catalog.upscalers()]


def upscale_model_loader(ctx: RunContext, model_name: str) -> tuple[Any]:
    """ComfyUI's UpscaleModelLoader: the file is read (a bad one fails at this node) and its scale learnt."""
    from sdengine.models.esrgan import spec_of
    from sdengine.weights.upscaler_file import load_upscaler

    _, path = ctx.catalog.resolve_upscaler(model_name)
    model = load_upscaler(path, ctx.device)
    return (UpscaleModelHandle(str(path), spec_of(model).scale),)


def image_upscale_with_model(ctx: RunContext, upscale_model: Any, image: torch.Tensor) -> tuple[Any]:
    """ComfyUI's ImageUpscaleWithModel: each image through the model (fp32, on the worker's device) in tiles as
    ComfyUI's ``tiled_scale`` (512 with an overlap of 32, feathered blend: ``upscale_tensor_comfyui``), ``scale``
    times its size, clamped to [0, 1]. The result may be larger than the
    server's --max-side (that limits generation, not upscaling) but not than --max-image-pixels or 8192 a side."""
    from sdengine.models.esrgan import spec_of, upscale_tensor_comfyui
    from sdengine.weights.upscaler_file import load_upscaler

    if not isinstance(upscale_model, UpscaleModelHandle):
        raise NodeError("upscale_model must come from UpscaleModelLoader")
    b, h, w, _ = image.shape
    s = upscale_model.scale
    if max(w, h) * s > 8192 or w * h * s * s > ctx.max_pixels:
        raise NodeError(
            f"upscaling {w}x{h} by {s} is over the server's limit of 8192 pixels a side and {ctx.max_pixels} pixels"
        )
    model = load_upscaler(upscale_model.path, ctx.device)
    x = image[..., :3].permute(0, 3, 1, 2).float()  # an RGBA image's colour
    if spec_of(model).in_channels == 1:
        x = x.mean(1, keepdim=True)
    rows = [upscale_tensor_comfyui(model, x[i : i + 1]) for i in range(b)]
    out = torch.cat(rows).clamp(0, 1)
    if out.shape[1] == 1:
        out = out.expand(-1, 3, -1, -1)
    return (out[:, :3].permute(0, 2, 3, 1).contiguous(),)


def image_batch(ctx: RunContext, image1: torch.Tensor, image2: torch.Tensor) -> tuple[Any]:
    """ComfyUI's ImageBatch: image2's rows after image1's, image2 first scaled (bilinear, cut to the aspect around
    its centre) to image1's size when the sizes differ."""
    _, h, w, _ = image1.shape
    ctx.check_size(w, h, image1.shape[0] + image2.shape[0])
    if tuple(image2.shape[1:3]) != (h, w):
        scaled = _resize_nchw(image2.permute(0, 3, 1, 2).float(), w, h, "bilinear", "center")
        image2 = scaled.clamp(0, 1).permute(0, 2, 3, 1)
    return (torch.cat([image1.float(), image2[..., : image1.shape[3]].float()]),)


def canny_node(ctx: RunContext, image: torch.Tensor, low_threshold: float, high_threshold: float) -> tuple[Any]:
    """ComfyUI's Canny: ``kornia.filters.canny`` on the float image (a 5x5 Gaussian blur of sigma 1 first; the
    thresholds on the L2 Sobel magnitude), white edges on black (see sdengine.control.canny_fractions)."""
    from sdengine.control import ControlNetError, canny_fractions

    try:
        rows = [
            canny_fractions(a, float(low_threshold), float(high_threshold))
            for a in image[..., :3].float().clamp(0, 1).cpu().numpy()  # an RGBA image's colour
        ]
    except ControlNetError as e:
        raise NodeError(str(e)) from None
    edges = torch.from_numpy(np.stack(rows).astype(np.float32))  # (B, H, W), 0 or 1
    return (edges[..., None].expand(-1, -1, -1, 3).contiguous(),)


def image_pad_for_outpaint(
    ctx: RunContext, image: torch.Tensor, left: int, top: int, right: int, bottom: int, feathering: int
) -> tuple[Any, Any]:
    """ComfyUI's ImagePadForOutpaint: the image on a grey (0.5) canvas grown by the margins, and the MASK of what to
    paint: 1 on the margins; inside the image 0, or with ``feathering`` (when under half of each side) rising as
    ((feathering - d) / feathering) ** 2 towards each padded side, d the distance to it."""
    b, h, w, c = image.shape
    ctx.check_size(w + left + right, h + top + bottom)
    out = torch.full((b, h + top + bottom, w + left + right, c), 0.5)
    out[:, top : top + h, left : left + w] = image.float()
    mask = torch.ones(h + top + bottom, w + left + right)
    inner = torch.zeros(h, w)
    fe = int(feathering)
    if fe > 0 and fe * 2 < h and fe * 2 < w:
        i = torch.arange(h, dtype=torch.float64)[:, None].expand(h, w)
        j = torch.arange(w, dtype=torch.float64)[None, :].expand(h, w)
        far_h, far_w = torch.full_like(i, float(h)), torch.full_like(j, float(w))
        d = torch.stack(
            [i if top else far_h, h - i if bottom else far_h, j if left else far_w, w - j if right else far_w]
        ).amin(0)
        v = (fe - d) / fe
        inner = torch.where(d < fe, v * v, 0.0).float()
    mask[top : top + h, left : left + w] = inner
    return out, mask[None]


def image_invert(ctx: RunContext, image: torch.Tensor) -> tuple[Any]:
    return (1.0 - image.float(),)


def empty_image(ctx: RunContext, width: int, height: int, batch_size: int, color: int) -> tuple[Any]:
    """ComfyUI's EmptyImage: a batch of one colour (0xRRGGBB)."""
    ctx.check_size(int(width), int(height), int(batch_size))
    rgb = torch.tensor([(color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF], dtype=torch.float32) / 0xFF
    return (rgb.expand(int(batch_size), int(height), int(width), 3).contiguous(),)


def image_crop(ctx: RunContext, image: torch.Tensor, width: int, height: int, x: int, y: int) -> tuple[Any]:
    """ComfyUI's ImageCrop: the box at (x, y) cut to the image (x and y at most its last column and row)."""
    x, y = min(int(x), image.shape[2] - 1), min(int(y), image.shape[1] - 1)
    return (image[:, y : y + int(height), x : x + int(width), :].contiguous(),)


def mask_to_image(ctx: RunContext, mask: torch.Tensor) -> tuple[Any]:
    """ComfyUI's MaskToImage: each mask as a grey image."""
    m = mask.float().reshape(-1, mask.shape[-2], mask.shape[-1])
    return (m[..., None].expand(-1, -1, -1, 3).contiguous(),)


def image_to_mask(ctx: RunContext, image: torch.Tensor, channel: str) -> tuple[Any]:
    """ComfyUI's ImageToMask: one channel of the image."""
    index = ("red", "green", "blue", "alpha").index(channel)
    if index >= image.shape[-1]:  # an IMAGE here is RGB: LoadImage's alpha is its MASK output, as in ComfyUI
        raise NodeError(f"ImageToMask: the image has no {channel} channel (LoadImage gives the alpha as its MASK)")
    return (image[..., index].float().contiguous(),)


def solid_mask(ctx: RunContext, value: float, width: int, height: int) -> tuple[Any]:
    ctx.check_size(int(width), int(height))
    return (torch.full((1, int(height), int(width)), float(value)),)


def invert_mask(ctx: RunContext, mask: torch.Tensor) -> tuple[Any]:
    return (1.0 - mask.float(),)


def mask_composite(
    ctx: RunContext, destination: torch.Tensor, source: torch.Tensor, x: int, y: int, operation: str
) -> tuple[Any]:
    """ComfyUI's MaskComposite: ``source`` combined into ``destination`` at (x, y) by ``operation`` (and / or / xor
    on the masks rounded to 0 or 1), clamped to [0, 1]."""
    out = destination.float().reshape(-1, destination.shape[-2], destination.shape[-1]).clone()
    src = source.float().reshape(-1, source.shape[-2], source.shape[-1])
    if src.shape[0] not in (1, out.shape[0]):
        raise NodeError(f"MaskComposite: a batch of {src.shape[0]} masks does not fit one of {out.shape[0]}")
    x, y = int(x), int(y)
    right, bottom = min(x + src.shape[-1], out.shape[-1]), min(y + src.shape[-2], out.shape[-2])
    if right > x and bottom > y:
        a, b_ = out[:, y:bottom, x:right], src[:, : bottom - y, : right - x]
        if operation == "multiply":
            r = a * b_
        elif operation == "add":
            r = a + b_
        elif operation == "subtract":
            r = a - b_
        else:
            op = {"and": torch.logical_and, "or": torch.logical_or, "xor": torch.logical_xor}[operation]
            r = op(a.round().bool(), b_.round().bool()).float()
        out[:, y:bottom, x:right] = r
    return (out.clamp(0.0, 1.0),)


def feather_mask(ctx: RunContext, mask: torch.Tensor, left: int, top: int, right: int, bottom: int) -> tuple[Any]:
    """ComfyUI's FeatherMask: the edges ramped to 0 over the given widths, ((k + 1) / width at the k-th pixel from
    the edge). As ComfyUI indexes the right and bottom ramps from ``-k``, their first factor lands on the first
    column / row (index -0) and the last column / row gets the second: kept, so that a workflow's mask is
    ComfyUI's."""
    out = mask.float().reshape(-1, mask.shape[-2], mask.shape[-1]).clone()
    h, w = out.shape[-2:]
    left, right, top, bottom = min(left, w), min(right, w), min(top, h), min(bottom, h)
    for k in range(left):
        out[:, :, k] *= (k + 1.0) / left
    for k in range(right):
        out[:, :, -k] *= (k + 1) / right
    for k in range(top):
        out[:, k, :] *= (k + 1) / top
    for k in range(bottom):
        out[:, -k, :] *= (k + 1) / bottom
    return (out,)


def grow_mask(ctx: RunContext, mask: torch.Tensor, expand: int, tapered_corners: bool) -> tuple[Any]:
    """ComfyUI's GrowMask: ``expand`` steps of grey dilation (erosion when negative) with a 3 x 3 footprint, a cross
    when ``tapered_corners``; the border is its own neighbour (scipy's reflect mode)."""
    m = mask.float().reshape(-1, 1, mask.shape[-2], mask.shape[-1])
    h, w = m.shape[-2:]
    steps = min(abs(int(expand)), h + w)  # past h + w steps nothing changes any more
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if not (tapered_corners and dy and dx)]
    for _ in range(steps):
        p = F.pad(m, (1, 1, 1, 1), mode="replicate")
        shifted = torch.stack([p[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy, dx in offsets])
        m = shifted.amax(0) if expand > 0 else shifted.amin(0)
    return (m[:, 0],)


def load_image(ctx: RunContext, image: str) -> tuple[Any, ...]:
    rgbs, masks = [], []
    for img in _load_input_image(ctx, image, frames=True):
        rgbs.append(image_to_tensor(img))
        if "A" in img.getbands():
            alpha = torch.from_numpy(np.asarray(img.getchannel("A"), dtype=np.float32) / 255.0)
            masks.append((1.0 - alpha)[None])  # ComfyUI: transparent = repaint
        else:
            masks.append(torch.zeros(1, img.height, img.width))
    return torch.cat(rgbs), torch.cat(masks)


def load_image_mask(ctx: RunContext, image: str, channel: str) -> tuple[Any]:
    (img,) = _load_input_image(ctx, image)
    band = {"alpha": "A", "red": "R", "green": "G", "blue": "B"}[channel]
    if band == "A" and "A" not in img.getbands():
        return (torch.zeros(1, img.height, img.width),)
    src = img.convert("RGBA")
    m = torch.from_numpy(np.asarray(src.getchannel(band), dtype=np.float32) / 255.0)
    if band == "A":
        m = 1.0 - m
    return (m[None],)


_MAX_SAVE_TRIES = 10000  # numbers tried past the listed highest before a save gives up


def save_folder(ctx: RunContext, prefix: str, kind: str, width: int, height: int, suffix: str) -> tuple[Path, str, str]:
    """Where a saver writes under ``filename_prefix`` (ComfyUI's get_save_image_path): the folder (created), its
    subfolder as the history lists it, and the file names' stem; NodeError for a prefix that leaves the ``kind``
    folder or gives names too long (``suffix``: the files' ending, for that length)."""
    from sdengine.io.paths import NAME_MAX, check_name, is_inside

    prefix = prefix_vars(prefix.strip() or "ComfyUI", width, height)
    sub, _, stem = prefix.replace("\\", "/").rpartition("/")
    root = ctx.folders.root(kind)
    try:
        if sub:
            check_name(sub, "filename_prefix")
        check_name(stem, "filename_prefix")
    except ValueError as e:
        raise NodeError(str(e)) from None
    folder = root / sub
    ctx.folders.make_root(kind)
    if not is_inside(root, folder) or stem.startswith("."):
        raise NodeError(f"filename_prefix {prefix!r} leaves the {kind} folder")
    if len(f"{stem}_00000_{suffix}".encode()) > NAME_MAX:  # the counter and suffix must fit in one file name too
        raise NodeError(f"filename_prefix {stem[:40]!r}... is too long: its file names would be over {NAME_MAX} bytes")
    folder.mkdir(parents=True, exist_ok=True)
    return folder, sub, stem


def first_free_counter(folder: Path, stem: str, suffix_pattern: str) -> int:
    """One past the highest counter of ``stem``'s files in ``folder`` (``stem_NNNNN_`` then ``suffix_pattern``, a
    regular expression; read by name: a prefix such as "shot[1]" is no glob pattern, which once found none, so that
    every run wrote over the first images)."""
    pattern = re.compile(re.escape(stem).replace(re.escape("%batch_num%"), r"\d+") + r"_(\d+)_" + suffix_pattern)
    used = [int(m.group(1)) for p in folder.iterdir() if (m := pattern.fullmatch(p.name))]
    return max(used, default=0) + 1


def write_numbered(folder: Path, base: str, counter: int, suffix: str, write: Callable[[Any], None]) -> tuple[str, int]:
    """Write the file ``base_NNNNN_suffix`` with the first free number from ``counter`` (each name created
    exclusively: another server sharing the folder may have taken a number since the listing; the file then takes
    the next free one instead of writing over it); ``write(f)`` fills the open binary file. Returns the name and
    the counter after it."""
    for _ in range(_MAX_SAVE_TRIES):
        name = f"{base}_{counter:05d}_{suffix}"
        counter += 1
        try:
            f = open(folder / name, "xb")  # noqa: SIM115 (closed below, removed when the write fails)
        except FileExistsError:
            continue
        try:
            with f:
                write(f)
        except BaseException:
            (folder / name).unlink(missing_ok=True)
            raise
        return name, counter
    raise NodeError(f"no free file name for {base!r} in {_MAX_SAVE_TRIES} numbers after the highest")


def _save(ctx: RunContext, images: torch.Tensor, prefix: str, kind: str) -> dict[str, Any]:
    folder, sub, stem = save_folder(ctx, prefix, kind, images.shape[2], images.shape[1], ".png")
    info = PngInfo()
    if ctx.prompt:
        info.add_text("prompt", json.dumps(ctx.prompt))
    for k, v in ctx.extra_pnginfo.items():
        info.add_text(str(k), v if isinstance(v, str) else json.dumps(v))
    results = []
    with ctx.save_lock:
        counter = first_free_counter(folder, stem, r"\.png")
        for i, img in enumerate(tensor_to_pil(images)):
            base = stem.replace("%batch_num%", str(i))
            png = lambda f, img=img: img.save(f, format="PNG", pnginfo=info, compress_level=4)  # noqa: E731
            name, counter = write_numbered(folder, base, counter, ".png", png)
            results.append({"filename": name, "subfolder": sub, "type": kind})
    return {"ui": {"images": results}, "result": ()}


def prefix_vars(prefix: str, width: int, height: int) -> str:
    """ComfyUI's variables of a filename prefix: %width% and %height% of the first image (0 for a latent, as
    ComfyUI's), and the local time's %year% %month% %day% %hour% %minute% %second% (%batch_num% is each image's
    index, replaced per file)."""
    if "%" not in prefix:
        return prefix
    now = time.localtime()
    values = {
        "width": width,
        "height": height,
        "year": now.tm_year,
        "month": f"{now.tm_mon:02d}",
        "day": f"{now.tm_mday:02d}",
        "hour": f"{now.tm_hour:02d}",
        "minute": f"{now.tm_min:02d}",
        "second": f"{now.tm_sec:02d}",
    }
    for k, v in values.items():
        prefix = prefix.replace(f"%{k}%", str(v))
    return prefix


def save_image(ctx: RunContext, images: torch.Tensor, filename_prefix: str) -> dict[str, Any]:
    return _save(ctx, images, filename_prefix, "output")


def save_image_websocket(ctx: RunContext, images: torch.Tensor) -> dict[str, Any]:
    """ComfyUI's SaveImageWebsocket: each image as a PNG on the client's websocket (a progress message, then a
    binary frame in the previews' framing), nothing on disk, no history output."""
    import io

    pictures = tensor_to_pil(images)
    for i, img in enumerate(pictures):
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=1)
        if ctx.send_image is not None:
            ctx.send_image(buf.getvalue(), i, len(pictures))
    return {"ui": None, "result": ()}


def _always_changed(ctx: RunContext, inputs: dict[str, Any]) -> str:
    return str(time.time_ns())  # ComfyUI's IS_CHANGED of SaveImageWebsocket: never from the cache


def preview_image(ctx: RunContext, images: torch.Tensor) -> dict[str, Any]:
    return _save(ctx, images, f"ComfyUI_temp_{ctx.folders.tag}", "temp")  # ComfyUI's name, this server's tag


# ------------------------------------------------------------------------------------------ the table


def _int(name: str, default: int, lo: int, hi: int, step: int = 1, limit: str | None = None) -> Input:
    return Input(name, "INT", default, lo, hi, step, limit=limit)


def input_max(i: Input, env: Any) -> float | None:
    """The largest value of input ``i`` on this server: its own max, or the server's limit (``env.limits``) when
    that is lower."""
    server = (getattr(env, "limits", None) or {}).get(i.limit) if i.limit else None
    if server is None:
        return i.max
    return server if i.max is None else min(i.max, server)


def _float(name: str, default: float, lo: float, hi: float, step: float = 0.01) -> Input:
    return Input(name, "FLOAT", default, lo, hi, step)


def _combo(name: str, choices: Any, default: Any = None) -> Input:
    return Input(name, "COMBO", default, choices=choices)


SIDE_MAX = 16384


def _sampler_inputs(seed_name: str) -> tuple[Input, ...]:
    return (
        Input("model", "MODEL"),
        _int(seed_name, 0, 0, MAX_SEED),
        _int("steps", 20, 1, 10000, limit="steps"),
        _float("cfg", 8.0, 0.0, 100.0, 0.1),
        _combo("sampler_name", tuple(SAMPLER_NAMES)),
        _combo("scheduler", tuple(SCHEDULER_NAMES)),
        Input("positive", "CONDITIONING"),
        Input("negative", "CONDITIONING"),
        Input("latent_image", "LATENT"),
    )


NODES: dict[str, NodeDef] = {
    n.name: n
    for n in (
        NodeDef(
            "CheckpointLoaderSimple",
            "Load Checkpoint",
            "loaders",
            (_combo("ckpt_name", _models),),
            ("MODEL", "CLIP", "VAE"),
            checkpoint_loader,
            description="A model from the models folder (or built in).",
        ),
        NodeDef(
            "VAELoader",
            "Load VAE",
            "loaders",
            (_combo("vae_name", _vaes),),
            ("VAE",),
            vae_loader,
            description="A VAE from --vaes-dir, or 'taesd': the server's tiny VAE (--tiny-vae); for VAE Decode and "
            "VAE Encode.",
        ),
        NodeDef(
            "UpscaleModelLoader",
            "Load Upscale Model",
            "loaders",
            (_combo("model_name", _upscale_models),),
            ("UPSCALE_MODEL",),
            upscale_model_loader,
            description="An upscaler model from --upscalers-dir: ESRGAN (RRDBNet, old and new key layouts), "
            "Real-ESRGAN x4plus / x2plus and its compact SRVGGNetCompact models (.pth read weights-only, "
            ".safetensors).",
        ),
        NodeDef(
            "ImageUpscaleWithModel",
            "Upscale Image (using Model)",
            "image/upscaling",
            (Input("upscale_model", "UPSCALE_MODEL"), Input("image", "IMAGE")),
            ("IMAGE",),
            image_upscale_with_model,
            description="The image through the upscaler model: its scale times the size (tiles of 512, overlap 32, "
            "feathered as ComfyUI's tiled_scale).",
        ),
        NodeDef(
            "CLIPTextEncode",
            "CLIP Text Encode (Prompt)",
            "conditioning",
            (Input("text", "STRING", "", multiline=True), Input("clip", "CLIP")),
            ("CONDITIONING",),
            clip_text_encode,
            description="The prompt's conditioning, as the pipeline encodes it.",
        ),
        NodeDef(
            "CLIPSetLastLayer",
            "CLIP Set Last Layer",
            "conditioning",
            (Input("clip", "CLIP"), _int("stop_at_clip_layer", -1, -24, -1)),
            ("CLIP",),
            clip_set_last_layer,
            description="As ComfyUI: -1 is SD 1.x's last layer (A1111's clip skip 1); SDXL reads hidden state "
            "`stop_at_clip_layer` of both encoders, raw, and without this node -2 (its trained penultimate layer). "
            "A layer past the encoder's depth is its last layer (-24 on SD 1.x's 12-layer CLIP is -1); on SDXL past "
            "CLIP-L's depth, and on a model whose text encoder is no CLIP (MiniLM) any layer but -1, a node error.",
        ),
        NodeDef(
            "CLIPTextEncodeSDXL",
            "CLIPTextEncodeSDXL",
            "advanced/conditioning",
            (
                Input("clip", "CLIP"),
                _int("width", 1024, 0, SIDE_MAX),
                _int("height", 1024, 0, SIDE_MAX),
                _int("crop_w", 0, 0, SIDE_MAX),
                _int("crop_h", 0, 0, SIDE_MAX),
                _int("target_width", 1024, 0, SIDE_MAX),
                _int("target_height", 1024, 0, SIDE_MAX),
                Input("text_g", "STRING", "", multiline=True),
                Input("text_l", "STRING", "", multiline=True),
            ),
            ("CONDITIONING",),
            clip_text_encode_sdxl,
            description="An SDXL base model's prompt: `text_l` for CLIP-L, `text_g` for OpenCLIP bigG, and the "
            "size numbers given here (original size, crop, target size) instead of the latent's.",
        ),
        NodeDef(
            "CLIPTextEncodeSDXLRefiner",
            "CLIPTextEncodeSDXLRefiner",
            "advanced/conditioning",
            (
                _float("ascore", 6.0, 0.0, 1000.0),
                _int("width", 1024, 0, SIDE_MAX),
                _int("height", 1024, 0, SIDE_MAX),
                Input("text", "STRING", "", multiline=True),
                Input("clip", "CLIP"),
            ),
            ("CONDITIONING",),
            clip_text_encode_sdxl_refiner,
            description="An SDXL refiner's prompt with its aesthetic score and size (crop 0, 0).",
        ),
        NodeDef(
            "ConditioningCombine",
            "Conditioning (Combine)",
            "conditioning",
            (Input("conditioning_1", "CONDITIONING"), Input("conditioning_2", "CONDITIONING")),
            ("CONDITIONING",),
            conditioning_combine,
        ),
        NodeDef(
            "ConditioningAverage",
            "Conditioning (Average)",
            "conditioning",
            (
                Input("conditioning_to", "CONDITIONING"),
                Input("conditioning_from", "CONDITIONING"),
                _float("conditioning_to_strength", 1.0, 0.0, 1.0),
            ),
            ("CONDITIONING",),
            conditioning_average,
            description="Each entry of conditioning_to weighted by the strength plus the first entry of "
            "conditioning_from by 1 - strength (its tokens cut or zero-padded to conditioning_to's length; pooled "
            "vectors alike), as ComfyUI.",
        ),
        NodeDef(
            "ConditioningSetArea",
            "Conditioning (Set Area)",
            "conditioning",
            (
                Input("conditioning", "CONDITIONING"),
                _int("width", 64, 64, SIDE_MAX, 8),
                _int("height", 64, 64, SIDE_MAX, 8),
                _int("x", 0, 0, SIDE_MAX, 8),
                _int("y", 0, 0, SIDE_MAX, 8),
                _float("strength", 1.0, 0.0, 10.0),
            ),
            ("CONDITIONING",),
            conditioning_set_area,
            description="Regional prompting as ComfyUI: the entries predict on this box of the latent (pixels "
            "floored to the latent's grid, 8 on SD and SDXL, cut to the latent; a box starting outside it fails at "
            "the sampler), their "
            "prediction weighted by `strength` with the box's inner edges feathered, summed with the other entries' "
            "and divided by the summed weights. A ControlNet on an area's entry reads the area's crop of the latent "
            "and its whole hint fitted to the area (cut to its aspect around the centre, resized), as ComfyUI's.",
        ),
        NodeDef(
            "ConditioningSetAreaPercentage",
            "Conditioning (Set Area with Percentage)",
            "conditioning",
            (
                Input("conditioning", "CONDITIONING"),
                _float("width", 1.0, 0, 1.0),  # ComfyUI's integer 0s, as /object_info lists them
                _float("height", 1.0, 0, 1.0),
                _float("x", 0, 0, 1.0),
                _float("y", 0, 0, 1.0),
                _float("strength", 1.0, 0.0, 10.0),
            ),
            ("CONDITIONING",),
            conditioning_set_area_percentage,
            description="ConditioningSetArea with the box in fractions of the latent's width and height.",
        ),
        NodeDef(
            "ConditioningSetAreaStrength",
            "ConditioningSetAreaStrength",
            "conditioning",
            (Input("conditioning", "CONDITIONING"), _float("strength", 1.0, 0.0, 10.0)),
            ("CONDITIONING",),
            conditioning_set_area_strength,
            description="The entries' weight in the sampler's weighted sum of the combined conditionings' "
            "predictions (as ComfyUI).",
        ),
        NodeDef(
            "ConditioningSetMask",
            "Conditioning (Set Mask)",
            "conditioning",
            (
                Input("conditioning", "CONDITIONING"),
                Input("mask", "MASK"),
                _float("strength", 1.0, 0.0, 10.0),
                _combo("set_cond_area", ("default", "mask bounds")),
            ),
            ("CONDITIONING",),
            conditioning_set_mask,
            description="Regional prompting by mask as ComfyUI: the entries' prediction weighted by the mask "
            "(bilinearly resized to the latent) times `strength`; `mask bounds` runs them on the mask's bounding "
            "box only (at least 8 latent pixels a side; a ControlNet cannot act on such a box).",
        ),
        NodeDef(
            "ConditioningSetTimestepRange",
            "ConditioningSetTimestepRange",
            "advanced/conditioning",
            (
                Input("conditioning", "CONDITIONING"),
                _float("start", 0.0, 0.0, 1.0, 0.001),
                _float("end", 1.0, 0.0, 1.0, 0.001),
            ),
            ("CONDITIONING",),
            conditioning_set_timestep_range,
            description="The entries weigh in only at the model calls whose sigma lies between the model's sigmas "
            "at `end` and `start` of the denoising (as ComfyUI judges a ControlNet's percents); combined with "
            "another conditioning, each takes its part of the steps (at a call that none takes, the prediction is "
            "0, as in ComfyUI).",
        ),
        NodeDef(
            "ConditioningZeroOut",
            "ConditioningZeroOut",
            "advanced/conditioning",
            (Input("conditioning", "CONDITIONING"),),
            ("CONDITIONING",),
            conditioning_zero_out,
            description="The token states and pooled text set to zeros (SDXL's size numbers are kept), as ComfyUI.",
        ),
        NodeDef(
            "LatentFromBatch",
            "Latent From Batch",
            "latent/batch",
            (Input("samples", "LATENT"), _int("batch_index", 0, 0, 63), _int("length", 1, 1, 64)),
            ("LATENT",),
            latent_from_batch,
            description="`length` rows from `batch_index` on (cut to the batch); each row keeps the noise it has in "
            "the whole batch under ComfyUI's seed rule.",
        ),
        NodeDef(
            "RepeatLatentBatch",
            "Repeat Latent Batch",
            "latent/batch",
            (Input("samples", "LATENT"), _int("amount", 1, 1, 64)),
            ("LATENT",),
            repeat_latent_batch,
        ),
        NodeDef(
            "ConditioningConcat",
            "Conditioning (Concat)",
            "conditioning",
            (Input("conditioning_to", "CONDITIONING"), Input("conditioning_from", "CONDITIONING")),
            ("CONDITIONING",),
            conditioning_concat,
            description="The first entry of conditioning_from's tokens appended to each entry of conditioning_to "
            "(its pooled vector and ControlNets kept), as ComfyUI.",
        ),
        NodeDef(
            "EmptyLatentImage",
            "Empty Latent Image",
            "latent",
            (
                _int("width", 512, 16, SIDE_MAX, 8, limit="side"),
                _int("height", 512, 16, SIDE_MAX, 8, limit="side"),
                _int("batch_size", 1, 1, 4096, limit="batch"),
            ),
            ("LATENT",),
            empty_latent,
        ),
        NodeDef(
            "KSampler",
            "KSampler",
            "sampling",
            (*_sampler_inputs("seed"), _float("denoise", 1.0, 0.0, 1.0)),
            ("LATENT",),
            ksampler,
            description="Samples with the engine's samplers (see docs/comfyui.md for seeds).",
        ),
        NodeDef(
            "KSamplerAdvanced",
            "KSampler (Advanced)",
            "sampling",
            (
                _combo("add_noise", ("enable", "disable")),
                *_sampler_inputs("noise_seed"),
                _int("start_at_step", 0, 0, 10000),
                _int("end_at_step", 10000, 0, 10000),
                _combo("return_with_leftover_noise", ("disable", "enable")),
            ),
            ("LATENT",),
            ksampler_advanced,
        ),
        NodeDef(
            "KSamplerSelect",
            "KSamplerSelect",
            "sampling/custom_sampling/samplers",
            (_combo("sampler_name", tuple(SAMPLER_NAMES)),),
            ("SAMPLER",),
            ksampler_select,
        ),
        NodeDef(
            "SamplerEulerAncestral",
            "SamplerEulerAncestral",
            "sampling/custom_sampling/samplers",
            (
                Input("eta", "FLOAT", 1.0, 0.0, 100.0, 0.01, round=False),
                Input("s_noise", "FLOAT", 1.0, 0.0, 100.0, 0.01, round=False),
            ),
            ("SAMPLER",),
            sampler_euler_ancestral,
            description="Euler ancestral with its eta (s_noise: 1 only).",
        ),
        NodeDef(
            "SamplerEulerAncestralCFGPP",
            "SamplerEulerAncestralCFG++",
            "sampling/custom_sampling/samplers",
            (
                Input("eta", "FLOAT", 1.0, 0.0, 1.0, 0.01, round=False),
                Input("s_noise", "FLOAT", 1.0, 0.0, 10.0, 0.01, round=False),
            ),
            ("SAMPLER",),
            sampler_euler_ancestral_cfg_pp,
            description="Euler ancestral CFG++ with its eta and s_noise.",
        ),
        NodeDef(
            "SamplerLMS",
            "SamplerLMS",
            "sampling/custom_sampling/samplers",
            (_int("order", 4, 1, 100),),
            ("SAMPLER",),
            sampler_lms,
            description="LMS of the given order.",
        ),
        NodeDef(
            "SamplerDPMPP_3M_SDE",
            "SamplerDPMPP_3M_SDE",
            "sampling/custom_sampling/samplers",
            (
                Input("eta", "FLOAT", 1.0, 0.0, 100.0, 0.01, round=False),
                Input("s_noise", "FLOAT", 1.0, 0.0, 100.0, 0.01, round=False),
                _combo("noise_device", ("gpu", "cpu")),
            ),
            ("SAMPLER",),
            sampler_dpmpp_3m_sde,
            description="DPM++ 3M SDE with its eta and s_noise (the noise: the seed's "
            "on the CPU whatever `noise_device`).",
        ),
        NodeDef(
            "SamplerDPMPP_2M_SDE",
            "SamplerDPMPP_2M_SDE",
            "sampling/custom_sampling/samplers",
            (
                _combo("solver_type", ("midpoint", "heun")),
                Input("eta", "FLOAT", 1.0, 0.0, 100.0, 0.01, round=False),
                Input("s_noise", "FLOAT", 1.0, 0.0, 100.0, 0.01, round=False),
                _combo("noise_device", ("gpu", "cpu")),
            ),
            ("SAMPLER",),
            sampler_dpmpp_2m_sde,
            description="DPM++ 2M SDE (midpoint or heun) with its eta and s_noise (the noise: the seed's "
            "on the CPU whatever `noise_device`).",
        ),
        NodeDef(
            "SamplerDPMPP_SDE",
            "SamplerDPMPP_SDE",
            "sampling/custom_sampling/samplers",
            (
                Input("eta", "FLOAT", 1.0, 0.0, 100.0, 0.01, round=False),
                Input("s_noise", "FLOAT", 1.0, 0.0, 100.0, 0.01, round=False),
                Input("r", "FLOAT", 0.5, 0.0, 100.0, 0.01, round=False),
                _combo("noise_device", ("gpu", "cpu")),
            ),
            ("SAMPLER",),
            sampler_dpmpp_sde,
            description="DPM++ SDE with its eta and s_noise (r: 0.5 only; the noise: "
            "the seed's on the CPU whatever `noise_device`).",
        ),
        NodeDef(
            "SamplerDPMPP_2S_Ancestral",
            "SamplerDPMPP_2S_Ancestral",
            "sampling/custom_sampling/samplers",
            (
                Input("eta", "FLOAT", 1.0, 0.0, 100.0, 0.01, round=False),
                Input("s_noise", "FLOAT", 1.0, 0.0, 100.0, 0.01, round=False),
            ),
            ("SAMPLER",),
            sampler_dpmpp_2s_ancestral,
            description="DPM++ 2S ancestral with its eta and s_noise.",
        ),
        NodeDef(
            "SamplerDPMAdaptative",
            "SamplerDPMAdaptative",
            "sampling/custom_sampling/samplers",
            (
                _int("order", 3, 2, 3),
                Input("rtol", "FLOAT", 0.05, 0.0, 100.0, 0.01, round=False),
                Input("atol", "FLOAT", 0.0078, 0.0, 100.0, 0.01, round=False),
                Input("h_init", "FLOAT", 0.05, 0.0, 100.0, 0.01, round=False),
                Input("pcoeff", "FLOAT", 0.0, 0.0, 100.0, 0.01, round=False),
                Input("icoeff", "FLOAT", 1.0, 0.0, 100.0, 0.01, round=False),
                Input("dcoeff", "FLOAT", 0.0, 0.0, 100.0, 0.01, round=False),
                Input("accept_safety", "FLOAT", 0.81, 0.0, 100.0, 0.01, round=False),
                Input("eta", "FLOAT", 0.0, 0.0, 100.0, 0.01, round=False),
                Input("s_noise", "FLOAT", 1.0, 0.0, 100.0, 0.01, round=False),
            ),
            ("SAMPLER",),
            sampler_dpm_adaptive,
            description="DPM adaptive with its step-size controller's settings.",
        ),
        NodeDef(
            "BasicScheduler",
            "BasicScheduler",
            "sampling/custom_sampling/schedulers",
            (
                Input("model", "MODEL"),
                _combo("scheduler", tuple(SCHEDULER_NAMES)),
                _int("steps", 20, 1, 10000, limit="steps"),
                _float("denoise", 1.0, 0.0, 1.0),
            ),
            ("SIGMAS",),
            basic_scheduler,
            description="KSampler's schedule as SIGMAS (denoise < 1: the last steps of int(steps / denoise)). "
            "SamplerCustom runs it (whole, or cut by SplitSigmas when denoise is 1) on the same model exactly as "
            "KSampler / KSamplerAdvanced run that schedule; the values are ComfyUI's list of that scheduler, the very "
            "sigmas KSampler walks (karras and exponential between the model's sigma_min and sigma_max).",
        ),
        NodeDef(
            "KarrasScheduler",
            "KarrasScheduler",
            "sampling/custom_sampling/schedulers",
            (
                _int("steps", 20, 1, 10000, limit="steps"),
                _float("sigma_max", 14.614642, 0.0, 5000.0),
                _float("sigma_min", 0.0291675, 0.0, 5000.0),
                _float("rho", 7.0, 0.0, 100.0),
            ),
            ("SIGMAS",),
            karras_scheduler,
        ),
        NodeDef(
            "ExponentialScheduler",
            "ExponentialScheduler",
            "sampling/custom_sampling/schedulers",
            (
                _int("steps", 20, 1, 10000, limit="steps"),
                _float("sigma_max", 14.614642, 0.0, 5000.0),
                _float("sigma_min", 0.0291675, 0.0, 5000.0),
            ),
            ("SIGMAS",),
            exponential_scheduler,
        ),
        NodeDef(
            "AlignYourStepsScheduler",
            "AlignYourStepsScheduler",
            "sampling/custom_sampling/schedulers",
            (
                _combo("model_type", tuple(AYS_MODEL_TYPES)),
                _int("steps", 10, 1, 10000, limit="steps"),
                _float("denoise", 1.0, 0.0, 1.0),
            ),
            ("SIGMAS",),
            align_your_steps_scheduler,
            description="The Align Your Steps noise levels of SD 1.x or SDXL (not SVD), as ComfyUI's node.",
        ),
        NodeDef(
            "BetaSamplingScheduler",
            "BetaSamplingScheduler",
            "sampling/custom_sampling/schedulers",
            (
                Input("model", "MODEL"),
                _int("steps", 20, 1, 10000, limit="steps"),
                _float("alpha", 0.6, 0.0, 50.0),
                _float("beta", 0.6, 0.0, 50.0),
            ),
            ("SIGMAS",),
            beta_sampling_scheduler,
        ),
        NodeDef(
            "SDTurboScheduler",
            "SDTurboScheduler",
            "sampling/custom_sampling/schedulers",
            (Input("model", "MODEL"), _int("steps", 1, 1, 10), _float("denoise", 1.0, 0.0, 1.0)),
            ("SIGMAS",),
            sd_turbo_scheduler,
        ),
        NodeDef(
            "SplitSigmas",
            "SplitSigmas",
            "sampling/custom_sampling/sigmas",
            (Input("sigmas", "SIGMAS"), _int("step", 0, 0, 10000)),
            ("SIGMAS", "SIGMAS"),
            split_sigmas,
            output_names=("high_sigmas", "low_sigmas"),
        ),
        NodeDef(
            "SplitSigmasDenoise",
            "SplitSigmasDenoise",
            "sampling/custom_sampling/sigmas",
            (Input("sigmas", "SIGMAS"), _float("denoise", 1.0, 0.0, 1.0)),
            ("SIGMAS", "SIGMAS"),
            split_sigmas_denoise,
            output_names=("high_sigmas", "low_sigmas"),
        ),
        NodeDef(
            "FlipSigmas",
            "FlipSigmas",
            "sampling/custom_sampling/sigmas",
            (Input("sigmas", "SIGMAS"),),
            ("SIGMAS",),
            flip_sigmas,
            description="The sigmas reversed, a first 0 made 0.0001: SamplerCustom then walks them upward "
            "(unsampling a latent back towards noise) with a deterministic sampler (euler, heun, dpmpp_2m, ...).",
        ),
        NodeDef(
            "SamplerCustom",
            "SamplerCustom",
            "sampling/custom_sampling",
            (
                Input("model", "MODEL"),
                Input("add_noise", "BOOLEAN", True),
                _int("noise_seed", 0, 0, MAX_SEED),
                _float("cfg", 8.0, 0.0, 100.0, 0.1),
                Input("positive", "CONDITIONING"),
                Input("negative", "CONDITIONING"),
                Input("sampler", "SAMPLER"),
                Input("sigmas", "SIGMAS"),
                Input("latent_image", "LATENT"),
            ),
            ("LATENT", "LATENT"),
            sampler_custom,
            output_names=("output", "denoised_output"),
            description="The sampler walks the sigmas (empty sigmas: the latent passes through; rising sigmas, "
            "FlipSigmas', unsample with a deterministic sampler; sigmas that neither decrease nor rise from above 0, "
            "or rising ones with a sampler that draws noise, fail at the node). denoised_output: the last step's x0 "
            "estimate, the output itself when the last sigma is 0.",
        ),
        NodeDef(
            "SamplerCustomAdvanced",
            "SamplerCustomAdvanced",
            "sampling/custom_sampling",
            (
                Input("noise", "NOISE"),
                Input("guider", "GUIDER"),
                Input("sampler", "SAMPLER"),
                Input("sigmas", "SIGMAS"),
                Input("latent_image", "LATENT"),
            ),
            ("LATENT", "LATENT"),
            sampler_custom_advanced,
            output_names=("output", "denoised_output"),
            description="SamplerCustom with its noise and guidance as nodes.",
        ),
        NodeDef(
            "RandomNoise",
            "RandomNoise",
            "sampling/custom_sampling/noise",
            (_int("noise_seed", 0, 0, MAX_SEED),),
            ("NOISE",),
            random_noise,
        ),
        NodeDef("DisableNoise", "DisableNoise", "sampling/custom_sampling/noise", (), ("NOISE",), disable_noise),
        NodeDef(
            "CFGGuider",
            "CFGGuider",
            "sampling/custom_sampling/guiders",
            (
                Input("model", "MODEL"),
                Input("positive", "CONDITIONING"),
                Input("negative", "CONDITIONING"),
                _float("cfg", 8.0, 0.0, 100.0, 0.1),
            ),
            ("GUIDER",),
            cfg_guider,
        ),
        NodeDef(
            "BasicGuider",
            "BasicGuider",
            "sampling/custom_sampling/guiders",
            (Input("model", "MODEL"), Input("conditioning", "CONDITIONING")),
            ("GUIDER",),
            basic_guider,
            description="The conditioning alone (no CFG).",
        ),
        NodeDef(
            "VAEDecode",
            "VAE Decode",
            "latent",
            (Input("samples", "LATENT"), Input("vae", "VAE")),
            ("IMAGE",),
            vae_decode,
        ),
        NodeDef(
            "VAEDecodeTiled",
            "VAE Decode (Tiled)",
            "_for_testing",
            (
                Input("samples", "LATENT"),
                Input("vae", "VAE"),
                _int("tile_size", 512, 64, 4096, 32),
                _int("overlap", 64, 0, 4096, 32),
                Input("temporal_size", "INT", 64, 8, 4096, 4, optional=True, tooltip="Only used for video VAEs."),
                Input("temporal_overlap", "INT", 8, 4, 4096, 4, optional=True, tooltip="Only used for video VAEs."),
            ),
            ("IMAGE",),
            vae_decode_tiled,
            description="VAE Decode in overlapping tiles (tile_size and overlap in pixels), blended at the seams: "
            "large images in less memory, close to VAE Decode but not bit-equal.",
        ),
        NodeDef(
            "VAEEncodeTiled",
            "VAE Encode (Tiled)",
            "_for_testing",
            (
                Input("pixels", "IMAGE"),
                Input("vae", "VAE"),
                _int("tile_size", 512, 64, 4096, 64),
                _int("overlap", 64, 0, 4096, 32),
                Input("temporal_size", "INT", 64, 8, 4096, 4, optional=True, tooltip="Only used for video VAEs."),
                Input("temporal_overlap", "INT", 8, 4, 4096, 4, optional=True, tooltip="Only used for video VAEs."),
            ),
            ("LATENT",),
            vae_encode_tiled,
            description="VAE Encode in overlapping tiles (tile_size and overlap in pixels; an overlap over a quarter "
            "of the tile cut to a quarter), blended at the seams: large images in less memory, close to VAE Encode "
            "but not bit-equal.",
        ),
        NodeDef(
            "VAEEncode",
            "VAE Encode",
            "latent",
            (Input("pixels", "IMAGE"), Input("vae", "VAE")),
            ("LATENT",),
            vae_encode,
        ),
        NodeDef(
            "VAEEncodeForInpaint",
            "VAE Encode (for Inpainting)",
            "latent/inpaint",
            (Input("pixels", "IMAGE"), Input("vae", "VAE"), Input("mask", "MASK"), _int("grow_mask_by", 6, 0, 64)),
            ("LATENT",),
            vae_encode_for_inpaint,
        ),
        NodeDef(
            "SetLatentNoiseMask",
            "Set Latent Noise Mask",
            "latent/inpaint",
            (Input("samples", "LATENT"), Input("mask", "MASK")),
            ("LATENT",),
            set_latent_noise_mask,
        ),
        NodeDef(
            "LatentUpscale",
            "Upscale Latent",
            "latent",
            (
                Input("samples", "LATENT"),
                _combo("upscale_method", LATENT_UPSCALE_METHODS),
                _int("width", 512, 0, SIDE_MAX, 8, limit="side"),
                _int("height", 512, 0, SIDE_MAX, 8, limit="side"),
                _combo("crop", ("disabled", "center")),
            ),
            ("LATENT",),
            latent_upscale,
        ),
        NodeDef(
            "LatentUpscaleBy",
            "Upscale Latent By",
            "latent",
            (
                Input("samples", "LATENT"),
                _combo("upscale_method", LATENT_UPSCALE_METHODS),
                _float("scale_by", 1.5, 0.01, 8.0),
            ),
            ("LATENT",),
            latent_upscale_by,
        ),
        NodeDef(
            "LatentComposite",
            "Latent Composite",
            "latent",
            (
                Input("samples_to", "LATENT"),
                Input("samples_from", "LATENT"),
                _int("x", 0, 0, SIDE_MAX, 8),
                _int("y", 0, 0, SIDE_MAX, 8),
                _int("feather", 0, 0, SIDE_MAX, 8),
            ),
            ("LATENT",),
            latent_composite,
            description="samples_from pasted into samples_to at (x, y) (floored to multiples of 8, cut to fit), "
            "its inner edges blended over `feather` pixels, as ComfyUI (on a model whose latent pixel is not 8 "
            "pixels, the model's grid).",
        ),
        NodeDef(
            "LatentCompositeMasked",
            "LatentCompositeMasked",
            "latent",
            (
                Input("destination", "LATENT"),
                Input("source", "LATENT"),
                _int("x", 0, 0, SIDE_MAX, 8),
                _int("y", 0, 0, SIDE_MAX, 8),
                Input("resize_source", "BOOLEAN", False),
                Input("mask", "MASK", optional=True),
            ),
            ("LATENT",),
            latent_composite_masked,
            description="source over destination at (x, y), weighted by the mask (bilinearly resized to the "
            "source), as ComfyUI.",
        ),
        NodeDef(
            "ImageCompositeMasked",
            "ImageCompositeMasked",
            "image",
            (
                Input("destination", "IMAGE"),
                Input("source", "IMAGE"),
                _int("x", 0, 0, SIDE_MAX),
                _int("y", 0, 0, SIDE_MAX),
                Input("resize_source", "BOOLEAN", False),
                Input("mask", "MASK", optional=True),
            ),
            ("IMAGE",),
            image_composite_masked,
            description="source over destination at pixel (x, y), weighted by the mask, as ComfyUI.",
        ),
        NodeDef(
            "ImagePadForOutpaint",
            "Pad Image for Outpainting",
            "image",
            (
                Input("image", "IMAGE"),
                _int("left", 0, 0, SIDE_MAX, 8),
                _int("top", 0, 0, SIDE_MAX, 8),
                _int("right", 0, 0, SIDE_MAX, 8),
                _int("bottom", 0, 0, SIDE_MAX, 8),
                _int("feathering", 40, 0, SIDE_MAX),
            ),
            ("IMAGE", "MASK"),
            image_pad_for_outpaint,
            description="The image on a grey canvas grown by the margins, and the mask of what to paint (the "
            "margins, feathered into the image), as ComfyUI; a canvas over the server's side limit fails here.",
        ),
        NodeDef("ImageInvert", "Invert Image", "image", (Input("image", "IMAGE"),), ("IMAGE",), image_invert),
        NodeDef(
            "EmptyImage",
            "EmptyImage",
            "image",
            (
                _int("width", 512, 1, SIDE_MAX, limit="side"),
                _int("height", 512, 1, SIDE_MAX, limit="side"),
                _int("batch_size", 1, 1, 4096, limit="batch"),
                Input("color", "INT", 0, 0, 0xFFFFFF, 1, display="color"),
            ),
            ("IMAGE",),
            empty_image,
        ),
        NodeDef(
            "ImageCrop",
            "ImageCrop",
            "image/transform",
            (
                Input("image", "IMAGE"),
                _int("width", 512, 1, SIDE_MAX),
                _int("height", 512, 1, SIDE_MAX),
                _int("x", 0, 0, SIDE_MAX),
                _int("y", 0, 0, SIDE_MAX),
            ),
            ("IMAGE",),
            image_crop,
        ),
        NodeDef(
            "MaskToImage",
            "Convert Mask to Image",
            "mask",
            (Input("mask", "MASK"),),
            ("IMAGE",),
            mask_to_image,
        ),
        NodeDef(
            "ImageToMask",
            "Convert Image to Mask",
            "mask",
            (Input("image", "IMAGE"), _combo("channel", ("red", "green", "blue", "alpha"))),
            ("MASK",),
            image_to_mask,
            description="One channel of the image (an IMAGE has no alpha: LoadImage gives it as its MASK).",
        ),
        NodeDef(
            "SolidMask",
            "SolidMask",
            "mask",
            (
                _float("value", 1.0, 0.0, 1.0),
                _int("width", 512, 1, SIDE_MAX, limit="side"),
                _int("height", 512, 1, SIDE_MAX, limit="side"),
            ),
            ("MASK",),
            solid_mask,
        ),
        NodeDef("InvertMask", "InvertMask", "mask", (Input("mask", "MASK"),), ("MASK",), invert_mask),
        NodeDef(
            "MaskComposite",
            "MaskComposite",
            "mask",
            (
                Input("destination", "MASK"),
                Input("source", "MASK"),
                _int("x", 0, 0, SIDE_MAX),
                _int("y", 0, 0, SIDE_MAX),
                _combo("operation", ("multiply", "add", "subtract", "and", "or", "xor")),
            ),
            ("MASK",),
            mask_composite,
        ),
        NodeDef(
            "FeatherMask",
            "FeatherMask",
            "mask",
            (
                Input("mask", "MASK"),
                _int("left", 0, 0, SIDE_MAX),
                _int("top", 0, 0, SIDE_MAX),
                _int("right", 0, 0, SIDE_MAX),
                _int("bottom", 0, 0, SIDE_MAX),
            ),
            ("MASK",),
            feather_mask,
            description="The edges ramped to 0 over the given widths, with ComfyUI's indexing (its right and bottom "
            "ramps start on the first column and row).",
        ),
        NodeDef(
            "GrowMask",
            "GrowMask",
            "mask",
            (
                Input("mask", "MASK"),
                _int("expand", 0, -SIDE_MAX, SIDE_MAX),
                Input("tapered_corners", "BOOLEAN", True),
            ),
            ("MASK",),
            grow_mask,
        ),
        NodeDef(
            "LoadImage",
            "Load Image",
            "image",
            (Input("image", "COMBO", choices=input_files, also_valid=annotated_image_exists, upload=True),),
            ("IMAGE", "MASK"),
            load_image,
            description="An image from the input folder (POST /upload/image); MASK = 1 - alpha.",
            changed=input_file_token,
        ),
        NodeDef(
            "LoadImageMask",
            "Load Image (as Mask)",
            "mask",
            (
                Input("image", "COMBO", choices=input_files, also_valid=annotated_image_exists, upload=True),
                _combo("channel", ("alpha", "red", "green", "blue")),
            ),
            ("MASK",),
            load_image_mask,
            changed=input_file_token,
        ),
        NodeDef(
            "ImageScale",
            "Upscale Image",
            "image/upscaling",
            (
                Input("image", "IMAGE"),
                _combo("upscale_method", (*UPSCALE_METHODS, "lanczos")),
                _int("width", 512, 0, SIDE_MAX, 1, limit="side"),
                _int("height", 512, 0, SIDE_MAX, 1, limit="side"),
                _combo("crop", ("disabled", "center")),
            ),
            ("IMAGE",),
            image_scale,
        ),
        NodeDef(
            "ImageBatch",
            "Batch Images",
            "image",
            (Input("image1", "IMAGE"), Input("image2", "IMAGE")),
            ("IMAGE",),
            image_batch,
            description="image2's images after image1's; image2 scaled (bilinear, centre cut) to image1's size "
            "first when they differ, as ComfyUI.",
        ),
        NodeDef(
            "ImageScaleBy",
            "Upscale Image By",
            "image/upscaling",
            (
                Input("image", "IMAGE"),
                _combo("upscale_method", (*UPSCALE_METHODS, "lanczos")),
                _float("scale_by", 1.0, 0.01, 8.0),
            ),
            ("IMAGE",),
            image_scale_by,
        ),
        NodeDef(
            "Canny",
            "Canny",
            "image/preprocessors",
            (
                Input("image", "IMAGE"),
                _float("low_threshold", 0.4, 0.01, 0.99),
                _float("high_threshold", 0.8, 0.01, 0.99),
            ),
            ("IMAGE",),
            canny_node,
            description=(
                "Canny edges as ComfyUI's node (kornia.filters.canny): a 5x5 Gaussian blur (sigma 1), then the "
                "thresholds on the unnormalised Sobel gradient magnitude (0 to 4) of the blurred grey image in 0..1, "
                "8-connected hysteresis; white edges on black."
            ),
        ),
        NodeDef(
            "SaveImage",
            "Save Image",
            "image",
            (Input("images", "IMAGE"), Input("filename_prefix", "STRING", "ComfyUI")),
            (),
            save_image,
            output_node=True,
            description="PNGs in the outputs folder, with the prompt as text.",
        ),
        NodeDef(
            "PreviewImage", "Preview Image", "image", (Input("images", "IMAGE"),), (), preview_image, output_node=True
        ),
        NodeDef(
            "SaveImageWebsocket",
            "Save Image (Websocket)",
            "api node/image",
            (Input("images", "IMAGE"),),
            (),
            save_image_websocket,
            output_node=True,
            description="Each image as a PNG frame on the prompt's websocket (as previews are framed); no file.",
            changed=_always_changed,
        ),
        NodeDef(
            "LoraLoader",
            "Load LoRA",
            "loaders",
            (
                Input("model", "MODEL"),
                Input("clip", "CLIP"),
                _combo("lora_name", _loras),
                _float("strength_model", 1.0, -100.0, 100.0),
                _float("strength_clip", 1.0, -100.0, 100.0),
            ),
            ("MODEL", "CLIP"),
            lora_loader,
            description="As ComfyUI: strength_model scales the file's U-Net layers, strength_clip its "
            "text-encoder layers; a file with no layers of one part (a U-Net-only LoRA) leaves that part as it is.",
        ),
        NodeDef(
            "LoraLoaderModelOnly",
            "LoraLoaderModelOnly",
            "loaders",
            (Input("model", "MODEL"), _combo("lora_name", _loras), _float("strength_model", 1.0, -100.0, 100.0)),
            ("MODEL",),
            lora_loader_model_only,
        ),
        NodeDef(
            "ModelSamplingDiscrete",
            "ModelSamplingDiscrete",
            "advanced/model",
            (
                Input("model", "MODEL"),
                _combo("sampling", tuple(MODEL_SAMPLINGS)),
                Input("zsnr", "BOOLEAN", False),
            ),
            ("MODEL",),
            model_sampling_discrete,
            description="The model read as predicting eps, v_prediction or x0 on its own discrete schedule; zsnr "
            "rescales that schedule to zero terminal SNR (as A1111's Zero Terminal SNR). lcm: a node error.",
        ),
        NodeDef(
            "RescaleCFG",
            "RescaleCFG",
            "advanced/model",
            (Input("model", "MODEL"), _float("multiplier", 0.7, 0.0, 1.0)),
            ("MODEL",),
            rescale_cfg,
            description="CFG rescale (Lin et al. 2023) as ComfyUI's: matched on the v-prediction; not with area or "
            "mask conditioning.",
        ),
        NodeDef(
            "PerturbedAttentionGuidance",
            "PerturbedAttentionGuidance",
            "model_patches/unet",
            (Input("model", "MODEL"), _float("scale", 3.0, 0.0, 100.0)),
            ("MODEL",),
            perturbed_attention_guidance,
            description="Perturbed-attention guidance (Ahn et al. 2024) on the U-Net's middle block, after CFG; not "
            "with area or mask conditioning.",
        ),
        NodeDef(
            "FreeU",
            "FreeU",
            "model_patches/unet",
            (
                Input("model", "MODEL"),
                _float("b1", 1.1, 0.0, MAX_FREEU_FACTOR),
                _float("b2", 1.2, 0.0, MAX_FREEU_FACTOR),
                _float("s1", 0.9, 0.0, MAX_FREEU_FACTOR),
                _float("s2", 0.2, 0.0, MAX_FREEU_FACTOR),
            ),
            ("MODEL",),
            free_u,
            description="FreeU (Si et al. 2023) on the U-Net's up blocks: backbone factors b1, b2 and skip "
            "low-frequency factors s1, s2 at the 4x and 2x wide skip concatenations.",
        ),
        NodeDef(
            "FreeU_V2",
            "FreeU_V2",
            "model_patches/unet",
            (
                Input("model", "MODEL"),
                _float("b1", 1.3, 0.0, MAX_FREEU_FACTOR),
                _float("b2", 1.4, 0.0, MAX_FREEU_FACTOR),
                _float("s1", 0.9, 0.0, MAX_FREEU_FACTOR),
                _float("s2", 0.2, 0.0, MAX_FREEU_FACTOR),
            ),
            ("MODEL",),
            free_u_v2,
            description="FreeU version 2: the backbone factor scaled by the hidden state's normalised channel mean.",
        ),
        NodeDef(
            "ControlNetLoader",
            "Load ControlNet Model",
            "loaders",
            (_combo("control_net_name", _controlnets),),
            ("CONTROL_NET",),
            controlnet_loader,
        ),
        NodeDef(
            "ControlNetApply",
            "Apply ControlNet (OLD)",
            "conditioning/controlnet",
            (
                Input("conditioning", "CONDITIONING"),
                Input("control_net", "CONTROL_NET"),
                Input("image", "IMAGE"),
                _float("strength", 1.0, 0.0, 10.0),
            ),
            ("CONDITIONING",),
            controlnet_apply,
        ),
        NodeDef(
            "ControlNetApplyAdvanced",
            "Apply ControlNet",
            "conditioning/controlnet",
            (
                Input("positive", "CONDITIONING"),
                Input("negative", "CONDITIONING"),
                Input("control_net", "CONTROL_NET"),
                Input("image", "IMAGE"),
                _float("strength", 1.0, 0.0, 10.0),
                _float("start_percent", 0.0, 0.0, 1.0, 0.001),
                _float("end_percent", 1.0, 0.0, 1.0, 0.001),
                Input("vae", "VAE", optional=True),
            ),
            ("CONDITIONING", "CONDITIONING"),
            controlnet_apply_advanced,
            output_names=("positive", "negative"),
            description="The ControlNet's hint on both conditionings from start_percent to end_percent of the "
            "schedule (judged on each model call's sigma, as ComfyUI). An SD3 / Flux / Qwen-Image ControlNet needs "
            "the vae (its hint is encoded to latents); U-Net ControlNets ignore it (docs/controlnet.md).",
        ),
    )
}


def choices_of(inp: Input, env: Any) -> list[str]:
    c = inp.choices
    if c is None:
        return []
    return list(c(env)) if callable(c) else list(c)


def input_spec(i: Input, env: Any, choices: list[str] | None = None) -> list[Any]:
    """One input as ``/object_info`` lists it (``[type, {default, min, max, step, ...}]``, a combo's choices in
    place of its type), what ComfyUI's validation errors give as ``input_config``; ``choices``: a combo's, when
    the caller has them."""
    opts: dict[str, Any] = {}
    if i.type == "COMBO":
        spec: list[Any] = [choices if choices is not None else choices_of(i, env)]
        if i.default is not None:
            opts["default"] = i.default
        if i.upload:
            opts["image_upload"] = True
    else:
        spec = [i.type]
        for k in ("default", "min", "max", "step"):
            v = input_max(i, env) if k == "max" else getattr(i, k)
            if v is not None:
                opts[k] = v
        if i.round is not None:
            opts["round"] = i.round
        if i.display is not None:
            opts["display"] = i.display
        if i.multiline:
            opts["multiline"] = True
        if i.control:
            opts["control_after_generate"] = True
    if i.tooltip:
        opts["tooltip"] = i.tooltip
    if opts:
        spec.append(opts)
    return spec


def object_info(node: NodeDef, env: Any) -> dict[str, Any]:
    """One node as ComfyUI's ``/object_info`` describes it."""
    required: dict[str, Any] = {}
    optional: dict[str, Any] = {}
    for i in node.inputs:
        (optional if i.optional else required)[i.name] = input_spec(i, env)
    return {
        "input": {"required": required, **({"optional": optional} if optional else {})},
        "input_order": {
            "required": [i.name for i in node.inputs if not i.optional],
            **({"optional": [i.name for i in node.inputs if i.optional]} if optional else {}),
        },
        "output": list(node.outputs),
        "is_input_list": node.input_is_list,
        "output_is_list": [node.is_list_output(i) for i in range(len(node.outputs))],
        "output_name": list(node.output_names or node.outputs),
        "name": node.name,
        "display_name": node.display_name,
        "description": node.description,
        "python_module": "nodes",
        "category": node.category,
        "output_node": node.output_node,
    }
