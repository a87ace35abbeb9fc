"""The controlled U-Net: ControlNets attached to the U-Net for one generation run.

A :class:`ControlUnit` says which ControlNet, which control map(s), how strong and over which fraction of the
steps. :func:`build_controlled_unet` loads and checks the units and returns a :class:`ControlledUNet`, a
callable used in place of the U-Net: at each call it runs every ControlNet that is active at the sampler's
step (diffusers' ``controlnet_keep`` rule over the steps that run; A1111's count; or ComfyUI's sigma window,
judged on the sigma of each call), sums their residuals (each times its scale) and runs the U-Net with them.

The step comes from the sampler loop (``step=SamplerStep``, see sdengine.diffusion.samplers): nothing is
inferred from the timestep. In guess mode the ControlNets see the conditional rows only, found by the
``row_kinds`` tags classifier-free guidance hands down; the unconditional rows get no residuals, as in
diffusers.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sdengine.control.adapter_files import check_adapter_compatible, load_control_model
from sdengine.control.files import check_compatible
from sdengine.control.preprocess import ImageLike, load_control_image
from sdengine.diffusion.samplers import SamplerStep
from sdengine.diffusion.schedules import percent_to_sigma
from sdengine.errors import ControlNetError
from sdengine.io.resize import centre_cut_resize, resize_image, resize_tensor
from sdengine.metadata import CONTROL_MODE_NAMES
from sdengine.models.controlnet import ControlNet
from sdengine.models.t2i_adapter import T2IAdapter
from sdengine.models.unet import UNetConfig
from sdengine.names import did_you_mean
from sdengine.nn.reference import ADAIN_KINDS, REFERENCE_KINDS, ReferenceMachine, reference_applied
from sdengine.weights.io import parse_dtype

log = logging.getLogger(__name__)

# How start/end fractions pick the controlled steps: diffusers' pipelines, A1111's ControlNet extension, or
# ComfyUI's per-call sigma window (see comfy_sigma_window).
STEP_RULES = ("diffusers", "a1111", "comfyui")
# A unit's control mode, as sd-webui-controlnet's: "balanced" (its weight on every residual, every row), "prompt"
# ("My prompt is more important": the soft weights, see soft_scales) and "controlnet" ("ControlNet is more
# important": the soft weights, on the conditional rows of classifier-free guidance only).
CONTROL_MODES = tuple(CONTROL_MODE_NAMES)  # ("balanced", "prompt", "controlnet"), the extension's names there
SOFT_BASE = 0.825  # the extension's soft injection: residual i of 13 times 0.825 ** (12 - i)
ADAPTER_SOFT = (0.25, 0.62, 0.825, 1.0)  # ... and a T2I-Adapter's four features
REFERENCE_FIDELITY = 0.5  # the extension's default style fidelity of its reference preprocessors (threshold_a)


def soft_scales(n: int, adapter: bool = False) -> list[float]:
    """The extension's soft-injection factors of ``n`` residuals (highest resolution first, the middle block's
    last): a ControlNet's are ``0.825 ** (12 - i)`` for i = 0..12 (SD1/SD2's 12 skips and the middle: 0.0995 ..
    1.0), taken from the first, as the extension zips them (SDXL's 9 skips and middle: 0.825**12 .. 0.825**3);
    a T2I-Adapter's features (0.25, 0.62, 0.825, 1.0)."""
    table = ADAPTER_SOFT if adapter else tuple(SOFT_BASE ** float(12 - i) for i in range(13))
    if n > len(table):
        raise ControlNetError(f"soft control weights are defined for {len(table)} residuals, got {n}")
    return list(table[:n])


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet of a request. ``model``: a :class:`ControlNet`, a :class:`T2IAdapter` or anything
    ``load_control_model`` reads (a ControlNet or a T2I-Adapter: an adapter's features are added to the U-Net's
    encoder, times ``scale``, on the steps of its window, as diffusers' adapter pipelines do; an
    ``adapter_conditioning_factor`` of f is ``end=f``);
    ``image``: a control map (PIL, array, path or (1, 3, H, W) tensor in [0, 1]) used for every row, or a
    list / (N, 3, H, W) tensor with one map per row of the batch; ``scale``: the conditioning scale;
    ``start``/``end``: the fractions of the steps it acts on, counted by ``rule`` (:data:`STEP_RULES`:
    ``"diffusers"``, the default, or ``"a1111"``, see :func:`step_keep`; ``"comfyui"``: every model call whose
    sigma lies in :func:`comfy_sigma_window`, which needs the noise schedule); ``mode``: :data:`CONTROL_MODES`,
    sd-webui-controlnet's control mode (``"balanced"``, the default; ``"prompt"``; ``"controlnet"``);
    ``hires_mode``: the mode of the hires fix's second pass, None = ``mode`` (the extension forces its soft weights
    on a canny unit there: the A1111 route's canny units have ``"prompt"``); ``mask``: an SD3 inpainting
    ControlNet's mask (white = repaint; ``image`` is then the picture to inpaint), refused on other units;
    ``inpaint_image``: a Z-Image inpainting ControlNet's picture to inpaint (with ``mask``; ``image`` stays the
    control map)."""

    model: Any
    image: Any
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    rule: str = "diffusers"
    # What made ``image``, for the infotext only (the pipeline takes the map as given): the preprocessor
    # (sdengine.control.PREPROCESSORS' name; None: not known, not written), the options it ran with, and the
    # short side the image was scaled to before it (A1111's ControlNet extension's processor_res)
    module: str | None = None
    module_options: Mapping[str, float] = field(default_factory=dict)
    processor_res: int | None = None
    mode: str = "balanced"
    hires_mode: str | None = None
    # a reference unit's (model "reference_only" / "reference_adain" / "reference_adain+attn") style fidelity, the
    # extension's threshold_a: None = 0.5, its default; other units take none
    style_fidelity: float | None = None
    # a Flux Union ControlNet's control kind (sdengine.pipeline.dit_control.UNION_MODES' name or its number); other
    # ControlNets take none
    union_mode: int | str | None = None
    # an SD3 inpainting ControlNet's mask (extra_conditioning_channels 1, Alimama's SD3-Controlnet-Inpainting): white
    # = repaint; ``image`` is then the picture to inpaint (see sdengine.pipeline.dit_control). Other units take none
    mask: Any = None
    # a Z-Image inpainting ControlNet's picture to inpaint (Union 2.x, 33 control channels; with ``mask``, while
    # ``image`` stays the control map: sdengine.pipeline.dit_control). Other units take none
    inpaint_image: Any = None

    @property
    def reference(self) -> str | None:
        """The reference kind (:data:`REFERENCE_KINDS`) of a unit without a model, else None."""
        return self.model if isinstance(self.model, str) and self.model in REFERENCE_KINDS else None

    def __post_init__(self) -> None:
        if self.rule not in STEP_RULES:
            raise ControlNetError(f"unknown ControlNet step rule {self.rule!r}; use one of: {', '.join(STEP_RULES)}")
        if self.inpaint_image is not None and self.mask is None:
            raise ControlNetError("a unit's inpaint_image (Z-Image's inpainting ControlNets) needs its mask too")
        if self.reference is not None or self.style_fidelity is not None:
            check_reference_unit(self)
            if self.mask is not None:
                raise ControlNetError(
                    f"{self.reference}: a unit mask is an SD3 inpainting ControlNet's input; reference units take none"
                )
            if self.union_mode is not None:
                raise ControlNetError(
                    f"{self.reference}: union_mode is a Flux Union ControlNet's; reference units take none"
                )
            return
        if self.module is not None or self.module_options:  # written into the infotext: checked now, not after
            from sdengine.control.preprocess import PREPROCESSORS, option_names

            if self.module not in PREPROCESSORS:
                guess = did_you_mean(self.module, PREPROCESSORS)
                valid = ", ".join(PREPROCESSORS)
                raise ControlNetError(
                    f"unknown ControlNet preprocessor {self.module!r}{guess} (use one of: {valid})"
                    if guess
                    else f"unknown ControlNet preprocessor {self.module!r}; use one of: {valid}"
                )
            bad = sorted(set(self.module_options) - option_names(self.module))
            if bad:
                raise ControlNetError(f"ControlNet preprocessor {self.module!r} has no options {', '.join(bad)}")
            if not all(math.isfinite(float(v)) for v in self.module_options.values()):
                raise ControlNetError(f"ControlNet preprocessor {self.module!r}: options must be numbers")
        if self.processor_res is not None and (
            isinstance(self.processor_res, bool) or not isinstance(self.processor_res, int) or self.processor_res < 1
        ):
            raise ControlNetError(f"ControlNet processor_res must be a positive integer, got {self.processor_res!r}")
        for mode in (self.mode, self.hires_mode):
            if mode is not None and mode not in CONTROL_MODES:
                raise ControlNetError(
                    f"unknown ControlNet control mode {mode!r}; use one of: {', '.join(CONTROL_MODES)}"
                )

    @classmethod
    def coerce(cls, u: Any) -> ControlUnit:
        """A ControlUnit, or the tuple form users pass: ``(model_or_path, image[, scale[, start, end]])``."""
        if isinstance(u, ControlUnit):
            return u
        if isinstance(u, dict):
            try:
                return cls(**u)
            except TypeError as e:
                raise ControlNetError(f"bad ControlNet unit {sorted(u)}: {e}") from None
        if not isinstance(u, tuple | list) or len(u) not in (2, 3, 5):
            raise ControlNetError("each ControlNet is (model_or_path, image[, scale[, start, end]])")
        scale = float(u[2]) if len(u) >= 3 else 1.0
        start, end = (float(u[3]), float(u[4])) if len(u) == 5 else (0.0, 1.0)
        return cls(u[0], u[1], scale, start, end)

    def __iter__(self) -> Iterator[Any]:  # unpacks like the tuple form: model, image, scale, start, end
        return iter((self.model, self.image, self.scale, self.start, self.end))

    @property
    def label(self) -> str:
        if self.reference is not None:
            return "None"  # the extension's model of a reference unit
        return Path(self.model).stem if isinstance(self.model, str | Path) else type(self.model).__name__

    @property
    def fidelity(self) -> float:
        """A reference unit's style fidelity (0.5 when not given)."""
        return REFERENCE_FIDELITY if self.style_fidelity is None else float(self.style_fidelity)

    def infotext(self) -> str:
        """The unit's ``ControlNet N`` value as A1111's ControlNet extension writes it (``Module: canny, Model:
        NAME, Weight: W, Processor Res: R, Threshold A: LOW, Threshold B: HIGH, Guidance Start: S, Guidance End:
        E, Control Mode: ...``, and sdengine's ``Hires Control Mode``; :func:`sdengine.metadata.format_controlnet`)."""
        from sdengine.metadata import format_controlnet

        if self.reference is not None:  # Module: reference_only, Model: None, ..., Threshold A: the style fidelity
            return format_controlnet(
                "None",
                weight=self.scale,
                start=self.start,
                end=self.end,
                module=self.reference,
                options={"style_fidelity": self.fidelity},
                mode=self.mode,
                hires_mode=self.hires_mode,
            )
        text = format_controlnet(
            self.label,
            weight=self.scale,
            start=self.start,
            end=self.end,
            module=self.module,
            options=self.module_options,
            processor_res=self.processor_res,
            mode=self.mode,
            hires_mode=self.hires_mode,
        )
        # sdengine's field: a Flux Union ControlNet's control kind
        return text if self.union_mode is None else f"{text}, Union Mode: {self.union_mode}"


