"""Two nodes simulated on this machine (two ``torchrun --nnodes 2`` launchers on 127.0.0.1, one rank
each) train, checkpoint and resume exactly like one node with two ranks, and a checkpoint write that
fails on one rank only stops both nodes cleanly instead of hanging them."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY, assert_ok, free_port, launch, launch_cmd, metrics, spawn
from dsinstab.run.checkpoint import MARKER

STEPS = ("trainer.max_steps=12", "trainer.checkpoint_every=4")  # TINY evaluates at 0, 6 and 12
KEYS = ("train/loss", "train/grad_norm", "train/lr", "eval/loss")


def _torchrun(cmd: list[str], node: int, port: int) -> list[str]:
    """The node's launcher for the run that ``cmd`` (a conftest.launch_cmd) starts on one node."""
    script = str(ROOT / "scripts" / "train.py")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        f"--node_rank={node}",
        "--nproc_per_node=1",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        *cmd[cmd.index(script) :],
    ]


@contextlib.contextmanager
def _two_nodes(tmp: Path, cache_dir: Path, name: str, *extra: str):
    """Both launchers of a two-node run, writing to one shared run directory; killed, ranks and
    all, when the block ends."""
    port = free_port()
    cmd = launch_cmd(tmp, cache_dir, *STEPS, ranks=2, name=name, extra=extra)
    logs = [tmp / f"{name}-{port}-node{n}.log" for n in (0, 1)]
    with contextlib.ExitStack() as stack:
        procs = [
            stack.enter_context(
                spawn(
                    _torchrun(cmd, node, port),
                    stdout=stack.enter_context(open(log, "w")),
                    stderr=subprocess.STDOUT,
                )
            )
            for node, log in enumerate(logs)
        ]
        try:
            yield procs, logs
        finally:
            _kill_nodes(procs)


def _kill_nodes(procs) -> None:
    """SIGKILL each node whole, as when a machine dies: torchrun starts its workers in sessions of
    their own, so killing a launcher's process group would leave its ranks running."""
    workers = [pid for p in procs for pid in _children(p.pid)]
    for pid in [*workers, *(p.pid for p in procs)]:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    for p in procs:
        p.wait()


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:  # the parent's pid
                out.append(int(stat.parent.name))
    return out


def _fail(why: str, procs, logs) -> None:
    for pid in [pid for p in procs for pid in _children(p.pid)]:
        with contextlib.suppress(ProcessLookupError):  # the ranks print where each thread waits
            os.kill(pid, signal.SIGUSR1)
    time.sleep(3)
    tails = "\n".join(f"--- {log.name}\n{log.read_text()[-6000:]}" for log in logs)
    pytest.fail(f"{why}\n{tails}")


def _wait(procs, logs, timeout: int = 600) -> list[int]:
    deadline = time.time() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            _fail(f"the two-node run hung for {timeout}s", procs, logs)
    return [p.returncode for p in procs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """One node with two ranks; two nodes killed once a checkpoint exists, then resumed, with
    rank 1's part of the last checkpoint made unwritable (a folder where its file goes)."""
    tmp = tmp_path_factory.mktemp("multinode")
    proc, one = launch(tmp, cache_dir, *STEPS, ranks=2, name="one-node")
    assert_ok(proc)

    two = tmp / "runs" / "two-nodes"
    with _two_nodes(tmp, cache_dir, "two-nodes") as (procs, logs):
        deadline = time.time() + 600
        while not (two / "checkpoints" / "step-4" / MARKER).exists():
            if any(p.poll() is not None for p in procs) or time.time() > deadline:
                _fail("a node ended, or hung, before a checkpoint was written", procs, logs)
            time.sleep(0.05)
        _kill_nodes(procs)
    killed = json.loads((two / "status.json").read_text())

    last = two / "checkpoints" / "step-12"
    shutil.rmtree(last, ignore_errors=True)
    shard = next(p.name for p in (one / "checkpoints" / "step-12").glob("*zero_pp_rank_1_*"))
    (last / shard).mkdir(parents=True)
    with _two_nodes(tmp, cache_dir, "two-nodes", "--resume", "latest") as (procs, logs):
        codes = _wait(procs, logs)
        outputs = [log.read_text() for log in logs]
    return one, two, killed, codes, outputs


@pytest.mark.slow
def test_two_nodes_train_and_resume_after_a_kill_exactly_like_one_node(runs):
    one, two, killed, _, outputs = runs
    assert killed["state"] == "running" and killed["step"] < 12  # both launchers died mid-run
    assert "2 rank(s)" in outputs[0] and "resumed from step-" in outputs[0]
    a, b = metrics(one), metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) == 12 + 3
    for x, y in zip(a, b):
        for k in KEYS:
            assert x.get(k) == y.get(k), (x["step"], k, x.get(k), y.get(k))


def test_a_checkpoint_write_failing_on_one_rank_stops_both_nodes_without_a_hang(runs):
    _, two, _, codes, outputs = runs
    assert codes == [1, 1]  # torchrun's code for a failed worker
    assert all("exitcode  : 5" in out for out in outputs), outputs[1][-3000:]  # the run's own code
    assert "checkpoint step-12 could not be written (Is a directory); step-8 is intact" in outputs[0]
    status = json.loads((two / "status.json").read_text())
    assert status["state"] == "checkpoint_failed" and status["exit_code"] == 5
    ckpts = two / "checkpoints"
    assert (ckpts / "latest").read_text() == "step-8" and (ckpts / "step-8" / MARKER).exists()
    assert not (ckpts / "step-12").exists()  # rank 0 removed the partial tag


@pytest.mark.parametrize("ds", ["zero1_bf16", "zero1_fp16", "zero2_bf16", "zero2_fp16", "zero2_fp32"])
def test_the_shipped_zero_1_and_2_configs_overlap_the_gradient_reduction_with_the_backward(ds, one_rank):
    """On a GPU the reduction of each gradient bucket runs on its own stream during the backward
    (on the CPU DeepSpeed's streams are no-ops: the numbers are those of overlap_comm off)."""
    from dsinstab.run.config import load_config
    from dsinstab.run.ds_config import read_ds_config, resolve_ds_config
    from dsinstab.run.engine import build_engine
    from dsinstab.run.model import build_model

    cfg = load_config(ROOT / "configs", TINY)
    path = ROOT / "ds_configs" / f"{ds}.json"
    cfg.ds_config, _ = resolve_ds_config(read_ds_config(path), path, cfg, 1)
    assert cfg.ds_config["zero_optimization"]["overlap_comm"] is True
    vocab = cfg.dataset.vocab_size
    engine = build_engine(
        build_model(cfg.model, vocab, vocab - 1, cfg.trainer.seed), cfg.trainer, cfg.ds_config
    )
    assert engine.zero_overlap_comm() and engine.optimizer.overlap_comm
