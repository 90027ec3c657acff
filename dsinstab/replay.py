"""Spike forensics: branch a run from one of its checkpoints, replay it, intervene.

Two halves, one vocabulary:

- **A branch** is an ordinary run started by ``scripts/train.py --branch RUN/checkpoints/TAG``: a
  new run directory whose weights, Adam moments, loss scaler, schedule position, step, data
  position, detector and plug-in states and RNG states are the checkpoint's, and whose optimizer
  hyperparameters (``trainer.lr``, ``adam_eps``, ``adam_beta1/2``, ``weight_decay``), grad clipping,
  z-loss and precision are its own config's. ``--intervene`` adds what no config key says
  (``skip=A-B``, ``reshuffle=K``, ``reset_adam``) and ``--stop_at N`` ends it early while the lr
  schedule keeps spanning ``trainer.max_steps``. All of it lives in the :class:`Branch` plug-in,
  whose state rides in the branch's own checkpoints, so ``--resume latest`` continues a branch
  exactly.
- **A replay** (``scripts/replay.py``, :func:`main`) picks RUN's newest checkpoint before the
  spike, runs the plain replay and one branch per intervention through ``train.py``, says whether
  the plain replay reproduced RUN, and writes the report (:mod:`dsinstab.replay_report`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dsinstab.config import (
    PROBES,
    SECTIONS,
    YAML_OWNED,
    ConfigError,
    load_config,
    precision,
    resolve_ds_config,
)
from dsinstab.plugins import PluginBase

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# The branch, inside train.py

BRANCH_INTERVENTIONS = "skip=FIRST-LAST, reshuffle=K (K >= 1) or reset_adam"


def parse_branch_interventions(items: list[str]) -> dict:
    """``train.py --intervene`` items as the :class:`Branch` spec; bad ones refused in one sentence."""
    spec: dict = {"skip": None, "reshuffle": 0, "reset_adam": False}
    for item in items:
        name, _, value = item.partition("=")
        m = re.fullmatch(r"(\d+)-(\d+)", value)
        if name == "skip" and m and 0 < int(m.group(1)) <= int(m.group(2)):
            spec["skip"] = [int(m.group(1)), int(m.group(2))]
        elif name == "reshuffle" and value.isdigit() and int(value) >= 1:
            spec["reshuffle"] = int(value)
        elif item == "reset_adam":
            spec["reset_adam"] = True
        else:
            raise ConfigError(f"--intervene: {item!r} is not one of {BRANCH_INTERVENTIONS}.")
    return spec


def reshuffled_seed(seed: int, k: int) -> int:
    """The batch-order seed of reshuffle ``k``: another permutation for every ``k``, never the run's."""
    return seed + 7919 * k


class Branch(PluginBase):
    """What makes a run a branch, as a plug-in: empty (inert) in every other run.

    ``skip=[A, B]``: at step A the data position jumps past the blocks the source read at steps
    A..B, so steps A.. read what the source read from B+1 on (a fault tied to those batches, like
    ``trainer.inject``, is skipped with them). ``reshuffle=K``: from the branch point on, batches
    come from another permutation (the position is kept). ``stop_at``: the run ends there,
    finished, with its evaluation; the schedule built from ``trainer.max_steps`` is untouched.
    """

    name = "branch"

    def __init__(self):
        self.spec: dict = {}
        self.run = None

    def arm(self, spec: dict) -> None:
        self.spec = dict(spec)

    def bind(self, run) -> None:
        self.run = run
        if self.spec.get("reshuffle"):
            from dsinstab.data import BatchOrder

            old = run.order
            run.order = BatchOrder(
                old.n_blocks,
                old.micro_batch,
                old.world,
                old.rank,
                reshuffled_seed(old.seed, self.spec["reshuffle"]),
            )
            run.order.position = old.position
        if self.spec.get("stop_at"):
            # the loop reads max_steps each step; the engine's schedule was built before this
            run.cfg.trainer.max_steps = self.spec["stop_at"]

    def begin_step(self, step: int) -> None:
        skip = self.spec.get("skip")
        if skip and step == skip[0]:
            gas = self.run.cfg.trainer.gradient_accumulation_steps
            self.run.order.position += (skip[1] - skip[0] + 1) * gas

    def state_dict(self) -> dict:
        return dict(self.spec)

    def load_state_dict(self, state: dict) -> None:
        self.spec = dict(state)


@dataclass
class BranchSource:
    checkpointer: object
    tag: str
    step: int
    spec: dict


