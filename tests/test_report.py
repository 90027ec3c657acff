"""The comparison report on real runs, the end-of-run summary, the fp16-vs-bf16 command and preset
(with the figures the README quotes), and bad input to compare."""

from __future__ import annotations

import html
import itertools
import json
import math
import re
import shlex
import subprocess
import sys

import matplotlib.pyplot as plt
import pytest
import yaml

from conftest import ROOT, TINY, assert_ok, ds_config, launch, python_train, run_cmd, train_rows
from dsinstab.reports.report import COLUMNS, LOG_FAMILIES, _draw_losses, summarize
from dsinstab.reports.run_data import RunData, load_run
from dsinstab.run.tracking import JsonlFile, read_jsonl

PNGS = {"overview.png", "loss.png", "grad_norm.png", "loss_scale.png", "loss_difference.png"}


def compare(*args) -> subprocess.CompletedProcess:
    return run_cmd([sys.executable, str(ROOT / "scripts" / "compare.py"), *map(str, args)], 300)


def cell(md: str, run: str, column: str) -> str:
    row = next(line for line in md.splitlines() if line.startswith(f"| {run} |"))
    return [c.strip() for c in row.strip("|").split("|")][COLUMNS.index(column)]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, cache_dir):
    tmp = tmp_path_factory.mktemp("pair")
    ds = ds_config(tmp, "zero2_fp16", fp16={"initial_scale_power": 24, "hysteresis": 1})
    fp16_proc, fp16 = launch(tmp, cache_dir, "trainer.max_steps=14", name="fp16", ds=ds)
    assert_ok(fp16_proc)
    proc, bf16 = launch(tmp, cache_dir, "trainer.max_steps=10", name="bf16", ds="zero2_bf16")
    assert_ok(proc)
    return fp16, bf16, fp16_proc


def test_compare_writes_every_plot_and_a_table_of_the_runs_numbers(tmp_path, two_runs):
    fp16, bf16, _ = two_runs
    proc = compare(fp16, bf16, "--out", tmp_path / "rep")
    assert proc.returncode == 0, proc.stderr
    assert "differ in length (fp16: 14 steps, bf16: 10 steps)" in proc.stdout
    out = tmp_path / "rep"
    assert PNGS <= {p.name for p in out.glob("*.png")}
    assert all((out / p).stat().st_size > 10_000 for p in PNGS)
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(list(out.glob("*.png")))  # self-contained
    guide = re.search(r"How to read this report: \[reading-the-report.md\]\((.+?)\)", md).group(1)
    assert (out / guide).resolve() == ROOT / "docs" / "reading-the-report.md"  # absolute, or relative
    assert 'href="' + guide in page

    rows = train_rows(fp16)
    overflow = sum(r["train/overflow"] for r in rows)
    assert overflow >= 4  # 2^24 overflows until the scale comes down
    s = summarize(load_run(fp16))
    assert s["overflow steps"] == overflow and s["steps"] == 14 and s["ended"] == "finished"
    flags = [r["train/overflow"] for r in rows]
    longest = max(len(list(g)) for k, g in itertools.groupby(flags) if k)
    assert s["longest overflow run"] == longest and s["first overflow"] == flags.index(1) + 1
    assert cell(md, "fp16", "precision") == "fp16" and cell(md, "fp16", "steps") == "14"
    assert cell(md, "fp16", "overflow steps") == str(overflow)
    assert cell(md, "fp16", "final eval loss") == f"{s['final eval loss']:.4g}"
    assert "bf16 (bf16): finished after 10 steps" in md


