"""scripts/gpu_check.sh, the GPU check, cannot rot unseen: its dry run prints every command it
would run on the GPU machine, and each command's script, flags, presets, ds_configs and --set keys
must exist here (train.py --dry-run resolves every run's config). The wheel folder's checks and
the version refusal are tested on made-up input. No GPU, no network, under 20 s."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# in the order the dry run prints them: phase by phase, lane by lane (scripts/gpu_check.py's plan)
CHECKS = ["readme-bf16", "prep-124m", "readme-fp16", "fp16-collapse", "probe", "mitigation", "spike-replay",
          "kill-resume", "mfu-124m", "pytest-gpu"]  # fmt: skip


def helper():
    """scripts/gpu_check.py as a module (it imports nothing heavy at the top)."""
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = mod  # (its dataclasses look their module up)
        spec.loader.exec_module(mod)
    return sys.modules["gpu_check"]


def test_the_dry_run_prints_every_check_and_each_command_exists_here():
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    )
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout.splitlines()
    assert out[-1] == "gpu_check --dry-run: 13 commands in 10 checks, 0 problem(s)", out[-5:]
    assert "train.py --dry-run resolved 12 of 12 run configs" in out
    assert [ln.split()[1] for ln in out if ln.startswith("== ")] == CHECKS
    # read here, apart from the helper's own checks: every command's script and named files exist
    commands = [
        shlex.split(ln.strip()[2:].split("   [timeout")[0]) for ln in out if ln.strip().startswith("$ ")
    ]
    assert len(commands) == 13
    for argv in commands:
        scripts = [a for a in argv if a.endswith(".py")]
        assert scripts and all((ROOT / s).is_file() for s in scripts), argv
        for flag, kind in (("--ds_config", "ds"), ("--preset", "preset")):
            if flag in argv:
                value = argv[argv.index(flag) + 1]
                path = ROOT / value if kind == "ds" else ROOT / "configs" / "presets" / f"{value}.yaml"
                assert path.is_file(), (flag, value)
        if "train.py" in " ".join(argv):
            assert Path(argv[0]).name == "deepspeed", argv  # the README's launcher
    readme = [a for a in commands if "utils.run_name=readme-bf16" in a][0]
    assert (
        "trainer.max_steps=100" in readme and "utils.report_to=none" not in readme
    )  # wandb as in the README


def test_the_dry_run_catches_a_missing_script_flag_and_intervention(tmp_path):
    gc = helper()
    ctx = gc.Ctx("dry-run", tmp_path, tmp_path, 0.0, 540)
    bad = gc.Check(
        "bad",
        10,
        [
            gc.Cmd(
                [
                    sys.executable,
                    str(ROOT / "scripts" / "replay.py"),
                    "runs/R",
                    "--at",
                    "3",
                    "--no-such-flag",
                    "--intervene",
                    "skip",
                    "warp=9",
                    "--out",
                    "x",
                ],
                10,
            ),
            gc.Cmd([sys.executable, str(ROOT / "scripts" / "no_such_script.py"), "--help"], 10),
        ],
        gc.judge_probe,
    )
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert gc.dry_run(ctx, [[[bad]]]) == 1
    text = buf.getvalue()
    assert "PROBLEM bad: replay.py has no --no-such-flag" in text
    assert "PROBLEM bad: replay.py names no intervention warp=9" in text
    assert "intervention skip" not in text
    assert f"PROBLEM bad: {ROOT / 'scripts' / 'no_such_script.py'} does not exist" in text


def fake_wheel(folder: Path, name: str, version: str, requires=(), tag="py3-none-any") -> None:
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(folder / f"{name.replace('-', '_')}-{version}-{tag}.whl", "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)


def test_the_wheel_folder_check_names_what_would_stop_the_offline_install(tmp_path):
    gc = helper()
    fake_wheel(
        tmp_path,
        "deepspeed",
        "0.19.8",
        ["pydantic>=2", "numpy", "hjson", "colorama; sys_platform == 'win32'"],
    )
    fake_wheel(tmp_path, "pydantic", "2.14.4", ["pydantic-core==2.50.5", "typing-extensions>=4.16"])
    fake_wheel(tmp_path, "pydantic", "2.13.0")
    fake_wheel(tmp_path, "pydantic-core", "2.50.5", tag="cp311-cp311-manylinux_2_17_x86_64")
    problems = gc.verify_wheels(tmp_path)
    assert any(p.startswith("pydantic comes twice") for p in problems), problems
    assert any("deepspeed needs hjson" in p for p in problems), problems  # numpy is the machine's
    assert any("is not for CPython 3.12" in p and "pydantic_core" in p for p in problems), problems
    assert not any("colorama" in p or "numpy" in p or "typing-extensions" in p for p in problems), problems
    assert gc.verify_wheels(tmp_path / "none") == [f"{tmp_path / 'none'} holds no wheels; make them with "
                                                   f"scripts/gpu_check.sh --make-wheels {tmp_path / 'none'}"]  # fmt: skip


def test_the_wheels_are_only_what_the_gpu_machine_lacks():
    gc = helper()
    pins, on_device = gc.closure(gc.ROOTS, gc.ALSO)
    assert pins["deepspeed"] == gc.DEEPSPEED_VERSION and {"datasets", "wandb", "pydantic", "hjson"} <= set(
        pins
    )
    assert not set(pins) & gc.NEVER_FETCH
    assert not (set(pins) - set(gc.ALSO)) & gc.DEVICE_HAS
    assert {d for d, _, _ in on_device} >= {"numpy", "torch", "pyarrow", "pandas"}


def test_a_torch_or_transformers_too_old_for_dsinstab_is_refused_in_one_sentence():
    gc = helper()
    found = {"torch": ["2.11.0+cu130", ""], "transformers": ["5.17.0", ""]}
    notes = gc.refuse_old(found)  # older than pyproject's pins, new enough for the code: noted, run
    assert [n.split(" (")[0] for n in notes] == ["torch 2.11.0+cu130", "transformers 5.17.0"]
    with pytest.raises(SystemExit) as e:
        gc.refuse_old({**found, "torch": ["2.5.1", ""]})
    msg = str(e.value)
    assert msg.startswith("gpu_check: refusing: torch 2.5.1 is older than 2.6, which brings ")
    assert msg.endswith("(pyproject.toml pins torch==2.13.0).") and msg.count(". ") == 0
