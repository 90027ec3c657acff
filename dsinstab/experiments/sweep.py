"""A grid of ordinary runs: learning rates x variants x seeds, run locally, resumable, or emitted.

    python scripts/sweep.py configs/sweeps/lr-sensitivity-quick.yaml --parallel 2

A grid YAML names learning rates, seeds, common ``--set`` overrides and variants (each a name with
its own overrides, ds_config and preset). Every point is an ordinary run directory
``<out>/<variant>-lr<lr>-s<seed>`` trained by ``scripts/train.py``; nothing here trains by itself.
Every point's config is resolved before anything runs, so a bad override stops the sweep (exit 2)
with nothing written. A point whose ``status.json`` says it ended for good (finished, or died at the
minimum loss scale, or stopped by a detector: a divergence is a result) is skipped; any other
point resumes from its latest checkpoint, or starts over. ``--emit`` writes the commands for a
scheduler instead; ``dsinstab.reports.sweep_report`` analyses the run directories wherever they ran.
The command line is :mod:`dsinstab.commands.sweep`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dsinstab.experiments.launch import command_line, write_commands
from dsinstab.instruments import registry
from dsinstab.run.config import ConfigError, RunConfig, _read_yaml, _suggest, apply_override, check
from dsinstab.run.distributed import without_launch
from dsinstab.run.resolve import DEFAULT_DS_CONFIG, ROOT, find_path, resolve
from dsinstab.run.status import EXIT_INTERRUPTED, RunEnd, outcome, read_status

TRAIN = ROOT / "scripts" / "train.py"
SWEEP = ROOT / "scripts" / "sweep.py"
GRID_KEYS = ("name", "config_dir", "ds_config", "preset", "set", "lrs", "seeds", "variants")
VARIANT_KEYS = ("set", "ds_config", "preset")
# keys the grid sets per point: a grid that sets them itself would make every point the same run
OWNED = ("trainer.lr", "trainer.seed", "utils.run_name", "utils.output_dir")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass
class Point:
    variant: str
    lr: float
    seed: int
    name: str
    out: Path
    config_dir: str
    ds_config: str
    preset: str | None
    overrides: list[str]
    cfg: RunConfig = field(repr=False)

    @property
    def run_dir(self) -> Path:
        return self.out / self.name


@dataclass
class Grid:
    path: Path
    name: str
    out: Path
    lrs: list[float]
    seeds: list[int]
    variants: list[str]
    points: list[Point]
    # the command that runs one of its points by name (`--point NAME` is added): the sweep's own
    # unless a caller built the grid (the zoo)
    rerun: list[str] | None = None


def point_name(variant: str, lr: float, seed: int) -> str:
    return f"{variant}-lr{lr:g}-s{seed}"


# ---------------------------------------------------------------------------------------------
# The grid: read, check, resolve every point


def _overrides(value, grid: Path, key: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise ConfigError(f"{grid}: {key} must be a list of section.key=value strings, got {value!r}.")
    for item in value:
        dotted = item.split("=", 1)[0].strip()
        if dotted in OWNED:
            raise ConfigError(
                f"{grid}: {key} sets {dotted}, which the sweep sets for every point; "
                "list learning rates under lrs and seeds under seeds (utils.run_name and "
                "utils.output_dir come from the point's name and --out)."
            )
    return value


def _optional_str(value, grid: Path, key: str) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(f"{grid}: {key} must be a non-empty string, got {value!r}.")
    return value


def _number(v, kind: type):
    """A YAML number; for learning rates also a string such as "3e-4" (YAML 1.1 reads 3e-4 without
    a dot as a string)."""
    if isinstance(v, bool):
        return None
    if kind is int:
        return v if isinstance(v, int) and v >= 0 else None
    try:
        x = float(v) if isinstance(v, (int, float, str)) else None
    except ValueError:
        return None
    return x if x is not None and math.isfinite(x) and x > 0 else None


def _numbers(value, grid: Path, key: str, kind: type) -> list:
    parsed = [_number(v, kind) for v in value] if isinstance(value, list) else []
    if not parsed or None in parsed:
        what = "non-negative integers" if kind is int else "positive numbers (e.g. [3.0e-4, 1.0e-3])"
        raise ConfigError(f"{grid}: {key} must be a non-empty list of {what}, got {value!r}.")
    if len(set(parsed)) != len(parsed):
        raise ConfigError(f"{grid}: {key} lists a value twice: {value!r}.")
    return parsed


def _reworded(e: ConfigError, grid: Path, key: str) -> ConfigError:
    """An error of the config loader, named by where it sits in the grid."""
    msg = str(e)
    return ConfigError(f"{grid}: {key}: {msg.removeprefix('--set: ')}")


def load_grid(path: str | Path, out: str | Path | None = None) -> Grid:
    """Read and check a grid and resolve every point's config (ds_config included); bad input
    raises :class:`ConfigError` with one sentence naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"{path}: no such grid file; give a YAML file such as configs/sweeps/lr-sensitivity.yaml."
        )
    return grid_from(_read_yaml(path), path, out)


