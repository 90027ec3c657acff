"""A grid of runs and its LR-sensitivity report: ``python scripts/sweep.py GRID.yaml [--parallel N] [--emit commands|slurm]``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dsinstab.commands.sweep import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
