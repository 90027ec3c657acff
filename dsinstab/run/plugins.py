"""The seam between the training step and everything that watches or changes it.

A plug-in (OLMo-core's callbacks are the model) gets the step's moments as calls, may return
``name -> value`` metrics for the step, and keeps its own state, which rides in the checkpoint so a
resumed run behaves exactly as the unbroken one. The loop knows only :class:`Plugins`; adding a
probe or a mitigation never makes the step longer.

Every hook is called on every rank in the same order, so a plug-in may use collectives.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Plugin(Protocol):
    """What the loop calls; a plug-in implements the hooks it needs (see :class:`PluginBase`)."""

    name: str

    def bind(self, run) -> None:
        """Once, when ``loop.train`` starts: the :class:`dsinstab.run.loop.Run`, for a plug-in that
        writes events (``run.sink.event``, a null sink off rank 0) or reads the step's blocks
        (``run.step_indices``). Optional: the loop calls it only where it is defined."""

    def begin_step(self, step: int) -> None:
        """Before the first micro batch of optimizer step ``step`` (counted from 1)."""

    def observe_logits(self, logits: torch.Tensor) -> None:
        """The output logits of each micro batch of the step, before the loss."""

    def before_step(self) -> None:
        """All micro batches are back-propagated; the optimizer has not stepped yet."""

    def after_step(self) -> None:
        """The optimizer step is done (or skipped, for an fp16 overflow)."""

    def collect(self) -> dict:
        """The step's metrics, already reduced across ranks (empty when there are none)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class PluginBase:
    """Hooks that do nothing: a plug-in subclasses this and overrides what it needs."""

    name = "plugin"

    def bind(self, run) -> None:
        pass

    def begin_step(self, step: int) -> None:
        pass

    def observe_logits(self, logits: torch.Tensor) -> None:
        pass

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def collect(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Plugins:
    """The run's plug-ins, called in order; their states are one dict keyed by plug-in name."""

    def __init__(self, plugins: list[Plugin]):
        names = [_name(p) for p in plugins]
        if len(set(names)) != len(names):
            raise ValueError(f"plug-in names must be unique, got {names}")
        self.plugins = list(plugins)

    def bind(self, run) -> None:
        for p in self.plugins:
            if hasattr(p, "bind"):
                p.bind(run)

    def begin_step(self, step: int) -> None:
        for p in self.plugins:
            p.begin_step(step)

    def observe_logits(self, logits: torch.Tensor) -> None:
        for p in self.plugins:
            p.observe_logits(logits)

    def before_step(self) -> None:
        for p in self.plugins:
            p.before_step()

    def after_step(self) -> None:
        for p in self.plugins:
            p.after_step()

    def collect(self) -> dict:
        out: dict = {}
        for p in self.plugins:
            out |= p.collect()
        return out

    def state_dict(self) -> dict:
        return {_name(p): p.state_dict() for p in self.plugins}

    def load_state_dict(self, state: dict) -> None:
        for p in self.plugins:
            p.load_state_dict(state.get(_name(p), {}))


def _name(plugin: Plugin) -> str:
    return getattr(plugin, "name", type(plugin).__name__)
