"""What a checkpoint carries besides DeepSpeed's own state, and putting it back.

DeepSpeed saves the model, the optimizer, the schedule and the loss scaler; this is the rest that
makes a resumed run continue exactly as the unbroken one: the step, the data position, the spike
monitor, every plug-in's state, the recent history that event records quote, and the RNG states.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from dsinstab.run.loop import Run

KEY = "dsinstab"  # our part of DeepSpeed's client state
EVENT_KEY = "dsinstab_event"  # the event record a spike checkpoint was saved for


def client_state(run: Run) -> dict:
    return {
        "step": run.step,
        "tokens_seen": run.tokens_seen,
        "batch_order": run.order.state_dict(),
        "monitor": run.monitor.state_dict(),
        "plugins": run.plugins.state_dict(),
        "history": list(run.history),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
    }


def restore(run: Run, client: dict) -> None:
    """Put back what :func:`client_state` saved (``client`` is what the checkpointer loaded)."""
    state = client[KEY]
    run.step, run.tokens_seen = state["step"], state["tokens_seen"]
    run.order.load_state_dict(state["batch_order"])
    run.monitor.load_state_dict(state["monitor"])
    run.plugins.load_state_dict(state.get("plugins", {}))
    run.history.clear()
    run.history.extend(state["history"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])


def save(run: Run, tag: str, event: dict | None = None) -> None:
    """Collective: a DeepSpeed checkpoint ``tag`` of the run as it is now."""
    state = {KEY: client_state(run)}
    if event is not None:
        state[EVENT_KEY] = event
    run.checkpointer.save(tag, state, run.step)
