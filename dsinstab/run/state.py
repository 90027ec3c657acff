"""What a checkpoint carries besides DeepSpeed's own state, and putting it back.

DeepSpeed saves the model, the optimizer, the schedule and the loss scaler; this is the rest that
makes a resumed run continue exactly as the unbroken one: the step, the data position, every
plug-in's state (the spike monitor's included), the action policy's counts, the recent history that
event records quote, the RNG states, and how many events the run had written (a resume keeps those
and forgets the rest, whatever their step: a rollback's events carry the spike's step, later than
the checkpoint that follows it).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsinstab.run.checkpoint import Checkpointer, on_rank_zero
from dsinstab.run.config import RunConfig
from dsinstab.run.data import BatchOrder, PackedData
from dsinstab.run.plugins import Plugins
from dsinstab.run.policy import ActionPolicy
from dsinstab.run.tracking import NullSink

HISTORY = 48  # logged values kept for the "before the event" part of an event record


@dataclass
class Run:
    """What the loop works with, built once by the train command; only the progress fields at the
    bottom change as it trains (and :func:`dsinstab.run.state.restore` sets them back)."""

    cfg: RunConfig
    engine: object  # deepspeed.DeepSpeedEngine
    model: torch.nn.Module
    data: PackedData
    order: BatchOrder
    checkpointer: Checkpointer
    plugins: Plugins  # detectors, probes, mitigations: per-step hooks whose state rides in the checkpoint
    run_dir: Path
    rank: int
    world: int
    sink: NullSink = field(default_factory=NullSink)  # metrics and events (a NullSink off rank 0)
    say: Callable[[str], None] = print
    policy: ActionPolicy | None = None  # what a firing does (trainer.spikes.action)
    # progress, all part of the checkpoint
    step: int = 0
    tokens_seen: int = 0
    history: deque = field(default_factory=lambda: deque(maxlen=HISTORY))
    stop_requested: bool = False

    def __post_init__(self):
        if self.policy is None:
            self.policy = ActionPolicy(self.cfg.trainer.spikes)


KEY = "dsinstab"  # our part of DeepSpeed's client state
EVENT_KEY = "dsinstab_event"  # the event record a spike checkpoint was saved for


def client_state(run: Run) -> dict:
    """Collective (the sink's count is rank 0's, where the real sink is: every rank saves the same)."""
    return {
        "sink": on_rank_zero(run.sink.state_dict),
        "step": run.step,
        "tokens_seen": run.tokens_seen,
        "batch_order": run.order.state_dict(),
        "policy": run.policy.state_dict(),
        "plugins": run.plugins.state_dict(),
        "history": list(run.history),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
    }


def restore(run: Run, client: dict) -> None:
    """Put back what :func:`client_state` saved (``client`` is what the checkpointer loaded)."""
    state = client[KEY]
    run.step, run.tokens_seen = state["step"], state["tokens_seen"]
    run.order.load_state_dict(state["batch_order"])
    plugins = legacy_plugin_states(state)
    state.setdefault("policy", state.get("monitor", {}).get("policy"))
    run.policy.load_state_dict(state["policy"])
    run.plugins.load_state_dict(plugins)
    run.history.clear()
    run.history.extend(state["history"])
    run.sink.load_state_dict(state.get("sink", {}))  # a resume's rewind keeps the events it counted
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])


def save(run: Run, tag: str, event: dict | None = None) -> None:
    """Collective: a DeepSpeed checkpoint ``tag`` of the run as it is now."""
    state = {KEY: client_state(run)}
    if event is not None:
        state[EVENT_KEY] = event
    run.checkpointer.save(tag, state, run.step)


def legacy_plugin_states(state: dict) -> dict:
    """The plug-in states of a checkpoint, those saved before each instrument was a plug-in of its
    own included: the spike monitor (``monitor``) and the one ``mitigations`` plug-in that held
    ZClip, skip-step and QK-clip go to the plug-ins that now hold them."""
    plugins = dict(state.get("plugins", {}))
    if "monitor" in state:
        plugins.setdefault("spikes", state["monitor"])
    old = plugins.pop("mitigations", None)
    if old is not None:
        for name in ("zclip", "skip_step"):
            if name in old:
                plugins.setdefault(name, old[name])
        plugins.setdefault("qk_clip", {"total": old.get("qk_total", 0)})
    return plugins
