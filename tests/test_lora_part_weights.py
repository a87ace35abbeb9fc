"""A1111's per-part LoRA weights: ``<lora:NAME:TE:UNET>`` / ``<lora:NAME:te=..:unet=..>`` apply one multiplier to
the text-encoder layers and another to the U-Net layers, from the prompt, the Python API, the command line and the
infotext (written back as A1111's tag, so ``--from-png`` makes the same image). Tiny random SD1 model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sdengine.nn.lora import LoRAWeight
from sdengine.weights import save_safetensors
from sdengine.weights.lora import apply_loras, kohya_name

KW = dict(width=32, height=32, cfg_scale=7.5, seed=5, steps=3, sampler="euler", schedule="normal", progress=False)


def _kohya_for(modules, component: str, seed: int) -> dict[str, torch.Tensor]:
    """A kohya LoRA (rank 2, alpha 1) on every attention q projection of ``modules`` (a U-Net or text encoder)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in modules.named_modules():
        if isinstance(m, torch.nn.Linear) and name.endswith(("attn1.to_q", "self_attn.q_proj")):
            key = kohya_name(component, name)
            out[f"{key}.lora_down.weight"] = torch.randn(2, m.in_features, generator=g) * 0.5
            out[f"{key}.lora_up.weight"] = torch.randn(m.out_features, 2, generator=g) * 0.5
            out[f"{key}.alpha"] = torch.tensor(1.0)
    assert out
    return out


@pytest.fixture(scope="module")
def setup(tiny_sd1_folder, tmp_path_factory):
    """The tiny SD1 pipeline and a folder with ``full.safetensors``: a LoRA with U-Net and text-encoder layers."""
    import sdengine

    pipe = sdengine.load_pipeline(str(tiny_sd1_folder), device="cpu")
    folder = tmp_path_factory.mktemp("loras")
    sd = {**_kohya_for(pipe.unet, "unet", 1), **_kohya_for(pipe.text_encoder, "text_encoder", 2)}
    save_safetensors(sd, folder / "full.safetensors")
    return pipe, folder


def test_tag_with_te_and_unet_weights_equals_the_parts_applied_by_hand(setup):
    """``<lora:full:0.5:1>`` is the text-encoder part at 0.5 and the U-Net part at 1 (apply_loras part=...), the
    named form is the same, and it differs from ``<lora:full:0.5>`` (once a one-line refusal)."""
    pipe, folder = setup
    path = folder / "full.safetensors"
    split = pipe(prompt="a red apple <lora:full:0.5:1>", lora_dir=folder, **KW).arrays
    named = pipe(prompt="a red apple <lora:full:te=0.5:unet=1>", lora_dir=folder, **KW).arrays
    one = pipe(prompt="a red apple <lora:full:0.5>", lora_dir=folder, **KW).arrays
    with (
        apply_loras(pipe.unet, pipe.text_encoder, [(path, 0.5)], part="text_encoders"),
        apply_loras(pipe.unet, pipe.text_encoder, [(path, 1.0)], part="unet"),
    ):
        by_hand = pipe(prompt="a red apple", **KW).arrays
    np.testing.assert_array_equal(split, by_hand)
    np.testing.assert_array_equal(named, split)
    assert np.abs(split - one).mean() > 5e-4  # the U-Net part at 1, not 0.5
    # te=0.5 alone: the U-Net part follows the text encoder's weight, as in A1111
    np.testing.assert_array_equal(pipe(prompt="a red apple <lora:full:te=0.5>", lora_dir=folder, **KW).arrays, one)


def test_infotext_writes_the_two_weights_and_round_trips(setup):
    """A LoRA given as an argument with two weights is written as A1111's ``<lora:full:0.5:1>``; reading that
    infotext back (as ``--from-png`` does) makes the same image."""
    from sdengine.metadata import parse_parameters, to_generate_kwargs

    pipe, folder = setup
    result = pipe(prompt="a red apple", loras=[(folder / "full.safetensors", LoRAWeight(0.5, 1.0))], **KW)
    text = result.infotexts[0]
    assert text.splitlines()[0] == "a red apple <lora:full:0.5:1>"
    kwargs = to_generate_kwargs(parse_parameters(text))
    assert kwargs["prompt"] == "a red apple <lora:full:0.5:1>"
    again = pipe(lora_dir=folder, progress=False, **kwargs)
    np.testing.assert_array_equal(again.arrays, result.arrays)
    assert again.infotexts[0] == text


def test_cli_lora_with_two_weights_and_from_png_round_trip(setup, tiny_sd1_folder, tmp_path, capsys):
    """``generate --lora FILE:0.5:1`` writes ``<lora:full:0.5:1>`` in the PNG, and ``--from-png`` (with the LoRA
    folder) makes the same pixels."""
    from PIL import Image

    from sdengine.cli import main
    from sdengine.metadata import read_png_parameters

    _, folder = setup
    size = ["--width", "32", "--height", "32", "--steps", "2", "--seed", "3", "--no-progress"]
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    model = ["--model", str(tiny_sd1_folder)]
    assert main(["generate", "a red apple", "--lora", f"{folder / 'full.safetensors'}:0.5:1", *model, *size,
                 "--out", str(first)]) == 0  # fmt: skip
    text = read_png_parameters(first)
    assert text is not None and text.splitlines()[0] == "a red apple <lora:full:0.5:1>"
    assert main(["generate", "--from-png", str(first), "--lora-dir", str(folder), *model, "--no-progress",
                 "--out", str(second)]) == 0  # fmt: skip
    np.testing.assert_array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("x.safetensors:0.5:1", ("x.safetensors", LoRAWeight(0.5, 1.0))),
        ("x.safetensors:0.5", ("x.safetensors", 0.5)),
        ("x.safetensors:0.7:0.7", ("x.safetensors", 0.7)),
        ("x.safetensors", ("x.safetensors", 1.0)),
        ("C:\\l\\x.safetensors:2:-1", ("C:\\l\\x.safetensors", LoRAWeight(2.0, -1.0))),
        ("a:b:0.5", ("a:b", 0.5)),
    ],
)
def test_cli_lora_argument_takes_one_or_two_weights(text, expected):
    from sdengine.commands.generate import lora_arg

    assert lora_arg(text) == expected


def test_cli_lora_argument_keeps_a_file_whose_name_ends_in_numbers(tmp_path):
    """``--lora style:1:0.5`` where ``style:1`` is the file: one weight, the rest is the name."""
    from sdengine.commands.generate import lora_arg

    f = tmp_path / "style:1"
    f.write_bytes(b"")
    assert lora_arg(f"{f}:0.5") == (str(f), 0.5)
    assert lora_arg(str(f)) == (str(f), 1.0)


def test_two_weights_are_checked_each(setup):
    """Each part's weight has the hard bound: a U-Net weight of 1e30 is refused by name before anything runs."""
    from sdengine.weights.lora import LoRAError

    pipe, folder = setup
    with pytest.raises(LoRAError, match=r"full: weight 1e\+30 is outside"):
        pipe(prompt="a red apple <lora:full:0.5:1e30>", lora_dir=folder, **KW)
    with pytest.raises(LoRAError, match=r"full: weight 1e\+30 is outside"):
        pipe(prompt="a red apple", loras=[(Path(folder) / "full.safetensors", LoRAWeight(1e30, 1.0))], **KW)
