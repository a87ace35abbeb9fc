"""``sdengine train embedding``: textual inversion (Gal et al. 2022): learn ``n`` token vectors for a new word
from a folder of images, with the whole model frozen.

Each image's caption is a template (A1111's convention): ``[name]`` is the word being learned and
``[filewords]`` the image's ``.txt`` caption (empty when there is none); the default is
``a photo of [name]``. The word's vectors start, as in A1111, from the token embeddings of ``--init-text``
(vector ``i`` is the init text's token ``i * len / n``). Images are encoded to latents once; each step encodes
the batch's captions through the frozen CLIP text encoder with the trainable vectors in the word's place
(:meth:`sdengine.models.clip_text.CLIPTextModel.set_extra_tokens`, the path generation uses), then one U-Net
forward with the usual diffusion loss.

The optimisation, checkpoints and exact resume are the shared loop of :mod:`sdengine.train.loop`; the module it
trains holds the vectors only. The result, ``OUT/NAME.safetensors`` (``{"emb_params": (n, D)}``), is what
A1111, diffusers' ``load_textual_inversion`` and ``--embeddings-dir`` read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdengine.errors import SdengineError

from ..text.embeddings import MAX_VECTORS, FixedWords, save_embedding
from .checkpoint import ensure_new_run, locks_out_dir, model_identity
from .loop import TrainConfig, TrainResult, data_indices, train


class EmbeddingTrainingError(SdengineError, ValueError):
    """A user mistake in the textual-inversion training inputs (one line on stderr)."""


@dataclass
class EmbeddingSpec:
    """What to learn, besides the optimisation settings in :class:`~sdengine.train.loop.TrainConfig`."""

    model: str  # a diffusers folder or a single SD 1.x/2.x file (a CLIP text encoder)
    data: str  # a folder of images, .txt captions optional (used by [filewords])
    name: str  # the word; also the file name
    vectors: int = 1
    init_text: str = "*"
    template: str = "a photo of [name]"
    resolution: int | None = None  # None: the model's own training size

    def __post_init__(self) -> None:
        if not 1 <= self.vectors <= MAX_VECTORS:
            raise EmbeddingTrainingError(f"vectors must be in 1..{MAX_VECTORS}, got {self.vectors}")
        if not self.name or not all(c.isalnum() or c in "._- " for c in self.name) or self.name.strip() != self.name:
            raise EmbeddingTrainingError(
                f"embedding name {self.name!r}: use letters, digits, '.', '_', '-' (it becomes a file name)"
            )
        if not self.init_text.strip():  # it has no tokens: refused here, not after the model has loaded
            raise EmbeddingTrainingError(f"init text {self.init_text!r} has no tokens: give a word (A1111 uses *)")
        if "[name]" not in self.template:
            raise EmbeddingTrainingError(f"template {self.template!r} has no [name]: the word would never be seen")
        if self.resolution is not None and self.resolution < 8:
            raise EmbeddingTrainingError(f"resolution must be >= 8 pixels, got {self.resolution}")


class EmbeddingVectors(nn.Module):
    """The trainable ``(n, D)`` vectors of one word."""

    def __init__(self, vectors: torch.Tensor) -> None:
        super().__init__()
        self.vectors = nn.Parameter(vectors.detach().float().clone())


def initial_vectors(text_encoder: Any, tokenizer: Any, init_text: str, n: int) -> torch.Tensor:
    """A1111's start: the token embeddings of ``init_text``; vector ``i`` is its token ``i * len / n``."""
    ids = tokenizer.encode(init_text)[:n]
    if not ids:
        raise EmbeddingTrainingError(f"init text {init_text!r} has no tokens")
    table = text_encoder.text_model.embeddings.token_embedding.weight
    embedded = table[torch.tensor(ids, device=table.device)].detach().float()  # (k, D)
    return torch.stack([embedded[i * len(ids) // n] for i in range(n)])


def captions_for(spec: EmbeddingSpec, file_captions: list[str]) -> list[str]:
    """The template of each image, ``[name]`` and ``[filewords]`` filled in."""
    return [spec.template.replace("[filewords]", c).replace("[name]", spec.name) for c in file_captions]


@locks_out_dir
def train_embedding(
    spec: EmbeddingSpec,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    force_resume: bool = False,
) -> tuple[TrainResult, Path]:
    """Train and write ``out_dir/<name>.safetensors`` -> (loop result, file path)."""
    from ..data.folders import ImageFolder, ImageFolderError
    from ..diffusion.loss import DiffusionLoss
    from ..pipeline import Pipeline, load_pipeline
    from ..prompts import prompt_chunks
    from ..vae_utils import encode

    device = torch.device(device)
    out_dir = Path(out_dir)
    file_name = f"{spec.name}.safetensors"
    # The name is the run's file: resuming under another one would leave two files of one run (refused, as a seed).
    ensure_new_run(
        out_dir,
        resume=resume,
        overwrite=overwrite,
        outputs=[file_name],
        # --init-text: the vectors' start, which a resumed run takes from the checkpoint instead
        same={"name": ("--name", spec.name), "init_text": ("--init-text", spec.init_text)},
        data=spec.data,
        trained_on={"model_id": ("--model", model_identity(spec.model))},
        force_resume=force_resume,
    )
    pipe = load_pipeline(spec.model, device=device, dtype="fp32")
    if not isinstance(pipe, Pipeline) or pipe.conditioner.kind != "clip":
        raise EmbeddingTrainingError(f"{spec.model}: textual inversion needs an SD model with a CLIP text encoder")
    resolution = spec.resolution or pipe.default_size
    if resolution % pipe.size_multiple:
        raise EmbeddingTrainingError(f"resolution {resolution} is not a multiple of {pipe.size_multiple}")
    try:
        ds = ImageFolder(spec.data, size=resolution, channels=3)
    except (ImageFolderError, FileNotFoundError) as e:
        raise EmbeddingTrainingError(str(e)) from None
    te, tok = pipe.text_encoder, pipe.tokenizer
    captions = captions_for(spec, ds.captions)
    with torch.no_grad():
        images = ds.stack().to(device)  # (N, 3, H, W) in [-1, 1]
        latents = torch.cat([encode(pipe.vae, images[i : i + 8], None, tiled=False) for i in range(0, len(ds), 8)])
    # The word's tokens -> ids past the vocabulary, which the encoder reads from the trainable vectors.
    base = te.text_model.embeddings.token_embedding.num_embeddings
    words = tok.with_embeddings(FixedWords({spec.name: list(range(base, base + spec.vectors))}, tok))
    rows = []
    for caption in captions:
        chunk = prompt_chunks(words, caption, pad_token_id=pipe.pad_token_id)[0]  # one 77-token window per caption
        if base not in chunk.ids:
            raise EmbeddingTrainingError(f"caption {caption!r}: the word {spec.name!r} is not in its first chunk")
        rows.append(chunk.ids)
    token_ids = torch.tensor(rows, dtype=torch.long, device=device)  # (N, 77)
    n = latents.shape[0]
    if progress:
        from .settings import settings_line

        print(
            settings_line(
                "embedding",
                model=spec.model,
                resolution=resolution,
                images=n,
                cfg=cfg,
                device=device,
                name=spec.name,
                vectors=spec.vectors,
            ),
            flush=True,
        )

    network = EmbeddingVectors(initial_vectors(te, tok, spec.init_text, spec.vectors))
    loss = DiffusionLoss(pipe.noise_schedule.alphas_cumprod.to(device), pipe.prediction_type, None)

    def loss_fn(m: nn.Module, step: int, gen: torch.Generator) -> torch.Tensor:
        idx = data_indices(step, cfg.batch_size, n, cfg.seed).to(device)
        te.set_extra_tokens(m.get_parameter("vectors"))
        ctx = te(token_ids[idx]).last_hidden_state  # (B, 77, D), gradients reach the vectors only
        t, noise, x_t = loss.draw(latents[idx].float(), gen)
        out = pipe.unet(x_t, t, encoder_hidden_states=ctx)
        return loss(out, latents[idx].float(), noise, t)

    meta = {
        "kind": "embedding",
        "model": spec.model,
        "model_id": model_identity(spec.model),
        "name": spec.name,
        "init_text": spec.init_text,
        "vectors": spec.vectors,
    }
    try:
        result = train(network, loss_fn, cfg, out_dir, device=device, resume=resume, progress=progress, meta=meta)
    finally:
        te.set_extra_tokens(None)
    path = save_embedding(out_dir / file_name, network.vectors)
    if progress:
        print(f"embedding {spec.name}: {spec.vectors} vector(s) of {network.vectors.shape[1]} -> {path}")
    return result, path


__all__ = [
    "EmbeddingSpec",
    "EmbeddingTrainingError",
    "EmbeddingVectors",
    "captions_for",
    "initial_vectors",
    "train_embedding",
]