def grid_from(raw: dict, path: Path, out: str | Path | None = None) -> Grid:
    """A grid from its mapping (what a grid file holds; the zoo builds one per case), checked and
    resolved as :func:`load_grid` does; errors name ``path``."""
    for key in raw:
        if key not in GRID_KEYS:
            raise ConfigError(
                f"{path}: unknown key {key}{_suggest(str(key), list(GRID_KEYS))}; allowed: {', '.join(GRID_KEYS)}."
            )
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(f"{path}: name must be letters, digits, '_', '.', '+' or '-', got {name!r}.")
    config_dir = str(find_path(_optional_str(raw.get("config_dir"), path, "config_dir") or "configs"))
    ds_default = _optional_str(raw.get("ds_config"), path, "ds_config") or DEFAULT_DS_CONFIG
    preset_default = _optional_str(raw.get("preset"), path, "preset")
    common = _overrides(raw.get("set"), path, "set")
    lrs = _numbers(raw.get("lrs"), path, "lrs", float)
    seeds = _numbers(raw.get("seeds", [0]), path, "seeds", int)
    variants = raw.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise ConfigError(
            f"{path}: variants must map each variant's name to its set/ds_config/preset (an empty "
            "mapping {} for the defaults), e.g. variants: {baseline: {}, qk_norm: {set: [model.arch=qwen3]}}."
        )
    # the common part alone first, so its error names `set` rather than a variant
    base, _ = _resolve(path, "set", config_dir, ds_default, preset_default, common)
    out = Path(out) if out else Path(base.utils.output_dir).expanduser() / name
    # a progress bar per point fills the logs; the grid's own set may turn it back on
    head = ["utils.progress_bar=false", f"utils.wandb_group={name}"]
    points = []
    for vname, spec in variants.items():
        where = f"variants.{vname}"
        if not isinstance(vname, str) or not NAME_RE.match(vname):
            raise ConfigError(
                f"{path}: variant names must be letters, digits, '_', '.', '+' or '-', got {vname!r}."
            )
        spec = {} if spec is None else spec
        if not isinstance(spec, dict):
            raise ConfigError(f"{path}: {where} must be a mapping with set/ds_config/preset, got {spec!r}.")
        for key in spec:
            if key not in VARIANT_KEYS:
                raise ConfigError(
                    f"{path}: {where} has unknown key {key}{_suggest(str(key), list(VARIANT_KEYS))}; "
                    f"allowed: {', '.join(VARIANT_KEYS)}."
                )
        ds = _optional_str(spec.get("ds_config"), path, f"{where}.ds_config") or ds_default
        preset = _optional_str(spec.get("preset"), path, f"{where}.preset") or preset_default
        own = _overrides(spec.get("set"), path, f"{where}.set")
        # YAML parsing is most of the cost: the variant's config once, then each point's own keys,
        # which come last on train.py's command line too, so the result is what train.py resolves
        vcfg, args = _resolve(path, where, config_dir, ds, preset, [*head, *common, *own])
        paths = (
            str(Path(args.config_dir).resolve()),
            str(Path(args.ds_config).resolve()),
            str(Path(args.preset).resolve()) if args.preset and Path(args.preset).exists() else args.preset,
        )
        for lr in lrs:
            for seed in seeds:
                pname = point_name(vname, lr, seed)
                own_keys = [
                    f"trainer.lr={lr!r}",
                    f"trainer.seed={seed}",
                    f"utils.output_dir={out.resolve()}",
                    f"utils.run_name={pname}",
                ]
                cfg = copy.deepcopy(vcfg)
                try:
                    for item in own_keys:
                        apply_override(cfg, item)
                    check(cfg.trainer, "--set", "trainer")
                except ConfigError as e:
                    raise _reworded(e, path, f"{where} at lr {lr:g}, seed {seed}") from None
                points.append(
                    Point(vname, lr, seed, pname, out, *paths, [*head, *common, *own, *own_keys], cfg)
                )
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: lrs: two learning rates print alike ({lrs!r}); give distinct values.")
    _check_corpora(path, points)
    _check_models(path, points)
    return Grid(path, name, out, lrs, seeds, list(variants), points)


