"""scripts/sweep.py: grids refused with one sentence, emitted commands, the LR-sensitivity numbers,
and one real sweep of the tiny model that is killed and completed by a rerun."""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, TINY, assert_ok, run_cmd, spawn
from dsinstab.commands import sweep
from dsinstab.reports.stats import spread
from dsinstab.reports.sweep_report import write_sweep_report

SWEEP = [sys.executable, str(ROOT / "scripts" / "sweep.py")]


def write_grid(tmp_path: Path, cache_dir: Path | str, **grid) -> Path:
    spec = {
        "name": "tiny",
        "lrs": [1.0e-3, 1.0e-2, 1.0e-1],
        "seeds": [0],
        "set": [*TINY, f"utils.cache_dir={cache_dir}"],
        "variants": {"baseline": {}, "qk_norm": {"set": ["model.arch=qwen3"]}},
    } | grid
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


# ---------------------------------------------------------------------------------------------
# Bad input: one sentence naming the file and the key, exit 2, nothing written


@pytest.mark.parametrize(
    "change, words",
    [
        ({"lr": [1e-3]}, ["unknown key lr", "did you mean lrs?"]),
        ({"lrs": ["fast"]}, ["lrs must be a non-empty list of positive numbers"]),
        ({"lrs": [1e-3, 0.001]}, ["lrs lists a value twice"]),
        ({"variants": {"a": {"set": ["model.archx=qwen3"]}}}, ["variants.a", "did you mean model.arch?"]),
        ({"variants": {"a": {"sets": []}}}, ["variants.a has unknown key sets", "did you mean set?"]),
        ({"variants": {"a": {"ds_config": "zero9_fp8"}}}, ["variants.a", "zero9_fp8 does not exist"]),
        ({"set": ["trainer.seed=3"]}, ["set sets trainer.seed", "seeds"]),
        ({"lrs": [20]}, ["variants.baseline at lr 20, seed 0", "trainer.lr must be <= 10"]),
        ({"variants": {}}, ["variants must map each variant's name"]),
        (
            {"variants": {"a": {"set": ["model.d_model=50"]}}},
            ["variants.a", "rotary embeddings need an even head size"],
        ),
    ],
)
def test_bad_grid_is_refused_before_anything_is_written(tmp_path, capsys, change, words):
    grid = write_grid(tmp_path, tmp_path / "cache", **change)
    out = tmp_path / "sweep"
    assert sweep.main([str(grid), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {grid}: ") and "\n" not in err, err
    for w in words:
        assert w in err, err
    assert not out.exists()


@pytest.mark.parametrize("grid", sorted(p.name for p in (ROOT / "configs" / "sweeps").glob("*.yaml")))
def test_shipped_grids_resolve(tmp_path, grid):
    """Every point of every shipped grid resolves as train.py would resolve it."""
    g = sweep.load_grid(ROOT / "configs" / "sweeps" / grid, tmp_path / "out")
    assert len(g.points) == len(g.lrs) * len(g.seeds) * len(g.variants)
    if "lr" in grid:  # the LR sensitivity grids span the paper's range
        assert g.lrs == [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]


# ---------------------------------------------------------------------------------------------
# Points: what a rerun does with each, and the commands for a scheduler


def fake_status(run_dir: Path, state: str, step: int, checkpoint: bool = False) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "status.json").write_text(json.dumps({"state": state, "step": step}))
    if checkpoint:
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        (run_dir / "checkpoints" / "latest").write_text(f"step-{step}")


def test_plan_and_emitted_commands(tmp_path):
    grid = sweep.load_grid(write_grid(tmp_path, tmp_path / "cache"), tmp_path / "sweep")
    assert [p.name for p in grid.points] == [
        f"{v}-lr{lr}-s0" for v in ("baseline", "qk_norm") for lr in ("0.001", "0.01", "0.1")
    ]
    p = {pt.name: pt for pt in grid.points}
    max_steps = p["baseline-lr0.001-s0"].cfg.trainer.max_steps
    assert p["qk_norm-lr0.1-s0"].cfg.model.arch == "qwen3" and p["baseline-lr0.1-s0"].cfg.trainer.lr == 0.1
    fake_status(p["baseline-lr0.001-s0"].run_dir, "finished", max_steps)  # a result
    fake_status(p["baseline-lr0.01-s0"].run_dir, "min_loss_scale", 5)  # a divergence is a result too
    fake_status(p["baseline-lr0.1-s0"].run_dir, "running", 6, checkpoint=True)  # killed after a checkpoint
    fake_status(p["qk_norm-lr0.001-s0"].run_dir, "failed", 2)  # crashed before one
    fake_status(p["qk_norm-lr0.01-s0"].run_dir, "finished", max_steps - 1, checkpoint=True)  # max_steps grew
    plans = {name: sweep.plan(pt) for name, pt in p.items()}
    assert plans == {
        "baseline-lr0.001-s0": "done",
        "baseline-lr0.01-s0": "done",
        "baseline-lr0.1-s0": "resume",
        "qk_norm-lr0.001-s0": "restart",
        "qk_norm-lr0.01-s0": "resume",
        "qk_norm-lr0.1-s0": "new",
    }
    assert sweep.train_command(p["baseline-lr0.1-s0"], "resume")[-2:] == ["--resume", "latest"]
    assert sweep.train_command(p["qk_norm-lr0.001-s0"], "restart")[-1] == "--overwrite"
    cmd = sweep.train_command(p["qk_norm-lr0.1-s0"], "new")
    assert cmd[1] == str(ROOT / "scripts" / "train.py") and "utils.run_name=qk_norm-lr0.1-s0" in cmd

    assert sweep.main([str(grid.path), "--out", str(grid.out), "--emit", "commands"]) == 0
    lines = (grid.out / "commands.txt").read_text().splitlines()
    assert [line.split("--point ")[1] for line in lines] == [n for n, m in plans.items() if m != "done"]
    assert sweep.main([str(grid.path), "--out", str(grid.out), "--emit", "slurm", "--parallel", "2"]) == 0
    sbatch = (grid.out / "sweep.sbatch").read_text()
    assert "#SBATCH --array=2,3,4,5%2" in sbatch and '--point "$SLURM_ARRAY_TASK_ID"' in sbatch


# ---------------------------------------------------------------------------------------------
# The analysis on hand-made run directories: every number known in advance


def fake_run(
    run_dir: Path, ds: dict, loss0: float, final: float | None, state: str, steps: int, **last
) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"ds_config": ds}))
    rows = [{"step": 0, "eval/loss": loss0}]
    rows += [{"step": s, "train/loss": loss0, "train/skipped_steps": 0} for s in range(1, steps)]
    rows += [{"step": steps, "train/loss": loss0, **last}]
    if final is not None:
        rows.append({"step": steps, "eval/loss": final})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "status.json").write_text(json.dumps({"state": state, "step": steps}))