def check_reference_unit(unit: ControlUnit) -> None:
    """A reference unit's own checks: a known kind, a style fidelity in [0, 1], no preprocessor or options."""
    if unit.reference is None:
        if isinstance(unit.model, str) and unit.model.strip().lower() in REFERENCE_KINDS:
            raise ControlNetError(f"reference control is spelt {unit.model.strip().lower()!r}, got {unit.model!r}")
        raise ControlNetError(
            f"style_fidelity is a reference unit's setting (model one of {', '.join(REFERENCE_KINDS)}), not of a "
            "ControlNet's"
        )
    f = unit.style_fidelity
    if f is not None and (isinstance(f, bool) or not isinstance(f, int | float) or not 0.0 <= float(f) <= 1.0):
        raise ControlNetError(f"{unit.reference}: style_fidelity must be a number in [0, 1], got {f!r}")
    if unit.module not in (None, unit.reference) or unit.module_options or unit.processor_res is not None:
        raise ControlNetError(f"{unit.reference} takes the reference image as it is: no preprocessor or its options")
    for mode in (unit.mode, unit.hires_mode):
        if mode is not None and mode not in CONTROL_MODES:
            raise ControlNetError(f"unknown ControlNet control mode {mode!r}; use one of: {', '.join(CONTROL_MODES)}")


def reference_fidelity(unit_mode: str, fidelity: float, *, sdxl: bool = False, hires: bool = False) -> float:
    """The style fidelity a reference pass runs with (the extension's ``current_style_fidelity``): the unit's,
    clamped to [0, 1], cubed on SDXL; 1 in the "controlnet" mode, else 0 in the "prompt" mode and in the hires
    fix's second pass."""
    f = max(0.0, min(1.0, float(fidelity)))
    if sdxl:
        f = f**3.0
    if unit_mode == "controlnet":
        return 1.0
    if unit_mode == "prompt" or hires:
        return 0.0
    return f


