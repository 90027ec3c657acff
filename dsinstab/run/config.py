"""Run configuration: four YAML files -> four dataclasses, dotted overrides and checks.

Each YAML file in ``configs/`` maps onto one dataclass below; every field carries a one-line help
text and its allowed range in its metadata, and one generic checker enforces them. DeepSpeed's own
settings live only in the JSON files of ``ds_configs/``; the values the YAML owns appear there as
``"auto"`` and are filled in by :func:`dsinstab.run.ds_config.resolve_ds_config`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SECTIONS = ("trainer", "model", "dataset", "utils")


class ConfigError(ValueError):
    """Bad user input: one sentence naming the file, the key and what is allowed (exit code 2)."""


def param(default: Any, help: str, *, choices=None, ge=None, gt=None, le=None) -> Any:
    """A dataclass field with its help text and allowed range, checked by :func:`check`."""
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le}
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class SpikesConfig:
    window: int = param(100, "trailing window (steps) of the robust baseline", ge=5)
    warmup: int = param(50, "steps at the start that neither fire nor count toward the baseline", ge=0)
    loss_k: float = param(8.0, "loss spike: loss > median + loss_k * 1.4826 * MAD of the window", gt=0)
    grad_norm_k: float = param(12.0, "grad-norm spike: same rule on the global grad norm", gt=0)
    min_rel_jump: float = param(0.1, "and the value exceeds the median by at least this fraction", ge=0)
    level_shift_steps: int = param(
        25,
        "a spike lasting this many steps is a level shift: recorded, and the baseline restarts there",
        ge=2,
    )
    max_consecutive_overflows: int = param(10, "fp16: this many overflow-skipped steps in a row fire", ge=1)
    min_loss_scale: float = param(1.0, "fp16: the loss scale falling to this value fires", gt=0)
    score_window: int = param(1000, "window of the OLMo 2 spike score (spike/score_*)", ge=10)
    score_sigma: float = param(7.0, "a value counts toward the spike score beyond this many std", gt=0)
    action: str = param(
        "checkpoint", "what a firing does", choices=("checkpoint", "rollback", "stop", "none")
    )
    cooldown: int = param(50, "steps after a spike checkpoint before the next one", ge=0)
    max_checkpoints: int = param(3, "at most this many spike-<N> checkpoints per run", ge=0)
    rollback_min_back: int = param(10, "rollback: newest checkpoint at least this many steps back", ge=0)
    rollback_skip: int = param(5, "rollback: skip the batches through the spike plus this many", ge=0)
    max_rollbacks: int = param(5, "rollback: give up (stop) after this many rollbacks", ge=1)


@dataclass
class InjectConfig:
    at_step: int = param(0, "inject a fault at this optimizer step (0 = never)", ge=0)
    kind: str = param(
        "lr",
        "a fault of the state, for one step (lr: multiply the learning rate; embed: scale the embedding "
        "output), or bad data in the corpus itself, in the blocks of `steps` steps (repeat: one token "
        "repeated; random: uniformly random tokens)",
        choices=("lr", "embed", "repeat", "random"),
    )
    factor: float = param(1000.0, "lr, embed: the multiplier applied for that one step", gt=0)
    steps: int = param(1, "repeat, random: the steps from at_step on whose blocks are bad", ge=1)


@dataclass
class DiagnosticsConfig:
    every: int = param(0, "run the probes every this many steps (0 = off)", ge=0)
    probes: str = param(
        "attn_logits,out_logits,layer_norms,adam,activations",
        "comma-separated probes to run on probe steps (dsinstab.instruments.registry lists them)",
    )


@dataclass
class OverflowConfig:
    locate: bool = param(
        True, "name the first non-finite tensor of each overflow in its event (re-runs a skipped step traced)"
    )
    assumed_loss_scale: float = param(
        65536.0,
        "bf16/fp32: the fp16 loss scale the headroom probe assumes for gradients (DeepSpeed's initial 2^16)",
        gt=0,
    )


@dataclass
class MitigationsConfig:
    zclip_z: float = param(
        0.0,
        "ZClip: clip a grad norm more than zclip_z EMA std above the EMA mean of earlier norms (0 = off; 2.5 in the paper)",
        ge=0,
    )
    zclip_alpha: float = param(0.97, "ZClip: EMA smoothing of the grad norm's mean and variance", gt=0, le=1)
    zclip_mode: str = param(
        "adaptive",
        "ZClip: adaptive: a norm with z-score z > zclip_z is clipped to mean + zclip_z^2 / z * std (the paper's default); threshold: clipped at mean + zclip_z * std",
        choices=("adaptive", "threshold"),
    )
    skip_step_sigma: float = param(
        0.0,
        "skip an update whose loss or grad norm is this many std above the mean of the window (0 = off; 6 in OLMo-core)",
        ge=0,
    )
    skip_step_window: int = param(128, "skip-step: the steps in its rolling mean and std", ge=2)
    update_clip: bool = param(False, "StableAdamW: scale each tensor's step by 1 / max(1, RMS(g^2 / v))")
    update_norm_clip_sigma: float = param(
        0.0,
        "clip the norm of the whole update (weight decay included) at the mean + this many std of the last update_norm_clip_window update norms (0 = off; 3 in Levanter)",
        ge=0,
    )
    update_norm_clip_window: int = param(
        128, "update-norm clipping: the steps in its rolling mean and std", ge=2
    )
    qk_clip_tau: float = param(
        0.0,
        "QK-clip: after a step, rescale the query/key weights of each head whose max attention logit passed this (0 = off; 100 in Kimi K2)",
        ge=0,
    )


@dataclass
class TrainerConfig:
    max_steps: int = param(400, "optimizer steps to train for (skipped fp16 steps count)", ge=1)
    lr: float = param(3e-3, "peak learning rate of AdamW", gt=0, le=10)
    min_lr_ratio: float = param(0.1, "the cosine schedule ends at lr * min_lr_ratio", ge=0, le=1)
    warmup_steps: int = param(40, "linear warmup steps before the cosine decay", ge=0)
    seed: int = param(0, "seed of the model init and of the batch order", ge=0)
    micro_batch_size: int = param(8, "sequences per rank per micro step", ge=1)
    gradient_accumulation_steps: int = param(1, "micro steps per optimizer step", ge=1)
    grad_clip: float = param(1.0, "clip the global grad norm to this (0 = off)", ge=0)
    weight_decay: float = param(0.1, "AdamW weight decay on matrices", ge=0)
    decay_embeddings: bool = param(False, "apply weight decay to the embeddings too")
    independent_weight_decay: bool = param(
        False,
        "decay per step is weight_decay * lr_t / lr, not weight_decay * lr_t (independent of the peak lr)",
    )
    adam_beta1: float = param(0.9, "AdamW beta1", ge=0, le=1)
    adam_beta2: float = param(0.95, "AdamW beta2", ge=0, le=1)
    adam_eps: float = param(1e-8, "AdamW epsilon", gt=0)
    z_loss: float = param(0.0, "weight of the z-loss term z_loss * mean((log Z)^2) (0 = off)", ge=0)
    log_every: int = param(1, "write train/* metrics every this many steps", ge=1)
    eval_every: int = param(100, "evaluate on the validation blocks every this many steps", ge=1)
    eval_batches: int = param(8, "micro batches per rank in one evaluation", ge=1)
    checkpoint_every: int = param(100, "save a step-<N> checkpoint every this many steps (0 = off)", ge=0)
    keep_checkpoints: int = param(2, "periodic checkpoints kept (the pre-spike one is kept too)", ge=1)
    spikes: SpikesConfig = param(SpikesConfig(), "spike detectors and what they do")
    inject: InjectConfig = param(InjectConfig(), "a deliberate fault, for trying detectors")
    diagnostics: DiagnosticsConfig = param(DiagnosticsConfig(), "probes that explain a spike")
    overflow: OverflowConfig = param(OverflowConfig(), "overflow anatomy: where a non-finite value started")
    mitigations: MitigationsConfig = param(
        MitigationsConfig(), "mitigations from the literature, one key each"
    )


@dataclass
class ModelConfig:
    arch: str = param("llama", "transformers family built from scratch", choices=("gpt2", "llama", "qwen3"))
    n_layer: int = param(4, "transformer blocks", ge=1)
    d_model: int = param(256, "hidden size", ge=8)
    n_head: int = param(4, "attention heads (d_model must divide by it)", ge=1)
    d_ff: int = param(0, "MLP hidden size (0 = 4*d_model for gpt2, ~8/3*d_model for llama/qwen3)", ge=0)
    seq_len: int = param(256, "tokens per training sequence", ge=8)
    max_position: int = param(0, "position limit of the model (0 = seq_len)", ge=0)
    init_std: float = param(0.02, "std of the normal weight init", gt=0)
    tie_embeddings: bool = param(True, "share the input embedding and the output head")
    embedding_scale: float = param(1.0, "multiply the embedding output by this", gt=0)
    attn_implementation: str = param("sdpa", "attention kernel", choices=("sdpa", "eager"))
    attn_softcap: float = param(
        0.0,
        "Gemma 2: attention logits become c * tanh(logit / c) (0 = off; 50 in Gemma 2; replaces attn_implementation)",
        ge=0,
    )
    logit_softcap: float = param(
        0.0, "Gemma 2: output logits become c * tanh(logit / c) (0 = off; 30 in Gemma 2)", ge=0
    )
    compile: bool = param(
        False,
        "torch.compile the model (DeepSpeed's engine.compile); refuses the plug-ins that hook into its modules",
    )
    compile_backend: str = param(
        "inductor",
        "model.compile's backend (inductor: generated kernels, a C++ compiler on a CPU; aot_eager, eager: none generated, quick checks)",
        choices=("inductor", "aot_eager", "eager"),
    )


@dataclass
class DatasetConfig:
    source: str = param("builtin", "where the text comes from", choices=("builtin", "hub", "local", "disk"))
    name: str = param("", "hub: dataset id for datasets.load_dataset")
    config_name: str = param("", "hub: dataset configuration name")
    split: str = param("train", "hub/disk: split to read")
    path: str = param("", "local: file, folder or glob (.txt/.jsonl/.json/.parquet); disk: saved dataset")
    text_field: str = param("text", "column holding the text")
    tokenizer: str = param("bpe", "bpe (trained here), bytes, or a name/path for AutoTokenizer")
    vocab_size: int = param(
        4096,
        "vocabulary size (bpe: trained to it; others: at least the tokenizer's, e.g. padded to a multiple of 64)",
        ge=2,
    )
    val_fraction: float = param(0.02, "share of documents held out for validation", gt=0, le=0.5)
    max_chars: int = param(0, "use at most this many characters of the corpus (0 = all)", ge=0)
    num_proc: int = param(1, "processes for tokenization (at most one per source file or shard)", ge=1)
    streaming: bool = param(False, "hub: read the dataset as it downloads, without caching all of it first")


@dataclass
class UtilsConfig:
    run_name: str = param("", "run directory name (empty: <ds_config>-<date>-<time>)")
    output_dir: str = param("runs", "folder that holds the run directories")
    report_to: str = param("wandb", "wandb (offline without a key) or none", choices=("wandb", "none"))
    wandb_project: str = param("dsinstab", "wandb project")
    wandb_group: str = param("", "wandb group that gathers related runs (a pair, a sweep, a replay)")
    cache_dir: str = param("~/.cache/dsinstab", "datasets and tokenizers cache")
    progress_bar: bool = param(True, "show a tqdm bar on rank 0")
    cpu_compute: str = param(
        "auto",
        "CPU only: bf16/fp16 matmuls natively or in fp32 rounded to the dtype (auto: fp32 where the CPU lacks native kernels)",
        choices=("auto", "native", "fp32"),
    )


SECTION_TYPES = {
    "trainer": TrainerConfig,
    "model": ModelConfig,
    "dataset": DatasetConfig,
    "utils": UtilsConfig,
}


@dataclass
class RunConfig:
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    utils: UtilsConfig = field(default_factory=UtilsConfig)
    ds_config: dict = field(default_factory=dict)
    ds_config_path: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Loading, overrides and checks


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, typ: Any, where: str, key: str) -> Any:
    """Check a YAML value against the field's type; ints are accepted for floats."""
    ok = (
        (typ is bool and isinstance(value, bool))
        or (typ is int and isinstance(value, int) and not isinstance(value, bool))
        or (typ is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (typ is str and isinstance(value, str))
    )
    if not ok:
        raise ConfigError(f"{where}: {key} must be {typ.__name__}, got {type(value).__name__} {value!r}.")
    return float(value) if typ is float else value


def _parse_cli_value(text: str, typ: Any, key: str) -> Any:
    """Turn the text of ``--set key=text`` into the field's type."""
    where = "--set"
    if typ is str:
        return text
    if typ is bool:
        low = text.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: {key} must be true or false, got {text!r}.")
    try:
        return typ(text) if typ is float else int(text, 0)
    except ValueError:
        raise ConfigError(f"{where}: {key} must be {typ.__name__}, got {text!r}.") from None


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _apply(obj: Any, values: dict, where: str, prefix: str) -> None:
    """Set the fields of dataclass ``obj`` from a YAML mapping, recursing into nested sections."""
    types = _field_types(type(obj))
    for key, value in values.items():
        dotted = f"{prefix}.{key}"
        if key not in types:
            options = [f"{prefix}.{k}" for k in types]
            raise ConfigError(f"{where}: unknown key {dotted}{_suggest(dotted, options)}.")
        typ = types[key]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {dotted} must be a mapping of its keys, got {value!r}.")
            _apply(getattr(obj, key), value, where, dotted)
        else:
            setattr(obj, key, _coerce(value, typ, where, dotted))


def check(obj: Any, where: str, prefix: str) -> None:
    """Enforce each field's ``choices`` and numeric bounds from its metadata."""
    for f in dataclasses.fields(obj):
        value, meta, key = getattr(obj, f.name), f.metadata, f"{prefix}.{f.name}"
        if dataclasses.is_dataclass(value):
            check(value, where, key)
            continue
        if meta.get("choices") and value not in meta["choices"]:
            allowed = ", ".join(map(str, meta["choices"]))
            raise ConfigError(f"{where}: {key} must be one of {allowed}, got {value!r}.")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}: {key} must be a finite number, got {value!r}.")
        for bound, fails, word in (
            ("ge", lambda v, b: v < b, ">="),
            ("gt", lambda v, b: v <= b, ">"),
            ("le", lambda v, b: v > b, "<="),
        ):
            b = meta.get(bound)
            if b is not None and fails(value, b):
                raise ConfigError(f"{where}: {key} must be {word} {b}, got {value!r}.")


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: malformed YAML{at}; fix the syntax.") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror}).") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a mapping of keys, got {type(data).__name__}.")
    return data


