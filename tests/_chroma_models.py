"""Random tiny Chroma pipelines saved as diffusers folders by diffusers itself, for parity tests of sdengine's
Chroma pipeline against ``ChromaPipeline`` / ``ChromaImg2ImgPipeline``, and the same transformer as a Chroma single
file (BFL's names plus ``distilled_guidance_layer.*``).

The transformer is Chroma's at a fraction of the width (one double- and two single-stream blocks of one 128-wide
head, Flux.1's RoPE axes; an approximator 32 wide, 2 layers, 16 input channels); the VAE, T5 and scheduler are the
tiny Flux ones of ``tests/_flux_models.py`` (Chroma1's folders ship FLUX.1 [dev]'s scheduler config).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from _flux_models import DEV_SCHEDULER, FLUX_TRANSFORMER, FLUX_VAE, T5, diffusers_flux, perturbed, write_t5_tokenizer
from _folder_cache import built_once

for _name in ("diffusers", "transformers"):
    logging.getLogger(_name).setLevel(logging.ERROR)

# Flux's tiny transformer without the pooled text vector, with the approximator
CHROMA_TRANSFORMER = {
    **{k: v for k, v in FLUX_TRANSFORMER.items() if k != "pooled_projection_dim"},
    "approximator_num_channels": 16,
    "approximator_hidden_dim": 32,
    "approximator_layers": 2,
}


def chroma_transformer(seed: int = 0, **overrides: object):
    import diffusers

    torch.manual_seed(seed)
    cfg = {**CHROMA_TRANSFORMER, **overrides}
    return perturbed(diffusers.ChromaTransformer2DModel(**cfg), seed + 1).eval()


@built_once  # a second call with the same arguments copies the first one's folder
def make_chroma_folder(dst: Path, *, seed: int = 0) -> Path:
    """Write a random tiny Chroma pipeline as a diffusers folder."""
    import diffusers
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    transformer = chroma_transformer(seed)
    vae = perturbed(diffusers.AutoencoderKL(**FLUX_VAE), seed + 2, 0.02).eval()
    t5 = perturbed(T5EncoderModel(T5Config(vocab_size=32128, **T5)), seed + 4, 0.02).eval()
    write_t5_tokenizer(dst / "tokenizer")
    tokenizer = T5TokenizerFast.from_pretrained(dst / "tokenizer")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER)
    pipe = diffusers.ChromaPipeline(
        scheduler=scheduler, vae=vae, text_encoder=t5, tokenizer=tokenizer, transformer=transformer
    )
    pipe.save_pretrained(dst)
    return dst


def diffusers_chroma(folder: Path, *, img2img: bool = False, inpaint: bool = False):
    """diffusers' Chroma pipeline for ``folder`` (fp32, CPU, no progress bar), its text mask made boolean."""
    name = "ChromaInpaintPipeline" if inpaint else "ChromaImg2ImgPipeline" if img2img else "ChromaPipeline"
    pipe = diffusers_flux(folder, cls_name=name)

    def boolean_mask(batch_size, sequence_length, dtype, attention_mask=None):
        # the text mask and the image tokens as one boolean mask (ChromaImg2ImgPipeline's own makes it float,
        # which attention adds to the scores: diffusers issue #12116)
        if attention_mask is None:
            return None
        image = torch.ones(batch_size, sequence_length, dtype=torch.bool, device=attention_mask.device)
        return torch.cat([attention_mask.bool(), image], dim=1)

    pipe._prepare_attention_mask = boolean_mask
    if inpaint:  # diffusers 0.42's ChromaInpaintPipeline reads a guidance_embeds it then does not use
        pipe.transformer.register_to_config(guidance_embeds=False)
    return pipe


def bool_masked_embeds(pipe, prompt: str, negative: str, max_sequence_length: int = 512) -> dict:
    """diffusers' prompt embeddings and masks of ``prompt`` / ``negative`` with the masks made boolean (what
    Chroma was trained with; diffusers 0.42 passes them as 0/1 floats that attention adds: issue #12116)."""
    out = pipe.encode_prompt(
        prompt=prompt, negative_prompt=negative, do_classifier_free_guidance=True,
        max_sequence_length=max_sequence_length, device=torch.device("cpu"),
    )  # fmt: skip
    embeds, _, mask, neg_embeds, _, neg_mask = out
    return {
        "prompt_embeds": embeds,
        "prompt_attention_mask": mask.bool(),
        "negative_prompt_embeds": neg_embeds,
        "negative_prompt_attention_mask": neg_mask.bool(),
    }
