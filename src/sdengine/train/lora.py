"""``sdengine train lora``: train a LoRA (Hu et al. 2021) for a Stable Diffusion model on a folder of captioned images.

The base model is frozen; only the low-rank pairs are trained. Each pair starts with ``up = 0`` (kohya's and PEFT's
init: down Kaiming-uniform, up zero), so step 0 is the base model exactly. Images are encoded to latents once (the
VAE posterior's mode) and, unless the text encoder is trained too, captions are encoded once: what is left per step
is one U-Net forward/backward through the patched layers, with the usual diffusion loss on
``x_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps`` (Ho et al. 2020).

The optimisation (AdamW with warm-up, clipping, EMA, bf16 autocast, atomic checkpoints, exact resume) is the shared
loop in :mod:`sdengine.train.loop`; the module it trains is the small :class:`LoRANetwork`, so checkpoints and the
EMA copy hold the LoRA only. The result is a kohya-format ``.safetensors`` (``lora_unet_*`` / ``lora_te_*``,
``.lora_down`` / ``.lora_up`` / ``.alpha``) with kohya's ``ss_*`` metadata, which A1111, ComfyUI, diffusers'
``load_lora_weights`` and sdengine's :func:`~sdengine.weights.lora.apply_loras` read.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from sdengine.errors import SdengineError
from sdengine.metadata import legacy_hash

from .. import distributed
from ..weights.lora import LoRALayer, kohya_name, lora_targets, patch_layers
from .checkpoint import ensure_new_run, locks_out_dir, model_identity
from .loop import TrainConfig, TrainResult, data_indices, train

TargetKind = Literal["attention", "proj", "ff", "conv"]
TARGET_KINDS: tuple[TargetKind, ...] = ("attention", "proj", "ff", "conv")

# Which layers each target kind adapts, by module name (diffusers / transformers names; BERT for the emoji model).
UNET_TARGETS: dict[TargetKind, re.Pattern[str]] = {
    "attention": re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"),
    "proj": re.compile(r"attentions\.\d+\.(proj_in|proj_out)$"),
    "ff": re.compile(r"\.ff\.net\.(0\.proj|2)$"),
    "conv": re.compile(r"(resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|(down|up)samplers\.0\.conv)$"),
}
TEXT_TARGETS: dict[TargetKind, re.Pattern[str]] = {
    "attention": re.compile(
        r"(self_attn\.(q_proj|k_proj|v_proj|out_proj)|attention\.(self\.(query|key|value)"
        r"|output\.dense))$"
    ),
    "ff": re.compile(r"(mlp\.fc[12]|layer\.\d+\.intermediate\.dense|layer\.\d+\.output\.dense)$"),
}


class LoRATrainingError(SdengineError, ValueError):
    """A user mistake in the training inputs (message meant for one line on stderr)."""


@dataclass
class LoRASpec:
    """What to train, besides the optimisation settings in :class:`~sdengine.train.loop.TrainConfig`."""

    model: str  # a diffusers folder, a single SD file, or a built-in name
    data: str  # a folder of images with .txt captions beside them
    rank: int = 8
    alpha: float | None = None  # None: alpha = rank (scale 1)
    conv_rank: int | None = None  # rank of kxk convolutions (LoCon); None: rank
    conv_alpha: float | None = None  # None: the linear layers' alpha
    targets: tuple[TargetKind, ...] = ("attention",)
    train_text_encoder: bool = False
    resolution: int | None = None  # None: the model's own training size
    gradient_checkpointing: bool = False
    min_snr_gamma: float | None = None
    output_name: str = "lora"
    save_dtype: Literal["fp32", "fp16", "bf16"] = "fp16"
    use_ema: bool = False  # export the EMA weights instead of the last ones
    sample_prompt: str | None = None  # prompt of the --sample-every images; None: the first training caption
    extra_metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise LoRATrainingError(f"rank must be >= 1, got {self.rank}")
        if self.conv_rank is not None and self.conv_rank < 1:
            raise LoRATrainingError(f"conv rank must be >= 1, got {self.conv_rank}")
        for a in (self.alpha, self.conv_alpha):
            if a is not None and not (math.isfinite(a) and a > 0):
                raise LoRATrainingError(f"alpha must be a positive number, got {a}")
        bad = [t for t in self.targets if t not in TARGET_KINDS]
        if bad or not self.targets:
            raise LoRATrainingError(f"targets must be among {', '.join(TARGET_KINDS)}, got {list(self.targets)}")
        if "conv" not in self.targets and (self.conv_rank is not None or self.conv_alpha is not None):
            # the 3x3 convolutions are trained with target conv only: the setting was once ignored without a word
            raise LoRATrainingError(
                "conv rank and alpha (--conv-rank, --conv-alpha) are those of --target conv's 3x3 convolutions: "
                "add --target conv, or drop them"
            )
        if self.resolution is not None and self.resolution < 8:
            raise LoRATrainingError(f"resolution must be >= 8 pixels, got {self.resolution}")
        name = self.output_name
        if name in ("", ".", "..") or name.strip() != name or any(c in name for c in "/\\:<>\0"):
            # a file name in --out, and the NAME of a <lora:NAME:W> tag: no folders, no tag separators
            raise LoRATrainingError(
                f"LoRA name {name!r}: it becomes the file name and the <lora:NAME:W> tag, so no '/', '\\', ':', "
                "'<', '>' and no outer spaces"
            )

    @property
    def effective_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def effective_conv_rank(self) -> int:
        return self.conv_rank or self.rank

    @property
    def effective_conv_alpha(self) -> float:
        return self.effective_alpha if self.conv_alpha is None else float(self.conv_alpha)


# ------------------------------------------------------------------------------------------------ the network


class LoRANetwork(nn.Module):
    """The trainable LoRA layers, keyed by kohya name (no dots, so they are valid ModuleDict keys).

    It holds no reference to the base model (the shared loop deep-copies it for the EMA, which must stay small);
    :meth:`attach` hooks the layers onto a model."""

    def __init__(self, layers: dict[str, LoRALayer], alphas: dict[str, float]) -> None:
        super().__init__()
        self.layers = nn.ModuleDict(layers)
        self.alphas = dict(alphas)

    @classmethod
    def create(
        cls,
        unet: nn.Module,
        text_encoder: nn.Module | None,
        spec: LoRASpec,
        generator: torch.Generator,
    ) -> tuple[LoRANetwork, list[tuple[str, nn.Module]]]:
        """New layers for the spec's targets -> (network, [(kohya name, base module)])."""
        chosen: list[tuple[str, nn.Module]] = []
        for comp, model, table in (("unet", unet, UNET_TARGETS), ("text_encoder", text_encoder, TEXT_TARGETS)):
            if model is None or (comp == "text_encoder" and not spec.train_text_encoder):
                continue
            patterns = [table[t] for t in spec.targets if t in table]
            for name, module in lora_targets(model):
                if any(p.search(name) for p in patterns):
                    chosen.append((kohya_name(comp, name), module))  # type: ignore[arg-type]
        if not chosen:
            raise LoRATrainingError(f"no layers of this model match the targets {list(spec.targets)}")
        layers: dict[str, LoRALayer] = {}
        alphas: dict[str, float] = {}
        for key, module in chosen:
            w = cast(Tensor, module.weight)
            spatial = isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)
            r = spec.effective_conv_rank if spatial else spec.rank
            alpha = spec.effective_conv_alpha if spatial else spec.effective_alpha
            if isinstance(module, nn.Conv2d):
                down = torch.empty(r, module.in_channels, *module.kernel_size)  # (r, in, kh, kw)
                up = torch.zeros(module.out_channels, r, 1, 1)  # (out, r, 1, 1)
            else:
                down = torch.empty(r, w.shape[1])  # (r, in)
                up = torch.zeros(w.shape[0], r)  # (out, r)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)  # kohya's / nn.Linear's init
            layers[key] = LoRALayer(
                down.to(w.device), up.to(w.device), scale=alpha / r, conv=LoRALayer.geometry(module), trainable=True
            )
            alphas[key] = alpha
        return cls(layers, alphas), chosen

    def kohya_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, layer in self.layers.items():
            assert isinstance(layer, LoRALayer)
            out[f"{key}.lora_down.weight"] = layer.down.detach().to("cpu", dtype or layer.down.dtype).contiguous()
            out[f"{key}.lora_up.weight"] = layer.up.detach().to("cpu", dtype or layer.up.dtype).contiguous()
            out[f"{key}.alpha"] = torch.tensor(self.alphas[key], dtype=dtype or torch.float32)
        return out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ------------------------------------------------------------------------------------- gradient checkpointing


