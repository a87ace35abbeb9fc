"""IP-Adapter (sdengine.models/nn/weights/pipeline ip_adapter) against diffusers' ``load_ip_adapter`` +
``ip_adapter_image_embeds`` on the same random weights: a tiny random SD 1.x pipeline, random adapters saved in the
release's layouts (plain ``.safetensors``, Plus ``.bin``), the same CLIP vision outputs on both sides (diffusers takes
them stacked [negative, positive]); scale 0 is no adapter; the one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _ip_models import random_adapter, random_encoder  # noqa: E402
from _pipeline_models import diffusers_pipeline, mask_picture, picture  # noqa: E402
from sdengine.errors import SdengineError  # noqa: E402
from sdengine.models.ip_adapter import ImageProjModel, IPAdapter  # noqa: E402
from sdengine.nn.ip_adapter import cross_attention_layers, ip_attention_applied  # noqa: E402
from sdengine.pipeline import GenerationError  # noqa: E402
from sdengine.pipeline.ip_adapter import IPAdapterUnit, unit_from_images  # noqa: E402
from sdengine.weights.io import WeightsError  # noqa: E402
from sdengine.weights.ip_adapter_file import load_ip_adapter, save_ip_adapter  # noqa: E402

SIZE, STEPS, SEED = 32, 4, 5
PROMPT, NEGATIVE = "a red apple on a table", "blurry"
EMBED = 24  # the CLIP image embedding's width (plain)
HIDDEN, TOKENS = 40, 9  # the CLIP hidden states' width and count (Plus, full)


@pytest.fixture(scope="module")
def sd1(tiny_sd1_folder):
    return tiny_sd1_folder, sdengine.load_pipeline(tiny_sd1_folder, device="cpu")


@pytest.fixture(scope="module")
def files(sd1, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ip-adapters")
    save_ip_adapter(random_adapter(sd1[1].unet, "plain", EMBED, 1), folder / "ip-adapter_tiny.safetensors")
    save_ip_adapter(random_adapter(sd1[1].unet, "plus", HIDDEN, 2), folder / "ip-adapter-plus_tiny.bin")
    save_ip_adapter(random_adapter(sd1[1].unet, "full", HIDDEN, 3), folder / "ip-adapter-full_tiny.safetensors")
    return folder


def _embeds(kind: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (1, EMBED) if kind == "plain" else (1, TOKENS, HIDDEN)
    pos = torch.randn(shape, generator=g)
    neg = torch.zeros(shape) if kind == "plain" else torch.randn(shape, generator=g) * 0.3  # an all-zero pixel tensor's
    return pos, neg


def _ours(pipe, units, **kw):
    args = dict(steps=STEPS, sampler="euler", schedule="normal", cfg_scale=7.5, seed=SEED, width=SIZE, height=SIZE)
    args.update(kw)
    return pipe(PROMPT, NEGATIVE, ip_adapters=units, progress=False, **args).arrays


def _reference(folder, kind: str = "sd1", *, img2img: bool = False):
    """diffusers' pipeline of ``folder`` with the Euler scheduler of its own config."""
    from diffusers import EulerDiscreteScheduler

    if kind == "sdxl":
        from _sdxl_models import diffusers_sdxl

        ref = diffusers_sdxl(folder)
    else:
        ref = diffusers_pipeline(folder, kind, img2img=img2img)
    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
    return ref


def _theirs(folder, files, names, embeds, scales, *, kind="sd1", img2img=False, steps=STEPS, image_axis=False, **kw):
    ref = _reference(folder, kind, img2img=img2img)
    ref.load_ip_adapter(
        [str(files)] * len(names),
        subfolder=[""] * len(names),
        weight_name=names,
        image_encoder_folder=None,
        low_cpu_mem_usage=False,
    )
    ref.set_ip_adapter_scale(scales)
    # [negative, positive], one image each unless the embeds have their image axis already ([1, k, ...])
    stacked = [torch.cat([neg, pos]) if image_axis else torch.cat([neg, pos])[:, None] for pos, neg in embeds]
    gen = torch.Generator("cpu").manual_seed(SEED)
    size = {} if img2img else dict(width=SIZE, height=SIZE)
    return ref(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=steps,
        guidance_scale=7.5,
        generator=gen,
        output_type="np",
        ip_adapter_image_embeds=stacked,
        **size,
        **kw,
    ).images


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


