"""Loading FLUX.2 [klein]: a diffusers ``Flux2KleinPipeline`` folder or BFL's / ComfyUI's transformer file ->
:class:`sdengine.pipeline.flux2.Flux2Pipeline`.

Accepted (:func:`load_flux2_pipeline`, reached through :func:`sdengine.pipeline.load_pipeline` and so ``sdengine
generate --model FOLDER``): a folder whose ``model_index.json`` names ``Flux2KleinPipeline``: ``transformer/``
(``Flux2Transformer2DModel``) and ``vae/`` (``AutoencoderKLFlux2``) through :mod:`sdengine.weights.flux2_file`,
``text_encoder/`` (transformers' ``Qwen3ForCausalLM``: :mod:`sdengine.weights.qwen_text_file`), ``tokenizer/``
(Qwen2's BPE: :mod:`sdengine.text.qwen_tokenizer`), ``scheduler/`` (``FlowMatchEulerDiscreteScheduler``), and the
index's ``is_distilled`` (the step-distilled releases, which run without CFG). ``vae=`` (``--vae``) replaces the VAE
with another FLUX.2 VAE (folder or file).

FLUX.2 [dev]: a folder whose ``model_index.json`` names ``Flux2Pipeline``: the same ``transformer/`` (with its guidance
embedding), ``vae/`` and ``scheduler/``; ``text_encoder/`` is transformers' ``Mistral3ForConditionalGeneration``
(Mistral Small 3: its language model through :mod:`sdengine.weights.qwen_text_file`, the vision tower and projector
skipped) and ``tokenizer/`` a ``PixtralProcessor`` folder whose ``tokenizer.json`` is read (its padding side from
``tokenizer_config.json``: left when the file says so, or names Llama's tokenizer class without saying).

Also accepted: the transformer file (BFL's ``flux-2-klein-4b.safetensors``, ComfyUI's ``diffusion_models/`` copy;
told by ``single_stream_modulation.lin.weight``, :func:`is_flux2_file`) with its parts given apart: ``text_encoder``
(``--qwen-text``; ComfyUI's ``text_encoders/qwen_3_4b.safetensors`` or a Qwen3 folder), ``vae`` (``--vae``;
ComfyUI's ``vae/flux2-vae.safetensors`` or a FLUX.2 VAE folder) and ``tokenizer`` (``--qwen-tokenizer``; looked for
beside the text encoder when not given). Whether it is step-distilled the weights cannot tell (both kinds have the
same tensors): the file's name tells it as BFL names them (:func:`distilled_from_name`), or ``config`` (``--config``)
a klein diffusers folder whose ``is_distilled`` and scheduler to take; a name that says neither is one line asking
for one. The scheduler is klein's (:data:`KLEIN_SCHEDULER`) unless ``config`` gives one. A missing part is one line
naming its flag, before the transformer is read.

FLUX.2 [dev]'s transformer file (BFL's ``flux2-dev.safetensors``, ComfyUI's ``diffusion_models/`` copy; told by its
guidance embedding, ``guidance_in``: :func:`is_dev_file`) takes the same three parts with the same options: the text
encoder is Mistral Small 3 (ComfyUI's ``text_encoders/mistral_3_small_flux2_bf16.safetensors`` / ``_fp8``, or a
[dev] folder), the tokenizer Mistral's (``--qwen-tokenizer``: a [dev] folder's ``tokenizer/``, a folder with its
``tokenizer.json``; looked for beside the text encoder as ``mistral_tokenizer/`` or ``tokenizer/``, and refused in one
line where it has no ``[SYSTEM_PROMPT]`` token: not Mistral's). ComfyUI's Mistral file carries the tokenizer's
``tekken.json`` inside it (``tekken_model``): without ``--qwen-tokenizer`` that one is read
(:mod:`sdengine.text.tekken`), before any folder beside the file. It is never step-distilled (guidance embedded, 50
steps); the scheduler is :data:`DEV_SCHEDULER` unless ``config`` names a [dev] folder. A Qwen3 text encoder given
to [dev], or a Mistral one to klein, is one line before the transformer is read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sdengine.errors import GenerationError, UsageError
from sdengine.pipeline.flux2 import MAX_SEQUENCE_LENGTH, Flux2Pipeline

ACCEPTED = ("Flux2KleinPipeline", "Flux2Pipeline")
DEV = "Flux2Pipeline"  # FLUX.2 [dev]
# black-forest-labs/FLUX.2-klein-4B's scheduler/scheduler_config.json (a single file has none; the klein releases'
# are the same): the shift comes from diffusers' empirical mu (sdengine.pipeline.flux2.empirical_mu)
KLEIN_SCHEDULER: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
FLAGS = {"text_encoder": "--qwen-text", "vae": "--vae", "tokenizer": "--qwen-tokenizer", "config": "--config"}
KEYWORDS = {"text_encoder": "qwen_text", "vae": "vae", "tokenizer": "qwen_tokenizer"}  # load_pipeline's names
PARTS = {
    "text_encoder": ("Qwen3 text encoder", "ComfyUI's text_encoders/qwen_3_4b.safetensors (klein 4B), or a folder"),
    "vae": ("VAE", "ComfyUI's vae/flux2-vae.safetensors, or a FLUX.2 VAE folder"),
    "tokenizer": ("Qwen2 tokenizer (sdengine ships none)", "a klein folder's tokenizer/ or ComfyUI's qwen25_tokenizer"),
}
DEV_PARTS = {  # FLUX.2 [dev]'s file: the same options, other parts
    "text_encoder": (
        "Mistral Small 3 text encoder",
        "ComfyUI's text_encoders/mistral_3_small_flux2_bf16.safetensors, or a FLUX.2 [dev] folder",
    ),
    "vae": PARTS["vae"],
    "tokenizer": (
        "Mistral tokenizer (sdengine ships none)",
        "FLUX.2-dev's tokenizer/ folder, or mistral_tokenizer/ beside the text encoder; ComfyUI's Mistral files carry "
        "their own",
    ),
}
# black-forest-labs/FLUX.2-dev's scheduler/scheduler_config.json: klein's numbers
DEV_SCHEDULER: dict[str, Any] = dict(KLEIN_SCHEDULER)
DEV_TOKENIZER_FOLDERS = ("mistral_tokenizer", "tokenizer")  # looked for beside a Mistral text encoder file
MISTRAL_MARK = "[SYSTEM_PROMPT]"  # a Mistral Small 3 tokenizer's control token, which the [dev] template uses


def pipeline_class(path: Path) -> str | None:
    """The ``_class_name`` of a folder's ``model_index.json`` when it is one of FLUX.2's pipelines, else None."""
    from sdengine.weights.loading import pipeline_index_class

    return pipeline_index_class(path, "Flux2")


def is_flux2_folder(path: Path) -> bool:
    """A diffusers folder whose ``model_index.json`` names one of FLUX.2's pipelines."""
    return pipeline_class(path) is not None