def test_lr_sensitivity_and_divergence_from_run_directories(tmp_path):
    lrs = [1.0e-4, 3.0e-4, 3.0e-3, 3.0e-2, 3.0e-1]  # 1e-4 lies outside [3e-4, 3e-1]: plotted, not counted
    grid = sweep.load_grid(
        write_grid(
            tmp_path,
            tmp_path / "cache",
            lrs=lrs,
            seeds=[0, 1],
            variants={"fp16": {"ds_config": "zero2_fp16"}, "bf16": {"ds_config": "zero2_bf16"}},
        ),
        tmp_path / "sweep",
    )
    fp16, bf16 = {"fp16": {"enabled": True}}, {"bf16": {"enabled": True}}
    # (variant, seed) -> final eval loss per lr; "min" = died at the minimum loss scale, nan = blew up
    finals = {
        ("fp16", 0): [5.0, 6.0, 4.0, "min", "min"],
        ("fp16", 1): [5.5, 6.5, 4.5, 5.0, "min"],
        ("bf16", 0): [5.0, 6.0, 4.0, 4.5, math.nan],
        ("bf16", 1): [5.0, 6.2, 4.2, 4.4, 9.0],  # 9.0 is worse than the loss at init (8.0): diverged
    }
    for p in grid.points:
        f = finals[p.variant, p.seed][lrs.index(p.lr)]
        ds = fp16 if p.variant == "fp16" else bf16
        if f == "min":
            fake_run(p.run_dir, ds, 8.0, None, "min_loss_scale", 7, **{"train/skipped_steps": 6})
        else:
            fake_run(p.run_dir, ds, 8.0, f, "finished", 10, **{"spike/score_loss": 0.1, "diag/log_z": 2.0})
    out = write_sweep_report(grid)
    md = (out / "report.md").read_text()
    rows = {r[0]: r for r in table(md, "variant")}
    # by hand: effective losses in range, minus the curve's best; diverged points count as 8.0
    expect = {
        "fp16": [statistics.fmean([2.0, 0.0, 4.0, 4.0]), statistics.fmean([2.0, 0.0, 0.5, 3.5])],
        "bf16": [statistics.fmean([2.0, 0.0, 0.5, 4.0]), statistics.fmean([2.0, 0.0, 0.2, 3.8])],
    }
    for v, per_seed in expect.items():
        assert float(rows[v][3]) == pytest.approx(statistics.fmean(per_seed), rel=1e-3)
        assert float(rows[v][4]) == pytest.approx(statistics.stdev(per_seed), rel=1e-3)
    assert float(rows["fp16"][6]) == pytest.approx(3e-3)  # seed 0 died at 3e-2
    assert float(rows["bf16"][6]) == pytest.approx(3e-2)
    assert rows["fp16"][7] == "3" and rows["bf16"][7] == "2"
    points = {r[0]: r for r in table(md, "name")}
    assert (
        points["fp16-lr0.03-s0"][4] == "died at the minimum loss scale"
        and points["fp16-lr0.03-s0"][8] == "yes"
    )
    assert points["bf16-lr0.3-s0"][7] == "nan" and points["bf16-lr0.3-s0"][8] == "yes"
    assert "learning rates outside [3e-4, 3e-1] are plotted but not in the LR sensitivity: 0.0001" in md
    assert {"loss_vs_lr.png", "lr_sensitivity.png", "log_z_vs_lr.png", "skipped_steps_vs_lr.png"} <= {
        p.name for p in out.glob("*.png")
    }
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(list(out.glob("*.png")))


