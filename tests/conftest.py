"""Shared helpers: a tiny model, a small slice of the built-in corpus, runs through the real launcher."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
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


def pytest_collection_modifyitems(config, items):
    """Where both tiers run at once (``-m "slow or not slow"``), the long runs marked ``slow`` first:
    under ``pytest -n 2`` the short tests then fill both workers at the end instead of one long run
    finishing alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One dataset/tokenizer cache for the whole session, shared by pytest-xdist's workers (its
    builds are locked): the corpus is packed once."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    (root / "cache").mkdir(exist_ok=True)
    return root / "cache"


@pytest.fixture(scope="module")
def one_rank():
    """A process group of one rank for a module's in-process engines. The environment is left as it
    was but for LOCAL_RANK, which DeepSpeed's engines read (ZeRO-3 at every step), so runs launched
    later do not inherit this rank's port; the launcher sets LOCAL_RANK for its own ranks."""
    import deepspeed.comm as dist  # (here: most test modules never need DeepSpeed in-process)

    from dsinstab.run.distributed import init_distributed

    saved = dict(os.environ)
    os.environ["TORCH_EXTENSIONS_DIR"] = str(TORCH_EXTENSIONS)
    created = not dist.is_initialized()
    try:
        init_distributed(lambda msg: None)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    os.environ.setdefault("LOCAL_RANK", "0")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    yield
    if "LOCAL_RANK" not in saved:
        os.environ.pop("LOCAL_RANK", None)
    if created:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Under pytest-xdist each worker's processes get their share of the cores: torch's default of one
# thread per core in every process oversubscribes them (a test twice as slow ran 4x slower).
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))

# DeepSpeed's CPU comm op is JIT-built once per session here, apart from the user's own build cache.
# Set in the environment, so pytest-xdist's workers (started from this process) share the build.
_OWN_EXTENSIONS = "TORCH_EXTENSIONS_DIR" not in os.environ
if _OWN_EXTENSIONS:
    os.environ["TORCH_EXTENSIONS_DIR"] = tempfile.mkdtemp(prefix="dsinstab-ops-")
TORCH_EXTENSIONS = Path(os.environ["TORCH_EXTENSIONS_DIR"])


def pytest_sessionfinish(session, exitstatus):
    if _OWN_EXTENSIONS:
        shutil.rmtree(TORCH_EXTENSIONS, ignore_errors=True)


def env() -> dict:
    e = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    e["TORCH_EXTENSIONS_DIR"] = str(TORCH_EXTENSIONS)
    e.pop("WANDB_API_KEY", None)
    return e


_HUNG: list[str] = []  # the first command that outlived its timeout; later ones then fail at once


def run_cmd(
    cmd: list[str], timeout: int, env_: dict | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group and capture its output.

    On a timeout every Python process in the group prints its threads' stacks (scripts/train.py
    registers faulthandler on SIGUSR1) into the failure, then the whole group is killed: ranks
    that outlive their launcher would otherwise hold the pipes open and the test would never end.
    A hang is rarely alone, so after one, later commands fail at once instead of waiting too.
    """
    if _HUNG:
        pytest.fail(f"not started: an earlier command hung ({_HUNG[0]})")
    with spawn(cmd, env_, cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGUSR1)
            time.sleep(3)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            _HUNG.append(os.environ.get("PYTEST_CURRENT_TEST", " ".join(cmd)).split(" ")[0])
            pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-3000:]}\n{err[-12000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


@contextlib.contextmanager
def spawn(cmd: list[str], env_: dict | None = None, cwd: Path = ROOT, **popen):
    """A ``Popen`` in a new process group that is killed, ranks and all, when the block ends."""
    p = subprocess.Popen(cmd, cwd=cwd, env=env_ or env(), text=True, start_new_session=True, **popen)
    try:
        yield p
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        for pipe in (p.stdout, p.stderr):
            if pipe:
                pipe.close()


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


def launch_cmd(
    tmp_path: Path,
    cache_dir: Path,
    *overrides: str,
    ds: str = "zero2_bf16",
    ranks: int = 1,
    name: str = "run",
    extra: tuple = (),
    port: int | None = None,
) -> list[str]:
    """``deepspeed [--num_gpus N] scripts/train.py`` on the tiny model, writing under ``tmp_path/runs``."""
    ds_path = ds if ds.endswith(".json") else str(ROOT / "ds_configs" / f"{ds}.json")
    return [
        DEEPSPEED,
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(port or free_port()),
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
    """Run :func:`launch_cmd`; returns the process and the run directory."""
    cmd = launch_cmd(tmp_path, cache_dir, *overrides, ds=ds, ranks=ranks, name=name, extra=extra)
    return run_cmd(cmd, timeout), tmp_path / "runs" / name


def python_train(*args: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python scripts/train.py ...`` as one process (no launcher)."""
    return run_cmd([sys.executable, str(ROOT / "scripts" / "train.py"), *args], timeout, cwd=cwd)


def metrics(run_dir: Path) -> list[dict]:
    from dsinstab.run.tracking import read_jsonl

    return read_jsonl(run_dir / "metrics.jsonl")


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in metrics(run_dir) if "train/loss" in r]


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
