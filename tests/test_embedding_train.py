"""``sdengine train embedding``: textual inversion on the tiny SD 1.x model. The file it writes loads in
diffusers' ``load_textual_inversion`` (same text states as sdengine's ``--embeddings-dir``), a resumed run equals
an uninterrupted one, the loss goes down, and bad settings are one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _pipeline_models import diffusers_pipeline  # noqa: E402
from sdengine.cli import main  # noqa: E402
from sdengine.text.embeddings import read_embedding  # noqa: E402
from sdengine.train.embedding import EmbeddingSpec, EmbeddingTrainingError  # noqa: E402

NAME = "zqxstyle"


def image_folder(dst, n: int = 3, size: int = 32):
    dst.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        a = np.full((size, size, 3), 30 + 60 * i, np.uint8)
        a[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = rng.integers(0, 255, 3)
        Image.fromarray(a).save(dst / f"img{i}.png")
        if i:
            (dst / f"img{i}.txt").write_text(f"picture {i}")  # [filewords]; img0 has none
    return dst


def _args(model, data, out, steps: int, *extra: str) -> list[str]:
    return [
        "train",
        "embedding",
        "--model",
        str(model),
        "--data",
        str(data),
        "--name",
        NAME,
        "--vectors",
        "2",
        "--init-text",
        "red square",
        "--template",
        "a [filewords] of [name]",
        "--steps",
        str(steps),
        "--batch-size",
        "2",
        "--lr",
        "5e-2",
        "--device",
        "cpu",
        "--checkpoint-every",
        "2",
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(tiny_sd1_folder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ti_train")
    data = image_folder(tmp / "data")
    out = tmp / "run"
    assert main(_args(tiny_sd1_folder, data, out, 10)) == 0
    return tiny_sd1_folder, data, out, tmp


def test_trained_file_loads_in_diffusers_with_the_same_states(trained):
    model, _, out, _ = trained
    path = out / f"{NAME}.safetensors"
    vec = read_embedding(path, width=32)
    assert vec.shape == (2, 32)
    ref = diffusers_pipeline(model)
    ref.load_textual_inversion(str(path), token=NAME)
    ids = ref.tokenizer.convert_tokens_to_ids([NAME, f"{NAME}_1"])
    assert torch.equal(ref.text_encoder.get_input_embeddings().weight[ids].detach(), vec)
    ours = sdengine.load_pipeline(model, device="cpu", embeddings_dir=out)
    prompt = f"a picture of {NAME}"
    cond = ours.encode_prompt(prompt, "")[0]
    with torch.no_grad():
        theirs = ref.encode_prompt(prompt, "cpu", 1, False)[0]
    assert (cond - theirs).abs().max().item() <= 1e-5


def test_training_moved_the_vectors_and_lowered_the_loss(trained):
    """The loss of the training captions at fixed timesteps and noise: lower with the trained vectors than with the
    initial ones (the init text's token embeddings)."""
    from sdengine.data.folders import ImageFolder
    from sdengine.diffusion.denoisers import diffusion_loss, prediction_target
    from sdengine.diffusion.schedules import q_sample
    from sdengine.train.embedding import captions_for, initial_vectors
    from sdengine.vae_utils import encode

    model, data, out, _ = trained
    pipe = sdengine.load_pipeline(model, device="cpu", embeddings_dir=out)
    spec = EmbeddingSpec(
        str(model), str(data), NAME, vectors=2, init_text="red square", template="a [filewords] of [name]"
    )
    ds = ImageFolder(data, size=32)
    captions = captions_for(spec, ds.captions)
    assert captions == ["a  of zqxstyle", "a picture 1 of zqxstyle", "a picture 2 of zqxstyle"]
    trained_vec = read_embedding(out / f"{NAME}.safetensors")
    init = initial_vectors(pipe.text_encoder, sdengine.load_pipeline(model, device="cpu").tokenizer, "red square", 2)
    assert (trained_vec - init).abs().max().item() > 1e-2
    assert pipe.tokenizer.embeddings.load(NAME).first_id == pipe.text_encoder.config.vocab_size
    acp = pipe.noise_schedule.alphas_cumprod

    def fixed_loss(vectors: torch.Tensor) -> float:
        pipe.text_encoder.set_extra_tokens(vectors)  # the library's only embedding: its ids come first
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            z0 = encode(pipe.vae, ds.stack(), None, tiled=False)
            states = torch.cat([pipe.encode_prompt(c, "")[0] for c in captions])
            losses = []
            for t_val in torch.linspace(50, 950, 8).long():
                t = t_val.expand(z0.shape[0])
                noise = torch.randn(z0.shape, generator=g)
                pred = pipe.unet(q_sample(z0, t, noise, acp), t, encoder_hidden_states=states)
                losses.append(diffusion_loss(pred, prediction_target("epsilon", z0, noise, acp[t])).item())
        return sum(losses) / len(losses)

    after, before = fixed_loss(trained_vec), fixed_loss(init)
    print(f"fixed loss: initial vectors {before:.5f}, trained {after:.5f}")
    assert after < before


def test_resumed_run_equals_an_uninterrupted_one(trained):
    model, data, out, tmp = trained
    part = tmp / "part"
    assert main(_args(model, data, part, 5)) == 0  # stopped at step 5 (a checkpoint every 2 steps, and at the end)
    assert main(_args(model, data, part, 10, "--resume")) == 0
    a = (out / f"{NAME}.safetensors").read_bytes()
    b = (part / f"{NAME}.safetensors").read_bytes()
    assert a == b


def test_same_command_twice_is_refused_without_resume(trained, capsys):
    model, data, out, _ = trained
    capsys.readouterr()
    assert main(_args(model, data, out, 10)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume" in err[0], err


def test_resume_under_another_name_is_refused_and_changes_nothing(trained, capsys):
    model, data, out, _ = trained
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    argv = _args(model, data, out, 12, "--resume")
    argv[argv.index("--name") + 1] = "otherword"  # the run was trained as NAME: its file is NAME.safetensors
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--name {NAME}, not otherword" in err[0], err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # no otherword.safetensors


def test_resume_with_another_init_text_is_refused_and_changes_nothing(trained, capsys):
    """--init-text is where the vectors start; a resumed run takes them from the checkpoint, so another one would
    change nothing without a word: refused in one line naming the run's, nothing written."""
    model, data, out, _ = trained
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    argv = _args(model, data, out, 12, "--resume")
    argv[argv.index("--init-text") + 1] = "blue circle"
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--init-text red square, not blue circle" in err[0], err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"vectors": 0}, "vectors must be in 1..75"),
        ({"vectors": 76}, "vectors must be in 1..75"),
        ({"name": "../x"}, "use letters, digits"),
        ({"template": "a photo"}, "has no \\[name\\]"),
        ({"init_text": " "}, "init text ' ' has no tokens"),  # once refused only after the model had loaded
    ],
)
def test_bad_settings_are_one_line(kwargs, message):
    args = {"model": "m", "data": "d", "name": NAME, **kwargs}
    with pytest.raises(EmbeddingTrainingError, match=message):
        EmbeddingSpec(**args)


def test_minilm_model_is_refused(tiny_emoji_folder, tmp_path, capsys):
    data = image_folder(tmp_path / "data")
    rc = main(_args(tiny_emoji_folder, data, tmp_path / "o", 1))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "CLIP text encoder" in err[0], err
