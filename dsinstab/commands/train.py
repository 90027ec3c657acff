"""``scripts/train.py``: parse the command line, check everything, build the run, train.

Nothing is written to the run directory until the config, the ds_config, the data and the model
have all been checked; bad input exits with code 2 and one sentence.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import logging
import signal
import sys
import warnings
from pathlib import Path

from dsinstab.run.config import ConfigError, RunConfig, to_yaml
from dsinstab.run.distributed import world_size_from_env
from dsinstab.run.resolve import (
    DEFAULT_DS_CONFIG,
    ROOT,
    add_set_argument,
    ds_configs_help,
    presets_help,
    resolve,
)
from dsinstab.run.status import EXIT_CODES

EXAMPLES = """\
examples:
  # the default run: bf16, ZeRO-2, 400 steps of a 4.3M-parameter Llama-style model
  deepspeed scripts/train.py
  # fp16 at a higher learning rate, under a name of your own
  deepspeed scripts/train.py --ds_config ds_configs/zero2_fp16.json --set trainer.lr=1e-2 utils.run_name=fp16-lr1e-2
  # a preset, and a ds_config by its bare name (ds_configs/NAME.json)
  deepspeed scripts/train.py --ds_config zero2_fp16 --preset fp16-collapse
  # two ranks (on a CPU: two processes), ZeRO-3
  deepspeed --num_gpus 2 scripts/train.py --ds_config ds_configs/zero3_bf16.json
  # continue a run from its latest checkpoint
  deepspeed scripts/train.py --ds_config ds_configs/zero2_fp16.json --resume latest --set utils.run_name=fp16-lr1e-2
  # check everything, print the resolved config, exit
  python scripts/train.py --dry-run --set model.arch=qwen3

Paths are taken relative to the working directory first, then to the checkout ({root}),
so the shipped configs work from any directory. Runs land in <utils.output_dir>/<utils.run_name>
(default runs/<ds_config>-<date>-<time>, below the working directory).
"""


def exit_codes_help() -> str:
    return "exit codes:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES.items())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train a causal LM in a DeepSpeed engine; watch every step for loss spikes, "
        "fp16 overflows and divergence.",
        epilog="\n\n".join(
            [EXAMPLES.format(root=ROOT), presets_help(), ds_configs_help(), exit_codes_help()]
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--ds_config",
        default=DEFAULT_DS_CONFIG,
        metavar="PATH|NAME",
        help="DeepSpeed JSON config: precision, ZeRO stage, fp16 loss scaler (default: %(default)s)",
    )
    p.add_argument(
        "--config_dir",
        default="configs",
        metavar="DIR",
        help="folder with trainer/model/dataset/utils.yaml (default: %(default)s)",
    )
    p.add_argument(
        "--preset",
        default=None,
        metavar="NAME|PATH",
        help="a YAML of sections applied on top: a name under <config_dir>/presets/ (listed below) "
        "or a path (default: none)",
    )
    add_set_argument(
        p,
        "override any key, applied last, e.g. --set trainer.lr=1e-2 trainer.spikes.action=rollback "
        "utils.run_name=bf16-lr1e-2",
    )
    p.add_argument(
        "--dry-run",
        "--dry_run",
        dest="dry_run",
        action="store_true",
        help="check everything the run checks without loading data, print the resolved config "
        "(ds_config included) and exit",
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="latest|TAG",
        help="continue the run named by utils.run_name from a checkpoint (default: start fresh)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="delete an existing run directory of the same name"
    )
    p.add_argument(
        "--branch",
        default=None,
        metavar="RUN/checkpoints/TAG",
        help="start this new run from another run's checkpoint (weights, Adam moments, step, data "
        "position, schedule) with this run's config; see docs/forensics.md (default: start fresh)",
    )
    p.add_argument(
        "--intervene",
        nargs="+",
        action="extend",
        default=[],
        metavar="SPEC",
        help="with --branch: skip=FIRST-LAST (leave out those steps' batches), reshuffle=K (another "
        "batch order), reset_adam (zero Adam's moments)",
    )
    p.add_argument(
        "--stop_at",
        type=int,
        default=None,
        metavar="STEP",
        help="with --branch: finish at this step; the lr schedule still spans trainer.max_steps",
    )
    p.add_argument(
        "--local_rank", type=int, default=None, help=argparse.SUPPRESS
    )  # set by the deepspeed launcher
    return p.parse_args(argv)


def preflight(cfg: RunConfig, args: argparse.Namespace) -> None:
    """The checks the run makes that need no data loaded, on every rank before anything starts:
    the corpus exists (a hub source has a name, a local path matches files, a saved dataset is
    one), and every plug-in the config switches on can serve it. A dry run also checks the run
    directory, which a run decides on rank 0 once started."""
    from dsinstab.run.corpus import corpus_spec

    corpus_spec(cfg.dataset)
    # DeepSpeed's logger, made when the instruments import it, prints to stdout: keep the YAML clean
    with contextlib.redirect_stdout(sys.stderr):
        from dsinstab.commands.build_run import check_run_dir
        from dsinstab.instruments import registry

        registry.check(cfg)
        if args.dry_run and cfg.utils.run_name:
            check_run_dir(
                Path(cfg.utils.output_dir).expanduser() / cfg.utils.run_name, args.resume, args.overwrite
            )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg, notes = resolve(args, world_size_from_env())
        preflight(cfg, args)
        if args.dry_run:
            print(to_yaml(cfg), end="")
            return 0
        return launch(cfg, args, notes)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def launch(cfg: RunConfig, args: argparse.Namespace, notes: list[str]) -> int:
    from dsinstab.run.distributed import process_group

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    faulthandler.enable()  # a crashing rank (SIGSEGV, SIGABRT, ...) prints where each thread was
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: where a hung rank waits
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

    def log(msg: str) -> None:
        print(f"dsinstab: {msg}", file=sys.stderr, flush=True)

    with process_group(log) as (rank, world):
        from dsinstab.commands.build_run import build_and_train  # torch, DeepSpeed: not for --help

        return build_and_train(cfg, args, notes, rank, world)
