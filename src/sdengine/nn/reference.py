"""Reference control without a model: sd-webui-controlnet's ``reference_only``, ``reference_adain`` and
``reference_adain+attn`` (its ``AttentionInjection``, scripts/hook.py).

At each U-Net call of a generation, the reference image's latent, noised to the call's timestep, first runs
through the same U-Net ("write"): chosen self-attention layers record their input (the ``norm1`` output, the
queries' tokens), chosen block outputs their per-channel mean and variance. The generation's own call ("read")
then uses them:

* attention (``reference_only``, ``+attn``): a recorded layer's self-attention attends to its own tokens and the
  recorded ones, ``attn(x, context=cat([x, bank...], tokens))``;
* AdaIN (``reference_adain``, ``+attn``): a recorded block output ``x`` becomes ``(x - mean) / std * std_ref +
  mean_ref`` (statistics over H, W per row and channel; variances clamped below at 1e-6 before the root).

Style fidelity ``f`` (the extension's ``threshold_a``): the conditional rows take the reference's answer ``r``, the
unconditional rows ``f * plain + (1 - f) * r`` (computed as the extension does: ``f * c + (1 - f) * r`` where ``c`` is
``r`` with the unconditional rows replaced by the plain answer).

Which layers: the extension sorts the U-Net's transformer blocks by their width, widest first (stable: in module
order within a width), gives block ``i`` of ``N`` the weight ``i / N`` and records it when the unit's weight is
greater. The AdaIN points are the outputs of LDM's ``middle_block`` (weight 0), ``input_blocks`` 4, 5, 7, 8, 10, 11
(SDXL: 4, 5, 7, 8) with weights ``2 * (1 - w / n)`` and ``output_blocks`` 0..7 (SDXL 0..5) with ``2 * w / n`` for the
w-th of n; recorded where the unit's weight is greater. An LDM ``input_blocks[i]`` is one (resnet, attention) layer
of a down level (numbered 1 + level * (layers + 1) + layer), an ``output_blocks[i]`` one layer of an up level
(level * (layers + 1) + layer) with the level's upsampler for its last layer: the AdaIN points need a U-Net of
SD1/SD2's layout (4 levels of 2 layers) or SDXL's (3 levels of 2).

The layers hold the state as the extension's do (a bank per layer, emptied by every "read" call): a per-call slot
on each :class:`~sdengine.nn.attention.Attention` (``reference``) and on the U-Net's blocks (``reference_norm``),
set only inside :func:`reference_applied`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from sdengine.errors import ControlNetError
from sdengine.nn.attention import Attention
from sdengine.nn.transformer import BasicTransformerBlock

REFERENCE_KINDS = ("reference_only", "reference_adain", "reference_adain+attn")
ATTENTION_KINDS = frozenset({"reference_only", "reference_adain+attn"})
ADAIN_KINDS = frozenset({"reference_adain", "reference_adain+attn"})
ADAIN_EPS = 1e-6  # the extension's clamp of both variances before the square root
FIDELITY_FLOOR = 1e-5  # at or below, the unconditional rows are not given their plain answer (the extension's test)

# The extension's AdaIN points (LDM block numbers) of SD1/SD2 (4 levels) and SDXL (3 levels)
ADAIN_INPUTS = {4: (4, 5, 7, 8, 10, 11), 3: (4, 5, 7, 8)}
ADAIN_OUTPUTS = {4: tuple(range(8)), 3: tuple(range(6))}

Attend = Callable[[Tensor, Tensor | None], Tensor]


class ReferenceMachine:
    """The state the extension keeps on its ``UnetHook`` (``attention_auto_machine``, ``gn_auto_machine``, their
    weights, ``current_style_fidelity``, ``current_uc_indices``) and on each hooked layer (the banks)."""

    def __init__(self) -> None:
        self.attention_write = False
        self.attention_weight = 1.0
        self.norm_write = False
        self.norm_weight = 1.0
        self.fidelity = 0.0
        self.uncond_rows: list[int] = []

    def write(self, kind: str, weight: float, fidelity: float) -> None:
        """The modes of the reference pass of a unit of ``kind``."""
        self.fidelity = float(fidelity)
        if kind in ATTENTION_KINDS:
            self.attention_write, self.attention_weight = True, float(weight)
        if kind in ADAIN_KINDS:
            self.norm_write, self.norm_weight = True, float(weight)

    def read(self) -> None:
        self.attention_write = self.norm_write = False


def blend(fidelity: float, ref: Tensor, plain_uncond: Callable[[], Tensor], uncond_rows: Sequence[int]) -> Tensor:
    """``f * c + (1 - f) * ref``, ``c`` = ``ref`` with the unconditional rows' plain answer (when ``f`` > 1e-5)."""
    c = ref.clone()
    if uncond_rows and fidelity > FIDELITY_FLOOR:
        c[list(uncond_rows)] = plain_uncond().to(c.dtype)
    return fidelity * c + (1.0 - fidelity) * ref


def adain(x: Tensor, mean_ref: Tensor, var_ref: Tensor, eps: float = ADAIN_EPS) -> Tensor:
    """``x`` (B, C, H, W) with its per-row, per-channel mean and standard deviation over H, W replaced by the
    reference's: ``(x - mean) / std * std_ref + mean_ref``, ``std = sqrt(max(var, eps))`` (population variance)."""
    var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
    std = torch.clamp(var, min=eps) ** 0.5
    std_ref = torch.clamp(var_ref, min=eps) ** 0.5
    return (x - mean) / std * std_ref + mean_ref


