"""AUTOMATIC1111's ``/sdapi/v1`` API (and the sd-webui-controlnet extension's units), over the same queue.

Requests use A1111's field names and defaults; each is mapped onto :func:`~sdengine.server.requests.
build_generation`. What sdengine cannot do is never silently dropped: request fields that would change the image
but are not implemented (``restore_faces``, ``s_min_uncond``, ``resize_mode`` 3, ...) are a 422 naming the field
(:func:`refuse_unsupported`); fields A1111 does not read in that request (hires-fix fields on img2img, ...), fields
it does not have, and a ControlNet unit's settings that are not done (a U-Net unit's ``mask``, ...) are listed in
``info["ignored"]`` of the response.

``interrupt`` and ``skip`` without a body act on the running jobs that came through this API (never on a
native or OpenAI job) of the calling client (the admin key: every client's); with ``{"id_task": ID}`` on that job
only, when it is the caller's. An interrupted call answers with the
images finished so far, or the last cheap preview of the interrupted image, as A1111 answers with its
current image.
"""

from __future__ import annotations

import base64
import dataclasses
import inspect
import io
import json
import math
import re
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from PIL import Image, ImageFilter, ImageOps
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sdengine.diffusion import sampling
from sdengine.errors import SdengineError
from sdengine.io.resize import resize_image, resize_mode_name
from sdengine.metadata import (
    CONTROLNET_MODULES,
    CONTROLNET_PROCESSOR_RES,
    CONTROLNET_SCALED,
    REFERENCE_FIDELITY_DEFAULT,
    REFERENCE_MODULES,
)
from sdengine.sd_upscale import TITLE as SD_UPSCALE_TITLE
from sdengine.server.errors import BadRequest, NotFound, PayloadTooLarge, ServerFault, Unprocessable
from sdengine.server.ip_adapters import A1111_MODULES, IPAdapterRequest, resolve_a1111_model, unit_names
from sdengine.server.jobs import CANCELLED, DONE, FAILED, Job, visible
from sdengine.server.requests import ControlRequest, check_vae_choice, set_job_vae

A1111_VERSION = "v1.10.1"  # the A1111 API whose shapes this follows

NO_REFINER = (None, "", "None", "none")  # A1111's "no refiner" values of refiner_checkpoint

# Fields that do nothing at these values (A1111's own defaults or neutral settings): not reported.
NEUTRAL: dict[str, tuple[Any, ...] | None] = {  # None: any value
    "restore_faces": (False, None),  # true: refused (refuse_unsupported)
    "do_not_save_samples": (False, True, None),
    "do_not_save_grid": (False, True, None),
    "override_settings_restore_afterwards": None,  # false: the overrides stay set afterwards, as in A1111
    "script_args": None,  # read only with a script_name, which is refused
    "script_name": (None, ""),
    "enable_hr": (False, None),
    "hr_checkpoint_name": (None, "", "Use same checkpoint"),
    "firstphase_width": (0, None),
    "firstphase_height": (0, None),
    "image_cfg_scale": None,
    "initial_noise_multiplier": (1, 1.0, None),  # img2img's (IMG2IMG_USED); txt2img has none (in A1111 too)
    "inpaint_full_res_padding": None,
    "inpaint_full_res": None,  # "only masked" (true) or "whole picture": both done
    "refiner_checkpoint": NO_REFINER,  # the others run (hand_off)
    "refiner_switch_at": None,  # read with a refiner_checkpoint only
    "comments": (None, {}),
    "sampler_index": None,
    "include_init_images": None,
    "inpainting_fill": (0, 1, None),  # "fill", "original"; 2 and 3 in the latent (LATENT_FILLS), others refused
    "latent_mask": (None, ""),  # with a mask: run (inpaint_fields); without one A1111 reads none either
    "mask_round": None,  # with a mask: run (inpaint_fields); without one nothing to round
    "s_min_uncond": (None, 0, 0.0),  # another value: refused (refuse_unsupported)
    "infotext": None,  # read (apply_infotext)
    "firstpass_image": (None, ""),  # with the hires fix: refused; without it A1111 reads none either
    "force_task_id": None,
    "send_images": None,
    "save_images": None,
    "denoising_strength": None,
    "n_iter": None,
    "batch_size": None,
}
HR_FIELDS = ("hr_", "firstphase_")  # hires-fix settings: matter only with enable_hr
# the hires-fix fields sdengine runs (txt2img with enable_hr; sdengine.pipeline.hires)
HR_USED = {
    "enable_hr",
    "hr_scale",
    "hr_upscaler",
    "hr_second_pass_steps",
    "hr_resize_x",
    "hr_resize_y",
    "hr_sampler_name",
    "hr_scheduler",
    "hr_prompt",
    "hr_negative_prompt",
    "denoising_strength",
}
SAME_SAMPLER = (None, "", "Use same sampler")  # A1111's UI value for "the first pass's"


SAME_SCHEDULER = (None, "", "Use same scheduler")


