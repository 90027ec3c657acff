"""On a CUDA GPU, through the real launcher: the README's train command in fp16 and bf16, the
fp16-collapse pair, a spike checkpoint that resumes into the unbroken run, two GPUs under ZeRO-3.

Marked ``gpu`` and skipped where torch sees no CUDA device (CI); ``scripts/gpu_check.sh`` runs
them on a GPU machine. The CPU versions of these runs are in test_train.py, test_spike_runs.py
and test_reliability.py.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from conftest import DEEPSPEED, ROOT, assert_ok, free_port, launch, metrics, run_cmd, train_rows
from dsinstab.run.tracking import read_jsonl

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)"
    ),
]

QUIET = ["utils.report_to=none", "utils.progress_bar=false"]

# A run resumed from a checkpoint replays the unbroken run's steps. On a GPU some kernels add in
# an order that varies from run to run (atomics in the attention and embedding backward), so the
# replay is compared bit for bit where it can be and otherwise within this relative tolerance.
RESUME_RTOL = {"train/loss": 1e-3, "eval/loss": 1e-3, "train/grad_norm": 1e-2, "train/lr": 0.0}


def weights_device(run_dir) -> str:
    """Where the run's weights lived: DeepSpeed saves the module's tensors as they were."""
    ckpts = run_dir / "checkpoints"
    tag = (ckpts / "latest").read_text().strip()
    state = torch.load(ckpts / tag / "mp_rank_00_model_states.pt", weights_only=False)
    return next(iter(state["module"].values())).device.type


@pytest.mark.parametrize("ds", ["zero2_fp16", "zero2_bf16"])
def test_the_readme_train_command_trains_to_the_end_on_the_gpu(tmp_path, cache_dir, ds):
    # the README's `deepspeed scripts/train.py --ds_config ds_configs/zero2_fp16.json`, default model
    # and 400 steps; only where it writes and which port it takes are ours
    cmd = [
        DEEPSPEED,
        "--master_port",
        str(free_port()),
        "scripts/train.py",
        "--ds_config",
        f"ds_configs/{ds}.json",
    ]
    cmd += [
        "--set",
        f"utils.output_dir={tmp_path}",
        f"utils.cache_dir={cache_dir}",
        "utils.run_name=readme",
        *QUIET,
    ]
    proc = run_cmd(cmd, 600)
    assert_ok(proc)
    run = tmp_path / "readme"
    status = json.loads((run / "status.json").read_text())
    assert (status["state"], status["step"], status["exit_code"]) == ("finished", 400, 0)
    rows = train_rows(run)
    assert [r["step"] for r in rows] == list(range(1, 401))
    assert all(math.isfinite(r["train/loss"]) for r in rows)
    evals = [r["eval/loss"] for r in metrics(run) if "eval/loss" in r]
    assert evals[0] > 8 and evals[-1] < evals[0] - 2.5, evals  # the README: 8.35 -> 4.90 on a CPU
    if ds == "zero2_fp16":
        assert all(r["train/loss_scale"] >= 1 for r in rows)
        assert rows[-1]["train/skipped_steps"] < 20
    assert weights_device(run) == "cuda"


def test_the_fp16_collapse_pair_dies_in_fp16_and_trains_in_bf16_on_the_gpu(tmp_path, cache_dir):
    cmd = [sys.executable, str(ROOT / "scripts" / "fp16_vs_bf16.py"), "--preset", "fp16-collapse"]
    cmd += [
        "--set",
        f"utils.output_dir={tmp_path}",
        f"utils.cache_dir={cache_dir}",
        "utils.run_name=pair",
        *QUIET,
    ]
    proc = run_cmd(cmd, 600)
    assert_ok(proc)
    fp16 = json.loads((tmp_path / "pair-fp16" / "status.json").read_text())
    bf16 = json.loads((tmp_path / "pair-bf16" / "status.json").read_text())
    assert fp16["state"] == "min_loss_scale" and fp16["exit_code"] == 3 and fp16["step"] < 200, fp16
    assert "loss_scale_minimum" in {e["kind"] for e in read_jsonl(tmp_path / "pair-fp16" / "events.jsonl")}
    assert (bf16["state"], bf16["step"]) == ("finished", 200), bf16
    assert all(math.isfinite(r["train/loss"]) for r in train_rows(tmp_path / "pair-bf16"))
    assert (tmp_path / "pair-report" / "report.html").stat().st_size > 10_000
    assert weights_device(tmp_path / "pair-bf16") == "cuda"


def test_a_spike_checkpoint_resumes_into_the_unbroken_run_on_the_gpu(tmp_path, cache_dir):
    spike = [
        "trainer.max_steps=40",
        "trainer.checkpoint_every=10",
        "trainer.inject.at_step=30",
        "trainer.spikes.window=20",
        "trainer.spikes.warmup=10",
    ]
    proc, run = launch(tmp_path, cache_dir, *spike)
    assert_ok(proc)
    events = read_jsonl(run / "events.jsonl")
    assert [(e["step"], e["kind"], e["action"]) for e in events][:1] == [(31, "loss_spike", "checkpoint")]
    assert (run / "checkpoints" / "spike-31" / "dsinstab.json").exists()
    assert weights_device(run) == "cuda"
    unbroken = metrics(run)

    proc, _ = launch(tmp_path, cache_dir, *spike, extra=("--resume", "spike-31"))
    assert_ok(proc)
    assert "resumed from spike-31 at step 31" in proc.stdout
    resumed = metrics(run)
    assert [r["step"] for r in resumed] == [r["step"] for r in unbroken]
    worst = {}
    for a, b in zip(unbroken, resumed):
        for key, rtol in RESUME_RTOL.items():
            if key in a or key in b:
                assert key in a and key in b, (a["step"], key)
                assert b[key] == pytest.approx(a[key], rel=rtol, abs=0), (a["step"], key, a[key], b[key])
                worst[key] = max(worst.get(key, 0.0), abs(b[key] - a[key]) / max(abs(a[key]), 1e-12))
    same = all(v == 0 for v in worst.values())
    print(
        f"\nGPU resume from spike-31: {'bit-identical' if same else f'largest relative differences {worst}'}"
    )
    assert [(e["step"], e["kind"]) for e in read_jsonl(run / "events.jsonl")] == [
        (e["step"], e["kind"]) for e in events
    ]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpus_train_under_zero3(tmp_path, cache_dir):
    proc, run = launch(tmp_path, cache_dir, ds="zero3_bf16", ranks=2)
    assert_ok(proc)
    rows = train_rows(run)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert all(math.isfinite(r["train/loss"]) for r in rows)
    evals = [r["eval/loss"] for r in metrics(run) if "eval/loss" in r]
    assert evals[-1] < evals[0]
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    # ZeRO-3 partitions the weights: each rank saved its own shard
    tag = (run / "checkpoints" / "latest").read_text().strip()
    assert len(list((run / "checkpoints" / tag).glob("*optim_states.pt"))) == 2