# the tensor that tells a FLUX.2 transformer in BFL's names (diffusers' single-file marker), ComfyUI's prefix too
FILE_MARKERS = ("single_stream_modulation.lin.weight", "model.diffusion_model.single_stream_modulation.lin.weight")


def is_flux2_file(path: Path) -> bool:
    """A single ``.safetensors`` file holding a FLUX.2 transformer in BFL's names (BFL's / ComfyUI's
    ``flux-2-*.safetensors``; its header alone is read). Told apart before FLUX.1's check, whose ``double_blocks``
    names it shares, so that it is refused as what it is."""
    from sdengine.pipeline.flux_loading import file_holds
    from sdengine.weights.io import SAFETENSORS_SUFFIXES

    return path.suffix.lower() in SAFETENSORS_SUFFIXES and file_holds(
        path, lambda names: any(m in names for m in FILE_MARKERS)
    )


def is_dev_file(path: Path) -> bool:
    """A FLUX.2 transformer file with the guidance embedding (BFL's ``guidance_in``, diffusers'
    ``time_guidance_embed.guidance_embedder``, ComfyUI's prefix too): FLUX.2 [dev]'s (every klein lacks it)."""
    from sdengine.pipeline.flux_loading import file_holds

    marks = ("guidance_in.in_layer.weight", "time_guidance_embed.guidance_embedder.linear_1.weight")
    return file_holds(path, lambda names: any(n.endswith(marks) for n in names))


