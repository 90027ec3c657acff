"""The seam between the training step and everything that watches or changes it.

A plug-in (OLMo-core's callbacks are the model) gets the step's moments as calls with a
:class:`Step` record, may hand device values to be read (:meth:`PluginBase.readings`), returns
``name -> value`` metrics for the step, may report :class:`Firing` s, and keeps its own state, which
rides in the checkpoint so a resumed run behaves exactly as the unbroken one. The loop knows only
:class:`Plugins`; adding a probe, a detector or a mitigation never makes the step longer.

Every hook is called on every rank in the same order, so a plug-in may use collectives. The
readings of all plug-ins and the loop's own reach the host together: reduced across ranks (one
all-reduce per kind) and copied in one go, the step's one host sync of dsinstab's own.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Protocol

import deepspeed.comm as dist
import torch

# A reading: a tensor on the engine's device (0-d, or 1-d for a row of values) and how ranks combine
# it: "mean" and "max" for values each rank measures on its own data, "same" for values already
# equal on every rank (DeepSpeed's reduced grad norm, a decision taken from reduced values).
Readings = dict[str, tuple[torch.Tensor, str]]
REDUCTIONS = ("mean", "max", "same")


@dataclass
class Step:
    """One optimizer step as the plug-ins see it; the loop fills it in as the step goes."""

    number: int  # the optimizer step, counted from 1
    blocks: list[list[int]] = field(default_factory=list)  # this rank's blocks, per micro batch
    losses: torch.Tensor | None = None  # this rank's mean (ce, z-loss) before the update (device)
    # The global grad norm before clipping (device, the same on every rank): measured before the
    # update where DeepSpeed reports none (fp32 without ZeRO), DeepSpeed's own after it elsewhere.
    grad_norm: torch.Tensor | None = None
    # Reduced across ranks and on the host: known from ``collect`` on.
    loss: float = math.nan  # ce + z-loss, the mean over ranks
    norm: float = math.nan  # the grad norm; inf for a non-finite one
    overflow: bool = False  # the update was skipped (fp16 overflow, or a non-finite gradient)
    loss_scale: float | None = None  # fp16's scale after the step; None in bf16 and fp32
    lr: float = math.nan


@dataclass
class Firing:
    """A detector's finding: what fired, its value, and the threshold and baseline it passed."""

    kind: str
    value: float
    threshold: float | None = None
    baseline: float | None = None
    series: str | None = None  # for a level shift: "loss" or "grad_norm"


def firing_record(f: Firing) -> dict:
    return {k: v for k, v in asdict(f).items() if v is not None}


