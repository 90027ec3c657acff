"""Shared helpers: a tiny model, a small slice of the built-in corpus, runs through the real launcher."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")

# A 2-layer, 64-wide model on 400k characters of the standard library: a step takes milliseconds.
TINY = [
    "model.n_layer=2",
    "model.d_model=64",
    "model.n_head=2",
    "model.seq_len=64",
    "dataset.vocab_size=512",
    "dataset.max_chars=400000",
    "trainer.micro_batch_size=4",
    "trainer.warmup_steps=2",
    "trainer.max_steps=12",
    "trainer.eval_every=6",
    "trainer.eval_batches=2",
    "trainer.checkpoint_every=6",
    "trainer.spikes.warmup=5",
    "trainer.spikes.window=20",
    "utils.report_to=none",
    "utils.progress_bar=false",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One dataset/tokenizer cache for the whole session: the corpus is packed once."""
    return tmp_path_factory.mktemp("cache")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    e.pop("WANDB_API_KEY", None)
    return e


def ds_config(tmp_path: Path, base: str, **changes) -> str:
    """A copy of ``ds_configs/<base>.json`` with top-level blocks updated (e.g. fp16={...})."""
    cfg = json.loads((ROOT / "ds_configs" / f"{base}.json").read_text())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path = tmp_path / f"{base}-custom.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def launch(
    tmp_path: Path,
    cache_dir: Path,
    *overrides: str,
    ds: str = "zero2_bf16",
    ranks: int = 1,
    name: str = "run",
    extra: tuple = (),
    timeout: int = 600,
) -> tuple[subprocess.CompletedProcess, Path]:
    """``deepspeed [--num_gpus N] scripts/train.py`` on the tiny model; returns the process and run dir."""
    ds_path = ds if ds.endswith(".json") else str(ROOT / "ds_configs" / f"{ds}.json")
    cmd = [
        DEEPSPEED,
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(free_port()),
        str(ROOT / "scripts" / "train.py"),
        "--ds_config",
        ds_path,
        "--set",
        *TINY,
        f"utils.output_dir={tmp_path / 'runs'}",
        f"utils.cache_dir={cache_dir}",
        f"utils.run_name={name}",
        *overrides,
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    return proc, tmp_path / "runs" / name


def python_train(*args: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python scripts/train.py ...`` as one process (no launcher)."""
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), *args]
    return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def metrics(run_dir: Path) -> list[dict]:
    from dsinstab.tracking import read_jsonl

    return read_jsonl(run_dir / "metrics.jsonl")


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in metrics(run_dir) if "train/loss" in r]


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
