"""LyCORIS layers in a LoRA file: LoHa, LoKr, (IA)^3, GLoRA, OFT, BOFT, LoCon-Tucker, full/norm differences, DoRA.

LyCORIS (and kohya's trainer driving it) names layers as kohya does (``lora_unet_...``, ``lora_te_...``) and
stores per layer, besides ``<layer>.alpha``:

- LoHa: ``hada_w1_a`` (out, r), ``hada_w1_b`` (r, in*kh*kw), ``hada_w2_a``, ``hada_w2_b``; with Tucker cores
  ``hada_t1``/``hada_t2`` (r, r, kh, kw) the ``*_a`` are (r, out) and the ``*_b`` (r, in);
- LoKr: ``lokr_w1`` (a, c) or ``lokr_w1_a`` (a, r) + ``lokr_w1_b`` (r, c); ``lokr_w2`` (b, d[, kh, kw]) or
  ``lokr_w2_a`` (b, r) + ``lokr_w2_b`` (r, d*kh*kw), or with ``lokr_t2`` (r, r, kh, kw) ``lokr_w2_a`` (r, b) +
  ``lokr_w2_b`` (r, d); out = a*b, in = c*d;
- (IA)^3: ``weight`` (the channel vector) and ``on_input`` (0: output channels, 1: input channels);
- LoCon with a Tucker core: ``lora_down`` (r, in, 1, 1), ``lora_mid`` (r, r, kh, kw), ``lora_up`` (out, r, 1, 1);
- GLoRA: ``a1.weight`` (in, r), ``a2.weight`` (r, in), ``b1.weight`` (out, r), ``b2.weight`` (r, in[, kh, kw])
  (convolutions: 1x1 but for ``b2``), or the older layout with a1/a2 and b1/b2 swapped; with a Tucker core
  ``bm.weight`` (r, r, kh, kw) a convolution's ``b2`` is a 1x1 (r, in, 1, 1);
- OFT (LyCORIS diag-OFT; kohya's OFT, named ``oft_unet_...``): ``oft_blocks`` (n, b, b) with n*b = out,
  ``alpha`` the constraint (not a scale: LyCORIS and kohya bound ``||Q||`` by alpha * out; 0 or none: no bound),
  optional ``rescale`` (out, 1, ...);
- BOFT (LyCORIS): ``oft_blocks`` (m, n, b, b), m butterfly stages, with ``alpha`` and ``rescale`` as for OFT
  (ComfyUI tells the two apart by the same 3 or 4 dimensions);
- Full (LyCORIS ``full``): ``diff`` (the weight's own shape) and, for a layer with a bias, ``diff_b`` (out,);
- norm layers (GroupNorm/LayerNorm): a 1-d ``diff`` / ``diff_b`` (ComfyUI's trainer, and its LoRA extractor with
  ``bias_diff`` on) or LyCORIS' ``w_norm`` / ``b_norm``: ``W + diff``, ``b + diff_b`` (algorithm "norm");
- a ``diff_b`` alone (ComfyUI's extractor writes one next to each LoRA pair whose layer has a bias): the bias
  changes by it, the LoRA pair of the same layer does the weight (algorithm "bias");
- DoRA on any of them (and on a plain LoRA): ``dora_scale`` (LyCORIS/kohya; (out, 1, ...) or (1, in, ...));
  PEFT writes ``<module>.lora_magnitude_vector`` (out,) next to ``lora_A``/``lora_B``.

:func:`split_lycoris` takes these keys out of a state dict; the plain LoRA keys stay for
:mod:`sdengine.weights.lora_file`, which joins DoRA magnitudes to its LoRA layers. The math is
:mod:`sdengine.nn.lycoris`. Problems come back as text (one line each) for the file reader to raise.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..nn.lycoris import lycoris_scale, magnitude_on_output, rank_of, unscaled_delta

# part name -> algorithm; a layer's algorithm is decided by the parts it has
_PARTS = {
    **{p: "loha" for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")},
    **{p: "lokr" for p in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")},
    "lokr_t1": "lokr",  # written by some trainers, never used in the product (LyCORIS ignores it too)
    "diff": "full",
    "diff_b": "full",
    "w_norm": "norm",  # LyCORIS' norm module: stored as diff / diff_b (the same update)
    "b_norm": "norm",
    **{f"{p}.weight": "glora" for p in ("a1", "a2", "b1", "b2", "bm")},
    "oft_blocks": "oft",  # 3-d: OFT, 4-d: BOFT (decided once the layer's parts are read)
    "rescale": "oft",
}
# parts kept under another name: a norm's w_norm/b_norm are its diff/diff_b; GLoRA's a1.weight is a1
_RENAMED = {"w_norm": "diff", "b_norm": "diff_b", **{f"{p}.weight": p for p in ("a1", "a2", "b1", "b2", "bm")}}
_PART_RE = re.compile(
    r"^(?P<layer>.+)\.(?P<part>" + "|".join(re.escape(p) for p in sorted(_PARTS, key=len, reverse=True)) + r")$"
)
_MID_RE = re.compile(r"^(?P<layer>.+)\.lora_mid\.weight$")
_IA3_RE = re.compile(r"^(?P<layer>.+)\.on_input$")
_DORA_RE = re.compile(
    r"^(?P<layer>.+)\.(?:dora_scale|(?P<peft>lora_magnitude_vector)(?:\.(?!weight$)[^.]+)?(?:\.weight)?)$"
)

LABELS = {
    "loha": "LoHa",
    "lokr": "LoKr",
    "ia3": "(IA)^3",
    "locon_tucker": "LoCon (Tucker)",
    "lora": "LoRA",
    "full": "Full (diff)",
    "norm": "Norm layer (diff)",
    "bias": "Bias (diff_b)",
    "glora": "GLoRA",
    "oft": "OFT",
    "boft": "BOFT",
}
# Parts each layout needs (any one set of the alternatives)
_NEEDS = {
    "loha": [{"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}],
    "ia3": [{"weight", "on_input"}],
    "locon_tucker": [{"lora_down", "lora_mid", "lora_up"}],
    "full": [{"diff"}],
    "norm": [{"diff"}],
    "bias": [{"diff_b"}],
    "glora": [{"a1", "a2", "b1", "b2"}],
    "oft": [{"oft_blocks"}],
    "boft": [{"oft_blocks"}],
}


@dataclass
class LycorisLayerWeights:
    """One LyCORIS layer as stored in a file (tensors as read)."""

    key: str  # the file's layer name
    # "loha", "lokr", "ia3", "locon_tucker", "full", "glora", "oft", "boft", "lora" (a plain LoRA carrying a DoRA
    # magnitude), "norm" (a norm layer's weight/bias differences, as diff/diff_b) or "bias" (a diff_b alone)
    algo: str
    parts: dict[str, torch.Tensor]
    alpha: float | None = None
    magnitude: torch.Tensor | None = None  # DoRA
    magnitude_peft: bool = False  # PEFT's lora_magnitude_vector (always per output channel)
    scale_override: float | None = None  # PEFT's alpha (from metadata, maybe rank-stabilised) for DoRA-on-LoRA
    # a part of a fused layer (Flux's q of its qkv, set by sdengine.weights.lora_dit_keys): the (start, stop) row
    # blocks of the factors' update that are this layer's; empty: all of it
    rows: tuple[tuple[int, int], ...] = ()

    @property
    def rank(self) -> int | None:
        return rank_of(self.algo, self.parts)

    @property
    def scale(self) -> float:
        if self.scale_override is not None:
            return self.scale_override
        return lycoris_scale(self.algo, self.parts, self.alpha)

    @property
    def label(self) -> str:
        name = LABELS[self.algo]
        if self.magnitude is None:
            return name
        return "DoRA" if self.algo == "lora" else f"{name}+DoRA"

    def shape(self) -> tuple[int, int, tuple[int, ...]] | str:
        """(out, in, kernel) of the update (kernel () when ``in`` counts in*kh*kw), or why the factors do not fit
        together. The update is rebuilt on the meta device: shapes only, no arithmetic."""
        p = self.parts
        if self.algo in ("norm", "bias"):  # 1-d differences: the number of channels, no input side
            return int(p["diff" if self.algo == "norm" else "diff_b"].shape[0]), -1, ()
        if self.algo == "glora":  # which of its two layouts it is can depend on the layer: checked in fit
            return -1, -1, ()
        if self.algo in ("oft", "boft"):  # rotations of the output rows: n blocks of b rows each
            blocks = p["oft_blocks"]
            if blocks.shape[-1] != blocks.shape[-2] or blocks.shape[-1] == 0:
                return f"oft_blocks {tuple(blocks.shape)} are not square blocks"
            if self.algo == "boft" and blocks.shape[-1] % 2:
                return f"oft_blocks {tuple(blocks.shape)}: BOFT blocks pair rows, their size must be even"
            out = int(blocks.shape[-3]) * int(blocks.shape[-1])
            if "rescale" in p and p["rescale"].numel() != out:
                return f"rescale {tuple(p['rescale'].shape)} does not scale the {out} rows of oft_blocks"
            return out, -1, ()
        try:
            if self.algo == "ia3":
                n = int(p["weight"].numel())
                return (-1, n, ()) if bool(p["on_input"].flatten()[0]) else (n, -1, ())
            meta = {k: torch.empty(v.shape, device="meta") for k, v in p.items()}
            d = unscaled_delta(self.algo, meta, None)
        except (IndexError, KeyError, RuntimeError, ValueError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in p.items())
            return f"factor shapes {shapes} do not fit together ({first})"
        if d.ndim < 2:
            return f"factors give a {d.ndim}-d update"
        if d.ndim == 2:
            return int(d.shape[0]), int(d.shape[1]), ()
        return int(d.shape[0]), int(d.shape[1]), tuple(int(x) for x in d.shape[2:])

    def fit(self, weight_shape: tuple[int, ...]) -> str | None:
        """None when this update fits a layer of ``weight_shape`` (out, in[, kh, kw]); else why not. A part of a
        fused layer (``rows``) fits when the fused update does and its rows are the layer's outputs."""
        if self.rows and len(weight_shape) >= 2:
            got = self.shape()
            if isinstance(got, str):
                return got
            taken = sum(b - a for a, b in self.rows)
            if taken != weight_shape[0] or max(b for _, b in self.rows) > got[0]:
                return f"{self.label} rows {list(self.rows)} of {got[0]} do not give the layer's {weight_shape[0]}"
            return dataclasses.replace(self, rows=()).fit((got[0], *weight_shape[1:]))
        if self.algo in ("norm", "bias"):
            return self._fit_difference(weight_shape)
        if len(weight_shape) < 2:
            return f"a {self.label} update on a norm layer (weight {tuple(weight_shape)}); norm layers take diff/w_norm"
        got = self.shape()
        if isinstance(got, str):
            return got
        out, inn, k = got
        w_out, w_in, w_k = weight_shape[0], weight_shape[1], tuple(weight_shape[2:])
        if self.algo == "ia3":  # one value per channel, whatever the kernel
            if (out == -1 and inn != w_in) or (inn == -1 and out != w_out):
                side, n, want = ("input", inn, w_in) if out == -1 else ("output", out, w_out)
                return f"(IA)^3 scales {n} {side} channels, the layer has {want}"
            return None
        if k:  # a kernel of its own (Tucker, whole w2): the same kernel (1x1 fits a Linear too)
            squeeze = tuple(x for x in k if x != 1), tuple(x for x in w_k if x != 1)
            if squeeze[0] != squeeze[1]:
                return f"{self.label} kernel {k}, layer has {w_k or 'none (Linear)'}"
            want_in = w_in
        else:  # in * kh * kw flattened
            want_in = w_in * math.prod(w_k)
        if out not in (-1, w_out) or inn not in (-1, want_in):
            shown_in, shown_out = ("?" if inn == -1 else inn), ("?" if out == -1 else out)
            return f"{self.label} maps {shown_in} -> {shown_out}, layer {want_in} -> {w_out}"
        if self.algo in ("glora", "oft", "boft"):  # factors that must fit the layer: rebuilt on the meta device
            try:
                meta = {k: torch.empty(v.shape, device="meta") for k, v in self.parts.items()}
                unscaled_delta(self.algo, meta, torch.empty(weight_shape, device="meta"))
            except (IndexError, RuntimeError, ValueError):
                shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in self.parts.items())
                return f"{self.label} factors {shapes} do not fit a layer of weight {tuple(weight_shape)}"
        if "diff_b" in self.parts and tuple(self.parts["diff_b"].shape) != (w_out,):
            return f"diff_b {tuple(self.parts['diff_b'].shape)}, the layer has {w_out} outputs"
        if self.magnitude is not None and self.magnitude_axis(w_out, w_in) is None:
            return f"DoRA magnitude {tuple(self.magnitude.shape)} fits neither {w_out} outputs nor {w_in} inputs"
        return None

    def _fit_difference(self, weight_shape: tuple[int, ...]) -> str | None:
        if self.magnitude is not None:
            return f"a DoRA magnitude on a {self.label} layer"
        if self.algo == "norm":
            if len(weight_shape) != 1:
                return f"a norm layer's 1-d weight difference on a layer with weight {tuple(weight_shape)}"
            if tuple(self.parts["diff"].shape) != tuple(weight_shape):
                return f"weight difference {tuple(self.parts['diff'].shape)}, the layer's weight {tuple(weight_shape)}"
        if "diff_b" in self.parts and tuple(self.parts["diff_b"].shape) != (weight_shape[0],):
            return f"diff_b {tuple(self.parts['diff_b'].shape)}, the layer has {weight_shape[0]} outputs"
        return None

    def magnitude_axis(self, out_features: int, in_features: int) -> bool | None:
        """DoRA: True (per output channel), False (per input channel), None (fits neither, or no DoRA)."""
        if self.magnitude is None:
            return None
        return magnitude_on_output(self.magnitude, out_features, in_features, peft=self.magnitude_peft)


