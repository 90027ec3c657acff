"""Train a causal LM inside a DeepSpeed engine: ``deepspeed scripts/train.py --ds_config ds_configs/zero2_fp16.json``."""

import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dsinstab.commands.train import main  # noqa: E402

if __name__ == "__main__":
    code = main()
    # Everything is saved, closed and flushed by now. Skip the interpreter's teardown, where threads
    # of torch.distributed can abort the process ("terminate called without an active exception",
    # exit -6 instead of the run's own code) now and then.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
