"""The instability zoo: case files, the definition of unstable, the scoreboard's numbers, a killed zoo
completed by a rerun, and every shipped case reproducing its instability and its fix."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, TINY, assert_ok, run_cmd, spawn
from dsinstab.commands.zoo import main as zoo_main
from dsinstab.experiments.zoo import Criteria, load_zoo
from dsinstab.reports.stats import median_interval, spread
from dsinstab.run.status import read_status
from dsinstab.run.tracking import read_jsonl

ZOO = [sys.executable, str(ROOT / "scripts" / "zoo.py")]


def write_run(
    d: Path, state: str, evals: list[float], events: list[dict] = (), extra: list[dict] = ()
) -> None:
    """A run directory as train.py leaves it: status, metrics with eval losses, events."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "status.json").write_text(json.dumps({"state": state, "step": 10 * (len(evals) - 1)}))
    rows = [{"step": 10 * i, "eval/loss": v} for i, v in enumerate(evals)]
    rows += [{"step": i + 1, "train/loss": 5.0 - 0.01 * i} for i in range(10 * (len(evals) - 1))] + list(
        extra
    )
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


def test_the_median_interval_is_the_order_statistic_one():
    assert median_interval([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0, 0.75)  # n=3: the range, 1 - 2/8
    med, lo, hi, cov = median_interval([float(x) for x in range(9)])
    # n=9: ranks 2 and 8 cover 1 - 2 * (1 + 9) / 512 = 0.961; ranks 3 and 7 only 0.82
    assert (med, lo, hi) == (4.0, 1.0, 7.0) and cov == pytest.approx(1 - 20 / 512)
    assert median_interval([1.0, 2.0, math.inf, 4.0])[0] == 3.0  # a diverged run ranks last
    assert median_interval([]) == (None, None, None, 0.0)
    assert spread([3.0, 1.0, 2.0]) == "2 [1, 3] (75%)" and spread([]) == "-"


def test_each_definition_of_unstable(tmp_path):
    write_run(tmp_path / "died", "min_loss_scale", [6.2])
    write_run(tmp_path / "learnt", "finished", [6.2, 5.0])
    write_run(tmp_path / "stuck", "finished", [6.2, 6.19])
    write_run(tmp_path / "spiky", "finished", [6.2, 5.0], events=[{"step": 8, "kind": "loss_spike"}])
    write_run(
        tmp_path / "logits", "finished", [6.2, 5.0], extra=[{"step": 10, "diag/attn_logit_max/layer_1": 2e4}]
    )
    died = Criteria(died=["min_loss_scale"])
    assert died.judge(tmp_path / "died") == (True, ["died at the minimum loss scale at step 0"])
    assert died.judge(tmp_path / "learnt") == (False, [])
    learns = Criteria(final_eval_above_start=0.5)
    assert learns.judge(tmp_path / "stuck")[0] and not learns.judge(tmp_path / "learnt")[0]
    assert Criteria(final_eval_above=4.9).judge(tmp_path / "learnt")[0]
    spikes = Criteria(events=["loss_spike"])
    assert spikes.judge(tmp_path / "spiky") == (True, ["loss_spike at step 8"])
    assert not spikes.judge(tmp_path / "learnt")[0]
    logits = Criteria(metric_above={"diag/attn_logit_max": 1000})
    assert logits.judge(tmp_path / "logits")[0] and not logits.judge(tmp_path / "learnt")[0]


def write_cases(folder: Path, cache_dir, steps: int = 6) -> Path:
    """Two tiny cases: one that 'dies' (judged by its final eval loss) and a stable reference."""
    folder.mkdir(parents=True, exist_ok=True)
    common = [*TINY, f"utils.cache_dir={cache_dir}", f"trainer.max_steps={steps}", f"trainer.eval_every={steps}",
              "trainer.checkpoint_every=2", "utils.report_to=none"]  # fmt: skip
    (folder / "mitigations.yaml").write_text(
        yaml.safe_dump({"variants": {"z_loss": {"set": ["trainer.z_loss=1e-4"]}}})
    )
    (folder / "stuck.yaml").write_text(
        yaml.safe_dump(
            {
                "instability": "learns nothing",
                "unstable": {"final_eval_above_start": 10.0},
                "fixes": ["z_loss"],
                "ds_config": "zero2_fp32",
                "lrs": [1e-3],
                "seeds": [0, 1],
                "set": common,
            }  # fmt: skip
        )
    )
    (folder / "calm.yaml").write_text(
        yaml.safe_dump(
            {
                "instability": "none (the reference)",
                "unstable": {"final_eval_above": 100.0},
                "reference": True,
                "ds_config": "zero2_fp32",
                "lrs": [1e-3],
                "seeds": [0],
                "set": common,
            }  # fmt: skip
        )
    )
    return folder


def test_bad_case_files_are_refused_in_one_sentence_with_nothing_written(tmp_path, cache_dir, capsys):
    folder = write_cases(tmp_path / "cases", cache_dir)
    raw = yaml.safe_load((folder / "stuck.yaml").read_text())
    for change, message in (
        ({"fixes": ["zclp"]}, "fixes names 'zclp', which is neither a mitigation nor a variant of the case."),
        ({"unstable": {"died": "exploded"}}, "unstable.died has unknown state 'exploded'"),
        ({"unstabel": {}}, "unknown key unstabel (did you mean unstable?)"),
    ):
        (folder / "stuck.yaml").write_text(yaml.safe_dump({**raw, **change}))
        assert zoo_main(["--cases", str(folder), "--out", str(tmp_path / "zoo")]) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], err[-2000:]
        assert not (tmp_path / "zoo").exists()


def test_the_gpu_shape_gives_every_case_the_124m_model_and_its_own_values(tmp_path, capsys):
    """`--shape gpt2-124m`: every shipped case on the preset's 12-layer, 768-wide, 1024-token model,
    with the learning rates, steps and definition of unstable the case sets for that shape; the
    tiny shape's keys are gone, and the emitted commands rerun each point at that shape."""
    tiny = load_zoo(out=tmp_path / "t", seeds=1)  # one seed: every variant and lr, a fifth the points
    gpu = load_zoo(out=tmp_path / "g", seeds=1, shape="gpt2-124m")
    assert [c.name for c in gpu.cases] == [c.name for c in tiny.cases]
    for case in gpu.cases:
        spec = yaml.safe_load(case.path.read_text())["shapes"]["gpt2-124m"]
        assert case.grid.lrs == spec["lrs"]
        if "unstable" in spec:
            assert case.criteria.final_eval_above == spec["unstable"].get("final_eval_above")
        for p in case.grid.points:
            m, t = p.cfg.model, p.cfg.trainer
            assert (m.n_layer, m.d_model, m.seq_len, p.cfg.dataset.vocab_size) == (12, 768, 1024, 50304)
            assert m.arch == ("qwen3" if p.variant == "qk_norm" else "llama")  # the tiny shape's family
            assert (t.micro_batch_size, t.gradient_accumulation_steps) == (16, 1)
            wanted = next(int(s.split("=")[1]) for s in spec["set"] if s.startswith("trainer.max_steps="))
            assert t.max_steps == wanted
    warm = next(p for p in gpu.grid.points if p.name.startswith("no-warmup/warmup-"))
    assert warm.cfg.trainer.warmup_steps == 300  # the case's own variant, changed at this shape
    tiny_points = {p.name: p.cfg.model.n_layer for p in tiny.grid.points}
    assert set(tiny_points.values()) == {2}
    assert "--shape" not in tiny.grid.rerun and gpu.grid.rerun[-2:] == ["--shape", "gpt2-124m"]
    for argv, message in (
        (["--shape", "gpt2-12m"], "--shape: no shape 'gpt2-12m' (did you mean gpt2-124m?)"),
        (["--shape", "gpt2-124m", "--quick"], "--quick is the tiny shape's CPU setting"),
    ):
        assert zoo_main([*argv, "--out", str(tmp_path / "zoo"), "--emit", "commands"]) == 2
        errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "zoo").exists()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_a_killed_zoo_is_completed_by_a_rerun_and_scored_from_its_run_directories(tmp_path, cache_dir):
    folder, out = write_cases(tmp_path / "cases", cache_dir), tmp_path / "zoo"
    cmd = [*ZOO, "--cases", str(folder), "--out", str(out), "--parallel", "2"]
    launches = out / "launches.jsonl"
    with spawn(cmd) as proc:  # SIGKILL (no goodbye) once the third run is inside its training loop
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            starts = [json.loads(x) for x in launches.read_text().splitlines()] if launches.exists() else []
            starts = [r for r in starts if "mode" in r]
            if len(starts) >= 3 and read_status(out / starts[2]["point"]).get("state"):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the zoo ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        while time.time() < deadline and any(alive(r["pid"]) for r in starts):
            time.sleep(0.1)
    proc = run_cmd(cmd, 600)
    assert_ok(proc)
    assert "0 already ended" not in proc.stdout
    zoo = load_zoo(folder, out)
    names = [p.name for p in zoo.grid.points]
    assert len(names) == 6  # baseline and z_loss: stuck on 2 seeds, calm on 1
    assert all(read_status(out / n)["state"] == "finished" for n in names)

    board = json.loads((out / "scoreboard.json").read_text())
    by = {(c["case"], c["variant"]): c for c in board["cells"]}
    for case in zoo.cases:  # computed here from each run's metrics.jsonl
        seeds = case.grid.seeds
        for variant in case.variants:
            finals = []
            for seed in seeds:
                rows = read_jsonl(out / case.name / f"{variant}-lr0.001-s{seed}" / "metrics.jsonl")
                evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
                finals.append(evals[-1])
                unstable = evals[-1] > evals[0] - 10.0 if case.name == "stuck" else evals[-1] > 100.0
                seed_row = next(s for s in by[(case.name, variant)]["seeds"] if s["seed"] == seed)
                assert seed_row["unstable"] == unstable and seed_row["final_eval"] == evals[-1]
            cell = by[(case.name, variant)]
            assert cell["unstable"] == (2 if case.name == "stuck" else 0) and cell["ran"] == len(seeds)
            assert cell["median_final_eval"] == pytest.approx(sum(finals) / len(finals))
            assert cell["interval"] == [min(finals), max(finals)]
            assert cell["coverage"] == pytest.approx(1 - 2 * 0.5 ** len(seeds))
    cost = next(r for r in board["costs"] if r["variant"] == "z_loss")
    diffs = []
    for seed in (0,):
        final = {}
        for variant in ("baseline", "z_loss"):
            rows = read_jsonl(out / "calm" / f"{variant}-lr0.001-s{seed}" / "metrics.jsonl")
            final[variant] = [r["eval/loss"] for r in rows if "eval/loss" in r][-1]
        diffs.append(final["z_loss"] - final["baseline"])
    assert cost["median Δ eval loss"] == pytest.approx(diffs[0]) and cost["seeds"] == 1
    md = (out / "scoreboard.md").read_text()
    assert "| stuck | learns nothing | 2/2 · " in md and "z_loss" in md
    html = (out / "scoreboard.html").read_text()
    assert "data:image/png;base64," in html and "Cost on the stable reference case" in html


