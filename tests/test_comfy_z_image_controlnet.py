"""Z-Image's Fun ControlNet Union through sdengine's ComfyUI nodes (ModelPatchLoader, ZImageFunControlnet).

* The way ComfyUI applies the ControlNet (control tokens of the image alone, residuals on the image tokens after main
  layers ``j * round(30 / blocks)``, 2.x's refiner residuals into the transformer's own noise refiner, 2.0's
  "broken" file) against a literal transcription of ComfyUI's ``ZImageControlPatch`` loop (its ``temp_data``
  state machine, ``comfy_extras/nodes_model_patch.py``) over sdengine's transformer blocks, for 1.0 / 2.0 / 2.1;
  the gap to diffusers' application is printed.
* ComfyUI's Z-Image-Turbo graph with ModelPatchLoader + ZImageFunControlnet on a tiny random 30-layer Z-Image in
  ComfyUI's files (held to the pipeline of ``tests/test_comfy_z_image.py`` with ComfyUI's schedule) against the
  pipeline's ControlNet run with ComfyUI's application (the unit's control latent the pipeline's: VAE mean, Flux's
  latent format); 2.1 inpainting with mask + inpaint_image likewise. Refusals are one line."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _z_image_models import WIDE_TRANSFORMER, Z_TRANSFORMER, make_z_folder, perturb, z_transformer  # noqa: E402
from sdengine.models.z_image import ZImageConfig, ZImageTransformer  # noqa: E402
from sdengine.models.z_image_controlnet import ZImageControlNet, ZImageControlNetConfig  # noqa: E402
from sdengine.pipeline.control import ControlUnit  # noqa: E402
from sdengine.pipeline.dit_control import ControlledZImage  # noqa: E402
from sdengine.server.catalog import Catalog  # noqa: E402
from sdengine.server.comfy.graph import Executor, NodeFailed, validate  # noqa: E402
from sdengine.server.comfy.nodes import Outputs, RunContext  # noqa: E402
from sdengine.server.comfy.nodes_sd3_flux import forget_parts  # noqa: E402
from sdengine.server.comfy.nodes_z_image_control import ComfyControlledZImage  # noqa: E402
from test_comfy_sd3_flux import TOL, _ldm_vae, _pixels, ksampler_node  # noqa: E402
from test_z_image_files import original_layout  # noqa: E402

PROMPT, SEED, STEPS, SHIFT = "a red apple on a table", 5, 3, 3.0
SIDE, HINT = 64, 16  # EmptySD3LatentImage 64: an 8 x 8 latent, 16 pixels out of the tiny 2x VAE
MODEL, TEXT = "z_image_turbo_30.safetensors", "qwen_3_4b_tiny.safetensors"
STRENGTH = 0.8
PLACES = {6: list(range(0, 30, 5)), 15: list(range(0, 30, 2))}
KINDS = {
    "1.0": dict(control_layers_places=PLACES[6], control_in_dim=16),
    "2.0": dict(control_layers_places=PLACES[15], control_refiner_layers_places=[0, 1], control_in_dim=33,
                add_control_noise_refiner="control_layers"),
    "2.1": dict(control_layers_places=PLACES[15], control_refiner_layers_places=[0, 1], control_in_dim=33,
                add_control_noise_refiner="control_noise_refiner"),
}  # fmt: skip


def _diffusers_controlnet(seed: int, shape: dict[str, Any], **cfg: Any) -> Any:
    import diffusers

    torch.manual_seed(seed)
    keys = ("dim", "n_refiner_layers", "n_heads", "n_kv_heads", "norm_eps", "qk_norm")
    return perturb(diffusers.ZImageControlNetModel(**{k: shape[k] for k in keys}, **cfg), seed + 1).eval()


# ---------------------------------------------------------------------------------------------------
# ComfyUI's application against a transcription of its patch loop
# ---------------------------------------------------------------------------------------------------


class TranscribedPatch:
    """ComfyUI's ``ZImageControlPatch.__call__`` and ``ZImage_Control``'s three calls, line by line, on sdengine's
    blocks (``step`` returns (c, hint), ComfyUI's blocks (hint, c)); ``broken``: ComfyUI's 2.0 file."""

    def __init__(self, cn: ZImageControlNet, latent: torch.Tensor, strength: float, broken: bool) -> None:
        self.cn, self.latent, self.strength, self.broken = cn, latent, strength, broken
        self.refiner_control = cn.config.add_control_noise_refiner is not None
        self.temp_data: Any = None

    def _model(self, pe: Any, vec: torch.Tensor) -> torch.Tensor:  # ZImage_Control.forward
        from sdengine.models.z_image import patchify

        c = self.cn.embedder(patchify(self.latent))
        if not self.refiner_control:
            for layer in self.cn.control_noise_refiner:
                c = layer(c, pe, None, vec)
        return c

    def _swap(self, out: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return out[1], out[0]

    def _noise_refiner_block(self, layer_id: int, c: torch.Tensor, x: torch.Tensor, pe: Any, vec: torch.Tensor) -> Any:
        if not self.refiner_control:
            return (None, c)
        if self.broken:
            if layer_id == 0:
                return self._swap(self.cn.control_layers[0].step(c, x, pe, None, vec))
            out = None
            for i in range(1, len(self.cn.control_layers)):
                c, o = self.cn.control_layers[i].step(c, x, pe, None, vec)
                if out is None:
                    out = o
            return (out, c)
        return self._swap(self.cn.control_noise_refiner[layer_id].step(c, x, pe, None, vec))

    def _control_block(self, layer_id: int, c: torch.Tensor, x: torch.Tensor, pe: Any, vec: torch.Tensor) -> Any:
        return self._swap(self.cn.control_layers[layer_id].step(c, x, pe, None, vec))

    def __call__(self, img: torch.Tensor, img_input: torch.Tensor, pe: Any, vec: torch.Tensor, block_index: int,
                 block_type: str) -> None:  # fmt: skip
        n = self.latent.shape[-2] * self.latent.shape[-1] // 4
        pe = (pe[0][:, :n], pe[1][:, :n])
        cnet_blocks = len(self.cn.control_layers)
        div = round(30 / cnet_blocks)
        cnet_index = block_index // div
        cnet_index_float = block_index / div
        if cnet_index_float > (cnet_blocks - 1):
            self.temp_data = None
            return
        if self.temp_data is None or self.temp_data[0] > cnet_index:
            start = -3 if block_type == "noise_refiner" else -1
            self.temp_data = (start, (None, self._model(pe, vec)))
        if block_type == "noise_refiner":
            next_layer = self.temp_data[0] + 1
            self.temp_data = (next_layer, self._noise_refiner_block(block_index, self.temp_data[1][1],
                                                                   img_input[:, :n], pe, vec))  # fmt: skip
            if self.temp_data[1][0] is not None:
                img[:, :n] += self.temp_data[1][0] * self.strength
        else:
            while self.temp_data[0] < cnet_index and (self.temp_data[0] + 1) < cnet_blocks:
                next_layer = self.temp_data[0] + 1
                self.temp_data = (next_layer, self._control_block(next_layer, self.temp_data[1][1], img_input[:, :n],
                                                                  pe, vec))  # fmt: skip
            if cnet_index_float == self.temp_data[0]:
                img[:, :n] += self.temp_data[1][0] * self.strength
                if cnet_blocks == self.temp_data[0] + 1:
                    self.temp_data = None


def _transcribed_forward(net: ZImageTransformer, patch: TranscribedPatch, latent: torch.Tensor, t: torch.Tensor,
                         cap: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """ComfyUI's NextDiT forward with its noise_refiner and double_block patch calls (image and caption in
    sdengine's joint order; ComfyUI's has the caption first: the attention is the same)."""
    from sdengine.models.z_image import PATCH_KEY, unpatchify

    state = net.embed(latent, t, cap)
    x = state.x.clone()
    x_input = x
    for i, layer in enumerate(net.noise_refiner):
        x = layer(x, state.img_rope, None, state.vec)
        patch(x, x_input, state.img_rope, state.vec, i, "noise_refiner")
    joint = torch.cat([x, state.cap], dim=1)
    img_input = joint[:, : x.shape[1]].clone()
    for i, layer in enumerate(net.layers):
        joint = layer(joint, state.joint_rope, state.mask, state.vec)
        patch(joint[:, : x.shape[1]], img_input, state.img_rope, state.vec, i, "double")
    return unpatchify(net.all_final_layer[PATCH_KEY](joint[:, : state.n], state.vec), state.height, state.width)


@pytest.mark.parametrize("kind", list(KINDS))
def test_comfy_application_equals_a_transcription_of_comfyuis_patch(kind: str) -> None:
    ref = z_transformer(seed=11, n_layers=30)
    net = ZImageTransformer(ZImageConfig.from_diffusers(dict(ref.config))).eval()
    net.load_state_dict(ref.state_dict(), strict=True)
    cn_ref = _diffusers_controlnet(21, Z_TRANSFORMER, **KINDS[kind])
    cn = ZImageControlNet(ZImageControlNetConfig.from_diffusers(dict(cn_ref.config))).eval()
    cn.load_state_dict(cn_ref.state_dict(), strict=True)
    g = torch.Generator().manual_seed(4)
    latent = torch.randn(1, 16, 6, 10, generator=g)  # 60 image tokens, padded to 64
    control = torch.randn(1, KINDS[kind]["control_in_dim"], 6, 10, generator=g)
    cap = torch.randn(1, 9, Z_TRANSFORMER["cap_feat_dim"], generator=g)
    t = torch.tensor([0.4])
    with torch.no_grad():
        ours = ComfyControlledZImage(net, [(cn, control, 0.7)])(latent, t, cap)
        broken = kind == "2.0"
        want = _transcribed_forward(net, TranscribedPatch(cn, control, 0.7, broken), latent, t, cap)
        diffusers_way = net(latent, t, cap, control=lambda s, x: cn(net, s, x, control, 0.7))
        plain = net(latent, t, cap)
    gap = (ours - want).abs().max().item()
    other = (ours - diffusers_way).abs().mean().item()
    print(f"{kind}: ComfyUI's application vs the transcription {gap:.1e}; vs diffusers' (mean abs) {other:.2e}")
    assert gap < 1e-5
    assert (ours - plain).abs().mean().item() > 1e-3  # the ControlNet acts
    assert other > 1e-4  # ComfyUI's application is not diffusers'
    # two patches add up: the same patch twice is the patch at twice the strength
    with torch.no_grad():
        twice = ComfyControlledZImage(net, [(cn, control, 0.7), (cn, control, 0.7)])(latent, t, cap)
        double = ComfyControlledZImage(net, [(cn, control, 1.4)])(latent, t, cap)
    assert (twice - double).abs().max().item() < 1e-5


# ---------------------------------------------------------------------------------------------------
# The graph against the pipeline
# ---------------------------------------------------------------------------------------------------


def _picture(seed: int) -> Any:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((HINT, HINT, 3)) * 255).astype(np.uint8))


def _mask_picture() -> Any:
    from PIL import Image

    a = np.zeros((HINT, HINT), np.uint8)
    a[4:12, 2:10] = 255  # white: repaint; on the latent's 2x2 pixel grid
    return Image.fromarray(a, mode="L")


@pytest.fixture(scope="module")
def zcn(tmp_path_factory):
    """ComfyUI's files of a tiny 30-layer Z-Image (the text encoder, tokenizer and VAE of tests/_z_image_models.py),
    Z-Image Fun ControlNet single files (1.0, 2.1) in the server's ControlNet folder, a file that is no ControlNet,
    a hint, an inpainting picture and a mask in the input folder; the pipeline loaded from the same files."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("comfy_z_cn")
    folder = make_z_folder(root / "src" / "z-folder", wide_heads=True)
    models = root / "models"
    (models / "diffusion_models").mkdir(parents=True)
    (models / "text_encoders").mkdir()
    (root / "vaes").mkdir()
    cns = root / "controlnets"
    cns.mkdir()
    shape = {**Z_TRANSFORMER, **WIDE_TRANSFORMER, "n_layers": 30}
    ref = z_transformer(61, **WIDE_TRANSFORMER, n_layers=30)
    model = models / "diffusion_models" / MODEL
    save_file({k: v.contiguous() for k, v in original_layout(ref.state_dict()).items()}, model)
    text = models / "text_encoders" / TEXT
    save_file(load_file(next((folder / "text_encoder").glob("*.safetensors"))), text)
    shutil.copytree(folder / "tokenizer", models / "text_encoders" / "qwen25_tokenizer")
    vae = root / "vaes" / "ae.safetensors"
    save_file({k: v.contiguous() for k, v in _ldm_vae(folder).items()}, vae)
    for kind, seed in (("1.0", 71), ("2.1", 72)):
        sd = _diffusers_controlnet(seed, shape, **KINDS[kind]).state_dict()
        save_file({k: v.contiguous() for k, v in sd.items()}, cns / f"zfun-{kind}.safetensors")
    save_file({"img_in.weight": torch.zeros(4, 4)}, cns / "not-a-controlnet.safetensors")
    (root / "in").mkdir()
    _picture(3).save(root / "in" / "hint.png")
    _picture(4).save(root / "in" / "photo.png")
    _mask_picture().save(root / "in" / "mask.png")
    pipe = sdengine.load_pipeline(model, device="cpu", qwen_text=text, vae=vae)
    return root, pipe