def test_the_end_of_a_run_says_what_happened(tmp_path, two_runs):
    """train.py's last lines: the ending, the final eval loss, events, checkpoints, the run
    directory, and a report command that works as printed."""
    fp16, _, proc = two_runs
    out = proc.stdout[proc.stdout.index("== the run ") :]
    lines = out.splitlines()
    assert lines[0] == "== the run finished at step 14 (exit code 0)"
    evals = [r for r in read_jsonl(fp16 / "metrics.jsonl") if "eval/loss" in r]
    assert lines[1] == (
        f"   final eval loss: {evals[-1]['eval/loss']:.4g} at step 14 ({evals[0]['eval/loss']:.4g} at step 0)"
    )
    events = read_jsonl(fp16 / "events.jsonl") if (fp16 / "events.jsonl").exists() else []
    assert lines[2].startswith(f"   events ({fp16}/events.jsonl): ")
    assert all(e["kind"] in lines[2] for e in events) and (events or lines[2].endswith(": none"))
    assert lines[3] == f"   checkpoints ({fp16}/checkpoints): step-6, step-12 (latest)"
    assert lines[4] == f"   run directory: {fp16}"
    command, target = lines[5].removeprefix("   its report: ").split("  -> ")
    assert target == f"{fp16}/report/report.html"
    argv = shlex.split(command)
    assert argv[:2] == ["python", "scripts/compare.py"]  # as typed in the checkout, where it ran
    assert_ok(run_cmd([sys.executable, *argv[1:]], 300))
    assert (fp16 / "report" / "report.html").exists()


def _run(steps: dict, events: list[dict], status: dict) -> RunData:
    metrics = [{"step": s, **m} for s, m in steps.items()]
    config = {"ds_config": {"fp16": {"enabled": True, "min_loss_scale": 1}}}
    return RunData("r", ROOT, config, metrics, events, status)


def made_up_run(root, name: str, spikes: dict):
    """A run directory of 5 logged steps whose last one has both spike scores."""
    run = root / name
    run.mkdir(parents=True)
    config = {"ds_config": {"bf16": {"enabled": True}}, "trainer": {"spikes": spikes}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [
        {"step": s, "train/loss": 6.0 - 0.1 * s, "train/grad_norm": 1.0, "train/overflow": 0}
        for s in range(1, 6)
    ]
    rows[-1] |= {"spike/score_loss": 0.25, "spike/score_grad_norm": 0.5}
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows + [{"step": 5, "eval/loss": 5.4}])
    )
    (run / "status.json").write_text(json.dumps({"state": "finished", "step": 5}))
    return run


@pytest.mark.parametrize(
    "spikes, header",
    [
        ([{"score_window": 20}, {"score_window": 20, "score_sigma": 7.0}], "window 20"),
        ([{"score_window": 1000, "score_sigma": 7.0}], "OLMo 2's, window 1000"),
        ([{"score_window": 1000, "score_sigma": 5.0}], "window 1000, 5 sigma"),
        ([{"score_window": 20}, {"score_window": 1000, "score_sigma": 7.0}], None),  # in each cell
    ],
)
def test_the_report_names_each_spike_score_by_its_window(tmp_path, spikes, header):
    from dsinstab.reports.report import write_report

    runs = [made_up_run(tmp_path, f"r{i}", s) for i, s in enumerate(spikes)]
    out, _ = write_report(runs, tmp_path / "rep")
    md = (out / "report.md").read_text()
    head = next(line for line in md.splitlines() if line.startswith("| run |"))
    columns = [c.strip() for c in head.strip("|").split("|")]
    assert "OLMo 2" not in head or header == "OLMo 2's, window 1000"
    if header is not None:
        assert columns[COLUMNS.index("spike score loss")] == f"spike score loss ({header})"
        assert columns[COLUMNS.index("spike score grad")] == f"spike score grad ({header})"
        assert all(cell(md, r.name, "spike score loss") == "0.25" for r in runs)
    else:
        assert columns == COLUMNS
        assert cell(md, "r0", "spike score loss") == "0.25 (window 20)"
        assert cell(md, "r1", "spike score grad") == "0.5 (OLMo 2's, window 1000)"
    if header is not None:
        page = (out / "report.html").read_text()
        assert f"<th>{html.escape(f'spike score loss ({header})')}</th>" in page


