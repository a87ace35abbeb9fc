"""sdengine.nn.meta_init: initialisers skipped on meta tensors only, in the calling thread only; and loading a
model no longer pulls PyTorch's compiler machinery into the process (what cost ~1 s of every start-up)."""

from __future__ import annotations

import subprocess
import sys
import threading

import torch
from torch import nn

from sdengine.nn.meta_init import skip_meta_init


def test_meta_tensors_are_left_alone_and_real_ones_still_initialised():
    torch.manual_seed(0)
    with skip_meta_init():
        with torch.device("meta"):
            meta = nn.Linear(4, 3)
            emb = nn.Embedding(10, 4)
        real = nn.Linear(4, 3)
        t = torch.zeros(3)
        t.fill_(2.0).mul_(3.0)
        nn.init.normal_(t, mean=5.0, std=0.0)  # the keyword form nn.init uses
    assert meta.weight.device.type == "meta" and emb.weight.shape == (10, 4)
    torch.manual_seed(0)
    expected = nn.Linear(4, 3)
    torch.testing.assert_close(real.weight, expected.weight, rtol=0, atol=0)  # the same random init as outside
    assert torch.equal(t, torch.full((3,), 5.0))


def test_other_threads_are_not_affected():
    seen: list[tuple[int, torch.Tensor]] = []

    def other() -> None:  # a server thread computing meanwhile: no mode of ours in its way
        seen.append((torch._C._len_torch_function_stack(), torch.zeros(2).fill_(7.0)))

    with skip_meta_init():
        assert torch._C._len_torch_function_stack() == 1
        th = threading.Thread(target=other)
        th.start()
        th.join(timeout=30)
    assert len(seen) == 1 and seen[0][0] == 0 and torch.equal(seen[0][1], torch.full((2,), 7.0))
    assert torch._C._len_torch_function_stack() == 0  # and the mode is gone once the block ends


def test_loading_a_model_does_not_import_the_compiler(tiny_sd1_folder):
    code = (
        "import sys, sdengine\n"
        f"pipe = sdengine.load_pipeline({str(tiny_sd1_folder)!r}, device='cpu', fast_path='none')\n"
        "pipe('a cube', '', steps=2, seed=1, width=32, height=32, progress=False)\n"
        "print(sorted(m for m in ('sympy', 'torch._dynamo') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr
