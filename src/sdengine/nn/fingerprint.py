"""What a network's output depends on besides its inputs, as one comparable value.

A recorded CUDA graph (sdengine.cuda_graphs), an ahead-of-time compiled network (sdengine.aot) and the
text-encoder output cache (sdengine.text.encode_cache) all keep something computed from a network and must
notice when the network changed: weights replaced or moved (a new storage address or dtype), changed in place
(a LoRA fused in, ``load_state_dict`` into the same tensors: the version counter), or patched with forward hooks
(how LoRAs are applied unfused, see sdengine.nn.lora).

A module that keeps tensors derived from its weights outside its parameters and buffers (the stacked projections
of sdengine.nn.attention's fused query/key/value products) has an integer attribute ``derived_version``, bumped
whenever it drops or replaces them other than because a weight changed (which the weights' own entries show): a
recorded graph reading the dropped tensors must not replay.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def module_fingerprint(module: nn.Module | None) -> tuple[Any, ...]:
    """What ``module``'s output depends on besides its inputs: each parameter's and buffer's storage (address,
    dtype) and version counter (bumped by every in-place change; None for an inference tensor, which has none),
    the number of forward (pre-)hooks of its submodules (LoRAs are patched on as hooks, see sdengine.nn.lora), and
    the sum of the submodules' ``derived_version`` counters (module docstring).
    A walk over the module: computed once per generation or text encoding, not per step."""
    if module is None:
        return ()
    # One walk over the submodules (three separate walks took 3x as long: 4.4 ms for SD 1.5's U-Net here).
    tensors: list[tuple[Any, ...]] = []
    hooks = 0
    derived = 0
    for m in module.modules():
        hooks += len(m._forward_hooks) + len(m._forward_pre_hooks)
        derived += m.__dict__.get("derived_version", 0)  # the instance's own attribute: no nn.Module lookup
        for group in (m._parameters, m._buffers):
            for t in group.values():
                if t is not None:
                    # An inference tensor (made under torch.inference_mode) has no version counter: None, and
                    # a user that must see in-place changes (sdengine.text.encode_cache) treats it as unknown.
                    tensors.append((t.data_ptr(), t.dtype, None if t.is_inference() else t._version))
    return tuple(tensors), hooks, derived


class ModuleWatch:
    """Whether a module changed since the last look: ``check()`` -> (moved, hooked). ``moved``: its fingerprint
    (:func:`module_fingerprint`) differs from the previous check's (or construction's); ``hooked``: it carries
    forward hooks now."""

    def __init__(self, module: nn.Module | None) -> None:
        self.module = module
        self.fingerprint = module_fingerprint(module)

    def check(self) -> tuple[bool, bool]:
        now = module_fingerprint(self.module)
        moved, self.fingerprint = now != self.fingerprint, now
        return moved, bool(now and now[1])


__all__ = ["ModuleWatch", "module_fingerprint"]
