"""A branch: a new run started from another run's checkpoint (``scripts/train.py --branch
RUN/checkpoints/TAG``), the unit every replay of :mod:`dsinstab.experiments.replay` is made of.

Its weights, Adam moments, loss scaler, schedule position, step, data position, detector and
plug-in states and RNG states are the checkpoint's; its optimizer hyperparameters (``trainer.lr``,
``adam_eps``, ``adam_beta1/2``, ``weight_decay``), grad clipping, z-loss and precision are its own
config's. ``--intervene`` adds what no config key says (``skip=A-B``, ``reshuffle=K``,
``reset_adam``) and ``--stop_at N`` ends it early while the lr schedule keeps spanning
``trainer.max_steps``. All of it lives in the :class:`Branch` plug-in, whose state rides in the
branch's own checkpoints, so ``--resume latest`` continues a branch exactly.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from dsinstab.run.config import ConfigError
from dsinstab.run.ds_config import precision
from dsinstab.run.plugins import PluginBase

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
        self.order, self.gas = None, 1

    def arm(self, spec: dict) -> None:
        self.spec = dict(spec)

    def bind(self, run) -> None:
        self.order, self.gas = run.order, run.cfg.trainer.gradient_accumulation_steps
        if self.spec.get("reshuffle"):  # from the run's own seed: idempotent on a resume
            self.order.reseed(reshuffled_seed(run.cfg.trainer.seed, self.spec["reshuffle"]))

    def last_step(self, max_steps: int) -> int:
        # the loop ends here; the engine's schedule, built from max_steps, is untouched
        return self.spec.get("stop_at") or max_steps

    def begin_step(self, step) -> None:
        skip = self.spec.get("skip")
        if skip and step.number == skip[0]:
            self.order.skip((skip[1] - skip[0] + 1) * self.gas)

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
    from dsinstab.run.checkpoint import Checkpointer, on_rank_zero

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
        from dsinstab.run.checkpoint import layout_mismatch

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
    from dsinstab.run.engine import apply_optimizer_config
    from dsinstab.run.state import restore

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
