"""Compare runs side by side: ``python scripts/compare.py RUN_DIR [RUN_DIR ...] [--out DIR]``."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dsinstab.reports.report import report_command  # noqa: E402

EXAMPLES = """\
examples:
  python scripts/compare.py runs/first-fp16 runs/first-bf16 --out runs/first-report
  python scripts/compare.py runs/attn-no-qknorm runs/attn-qknorm    # writes runs/attn-no-qknorm/report/

It writes report.html (self-contained: open it in a browser), report.md and one PNG per plot;
docs/reading-the-report.md explains every plot and column.
"""


def main() -> int:
    p = argparse.ArgumentParser(
        description="Plots and a report comparing dsinstab runs, aligned by step.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="run directories (the first two get the loss difference)"
    )
    p.add_argument("--out", default=None, help="output folder (default: report/ inside the first run)")
    args = p.parse_args()
    return 0 if report_command(args.runs, args.out) else 2


if __name__ == "__main__":
    sys.exit(main())