def _resolve(
    path: Path, where: str, config_dir: str, ds: str, preset: str | None, overrides: list[str]
) -> tuple[RunConfig, argparse.Namespace]:
    """The config as train.py resolves and checks it for one rank (its plug-ins' refusals
    included); ``args`` comes back with the paths found."""
    args = argparse.Namespace(config_dir=config_dir, preset=preset, ds_config=ds, overrides=list(overrides))
    try:
        cfg = resolve(args, 1)[0]
        registry.check(cfg)
        return cfg, args
    except ConfigError as e:
        raise _reworded(e, path, where) from None


def _distinct(points: list[Point], section: str) -> list[Point]:
    """One point per distinct ``section`` (dataset, model) of the points' configs."""
    seen: dict[str, Point] = {}
    for p in points:
        seen.setdefault(json.dumps(p.cfg.to_dict()[section], sort_keys=True), p)
    return list(seen.values())


def _check_corpora(path: Path, points: list[Point]) -> None:
    """What train.py checks before it loads data (the corpus exists), once per distinct corpus."""
    from dsinstab.run.corpus import corpus_spec

    for p in _distinct(points, "dataset"):
        try:
            corpus_spec(p.cfg.dataset)
        except ConfigError as e:
            raise _reworded(e, path, f"variants.{p.variant}") from None


def _check_models(path: Path, points: list[Point]) -> None:
    """Build each distinct model's ``transformers`` config, whose own checks would otherwise fail
    a point only once it runs."""
    from dsinstab.run.model import hf_config

    for p in _distinct(points, "model"):
        try:
            hf_config(p.cfg.model, p.cfg.dataset.vocab_size, 0)
        except Exception as e:  # transformers' validators raise their own classes
            reason = str(e.__cause__ or e).strip().splitlines()[-1].strip()
            raise ConfigError(
                f"{path}: variants.{p.variant}: transformers refuses this model: {reason}"
            ) from None


# ---------------------------------------------------------------------------------------------
# One point: what is left to do, and the command that does it


def plan(point: Point) -> str:
    """``done`` (ended for good), ``new`` (no run directory), ``resume`` (a checkpoint to go on
    from) or ``restart`` (a run directory without one: killed early, or crashed)."""
    d = point.run_dir
    if not d.exists():
        return "new"
    status = read_status(d)
    end = outcome(status)
    if end and (end is not RunEnd.finished or status.get("step", 0) >= point.cfg.trainer.max_steps):
        return "done"
    return "resume" if (d / "checkpoints" / "latest").is_file() else "restart"


def train_command(point: Point, mode: str) -> list[str]:
    """``python scripts/train.py`` for the point: one process, one rank (it needs no launcher)."""
    cmd = [sys.executable, str(TRAIN), "--config_dir", point.config_dir, "--ds_config", point.ds_config]
    if point.preset:
        cmd += ["--preset", point.preset]
    cmd += ["--set", *point.overrides]
    if mode == "resume":
        cmd += ["--resume", "latest"]
    elif mode == "restart":
        cmd += ["--overwrite"]
    return cmd


# ---------------------------------------------------------------------------------------------
# Emitting for a scheduler


def _point_command(grid: Grid, which: str | None) -> str:
    cmd = grid.rerun or [
        sys.executable,
        str(SWEEP),
        str(grid.path.resolve()),
        "--out",
        str(grid.out.resolve()),
    ]
    return command_line(cmd + (["--point", which] if which is not None else []))


def emit(grid: Grid, kind: str, parallel: int | None) -> Path:
    """``commands.txt`` (one command per point still to do) or ``sweep.sbatch`` (a SLURM array of
    them). Each command decides at its start whether its point is new, resumes or is done, so a
    requeued or repeated task does the right thing."""
    todo = [i for i, p in enumerate(grid.points) if plan(p) != "done"]
    if kind == "commands":
        return write_commands(grid.out, [_point_command(grid, grid.points[i].name) for i in todo])
    grid.out.mkdir(parents=True, exist_ok=True)
    path = grid.out / "sweep.sbatch"
    logs = grid.out.resolve() / "logs"
    array = ",".join(map(str, todo)) or "0"
    throttle = f"%{parallel}" if parallel else ""
    path.write_text(
        "#!/bin/bash\n"
        f"# {grid.name}: {len(todo)} of {len(grid.points)} points left; one GPU per point.\n"
        f"# submit: sbatch {path.resolve()}   (add your partition, account and time limit below)\n"
        f"#SBATCH --job-name={grid.name}\n"
        f"#SBATCH --array={array}{throttle}\n"
        "#SBATCH --ntasks=1\n"
        "#SBATCH --gpus-per-task=1\n"
        "#SBATCH --cpus-per-task=4\n"
        f"#SBATCH --output={logs}/%x-%a.out\n"
        "#SBATCH --requeue\n"
        "set -euo pipefail\n"
        f"cd {shlex.quote(str(Path.cwd().resolve()))}\n"
        f'exec {_point_command(grid, None)} --point "$SLURM_ARRAY_TASK_ID"\n'
    )
    logs.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------------------------
