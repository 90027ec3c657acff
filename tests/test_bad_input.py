"""Bad input through the real entry point: exit code 2, one sentence on stderr, nothing written."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, TINY, launch, python_train


def _run(tmp_path, *args, ds="ds_configs/zero2_bf16.json"):
    out = tmp_path / "runs"
    proc = python_train(
        "--ds_config",
        str(ROOT / ds) if not ds.startswith("/") else ds,
        "--set",
        *TINY,
        f"utils.output_dir={out}",
        f"utils.cache_dir={tmp_path / 'cache'}",
        *args,
    )
    return proc, out


def _assert_refused(proc, out, message):
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(
    "args, message",
    [
        (("trainer.lr=0",), "--set: trainer.lr must be > 0, got 0.0"),
        (("trainer.max_steps=1.5",), "--set: trainer.max_steps must be int, got '1.5'"),
        (("model.arch=mamba",), "model.arch must be one of gpt2, llama, qwen3"),
        (("model.d_model=100", "model.n_head=4"), "model.llama's rotary embeddings need an even head size"),
        (("trainer.lrr=1",), "unknown key trainer.lrr (did you mean trainer.lr?)"),
        (("dataset.source=local", "dataset.path=/no/such/*.txt"), "dataset.path '/no/such/*.txt' matches no"),
        (("dataset.source=hub",), "dataset.name must name a hub dataset when dataset.source is hub"),
        (
            ("dataset.tokenizer=bytes", "dataset.vocab_size=100"),
            "dataset.vocab_size is 100 but tokenizer 'bytes' has 257",
        ),
        (
            ("dataset.max_chars=20000", "trainer.micro_batch_size=1000"),
            "fewer than one global micro batch (1000 x 1 ranks)",
        ),
    ],
)
def test_refused_before_anything_is_written(tmp_path, args, message):
    _assert_refused(*_run(tmp_path, *args), message)


def test_contradicting_ds_config(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"gradient_clipping": 0.5, "bf16": {"enabled": True}}))
    _assert_refused(*_run(tmp_path, ds=str(ds)), "gradient_clipping is 0.5 but trainer.grad_clip gives 1.0")
    ds.write_text(json.dumps({"fp16": {"enabled": True}, "bf16": {"enabled": True}}))
    _assert_refused(*_run(tmp_path, ds=str(ds)), "fp16.enabled and bf16.enabled are both true")


def test_malformed_yaml_in_config_dir(tmp_path):
    bad = tmp_path / "cfg"
    bad.mkdir()
    (bad / "model.yaml").write_text("arch: llama\n  n_layer: [2\n")
    _assert_refused(
        *_run(tmp_path, "--config_dir", str(bad)), f"{bad / 'model.yaml'}: malformed YAML at line"
    )


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = python_train(
        "--set", *TINY, f"utils.output_dir={blocker}/runs", f"utils.cache_dir={tmp_path / 'cache'}"
    )
    assert proc.returncode == 2 and "utils.output_dir" in proc.stderr and "cannot be written" in proc.stderr


def test_the_launcher_passes_exit_code_2_through(tmp_path, cache_dir):
    proc, run = launch(tmp_path, cache_dir, "trainer.adam_beta2=2")
    assert proc.returncode == 2
    assert "error: --set: trainer.adam_beta2 must be <= 1, got 2.0" in proc.stderr
    assert not run.exists()