def distilled_from_name(path: Path) -> bool | None:
    """Whether a FLUX.2 [klein] single file is step-distilled, by its name's words (the weights cannot tell: both
    kinds have the same tensors): BFL's and ComfyUI's ``flux-2-klein-4b.safetensors`` / ``flux-2-klein-9b*`` are
    the distilled models, ``flux-2-klein-base-4b.safetensors`` the base ones. A name with the word ``base`` is a
    base model, one with ``distilled`` or ``klein`` (and not ``base``) a distilled one; None for any other name
    (or one saying both): not told."""
    words = set(re.split(r"[^a-z0-9]+", path.name.lower().removesuffix(path.suffix.lower())))
    base, distilled = "base" in words, "distilled" in words
    if base and distilled:
        return None
    if base:
        return False
    return True if distilled or "klein" in words else None


def distilled_before_load(path: Path) -> bool | None:
    """Whether a FLUX.2 folder (``model_index.json``'s ``is_distilled``) or single file (:func:`distilled_from_name`)
    is step-distilled, read without loading it; None when not told."""
    if path.is_dir():
        try:
            value = json.loads((path / "model_index.json").read_text()).get("is_distilled", False)
        except (OSError, UnicodeDecodeError, ValueError, RecursionError, AttributeError):
            return None
        return value if isinstance(value, bool) else None
    return distilled_from_name(path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise GenerationError(f"{path}: missing (a FLUX.2 folder has it)") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise GenerationError(f"{path}: cannot read it ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise GenerationError(f"{path}: not a JSON object")
    return data


def load_text_side(
    path: Path,
    dtype: torch.dtype,
    device: torch.device,
    *,
    joint_attention_dim: int,
    max_sequence_length: int,
    text_encoder: Path | None = None,
    tokenizer: Path | None = None,
    dev: bool = False,
    tekken: Path | None = None,
) -> tuple[Any, Any, Any]:
    """(Qwen3, texts -> states, text -> its token count in the template) of a folder's ``text_encoder/`` and
    ``tokenizer/`` (or ``text_encoder`` / ``tokenizer`` given apart: a single file's parts;
    :func:`sdengine.text.flux2_prompt.encode_prompt_flux2`); one line where the encoder's three stacked layers are
    not the transformer's text width or the encoder has fewer than 27 layers. ``dev``: FLUX.2 [dev]'s Mistral Small 3
    (layers 10, 20, 30 in its system prompt, :data:`sdengine.text.flux2_prompt.DEV_PROMPT_TEMPLATE`); ``tekken``: a
    Mistral file whose own tokenizer (``tekken_model``) to read instead of ``tokenizer``."""
    from sdengine.text import flux2_prompt
    from sdengine.text.flux2_prompt import encode_prompt_flux2
    from sdengine.text.qwen_tokenizer import load_qwen_tokenizer
    from sdengine.weights.qwen_text_file import load_qwen_text_encoder

    layers = flux2_prompt.DEV_HIDDEN_LAYERS if dev else flux2_prompt.HIDDEN_LAYERS
    template = flux2_prompt.DEV_PROMPT_TEMPLATE if dev else flux2_prompt.PROMPT_TEMPLATE
    try:
        tok = read_tekken(tekken) if tekken is not None else load_qwen_tokenizer(tokenizer or path / "tokenizer")
    except UsageError as e:
        raise GenerationError(str(e).splitlines()[0]) from None
    if dev and tekken is None:
        tok.padding_side = mistral_padding_side(tokenizer or path / "tokenizer", tok.padding_side)
    te = text_encoder or path / "text_encoder"
    family = "mistral" if dev else ("qwen3" if text_encoder else None)
    if dev and tok.token_id(MISTRAL_MARK) is None:
        where = tekken.name if tekken is not None else (tokenizer or path / "tokenizer").name
        raise GenerationError(
            f"{where}: a tokenizer without Mistral's {MISTRAL_MARK} token: not FLUX.2 [dev]'s (Mistral Small 3's) "
            "tokenizer; give its tokenizer/ folder with --qwen-tokenizer (qwen_tokenizer= in Python)"
        )
    encoder = load_qwen_text_encoder(te, device=device, dtype=dtype, family=family)
    cfg = encoder.config
    width = len(layers) * int(cfg.hidden_size)
    if width != joint_attention_dim or int(cfg.num_hidden_layers) < max(layers):
        where = te.name if text_encoder else path.name
        raise GenerationError(
            f"{where}: the text encoder ({cfg.num_hidden_layers} layers of {cfg.hidden_size}) gives "
            f"{len(layers)} x {cfg.hidden_size} = {width} numbers per token from layers "
            f"{list(layers)}; the transformer takes {joint_attention_dim}: not this model's text encoder"
        )
    prepare = flux2_prompt.dev_prompt if dev else (lambda text: text)

    def encode(texts: list[str]) -> Tensor:
        return encode_prompt_flux2(
            encoder,
            tok,
            [prepare(t) for t in texts],
            max_sequence_length=max_sequence_length,
            hidden_layers=layers,
            template=template,
            cache=False,
        ).float()

    def count(text: str) -> int:
        return len(tok.encode(template.replace("{}", prepare(text), 1)))

    return encoder, encode, count


def mistral_padding_side(folder: Path, given: str) -> str:
    """The padding side of FLUX.2 [dev]'s tokenizer folder: ``tokenizer_config.json``'s ``padding_side`` where it
    says one (``given``: what the tokenizer read), else transformers' class default: left for Llama's tokenizer
    classes (``LlamaTokenizer`` / ``LlamaTokenizerFast``), right for any other."""
    if (folder / "model_index.json").is_file():
        folder = folder / "tokenizer"
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return given
    if not isinstance(config, dict) or "padding_side" in config:
        return given
    cls = config.get("tokenizer_class")
    return "left" if isinstance(cls, str) and cls.startswith("LlamaTokenizer") else given


def load_flux2_pipeline(
    path: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    vae: str | Path | None = None,
    text_encoder: str | Path | None = None,
    tokenizer: str | Path | None = None,
    config: str | Path | None = None,
    name: str | None = None,
    lora_dir: Any = None,
    max_sequence_length: int = MAX_SEQUENCE_LENGTH,
) -> Flux2Pipeline:
    """A FLUX.2 [klein] or [dev] folder or transformer file (module docstring) -> :class:`Flux2Pipeline` on
    ``device`` in
    ``dtype``; ``vae``: another FLUX.2 VAE (folder or file) for a folder, a file's VAE; ``text_encoder`` /
    ``tokenizer``: a file's Qwen3 and Qwen2 tokenizer ([dev]'s: Mistral Small 3 and Mistral's tokenizer; a folder uses
    its own); ``config``: a klein folder whose ``model_index.json`` (``is_distilled``) and scheduler a file takes (for
    a [dev] file: a [dev] folder, its scheduler)."""
    from sdengine.pipeline.qwen_image_loading import tokenizer_beside
    from sdengine.weights.flux2_file import load_flux2_transformer, load_flux2_vae
    from sdengine.weights.io import WeightsError

    given = {"text_encoder": text_encoder, "vae": vae, "tokenizer": tokenizer, "config": config}
    for key, value in given.items():
        if value is not None and not Path(value).exists():
            raise GenerationError(f"{FLAGS[key]} {value}: no such file or folder")
    te_path: Path | None = None
    tok_path: Path | None = None
    tekken: Path | None = None  # a Mistral file whose tekken_model is the tokenizer
    dev = False
    if path.is_dir():
        kind = pipeline_class(path)
        if kind not in ACCEPTED:
            raise GenerationError(
                f"{path.name}: {kind} is not supported (sdengine runs FLUX.2 [klein] and [dev]: Flux2KleinPipeline, "
                "Flux2Pipeline)"
            )
        dev = kind == DEV
        for key in ("text_encoder", "tokenizer", "config"):
            if given[key] is not None:
                raise GenerationError(f"{FLAGS[key]} does not apply to a FLUX.2 folder (it uses its own)")
        index = _read_json(path / "model_index.json")
        distilled = False if dev else index.get("is_distilled", False)
        if not isinstance(distilled, bool):
            raise GenerationError(f"{path / 'model_index.json'}: is_distilled={distilled!r} is not true/false")
        scheduler = _read_json(path / "scheduler" / "scheduler_config.json")
        vae_path = Path(vae) if vae is not None else path
        name = name or path.name
    else:
        if not is_flux2_file(path):
            raise GenerationError(f"{path.name}: not a FLUX.2 transformer file (no single_stream_modulation.lin)")
        dev = is_dev_file(path)
        if dev:
            distilled, scheduler = False, dev_scheduler(Path(config) if config is not None else None)
        else:
            distilled, scheduler = file_kind(path, Path(config) if config is not None else None)
        te_path = Path(text_encoder) if text_encoder is not None else None
        tok_path = Path(tokenizer) if tokenizer is not None else None
        if dev and tok_path is None and te_path is not None and holds_tekken(te_path):
            tekken = te_path  # ComfyUI's Mistral file: its own tokenizer inside
        elif tok_path is None and te_path is not None:
            tok_path = dev_tokenizer_beside(te_path) if dev else tokenizer_beside(te_path)
        parts = DEV_PARTS if dev else PARTS
        no_tok = tok_path is None and tekken is None
        for key, missing in (("text_encoder", te_path is None), ("vae", vae is None), ("tokenizer", no_tok)):
            if missing:
                what, example = parts[key]
                raise GenerationError(
                    f"{path.name} holds no {what}: give it with {FLAGS[key]} ({KEYWORDS[key]}= in Python; e.g. "
                    f"{example})"
                )
        assert te_path is not None and vae is not None
        if te_path.is_dir() and (te_path / "model_index.json").is_file():
            te_path = te_path / "text_encoder"
        check_text_family(te_path, dev, path.name)
        vae_path = Path(vae)
        name = name or path.name.removesuffix(path.suffix) or path.name
    try:
        transformer = load_flux2_transformer(path, device=device, dtype=dtype)
        if dev and not bool(transformer.config.guidance_embeds):
            raise GenerationError(
                f"{path.name}: a Flux2Pipeline (FLUX.2 [dev]) folder whose transformer has no guidance embedding "
                "(guidance_embeds false): not FLUX.2 [dev]'s transformer"
            )
        encoder, encode, count = load_text_side(
            path,
            dtype,
            device,
            joint_attention_dim=int(transformer.config.joint_attention_dim),
            max_sequence_length=max_sequence_length,
            text_encoder=te_path,
            tokenizer=tok_path,
            dev=dev,
            tekken=tekken,
        )
        vae_model = load_flux2_vae(vae_path, device=device, dtype=dtype)
    except WeightsError as e:
        raise GenerationError(str(e).splitlines()[0]) from None
    return Flux2Pipeline(
        transformer=transformer,
        text_encode=encode,
        text_encoder=encoder,
        distilled=distilled,
        max_sequence_length=max_sequence_length,
        count_tokens=count,
        vae=vae_model,
        scheduler_config=scheduler,
        device=device,
        dtype=dtype,
        name=name,
        source=path,
        lora_dir=lora_dir,
        vae_source=Path(vae) if vae is not None else None,
        dev=dev,
    )


TEKKEN = "tekken_model"  # ComfyUI's Mistral files: Mistral's tekken.json as a uint8 tensor
MAX_TEKKEN_BYTES = 256 * 1024 * 1024


def holds_tekken(path: Path) -> bool:
    """Whether a text encoder ``.safetensors`` file carries Mistral's tokenizer (ComfyUI's ``tekken_model``)."""
    from sdengine.pipeline.flux_loading import file_holds
    from sdengine.weights.io import SAFETENSORS_SUFFIXES

    return path.suffix.lower() in SAFETENSORS_SUFFIXES and file_holds(path, lambda names: TEKKEN in names)


def read_tekken(path: Path) -> Any:
    """The tokenizer a Mistral file carries (:func:`sdengine.text.tekken.tekken_tokenizer` of its ``tekken_model``
    bytes); one line where that tensor is not a byte string."""
    from sdengine.text.tekken import tekken_tokenizer
    from sdengine.weights.io import SafetensorsReader, WeightsError

    try:
        reader = SafetensorsReader(path)
        try:
            if reader.dtype(TEKKEN) != torch.uint8 or len(reader.shape(TEKKEN)) != 1:
                raise GenerationError(f"{path.name}: {TEKKEN} is not a byte string (a 1-d uint8 tensor)")
            if reader.shape(TEKKEN)[0] > MAX_TEKKEN_BYTES:
                raise GenerationError(f"{path.name}: {TEKKEN} is over {MAX_TEKKEN_BYTES} bytes")
            data = reader.read(TEKKEN).numpy().tobytes()
        finally:
            reader.close()
    except (OSError, WeightsError) as e:
        raise GenerationError(f"{path.name}: cannot read {TEKKEN} ({str(e).splitlines()[0][:120]})") from None
    return tekken_tokenizer(data, name=f"{path.name}'s {TEKKEN}")


def dev_scheduler(config: Path | None) -> dict[str, Any]:
    """The scheduler config of a FLUX.2 [dev] transformer file: ``config``'s (a [dev] diffusers folder) where given,
    else :data:`DEV_SCHEDULER`."""
    if config is None:
        return dict(DEV_SCHEDULER)
    if pipeline_class(config) != DEV:
        raise GenerationError(
            f"--config {config.name}: not a FLUX.2 [dev] folder (its model_index.json names no {DEV}); give the "
            "[dev] folder whose scheduler the file takes, or leave it out"
        )
    return _read_json(config / "scheduler" / "scheduler_config.json")


def dev_tokenizer_beside(text_encoder: Path) -> Path | None:
    """Mistral's tokenizer that comes with a FLUX.2 [dev] text encoder: a [dev] pipeline folder's ``tokenizer/``, the
    ``tokenizer/`` beside a ``text_encoder/`` folder, or a ``mistral_tokenizer/`` / ``tokenizer/`` folder beside a
    file; None when there is none (whether it is Mistral's is checked when it is read)."""
    from sdengine.pipeline.qwen_image_loading import has_tokenizer

    found: list[Path]
    if text_encoder.is_dir():
        found = [text_encoder, text_encoder / "tokenizer", text_encoder.parent / "tokenizer"]
    else:
        found = [text_encoder.parent / n for n in DEV_TOKENIZER_FOLDERS]
    return next((f for f in found if has_tokenizer(f)), None)


def text_family(path: Path) -> str | None:
    """``"qwen3"``, ``"qwen2.5-vl"`` or ``"mistral"`` (:data:`sdengine.weights.qwen_text_file.FAMILIES`) of a text
    encoder ``.safetensors`` file by its header's names (q / k norms: Qwen3; q biases: Qwen2.5-VL; neither:
    Mistral); None for a folder or a file that is no such language model."""
    from sdengine.pipeline.flux_loading import file_holds
    from sdengine.weights.io import SAFETENSORS_SUFFIXES

    if not path.is_file() or path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return None
    found: list[str] = []

    def look(names: list[str]) -> bool:
        if not any(n.endswith("layers.0.self_attn.q_proj.weight") for n in names):
            return False
        if any(n.endswith("layers.0.self_attn.q_norm.weight") for n in names):
            found.append("qwen3")
        elif any(n.endswith("layers.0.self_attn.q_proj.bias") for n in names):
            found.append("qwen2.5-vl")
        else:
            found.append("mistral")
        return True

    file_holds(path, look)
    return found[0] if found else None


def check_text_family(text_encoder: Path, dev: bool, model: str) -> None:
    """One line, before any weight is read, where a text encoder file is not the family the FLUX.2 file needs (Mistral
    Small 3 for [dev], Qwen3 for klein)."""
    from sdengine.weights.qwen_text_file import FAMILIES, FAMILY_USERS

    kind, want = text_family(text_encoder), "mistral" if dev else "qwen3"
    if kind is not None and kind != want:
        raise GenerationError(
            f"--qwen-text {text_encoder.name}: a {FAMILIES[kind]} text encoder ({FAMILY_USERS[kind]}), but {model} "
            f"is FLUX.2 {'[dev]' if dev else '[klein]'}, which needs {FAMILIES[want]}"
        )


def file_kind(path: Path, config: Path | None) -> tuple[bool, dict[str, Any]]:
    """(step-distilled?, the scheduler config) of a FLUX.2 [klein] transformer file: from ``config`` (a klein
    diffusers folder: its ``model_index.json``'s ``is_distilled`` and ``scheduler/``) where given, else from the
    file's name (:func:`distilled_from_name`) with klein's scheduler (:data:`KLEIN_SCHEDULER`); a name that says
    neither is one line asking for one of the two."""
    if config is not None:
        if pipeline_class(config) != "Flux2KleinPipeline":
            raise GenerationError(
                f"--config {config.name}: not a FLUX.2 [klein] folder (its model_index.json names no "
                "Flux2KleinPipeline); give the klein folder whose is_distilled and scheduler the file takes"
            )
        distilled = _read_json(config / "model_index.json").get("is_distilled", False)
        if not isinstance(distilled, bool):
            raise GenerationError(f"{config / 'model_index.json'}: is_distilled={distilled!r} is not true/false")
        return distilled, _read_json(config / "scheduler" / "scheduler_config.json")
    told = distilled_from_name(path)
    if told is None:
        raise GenerationError(
            f"{path.name}: cannot tell a step-distilled FLUX.2 [klein] (4 steps, no CFG) from a base one (50 steps, "
            "CFG 4) by this name: keep BFL's (flux-2-klein-4b / flux-2-klein-base-4b ...) or give --config (config= "
            "in Python) a klein diffusers folder"
        )
    return told, dict(KLEIN_SCHEDULER)


__all__ = [
    "ACCEPTED",
    "DEV",
    "DEV_PARTS",
    "DEV_SCHEDULER",
    "FILE_MARKERS",
    "FLAGS",
    "KEYWORDS",
    "KLEIN_SCHEDULER",
    "PARTS",
    "check_text_family",
    "dev_scheduler",
    "dev_tokenizer_beside",
    "file_kind",
    "holds_tekken",
    "read_tekken",
    "text_family",
    "distilled_before_load",
    "distilled_from_name",
    "is_dev_file",
    "is_flux2_file",
    "is_flux2_folder",
    "load_flux2_pipeline",
    "load_text_side",
    "mistral_padding_side",
    "pipeline_class",
]
