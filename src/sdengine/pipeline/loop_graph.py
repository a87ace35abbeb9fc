"""A generation's whole sampling loop as one CUDA graph: the ``cuda_graph_loop`` fast-path option.

With ``cuda_graphs`` every U-Net call replays its own graph; between two replays Python still runs the step:
classifier-free guidance's split and combination, the sampler's update (DPM++ 2M: 18 small operations a step),
the copies of the step's inputs into the graph's buffers and of its output out of them, a few hundred kernel
launches per image. Here the whole ``sampling.sample`` call, every step's U-Net call, guidance and update, is
recorded once and replayed as one unit: one launch for the 25 steps.

A recording keeps what Python computed while it was made: the sigmas and every coefficient derived from them,
the guidance scale, which branches the sampler took. So a recording is keyed (:class:`LoopPlan`) by every setting
those come from (sampler, steps, schedule, scheduler config, guidance scale and rescale, perturbed-attention
guidance's scale and layers (which attention layers the recorded calls switch), self-attention guidance's scale and
blur sigma (its degraded pass and blur kernel), sampler options, img2img
strength and start step, the network's dtype), and by the shapes of its tensors, which are its inputs: the start
noise, the img2img start latent, the per-step noise (below), every conditioning tensor (each copied into the
graph's buffer at every call). Requests that differ only in prompt, negative prompt or seed replay the same graph.
A recording costs about three plain loops (a warm-up run, the recording, its first replay), so a plan and shapes
are recorded the second time they come (a server's repeated settings); the first time, the pipeline's own path
runs (the step graphs).

The per-step noise of the ancestral and SDE samplers (Euler a, DPM++ 2M SDE, DDIM with ``eta``, ...) comes from
the rows' CPU generators, which a graph cannot call: the pipeline draws it all before the replay, in the order
and from the generators the sampler would have used (the number of draws from
:func:`sdengine.diffusion.sampling.noise_draws`), and the recorded loop reads it as one more input
(:class:`sdengine.diffusion.samplers.NoiseBank`): the same numbers, so the same image. Only a loop that replays
exactly is recorded: not with ControlNets, prompt editing, inpainting's blend, or a U-Net hooked by a LoRA;
those run as without this option. A plan whose recording fails (something in the loop waits on the CPU) runs
plainly that once, with one warning, and the pipeline's own path (the step graphs) from then on. A replay cannot
stop between its steps: a step callback (progress, previews, a server's cancel) is called once, after the last
step.

On the CPU nothing is recorded (the option is skipped); the tests run this code with a stand-in recorder
(tests/test_loop_graph.py), and the GPU bench times it (``graph_loop`` in the graphs phase, docs/gpu.md).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from torch import Tensor, nn

from sdengine.cuda_graphs import Backend, GraphedCallable, call_signature

# (plan, start noise, img2img start latent or None, conditioning, unconditional conditioning, per-step noise draws
# (K, B, C, h, w) or None) -> final latent
LoopRunner = Callable[
    ["LoopPlan", Tensor, "Tensor | None", dict[str, Tensor], dict[str, Tensor], "Tensor | None"], Tensor
]


@dataclass(frozen=True)
class LoopPlan:
    """Every setting of a generation's sampling call besides its tensors (``Pipeline.sample_plan`` runs it), and
    so everything a recorded loop bakes in (see the module docstring): two requests with equal plans and equally
    shaped tensors replay the same graph."""

    sampler: str
    steps: int
    schedule: str
    scheduler_config: str  # JSON, keys sorted
    cfg_scale: float
    rescale: float
    sampler_options: str  # JSON, keys sorted
    strength: float
    start_step: int | None
    dtype: str
    a1111_grid: bool = False  # DDIM / PLMS on A1111's grid (sampling.sample)
    noise_from: int | None = None  # the grid index img2img noises the init to, when not start_step
    discard_penultimate: bool = False  # the grid without its next-to-last sigma (sampling.make_grid)
    zero_snr: bool = False  # A1111's Zero Terminal SNR rescale of the model's schedule (Pipeline.noise_schedule)
    # perturbed-attention guidance: its scale and layer patterns (the recording bakes in which layers are switched)
    pag_scale: float = 0.0
    pag_layers: tuple[str, ...] = ()
    # FreeU: (b1, b2, s1, s2, version, rule), () = off (the recording bakes in the up blocks' FreeU)
    freeu: tuple[Any, ...] = ()
    # HyperTile: (tile_size, swap_size, max_depth, rule, scale_depth, seed), () = off (the recording bakes in the
    # tiles drawn at each call, which the seed decides)
    hypertile: tuple[Any, ...] = ()
    # self-attention guidance: (scale, blur sigma), and "comfyui" third under that rule; () = off (the recording bakes
    # in the scale, the blur kernel and where the term goes)
    sag: tuple[Any, ...] = ()
    # Deep Shrink: sdengine.nn.deep_shrink.DeepShrink.key, () = off (the recording bakes in which steps' calls are
    # shrunk, and their shapes)
    deep_shrink: tuple[Any, ...] = ()
    # the options as given (the JSON above keys them; a value JSON cannot hold exactly is kept here as it was)
    given_options: tuple[tuple[str, Any], ...] = field(default=(), compare=False, repr=False)

    @staticmethod
    def of(
        *,
        sampler: str,
        steps: int,
        schedule: str,
        scheduler_config: Mapping[str, Any] | None,
        cfg_scale: float,
        rescale: float,
        sampler_options: Mapping[str, Any] | None,
        strength: float,
        start_step: int | None,
        dtype: Any,
        a1111_grid: bool = False,
        noise_from: int | None = None,
        discard_penultimate: bool = False,
        zero_snr: bool = False,
        pag_scale: float = 0.0,
        pag_layers: tuple[str, ...] = (),
        freeu: tuple[Any, ...] = (),
        hypertile: tuple[Any, ...] = (),
        sag: tuple[Any, ...] = (),
        deep_shrink: tuple[Any, ...] = (),
    ) -> LoopPlan:
        return LoopPlan(
            sampler=sampler,
            steps=int(steps),
            schedule=schedule,
            scheduler_config=json.dumps(dict(scheduler_config or {}), sort_keys=True, default=str),
            cfg_scale=float(cfg_scale),
            rescale=float(rescale),
            sampler_options=json.dumps(dict(sampler_options or {}), sort_keys=True, default=str),
            strength=float(strength),
            start_step=None if start_step is None else int(start_step),
            dtype=str(dtype),
            a1111_grid=bool(a1111_grid),
            noise_from=None if noise_from is None else int(noise_from),
            discard_penultimate=bool(discard_penultimate),
            zero_snr=bool(zero_snr),
            pag_scale=float(pag_scale),
            pag_layers=tuple(str(x) for x in pag_layers),
            freeu=tuple(freeu),
            hypertile=tuple(hypertile),
            sag=tuple(v if isinstance(v, str) else float(v) for v in sag),
            deep_shrink=tuple(deep_shrink),
            given_options=tuple(sorted(dict(sampler_options or {}).items())),
        )

    @property
    def key(self) -> str:
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self) if f.compare}, sort_keys=True)

    def options(self) -> dict[str, Any] | None:
        """The sampler options as they were given (None: none)."""
        return dict(self.given_options) or None


class SamplingLoopGraph:
    """The loop's recordings for one pipeline: ``run`` (the pipeline's sampling call with the plain network, no
    generators and no callback) recorded per plan and shapes, by a :class:`sdengine.cuda_graphs.GraphedCallable`
    that watches ``module`` (the U-Net: moved weights drop the recordings, a hook sends calls back to the
    pipeline's own path through :meth:`usable`)."""

    def __init__(
        self,
        run: LoopRunner,
        *,
        module: nn.Module,
        backend: Backend | None = None,
        device_type: str = "cuda",
        max_graphs: int = 4,
        record_after: int = 1,
    ) -> None:
        self.run = run
        # A recording costs about three plain loops (a warm-up, the recording, its first replay), so a plan and
        # shapes are recorded once they came back: after ``record_after`` calls that ran the caller's own path.
        self.record_after = record_after
        self.sightings: OrderedDict[Hashable, int] = OrderedDict()  # signature -> calls not recorded yet
        # plan key -> the plan its recording baked in. The first plan of a key stays: a real graph replays what
        # it recorded, and the tests' stand-in recorder re-runs Python with this plan, so a setting missing from
        # the key shows there as a wrong image rather than being read afresh.
        self.plans: dict[str, LoopPlan] = {}
        self.refused: set[str] = set()  # plan keys whose recording failed: the pipeline's own path runs them
        self.graphed = GraphedCallable(
            self._call,
            module=module,
            name="sampling loop",
            warmup=1,
            max_graphs=max_graphs,
            backend=backend,
            device_type=device_type,
        )

    @property
    def device_type(self) -> str:
        return self.graphed.device_type

    @property
    def recordings(self) -> int:
        return self.graphed.recordings

    @property
    def replays(self) -> int:
        return self.graphed.replays

    def usable(self) -> bool:
        """Whether the loop may be replayed for the next generation (the U-Net unhooked; recordings dropped if
        its weights moved)."""
        return self.graphed.usable()

    def __call__(
        self,
        plan: LoopPlan,
        noise: Tensor,
        init_latent: Tensor | None,
        cond: Mapping[str, Tensor],
        uncond: Mapping[str, Tensor],
        draws: Tensor | None = None,
    ) -> Tensor | None:
        """The final latent, from the loop's recording for this plan and these shapes (recorded first if new);
        None when the caller should run its own path (the step graphs): the plan and shapes came fewer than
        ``record_after`` times before, or this plan's recording failed."""
        key = plan.key
        if key in self.refused:
            return None
        self.plans.setdefault(key, plan)
        if len(self.plans) > 64:  # keep the plans of the kept recordings (and this one)
            kept = {k for k in self.plans if any(k == _plan_of(sig) for sig in self.graphed.graphs)}
            self.plans = {k: v for k, v in self.plans.items() if k in kept or k == key}
        flat = {f"cond.{k}": v for k, v in cond.items()} | {f"uncond.{k}": v for k, v in uncond.items()}
        sig = call_signature((noise, init_latent, draws), {"plan": key, **flat})
        if sig is None:  # an argument that cannot be keyed: never recorded
            return None
        if sig[0] not in self.graphed.graphs:
            seen = self.sightings.pop(sig[0], 0)
            if seen < self.record_after:  # not (yet) worth a recording: the caller's own path
                self.sightings[sig[0]] = seen + 1
                while len(self.sightings) > 256:
                    self.sightings.popitem(last=False)
                return None
        out = self.graphed(noise, init_latent, draws, plan=key, **flat)
        if sig[0] in self.graphed.eager:  # recording failed (one warning): ran plainly this once
            self.refused.add(key)
        return out

    def _call(
        self, noise: Tensor, init_latent: Tensor | None, draws: Tensor | None, *, plan: str, **flat: Tensor
    ) -> Tensor:
        cond = {k.removeprefix("cond."): v for k, v in flat.items() if k.startswith("cond.")}
        uncond = {k.removeprefix("uncond."): v for k, v in flat.items() if k.startswith("uncond.")}
        return self.run(self.plans[plan], noise, init_latent, cond, uncond, draws)


def _plan_of(signature: Any) -> str | None:
    """The plan key inside a GraphedCallable signature (its ``plan`` keyword's value)."""
    for name, part in signature:
        if name == "plan":
            return str(part[2])
    return None


__all__ = ["LoopPlan", "LoopRunner", "SamplingLoopGraph"]