def _run(root: Path, prompt: dict[str, Any]) -> dict[str, Any]:
    forget_parts()
    catalog = Catalog(root / "models", None, root / "controlnets", vaes_dir=root / "vaes")
    folders = Outputs(root / "out", root / "in", root / "temp")

    class Env:
        def __init__(self) -> None:
            self.catalog, self.folders, self.limits = catalog, folders, {}

    graph, _, errors = validate(prompt, Env())
    assert not errors, errors
    ctx = RunContext(pipeline=lambda ref: sdengine.load_pipeline(ref, device="cpu"), catalog=catalog, folders=folders,
                     seed_rule="comfyui", device="cpu", save_lock=threading.Lock())  # fmt: skip
    ex = Executor()
    ex.run(graph, ctx, cancelled=lambda: False, event=lambda name, data: None)
    return {nid: entry.outputs for nid, entry in ex.cache.items()}


def _fails(root: Path, graph: dict) -> str:
    with pytest.raises(NodeFailed) as e:
        _run(root, graph)
    msg = str(e.value)
    print(msg)
    assert "\n" not in msg.strip(), msg
    return msg


def z_graph(patch: str | None = "zfun-1.0.safetensors", *, inpaint: bool = False, cfg: float = 1.0) -> dict:
    """ComfyUI's Z-Image-Turbo template (ConditioningZeroOut negative) with ModelPatchLoader + ZImageFunControlnet
    between ModelSamplingAuraFlow and KSampler (``patch`` None: without them)."""
    g: dict[str, Any] = {
        "37": {"class_type": "UNETLoader", "inputs": {"unet_name": MODEL, "weight_dtype": "default"}},
        "39": {"class_type": "CLIPLoader", "inputs": {"clip_name": TEXT, "type": "lumina2", "device": "default"}},
        "40": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
        "11": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["37", 0], "shift": SHIFT}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["39", 0]}},
        "7": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["6", 0]}},
        "13": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIDE, "height": SIDE, "batch_size": 1}},
        "3": ksampler_node(["11", 0], ["6", 0], ["7", 0], ["13", 0], sampler="euler", steps=STEPS, cfg=cfg),
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["40", 0]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }
    if patch is None:
        return g
    g["p"] = {"class_type": "ModelPatchLoader", "inputs": {"name": patch}}
    g["h"] = {"class_type": "LoadImage", "inputs": {"image": "hint.png"}}
    inputs = {"model": ["11", 0], "model_patch": ["p", 0], "vae": ["40", 0], "strength": STRENGTH, "image": ["h", 0]}
    if inpaint:
        g["i"] = {"class_type": "LoadImage", "inputs": {"image": "photo.png"}}
        g["m"] = {"class_type": "LoadImageMask", "inputs": {"image": "mask.png", "channel": "red"}}
        inputs.update(inpaint_image=["i", 0], mask=["m", 0])
    g["z"] = {"class_type": "ZImageFunControlnet", "inputs": inputs}
    g["3"]["inputs"]["model"] = ["z", 0]
    return g