def open_branch(args: argparse.Namespace, engine, cfg, layout: dict) -> BranchSource | None:
    """Check ``--branch``/``--intervene``/``--stop_at`` before anything is written (collective:
    rank 0 reads the files, every rank gets its answer). ``None`` when this run is no branch."""
    from dsinstab.checkpoint import Checkpointer, on_rank_zero

    if not args.branch:
        if args.intervene or args.stop_at:
            raise ConfigError(
                "--intervene and --stop_at apply to a branch only; add --branch RUN/checkpoints/TAG."
            )
        return None
    if args.resume:
        raise ConfigError(
            "--branch starts a new run and --resume continues one (a branch continues with --resume latest alone); pick one."
        )
    tag_dir = Path(args.branch).expanduser()
    source = Checkpointer(engine, tag_dir.parent.parent, keep=1, is_main=False, layout=layout)
    spec = parse_branch_interventions(args.intervene)

    def check() -> tuple[int, str]:
        step = source.saved_step(tag_dir.name) if tag_dir.parent.name == "checkpoints" else None
        config = tag_dir.parent.parent / "config.yaml"
        if step is None or not config.exists():
            raise ConfigError(
                f"--branch {args.branch}: not a complete checkpoint of a run; give RUN/checkpoints/TAG "
                "of a tag holding a dsinstab.json marker."
            )
        from dsinstab.checkpoint import layout_mismatch

        saved = source.marker(tag_dir.name).get("data_layout")
        problem = saved and layout_mismatch(saved, layout)
        if problem:
            raise ConfigError(
                f"--branch {args.branch}: cannot branch from it because {problem}; keep that setting."
            )
        return step, precision(yaml.safe_load(config.read_text()).get("ds_config", {}))

    step, source_precision = on_rank_zero(check)
    stage = cfg.ds_config.get("zero_optimization", {}).get("stage", 0)
    if source_precision != precision(cfg.ds_config) and stage not in (1, 2):
        raise ConfigError(
            f"--branch {args.branch}: continuing a {source_precision} checkpoint in {precision(cfg.ds_config)} "
            f"needs ZeRO stage 1 or 2 (this ds_config has zero_optimization.stage {stage})."
        )
    stop_at = args.stop_at
    if stop_at is not None and not step < stop_at <= cfg.trainer.max_steps:
        raise ConfigError(
            f"--stop_at {stop_at}: must lie after the checkpoint's step {step} and at most at "
            f"trainer.max_steps ({cfg.trainer.max_steps}), where the lr schedule ends."
        )
    if spec["skip"] and spec["skip"][0] <= step:
        raise ConfigError(
            f"--intervene skip={spec['skip'][0]}-{spec['skip'][1]}: must start after step {step}, the checkpoint's."
        )
    spec |= {
        "source": str(tag_dir),
        "from_step": step,
        "stop_at": stop_at,
        "source_precision": source_precision,
    }
    return BranchSource(source, tag_dir.name, step, spec)


def start_branch(run, branch: Branch, source: BranchSource) -> str:
    """Load the source checkpoint into ``run`` (collective), apply this run's optimizer settings and
    the interventions; returns the line to print."""
    from dsinstab.engine import apply_optimizer_config
    from dsinstab.run_state import restore

    opt = run.engine.optimizer
    # ZeRO-1/2 load the saved loss scaler with the optimizer: another precision keeps its own
    own_scaler = {k: getattr(opt, k) for k in ("loss_scaler", "dynamic_loss_scale") if hasattr(opt, k)}
    other_precision = source.spec["source_precision"] != precision(run.cfg.ds_config)
    if other_precision:  # ZeRO's optimizer files are named bf16_zero_pp_rank_* in bf16 only
        saved_bf16, prefix = source.spec["source_precision"] == "bf16", run.engine._get_zero_ckpt_prefix
        run.engine._get_zero_ckpt_prefix = lambda dp_rank, bf16_mode: prefix(dp_rank, bf16_mode=saved_bf16)
    try:
        restore(run, source.checkpointer.load(source.tag))
    finally:
        if other_precision:
            del run.engine._get_zero_ckpt_prefix  # the engine's own method again
    changed = apply_optimizer_config(run.engine, run.cfg.trainer)
    if other_precision:
        for key, value in own_scaler.items():
            setattr(opt, key, value)
        changed.append(f"precision {source.spec['source_precision']} -> {precision(run.cfg.ds_config)}")
    if source.spec["reset_adam"]:
        reset_adam(run.engine)
    branch.arm(source.spec)
    if run.rank == 0:
        info = {**source.spec, "optimizer_changed": changed}
        (run.run_dir / "branch.json").write_text(json.dumps(info, indent=1))
    what = [k for k in ("skip", "reshuffle", "reset_adam") if source.spec.get(k)] + changed
    return f"branched from {source.spec['source']} at step {run.step}" + (
        f" ({', '.join(what)})" if what else ""
    )