@contextmanager
def gradient_checkpointing(models: list[nn.Module], enabled: bool = True) -> Iterator[int]:
    """Recompute each transformer/ResNet/text-encoder block in the backward pass instead of storing its
    activations (Chen et al. 2016): less memory for one more forward. The models' own code is untouched: the
    blocks' ``forward`` is wrapped per instance and unwrapped on exit. LoRA hooks inside a block run again in the
    recomputation, so their gradients are exact."""
    from torch.utils.checkpoint import checkpoint

    wrapped: list[nn.Module] = []
    if enabled:
        names = {"BasicTransformerBlock", "ResnetBlock2D", "CLIPEncoderLayer", "BertLayer"}
        for model in models:
            for m in model.modules():
                if type(m).__name__ not in names or "forward" in m.__dict__:
                    continue

                def forward(*args: Any, _f: Any = m.forward, **kwargs: Any) -> Any:
                    if torch.is_grad_enabled():
                        return checkpoint(_f, *args, use_reentrant=False, **kwargs)
                    return _f(*args, **kwargs)

                m.forward = forward  # type: ignore[method-assign]
                wrapped.append(m)
    try:
        yield len(wrapped)
    finally:
        for m in wrapped:
            del m.forward


# --------------------------------------------------------------------------------------------------- the data