@dataclass
class LycorisSplit:
    """What :func:`split_lycoris` took out of a state dict."""

    layers: dict[str, LycorisLayerWeights] = field(default_factory=dict)
    # DoRA for layers that are plain LoRAs: (magnitude, True for PEFT's lora_magnitude_vector)
    magnitudes: dict[str, tuple[torch.Tensor, bool]] = field(default_factory=dict)
    consumed: set[str] = field(default_factory=set)
    incomplete: list[str] = field(default_factory=list)  # "<layer> (has ... but no ...)"
    problems: list[str] = field(default_factory=list)  # fatal, one line each


def split_lycoris(sd: Mapping[str, torch.Tensor], magnitude_limit: float) -> LycorisSplit:
    """Take the LyCORIS layers (and DoRA magnitudes) out of ``sd``; values over ``magnitude_limit`` are problems."""
    out = LycorisSplit()
    found: dict[str, dict[str, torch.Tensor]] = {}
    algos: dict[str, str] = {}
    mixed: dict[str, set[str]] = {}
    for key, t in sd.items():
        m = _PART_RE.match(key)
        if m:
            found.setdefault(m["layer"], {})[_RENAMED.get(m["part"], m["part"])] = t
            algos.setdefault(m["layer"], _PARTS[m["part"]])
            mixed.setdefault(m["layer"], set()).add(_PARTS[m["part"]])
            out.consumed.add(key)
            continue
        m = _MID_RE.match(key)
        if m:
            algos.setdefault(m["layer"], "locon_tucker")
            mixed.setdefault(m["layer"], set()).add("locon_tucker")
            found.setdefault(m["layer"], {})["lora_mid"] = t
            out.consumed.add(key)
            continue
        m = _IA3_RE.match(key)
        if m:
            algos.setdefault(m["layer"], "ia3")
            found.setdefault(m["layer"], {})["on_input"] = t
            out.consumed.add(key)
    # the keys those layers share with plain LoRA names
    extra = {
        "ia3": {"weight": ".weight"},
        "locon_tucker": {"lora_down": ".lora_down.weight", "lora_up": ".lora_up.weight"},
    }
    alphas: dict[str, torch.Tensor] = {}
    for layer, algo in algos.items():
        for part, suffix in extra.get(algo, {}).items():
            if layer + suffix in sd:
                found[layer][part] = sd[layer + suffix]
                out.consumed.add(layer + suffix)
        if layer + ".alpha" in sd:
            alpha_t = sd[layer + ".alpha"]
            # an integer alpha (torch.tensor(8) of a trainer given an int) is a number like any other, as for
            # plain LoRA layers and in A1111/ComfyUI (they read it with .item())
            if not alpha_t.is_floating_point() and not alpha_t.is_complex() and alpha_t.dtype != torch.bool:
                alpha_t = alpha_t.float()
            alphas[layer] = alpha_t
            out.consumed.add(layer + ".alpha")
    magnitudes: dict[str, tuple[torch.Tensor, bool]] = {}
    for key, t in sd.items():
        m = _DORA_RE.match(key)
        if m:
            magnitudes[m["layer"]] = (t, m["peft"] is not None)
            out.consumed.add(key)

    for layer, parts in found.items():
        algo = algos[layer]
        if len(mixed.get(layer, ())) > 1:
            kinds = " and ".join(sorted(LABELS[a] for a in mixed[layer]))
            out.problems.append(f"{layer} mixes {kinds} parts in one layer")
            continue
        if algo in ("full", "norm") and "diff" not in parts:
            algo = "bias"  # a diff_b (or b_norm) alone: ComfyUI's extractor writes one next to each LoRA pair
        elif algo == "full" and parts["diff"].ndim == 1:
            algo = "norm"  # ComfyUI's trainer and extractor write a norm layer's weight difference as a 1-d diff
        elif algo == "oft" and "oft_blocks" in parts and parts["oft_blocks"].ndim == 4:
            algo = "boft"  # (m, n, b, b): butterfly stages
        if algo == "oft" and "oft_blocks" in parts and parts["oft_blocks"].ndim != 3:
            out.problems.append(
                f"{layer}: oft_blocks {tuple(parts['oft_blocks'].shape)} are neither OFT's (n, b, b) nor BOFT's "
                "(m, n, b, b)"
            )
            continue
        if algo == "glora" and "bm" in parts and parts["bm"].ndim != 4:
            out.problems.append(f"{layer}: GLoRA Tucker core bm {tuple(parts['bm'].shape)} is not (r, r, kh, kw)")
            continue
        if algo == "norm" and parts["diff"].ndim != 1:
            out.problems.append(f"{layer}: w_norm has {parts['diff'].ndim} dimensions, a norm layer's weight has one")
            continue
        missing = _missing(algo, parts)
        if missing:
            out.incomplete.append(f"{layer} (has {'/'.join(sorted(parts))} but no {missing})")
            continue
        # A LoKr layer with both factors whole never reads its alpha (scale 1; LyCORIS writes alpha = its huge
        # "rank"): its size says nothing of the file, so it is not held against the magnitude limit.
        whole_lokr = algo == "lokr" and "lokr_w1" in parts and "lokr_w2" in parts
        checked = {**parts, **({"alpha": alphas[layer]} if layer in alphas and not whole_lokr else {})}
        bad = _bad_values(layer, checked, magnitude_limit)
        if bad:
            out.problems.append(bad)
            continue
        alpha = None
        if layer in alphas:
            if alphas[layer].numel() != 1:
                out.problems.append(f"{layer} alpha has {alphas[layer].numel()} values, not one")
                continue
            alpha = float(alphas[layer].float().item())
        # a bias difference leaves a DoRA magnitude to the LoRA pair of its layer
        mag, peft = (None, False) if algo == "bias" else magnitudes.pop(layer, (None, False))
        w = LycorisLayerWeights(layer, algo, parts, alpha, mag, peft)
        if any(t.ndim == 0 for name, t in parts.items() if name != "on_input"):
            out.problems.append(f"{layer}: {LABELS[algo]} factors must have at least one dimension")
            continue
        if w.rank == 0:  # alpha / rank would divide by zero
            out.problems.append(f"{layer} has rank 0, not a {LABELS[algo]} layer")
            continue
        shape = w.shape()
        if isinstance(shape, str):
            out.problems.append(f"{layer}: {LABELS[algo]} {shape}")
            continue
        out.layers[layer] = w
    for layer, (mag, peft) in magnitudes.items():
        bad = _bad_values(layer, {"dora_scale": mag}, magnitude_limit)
        if bad:
            out.problems.append(bad)
            continue
        out.magnitudes[layer] = (mag, peft)
    return out