def reset_adam(engine) -> None:
    """Adam's moments and step counters to zero: a fresh Adam (bias correction restarts) on the
    loaded weights."""
    import torch

    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in inner.state.values():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            value = state.get(key)
            if torch.is_tensor(value):
                value.zero_()
            elif value is not None:
                state[key] = 0


# ---------------------------------------------------------------------------------------------
# The replay: scripts/replay.py

INTERVENTIONS = (
    "skip, skip=N, reshuffle, lr=X or lr=xF, z_loss=X, grad_clip=X, adam_eps=X, reset_adam, "
    "precision=bf16|fp32, or a trainer./utils. key=value"
)
# keys an intervention may not change: why, in words
UNSAFE = {
    "trainer.micro_batch_size": "it maps the saved data position onto other batches",
    "trainer.gradient_accumulation_steps": "it maps the saved data position onto other batches",
    "trainer.seed": "it maps the saved data position onto other batches (use reshuffle)",
    "trainer.max_steps": "it sets the length of RUN's lr schedule, which the replay keeps (use --window)",
    "trainer.diagnostics.every": "the replay runs every probe every step",
    "utils.run_name": "the replay names its branches",
    "utils.output_dir": "the replay writes its branches under --out",
}
SAFE_MODEL_KEYS = ("model.embedding_scale", "model.attn_implementation")


@dataclass
class Plan:
    """One branch: its directory name, the intervention as written, and how train.py gets it."""

    name: str
    spec: str
    sets: list[str] = field(default_factory=list)
    intervene: list[str] = field(default_factory=list)
    precision: str | None = None


@dataclass
class Source:
    """The run a replay branches from, and the checkpoint chosen."""

    path: Path
    config: dict
    world: int
    tag: str
    tag_step: int
    at: int

    @property
    def precision(self) -> str:
        return precision(self.config.get("ds_config", {}))


def choose_checkpoint(run: Path, at: int, tag: str | None) -> tuple[str, int, int]:
    """(tag, the step it holds, its number of ranks): ``tag`` or the newest complete checkpoint
    holding a step before ``at``."""
    from dsinstab.checkpoint import RANKS, Checkpointer

    ck = Checkpointer(None, run, keep=1, is_main=False)
    tags = ck.complete_tags()
    before = [t for t in tags if ck.saved_step(t) < at]
    if tag is not None:
        if tag not in tags:
            raise ConfigError(
                f"--from {tag}: no complete checkpoint {tag} in {ck.dir}; have: {', '.join(tags) or 'none'}."
            )
        if tag not in before:
            raise ConfigError(
                f"--from {tag}: it holds step {ck.saved_step(tag)}, not one before --at {at}; have: {', '.join(before) or 'none'}."
            )
    elif not before:
        raise ConfigError(
            f"--at {at}: {ck.dir} holds no complete checkpoint before step {at}; have: {', '.join(tags) or 'none'}."
        )
    tag = tag or before[-1]
    world = (ck.marker(tag).get("data_layout") or {}).get(RANKS, 1)
    return tag, ck.saved_step(tag), int(world)


def segment_config(run: Path, step: int) -> dict:
    """The resolved config RUN trained step ``step`` with: config.yaml, or the config-resume-K.yaml
    of the last resume before it."""
    best, path = 0, run / "config.yaml"
    for p in run.glob("config-resume-*.yaml"):
        k = int(p.stem.rsplit("-", 1)[1])
        if best < k < step:
            best, path = k, p
    return yaml.safe_load(path.read_text())