@pytest.mark.parametrize(
    ("kinds", "names", "scales"),
    [
        (["plain"], ["ip-adapter_tiny.safetensors"], [0.8]),
        (["plus"], ["ip-adapter-plus_tiny.bin"], [1.0]),
        (["full"], ["ip-adapter-full_tiny.safetensors"], [0.6]),
        (["plain", "plus"], ["ip-adapter_tiny.safetensors", "ip-adapter-plus_tiny.bin"], [0.5, 0.7]),
    ],
    ids=["plain", "plus", "full", "two"],
)
def test_txt2img_matches_diffusers(sd1, files, kinds, names, scales):
    folder, pipe = sd1
    embeds = [_embeds(k, 10 + i) for i, k in enumerate(kinds)]
    units = [
        IPAdapterUnit(load_ip_adapter(files / n), pos, scale=s, negative=neg)
        for n, (pos, neg), s in zip(names, embeds, scales, strict=True)
    ]
    ours = _ours(pipe, units)
    theirs = _theirs(folder, files, names, embeds, scales)
    plain = _ours(pipe, None)
    assert _mad(ours, plain) > 0.02  # the adapter changes the image
    assert _mad(ours, theirs) < 1e-4


def test_img2img_matches_diffusers(sd1, files):
    folder, pipe = sd1
    pos, neg = _embeds("plain", 7)
    init = picture(SIZE, SIZE)
    unit = IPAdapterUnit(load_ip_adapter(files / "ip-adapter_tiny.safetensors"), pos, scale=0.9)  # zeros negative
    ours = _ours(pipe, [unit], init_image=init, strength=0.6, steps=8)
    theirs = _theirs(
        folder,
        files,
        ["ip-adapter_tiny.safetensors"],
        [(pos, neg)],
        [0.9],
        img2img=True,
        image=init,
        strength=0.6,
        steps=8,
    )
    assert _mad(ours, theirs) < 1e-4


def test_inpainting_matches_diffusers(sd1, tiny_inpaint_folder, tmp_path):
    """A 9-channel inpainting U-Net and an ordinary one (diffusers' blended inpainting), plain adapter."""
    img, mask = picture(SIZE, SIZE), mask_picture(SIZE, SIZE)
    pos, neg = _embeds("plain", 8)
    for kind, folder, pipe in (
        ("inpaint", tiny_inpaint_folder, sdengine.load_pipeline(tiny_inpaint_folder, device="cpu")),
        ("inpaint4", sd1[0], sd1[1]),
    ):
        save_ip_adapter(random_adapter(pipe.unet, "plain", EMBED, 4), tmp_path / f"{kind}.safetensors")
        unit = IPAdapterUnit(load_ip_adapter(tmp_path / f"{kind}.safetensors"), pos, scale=0.7)
        ours = _ours(pipe, [unit], init_image=img, mask=mask, strength=1.0)
        theirs = _theirs(
            folder,
            tmp_path,
            [f"{kind}.safetensors"],
            [(pos, neg)],
            [0.7],
            kind=kind,
            image=img,
            mask_image=mask,
            strength=1.0,
        )
        assert _mad(ours, _ours(pipe, None, init_image=img, mask=mask, strength=1.0)) > 0.02
        assert _mad(ours, theirs) < 1e-4, kind


