"""Spike forensics: a replay from a checkpoint is exact, interventions change what they should,
bad interventions are refused before anything is written, and "what moved first" names the
series that left its band first."""

from __future__ import annotations

import json
import math
import shlex
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY, assert_ok, free_port, python_train, run_cmd
from dsinstab.commands import replay
from dsinstab.reports import forensics
from dsinstab.reports.report import report_command
from dsinstab.reports.run_data import load_run
from dsinstab.run.config import load_config, to_yaml
from dsinstab.run.ds_config import read_ds_config, resolve_ds_config
from dsinstab.run.tracking import read_jsonl

# ---------------------------------------------------------------------------------------------
# What moved first, on a made-up run whose answer is known


def _synthetic_rows() -> list[dict]:
    rows = []
    for s in range(1, 31):
        wobble = 0.01 * math.sin(1.7 * s)  # deterministic noise
        rows.append(
            {
                "step": s,
                "train/loss": 3.0 - 0.01 * s + wobble + (2.0 if s in (24, 25) else 0.0),
                "train/overflow": 0,
                "diag/param_norm/embed": 10.0 + 0.05 * s + 0.1 * wobble,  # grows steadily: never "leaves"
                "diag/update_ratio/layer_1": 1e-3 * (1 + wobble) * (50 if s >= 21 else 1),
                "diag/grad_norm/layer_0": 0.5 + wobble + (5.0 if s >= 23 else 0.0),
            }
        )
        rows.append({"step": s, "eval/loss": 9.9} if s % 10 == 0 else {"step": s, "train/tokens_per_s": 1.0})
    return rows


def test_what_moved_first_names_the_series_that_left_its_band_first_and_its_lead(tmp_path):
    tl = forensics.timeline(_synthetic_rows(), spike_step=24, lookback=8, k=4.0)
    assert tl.loss_step == 24 and tl.window_start == 16
    table = [(r["series"], r["left its band at step"], r["steps before the loss"]) for r in tl.table]
    assert table == [
        ("diag/update_ratio/layer_1", 21, 3),
        ("diag/grad_norm/layer_0", 23, 1),
        ("train/loss", 24, 0),
    ]
    assert "diag/param_norm/embed" in tl.z  # judged against its trend, it stayed inside its band
    assert tl.sentence().startswith(
        "First to leave its 4-sigma band: diag/update_ratio/layer_1 at step 21, 3 step(s) before"
    )
    assert forensics.heatmap(tl, tmp_path / "h.png").stat().st_size > 0
    # the command on a run directory: the same answer
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _synthetic_rows()))
    assert (
        forensics.main([str(tmp_path / "run"), "--at", "24", "--lookback", "8", "--out", str(tmp_path / "f")])
        == 0
    )
    assert "| diag/update_ratio/layer_1 | 21 | 3 |" in (tmp_path / "f" / "report.md").read_text()


# ---------------------------------------------------------------------------------------------
# Refusals: one sentence, exit 2, nothing written


def checkpointed_run(folder, ranks: int = 1, extra: tuple[str, ...] = ()):
    """A run directory as an fp16 run of ``ranks`` ranks leaves it, with one complete checkpoint (step-6)."""
    from dsinstab.run.checkpoint import RANKS, Checkpointer

    cfg = load_config(ROOT / "configs", [*TINY, *extra])
    ds = ROOT / "ds_configs" / "zero2_fp16.json"
    cfg.ds_config, _ = resolve_ds_config(read_ds_config(ds), ds, cfg, ranks)
    run = folder / "runs" / "r"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(cfg))
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "train/loss": 5.0}) + "\n" for s in range(1, 13))
    )
    ck = Checkpointer(None, run, 1, True, {RANKS: ranks})
    (ck.dir / "step-6").mkdir(parents=True)
    assert ck.commit("step-6", 6) is None
    return run


@pytest.fixture
def fp16_run(tmp_path):
    return checkpointed_run(tmp_path)