def test_a_nonfinite_event_is_drawn_on_the_top_edge_and_every_firing_counts():
    inf = math.inf
    steps = {
        s: {"train/loss": 8.0 - 0.1 * s, "train/overflow": 0, "train/loss_scale": 2.0**16}
        for s in range(1, 5)
    }
    steps |= {
        s: {"train/loss": inf, "train/overflow": 1, "train/loss_scale": 2.0 ** (19 - s)} for s in range(5, 20)
    }
    events = [
        {"step": 3, "kind": "loss_spike", "value": 7.7, "firings": [{"kind": "loss_spike", "value": 7.7}]},
        {"step": 5, "kind": "nonfinite_loss", "value": "inf", "firings": [{"kind": "nonfinite_loss"}]},
        {
            "step": 19,
            "kind": "overflow_run",
            "firings": [{"kind": "overflow_run"}, {"kind": "loss_scale_floor"}],
        },
        {"step": 20, "kind": "loss_scale_minimum", "action": "stop", "value": 1.0},
    ]
    run = _run(steps, events, {"state": "min_loss_scale", "step": 19})
    fig, ax = plt.subplots()
    _draw_losses(ax, [run])
    marks = {tuple(line.get_xydata()[0]): line for line in ax.lines if line.get_marker() == "^"}
    assert set(marks) == {(3.0, 7.7), (5.0, 1.0), (19.0, 1.0)}
    top = marks[(5.0, 1.0)]  # y in axes coordinates: the top edge
    assert top.get_transform() == ax.get_xaxis_transform() and not top.get_clip_on()
    assert [t.get_text() for t in ax.texts] == ["inf"]  # once for the two inf steps
    ended = [line for line in ax.lines if line.get_linestyle() == ":"]
    assert ended[0].get_xdata()[0] == 20  # where DeepSpeed gave up, not the last applied step
    assert "at step 20" in ended[0].get_label()
    plt.close(fig)
    row = summarize(run)
    assert row["spikes"] == 4
    assert (
        row["spike kinds"] == "loss_spike (3), nonfinite_loss (5), overflow_run (19), loss_scale_floor (19)"
    )
    assert row["steps at min scale"] == 1  # step 19, at 2^0


def test_log_scale_plots_are_named_as_the_probes_write_them():
    source = "".join(p.read_text() for p in (ROOT / "dsinstab" / "instruments" / "probes").glob("*.py"))
    for family in LOG_FAMILIES:
        assert f'"diag/{family}/' in source or f'f"diag/{family}/' in source, family


def test_the_readme_pandas_snippet_loads_metrics_with_inf_and_nan_as_floats(tmp_path, two_runs):
    fp16 = two_runs[0]
    run = tmp_path / "runs" / "first-fp16"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text((fp16 / "metrics.jsonl").read_text())
    extra = JsonlFile(run / "metrics.jsonl")  # the run's own writer: non-finite values as strings
    extra.write({"step": 15, "train/loss": math.inf, "train/grad_norm": math.nan, "train/overflow": 1})
    extra.close()
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"```python\n(import pandas as pd\n.*?)```", readme, re.S).group(1)
    assert "runs/first-fp16/metrics.jsonl" in snippet
    scope: dict = {}
    exec(compile(snippet.replace("runs/first-fp16", str(run)), "README.md", "exec"), scope)
    train, evals = scope["train"], scope["evals"]
    assert train.index.tolist() == list(range(1, 16)) and evals.index.tolist() == [0, 6, 12, 14]
    assert train["train/loss"].dtype == float and train.loc[15, "train/loss"] == math.inf
    assert math.isnan(train.loc[15, "train/grad_norm"])


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.mkdir(), "not a run directory"),
        (
            lambda p: (p.mkdir(), (p / "config.yaml").write_text("{}"), (p / "metrics.jsonl").write_text("")),
            "holds no logged training step",
        ),
        (
            lambda p: (
                p.mkdir(),
                (p / "config.yaml").write_text("{}"),
                (p / "metrics.jsonl").write_text('{oops\n{"step": 1}\n'),  # a torn last line is a kill's
            ),
            "not valid JSON lines",
        ),
    ],
)
def test_bad_input_to_compare(tmp_path, make, message):
    bad = tmp_path / "bad"
    make(bad)
    proc = compare(bad)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_fp16_vs_bf16_preset_fp16_skips_where_bf16_does_not(tmp_path, cache_dir):
    """The fp16-collapse preset on the tiny model at the zoo's lr 0.3 (configs/zoo/fp16-collapse.yaml:
    the same collapse at a fraction of the cost; the preset as shipped is the next test's), run from
    outside the checkout: fp16 overflows and dies, bf16 trains on; both runs in one wandb group."""
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "fp16_vs_bf16.py"),
        "--preset",
        "fp16-collapse",
        "--set",
        *TINY[:6],
        "trainer.micro_batch_size=8",
        "trainer.lr=0.3",
        "trainer.max_steps=40",
        "trainer.eval_every=20",
        "trainer.eval_batches=4",
        "trainer.checkpoint_every=0",
        "utils.report_to=none",
        "utils.progress_bar=false",
        f"utils.output_dir={tmp_path}",
        f"utils.cache_dir={cache_dir}",
        "utils.run_name=pair",
    ]
    proc = run_cmd(cmd, 900, cwd=tmp_path)  # from outside the checkout: the shipped configs are found
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fp16, bf16 = load_run(tmp_path / "pair-fp16"), load_run(tmp_path / "pair-bf16")
    f, b = summarize(fp16), summarize(bf16)
    assert f["overflow steps"] >= 10 and f["ended"] == "died at the minimum loss scale"
    assert b["overflow steps"] == 0 and b["ended"] == "finished" and b["steps"] == 40
    assert (tmp_path / "pair-report" / "report.html").exists()
    for run in (fp16, bf16):
        assert run.config["utils"]["wandb_group"] == "pair"
    gave_up = next(e["step"] for e in fp16.events if e["kind"] == "loss_scale_minimum")
    assert f"died at the minimum loss scale: DeepSpeed gave up at step {gave_up}" in proc.stdout
    assert f"spike-{gave_up} (latest)" in proc.stdout
    assert "== fp16 run ended with exit code 3: DeepSpeed's fp16 loss scale hit its minimum" in proc.stdout