def plan_branches(source: Source, items: list[str], seeds: int) -> list[Plan]:
    """The plain replay first, then one branch per intervention (``reshuffle``: ``seeds`` of
    them); anything that cannot apply is refused in one sentence."""
    c, s = source.tag_step, source.at
    plans = [Plan("plain", "plain replay")]
    for item in items:
        key, eq, value = item.partition("=")
        if item == "skip":
            plans.append(Plan("skip", item, intervene=[f"skip={c + 1}-{s}"]))
        elif key == "skip" and value.isdigit() and 1 <= int(value) <= s - c:
            plans.append(Plan(f"skip-{value}", item, intervene=[f"skip={s - int(value) + 1}-{s}"]))
        elif key == "skip":
            raise ConfigError(
                f"--intervene {item}: N must be 1 to {s - c}, the steps from {tag_name(source)} through {s}."
            )
        elif item == "reshuffle":
            plans += [
                Plan(f"reshuffle-{k}", f"reshuffle (seed {k})", intervene=[f"reshuffle={k}"])
                for k in range(1, seeds + 1)
            ]
        elif item == "reset_adam":
            plans.append(Plan("reset_adam", item, intervene=["reset_adam"]))
        elif key == "lr" and eq:
            lr = source.config["trainer"]["lr"]
            factor = value.startswith("x")
            x = _number(item, value[1:] if factor else value)
            plans.append(Plan(f"lr-{value}", item, sets=[f"trainer.lr={lr * x if factor else x!r}"]))
        elif key in ("z_loss", "grad_clip", "adam_eps") and eq:
            plans.append(Plan(f"{key}-{value}", item, sets=[f"trainer.{key}={_number(item, value)!r}"]))
        elif key == "precision" and eq:
            allowed = " or ".join(f"precision={p}" for p in ("bf16", "fp32") if p != source.precision)
            if value == source.precision:
                raise ConfigError(
                    f"--intervene {item}: {source.path} already trains in {value}; allowed: {allowed}."
                )
            if value not in ("bf16", "fp32"):
                raise ConfigError(
                    f"--intervene {item}: RUN trains in {source.precision}; allowed: {allowed}."
                )
            plans.append(Plan(f"precision-{value}", item, precision=value))
        elif "." in key and eq:
            refuse_unsafe(item, key)
            plans.append(Plan(_slug(item), item, sets=[item]))
        else:
            raise ConfigError(f"--intervene {item}: unknown intervention; allowed: {INTERVENTIONS}.")
    names = [p.name for p in plans]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ConfigError(f"--intervene: {dup} is asked for twice; give each intervention once.")
    return plans


def tag_name(source: Source) -> str:
    return f"{source.tag} (step {source.tag_step})"


