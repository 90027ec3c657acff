"""Spike detection and actions in real runs: injected spikes, rollback, fp16 loss-scale collapse."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import assert_ok, ds_config, launch, run_cmd, train_rows
from dsinstab.run.tracking import read_jsonl

SPIKE = [
    "trainer.max_steps=40",
    "trainer.checkpoint_every=10",
    "trainer.inject.at_step=30",
    "trainer.spikes.window=20",
    "trainer.spikes.warmup=10",
]


def test_injected_spike_fires_once_saves_spike_checkpoint_that_resumes_and_converts(tmp_path, cache_dir):
    proc, run = launch(tmp_path, cache_dir, *SPIKE)
    assert_ok(proc)
    events = read_jsonl(run / "events.jsonl")
    assert len(events) == 1
    ev = events[0]
    assert ev["step"] == 31 and ev["kind"] == "loss_spike" and ev["action"] == "checkpoint"
    assert ev["value"] > ev["threshold"] > ev["baseline"]
    assert {"lr", "grad_norm", "loss_scale", "recent"} <= set(ev) and len(ev["recent"]) >= 24
    assert len(ev["batch_indices"]) == 1 and [len(b) for b in ev["batch_indices"][0]] == [4]  # [rank][micro]
    fired = [r["step"] for r in train_rows(run) if r["spike/fired"]]
    assert fired == [31]
    ckpts = run / "checkpoints"
    assert (ckpts / "spike-31" / "dsinstab.json").exists()
    assert json.loads((ckpts / "pinned.json").read_text()) == ["step-30"]  # the pre-spike state is kept
    assert (ckpts / "step-30").exists()
    client = torch.load(ckpts / "spike-31" / "mp_rank_00_model_states.pt", weights_only=False)
    assert client["dsinstab_event"]["step"] == 31

    # DeepSpeed's own converter turns the spike checkpoint into weights transformers loads
    assert_ok(
        run_cmd(
            [sys.executable, str(ckpts / "zero_to_fp32.py"), str(ckpts), str(run / "hf"), "-t", "spike-31"],
            300,
        )
    )
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run / "hf")
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()

    # and the run resumes from it
    proc, _ = launch(tmp_path, cache_dir, *SPIKE, "trainer.max_steps=34", extra=("--resume", "spike-31"))
    assert_ok(proc)
    assert "resumed from spike-31 at step 31" in proc.stdout
    assert [r["step"] for r in train_rows(run)][-3:] == [32, 33, 34]


def test_rollback_skips_the_stated_batches_and_finishes(tmp_path, cache_dir):
    proc, run = launch(
        tmp_path,
        cache_dir,
        *SPIKE,
        "trainer.spikes.action=rollback",
        "trainer.spikes.rollback_min_back=5",
        "trainer.spikes.rollback_skip=5",
    )
    assert_ok(proc)
    events = read_jsonl(run / "events.jsonl")
    assert [e["kind"] for e in events] == ["loss_spike", "rollback"]
    rb = events[1]
    # newest checkpoint at least 5 steps before step 31 is step-20; skip through 31 + 5
    assert rb["to_tag"] == "step-20" and rb["resumed_at"] == 20 and rb["skipped_micro_batches"] == 16
    rows = train_rows(run)
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert not any(r["spike/fired"] for r in rows)  # the fault was in the skipped batches
    assert all(r["train/loss"] < 7 for r in rows)
    spilled = read_jsonl(run / "metrics_rolled_back.jsonl")
    assert [r["step"] for r in spilled if "train/loss" in r] == list(range(21, 32))
    assert json.loads((run / "status.json").read_text())["state"] == "finished"


# ZeRO-0's fp16 optimizer clamps the scale at its minimum instead of raising, and would skip every
# step from there on at scale 1: dsinstab ends it at the same step, the same way, as ZeRO-2
@pytest.mark.parametrize("stage, ranks", [("zero2_fp16", 1), ("zero2_fp16", 2), ("zero0_fp16", 1)])
def test_fp16_run_at_the_minimum_loss_scale_ends_clearly(tmp_path, cache_dir, stage, ranks):
    ds = ds_config(tmp_path, stage, fp16={"initial_scale_power": 8, "hysteresis": 1, "min_loss_scale": 1})
    proc, run = launch(
        tmp_path,
        cache_dir,
        "trainer.max_steps=40",
        "trainer.checkpoint_every=5",
        "trainer.inject.at_step=10",
        "trainer.inject.factor=10000",
        "trainer.grad_clip=0",
        ds=ds,
        ranks=ranks,
        timeout=300,
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert (
        "the fp16 loss scale is at its minimum (1) and DeepSpeed cannot go on; saved spike-19" in proc.stdout
    )
    assert "Traceback" not in proc.stdout + proc.stderr
    events = read_jsonl(run / "events.jsonl")
    assert events[-1]["kind"] == "loss_scale_minimum" and events[-1]["step"] == 19
    kinds = {e["kind"] for e in events}
    assert {"nonfinite_loss", "loss_scale_floor"} <= kinds
    assert (run / "checkpoints" / "spike-19" / "dsinstab.json").exists()
    status = json.loads((run / "status.json").read_text())
    assert (status["state"], status["step"], status["exit_code"]) == ("min_loss_scale", 18, 3)
    scales = [r["train/loss_scale"] for r in train_rows(run)][10:]
    assert scales == [128.0, 64.0, 32.0, 16.0, 8.0, 4.0, 2.0, 1.0]


def test_a_diverging_run_stays_within_the_spike_checkpoint_cap(tmp_path, cache_dir):
    proc, run = launch(
        tmp_path,
        cache_dir,
        "trainer.max_steps=60",
        "trainer.checkpoint_every=0",
        "trainer.lr=0.5",
        "trainer.grad_clip=0",
        "trainer.spikes.warmup=3",
        "trainer.spikes.window=8",
        "trainer.spikes.loss_k=2",
        "trainer.spikes.grad_norm_k=2",
        "trainer.spikes.min_rel_jump=0.02",
        "trainer.spikes.cooldown=0",
        "trainer.spikes.max_checkpoints=2",
    )
    assert_ok(proc)
    events = read_jsonl(run / "events.jsonl")
    assert len(events) > 2
    assert [e["action"] for e in events][:2] == ["checkpoint", "checkpoint"]
    assert {e["action"] for e in events[2:]} == {"none"}
    assert len(list((run / "checkpoints").glob("spike-*"))) == 2
