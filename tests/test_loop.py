"""The loop's bookkeeping: what an event names, the schedule around a fault, the state a run leaves
when it fails, the signal handlers it gives back, and checkpoint tags after a rollback."""

from __future__ import annotations

import json
import re
import sys
import textwrap

import pytest
import torch

from conftest import ROOT, TINY, assert_ok, env, launch, run_cmd, train_rows
from dsinstab.run.data import BatchOrder
from dsinstab.run.tracking import read_jsonl


def test_an_event_names_every_micro_batch_on_every_rank_and_the_fault_keeps_the_schedule(tmp_path, cache_dir):
    at, warmup, lr = 12, 20, 3e-3
    proc, run = launch(
        tmp_path,
        cache_dir,
        "trainer.max_steps=14",
        "trainer.gradient_accumulation_steps=2",
        f"trainer.warmup_steps={warmup}",
        f"trainer.lr={lr}",
        f"trainer.inject.at_step={at}",
        "trainer.spikes.warmup=4",
        "trainer.checkpoint_every=0",
        ranks=2,
    )
    assert_ok(proc)
    ev = next(e for e in read_jsonl(run / "events.jsonl") if e["kind"] == "loss_spike")
    # batch_indices[rank][micro]: both ranks, both micro batches, exactly the blocks BatchOrder gave
    n_blocks = int(re.search(r"data: (\d+) train", proc.stdout).group(1))
    step, gas, micro = ev["step"], 2, 4
    for rank in range(2):
        order = BatchOrder(n_blocks, micro, 2, rank, 0)
        expected = [order.indices_at((step - 1) * gas + m).tolist() for m in range(gas)]
        assert ev["batch_indices"][rank] == expected
    # the step after the fault runs at the schedule's lr (warmup: lr * (step - 1) / warmup)
    lrs = {r["step"]: r["train/lr"] for r in train_rows(run)}
    for s in (at - 1, at + 1, at + 2):
        assert lrs[s] == pytest.approx(lr * (s - 1) / warmup, rel=1e-9), s


FAILING_RUN = """
import signal, sys
sys.path.insert(0, {root!r})
from dsinstab.commands import train as cli
from dsinstab.run import loop

calls = []
signal.signal(signal.SIGTERM, lambda *a: calls.append("mine"))
real_step = loop.train_step

def failing_step(run, step, ctx):
    if run.step == 2:
        raise RuntimeError("the disk went away")
    return real_step(run, step, ctx)

loop.train_step = failing_step
try:
    cli.main({argv!r})
except RuntimeError as e:
    print("raised:", e)
signal.raise_signal(signal.SIGTERM)
print("handler after training:", calls)
"""


def test_a_failed_run_says_so_and_gives_the_signal_handlers_back(tmp_path, cache_dir):
    out = tmp_path / "runs"
    argv = ["--set", *TINY, f"utils.output_dir={out}", f"utils.cache_dir={cache_dir}", "utils.run_name=f"]
    script = textwrap.dedent(FAILING_RUN).format(root=str(ROOT), argv=argv)
    proc = run_cmd([sys.executable, "-c", script], 300, env_=env())
    assert "raised: the disk went away" in proc.stdout, proc.stderr[-3000:]
    status = json.loads((out / "f" / "status.json").read_text())
    assert status["state"] == "failed" and status["step"] == 2
    assert status["message"] == "RuntimeError: the disk went away"
    assert "handler after training: ['mine']" in proc.stdout


def test_a_rollback_at_a_periodic_step_writes_no_tag_for_an_earlier_state(tmp_path, cache_dir):
    # the spike fires at step 20, a periodic step; the rollback reloads step-10
    proc, run = launch(
        tmp_path,
        cache_dir,
        "trainer.max_steps=24",
        "trainer.checkpoint_every=10",
        "trainer.keep_checkpoints=5",
        "trainer.inject.at_step=19",
        "trainer.spikes.warmup=8",
        "trainer.spikes.action=rollback",
        "trainer.spikes.rollback_min_back=5",
        "trainer.spikes.rollback_skip=2",
    )
    assert_ok(proc)
    rb = [e for e in read_jsonl(run / "events.jsonl") if e["kind"] == "rollback"]
    assert len(rb) == 1 and rb[0]["step"] == 20 and rb[0]["to_tag"] == "step-10"
    ckpts = run / "checkpoints"
    tags = sorted(p.name for p in ckpts.iterdir() if (p / "dsinstab.json").exists())
    assert tags == ["step-10", "step-20"]
    for tag in tags:  # every tag holds the state of the step it names
        client = torch.load(ckpts / tag / "mp_rank_00_model_states.pt", weights_only=False)
        assert client["dsinstab"]["step"] == json.loads((ckpts / tag / "dsinstab.json").read_text())["step"]
        assert client["dsinstab"]["step"] == int(tag.split("-")[1])
    assert (ckpts / "latest").read_text() == "step-20"
    # step-20 is the second step 20: position 10, then 12 micro batches skipped, then 10 steps
    client = torch.load(ckpts / "step-20" / "mp_rank_00_model_states.pt", weights_only=False)
    assert client["dsinstab"]["batch_order"]["position"] == 10 + 12 + 10
