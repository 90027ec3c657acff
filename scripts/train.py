"""Train a causal LM inside a DeepSpeed engine: ``deepspeed scripts/train.py --ds_config ds_configs/zero2_fp16.json``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dsinstab.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
