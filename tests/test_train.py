"""End-to-end runs of the real entry point through the DeepSpeed launcher, on a tiny model."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
import yaml
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from conftest import ROOT, assert_ok, ds_config, launch, metrics, train_rows

KEYS = {
    "train/loss",
    "train/lr",
    "train/grad_norm",
    "train/overflow",
    "train/skipped_steps",
    "train/tokens_per_s",
}


def test_bf16_run_logs_trains_checkpoints_and_writes_wandb_offline(tmp_path, cache_dir):
    proc, run = launch(
        tmp_path, cache_dir, "utils.report_to=wandb", "trainer.max_steps=24", "trainer.eval_every=12"
    )
    assert_ok(proc)
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # valid JSON, every line
    rows = train_rows(run)
    assert [r["step"] for r in rows] == list(range(1, 25))
    assert all(KEYS <= set(r) for r in rows)
    assert all("train/loss_scale" not in r for r in rows)  # bf16 has no loss scale: absent, not zero
    evals = [r["eval/loss"] for r in metrics(run) if "eval/loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0] - 0.5
    assert yaml.safe_load((run / "config.yaml").read_text())["ds_config"]["bf16"]["enabled"] is True
    assert (run / "checkpoints" / "latest").read_text() == "step-24"
    tags = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert tags == ["step-18", "step-24"]  # every 6 steps, the last trainer.keep_checkpoints=2 kept
    assert (run / "checkpoints" / "step-18" / "dsinstab.json").exists()
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert "reusing cached dataset" in proc.stdout or "tokenizing and packing" in proc.stdout


def test_fp16_run_logs_the_loss_scale(tmp_path, cache_dir):
    proc, run = launch(tmp_path, cache_dir, ds="zero2_fp16")
    assert_ok(proc)
    rows = train_rows(run)
    assert all(r["train/loss_scale"] > 0 and "train/hysteresis" in r for r in rows)
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]


def test_forced_fp16_overflow_halves_the_scale_and_skips_steps(tmp_path, cache_dir):
    ds = ds_config(tmp_path, "zero2_fp16", fp16={"initial_scale_power": 32, "hysteresis": 1})
    proc, run = launch(tmp_path, cache_dir, "trainer.max_steps=8", "trainer.checkpoint_every=0", ds=ds)
    assert_ok(proc)
    rows = train_rows(run)
    first = rows[:4]
    assert all(r["train/overflow"] == 1 for r in first)
    assert [r["train/skipped_steps"] for r in first] == [1, 2, 3, 4]
    scales = [r["train/loss_scale"] for r in first]
    assert all(b == a / 2 for a, b in zip(scales, scales[1:]))
    assert all(r["train/grad_norm"] == math.inf for r in first)  # written as "inf": still valid JSON
    assert '"train/grad_norm": "inf"' in (run / "metrics.jsonl").read_text()
    assert all(r["train/lr"] == 0.0 for r in first)  # skipped steps do not advance the schedule


def test_two_ranks(tmp_path, cache_dir):
    """(Two ranks under ZeRO-3 in bf16: tests/test_reliability.py's kill-and-resume run.)"""
    proc, run = launch(
        tmp_path, cache_dir, "trainer.max_steps=6", "trainer.checkpoint_every=3", ds="zero2_fp16", ranks=2
    )
    assert_ok(proc)
    assert "2 rank(s)" in proc.stdout
    rows = train_rows(run)
    assert len(rows) == 6 and all(math.isfinite(r["train/loss"]) for r in rows)
    shards = sorted(p.name for p in (run / "checkpoints" / "step-6").glob("*optim_states.pt"))
    assert len(shards) == 2  # one optimizer shard per rank: ZeRO partitioned the state


def _same_trajectory(
    a, b, keys=("train/loss", "train/grad_norm", "train/lr", "train/loss_scale", "eval/loss")
):
    ra, rb = metrics(a), metrics(b)
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb):
        assert x["step"] == y["step"]
        for k in keys:
            assert x.get(k) == y.get(k), (x["step"], k, x.get(k), y.get(k))


@pytest.mark.parametrize("ds", ["zero1_fp16"])  # ZeRO-2 fp16, 2-rank ZeRO-3 bf16: tests/test_reliability.py
def test_resume_continues_exactly_as_the_unbroken_run(tmp_path, cache_dir, ds):
    proc, full = launch(tmp_path, cache_dir, ds=ds, name="full")
    assert_ok(proc)
    resumed = full.with_name("resumed")
    shutil.copytree(full, resumed)
    proc, _ = launch(tmp_path, cache_dir, ds=ds, name="resumed", extra=("--resume", "step-6"))
    assert_ok(proc)
    assert "resumed from step-6 at step 6" in proc.stdout
    _same_trajectory(full, resumed)


def test_resume_latest_extends_a_finished_run(tmp_path, cache_dir):
    """(Its refusals, an existing run without --resume and --resume of nothing, are the same code
    in a dry run: tests/test_cli.py.)"""
    proc, run = launch(tmp_path, cache_dir, "trainer.max_steps=6", "trainer.checkpoint_every=3")
    assert_ok(proc)
    proc, _ = launch(
        tmp_path,
        cache_dir,
        "trainer.max_steps=9",
        "trainer.checkpoint_every=3",
        "trainer.lr=0.0015",  # half the first segment's: --set wins over what the checkpoint holds
        extra=("--resume", "latest"),
    )
    assert_ok(proc)
    assert "resumed from step-6 at step 6" in proc.stdout
    assert "optimizer settings changed on resume: lr" in proc.stdout
    rows = train_rows(run)
    assert [r["step"] for r in rows] == list(range(1, 10))
    # the lr logged at step s is the schedule's factor after s - 1 steps times the peak lr
    sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0015)
    schedule = get_cosine_with_min_lr_schedule_with_warmup(sgd, 2, 9, min_lr_rate=0.1)
    expected = []
    for _ in range(9):
        expected.append(schedule.get_last_lr()[0])
        sgd.step()
        schedule.step()
    assert [r["train/lr"] for r in rows[6:]] == pytest.approx(expected[6:], rel=1e-6)


def test_reference_losses(tmp_path, cache_dir):
    """A seeded tiny fp32 run's first losses are committed; a change in numerics shows here."""
    ref = json.loads((ROOT / "tests" / "reference_losses.json").read_text())
    ds = ds_config(tmp_path, "zero2_fp32", zero_optimization={"stage": 0})  # a bare torch optimizer
    proc, run = launch(tmp_path, cache_dir, "trainer.max_steps=8", "trainer.checkpoint_every=0", ds=ds)
    assert_ok(proc)
    losses = [r["train/loss"] for r in train_rows(run)]
    if os.environ.get("DSINSTAB_UPDATE_REFERENCE") == "1":  # after a deliberate change to data or numerics
        ref["zero0_fp32"] = losses
        (ROOT / "tests" / "reference_losses.json").write_text(json.dumps(ref, indent=1) + "\n")
    assert losses == pytest.approx(ref["zero0_fp32"], rel=2e-3)
