"""Set-up shared by every test module.

* One torch thread for the whole session (``SDENGINE_TEST_THREADS`` overrides it): the tests run tiny models,
  where intra-op threads cost more than they give, and on a shared, loaded machine they spin and slow
  every other job down.
* The random model folders that several modules load, built once per session instead of once per module:
  tiny SD 1.x / SD 2.x (v-prediction) / 9-channel inpainting folders in diffusers' layout
  (``tests/_pipeline_models.py``) and a tiny folder in the emoji model's format (``tests/_emoji_models.py``).
  They are shared: a test that changes files must copy the folder into its own ``tmp_path`` first.
  The folder names are part of what tests see (a PNG's ``Model:`` field is the folder name).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

TEST_THREADS = int(os.environ.get("SDENGINE_TEST_THREADS", "1"))
# The CLI's automatic thread count follows the machine's load; exact-pixel tests that run the CLI twice need the
# same count each time, so tests pin it to the session's (a test of the automatic choice removes the variable).
os.environ.setdefault("SDENGINE_THREADS", str(TEST_THREADS))


@pytest.fixture(autouse=True, scope="session")
def _torch_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _webuiapi_defaults_empty() -> Iterator[None]:
    """webuiapi's ``txt2img`` / ``img2img`` default ``alwayson_scripts={}`` (and other ``{}`` / ``[]`` defaults) are
    shared by every call and written into: a call with ``controlnet_units`` leaves its units in the default, and a
    later call in the same process without any sends them again (a test file then failed by the order the workers
    ran files in: "unknown ControlNet 'qwen-cn-inpaint'"). Emptied after each test."""
    yield
    import sys

    module = sys.modules.get("webuiapi.webuiapi")
    if module is None:
        return
    for name in ("txt2img", "img2img"):
        for default in getattr(getattr(module.WebUIApi, name, None), "__defaults__", None) or ():
            if isinstance(default, dict | list):
                default.clear()


def _sd_folder(tmp_path_factory: pytest.TempPathFactory, name: str, kind: str) -> Path:
    from _pipeline_models import make_sd_folder

    return make_sd_folder(tmp_path_factory.mktemp(kind) / name, size="tiny", kind=kind)


@pytest.fixture(scope="session")
def tiny_sd1_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny SD 1.x pipeline (PNDM scheduler config of SD 1.5) as a diffusers folder named tiny-sd."""
    return _sd_folder(tmp_path_factory, "tiny-sd", "sd1")


@pytest.fixture(scope="session")
def tiny_sd2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny SD 2.x pipeline (v-prediction, DDIM config of SD 2.1) named tiny-sd2."""
    return _sd_folder(tmp_path_factory, "tiny-sd2", "sd2")


@pytest.fixture(scope="session")
def tiny_inpaint_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny 9-channel inpainting pipeline named tiny-sd-inpaint."""
    return _sd_folder(tmp_path_factory, "tiny-sd-inpaint", "inpaint")


@pytest.fixture(scope="session")
def tiny_emoji_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny folder in the emoji model's format (MiniLM text encoder by reference) named tiny-emoji."""
    from _emoji_models import make_tiny_emoji_folder

    return make_tiny_emoji_folder(tmp_path_factory.mktemp("emoji") / "tiny-emoji")


@pytest.fixture(scope="session")
def emoji_subset():
    """``emoji_subset(n)``: the real emoji data set cut to ``n`` evenly spaced emoji plus three of the held-out
    fruit, downscaled to 16x16 (a CPU-sized stand-in for the trainers' tests)."""
    import copy

    import torch.nn.functional as F

    from sdengine.data.emoji import EmojiDataset
    from sdengine.train.emoji import HELD_OUT_SUBGROUP

    full = EmojiDataset()

    def make(n: int) -> EmojiDataset:
        ds = copy.copy(full)
        fruit = [i for i, e in enumerate(full.entries) if e.subgroup == HELD_OUT_SUBGROUP][:3]
        idx = list(range(0, len(full), len(full) // n))[:n] + fruit
        ds.entries = [full.entries[i] for i in idx]
        ds.images = F.interpolate(full.images[idx], size=16, mode="bilinear", antialias=True)
        ds.captions = [full.captions[i] for i in idx]
        return ds

    return make