def _comfy_rules(pipe: Any, monkeypatch: pytest.MonkeyPatch, *, application: bool = True) -> Any:
    """The pipeline on ComfyUI's schedule (tests/test_comfy_z_image.py) and, with ``application``, its Z-Image
    ControlNet units applied as ComfyUI applies them (the units' control latents the pipeline's own)."""
    from sdengine.diffusion.flow import FlowSchedule

    monkeypatch.setattr(pipe, "flow_schedule", lambda w, h: FlowSchedule.sd3(SHIFT))
    if application:

        def comfy_call(self: Any, x: Any, t: Any, text: Any, text_mask: Any = None, **_: Any) -> Any:
            patches = []
            for u in self.units:  # a 2.x unit without a mask: the pipeline's zeros after the control latent
                latent = u.latent[:1]
                extra = u.net.config.control_in_dim - latent.shape[1]
                latent = torch.cat([latent, latent.new_zeros(1, extra, *latent.shape[2:])], dim=1)
                patches.append((u.net, latent, u.scale))
            return ComfyControlledZImage(self.base, patches)(x, t, text, text_mask)

        monkeypatch.setattr(ControlledZImage, "__call__", comfy_call)
    return pipe


def _image(pipe: Any, units: list[ControlUnit] | None, cfg: float = 1.0) -> np.ndarray:
    out = pipe(PROMPT, "", steps=STEPS, seed=SEED, width=HINT, height=HINT, sampler="euler", schedule="simple",
               cfg_scale=cfg, controlnets=units, progress=False)  # fmt: skip
    return out.arrays[0].astype(np.float64)