def load_config(
    config_dir: str | Path,
    overrides: list[str] = (),
    preset: str | Path | None = None,
) -> RunConfig:
    """Read the four YAML files of ``config_dir`` (absent ones keep the defaults), then a preset
    (one YAML file with ``trainer:``/``model:``/... sections), then ``--set`` overrides."""
    cfg = RunConfig()
    config_dir = Path(config_dir)
    if not config_dir.is_dir():
        raise ConfigError(f"--config_dir: {config_dir} is not a directory.")
    for section in SECTIONS:
        path = config_dir / f"{section}.yaml"
        if path.exists():
            _apply(getattr(cfg, section), _read_yaml(path), str(path), section)
    if preset:
        path = resolve_preset(preset, config_dir)
        data = _read_yaml(path)
        for section, values in data.items():
            if section not in SECTIONS:
                raise ConfigError(
                    f"{path}: unknown section {section}{_suggest(section, list(SECTIONS))}; "
                    f"allowed: {', '.join(SECTIONS)}."
                )
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section {section} must be a mapping of keys.")
            _apply(getattr(cfg, section), values, str(path), section)
    for item in overrides:
        apply_override(cfg, item)
    for section in SECTIONS:
        check(getattr(cfg, section), _source_of(config_dir, section, preset, overrides), section)
    check_consistency(cfg, _source_of(config_dir, "model", preset, overrides))
    # where each section was last set, for the plug-ins' refusals (dsinstab.instruments.registry)
    cfg.sources = {section: _source_of(config_dir, section, preset, overrides) for section in SECTIONS}
    return cfg