# Running locally


def local_slots(parallel: int | None) -> list[dict]:
    """The environment of each parallel slot: one accelerator device each, or on a CPU an equal
    share of the cores (OMP/MKL threads, which torch reads at start)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() != "cpu":
        env_name = acc.visible_devices_envs()[0]
        visible = os.environ.get(env_name)
        ids = (
            [d for d in visible.split(",") if d.strip()]
            if visible
            else [str(i) for i in range(acc.device_count())]
        )
        n = min(parallel or len(ids), len(ids))
        return [{env_name: ids[i]} for i in range(n)]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    n = parallel or 1
    threads = str(max(1, cores // n))
    return [{"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads} for _ in range(n)]


def _die_with_parent() -> None:
    """In the child: SIGTERM when the sweep dies, even by SIGKILL; the run then saves a checkpoint
    and exits 130, and the next sweep resumes it (no orphan keeps writing into the sweep)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_local(grid: Grid, parallel: int | None, say=print) -> int:
    """Run every point not yet done, ``parallel`` at a time; returns 0 when every point ended
    for good, ``EXIT_INTERRUPTED`` (130) when interrupted, 1 when some point failed (its log says why)."""
    from filelock import FileLock, Timeout

    grid.out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(grid.out / ".sweep.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ConfigError(
            f"--out: another sweep is running in {grid.out}; wait for it or pick another --out."
        ) from None
    try:
        return _run(grid, local_slots(parallel), say)
    finally:
        lock.release()


def _run(grid: Grid, slots: list[dict], say) -> int:
    plans = [(p, plan(p)) for p in grid.points]
    todo = [(p, m) for p, m in plans if m != "done"]
    say(
        f"sweep {grid.name}: {len(grid.points)} points in {grid.out}; {len(plans) - len(todo)} already ended, "
        f"{len(todo)} to run, {len(slots)} at a time ({', '.join(f'{k}={v}' for k, v in slots[0].items())} each)"
    )
    (grid.out / "logs").mkdir(exist_ok=True)
    launches = grid.out / "launches.jsonl"
    stop: list[int] = []
    running: dict[int, tuple] = {}

    def on_signal(signum, frame):
        stop.append(signum)
        for proc, *_ in running.values():  # each run saves a checkpoint and exits 130
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    failed, started = [], 0
    try:
        while (todo and not stop) or running:
            for slot, env in enumerate(slots):
                if slot in running or not todo or stop:
                    continue
                point, mode = todo.pop(0)
                started += 1
                log_path = (
                    grid.out / "logs" / f"{point.name}.log"
                )  # the zoo's names hold their case: case/point
                log_path.parent.mkdir(parents=True, exist_ok=True)
                log = open(log_path, "a")  # noqa: SIM115 - closed when it ends
                proc = subprocess.Popen(
                    train_command(point, mode),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=Path.cwd(),
                    env={**without_launch(os.environ), **env, "PYTHONUNBUFFERED": "1"},
                    preexec_fn=_die_with_parent,
                )
                running[slot] = (proc, point, mode, time.time(), log)
                _append(
                    launches,
                    {"point": point.name, "mode": mode, "pid": proc.pid, "start": time.time(), **env},
                )
                say(f"[{started}/{started + len(todo)}] {point.name}: {mode}")
            time.sleep(0.2)
            for slot in list(running):
                proc, point, mode, t0, log = running[slot]
                code = proc.poll()
                if code is None:
                    continue
                log.close()
                del running[slot]
                status = read_status(point.run_dir)
                _append(
                    launches,
                    {
                        "point": point.name,
                        "exit_code": code,
                        "state": status.get("state"),
                        "seconds": round(time.time() - t0, 1),
                        "end": time.time(),
                    },
                )
                say(
                    f"    {point.name}: {status.get('state', 'no status')} at step {status.get('step', '?')} "
                    f"(exit {code}, {time.time() - t0:.0f}s)"
                )
                if not outcome(status) and code != EXIT_INTERRUPTED:
                    failed.append(point.name)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if stop:
        say(f"sweep interrupted: {len(todo)} point(s) not started; run the same command again to continue")
        return EXIT_INTERRUPTED
    if failed:
        say(
            f"{len(failed)} point(s) failed: {', '.join(failed)}; see {grid.out / 'logs'}; "
            "running the same command again retries them"
        )
        return 1
    return 0


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
