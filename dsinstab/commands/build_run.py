"""The train command's second half: from a checked config to a trained run, in named steps.

Nothing is written to the run directory until the data, the model, the engine, the checkpoint to
resume and the branch source have all been checked; then the run directory is laid out, the run is
assembled from its parts and the registry's plug-ins, resumed or branched, and trained.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import deepspeed.comm as dist
from tqdm import tqdm

from dsinstab.experiments.branch import Branch, BranchSource, open_branch, start_branch
from dsinstab.instruments import registry
from dsinstab.reports.report import run_summary
from dsinstab.run import loop
from dsinstab.run.bad_data import with_bad_data
from dsinstab.run.checkpoint import Checkpointer, data_layout, on_rank_zero
from dsinstab.run.config import ConfigError, RunConfig, to_yaml
from dsinstab.run.data import BatchOrder, PackedData, prepare_data
from dsinstab.run.ds_config import precision, zero_stage
from dsinstab.run.engine import apply_optimizer_config, build_engine
from dsinstab.run.model import build_model, count_parameters
from dsinstab.run.plugins import Plugins
from dsinstab.run.state import restore
from dsinstab.run.status import RunEnd
from dsinstab.run.tracking import NullSink, open_sink


@dataclass
class Parts:
    """What a run is made of, each checked before the run directory is written."""

    run_dir: Path
    data: PackedData
    order: BatchOrder
    model: object
    engine: object
    checkpointer: Checkpointer
    tag: str | None  # the checkpoint to resume, if any
    source: BranchSource | None  # the checkpoint to branch from, if any


def build_and_train(cfg: RunConfig, args: argparse.Namespace, notes: list[str], rank: int, world: int) -> int:
    say = rank_zero_say(rank)
    for note in notes:
        say(note)
    t_start = time.time()
    parts = build_parts(cfg, args, rank, world, say)
    write_run_dir(cfg, args, parts, rank)  # everything is checked: from here on the run directory is written
    run = assemble(cfg, parts, rank, world, say)
    start(run, parts)
    loop.write_status(run, RunEnd.running)
    say(f"run directory: {parts.run_dir}  (ready in {time.time() - t_start:.1f}s)")
    try:
        code = loop.train(run)
    finally:
        run.sink.close()
    if rank == 0:  # how the run ended, what it wrote, and the command that makes its report
        say(run_summary(parts.run_dir))
    return code


def rank_zero_say(rank: int):
    def say(msg: str) -> None:
        if rank == 0:
            tqdm.write(msg)

    return say


def build_parts(cfg: RunConfig, args: argparse.Namespace, rank: int, world: int, say) -> Parts:
    """Name the run, check its directory, prepare the data, build the model and the engine, find
    the checkpoint to resume or branch from. Collective; writes nothing."""
    u, t, m = cfg.utils, cfg.trainer, cfg.model
    if not u.run_name:
        name = [f"{Path(cfg.ds_config_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"]
        dist.broadcast_object_list(name, src=0)
        u.run_name = name[0]
    run_dir = Path(u.output_dir).expanduser() / u.run_name
    check_run_dir(run_dir, args.resume, args.overwrite)
    data = prepare_data(cfg.dataset, m.seq_len, u.cache_dir, log=say)
    order = BatchOrder(len(data.train), t.micro_batch_size, world, rank, t.seed)  # refuses a too-small corpus
    data = with_bad_data(
        data, t.inject, order, t.gradient_accumulation_steps, t.seed
    )  # trainer.inject: repeat|random
    model = build_model(m, cfg.dataset.vocab_size, data.eos_id, t.seed)
    n_params = count_parameters(model)  # before ZeRO-3 partitions the parameters away
    compile_backend = m.compile_backend if m.compile else None  # model.compile
    engine = build_engine(
        model, t, cfg.ds_config, registry.optimizer_for(cfg), compile_backend=compile_backend
    )
    layout = data_layout(cfg, world, Path(data.cache_path).name)
    checkpointer = Checkpointer(engine, run_dir, t.keep_checkpoints, rank == 0, layout)
    tag = checkpointer.resolve(args.resume) if args.resume else None  # refuses a changed data layout
    source = open_branch(args, engine, cfg, layout)  # None unless --branch; refuses what cannot apply
    say(
        f"model: {m.arch}, {n_params / 1e6:.2f}M parameters; {precision(cfg.ds_config)}, "
        f"ZeRO-{zero_stage(cfg.ds_config)}, {world} rank(s)"
        + (f"; compiled ({m.compile_backend})" if m.compile else "")
    )
    say(f"data: {len(data.train)} train / {len(data.validation)} validation blocks of {m.seq_len + 1} tokens")
    return Parts(run_dir, data, order, model, engine, checkpointer, tag, source)


def write_run_dir(cfg: RunConfig, args: argparse.Namespace, parts: Parts, rank: int) -> None:
    """The run directory with this segment's config and what converts its checkpoints to a model."""
    if rank == 0:
        run_dir = parts.run_dir
        if args.overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        # each segment's config is kept: config.yaml is the first, never overwritten
        tag = parts.tag
        segment = f"config-resume-{parts.checkpointer.saved_step(tag)}.yaml" if tag else "config.yaml"
        (run_dir / segment).write_text(to_yaml(cfg))
        parts.model.config.save_pretrained(run_dir / "hf")  # zero_to_fp32.py can write weights beside it
        parts.data.save_tokenizer(run_dir / "hf")  # so the converted model can decode the spiking batch
    dist.barrier()


def assemble(cfg: RunConfig, parts: Parts, rank: int, world: int, say) -> loop.Run:
    """The run: its parts, the registry's plug-ins and the branch plug-in (inert unless this run is
    a branch; then its state, checkpointed, says how), the metrics sink on rank 0."""
    u = cfg.utils
    sink = (
        open_sink(parts.run_dir, u.report_to, u.wandb_project, u.run_name, cfg.to_dict(), bool(parts.tag))
        if rank == 0
        else NullSink()
    )
    # the branch first: its skip moves the data position before any plug-in reads it (a fault
    # injected at a position is skipped with its batches)
    plugins = [Branch(), *registry.build_plugins(cfg, parts.model, parts.engine)]
    return loop.Run(
        cfg=cfg,
        engine=parts.engine,
        model=parts.model,
        data=parts.data,
        order=parts.order,
        checkpointer=parts.checkpointer,
        plugins=Plugins(plugins),
        run_dir=parts.run_dir,
        rank=rank,
        world=world,
        sink=sink,
        say=say,
    )


def start(run: loop.Run, parts: Parts) -> None:
    """Resume from the checkpoint, or load the branch's source; a fresh run starts as it is."""
    if parts.tag:
        restore(run, parts.checkpointer.load(parts.tag))
        run.sink.rewind(run.step, events=True)  # what came after the checkpoint is logged again
        run.say(f"resumed from {parts.tag} at step {run.step}")
        changed = apply_optimizer_config(
            run.engine, run.cfg.trainer
        )  # DeepSpeed loads the saved ones; --set wins
        if changed:
            run.say(f"optimizer settings changed on resume: {', '.join(changed)}")
    if parts.source:
        branch = next(p for p in run.plugins if isinstance(p, Branch))
        run.say(start_branch(run, branch, parts.source))


def check_run_dir(run_dir: Path, resume: str | None, overwrite: bool) -> None:
    """Decided on global rank 0 and broadcast: another node may see no such folder, or an old one."""
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