def test_sdxl_matches_diffusers(tmp_path):
    """SDXL's U-Net (its transformer depths, the middle block last in the file's order), a Plus adapter."""
    from _sdxl_models import make_sdxl_folder

    folder = make_sdxl_folder(tmp_path / "tiny-sdxl")
    pipe = sdengine.load_pipeline(folder, device="cpu")
    save_ip_adapter(random_adapter(pipe.unet, "plus", HIDDEN, 6), tmp_path / "ip-adapter-plus_sdxl.safetensors")
    pos, neg = _embeds("plus", 9)
    unit = IPAdapterUnit(load_ip_adapter(tmp_path / "ip-adapter-plus_sdxl.safetensors"), pos, 0.8, neg)
    ours = _ours(pipe, [unit])
    theirs = _theirs(folder, tmp_path, ["ip-adapter-plus_sdxl.safetensors"], [(pos, neg)], [0.8], kind="sdxl")
    assert _mad(ours, _ours(pipe, None)) > 0.02
    assert _mad(ours, theirs) < 1e-4
    with pytest.raises(GenerationError, match="hand-off takes no IP-Adapter"):
        pipe.generate_with_refiner(pipe, PROMPT, NEGATIVE, ip_adapters=[unit], steps=STEPS, progress=False)


def test_scale_zero_is_no_adapter(sd1, files):
    _, pipe = sd1
    pos, _ = _embeds("plus", 3)
    unit = IPAdapterUnit(load_ip_adapter(files / "ip-adapter-plus_tiny.bin"), pos, scale=0.0)
    assert np.array_equal(_ours(pipe, [unit]), _ours(pipe, None))
    # and nothing stays patched on the U-Net after a call
    assert all(layer.ip_attention is None for layer in cross_attention_layers(pipe.unet))


def test_per_row_images_and_layers_restored(sd1, files):
    _, pipe = sd1
    adapter = load_ip_adapter(files / "ip-adapter_tiny.safetensors")
    a, _ = _embeds("plain", 1)
    b, _ = _embeds("plain", 2)
    both = _ours(pipe, [IPAdapterUnit(adapter, torch.cat([a, b]))], batch_size=2, seed=[SEED, SEED])
    first = _ours(pipe, [IPAdapterUnit(adapter, a)], seed=SEED)
    second = _ours(pipe, [IPAdapterUnit(adapter, b)], seed=SEED)
    assert _mad(both[0:1], first) < 1e-5 and _mad(both[1:2], second) < 1e-5
    assert _mad(first, second) > 0.01


