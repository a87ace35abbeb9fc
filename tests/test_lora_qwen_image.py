"""LoRAs on Qwen-Image against diffusers, on the tiny random Qwen-Image folder of ``tests/_qwen_models.py``.

One random LoRA on every Linear of the transformer (the attention's q/k/v/out of both streams, ``img_mod.1`` /
``txt_mod.1``, both MLPs, ``img_in`` / ``txt_in``, the timestep MLP, ``norm_out.linear``, ``proj_out``) is written in
the layouts Qwen-Image LoRAs come in: diffusers / PEFT (``transformer.<module>.lora_A.weight``), PEFT's bare names with
the adapter name and ``alpha`` (``<module>.lora_A.default.weight``), ComfyUI / ai-toolkit (``diffusion_model.``, with
``lora_A`` / ``lora_B`` or ``lora_down`` / ``lora_up`` and ``alpha``), kohya-style (``lora_unet_`` with underscores
and ``alpha``: musubi-tuner) and ComfyUI's ``lycoris_``. Oracle: diffusers' ``QwenImagePipeline.load_lora_weights``
on each layout it reads (every one but ``lycoris_``, which ComfyUI alone reads), ``set_adapters`` for weights and
two LoRAs at once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import sdengine  # noqa: E402
from _qwen_models import diffusers_qwen, make_qwen_folder  # noqa: E402
from sdengine.weights.io import save_safetensors  # noqa: E402
from sdengine.weights.lora import LoRAFileError, apply_loras  # noqa: E402

TOL = 1e-4  # mean absolute difference on 0..1 pixels (fp32, CPU)
PROMPT, NEGATIVE = "a red apple on a table", "blurry"
SEED, STEPS, SIZE = 3, 3, 32
RANK, ALPHA = 4, 2.0  # the update is alpha / rank * up @ down
LAYOUTS = ("diffusers", "peft_default", "comfy", "ai_toolkit", "kohya", "lycoris")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    folder = make_qwen_folder(tmp_path_factory.mktemp("qwenlora") / "tiny-qwen")
    return folder, sdengine.load_pipeline(folder, device="cpu")


@pytest.fixture(scope="module")
def oracle(qwen):
    return diffusers_qwen(qwen[0])


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def _linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _pairs(model: torch.nn.Module, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A random (down, up) for every Linear of the transformer (alpha not applied)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in _linears(model).items():
        down = torch.randn(RANK, m.in_features, generator=g) * 0.3 / m.in_features**0.5
        out[name] = (down, torch.randn(m.out_features, RANK, generator=g) * 0.3)
    return out


def _layout(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], layout: str) -> dict[str, torch.Tensor]:
    """The LoRA ``pairs`` (with alpha ALPHA) in one file layout; ``diffusers`` and ``ai_toolkit`` carry no alpha:
    its scale is in ``lora_B``."""
    sd: dict[str, torch.Tensor] = {}
    alpha = torch.tensor(ALPHA)
    for name, (down, up) in pairs.items():
        flat = name.replace(".", "_")
        if layout == "diffusers":
            sd[f"transformer.{name}.lora_A.weight"], sd[f"transformer.{name}.lora_B.weight"] = down, up * (ALPHA / RANK)
        elif layout == "ai_toolkit":
            sd[f"diffusion_model.{name}.lora_A.weight"] = down
            sd[f"diffusion_model.{name}.lora_B.weight"] = up * (ALPHA / RANK)
        elif layout == "peft_default":
            sd[f"{name}.lora_A.default.weight"], sd[f"{name}.lora_B.default.weight"] = down, up
            sd[f"{name}.alpha"] = alpha
        else:
            key = {"comfy": f"diffusion_model.{name}", "kohya": f"lora_unet_{flat}", "lycoris": f"lycoris_{flat}"}
            k = key[layout]
            sd[f"{k}.lora_down.weight"], sd[f"{k}.lora_up.weight"], sd[f"{k}.alpha"] = down, up, alpha
    return {k: v.contiguous() for k, v in sd.items()}


def _write(sd: dict[str, torch.Tensor], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(sd, path)
    return path


def _ours(pipe, prompt: str = PROMPT, **kw) -> np.ndarray:
    args = dict(negative_prompt=NEGATIVE, steps=STEPS, seed=SEED, width=SIZE, height=SIZE, progress=False)
    return pipe(prompt, **{**args, **kw}).arrays


def _theirs(ref) -> np.ndarray:
    with torch.no_grad():
        return ref(PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=4.0, height=SIZE, width=SIZE,
                   num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED),
                   output_type="np").images  # fmt: skip


def test_every_layout_matches_diffusers_load_lora_weights(qwen, oracle, tmp_path):
    """Each layout: every Linear of the transformer adapted (nothing unmatched), the image equal to diffusers'
    ``load_lora_weights`` of the same file (mean abs < 1e-4); every layout is the same LoRA; after the call the model
    is its own again."""
    _, pipe = qwen
    pairs = _pairs(pipe.transformer, seed=11)
    plain = _ours(pipe)
    n_linear = len(_linears(pipe.transformer))
    images = {}
    for layout in LAYOUTS:
        path = _write(_layout(pairs, layout), tmp_path / f"{layout}.safetensors")
        images[layout] = _ours(pipe, loras=[(path, 1.0)])
        with apply_loras(pipe.transformer, pipe.text_encoder, [(path, 1.0)]) as h:
            assert h.reports[0].complete and len(h.reports[0].matched) == n_linear, h.reports[0].summary()
        if layout == "lycoris":  # ComfyUI's names: diffusers' loader does not read them
            continue
        oracle.load_lora_weights(_layout(pairs, layout), adapter_name=layout)
        oracle.set_adapters([layout], [1.0])
        theirs = _theirs(oracle)
        oracle.delete_adapters(layout)
        mad = _mad(images[layout], theirs)
        big = float(np.abs(images[layout] - theirs).max())
        print(f"qwen-image LoRA ({layout}) vs diffusers QwenImagePipeline.load_lora_weights: mean abs {mad:.2e}, "
              f"max {big:.2e}")  # fmt: skip
        assert mad < TOL, (layout, mad)
    moved = _mad(images["diffusers"], plain)
    print(f"qwen-image LoRA moves the image by mean abs {moved:.2e}")
    assert moved > 1e-3  # the LoRA changed the image
    for layout in LAYOUTS[1:]:
        mad = _mad(images[layout], images["diffusers"])
        assert mad < 1e-6, (layout, mad)
    np.testing.assert_array_equal(_ours(pipe), plain)  # removed after the call
    np.testing.assert_array_equal(_theirs(oracle), _theirs(diffusers_qwen(qwen[0])))  # the oracle's adapters gone


def test_two_loras_weights_tags_and_cli_match_set_adapters(qwen, oracle, tmp_path):
    """Two LoRAs at 0.7 and -0.5 (a kohya-style file and a diffusers one) equal diffusers' ``set_adapters`` with
    those weights; ``<lora:NAME:W>`` tags give the same image as ``loras=`` (the infotext names them and their
    hashes); ``sdengine generate --lora FILE:W`` writes it (within PNG rounding); fused and unfused agree."""
    folder, pipe = qwen
    loras = tmp_path / "loras"
    a_pairs, b_pairs = _pairs(pipe.transformer, seed=21), _pairs(pipe.transformer, seed=22)
    a = _write(_layout(a_pairs, "kohya"), loras / "qa.safetensors")
    b = _write(_layout(b_pairs, "diffusers"), loras / "qb.safetensors")
    ours = _ours(pipe, loras=[(a, 0.7), (b, -0.5)])
    oracle.load_lora_weights(_layout(a_pairs, "kohya"), adapter_name="a")
    oracle.load_lora_weights(_layout(b_pairs, "diffusers"), adapter_name="b")
    oracle.set_adapters(["a", "b"], [0.7, -0.5])
    theirs = _theirs(oracle)
    oracle.delete_adapters(["a", "b"])
    mad = _mad(ours, theirs)
    big = float(np.abs(ours - theirs).max())
    print(f"qwen-image two LoRAs (0.7, -0.5) vs diffusers set_adapters: mean abs {mad:.2e}, max {big:.2e}")
    assert mad < TOL, mad
    assert _mad(ours, _ours(pipe)) > 1e-3  # they act
    # the tags are taken out, and the spaces they leave at the end (Qwen2's tokenizer reads spaces)
    tagged = pipe(f"{PROMPT} <lora:qa:0.7> <lora:qb:-0.5>", lora_dir=loras, negative_prompt=NEGATIVE, steps=STEPS,
                  seed=SEED, width=SIZE, height=SIZE, progress=False)  # fmt: skip
    np.testing.assert_allclose(tagged.arrays, ours, atol=1e-6)
    info = tagged.infotexts[0]
    assert "<lora:qa:0.7>" in info and "<lora:qb:-0.5>" in info and "Lora hashes: " in info
    with pytest.raises(LoRAFileError, match="LoRA 'nope' not found in"):
        _ours(pipe, prompt="a <lora:nope:1>", lora_dir=loras)
    with apply_loras(pipe.transformer, None, [(a, 0.7), (b, -0.5)]) as h:
        patched = _ours(pipe)
        h.fuse()
        fused = _mad(_ours(pipe), patched)
        print(f"qwen-image two LoRAs fused vs patched: mean abs {fused:.2e}")
        assert fused < 1e-6
        h.unfuse()
    from PIL import Image

    from sdengine.cli import main

    out = tmp_path / "a.png"
    args = ["generate", "--model", str(folder), PROMPT, "--negative", NEGATIVE, "--steps", str(STEPS), "--seed"]
    args += [str(SEED), "--width", str(SIZE), "--height", str(SIZE), "--out", str(out), "--no-progress"]
    assert main([*args, "--lora", f"{a}:0.7", "--lora", f"{b}:-0.5"]) == 0
    got = np.asarray(Image.open(out), dtype=np.float32) / 255
    assert _mad(got, ours[0]) < 1.0 / 255


def _small_dits():
    from sdengine.models.flux import FluxConfig, FluxTransformer
    from sdengine.models.mmdit import MMDiT, MMDiTConfig
    from sdengine.models.qwen_image import QwenImageConfig, QwenImageTransformer

    qwen = QwenImageTransformer(QwenImageConfig(num_layers=1, attention_head_dim=16, num_attention_heads=2,
                                                joint_attention_dim=32, axes_dims_rope=(4, 6, 6))).eval()  # fmt: skip
    flux = FluxTransformer(FluxConfig(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                      in_channels=16, joint_attention_dim=32, pooled_projection_dim=24,
                                      axes_dims_rope=(4, 6, 6))).eval()  # fmt: skip
    sd3 = MMDiT(MMDiTConfig(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=16,
                            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
                            pooled_projection_dim=24, out_channels=4, pos_embed_max_size=8)).eval()  # fmt: skip
    return qwen, flux, sd3


def _pair(key: str, din: int, dout: int, kohya: bool = False) -> dict[str, torch.Tensor]:
    d, u = ("lora_down", "lora_up") if kohya else ("lora_A", "lora_B")
    return {f"{key}.{d}.weight": torch.randn(RANK, din) * 0.1, f"{key}.{u}.weight": torch.randn(dout, RANK) * 0.1}


# (file layers, the start of the one-line error) for a LoRA that is not Qwen-Image's, on the tiny Qwen-Image model
NOT_QWEN = [
    ({**_pair("lora_unet_double_blocks_0_img_attn_proj", 32, 32, True)}, "a LoRA for Flux.1; the model is Qwen-Image"),
    ({**_pair("diffusion_model.joint_blocks.0.x_block.attn.proj", 32, 32)}, r"a LoRA for SD3 \(MMDiT\); the model is"),
    ({**_pair("diffusion_model.distilled_guidance_layer.in_proj", 16, 32)}, "a LoRA for Chroma; the model is Qwen"),
    (
        {**_pair("transformer.transformer_blocks.0.attn.to_q", 32, 32),
         **_pair("transformer.transformer_blocks.0.norm1.linear", 32, 192)},
        "a LoRA for Flux.1 or SD3: it adapts transformer.transformer_blocks.0.norm1.linear, a layer Qwen-Image does "
        "not have",
    ),
    (
        {**_pair("lora_transformer_transformer_blocks_0_ff_context_net_0_proj", 32, 128, True),
         **_pair("lora_transformer_context_embedder", 32, 32, True)},
        "it adapts lora_transformer_context_embedder \\(and 1 more\\)",
    ),
    (
        {**_pair("transformer.transformer_blocks.0.attn.to_q", 32, 32),
         **_pair("text_encoder.layers.0.self_attn.q_proj", 32, 32)},
        "adapts a text encoder \\(1 layers, e.g. text_encoder.layers.0.self_attn.q_proj\\): LoRAs for Qwen-Image",
    ),
    (
        {**_pair("diffusion_model.transformer_blocks.0.attn.to_q", 48, 32)},
        r"shapes do not match this model: unet.transformer_blocks.0.attn.to_q \(LoRA maps 48 -> 32, layer 32 -> 32\)",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("layers", "error"), NOT_QWEN)
def test_what_is_not_a_qwen_image_lora_is_refused_in_one_line(layers, error, tmp_path):
    """Flux.1's, SD3's and Chroma's names (BFL's / Stability's, or diffusers' names of layers Qwen-Image lacks), a
    text-encoder layer, a layer of another width: one line naming it, the model untouched."""
    qwen, _, _ = _small_dits()
    before = {k: v.clone() for k, v in qwen.state_dict().items()}
    torch.manual_seed(0)
    path = _write(layers, tmp_path / "x.safetensors")
    with pytest.raises(LoRAFileError, match=error) as e:
        apply_loras(qwen, None, [(path, 1.0)])
    assert "\n" not in str(e.value)
    for k, v in qwen.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize(
    ("key", "module_name"),
    [("transformer.transformer_blocks.0.img_mod.1", "transformer_blocks.0.img_mod.1"),
     ("lora_unet_transformer_blocks_0_txt_mlp_net_2", "transformer_blocks.0.txt_mlp.net.2"),
     ("diffusion_model.transformer_blocks.0.img_mlp.net.0.proj", "transformer_blocks.0.img_mlp.net.0.proj")],
)  # fmt: skip
def test_a_qwen_image_lora_on_another_transformer_is_refused(key, module_name, tmp_path):
    """Qwen-Image's own layer names (a block's img_mod / txt_mod / img_mlp / txt_mlp) on Flux.1, SD3 or Chroma: one line
    saying whose LoRA it is; the same file on Qwen-Image applies."""
    qwen, flux, sd3 = _small_dits()
    module = qwen.get_submodule(module_name)
    layers = {**_pair(key, module.in_features, module.out_features, kohya=key.startswith("lora_unet_"))}
    layers.update(_pair("transformer.transformer_blocks.0.attn.to_q", 32, 32))
    path = _write(layers, tmp_path / "q.safetensors")
    with apply_loras(qwen, None, [(path, 1.0)]) as h:
        assert h.reports[0].complete and len(h.reports[0].matched) == 2
    from sdengine.models.chroma import ChromaConfig, ChromaTransformer

    chroma = ChromaTransformer(ChromaConfig(num_layers=1, num_single_layers=1, attention_head_dim=16,
                                            num_attention_heads=2, in_channels=16, joint_attention_dim=32,
                                            axes_dims_rope=(4, 6, 6), approximator_num_channels=16,
                                            approximator_hidden_dim=32, approximator_layers=2)).eval()  # fmt: skip
    for model, family in ((flux, "Flux.1"), (sd3, r"SD3 \(MMDiT\)"), (chroma, "Chroma")):
        with pytest.raises(LoRAFileError, match=f"a LoRA for Qwen-Image; the model is {family}"):
            apply_loras(model, None, [(path, 1.0)])


def test_loras_are_no_longer_refused_before_the_model_loads():
    """The request checks (the server's, before a worker holds the model) pass LoRAs and tags to the pipeline."""
    from sdengine.pipeline.qwen_image import qwen_refusals
    from sdengine.pipeline.request import GenerationRequest

    r = GenerationRequest(prompt="a cat <lora:x:0.5>", loras=[("y.safetensors", 1.0)])
    assert qwen_refusals(r) == []
    assert qwen_refusals(GenerationRequest(prompt="a", distilled_cfg_scale=3.0))[0].startswith("distilled_cfg_scale")


def test_a_lokr_file_takes_every_naming(tmp_path):
    """LyCORIS layers (a LoKr, as SimpleTuner's LyCORIS files hold) under ComfyUI's ``lycoris_`` names, behind
    ``diffusion_model.`` or kohya-style: the same layer adapted, the same output, the model its own after."""
    qwen, _, _ = _small_dits()
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 5, 32, generator=g)
    t = torch.tensor([500.0])
    with torch.no_grad():
        base = qwen(x, t, c, None)
    w1, w2 = torch.randn(4, 4, generator=g), torch.randn(8, 8, generator=g) * 0.1
    outs = []
    for i, key in enumerate(["lycoris_transformer_blocks_0_attn_add_k_proj",
                             "diffusion_model.transformer_blocks.0.attn.add_k_proj",
                             "lora_unet_transformer_blocks_0_attn_add_k_proj"]):  # fmt: skip
        path = _write({f"{key}.lokr_w1": w1, f"{key}.lokr_w2": w2, f"{key}.alpha": torch.tensor(1.0)},
                      tmp_path / f"lokr{i}.safetensors")  # fmt: skip
        with apply_loras(qwen, None, [(path, 1.0)]) as h, torch.no_grad():
            assert h.reports[0].matched == ["unet:transformer_blocks.0.attn.add_k_proj"] and h.reports[0].complete
            assert h.reports[0].algorithms == ["LoKr"]
            outs.append(qwen(x, t, c, None))
    assert float((outs[0] - base).abs().max()) > 1e-3
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    with torch.no_grad():
        assert torch.equal(qwen(x, t, c, None), base)
