"""``scripts/train.py``: parse the command line, check everything, build the run, train.

Nothing is written to the run directory until the config, the ds_config, the data and the model
have all been checked; bad input exits with code 2 and one sentence.
"""

from __future__ import annotations

import argparse
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

from dsinstab.config import (
    ConfigError,
    RunConfig,
    load_config,
    precision,
    read_ds_config,
    resolve_ds_config,
    to_yaml,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train.py", description="Train a causal LM in a DeepSpeed engine.")
    p.add_argument("--ds_config", default="ds_configs/zero2_bf16.json", help="DeepSpeed JSON config")
    p.add_argument("--config_dir", default="configs", help="folder with trainer/model/dataset/utils.yaml")
    p.add_argument(
        "--preset",
        default=None,
        help="a YAML of sections applied on top (name under configs/presets/ or a path)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a key, e.g. --set trainer.lr=1e-2 utils.run_name=bf16-lr1e-2",
    )
    p.add_argument(
        "--dry-run",
        "--dry_run",
        dest="dry_run",
        action="store_true",
        help="print the resolved config (ds_config included) and exit",
    )
    p.add_argument("--resume", default=None, metavar="latest|TAG", help="continue the run from a checkpoint")
    p.add_argument(
        "--overwrite", action="store_true", help="delete an existing run directory of the same name"
    )
    p.add_argument(
        "--local_rank", type=int, default=None, help=argparse.SUPPRESS
    )  # set by the deepspeed launcher
    return p.parse_args(argv)


def resolve(args: argparse.Namespace, world_size: int) -> tuple[RunConfig, list[str]]:
    cfg = load_config(args.config_dir, args.overrides, args.preset)
    cfg.ds_config, notes = resolve_ds_config(read_ds_config(args.ds_config), args.ds_config, cfg, world_size)
    cfg.ds_config_path = str(args.ds_config)
    return cfg, notes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg, notes = resolve(args, int(os.environ.get("WORLD_SIZE", "1")))
        if args.dry_run:
            print(to_yaml(cfg), end="")
            return 0
        return launch(cfg, args, notes)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def check_run_dir(run_dir: Path, resume: str | None, overwrite: bool) -> None:
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
    from dsinstab.engine import process_group

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

    from dsinstab import loop
    from dsinstab.checkpoint import Checkpointer
    from dsinstab.data import BatchOrder, prepare_data
    from dsinstab.diagnostics import Diagnostics
    from dsinstab.engine import build_engine
    from dsinstab.model import build_model, count_parameters
    from dsinstab.spikes import SpikeMonitor
    from dsinstab.tracking import NullSink, open_sink

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
    checkpointer = Checkpointer(engine, run_dir, t.keep_checkpoints, rank == 0)
    tag = checkpointer.resolve(args.resume) if args.resume else None
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
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        model.config.save_pretrained(run_dir / "hf")  # zero_to_fp32.py can write weights beside it
    dist.barrier()
    run = loop.Run(
        cfg=cfg,
        engine=engine,
        model=model,
        data=data,
        order=order,
        monitor=SpikeMonitor(t.spikes, precision(cfg.ds_config) == "fp16"),
        checkpointer=checkpointer,
        diagnostics=Diagnostics(t.diagnostics, model, engine, t.adam_eps, t.adam_beta2),
        sink=NullSink(),
        run_dir=run_dir,
        rank=rank,
        world=world,
        say=say,
    )
    if rank == 0:
        run.sink = open_sink(run_dir, u.report_to, u.wandb_project, u.run_name, cfg.to_dict(), bool(tag))
    if tag:
        loop.restore(run, checkpointer.load(tag))
        run.sink.rewind(run.step, events=True)  # what came after the checkpoint is logged again
        say(f"resumed from {tag} at step {run.step}")
    loop.write_status(run, "running", None)
    say(f"run directory: {run_dir}  (ready in {time.time() - t_start:.1f}s)")
    try:
        return loop.train(run)
    finally:
        run.sink.close()
