"""The benchmark entry point stays runnable (its timings are not tests: docs/benchmarks.md)."""

from __future__ import annotations

import sys

from conftest import ROOT, assert_ok, run_cmd


def test_the_benchmark_script_imports_and_explains_itself():
    proc = run_cmd([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--help"], 120)
    assert_ok(proc)
    assert "--quick" in proc.stdout and "--out" in proc.stdout