def test_file_layouts_load_the_same_weights(sd1, files, tmp_path):
    adapter = load_ip_adapter(files / "ip-adapter-plus_tiny.bin")
    again = load_ip_adapter(save_ip_adapter(adapter, tmp_path / "plus.safetensors"))
    assert adapter.kind == again.kind == "plus"
    for (k, v), (k2, v2) in zip(adapter.state_dict().items(), again.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    x = torch.randn(2, TOKENS, HIDDEN)
    assert adapter(x).shape == (2, 16, adapter.cross_dim)
    assert load_ip_adapter(files / "ip-adapter_tiny.safetensors")(torch.randn(3, 2, EMBED)).shape[:2] == (3, 8)


def test_decoupled_attention_is_the_formula(sd1, files):
    """One cross-attention layer: attn(q, text) + scale * attn(q, to_k_ip(tokens), to_v_ip(tokens)), by hand."""
    _, pipe = sd1
    adapter = load_ip_adapter(files / "ip-adapter_tiny.safetensors")
    layer = cross_attention_layers(pipe.unet)[1]
    x = torch.randn(2, 6, layer.to_q.in_features)
    text = torch.randn(2, 5, layer.to_k.in_features)
    tokens = adapter(torch.randn(2, EMBED))

    def attn(q, k, v):
        h = layer.heads
        q, k, v = (t.reshape(2, t.shape[1], h, -1).transpose(1, 2) for t in (q, k, v))
        w = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
        return (w @ v).transpose(1, 2).reshape(2, q.shape[2], -1)

    i = cross_attention_layers(pipe.unet).index(layer)
    q = layer.to_q(x)
    want = attn(q, layer.to_k(text), layer.to_v(text)) + 0.4 * attn(
        q, adapter.to_k_ip[i](tokens), adapter.to_v_ip[i](tokens)
    )
    want = layer.to_out[0](want)
    unit = IPAdapterUnit(adapter, torch.zeros(EMBED), scale=0.4)
    layers = unit.layers()
    from sdengine.nn.ip_adapter import AdapterLayers

    with torch.no_grad(), ip_attention_applied(pipe.unet, [AdapterLayers(layers.to_k, layers.to_v, 0.4, 4)], tokens):
        got = layer(x, text)
    assert torch.allclose(got, want, atol=1e-5)
    assert layer.ip_attention is None


# ------------------------------------------------------------------------------------------ errors


def test_not_an_ip_adapter_file(tmp_path):
    from sdengine.weights.io import save_safetensors

    save_safetensors({"conv_in.weight": torch.zeros(2, 2)}, tmp_path / "x.safetensors")
    with pytest.raises(WeightsError, match="not an IP-Adapter file"):
        load_ip_adapter(tmp_path / "x.safetensors")
    torch.save({"image_proj": {"proj.weight": torch.zeros(8, 4)}}, tmp_path / "y.bin")
    with pytest.raises(WeightsError, match="not an IP-Adapter file"):
        load_ip_adapter(tmp_path / "y.bin")
    with pytest.raises(WeightsError, match="no such file"):
        load_ip_adapter(tmp_path / "missing.bin")


def test_faceid_and_odd_numbering_refused(sd1, files, tmp_path):
    from sdengine.weights.io import load_file, save_safetensors

    sd, _ = load_file(files / "ip-adapter_tiny.safetensors")
    odd = {k.replace("ip_adapter.3.", "ip_adapter.4."): v for k, v in sd.items()}
    save_safetensors(odd, tmp_path / "odd.safetensors")
    with pytest.raises(WeightsError, match=r"numbered \[1, 4"):
        load_ip_adapter(tmp_path / "odd.safetensors")
    lora = {**sd, "ip_adapter.1.to_q_lora.down.weight": torch.zeros(4, 4)}
    save_safetensors(lora, tmp_path / "faceid.safetensors")
    with pytest.raises(WeightsError, match="FaceID"):
        load_ip_adapter(tmp_path / "faceid.safetensors")


def test_wrong_model_family_is_one_line(sd1, tiny_sdxl_unet_layers):
    _, pipe = sd1
    adapter = IPAdapter("plain", ImageProjModel(EMBED, 32, 4), EMBED, 32, tiny_sdxl_unet_layers)
    unit = IPAdapterUnit(adapter, torch.zeros(1, EMBED))
    with pytest.raises(SdengineError, match="cross-attention layers and this U-Net has") as e:
        _ours(pipe, [unit])
    assert "\n" not in str(e.value)


@pytest.fixture
def tiny_sdxl_unet_layers(sd1):
    return [layer.to_k.out_features for layer in cross_attention_layers(sd1[1].unet)] * 2  # too many layers


def test_width_mismatch_and_bad_inputs(sd1, files):
    _, pipe = sd1
    widths = [layer.to_k.out_features for layer in cross_attention_layers(pipe.unet)]
    wrong = IPAdapter("plain", ImageProjModel(EMBED, 48, 4), EMBED, 48, widths)
    with pytest.raises(SdengineError, match="made for another model"):
        _ours(pipe, [IPAdapterUnit(wrong, torch.zeros(1, EMBED))])
    adapter = load_ip_adapter(files / "ip-adapter_tiny.safetensors")
    with pytest.raises(GenerationError, match="takes \\[images, 24\\] CLIP image embeddings"):
        _ours(pipe, [IPAdapterUnit(adapter, torch.zeros(1, 9, EMBED + 1))])
    with pytest.raises(GenerationError, match="scale must be a finite number"):
        _ours(pipe, [IPAdapterUnit(adapter, torch.zeros(1, EMBED), scale=float("nan"))])
    with pytest.raises(GenerationError, match="images for 3 rows in a batch of 2"):
        _ours(pipe, [IPAdapterUnit(adapter, torch.zeros(3, EMBED))], batch_size=2)
    with pytest.raises(GenerationError, match="images for 2 rows in a batch of 1"):
        _ours(pipe, [IPAdapterUnit(adapter, torch.zeros(EMBED), negative=torch.zeros(2, EMBED))])
    with pytest.raises(GenerationError, match="negative of shape"):
        _ours(pipe, [IPAdapterUnit(adapter, torch.zeros(EMBED), negative=torch.zeros(1, EMBED - 1))])
    with pytest.raises(GenerationError, match="NaN or infinite"):
        _ours(pipe, [IPAdapterUnit(adapter, torch.full((1, EMBED), float("inf")))])
    with pytest.raises(GenerationError, match="IPAdapterUnit"):
        _ours(pipe, ["ip-adapter.bin"])


# ------------------------------------------------------------------------------------------ combinations


def test_graphs_never_replay_without_the_adapter(tiny_sd1_folder, files):
    """With the step graphs and the whole-loop graph on (the CPU stand-in recorder), a call with an adapter runs the
    plain U-Net (the loop graph skips it: nothing new recorded) and gives the image of a pipeline without graphs; the
    call without the adapter after it is the recorded one again."""
    from _cpu_graphs import CPUBackend

    pipe = sdengine.load_pipeline(tiny_sd1_folder, device="cpu", dtype="fp32", fast_path="none")
    unit = IPAdapterUnit(load_ip_adapter(files / "ip-adapter_tiny.safetensors"), _embeds("plain", 4)[0], scale=0.9)

    def plain(units):
        graphs, pipe.cuda_graphs = pipe.cuda_graphs, None
        try:
            return _ours(pipe, units)
        finally:
            pipe.cuda_graphs = graphs

    want_with, want_without = plain([unit]), plain(None)
    pipe.enable_cuda_graphs(backend=CPUBackend(), device_type="cpu")
    pipe.enable_loop_graph(backend=CPUBackend(), device_type="cpu", record_after=0)
    loop = pipe.cuda_graphs["loop"]
    np.testing.assert_array_equal(_ours(pipe, None), want_without)
    assert loop.recordings == 1
    np.testing.assert_array_equal(_ours(pipe, [unit]), want_with)
    assert loop.recordings == 1  # skipped, not recorded, not replayed
    np.testing.assert_array_equal(_ours(pipe, None), want_without)
    assert _mad(want_with, want_without) > 0.02


def test_runs_under_prompt_editing_pag_controlnet_and_hires(sd1, files):
    """The image tokens follow the rows wherever CFG, PAG's perturbed rows, prompt editing's per-step texts,
    a ControlNet's controlled U-Net and the hires fix's second pass put them: at scale 0 each run is the run without
    the adapter, at a scale the image changes."""
    from sdengine.models.controlnet import ControlNet

    _, pipe = sd1
    adapter = load_ip_adapter(files / "ip-adapter-plus_tiny.bin")
    pos, neg = _embeds("plus", 12)
    control = ControlNet.from_unet(pipe.unet, conditioning_embedding_out_channels=(8, 16)).eval()
    settings = [
        dict(prompt_override="a [red:green:0.5] apple"),
        dict(pag_scale=2.0),
        dict(controlnets=[(control, picture(SIZE, SIZE), 0.8)]),
        dict(enable_hr=True, hr_scale=1.5, hr_second_pass_steps=2, strength=0.5),
    ]
    for kw in settings:
        prompt = kw.pop("prompt_override", PROMPT)
        args = dict(steps=STEPS, sampler="euler", cfg_scale=7.5, seed=SEED, width=SIZE, height=SIZE, progress=False)

        def run(scale, prompt=prompt, args=args, kw=kw):
            units = None if scale is None else [IPAdapterUnit(adapter, pos, scale, neg)]
            return pipe(prompt, NEGATIVE, ip_adapters=units, **args, **kw).arrays

        without = run(None)
        np.testing.assert_array_equal(run(0.0), without)
        assert _mad(run(1.0), without) > 0.01, kw


@pytest.mark.parametrize(("preset", "count"), [("sd15", 16), ("sd21", 16), ("sdxl", 70)])
def test_real_unets_number_their_layers_as_diffusers(preset, count):
    """The full-size U-Nets (built on the meta device: no weights): sdengine's cross-attention layers in the file's
    order have the widths of diffusers' ``attn2`` processors in ``unet.attn_processors`` order, and their count is the
    release's (16 for SD 1.x/2.x, 70 for SDXL)."""
    from diffusers import UNet2DConditionModel

    from sdengine.models import unet as unet_mod
    from sdengine.models.unet_sdxl import SDXL_BASE

    cfg = {"sd15": unet_mod.SD15, "sd21": unet_mod.SD21, "sdxl": SDXL_BASE}[preset]
    d = cfg.to_diffusers()
    d.pop("_class_name")
    with torch.device("meta"):
        ours = unet_mod.UNet(cfg)
        theirs = UNet2DConditionModel(**d)
    names = [n for n in theirs.attn_processors if n.endswith("attn2.processor")]
    widths = [theirs.get_submodule(n.removesuffix(".processor")).to_k.out_features for n in names]
    layers = cross_attention_layers(ours)
    assert len(layers) == len(names) == count
    assert [layer.to_k.out_features for layer in layers] == widths
    # the file's numbering: the k-th attn2 is processor 2k + 1 of all of them
    every = list(theirs.attn_processors)
    assert [every.index(n) for n in names] == list(range(1, 2 * count, 2))


def test_image_to_encoder_to_adapter_matches_diffusers(sd1, tmp_path):
    """The whole path from a picture: sdengine's CLIP vision encoder (models/clip_vision.py) and preprocessing, a Plus
    adapter, against diffusers' ``ip_adapter_image=`` with transformers' encoder of the same weights and its
    ``CLIPImageProcessor``; the negative is what diffusers encodes for it: an all-zero pixel tensor's hidden states."""
    transformers = pytest.importorskip("transformers")
    from sdengine.models.clip_vision import clip_image_tensor
    from sdengine.weights.clip_vision_file import load_clip_vision

    folder, pipe = sd1
    hf = random_encoder(HIDDEN, EMBED, 0, layers=3)
    hf.save_pretrained(tmp_path / "image_encoder")
    encoder = load_clip_vision(tmp_path / "image_encoder")
    save_ip_adapter(random_adapter(pipe.unet, "plus", HIDDEN, 11), tmp_path / "plus.bin")
    image = picture(40, 48)

    pixels = clip_image_tensor(image, size=32)
    with torch.no_grad():
        pos = encoder(pixels).penultimate_hidden_state
        neg = encoder(torch.zeros_like(pixels)).penultimate_hidden_state
    ours = _ours(pipe, [IPAdapterUnit(load_ip_adapter(tmp_path / "plus.bin"), pos, 0.9, neg)])

    ref = _reference(folder)
    ref.load_ip_adapter(
        str(tmp_path), subfolder="", weight_name="plus.bin", image_encoder_folder=None, low_cpu_mem_usage=False
    )
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    ref.register_modules(image_encoder=hf, feature_extractor=processor)
    ref.set_ip_adapter_scale(0.9)
    theirs = ref(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="np",
        ip_adapter_image=image,
        width=SIZE,
        height=SIZE,
    ).images
    assert _mad(ours, _ours(pipe, None)) > 0.02
    assert _mad(ours, theirs) < 1e-4
    # unit_from_images does that whole path itself (diffusers' negative rule is its default)
    unit = unit_from_images(load_ip_adapter(tmp_path / "plus.bin"), encoder, image, 0.9)
    assert np.array_equal(_ours(pipe, [unit]), ours)

    # or the files and the picture themselves, read at the call (and kept for the next: a replaced file is read again)
    by_file = IPAdapterUnit(tmp_path / "plus.bin", scale=0.9, images=image, clip_vision=tmp_path / "image_encoder")
    assert np.array_equal(_ours(pipe, [by_file]), ours)
    save_ip_adapter(random_adapter(pipe.unet, "plus", HIDDEN, 12), tmp_path / "plus.bin")
    assert _mad(_ours(pipe, [by_file]), ours) > 1e-3
    save_ip_adapter(random_adapter(pipe.unet, "plus", HIDDEN, 11), tmp_path / "plus.bin")
    for bad, message in (
        (IPAdapterUnit(tmp_path / "plus.bin", images=image), "images need a CLIP vision encoder"),
        (IPAdapterUnit(tmp_path / "plus.bin", pos, images=image, clip_vision=encoder), "images or embeds"),
        (IPAdapterUnit(tmp_path / "plus.bin", images=[], clip_vision=encoder), "give images"),
        (IPAdapterUnit(tmp_path / "plus.bin", images=image, clip_vision=encoder, negative_rule="x"), "negative_rule"),
        (IPAdapterUnit(tmp_path / "nothing.bin", images=image, clip_vision=encoder), "nothing.bin"),
        (IPAdapterUnit(tmp_path / "plus.bin", images=tmp_path / "no.png", clip_vision=encoder), "no.png"),
    ):
        with pytest.raises(SdengineError, match=message) as e:
            _ours(pipe, [bad])
        assert "\n" not in str(e.value)

    # ComfyUI_IPAdapter_plus's rule: the negative is a black picture's hidden states, which is not diffusers' tensor
    comfy = unit_from_images(load_ip_adapter(tmp_path / "plus.bin"), encoder, image, 0.9, negative_rule="comfyui")
    black = clip_image_tensor(np.zeros((32, 32, 3), np.uint8), size=32)
    with torch.no_grad():
        assert torch.equal(comfy.negative, encoder(black).penultimate_hidden_state[0])
    assert not torch.allclose(comfy.negative, neg[0], atol=1e-3)
    assert torch.equal(comfy.embeds[0], unit.embeds[0])

    # two pictures at once: every row takes both (their tokens side by side); per_row: one picture per row
    both = unit_from_images(load_ip_adapter(tmp_path / "plus.bin"), encoder, [image, picture(32, 32)], 0.9)
    assert tuple(both.embeds.shape[:2]) == (1, 2) and tuple(both.negative.shape[:2]) == (1, 2)
    rows = unit_from_images(
        load_ip_adapter(tmp_path / "plus.bin"), encoder, [image, picture(32, 32)], 0.9, per_row=True
    )
    two = _ours(pipe, [rows], seed=[SEED, 9])
    assert np.allclose(two[0], ours[0], atol=1e-5)

    # an encoder of another width than the adapter reads: one line naming both
    plain = load_ip_adapter(tmp_path / "plus.bin")
    plain.embed_dim += 8
    with pytest.raises(SdengineError, match=r"reads CLIP vision hidden states of width 48; .* gives 40") as e:
        unit_from_images(plain, encoder, image)
    assert "\n" not in str(e.value)
    with pytest.raises(SdengineError, match="negative rule 'a1111'"):
        unit_from_images(load_ip_adapter(tmp_path / "plus.bin"), encoder, image, negative_rule="a1111")


def test_several_images_per_adapter_match_diffusers(sd1, files):
    """k images for one adapter ([1, k, D]): their tokens side by side, as diffusers' list of images per adapter."""
    folder, pipe = sd1
    g = torch.Generator().manual_seed(21)
    pos = torch.randn(1, 3, EMBED, generator=g)
    neg = torch.zeros_like(pos)
    name = "ip-adapter_tiny.safetensors"
    ours = _ours(pipe, [IPAdapterUnit(load_ip_adapter(files / name), pos, 0.8)])
    theirs = _theirs(folder, files, [name], [(pos, neg)], [0.8], image_axis=True)
    assert _mad(ours, _ours(pipe, [IPAdapterUnit(load_ip_adapter(files / name), pos[:, :1], 0.8)])) > 0.01
    assert _mad(ours, theirs) < 1e-4
