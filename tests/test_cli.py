"""The command line as a new user meets it: help, any working directory, and --dry-run's checks."""

from __future__ import annotations

import re
import sys

import pytest
import yaml

from conftest import ROOT, python_train, run_cmd
from dsinstab.run.resolve import DEFAULT_DS_CONFIG

PRESETS = sorted(p.stem for p in (ROOT / "configs" / "presets").glob("*.yaml"))
DS_CONFIGS = sorted(p.stem for p in (ROOT / "ds_configs").glob("*.json"))


def script(name: str, *args: str, cwd=ROOT):
    return run_cmd([sys.executable, str(ROOT / "scripts" / name), *args], 120, cwd=cwd)


def test_train_help_shows_defaults_examples_presets_and_exit_codes(tmp_path):
    proc = script("train.py", "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out, flat = proc.stdout, " ".join(proc.stdout.split())  # argparse wraps to the terminal
    assert f"(default: {DEFAULT_DS_CONFIG})" in flat and "(default: configs)" in flat
    assert "examples:" in out and "deepspeed scripts/train.py --ds_config ds_configs/zero2_fp16.json" in out
    for name in PRESETS:  # each preset with the first line of its comment
        first = (ROOT / "configs" / "presets" / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
        assert re.search(rf"^  {re.escape(name)} +{re.escape(first)}$", out, re.M), name
    assert all(name in out for name in DS_CONFIGS)
    assert "  3  DeepSpeed's fp16 loss scale hit its minimum" in out


def test_pair_and_compare_help(tmp_path):
    pair = script("fp16_vs_bf16.py", "--help", cwd=tmp_path)
    assert pair.returncode == 0 and "(default: 2)" in " ".join(pair.stdout.split())
    assert "examples:" in pair.stdout
    assert all(name in pair.stdout for name in PRESETS)
    compare = script("compare.py", "--help", cwd=tmp_path)
    assert compare.returncode == 0 and "python scripts/compare.py runs/first-fp16" in compare.stdout


def test_the_readme_and_the_code_agree_on_the_default_ds_config():
    readme = (ROOT / "README.md").read_text()
    assert f"`{DEFAULT_DS_CONFIG}` is the default" in readme


def test_shipped_configs_resolve_from_any_directory(tmp_path):
    """From a folder that is not the checkout: the shipped configs/, ds_configs/ (by path or bare
    name) and presets are found in the checkout."""
    for ds in ("ds_configs/zero3_fp16.json", "zero3_fp16"):
        proc = python_train(
            "--dry-run",
            "--ds_config",
            ds,
            "--preset",
            "fp16-collapse",
            "--set",
            "utils.run_name=x",
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr
        cfg = yaml.safe_load(proc.stdout)
        assert cfg["trainer"]["lr"] == 0.1 and cfg["trainer"]["spikes"]["warmup"] == 0  # the preset
        assert cfg["ds_config"]["fp16"]["enabled"] and cfg["ds_config"]["zero_optimization"]["stage"] == 3
        assert cfg["ds_config_path"] == str(ROOT / "ds_configs" / "zero3_fp16.json")
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing


def test_a_path_in_the_working_directory_comes_first(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "model.yaml").write_text("n_layer: 3\n")
    proc = python_train("--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["model"]["n_layer"] == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ("--set", "dataset.source=hub"),
            "dataset.name must name a hub dataset when dataset.source is hub",
        ),
        (
            ("--set", "dataset.source=local", "dataset.path=/no/such/*.txt"),
            "dataset.path '/no/such/*.txt' matches no .txt, .jsonl, .json or .parquet file",
        ),
        (("--set", "dataset.source=disk"), "dataset.path must be set when dataset.source is disk"),
        (("--set", "utils.run_name=old"), "already exists; pass --resume latest to continue it"),
        (("--resume", "latest", "--set", "utils.run_name=new"), "--resume latest: "),
        (
            ("--preset", "fp16-colapse"),
            "--preset: no preset 'fp16-colapse' (did you mean fp16-collapse?)",
        ),
        (
            ("--ds_config", "zero9_fp8"),
            "--ds_config: zero9_fp8 does not exist; give a path or one of zero0_bf16",
        ),
    ],
)
def test_dry_run_refuses_what_the_run_refuses(tmp_path, args, message):
    (tmp_path / "runs" / "old").mkdir(parents=True)
    proc = python_train("--dry-run", *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert proc.stdout == "" and [p.name for p in (tmp_path / "runs").iterdir()] == ["old"]


def test_the_readme_names_the_default_model_by_its_size():
    from dsinstab.run.config import load_config
    from dsinstab.run.model import build_model, count_parameters

    cfg = load_config(ROOT / "configs")
    n = count_parameters(build_model(cfg.model, cfg.dataset.vocab_size, 0, 0))
    readme = (ROOT / "README.md").read_text()
    assert f"{n / 1e6:.1f}M-parameter" in readme  # the quickstart's and the default run's model