@pytest.mark.parametrize(
    "args, sentence",
    [
        (
            ["--intervene", "precision=fp16"],
            "--intervene precision=fp16: {run} already trains in fp16; allowed: precision=bf16 or precision=fp32.",
        ),
        (
            ["--intervene", "skip", "model.n_layer=3"],
            "--intervene model.n_layer=3: model.n_layer cannot change in a replay because it changes the model's "
            "parameters, which the checkpoint fixes.",
        ),
        (
            ["--intervene", "warp=9"],
            "--intervene warp=9: unknown intervention; allowed: " + replay.INTERVENTIONS + ".",
        ),
        (
            ["--intervene", "trainer.adam_eps=-1"],
            "--intervene trainer.adam_eps=-1: trainer.adam_eps must be > 0, got -1.0.",
        ),
        (
            ["--window", "50"],
            "--window 50: step 60 is past RUN's trainer.max_steps (12), where its lr schedule ends; give at most 2.",
        ),
    ],
)
def test_an_intervention_that_cannot_apply_is_refused_in_one_sentence_before_anything_is_written(
    fp16_run, capsys, args, sentence
):
    out = fp16_run.parent / "out"
    assert replay.main([str(fp16_run), "--at", "10", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: " + sentence.format(run=fp16_run)
    assert not out.exists()


def test_a_spike_before_every_checkpoint_is_refused(fp16_run, capsys):
    assert replay.main([str(fp16_run), "--at", "6"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"error: --at 6: {fp16_run / 'checkpoints'} holds no complete checkpoint before step 6; have: step-6."
    )
    assert sorted(p.name for p in fp16_run.parent.iterdir()) == ["r"]


# ---------------------------------------------------------------------------------------------
# The branches of a run of several nodes, as launcher commands


def test_emitted_commands_launch_each_branch_on_the_nodes_of_the_hostfile(tmp_path, capsys):
    run = checkpointed_run(tmp_path, ranks=16)  # 2 nodes x 8 GPUs
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# the run's nodes\nnode1 slots=8\nnode2 slots=8\nnode3 slots=8\n")
    out = tmp_path / "out"
    argv = [str(run), "--at", "10", "--window", "2", "--intervene", "skip", "--out", str(out)]
    assert replay.main([*argv, "--emit", "commands", "--hostfile", str(hostfile)]) == 0
    printed = capsys.readouterr().out.splitlines()
    lines = [ln for ln in printed if not ln.startswith("#")]
    assert lines == (out / "commands.txt").read_text().splitlines()
    assert len(lines) == 2  # plain and skip
    for line, name in zip(lines, ("plain", "skip"), strict=True):
        cd, _, cmd = line.partition(" && ")
        assert cd == f"cd {shlex.quote(str(Path.cwd()))}"  # where the paths of the run's config hold
        words = shlex.split(cmd)
        assert words[0].endswith("deepspeed")
        launcher = words[1 : words.index(str(ROOT / "scripts" / "train.py"))]
        assert launcher == [
            "--hostfile",
            str(hostfile),
            "--num_nodes",
            "2",
            "--num_gpus",
            "8",
            "--master_port",
            "29500",
        ]
        assert f"utils.run_name={name}" in words and f"utils.output_dir={out}" in words
        assert words[words.index("--branch") + 1] == str(run / "checkpoints" / "step-6")
    assert "--intervene" in shlex.split(lines[1]) and "skip=7-10" in shlex.split(lines[1])
    assert printed[-1] == "# once they have run, the report: " + shlex.join(
        [sys.executable, str(ROOT / "scripts" / "replay.py"), *argv, "--hostfile", str(hostfile)]
    )
    assert (out / "source.yaml").exists() and (out / "ds_config-fp16.json").exists()
    with pytest.raises(SystemExit) as refused:  # an abbreviation would stay in that report command
        replay.main([*argv, "--em", "commands"])
    assert refused.value.code == 2 and "unrecognized arguments: --em commands" in capsys.readouterr().err


def test_a_compiled_run_is_replayed_eager_with_every_probe(tmp_path, capsys):
    """model.compile refuses the probes that hook the modules; the replay runs them all, so its
    branches train the same weights uncompiled rather than being refused."""
    run = checkpointed_run(tmp_path, extra=("model.compile=true", "model.compile_backend=eager",
                                            "trainer.overflow.locate=false"))  # fmt: skip
    out = tmp_path / "out"
    assert (
        replay.main([str(run), "--at", "10", "--window", "2", "--out", str(out), "--emit", "commands"]) == 0
    )
    lines = [ln for ln in capsys.readouterr().out.splitlines() if not ln.startswith("#")]
    assert len(lines) == 1 and "model.compile=false" in shlex.split(lines[0])


@pytest.mark.parametrize(
    "args, sentence",
    [
        (
            ["--num_nodes", "2"],
            "--num_nodes 2: several nodes need --hostfile H (each node and its slots, as DeepSpeed's launcher reads it).",
        ),
        (
            ["--hostfile", "{h}", "--num_nodes", "3"],
            "--hostfile {h}: the run has 16 rank(s), not --num_nodes 3 x --num_gpus 8 (the first host's slots); give --num_nodes and --num_gpus whose product is 16.",
        ),
        (
            ["--hostfile", "{h}", "--num_nodes", "4", "--num_gpus", "4"],
            "--hostfile {h}: 4 node(s) of 4 slot(s) wanted; it has node1 slots=8, node2 slots=4.",
        ),
        (
            ["--hostfile", "{h}-missing"],
            "--hostfile {h}-missing: cannot be read (No such file or directory).",
        ),
    ],
)
def test_a_launch_that_cannot_run_the_checkpoints_ranks_is_refused_before_anything_is_written(
    tmp_path, capsys, args, sentence
):
    run = checkpointed_run(tmp_path, ranks=16)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=8\nnode2 slots=4\n")
    args = [a.format(h=hostfile) for a in args]
    out = tmp_path / "out"
    assert replay.main([str(run), "--at", "10", "--out", str(out), "--emit", "commands", *args]) == 2
    assert capsys.readouterr().err.strip() == "error: " + sentence.format(h=hostfile)
    assert not out.exists()


@pytest.mark.slow  # four processes and DeepSpeed's launcher: about 35 s on 2 idle cores
def test_an_emitted_branch_command_makes_the_branch_the_plain_replay_makes(tmp_path, cache_dir):
    """The emitted command of a one-rank run's plain replay, through DeepSpeed's launcher on a
    hostfile of this machine alone, run here: the same branch as ``replay.py`` itself runs."""
    proc = python_train(
        "--set",
        *TINY,
        "trainer.max_steps=8",
        "trainer.checkpoint_every=4",
        f"utils.output_dir={tmp_path / 'runs'}",
        f"utils.cache_dir={cache_dir}",
        "utils.run_name=src",
    )
    assert_ok(proc)
    run, hostfile = tmp_path / "runs" / "src", tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n")
    replay_py = [sys.executable, str(ROOT / "scripts" / "replay.py"), str(run), "--at", "6", "--window", "1"]
    launch = ["--hostfile", str(hostfile), "--master_addr", "127.0.0.1", f"--master_port={free_port()}"]
    launch += ["--launcher_args=--no_ssh_check"]  # no ssh to this machine: DeepSpeed's check would fail
    emitted = run_cmd([*replay_py, "--out", str(tmp_path / "a"), "--emit", "commands", *launch], 120)
    assert_ok(emitted)
    (line,) = [ln for ln in emitted.stdout.splitlines() if not ln.startswith("#")]
    assert " --hostfile " in line and " --num_nodes 1 --num_gpus 1 " in line
    assert_ok(run_cmd(["bash", "-c", line], 300))
    assert_ok(run_cmd([*replay_py, "--out", str(tmp_path / "b")], 300))  # the plain replay, run by replay.py

    def branch(out: str) -> dict:
        d = tmp_path / out / "plain"
        status = json.loads((d / "status.json").read_text())
        rows = [
            {k: v for k, v in r.items() if k not in ("time", "train/tokens_per_s")}
            for r in read_jsonl(d / "metrics.jsonl")
        ]
        config = (
            (d / "config.yaml")
            .read_text()
            .replace(str(tmp_path / out), "OUT")
            .replace(f"group: {out}", "group: OUT")
        )
        return {
            "status": {k: v for k, v in status.items() if k != "peak_rss_mb"},
            "metrics": rows,
            "events": read_jsonl(d / "events.jsonl") if (d / "events.jsonl").exists() else None,
            "branch": json.loads((d / "branch.json").read_text()),
            "config": config,
            "checkpoints": sorted(p.name for p in (d / "checkpoints").glob("*")),
        }

    a, b = branch("a"), branch("b")
    assert a["status"]["state"] == "finished" and a["status"]["step"] == 7
    assert [r["step"] for r in a["metrics"] if "train/loss" in r] == [5, 6, 7]
    assert a == b


# ---------------------------------------------------------------------------------------------
# End to end: a spike injected at a data position, replayed exactly, skipped, and kept by lr


@pytest.mark.slow
def test_replay_is_exact_skip_removes_a_data_tied_fault_and_a_lower_lr_keeps_it(tmp_path, cache_dir):
    # lr x1000 for the step that reads data position 26 (step 27): the loss spikes at step 28
    proc = python_train(
        "--ds_config",
        str(ROOT / "ds_configs" / "zero2_fp32.json"),
        "--set",
        *TINY,
        f"utils.output_dir={tmp_path / 'runs'}",
        f"utils.cache_dir={cache_dir}",
        "utils.run_name=spiky",
        "trainer.max_steps=40",
        "trainer.checkpoint_every=8",
        "trainer.keep_checkpoints=5",
        "trainer.spikes.warmup=0",
        "trainer.inject.at_step=27",
    )
    assert_ok(proc)
    run = tmp_path / "runs" / "spiky"
    spikes = [
        e["step"]
        for e in load_run(run).events
        if any(f["kind"] == "loss_spike" for f in e.get("firings", []))
    ]
    assert spikes[:1] == [28]

    out = tmp_path / "replay"
    cmd = [sys.executable, str(ROOT / "scripts" / "replay.py"), str(run), "--at", "28", "--from", "step-16"]
    cmd += ["--window", "3", "--intervene", "skip=2", "lr=x0.5", "--out", str(out)]
    proc = run_cmd(cmd, timeout=600)
    assert_ok(proc)
    lines = proc.stdout.splitlines()
    assert lines[0] == "replay exact through step 28 (max |\u0394loss| = 0)"

    summary = json.loads((out / "report" / "summary.json").read_text())
    recurred = {r["branch"]: r["recurred"] for r in summary["branches"]}
    assert recurred == {"original": True, "plain": True, "skip-2": False, "lr-x0.5": True}
    assert (
        "skip-2 removed it" in summary["verdict"] and "the plain replay kept the spike" in summary["verdict"]
    )
    # the fault's update moved before the loss did
    moved = {r["series"]: r for r in summary["first_moved"]}
    assert moved["train/loss"]["left its band at step"] == 28
    assert any(
        s.startswith("diag/update_ratio/") and r["steps before the loss"] >= 1 for s, r in moved.items()
    )
    html = (out / "report" / "report.html").read_text()
    assert "What moved first" in html and "data:image/png;base64," in html

    # every branch is an ordinary run directory: finished at the window's end, probes every step
    for name in ("plain", "skip-2", "lr-x0.5"):
        branch = load_run(out / name)
        assert branch.status["state"] == "finished" and branch.status["step"] == 31
        assert [r["step"] for r in branch.metrics if "diag/update_ratio/layer_0" in r] == list(range(17, 32))
    assert report_command([out / "plain", out / "skip-2"], tmp_path / "cmp") is not None

    # the same command again continues the replay: nothing left to run
    proc = run_cmd(cmd, timeout=300)
    assert_ok(proc)
    assert "branch skip-2: already done" in proc.stdout