@pytest.mark.parametrize("b_window, header", [(20, "spike_score (window 20)"), (1000, "spike_score")])
def test_the_sweep_report_names_the_spike_score_by_its_window(tmp_path, b_window, header):
    """The quick grids score over 20 steps, not OLMo 2's 1000: the header says so where every point
    shares one window, each cell where they differ; OLMo 2's name only with its window."""
    grid = sweep.load_grid(
        write_grid(
            tmp_path,
            tmp_path / "cache",
            lrs=[1.0e-3],
            set=[*TINY, f"utils.cache_dir={tmp_path / 'cache'}", "trainer.spikes.score_window=20"],
            variants={"a": {}, "b": {"set": [f"trainer.spikes.score_window={b_window}"]}},
        ),
        tmp_path / "sweep",
    )
    for p in grid.points:
        fake_run(
            p.run_dir, {"bf16": {"enabled": True}}, 8.0, 5.0, "finished", 10, **{"spike/score_loss": 0.1}
        )
    md = (write_sweep_report(grid) / "report.md").read_text()
    head = next(line for line in md.splitlines() if line.startswith("| name |"))
    columns = [c.strip() for c in head.strip("|").split("|")]
    assert columns[11] == header and "OLMo 2" not in head
    points = {r[0]: r for r in table(md, "name")}
    if b_window == 20:
        assert points["a-lr0.001-s0"][11] == points["b-lr0.001-s0"][11] == "0.1"
    else:
        assert points["a-lr0.001-s0"][11] == "0.1 (window 20)"
        assert points["b-lr0.001-s0"][11] == "0.1 (OLMo 2's, window 1000)"


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs (an exited child of a dead parent may linger as a zombie)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def table(md: str, first: str) -> list[list[str]]:
    """The rows of the markdown table whose first column is ``first``."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


# ---------------------------------------------------------------------------------------------
# One real sweep: killed once its first points ended, completed by a rerun, analysed


@pytest.fixture
def killed_and_rerun(tmp_path, cache_dir):
    tmp = tmp_path
    grid = write_grid(
        tmp,
        cache_dir,
        set=[
            *TINY,
            f"utils.cache_dir={cache_dir}",
            "trainer.max_steps=4",
            "trainer.eval_every=4",
            "trainer.checkpoint_every=2",
        ],
    )
    out = tmp / "sweep"
    launches = out / "launches.jsonl"

    def records() -> list[dict]:
        return [json.loads(line) for line in launches.read_text().splitlines()] if launches.exists() else []

    with spawn([*SWEEP, str(grid), "--out", str(out), "--parallel", "2"]) as proc:
        deadline = time.time() + 300
        # kill the sweep (SIGKILL: no goodbye) once its third point is inside its training loop
        while time.time() < deadline and proc.poll() is None:
            starts = [r for r in records() if "mode" in r]
            if len(starts) >= 3 and sweep.read_status(out / starts[2]["point"]).get("state"):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the sweep ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # the running point hears of it (SIGTERM when its parent dies): it saves and ends by itself
        while time.time() < deadline and any(alive(r["pid"]) for r in records() if "mode" in r):
            time.sleep(0.1)
    before = {
        d.name: sweep.read_status(d).get("state") for d in out.iterdir() if (d / "config.yaml").exists()
    }
    had_checkpoint = {n for n in before if (out / n / "checkpoints" / "latest").is_file()}
    mtimes = {n: (out / n / "metrics.jsonl").stat().st_mtime_ns for n, s in before.items() if s == "finished"}
    n_before = len(records())
    proc = run_cmd([*SWEEP, str(grid), "--out", str(out), "--parallel", "2"], timeout=600)
    return grid, out, before, had_checkpoint, mtimes, records()[n_before:], proc


@pytest.mark.slow
def test_killed_sweep_is_completed_by_a_rerun_and_reported(killed_and_rerun):
    """One test, not two sharing a fixture: pytest -n 2 would run the sweep once per worker."""
    check_rerun(*killed_and_rerun)
    check_report(*killed_and_rerun[:2])


def check_rerun(grid, out, before, had_checkpoint, mtimes, rerun, proc):
    """The rerun started exactly the points that had not ended, and left the others alone."""
    assert_ok(proc)
    names = [p.name for p in sweep.load_grid(grid, out).points]
    assert mtimes and len(mtimes) < len(names)  # some points had ended, not all
    started = [r["point"] for r in rerun if "mode" in r]
    assert sorted(started) == sorted(n for n in names if before.get(n) != "finished")
    # the point that was killed went on from its checkpoint, or started over when it had none
    killed = [n for n, s in before.items() if s != "finished"]
    for r in rerun:
        if r.get("point") in killed and "mode" in r:
            assert r["mode"] == ("resume" if r["point"] in had_checkpoint else "restart")
    for n in names:
        assert json.loads((out / n / "status.json").read_text())["state"] == "finished"
    for n, t in mtimes.items():
        assert (out / n / "metrics.jsonl").stat().st_mtime_ns == t  # not touched again
    assert "0 already ended" not in proc.stdout


def check_report(grid, out):
    """The report's numbers, against what metrics.jsonl holds."""
    md = (out / "report" / "report.md").read_text()
    # computed here from metrics.jsonl alone: final eval loss per lr, the loss at step 0
    for variant in ("baseline", "qk_norm"):
        eff, finals = [], []
        for lr in ("0.001", "0.01", "0.1"):
            rows = [
                json.loads(x)
                for x in (out / f"{variant}-lr{lr}-s0" / "metrics.jsonl").read_text().splitlines()
            ]
            evals = {r["step"]: r["eval/loss"] for r in rows if "eval/loss" in r}
            loss0, final = evals[0], evals[4]
            trained = math.isfinite(final) and final < loss0
            eff.append(min(final, loss0) if trained else loss0)
            finals.append(final if trained else None)
        best = min(f for f in finals if f is not None)
        expected = statistics.fmean(e - best for e in eff)
        row = next(r for r in table(md, "variant") if r[0] == variant)
        assert row[2] == "3/3"
        assert float(row[3]) == pytest.approx(expected, rel=2e-3, abs=2e-4)
        ok = [lr for lr, f in zip((1e-3, 1e-2, 1e-1), finals) if f is not None]
        assert float(row[6]) == pytest.approx(max(ok))
        assert row[-1] == spread([float(row[3])])  # one seed: its own value, covering 0%
    html_page = (out / "report" / "report.html").read_text()
    assert "data:image/png;base64," in html_page and "loss_vs_lr" in html_page
