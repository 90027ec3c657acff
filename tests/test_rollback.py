"""Rollback by data position: what a second rollback to the same checkpoint skips; a run killed after a
rollback resumes from the state it rolled back to, with the rollback's events."""

from __future__ import annotations

import sys
import textwrap
from collections import deque
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, TINY, assert_ok, env, metrics, run_cmd
from dsinstab.run import actions as loop  # rollback is one of the actions the loop takes
from dsinstab.run.config import SpikesConfig
from dsinstab.run.data import BatchOrder
from dsinstab.run.plugins import Plugins
from dsinstab.run.policy import ActionPolicy
from dsinstab.run.tracking import NullSink, read_jsonl


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

    def point_latest(self, tag):
        pass


class Events(NullSink):
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


# ---------------------------------------------------------------------------------------------
# A kill after a rollback (real runs): tests/test_spike_runs.py's rollback run, a spike injected at
# step 30 that fires at 31 and rolls back to step-20, killed at once after the rollback or after the
# first checkpoint that follows it, then resumed from latest.

KILLED_AFTER = """
import os, sys
sys.path.insert(0, {root!r})
from dsinstab.commands import train as cli
from dsinstab.run import actions, loop

real_rollback, real_save = actions.rollback, loop.save

def rollback_then_die(run, step, record):
    real_rollback(run, step, record)
    if {when!r} == "rollback":
        os._exit(9)

def save_then_die(run, tag, event=None):
    real_save(run, tag, event)
    if {when!r} == "save" and run.policy.rollbacks:
        os._exit(9)

actions.rollback, loop.save = rollback_then_die, save_then_die
code = cli.main({argv!r})
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)  # as scripts/train.py leaves
"""
ROLLBACK_RUN = (
    "trainer.max_steps=40",
    "trainer.checkpoint_every=10",
    "trainer.keep_checkpoints=5",
    "trainer.inject.at_step=30",
    "trainer.spikes.window=20",
    "trainer.spikes.warmup=10",
    "trainer.spikes.action=rollback",
    "trainer.spikes.rollback_min_back=5",
    "trainer.spikes.rollback_skip=5",
)
KEYS = ("train/loss", "train/grad_norm", "train/lr", "eval/loss", "spike/score_loss")


def _train(out: Path, cache_dir: Path, name: str, when: str = "never", resume: bool = False):
    argv = ["--set", *TINY, *ROLLBACK_RUN, f"utils.output_dir={out}", f"utils.cache_dir={cache_dir}"]
    argv += [f"utils.run_name={name}", *(["--resume", "latest"] if resume else [])]
    script = textwrap.dedent(KILLED_AFTER).format(root=str(ROOT), argv=argv, when=when)
    return run_cmd([sys.executable, "-c", script], 400, env_=env())


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory, cache_dir) -> Path:
    out = tmp_path_factory.mktemp("unbroken")
    assert_ok(_train(out, cache_dir, "unbroken"))
    return out / "unbroken"


def _assert_same_run(run: Path, unbroken: Path) -> None:
    a, b = metrics(unbroken), metrics(run)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for k in KEYS:
            assert x.get(k) == y.get(k), (x["step"], k)
    events = [(e["step"], e["kind"]) for e in read_jsonl(unbroken / "events.jsonl")]
    assert events == [(31, "loss_spike"), (31, "rollback")]
    assert [(e["step"], e["kind"]) for e in read_jsonl(run / "events.jsonl")] == events


def test_a_run_killed_right_after_a_rollback_resumes_from_the_state_it_rolled_back_to(
    tmp_path, cache_dir, unbroken
):
    proc = _train(tmp_path, cache_dir, "k", when="rollback")
    assert proc.returncode == 9, proc.stderr[-3000:]
    ckpts = tmp_path / "k" / "checkpoints"
    assert (ckpts / "step-30" / "dsinstab.json").exists()  # the abandoned timeline's, still complete
    assert (ckpts / "latest").read_text() == "step-20"  # but latest names what the run is again
    proc = _train(tmp_path, cache_dir, "k", resume=True)
    assert_ok(proc)
    assert "resumed from step-20 at step 20" in proc.stdout
    _assert_same_run(tmp_path / "k", unbroken)


def test_a_resume_from_a_checkpoint_after_a_rollback_keeps_the_rollbacks_events(
    tmp_path, cache_dir, unbroken
):
    # killed once the rolled-back run has saved step-30 again: the spike's and the rollback's events
    # (at step 31) were written before that checkpoint, and the resume must keep them
    proc = _train(tmp_path, cache_dir, "k", when="save")
    assert proc.returncode == 9, proc.stderr[-3000:]
    assert (tmp_path / "k" / "checkpoints" / "latest").read_text() == "step-30"
    proc = _train(tmp_path, cache_dir, "k", resume=True)
    assert_ok(proc)
    assert "resumed from step-30 at step 30" in proc.stdout
    _assert_same_run(tmp_path / "k", unbroken)
    client = torch.load(tmp_path / "k/checkpoints/step-30/mp_rank_00_model_states.pt", weights_only=False)
    assert client["dsinstab"]["sink"] == {"events": 2}  # the two events at step 31 came before it