def _missing(algo: str, parts: Mapping[str, torch.Tensor]) -> str:
    if algo == "lokr":
        have = set(parts)
        miss = []
        if "lokr_w1" not in have and not {"lokr_w1_a", "lokr_w1_b"} <= have:
            miss.append("lokr_w1 (or lokr_w1_a/lokr_w1_b)")
        if "lokr_w2" not in have and not {"lokr_w2_a", "lokr_w2_b"} <= have:
            miss.append("lokr_w2 (or lokr_w2_a/lokr_w2_b)")
        return ", ".join(miss)
    need = _NEEDS[algo][0] | ({"hada_t2"} if algo == "loha" and "hada_t1" in parts else set())
    if algo == "loha" and "hada_t2" in parts:
        need = need | {"hada_t1"}
    return ", ".join(sorted(need - set(parts)))


def _bad_values(layer: str, parts: Mapping[str, torch.Tensor], limit: float) -> str | None:
    for name, t in parts.items():
        if name == "on_input":
            continue
        if not t.is_floating_point():
            return f"{layer} {name} has dtype {t.dtype}, not floating point"
        if t.numel() and not bool(torch.isfinite(t.float()).all()):
            return f"refused: NaN or inf values in {layer} ({name})"
        if t.numel():
            big = float(t.detach().float().abs().max())
            if big > limit:
                return (
                    f"{layer} {name} has |values| up to {big:.3g}, over {limit:.0e}; refused (a broken or hostile file)"
                )
    return None


__all__ = ["LABELS", "LycorisLayerWeights", "LycorisSplit", "split_lycoris"]