def check_unit_settings(scale: float, start: float, end: float, *, name: str = "ControlNet") -> None:
    """start/end must satisfy 0 <= start < end <= 1 (error); a scale outside [0, 2] is warned about."""
    if not (math.isfinite(start) and math.isfinite(end)) or start < 0 or end > 1:
        raise ControlNetError(f"{name}: start and end are fractions of the steps in [0, 1], got {start}, {end}")
    if start >= end:
        raise ControlNetError(f"{name}: start ({start}) must be less than end ({end})")
    if not math.isfinite(scale):
        raise ControlNetError(f"{name}: weight must be a number, got {scale}")
    if not 0.0 <= scale <= 2.0:
        msg = f"{name}: weight {scale} is outside the usual range [0, 2]"
        warnings.warn(msg, stacklevel=3)
        log.warning(msg)


# ComfyUI's fit of a hint (comfy/controlnet.py: common_upscale(..., "nearest-exact", "center")): a resize mode of
# control_image_tensor besides io.resize's three, for the ComfyUI route under its seed rule
HINT_NEAREST_CENTRE = "centre cut, nearest-exact"


def _one_image_tensor(image: ImageLike, width: int, height: int, resize_mode: str = "just resize") -> Tensor:
    if resize_mode == HINT_NEAREST_CENTRE:
        if isinstance(image, Tensor) and image.ndim in (3, 4) and image.is_floating_point():
            t = _one_image_tensor(image, int(image.shape[-1]), int(image.shape[-2]))  # channels made 3, no resize
        else:
            arr = np.asarray(load_control_image(image), dtype=np.float32) / 255.0
            t = torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()
        return centre_cut_resize(t, width, height, "nearest-exact")
    if isinstance(image, Tensor) and image.ndim in (3, 4) and image.is_floating_point():
        t = image.detach().float()
        t = t[None] if t.ndim == 3 else t
        if t.shape[1] == 1:
            t = t.expand(-1, 3, -1, -1)
        elif t.shape[1] == 4:
            t = t[:, :3] * t[:, 3:]  # onto black
        if t.shape[1] != 3:
            raise ControlNetError(f"control image tensor must have 1, 3 or 4 channels, got {tuple(t.shape)}")
        return resize_tensor(t, width, height, resize_mode).clamp(0, 1)
    img = resize_image(load_control_image(image), width, height, resize_mode)
    arr = np.asarray(img, dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


def control_image_tensor(
    image: ImageLike | Sequence[ImageLike], width: int, height: int, resize_mode: str = "just resize"
) -> Tensor:
    """(N, 3, height, width) float32 in [0, 1]: RGB-converted and resized (Lanczos) to the output size, as
    diffusers' control image processor does (``VaeImageProcessor(do_normalize=False)``); ``resize_mode``
    :data:`HINT_NEAREST_CENTRE`: ComfyUI's fit instead (the centre cut to the aspect, nearest-exact). A list gives one
    row per map; a (N, C, H, W) tensor keeps its N rows."""
    if isinstance(image, list | tuple):
        if not image:
            raise ControlNetError("an empty list of control images")
        return torch.cat([_one_image_tensor(i, width, height, resize_mode) for i in image])
    return _one_image_tensor(image, width, height, resize_mode)  # type: ignore[arg-type]


def step_keep(steps: int, start: float, end: float, rule: str = "diffusers") -> list[bool]:
    """Which of ``steps`` steps a unit controls. ``"diffusers"`` (``controlnet_keep``): step i unless
    i/steps < start or (i+1)/steps > end, so a step must lie wholly inside the window. ``"a1111"`` (the
    sd-webui-controlnet extension's ``guidance_schedule_handler``): step i when start <= i/steps <= end, so
    end 0.5 of 20 steps controls steps 0-10, one more than diffusers' 0-9."""
    if rule == "a1111":
        return [start <= i / steps <= end for i in range(steps)]
    if rule == "comfyui":
        raise ControlNetError("the comfyui step rule is judged on sigmas: use sigma_keep with comfy_sigma_window")
    if rule != "diffusers":
        raise ControlNetError(f"unknown ControlNet step rule {rule!r}; use one of: {', '.join(STEP_RULES)}")
    return [not (i / steps < start or (i + 1) / steps > end) for i in range(steps)]


def comfy_sigma_window(log_sigmas: Tensor, start: float, end: float) -> tuple[float, float]:
    """``(low, high)``: ComfyUI runs a ControlNet at a model call of sigma s when ``low <= s <= high``
    (comfy/controlnet.py skips it when s > sigma(start) or s < sigma(end)), judged at every call, a
    second-order sampler's extra calls included."""
    return percent_to_sigma(log_sigmas, end), percent_to_sigma(log_sigmas, start)


def sigma_keep(sigmas: Sequence[float] | Tensor, window: tuple[float, float]) -> list[bool]:
    """Which of the steps at ``sigmas`` (one per step) lie in the ``comfy_sigma_window``."""
    low, high = window
    return [low <= float(s) <= high for s in sigmas]


def no_step_message(name: str, steps: int, start: float, end: float, rule: str = "diffusers") -> str:
    """The warning for a unit whose start/end window holds no step of the ``steps`` that run."""
    if rule == "comfyui":
        how = "its sigma lies between sigma(end) and sigma(start) of the model's schedule, as ComfyUI judges"
        return (
            f"{name}: start {start:g} and end {end:g} hold no step of the {steps} that run (a call acts when "
            f"{how}): it acts on no step; widen the window or use more steps"
        )
    if rule == "a1111":
        how = f"start <= i/{steps} <= end, as A1111's ControlNet extension counts"
    else:
        how = f"start <= i/{steps} and (i+1)/{steps} <= end, as diffusers counts"
    return (
        f"{name}: guidance start {start:g} and end {end:g} hold no step of the {steps} that run (step i acts "
        f"when {how}): it acts on no step; widen the window or use more steps"
    )


@dataclass
class PreparedUnit:
    """A loaded unit: the ControlNet on the run's device, its map(s), scale and per-step on/off list; ``kinds``:
    the rows it acts on by their CFG tag ("cond", "uncond"), None = every row (ComfyUI runs a ControlNet with
    the conditioning that carries it: one on the negative only acts on the unconditional rows only)."""

    net: ControlNet | T2IAdapter
    image: Tensor  # (N, C, H, W) on the device, the ControlNet's dtype
    scale: float
    keep: list[bool]  # per step index of the run
    kinds: frozenset[str] | None = None
    window: tuple[float, float] | None = None  # rule "comfyui": the sigma window judged at each call
    mode: str = "balanced"  # CONTROL_MODES: "prompt" and "controlnet" take the soft weights, "controlnet" cond rows


@dataclass
class PreparedReference:
    """A loaded reference unit: its kind, the reference image's latent(s) (N, C, h, w) (scaled as the U-Net's
    latents), its weight, the style fidelity its passes run with, and the steps (or sigma window) it acts on."""

    kind: str
    latent: Tensor
    scale: float
    fidelity: float
    keep: list[bool]
    window: tuple[float, float] | None = None

    def active(self, step: int, sigma: float | None) -> bool:
        if self.window is not None and sigma is not None:
            return self.window[0] <= sigma <= self.window[1]
        return self.keep[min(step, len(self.keep) - 1)]


class ReferencePasses:
    """What runs the reference units' passes before each call of the generation's U-Net: the units, the noise
    schedule's ``alphas_cumprod`` (the reference latent noised to the call's timestep, rounded, as the extension's
    ``predict_q_sample``) and the generator of the fresh noise each pass draws (the extension's ``randn_like``)."""

    def __init__(self, units: list[PreparedReference], alphas_cumprod: Tensor, generator: torch.Generator) -> None:
        self.units = units
        self.alphas_cumprod = alphas_cumprod.double()
        self.generator = generator
        self.machine = ReferenceMachine()
        self.adain = any(u.kind in ADAIN_KINDS for u in units)

    def noised(self, latent: Tensor, t: Tensor, rows: int) -> Tensor:
        """``sqrt(a_t) * latent + sqrt(1 - a_t) * noise`` per row, ``t`` rounded to the nearest timestep."""
        n = self.alphas_cumprod.shape[0]
        idx = torch.round(t.double().reshape(-1).cpu()).long().clamp(0, n - 1)
        if idx.shape[0] == 1:
            idx = idx.expand(rows)
        a = self.alphas_cumprod[idx].to(latent.device)
        shape = (rows, 1, 1, 1)
        noise = torch.randn((rows, *latent.shape[1:]), generator=self.generator, dtype=torch.float32)
        noise = noise.to(latent.device, latent.dtype)
        return (a.sqrt().reshape(shape) * latent + (1 - a).sqrt().reshape(shape) * noise).to(latent.dtype)

    def run(
        self,
        unet: Any,
        x: Tensor,
        t: Tensor | float,
        encoder_hidden_states: Tensor,
        flags: Sequence[bool],
        kinds: Sequence[str],
        kw: Mapping[str, Any],
    ) -> None:
        """The passes of the active units (``flags``), in order, each writing into the U-Net's taps."""
        b = x.shape[0]
        tt = torch.as_tensor(t, device=x.device)
        self.machine.uncond_rows = [i for i, k in enumerate(kinds) if k == "uncond"]
        extra = {"class_labels": kw["class_labels"]} if kw.get("class_labels") is not None else {}
        dt = _module_dtype(unet, x.dtype) if isinstance(unet, torch.nn.Module) else x.dtype
        for unit, on in zip(self.units, flags, strict=True):
            if not on:
                continue
            latent = _maps_for_rows(unit.latent, kinds)
            ref = self.noised(latent.float(), tt if tt.ndim else tt.reshape(1), b)
            if x.shape[1] == 2 * ref.shape[1] + 1:  # a 9-channel U-Net: an empty mask and the latent itself
                ref = torch.cat([ref, torch.zeros_like(ref[:, :1]), latent.float()], dim=1)
            self.machine.write(unit.kind, unit.scale, unit.fidelity)
            try:
                unet(ref.to(dt), t, encoder_hidden_states=encoder_hidden_states, **extra)
            finally:
                self.machine.read()


def _step_index(step: SamplerStep | int | None) -> int:
    if step is None:
        raise ControlNetError(
            "the controlled U-Net needs the sampler's step (step=SamplerStep(...)); call it "
            "through sdengine.diffusion.sampling.sample"
        )
    return step.index if isinstance(step, SamplerStep) else int(step)


def _step_sigma(step: SamplerStep | int | None) -> float | None:
    return step.sigma if isinstance(step, SamplerStep) else None


def _version(t: Tensor) -> int:
    """A tensor's in-place change counter (an inference-mode tensor has none: -1)."""
    try:
        return int(t._version)
    except RuntimeError:
        return -1


def _module_dtype(m: torch.nn.Module, default: torch.dtype) -> torch.dtype:
    p = next(m.parameters(), None)
    return p.dtype if p is not None else default


class ControlledUNet:
    """``model(x, t, *, encoder_hidden_states, step, row_kinds=None, **kw)``: the U-Net with the active
    ControlNets' residuals. ``step`` (a SamplerStep or int) is the run's step index; ``row_kinds`` the
    cond/uncond tag of each row (absent: every row conditional)."""

    takes_step = True
    takes_row_kinds = True

    def __init__(
        self,
        unet: Any,
        units: list[PreparedUnit],
        *,
        guess_mode: bool = False,
        adapter_cache: dict[tuple[int, int, tuple[str, ...]], tuple[Tensor, int, list[Tensor]]] | None = None,
        references: ReferencePasses | None = None,
        view_state: dict[Any, Any] | None = None,
    ) -> None:
        self.unet = unet
        self.units = units
        self.guess_mode = guess_mode
        # the reference units (no model: sd-webui-controlnet's reference_only / reference_adain[+attn])
        self.references = references
        # A T2I-Adapter's features depend on its map alone (not on the latent, the step or the prompt): computed
        # once per generation (per map and set of CFG rows it acts on), as diffusers' adapter pipelines do, and
        # shared with the with_kinds copies. Key (net, map, row kinds) -> (the map, its version, the features).
        self.adapter_cache = {} if adapter_cache is None else adapter_cache
        # MultiDiffusion's views (view_hints): "now" the units' maps cropped to the call's views (absent: the
        # whole maps), the other keys those crops per view batch, made once per generation (an adapter's features
        # then come from its cache); shared with the with_kinds copies
        self.view_state: dict[Any, Any] = {} if view_state is None else view_state

    def __getattr__(self, name: str) -> Any:  # config, dtype, ... of the wrapped U-Net
        if name == "unet":
            raise AttributeError(name)
        return getattr(self.unet, name)

    def with_kinds(self, kinds: Sequence[frozenset[str] | None]) -> ControlledUNet:
        """The same U-Net and loaded units (shared, nothing copied), each acting on the rows of ``kinds``."""
        units = [replace(u, kinds=k) for u, k in zip(self.units, kinds, strict=True)]
        return ControlledUNet(
            self.unet,
            units,
            guess_mode=self.guess_mode,
            adapter_cache=self.adapter_cache,
            references=self.references,
            view_state=self.view_state,
        )

    def unit_images(self) -> list[Tensor]:
        """Each unit's control map(s) for this call: the whole maps, or their crops to MultiDiffusion's views."""
        now = self.view_state.get("now")
        return [u.image for u in self.units] if now is None else list(now)

    def view_hints(self, batch: list[tuple[int, int, int, int]] | None, size: tuple[int, int], rows: int) -> None:
        """MultiDiffusion's view hook (:class:`sdengine.diffusion.multidiffusion.MultiDiffusionDenoiser`): the
        next calls' latent rows are ``rows`` rows of each view of ``batch`` (top, bottom, left, right in latent
        cells of a latent of ``size``; columns past the right edge wrap), view by view, so each unit's map is cut
        to each view's pixel window (the cells times the map's pixels per cell), the rows of a view taking the
        maps the whole latent's rows take. ``None``: the views are done, the whole maps again."""
        if batch is None:
            self.view_state.pop("now", None)
            return
        key = (tuple(batch), size, rows)
        crops = self.view_state.get(key)
        if crops is None:
            crops = [
                _view_maps(u.image, batch, size, rows, k, u.net if isinstance(u.net, T2IAdapter) else None)
                for k, u in enumerate(self.units)
            ]
            self.view_state[key] = crops
        self.view_state["now"] = crops

    def active(self, step: int, sigma: float | None = None) -> list[bool]:
        """Which units act at the run's step ``step`` (a call at ``sigma``: units of the comfyui rule judge it)."""
        return [
            unit.window[0] <= sigma <= unit.window[1]
            if unit.window is not None and sigma is not None
            else unit.keep[min(step, len(unit.keep) - 1)]
            for unit in self.units
        ]

    def residuals(
        self,
        x: Tensor,
        t: Tensor | float,
        encoder_hidden_states: Tensor,
        *,
        step: int,
        row_kinds: Sequence[str] | None = None,
        class_labels: Tensor | None = None,
    ) -> tuple[list[Tensor] | None, Tensor | None]:
        return self.residuals_of(
            x,
            t,
            encoder_hidden_states,
            active=self.active(step),
            images=self.unit_images(),
            row_kinds=row_kinds,
            class_labels=class_labels,
        )

    def residuals_of(
        self,
        x: Tensor,
        t: Tensor | float,
        encoder_hidden_states: Tensor,
        *,
        active: Sequence[bool],
        images: Sequence[Tensor],
        row_kinds: Sequence[str] | None = None,
        class_labels: Tensor | None = None,
    ) -> tuple[list[Tensor] | None, Tensor | None]:
        """The summed residuals of the ``active`` units (one flag per unit) with their control maps ``images``."""
        b = x.shape[0]
        kinds = tuple(row_kinds) if row_kinds is not None else ("cond",) * b  # no tags: every row conditional
        down: list[Tensor] | None = None
        mid: Tensor | None = None
        for unit, on, unit_image in zip(self.units, active, images, strict=True):
            if not on or isinstance(unit.net, T2IAdapter):
                continue
            # the rows this unit acts on: guess mode and the "controlnet" mode leave the unconditional ones alone,
            # and a unit carried by one conditioning only (ComfyUI) acts on its rows only
            allowed = {"cond"} if self.guess_mode or unit.mode == "controlnet" else {"cond", "uncond"}
            if unit.kinds is not None:
                allowed &= unit.kinds
            picked = [i for i, k in enumerate(kinds) if k in allowed]
            if not picked:
                continue
            rows = _rows(picked, b, x.device)
            net = unit.net
            xi = x[:, : net.config.unet.in_channels]  # the latent only, without inpainting's extra channels
            ctx = encoder_hidden_states
            tt = torch.as_tensor(t, device=x.device)
            reads_vector = getattr(net, "class_embedding", None) is not None or hasattr(net, "add_embedding")
            # a ControlNet trained without the pooled text embedding does not read it; SDXL's always do
            labels = class_labels if class_labels is not None and reads_vector else None
            if rows is not None:
                xi, ctx = xi[rows], ctx[rows]
                tt = tt[rows] if tt.ndim == 1 and tt.shape[0] == b else tt
                labels = labels[rows] if labels is not None else None
            img = _maps_for_rows(unit_image, [kinds[i] for i in picked])
            extra = {"class_labels": labels} if labels is not None else {}
            soft = unit.mode != "balanced"
            d, m = net(
                xi.to(net.dtype),
                tt,
                img,
                encoder_hidden_states=ctx.to(net.dtype),
                scale=unit.scale,
                guess_mode=self.guess_mode and not soft,  # the soft weights take the place of guess mode's
                **extra,
            )
            if soft:  # sd-webui-controlnet's soft injection ("prompt" / "controlnet" mode)
                *factors, last = soft_scales(len(d) + 1)
                d = [r * f for r, f in zip(d, factors, strict=True)]
                m = m * last
            if rows is not None:  # no control on the other rows
                d = [_scatter(r, rows, b) for r in d]
                m = _scatter(m, rows, b)
            if down is None or mid is None:
                down, mid = d, m
            else:
                down = [a + r for a, r in zip(down, d, strict=True)]
                mid = mid + m
        return down, mid

    def adapter_features_of(
        self,
        x: Tensor,
        *,
        active: Sequence[bool],
        images: Sequence[Tensor],
        row_kinds: Sequence[str] | None = None,
    ) -> list[Tensor] | None:
        """The summed, scaled features of the ``active`` T2I-Adapter units for the rows of ``x``, each checked
        against the U-Net's encoder at this latent size (None: no adapter acts)."""
        b = x.shape[0]
        kinds = tuple(row_kinds) if row_kinds is not None else ("cond",) * b
        total: list[Tensor] | None = None
        for k, (unit, on, unit_image) in enumerate(zip(self.units, active, images, strict=True)):
            if not on or not isinstance(unit.net, T2IAdapter):
                continue
            allowed = {"cond"} if self.guess_mode or unit.mode == "controlnet" else {"cond", "uncond"}
            if unit.kinds is not None:
                allowed &= unit.kinds
            picked = [i for i, kd in enumerate(kinds) if kd in allowed]
            if not picked:
                continue
            rows = _rows(picked, b, x.device)
            feats = [f * unit.scale for f in self._adapter_features(unit.net, unit_image, [kinds[i] for i in picked])]
            if unit.mode != "balanced":  # the extension's soft weights of an adapter's features (as it zips them)
                feats = [f * s for f, s in zip(feats, soft_scales(min(len(feats), 4), adapter=True), strict=False)]
            _check_features(feats, self.unet, x, k)
            if rows is not None:
                feats = [_scatter(f, rows, b) for f in feats]
            if total is None:
                total = feats
            elif len(total) != len(feats):
                raise ControlNetError(
                    f"T2I-Adapter units give {len(total)} and {len(feats)} feature maps: not one kind"
                )
            else:
                total = [a + f for a, f in zip(total, feats, strict=True)]
        return total

    def _adapter_features(self, net: T2IAdapter, image: Tensor, kinds: list[str]) -> list[Tensor]:
        """``net``'s features of ``image`` for rows of ``kinds``: from the cache when that map (the same tensor,
        not changed in place since) was seen. Not cached where gradients flow (training) or while a CUDA graph
        records (its memory is the graph's)."""
        recording = image.is_cuda and torch.cuda.is_current_stream_capturing()
        if torch.is_grad_enabled() or recording:
            return list(net(_maps_for_rows(image, kinds)))
        key = (id(net), id(image), tuple(kinds))
        version = _version(image)
        hit = self.adapter_cache.get(key)
        if hit is not None and hit[0] is image and hit[1] == version:
            return hit[2]
        feats = list(net(_maps_for_rows(image, kinds)))
        self.adapter_cache[key] = (image, version, feats)
        return feats

    def __call__(
        self,
        x: Tensor,
        t: Tensor | float,
        *,
        encoder_hidden_states: Tensor,
        step: SamplerStep | int | None = None,
        row_kinds: Sequence[str] | None = None,
        **kw: Any,
    ) -> Tensor:
        index = _step_index(step)
        images = self.unit_images()
        active = self.active(index, _step_sigma(step))
        refs = self.references
        flags = [] if refs is None else [u.active(index, _step_sigma(step)) for u in refs.units]
        if refs is None or not any(flags):
            return self.forward_with(x, t, encoder_hidden_states, active, images, row_kinds, **kw)
        if not isinstance(self.unet, torch.nn.Module):
            raise ControlNetError("reference control needs sdengine's U-Net module, not a compiled or graphed one")
        kinds = tuple(row_kinds) if row_kinds is not None else ("cond",) * x.shape[0]
        with reference_applied(self.unet, refs.machine, adain_used=refs.adain):
            refs.run(self.unet, x, t, encoder_hidden_states, flags, kinds, kw)
            return self.forward_with(x, t, encoder_hidden_states, active, images, row_kinds, **kw)

    def forward_with(
        self,
        x: Tensor,
        t: Tensor | float,
        encoder_hidden_states: Tensor,
        active: Sequence[bool],
        images: Sequence[Tensor],
        row_kinds: Sequence[str] | None,
        **kw: Any,
    ) -> Tensor:
        """The U-Net with the residuals of the ``active`` units (their maps ``images``): a call without the step."""
        down, mid = self.residuals_of(
            x,
            t,
            encoder_hidden_states,
            active=active,
            images=images,
            row_kinds=row_kinds,
            class_labels=kw.get("class_labels"),
        )
        dt = x.dtype if not isinstance(self.unet, torch.nn.Module) else _module_dtype(self.unet, x.dtype)
        if down is not None and mid is not None:
            kw["down_block_additional_residuals"] = [r.to(dt) for r in down]
            kw["mid_block_additional_residual"] = mid.to(dt)
        feats = self.adapter_features_of(x, active=active, images=images, row_kinds=row_kinds)
        if feats is not None:
            kw["down_intrablock_additional_residuals"] = [f.to(dt) for f in feats]
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states, **kw)