def _source_of(config_dir: Path, section: str, preset, overrides) -> str:
    """The file (or --set) to name in a range error of ``section``: the last one that set it."""
    if any(o.split("=", 1)[0].startswith(section + ".") for o in overrides):
        return "--set"
    if preset:
        return str(resolve_preset(preset, config_dir))
    return str(config_dir / f"{section}.yaml")


def resolve_preset(preset: str | Path, config_dir: Path) -> Path:
    """A preset is a path to a YAML file, or a name under ``<config_dir>/presets/``."""
    p = Path(preset)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    candidate = config_dir / "presets" / f"{preset}.yaml"
    if candidate.exists():
        return candidate
    names = sorted(q.stem for q in (config_dir / "presets").glob("*.yaml"))
    raise ConfigError(
        f"--preset: no preset {preset!r}{_suggest(str(preset), names)}; "
        f"available: {', '.join(names) or 'none'}."
    )


def apply_override(cfg: RunConfig, item: str) -> None:
    """Apply one ``section.key=value`` (or ``section.sub.key=value``) override."""
    if "=" not in item:
        raise ConfigError(f"--set: {item!r} must look like section.key=value.")
    dotted, text = item.split("=", 1)
    parts = dotted.strip().split(".")
    if parts[0] not in SECTIONS or len(parts) < 2:
        raise ConfigError(
            f"--set: {dotted!r} must start with one of {', '.join(SECTIONS)} "
            f"followed by a key{_suggest(parts[0], list(SECTIONS))}."
        )
    obj = getattr(cfg, parts[0])
    for i, name in enumerate(parts[1:], start=1):
        types = _field_types(type(obj))
        prefix = ".".join(parts[:i])
        if name not in types:
            options = [f"{prefix}.{k}" for k in types]
            raise ConfigError(f"--set: unknown key {dotted}{_suggest(dotted, options)}.")
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(types[name]):
                raise ConfigError(f"--set: {dotted} is a section; set one of its keys.")
            setattr(obj, name, _parse_cli_value(text, types[name], dotted))
        else:
            obj = getattr(obj, name)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"--set: {'.'.join(parts[: i + 1])} has no keys below it.")


def check_consistency(cfg: RunConfig, where: str) -> None:
    """Checks that span several model fields (``where`` names the file that set them)."""
    m = cfg.model
    if m.d_model % m.n_head:
        raise ConfigError(
            f"{where}: model.d_model ({m.d_model}) must be divisible by model.n_head ({m.n_head})."
        )
    if m.arch in ("llama", "qwen3") and (m.d_model // m.n_head) % 2:
        raise ConfigError(
            f"{where}: model.{m.arch}'s rotary embeddings need an even head size; "
            f"model.d_model / model.n_head is {m.d_model // m.n_head}."
        )
    if m.max_position and m.seq_len > m.max_position:
        raise ConfigError(
            f"{where}: model.seq_len ({m.seq_len}) is longer than the model allows "
            f"(model.max_position = {m.max_position})."
        )


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