def test_union_1_0_graph_equals_the_pipeline_with_comfyuis_rules(zcn, monkeypatch):
    root, pipe = zcn
    ours = _pixels(_run(root, z_graph())["8"][0])
    plain = _pixels(_run(root, z_graph(None))["8"][0])
    unit = ControlUnit(str(root / "controlnets" / "zfun-1.0.safetensors"), _picture(3), scale=STRENGTH)
    _comfy_rules(pipe, monkeypatch, application=False)
    diffusers_way = _image(pipe, [unit])
    assert np.abs(plain - _image(pipe, None)).mean() < TOL  # the plain graph is the pipeline (test_comfy_z_image)
    _comfy_rules(pipe, monkeypatch)
    theirs = _image(pipe, [unit])
    gap = np.abs(ours - theirs)
    print(f"Z-Image Fun 1.0 graph vs pipeline (ComfyUI's rules): mean abs {gap.mean():.2e}, max {gap.max():.2e}")
    assert gap.mean() < TOL and gap.max() < 1e-4
    assert np.abs(ours - plain).mean() > 1e-3  # the ControlNet acts
    other = np.abs(ours - diffusers_way)
    print(f"ComfyUI's application vs diffusers': mean abs {other.mean():.2e}, max {other.max():.2e}")
    assert other.mean() > 1e-4
    # strength 0 is the plain graph
    g = z_graph()
    g["z"]["inputs"]["strength"] = 0.0
    assert np.abs(_pixels(_run(root, g)["8"][0]) - plain).max() < 1e-6