class AttentionTap:
    """One self-attention layer's slot: records its input in a write pass, attends to it in a read pass."""

    def __init__(self, machine: ReferenceMachine, weight: float) -> None:
        self.machine = machine
        self.weight = weight  # the extension's attn_weight: i / N
        self.bank: list[Tensor] = []
        self.fidelities: list[float] = []

    def __call__(self, x: Tensor, attend: Attend) -> Tensor:
        m = self.machine
        if m.attention_write:
            if m.attention_weight > self.weight:
                self.bank.append(x.detach().clone())
                self.fidelities.append(m.fidelity)
            return attend(x, None)
        if not self.bank:
            return attend(x, None)
        bank, fidelities = self.bank, self.fidelities
        self.bank, self.fidelities = [], []
        f = sum(fidelities) / float(len(fidelities))
        rows = m.uncond_rows
        ref = attend(x, torch.cat([x, *(b.to(x.dtype) for b in bank)], dim=1))
        return blend(f, ref, lambda: attend(x[rows], None), rows)


class NormTap:
    """One AdaIN point's slot: records the block output's statistics in a write pass, transfers them in a read."""

    def __init__(self, machine: ReferenceMachine, weight: float) -> None:
        self.machine = machine
        self.weight = weight  # the extension's gn_weight (already doubled)
        self.means: list[Tensor] = []
        self.variances: list[Tensor] = []
        self.fidelities: list[float] = []

    def __call__(self, x: Tensor) -> Tensor:
        m = self.machine
        if m.norm_write:
            if m.norm_weight > self.weight:
                var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
                self.means.append(mean)
                self.variances.append(var)
                self.fidelities.append(m.fidelity)
            return x
        if not self.means:
            return x
        means, variances, fidelities = self.means, self.variances, self.fidelities
        self.means, self.variances, self.fidelities = [], [], []
        f = sum(fidelities) / float(len(fidelities))
        mean_acc = sum(means) / float(len(means))
        var_acc = sum(variances) / float(len(variances))
        assert isinstance(mean_acc, Tensor) and isinstance(var_acc, Tensor)
        ref = adain(x, mean_acc, var_acc)
        rows = m.uncond_rows
        return blend(f, ref, lambda: x[rows], rows).to(x.dtype)


def attention_layers(unet: nn.Module) -> list[Attention]:
    """The self-attention layers (``attn1`` of every transformer block) in the extension's order: widest first,
    module order within a width; layer ``i`` of ``N`` has the weight ``i / N``."""
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    blocks = sorted(blocks, key=lambda b: -int(b.norm1.normalized_shape[0]))
    return [b.attn1 for b in blocks]  # type: ignore[misc]


def adain_points(unet: Any) -> list[tuple[nn.Module, int, float]]:
    """The AdaIN points as (block, layer index within it, doubled weight): the middle block (layer -1) first, then
    the chosen down layers and up layers (see the module docstring). A U-Net of another layout is a one-line
    error."""
    cfg = getattr(unet, "config", None)
    downs, ups = getattr(unet, "down_blocks", None), getattr(unet, "up_blocks", None)
    levels = len(getattr(cfg, "block_out_channels", ()))
    layers = getattr(cfg, "layers_per_block", None)
    if downs is None or ups is None or getattr(unet, "mid_block", None) is None:
        raise ControlNetError("reference_adain needs sdengine's U-Net (down, middle and up blocks)")
    if levels not in ADAIN_INPUTS or layers != 2:
        raise ControlNetError(
            f"reference_adain is defined for SD1/SD2 (4 levels of 2 layers) and SDXL (3 levels of 2) U-Nets; this "
            f"U-Net has {levels} levels of {layers} layers (use reference_only)"
        )
    points: list[tuple[nn.Module, int, float]] = [(unet.mid_block, -1, 0.0)]
    inputs, outputs = ADAIN_INPUTS[levels], ADAIN_OUTPUTS[levels]
    for w, i in enumerate(inputs):
        level, layer = divmod(i - 1, layers + 1)
        points.append((downs[level], layer, 2.0 * (1.0 - w / len(inputs))))
    for w, i in enumerate(outputs):
        level, layer = divmod(i, layers + 1)
        points.append((ups[level], layer, 2.0 * (w / len(outputs))))
    return points


@contextmanager
def reference_applied(unet: nn.Module, machine: ReferenceMachine, *, adain_used: bool) -> Iterator[None]:
    """Inside the block, the U-Net's self-attention layers (and, ``adain_used``, its AdaIN points) answer through
    ``machine``'s taps (fresh banks); as before after it, whatever happens."""
    layers = attention_layers(unet)
    points = adain_points(unet) if adain_used else []
    n = len(layers)
    for layer in layers:
        if layer.reference is not None:
            raise ControlNetError("reference control is already applied to this U-Net")
    blocks: dict[int, tuple[nn.Module, dict[int, NormTap]]] = {}
    for block, index, weight in points:
        blocks.setdefault(id(block), (block, {}))[1][index] = NormTap(machine, weight)
    try:
        for i, layer in enumerate(layers):
            layer.reference = AttentionTap(machine, float(i) / float(n))
        for block, taps in blocks.values():
            block.reference_norm = _norm_slot(taps)  # type: ignore[assignment]
        yield
    finally:
        for layer in layers:
            layer.reference = None
        for block, _ in blocks.values():
            block.reference_norm = None  # type: ignore[assignment]


def _norm_slot(taps: dict[int, NormTap]) -> Callable[[int, Tensor], Tensor]:
    def slot(index: int, x: Tensor) -> Tensor:
        tap = taps.get(index)
        return x if tap is None else tap(x)

    return slot


__all__ = [
    "ADAIN_KINDS",
    "ATTENTION_KINDS",
    "AttentionTap",
    "NormTap",
    "REFERENCE_KINDS",
    "ReferenceMachine",
    "adain",
    "adain_points",
    "attention_layers",
    "blend",
    "reference_applied",
]
