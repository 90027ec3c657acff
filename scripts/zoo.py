"""The instability zoo: ``python scripts/zoo.py [--quick] [--only CASE ...] [--parallel N] [--out DIR]``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dsinstab.commands.zoo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
