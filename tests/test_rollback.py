"""Rollback by data position: what a second rollback to the same checkpoint skips."""

from __future__ import annotations

from collections import deque
from pathlib import Path
from types import SimpleNamespace

from dsinstab.run import actions as loop  # rollback is one of the actions the loop takes
from dsinstab.run.config import SpikesConfig
from dsinstab.run.data import BatchOrder
from dsinstab.run.plugins import Plugins
from dsinstab.run.policy import ActionPolicy


class Checkpoints:
    """step-200 only, as DeepSpeed's load would hand back its client state."""

    def __init__(self, policy):
        self.state = {
            "step": 200,
            "tokens_seen": 0,
            "batch_order": {"position": 200},
            "policy": policy.state_dict(),
            "plugins": {},
            "history": [],
            "rng": {"torch": None, "python": None},
        }

    def newest_before(self, step):
        return "step-200" if step >= 200 else None

    def load(self, tag):
        return {"dsinstab": dict(self.state)}


class Events:
    def __init__(self):
        self.records = []

    def rewind(self, *args, **kwargs):
        pass

    def event(self, record):
        self.records.append(record)


def test_a_second_rollback_to_the_same_checkpoint_never_reads_the_first_spikes_batches(monkeypatch):
    spikes = SpikesConfig(rollback_min_back=10, rollback_skip=5)
    policy = ActionPolicy(spikes)
    cfg = SimpleNamespace(trainer=SimpleNamespace(spikes=spikes, gradient_accumulation_steps=1))
    # the RNG state is not this test's concern
    monkeypatch.setattr("dsinstab.run.state.torch.set_rng_state", lambda s: None)
    monkeypatch.setattr("dsinstab.run.state.random.setstate", lambda s: None)
    run = SimpleNamespace(
        cfg=cfg,
        checkpointer=Checkpoints(policy),
        policy=policy,
        sink=Events(),
        plugins=Plugins([]),
        order=BatchOrder(10**6, 1, 1, 0, 0),
        run_dir=Path("."),
        say=lambda m: None,
        step=305,
        tokens_seen=0,
        history=deque(),
    )
    run.order.position = 305  # a spike at step 305 read the unbroken run's position 305
    loop.rollback(run, 305, {"kind": "loss_spike"})
    assert (run.step, run.order.position) == (200, 310)  # 201 reads what 311 would have
    run.order.position += 90  # the new timeline trains to step 290 and spikes again
    loop.rollback(run, 290, {"kind": "loss_spike"})
    # back at step-200 again: the data goes on past everything read so far, never back to 305
    assert (run.step, run.order.position) == (200, 405)
    assert [e["skipped_micro_batches"] for e in run.sink.records] == [110, 205]
