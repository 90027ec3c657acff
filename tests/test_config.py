"""Every shipped YAML and ds_config loads; overrides are typed; bad input gets one clear sentence."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, python_train
from dsinstab.run.config import ConfigError, RunConfig, load_config
from dsinstab.run.ds_config import precision, read_ds_config, resolve_ds_config

DS_CONFIGS = sorted((ROOT / "ds_configs").glob("*.json"))
PRESETS = sorted((ROOT / "configs" / "presets").glob("*.yaml"))


def test_shipped_yaml_matches_the_dataclass_defaults():
    """configs/*.yaml document every key; they must not drift from the defaults in code."""
    assert load_config(ROOT / "configs").to_dict() == RunConfig().to_dict()
    for section in ("trainer", "model", "dataset", "utils"):
        keys = set(yaml.safe_load((ROOT / "configs" / f"{section}.yaml").read_text()))
        fields = {f.name for f in dataclasses.fields(getattr(RunConfig(), section))}
        assert keys == fields, section


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_every_ds_config_resolves(path):
    cfg = load_config(ROOT / "configs")
    ds, _ = resolve_ds_config(read_ds_config(path), path, cfg, world_size=2)
    assert (
        ds["train_batch_size"] == cfg.trainer.micro_batch_size * cfg.trainer.gradient_accumulation_steps * 2
    )
    assert ds["gradient_clipping"] == cfg.trainer.grad_clip
    assert not [k for k, v in ds.items() if v == "auto"]
    assert precision(ds) == path.stem.split("_")[1]


def test_the_ds_config_matrix_is_complete():
    names = {p.stem for p in DS_CONFIGS}
    assert {f"zero{s}_{p}" for s in range(4) for p in ("fp16", "bf16")} | {"zero2_fp32"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads(path):
    load_config(ROOT / "configs", preset=path)


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        ROOT / "configs",
        [
            "trainer.lr=1e-2",
            "trainer.max_steps=7",
            "model.arch=qwen3",
            "trainer.decay_embeddings=true",
            "trainer.spikes.action=rollback",
            "utils.run_name=x",
        ],
    )
    assert cfg.trainer.lr == 0.01 and isinstance(cfg.trainer.lr, float)
    assert cfg.trainer.max_steps == 7 and cfg.model.arch == "qwen3"
    assert cfg.trainer.decay_embeddings is True
    assert cfg.trainer.spikes.action == "rollback" and cfg.utils.run_name == "x"


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.lrr=1", "unknown key trainer.lrr (did you mean trainer.lr?)"),
        ("trainer.max_steps=ten", "trainer.max_steps must be int"),
        ("trainer.lr=-1", "trainer.lr must be > 0"),
        ("model.arch=gpt5", "model.arch must be one of gpt2, llama, qwen3"),
        ("trainer.spikes.cooldown=-3", "trainer.spikes.cooldown must be >= 0"),
        ("model.n_head=3", "model.d_model (256) must be divisible by model.n_head (3)"),
        ("optim.lr=1", "must start with one of trainer, model, dataset, utils"),
        ("trainer.spikes=1", "trainer.spikes is a section"),
        (
            "model.max_position=128",
            "model.seq_len (256) is longer than the model allows (model.max_position = 128)",
        ),
    ],
)
def test_bad_overrides_are_refused_with_the_key(override, message):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(ROOT / "configs", [override])
    assert message in str(e.value)
    assert str(e.value).startswith("--set")


def _config_dir(tmp_path: Path, **files: str) -> Path:
    for name, text in files.items():
        (tmp_path / f"{name}.yaml").write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    "text, message",
    [
        ("lr: [1, 2", "malformed YAML at line"),
        ("lr: 1\nmax_step: 3\n", "unknown key trainer.max_step (did you mean trainer.max_steps?)"),
        ("max_steps: 1.5\n", "trainer.max_steps must be int, got float 1.5"),
        ("lr: '0.1'\n", "trainer.lr must be float, got str"),
        ("warmup_steps: -1\n", "trainer.warmup_steps must be >= 0, got -1"),
        ("spikes: 3\n", "trainer.spikes must be a mapping"),
        ("- a\n- b\n", "must hold a mapping of keys"),
    ],
)
def test_bad_yaml_names_the_file_and_key(tmp_path, text, message):
    d = _config_dir(tmp_path, trainer=text)
    with pytest.raises(ConfigError) as e:
        load_config(d)
    assert str(e.value).startswith(str(d / "trainer.yaml"))
    assert message in str(e.value)


def _resolve(ds: dict, *overrides: str, world: int = 1):
    cfg = load_config(ROOT / "configs", list(overrides))
    return resolve_ds_config(ds, "my.json", cfg, world)


def test_explicit_ds_values_must_agree_with_the_yaml():
    ds, _ = _resolve(
        {"train_micro_batch_size_per_gpu": 8, "gradient_clipping": 1.0, "train_batch_size": 16}, world=2
    )
    assert ds["gradient_accumulation_steps"] == 1
    with pytest.raises(
        ConfigError, match='my.json: gradient_clipping is 0.5 but trainer.grad_clip gives 1.0; write "auto"'
    ):
        _resolve({"gradient_clipping": 0.5})
    with pytest.raises(ConfigError, match="train_batch_size is 64 but trainer.micro_batch_size x"):
        _resolve({"train_batch_size": 64})


def test_fp16_and_bf16_both_on_is_refused():
    with pytest.raises(ConfigError, match="fp16.enabled and bf16.enabled are both true"):
        _resolve({"fp16": {"enabled": True}, "bf16": {"enabled": True}})


def test_a_transformers_integration_ds_config_runs_or_is_refused_clearly():
    hf_style = {
        "fp16": {"enabled": True},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        },
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {"warmup_num_steps": "auto", "total_num_steps": "auto"},
        },
        "zero_optimization": {
            "stage": 3,
            "reduce_bucket_size": "auto",
            "stage3_prefetch_bucket_size": "auto",
        },
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_clipping": "auto",
    }
    ds, notes = _resolve(hf_style)
    assert "optimizer" not in ds and "scheduler" not in ds and len(notes) == 2
    assert ds["zero_optimization"]["reduce_bucket_size"] == 256 * 256
    explicit = {**hf_style, "optimizer": {"type": "AdamW", "params": {"lr": 3e-4}}}
    with pytest.raises(
        ConfigError, match="the optimizer block is not supported; remove it and set trainer.lr"
    ):
        _resolve(explicit)
    with pytest.raises(ConfigError, match="fp16.enabled must be true or false"):
        _resolve({"fp16": {"enabled": "auto"}})


def test_malformed_ds_config(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{"fp16": {')
    with pytest.raises(ConfigError, match="bad.json: malformed JSON at line 1"):
        read_ds_config(p)


def test_dry_run_prints_the_resolved_config_and_writes_nothing(tmp_path):
    proc = python_train(
        "--ds_config",
        str(ROOT / "ds_configs/zero3_fp16.json"),
        "--config_dir",
        str(ROOT / "configs"),
        "--set",
        "trainer.lr=0.01",
        f"utils.output_dir={tmp_path}",
        "--dry-run",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["trainer"]["lr"] == 0.01
    assert printed["ds_config"]["zero_optimization"]["stage"] == 3
    assert printed["ds_config"]["train_micro_batch_size_per_gpu"] == 8
    assert printed["ds_config"]["fp16"]["enabled"] is True
    assert list(tmp_path.iterdir()) == []


def test_presets_hold_only_known_sections(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text(json.dumps({"trainr": {"lr": 1}}))
    with pytest.raises(ConfigError, match="unknown section trainr \\(did you mean trainer\\?\\)"):
        load_config(ROOT / "configs", preset=p)


def test_resume_needs_a_complete_checkpoint(tmp_path):
    from dsinstab.run.checkpoint import Checkpointer

    ck = Checkpointer(engine=None, run_dir=tmp_path, keep=2, is_main=True)
    with pytest.raises(ConfigError, match="--resume latest: .* holds no complete checkpoint"):
        ck.resolve("latest")
    (tmp_path / "checkpoints" / "step-5").mkdir(parents=True)  # partial: no marker
    with pytest.raises(ConfigError, match="no complete checkpoint step-5 .* have: none"):
        ck.resolve("step-5")