@pytest.mark.slow
def test_the_fp16_collapse_preset_does_what_the_readme_says(tmp_path, cache_dir):
    """The preset as shipped, on the full built-in corpus: fp16 overflows on every step from the
    step the README names, DeepSpeed gives up at the step it names; bf16's spike is flagged (a
    detector with action stop ends the bf16 run there, so the test stays short)."""
    readme, preset = (
        (ROOT / "README.md").read_text(),
        (ROOT / "configs/presets/fp16-collapse.yaml").read_text(),
    )
    every_from = int(re.search(r"every step overflows from step (\d+) on", readme).group(1))
    gives_up = int(re.search(r"DeepSpeed gives up at its minimum at step (\d+)", readme).group(1))
    spike_at = int(re.search(r"both runs spike at step (\d+)", readme, re.I).group(1))
    assert f"from step {every_from} on" in preset and f"at step {gives_up}" in preset

    def run(name: str, ds: str, *extra: str):
        proc = python_train(
            "--ds_config",
            str(ROOT / "ds_configs" / ds),
            "--preset",
            "fp16-collapse",
            "--set",
            f"utils.output_dir={tmp_path}",
            f"utils.cache_dir={cache_dir}",
            f"utils.run_name={name}",
            "utils.report_to=none",
            "utils.progress_bar=false",
            *extra,
            timeout=900,
        )
        return proc, load_run(tmp_path / name)

    proc, fp16 = run("fp16", "zero2_fp16.json")
    assert proc.returncode == 3, proc.stderr[-3000:]
    steps, overflow = fp16.series("train/overflow")
    assert [s for s, o in zip(steps, overflow) if s >= every_from and not o] == []
    assert not overflow[steps.index(every_from - 1)]
    assert next(e["step"] for e in fp16.events if e["kind"] == "loss_scale_minimum") == gives_up
    assert fp16.status["step"] == gives_up - 1  # the failed step is never applied
    assert (tmp_path / "fp16" / "checkpoints" / f"spike-{gives_up}").is_dir()

    proc, bf16 = run("bf16", "zero2_bf16.json", "trainer.spikes.action=stop")
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert [(e["step"], e["kind"]) for e in bf16.events] == [(spike_at, "loss_spike")]
    assert yaml.safe_load((tmp_path / "bf16" / "config.yaml").read_text())["trainer"]["max_steps"] == 100
