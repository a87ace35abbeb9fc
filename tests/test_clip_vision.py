"""The CLIP vision encoder (IP-Adapter's image encoder): the same numbers as transformers'
``CLIPVisionModelWithProjection`` on tiny random weights, its files in every accepted layout, one-line errors for
the others, and the preprocessing against ``CLIPImageProcessor``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdengine.errors import UsageError
from sdengine.models.clip_vision import CLIPVisionConfig, CLIPVisionModel, clip_image_tensor
from sdengine.models.config_checks import ConfigError
from sdengine.weights.clip_vision_file import config_from_shapes, load_clip_vision, split_vision_state
from sdengine.weights.io import CorruptFileError, WeightsError

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

TOL = 1e-5


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (LayerNorms too, so that a misplaced norm shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g) / (p.shape[-1] if p.ndim else 1) ** 0.25)


def _hf_vision(act: str, layers: int = 3, *, hidden: int = 32, heads: int = 4, projection: bool = True, seed: int = 0):
    cfg = transformers.CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        patch_size=4,
        image_size=32,
        projection_dim=24,
        hidden_act=act,
        layer_norm_eps=1e-5,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    cls = transformers.CLIPVisionModelWithProjection if projection else transformers.CLIPVisionModel
    model = cls(cfg).eval()
    _randomize(model, seed + 1)
    return model


def _pixels(seed: int = 3) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _compare(ours: CLIPVisionModel, hf, x: torch.Tensor, *, projection: bool = True) -> None:
    with torch.no_grad():
        ref = hf(pixel_values=x, output_hidden_states=True)
        out = ours(x, output_hidden_states=True)
    want_embeds = ref.image_embeds if projection else ref.pooler_output
    assert out.image_embeds.shape == want_embeds.shape
    assert (out.image_embeds - want_embeds).abs().max().item() <= TOL
    assert (out.last_hidden_state - ref.last_hidden_state).abs().max().item() <= TOL
    assert (out.penultimate_hidden_state - ref.hidden_states[-2]).abs().max().item() <= TOL
    assert out.hidden_states is not None and len(out.hidden_states) == len(ref.hidden_states)
    for a, b in zip(out.hidden_states, ref.hidden_states, strict=True):
        assert (a - b).abs().max().item() <= TOL
    # the outputs depend on the pixels (a model that ignored them would pass the comparisons above only by luck)
    assert (out.image_embeds[0] - out.image_embeds[1]).abs().max().item() > 1e-3


@pytest.mark.parametrize(("act", "layers"), [("quick_gelu", 3), ("gelu", 2), ("gelu", 1)])
def test_parity_with_transformers_folder_and_bare_file(act, layers, tmp_path):
    hf = _hf_vision(act, layers)
    hf.save_pretrained(tmp_path / "image_encoder")
    ours = load_clip_vision(tmp_path / "image_encoder")
    assert ours.config.hidden_act == act and ours.config.num_layers == layers and ours.config.projection_dim == 24
    _compare(ours, hf, _pixels())
    # the same weights as one bare file (ComfyUI's clip_vision_*.safetensors): 32 wide is no known CLIP width,
    # so the head count and activation are given
    flat = safetensors_torch.load_file(str(tmp_path / "image_encoder" / "model.safetensors"))
    safetensors_torch.save_file(flat, str(tmp_path / "clip_vision.safetensors"))
    bare = load_clip_vision(tmp_path / "clip_vision.safetensors", num_heads=4, hidden_act=act)
    assert bare.config == ours.config
    _compare(bare, hf, _pixels(5))


def test_config_inferred_from_shapes_of_a_full_clip_file(tmp_path):
    """A 64-wide tower: one 64-wide head and exact gelu by the width rule; a full CLIPModel file's text half
    is ignored and its vision half gives the numbers transformers does."""
    vision = transformers.CLIPVisionConfig(
        hidden_size=64, intermediate_size=40, num_hidden_layers=2, num_attention_heads=1, patch_size=8,
        image_size=32, hidden_act="gelu",
    )  # fmt: skip
    text = transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, vocab_size=99,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )  # fmt: skip
    cfg = transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=20)
    cfg.vision_config._attn_implementation = "eager"
    torch.manual_seed(0)
    full = transformers.CLIPModel(cfg).eval()
    _randomize(full, 7)
    path = tmp_path / "clip_full.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))
    ours = load_clip_vision(path)
    assert ours.config == CLIPVisionConfig(
        hidden_size=64, intermediate_size=40, num_layers=2, num_heads=1, patch_size=8, image_size=32,
        projection_dim=20, hidden_act="gelu",
    )  # fmt: skip
    x = _pixels()
    with torch.no_grad():
        want = full.get_image_features(pixel_values=x)
        want = getattr(want, "pooler_output", want)  # transformers 5 returns an output object
        got = ours(x).image_embeds
    assert (got - want).abs().max().item() <= TOL


def test_clip_vision_model_without_projection_transformers5_keys(tmp_path):
    """transformers 5 saves a CLIPVisionModel without the vision_model. prefix; image_embeds is then the pooled
    output."""
    hf = _hf_vision("quick_gelu", 2, projection=False)
    hf.save_pretrained(tmp_path)
    keys = safetensors_torch.load_file(str(tmp_path / "model.safetensors")).keys()
    ours = load_clip_vision(tmp_path)
    assert ours.config.projection_dim is None and ours.visual_projection is None
    _compare(ours, hf, _pixels(), projection=False)
    if int(transformers.__version__.split(".")[0]) >= 5:  # the layout this test is about was written
        assert "embeddings.patch_embedding.weight" in keys and not any(k.startswith("vision_model.") for k in keys)


def _meta_tower(width: int, *, layers: int = 2, patch: int = 14, grid: int = 16, proj: int | None = 1024) -> dict:
    sd = {
        "vision_model.embeddings.class_embedding": torch.empty(width, device="meta"),
        "vision_model.embeddings.patch_embedding.weight": torch.empty(width, 3, patch, patch, device="meta"),
        "vision_model.embeddings.position_embedding.weight": torch.empty(grid * grid + 1, width, device="meta"),
    }
    for i in range(layers):
        sd[f"vision_model.encoder.layers.{i}.mlp.fc1.weight"] = torch.empty(4 * width, width, device="meta")
    if proj:
        sd["visual_projection.weight"] = torch.empty(proj, width, device="meta")
    return sd


@pytest.mark.parametrize(
    ("width", "heads", "act"),
    [(1024, 16, "quick_gelu"), (1280, 16, "gelu"), (1664, 16, "gelu"), (768, 12, "gelu"), (512, 8, "gelu")],
)
def test_head_and_activation_rule(width, heads, act):
    cfg = config_from_shapes(_meta_tower(width, layers=3))
    assert (cfg.num_heads, cfg.hidden_act, cfg.num_layers, cfg.patch_size, cfg.image_size) == (heads, act, 3, 14, 224)
    assert cfg.intermediate_size == 4 * width and cfg.projection_dim == 1024


def test_head_count_of_an_unknown_width_must_be_given():
    with pytest.raises(WeightsError, match="cannot tell the head count of a 40-wide"):
        config_from_shapes(_meta_tower(40))
    assert config_from_shapes(_meta_tower(40), num_heads=5).num_heads == 5


@pytest.fixture
def tiny_file(tmp_path):
    hf = _hf_vision("gelu", 3, hidden=64, heads=1)
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    return sd, tmp_path


def _save(sd: dict, path) -> str:
    safetensors_torch.save_file(sd, str(path))
    return str(path)


def test_bad_files_each_give_one_line(tiny_file):
    sd, d = tiny_file
    assert load_clip_vision(_save(sd, d / "ok.safetensors")).config.num_heads == 1  # the baseline loads

    def refused(state: dict, pattern: str, name: str = "bad.safetensors") -> None:
        with pytest.raises(WeightsError, match=pattern) as e:
            load_clip_vision(_save(state, d / name))
        assert "\n" not in str(e.value)

    unet = {"down_blocks.0.resnets.0.conv1.weight": torch.zeros(4, 4, 3, 3), "conv_in.weight": torch.zeros(4, 4, 3, 3)}
    refused(unet, r"not a CLIP vision encoder \(no vision_model.\* keys; it has conv_in.weight, down_blocks")
    text = {
        "text_model.embeddings.token_embedding.weight": torch.zeros(10, 8),
        "text_projection.weight": torch.zeros(8, 8),
    }
    refused(text, "a CLIP text encoder, not a CLIP vision encoder")
    refused({"embeddings.token_embedding.weight": torch.zeros(10, 8)}, "a CLIP text encoder")  # transformers 5
    refused({"visual.conv1.weight": torch.zeros(8, 3, 4, 4)}, "an OpenCLIP checkpoint")
    refused(
        {**sd, "unet.conv_in.weight": torch.zeros(1)}, "unexpected keys beside the CLIP vision encoder: unet.conv_in"
    )
    no_layer1 = {k: v for k, v in sd.items() if ".layers.1." not in k}
    refused(no_layer1, "layer 1 is missing")
    no_fc2 = {k: v for k, v in sd.items() if k != "vision_model.encoder.layers.2.mlp.fc2.bias"}
    refused(no_fc2, "without vision_model.encoder.layers.2.mlp.fc2.bias")
    odd = dict(sd, **{"vision_model.encoder.layers.1.self_attn.q_proj.weight": torch.zeros(64, 63)})
    refused(odd, r"layers.1.self_attn.q_proj.weight is \(64, 63\), expected \(64, 64\)")
    grid = dict(sd, **{"vision_model.embeddings.position_embedding.weight": torch.zeros(20, 64)})
    refused(grid, r"position embeddings \(20, 64\) are not .* square grid")
    conv = dict(sd, **{"vision_model.embeddings.patch_embedding.weight": torch.zeros(64, 3, 4, 5)})
    refused(conv, "patch convolution")
    ints = dict(sd, **{"vision_model.post_layernorm.weight": torch.zeros(64, dtype=torch.int32)})
    refused(ints, "not floating-point")

    good = d / "ok.safetensors"
    cut = d / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CorruptFileError) as e:
        load_clip_vision(cut)
    assert "\n" not in str(e.value)
    with pytest.raises(WeightsError, match="no such CLIP vision file"):
        load_clip_vision(d / "missing.safetensors")


def test_folder_config_must_match_the_weights(tmp_path):
    hf = _hf_vision("gelu", 2)
    hf.save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    raw = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**raw, "num_hidden_layers": 3}))
    with pytest.raises(WeightsError, match="config.json says num_layers=3 but the weights have 2"):
        load_clip_vision(tmp_path)
    cfg_path.write_text(json.dumps({**raw, "num_hidden_layers": 1e9}))
    with pytest.raises(WeightsError, match="num_hidden_layers"):
        load_clip_vision(tmp_path)
    cfg_path.write_text(json.dumps({**raw, "model_type": "siglip_vision_model"}))
    with pytest.raises(WeightsError, match="not a CLIP vision config"):
        load_clip_vision(tmp_path)
    cfg_path.unlink()
    with pytest.raises(WeightsError, match="no config.json"):
        load_clip_vision(tmp_path)


def test_config_bounds_and_input_shape():
    with pytest.raises(ConfigError, match="num_layers=1000"):
        CLIPVisionConfig(num_layers=1000)
    with pytest.raises(ConfigError, match="not a multiple of patch_size"):
        CLIPVisionConfig(image_size=225)
    with pytest.raises(ConfigError, match="at least"):
        CLIPVisionConfig(hidden_size=16384, intermediate_size=65536, num_layers=128, num_heads=128)
    with pytest.raises(ConfigError, match="hidden_act"):
        CLIPVisionConfig(hidden_act="relu")  # type: ignore[arg-type]
    model = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=8, num_layers=1, num_heads=2,
                                             patch_size=4, image_size=16, projection_dim=None))  # fmt: skip
    with pytest.raises(UsageError, match=r"\(B, 3, 16, 16\), got \(1, 3, 32, 32\)"):
        model(torch.zeros(1, 3, 32, 32))


def test_dtype_and_preset_names(tiny_file):
    sd, d = tiny_file
    model = load_clip_vision(_save(sd, d / "m.safetensors"), dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.name == "m.safetensors" and not model.training
    out = model(torch.zeros(1, 3, 32, 32)).image_embeds
    assert out.dtype == torch.bfloat16 and out.shape == (1, 24)


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    out = []
    sizes = [
        (37, 53, "RGB"),
        (300, 199, "RGB"),
        (224, 224, "RGB"),
        (225, 1000, "RGBA"),
        (9, 7, "L"),
        (500, 251, "RGBA"),
    ]
    for w, h, mode in sizes:
        channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        a = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
        a[: h // 2] //= 3  # some structure, so that the crop's offsets matter
        out.append(Image.fromarray(a[..., 0] if channels == 1 else a, mode))
    return out


def test_preprocessing_matches_clip_image_processor():
    images = _images()
    ours = clip_image_tensor(images)
    assert ours.shape == (len(images), 3, 224, 224) and ours.dtype == torch.float32
    pil_proc = transformers.CLIPImageProcessorPil()
    # transformers' PIL backend (the processor of transformers 4, which diffusers' IP-Adapter was made with):
    # the same 8-bit bicubic resize, crop and arithmetic, so the same float32 numbers
    for i, im in enumerate(images):
        want = pil_proc(images=im, return_tensors="pt")["pixel_values"]
        assert (ours[i : i + 1] - want).abs().max().item() == 0.0, (i, im.size, im.mode)
    # grey with alpha and a palette with a transparent index: composited onto white as transformers does
    la = Image.fromarray(np.stack([np.asarray(images[0])[..., 0], np.asarray(images[0])[..., 1]], -1), "LA")
    pal = images[1].convert("P")
    pal.info["transparency"] = int(np.bincount(np.asarray(pal).ravel()).argmax())  # the commonest index
    for im in (la, pal):
        want = pil_proc(images=im, return_tensors="pt")["pixel_values"]
        assert torch.equal(clip_image_tensor(im), want), im.mode
    # the transparency mattered
    assert not torch.equal(clip_image_tensor(la), clip_image_tensor(la.convert("L")))
    assert not torch.equal(clip_image_tensor(pal), clip_image_tensor(pal.convert("RGB")))
    # uint8 arrays give the same as their PIL images
    arrays = [np.asarray(im) for im in images]
    assert torch.equal(clip_image_tensor(arrays), ours)
    # transformers 5's CLIPImageProcessor() is this PIL backend where torchvision is not installed (this venv);
    # its torchvision backend resizes tensors with its own antialiased bicubic kernel, which is not compared here
    default = transformers.CLIPImageProcessor()
    if getattr(default, "backend", "pil") == "pil":
        assert torch.equal(default(images=images, return_tensors="pt")["pixel_values"], ours)


def test_preprocessing_other_size_and_bad_inputs():
    im = Image.new("RGB", (90, 40), (10, 200, 30))
    out = clip_image_tensor(im, size=32)
    assert out.shape == (1, 3, 32, 32)
    want = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})(
        images=im, return_tensors="pt"
    )["pixel_values"]
    assert torch.equal(out, want)
    with pytest.raises(UsageError, match="uint8 array"):
        clip_image_tensor(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(UsageError, match=r"\(H, W, 4\) array is expected"):
        clip_image_tensor(np.zeros((8, 8, 2), dtype=np.uint8))
    with pytest.raises(UsageError, match="no images"):
        clip_image_tensor([])
    with pytest.raises(UsageError, match="size must be an integer"):
        clip_image_tensor(im, size=0)
    with pytest.raises(UsageError, match="PIL image or a uint8 array"):
        clip_image_tensor(["x.png"])  # type: ignore[list-item]


def test_split_vision_state_ignores_text_half_and_buffers():
    sd = {
        "vision_model.embeddings.position_ids": torch.arange(5),
        "logit_scale": torch.tensor(1.0),
        "text_model.final_layer_norm.weight": torch.ones(4),
        "vision_model.post_layernorm.weight": torch.ones(4),
        "visual_projection.weight": torch.ones(2, 4),
    }
    assert sorted(split_vision_state(sd)) == ["vision_model.post_layernorm.weight", "visual_projection.weight"]


@pytest.mark.parametrize("name", ["vit_h", "vit_bigg", "vit_l"])
def test_presets_have_transformers_shapes_and_the_shape_rule_recovers_them(name):
    """Full-size presets (built on the meta device: no memory): the same parameter names and shapes as transformers'
    model of the same config, and the head/activation rule reads each preset back from its shapes."""
    from sdengine.models.clip_vision import PRESETS

    cfg = PRESETS[name]
    with torch.device("meta"):
        ours = CLIPVisionModel(cfg)
        hf = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**cfg.to_transformers()))
    want = {k: tuple(v.shape) for k, v in hf.state_dict().items() if k != "vision_model.embeddings.position_ids"}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want
    assert config_from_shapes(ours.state_dict()) == cfg
    counts = {"vit_h": (632, 633), "vit_bigg": (1844, 1846), "vit_l": (303, 304)}[name]  # millions
    assert counts[0] <= ours.num_parameters() / 1e6 < counts[1]