class Plugin(Protocol):
    """What the loop calls; a plug-in implements the hooks it needs (see :class:`PluginBase`)."""

    name: str

    def bind(self, run) -> None:
        """Once, when ``loop.train`` starts: the :class:`dsinstab.run.loop.Run`, for a plug-in that
        writes events (``run.sink.event``, a null sink off rank 0) or moves the batch order."""

    def last_step(self, max_steps: int) -> int:
        """The step the run ends at (``max_steps`` unless the plug-in ends it sooner)."""

    def begin_step(self, step: Step) -> None:
        """Before the first micro batch of ``step``."""

    def observe_logits(self, logits: torch.Tensor) -> None:
        """The output logits of each micro batch of the step, before the loss."""

    def before_step(self, step: Step) -> None:
        """All micro batches are back-propagated; the optimizer has not stepped yet."""

    def after_update(self, step: Step) -> None:
        """The optimizer step is done (or skipped), before any plug-in's :meth:`after_step`: what a
        plug-in set up for this step alone (an injected fault) is still in place, so the step can
        be run again as it ran (overflow anatomy re-runs an overflowing step)."""

    def after_step(self, step: Step) -> None:
        """The optimizer step is done (or skipped, for an overflow)."""

    def readings(self, step: Step) -> Readings:
        """Device values this plug-in wants on the host for the step (empty: none)."""

    def collect(self, step: Step, values: dict) -> dict:
        """The step's metrics, from the host values of :meth:`readings` (same keys) and the step's
        reduced values; may act on them (they are the same on every rank)."""

    def firings(self, step: Step) -> list[Firing]:
        """What the plug-in detected in this step, for the loop's action policy."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class PluginBase:
    """Hooks that do nothing: a plug-in subclasses this and overrides what it needs."""

    name = "plugin"

    def bind(self, run) -> None:
        pass

    def last_step(self, max_steps: int) -> int:
        return max_steps

    def begin_step(self, step: Step) -> None:
        pass

    def observe_logits(self, logits: torch.Tensor) -> None:
        pass

    def before_step(self, step: Step) -> None:
        pass

    def after_update(self, step: Step) -> None:
        pass

    def after_step(self, step: Step) -> None:
        pass

    def readings(self, step: Step) -> Readings:
        return {}

    def collect(self, step: Step, values: dict) -> dict:
        return {}

    def firings(self, step: Step) -> list[Firing]:
        return []

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Plugins:
    """The run's plug-ins, called in order; their states are one dict keyed by plug-in name."""

    def __init__(self, plugins: list[Plugin]):
        names = [p.name for p in plugins]
        if len(set(names)) != len(names):
            raise ValueError(f"plug-in names must be unique, got {names}")
        self.plugins = list(plugins)
        self._values: dict[str, dict] = {}

    def __iter__(self):
        return iter(self.plugins)

    def bind(self, run) -> None:
        for p in self.plugins:
            p.bind(run)

    def last_step(self, max_steps: int) -> int:
        return min([p.last_step(max_steps) for p in self.plugins], default=max_steps)

    def begin_step(self, step: Step) -> None:
        for p in self.plugins:
            p.begin_step(step)

    def observe_logits(self, logits: torch.Tensor) -> None:
        for p in self.plugins:
            p.observe_logits(logits)

    def before_step(self, step: Step) -> None:
        for p in self.plugins:
            p.before_step(step)

    def after_step(self, step: Step) -> None:
        for p in self.plugins:
            p.after_update(step)
        for p in self.plugins:
            p.after_step(step)

    def read(self, step: Step, own: Readings) -> dict:
        """The loop's ``own`` readings and every plug-in's, reduced and on the host in one copy;
        returns the loop's values (the plug-ins get theirs in :meth:`collect`)."""
        everything = dict(own)
        keys: dict[str, list[str]] = {}
        for p in self.plugins:
            got = p.readings(step)
            keys[p.name] = list(got)
            everything |= {f"{p.name}:{k}": v for k, v in got.items()}
        values = reduce_readings(everything)
        self._values = {name: {k: values[f"{name}:{k}"] for k in ks} for name, ks in keys.items()}
        return {k: values[k] for k in own}

    def collect(self, step: Step) -> dict:
        out: dict = {}
        for p in self.plugins:
            out |= p.collect(step, self._values.get(p.name, {}))
        self._values = {}
        return out

    def firings(self, step: Step) -> list[Firing]:
        return [f for p in self.plugins for f in p.firings(step)]

    def state_dict(self) -> dict:
        return {p.name: p.state_dict() for p in self.plugins}

    def load_state_dict(self, state: dict) -> None:
        for p in self.plugins:
            p.load_state_dict(state.get(p.name, {}))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def reduce_readings(readings: Readings) -> dict:
    """The same numbers on every rank: means and maxima over ranks, each kind in one all-reduce of
    one float64 buffer on the readings' device, then one host copy for all of them. A 0-d reading
    comes back as a float, a 1-d one as a list."""
    if not readings:
        return {}
    keys = sorted(readings)
    device = readings[keys[0]][0].device
    parts, world = [], world_size()
    for how in REDUCTIONS:
        names = [k for k in keys if readings[k][1] == how]
        if not names:
            continue
        t = torch.cat([readings[k][0].to(device, torch.float64).reshape(-1) for k in names])
        if how != "same" and world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM if how == "mean" else dist.ReduceOp.MAX)
            if how == "mean":
                t /= world
        parts.append((names, t))
    flat = torch.cat([t for _, t in parts]).tolist()  # the one host sync
    out, at = {}, 0
    for names, _ in parts:
        for k in names:
            t = readings[k][0]
            n = t.numel()
            out[k] = flat[at] if t.dim() == 0 else flat[at : at + n]
            at += n
    return out