def test_union_2_1_inpainting_graph_equals_the_pipeline_with_comfyuis_rules(zcn, monkeypatch):
    """2.1 with inpaint_image and mask (white = repaint): ComfyUI's [control, kept mask, masked picture] latent is
    the pipeline's for a binary mask on the latent's grid; without them ComfyUI encodes a mid-grey picture (the
    pipeline zeros): another image."""
    root, pipe = zcn
    ours = _pixels(_run(root, z_graph("zfun-2.1.safetensors", inpaint=True))["8"][0])
    _comfy_rules(pipe, monkeypatch)
    unit = ControlUnit(str(root / "controlnets" / "zfun-2.1.safetensors"), _picture(3), scale=STRENGTH,
                       mask=_mask_picture(), inpaint_image=_picture(4))  # fmt: skip
    theirs = _image(pipe, [unit])
    gap = np.abs(ours - theirs)
    print(f"Z-Image Fun 2.1 inpainting graph vs pipeline: mean abs {gap.mean():.2e}, max {gap.max():.2e}")
    assert gap.mean() < TOL and gap.max() < 1e-4
    bare = _pixels(_run(root, z_graph("zfun-2.1.safetensors"))["8"][0])
    assert np.abs(bare - ours).mean() > 1e-4  # the mask and picture are read
    zeros = _image(pipe, [ControlUnit(unit.model, _picture(3), scale=STRENGTH)])
    assert np.abs(bare - zeros).mean() > 1e-4  # ComfyUI's grey picture is not diffusers' zeros


