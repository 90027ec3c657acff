"""The loop's bookkeeping: what an event names, the schedule around a fault, the state a run leaves
when it fails, the signal handlers it gives back, and checkpoint tags after a rollback."""

from __future__ import annotations

import json
import re
import sys
import textwrap

import pytest
import torch

from conftest import ROOT, TINY, assert_ok, env, launch, launch_cmd, run_cmd, spawn, train_rows
from dsinstab.run.data import BatchOrder
from dsinstab.run.loop import ProgressLines
from dsinstab.run.status import outcome, read_status
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

def failing_step(run, step, ctx, batches=None):
    if run.step == 2:
        raise RuntimeError("the disk went away")
    return real_step(run, step, ctx, batches)

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


RANK_FAILS = """
import sys
sys.path.insert(0, {root!r})
from dsinstab.commands import train as cli
from dsinstab.run import loop

real_step = loop.train_step

def failing_step(run, step, ctx, batches=None):
    if run.rank == 1 and run.step == 2:
        raise RuntimeError("the disk of rank 1 went away")
    return real_step(run, step, ctx, batches)

loop.train_step = failing_step
cli.main()
"""


def test_a_rank_that_fails_alone_leaves_a_status_that_says_so(tmp_path, cache_dir):
    # rank 1 fails at step 3; rank 0 waits for it in the step's collectives until the launcher kills it
    script = tmp_path / "rank_fails.py"
    script.write_text(textwrap.dedent(RANK_FAILS).format(root=str(ROOT)))
    cmd = launch_cmd(tmp_path, cache_dir, ranks=2, name="r")
    cmd[cmd.index(str(ROOT / "scripts" / "train.py"))] = str(script)
    proc = run_cmd(cmd, 300)
    assert proc.returncode != 0
    assert "the disk of rank 1 went away" in proc.stderr, proc.stderr[-3000:]
    status = read_status(tmp_path / "runs" / "r")
    assert (status["state"], status.get("rank"), status["step"]) == ("failed", 1, 2), status
    assert status["message"] == "rank 1: RuntimeError: the disk of rank 1 went away"
    assert outcome(status) is None  # a sweep runs the point again


def test_without_a_terminal_progress_is_plain_lines_even_when_the_run_ends_early(tmp_path, cache_dir):
    # stderr to a file, as in a sweep's log or CI; a detector stops the run before its last step
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "train.py"),
        "--set",
        *TINY,
        "utils.progress_bar=true",
        "trainer.inject.at_step=8",
        "trainer.spikes.action=stop",
        f"utils.output_dir={tmp_path / 'runs'}",
        f"utils.cache_dir={cache_dir}",
        "utils.run_name=p",
    ]
    log = tmp_path / "stderr.log"
    with open(log, "w") as f, spawn(cmd, stdout=f, stderr=f) as p:
        assert p.wait(timeout=300) == 4, log.read_text()[-3000:]
    raw, end = log.read_bytes(), read_status(tmp_path / "runs" / "p")["step"]
    text = raw.decode()
    assert end < 12 and "stopped by a detector" in text
    assert b"\r" not in raw  # no tqdm frames (read as bytes: text mode reads a \r as a newline)
    # the bar's stand-in closed on the early return with a line for the step the run ended at
    line = rf"^step {end}/12 \({100 * end // 12}%\)  [0-9.e+]+ steps/s  loss=[0-9.]+$"
    assert re.search(line, text, re.M), text[-3000:]


def test_progress_lines_come_every_interval_and_once_at_the_end():
    now, out = [0.0], []

    class Lines:
        def write(self, s):
            out.append(s)

        def flush(self):
            pass

    bar = ProgressLines(100, 10, every=30, file=Lines(), clock=lambda: now[0])
    for _ in range(20):  # 20 steps of 4 s: a line at 32 s and at 64 s, none between
        now[0] += 4
        bar.set_postfix(loss="1.000")
        bar.update(1)
    lines = "".join(out).splitlines()
    assert lines == [
        "step 18/100 (18%)  0.25 steps/s  loss=1.000",
        "step 26/100 (26%)  0.25 steps/s  loss=1.000",
    ]
    bar.close()
    bar.close()  # closing twice writes nothing more
    assert "".join(out).splitlines()[2:] == ["step 30/100 (30%)  0.25 steps/s  loss=1.000"]


# Logging made slow (LOG_S a logged step) and evaluation slower (EVAL_S); steps take milliseconds.
SLOW_LOGS = """
import sys, time
sys.path.insert(0, {root!r})
from dsinstab.commands import train as cli
from dsinstab.run import loop, tracking

log, log_eval = tracking.LocalSink.log, loop.log_eval

def slow_log(self, step, metrics):
    time.sleep(LOG_S)
    log(self, step, metrics)

def slow_eval(run, ctx):
    time.sleep(EVAL_S)
    log_eval(run, ctx)

LOG_S, EVAL_S = {log_s}, {eval_s}
tracking.LocalSink.log, loop.log_eval = slow_log, slow_eval
sys.exit(cli.main({argv!r}))
"""


def test_tokens_per_s_counts_all_of_each_step_but_evaluation(tmp_path, cache_dir):
    log_s, eval_s, tokens = 0.2, 2.0, 4 * 64  # micro batch x seq_len of conftest.TINY, one rank
    out = tmp_path / "runs"
    sets = [
        *TINY,
        "trainer.max_steps=5",
        "trainer.log_every=1",
        "trainer.eval_every=2",
        "trainer.checkpoint_every=0",
    ]
    argv = ["--set", *sets, f"utils.output_dir={out}", f"utils.cache_dir={cache_dir}", "utils.run_name=t"]
    script = textwrap.dedent(SLOW_LOGS).format(root=str(ROOT), argv=argv, log_s=log_s, eval_s=eval_s)
    assert_ok(run_cmd([sys.executable, "-c", script], 300, env_=env()))
    rate = {r["step"]: r["train/tokens_per_s"] for r in train_rows(out / "t")}
    assert sorted(rate) == [1, 2, 3, 4, 5]
    for step in (2, 3, 4, 5):  # each window holds the logging of the step before
        assert rate[step] <= tokens / log_s, rate
    for step in (3, 5):  # ... and not the evaluation of the step before (steps 2 and 4)
        assert rate[step] > tokens / (log_s + 0.5 * eval_s), rate
