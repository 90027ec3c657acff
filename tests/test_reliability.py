"""Killed runs resume exactly, signals checkpoint, partial checkpoints are never `latest`,
a full disk fails cleanly, wandb trouble never stops training, secrets stay out of the run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (
    ROOT,
    TINY,
    TORCH_EXTENSIONS,
    assert_ok,
    env,
    free_port,
    launch,
    launch_cmd,
    metrics,
    python_train,
    run_cmd,
    spawn,
    train_rows,
)
from dsinstab.run.checkpoint import tag_step
from dsinstab.run.tracking import LocalSink, read_jsonl

KEYS = ("train/loss", "train/grad_norm", "train/lr", "train/loss_scale", "eval/loss", "spike/score_loss")
# an injected spike at step 18, after the kill: the resumed detectors must fire exactly there too
LONG = (
    "trainer.max_steps=20",
    "trainer.checkpoint_every=5",
    "trainer.eval_every=5",
    "trainer.inject.at_step=17",
)


def _wait_for_step(run_dir, step, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(r.get("step", 0) >= step for r in metrics(run_dir)):
            return
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.1)
    raise TimeoutError


# (fp32 has the least state of the three precisions: the loss scaler's rides in fp16's checkpoint)
@pytest.mark.parametrize(
    "ds, ranks", [("zero2_fp16", 1), pytest.param("zero3_bf16", 2, marks=pytest.mark.slow)]
)
def test_sigkill_then_resume_latest_equals_the_unbroken_run(tmp_path, cache_dir, ds, ranks):
    proc, full = launch(tmp_path, cache_dir, *LONG, ds=ds, ranks=ranks, name="full")
    assert_ok(proc)
    killed, port = tmp_path / "runs" / "killed", free_port()
    with spawn(
        launch_cmd(tmp_path, cache_dir, *LONG, ds=ds, ranks=ranks, name="killed", port=port),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    ) as p:
        _wait_for_step(killed, 8, p)  # the spike at 18 usually comes after the kill
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    # DeepSpeed's shared-memory segments (69 MB a rank) are not left in /dev/shm, even by a SIGKILL
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_*"))
    logged = [r["step"] for r in train_rows(killed)]
    assert logged == list(range(1, len(logged) + 1)) and len(logged) >= 8  # nothing logged was lost
    latest = (killed / "checkpoints" / "latest").read_text()
    shards = list((killed / "checkpoints" / latest).glob("*optim_states.pt"))
    assert len(shards) == ranks  # ZeRO partitions the optimizer state: one shard per rank
    proc, _ = launch(
        tmp_path, cache_dir, *LONG, ds=ds, ranks=ranks, name="killed", extra=("--resume", "latest")
    )
    assert_ok(proc)
    assert f"resumed from {latest} at step {tag_step(latest)}" in proc.stdout
    a, b = metrics(full), metrics(killed)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for k in KEYS:
            assert x.get(k) == y.get(k), (x["step"], k)
    events = [(e["step"], e["kind"]) for e in read_jsonl(full / "events.jsonl")]
    # the fault's update at step 17 wrecks the weights: step 18's loss spikes (in fp16 its gradients
    # overflow too, and the step is skipped, but its loss is real and fires all the same)
    spikes = [e for e in events if e[1] != "overflow"]  # fp16: each skipped step has its anatomy event
    assert spikes and spikes[0] == (18, "loss_spike")
    assert [(e["step"], e["kind"]) for e in read_jsonl(killed / "events.jsonl")] == events


def test_a_record_cut_short_by_a_kill_is_left_out_when_read_and_resumed(tmp_path):
    lines = [json.dumps({"step": s, "train/loss": 1.0}) for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(ln + "\n" for ln in lines) + lines[0][:17])
    (tmp_path / "events.jsonl").touch()
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    sink = LocalSink(tmp_path)  # what --resume does: forget what came after the checkpoint, log again
    sink.rewind(2, events=True)
    sink.log(3, {"train/loss": 2.0})
    sink.close()
    assert [(r["step"], r["train/loss"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == [
        (1, 1.0),
        (2, 1.0),
        (3, 2.0),
    ]
    (tmp_path / "torn.jsonl").write_text(lines[0][:17] + "\n" + lines[1] + "\n")
    with pytest.raises(json.JSONDecodeError):  # a broken line that is not the last is not a kill's
        read_jsonl(tmp_path / "torn.jsonl")


def test_a_resume_keeps_the_events_its_checkpoint_counted_whatever_their_step(tmp_path):
    sink = LocalSink(tmp_path)
    sink.event({"step": 12, "kind": "loss_spike"})
    sink.event({"step": 31, "kind": "loss_spike"})  # a rollback from step 31 to step-20
    sink.event({"step": 31, "kind": "rollback"})
    saved = sink.state_dict()  # the rolled-back run's checkpoint at step 30
    sink.event({"step": 34, "kind": "loss_spike"})
    sink.close()
    assert saved == {"events": 3}
    resumed = LocalSink(tmp_path)  # --resume from that checkpoint
    assert resumed.state_dict() == {"events": 4}
    resumed.load_state_dict(saved)
    resumed.rewind(30, events=True)
    assert [(e["step"], e["kind"]) for e in read_jsonl(tmp_path / "events.jsonl")] == [
        (12, "loss_spike"),
        (31, "loss_spike"),
        (31, "rollback"),
    ]
    resumed.event({"step": 35, "kind": "overflow"})
    assert resumed.state_dict() == {"events": 4}
    resumed.close()
    # a checkpoint from before the count was kept: the events past its step go, as they always did
    old = LocalSink(tmp_path)
    old.load_state_dict({})
    old.rewind(30, events=True)
    old.close()
    assert [e["step"] for e in read_jsonl(tmp_path / "events.jsonl")] == [12]


def test_a_build_lock_left_by_a_killed_process_never_stops_a_run(tmp_path, cache_dir):
    """torch's JIT build lock outlives a SIGKILL of its holder, and torch would wait on it forever."""
    ext = tmp_path / "ext"  # TORCH_EXTENSIONS_DIR: a copy of the op built by earlier runs, if any
    built = TORCH_EXTENSIONS / "deepspeed_shm_comm"
    if built.is_dir():
        shutil.copytree(built, ext / built.name)
    else:
        (ext / built.name).mkdir(parents=True)
    lock = ext / built.name / "lock"
    lock.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        str(ROOT / "scripts/train.py"),
        "--set",
        *TINY,
        "trainer.max_steps=2",
        f"utils.output_dir={tmp_path / 'runs'}",
        f"utils.cache_dir={cache_dir}",
    ]
    e = dict(env(), TORCH_EXTENSIONS_DIR=str(ext))

    # a fresh lock is another process's build in progress: the run waits for it to go
    lock.touch()
    log = tmp_path / "fresh.log"
    with open(log, "w") as f, spawn([*cmd, "utils.run_name=fresh"], e, stdout=f, stderr=f) as p:
        waiting = f"waiting for another process to finish building deepspeed_shm_comm ({lock})"
        deadline = time.time() + 120
        while waiting not in log.read_text() and time.time() < deadline:
            assert p.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(2)
        assert p.poll() is None and waiting in log.read_text()
        lock.unlink()
        assert p.wait(timeout=240) == 0, log.read_text()[-3000:]

    # one older than any build was left by a killed process: it is removed, and the run goes on
    lock.touch()
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    proc = run_cmd([*cmd, "utils.run_name=stale"], 240, env_=e)
    assert_ok(proc)
    assert f"removing {lock}: a build lock 60 min old, left by a killed process" in proc.stderr
    assert not lock.exists()


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, cache_dir):
    out = tmp_path / "runs"
    cmd = [
        sys.executable,
        str(ROOT / "scripts/train.py"),
        "--set",
        *TINY,
        "trainer.max_steps=400",
        "trainer.checkpoint_every=0",
        f"utils.output_dir={out}",
        f"utils.cache_dir={cache_dir}",
        "utils.run_name=t",
    ]
    with spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as p:
        _wait_for_step(out / "t", 5, p)
        p.send_signal(signal.SIGTERM)
        stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr[-2000:]
    status = json.loads((out / "t" / "status.json").read_text())
    assert (
        status["state"] == "interrupted"
        and (out / "t/checkpoints/latest").read_text() == f"step-{status['step']}"
    )
    assert f"interrupted: saved step-{status['step']}; continue with --resume latest" in stdout
    proc = python_train(
        "--set",
        *TINY,
        "trainer.max_steps=" + str(status["step"] + 2),
        "trainer.checkpoint_every=0",
        f"utils.output_dir={out}",
        f"utils.cache_dir={cache_dir}",
        "utils.run_name=t",
        "--resume",
        "latest",
    )
    assert_ok(proc)
    assert train_rows(out / "t")[-1]["step"] == status["step"] + 2


