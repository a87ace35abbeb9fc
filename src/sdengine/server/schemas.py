"""The native API's request bodies (pydantic): field names are the pipeline's keyword names."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sdengine.server.ip_adapters import MAX_IP_ADAPTERS, SCALE_RANGE
from sdengine.server.requests import MAX_CONTROLNETS, MAX_LORAS, MAX_PAG_LAYERS, MAX_PAG_PATTERN

# The bounds that depend on the server's settings (--max-side, --max-steps, --max-batch-size) are not in these
# models: the request builder checks them against the server's own numbers, so that the one-line answer names the
# limit that applies (a fixed schema bound answered first and named 8192 on a server that takes 2048). The
# OpenAPI document states each server's numbers (app._install_openapi).
SIDE = Field(
    None, ge=8, description="pixels, at most the server's --max-side; a multiple of the model's size step (emoji: 8)"
)


class LoRASpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., min_length=1, max_length=512, description="a name from GET /v1/loras")
    weight: float = Field(1.0, ge=-10, le=10, allow_inf_nan=False)
    unet_weight: float | None = Field(
        None,
        ge=-10,
        le=10,
        allow_inf_nan=False,
        description="the U-Net layers' multiplier when it differs from the text encoder's (weight), as A1111's "
        "<lora:NAME:TE:UNET>; unset: weight for both",
    )


class ControlNetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(..., min_length=1, max_length=512, description="a name from GET /v1/controlnets")
    image: str = Field(..., min_length=1, description="an upload id (POST /v1/uploads) or a base64 image")
    mask: str | None = Field(
        None,
        min_length=1,
        description="an SD3 inpainting ControlNet's mask (white = repaint; image is the picture to inpaint): an "
        "upload id or a base64 image; other units take none",
    )
    inpaint_image: str | None = Field(
        None,
        min_length=1,
        description="a Z-Image inpainting ControlNet's picture to inpaint (Union 2.x, with mask; image stays the "
        "control map): an upload id or a base64 image; other units take none",
    )
    union_mode: str | int | None = Field(
        None,
        description="a Flux Union ControlNet's control kind: canny, tile, depth, blur, pose, gray, lq or its number "
        "(docs/controlnet.md#sd3-and-flux-controlnets); other units take none",
    )
    weight: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    start: float = Field(0.0, ge=0, le=1, allow_inf_nan=False)
    end: float = Field(1.0, ge=0, le=1, allow_inf_nan=False)
    preprocessor: str = Field("none", max_length=64, description="none, canny, scribble, threshold, softedge, invert")
    low: float | None = Field(None, ge=0, le=255, allow_inf_nan=False, description="canny low threshold")
    high: float | None = Field(None, ge=0, le=255, allow_inf_nan=False, description="canny high threshold")
    style_fidelity: float | None = Field(
        None,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="a reference unit's (model reference_only, reference_adain, reference_adain+attn) style fidelity "
        "(default 0.5)",
    )
    rule: Literal["diffusers", "a1111", "comfyui"] = Field(
        "diffusers",
        description="how start/end pick the steps: 'diffusers' (a step wholly inside the window), 'a1111' (A1111's "
        "ControlNet extension: start <= i/steps <= end), 'comfyui' (ComfyUI: the window's sigmas, at each model call)",
    )
    mode: Literal["balanced", "prompt", "controlnet"] = Field(
        "balanced",
        description="sd-webui-controlnet's control mode: 'balanced', 'prompt' (\"My prompt is more important\": "
        "residual i of 13 times 0.825**(12-i)), 'controlnet' (\"ControlNet is more important\": those weights, on "
        "the conditional half of classifier-free guidance only)",
    )


class ReduxSpec(BaseModel):
    """One FLUX.1 Redux unit (docs/flux.md#redux-image-variation): the Redux image encoder, its image, the SigLIP
    encoder, the strength."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(
        ..., min_length=1, max_length=512, description="a name from GET /v1/style_models (--models-dir's style_models/)"
    )
    image: str = Field(..., min_length=1, description="an upload id (POST /v1/uploads) or a base64 image")
    siglip: str | None = Field(
        None,
        max_length=512,
        description="a name from GET /v1/clip_vision (sigclip_vision_patch14_384); null: the one SigLIP encoder of "
        "--clip-vision-dir",
    )
    strength: float = Field(
        1.0, ge=0, le=10, allow_inf_nan=False, description="the factor on the image's tokens (ComfyUI's 'multiply')"
    )


