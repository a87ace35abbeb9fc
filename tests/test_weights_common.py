"""Tiny random SD-shaped models (diffusers/transformers as oracles) shared by the weights tests."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

for _name in ("diffusers", "transformers"):
    logging.getLogger(_name).setLevel(logging.ERROR)


def tiny_unet(kind: str = "sd1", **over):
    from diffusers import UNet2DConditionModel

    cfg = dict(
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        sample_size=8,
        in_channels=9 if kind == "inpaint" else 4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=8,
        use_linear_projection=kind == "sd2",
    )
    cfg.update(over)
    torch.manual_seed(0)
    return UNet2DConditionModel(**cfg)


def tiny_vae(**over):
    from diffusers import AutoencoderKL

    cfg = dict(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=16,
    )
    cfg.update(over)
    torch.manual_seed(1)
    return AutoencoderKL(**cfg)


def tiny_clip(kind: str = "sd1", **over):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = dict(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=3,
        vocab_size=520,
        max_position_embeddings=77,
        projection_dim=16,
        hidden_act="gelu" if kind == "sd2" else "quick_gelu",
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    cfg.update(over)
    torch.manual_seed(2)
    return CLIPTextModel(CLIPTextConfig(**cfg)).eval()


def randomize(module: torch.nn.Module, seed: int = 3) -> torch.nn.Module:
    """Random values everywhere (diffusers zero-inits some convs, which would hide mapping mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module


def write_byte_tokenizer(dst: Path) -> Path:
    """A CLIPTokenizer folder whose vocab is the 512 byte-level symbols + 2 specials (no merges)."""
    # GPT-2/CLIP byte -> printable-unicode table: printable Latin-1 bytes map to themselves, the rest to 256+n.
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    chars = [chr(b) for b in keep] + [chr(256 + n) for n in range(len(extra))]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "vocab.json").write_text(json.dumps(vocab))
    (dst / "merges.txt").write_text("#version: 0.2\n")
    from transformers import CLIPTokenizer

    CLIPTokenizer(str(dst / "vocab.json"), str(dst / "merges.txt"), model_max_length=77).save_pretrained(dst)
    return dst


def tiny_pipeline(kind: str = "sd1", tmp: Path | None = None):
    """A random StableDiffusion(Inpaint)Pipeline on tiny components; saved under tmp/'folder' if tmp given."""
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    unet = randomize(tiny_unet(kind), 10)
    vae = randomize(tiny_vae(), 11)
    te = randomize(tiny_clip("sd2" if kind == "sd2" else "sd1"), 12)
    sched_kw = dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False, steps_offset=1
    )
    if kind == "sd2":
        scheduler = DDIMScheduler(prediction_type="v_prediction", clip_sample=False, **sched_kw)
    else:
        scheduler = PNDMScheduler(skip_prk_steps=True, **sched_kw)
    tok_dir = write_byte_tokenizer((tmp or Path("/tmp/sdengine-weights-tests")) / "tok")
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    cls = StableDiffusionInpaintPipeline if kind == "inpaint" else StableDiffusionPipeline
    pipe = cls(
        unet=unet,
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if tmp is not None:
        pipe.save_pretrained(tmp / "folder")
    return pipe


def state(module: torch.nn.Module) -> dict:
    """A module's state dict in sdengine's names: transformers 5's CLIPTextModel drops `text_model.`."""
    sd = module.state_dict()
    if type(module).__name__ == "CLIPTextModel" and not any(k.startswith("text_model.") for k in sd):
        sd = {f"text_model.{k}": v for k, v in sd.items()}
    return sd


def assert_same_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b), (sorted(set(a) - set(b))[:5], sorted(set(b) - set(a))[:5])
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k