class GraphedControlledUNet:
    """A :class:`ControlledUNet` whose calls replay from CUDA graphs (sdengine.cuda_graphs): the ControlNets and
    the U-Net of one step recorded as one graph, per set of active units and cond/uncond row tags (the step's
    Python decisions, which key the recording) and per shape; the control maps are inputs. Made per generation
    (its ControlNets and maps are the generation's), so each generation records its own: the first two calls of
    a signature run plainly, the rest replay. ``usable()`` says whether the networks carry hooks (a LoRA), in
    which case the pipeline does not wrap."""

    takes_step = True
    takes_row_kinds = True

    def __init__(self, controlled: ControlledUNet, *, backend: Any = None, device_type: str = "cuda") -> None:
        from sdengine.cuda_graphs import GraphedCallable

        self.controlled = controlled
        nets: list[torch.nn.Module] = [u.net for u in controlled.units]
        if isinstance(controlled.unet, torch.nn.Module):
            nets.append(controlled.unet)
        self.graphed = GraphedCallable(
            self._run,
            module=torch.nn.ModuleList(nets),
            name="controlled U-Net",
            backend=backend,
            device_type=device_type,
        )

    def usable(self) -> bool:
        return self.graphed.usable()

    def __call__(
        self,
        x: Tensor,
        t: Tensor | float,
        *,
        encoder_hidden_states: Tensor,
        step: SamplerStep | int | None = None,
        row_kinds: Sequence[str] | None = None,
        **kw: Any,
    ) -> Tensor:
        active = "".join("1" if on else "0" for on in self.controlled.active(_step_index(step), _step_sigma(step)))
        kinds = "" if row_kinds is None else "".join("c" if k == "cond" else "u" for k in row_kinds)
        images = {f"control_map_{i}": u.image for i, u in enumerate(self.controlled.units)}
        return self.graphed(
            x, t, encoder_hidden_states=encoder_hidden_states, active=active, kinds=kinds, **images, **kw
        )

    def _run(
        self, x: Tensor, t: Tensor, *, encoder_hidden_states: Tensor, active: str, kinds: str, **kw: Any
    ) -> Tensor:
        images = [kw.pop(f"control_map_{i}") for i in range(len(self.controlled.units))]
        row_kinds = tuple("cond" if k == "c" else "uncond" for k in kinds) if kinds else None
        flags = [a == "1" for a in active]
        return self.controlled.forward_with(x, t, encoder_hidden_states, flags, images, row_kinds, **kw)


