"""``scripts/sweep.py``: the command line of a sweep (:mod:`dsinstab.experiments.sweep`).

Reads and resolves the grid, then runs one point (``--point``, what the emitted commands call),
emits the commands for a scheduler (``--emit``), or runs the points still to do here and writes
the LR-sensitivity report (:mod:`dsinstab.reports.sweep_report`). Bad input exits 2 with one
sentence and nothing written.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from dsinstab.experiments.sweep import (
    SWEEP,
    Grid,
    Point,
    emit,
    load_grid,
    plan,
    read_status,
    run_local,
    train_command,
)
from dsinstab.run.config import ConfigError
from dsinstab.run.resolve import add_set_argument, find_path
from dsinstab.run.status import EXIT_BAD_INPUT, EXIT_INTERRUPTED

# what a caller of the command drives a grid with, from the one module
__all__ = ["load_grid", "main", "parse_args", "plan", "read_status", "run_point", "train_command"]

EXAMPLES = """\
examples:
  # the quick LR-sensitivity grid on a CPU, two points at a time; report in runs/lr-sensitivity-quick/report/
  python scripts/sweep.py configs/sweeps/lr-sensitivity-quick.yaml --parallel 2
  # fp16 against bf16 across learning rates, on every GPU of this machine (one point per GPU)
  python scripts/sweep.py configs/sweeps/fp16-vs-bf16-lr.yaml
  # a SLURM array instead (one GPU per point), then the analysis once it has run
  python scripts/sweep.py configs/sweeps/lr-sensitivity.yaml --emit slurm
  python scripts/sweep.py configs/sweeps/lr-sensitivity.yaml --analyze-only

A killed or interrupted sweep continues where it was when run again: points that ended
(finished, died at the minimum loss scale, stopped by a detector) are skipped, the rest resume
from their latest checkpoint or start over. docs/sweeps.md describes the grid file and the report.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="sweep.py",
        description="Train a grid of runs (learning rates x variants x seeds) and report LR sensitivity.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("grid", metavar="GRID.yaml", help="the grid (configs/sweeps/ has ready ones)")
    p.add_argument(
        "--parallel",
        type=int,
        default=None,
        metavar="N",
        help="points at a time (default: one per GPU; 1 on a CPU, whose cores the points share)",
    )
    p.add_argument(
        "--emit",
        choices=("commands", "slurm"),
        default=None,
        help="write commands.txt or sweep.sbatch into the sweep folder instead of running",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="the sweep folder (default: <utils.output_dir>/<grid name>, e.g. runs/lr-sensitivity)",
    )
    p.add_argument(
        "--analyze-only",
        "--analyze_only",
        dest="analyze_only",
        action="store_true",
        help="only write the report from the run directories there are",
    )
    p.add_argument(
        "--point",
        default=None,
        metavar="NAME|INDEX",
        help="run one point (what the emitted commands call): skipped if ended, resumed if it can be",
    )
    add_set_argument(p, argparse.SUPPRESS)  # hidden: grids carry their overrides
    args = p.parse_args(argv)
    if args.parallel is not None and args.parallel < 1:
        p.error("--parallel must be at least 1")
    return args


def run_then_report(grid: Grid, parallel: int | None, analyze_only: bool, report) -> int:
    """Run the points still to do (unless ``analyze_only``), then ``report()`` and print what it
    says; an interrupted run writes no report. The exit code is the runs' own."""
    code = 0 if analyze_only else run_local(grid, parallel)
    if code != EXIT_INTERRUPTED:
        print(report())
    return code


def run_point(grid: Grid, which: str) -> int:
    """``--point NAME|INDEX``: the one point, decided when it starts (a scheduler may requeue it)."""
    point = _find_point(grid, which)
    mode = plan(point)
    if mode == "done":
        print(f"{point.name}: already ended ({read_status(point.run_dir).get('state')}); nothing to do")
        return 0
    cmd = train_command(point, mode)
    print(f"{point.name} ({mode}): {shlex.join(cmd)}", flush=True)
    os.execv(cmd[0], cmd)  # the point's exit code is train.py's own


def _find_point(grid: Grid, which: str) -> Point:
    if which.isdigit() and int(which) < len(grid.points):
        return grid.points[int(which)]
    for p in grid.points:
        if p.name == which:
            return p
    raise ConfigError(
        f"--point: {which!r} is neither a point of {grid.path} nor an index below {len(grid.points)}; "
        f"points: {', '.join(p.name for p in grid.points[:4])}, ..."
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.overrides:
            raise ConfigError(
                "--set: put overrides in the grid file (set: or a variant's set:), not on the command line."
            )
        grid = load_grid(find_path(args.grid), args.out)
        if args.point is not None:
            return run_point(grid, args.point)
        if args.emit:
            path = emit(grid, args.emit, args.parallel)
            print(f"wrote {path}")
            print(f"once the points have run: python {SWEEP} {args.grid} --out {grid.out} --analyze-only")
            return 0
        from dsinstab.reports.sweep_report import write_sweep_report

        def report() -> str:
            return f"report: {write_sweep_report(grid) / 'report.html'} (and report.md, *.png)"

        return run_then_report(grid, args.parallel, args.analyze_only, report)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