def _number(item: str, text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        x = math.nan
    if not (math.isfinite(x) and x >= 0):
        raise ConfigError(f"--intervene {item}: {text!r} is not a non-negative number.")
    return x


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def refuse_unsafe(item: str, key: str) -> None:
    section = key.split(".")[0]
    why = UNSAFE.get(key)
    if section == "model" and key not in SAFE_MODEL_KEYS:
        why = "it changes the model's parameters, which the checkpoint fixes"
    elif section == "dataset":
        why = "it maps the saved data position onto other data"
    elif section not in SECTIONS:
        why = f"it names no config section ({', '.join(SECTIONS)})"
    if why:
        raise ConfigError(f"--intervene {item}: {key} cannot change in a replay because {why}.")


def branch_ds_config(source: Source, plan: Plan) -> dict:
    """RUN's resolved ds_config with the values the YAML owns back to "auto" (a branch may change
    grad clipping), in the plan's precision."""
    ds = json.loads(json.dumps(source.config.get("ds_config", {})))
    for key in YAML_OWNED:
        ds[key] = "auto"
    if plan.precision:
        ds.pop("fp16", None)
        ds.pop("bf16", None)
        if plan.precision == "bf16":
            ds["bf16"] = {"enabled": True}
    return ds


def branch_overrides(source: Source, plan: Plan, out: Path, window: int) -> list[str]:
    probes = ",".join(PROBES)
    return [
        *plan.sets,
        "trainer.diagnostics.every=1",
        f"trainer.diagnostics.probes={probes}",
        f"utils.run_name={plan.name}",
        f"utils.output_dir={out}",
        f"utils.wandb_group={out.name}",
    ]


def preset_text(config: dict) -> str:
    """RUN's config as a preset: its four sections, every key (the shipped YAMLs then change nothing)."""
    return yaml.safe_dump({k: config[k] for k in SECTIONS if k in config}, sort_keys=False)


def check_plans(source: Source, plans: list[Plan], out: Path, window: int) -> None:
    """Every branch's config and ds_config, checked as train.py will check them, before anything is written."""
    with tempfile.TemporaryDirectory() as tmp:
        preset = Path(tmp) / "source.yaml"
        preset.write_text(preset_text(source.config))
        for plan in plans:
            try:
                cfg = load_config(ROOT / "configs", branch_overrides(source, plan, out, window), preset)
                resolve_ds_config(branch_ds_config(source, plan), "ds_config", cfg, source.world)
            except ConfigError as e:  # say which intervention, not the --set it became
                raise ConfigError(f"--intervene {plan.spec}: {str(e).removeprefix('--set: ')}") from None


# ---------------------------------------------------------------------------------------------
# Running the branches


def train_command(source: Source, out: Path, plan: Plan, window: int, resume: bool) -> list[str]:
    """``train.py`` for one branch: one process for one rank, DeepSpeed's launcher for more."""
    script = str(ROOT / "scripts" / "train.py")
    head = [sys.executable, script]
    if source.world > 1:
        from dsinstab.engine import free_port

        port = free_port()
        launcher = Path(sys.executable).parent / "deepspeed"
        launcher = str(launcher) if launcher.exists() else "deepspeed"
        head = [launcher, "--num_gpus", str(source.world), "--master_port", str(port), script]
    cmd = [
        *head,
        "--config_dir",
        str(ROOT / "configs"),
        "--preset",
        str(out / "source.yaml"),
        "--ds_config",
        str(out / f"ds_config-{plan.precision or source.precision}.json"),
        "--set",
        *branch_overrides(source, plan, out, window),
    ]
    if resume:
        return [*cmd, "--resume", "latest"]
    branch = ["--overwrite", "--branch", str(source.path / "checkpoints" / source.tag)]
    branch += ["--stop_at", str(source.at + window)]
    return [*cmd, *branch, *(["--intervene", *plan.intervene] if plan.intervene else [])]


def branch_state(run_dir: Path) -> str:
    """``done``, ``resume`` (a checkpoint to continue from) or ``start``."""
    try:
        status = json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        status = {}
    if status.get("state") in ("finished", "min_loss_scale", "stopped"):  # each an outcome of the branch
        return "done"
    from dsinstab.checkpoint import Checkpointer

    return "resume" if Checkpointer(None, run_dir, 1, False).complete_tags() else "start"


def run_branch(source: Source, out: Path, plan: Plan, window: int, say) -> int:
    """Train one branch (or continue it); its output goes to ``OUT/<name>.log``. Returns the exit code."""
    state = branch_state(out / plan.name)
    if state == "done":
        say(f"branch {plan.name}: already done")
        return 0
    cmd = train_command(source, out, plan, window, resume=state == "resume")
    t0 = time.time()
    with open(out / f"{plan.name}.log", "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=Path.cwd()).returncode
    say(
        f"branch {plan.name} ({plan.spec}): {'continued' if state == 'resume' else 'ran'} in "
        f"{time.time() - t0:.0f}s, exit code {code}"
        + ("" if code in (0, 3, 4) else f" (failed: see {out / (plan.name + '.log')})")
    )
    if code == 2:  # bad input after all: the branch's own sentence is the last error line
        lines = (out / f"{plan.name}.log").read_text().splitlines()
        raise ConfigError(
            next(
                (ln[7:] for ln in reversed(lines) if ln.startswith("error: ")), "a branch refused its input."
            )
        )
    return code


# ---------------------------------------------------------------------------------------------
# The command


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="replay.py",
        description="Replay a spike of RUN from its newest checkpoint before STEP, exactly and with "
        "interventions; report what changed and which series moved first.",
        epilog="examples:\n  python scripts/replay.py runs/R --at 310 --window 40 --intervene skip reshuffle "
        "lr=x0.5 --seeds 2\n  python scripts/replay.py runs/R --at 31 --from step-20 --intervene precision=bf16 "
        "trainer.adam_beta2=0.99\n\ninterventions: " + INTERVENTIONS + "\n\nSee docs/forensics.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help="the run directory that spiked")
    p.add_argument("--at", type=int, required=True, metavar="STEP", help="the spike's step")
    p.add_argument(
        "--from",
        dest="from_tag",
        default=None,
        metavar="TAG",
        help="the checkpoint to branch from (default: RUN's newest before STEP)",
    )
    p.add_argument(
        "--window",
        type=int,
        default=None,
        metavar="N",
        help="steps to run past STEP (default: 20, or up to RUN's trainer.max_steps)",
    )
    p.add_argument(
        "--intervene",
        nargs="+",
        action="extend",
        default=[],
        metavar="SPEC",
        help="one branch each (see below)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="K",
        help="reshuffle: this many other batch orders (default: %(default)s)",
    )
    p.add_argument(
        "--k",
        type=float,
        default=4.0,
        help="what moved first: a series leaves its band beyond k robust sigmas (default: %(default)s)",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="where the branches and the report go (default: RUN-replay-STEP beside RUN)",
    )
    return p.parse_args(argv)


def prepare(args: argparse.Namespace) -> tuple[Source, list[Plan], Path, bool]:
    """Everything checked, nothing written: the source, the branches, the output folder, and
    whether it continues an earlier replay of the same request."""
    run = Path(args.run)
    if not (run / "config.yaml").exists() or not (run / "metrics.jsonl").exists():
        raise ConfigError(f"RUN: {run} is not a run directory (it needs config.yaml and metrics.jsonl).")
    for flag, value in (("--at", args.at), ("--window", args.window or 1), ("--seeds", args.seeds)):
        if value < 1:
            raise ConfigError(f"{flag}: must be at least 1, got {value}.")
    tag, tag_step, world = choose_checkpoint(run, args.at, args.from_tag)
    config = segment_config(run, tag_step + 1)
    max_steps = config["trainer"]["max_steps"]
    if args.window is None:
        args.window = max(1, min(20, max_steps - args.at))
    if args.at + args.window > max_steps:
        raise ConfigError(
            f"--window {args.window}: step {args.at + args.window} is past RUN's trainer.max_steps ({max_steps}), "
            f"where its lr schedule ends; give at most {max_steps - args.at}."
        )
    source = Source(run, config, world, tag, tag_step, args.at)
    plans = plan_branches(source, args.intervene, args.seeds)
    out = Path(args.out) if args.out else run.parent / f"{run.name}-replay-{args.at}"
    request = request_of(source, plans, args)
    resume = out.exists()
    if resume:
        try:
            earlier = json.loads((out / "replay.json").read_text())
        except (OSError, ValueError):
            earlier = None
        if earlier != request:
            raise ConfigError(
                f"--out {out}: already exists and holds {'another replay' if earlier else 'other files'}; "
                "pick another --out, or repeat that replay's exact command to continue it."
            )
    check_plans(source, plans, out, args.window)
    return source, plans, out, resume


def request_of(source: Source, plans: list[Plan], args: argparse.Namespace) -> dict:
    return {
        "run": str(source.path.resolve()),
        "at": source.at,
        "from": source.tag,
        "window": args.window,
        "branches": [p.name for p in plans],
    }


def write_inputs(source: Source, plans: list[Plan], out: Path, request: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "source.yaml").write_text(preset_text(source.config))
    for plan in plans:
        name = f"ds_config-{plan.precision or source.precision}.json"
        (out / name).write_text(json.dumps(branch_ds_config(source, plan), indent=1))
    (out / "replay.json").write_text(json.dumps(request, indent=1))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # DeepSpeed's logger, made when it is first imported, writes to the stdout of that moment:
    # make it stderr, so stdout holds the replay's own lines
    with contextlib.redirect_stdout(sys.stderr):
        import dsinstab.checkpoint  # noqa: F401
        import dsinstab.replay_report  # noqa: F401

    def say(msg: str) -> None:
        print(msg, flush=True)

    try:
        source, plans, out, resume = prepare(args)
        write_inputs(source, plans, out, request_of(source, plans, args))
        said: list[str] = []  # the plain replay's line waits: whether it was exact comes first
        codes = {plans[0].name: run_branch(source, out, plans[0], args.window, said.append)}
        from dsinstab.tracking import read_jsonl

        plain = out / plans[0].name / "metrics.jsonl"
        from dsinstab.replay_report import exactness

        exact, line = exactness(
            read_jsonl(source.path / "metrics.jsonl"),
            read_jsonl(plain) if plain.exists() else [],
            source.tag_step + 1,
            source.at,
        )
        say(line)
        say(
            f"replaying {source.path} from {tag_name(source)} to step {source.at + args.window}: "
            f"{len(plans)} branch(es) under {out}" + (" (continuing)" if resume else "")
        )
        for msg in said:
            say(msg)
        for plan in plans[1:]:
            codes[plan.name] = run_branch(source, out, plan, args.window, say)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from dsinstab.replay_report import write_replay_report

    report, sentence = write_replay_report(source, plans, codes, out, args.window, args.k, line)
    say(sentence)
    say(f"report: {report / 'report.html'} (and report.md, *.png)")
    return 0 if all(c in (0, 3, 4) for c in codes.values()) else 1