class IPAdapterSpec(BaseModel):
    """One IP-Adapter unit (docs/ip-adapter.md#server): the adapter, its picture, the CLIP vision encoder."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(..., min_length=1, max_length=512, description="a name from GET /v1/ip_adapters")
    image: str = Field(..., min_length=1, description="an upload id (POST /v1/uploads) or a base64 image")
    scale: float = Field(
        1.0,
        ge=SCALE_RANGE[0],
        le=SCALE_RANGE[1],
        allow_inf_nan=False,
        description="the weight of the image tokens' attention (0: no effect)",
    )
    clip_vision: str | None = Field(
        None,
        max_length=512,
        description="a name from GET /v1/clip_vision; null: the encoder of --clip-vision-dir whose width fits the "
        "adapter (read from the files' headers; several that fit: a 400 asking to choose)",
    )
    negative_rule: Literal["diffusers", "comfyui"] = Field(
        "diffusers",
        description="what the unconditional rows see for Plus / full-face adapters: 'diffusers' (an all-zero "
        "normalised pixel tensor's encoding) or 'comfyui' (ComfyUI_IPAdapter_plus: a black picture's); plain "
        "adapters: zeros either way",
    )
    start: float = Field(
        0.0,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="the fraction of the schedule where the adapter starts acting (ComfyUI_IPAdapter_plus's start_at: "
        "judged by each model call's sigma)",
    )
    end: float = Field(1.0, ge=0, le=1, allow_inf_nan=False, description="where it stops (end_at); 0 and 1: every call")


class HiresSpec(BaseModel):
    """The hires fix (docs/hires.md): the pipeline's names; the second pass's strength is the job's ``strength``."""

    model_config = ConfigDict(extra="forbid")
    hr_scale: float = Field(2.0, gt=0, le=16, allow_inf_nan=False)
    hr_resize_x: int = Field(0, ge=0, description="at most the server's --max-side")
    hr_resize_y: int = Field(0, ge=0, description="at most the server's --max-side")
    hr_upscaler: str = Field(
        "Latent",
        max_length=128,
        description="Latent, Latent (bicubic), ..., None, Lanczos, or an upscaler model of --upscalers-dir",
    )
    hr_second_pass_steps: int = Field(0, ge=0, description="0: the job's steps; at most the server's --max-steps")
    hr_sampler: str | None = Field(None, max_length=64, description="None: the job's sampler")
    hr_schedule: str | None = Field(None, max_length=64, description="None: the job's schedule")
    hr_prompt: str = Field("", max_length=20000, description='"": the job\'s prompt')
    hr_negative_prompt: str = Field("", max_length=20000)


class DeepShrinkSpec(BaseModel):
    """Deep Shrink (kohya-ss; ComfyUI's PatchModelAddDownscale, Forge's Kohya HRFix Integrated), its ranges and
    defaults (sdengine.nn.deep_shrink): docs/hires.md#deep-shrink-kohya-hrfix."""

    model_config = ConfigDict(extra="forbid")
    block: int = Field(
        3,
        ge=1,
        le=32,
        strict=True,
        description="the input block whose output is shrunk, ComfyUI's numbering (0 is conv_in, 3 the first "
        "downsample; SD 1.x has 1 to 11, SDXL 1 to 8); one the model does not have is a 400 (or fails the job, "
        "before the model is loaded)",
    )
    factor: float = Field(2.0, ge=0.1, le=9, allow_inf_nan=False, description="each side becomes round(side / factor)")
    start: float = Field(0.0, ge=0, le=1, allow_inf_nan=False, description="the window's start, ComfyUI's percent")
    end: float = Field(0.35, ge=0, le=1, allow_inf_nan=False, description="the window's end, ComfyUI's percent")
    after_skip: bool = Field(True, description="shrink after the block's output is kept for its skip (else before)")
    downscale_method: Literal["bicubic", "nearest-exact", "bilinear", "area", "bislerp"] = "bicubic"
    upscale_method: Literal["bicubic", "nearest-exact", "bilinear", "area", "bislerp"] = "bicubic"