def test_a_partial_checkpoint_is_never_resumed_and_is_cleaned_up(tmp_path, cache_dir):
    proc, run = launch(tmp_path, cache_dir, "trainer.max_steps=12")
    assert_ok(proc)
    ckpts = run / "checkpoints"
    # what a kill in the middle of writing step-18 leaves: some files, no completion marker
    partial = ckpts / "step-18"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"\x00" * 100)
    (ckpts / "latest").write_text("step-18")  # even a latest that names it is not trusted
    proc, _ = launch(tmp_path, cache_dir, "trainer.max_steps=14", extra=("--resume", "latest"))
    assert_ok(proc)
    assert "resumed from step-12 at step 12" in proc.stdout


def _tmpfs(path, size):
    path.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    ).returncode:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")


def test_a_full_disk_during_a_checkpoint_fails_clearly_and_keeps_the_previous_one(tmp_path, cache_dir):
    disk = tmp_path / "disk"
    _tmpfs(disk, "3m")
    try:
        proc, run = launch(
            disk,
            cache_dir,
            "trainer.max_steps=30",
            "trainer.checkpoint_every=6",
            "trainer.keep_checkpoints=5",
        )
        assert proc.returncode == 5, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "could not be written (No space left on device)" in proc.stdout
        assert "Traceback" not in proc.stdout + proc.stderr
        latest = (run / "checkpoints" / "latest").read_text()
        assert (run / "checkpoints" / latest / "dsinstab.json").exists()
        tags = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
        assert all((run / "checkpoints" / t / "dsinstab.json").exists() for t in tags)  # no partial tag left
        assert json.loads((run / "status.json").read_text())["state"] == "checkpoint_failed"
    finally:
        subprocess.run(["umount", str(disk)])


def test_unreachable_wandb_falls_back_to_offline_and_keeps_secrets_out(tmp_path, cache_dir):
    secret = "0123456789abcdef0123456789abcdef01234567"
    e = dict(
        env(),
        WANDB_MODE="online",
        WANDB_API_KEY=secret,
        WANDB_BASE_URL=f"http://127.0.0.1:{free_port()}",
        WANDB_INIT_TIMEOUT="20",
    )
    cmd = [
        sys.executable,
        str(ROOT / "scripts/train.py"),
        "--set",
        *TINY,
        "utils.report_to=wandb",
        "trainer.max_steps=4",
        f"utils.output_dir={tmp_path}",
        f"utils.cache_dir={cache_dir}",
        "utils.run_name=w",
    ]
    start = time.time()
    proc = run_cmd(cmd, 240, env_=e)
    assert_ok(proc)
    assert time.time() - start < 200
    assert "logging offline instead" in proc.stderr
    assert [r["step"] for r in train_rows(tmp_path / "w")] == [1, 2, 3, 4]
    for path in (tmp_path / "w").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
