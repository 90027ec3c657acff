"""The comparison report on real runs, the fp16-vs-bf16 command, and bad input to compare."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest

from conftest import ROOT, assert_ok, ds_config, launch, run_cmd, train_rows
from dsinstab.report import load_run, summarize

PNGS = {"overview.png", "loss.png", "grad_norm.png", "loss_scale.png", "loss_difference.png"}


def compare(*args) -> subprocess.CompletedProcess:
    return run_cmd([sys.executable, str(ROOT / "scripts" / "compare.py"), *map(str, args)], 300)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, cache_dir):
    tmp = tmp_path_factory.mktemp("pair")
    ds = ds_config(tmp, "zero2_fp16", fp16={"initial_scale_power": 24, "hysteresis": 1})
    proc, fp16 = launch(tmp, cache_dir, "trainer.max_steps=14", name="fp16", ds=ds)
    assert_ok(proc)
    proc, bf16 = launch(tmp, cache_dir, "trainer.max_steps=10", name="bf16", ds="zero2_bf16")
    assert_ok(proc)
    return fp16, bf16


def test_compare_writes_every_plot_and_a_table_of_the_runs_numbers(tmp_path, two_runs):
    fp16, bf16 = two_runs
    proc = compare(fp16, bf16, "--out", tmp_path / "rep")
    assert proc.returncode == 0, proc.stderr
    assert "differ in length (fp16: 14 steps, bf16: 10 steps)" in proc.stdout
    out = tmp_path / "rep"
    assert PNGS <= {p.name for p in out.glob("*.png")}
    assert all((out / p).stat().st_size > 10_000 for p in PNGS)
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(list(out.glob("*.png")))  # self-contained

    rows = train_rows(fp16)
    overflow = sum(r["train/overflow"] for r in rows)
    assert overflow >= 4  # 2^24 overflows until the scale comes down
    s = summarize(load_run(fp16))
    assert s["overflow steps"] == overflow and s["steps"] == 14 and s["ended"] == "finished"
    flags = [r["train/overflow"] for r in rows]
    longest = max(len(list(g)) for k, g in itertools.groupby(flags) if k)
    assert s["longest overflow run"] == longest and s["first overflow"] == flags.index(1) + 1
    table_row = next(line for line in md.splitlines() if line.startswith("| fp16 |"))
    cells = [c.strip() for c in table_row.strip("|").split("|")]
    assert cells[1] == "fp16" and cells[3] == "14" and cells[9] == str(overflow)
    assert f"{s['final eval loss']:.4g}" in table_row
    assert "bf16 (bf16): finished after 10 steps" in md


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


def test_fp16_vs_bf16_preset_fp16_skips_where_bf16_does_not(tmp_path, cache_dir):
    """The fp16-collapse preset, shortened: fp16 overflows and dies, bf16 trains on."""
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "fp16_vs_bf16.py"),
        "--preset",
        "fp16-collapse",
        "--set",
        "trainer.max_steps=40",
        "trainer.checkpoint_every=0",
        "utils.report_to=none",
        "utils.progress_bar=false",
        f"utils.output_dir={tmp_path}",
        f"utils.cache_dir={cache_dir}",
        "utils.run_name=pair",
        "dataset.max_chars=2000000",
    ]
    proc = run_cmd(cmd, 900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fp16, bf16 = summarize(load_run(tmp_path / "pair-fp16")), summarize(load_run(tmp_path / "pair-bf16"))
    assert fp16["overflow steps"] >= 10 and fp16["ended"] == "died at the minimum loss scale"
    assert bf16["overflow steps"] == 0 and bf16["ended"] == "finished" and bf16["steps"] == 40
    assert (tmp_path / "pair-report" / "report.html").exists()