def test_refusals_are_one_line(zcn, tiny_sd1_folder):
    root, _ = zcn
    g = z_graph("not-a-controlnet.safetensors")
    assert "not-a-controlnet.safetensors is not a Z-Image Fun ControlNet" in _fails(root, g)
    g = z_graph()
    shutil.copytree(tiny_sd1_folder, root / "models" / "sd1-tiny", dirs_exist_ok=True)
    g["c"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1-tiny"}}
    g["z"]["inputs"]["model"] = ["c", 0]
    assert "the model is not a Z-Image transformer" in _fails(root, g)
    g = z_graph(inpaint=True)  # 1.0 reads no inpainting inputs (ComfyUI drops them unread)
    assert "reads no inpainting inputs" in _fails(root, g)
    g = z_graph()
    del g["z"]["inputs"]["image"]
    assert "give it an image" in _fails(root, g)
    g = z_graph()  # a batch of control pictures
    g["r"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["h", 0], "amount": 2}}
    g["z"]["inputs"]["image"] = ["r", 0]
    assert "image is a batch of 2; give one picture here" in _fails(root, g)


def test_object_info_describes_the_nodes_as_comfyui(zcn):
    """/object_info: ModelPatchLoader lists the server's ControlNet folder; ZImageFunControlnet's inputs, defaults and
    output are ComfyUI's (required model, model_patch, vae, strength 1.0 in -10 .. 10 step 0.01; optional image,
    inpaint_image, mask; MODEL)."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from sdengine.server.app import create_app
    from sdengine.server.config import ServerConfig

    root, _ = zcn
    config = ServerConfig(outputs_dir=root / "server-out", controlnets_dir=root / "controlnets")
    app = create_app(config, loader=lambda ref, dev: None, preload=False)
    info = TestClient(app, base_url="http://127.0.0.1").get("/object_info").json()
    loader = info["ModelPatchLoader"]
    names = loader["input"]["required"]["name"][0]
    assert {"zfun-1.0", "zfun-2.1"} <= {n.removesuffix(".safetensors") for n in names}
    assert loader["output"] == ["MODEL_PATCH"] and loader["category"] == "advanced/loaders"
    node = info["ZImageFunControlnet"]
    required, optional = node["input"]["required"], node["input"]["optional"]
    assert list(required) == ["model", "model_patch", "vae", "strength"]
    assert required["model_patch"][0] == "MODEL_PATCH" and required["vae"][0] == "VAE"
    strength = required["strength"][1]
    assert (strength["default"], strength["min"], strength["max"], strength["step"]) == (1.0, -10.0, 10.0, 0.01)
    assert {k: v[0] for k, v in optional.items()} == {"image": "IMAGE", "inpaint_image": "IMAGE", "mask": "MASK"}
    assert node["output"] == ["MODEL"] and node["category"] == "advanced/loaders/zimage"
