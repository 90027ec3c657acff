"""Runs of ``scripts/train.py`` in child processes: the time to the first step (cold and warm
cache) and the scaling runs under DeepSpeed's launcher."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.basics import DEEPSPEED, NEVER, ROOT
from dsinstab.run.distributed import free_port


def child_env() -> dict:
    """This process is rank 0 of its own one-rank group; a child must not inherit that."""
    drop = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def run_train(launcher: list[str], out: Path, name: str, *args: str) -> tuple[list[dict], dict]:
    """``scripts/train.py`` under ``launcher``, quietly; its logged training rows and status."""
    from dsinstab.run.tracking import read_jsonl

    cmd = [
        *launcher,
        str(ROOT / "scripts/train.py"),
        *args,
        "utils.report_to=none",
        "utils.progress_bar=false",
        f"utils.output_dir={out}",
        f"utils.run_name={name}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=child_env())
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    rows = [r for r in read_jsonl(out / name / "metrics.jsonl") if "train/loss" in r]
    return rows, json.loads((out / name / "status.json").read_text())


def first_step_seconds(cache: Path, out: Path, name: str, overrides: list[str]) -> float:
    start = time.time()
    rows, _ = run_train(
        [sys.executable], out, name, "--set", *overrides, "trainer.max_steps=1", f"utils.cache_dir={cache}"
    )
    return rows[0]["time"] - start


def scaling_run(ds: Path, ranks: int, steps: int, out: Path, overrides: list[str]) -> tuple[float, float]:
    rows, status = run_train(
        [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port())],
        out,
        f"scale-{ds.stem}-{ranks}",
        "--ds_config",
        str(ds),
        "--set",
        *overrides,
        f"trainer.max_steps={steps}",
        f"trainer.eval_every={NEVER}",
        "trainer.checkpoint_every=0",
        f"utils.cache_dir={out / 'cache'}",
    )
    timed = rows[3:] or rows[-1:]
    return statistics.median(r["train/tokens_per_s"] for r in timed), status["peak_rss_mb"]