@dataclass
class LoRAData:
    """N images and M >= N captions (rows): each image has one or more wordings (the lines of its .txt)."""

    latents: torch.Tensor  # (N, C, h, w) scaled latents
    token_ids: torch.Tensor  # (M, 77)
    states: torch.Tensor | None  # (M, 77, D) text states when the text encoder is frozen
    captions: list[str]  # (M) every wording, image by image
    # Other U-Net inputs per caption, e.g. {"class_labels": (M, D)} pooled text vectors (the emoji model)
    unet_kwargs: dict[str, torch.Tensor] = field(default_factory=dict)
    # Caption rows of image i: row_start[i] .. row_start[i] + row_count[i] - 1. None: one caption per image.
    row_start: torch.Tensor | None = None
    row_count: torch.Tensor | None = None

    def caption_rows(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The caption row of each image in ``idx``: one of its wordings, uniformly, drawn from ``gen`` (the
        step's generator, so a resumed run draws the same). With one caption per image nothing is drawn (the
        random stream of single-caption runs is what it always was)."""
        if self.row_start is None or self.row_count is None:
            return idx
        start, count = self.row_start.to(idx.device)[idx], self.row_count.to(idx.device)[idx]
        u = torch.rand(idx.shape, generator=gen).to(idx.device)
        return start + (u * count).long().clamp(max=count - 1)


def _uses_clip(pipe: Any) -> bool:
    return pipe.conditioner.kind == "clip"  # decided once, by the pipeline's conditioner


@torch.no_grad()
def prepare_data(pipe: Any, spec: LoRASpec, resolution: int, device: torch.device) -> LoRAData:
    from ..data.folders import ImageFolder, ImageFolderError
    from ..prompts import prompt_chunks
    from ..vae_utils import encode

    try:
        ds = ImageFolder(spec.data, size=resolution, channels=3, require_captions=True)
    except (ImageFolderError, FileNotFoundError) as e:
        raise LoRATrainingError(str(e)) from None
    images = ds.stack().to(device=device, dtype=next(pipe.vae.parameters()).dtype)  # (N, 3, H, W) in [-1, 1]
    latents = torch.cat([encode(pipe.vae, images[i : i + 8], None, tiled=False) for i in range(0, len(ds), 8)])
    rows = [c for wordings in ds.caption_sets for c in wordings]  # every wording of every image, in order
    row_start = row_count = None
    if len(rows) > len(ds):
        counts = [len(w) for w in ds.caption_sets]
        row_count = torch.tensor(counts, dtype=torch.long)
        row_start = torch.cumsum(row_count, 0) - row_count
    if not _uses_clip(pipe):
        # Another text encoder (the emoji model's MiniLM): the pipeline's conditioner, frozen (the same
        # conditioning generation uses: token states, and the pooled vector for a U-Net that reads one).
        if spec.train_text_encoder:
            raise LoRATrainingError("--train-text-encoder needs a CLIP text encoder; this model's is frozen MiniLM")
        cond = pipe.conditioner(rows)
        states = cond["crossattn"].float().to(device)
        extra = {"class_labels": cond["vector"].float().to(device)} if "vector" in cond else {}
        return LoRAData(
            latents.float(),
            torch.zeros((len(rows), 0), dtype=torch.long, device=device),
            states,
            rows,
            extra,
            row_start,
            row_count,
        )
    # CLIP keeps its own token-id path: with --train-text-encoder the encoder runs inside the training step, so
    # the data holds token ids, not states; and one 77-token window per caption without emphasis is what
    # kohya trains on (the conditioner would read emphasis and encode every chunk).
    ids = []
    for caption in rows:
        # One 77-token window per caption (kohya's default): training uses the first chunk, emphasis ignored.
        chunk = prompt_chunks(pipe.tokenizer, caption, pad_token_id=pipe.pad_token_id)[0]
        ids.append(list(chunk.ids))
    token_ids = torch.tensor(ids, dtype=torch.long, device=device)  # (N, 77)
    states = None
    if not spec.train_text_encoder:
        states = torch.cat(
            [pipe.text_encoder(token_ids[i : i + 16]).last_hidden_state for i in range(0, len(rows), 16)]
        )  # (M, 77, D)
    return LoRAData(latents.float(), token_ids, states, rows, row_start=row_start, row_count=row_count)


# ----------------------------------------------------------------------------------------------------- train


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def base_model_file(source: Path | None) -> Path | None:
    """The file whose hash identifies the base model: the single file, or a folder's U-Net weights."""
    if source is None:
        return None
    if source.is_file():
        return source
    found = sorted((source / "unet").glob("diffusion_pytorch_model*.safetensors")) + sorted(
        (source / "unet").glob("diffusion_pytorch_model*.bin")
    )
    return found[0] if found else None


def tag_frequency(captions: list[str], folder: str) -> dict[str, dict[str, int]]:
    """kohya's ss_tag_frequency: comma-separated caption tags counted per dataset folder."""
    counts: Counter[str] = Counter(t.strip() for c in captions for t in c.split(",") if t.strip())
    return {Path(folder).name: dict(counts.most_common())}


@locks_out_dir
def train_lora(
    spec: LoRASpec,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    force_resume: bool = False,
) -> tuple[TrainResult, Path]:
    """Train and write ``out_dir/<output_name>.safetensors`` (kohya format) -> (loop result, file path).

    A folder that already holds a run is refused unless ``resume`` or ``overwrite`` (see ``ensure_new_run``)."""
    from ..diffusion.loss import DiffusionLoss
    from ..pipeline import Pipeline, load_pipeline
    from ..weights.io import save_safetensors

    device = distributed.setup(device)  # under torchrun: this rank's device, the process group
    progress = progress and distributed.current_world().is_main
    out_dir = Path(out_dir)
    # Before loading the model: a bad --resume, or a finished run that would be overwritten, fails at once.
    # (the name is the file the run writes: resuming under another would leave two files of one run)
    ensure_new_run(
        out_dir,
        resume=resume,
        overwrite=overwrite,
        outputs=[f"{spec.output_name}.safetensors", "samples"],
        same={"output_name": ("--name", spec.output_name)},
        data=spec.data,
        trained_on={"model_id": ("--model", model_identity(spec.model))},
        force_resume=force_resume,
    )
    started = time.time()
    base_dtype = "bf16" if cfg.mixed_precision == "bf16" else "fp32"  # frozen weights may be half; LoRA stays fp32
    pipe = load_pipeline(spec.model, device=device, dtype=base_dtype)
    if not isinstance(pipe, Pipeline):
        raise LoRATrainingError(f"{spec.model} is not a text-to-image (latent diffusion) model: no LoRA to train")
    resolution = spec.resolution or pipe.default_size
    if resolution % pipe.size_multiple:
        raise LoRATrainingError(f"resolution {resolution} is not a multiple of {pipe.size_multiple}")
    data = prepare_data(pipe, spec, resolution, device)
    n = data.latents.shape[0]
    if progress:
        from .settings import settings_line

        print(
            settings_line(
                "lora",
                model=spec.model,
                resolution=resolution,
                images=n,
                cfg=cfg,
                device=device,
                rank=spec.rank,
                alpha=spec.alpha,
                targets=spec.targets,
            ),
            flush=True,
        )

    g = torch.Generator().manual_seed(cfg.seed)
    network, chosen = LoRANetwork.create(pipe.unet, pipe.text_encoder if _uses_clip(pipe) else None, spec, g)
    handle = patch_layers([(module, network.layers[key]) for key, module in chosen], spec.output_name)  # type: ignore[misc]
    loss = DiffusionLoss(pipe.noise_schedule.alphas_cumprod.to(device), pipe.prediction_type, spec.min_snr_gamma)

    def loss_fn(m: nn.Module, step: int, gen: torch.Generator) -> torch.Tensor:
        idx = data_indices(step, cfg.batch_size, n, cfg.seed).to(device)
        r = distributed.local_rows(idx.shape[0])  # this rank's rows; the draws are made for the whole batch
        z0 = data.latents[idx]  # (B, C, h, w)
        t, noise, x_t = loss.draw(z0, gen)
        rows = data.caption_rows(idx, gen)[
            r
        ]  # which wording of each image (drawn for the whole batch, after the noise)
        if data.states is not None:
            ctx = data.states[rows]  # (b, 77, D)
        else:
            ctx = pipe.text_encoder(data.token_ids[rows]).last_hidden_state  # (b, 77, D), through the TE LoRA
        extra = {k: v[rows].to(pipe.dtype) for k, v in data.unet_kwargs.items()}
        out = pipe.unet(x_t[r].to(pipe.dtype), t[r], encoder_hidden_states=ctx.to(pipe.dtype), **extra)
        return loss(out, z0[r], noise[r], t[r])

    meta = {
        "kind": "lora",
        "model": spec.model,
        "model_id": model_identity(spec.model),
        "output_name": spec.output_name,
        "rank": spec.rank,
        "alpha": spec.effective_alpha,
        "targets": list(spec.targets),
        "train_text_encoder": spec.train_text_encoder,
    }
    sample_fn = None
    if cfg.sample_every > 0:
        from .samples import write_sample

        prompt = spec.sample_prompt if spec.sample_prompt is not None else data.captions[0]

        def sample_fn(_ema: nn.Module, step: int, _path: Path) -> None:
            # The live LoRA is patched into the pipeline's layers, so the ordinary call uses the current weights.
            what = f"LoRA {spec.output_name} at step {step}"  # not in the prompt: its file is the last step's
            write_sample(pipe, prompt, step, out_dir, seed=cfg.seed, size=resolution, modules=[network], training=what)

    try:
        with gradient_checkpointing([pipe.unet, pipe.text_encoder], spec.gradient_checkpointing):
            result = train(
                network,
                loss_fn,
                cfg,
                out_dir,
                device=device,
                resume=resume,
                sample_fn=sample_fn,
                progress=progress,
                meta=meta,
                sync="allreduce",  # the LoRA is patched into the U-Net and never called itself: no DDP wrapper
            )
    finally:
        handle.remove()

    export = network
    if spec.use_ema:
        from .checkpoint import load_checkpoint

        export = LoRANetwork(
            {
                k: LoRALayer(la.down.detach().clone(), la.up.detach().clone(), scale=la.scale, conv=la.conv)
                for k, la in cast(dict[str, LoRALayer], network.layers).items()
            },
            network.alphas,
        )
        export.load_state_dict(load_checkpoint(result.checkpoint)["ema"]["model"])
    from ..weights.io import parse_dtype

    tensors = export.kohya_state_dict(parse_dtype(spec.save_dtype))
    metadata = kohya_metadata(spec, cfg, pipe, data, resolution, result, started, network)
    path = out_dir / f"{spec.output_name}.safetensors"
    if distributed.current_world().is_main:  # under torchrun rank 0 writes, the others wait
        save_safetensors(tensors, path, metadata=metadata)
        # kohya's sshs_model_hash: SHA-256 of the tensor bytes after the header (A1111's "addnet" hash), which
        # writing the metadata does not change; so hash the written file, then write it again with the hash in.
        with open(path, "rb") as f:
            offset = 8 + int.from_bytes(f.read(8), "little")
            f.seek(offset)
            metadata["sshs_model_hash"] = hashlib.sha256(f.read()).hexdigest()
        save_safetensors(tensors, path, metadata=metadata)
    distributed.barrier()
    if progress:
        print(f"LoRA: {len(network.layers)} layers, {network.num_parameters():,} parameters -> {path}")
    return result, path


def kohya_metadata(
    spec: LoRASpec,
    cfg: TrainConfig,
    pipe: Any,
    data: LoRAData,
    resolution: int,
    result: TrainResult,
    started: float,
    network: LoRANetwork,
) -> dict[str, str]:
    """kohya-ss/sd-scripts' ``ss_*`` training metadata (the fields A1111's and ComfyUI's LoRA browsers show)."""
    width = getattr(pipe.unet.config, "cross_attention_dim", None)
    sdxl = getattr(pipe, "text_kind", None) == "sdxl"  # 2048 wide: its own version name in kohya's metadata
    v2 = width == 1024 and not sdxl
    base = base_model_file(pipe.source)
    has_conv = any(
        isinstance(la.conv, dict) and la.down.ndim == 4 and la.down.shape[2:] != (1, 1)
        for la in cast(dict[str, LoRALayer], network.layers).values()
    )
    args: dict[str, str] = {}
    if has_conv:
        args = {"conv_dim": str(spec.effective_conv_rank), "conv_alpha": f"{spec.effective_conv_alpha:g}"}
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(spec.rank),
        "ss_network_alpha": f"{spec.effective_alpha:g}",
        "ss_network_args": json.dumps(args) if args else "null",
        "ss_base_model_version": "sdxl_base_v1-0" if sdxl else ("sd_v2" if v2 else "sd_v1"),
        "ss_v2": str(v2),
        "ss_v_parameterization": str(pipe.prediction_type == "v_prediction"),
        "ss_sd_model_name": str(spec.model),
        "ss_sd_model_hash": legacy_hash(base) if base else "",
        "ss_new_sd_model_hash": _file_sha256(base) if base else "",
        "ss_output_name": spec.output_name,
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_num_train_images": str(data.latents.shape[0]),
        "ss_max_train_steps": str(cfg.steps),
        "ss_steps": str(result.step),
        "ss_batch_size_per_device": str(cfg.batch_size // distributed.current_world().size),  # global / ranks
        "ss_learning_rate": f"{cfg.lr:g}",
        "ss_unet_lr": f"{cfg.lr:g}",
        "ss_text_encoder_lr": f"{cfg.lr:g}" if spec.train_text_encoder else "0",
        "ss_network_train_unet_only": str(not spec.train_text_encoder),
        "ss_lr_warmup_steps": str(cfg.warmup_steps),
        "ss_lr_scheduler": "constant_with_warmup",
        "ss_optimizer": f"torch.optim.AdamW(betas={tuple(cfg.betas)},weight_decay={cfg.weight_decay})",
        "ss_max_grad_norm": f"{cfg.grad_clip:g}",
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_gradient_checkpointing": str(spec.gradient_checkpointing),
        "ss_min_snr_gamma": "None" if spec.min_snr_gamma is None else f"{spec.min_snr_gamma:g}",
        "ss_seed": str(cfg.seed),
        "ss_training_started_at": str(int(started)),
        "ss_training_finished_at": str(int(time.time())),
        "ss_tag_frequency": json.dumps(tag_frequency(data.captions, spec.data)),
        "ss_training_comment": f"trained by sdengine; targets {', '.join(spec.targets)}; EMA {spec.use_ema}",
        "sdengine.lora_targets": ",".join(spec.targets),
    }
    meta.update(spec.extra_metadata)
    return meta


__all__ = [
    "LoRAData",
    "LoRANetwork",
    "LoRASpec",
    "LoRATrainingError",
    "TARGET_KINDS",
    "gradient_checkpointing",
    "kohya_metadata",
    "prepare_data",
    "train_lora",
]