# A1111's sampler fields, passed to the samplers that take them as k-diffusion's options (A1111's
# ``sampler_extra_params``: churn for Euler, Heun, DPM2; s_noise for those and DPM2 a, DPM++ SDE, DPM++ 2M SDE),
# with the value that does nothing (not passed, as A1111 passes nothing then); ``eta`` has no such value.
SAMPLER_FIELDS: dict[str, float | None] = {"eta": None, "s_churn": 0.0, "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.0}


# A1111's options that change the image but that sdengine runs one way only: each takes the values that match what
# sdengine does (the first is what GET /sdapi/v1/options answers); another value is a 400 naming the option, in
# POST /sdapi/v1/options and in override_settings: never a silently other image. The reason follows each.
_FALSE, _ZERO = (False,), (0, 0.0)
FIXED_OPTIONS: dict[str, tuple[tuple[Any, ...], str]] = {
    "face_restoration": (_FALSE, "face restoration (GFPGAN, CodeFormer) is not available in sdengine"),
    "sd_unet": (("Automatic", "None"), "separate UNet files are not implemented in sdengine"),
    "sd_hypernetwork": (("None", "", None), "hypernetworks are not implemented in sdengine"),
    "emphasis": (("Original",), "sdengine's prompt weighting is A1111's Original emphasis only"),
    "enable_emphasis": ((True,), "sdengine always applies A1111's (emphasis)"),
    "use_old_emphasis_implementation": (_FALSE, "A1111's old emphasis parser is not implemented in sdengine"),
    "comma_padding_backtrack": ((20,), "sdengine breaks long prompts at a comma within 20 tokens (A1111's default)"),
    "k_sched_type": (("Automatic",), "send the request's scheduler field instead"),
    "sigma_min": (_ZERO, "a custom schedule's sigma range is not implemented on these routes"),
    "sigma_max": (_ZERO, "a custom schedule's sigma range is not implemented on these routes"),
    "rho": (_ZERO, "a custom schedule's rho is not implemented on these routes"),
    "beta_dist_alpha": ((0.6,), "sdengine's Beta schedule uses alpha 0.6 (A1111's default)"),
    "beta_dist_beta": ((0.6,), "sdengine's Beta schedule uses beta 0.6 (A1111's default)"),
    "sgm_noise_multiplier": (_FALSE, "A1111's SGM noise multiplier is not implemented in sdengine"),
    "skip_early_cond": (_ZERO, "A1111's Skip Early CFG is not implemented in sdengine"),
    "s_min_uncond": (_ZERO, "A1111's negative guidance minimum sigma is not implemented in sdengine"),
    "uni_pc_skip_type": (("time_uniform",), "sdengine's UniPC runs on the schedule's grid (A1111's time_uniform)"),
    "uni_pc_lower_order_final": ((True,), "sdengine's UniPC always lowers its order at the end"),
    "ddim_discretize": (("uniform",), "sdengine's DDIM grid is uniform (A1111's quad is not implemented)"),
    "img2img_color_correction": (_FALSE, "A1111's img2img color correction is not implemented in sdengine"),
    "img2img_extra_noise": (_ZERO, "A1111's img2img extra noise is not implemented in sdengine"),
    "inpainting_mask_weight": ((1, 1.0), "sdengine's inpainting models take the full mask (A1111's weight 1)"),
    "token_merging_ratio": (_ZERO, "token merging (ToMe) is not implemented in sdengine"),
    "token_merging_ratio_img2img": (_ZERO, "token merging (ToMe) is not implemented in sdengine"),
    "token_merging_ratio_hr": (_ZERO, "token merging (ToMe) is not implemented in sdengine"),
    "pad_cond_uncond": (
        _FALSE,
        "A1111's padding of the prompt and the negative prompt to one length is not implemented in sdengine",
    ),  # fmt: skip
    "pad_cond_uncond_v0": (
        _FALSE,
        "A1111's padding of the prompt and the negative prompt to one length is not implemented in sdengine",
    ),  # fmt: skip
    "enable_quantization": (_FALSE, "A1111's K-sampler quantization is not implemented in sdengine"),
    "enable_batch_seeds": ((True,), "sdengine's batches always make each image as a single image of its seed"),
    "use_old_karras_scheduler_sigmas": (_FALSE, "A1111's old Karras range (0.1 to 10) is not implemented"),
    "no_dpmpp_sde_batch_determinism": (_FALSE, "sdengine's DPM++ SDE is always deterministic across batch sizes"),
    "use_old_hires_fix_width_height": (_FALSE, "A1111's old hires-fix sizes are not implemented in sdengine"),
    "dont_fix_second_order_samplers_schedule": (
        _FALSE,
        "A1111's old prompt schedule of second-order samplers is not implemented in sdengine",
    ),  # fmt: skip
    "hires_fix_use_firstpass_conds": (_FALSE, "sdengine's hires fix computes the second pass's conditioning anew"),
    "use_old_scheduling": (_FALSE, "A1111's old prompt-editing timeline is not implemented in sdengine"),
    "use_downcasted_alpha_bar": (_FALSE, "A1111's downcast alphas_cumprod is not implemented in sdengine"),
    "tiling": (_FALSE, "send the request's tiling field instead"),
}
# A1111's Hypertile U-Net and VAE options (its built-in Hypertile extension) and their defaults: the HyperTile of
# requests (GenerationRequest.hypertile and hypertile_vae; sdengine.nn.hypertile, A1111's rule). hypertile_enable_unet
# tiles every pass, hypertile_enable_unet_secondpass the hires fix's second pass (alone, or with the first when both
# are on); hypertile_enable_vae the VAE decoder's middle-block attention at every decode.
HYPERTILE_OPTIONS: dict[str, Any] = {
    "hypertile_enable_unet": False,
    "hypertile_enable_unet_secondpass": False,
    "hypertile_max_depth_unet": 3,
    "hypertile_max_tile_unet": 256,
    "hypertile_swap_size_unet": 3,
    "hypertile_enable_vae": False,
    "hypertile_max_depth_vae": 3,
    "hypertile_max_tile_vae": 128,
    "hypertile_swap_size_vae": 3,
}
# A1111's sampler-parameter options sdengine runs (the values a request's own field takes when it gives none;
# eta: eta_ddim for DDIM, eta_ancestral for the others, as A1111), and the UniPC ones (sdengine's UniPC's options
# variant and order); their defaults are A1111's (shared_options.py), which the server runs: UniPC bh1 of order 3
# (sdengine's own UniPC defaults, bh2 of order 2, are the Python API's and the CLI's).
SAMPLER_OPTIONS: dict[str, Any] = {
    "eta_ancestral": 1.0,
    "eta_ddim": 0.0,
    "s_churn": 0.0,
    "s_tmin": 0.0,
    "s_tmax": 0.0,
    "s_noise": 1.0,
    "uni_pc_variant": "bh1",
    "uni_pc_order": 3,
}
# sdengine's UniPC's own variant and order (sample_unipc's defaults): what it runs where none is passed
UNIPC_OWN = {"uni_pc_variant": "bh2", "uni_pc_order": 2}


# A1111's sd_noise_schedule values ("Noise schedule for sampling"; infotext "Noise Schedule"): "Zero Terminal SNR"
# rescales the model's alphas_cumprod for the call (GenerationRequest.zero_terminal_snr)
NOISE_SCHEDULES = ("Default", "Zero Terminal SNR")


def check_noise_schedule(value: Any, where: str = "") -> str:
    """A1111's ``sd_noise_schedule`` option, checked: one of NOISE_SCHEDULES, else a BadRequest (one line)."""
    if not isinstance(value, str) or value not in NOISE_SCHEDULES:
        choices = ", ".join(repr(n) for n in NOISE_SCHEDULES)
        raise BadRequest(f"{where}sd_noise_schedule must be one of {choices}, got {value!r}")
    return value


def check_fixed_option(name: str, value: Any, where: str = "") -> Any:
    """One of FIXED_OPTIONS, checked: a value sdengine runs, else a BadRequest naming the option (one line)."""
    accepted, why = FIXED_OPTIONS[name]
    for a in accepted:  # true is not 1 here, nor 0 false
        if (value is a) if isinstance(a, bool) or isinstance(value, bool) else value == a:
            return value
    shown = ", ".join(json.dumps(a) for a in accepted if a not in ("", None))
    raise BadRequest(f"{where}{name} {value!r}: {why}; send {shown}")


# A1111's infotext names of those options and of the UniPC ones (its infotext_to_setting_name_mapping): an infotext
# becomes these override_settings, as in A1111, so a value sdengine does not run is refused, never dropped.
INFOTEXT_OPTIONS = {
    "RNG": "randn_source",
    "Emphasis": "emphasis",
    "Noise Schedule": "sd_noise_schedule",
    "Schedule min sigma": "sigma_min",
    "Schedule max sigma": "sigma_max",
    "Schedule rho": "rho",
    "Beta scheduler alpha": "beta_dist_alpha",
    "Beta scheduler beta": "beta_dist_beta",
    "SGM noise multiplier": "sgm_noise_multiplier",
    "Skip Early CFG": "skip_early_cond",
    "NGMS": "s_min_uncond",
    "Token merging ratio": "token_merging_ratio",
    "Token merging ratio hr": "token_merging_ratio_hr",
    "Pad conds": "pad_cond_uncond",
    "Pad conds v0": "pad_cond_uncond_v0",
    "Conditional mask weight": "inpainting_mask_weight",
    "Extra noise": "img2img_extra_noise",
    "UniPC variant": "uni_pc_variant",
    "UniPC skip type": "uni_pc_skip_type",
    "UniPC order": "uni_pc_order",
    "UniPC lower order final": "uni_pc_lower_order_final",
    "Hypertile U-Net": "hypertile_enable_unet",
    "Hypertile U-Net second pass": "hypertile_enable_unet_secondpass",
    "Hypertile U-Net max depth": "hypertile_max_depth_unet",
    "Hypertile U-Net max tile size": "hypertile_max_tile_unet",
    "Hypertile U-Net swap size": "hypertile_swap_size_unet",
    "Hypertile VAE": "hypertile_enable_vae",
    "Hypertile VAE max depth": "hypertile_max_depth_vae",
    "Hypertile VAE max tile size": "hypertile_max_tile_vae",
    "Hypertile VAE swap size": "hypertile_swap_size_vae",
}


def check_hypertile_option(name: str, value: Any, where: str = "") -> Any:
    """One of HYPERTILE_OPTIONS, checked: the switches true or false, the numbers whole in sdengine's ranges (a
    BadRequest, one line). A1111's sliders stop at max depth 3, max tile 512, swap size 64; sdengine takes more."""
    from sdengine.nn.hypertile import MAX_DEPTH, MAX_SWAP_SIZE, MAX_TILE_SIZE

    if isinstance(HYPERTILE_OPTIONS[name], bool):
        if not isinstance(value, bool):
            raise BadRequest(f"{where}{name} must be true or false, got {repr(value)[:100]}")
        return value
    hi = {"max_depth": MAX_DEPTH, "max_tile": MAX_TILE_SIZE}.get(
        name[len("hypertile_") : name.rindex("_")], MAX_SWAP_SIZE
    )
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= hi:
        raise BadRequest(f"{where}{name} must be a whole number in [0, {hi}], got {repr(value)[:100]}")
    return value


def hypertile_fields(settings: dict[str, Any]) -> dict[str, Any]:
    """The request fields of A1111's Hypertile options (checked values of all HYPERTILE_OPTIONS): ``hypertile``
    (max tile, swap size, max depth) and ``hypertile_hires_only`` where a U-Net switch is on, ``hypertile_vae`` (max
    tile, swap size, max depth) where the VAE's is; {} when none is."""
    out: dict[str, Any] = {}
    every, second = settings["hypertile_enable_unet"], settings["hypertile_enable_unet_secondpass"]
    if every or second:
        tiles = tuple(settings[f"hypertile_{k}_unet"] for k in ("max_tile", "swap_size", "max_depth"))
        out.update(hypertile=tiles, hypertile_hires_only=not every)
    if settings["hypertile_enable_vae"]:
        out["hypertile_vae"] = tuple(settings[f"hypertile_{k}_vae"] for k in ("max_tile", "swap_size", "max_depth"))
    return out


def infotext_value(text: str) -> Any:
    """An infotext's value as A1111's option takes it: True / False, a number, else the text."""
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


COLOR = re.compile(r"#[0-9a-fA-F]{6}")


def check_background(value: Any, where: str = "") -> str:
    """A1111's ``img2img_background_color``: a colour as ``#rrggbb`` (a BadRequest, one line)."""
    if not isinstance(value, str) or not COLOR.fullmatch(value):
        raise BadRequest(f"{where}img2img_background_color must be a colour as #rrggbb, got {value!r}")
    return value.lower()


def flatten_init(image: Image.Image, color: str) -> Image.Image | None:
    """A1111's ``images.flatten`` of an img2img init image (its ``img2img_background_color``): an RGBA image laid
    over ``color`` by its alpha, upright by its EXIF orientation; None for another mode (A1111 converts those to
    RGB, dropping any transparency, as sdengine does)."""
    if image.mode != "RGBA":
        return None
    image = ImageOps.exif_transpose(image)
    out = Image.new("RGBA", image.size, color)
    out.paste(image, mask=image)
    return out.convert("RGB")


def check_sampler_option(name: str, value: Any) -> Any:
    """One of SAMPLER_OPTIONS, checked (a BadRequest, one line)."""
    from sdengine.diffusion.samplers import UNIPC_VARIANTS
    from sdengine.server.requests import OPTION_LIMITS

    if name == "uni_pc_variant":
        if value not in UNIPC_VARIANTS:
            raise BadRequest(
                f"uni_pc_variant {value!r}: sdengine's UniPC has {' and '.join(UNIPC_VARIANTS)} (A1111's vary_coeff "
                "is not implemented)"
            )
        return value
    if name == "uni_pc_order":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or value not in (1, 2, 3):
            raise BadRequest(f"uni_pc_order {value!r}: sdengine's UniPC takes order 1, 2 or 3")
        return value
    lo, hi = OPTION_LIMITS["eta" if name.startswith("eta_") else name]
    number = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if not number or not lo <= value <= hi:
        raise BadRequest(f"{name} must be a number in [{lo:g}, {hi:g}], got {value!r}")
    return float(value)


def eta_option(
    body: dict[str, Any], sampler: Any, schedule: Any, ignored: list[str], notes: list[str] | None = None
) -> dict[str, float] | None:
    """A1111's ``eta``, ``s_churn``, ``s_tmin``, ``s_tmax`` (0: no upper bound, as A1111) and ``s_noise`` as the
    sampler's options where the sampler takes them (eta: its ancestral and SDE samplers, DDIM; the others as
    A1111's ``sampler_extra_params``); with a sampler that has none it changes nothing in A1111 either (said in
    ``notes`` for the s_* fields). With the hires fix, a second-pass sampler without one makes it listed as
    ignored (sdengine gives both passes the same options)."""
    from sdengine.server.requests import OPTION_LIMITS

    wanted: dict[str, float] = {}
    for key, neutral in SAMPLER_FIELDS.items():
        v = body.get(key)
        if v is None:
            continue
        lo, hi = OPTION_LIMITS[key]
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not lo <= v <= hi:
            raise BadRequest(f"{key} must be a number in [{lo:g}, {hi:g}], got {v!r}")
        if v != neutral:
            wanted[key] = float(v)
    if not wanted:
        return None
    try:
        name, _ = sampling.resolve(sampler, schedule)
    except (ValueError, TypeError):
        return None  # the build names the bad sampler
    takes = set(sampling.sampler_option_names(name))
    defaults = {p.name: p.default for p in inspect.signature(sampling.SAMPLERS[name].fn).parameters.values()}
    hr_takes = None
    hr = body.get("hr_sampler_name")
    if body.get("enable_hr") and hr not in SAME_SAMPLER:
        try:
            hr_name, _ = sampling.resolve(hr, None)
        except (ValueError, TypeError):
            return None
        hr_takes = set(sampling.sampler_option_names(hr_name))
    out = {}
    for key, v in wanted.items():
        if key not in takes:
            if key != "eta" and notes is not None:
                notes.append(f"{key}: the sampler {sampling.SAMPLERS[name].a1111} does not use it (nor does A1111's)")
        elif v == defaults.get(key):  # the sampler's own default (webuiapi's eta 1.0) changes nothing: as A1111,
            continue  # not written in the infotext then
        elif hr_takes is not None and key not in hr_takes:
            ignored.append(key)
        else:
            out[key] = v
    return out or None


def sampler_settings(
    body: dict[str, Any],
    settings: dict[str, Any],
    sampler: Any,
    schedule: Any,
    ignored: list[str],
    notes: list[str] | None = None,
) -> dict[str, Any] | None:
    """:func:`eta_option` of the request's sampler fields, each taken from A1111's options ``settings``
    (SAMPLER_OPTIONS' values: the server's, or the request's override_settings) where the request gives none, as
    A1111 does (``eta``: ``eta_ddim`` for DDIM, else ``eta_ancestral``); with UniPC, ``uni_pc_variant`` and
    ``uni_pc_order`` (A1111's defaults bh1 and 3) as its ``variant`` and ``order`` where not sdengine's UniPC's own
    (bh2 of order 2)."""
    try:
        name, _ = sampling.resolve(sampler, schedule)
    except (ValueError, TypeError):
        name = None  # the build names the bad sampler
    filled = dict(body)
    for key in ("s_churn", "s_tmin", "s_tmax", "s_noise"):
        if body.get(key) is None:
            filled[key] = settings[key]
    if body.get("eta") is None:
        filled["eta"] = settings["eta_ddim" if name == "ddim" else "eta_ancestral"]
    out = dict(eta_option(filled, sampler, schedule, ignored, notes) or {})
    if name == "unipc":
        hr = body.get("hr_sampler_name")
        hr_name = None
        if body.get("enable_hr") and hr not in SAME_SAMPLER:
            try:
                hr_name, _ = sampling.resolve(hr, None)
            except (ValueError, TypeError):
                return out or None  # the build names the bad sampler
        for key, option in (("variant", "uni_pc_variant"), ("order", "uni_pc_order")):
            if settings[option] == UNIPC_OWN[option]:
                continue
            if hr_name not in (None, "unipc"):  # sdengine gives both passes the same options: the second has none
                ignored.append(option)
            else:
                out[key] = settings[option]
    return out or None


USED = {
    "prompt",
    "negative_prompt",
    "seed",
    "sampler_name",
    "sampler_index",
    "scheduler",
    "batch_size",
    "n_iter",
    "steps",
    "cfg_scale",
    "width",
    "height",
    "override_settings",
    "alwayson_scripts",
    "init_images",
    "mask",
    "mask_blur",
    "mask_blur_x",
    "mask_blur_y",
    "inpainting_mask_invert",
    "model",
    "subseed",
    "subseed_strength",
    "resize_mode",
    "disable_extra_networks",
    "eta",
    "styles",
    "s_churn",
    "s_tmin",
    "s_tmax",
    "s_noise",
    "tiling",
    "seed_resize_from_w",  # A1111's "Resize seed from": both above 0, else it does nothing (there too)
    "seed_resize_from_h",
    "distilled_cfg_scale",  # Forge's: FLUX.1 [dev]'s distilled guidance
    "forge_additional_modules",  # Forge's: an SD3 / Flux file's text encoders and VAE (server.dit_parts)
    "shift",  # sdengine's (as its native job's): SD3's time shift
    "sd3",  # sdengine's (as its native job's): SD3's skip-layer guidance
    # sdengine's (as its native job's; A1111 / Forge have no such request field): FLUX.1 Kontext's reference
    # images and FLUX.1 Depth / Canny's control map, base64 images (kontext_fields)
    "reference_images",
    "reference_auto_resize",
    "control_image",
    "control_preprocessor",
    "redux",  # sdengine's (as its native job's): FLUX.1 Redux units {model, image, siglip, strength}
}


def kontext_fields(body: dict[str, Any]) -> dict[str, Any]:
    """The top-level ``reference_images`` (a list of base64 images: FLUX.1 Kontext's references),
    ``reference_auto_resize``, ``control_image`` (one base64 image: FLUX.1 Depth / Canny's map) and
    ``control_preprocessor`` (what makes that image the map: "canny" from a photo) of an A1111 request, checked
    for their types (the build decodes them; the precheck checks them against the model): the native job's
    fields under the same names, which A1111 and Forge do not have. An empty list is none."""
    out: dict[str, Any] = {}
    refs = body.get("reference_images")
    if refs is not None:
        if not isinstance(refs, list) or not all(isinstance(r, str) and r for r in refs):
            raise BadRequest("reference_images must be a list of base64 images (FLUX.1 Kontext's references)")
        if refs:
            out["reference_images"] = refs
    resize = body.get("reference_auto_resize")
    if resize is not None:
        if not isinstance(resize, bool):
            raise BadRequest(f"reference_auto_resize must be true or false, got {resize!r}")
        out["reference_auto_resize"] = resize
    control = body.get("control_image")
    if control is not None:
        if not isinstance(control, str) or not control:
            raise BadRequest("control_image must be one base64 image (FLUX.1 Depth / Canny's control map)")
        out["control_image"] = control
    preprocessor = body.get("control_preprocessor")
    if preprocessor is not None:  # the name is checked by the build (GenerationRequest.validate)
        if not isinstance(preprocessor, str):
            raise BadRequest(f"control_preprocessor must be a name (none, canny), got {preprocessor!r}")
        out["control_preprocessor"] = preprocessor.strip().lower() or "none"
    redux = body.get("redux")
    if redux:  # FLUX.1 Redux: the native job's units (their images base64; checked again by the build)
        from sdengine.server.redux import parse_units

        out["redux"] = parse_units(redux)
    return out


FLOW_FAMILIES = (
    "sd3",
    "flux",
    "chroma",
    "qwen_image",
    "z_image",
    "flux2",
)  # the families whose A1111 requests run diffusers' step rules (flow_fields)
A1111_CFG = 7.0  # A1111's cfg_scale default (Txt2ImgRequest's), which its clients send whatever the model
LATENT_FILLS = {2: "latent noise", 3: "latent nothing"}  # A1111's inpainting_fill -> masked_content
IMG2IMG_USED = {"initial_noise_multiplier", "image_cfg_scale"}  # A1111's img2img fields that its txt2img does not have
TXT2IMG_USED = {"firstphase_width", "firstphase_height"}  # A1111's txt2img fields that its img2img does not have
EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")  # A1111's extra-network tag (<lora:...>, <hypernet:...>)
# The unit keys read above, and the extension's keys that do not change the image.
UNIT_KEYS = {
    *("enabled", "image", "input_image", "mask", "mask_image", "module", "model", "weight", "resize_mode"),
    *("processor_res", "threshold_a", "threshold_b", "guidance_start", "guidance_end", "control_mode"),
    *("pixel_perfect", "hr_option", "low_vram", "save_detected_map", "input_mode", "is_ui", "output_dir"),
    *("use_preview_as_input", "generated_image", "batch_images", "batch_image_dir", "batch_mask_dir", "loopback"),
    *("union_control_type", "inpaint_crop_input_image"),
}
# The extension's ControlNetUnionControlType values (its unit's union_control_type; "Unknown": none), in its order:
# a value's place is the type number a Union ControlNet's mode embedding reads (ComfyUI's SetUnionControlNetType
# numbers alike). A Flux Union ControlNet of InstantX / Shakker-Labs reads that number in its own order (canny 0,
# tile 1, depth 2, ...: sdengine.pipeline.dit_control.UNION_MODES); an integer is taken as the number itself.
UNION_CONTROL_TYPES = ("OpenPose", "Depth", "Soft Edge", "Hard Edge", "Normal Map", "Segmentation", "Tile", "Inpaint")
CONTROL_MODES = {0: "Balanced", 1: "My prompt is more important", 2: "ControlNet is more important"}
UNIT_MODES = dict(zip(CONTROL_MODES.values(), ("balanced", "prompt", "controlnet"), strict=True))  # -> ControlUnit.mode
PIXEL_PERFECT = 0  # processor_res of a pixel-perfect unit: worked out from its image's size (pixel_perfect_resolution)
RESIZE_MODES = {0: "Just Resize", 1: "Crop and Resize", 2: "Resize and Fill"}
LATENT_UPSCALE_MODE = 3  # A1111's img2img "Just resize (latent upscale)": GenerationRequest.init_latent_resize
MODULES = CONTROLNET_MODULES  # the extension's module names sdengine has (sdengine.metadata)


class Txt2ImgRequest(BaseModel):
    """A1111's StableDiffusionTxt2ImgProcessingAPI (the fields sdengine reads; the others are refused where they
    would change the image, :func:`refuse_unsupported`, else listed as ignored in the response's info)."""

    model_config = ConfigDict(extra="allow")
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    eta: float | None = None
    denoising_strength: float | None = None
    override_settings: dict[str, Any] | None = None
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    force_task_id: str | None = None
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    styles: list[str] = Field(default_factory=list)  # names in the server's --styles-file (A1111's styles.csv)

    @model_validator(mode="before")
    @classmethod
    def nulls_are_unset(cls, data: Any) -> Any:
        """A field sent as null is one not sent (A1111's request models make every field optional, and clients
        made from its OpenAPI document send null for those they leave out)."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] | None = None
    mask: str | None = None
    mask_blur: float | None = None
    inpainting_mask_invert: int = 0
    inpainting_fill: int = 0
    resize_mode: int = 0
    include_init_images: bool = False


class InterruptRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    id_task: str | None = None


class ProgressRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    id_task: str | None = None
    id_live_preview: int = -1
    live_preview: bool = True


class PngInfoRequest(BaseModel):
    image: str = ""


class ExtrasRequest(BaseModel):
    """A1111's ExtrasSingleImageRequest (its names and defaults)."""

    model_config = ConfigDict(extra="allow")
    image: str = ""
    resize_mode: int = 0
    show_extras_results: bool = True
    gfpgan_visibility: float = 0.0
    codeformer_visibility: float = 0.0
    codeformer_weight: float = 0.0
    upscaling_resize: float = 2.0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str | None = "None"
    upscaler_2: str | None = "None"
    extras_upscaler_2_visibility: float = 0.0
    upscale_first: bool = False


class DetectRequest(BaseModel):
    """The ControlNet extension's ``/controlnet/detect`` body (its names and defaults)."""

    model_config = ConfigDict(extra="allow")
    controlnet_module: str = "none"
    controlnet_input_images: list[str] = Field(default_factory=list)
    controlnet_images: list[str] = Field(default_factory=list)  # what webuiapi's controlnet_detect sends instead
    controlnet_processor_res: int = 512
    controlnet_threshold_a: float = 64
    controlnet_threshold_b: float = 64
    low_vram: bool = False  # changes no map


class ExtrasBatchRequest(ExtrasRequest):
    """A1111's ExtrasBatchImagesRequest: ``imageList`` of ``{data, name}`` instead of ``image``."""

    imageList: list[dict[str, Any]] = Field(default_factory=list)  # noqa: N815 - A1111's name


# The upscalers sdengine has as pixel upscalers (A1111's "None" and "Lanczos"; what the hires fix accepts too); the
# upscaler models of --upscalers-dir come after them.
EXTRAS_UPSCALERS = ("None", "Lanczos")


def lanczos_upscale(image: Image.Image, scale: float) -> Image.Image:
    """A1111's ``Upscaler.upscale`` with its Lanczos upscaler: the image resized by ``scale`` (each side
    ``int(side * scale)``), then, where that is not it, to the size rounded down to a multiple of 8. A scale
    other than 1 on an image already at least that size goes to the rounded size at once."""
    dest = (int((image.width * scale) // 8 * 8), int((image.height * scale) // 8 * 8))
    if min(dest) < 8:
        raise BadRequest(f"upscaling {image.width}x{image.height} by {scale:g} gives under 8 pixels a side")
    if scale == 1 or image.width < dest[0] or image.height < dest[1]:
        image = image.resize((int(image.width * scale), int(image.height * scale)), Image.Resampling.LANCZOS)
    if image.size != dest:
        image = image.resize(dest, Image.Resampling.LANCZOS)
    return image


def extras_upscale(
    image: Image.Image, req: ExtrasRequest, max_pixels: int = 4096 * 4096, catalog: Any = None
) -> tuple[Image.Image, dict[str, Any]]:
    """A1111's extras upscale (``scripts/postprocessing_upscale.py``) with the Lanczos and None upscalers and the
    upscaler models of ``--upscalers-dir`` (``catalog``): ``resize_mode`` 0 scales by ``upscaling_resize``, 1 by
    what covers ``upscaling_resize_w`` x ``_h``, then (with ``upscaling_crop``) the centre of that size is cut (on
    black where the rounding to 8 fell short, as A1111 pastes it); upscaler "None" leaves the image as it is; an
    ``upscaler_2`` with a visibility above 0 is blended over the first's result as A1111 blends it. Face
    restoration is not available: a visibility above 0 is refused."""
    faces = (("gfpgan_visibility", req.gfpgan_visibility), ("codeformer_visibility", req.codeformer_visibility))
    for label, v in faces:
        if v:
            raise BadRequest(f"{label} {v:g}: face restoration is not available in sdengine (send 0)")
    names = {u.lower(): u for u in EXTRAS_UPSCALERS}
    chosen: list[tuple[str, Any]] = []  # (name, model file or None)
    for what, name in (("upscaler_1", req.upscaler_1), ("upscaler_2", req.upscaler_2)):
        text = str(name if name is not None else "None").strip()
        found = names.get(text.lower())
        if found is not None:
            chosen.append((found, None))
            continue
        models = catalog.upscalers() if catalog is not None else []
        if not models:
            raise BadRequest(
                f"{what} {name!r} is not available; sdengine has: {', '.join(EXTRAS_UPSCALERS)} (and the upscaler "
                "models of serve --upscalers-dir, which has none)"
            )
        try:
            chosen.append(catalog.resolve_upscaler(text))
        except BadRequest as e:
            raise BadRequest(f"{what}: {e} (or {', '.join(EXTRAS_UPSCALERS)})") from None
    if req.resize_mode not in (0, 1):
        raise BadRequest(f"resize_mode must be 0 (scale by upscaling_resize) or 1 (to a size), got {req.resize_mode}")
    if not 0.0 <= req.extras_upscaler_2_visibility <= 1.0:
        raise BadRequest("extras_upscaler_2_visibility must be in [0, 1]")
    image = image.convert("RGB")
    info: dict[str, Any] = {}
    if chosen[0][0] == "None":  # A1111 upscales nothing without a first upscaler
        return image, info
    w, h = req.upscaling_resize_w, req.upscaling_resize_h
    if req.resize_mode == 1:
        if w < 1 or h < 1:
            raise BadRequest("upscaling_resize_w and upscaling_resize_h must be >= 1")
        scale = max(w / image.width, h / image.height)
        info["Postprocess upscale to"] = f"{w}x{h}"
    else:
        scale = req.upscaling_resize
        if not math.isfinite(scale) or scale <= 0:
            raise BadRequest(f"upscaling_resize must be > 0, got {scale!r}")
        info["Postprocess upscale by"] = scale
    if max(image.width, image.height) * scale > 8192 or image.width * image.height * scale * scale > max_pixels:
        raise BadRequest(
            f"upscaling {image.width}x{image.height} by {scale:g} is over the limit of 8192 pixels a side and "
            f"{max_pixels} pixels"
        )

    def upscaled(model_file: Any) -> Image.Image:
        if model_file is None:
            out = lanczos_upscale(image, scale)
        else:
            from sdengine.models.esrgan import upscale_image
            from sdengine.weights.upscaler_file import load_upscaler

            if min(int(image.width * scale) // 8, int(image.height * scale) // 8) < 1:
                raise BadRequest(f"upscaling {image.width}x{image.height} by {scale:g} gives under 8 pixels a side")
            out = upscale_image(load_upscaler(model_file), image, scale)
        if req.resize_mode == 1 and req.upscaling_crop:
            cut = Image.new("RGB", (w, h))
            cut.paste(out, (w // 2 - out.width // 2, h // 2 - out.height // 2))
            out = cut
        return out

    out = upscaled(chosen[0][1])
    if req.resize_mode == 1 and req.upscaling_crop:
        info["Postprocess crop to"] = f"{w}x{h}"
    info["Postprocess upscaler"] = chosen[0][0]
    if chosen[1][0] != "None" and req.extras_upscaler_2_visibility > 0:
        # A1111 blends in the same upscale and cut made by upscaler_2 (Lanczos again is the same image)
        if chosen[1] != chosen[0]:
            out = Image.blend(out, upscaled(chosen[1][1]), req.extras_upscaler_2_visibility)
        info["Postprocess upscaler 2"] = chosen[1][0]
    return out, info


def _b64_png(image: Image.Image, text: str | None = None) -> str:
    """PNG as base64, with the infotext in its ``parameters`` chunk (as A1111's API returns images)."""
    from PIL import PngImagePlugin

    info = None
    if text:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", text)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode()


def a1111_mask(image: Image.Image, rounded: bool = True) -> Image.Image:
    """An inpainting mask as A1111 reads it (its ``create_binary_mask``): the alpha channel of an RGBA mask that is
    not wholly opaque, made binary (above 128 = 255) unless ``rounded`` is False (A1111's ``mask_round`` off, as
    its soft inpainting sets it); any other mask (L, RGB, an opaque RGBA one, LA, P, ...) made grey (PIL's ``L``)
    and kept grey, white = repaint: its grey levels weight the overlay and the "fill", and the latent mask is
    rounded from them (A1111's ``np.around``, done by the pipeline)."""
    if image.mode == "RGBA" and image.getextrema()[-1] != (255, 255):
        alpha = image.getchannel("A")
        return alpha.point(lambda v: 255 if v > 128 else 0) if rounded else alpha
    return image.convert("L")


def _mask_blur(body: dict[str, Any]) -> tuple[float, float]:
    """A1111's mask blur (``mask_blur_x``, ``mask_blur_y``): ``mask_blur`` for both, else the separate ones (4 each
    by default). Each a number in [0, 256], the native route's range (a blur of 1e9 once reached OpenCV, whose
    refusal was a 500)."""
    if body.get("mask_blur") is not None:
        pairs = [("mask_blur", body["mask_blur"])] * 2
    else:
        pairs = [(f"mask_blur_{a}", 4 if body.get(f"mask_blur_{a}") is None else body[f"mask_blur_{a}"]) for a in "xy"]
    out = []
    for name, value in pairs:
        try:
            blur = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError, OverflowError):
            blur = math.nan
        if not 0.0 <= blur <= 256.0:  # NaN too
            raise BadRequest(f"{name} must be a number in [0, 256], got {str(value)[:40]!r}")
        out.append(blur)
    return out[0], out[1]


Blur = float | tuple[float, float]


def blurred_mask(mask: Image.Image, blur: Blur) -> Image.Image:
    """The mask blurred as A1111 blurs it (``blur``: one sigma, or A1111's ``(mask_blur_x, mask_blur_y)``): a
    Gaussian across, then one down, each of its kernel size and skipped at 0, 8 bits after each."""
    m = mask.convert("L")
    bx, by = (blur, blur) if isinstance(blur, int | float) else blur
    if bx <= 0 and by <= 0:
        return m
    from sdengine.pipeline.latents import blur_mask

    return Image.fromarray(blur_mask(np.asarray(m), float(bx), float(by)))


def overlay_finish(
    init: Image.Image, mask: Image.Image, blur: Blur, mode: str = "just resize"
) -> Callable[[Image.Image], Image.Image]:
    """A1111's inpainting overlay ("whole picture"): the init image (fitted to the result in the resize ``mode``,
    as the pipeline fits it) outside the mask, the generated image inside, weighted by the blurred mask (blurred
    at the mask's own size, fitted like the image) doubled and clipped, as A1111's ``mask_for_overlay``; a
    generated image is never changed where nothing was to be repainted."""
    soft = blurred_mask(mask, blur)

    def finish(image: Image.Image) -> Image.Image:
        base = resize_image(init.convert("RGB"), *image.size, mode)
        m = resize_image(soft, *image.size, mode).point(lambda v: min(255, 2 * v))
        return laid_over(image, base, m)

    return finish


def laid_over(image: Image.Image, base: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's overlay (its ``overlay_images`` and ``apply_overlay``): ``base`` (the init image) made RGBA with
    the inverted ``mask`` (its ``mask_for_overlay``) as alpha and premultiplied (PIL's ``RGBa``), laid by PIL's
    ``alpha_composite`` over ``image`` (the generated one): 8-bit steps that land up to 1 away from a plain
    ``Image.composite`` where the mask is grey."""
    keep = Image.new("RGBa", base.size)
    keep.paste(base.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    out = image.convert("RGBA")
    out.alpha_composite(keep.convert("RGBA"))
    return out.convert("RGB")


def soft_overlay(
    init: Image.Image, mode: str, region: tuple[int, int, int, int] | None = None
) -> Callable[[Image.Image, Image.Image], Image.Image]:
    """A1111's soft inpainting overlay (its script's ``postprocess_maskoverlay``): the generated image laid over the
    init image (before any "fill"; fitted to the result in the resize ``mode``) by the pipeline's composite mask
    of the image (255 = generated), in place of the blurred mask's overlay. "Only masked" (``region``, the box
    cut from the whole init image): the image and its mask fitted into the box ("crop and resize", A1111's
    ``uncrop``), the init image outside it. PIL's 8-bit composite."""
    base = init.convert("RGB")

    def finish(image: Image.Image, mask: Image.Image) -> Image.Image:
        if region is None:
            under = resize_image(base, *image.size, mode)
            return Image.composite(image.convert("RGB"), under, mask.convert("L"))
        x1, y1, x2, y2 = region
        canvas, full = base.copy(), Image.new("L", base.size, 0)
        canvas.paste(resize_image(image.convert("RGB"), x2 - x1, y2 - y1, "crop and resize"), (x1, y1))
        full.paste(resize_image(mask.convert("L"), x2 - x1, y2 - y1, "crop and resize"), (x1, y1))
        return Image.composite(canvas, base, full)

    return finish


FILL_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))  # (blur radius, times laid on), A1111's


def masked_fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill" masked content (``inpainting_fill`` 0): the masked area painted with the colours around
    it, by laying ever less blurred copies of the unmasked image (its alpha the mask's inverse, premultiplied)
    over each other; unmasked pixels stay as they are."""
    keep = image.convert("RGBA")
    keep.putalpha(ImageOps.invert(mask.convert("L")))
    keep = keep.convert("RGBa")
    out = Image.new("RGBA", image.size)
    for radius, times in FILL_PASSES:
        layer = keep.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(times):
            out.alpha_composite(layer)
    return out.convert("RGB")


def expand_region(
    box: tuple[int, int, int, int], width: int, height: int, bound: tuple[int, int]
) -> tuple[int, int, int, int]:
    """A1111's ``expand_crop_region``: the box grown on its short side (evenly, the odd pixel after) to the
    aspect ratio of ``width`` x ``height``, shifted back inside the image ``bound`` and cut to it."""
    lo = list(box[:2])
    hi = list(box[2:])
    wide = (hi[0] - lo[0]) / (hi[1] - lo[1]) > width / height
    axis = 1 if wide else 0  # the side to grow
    want = (hi[0] - lo[0]) / (width / height) if wide else (hi[1] - lo[1]) * (width / height)
    grow = int(want - (hi[axis] - lo[axis]))
    lo[axis] -= grow // 2
    hi[axis] += grow - grow // 2
    if hi[axis] >= bound[axis]:
        over = hi[axis] - bound[axis]
        lo[axis], hi[axis] = lo[axis] - over, hi[axis] - over
    if lo[axis] < 0:
        lo[axis], hi[axis] = 0, hi[axis] - lo[axis]
    hi[axis] = min(hi[axis], bound[axis])
    return (lo[0], lo[1], hi[0], hi[1])


@dataclasses.dataclass(frozen=True)
class OnlyMasked:
    """The plan of A1111's "Only masked" inpainting: the pipeline's init image (``cut``: filled under the mask
    with "fill") and mask, the box cut from the init image (``region``, on an image of ``base_size``), the cut
    before any fill (``plain``: what a ControlNet unit without an image of its own takes) and ``finish``, which
    lays a result back over the init image."""

    cut: Image.Image
    mask: Image.Image
    region: tuple[int, int, int, int]
    base_size: tuple[int, int]
    plain: Image.Image
    finish: Callable[[Image.Image], Image.Image]

    def crop(self, image: Image.Image, mode: str) -> Image.Image:
        """sd-webui-controlnet's crop of a unit's image (or mask) in "Only masked" inpainting (its
        ``inpaint_crop_input_image``, on by default): fitted to the init image's size in resize ``mode``, the
        plan's box cut out and fitted to the output's size ("resize and fill"), as the init image is."""
        fitted = resize_image(image, *self.base_size, mode)
        return resize_image(fitted.crop(self.region), *self.cut.size, "resize and fill")


def only_masked(
    init: Image.Image,
    mask: Image.Image,
    blur: Blur,
    padding: int,
    size: tuple[int, int],
    fill: bool,
    fill_mask: Image.Image | None = None,
) -> OnlyMasked | None:
    """A1111's "Only masked" inpainting (``inpaint_full_res``): the box around the blurred mask (plus
    ``padding``, grown to the output's aspect ratio) is cut from the init image and the mask and fitted to
    ``size`` ("resize and fill"); the result is fitted back into the box ("crop and resize") and laid over the
    init image by the blurred mask. ``fill_mask``: what the cut is filled under in place of the cut mask (A1111's
    ``latent_mask``, used uncut, at ``size``). Returns the plan (:class:`OnlyMasked`), None for an empty mask."""
    base = init.convert("RGB")
    if mask.size != base.size:
        mask = mask.convert("L").resize(base.size, Image.Resampling.NEAREST)
    soft = blurred_mask(mask, blur)
    box = soft.getbbox()
    if box is None:
        return None
    if padding:
        box = (max(box[0] - padding, 0), max(box[1] - padding, 0), min(box[2] + padding, base.width),
               min(box[3] + padding, base.height))  # fmt: skip
    region = expand_region(box, size[0], size[1], base.size)
    plain = resize_image(base.crop(region), *size, "resize and fill")
    cut_mask = resize_image(soft.crop(region), *size, "resize and fill")
    cut = masked_fill(plain, cut_mask if fill_mask is None else fill_mask) if fill else plain
    x1, y1, x2, y2 = region

    def finish(image: Image.Image) -> Image.Image:
        canvas = base.copy()  # A1111's is transparent outside the box, where the overlay is wholly the init image
        canvas.paste(resize_image(image.convert("RGB"), x2 - x1, y2 - y1, "crop and resize"), (x1, y1))
        return laid_over(canvas, base, soft)

    return OnlyMasked(cut, cut_mask, region, base.size, plain, finish)


SIZE_VALUE = re.compile(r"^(\d+)x(\d+)$")


def a1111_fields(parsed: dict[str, Any]) -> dict[str, Any]:
    """Infotext fields as A1111's ``parse_generation_parameters`` answers them: a ``WxH`` value (``Size``,
    ``Hires resize``) as ``NAME-1`` and ``NAME-2``, and the defaults it fills in for ``Clip skip`` ("1") and
    ``Hires resize`` (0, 0)."""
    out: dict[str, Any] = {}
    for k, v in parsed.items():
        m = SIZE_VALUE.match(v) if isinstance(v, str) else None
        if m:
            out[f"{k}-1"], out[f"{k}-2"] = m.group(1), m.group(2)
        else:
            out[k] = v
    out.setdefault("Clip skip", "1")
    if "Hires resize-1" not in out:
        out["Hires resize-1"] = out["Hires resize-2"] = 0
    return out


# A1111's SDXL options (its "Stable Diffusion XL" settings) and their defaults: the crop micro-conditioning of
# every SDXL model, and the refiner's aesthetic scores (positive prompt, negative prompt)
SDXL_OPTIONS: dict[str, float] = {
    "sdxl_crop_top": 0,
    "sdxl_crop_left": 0,
    "sdxl_refiner_high_aesthetic_score": 6.0,
    "sdxl_refiner_low_aesthetic_score": 2.5,
}


def sdxl_option(name: str, value: Any) -> float:
    """One of SDXL_OPTIONS, checked (a BadRequest, one line)."""
    if name.startswith("sdxl_crop"):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 16384:
            raise BadRequest(f"{name} must be an integer in 0..16384, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 10:
        raise BadRequest(f"{name} must be a number in [0, 10], got {value!r}")
    return float(value)


def sdxl_settings(xl: dict[str, float]) -> dict[str, Any]:
    """The pipeline's ``sdxl`` settings for A1111's SDXL options. A1111 conditions the negative prompt on the same
    crop (the refiner's too), and zeroes an empty negative prompt on every SDXL model, the refiner too
    (``force_zero_negative_prompt`` in its sd_models_xl.py, where a refiner folder's model_index.json says not to):
    always ``force_zeros_for_empty_prompt``. The worker gives them to an SDXL model only (the scores to a refiner
    only, the zero rule where it changes something): other models have no use for these global options, as in
    A1111."""
    out: dict[str, Any] = {"force_zeros_for_empty_prompt": True}
    if xl["sdxl_crop_top"] or xl["sdxl_crop_left"]:
        out["crops_coords_top_left"] = [int(xl["sdxl_crop_top"]), int(xl["sdxl_crop_left"])]
        # the negative prompt's too, on the refiner as well (whose own default is (0, 0), diffusers')
        out["negative_crops_coords_top_left"] = out["crops_coords_top_left"]
    if xl["sdxl_refiner_high_aesthetic_score"] != 6.0:
        out["aesthetic_score"] = float(xl["sdxl_refiner_high_aesthetic_score"])
    if xl["sdxl_refiner_low_aesthetic_score"] != 2.5:
        out["negative_aesthetic_score"] = float(xl["sdxl_refiner_low_aesthetic_score"])
    return out


def infotext_sdxl(value: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """An infotext's "SDXL options" (sdengine's field, ``metadata.to_generate_kwargs``' ``sdxl``) on an A1111 route:
    (A1111's SDXL options for its crop and refiner scores, the settings A1111 has no option for). The negative
    crop equal to the crop is the option's (:func:`sdxl_settings`), an empty negative zeroed A1111's rule; a crop
    without a negative crop (an image of the native route) keeps the model's default negative crop (None)."""
    if not value:
        return {}, {}
    from sdengine.text.sdxl_conditioner import SDXLOptions

    try:
        rest = SDXLOptions.coerce(value).changed()
    except SdengineError as e:
        raise BadRequest(f"infotext: SDXL options: {e}") from None
    crop = rest.pop("crops_coords_top_left", [0, 0])
    out: dict[str, Any] = {"sdxl_crop_top": crop[0], "sdxl_crop_left": crop[1]}
    out["sdxl_refiner_high_aesthetic_score"] = rest.pop("aesthetic_score", 6.0)
    out["sdxl_refiner_low_aesthetic_score"] = rest.pop("negative_aesthetic_score", 2.5)
    if rest.get("negative_crops_coords_top_left") == crop:
        rest.pop("negative_crops_coords_top_left")
    elif "negative_crops_coords_top_left" not in rest and crop != [0, 0]:
        rest["negative_crops_coords_top_left"] = None
    if rest.get("force_zeros_for_empty_prompt") is True:
        rest.pop("force_zeros_for_empty_prompt")
    return out, rest


SAME_CHECKPOINT = (None, "", "Use same checkpoint")  # A1111's hr_checkpoint_name for "the first pass's model"


def refuse_unsupported(body: dict[str, Any], txt2img: bool) -> None:
    """A1111 request fields that would change the image but that sdengine cannot run: a 422 naming the field (one
    line) when set to another value than the one that does nothing, never a silently other image. Where A1111
    itself does not read the field (``latent_mask`` without a ``mask``, ``firstpass_image`` without the hires
    fix), it is only listed as ignored (:func:`_ignored`). ``hr_checkpoint_name`` is the txt2img route's
    (``same_checkpoint``: it needs the catalog)."""

    def refuse(field: str, why: str) -> None:
        raise Unprocessable(f"{field} {body.get(field)!r}: {why}")

    faces = "face restoration (GFPGAN, CodeFormer) is not available in sdengine"
    if body.get("restore_faces") not in (None, False):
        # a stock A1111 has GFPGAN and CodeFormer (their weights downloaded on first use): a restored image
        refuse("restore_faces", f"{faces}; send false")
    over = body.get("override_settings") or {}
    if body.get("restore_faces") is None and isinstance(over, dict) and over.get("face_restoration"):
        # A1111's restore_faces None reads its face_restoration option (an override, or an infotext's
        # "Face restoration"): restore_faces false runs without it
        raise Unprocessable(
            f"override_settings.face_restoration (or an infotext's Face restoration): {faces}; send restore_faces "
            "false to run without it"
        )
    if body.get("s_min_uncond") not in (None, 0, 0.0):
        refuse("s_min_uncond", "A1111's negative guidance minimum sigma is not implemented in sdengine; send 0")
    if txt2img and body.get("enable_hr") and body.get("firstpass_image") not in (None, ""):
        raise Unprocessable(
            "firstpass_image: the hires fix of a given first-pass image is not implemented in sdengine (A1111's "
            "API passes it on undecoded); send none"
        )
    if txt2img:
        return
    mode = body.get("resize_mode", 0)
    mask = body.get("mask") not in (None, "")
    if isinstance(mode, bool) or mode not in (*RESIZE_MODES, LATENT_UPSCALE_MODE):
        refuse("resize_mode", "A1111's resize modes are 0 (just resize), 1 (crop and resize), 2 (resize and fill) and "
               "3 (just resize, latent upscale)")  # fmt: skip
    if mode == LATENT_UPSCALE_MODE and mask:
        # A1111 fits the mask "resize and fill" and pastes back an overlay of the init image's own size
        refuse("resize_mode", "A1111's latent upscale takes no mask in sdengine (A1111 fits the mask otherwise than "
               "the image); send 0, 1 or 2")  # fmt: skip
    if mask and body.get("latent_mask") not in (None, "") and not isinstance(body.get("latent_mask"), str):
        refuse("latent_mask", "A1111's latent_mask is an image, as base64 (white = repaint)")
    if body.get("mask_round") is not None and not isinstance(body.get("mask_round"), bool):
        refuse("mask_round", "A1111's mask_round is true (the latent mask rounded) or false (left grey)")
    fill = body.get("inpainting_fill", 0)
    if mask and (isinstance(fill, bool) or fill not in (0, 1, 2, 3)):
        refuse(
            "inpainting_fill",
            "A1111's masked content is 0 (fill), 1 (original), 2 (latent noise) or 3 (latent nothing)",
        )
    images = body.get("init_images")
    if isinstance(images, list) and len(images) > 1:
        # A1111 makes a batch of them, row k from init image k: sdengine takes one init image per call
        raise Unprocessable(
            f"init_images: {len(images)} images; sdengine takes one init image per call (A1111 makes a batch of "
            "them): send one, and a call per image"
        )


def sd_upscale_script(overlap: int, upscaler: tuple[str, Path | None], scale: float, n_iter: int) -> Callable[..., Any]:
    """The worker's call for A1111's SD upscale: given the job's pipeline call and its fields (the init image, the
    tile size as width x height, batch_size, the seeds), :func:`sdengine.sd_upscale.sd_upscale` with them."""

    def script(call: Callable[..., Any], **kw: Any) -> Any:
        from sdengine.sd_upscale import sd_upscale

        image, prompt = kw.pop("init_image"), kw.pop("prompt", "")
        width, height, batch = kw.pop("width"), kw.pop("height"), int(kw.pop("batch_size", 1))
        kw.pop("mask", None)
        return sd_upscale(
            call,
            image,
            prompt,
            width=width,
            height=height,
            scale=scale,
            overlap=overlap,
            upscaler=upscaler,
            batch_size=batch,
            n_iter=n_iter,
            **kw,
        )

    return script


def is_sd_upscale(body: dict[str, Any], txt2img: bool = False) -> bool:
    """Whether the request names A1111's "SD upscale" script (an img2img script; its title matched case-blind)."""
    script = body.get("script_name")
    return not txt2img and isinstance(script, str) and script.strip().lower() == SD_UPSCALE_TITLE.lower()


def sd_upscale_args(body: dict[str, Any], upscaler_names: list[str]) -> tuple[int, str, float]:
    """(overlap, upscaler name, scale factor) of the SD upscale script's ``script_args`` ``[info, overlap,
    upscaler_index, scale_factor]``: the index into ``upscaler_names`` (``/sdapi/v1/upscalers``' list) or a name
    (case-blind, as A1111 takes one too); missing trailing args take the script's defaults (64, the first
    upscaler, 2)."""
    args = body.get("script_args") or []
    if not isinstance(args, list) or len(args) > 4:
        raise BadRequest(
            f"script_args of {SD_UPSCALE_TITLE!r} must be a list [info, overlap, upscaler_index, scale_factor], got "
            f"{repr(args)[:100]}"
        )
    overlap, index, scale = [*args[1:], 64, 0, 2.0][:3] if len(args) > 1 else (64, 0, 2.0)
    if isinstance(overlap, float) and overlap.is_integer():
        overlap = int(overlap)
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap <= 4096:
        raise BadRequest(f"script_args[1] (overlap) must be a whole number of pixels in [0, 4096], got {overlap!r}")
    if isinstance(index, str):
        by_lower = {n.lower(): n for n in upscaler_names}
        if index.strip().lower() not in by_lower:
            raise BadRequest(
                f"script_args[2] (upscaler) {index!r} is not one of /sdapi/v1/upscalers: {', '.join(upscaler_names)}"
            )
        name = by_lower[index.strip().lower()]
    elif isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(upscaler_names):
        raise BadRequest(
            f"script_args[2] (upscaler_index) must be an index into /sdapi/v1/upscalers (0 to "
            f"{len(upscaler_names) - 1}: {', '.join(upscaler_names)}), got {index!r}"
        )
    else:
        name = upscaler_names[index]
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale) or scale <= 0:
        raise BadRequest(f"script_args[3] (scale_factor) must be a number > 0, got {scale!r}")
    return overlap, name, float(scale)


def _ignored(body: dict[str, Any], txt2img: bool = False) -> list[str]:
    script = body.get("script_name")
    # A1111 answers 422 for a script it does not have; sdengine has SD upscale (img2img) only
    if script not in (None, "") and not is_sd_upscale(body, txt2img):
        raise BadRequest(
            f"Script {script!r} not found: sdengine runs {SD_UPSCALE_TITLE!r} (img2img) only of A1111's selectable "
            "scripts (not X/Y/Z plot, prompt matrix, ...)"
        )
    out = []
    hr = bool(body.get("enable_hr"))
    for k, v in body.items():
        if k in USED or (txt2img and (k in TXT2IMG_USED or hr and k in HR_USED)) or (not txt2img and k in IMG2IMG_USED):
            continue
        if k.startswith(HR_FIELDS) and not hr:
            continue
        if k in NEUTRAL:
            neutral = NEUTRAL[k]
            if neutral is None or v in neutral:
                continue
        out.append(k)
    return out


def _unit_control(value: Any, names: dict[Any, str], what: str) -> str:
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int) and value in names:
        return names[value]
    if isinstance(value, str):
        for n in names.values():
            if value.strip().lower() == n.lower():
                return n
    raise BadRequest(f"{what} {value!r}; use one of {', '.join(names.values())} (or 0..{len(names) - 1})")


def processor_resize(image: Image.Image, res: int) -> Image.Image:
    """:func:`sdengine.control.preprocess.processor_resize` (imported when used: the routes load without torch)."""
    from sdengine.control.preprocess import processor_resize as resize

    return resize(image, res)


# Forge's built-in perturbed-attention guidance script (extensions-builtin/sd_forge_perturbed_attention), as its
# alwayson_scripts entry names it (lower case): args [enabled, scale] (early Forge) or [enabled, scale, attenuation,
# start_step, end_step] (later Forge; attenuation in % of the scale, steps as fractions), PAG on every
# self-attention layer of the U-Net's middle block (sdengine's pag_layers "mid") at every step, added after CFG as
# diffusers does. sdengine runs PAG at one scale over all steps: the later layout only with attenuation 0, start 0
# and end 1 (its defaults but start's, which some Forge versions set to 0.15); other values are a 400.
FORGE_PAG_SCRIPTS = ("perturbedattentionguidance integrated", "perturbed attention guidance integrated")


def _forge_number(name: str, i: int, what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadRequest(f"alwayson_scripts.{name}.args[{i}] ({what}) must be a number, got {repr(value)[:100]}")
    return float(value)


def forge_pag_scale(scripts: dict[str, Any]) -> float:
    """The PAG scale of Forge's script in ``alwayson_scripts`` (lower-cased names; the entry is taken out of
    ``scripts``): 0 when absent or not enabled; a one-line 400 for an entry of another shape or settings sdengine
    does not run (an attenuation, a start or end step)."""
    for name in FORGE_PAG_SCRIPTS:
        if name not in scripts:
            continue
        entry = scripts.pop(name)
        args = entry.get("args") if isinstance(entry, dict) else None
        if not isinstance(args, list) or len(args) not in (2, 5):
            raise BadRequest(
                f"alwayson_scripts.{name} must be an object {{args: [enabled, scale]}} or {{args: [enabled, scale, "
                f"attenuation, start_step, end_step]}} (Forge's PAG script), got {repr(entry)[:100]}"
            )
        enabled, scale = args[0], args[1]
        if not isinstance(enabled, bool):
            got = repr(enabled)[:100]
            raise BadRequest(f"alwayson_scripts.{name}.args[0] (enabled) must be true or false, got {got}")
        if not enabled:
            return 0.0
        scale = _forge_number(name, 1, "scale", scale)
        from sdengine.pipeline.request import MAX_PAG_SCALE

        if not 0.0 <= scale <= MAX_PAG_SCALE:
            raise BadRequest(f"alwayson_scripts.{name}.args[1] (scale) must be in [0, {MAX_PAG_SCALE:g}], got {scale}")
        if len(args) == 5:
            attenuation = _forge_number(name, 2, "attenuation", args[2])
            start = _forge_number(name, 3, "start_step", args[3])
            end = _forge_number(name, 4, "end_step", args[4])
            if attenuation != 0 or start != 0 or end != 1:
                raise BadRequest(
                    f"alwayson_scripts.{name}: sdengine runs PAG at one scale over every step; attenuation "
                    f"{attenuation:g}, start_step {start:g}, end_step {end:g} are not supported (use 0, 0, 1)"
                )
        return scale
    return 0.0


# A1111's built-in Soft Inpainting script (extensions-builtin/soft-inpainting, title "Soft Inpainting"), as its
# alwayson_scripts entry names it (lower case): args [enabled, schedule_bias, preservation_strength,
# transition_contrast_boost, mask_influence, difference_threshold, difference_contrast] (sdengine.pipeline.
# soft_inpaint.FIELDS: the defaults and ranges of its sliders). As A1111's API, a shorter args list keeps the later
# arguments as they were: the request's infotext's ("Soft inpainting enabled: True", "Soft inpainting schedule bias",
# ...), else the script's defaults. An img2img inpainting script: txt2img has none (A1111 answers 422), and on
# img2img without a mask it would do nothing, so both are refused when it is sent enabled.
SOFT_INPAINTING_SCRIPT = "soft inpainting"


def soft_inpainting_script(scripts: dict[str, Any], infotext: Any, *, txt2img: bool, mask: bool) -> dict[str, Any]:
    """The job's ``soft_inpainting`` settings (by name; {} when off) from A1111's Soft Inpainting entry in
    ``alwayson_scripts`` (lower-cased names; taken out of ``scripts``) over what the request's ``infotext`` records;
    a one-line 400 naming the argument for a value that is not of the script's type and range, or for the script
    sent enabled where A1111 does not run it (txt2img; img2img without a mask)."""
    from sdengine.metadata import soft_inpainting_kwargs
    from sdengine.pipeline.soft_inpaint import FIELDS

    args: list[Any] = [False, *(d for _, _, d, _, _ in FIELDS)]
    if isinstance(infotext, str) and infotext:
        from sdengine.metadata import parse_parameters

        try:
            recorded = soft_inpainting_kwargs(parse_parameters(infotext))
        except ValueError as e:
            raise BadRequest(f"infotext: {e}") from None
        if recorded is not None:
            args[0] = True
            for i, (name, *_) in enumerate(FIELDS, start=1):
                args[i] = recorded.get(name, args[i])
    shape = "{args: [enabled, schedule_bias, preservation_strength, transition_contrast_boost, mask_influence, "
    shape += "difference_threshold, difference_contrast]} (A1111's Soft Inpainting script)"
    name, given = forge_script_entry(scripts, (SOFT_INPAINTING_SCRIPT,), len(args), shape)
    sent = 0
    if given is not None:
        args[: len(given)], sent = given, len(given)

    def label(i: int) -> str:  # where argument i came from: the request's script entry, else its infotext
        what = "enabled" if i == 0 else FIELDS[i - 1][1].lower()
        return f"alwayson_scripts.{name}.args[{i}] ({what})" if i < sent else f"infotext: Soft inpainting {what}"

    if not isinstance(args[0], bool):
        raise BadRequest(f"{label(0)} must be true or false, got {repr(args[0])[:100]}")
    if not args[0]:
        return {}
    out: dict[str, Any] = {}
    for i, (field, _, _, low, high) in enumerate(FIELDS, start=1):
        v = args[i]
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not low <= v <= high:
            raise BadRequest(f"{label(i)} must be a number in [{low:g}, {high:g}], got {repr(v)[:100]}")
        out[field] = float(v)
    if sent and txt2img:
        raise BadRequest(
            f"alwayson_scripts.{name}: A1111's Soft Inpainting is an img2img inpainting script (txt2img has none); "
            "send it to /sdapi/v1/img2img with a mask"
        )
    if sent and not mask:
        raise BadRequest(f"alwayson_scripts.{name}: soft inpainting needs a mask (this img2img request has none)")
    return out if (mask and not txt2img) else {}


# Forge's built-in FreeU script (extensions-builtin/sd_forge_freeu), as its alwayson_scripts entry names it (lower
# case): "FreeU Integrated" (early Forge) with args [enabled, b1, b2, s1, s2], or "FreeU Integrated (SD 1.x, SD 2.x,
# SDXL)" (later Forge) with [enabled, b1, b2, s1, s2, start_step, end_step] (steps as fractions of the run). Forge
# runs FreeU version 2 where the hidden state is 4x (b1, s1) or 2x (b2, s2) its model_channels: sdengine's
# freeu_version 2, freeu_rule "width". As Forge's API, an args list shorter than the script's keeps the later
# arguments as they were: the request's infotext's (later Forge reads freeu_enabled, freeu_b1 ... freeu_end from
# it), else the script's defaults. sdengine runs FreeU over every step: start_step 0 and end_step 1 only.
FORGE_FREEU_SCRIPTS = ("freeu integrated", "freeu integrated (sd 1.x, sd 2.x, sdxl)")
FORGE_FREEU_ARGS = ("enabled", "b1", "b2", "s1", "s2", "start_step", "end_step")
FORGE_FREEU_DEFAULTS = (False, 1.01, 1.02, 0.99, 0.95, 0.0, 1.0)  # its UI's values


def forge_script_entry(scripts: dict[str, Any], titles: tuple[str, ...], max_args: int, shape: str) -> tuple[str, Any]:
    """The first of a Forge built-in script's ``titles`` found in ``alwayson_scripts`` (lower-cased names), taken out
    of ``scripts``: (its name, its ``args`` list); ("", None) when none is there. ``shape``: the args the script takes
    and its name, for the one-line 400 of an entry that is not ``{args: [...]}`` of at most ``max_args``."""
    for name in titles:
        if name not in scripts:
            continue
        entry = scripts.pop(name)
        given = entry.get("args") if isinstance(entry, dict) else None
        if not isinstance(given, list) or len(given) > max_args:
            raise BadRequest(f"alwayson_scripts.{name} must be an object {shape}, got {repr(entry)[:100]}")
        return name, given
    return "", None


# The forge2_flux_kontext extension's script (DenOfEquity's, the Kontext extension Forge users install), as its
# alwayson_scripts entry names it (lower case): args [enabled, image1, image2, sizing, reduce], the images base64
# (or null), sizing "no change" / "to output" / "to BFL recommended" (its default), reduce a bool.
FORGE_KONTEXT_SCRIPTS = ("forge fluxkontext",)
KONTEXT_SIZINGS = {"to BFL recommended": True, "no change": False}  # -> reference_auto_resize


def forge_kontext(scripts: dict[str, Any], ignored: list[str], notes: list[str] | None) -> dict[str, Any]:
    """The reference images of the forge2_flux_kontext extension's ``alwayson_scripts`` entry (taken out of
    ``scripts``): ``reference_images`` and ``reference_auto_resize`` (sdengine's Kontext), {} when absent or not
    enabled. Its "to BFL recommended" sizing is sdengine's Kontext resolution (the extension centre-crops to it,
    sdengine resizes as diffusers and ComfyUI do: a note says so), "no change" each image's own size (floored to
    the model's multiple; the extension pads the latent); "to output" and "reduce" are one-line 400s."""
    name, args = forge_script_entry(
        scripts, FORGE_KONTEXT_SCRIPTS, 5, "{args: [enabled, image1, image2, sizing, reduce]} (Forge FluxKontext)"
    )
    if args is None:
        return {}
    args = [*args, *[None, None, None, "to BFL recommended", False][len(args) :]]
    enabled, images, sizing, reduce = args[0], args[1:3], args[3], args[4]
    if not isinstance(enabled, bool):
        raise BadRequest(f"alwayson_scripts.{name}.args[0] (enabled) must be true or false, got {repr(enabled)[:100]}")
    refs = [im for im in images if im is not None]
    if not enabled or not refs:  # the extension runs nothing then either
        if enabled or refs:
            ignored.append(f"alwayson_scripts.{name}")
        return {}
    for k, im in enumerate(images):
        if im is not None and not (isinstance(im, str) and im):
            raise BadRequest(f"alwayson_scripts.{name}.args[{k + 1}] (image{k + 1}) must be a base64 image or null")
    if sizing not in KONTEXT_SIZINGS:
        raise BadRequest(
            f"alwayson_scripts.{name}.args[3] (sizing): sdengine runs 'to BFL recommended' (Kontext's resolution) and "
            f"'no change'; got {repr(sizing)[:100]} ('to output' is not supported)"
        )
    if reduce not in (False, None, 0):
        raise BadRequest(f"alwayson_scripts.{name}.args[4] (reduce to half width and height) is not supported")
    if notes is not None and KONTEXT_SIZINGS[sizing]:
        notes.append(
            "Kontext references resized to the Kontext resolution as diffusers and ComfyUI do (the Forge FluxKontext "
            "extension centre-crops to it)"
        )
    return {"reference_images": refs, "reference_auto_resize": KONTEXT_SIZINGS[sizing]}


def infotext_freeu(text: Any) -> tuple[list[Any], dict[str, Any]]:
    """The FreeU script's arguments an A1111 request's ``infotext`` sets (Forge's ``freeu_*`` keys, or sdengine's
    "FreeU: b1,b2,s1,s2"), over the script's defaults, and the FreeU version and rule it records (sdengine's "FreeU
    version" / "FreeU rule"; Forge's are 2 and width)."""
    args: list[Any] = list(FORGE_FREEU_DEFAULTS)
    if not isinstance(text, str) or not text:
        return args, {}
    from sdengine.metadata import parse_parameters, to_generate_kwargs

    parsed = parse_parameters(text)
    if "FreeU" not in parsed and "freeu_enabled" not in parsed:  # sdengine's key, Forge's
        return args, {}
    try:
        found = to_generate_kwargs(parsed)
    except ValueError as e:
        raise BadRequest(f"infotext: {e}") from None
    if found.get("freeu") is None:
        return args, {}
    args[:5] = [True, *found["freeu"]]
    for i, key in ((5, "freeu_start"), (6, "freeu_end")):  # later Forge's step window
        if key in parsed:
            try:
                args[i] = float(parsed[key])
            except ValueError:
                raise BadRequest(f"infotext: {key}: {parsed[key]!r} is not a number") from None
    return args, {"freeu_version": found.get("freeu_version", 2), "freeu_rule": found.get("freeu_rule", "width")}


def forge_freeu(scripts: dict[str, Any], infotext: Any = None) -> dict[str, Any]:
    """The job's FreeU fields (``freeu``, ``freeu_version``, ``freeu_rule``; {} when off) from Forge's FreeU script
    in ``alwayson_scripts`` (lower-cased names; the entry is taken out of ``scripts``) over what the request's
    ``infotext`` sets (:func:`infotext_freeu`); a one-line 400 for an entry of another shape or settings sdengine does
    not run (a start or end step)."""
    args, recorded = infotext_freeu(infotext)
    shape = (
        "{args: [enabled, b1, b2, s1, s2]} or {args: [enabled, b1, b2, s1, s2, start_step, end_step]} (Forge's FreeU "
        "script)"
    )
    name, given = forge_script_entry(scripts, FORGE_FREEU_SCRIPTS, len(FORGE_FREEU_ARGS), shape)
    sent = 0
    if given is not None:
        args[: len(given)], sent = given, len(given)

    def label(i: int) -> str:  # where argument i came from: the request's script entry, else its infotext
        what = FORGE_FREEU_ARGS[i]
        return f"alwayson_scripts.{name}.args[{i}] ({what})" if i < sent else f"infotext: freeu_{what.split('_')[0]}"

    if not isinstance(args[0], bool):
        raise BadRequest(f"{label(0)} must be true or false, got {repr(args[0])[:100]}")
    if not args[0]:
        return {}
    from sdengine.nn.freeu import MAX_FREEU_FACTOR

    values: list[float] = []
    for i, v in enumerate(args[1:], start=1):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise BadRequest(f"{label(i)} must be a number, got {repr(v)[:100]}")
        if i <= 4 and not 0.0 <= v <= MAX_FREEU_FACTOR:
            raise BadRequest(f"{label(i)} must be in [0, {MAX_FREEU_FACTOR:g}], got {v:g}")
        values.append(float(v))
    if values[4:] != [0.0, 1.0]:
        raise BadRequest(
            f"{f'alwayson_scripts.{name}' if sent > 5 else 'infotext'}: sdengine runs FreeU over every step; "
            f"start_step {values[4]:g}, "
            f"end_step {values[5]:g} are not supported (use 0, 1)"
        )
    return {"freeu": tuple(values[:4]), "freeu_version": 2, "freeu_rule": "width", **recorded}


# Forge's built-in Kohya HRFix script (extensions-builtin/sd_forge_kohya_hrfix, "Kohya HRFix Integrated"), Deep Shrink
# on the U-Net: args [enabled, block_number, downscale_factor, start_percent, end_percent, downscale_after_skip,
# downscale_method, upscale_method], ComfyUI's PatchModelAddDownscale with those settings (sdengine.nn.deep_shrink). As
# Forge's API, an args list shorter than the script's keeps the later arguments as they were: the request's infotext's
# (Forge's script reads its kohya_hrfix_* fields from it), else the script's defaults.
FORGE_DEEP_SHRINK_SCRIPTS = ("kohya hrfix integrated",)
FORGE_DEEP_SHRINK_DEFAULTS = (False, 3, 2.0, 0.0, 0.35, True, "bicubic", "bicubic")  # its UI's values


def forge_deep_shrink(scripts: dict[str, Any], infotext: Any = None) -> dict[str, Any] | None:
    """The Deep Shrink settings of Forge's Kohya HRFix script in ``alwayson_scripts`` (lower-cased names; the entry is
    taken out of ``scripts``), over what the request's ``infotext`` sets (Forge's ``kohya_hrfix_*`` fields), as the
    request's ``deep_shrink`` mapping: None when not enabled; a one-line 400 for an entry of another shape or a value
    out of range."""
    from sdengine.nn.deep_shrink import FIELDS, DeepShrink

    args: list[Any] = list(FORGE_DEEP_SHRINK_DEFAULTS)
    where = "infotext"
    if isinstance(infotext, str) and "kohya_hrfix_" in infotext:
        from sdengine.metadata import deep_shrink_kwargs, parse_parameters

        try:
            found = deep_shrink_kwargs(parse_parameters(infotext))
        except ValueError as e:
            raise BadRequest(f"infotext: {e}") from None
        if found is not None:
            args = [True, *(found.get(k, d) for k, d in zip(FIELDS, FORGE_DEEP_SHRINK_DEFAULTS[1:], strict=True))]
    shape = (
        "{args: [enabled, block_number, downscale_factor, start_percent, end_percent, downscale_after_skip, "
        "downscale_method, upscale_method]} (Forge's Kohya HRFix script)"
    )
    name, given = forge_script_entry(scripts, FORGE_DEEP_SHRINK_SCRIPTS, len(FORGE_DEEP_SHRINK_DEFAULTS), shape)
    if given is not None:
        args[: len(given)] = given
        where = f"alwayson_scripts.{name}"
        if given and not isinstance(given[0], bool):
            raise BadRequest(f"{where}.args[0] (enabled) must be true or false, got {repr(given[0])[:100]}")
    if not args[0]:
        return None
    try:
        settings = DeepShrink(*args[1:])
    except SdengineError as e:
        raise BadRequest(f"{where}: {e}") from None
    return dict(zip(FIELDS, settings.key, strict=True))


# Forge's built-in self-attention guidance script (extensions-builtin/sd_forge_sag), as its alwayson_scripts entry
# names it (lower case): "SelfAttentionGuidance Integrated" (early Forge) with args [enabled, scale, blur_sigma], or
# "SelfAttentionGuidance Integrated (SD 1.x, SD 2.x, SDXL)" (later Forge) with [enabled, scale, blur_sigma,
# threshold]. Its SAG is ComfyUI's node: sdengine's sag_rule "comfyui". As Forge's API, an args list shorter than the
# script's keeps the later arguments as they were: the request's infotext's (Forge's sag_enabled, sag_scale,
# sag_blur_sigma, sag_threshold; sdengine's "SAG scale" ...), else the script's defaults. sdengine's mask threshold is
# 1 (the average attention) only. The later script skips SAG at cfg_scale 1 and in the hires fix's second pass:
# sdengine skips it at cfg 1 too, and refuses that script with a hires fix (its hires pass would run SAG).
FORGE_SAG_SCRIPTS = ("selfattentionguidance integrated", "selfattentionguidance integrated (sd 1.x, sd 2.x, sdxl)")
FORGE_SAG_ARGS = ("enabled", "scale", "blur_sigma", "threshold")
FORGE_SAG_DEFAULTS = (False, 0.5, 2.0, 1.0)  # its UI's values


def infotext_sag(text: Any) -> tuple[list[Any], str]:
    """The SAG script's arguments an A1111 request's ``infotext`` sets (Forge's ``sag_*`` keys, or sdengine's "SAG
    scale" / "SAG blur sigma"), over the script's defaults, and the SAG rule it records (sdengine's "SAG rule", its
    default "diffusers" in an sdengine text; Forge's "comfyui"). A ``sag_threshold`` says later Forge's script wrote
    it (:func:`forge_sag` then runs that script's rules)."""
    args: list[Any] = list(FORGE_SAG_DEFAULTS)
    if not isinstance(text, str) or not text:
        return args, "comfyui"
    from sdengine.metadata import parse_parameters, to_generate_kwargs

    parsed = parse_parameters(text)
    if "SAG scale" not in parsed and "sag_enabled" not in parsed:  # sdengine's key, Forge's
        return args, "comfyui"
    try:
        found = to_generate_kwargs(parsed)
    except ValueError as e:
        raise BadRequest(f"infotext: {e}") from None
    if not found.get("sag_scale"):
        return args, "comfyui"
    args[:3] = [True, found["sag_scale"], found["sag_blur_sigma"]]
    if "sag_threshold" in parsed:  # later Forge's mask threshold
        try:
            args[3] = float(parsed["sag_threshold"])
        except ValueError:
            raise BadRequest(f"infotext: sag_threshold: {parsed['sag_threshold']!r} is not a number") from None
    return args, str(found.get("sag_rule", "diffusers"))


def forge_sag(scripts: dict[str, Any], cfg_scale: Any, hires: bool, infotext: Any = None) -> dict[str, Any]:
    """The job's SAG fields (``sag_scale``, ``sag_blur_sigma``, ``sag_rule``; {} when off) from Forge's SAG script in
    ``alwayson_scripts`` (lower-cased names; the entry is taken out of ``scripts``) over what the request's
    ``infotext`` sets (:func:`infotext_sag`); ``hires``: a txt2img hires fix runs. A one-line 400 for an entry of
    another shape or settings sdengine does not run (another mask threshold; the later script with a hires fix)."""
    args, rule = infotext_sag(infotext)
    later = isinstance(infotext, str) and "sag_threshold" in infotext  # only later Forge's script writes it
    shape = "{args: [enabled, scale, blur_sigma]} or {args: [enabled, scale, blur_sigma, threshold]} (Forge's SAG "
    shape += "script)"
    name, given = forge_script_entry(scripts, FORGE_SAG_SCRIPTS, len(FORGE_SAG_ARGS), shape)
    sent = 0
    if given is not None:
        args[: len(given)], sent = given, len(given)
        rule = "comfyui"  # the script's SAG: ComfyUI's
        later = name == FORGE_SAG_SCRIPTS[1]

    def label(i: int) -> str:  # where argument i came from: the request's script entry, else its infotext
        what = FORGE_SAG_ARGS[i]
        return f"alwayson_scripts.{name}.args[{i}] ({what})" if i < sent else f"infotext: sag_{what}"

    if not isinstance(args[0], bool):
        raise BadRequest(f"{label(0)} must be true or false, got {repr(args[0])[:100]}")
    if not args[0]:
        return {}
    from sdengine.diffusion.sag import MAX_SAG_BLUR_SIGMA, SAG_THRESHOLD
    from sdengine.pipeline.request import MAX_SAG_SCALE

    values: list[float] = []
    for i, v in enumerate(args[1:], start=1):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise BadRequest(f"{label(i)} must be a number, got {repr(v)[:100]}")
        values.append(float(v))
    scale, blur, threshold = values
    if not -MAX_SAG_SCALE <= scale <= MAX_SAG_SCALE:
        raise BadRequest(f"{label(1)} must be in [-{MAX_SAG_SCALE:g}, {MAX_SAG_SCALE:g}], got {scale:g}")
    if not 0.0 < blur <= MAX_SAG_BLUR_SIGMA:  # Forge's blur divides by it: 0 makes NaN there
        raise BadRequest(f"{label(2)} must be in (0, {MAX_SAG_BLUR_SIGMA:g}], got {blur:g}")
    if threshold != SAG_THRESHOLD:
        raise BadRequest(
            f"{label(3)}: sdengine's SAG mask threshold is {SAG_THRESHOLD:g} (the average attention); {threshold:g} is "
            f"not supported"
        )
    if later and hires:
        where = f"alwayson_scripts.{name}" if sent else "infotext"
        raise BadRequest(
            f"{where}: Forge's later SAG script skips the hires fix's second pass and sdengine's hires "
            "pass would run it; turn enable_hr off, or send the entry as 'SelfAttentionGuidance Integrated'"
        )
    if scale == 0 or (later and _number_or_none(cfg_scale) == 1.0):  # no term; the later script skips cfg 1
        return {}
    return {"sag_scale": scale, "sag_blur_sigma": blur, "sag_rule": rule}


# The A1111 "Tiled Diffusion" extension (pkuliyi2015/multidiffusion-upscaler-for-automatic1111,
# scripts/tilediffusion.py), as its alwayson_scripts entry names it (lower case): its ui()'s args, in order. Its
# "MultiDiffusion" method is sdengine's tiled_diffusion (window = the latent tile, stride = tile - overlap, view
# batch = tile batch size; its tiles are spread evenly, sdengine's views step by the stride: docs/multidiffusion.md);
# "Overwrite image size" sets txt2img's size. The arguments that would change the image otherwise (its upscaler,
# noise inversion, region prompts) are a 400; the rest is listed as ignored. A shorter list keeps the UI's defaults.
TILED_DIFFUSION_SCRIPT = "tiled diffusion"
TILED_DIFFUSION_ARGS = (
    "enabled", "method", "overwrite_size", "keep_input_size", "image_width", "image_height", "tile_width",
    "tile_height", "overlap", "batch_size", "upscaler_name", "scale_factor", "noise_inverse", "noise_inverse_steps",
    "noise_inverse_retouch", "noise_inverse_renoise_strength", "noise_inverse_renoise_kernel", "control_tensor_cpu",
    "enable_bbox_control", "draw_background", "causal_layers",
)  # fmt: skip
# the UI's values (txt2img's overlap 48; img2img's 8)
TILED_DIFFUSION_DEFAULTS = (
    False, "MultiDiffusion", False, True, 1024, 1024, 96, 96, 48, 4, "None", 2.0, False, 10, 1, 1, 64, False, False,
    False, False,
)  # fmt: skip


def tiled_diffusion_script(
    scripts: dict[str, Any], txt2img: bool, ignored: list[str], notes: list[str] | None = None
) -> tuple[dict[str, Any] | None, tuple[int, int] | None]:
    """The Tiled Diffusion extension's entry in ``alwayson_scripts`` (lower-cased names; taken out of ``scripts``):
    (the request's ``tiled_diffusion`` mapping, None when absent or not enabled; txt2img's (width, height) when
    "Overwrite image size" is on). A one-line 400 for an entry of another shape, another method (Mixture of
    Diffusers), a value out of range or an argument that would change the image and is not done."""
    entry = scripts.pop(TILED_DIFFUSION_SCRIPT, None)
    if entry is None:
        return None, None
    where = f"alwayson_scripts.{TILED_DIFFUSION_SCRIPT}"
    given = entry.get("args") if isinstance(entry, dict) else None
    if not isinstance(given, list):
        raise BadRequest(f"{where} must be an object {{args: [enabled, method, ...]}} (the extension's), got "
                         f"{repr(entry)[:100]}")  # fmt: skip
    args: list[Any] = list(TILED_DIFFUSION_DEFAULTS)
    if not txt2img:
        args[8] = 8
    args[: len(given)] = given[: len(args)]

    def label(i: int) -> str:
        return f"{where}.args[{i}] ({TILED_DIFFUSION_ARGS[i]})"

    for i in (0, 2, 3, 12, 17, 18, 19, 20):
        if not isinstance(args[i], bool):
            raise BadRequest(f"{label(i)} must be true or false, got {repr(args[i])[:100]}")
    if not args[0]:
        return None, None
    if args[1] == "Mixture of Diffusers":
        raise BadRequest(f"{label(1)}: Mixture of Diffusers is not supported; sdengine runs 'MultiDiffusion'")
    if args[1] != "MultiDiffusion":
        raise BadRequest(f"{label(1)} must be 'MultiDiffusion' (or the unsupported 'Mixture of Diffusers'), got "
                         f"{repr(args[1])[:100]}")  # fmt: skip
    for i in (4, 5, 6, 7, 8, 9):
        v = args[i]
        if isinstance(v, bool) or not isinstance(v, int | float) or not float(v).is_integer():
            raise BadRequest(f"{label(i)} must be a whole number, got {repr(v)[:100]}")
    tile_w, tile_h, overlap, batch = (int(args[i]) for i in (6, 7, 8, 9))
    if overlap < 0 or overlap >= min(tile_w, tile_h):
        raise BadRequest(f"{label(8)} must be at least 0 and smaller than the tiles ({tile_w}x{tile_h}), got {overlap}")
    if not txt2img and args[10] not in ("None", None):
        raise BadRequest(f"{label(10)}: the extension's upscale of the init image is not supported (upscale it "
                         "first: /sdapi/v1/extra-single-image), use 'None'")  # fmt: skip
    if args[12]:
        raise BadRequest(f"{label(12)}: noise inversion is not supported")
    if args[18]:
        raise BadRequest(f"{label(18)}: region prompt control is not supported")
    if tile_w != tile_h and notes is not None:
        notes.append(f"tiled diffusion: one stride for both sides, {min(tile_w, tile_h) - overlap} (the smaller tile "
                     "less the overlap)")  # fmt: skip
    from sdengine.diffusion.multidiffusion import MultiDiffusion

    settings = {"window": tile_w, "window_height": tile_h, "stride": min(tile_w, tile_h) - overlap}
    settings["view_batch"] = batch
    try:
        MultiDiffusion.coerce(settings)
    except SdengineError as e:
        raise BadRequest(f"{where}: {e}") from None
    # the arguments that change nothing here: listed where sent otherwise than the UI's defaults
    unused = [3] if not txt2img and args[3] else []
    unused += [i for i in (11, 17, 19, 20) if i < len(given) and args[i] != TILED_DIFFUSION_DEFAULTS[i]]
    ignored.extend(label(i) for i in unused)
    size = None
    if txt2img and args[2]:
        for i in (4, 5):
            if not 8 <= int(args[i]) <= 16384:
                raise BadRequest(f"{label(i)} must be in [8, 16384], got {args[i]}")
        size = (int(args[4]), int(args[5]))
    return settings, size


def _number_or_none(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def control_units(
    args: Any,
    init: str | None,
    ignored: list[str],
    detect_maps: list[int] | None = None,
    ip_units: list[IPAdapterRequest] | None = None,
    init_mask: str | None = None,
    inpaint_masks: dict[int, str] | None = None,
) -> tuple[list[ControlRequest], list[tuple[int, int]], dict[int, int]]:
    """sd-webui-controlnet's ``alwayson_scripts.controlnet.args`` -> units (each with its ``control_mode``), each
    unit's (index, resize mode number; a unit without one has the extension's default, "Crop and Resize"), and
    the ``processor_res`` of the units whose image goes through a preprocessor (by their place in the units;
    :data:`PIXEL_PERFECT` for a ``pixel_perfect`` unit, whose resolution comes from its image's size).
    ``detect_maps``: filled with the places of the units whose detected map the answer appends (the extension's
    ``save_detected_map``, true by default). ``ip_units``: filled with the units whose module is one of the
    extension's IP-Adapter preprocessors (:data:`sdengine.server.ip_adapters.A1111_MODULES`), as IP-Adapter
    requests (``weight`` the scale, the module the CLIP vision family; the model as sent); without it such a
    module is unknown. ``inpaint_masks``: filled with each unit's mask's label (by its place in the units; ""
    for ``init_mask``, img2img's mask, taken with the init image by a unit without an image of its own), the
    mask set on the unit (an SD3 inpainting ControlNet's, :func:`keep_inpaint_masks`); without it a unit's mask
    is listed as ignored."""
    if args is None:
        return [], [], {}
    if not isinstance(args, list):
        raise BadRequest("alwayson_scripts.controlnet.args must be a list of units")
    units: list[ControlRequest] = []
    resizes: list[tuple[int, int]] = []
    processor_res: dict[int, int] = {}
    for k, u in enumerate(args):
        if not isinstance(u, dict):
            ignored.append(f"controlnet.args[{k}]")
            continue
        if not u.get("enabled", True):
            continue
        image = u.get("image") or u.get("input_image")  # the extension's old name, also beside "image": null
        # the unit's mask: its mask_image (webuiapi's ControlNetUnit.mask sends "mask"), else its image's mask;
        # an SD3 inpainting ControlNet's mask (unit_masks), listed as ignored on any other unit (inpaint_masks)
        mask: tuple[str, str] | None = None
        if isinstance(image, dict):
            if image.get("mask"):
                mask = (image["mask"], f"controlnet.args[{k}].image.mask")
            image = image.get("image")
        for key in ("mask", "mask_image"):
            if u.get(key):
                mask = (u[key], f"controlnet.args[{k}].{key}")
        for key, value in u.items():  # the extension's other settings (advanced_weighting, ipadapter_input, ...)
            if key not in UNIT_KEYS and value not in (None, False, "", [], {}):
                ignored.append(f"controlnet.args[{k}].{key}")
        if not image:
            if init is None:
                raise BadRequest(f"ControlNet unit {k}: no image (txt2img units need one)")
            image = init  # A1111's extension uses the img2img init image then, and the img2img mask with it
            if init_mask and mask is None:
                mask = (init_mask, "")
        if not isinstance(image, str):
            raise BadRequest(f"ControlNet unit {k}: image must be a base64 string")
        model = u.get("model")
        module = str(u.get("module") or "none").strip().lower()
        if mask is not None and (module in REFERENCE_MODULES or (module in A1111_MODULES and ip_units is not None)):
            if mask[1]:
                ignored.append(mask[1])
            mask = None
        if module in REFERENCE_MODULES:  # the extension's reference units: no model, the image as it is
            units.append(reference_unit(u, k, image, ignored))
            resize = _unit_control(u.get("resize_mode", 1), RESIZE_MODES, f"ControlNet unit {k}: resize_mode")
            resizes.append((k, next(i for i, n in RESIZE_MODES.items() if n == resize)))
            continue
        if not isinstance(model, str) or model.strip() in ("", "None", "none"):
            raise BadRequest(f"ControlNet unit {k}: choose a model (GET /controlnet/model_list)")
        if module in A1111_MODULES and ip_units is not None:
            # the extension's IP-Adapter unit: no control map, no control mode (its no_control_mode), no resize
            if u.get("control_mode", 0) not in (0, CONTROL_MODES[0]):
                ignored.append(f"controlnet.args[{k}].control_mode")
            ip_units.append(
                IPAdapterRequest(
                    model=model,
                    image=image,
                    scale=_num(u.get("weight", 1.0), "weight"),
                    family=A1111_MODULES[module],
                    several="first",  # an A1111 client cannot name the encoder: the first that fits
                    start=_num(u.get("guidance_start", 0.0), "guidance_start"),
                    end=_num(u.get("guidance_end", 1.0), "guidance_end"),
                )
            )
            continue
        if module not in MODULES:
            raise BadRequest(
                f"ControlNet unit {k}: module {module!r} is not available; available: {', '.join(MODULES)}"
            )
        # the extension's control mode: its soft weights ("prompt") and, "ControlNet is more important", on the
        # conditional rows only (pipeline.control.ControlUnit.mode)
        mode = _unit_control(u.get("control_mode", 0), CONTROL_MODES, f"ControlNet unit {k}: control_mode")
        resize = _unit_control(u.get("resize_mode", 1), RESIZE_MODES, f"ControlNet unit {k}: resize_mode")
        resizes.append((k, next(i for i, n in RESIZE_MODES.items() if n == resize)))
        pixel_perfect = u.get("pixel_perfect", False)
        if not isinstance(pixel_perfect, bool):
            raise BadRequest(f"ControlNet unit {k}: pixel_perfect must be true or false, got {pixel_perfect!r}")
        options = {}
        # the extension preprocesses the image scaled to a short side of processor_res (none and invert take it
        # as it is); -1 (or none sent) is the preprocessor's default, 512; pixel_perfect works it out from the image
        scaled = MODULES[module] in CONTROLNET_SCALED
        if scaled and pixel_perfect:
            processor_res[len(units)] = PIXEL_PERFECT
        elif scaled:
            res = u.get("processor_res")
            if res is None or res == -1:
                res = CONTROLNET_PROCESSOR_RES
            if isinstance(res, bool) or not isinstance(res, int) or not 64 <= res <= 2048:
                raise BadRequest(f"ControlNet unit {k}: processor_res must be an integer in [64, 2048] or -1")
            processor_res[len(units)] = res
        if MODULES[module] == "canny":  # -1 is the extension's "default" (100, 200)
            low, high = u.get("threshold_a", -1), u.get("threshold_b", -1)
            options = {
                "low": 100.0 if low in (None, -1) else _num(low, "threshold_a"),
                "high": 200.0 if high in (None, -1) else _num(high, "threshold_b"),
            }
        elif MODULES[module] in ("threshold", "scribble") and u.get("threshold_a") not in (None, -1):
            options = {"threshold": _num(u.get("threshold_a"), "threshold_a")}
        union = union_control_type(u.get("union_control_type"), k)
        save = u.get("save_detected_map", True)
        if not isinstance(save, bool):
            raise BadRequest(f"ControlNet unit {k}: save_detected_map must be true or false, got {save!r}")
        if save and detect_maps is not None:
            detect_maps.append(len(units))
        if mask is not None:
            if inpaint_masks is None:
                if mask[1]:
                    ignored.append(mask[1])
                mask = None
            else:
                inpaint_masks[len(units)] = mask[1]
        units.append(
            ControlRequest(
                model=model,
                image=image,
                weight=_num(u.get("weight", 1.0), "weight"),
                start=_num(u.get("guidance_start", 0.0), "guidance_start"),
                end=_num(u.get("guidance_end", 1.0), "guidance_end"),
                preprocessor=MODULES[module],
                options=options,
                rule="a1111",  # the extension's guidance_schedule_handler: step i when start <= i/steps <= end
                mode=UNIT_MODES[mode],
                # the extension forces its soft weights on a canny unit in the hires fix's second pass (hook.py's
                # high_res_fix_forced_soft_injection; "ControlNet is more important" keeps its conditional rows)
                hires_mode="prompt" if MODULES[module] == "canny" and mode == CONTROL_MODES[0] else None,
                union_mode=union,
                mask=None if mask is None else mask[0],
            )
        )
    return units, resizes, processor_res


def keep_inpaint_masks(
    units: list[ControlRequest],
    inpaint_masks: dict[int, str],
    resolve: Callable[[str], Path],
    ignored: list[str],
) -> list[ControlRequest]:
    """The units whose mask (:func:`control_units`' ``inpaint_masks``) is an SD3 inpainting ControlNet's keep it;
    the others lose it, listed in ``ignored`` (the extension's inpaint masks of U-Net units are not done). A
    model that does not resolve keeps it: its build says what is wrong. A unit that takes the img2img mask gets
    it as the extension prepares it (blurred, inverted with ``inpainting_mask_invert``) from the route."""
    from sdengine.control.dit_files import is_sd3_inpainting_controlnet

    out = list(units)
    for i, label in inpaint_masks.items():
        try:
            inpaint = is_sd3_inpainting_controlnet(resolve(out[i].model))
        except SdengineError:
            continue
        if not inpaint:
            out[i] = dataclasses.replace(out[i], mask=None)
            if label:
                ignored.append(label)
    return out


def union_control_type(value: Any, k: int) -> int | None:
    """A unit's ``union_control_type`` (the extension's name, or a number) -> the Union ControlNet's mode number;
    None where it is not set ("Unknown", empty)."""
    if value is None or value == "" or (isinstance(value, str) and value.strip().lower() == "unknown"):
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        names = [n.lower() for n in UNION_CONTROL_TYPES]
        key = value.strip().lower()
        if key in names:
            return names.index(key)
        if key.isdigit():
            return int(key)
    raise BadRequest(
        f"ControlNet unit {k}: union_control_type {value!r} is not one of the extension's types "
        f"({', '.join(UNION_CONTROL_TYPES)}, Unknown) or a number"
    )


def reference_unit(u: dict[str, Any], k: int, image: str, ignored: list[str]) -> ControlRequest:
    """A unit of the extension's reference modules (``reference_only``, ``reference_adain``,
    ``reference_adain+attn``): its model is not read (the extension sets none), ``threshold_a`` is the style
    fidelity (outside [0, 1], or -1: the default 0.5, as the extension's bound check resets it)."""
    module = str(u.get("module")).strip().lower()
    model = u.get("model")
    if model is not None and not (isinstance(model, str) and model.strip() in ("", "None", "none")):
        ignored.append(f"controlnet.args[{k}].model")  # the extension loads no model for these modules
    fidelity = u.get("threshold_a", -1)
    fidelity = -1 if fidelity is None else _num(fidelity, "threshold_a")
    if not 0.0 <= fidelity <= 1.0:
        fidelity = REFERENCE_FIDELITY_DEFAULT
    mode = _unit_control(u.get("control_mode", 0), CONTROL_MODES, f"ControlNet unit {k}: control_mode")
    return ControlRequest(
        model=module,
        image=image,
        weight=_num(u.get("weight", 1.0), "weight"),
        start=_num(u.get("guidance_start", 0.0), "guidance_start"),
        end=_num(u.get("guidance_end", 1.0), "guidance_end"),
        options={"style_fidelity": float(fidelity)},
        rule="a1111",
        mode=UNIT_MODES[mode],
    )


def pixel_perfect_resolution(size: tuple[int, int], width: int, height: int, resize_mode: int) -> int:
    """The extension's ``pixel_perfect_resolution``: the preprocessor resolution (the short side the image is
    scaled to) at which the image of ``size`` (w, h) maps onto the ``width`` x ``height`` output one pixel to one:
    its short side times the larger of the two scale factors (the smaller for "Resize and Fill", 2), rounded.
    The extension gives it the request's width and height rounded down to a multiple of 8."""
    from sdengine.control.preprocess import pixel_perfect_resolution as resolution

    return resolution(size, width, height, fill=resize_mode == 2)


def _num(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise BadRequest(f"ControlNet {what} must be a number, got {v!r}")
    return float(v)


# A1111's "VAE type for decode" / "VAE type for encode" settings -> GenerationRequest.vae_decode / vae_encode
# ("TAESD" needs the model's tiny VAE; for encoding, one with an encoder).
DECODE_METHODS = {"Full": "full", "TAESD": "tiny"}


def check_refiner_pass(value: Any) -> str:
    """A1111's ``hires_fix_refiner_pass`` option (which pass of the hires fix hands off to the refiner), or a 400
    naming its values."""
    from sdengine.pipeline.sdxl import HIRES_REFINER_PASSES

    if value not in HIRES_REFINER_PASSES:
        raise BadRequest(
            f"hires_fix_refiner_pass must be one of {', '.join(map(repr, HIRES_REFINER_PASSES))}, got {value!r}"
        )
    return str(value)


def check_noise_multiplier(value: Any) -> float:
    """A1111's ``initial_noise_multiplier`` option (img2img's noise times it): a number in [0, 10]."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 10:
        raise BadRequest(f"initial_noise_multiplier must be a number in [0, 10], got {value!r}")
    return float(value)


def check_ensd(value: Any) -> int:
    """A1111's ``eta_noise_seed_delta`` (ENSD): an integer in [0, 2**32 - 1]; A1111's null means 0."""
    if value is None:
        return 0
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise BadRequest(f"eta_noise_seed_delta must be an integer in [0, {2**32 - 1}], got {value!r}")
    return value


def check_randn_source(value: Any) -> str:
    """A1111's ``randn_source`` option ("GPU", "NV" or "CPU"), upper-cased; a BadRequest otherwise."""
    from sdengine.metadata import A1111_RANDN_SOURCES

    key = value.strip().upper() if isinstance(value, str) else None
    if key not in A1111_RANDN_SOURCES:
        raise BadRequest(f"randn_source must be one of {', '.join(A1111_RANDN_SOURCES)}, got {value!r}")
    return key


def decode_method(value: Any, option: str = "sd_vae_decode_method") -> str:
    if not isinstance(value, str) or value not in DECODE_METHODS:
        raise BadRequest(f"{option} must be one of {', '.join(DECODE_METHODS)}, got {value!r}")
    return DECODE_METHODS[value]


# sdengine's names from an infotext (sdengine.metadata.to_generate_kwargs) -> A1111's request fields
INFOTEXT_FIELDS = {
    **{k: k for k in ("prompt", "negative_prompt", "steps", "cfg_scale", "seed", "width", "height")},
    **{k: k for k in ("subseed", "subseed_strength", "mask_blur", "enable_hr", "hr_scale", "hr_resize_x")},
    **{k: k for k in ("hr_resize_y", "hr_second_pass_steps", "hr_upscaler", "hr_prompt", "hr_negative_prompt")},
    **{k: k for k in ("seed_resize_from_w", "seed_resize_from_h", "tiling")},
    # the model family's own: Forge's "Distilled CFG Scale" (Flux), "Shift" and the skip-layer fields (SD3)
    **{k: k for k in ("distilled_cfg_scale", "shift", "sd3")},
    "control_preprocessor": "control_preprocessor",  # sdengine's "Control preprocessor" (FLUX.1 Depth / Canny)
    "sampler": "sampler_name",
    "schedule": "scheduler",
    "strength": "denoising_strength",
    "hr_sampler": "hr_sampler_name",
    "hr_schedule": "hr_scheduler",
}


def install(app: FastAPI, services: Any) -> None:
    manager, catalog, options = services.manager, services.catalog, services.options

    def apply_infotext(req: Any, hires: bool) -> tuple[Any, dict[str, Any], tuple[int, str] | None]:
        """A1111's ``infotext`` field (its ``apply_infotext``): the request's fields that were not sent are read
        from the infotext; its Clip skip and sdengine's tiny-VAE fields become override_settings (where not
        set there); ``hires``: the hires-fix fields too (txt2img). sdengine's "SDXL options": the crop and the
        refiner's scores become A1111's SDXL options (override_settings); the settings A1111 has no option for
        (prompt_2, sizes, ...) are returned second, for the job's ``sdxl_options``. Third, (clip_skip,
        clip_skip_rule) where the infotext's Clip skip has another meaning than A1111's (an sdengine image's own,
        or its "Clip skip rule"), the request's override_settings giving none: the job runs it with that meaning,
        not as A1111's CLIP_stop_at_last_layers (which SD 2.x and SDXL ignore)."""
        text = (req.model_extra or {}).get("infotext")
        if not text:
            return req, {}, None
        if not isinstance(text, str):
            raise BadRequest("infotext must be a string")
        from sdengine.metadata import parse_parameters, to_generate_kwargs

        parsed = parse_parameters(text)
        try:  # A1111's refiner fields run (hand_off): "Refiner", "Refiner switch at"; "Hires refiner" and
            # "Hires checkpoint" are read below (txt2img's)
            found = to_generate_kwargs(parsed, hires=hires, refiner=True, hr_checkpoint=True, hr_refiner=True)
        except ValueError as e:
            raise BadRequest(f"infotext: {e}") from None
        if found.get("hypertile_rule", "a1111") != "a1111" or found.get("hypertile_scale_depth") is False:
            # sdengine's HyperTile of another rule: these routes run A1111's options only (never another image)
            raise BadRequest(
                "infotext: Hypertile rule / Hypertile scale depth other than A1111's are not run on A1111's routes; "
                "run the image with the CLI's --from-png"
            )
        sent = req.model_dump(exclude_unset=True)
        filled = {INFOTEXT_FIELDS[k]: v for k, v in found.items() if k in INFOTEXT_FIELDS}
        if "Refiner" in parsed:  # A1111's refiner script's paste fields
            try:  # A1111 runs no refiner for a name it lacks: another image, so said here instead
                filled["refiner_checkpoint"] = catalog.model_name_of(catalog.resolve_model(parsed["Refiner"]))
            except BadRequest as e:
                raise BadRequest(f"infotext: Refiner: {e}") from None
            try:  # none written: A1111's None (its refiner runs from the first step), as the request's own
                filled["refiner_switch_at"] = float(parsed.get("Refiner switch at", "0"))
            except ValueError:
                raise BadRequest(
                    f"infotext: Refiner switch at must be a number, got {parsed.get('Refiner switch at')!r}"
                ) from None
        if hires and parsed.get("Hires checkpoint") not in (None, *SAME_CHECKPOINT):  # A1111's paste field
            try:  # the second pass's model (a name it lacks: another image, so said here)
                filled["hr_checkpoint_name"] = catalog.model_name_of(catalog.resolve_model(parsed["Hires checkpoint"]))
            except BadRequest as e:
                raise BadRequest(f"infotext: Hires checkpoint: {e}") from None
        if not hires and "noise_multiplier" in found:  # img2img's (txt2img has no such field)
            filled["initial_noise_multiplier"] = found["noise_multiplier"]
        if not hires and "image_cfg_scale" in found:  # img2img's "Image CFG scale" (instruct-pix2pix models)
            filled["image_cfg_scale"] = found["image_cfg_scale"]
        for key, value in (found.get("sampler_options") or {}).items():  # "Eta", "Sigma churn", ...
            if key in SAMPLER_FIELDS:
                filled[key] = value
        filled = {k: v for k, v in filled.items() if k not in sent}
        over = dict(sent.get("override_settings") or {})
        # whose Clip skip the infotext has: its "Clip skip rule", else sdengine's own in an sdengine infotext
        from sdengine.metadata import made_by_sdengine

        clip_rule = found.get("clip_skip_rule", "sdengine" if made_by_sdengine(parsed) else "a1111")
        clip: tuple[int, str] | None = None
        if clip_rule != "a1111" and "CLIP_stop_at_last_layers" not in over:
            clip = (int(found.get("clip_skip", 1)), clip_rule)
        settings = {
            "CLIP_stop_at_last_layers": found.get("clip_skip", 1),
            "sd_vae_decode_method": "TAESD" if found.get("vae_decode") == "tiny" else "Full",
            "sd_vae_encode_method": "TAESD" if found.get("vae_encode") == "tiny" else "Full",
        }
        if parsed.get("VAE"):  # A1111's sd_vae (infotext "VAE"): checked as the option, an unknown file a 400
            settings["sd_vae"] = parsed["VAE"].strip()
        if "Face restoration" in parsed:  # A1111's option of that infotext name (restore_faces None reads it)
            settings["face_restoration"] = True
        if not hires and found.get("strength_rule") == "a1111_fix_steps":  # sdengine's record of img2img_fix_steps
            settings["img2img_fix_steps"] = True
        if found.get("discard_penultimate_sigma"):  # "Discard penultimate sigma", as A1111 maps it
            settings["always_discard_next_to_last_sigma"] = True
        if hires and "Hires refiner" in parsed:  # the pass that handed off, where not A1111's default
            settings["hires_fix_refiner_pass"] = parsed["Hires refiner"]
        if "noise_seed_delta" in found:  # "ENSD", as A1111 maps it (only when the infotext has one: no default)
            settings["eta_noise_seed_delta"] = found["noise_seed_delta"]
        for field, name in INFOTEXT_OPTIONS.items():  # "RNG: NV" (checked as randn_source), "Emphasis: No norm", ...
            if field in parsed:
                settings[name] = infotext_value(parsed[field].strip())
        if "RNG" not in parsed:  # A1111 writes none for its GPU source (its parse_generation_parameters fills in
            # "RNG: GPU"); sdengine writes "RNG: NV" for NVIDIA's numbers and none for its CPU source
            settings["randn_source"] = "CPU" if made_by_sdengine(parsed) else "GPU"
        if found.get("sampler") == "unipc":  # its UniPC variant and order: A1111's defaults where an A1111
            unipc = found.get("sampler_options") or {}  # infotext has none, sdengine's own in an sdengine one
            settings["uni_pc_variant"] = unipc.get("variant", UNIPC_OWN["uni_pc_variant"])
            settings["uni_pc_order"] = unipc.get("order", UNIPC_OWN["uni_pc_order"])
        xl_options, xl_rest = infotext_sdxl(found.get("sdxl"))
        settings.update(xl_options)
        if clip is not None:
            del settings["CLIP_stop_at_last_layers"]  # not A1111's: passed on with its rule instead
        defaults: dict[str, Any] = {"CLIP_stop_at_last_layers": 1, "face_restoration": False, **SDXL_OPTIONS}
        defaults.update(HYPERTILE_OPTIONS)
        defaults.update(SAMPLER_OPTIONS, randn_source="CPU")
        defaults.update({k: accepted[0] for k, (accepted, _) in FIXED_OPTIONS.items()})
        defaults["hires_fix_refiner_pass"] = "second pass"
        defaults["sd_vae"] = "Automatic"
        for name, value in settings.items():  # as A1111: only where it differs from the current option
            if name not in over and value != options.get(name, defaults.get(name, "Full")):
                over[name] = value
        if over:
            filled["override_settings"] = over
        return type(req)(**{**sent, **filled}), xl_rest, clip

    styles_seen: dict[str, Any] = {}  # the styles file's (mtime, size) and its styles, read again when it changes

    def prompt_styles() -> dict[str, Any]:
        """The styles of the server's styles file (none without one), read again whenever the file changed."""
        from sdengine.prompts import PromptError, read_styles

        path = services.config.styles_file
        if path is None:
            return {}
        try:
            st = path.stat()
            key = (st.st_mtime_ns, st.st_size)
            if styles_seen.get("key") != key:
                styles_seen.update(key=key, styles=read_styles(path))
        except (OSError, PromptError) as e:
            raise ServerFault(f"the server's styles file cannot be read: {e}") from None
        return dict(styles_seen["styles"])

    def with_styles(req: Txt2ImgRequest) -> Txt2ImgRequest:
        """The request with its ``styles`` merged into its prompts (and the hires fix's own prompts) as A1111 merges
        them; an unknown name is a 400 (A1111 would run the prompt without it)."""
        if not req.styles:
            return req
        from sdengine.prompts import apply_styles

        known = prompt_styles()
        unknown = [n for n in req.styles if n not in known]
        if unknown:
            where = (
                f"the server's styles: {', '.join(known) or 'none'} (GET /sdapi/v1/prompt-styles)"
                if services.config.styles_file is not None
                else "the server has no styles file (sdengine serve --styles-file FILE)"
            )
            raise BadRequest(f"unknown style {unknown[0]!r}; {where}")
        chosen = [known[n] for n in req.styles]
        prompt, negative = apply_styles(req.prompt, req.negative_prompt, chosen)
        update = {"prompt": prompt, "negative_prompt": negative}
        if req.hr_prompt or req.hr_negative_prompt:  # "" stays "": the (styled) prompt's, as in A1111
            hr = apply_styles(req.hr_prompt, req.hr_negative_prompt, chosen)
            update.update(
                hr_prompt=hr[0] if req.hr_prompt else "", hr_negative_prompt=hr[1] if req.hr_negative_prompt else ""
            )
        return req.model_copy(update=update)

    def check_sd_vae(value: Any, where: str = "") -> str:
        """A1111's ``sd_vae`` (requests.check_vae_choice); a 400 naming the option (``where`` its prefix)."""
        return check_vae_choice(catalog, value, f"{where}sd_vae")

    def job_vae(generation: Any, sd_vae: str) -> None:
        """The job's VAE (``Generation.vae``) for ``sd_vae`` (requests.set_job_vae; the server's --vae first)."""
        set_job_vae(generation, catalog, sd_vae, services.config.vae)

    def generation_fields(
        req: Txt2ImgRequest,
        body: dict[str, Any],
        ignored: list[str],
        init: str | None,
        image_mode: int | None = None,
        notes: list[str] | None = None,
        clip: tuple[int, str] | None = None,
    ) -> dict[str, Any]:
        """The build_generation fields of a request. ``image_mode``: img2img's resize mode (0, 1, 2) for the
        init image; sdengine fits the init and the control images in one mode, so a unit of another mode is
        listed as ignored (in txt2img the first unit's mode is the one). ``clip``: an infotext's (clip_skip,
        clip_skip_rule) of another meaning than A1111's (:func:`apply_infotext`), in place of the options'."""
        over = dict(req.override_settings or {})
        clip_skip = over.pop("CLIP_stop_at_last_layers", options.get("CLIP_stop_at_last_layers", 1))
        clip_l = over.pop("sdxl_clip_l_skip", options.get("sdxl_clip_l_skip", False))
        if not isinstance(clip_l, bool):
            raise BadRequest(f"sdxl_clip_l_skip must be true or false, got {clip_l!r}")
        clip_rule = "a1111_sdxl_clip_l" if clip_l else "a1111"
        if clip is not None:
            clip_skip, clip_rule = clip
        model = over.pop("sd_model_checkpoint", None)
        sd_vae = check_sd_vae(over.pop("sd_vae"), "override_settings.") if "sd_vae" in over else None
        # Forge's choice of an SD3 / Flux file's text encoders and VAE (a list of its module paths; names here)
        modules = over.pop("forge_additional_modules", body.get("forge_additional_modules"))
        if sd_vae is None:
            sd_vae = options.get("sd_vae", "Automatic")
        vae_decode = decode_method(over.pop("sd_vae_decode_method", options.get("sd_vae_decode_method", "Full")))
        vae_encode = decode_method(
            over.pop("sd_vae_encode_method", options.get("sd_vae_encode_method", "Full")), "sd_vae_encode_method"
        )
        ensd = over.pop("eta_noise_seed_delta", options.get("eta_noise_seed_delta", 0))  # A1111's ENSD
        ensd = check_ensd(ensd)
        # A1111's "Random number generator source": its GPU (on an NVIDIA card) and NV draw NVIDIA's numbers
        from sdengine.metadata import A1111_RANDN_SOURCES

        randn_source = check_randn_source(over.pop("randn_source", options.get("randn_source", "CPU")))
        discard = over.pop("always_discard_next_to_last_sigma", options.get("always_discard_next_to_last_sigma", False))
        # A1111's "Noise schedule for sampling": Zero Terminal SNR rescales the model's alphas_cumprod as A1111 does
        noise_schedule = check_noise_schedule(
            over.pop("sd_noise_schedule", options.get("sd_noise_schedule", "Default")), "override_settings."
        )
        if not isinstance(discard, bool):
            raise BadRequest(f"always_discard_next_to_last_sigma must be true or false, got {discard!r}")
        # A1111's img2img noise multiplier when the request gives none: this override, else the option (txt2img has
        # none: there an override of it stays listed as ignored)
        noise_mult = None
        if init is not None:
            noise_mult = check_noise_multiplier(
                over.pop("initial_noise_multiplier", options.get("initial_noise_multiplier", 1.0))
            )
        # A1111's img2img_fix_steps: img2img runs the steps asked, of a schedule of steps / strength (its hires fix
        # always counts so: nothing to change in txt2img)
        fix_steps = over.pop("img2img_fix_steps", options.get("img2img_fix_steps", False))
        if not isinstance(fix_steps, bool):
            raise BadRequest(f"img2img_fix_steps must be true or false, got {fix_steps!r}")
        # A1111's hires_fix_refiner_pass: which pass of the hires fix hands off to the refiner
        refiner_pass = check_refiner_pass(
            over.pop("hires_fix_refiner_pass", options.get("hires_fix_refiner_pass", "second pass"))
        )
        # the extension's "Do not append detectmap to output" (an option, or per request)
        no_detectmap = over.pop("control_net_no_detectmap", options.get("control_net_no_detectmap", False))
        if not isinstance(no_detectmap, bool):
            raise BadRequest(f"control_net_no_detectmap must be true or false, got {no_detectmap!r}")
        xl = {k: sdxl_option(k, over.pop(k)) if k in over else options.get(k, d) for k, d in SDXL_OPTIONS.items()}
        if init is not None:  # img2img's (applied by its route); txt2img has no init image: listed as ignored
            over.pop("img2img_background_color", None)
        if body.get("restore_faces") is False:  # A1111 restores no face then, whatever the option: ignored
            fixed = {k: v for k, v in FIXED_OPTIONS.items() if k != "face_restoration"}
        else:
            fixed = FIXED_OPTIONS
        for name in [n for n in over if n in fixed]:  # the ones sdengine runs one way only: that way, or a 400
            check_fixed_option(name, over.pop(name), "override_settings.")
        tiling = over.pop("tiling", options.get("tiling", False)) if body.get("tiling") is None else body["tiling"]
        samp = {k: check_sampler_option(k, over.pop(k)) if k in over else options.get(k, d)
                for k, d in SAMPLER_OPTIONS.items()}  # fmt: skip
        # A1111's Hypertile U-Net options: the request's overrides, else the server's
        tiles = {k: check_hypertile_option(k, over.pop(k), "override_settings.") if k in over else options.get(k, d)
                 for k, d in HYPERTILE_OPTIONS.items()}  # fmt: skip
        ignored.extend(f"override_settings.{k}" for k in over)
        scripts = {str(k).lower(): v for k, v in (req.alwayson_scripts or {}).items()}
        cn = scripts.pop("controlnet", None)
        pag_scale = forge_pag_scale(scripts)  # Forge's PAG script (A1111 has none): sdengine's pag_scale
        freeu = forge_freeu(scripts, (req.model_extra or {}).get("infotext"))  # Forge's FreeU script: sdengine's
        # Forge's Kohya HRFix script (over the infotext's kohya_hrfix_* fields): sdengine's deep_shrink
        deep_shrink = forge_deep_shrink(scripts, (req.model_extra or {}).get("infotext"))
        # Forge's SAG script: sdengine's SAG under ComfyUI's rule
        hires = bool(body.get("enable_hr")) and init is None
        sag = forge_sag(scripts, req.cfg_scale, hires, (req.model_extra or {}).get("infotext"))
        # the Tiled Diffusion extension's MultiDiffusion: sdengine's tiled_diffusion (its txt2img size override)
        tiled, tiled_size = tiled_diffusion_script(scripts, init is None, ignored, notes)
        # A1111's Soft Inpainting script (over the infotext's fields): sdengine's soft_inpainting
        soft = soft_inpainting_script(
            scripts,
            (req.model_extra or {}).get("infotext"),
            txt2img=init is None,
            mask=init is not None and body.get("mask") not in (None, ""),
        )
        kontext = kontext_fields(body)  # sdengine's top-level fields, or the Forge FluxKontext extension's
        extension = forge_kontext(scripts, ignored, notes)
        if extension and "reference_images" in kontext:
            raise BadRequest("reference_images given twice: top-level and in alwayson_scripts (Forge FluxKontext)")
        kontext.update(extension)
        ignored.extend(f"alwayson_scripts.{k}" for k in scripts)
        if cn is not None and not isinstance(cn, dict):
            raise BadRequest("alwayson_scripts.controlnet must be an object: {args: [units]}")
        ignored.extend(f"alwayson_scripts.controlnet.{k}" for k in (cn or {}) if k != "args")
        unit_args = (cn or {}).get("args")
        detect_maps: list[int] = []
        ip_requests: list[IPAdapterRequest] = []
        inpaint_masks: dict[int, str] = {}
        init_mask = body.get("mask") if init is not None else None
        units, resizes, processor_res = control_units(
            unit_args, init, ignored, detect_maps, ip_requests, init_mask, inpaint_masks
        )
        units = keep_inpaint_masks(units, inpaint_masks, catalog.resolve_controlnet, ignored)
        ip_requests = [dataclasses.replace(r, model=ip_adapter_name(r.model)) for r in ip_requests]
        if notes is not None and any((r.start, r.end) != (0.0, 1.0) for r in ip_requests):
            notes.append(
                "IP-Adapter guidance_start/guidance_end: judged by each model call's sigma (ComfyUI_IPAdapter_plus's "
                "rule), not by the extension's step count"
            )
        if not (body.get("enable_hr") and init is None):  # no second pass: no mode of its own to record
            units = [dataclasses.replace(u, hires_mode=None) for u in units]
        if body.get("enable_hr") and init is None and isinstance(unit_args, list):
            for k, u in enumerate(unit_args):  # sdengine's hires fix runs every unit in both passes
                if isinstance(u, dict) and u.get("enabled", True) and u.get("hr_option") not in (None, "Both", 0):
                    ignored.append(f"controlnet.args[{k}].hr_option")
        mode = image_mode if image_mode is not None else (resizes[0][1] if resizes else 0)
        ignored.extend(f"controlnet.args[{k}].resize_mode" for k, m in resizes if m != mode)
        sub_strength = body.get("subseed_strength") or 0.0
        resize_from = [body.get(f"seed_resize_from_{k}", -1) for k in ("w", "h")]
        for side, v in zip(("w", "h"), resize_from, strict=True):
            if isinstance(v, bool) or not isinstance(v, int):
                raise BadRequest(f"seed_resize_from_{side} must be an integer, got {v!r}")
        sampler = req.sampler_name or req.sampler_index or "Euler"  # A1111's names and k_ aliases: sampling.resolve
        sampler_options = sampler_settings(body, samp, sampler, req.scheduler, ignored, notes)
        prompt = req.prompt
        if body.get("disable_extra_networks"):  # A1111 takes the tags out of the prompt and applies none
            prompt = EXTRA_NETWORK.sub("", prompt) if isinstance(prompt, str) else prompt
        return dict(
            model=model,
            prompt=prompt,
            negative_prompt=req.negative_prompt,
            steps=req.steps,
            sampler=sampler,
            sampler_options=sampler_options,
            schedule=req.scheduler or "Automatic",  # A1111 runs p.scheduler or "Automatic" (sampling.A1111_AUTOMATIC)
            cfg_scale=req.cfg_scale,
            pag_scale=pag_scale,
            **freeu,
            **sag,
            **({} if deep_shrink is None else {"deep_shrink": deep_shrink}),
            **hypertile_fields(tiles),
            seed=req.seed,
            width=req.width if tiled_size is None else tiled_size[0],
            height=req.height if tiled_size is None else tiled_size[1],
            **({} if tiled is None else {"tiled_diffusion": tiled}),
            **({"soft_inpainting": soft} if soft else {}),
            batch_size=req.batch_size,
            n_iter=req.n_iter,
            clip_skip=clip_skip,
            # A1111's CLIP_stop_at_last_layers: SD 1.x's CLIP only, as there (and SDXL's CLIP-L with sdxl_clip_l_skip)
            clip_skip_rule=clip_rule,
            vae_decode=vae_decode,
            vae_encode=vae_encode,
            controlnets=units,
            ip_adapters=ip_requests,
            resize_mode=mode,
            processor_res=processor_res,  # taken out by run() before the build
            # A1111's variation seed: subseed + k for image k, and (with a strength above 0) one seed for all
            subseed=body.get("subseed") if sub_strength else None,
            subseed_strength=sub_strength,
            same_seed=True,
            tiling=tiling,  # the request's, else A1111's tiling option (as A1111's p.tiling None)
            # A1111 draws the noise at that size only when both are above 0
            seed_resize_from=(resize_from[0], resize_from[1]) if min(resize_from) > 0 else None,
            noise_seed_delta=ensd,
            noise_source=A1111_RANDN_SOURCES[randn_source],
            # A1111's "Always discard next-to-last sigma" (its DPM2, DPM2 a, DPM++ 3M SDE discard anyway)
            discard_penultimate_sigma=discard,
            zero_terminal_snr=noise_schedule == "Zero Terminal SNR",
            **({} if noise_mult in (None, 1.0) else {"noise_multiplier": noise_mult}),
            # the units whose detected map the answer appends (the extension's), taken out by run()
            detect_maps=[] if no_detectmap else detect_maps,
            img2img_fix_steps=fix_steps,  # taken out by the route (img2img's strength_rule)
            hires_refiner_pass=refiner_pass,  # taken out by run() (Generation.hires_refiner_pass)
            sdxl_options=sdxl_settings(xl),  # taken out by run(): an SDXL model's only (Generation.sdxl_options)
            sd_vae=sd_vae,  # taken out by run() (Generation.vae)
            # the model family's own settings (Forge's distilled_cfg_scale; sdengine's shift and sd3): checked by
            # the build and, against the model's family, by the precheck (flow_fields: Forge's default 3.5)
            **{k: body[k] for k in ("distilled_cfg_scale", "shift", "sd3") if body.get(k) is not None},
            **({"modules": modules} if modules is not None else {}),
            **kontext,  # FLUX.1 Kontext's reference images, Depth / Canny's control image
        )

    def ip_adapter_name(model: str) -> str:
        """An IP-Adapter unit's ``model`` as the extension names it (``name [hash]``, the file's name without its
        suffix) -> the name of GET /v1/ip_adapters; a 400 listing them when none has it."""
        found = resolve_a1111_model(catalog, model)
        if found is None:
            if catalog.ip_adapters_dir is None:
                raise BadRequest(
                    f"unknown IP-Adapter {model!r}: the server has no IP-Adapter files (serve --ip-adapters-dir DIR)"
                )
            have = ", ".join(unit_names(catalog)) or "none"
            raise BadRequest(f"unknown IP-Adapter {model!r}; available: {have}")
        return found

    def build_scaled(fields: dict[str, Any], processor_res: dict[int, int]) -> Any:
        """The build, with each preprocessed unit's image scaled to its ``processor_res`` first (a pixel-perfect
        unit's from its image's size, the output's size rounded down to a multiple of 8 and the resize mode)."""
        units = list(fields.get("controlnets") or [])
        for i, res in processor_res.items():
            u = units[i]
            image = u.image if isinstance(u.image, Image.Image) else services.uploads.image(u.image, f"unit {i}")
            image = ImageOps.exif_transpose(image)
            if res == PIXEL_PERFECT:
                w, h = fields.get("width") or image.width, fields.get("height") or image.height
                res = pixel_perfect_resolution(image.size, w // 8 * 8, h // 8 * 8, int(fields.get("resize_mode", 0)))
            units[i] = dataclasses.replace(u, image=processor_resize(image, res), processor_res=res)
        return services.build(**{**fields, "controlnets": units})

    async def run(
        req: Txt2ImgRequest,
        fields: dict[str, Any],
        ignored: list[str],
        finish: Callable[..., Image.Image] | None = None,
        notes: list[str] | None = None,
        styled: Txt2ImgRequest | None = None,
        refiner: tuple[str, str, float] | None = None,
    ) -> JSONResponse:
        flow_fields(fields, ignored, notes)
        processor_res = fields.pop("processor_res", {})
        detect_maps = fields.pop("detect_maps", [])
        sdxl_options = fields.pop("sdxl_options", None)
        refiner_pass = fields.pop("hires_refiner_pass", "second pass")
        hr_model = fields.pop("hr_model", None)
        sd_vae = fields.pop("sd_vae", "Automatic")
        script = fields.pop("sd_upscale", None)
        infotext_extra = fields.pop("infotext_extra", None)
        images = ("controlnets", "ip_adapters", "reference_images", "control_image", "redux")
        if fields.get("init_image") is None and not any(fields.get(k) for k in images):
            generation = services.build(**fields)  # no image to decode: cheap, and a thread hop less per request
        else:
            generation = await run_in_threadpool(build_scaled, fields, processor_res)
        if finish is not None:
            generation.finish = finish
        generation.infotext_extra = infotext_extra
        # a size the model cannot make (off its multiple, over its limit, the hires fix's too) is a 400 before
        # any job is queued or any model loaded, as POST /v1/jobs answers it
        services.precheck(generation)
        if script is not None:  # A1111's SD upscale: the script makes the n_iter upscales, a call per tile
            overlap, chosen, scale = script
            generation.script = sd_upscale_script(overlap, chosen, scale, generation.n_iter)
            generation.n_iter = 1
        generation.sdxl_options = sdxl_options
        job_vae(generation, sd_vae)
        if refiner is not None:
            from sdengine.pipeline import GenerationRequest
            from sdengine.pipeline.sdxl import check_hand_off

            try:  # what the hand-off cannot run (a LoRA, ControlNet, DDIM, ...): said now, not by a failed job
                check_hand_off(GenerationRequest(**generation.kwargs), refiner[2], "a1111", refiner_pass)
            except SdengineError as e:
                raise BadRequest(f"refiner_checkpoint: {e}") from None
            check_refiner_models(generation, refiner)
            generation.refiner, generation.refiner_name, generation.refiner_switch_at = refiner
            generation.hires_refiner_pass = refiner_pass
        if hr_model is not None:
            check_hr_model(generation, hr_model, refiner is not None and refiner_pass != "first pass")
            generation.hr_model, generation.hr_model_name = hr_model
        if (req.model_extra or {}).get("override_settings_restore_afterwards") is False and req.override_settings:
            # A1111 leaves the overrides set after such a call: they become the options of later jobs
            options.update(checked_options(req.override_settings)[0])
        job, _ = services.submit(generation, protocol="a1111", save=req.save_images, task_id=req.force_task_id)
        await job.wait_finished()
        return _response(job, req, ignored, notes or [], detect_maps, styled)

    def flow_fields(fields: dict[str, Any], ignored: list[str], notes: list[str] | None) -> None:
        """An A1111 request on an SD3 or Flux model runs as Forge runs them where A1111's rules are a U-Net
        sampler's: the scheduler "Automatic" is the model's own flow grid ("normal"), and the step counts of img2img
        and the hires fix are diffusers' (``strength_rule`` "diffusers": A1111's count is not implemented for flow
        models; its img2img_fix_steps is refused by the job's check). Forge's API sends ``distilled_cfg_scale``
        3.5 (its default) for every model: on a model that is not Flux that value is listed as ignored (Forge
        ignores it there too); any other value is the precheck's 400."""
        from sdengine.pipeline.flux import DEV_GUIDANCE

        family = services.family(fields.get("model"))
        if family != "flux" and fields.get("distilled_cfg_scale") == DEV_GUIDANCE:
            fields.pop("distilled_cfg_scale")
            ignored.append("distilled_cfg_scale")
        if family not in FLOW_FAMILIES:
            return
        if family == "flux2":
            flux2_fields(fields, ignored)
        # the extension's soft weights forced on a canny unit in the hires fix's second pass weigh a U-Net's
        # residuals: an SD3 / Flux ControlNet runs that pass as the first ("balanced")
        units = fields.get("controlnets") or []
        fields["controlnets"] = [dataclasses.replace(u, hires_mode=None) for u in units]
        if str(fields.get("schedule") or "").lower() in ("automatic", "auto"):
            fields["schedule"] = "normal"
        if fields.get("strength_rule") == "a1111":
            fields["strength_rule"] = "diffusers"
            if notes is not None and (fields.get("init_image") is not None or fields.get("hires")):
                notes.append(
                    "img2img / hires steps counted as diffusers' (int(steps x strength)): A1111's step rule is not "
                    "implemented for SD3 / Flux models"
                )

    def flux2_fields(fields: dict[str, Any], ignored: list[str]) -> None:
        """A FLUX.2 model on an A1111 route: A1111's default ``cfg_scale`` (7, which its clients send for every
        model) on a step-distilled klein or on [dev] (no CFG) is listed as ignored and runs at 1, as diffusers ignores
        guidance there
        (any other value but 1 is the precheck's 400); Forge FluxKontext's reference images are refused: klein
        edit's references go on the native job route (POST /v1/jobs ``reference_images``)."""
        if fields.get("reference_images"):
            raise BadRequest(
                "reference_images on the A1111 routes (top-level or Forge FluxKontext's) are FLUX.1 Kontext's; a "
                "FLUX.2 [klein] model takes its reference images (klein edit) on POST /v1/jobs (reference_images)"
            )
        if fields.get("cfg_scale") == A1111_CFG and services.flux2_distilled(fields.get("model")):
            fields["cfg_scale"] = 1.0
            ignored.append("cfg_scale")

    def check_hr_model(generation: Any, hr_model: tuple[str, str], hands_off: bool) -> None:
        """A1111's ``hr_checkpoint_name`` naming another model: what its second pass cannot run is a 400 before
        any job is queued (a LoRA or tiling, which sdengine applies to one model per call; a model that is not
        SDXL where the second pass hands off to a refiner); another latent space is told by the loaded models."""
        from sdengine.pipeline import GenerationRequest

        r = GenerationRequest(**generation.kwargs)
        from sdengine.prompts import extract_lora_tags

        texts = [r.prompt] if isinstance(r.prompt, str) else [t for t in r.prompt or [] if isinstance(t, str)]
        if r.loras or any(extract_lora_tags(t)[1] for t in [*texts, r.hr_prompt]):
            raise BadRequest(f"hr_checkpoint_name {hr_model[1]!r}: LoRAs are not supported with another hires model")
        if r.tiling:
            raise BadRequest(f"hr_checkpoint_name {hr_model[1]!r}: tiling is not supported with another hires model")
        from sdengine.server.page_api import sdxl_before_load

        if hands_off and sdxl_before_load(hr_model[0]) is False:
            raise BadRequest(
                f"hr_checkpoint_name: {hr_model[1]!r} is not an SDXL model (its second pass hands off to the refiner)"
            )

    def check_refiner_models(generation: Any, refiner: tuple[str, str, float]) -> None:
        """A refiner hand-off needs SDXL models (the base and the refiner): another model is a 400 before any job
        is queued or model loaded, by the loaded pipeline where a worker holds it, else by the model's files; a
        model whose kind cannot be told before its load is left to the job."""
        from sdengine.server.page_api import sdxl_before_load

        loaded = next((w.pipe for w in manager.workers if w.model == generation.model and w.pipe is not None), None)
        base = hasattr(loaded, "generate_with_refiner") if loaded is not None else sdxl_before_load(generation.model)
        if base is False:
            raise BadRequest(
                f"refiner_checkpoint: a refiner needs an SDXL base model; {generation.model_name!r} is not one"
            )
        if sdxl_before_load(refiner[0]) is False:
            raise BadRequest(f"refiner_checkpoint: {refiner[1]!r} is not an SDXL model (a refiner must be one)")

    def detected_maps(job: Job, units: list[int], final: tuple[int, int] | None) -> list[Image.Image]:
        """The extension's detected maps of ``units`` (places in the job's units): each unit's control image
        after its preprocessor, fitted to the image size as sdengine fed it to the ControlNet; with the hires
        fix the one fitted to the final size first, as the extension stores them."""
        kw = job.generation.kwargs
        cns = kw.get("controlnets") or []
        size = (kw["width"], kw["height"])
        mode = resize_mode_name(kw.get("resize_mode", 0))
        out = []
        for i in units:
            image = cns[i].image
            if not isinstance(image, Image.Image):
                continue
            for w, h in ([final] if final is not None and final != size and kw.get("enable_hr") else []) + [size]:
                out.append(resize_image(image.convert("RGB"), w, h, mode))
        return out

    def _response(
        job: Job,
        req: Txt2ImgRequest,
        ignored: list[str],
        notes: list[str],
        detect_maps: list[int] | None = None,
        styled: Txt2ImgRequest | None = None,
    ) -> JSONResponse:
        if job.state == FAILED:
            status = 500 if (job.error or "").startswith("internal error") else 400
            msg = job.error or "failed"
            return JSONResponse(
                {"error": "GenerationError", "detail": msg, "body": "", "errors": msg}, status_code=status
            )
        images = [im.image for im in job.images if im.image is not None]
        interrupted = job.state == CANCELLED
        # every batch skipped: A1111 answers the skipped image as far as it got (its sampler returns the last
        # latent), never an empty list; sdengine its last preview, as for an interrupted one
        skipped = job.state == DONE and not images
        if (interrupted or skipped) and not images and (got := job.preview()) is not None:
            w, h = job.generation.kwargs["width"] or 512, job.generation.kwargs["height"] or 512
            images = [Image.open(io.BytesIO(got[0])).convert("RGB").resize((w, h), Image.Resampling.NEAREST)]
            if skipped:
                notes = [*notes, f"skipped at step {job.step} of {job.steps}: the image is its last preview"]
        kw = job.generation.kwargs
        seeds = [im.seed for im in job.images] or [int(kw["seed"][0] if isinstance(kw["seed"], list) else kw["seed"])]
        subseeds = [int(kw["subseed"]) + k for k in range(len(seeds))] if kw.get("subseed") is not None else seeds
        texts = [im.infotext for im in job.images]
        from sdengine.diffusion.sampling import SAMPLERS, SCHEDULE_A1111
        from sdengine.metadata import format_parameters, parse_parameters

        if len(texts) < len(images):  # the interrupted image (a preview): its infotext as far as it is known,
            params = {k: kw.get(k) for k in ("prompt", "negative_prompt", "steps", "sampler", "schedule")}
            params |= {k: kw.get(k) for k in ("cfg_scale", "seed", "width", "height")}  # so clients may index
            texts += [format_parameters(params)] * (len(images) - len(texts))  # infotexts like images

        recorded = parse_parameters(texts[0]) if texts and texts[0] else {}  # the hashes the image was made with
        info = {
            "prompt": req.prompt,
            # as A1111: the request's prompts, and every image's with the styles merged in
            "all_prompts": [(styled or req).prompt] * len(seeds),
            "negative_prompt": req.negative_prompt,
            "all_negative_prompts": [(styled or req).negative_prompt] * len(seeds),
            "seed": seeds[0],
            "all_seeds": seeds,
            "subseed": subseeds[0],
            "all_subseeds": subseeds,
            "subseed_strength": kw.get("subseed_strength", 0),
            "width": kw["width"],
            "height": kw["height"],
            "sampler_name": SAMPLERS[kw["sampler"]].a1111,  # resolved, as A1111 reports it ("DPM++ 2M")
            "cfg_scale": kw["cfg_scale"],
            "steps": kw["steps"],
            "batch_size": kw["batch_size"],
            "restore_faces": False,
            "face_restoration_model": None,
            "sd_model_name": job.generation.model_name,
            "sd_model_hash": recorded.get("Model hash"),
            "sd_vae_name": recorded.get("VAE"),
            "sd_vae_hash": recorded.get("VAE hash"),
            "seed_resize_from_w": kw.get("seed_resize_from_w", -1),
            "seed_resize_from_h": kw.get("seed_resize_from_h", -1),
            "denoising_strength": kw["strength"] if kw["init_image"] is not None or kw.get("enable_hr") else None,
            "extra_generation_params": {"Schedule type": SCHEDULE_A1111[kw["schedule"]]},
            "index_of_first_image": 0,
            "infotexts": texts,
            "styles": req.styles,
            "job_timestamp": datetime.fromtimestamp(job.created).strftime("%Y%m%d%H%M%S"),
            "clip_skip": kw["clip_skip"],
            "is_using_inpainting_conditioning": False,
            "version": f"sdengine {_version()}",
            "id_task": job.task_id,
            "ignored": ignored,
            "interrupted": interrupted,
            "notes": [*notes, *job.notes],
        }
        for im in job.images:
            if im.name:
                info.setdefault("files", []).append(im.name)
        params = req.model_dump()
        if isinstance(req, Img2ImgRequest):
            if not req.include_init_images:  # A1111 answers them only when asked, else null
                params.update(init_images=None, mask=None)
        else:
            params = {k: v for k, v in params.items() if k not in ("init_images", "mask")}
        if detect_maps and images:  # the extension appends them after the images (no infotext of their own)
            images += detected_maps(job, detect_maps, images[0].size)
        labels: list[str | None] = [*texts, *[None] * (len(images) - len(texts))][: len(images)]
        return JSONResponse(
            {
                "images": [_b64_png(i, t) for i, t in zip(images, labels, strict=True)] if req.send_images else [],
                "parameters": params,
                "info": json.dumps(info),
            }
        )

    @app.post("/sdapi/v1/txt2img", tags=["a1111"])
    async def txt2img(req: Txt2ImgRequest) -> JSONResponse:
        req, xl_rest, clip = apply_infotext(req, hires=True)
        body = req.model_dump(exclude_unset=True)
        refuse_unsupported(body, txt2img=True)
        first = [body.get("firstphase_width") or 0, body.get("firstphase_height") or 0]
        if any(first):  # A1111 (its __post_init__): the image, or the hires fix's first pass, has that size
            if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in first):
                raise Unprocessable(
                    f"firstphase_width {first[0]!r} and firstphase_height {first[1]!r}: A1111 makes the first pass "
                    "that size, so both must be above 0 (or both 0: width and height)"
                )
            req = req.model_copy(update={"width": first[0], "height": first[1]})
        ignored = _ignored(body, txt2img=True)
        if "resize_mode" in body:  # an img2img field (txt2img fits ControlNet images by their units' modes)
            ignored.append("resize_mode")
        notes: list[str] = []
        styled = with_styles(req)
        fields = generation_fields(styled, body, ignored, None, notes=notes, clip=clip)
        fields.pop("img2img_fix_steps")
        fields["sdxl_options"].update(xl_rest)  # the infotext's SDXL settings A1111 has no option for
        refiner = hand_off(body, fields, ignored)
        fields["strength_rule"] = "a1111"  # A1111's step rules: its DDIM / PLMS grid (and the hires fix's count)
        if req.enable_hr:
            fields["hr_model"] = same_checkpoint(body, fields, ignored)
            hires = {
                "hr_scale": req.hr_scale,
                "hr_upscaler": req.hr_upscaler or "Latent",  # A1111's latent_upscale_default_mode
                "hr_second_pass_steps": req.hr_second_pass_steps,
                "hr_resize_x": req.hr_resize_x,
                "hr_resize_y": req.hr_resize_y,
                "hr_sampler": None if req.hr_sampler_name in SAME_SAMPLER else req.hr_sampler_name,
                "hr_schedule": None if req.hr_scheduler in SAME_SCHEDULER else req.hr_scheduler,
                "hr_prompt": styled.hr_prompt,
                "hr_negative_prompt": styled.hr_negative_prompt,
            }
            strength = 0.75 if req.denoising_strength is None else req.denoising_strength  # A1111's default
            fields.update(hires=hires, strength=strength, strength_rule="a1111")  # A1111's step count
        return await run(req, fields, ignored, notes=notes, styled=styled, refiner=refiner)

    def hand_off(body: dict[str, Any], fields: dict[str, Any], ignored: list[str]) -> tuple[str, str, float] | None:
        """The SDXL refiner (A1111's ``refiner_checkpoint`` / ``refiner_switch_at``): (loader reference,
        listed name, switch), or None where A1111 runs no refiner: none named, the job's own model (its
        ``apply_refiner`` skips the switch to the loaded checkpoint), or a switch at 1 (no step reaches it)."""
        name = body.get("refiner_checkpoint")
        if name in NO_REFINER:
            return None
        if "refiner_checkpoint" in ignored:
            ignored.remove("refiner_checkpoint")
        if not isinstance(name, str):
            raise BadRequest(f"refiner_checkpoint must be a model name, got {name!r}")
        ref = services.catalog.resolve_model(name)  # a BadRequest naming the models for an unknown one
        switch = body.get("refiner_switch_at")
        if switch is None:  # A1111's default None: its apply_refiner switches before the first step (at 0 too)
            switch = 0.0
        if isinstance(switch, bool) or not isinstance(switch, int | float) or not 0 <= switch <= 1:
            raise BadRequest(
                f"refiner_switch_at must be a number in [0, 1] with a refiner_checkpoint, got {switch!r} "
                "(the fraction of the steps the base model runs; none: the refiner runs every step, as in A1111)"
            )
        base = services.catalog.resolve_model(
            fields.get("model") or str(options.get("sd_model_checkpoint") or services.config.model)
        )
        if ref == base or switch == 1:
            return None
        return ref, services.catalog.model_name_of(ref), float(switch)

    def same_checkpoint(body: dict[str, Any], fields: dict[str, Any], ignored: list[str]) -> tuple[str, str] | None:
        """A1111's ``hr_checkpoint_name``: (loader reference, listed name) of the second pass's model where it is
        another model (the worker loads it beside the job's: A1111 loads it for the second pass); None for none,
        "Use same checkpoint" or the job's own model (A1111 reloads it: the same image); an unknown name is a 400
        naming the models."""
        name = body.get("hr_checkpoint_name")
        if name in SAME_CHECKPOINT:
            return None
        if not isinstance(name, str):
            raise BadRequest(f"hr_checkpoint_name must be a model name, got {name!r}")
        ref = services.catalog.resolve_model(name)
        base = services.catalog.resolve_model(
            fields.get("model") or str(options.get("sd_model_checkpoint") or services.config.model)
        )
        if "hr_checkpoint_name" in ignored:
            ignored.remove("hr_checkpoint_name")
        if ref == base:
            return None
        return ref, services.catalog.model_name_of(ref)

    @app.post("/sdapi/v1/img2img", tags=["a1111"])
    async def img2img(req: Img2ImgRequest) -> JSONResponse:
        req, xl_rest, clip = apply_infotext(req, hires=False)
        body = req.model_dump(exclude_unset=True)
        if not req.init_images:
            raise BadRequest("img2img needs init_images (one base64 image)")
        refuse_unsupported(body, txt2img=False)  # resize_mode 3, a second init image, ...
        over = req.override_settings or {}
        if "img2img_background_color" in over:
            color = check_background(over["img2img_background_color"], "override_settings.")
        else:
            color = options.get("img2img_background_color", "#ffffff")
        init = await run_in_threadpool(services.uploads.image, req.init_images[0], "init image")
        flat = await run_in_threadpool(flatten_init, init, color)
        if flat is not None:  # A1111 lays a transparent init image over its background colour (white) first
            req = req.model_copy(update={"init_images": [_b64_png(flat), *req.init_images[1:]]})
        assert req.init_images  # (for mypy: the copy keeps them)
        ignored = _ignored(body)
        if not req.mask:  # the inpainting fields do nothing without a mask (in A1111 too)
            ignored = [k for k in ignored if k not in ("inpainting_fill", "inpaint_full_res")]
        else:  # a separate latent mask is read with a mask (inpaint_fields)
            ignored = [k for k in ignored if k != "latent_mask"]
            if req.inpainting_fill in LATENT_FILLS:  # done in the latent by the pipeline
                ignored = [k for k in ignored if k != "inpainting_fill"]
        mode = req.resize_mode
        latent_resize = mode == LATENT_UPSCALE_MODE  # the init image's latent resized (no mask: refused above)
        if latent_resize:
            mode = 0
        notes: list[str] = []
        styled = with_styles(req)
        fields = generation_fields(styled, body, ignored, req.init_images[0], mode, notes, clip)
        if latent_resize:
            if fields["controlnets"]:
                raise Unprocessable("resize_mode 3: A1111's latent upscale takes no ControlNet unit in sdengine")
            fields["init_latent_resize"] = True
        fields["sdxl_options"].update(xl_rest)  # the infotext's SDXL settings A1111 has no option for
        strength = 0.75 if req.denoising_strength is None else req.denoising_strength  # A1111's default
        blur = _mask_blur(body)
        # A1111's step count: int(min(strength, 0.999) * steps) + 1 steps, one even at strength 0; with its
        # img2img_fix_steps the steps asked, of a schedule of steps / strength
        rule = "a1111_fix_steps" if fields.pop("img2img_fix_steps") else "a1111"
        fields.update(init_image=req.init_images[0], mask=None, mask_blur=0.0, strength=strength, strength_rule=rule)
        if req.mask and req.inpainting_fill in LATENT_FILLS:
            fields["masked_content"] = LATENT_FILLS[req.inpainting_fill]
        if body.get("image_cfg_scale") is not None:  # instruct-pix2pix's; other models ignore it, as A1111's
            fields["image_cfg_scale"] = body["image_cfg_scale"]
        if body.get("initial_noise_multiplier") is not None:  # A1111's "Noise multiplier" (checked by the build)
            fields["noise_multiplier"] = body["initial_noise_multiplier"]
        # A1111 runs the refiner in img2img too, switching on the img2img's schedule (with a mask, its blend runs on
        # the refiner's steps as well)
        refiner = hand_off(body, fields, ignored)
        if is_sd_upscale(body):
            for what, given in (("mask", req.mask), ("ControlNet units", fields["controlnets"])):
                if given:
                    raise BadRequest(f"script {SD_UPSCALE_TITLE!r}: {what} cannot be used with it in sdengine")
            names = [*EXTRAS_UPSCALERS, *(e.name for e in catalog.upscalers())]
            overlap, name, scale = sd_upscale_args(body, names)
            chosen = (name, None) if name in EXTRAS_UPSCALERS else catalog.resolve_upscaler(name)
            init_size = (await run_in_threadpool(services.uploads.image, req.init_images[0], "init image")).size
            try:  # the scale, the grid and the overlap: a 400 before any job is queued
                from sdengine.sd_upscale import check_scale, plan_grid

                big = check_scale(init_size, scale, name)
                plan_grid(*big, req.width, req.height, overlap)
            except SdengineError as e:
                raise BadRequest(str(e)) from None
            if big[0] * big[1] > services.config.max_image_pixels:
                raise BadRequest(
                    f"script {SD_UPSCALE_TITLE!r}: the upscaled image {big[0]}x{big[1]} is over this server's limit "
                    f"of {services.config.max_image_pixels} pixels (--max-image-pixels)"
                )
            fields["sd_upscale"] = (overlap, chosen, scale)
        finish = None
        if req.mask:
            size: tuple[int, int] | None = (req.width, req.height)
            if not all(isinstance(v, int) and 8 <= v <= services.config.max_side for v in (req.width, req.height)):
                size = None  # refused by the request's checks
            finish = await run_in_threadpool(
                inpaint_fields, fields, req, body, blur, resize_mode_name(mode), size, notes, ignored
            )
        return await run(req, fields, list(dict.fromkeys(ignored)), finish, notes, styled, refiner)

    def inpaint_fields(
        fields: dict[str, Any],
        req: Img2ImgRequest,
        body: dict[str, Any],
        blur: tuple[float, float],
        mode: str,
        size: tuple[int, int] | None,
        notes: list[str],
        ignored: list[str],
    ) -> Callable[..., Image.Image] | None:
        """The pipeline's init image, mask and blur of an A1111 inpainting request (in ``fields``) and the
        overlay that lays the result over the init image: "whole picture", or "only masked" with
        ``inpaint_full_res``; masked content "fill" (``inpainting_fill`` 0), "original" (1), "latent noise" (2),
        "latent nothing" (3). As A1111's ``StableDiffusionProcessingImg2Img.init``: the mask read by
        :func:`a1111_mask` (grey kept grey), inverted, blurred at its own size (``mask_blur_x`` then ``_y``, 8 bits),
        fitted to the output like the init image; the pipeline gets that mask unblurred further (its latent mask
        is rounded from it, an inpainting model's mask channel and masked image made binary from it, as A1111's),
        the init image "filled" under it for every masked content but "original", and the overlay weighs the
        generated image by it (doubled on the whole picture)."""
        assert req.mask is not None and req.init_images
        soft = fields.get("soft_inpainting")
        # soft inpainting: A1111's mask_round off, an RGBA mask's alpha kept grey too; the pipeline answers with its
        # images as generated and their composite masks, which soft_overlay lays over the init image (before any fill)
        rounded = body.get("mask_round") is not False and not soft
        if not rounded and not soft:  # A1111's mask_round off: the latent mask and an inpainting model's left grey
            fields["mask_round"] = False
        raw = ImageOps.exif_transpose(services.uploads.image(req.mask, "mask"))
        mask = a1111_mask(raw, rounded=rounded)
        if req.inpainting_mask_invert:
            mask = ImageOps.invert(mask)
        init = ImageOps.exif_transpose(services.uploads.image(req.init_images[0], "init image"))
        fill = req.inpainting_fill in (0, *LATENT_FILLS)  # A1111 fills the image unless "original"
        fill_mask = None  # the mask A1111 fills under: its latent mask (the blurred, fitted mask unless latent_mask)
        if body.get("latent_mask") not in (None, ""):
            fill_mask = separate_latent_mask(fields, body["latent_mask"], fill, size)
        if blur[0] == blur[1] and blur[0] > 0:  # A1111's "Mask blur" (not written when the two differ)
            fields.setdefault("infotext_extra", {})["Mask blur"] = f"{blur[0]:g}"
        if fields.get("controlnets"):
            fields["controlnets"] = unit_masks(fields["controlnets"], raw, req, blur)
        if soft:
            fields["soft_inpainting"] = {**soft, "composite": False}
        soft_mask = blurred_mask(mask, blur)
        fields["mask_blur"] = 0.0  # blurred here, as A1111 blurs it
        if size is None:  # refused by the request's checks
            fields["mask"] = soft_mask
            return None
        if body.get("inpaint_full_res"):
            padding = body.get("inpaint_full_res_padding") or 0
            if isinstance(padding, bool) or not isinstance(padding, int) or not 0 <= padding <= 4096:
                raise BadRequest(f"inpaint_full_res_padding must be an integer in [0, 4096], got {padding!r}")
            plan = only_masked(init, mask, blur, padding, size, fill, fill_mask)
            if plan is None:  # as A1111: nothing to repaint, so img2img of the whole image
                notes.append('the mask is empty: "Only masked" inpainting became img2img of the whole image')
                fields.pop("soft_inpainting", None)  # A1111's script blends nothing then either
                fields.pop("masked_content", None)  # nor its latent masked content (no latent mask)
                fields.pop("latent_mask", None)  # (A1111 reads its latent_mask only with a mask)
                fields.pop("mask_round", None)
                fields["mask"] = None
                return None
            fields.update(init_image=plan.cut, mask=plan.mask)
            fields["controlnets"] = cropped_units(fields.get("controlnets") or [], plan, req, mode, body)
            if soft:
                return soft_overlay(init, "just resize", plan.region)
            return plan.finish
        # A1111 fits the blurred mask as the image (resize_image in the resize mode; Lanczos for "just resize")
        fitted_mask = resize_image(soft_mask, *size, mode) if soft_mask.size != size else soft_mask
        fields["mask"] = fitted_mask
        if fill:  # A1111 fills the fitted init image under its blurred, fitted mask (or its latent_mask)
            fitted = resize_image(init.convert("RGB"), *size, mode)
            fields["init_image"] = masked_fill(fitted, fitted_mask if fill_mask is None else fill_mask)
        if soft:
            return soft_overlay(init, mode)
        return overlay_finish(init, mask, blur, mode)

    def separate_latent_mask(
        fields: dict[str, Any], sent: Any, fill: bool, size: tuple[int, int] | None
    ) -> Image.Image:
        """A1111's ``latent_mask`` (with a mask; decoded as the mask is): as A1111's ``init`` uses it, neither
        inverted, blurred, fitted nor cut ("Only masked"): its latent mask is the image made RGB, its first channel
        shrunk to the latent (the pipeline's ``latent_mask``, rounded unless ``mask_round`` is off), and the "fill"
        of every masked content but "original" is made under it converted to grey (``L``), so there it must have
        the output's size (A1111 fails otherwise). Returns the fill's mask."""
        image = ImageOps.exif_transpose(services.uploads.image(sent, "latent_mask"))
        if fill and size is not None and image.size != size:
            raise BadRequest(
                f"latent_mask is {image.width}x{image.height}: A1111 fills the image under it (inpainting_fill 0, 2, "
                f"3), which needs the output's size {size[0]}x{size[1]}; send it at that size, or inpainting_fill 1"
            )
        fields["latent_mask"] = image.convert("RGB").getchannel("R")  # A1111's latmask: the RGB image's first channel
        return image.convert("L")

    def unit_masks(units: list[Any], raw: Image.Image, req: Img2ImgRequest, blur: tuple[float, float]) -> list[Any]:
        """The img2img mask as sd-webui-controlnet hands it to an inpainting unit without an image of its own (its
        ``prepare_mask`` of A1111's ``image_mask``): the mask as sent made grey (PIL's ``L``, not an RGBA mask's
        alpha: such a mask with transparency is a one-line 400 rather than another mask than the request's),
        inverted with ``inpainting_mask_invert``, blurred by ``mask_blur_x`` / ``mask_blur_y`` as A1111 blurs
        (8 bits, its kernel size). The unit's own masks are left as sent, as the extension leaves them."""
        out = []
        for k, u in enumerate(units):
            if u.mask is not req.mask:
                out.append(u)
                continue
            if raw.mode == "RGBA" and raw.getextrema()[-1] != (255, 255):
                raise BadRequest(
                    f"ControlNet unit {k}: the img2img mask is RGBA with transparency, whose alpha A1111 reads while "
                    "sd-webui-controlnet's inpainting unit reads its grey levels: send a grey mask (white = repaint), "
                    "or give the unit its own mask_image"
                )
            grey = raw.convert("L")
            if req.inpainting_mask_invert:
                grey = ImageOps.invert(grey)
            out.append(dataclasses.replace(u, mask=blurred_mask(grey, blur)))
        return out

    def cropped_units(
        units: list[Any], plan: OnlyMasked, req: Img2ImgRequest, mode: str, body: dict[str, Any]
    ) -> list[Any]:
        """The ControlNet units of "Only masked" inpainting as sd-webui-controlnet crops them (its
        ``inpaint_crop_input_image``, true by default): each unit's image and mask cut by the plan's box and
        fitted to the output, as the init image is; a unit without an image of its own takes the cut init image
        (before "fill"); reference units keep their image whole (the extension's rule), and so the whole init
        image."""
        args = ((body.get("alwayson_scripts") or {}).get("controlnet") or {}).get("args")
        for k, u in enumerate(args if isinstance(args, list) else []):
            if isinstance(u, dict) and u.get("inpaint_crop_input_image") is False and u.get("enabled", True):
                raise BadRequest(
                    f'ControlNet unit {k}: inpaint_crop_input_image false (the whole image in "Only masked" '
                    "inpainting) is not supported: leave it true, or inpaint the whole picture"
                )
        own = req.init_images[0] if req.init_images else None
        out = []
        for k, u in enumerate(units):
            if u.model in REFERENCE_MODULES:
                out.append(u)
                continue
            if u.image is own:
                image = plan.plain
            else:
                picture = u.image if isinstance(u.image, Image.Image) else services.uploads.image(u.image, f"unit {k}")
                image = plan.crop(ImageOps.exif_transpose(picture).convert("RGB"), mode)
            unit_mask = u.mask  # the request's mask too as sent (the extension's prepare_mask: not made binary)
            if unit_mask is not None:
                if not isinstance(unit_mask, Image.Image):
                    unit_mask = services.uploads.image(unit_mask, f"ControlNet unit {k} mask")
                unit_mask = plan.crop(ImageOps.exif_transpose(unit_mask).convert("L"), mode)
            out.append(dataclasses.replace(u, image=image, mask=unit_mask))
        return out

    def current() -> Job | None:
        running = visible(manager.running())  # another client's job (and its preview) is not this one's progress
        a1111 = [j for j in running if j.protocol == "a1111"]
        return a1111[0] if a1111 else running[0] if running else None

    @app.get("/sdapi/v1/progress", tags=["a1111"])
    def progress(skip_current_image: bool = False) -> dict[str, Any]:
        job = current()
        count = len(manager.running()) + manager.queued_count()
        state = {
            "skipped": False,
            "interrupted": False,
            "stopping_generation": False,
            "job": "",
            "job_count": count,
            "job_timestamp": "0",
            "job_no": 0,
            "sampling_step": 0,
            "sampling_steps": 0,
        }
        if job is None:
            return {
                "progress": 0.0,
                "eta_relative": 0.0,
                "state": state,
                "current_image": None,
                "textinfo": None,
                "current_task": None,
            }
        state.update(
            job=f"task({job.task_id})",
            interrupted=job.cancel.is_set(),
            skipped=job.skip.is_set(),
            job_timestamp=datetime.fromtimestamp(job.created).strftime("%Y%m%d%H%M%S"),
            sampling_step=job.step,
            sampling_steps=job.steps,
        )
        image = None
        if not skip_current_image and (got := job.preview()) is not None:  # decoded now when nobody watched
            image = base64.b64encode(got[0]).decode()
        return {
            "progress": round(job.progress, 4),
            "eta_relative": job.eta or 0.0,
            "state": state,
            "current_image": image,
            "textinfo": f"step {job.step} of {job.steps}",
            "current_task": job.task_id,
        }

    @app.post("/internal/progress", tags=["a1111"])
    def internal_progress(req: ProgressRequest) -> dict[str, Any]:
        job = manager.by_task_id(req.id_task) if req.id_task else None
        if job is None:
            return {
                "active": False,
                "queued": False,
                "completed": False,
                "progress": None,
                "eta": None,
                "live_preview": None,
                "id_live_preview": -1,
                "textinfo": "unknown task",
            }
        preview = None
        got = job.preview() if req.live_preview else None  # decoded now when nobody watched the job
        if got is not None and got[1] != req.id_live_preview:
            preview = "data:image/png;base64," + base64.b64encode(got[0]).decode()
        return {
            "active": job.state == "running",
            "queued": job.state == "queued",
            "completed": job.state in (DONE, FAILED, CANCELLED),
            "progress": round(job.progress, 4),
            "eta": job.eta,
            "live_preview": preview,
            "id_live_preview": job.preview_step,
            "textinfo": job.error or f"step {job.step} of {job.steps}",
        }

    async def targets(request: Request) -> list[Job]:
        body: dict[str, Any] = {}
        raw = await request.body()
        if raw.strip():
            try:
                parsed = json.loads(raw)
            except ValueError:
                raise BadRequest('the body must be JSON ({} or {"id_task": ...})') from None
            body = parsed if isinstance(parsed, dict) else {}
        task = body.get("id_task")
        if task:
            job = manager.by_task_id(str(task))
            return [job] if job is not None and job.state in ("queued", "running") else []
        return [j for j in visible(manager.running()) if j.protocol == "a1111"]  # this client's (the admin: all)

    @app.post("/sdapi/v1/interrupt", tags=["a1111"])
    async def interrupt(request: Request) -> dict[str, Any]:
        jobs = await targets(request)
        for j in jobs:
            manager.cancel(j)
        return {"interrupted": [j.task_id for j in jobs]}

    @app.post("/sdapi/v1/skip", tags=["a1111"])
    async def skip(request: Request) -> dict[str, Any]:
        # a running job's current batch only: a queued job has none yet, and A1111 clears a skip when a job begins
        # (State.begin), so a skip sent to a job still waiting used to eat its first batch once it ran
        jobs = [j for j in await targets(request) if j.state == "running"]
        for j in jobs:
            j.skip.set()
        return {"skipped": [j.task_id for j in jobs]}

    @app.post("/sdapi/v1/png-info", tags=["a1111"])
    def png_info(req: PngInfoRequest) -> dict[str, Any]:
        from sdengine.metadata import parse_parameters

        if not req.image:
            raise BadRequest("send the image as base64 in 'image'")
        from sdengine.image_info import EXIF_IFD, USER_COMMENT, decode_user_comment

        im = services.uploads.image(req.image, "image")
        items = {k: v for k, v in im.info.items() if isinstance(v, str)}
        text = items.pop("parameters", None)  # A1111's items are the image's other entries
        if text is None:  # a JPEG or WebP: the EXIF UserComment, as A1111 reads it
            comment = im.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
            if comment is not None:
                text = decode_user_comment(comment)
                items["exif comment"] = text
        text = text or ""
        try:
            parsed = parse_parameters(text) if text else {}
        except ValueError:
            parsed = {}
        return {"info": text, "items": items, "parameters": a1111_fields(parsed) if text else {}}

    @app.get("/sdapi/v1/sd-models", tags=["a1111"])
    def sd_models() -> list[dict[str, Any]]:
        return [
            {"title": e.name, "model_name": e.name, "hash": None, "sha256": None, "filename": e.name, "config": None}
            for e in catalog.models()
        ]

    @app.post("/sdapi/v1/refresh-checkpoints", tags=["a1111"])
    def refresh_checkpoints() -> dict[str, Any]:
        return {}

    @app.get("/sdapi/v1/samplers", tags=["a1111"])
    def samplers() -> list[dict[str, Any]]:
        k_names: dict[str, list[str]] = {}
        for alias, name in sampling.K_ALIASES.items():
            k_names.setdefault(name, []).append(alias)
        return [
            {"name": s.a1111, "aliases": [s.name, *k_names.get(s.name, [])], "options": {}}
            for s in sampling.SAMPLERS.values()
            if s.in_a1111
        ]

    @app.get("/sdapi/v1/schedulers", tags=["a1111"])
    def schedulers() -> list[dict[str, Any]]:
        out = [
            {"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False}
        ]
        out += [
            {"name": k, "label": v, "aliases": None, "default_rho": -1, "need_inner_model": False}
            for k, v in sampling.SCHEDULE_A1111.items()
            if k != "align_your_steps_sdxl"  # A1111 has one "Align Your Steps" (the model picks the table)
        ]
        return out

    @app.get("/sdapi/v1/loras", tags=["a1111"])
    def loras() -> list[dict[str, Any]]:
        return [{"name": e.name, "alias": e.name, "path": e.name, "metadata": {}} for e in catalog.loras()]

    @app.post("/sdapi/v1/refresh-loras", tags=["a1111"])
    def refresh_loras() -> dict[str, Any]:
        return {}

    @app.get("/sdapi/v1/sd-vae", tags=["a1111"])
    def sd_vaes() -> list[dict[str, Any]]:
        """A1111's SDVaeItem list: ``model_name`` the file name ``sd_vae`` takes (the VAEs of ``--vaes-dir`` and
        the ``NAME.vae.safetensors`` of ``--models-dir``); ``filename`` the same name, as sd-models answers it:
        the server's paths are not told to clients (A1111 gives its full path)."""
        return [{"model_name": e.name, "filename": e.name} for e in catalog.sd_vaes()]

    @app.post("/sdapi/v1/refresh-vae", tags=["a1111"])
    def refresh_vae() -> dict[str, Any]:
        return {}  # the folder is read on every request

    for path in (
        "hypernetworks",
        "face-restorers",
        "realesrgan-models",
        "sd-modules",
    ):
        app.add_api_route(
            f"/sdapi/v1/{path}", _empty_list, methods=["GET"], tags=["a1111"], name=f"a1111_{path.replace('-', '_')}"
        )

    @app.get("/sdapi/v1/prompt-styles", tags=["a1111"])
    def a1111_prompt_styles() -> list[dict[str, Any]]:
        """The styles of ``--styles-file`` (A1111's PromptStyleItem), in the file's order; none without one."""
        return [
            {"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt} for s in prompt_styles().values()
        ]

    @app.get("/sdapi/v1/upscalers", tags=["a1111"])
    def upscalers() -> list[dict[str, Any]]:
        """The pixel upscalers the hires fix and the extras take (A1111's UpscalerItem): None, Lanczos, then the
        upscaler models of --upscalers-dir (by file name without its suffix; ``scale`` 4, as A1111 lists its ESRGAN
        folder, whatever the file's own)."""
        out: list[dict[str, Any]] = [
            {"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 4} for n in EXTRAS_UPSCALERS
        ]
        for e in catalog.upscalers():
            out.append(
                {"name": e.name, "model_name": "ESRGAN", "model_path": Path(e.ref).name, "model_url": None, "scale": 4}
            )
        return out

    @app.get("/sdapi/v1/latent-upscale-modes", tags=["a1111"])
    def latent_upscale_modes() -> list[dict[str, Any]]:
        from sdengine.pipeline.hires import LATENT_UPSCALERS

        return [{"name": n} for n in LATENT_UPSCALERS]

    @app.post("/sdapi/v1/extra-single-image", tags=["a1111"])
    def extra_single_image(req: ExtrasRequest) -> dict[str, Any]:
        if not req.image:
            raise BadRequest("send the image as base64 in 'image'")
        extras_unknown(req)
        out, info = extras_upscale(
            services.uploads.image(req.image, "image"), req, services.config.max_image_pixels, catalog
        )
        return {"html_info": extras_info(info), "image": _b64_png(out) if req.show_extras_results else None}

    def extras_info(info: dict[str, Any]) -> str:
        text = ", ".join(f"{k}: {v:g}" if isinstance(v, float) else f"{k}: {v}" for k, v in info.items())
        return f"<p>{text}</p>" if text else ""

    def extras_unknown(req: ExtrasRequest) -> None:
        unknown = sorted(set(req.model_extra or {}))
        if unknown:
            raise BadRequest(f"unknown extras fields: {', '.join(unknown)}")

    @app.post("/sdapi/v1/extra-batch-images", tags=["a1111"])
    def extra_batch_images(req: ExtrasBatchRequest) -> dict[str, Any]:
        """Each image of ``imageList`` as ``extra-single-image`` does it (all made before any is answered)."""
        extras_unknown(req)
        if not req.imageList or len(req.imageList) > 64:
            raise BadRequest("imageList must hold 1 to 64 images ({data, name})")
        outs: list[Image.Image] = []
        info: dict[str, Any] = {}
        # each image is held until all are made: 64 small PNGs of one colour (a megabyte of body) could make the
        # server hold 64 images of the pixel limit (3 GB); the batch's results together are held to 4 times it
        budget, total = 4 * services.config.max_image_pixels, 0
        for k, item in enumerate(req.imageList):
            data = item.get("data") if isinstance(item, dict) else None
            if not isinstance(data, str) or not data:
                raise BadRequest(f"imageList[{k}]: send the image as base64 in 'data'")
            image = services.uploads.image(data, f"imageList[{k}]")
            out, info = extras_upscale(image, req, services.config.max_image_pixels, catalog)
            total += out.width * out.height
            if total > budget:
                raise PayloadTooLarge(
                    f"imageList: the results up to imageList[{k}] are {total} pixels, over this server's limit of "
                    f"{budget} for one batch (4 x --max-image-pixels); send fewer or smaller images per request"
                )
            outs.append(out)
        images = [_b64_png(o) for o in outs] if req.show_extras_results else []
        return {"html_info": extras_info(info), "images": images}

    @app.post("/sdapi/v1/interrogate", tags=["a1111"])
    def interrogate() -> dict[str, Any]:
        raise NotFound("interrogate (CLIP / DeepBooru captions) is not available in sdengine")

    @app.post("/sdapi/v1/refresh-embeddings", tags=["a1111"])
    def refresh_embeddings() -> dict[str, Any]:
        return {}  # the folder is listed again whenever it changes (sdengine.text.embeddings)

    @app.get("/sdapi/v1/embeddings", tags=["a1111"])
    def embeddings() -> dict[str, Any]:
        if services.config.embeddings_dir is None:
            return {"loaded": {}, "skipped": {}}
        from sdengine.text.embeddings import folder_summary

        return folder_summary(services.config.embeddings_dir)

    @app.get("/sdapi/v1/scripts", tags=["a1111"])
    def scripts() -> dict[str, Any]:
        return {"txt2img": ["controlnet"], "img2img": ["controlnet", SOFT_INPAINTING_SCRIPT, SD_UPSCALE_TITLE.lower()]}

    @app.get("/sdapi/v1/cmd-flags", tags=["a1111"])
    def cmd_flags() -> dict[str, Any]:
        c = services.config
        return {
            "api": True,
            "nowebui": True,
            "listen": c.host not in ("127.0.0.1", "localhost"),
            "port": c.port,
            "api_auth": c.auth_required,
            "device": ",".join(w.device for w in manager.workers),
        }

    @app.get("/sdapi/v1/memory", tags=["a1111"])
    def memory() -> dict[str, Any]:
        import psutil  # type: ignore[import-untyped]
        import torch

        vm = psutil.virtual_memory()
        ram = {"free": vm.available, "used": vm.total - vm.available, "total": vm.total}
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            cuda: dict[str, Any] = {"system": {"free": free, "used": total - free, "total": total}}
        else:
            cuda = {"error": "no CUDA device"}
        return {"ram": ram, "cuda": cuda}

    @app.get("/sdapi/v1/options", tags=["a1111"])
    def get_options() -> dict[str, Any]:
        # the options sdengine runs one way only answer that way (face_restoration false, sd_unet Automatic, ...)
        fixed = {k: accepted[0] for k, (accepted, _) in FIXED_OPTIONS.items()}
        return {**fixed, **options, "sd_checkpoint_hash": None, "samples_format": "png", "samples_save": True}

    @app.post("/sdapi/v1/options", tags=["a1111"])
    def set_options(body: dict[str, Any]) -> dict[str, Any]:
        """``sd_model_checkpoint`` switches the model of later jobs (loaded by each worker before its next job);
        ``CLIP_stop_at_last_layers`` sets their clip skip (A1111's: SD 1.x's CLIP only; ``sdxl_clip_l_skip``: SDXL's
        CLIP-L too), ``eta_noise_seed_delta`` their ENSD, ``initial_noise_multiplier`` img2img's noise multiplier,
        ``randn_source`` their noise ("GPU" and "NV": NVIDIA's numbers, torch.randn on CUDA, on any device; "CPU"
        torch's CPU generator, sdengine's default), ``sd_vae_decode_method`` ("Full" or "TAESD") how their latents
        are decoded (TAESD: the model's tiny VAE), ``sd_vae`` their VAE ("Automatic", "None" or a file of GET
        /sdapi/v1/sd-vae; see docs/webui.md),
        ``sd_vae_encode_method`` how their init images are encoded, ``always_discard_next_to_last_sigma`` whether every
        sampler's grid drops its next-to-last sigma (A1111's DPM2, DPM2 a and DPM++ 3M SDE always do),
        ``sd_noise_schedule`` ("Default" or "Zero Terminal SNR": the model's alphas_cumprod rescaled as A1111 does),
        SAMPLER_OPTIONS (``eta_ancestral``, ``s_churn``, ``uni_pc_order``, ...), HYPERTILE_OPTIONS
        (``hypertile_enable_unet``, ``hypertile_max_tile_unet``, ...) and ``tiling`` the values of requests
        that give none, ``img2img_background_color`` what a transparent init image is laid over. FIXED_OPTIONS
        (``face_restoration``, ``sd_unet``, ...) take only the value sdengine runs (another is a 400
        naming the option). Other options (saving, UI, ...: they do not change the image) are listed as ignored."""
        changes, ignored = checked_options(body)  # every value checked before any is set: a refused one changes nothing
        options.update(changes)
        applied = list(changes)
        return {"applied": applied, "ignored": ignored}

    def checked_options(body: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """The options of ``body`` sdengine has, checked (a BadRequest for a bad value), and the names of the
        others."""
        changes: dict[str, Any] = {}
        ignored = []
        for k, v in body.items():
            if k == "sd_model_checkpoint":
                if not isinstance(v, str):
                    raise BadRequest("sd_model_checkpoint must be a model name")
                changes[k] = catalog.model_name_of(catalog.resolve_model(v))  # refuses unknown and unsafe names
            elif k == "CLIP_stop_at_last_layers":
                if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 24:
                    raise BadRequest("CLIP_stop_at_last_layers must be an integer in 1..24")
                changes[k] = v
            elif k in ("sd_vae_decode_method", "sd_vae_encode_method"):
                decode_method(v, k)
                changes[k] = v
            elif k == "sd_vae":  # the VAE of later jobs: "Automatic", "None" or a file of GET /sdapi/v1/sd-vae
                changes[k] = check_sd_vae(v)
            elif k == "sdxl_clip_l_skip":  # A1111's "Clip skip SDXL": the Clip skip reaches SDXL's CLIP-L too
                if not isinstance(v, bool):
                    raise BadRequest("sdxl_clip_l_skip must be true or false")
                changes[k] = v
            elif k == "eta_noise_seed_delta":
                changes[k] = check_ensd(v)
            elif k == "randn_source":  # A1111's random number source: GPU and NV are NVIDIA's numbers, CPU torch's
                changes[k] = check_randn_source(v)
            elif k == "initial_noise_multiplier":  # img2img's noise multiplier when a request gives none
                changes[k] = check_noise_multiplier(v)
            elif k == "sd_noise_schedule":  # A1111's "Noise schedule for sampling": Default or Zero Terminal SNR
                changes[k] = check_noise_schedule(v)
            elif k == "hires_fix_refiner_pass":  # which pass of the hires fix hands off to the refiner
                changes[k] = check_refiner_pass(v)
            elif k in ("img2img_fix_steps", "always_discard_next_to_last_sigma"):
                # img2img runs the steps asked (of a schedule of steps / strength); every sampler's grid drops its
                # next-to-last sigma
                if not isinstance(v, bool):
                    raise BadRequest(f"{k} must be true or false")
                changes[k] = v
            elif k in SDXL_OPTIONS:
                changes[k] = sdxl_option(k, v)
            elif k in ("control_net_no_detectmap", "tiling"):  # the ControlNet extension's "Do not append
                # detectmap"; A1111's Tiling of requests that give none
                if not isinstance(v, bool):
                    raise BadRequest(f"{k} must be true or false")
                changes[k] = v
            elif k == "img2img_background_color":  # what a transparent img2img init image is laid over
                changes[k] = check_background(v)
            elif k in SAMPLER_OPTIONS:  # eta_ancestral, s_churn, uni_pc_order, ...: of requests that give none
                changes[k] = check_sampler_option(k, v)
            elif k in HYPERTILE_OPTIONS:  # A1111's Hypertile U-Net and VAE of requests that give none
                changes[k] = check_hypertile_option(k, v)
            elif k in FIXED_OPTIONS:  # run one way only: that way, else a 400 naming the option
                changes[k] = check_fixed_option(k, v)
            else:
                ignored.append(k)
        return changes, ignored

    @app.get("/controlnet/version", tags=["a1111"])
    def cn_version() -> dict[str, Any]:
        return {"version": 2}

    @app.post("/controlnet/detect", tags=["a1111"])
    def cn_detect(req: DetectRequest) -> dict[str, Any]:
        """The extension's preprocessor run on each image, as a unit with that module would get it (scaled to
        ``controlnet_processor_res`` on its short side first) -> ``{images, info}``; an unknown module or no
        image is its 422."""
        from sdengine.server.requests import run_preprocessor

        unknown = sorted(set(req.model_extra or {}))
        if unknown:
            raise BadRequest(f"unknown detect fields: {', '.join(unknown)}")
        module = req.controlnet_module.strip().lower()
        if module in A1111_MODULES:
            raise Unprocessable(f"{module} is an IP-Adapter preprocessor: it makes no detected map")
        if module not in MODULES:
            raise Unprocessable(f"Module not available: {req.controlnet_module!r}; available: {', '.join(MODULES)}")
        images = req.controlnet_input_images or req.controlnet_images
        if not images:
            raise Unprocessable("No image selected: send base64 images in controlnet_input_images")
        if len(images) > 64:
            raise BadRequest(f"at most 64 images per detect call, got {len(images)}")
        res = req.controlnet_processor_res
        if not 64 <= res <= 2048:
            raise BadRequest(f"controlnet_processor_res must be an integer in [64, 2048], got {res}")
        kind = MODULES[module]
        a, b = req.controlnet_threshold_a, req.controlnet_threshold_b
        options: dict[str, float] = {}
        if kind == "canny":  # -1 is the extension's "default" (100, 200)
            options = {"low": 100.0 if a == -1 else a, "high": 200.0 if b == -1 else b}
        elif kind in ("threshold", "scribble") and a != -1:
            options = {"threshold": a}
        out = []
        for k, data in enumerate(images):
            image = services.uploads.image(data, f"controlnet_input_images[{k}]")
            image = ImageOps.exif_transpose(image).convert("RGB")
            if kind != "none":
                image = processor_resize(image, res)
            out.append(_b64_png(run_preprocessor(kind, image, options, k)))
        return {"images": out, "info": "Success"}

    @app.get("/controlnet/model_list", tags=["a1111"])
    def cn_models() -> dict[str, Any]:
        return {"model_list": [e.name for e in catalog.controlnets()] + unit_names(catalog)}

    @app.get("/controlnet/module_list", tags=["a1111"])
    def cn_modules() -> dict[str, Any]:
        return {"module_list": list(MODULES) + list(A1111_MODULES) + list(REFERENCE_MODULES), "module_detail": {}}


def _empty_list() -> list[Any]:
    return []


def _version() -> str:
    from sdengine import __version__

    return str(__version__)