@pytest.mark.slow
def test_every_shipped_case_reproduces_its_instability_and_its_fix_on_two_seeds(tmp_path):
    """Each case's quick setting, seeds 0 and 1: the baseline unstable by the case's own definition,
    its first documented fix stable (attention-logit growth's second, QK-clip, holds the logit in
    tests/test_mitigations.py). The data-tied spike's fix is the data's: a replay that skips the
    bad steps has no spike, and one that reshuffles the batches has none there either."""
    out = tmp_path / "zoo"
    cases = ["fp16-collapse", "attn-logit-growth", "no-warmup", "data-tied-spike"]
    first_fixes = ["bf16", "qk_norm", "warmup"]
    cmd = [*ZOO, "--quick", "--seeds", "2", "--only", *cases, "--variants", *first_fixes]
    assert_ok(run_cmd([*cmd, "--parallel", "2", "--out", str(out)], 1500))
    board = json.loads((out / "scoreboard.json").read_text())
    by = {(c["case"], c["variant"]): c for c in board["cells"]}
    assert sorted(f for case in cases for f in board["fixes"][case]) == sorted(first_fixes)
    for case in cases:
        assert by[(case, "baseline")]["unstable"] == 2, (case, by[(case, "baseline")]["seeds"])
        for fix in board["fixes"][case]:
            assert by[(case, fix)]["unstable"] == 0, (case, fix, by[(case, fix)]["seeds"])
    run = out / "data-tied-spike" / "baseline-lr0.01-s0"
    replay = [
        sys.executable,
        str(ROOT / "scripts" / "replay.py"),
        str(run),
        "--at",
        "82",
        "--from",
        "step-40",
    ]
    replay += ["--window", "4", "--intervene", "skip=3", "reshuffle", "--out", str(tmp_path / "replay")]
    assert_ok(run_cmd(replay, 900))
    summary = json.loads((tmp_path / "replay" / "report" / "summary.json").read_text())
    recurred = {r["branch"]: r["recurred"] for r in summary["branches"]}
    assert (
        recurred["plain"]
        and not recurred["skip-3"]
        and not recurred[next(b for b in recurred if b.startswith("reshuffle"))]
    )
