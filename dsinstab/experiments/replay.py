"""Spike forensics: replay a spike from one of RUN's checkpoints and try interventions on it.

Here: the checkpoint to branch from, the branches (the plain replay and one per intervention, each
an ordinary run started by ``train.py --branch``, see :mod:`dsinstab.experiments.branch`), their
checks before anything is written, and running them. ``scripts/replay.py``
(:mod:`dsinstab.commands.replay`) says whether the plain replay reproduced RUN and writes the
report (:mod:`dsinstab.reports.replay_report`).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from dsinstab.experiments.launch import Launch, command_line
from dsinstab.run.config import SECTIONS, ConfigError, load_config
from dsinstab.run.ds_config import YAML_OWNED, precision, resolve_ds_config
from dsinstab.run.status import EXIT_BAD_INPUT, RunEnd, outcome, read_status

ROOT = Path(__file__).resolve().parents[2]
# the exit codes of a branch that ended with a result (not one that failed)
OUTCOME_CODES = tuple(end.code for end in RunEnd if end.is_outcome)


# ---------------------------------------------------------------------------------------------
# The branches: planned and checked before anything is written

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
    from dsinstab.run.checkpoint import RANKS, Checkpointer

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
    from dsinstab.instruments import registry  # here: DeepSpeed's logger prints to stdout on import

    probes = ",".join(registry.probes())
    return [
        *plan.sets,
        "model.compile=false",  # every probe hooks the modules; a compiled RUN replays eager
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
    from dsinstab.instruments import registry  # here: DeepSpeed's logger prints to stdout on import

    with tempfile.TemporaryDirectory() as tmp:
        preset = Path(tmp) / "source.yaml"
        preset.write_text(preset_text(source.config))
        for plan in plans:
            try:
                cfg = load_config(ROOT / "configs", branch_overrides(source, plan, out, window), preset)
                cfg.ds_config, _ = resolve_ds_config(
                    branch_ds_config(source, plan), "ds_config", cfg, source.world
                )
                cfg.ds_config_path = "ds_config"
                registry.check(cfg)
            except ConfigError as e:  # say which intervention, not the --set it became
                raise ConfigError(f"--intervene {plan.spec}: {str(e).removeprefix('--set: ')}") from None


# ---------------------------------------------------------------------------------------------
# Running the branches


def train_command(
    source: Source, out: Path, plan: Plan, window: int, resume: bool, launch: Launch | None = None
) -> list[str]:
    """``train.py`` for one branch, launched as ``launch`` says (default: as many ranks as RUN's
    checkpoint holds, on this node: one process for one rank, DeepSpeed's launcher for more)."""
    head = (launch or Launch(num_gpus=source.world)).head()
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
    if outcome(read_status(run_dir)):
        return "done"
    from dsinstab.run.checkpoint import Checkpointer

    return "resume" if Checkpointer(None, run_dir, 1, False).complete_tags() else "start"


def run_branch(source: Source, out: Path, plan: Plan, window: int, say, launch: Launch | None = None) -> int:
    """Train one branch (or continue it); its output goes to ``OUT/<name>.log``. Returns the exit code."""
    state = branch_state(out / plan.name)
    if state == "done":
        say(f"branch {plan.name}: already done")
        return 0
    cmd = train_command(source, out, plan, window, state == "resume", launch)
    t0 = time.time()
    with open(out / f"{plan.name}.log", "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=Path.cwd()).returncode
    say(
        f"branch {plan.name} ({plan.spec}): {'continued' if state == 'resume' else 'ran'} in "
        f"{time.time() - t0:.0f}s, exit code {code}"
        + ("" if code in OUTCOME_CODES else f" (failed: see {out / (plan.name + '.log')})")
    )
    if code == EXIT_BAD_INPUT:  # bad input after all: the branch's own sentence is the last error line
        lines = (out / f"{plan.name}.log").read_text().splitlines()
        raise ConfigError(
            next(
                (ln[7:] for ln in reversed(lines) if ln.startswith("error: ")), "a branch refused its input."
            )
        )
    return code


def branch_commands(source: Source, plans: list[Plan], out: Path, window: int, launch: Launch) -> list[str]:
    """What ``--emit commands`` prints: the command line of each branch still to do (its resume
    where it has a checkpoint), run from this folder, every path in it absolute."""
    source, out = replace(source, path=source.path.resolve()), out.resolve()
    lines = []
    for plan in plans:
        state = branch_state(out / plan.name)
        if state != "done":
            lines.append(
                command_line(train_command(source, out, plan, window, state == "resume", launch), Path.cwd())
            )
    return lines


def write_inputs(source: Source, plans: list[Plan], out: Path, request: dict) -> None:
    """What the branches train from (RUN's config as a preset, a ds_config per precision) and the
    request, which a repeated command must match to continue the replay."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "source.yaml").write_text(preset_text(source.config))
    for plan in plans:
        name = f"ds_config-{plan.precision or source.precision}.json"
        (out / name).write_text(json.dumps(branch_ds_config(source, plan), indent=1))
    (out / "replay.json").write_text(json.dumps(request, indent=1))
