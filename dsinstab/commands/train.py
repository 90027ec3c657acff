"""``scripts/train.py``: parse the command line, check everything, build the run, train.

Nothing is written to the run directory until the config, the ds_config, the data and the model
have all been checked; bad input exits with code 2 and one sentence.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

from tqdm import tqdm

from dsinstab.run.config import ConfigError, RunConfig, precision, to_yaml
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
    one). A dry run also checks the run directory, which a run decides on rank 0 once started."""
    from dsinstab.run.data import corpus_spec

    corpus_spec(cfg.dataset)
    if args.dry_run and cfg.utils.run_name:
        run_dir = Path(cfg.utils.output_dir).expanduser() / cfg.utils.run_name
        # DeepSpeed's logger, made when check_run_dir imports it, prints to stdout: keep the YAML clean
        with contextlib.redirect_stdout(sys.stderr):
            check_run_dir(run_dir, args.resume, args.overwrite)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg, notes = resolve(args, int(os.environ.get("WORLD_SIZE", "1")))
        preflight(cfg, args)
        if args.dry_run:
            print(to_yaml(cfg), end="")
            return 0
        return launch(cfg, args, notes)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def check_run_dir(run_dir: Path, resume: str | None, overwrite: bool) -> None:
    """Decided on global rank 0 and broadcast: another node may see no such folder, or an old one."""
    from dsinstab.run.checkpoint import on_rank_zero

    on_rank_zero(_check_run_dir, run_dir, resume, overwrite)


def _check_run_dir(run_dir: Path, resume: str | None, overwrite: bool) -> None:
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other; pick one.")
    if resume and not run_dir.is_dir():
        raise ConfigError(
            f"--resume {resume}: {run_dir} does not exist; check utils.run_name and utils.output_dir."
        )
    if not resume and not overwrite and run_dir.exists():
        raise ConfigError(
            f"utils.run_name: {run_dir} already exists; pass --resume latest to continue it, "
            "--overwrite to start over, or another utils.run_name."
        )
    parent = run_dir.parent
    while not parent.exists():
        parent = parent.parent
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        raise ConfigError(f"utils.output_dir: {parent} cannot be written ({e.strerror}).") from None


def launch(cfg: RunConfig, args: argparse.Namespace, notes: list[str]) -> int:
    from dsinstab.run.distributed import process_group

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    faulthandler.enable()  # a crashing rank (SIGSEGV, SIGABRT, ...) prints where each thread was
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: where a hung rank waits
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

    def log(msg: str) -> None:
        print(f"dsinstab: {msg}", file=sys.stderr, flush=True)

    with process_group(log) as (rank, world):
        return build_and_train(cfg, args, notes, rank, world)


def build_and_train(cfg: RunConfig, args: argparse.Namespace, notes: list[str], rank: int, world: int) -> int:
    import deepspeed.comm as dist

    from dsinstab.experiments.branch import Branch, open_branch, start_branch
    from dsinstab.instruments.diagnostics import Diagnostics
    from dsinstab.instruments.mitigations import mitigation_plugins
    from dsinstab.instruments.overflow import overflow_plugins
    from dsinstab.instruments.spikes import SpikeMonitor
    from dsinstab.run import loop
    from dsinstab.run.checkpoint import Checkpointer, data_layout
    from dsinstab.run.data import BatchOrder, prepare_data
    from dsinstab.run.engine import apply_optimizer_config, build_engine
    from dsinstab.run.model import build_model, count_parameters
    from dsinstab.run.plugins import Plugins
    from dsinstab.run.state import restore
    from dsinstab.run.tracking import NullSink, open_sink

    def say(msg: str) -> None:
        if rank == 0:
            tqdm.write(msg)

    for note in notes:
        say(note)
    t_start = time.time()
    u, t, m = cfg.utils, cfg.trainer, cfg.model
    if not u.run_name:
        name = [f"{Path(cfg.ds_config_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"]
        dist.broadcast_object_list(name, src=0)
        u.run_name = name[0]
    run_dir = Path(u.output_dir).expanduser() / u.run_name
    check_run_dir(run_dir, args.resume, args.overwrite)

    data = prepare_data(cfg.dataset, m.seq_len, u.cache_dir, log=say)
    order = BatchOrder(len(data.train), t.micro_batch_size, world, rank, t.seed)  # refuses a too-small corpus
    model = build_model(m, cfg.dataset.vocab_size, data.eos_id, t.seed)
    n_params = count_parameters(model)  # before ZeRO-3 partitions the parameters away
    engine = build_engine(model, t, cfg.ds_config)
    layout = data_layout(cfg, world, Path(data.cache_path).name)
    checkpointer = Checkpointer(engine, run_dir, t.keep_checkpoints, rank == 0, layout)
    tag = checkpointer.resolve(args.resume) if args.resume else None  # refuses a changed data layout
    source = open_branch(args, engine, cfg, layout)  # None unless --branch; refuses what cannot apply
    say(
        f"model: {m.arch}, {n_params / 1e6:.2f}M parameters; {precision(cfg.ds_config)}, "
        f"ZeRO-{cfg.ds_config.get('zero_optimization', {}).get('stage', 0)}, {world} rank(s)"
    )
    say(f"data: {len(data.train)} train / {len(data.validation)} validation blocks of {m.seq_len + 1} tokens")

    # Everything is checked: from here on the run directory is written.
    if rank == 0:
        if args.overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        # each segment's config is kept: config.yaml is the first, never overwritten
        segment = f"config-resume-{checkpointer.saved_step(tag)}.yaml" if tag else "config.yaml"
        (run_dir / segment).write_text(to_yaml(cfg))
        model.config.save_pretrained(run_dir / "hf")  # zero_to_fp32.py can write weights beside it
        data.save_tokenizer(run_dir / "hf")  # so the converted model can decode the spiking batch
    dist.barrier()
    branch = Branch()  # inert unless this run is a branch (then its state, checkpointed, says how)
    run = loop.Run(
        cfg=cfg,
        engine=engine,
        model=model,
        data=data,
        order=order,
        monitor=SpikeMonitor(t.spikes, precision(cfg.ds_config) == "fp16"),
        checkpointer=checkpointer,
        plugins=Plugins(
            [
                Diagnostics(t.diagnostics, model, engine, t.adam_eps, t.adam_beta2),
                *overflow_plugins(t, model, engine),
                *mitigation_plugins(t, model, engine),
                branch,
            ]
        ),
        sink=NullSink(),
        run_dir=run_dir,
        rank=rank,
        world=world,
        say=say,
    )
    if rank == 0:
        run.sink = open_sink(run_dir, u.report_to, u.wandb_project, u.run_name, cfg.to_dict(), bool(tag))
    if tag:
        restore(run, checkpointer.load(tag))
        run.sink.rewind(run.step, events=True)  # what came after the checkpoint is logged again
        say(f"resumed from {tag} at step {run.step}")
        changed = apply_optimizer_config(engine, t)  # DeepSpeed loads the saved ones; --set wins
        if changed:
            say(f"optimizer settings changed on resume: {', '.join(changed)}")
    if source:
        say(start_branch(run, branch, source))
    loop.write_status(run, "running", None)
    say(f"run directory: {run_dir}  (ready in {time.time() - t_start:.1f}s)")
    try:
        code = loop.train(run)
    finally:
        run.sink.close()
    if rank == 0:  # how the run ended, what it wrote, and the command that makes its report
        from dsinstab.reports.report import run_summary

        say(run_summary(run_dir))
    return code