def _check_features(feats: Sequence[Tensor], unet: Any, x: Tensor, k: int) -> None:
    """Each adapter feature must have the shape of the U-Net encoder's tensor it is added to."""
    cfg = getattr(unet, "config", None)
    if not isinstance(cfg, UNetConfig):
        return
    chs, n = cfg.block_out_channels, len(cfg.block_out_channels)
    size = (x.shape[-2], x.shape[-1])
    sizes = [size]
    for _ in range(n - 1):  # a stride-2 conv with padding 1 rounds up
        size = ((size[0] + 1) // 2, (size[1] + 1) // 2)
        sizes.append(size)
    want = []
    for i in range(n):
        at = i if cfg.attention[i] != "none" or i == n - 1 else i + 1
        want.append((chs[i], *sizes[at]))
    for i, f in enumerate(feats[:n]):
        if tuple(f.shape[1:]) != want[i]:
            raise ControlNetError(
                f"T2I-Adapter of unit {k + 1}: its feature {i} is {tuple(f.shape[1:])} where the U-Net needs "
                f"{want[i]} (an adapter of another model family or a map size it cannot divide)"
            )


def _view_maps(
    maps: Tensor,
    batch: list[tuple[int, int, int, int]],
    size: tuple[int, int],
    rows: int,
    k: int,
    net: Any = None,
) -> Tensor:
    """The maps (N, C, H, W) of a latent of ``size`` cells cut to the views of ``batch`` (see
    :meth:`ControlledUNet.view_hints`): ``rows`` maps per view, row ``r`` of a view taking map ``r % N``."""
    h, w = size
    mh, mw = int(maps.shape[-2]), int(maps.shape[-1])
    f = mh // h if h else 0
    # a ControlNet's map is the image's size (f pixels a latent cell); a T2I-Adapter's may be rounded up to its
    # unshuffle factor (a few more pixels: the same f a cell on both sides)
    if f < 1 or not (f * h <= mh < (f + 1) * h and f * w <= mw < (f + 1) * w):
        raise ControlNetError(
            f"control unit {k + 1}: its map is {mw}x{mh} pixels, not a whole number of pixels per cell of the "
            f"{w}x{h} latent the tiled diffusion views cut"
        )
    unshuffle = int(getattr(getattr(net, "config", None), "downscale_factor", 1)) if net is not None else 1
    for top, bottom, left, right in batch:
        if ((bottom - top) * f) % unshuffle or ((right - left) * f) % unshuffle:
            raise ControlNetError(
                f"control unit {k + 1}: a tiled diffusion view of {(right - left) * f}x{(bottom - top) * f} pixels "
                f"is not a multiple of the T2I-Adapter's factor {unshuffle} (choose a window, window height and image "
                f"size in multiples of {max(1, unshuffle // f)} latent cells)"
            )
    pick = [r % int(maps.shape[0]) for r in range(rows)]
    out = []
    for top, bottom, left, right in batch:
        cols = torch.arange(left * f, right * f, device=maps.device) % (w * f)  # a circular view's wrap
        view = maps[:, :, top * f : bottom * f].index_select(-1, cols)
        out.append(view if pick == list(range(int(maps.shape[0]))) else view[pick])
    return torch.cat(out)


def _maps_for_rows(maps: Tensor, kinds: Sequence[str]) -> Tensor:
    """The control map of each row: maps are one per latent row (or one for all), and the rows of each CFG kind
    are the latent rows in order, so row ``j`` of its kind takes map ``j % len(maps)`` (ComfyUI cycles a shorter
    batch of maps the same way). Repeats and slices when they give that (a CUDA graph records those), else an
    index (2 maps over 3 rows once gave the unconditional rows the maps shifted by one)."""
    m, n = int(maps.shape[0]), len(kinds)
    if m == n and len(set(kinds)) == 1:
        return maps
    if m == 1:
        return maps.expand(n, -1, -1, -1)
    seen: dict[str, int] = {}
    want = []
    for k in kinds:
        want.append(seen.get(k, 0) % m)
        seen[k] = seen.get(k, 0) + 1
    if want == [j % m for j in range(n)]:
        return maps.repeat(-(-n // m), 1, 1, 1)[:n]
    return maps[torch.tensor(want, device=maps.device)]


def _rows(picked: list[int], b: int, device: torch.device) -> Tensor | slice | None:
    """Row indices as None (every row), a slice when consecutive (CFG puts the conditional rows first, then the
    unconditional ones: a slice, which a CUDA graph can record), else an index tensor (a copy from the host)."""
    if len(picked) == b:
        return None
    if picked == list(range(picked[0], picked[-1] + 1)):
        return slice(picked[0], picked[-1] + 1)
    return torch.tensor(picked, device=device)


def _scatter(r: Tensor, rows: Tensor | slice, b: int) -> Tensor:
    """Residuals of some rows into a batch of ``b`` rows, zeros elsewhere."""
    if isinstance(rows, slice):  # consecutive rows: zeros before and after
        start = rows.start or 0
        parts = [r]
        if start:
            parts.insert(0, torch.zeros((start, *r.shape[1:]), dtype=r.dtype, device=r.device))
        if start + r.shape[0] < b:
            parts.append(torch.zeros((b - start - r.shape[0], *r.shape[1:]), dtype=r.dtype, device=r.device))
        return torch.cat(parts) if len(parts) > 1 else r
    out = torch.zeros((b, *r.shape[1:]), dtype=r.dtype, device=r.device)
    out[rows] = r
    return out


def build_controlled_unet(
    unet: Any,
    units: Sequence[ControlUnit | tuple[Any, ...]],
    *,
    width: int,
    height: int,
    grid: Any,
    guess_mode: bool = False,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    start_step: int = 0,
    resize_mode: str = "just resize",
    note: Callable[[str], None] | None = None,
    noise_schedule: Any = None,
    encode_reference: Callable[[Tensor], Tensor] | None = None,
    reference_seed: int = 0,
    hires: bool = False,
) -> ControlledUNet:
    """The U-Net callable with ControlNets attached, for the Denoiser to use in place of the U-Net.

    ``units``: :class:`ControlUnit` (or its tuple form); each map is resized to ``width`` x ``height``.
    ``grid``: the sampling grid (``.timesteps``) of this run; ``start_step``: the first step that runs
    (img2img), so that the fractions count the steps that actually run, as diffusers does. A unit whose
    window holds no whole step (``step_keep`` all off: say start 0.31, end 0.39 of 10 steps) acts on nothing:
    that is said through ``note`` (the pipeline's notes), or as a warning without one. Units of the
    ``"comfyui"`` rule need ``noise_schedule`` (its ``log_sigmas``) and ``grid.sigmas``.

    Reference units (model ``"reference_only"``, ``"reference_adain"``, ``"reference_adain+attn"``: no network,
    :mod:`sdengine.nn.reference`) need ``encode_reference`` ((N, 3, H, W) images in [0, 1] -> the U-Net's latents),
    ``noise_schedule`` (its ``alphas_cumprod``) and ``reference_seed`` (the generator of their passes' noise);
    ``hires``: this is the hires fix's second pass (their style fidelity is 0 there, as the extension's).
    """
    torch_dtype = parse_dtype(dtype) if dtype is not None else None
    if device is None:
        device = next(unet.parameters()).device if isinstance(unet, torch.nn.Module) else "cpu"
    base_cfg = getattr(unet, "config", None)
    timesteps = torch.as_tensor(getattr(grid, "timesteps", grid)).reshape(-1)[start_step:]
    steps = int(timesteps.shape[0])
    if steps < 1:
        raise ControlNetError(f"no steps to control (grid of {timesteps.shape[0] + start_step}, start {start_step})")
    prepared: list[PreparedUnit] = []
    references: list[PreparedReference] = []
    for k, raw in enumerate(units):
        if isinstance(raw, tuple | list) and len(raw) != 5:
            raise ControlNetError(f"ControlNet unit {k} must be (model_or_path, image, scale, start, end)")
        unit = ControlUnit.coerce(raw)
        if unit.reference is not None:
            references.append(
                _prepare_reference(
                    unit,
                    k,
                    unet=unet,
                    width=width,
                    height=height,
                    steps=steps,
                    start_step=start_step,
                    grid=grid,
                    resize_mode=resize_mode,
                    note=note,
                    noise_schedule=noise_schedule,
                    encode=encode_reference,
                    device=device,
                    hires=hires,
                )
            )
            continue
        model = unit.model
        name = f"ControlNet {k + 1}" if not isinstance(model, str | Path) else f"ControlNet {Path(model).name}"
        check_unit_settings(float(unit.scale), float(unit.start), float(unit.end), name=name)
        net: ControlNet | T2IAdapter
        family = getattr(model, "family", None)
        if family in ("sd3", "flux", "qwen_image", "z_image"):
            label = {"sd3": "an SD3", "flux": "a Flux", "qwen_image": "a Qwen-Image", "z_image": "a Z-Image"}[family]
            raise ControlNetError(f"{name} is {label} ControlNet; this model is a U-Net")
        if unit.mask is not None:
            raise ControlNetError(
                f"{name}: a unit mask is an SD3 inpainting ControlNet's input; U-Net ControlNets take none (inpaint "
                "with the request's init_image and mask)"
            )
        if unit.union_mode is not None:
            raise ControlNetError(f"{name}: union_mode is a Flux Union ControlNet's; U-Net ControlNets take none")
        if isinstance(model, ControlNet):
            # A model the caller owns (maybe one being trained): moved if it must be, otherwise left alone.
            net = model
            if isinstance(base_cfg, UNetConfig):
                check_compatible(net.config, base_cfg, name=name)
        elif isinstance(model, T2IAdapter):
            net = model
            if isinstance(base_cfg, UNetConfig):
                check_adapter_compatible(net.config, base_cfg, name=name)
        else:
            net = load_control_model(
                model,
                base=base_cfg if isinstance(base_cfg, UNetConfig) else None,
                base_unet=unet if isinstance(unet, torch.nn.Module) else None,  # a Control-LoRA's base weights
            )
            net.eval().requires_grad_(False)
        net = net.to(device=device, dtype=torch_dtype) if torch_dtype is not None else net.to(device)
        map_w, map_h = width, height
        if isinstance(net, T2IAdapter):
            # the pixel unshuffle needs sides that are multiples of its factor: rounded up, as ComfyUI does
            f = net.config.downscale_factor
            map_w, map_h = -(-width // f) * f, -(-height // f) * f
            in_ch = net.config.in_channels
        else:
            in_ch = net.config.conditioning_channels
        img = control_image_tensor(unit.image, map_w, map_h, resize_mode)
        if img.shape[1] != in_ch:
            if in_ch == 1:  # the sketch / canny adapters and ControlNets of one channel: the mean, as ComfyUI
                img = img.mean(dim=1, keepdim=True)
            else:
                raise ControlNetError(f"{name} takes {in_ch}-channel control images")
        window = None
        if unit.rule == "comfyui":
            sigmas = getattr(grid, "sigmas", None)
            if noise_schedule is None or sigmas is None:
                raise ControlNetError(f"{name}: the comfyui step rule needs the noise schedule and the grid's sigmas")
            window = comfy_sigma_window(noise_schedule.log_sigmas, float(unit.start), float(unit.end))
            keep = sigma_keep(torch.as_tensor(sigmas).reshape(-1)[start_step : start_step + steps], window)
        else:
            keep = step_keep(steps, float(unit.start), float(unit.end), unit.rule)
        if not any(keep):
            msg = no_step_message(name, steps, float(unit.start), float(unit.end), unit.rule)
            if note is not None:
                note(msg)
            else:
                warnings.warn(msg, stacklevel=2)
                log.warning(msg)
        image_t = img.to(device=device, dtype=net.dtype)
        prepared.append(PreparedUnit(net, image_t, float(unit.scale), keep, window=window, mode=unit.mode))
    passes = None
    if references:
        generator = torch.Generator("cpu").manual_seed(int(reference_seed))
        passes = ReferencePasses(references, noise_schedule.alphas_cumprod, generator)
    return ControlledUNet(unet, prepared, guess_mode=guess_mode, references=passes)


def _unit_window(
    unit: ControlUnit, name: str, *, steps: int, start_step: int, grid: Any, noise_schedule: Any
) -> tuple[list[bool], tuple[float, float] | None]:
    if unit.rule != "comfyui":
        return step_keep(steps, float(unit.start), float(unit.end), unit.rule), None
    sigmas = getattr(grid, "sigmas", None)
    if noise_schedule is None or sigmas is None:
        raise ControlNetError(f"{name}: the comfyui step rule needs the noise schedule and the grid's sigmas")
    window = comfy_sigma_window(noise_schedule.log_sigmas, float(unit.start), float(unit.end))
    return sigma_keep(torch.as_tensor(sigmas).reshape(-1)[start_step : start_step + steps], window), window


def _prepare_reference(
    unit: ControlUnit,
    k: int,
    *,
    unet: Any,
    width: int,
    height: int,
    steps: int,
    start_step: int,
    grid: Any,
    resize_mode: str,
    note: Callable[[str], None] | None,
    noise_schedule: Any,
    encode: Callable[[Tensor], Tensor] | None,
    device: Any,
    hires: bool,
) -> PreparedReference:
    """A reference unit checked against the U-Net and its image encoded (see :func:`build_controlled_unet`)."""
    from sdengine.nn.reference import adain_points

    kind = unit.reference
    assert kind is not None
    name = f"ControlNet unit {k} ({kind})"
    check_unit_settings(float(unit.scale), float(unit.start), float(unit.end), name=name)
    if encode is None or noise_schedule is None or getattr(noise_schedule, "alphas_cumprod", None) is None:
        raise ControlNetError(f"{name}: reference control needs the pipeline's VAE and noise schedule")
    if not isinstance(unet, torch.nn.Module) or not hasattr(unet, "down_blocks"):
        raise ControlNetError(f"{name}: reference control needs sdengine's U-Net module")
    if kind in ADAIN_KINDS:
        adain_points(unet)  # the layout check, now rather than at the first step
    keep, window = _unit_window(
        unit, name, steps=steps, start_step=start_step, grid=grid, noise_schedule=noise_schedule
    )
    if not any(keep):
        msg = no_step_message(name, steps, float(unit.start), float(unit.end), unit.rule)
        if note is not None:
            note(msg)
        else:
            warnings.warn(msg, stacklevel=3)
            log.warning(msg)
    img = control_image_tensor(unit.image, width, height, resize_mode).to(device)
    with torch.no_grad():
        latent = encode(img)
    cfg = getattr(unet, "config", None)
    sdxl = getattr(cfg, "addition_time_embed_dim", None) is not None
    fidelity = reference_fidelity(unit.mode, unit.fidelity, sdxl=sdxl, hires=hires)
    return PreparedReference(kind, latent, float(unit.scale), fidelity, keep, window)


__all__ = [
    "CONTROL_MODES",
    "CONTROL_MODE_NAMES",
    "ControlUnit",
    "ControlledUNet",
    "GraphedControlledUNet",
    "HINT_NEAREST_CENTRE",
    "PreparedReference",
    "PreparedUnit",
    "REFERENCE_FIDELITY",
    "REFERENCE_KINDS",
    "ReferencePasses",
    "STEP_RULES",
    "build_controlled_unet",
    "check_reference_unit",
    "check_unit_settings",
    "reference_fidelity",
    "control_image_tensor",
    "no_step_message",
    "comfy_sigma_window",
    "percent_to_sigma",
    "sigma_keep",
    "soft_scales",
    "step_keep",
]
