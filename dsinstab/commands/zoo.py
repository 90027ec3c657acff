"""``scripts/zoo.py``: run the instability zoo and write its scoreboard (:mod:`dsinstab.experiments.zoo`).

Every case's baseline and every mitigation that applies, over the seeds; ``--quick`` the baseline and
the documented fixes over 3 seeds, in the quick setting. Locally N runs at a time (a killed zoo
continues where it was when run again), or ``--emit`` for a scheduler; then the scoreboard
(:mod:`dsinstab.reports.zoo_report`). Bad input exits 2 with one sentence and nothing written.
"""

from __future__ import annotations

import argparse
import sys

from dsinstab.commands.sweep import run_point, run_then_report
from dsinstab.experiments.sweep import emit
from dsinstab.experiments.zoo import DEFAULT_SHAPE, ZOO, load_zoo
from dsinstab.reports.zoo_report import write_scoreboard
from dsinstab.run.config import ConfigError
from dsinstab.run.resolve import find_path
from dsinstab.run.status import EXIT_BAD_INPUT

EXAMPLES = """\
examples:
  # the quick zoo on a CPU: every case's baseline and documented fix, 3 seeds, two runs at a time
  python scripts/zoo.py --quick --parallel 2
  # one case, every mitigation that applies, 5 seeds
  python scripts/zoo.py --only fp16-collapse --seeds 5
  # the full zoo for GPUs on the 124M shape: a SLURM array (one GPU per run), then the scoreboard
  python scripts/zoo.py --shape gpt2-124m --emit slurm
  python scripts/zoo.py --shape gpt2-124m --analyze-only

The scoreboard is OUT/scoreboard.md, scoreboard.html (self-contained) and scoreboard.json;
docs/zoo.md describes the cases, what "unstable" means for each, and how to add one.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="zoo.py",
        description="Reproduce each named instability across seeds and score which mitigation fixes it.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick", action="store_true", help="the quick setting: baseline and documented fixes, 3 seeds"
    )
    p.add_argument("--only", nargs="+", default=None, metavar="CASE", help="these cases only (default: all)")
    p.add_argument("--seeds", type=int, default=None, metavar="N", help="the first N seeds of each case")
    p.add_argument(
        "--variants",
        nargs="+",
        default=None,
        metavar="NAME",
        help="these mitigations only (the baseline always)",
    )
    p.add_argument(
        "--parallel", type=int, default=None, metavar="N", help="runs at a time (default: 1 on a CPU)"
    )
    p.add_argument(
        "--emit", choices=("commands", "slurm"), default=None, help="write commands.txt or sweep.sbatch"
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="the zoo folder (default: runs/zoo, runs/zoo-quick with --quick)",
    )
    p.add_argument(
        "--cases", default=str(ZOO), metavar="DIR", help="the folder of case files (default: configs/zoo)"
    )
    p.add_argument("--analyze-only", "--analyze_only", dest="analyze_only", action="store_true",
                   help="only write the scoreboard from the run directories there are")  # fmt: skip
    p.add_argument("--shape", default=DEFAULT_SHAPE, metavar="NAME",
                   help=f"the model and data every case trains, from configs/zoo/shapes.yaml (default: {DEFAULT_SHAPE})")  # fmt: skip
    p.add_argument("--point", default=None, metavar="CASE/NAME|INDEX", help="run one run (what --emit calls)")
    args = p.parse_args(argv)
    # the quick and the full setting train different runs under the same names: never one folder
    args.out = args.out or (
        "runs/zoo-quick"
        if args.quick
        else "runs/zoo" + ("" if args.shape == DEFAULT_SHAPE else f"-{args.shape}")
    )
    if args.parallel is not None and args.parallel < 1:
        p.error("--parallel must be at least 1")
    if args.seeds is not None and args.seeds < 1:
        p.error("--seeds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        zoo = load_zoo(
            find_path(args.cases), args.out, args.only, args.quick, args.seeds, args.variants, args.shape
        )
        if args.point is not None:
            return run_point(zoo.grid, args.point)
        if args.emit:
            print(f"wrote {emit(zoo.grid, args.emit, args.parallel)}")
            return 0

        def report() -> str:
            return f"scoreboard: {write_scoreboard(zoo) / 'scoreboard.md'} (and scoreboard.html, scoreboard.json)"

        return run_then_report(zoo.grid, args.parallel, args.analyze_only, report)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
