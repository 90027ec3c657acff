"""benchmarks/run.py: every section runs (``--smoke``) and its table has the right shape; its input
is checked; ``--out`` keeps what a document says around the table. Timings are not tested (the
figures are in docs/benchmarks.md)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys

import pytest

from conftest import ROOT, assert_ok, run_cmd

RUN = ROOT / "benchmarks" / "run.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_run", RUN)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def table_rows(text: str, begin: str, end: str) -> list[list[str]]:
    table = text.split(begin, 1)[1].split(end, 1)[0]
    lines = [ln for ln in table.splitlines() if ln.startswith("|")]
    assert lines[:2] == ["| measurement | result |", "| --- | --- |"], table
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]


@pytest.mark.slow
def test_smoke_runs_every_section_and_writes_a_well_formed_table_between_the_markers(tmp_path, bench):
    doc = tmp_path / "benchmarks.md"
    begin, end = bench.TABLE_BEGIN, bench.TABLE_END
    doc.write_text(f"# Benchmarks\n\nWhat was run.\n\n{begin}\nthe old table\n{end}\n\nHow to read it.\n")
    # a ds_config by its path (a bare name works too); fp32: every CPU has native kernels for it
    cmd = [sys.executable, str(RUN), "--smoke", "--ds", "ds_configs/zero2_fp32.json", "--out", str(doc)]
    proc = run_cmd(cmd, int(os.environ.get("DSINSTAB_SMOKE_TIMEOUT", "900")))
    assert_ok(proc)
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nWhat was run.\n\n") and text.endswith(
        f"{end}\n\nHow to read it.\n"
    )
    assert "the old table" not in text
    rows = table_rows(text, begin, end)
    assert all(len(r) == 2 for r in rows), rows
    labels = "\n".join(r[0] for r in rows)
    for expected in (
        "tokenize + pack the built-in corpus",
        "time to first step, cold cache",
        "time to first step, warm cache",
        "bare DeepSpeed loop: tokens/s",
        "dsinstab loop: tokens/s",
        "dsinstab, diagnostics every 50 steps",
        "dsinstab, diagnostics every step",
        "plain PyTorch loop (fp32)",
        "transformers Trainer + DeepSpeed (same ds_config)",
        "transformers Trainer, no DeepSpeed (fp32)",  # the Trainer follows the ds_config's precision
        "torch.matmul peak on cpu (torch.float32",
        "dsinstab model FLOPs",
        "preset, tiny shape (smoke) bf16",
        "preset, tiny shape (smoke) fp16",
        "spike checkpoint save",
        "ZeRO-2 fp32, 2 rank(s)",
    ):
        assert expected in labels, f"no row for {expected!r} in\n{labels}"
    # the other benchmark modules' sections, where this checkout has them
    for module, row in (("precision", "bf16/fp32"), ("data_prep", "prepare a generated ")):
        if (ROOT / "benchmarks" / f"{module}.py").exists():
            assert row in "\n".join(f"{k} {v}" for k, v in rows), f"no {module} row"
    measured = re.compile(r"tokens/s|peak|MFU|FLOPs|first step|checkpoint save|corpus|tokenize")
    for label, value in rows:
        assert not re.search(r"\b(nan|inf)\b", value, re.I), (label, value)
        if measured.search(label):
            numbers = [float(x.replace(",", "")) for x in re.findall(r"\d[\d,]*(?:\.\d+)?", value)]
            assert numbers and all(x > 0 for x in numbers), (label, value)
    assert "dsinstab benchmarks (smoke)" in proc.stdout


def test_ds_takes_a_name_or_a_path_and_bad_input_is_one_sentence(tmp_path, bench, capsys):
    assert bench.ds_path("zero2_fp32") == ROOT / "ds_configs" / "zero2_fp32.json"
    assert (
        bench.ds_path(str(ROOT / "ds_configs" / "zero2_fp32.json")) == ROOT / "ds_configs" / "zero2_fp32.json"
    )
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    no_markers = tmp_path / "notes.md"
    no_markers.write_text("# notes a person wrote\n")
    for argv, says in (
        (["--ds", "zero9_fp8"], "--ds: 'zero9_fp8' is not in ds_configs/; pick one of zero0_bf16,"),
        (["--ds", "ds_configs/ds_configs/zero2_fp32.json"], "is not a file"),
        (["--ds", str(broken)], str(broken)),
        (["--out", str(no_markers)], "exists without the lines"),
    ):
        assert bench.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and says in err and "\n" not in err, err
    assert no_markers.read_text() == "# notes a person wrote\n"


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "ds_configs").glob("*.json")))
def test_the_trainer_sides_compute_in_the_ds_configs_precision(bench, name):
    cfg = bench.config(bench.ds_path(name))
    flags = bench.trainer_precision(cfg.ds_config)
    prec = json.loads((ROOT / "ds_configs" / f"{name}.json").read_text())
    assert flags == {
        "bf16": prec.get("bf16", {}).get("enabled", False),
        "fp16": prec.get("fp16", {}).get("enabled", False),
    }


def test_out_replaces_only_the_table(tmp_path, bench):
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n{bench.TABLE_BEGIN}\nold\n{bench.TABLE_END}\noutro\n")
    bench.write_out(doc, "| measurement | result |\n| --- | --- |\n| a | 1 |")
    assert doc.read_text() == (
        f"intro\n{bench.TABLE_BEGIN}\n| measurement | result |\n| --- | --- |\n| a | 1 |\n{bench.TABLE_END}\noutro\n"
    )
    new = tmp_path / "new.md"
    bench.check_out(new)
    bench.write_out(new, "T")
    assert new.read_text() == f"{bench.TABLE_BEGIN}\nT\n{bench.TABLE_END}\n"
    # the shipped document carries the markers, so the documented command keeps its explanations
    bench.check_out(ROOT / "docs" / "benchmarks.md")
