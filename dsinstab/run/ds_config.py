"""The ds_config: DeepSpeed's own JSON, read, checked, and its ``"auto"`` values filled from the YAML.

DeepSpeed's own settings live only in the JSON files of ``ds_configs/``; the values the YAML owns
(batch sizes, gradient clipping, ZeRO bucket sizes) appear there as ``"auto"`` and are filled in by
:func:`resolve_ds_config`, which refuses a value that contradicts the YAML.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from dsinstab.run.config import ConfigError, RunConfig

# ds_config key -> (the YAML key that owns it, how to compute it from the run config and world size)
YAML_OWNED = {
    "train_micro_batch_size_per_gpu": (
        "trainer.micro_batch_size",
        lambda c, ws: c.trainer.micro_batch_size,
    ),
    "gradient_accumulation_steps": (
        "trainer.gradient_accumulation_steps",
        lambda c, ws: c.trainer.gradient_accumulation_steps,
    ),
    "train_batch_size": (
        "trainer.micro_batch_size x trainer.gradient_accumulation_steps x world size",
        lambda c, ws: c.trainer.micro_batch_size * c.trainer.gradient_accumulation_steps * ws,
    ),
    "gradient_clipping": ("trainer.grad_clip", lambda c, ws: c.trainer.grad_clip),
}
# "auto" ZeRO bucket sizes, filled from the hidden size as the transformers integration does.
ZERO_AUTO = {
    "reduce_bucket_size": lambda d: d * d,
    "stage3_prefetch_bucket_size": lambda d: int(0.9 * d * d),
    "stage3_param_persistence_threshold": lambda d: 10 * d,
}
OPTIMIZER_KEYS = "trainer.lr, trainer.weight_decay, trainer.adam_beta1/adam_beta2, trainer.adam_eps"
SCHEDULER_KEYS = "trainer.warmup_steps, trainer.min_lr_ratio and trainer.max_steps"


def read_ds_config(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--ds_config: {path} does not exist.") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: malformed JSON at line {e.lineno}; fix the syntax.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a JSON object.")
    return data


def _all_auto(block: Any) -> bool:
    params = block.get("params", {}) if isinstance(block, dict) else None
    return isinstance(params, dict) and all(v == "auto" for v in params.values())


def resolve_ds_config(raw: dict, path: str | Path, cfg: RunConfig, world_size: int) -> tuple[dict, list[str]]:
    """Fill the ``"auto"`` values from the YAML and refuse contradictions.

    Returns the resolved dict and notes for the user (e.g. an all-"auto" optimizer block dropped).
    """
    ds, notes = copy.deepcopy(raw), []
    for key, (owner, compute) in YAML_OWNED.items():
        want = compute(cfg, world_size)
        have = ds.get(key, "auto")
        if have == "auto":
            ds[key] = want
        elif not isinstance(have, (int, float)) or isinstance(have, bool) or float(have) != float(want):
            raise ConfigError(
                f'{path}: {key} is {have!r} but {owner} gives {want}; write "auto" so the YAML decides.'
            )
    fp16 = ds.get("fp16", {}).get("enabled", False)
    bf16 = ds.get("bf16", {}).get("enabled", False)
    for name, flag in (("fp16", fp16), ("bf16", bf16)):
        if not isinstance(flag, bool):
            raise ConfigError(
                f"{path}: {name}.enabled must be true or false (got {flag!r}); precision lives in the ds_config."
            )
    if fp16 and bf16:
        raise ConfigError(f"{path}: fp16.enabled and bf16.enabled are both true; enable at most one.")
    for block, keys in (("optimizer", OPTIMIZER_KEYS), ("scheduler", SCHEDULER_KEYS)):
        if block not in ds:
            continue
        if _all_auto(ds[block]):
            del ds[block]
            notes.append(f'{path}: dropped the all-"auto" {block} block; {keys} set it.')
        else:
            raise ConfigError(
                f"{path}: the {block} block is not supported; remove it and set {keys} in trainer.yaml."
            )
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}.")
    for key, value in list(zero.items()):
        if value == "auto":
            if key not in ZERO_AUTO:
                raise ConfigError(f'{path}: zero_optimization.{key} cannot be "auto"; give a value.')
            zero[key] = ZERO_AUTO[key](cfg.model.d_model)
    leftover = [k for k, v in ds.items() if v == "auto"]
    if leftover:
        raise ConfigError(f'{path}: {leftover[0]} cannot be "auto" here; give a value.')
    ds.setdefault("steps_per_print", 10**9)  # our own logging replaces DeepSpeed's prints
    return ds, notes


def precision(ds_config: dict) -> str:
    """``fp16``, ``bf16`` or ``fp32``, from a resolved ds_config."""
    if ds_config.get("fp16", {}).get("enabled"):
        return "fp16"
    if ds_config.get("bf16", {}).get("enabled"):
        return "bf16"
    return "fp32"


def zero_stage(ds_config: dict) -> int:
    """The ZeRO stage of a resolved ds_config (0 without a ``zero_optimization`` block)."""
    return ds_config.get("zero_optimization", {}).get("stage", 0)