class TiledDiffusionSpec(BaseModel):
    """MultiDiffusion's settings (sdengine.diffusion.multidiffusion), window and stride in latent cells:
    docs/multidiffusion.md."""

    model_config = ConfigDict(extra="forbid")
    window: int = Field(64, ge=1, le=1024, strict=True, description="the views' width in latent cells (8 px for SD)")
    window_height: int | None = Field(None, ge=1, le=1024, strict=True, description="null: the window")
    stride: int = Field(8, ge=1, le=1024, strict=True, description="cells between views, at most the window")
    circular: bool = Field(False, strict=True, description="the views wrap around the left and right edges")
    view_batch: int = Field(1, ge=1, le=64, strict=True, description="views per U-Net call")
    method: Literal["multidiffusion"] = "multidiffusion"


class JobRequest(BaseModel):
    """POST /v1/jobs. Images are upload ids (from POST /v1/uploads) or base64 (data URLs too)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, max_length=512, description="a name from GET /v1/models (default: the server's)")
    prompt: str = Field("", max_length=20000)
    negative_prompt: str = Field("", max_length=20000)
    steps: int = Field(25, ge=1, description="at most the server's --max-steps")
    sampler: str = Field("dpmpp_2m", max_length=64)
    schedule: str | None = Field("karras", max_length=64)
    cfg_scale: float = Field(7.5, ge=0, le=100, allow_inf_nan=False)
    sag_scale: float = Field(
        0.0,
        ge=-10,
        le=10,  # sdengine.pipeline.request.MAX_SAG_SCALE
        allow_inf_nan=False,
        description="self-attention guidance (Hong et al. 2023, diffusers' SAG pipeline): one more U-Net pass per step "
        "on the x0 estimate blurred where the middle block's self-attention looks most, adding sag_scale x (prediction "
        "- degraded prediction); 0: off; diffusers' example 0.75. Infotext 'SAG scale'",
    )
    sag_blur_sigma: float = Field(
        1.0,
        gt=0,
        le=10,  # sdengine.diffusion.sag.MAX_SAG_BLUR_SIGMA
        allow_inf_nan=False,
        description="the standard deviation of SAG's 9x9 Gaussian blur (diffusers' 1.0; ComfyUI's node 2.0); used only "
        "with a sag_scale other than 0. Infotext 'SAG blur sigma'",
    )
    sag_rule: Literal["diffusers", "comfyui"] = Field(
        "diffusers",
        description="where SAG's term goes: 'diffusers' (its pipeline: in the network's output space, before "
        "guidance rescale) or 'comfyui' (ComfyUI's node, Forge's script: the unconditional rows even at cfg 1, the "
        "term in x0 after the rescale, skipped on a latent of a side 4 or less). Used only with a sag_scale other "
        "than 0; infotext 'SAG rule' when 'comfyui'",
    )
    pag_scale: float = Field(
        0.0,
        ge=0,
        le=100,  # sdengine.pipeline.request.MAX_PAG_SCALE
        allow_inf_nan=False,
        description="perturbed-attention guidance (Ahn et al. 2024, diffusers' PAG pipelines): adds pag_scale x "
        "(conditional - perturbed) each step, the perturbed pass having the identity attention map in pag_layers; "
        "0: off (one U-Net pass fewer per step); the paper's 3.0 with cfg_scale 4.0. Infotext 'PAG scale'",
    )
    pag_layers: str | list[str] = Field(
        "mid",
        max_length=MAX_PAG_LAYERS * (MAX_PAG_PATTERN + 1),
        description="the self-attention layers PAG perturbs, as diffusers' pag_applied_layers: regular expressions "
        "searched in the U-Net's layer names, a list or one comma-separated string ('mid' the middle block's, "
        "'up_blocks.1', 'down'); one that matches no layer of the model is a 400 (or fails the job, before the model "
        "is loaded). On SD3 models: the MMDiT's joint-attention layers (transformer_blocks.<i>.attn; 'mid' runs as "
        "diffusers' SD3 default 'blocks.1'). Used only with a pag_scale above 0; infotext 'PAG layers' when not 'mid'",
    )
    freeu: list[Annotated[float, Field(ge=0, le=10, allow_inf_nan=False, strict=True)]] | None = Field(
        None,  # each factor at most sdengine.nn.freeu.MAX_FREEU_FACTOR
        min_length=4,
        max_length=4,
        description="FreeU (Si et al. 2023) as [b1, b2, s1, s2], each in [0, 10]: backbone factors on the first half "
        "of the decoder's hidden state's channels, skip factors on the skip features' lowest frequencies, at the up "
        "blocks freeu_rule picks; null: off. The authors' values: SD 1.x [1.5, 1.6, 0.9, 0.2], SD 2.x [1.4, 1.6, "
        "0.9, 0.2], SDXL [1.3, 1.4, 0.9, 0.2]. Infotext 'FreeU'",
    )
    freeu_version: int = Field(
        2,
        ge=1,
        le=2,
        strict=True,  # a JSON true is not version 1
        description="2: the backbone factor scaled by the hidden state's normalised channel mean (the authors' "
        "later code, ComfyUI's FreeU_V2, Forge's FreeU); 1: the factor as it is (ComfyUI's FreeU, diffusers' "
        "enable_freeu). Used only with freeu; infotext 'FreeU version' when 1",
    )
    freeu_rule: Literal["width", "diffusers"] = Field(
        "width",
        description="which skip concatenations: 'width' where the hidden state is 4x (b1, s1) or 2x (b2, s2) the "
        "first level's channels (the authors', ComfyUI's, Forge's), 'diffusers' every one of the first (b1, s1) "
        "and second (b2, s2) up block (diffusers' enable_freeu). Used only with freeu; infotext 'FreeU rule' when "
        "'diffusers'",
    )
    deep_shrink: DeepShrinkSpec | None = Field(
        None,
        description="Deep Shrink: the U-Net's hidden state below one input block shrunk while the noise is high, for "
        "sizes above the model's own; null: off. Infotext Forge's 'kohya_hrfix_*' fields",
    )
    hypertile: list[Annotated[int, Field(ge=0, le=2048, strict=True)]] | None = Field(
        None,
        min_length=3,
        max_length=3,
        description="HyperTile (A1111's Hypertile U-Net, ComfyUI's HyperTile node) as [tile_size, swap_size, "
        "max_depth]: the U-Net's self-attention within tiles of the feature map; tile_size in pixels (0-2048), "
        "swap_size how many tile counts a side draws from (0-128), max_depth the deepest layers tiled (0-10); "
        "A1111's defaults [256, 3, 3], ComfyUI's [256, 2, 0]; null: off. Infotext 'Hypertile U-Net'",
    )
    hypertile_hires_only: bool = Field(
        False, strict=True, description="HyperTile on the hires fix's second pass only (A1111's second-pass switch)"
    )
    hypertile_rule: Literal["a1111", "comfyui"] = Field(
        "a1111",
        description="how HyperTile picks its tiles and depths: A1111's (the tile capped by the image's power-of-two "
        "divisor, at least 128 px) or ComfyUI's node's (at least 32 px, depth by resolution). Used only with "
        "hypertile; infotext 'Hypertile rule' when 'comfyui'",
    )
    hypertile_scale_depth: bool = Field(
        True,
        strict=True,
        description="the smallest tile doubles with each depth (A1111 always; ComfyUI's node's default: false). "
        "Used only with hypertile; infotext 'Hypertile scale depth' when false",
    )
    hypertile_vae: list[Annotated[int, Field(ge=0, le=2048, strict=True)]] | None = Field(
        None,
        min_length=3,
        max_length=3,
        description="HyperTile on the VAE (A1111's Hypertile VAE) as [tile_size, swap_size, max_depth]: the VAE "
        "decoder's middle-block attention within tiles (A1111's rule; its one layer is depth 0); A1111's defaults "
        "[128, 3, 3]; null: off. Infotext 'Hypertile VAE'",
    )
    tiled_diffusion: TiledDiffusionSpec | None = Field(
        None,
        description="MultiDiffusion: the latent denoised as overlapping windows whose predictions are averaged at "
        "every step (panoramas, large images); null: off. Infotext 'Tiled Diffusion'",
    )
    seed: int = Field(-1, ge=-1, le=2**53 - 1, description="-1: random")
    width: int | None = SIDE
    height: int | None = SIDE
    batch_size: int = Field(1, ge=1, description="at most the server's --max-batch-size")
    init_image: str | None = None
    strength: float = Field(0.75, ge=0, le=1, allow_inf_nan=False)
    strength_rule: Literal["diffusers", "a1111", "a1111_fix_steps"] = Field(
        "diffusers",
        description="how strength counts the img2img / hires steps: 'diffusers' int(steps * strength) (strength "
        "> 0), 'a1111' AUTOMATIC1111's int(min(strength, 0.999) * steps) + 1 (one step at strength 0), "
        "'a1111_fix_steps' A1111's with its img2img_fix_steps option: img2img runs the steps asked",
    )
    mask: str | None = Field(None, description="white = repaint")
    control_image: str | None = Field(
        None,
        description="a FLUX.1 Depth / Canny model's control map (a depth map or canny edges, as given; an upload "
        "or base64 image like init_image); other models refuse it",
    )
    control_preprocessor: str = Field(
        "none",
        max_length=32,
        description="what makes control_image into the map first: 'none' (it is the map) or 'canny' (Canny edges of a "
        "photo, thresholds 100 / 200, at the output size); 'depth' is refused (no depth network here). Infotext "
        "'Control preprocessor'",
    )
    mask_blur: float = Field(0, ge=0, le=256, allow_inf_nan=False)
    masked_content: Literal["original", "latent noise", "latent nothing"] = Field(
        "original",
        description="what the init latent holds under the mask before it is noised (A1111's masked content): the "
        "image's, the row's noise, or zeros",
    )
    differential_diffusion: float = Field(
        0.0,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="Differential Diffusion (soft inpainting, ComfyUI's DifferentialDiffusion node): the mask's grey "
        "levels say how much each pixel may change; 0 = off, (0, 1] = on with that strength (1 = the paper's rule). "
        "Needs a mask and a 4-channel model. Infotext 'Differential diffusion'",
    )
    soft_inpainting: bool | dict[str, float] | None = Field(
        None,
        description="A1111's Soft Inpainting: true (A1111's defaults) or an object of schedule_bias, "
        "preservation_strength, transition_contrast_boost, mask_influence, difference_threshold, difference_contrast "
        "(the rest at A1111's defaults); the result laid over the init image by its composite mask. Needs a mask and "
        "a 4-channel U-Net; not with differential_diffusion. Infotext A1111's 'Soft inpainting ...' keys",
    )
    mask_round: bool = Field(
        True,
        description="A1111's mask_round: true rounds the latent mask the steps blend by (and an inpainting model's "
        "mask input) to 0 / 1; false leaves both grey. false needs a mask and strength_rule 'a1111' / "
        "'a1111_fix_steps' (the Python API's mask_round; the A1111 img2img route's field)",
    )
    latent_mask: str | None = Field(
        None,
        min_length=1,
        description="A1111's latent_mask: a separate mask (white = repaint; an upload id or a base64 image; any size, "
        "read as grey, not blurred or fitted) that the latent mask is shrunk from in place of mask's; mask still makes "
        "an inpainting model's mask input. Needs a mask and strength_rule 'a1111' / 'a1111_fix_steps' (the Python "
        "API's latent_mask)",
    )
    noise_multiplier: float = Field(
        1.0,
        ge=0,
        le=10,
        allow_inf_nan=False,
        description="A1111's img2img noise multiplier: the init is noised with the noise times this",
    )
    image_cfg_scale: float | None = Field(
        None,
        ge=0,
        le=100,  # sdengine.pipeline.request.MAX_CFG_SCALE
        allow_inf_nan=False,
        description="an instruct-pix2pix model's image guidance (needs an init_image): uncond + cfg (cond - "
        "image_cond) + image_cfg_scale (image_cond - uncond); null: 1.5 (diffusers'), 1 under strength_rule "
        "'a1111'. Infotext 'Image CFG scale'",
    )
    controlnets: list[ControlNetSpec] = Field(default_factory=list, max_length=MAX_CONTROLNETS)
    ip_adapters: list[IPAdapterSpec] = Field(
        default_factory=list,
        max_length=MAX_IP_ADAPTERS,
        description="IP-Adapter units (an image prompt each): needs serve --ip-adapters-dir and --clip-vision-dir",
    )
    redux: list[ReduxSpec] = Field(
        default_factory=list,
        max_length=8,
        description="FLUX.1 Redux units (an image prompt each, FLUX.1 models only): needs serve --models-dir (its "
        "style_models/) and --clip-vision-dir (the SigLIP encoder)",
    )
    loras: list[LoRASpec] = Field(default_factory=list, max_length=MAX_LORAS)
    clip_skip: int = Field(1, ge=1, le=24)
    clip_skip_rule: Literal["sdengine", "a1111", "a1111_sdxl_clip_l"] = Field(
        "sdengine",
        description="what clip_skip means: 'sdengine' each text encoder's own (SDXL: both encoders), 'a1111' "
        "AUTOMATIC1111's Clip skip, applied to SD 1.x's CLIP only (SD 2.x, SDXL and MiniLM models run as at 1), "
        "'a1111_sdxl_clip_l' A1111's with its sdxl_clip_l_skip on (SDXL's CLIP-L reads hidden_states[-clip_skip])",
    )
    hires: HiresSpec | None = Field(None, description="run the hires fix (txt2img)")
    sdxl: dict[str, Any] | None = Field(
        None,
        description="SDXL models only: prompt_2, negative_prompt_2, original_size, crops_coords_top_left, "
        "target_size ([height, width] pixels), negative_original_size, negative_crops_coords_top_left, "
        "negative_target_size, aesthetic_score, negative_aesthetic_score (a refiner's), as diffusers' "
        "StableDiffusionXLPipeline arguments",
    )
    refiner: str | None = Field(
        None,
        max_length=512,
        description="SDXL models only: a base -> refiner hand-off (the Python API's "
        "SDXLPipeline.generate_with_refiner, A1111's refiner_checkpoint): a name from GET /v1/models, an SDXL model "
        "other than the job's; the job's model runs the noisy part of the steps, this one the rest, and its VAE "
        "decodes. No LoRA, ControlNet, IP-Adapter, tiny VAE decode or variation seed with it; DDIM, PLMS, LCM, DDPM "
        "and restart are refused (400). Infotext 'Refiner', 'Refiner switch at'",
    )
    refiner_switch_at: float = Field(
        0.8,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="the fraction of the steps the job's model runs before the refiner takes over (generate_with_"
        "refiner's switch_at, A1111's refiner_switch_at): 0 the refiner runs every step, 1 no step reaches it (the "
        "model runs alone, said in the job's notes). Read only with refiner",
    )
    refiner_switch_rule: Literal["diffusers", "a1111"] = Field(
        "diffusers",
        description="how refiner_switch_at picks the step: 'diffusers' (denoising_end / denoising_start: the steps "
        "whose timestep is at least (1 - switch) x 1000 are the model's) or 'a1111' (A1111's: the first step whose "
        "sigma's nearest training timestep t has (999 - t) / 1000 >= switch). Read only with refiner; infotext "
        "'Refiner switch rule' when 'a1111'",
    )
    refiner_hires_pass: Literal["first pass", "second pass", "both passes"] = Field(
        "second pass",
        description="with hires: which pass hands off to the refiner (A1111's hires_fix_refiner_pass). Read only with "
        "refiner and hires; infotext 'Hires refiner' when not 'second pass'",
    )
    modules: list[Annotated[str, Field(min_length=1, max_length=512)]] | None = Field(
        None,
        max_length=8,
        description="an SD3 / Flux diffusion-model file's text encoders and VAE when its folders hold several of a "
        "kind: file names of text_encoders/ (clip/) of --models-dir and of --vaes-dir (Forge's "
        "forge_additional_modules); null: the only file of each kind",
    )
    reference_images: list[str] | None = Field(
        None,
        description="FLUX.1 Kontext (Flux models only): reference images to edit or take from, each an upload id or "
        "a data URL / base64 (at most 4); width and height null: the first one's size. Each is put at the Kontext "
        "resolution of its aspect ratio unless reference_auto_resize is false",
    )
    reference_auto_resize: bool = Field(
        True, description="false: each reference image at its own size (sides floored to multiples of 16)"
    )
    distilled_cfg_scale: float | None = Field(
        None,
        ge=0,
        le=100,  # sdengine.pipeline.flux.MAX_DISTILLED_CFG
        allow_inf_nan=False,
        strict=True,  # a JSON string or true is not a number here
        description="FLUX.1 [dev] models only: the distilled guidance scale, an input of the transformer (Forge's "
        "'Distilled CFG Scale', ComfyUI's FluxGuidance); null: the model's 3.5. Any other model (SD, SDXL, SD3, Flux "
        "[schnell]) answers a 400. Infotext 'Distilled CFG Scale'",
    )
    shift: float | None = Field(
        None,
        gt=0,
        le=100,  # sdengine.pipeline.request.MAX_SHIFT
        allow_inf_nan=False,
        strict=True,  # a JSON string or true is not a number here
        description="SD3 / SD3.5 models only: the flow schedule's time shift, s' = shift s / (1 + (shift - 1) s) "
        "(ComfyUI's ModelSamplingSD3); null: the model's own (3.0). Other models answer a 400. Infotext 'Shift'",
    )
    sd3: dict[str, Any] | None = Field(
        None,
        description="SD3 / SD3.5 models only: skip-layer guidance as diffusers' StableDiffusion3Pipeline arguments: "
        "skip_guidance_layers (joint blocks, e.g. [7, 8, 9] for SD3.5 Medium; [] off), skip_layer_guidance_scale "
        "(2.8), skip_layer_guidance_start (0.01), skip_layer_guidance_stop (0.2); pag_adaptive_scale (0, in [0, 1]: "
        "PAG's scale falls with the step, diffusers' pag_adaptive_scale). Other models answer a 400. "
        "Infotext 'Skip layer guidance', 'Skip layers', ...",
    )
    tiling: bool = Field(False, description="seamless tiles: circular padding in every convolution (A1111's Tiling)")
    seed_resize_from: list[int] | None = Field(
        None,
        min_length=2,
        max_length=2,
        description="[width, height]: draw the seed's noise at this size, centred in the image's (A1111's "
        "'Resize seed from')",
    )
    noise_source: Literal["cpu", "nv"] = Field(
        "cpu",
        description="where the noise comes from: 'cpu' torch's CPU generator (A1111's CPU source), 'nv' NVIDIA's "
        "numbers, torch.randn on CUDA drawn on any device (A1111's NV, and its default GPU on an NVIDIA card)",
    )
    vae_decode: Literal["full", "tiny"] = Field(
        "full", description="'tiny': decode with the model's tiny VAE (TAESD), ~10x cheaper, a little softer"
    )
    vae_encode: Literal["full", "tiny"] = Field(
        "full", description="'tiny': encode init_image (and the hires fix's upscale) with the tiny VAE's encoder"
    )
    vae: str | None = Field(
        None,
        max_length=512,
        description="the job's VAE (A1111's sd_vae): a name from GET /v1/vaes; 'None' the VAE the model file "
        "carries; 'Automatic' the --vaes-dir file named as the model, else the model's; null (default): the VAE the "
        "model was loaded with. It encodes and decodes every pass (the hires fix); the infotext names it (VAE, VAE "
        "hash)",
    )
