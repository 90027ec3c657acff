"""Replay a spike from its checkpoint, with interventions: ``python scripts/replay.py RUN --at STEP``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dsinstab.commands.replay import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
