"""``model.compile``: torch.compile of the model through DeepSpeed's ``engine.compile``
(dsinstab/run/engine.py), and the plug-ins that hook into the model's modules refused with it
(dsinstab/instruments/registry.py's ``check_compile``).

The backend is ``aot_eager`` (dynamo's graphs through AOT autograd, no code generated): inductor
builds C++ for a CPU, a minute for the tiny model on two cores.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from conftest import ROOT, TINY, assert_ok, ds_config, python_train, train_rows
from dsinstab.instruments import registry
from dsinstab.run import engine as eng
from dsinstab.run.config import ConfigError, load_config
from dsinstab.run.ds_config import read_ds_config, resolve_ds_config
from dsinstab.run.model import build_model, lm_loss

COMPILE = ("model.compile=true", "model.compile_backend=aot_eager", "trainer.overflow.locate=false")


def losses(compile_backend: str | None, steps: int = 4) -> list[float]:
    """The first losses of the tiny model in a ZeRO-2 bf16 engine (the default ds_config), stepped as
    the loop steps it, on one batch of random tokens."""
    cfg = load_config(ROOT / "configs", list(TINY))
    path = ROOT / "ds_configs" / "zero2_bf16.json"
    cfg.ds_config, _ = resolve_ds_config(read_ds_config(path), path, cfg, 1)
    vocab, t = cfg.dataset.vocab_size, cfg.trainer
    model = build_model(cfg.model, vocab, vocab - 1, t.seed)
    engine = eng.build_engine(model, t, cfg.ds_config, compile_backend=compile_backend)
    assert engine.is_compiled == (compile_backend is not None)
    batch = torch.randint(0, vocab, (t.micro_batch_size, cfg.model.seq_len + 1)).to(engine.device)
    out = []
    for _ in range(steps):  # one batch again and again: the loss falls
        loss, _ = lm_loss(engine(input_ids=batch[:, :-1]).logits, batch[:, 1:], 0.0)
        engine.backward(loss)
        engine.step()
        out.append(loss.item())
    return out


def test_a_compiled_engine_trains_as_the_uncompiled_one(one_rank):
    """aot_eager runs the same aten ops as eager: the same losses, bit for bit (inductor fuses them
    and matched to 4e-5 on four steps, measured by hand)."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    torch.manual_seed(0)
    eager = losses(None)
    torch.manual_seed(0)
    assert losses("aot_eager") == eager
    assert eager[-1] < eager[0]


def test_a_compiled_run_through_the_train_command_matches_the_reference_losses(tmp_path, cache_dir):
    """The train command with model.compile: tests/reference_losses.json's fp32 ZeRO-0 run again,
    compiled, its losses unchanged, and the probes that need no module hooks recording."""
    ref = json.loads((ROOT / "tests" / "reference_losses.json").read_text())["zero0_fp32"]
    run = tmp_path / "runs" / "compiled"
    proc = python_train(
        "--ds_config",
        ds_config(tmp_path, "zero2_fp32", zero_optimization={"stage": 0}),
        "--set",
        *TINY,
        "trainer.max_steps=8",
        "trainer.checkpoint_every=0",
        *COMPILE,
        "trainer.diagnostics.every=4",
        "trainer.diagnostics.probes=out_logits,layer_norms,adam",
        f"utils.output_dir={run.parent}",
        f"utils.run_name={run.name}",
        f"utils.cache_dir={cache_dir}",
    )
    assert_ok(proc)
    assert "fp32, ZeRO-0, 1 rank(s); compiled (aot_eager)" in proc.stdout
    rows = train_rows(run)
    assert [r["train/loss"] for r in rows] == pytest.approx(ref, rel=1e-6)
    probed = [r for r in rows if r["step"] in (4, 8)]
    assert len(probed) == 2 and all(
        "diag/out_logit_max" in r and "diag/param_norm/layer_0" in r for r in probed
    )


def refusal(*overrides: str) -> str:
    cfg = load_config(ROOT / "configs", [*TINY, *overrides])
    with pytest.raises(ConfigError) as e:
        registry.check(cfg)
    return str(e.value)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (
            ("trainer.diagnostics.probes=attn_logits", "trainer.diagnostics.every=2"),
            "trainer.diagnostics.probes attn_logits",
        ),
        (
            ("trainer.diagnostics.probes=adam,activations", "trainer.diagnostics.every=2"),
            "trainer.diagnostics.probes activations",
        ),
        (
            ("trainer.diagnostics.probes=headroom", "trainer.diagnostics.every=2"),
            "trainer.diagnostics.probes headroom",
        ),
        (("trainer.mitigations.qk_clip_tau=100",), "trainer.mitigations.qk_clip_tau"),
    ],
)
def test_the_plugins_that_hook_into_the_model_are_refused_with_compile(overrides, key):
    message = refusal(*COMPILE, *overrides)
    assert message.startswith(
        f"--set: {key} hooks into the model's modules, and model.compile (--set) cannot"
    )
    assert message.endswith("or set model.compile false.")
    if "probes" in key:
        assert "(probes with model.compile: out_logits, layer_norms, adam)" in message
    on = [o for o in COMPILE if o != "model.compile=true"]
    registry.check(load_config(ROOT / "configs", [*TINY, *on, *overrides]))  # without model.compile: served


def test_inductor_without_a_cpp_compiler_is_refused(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-c++")
    message = refusal("model.compile=true", "trainer.overflow.locate=false")
    assert message == (
        "--set: model.compile_backend inductor needs a C++ compiler on a CPU and no-such-c++ is not on "
        "PATH; install one, set CXX, or use model.compile_backend aot_eager or eager."
    )
    registry.check(load_config(ROOT / "configs", [*TINY, *COMPILE]))  # aot_eager builds nothing


def test_compile_with_overflow_locate_on_is_refused_before_anything_is_written(tmp_path):
    """overflow.locate is on by default: model.compile alone is refused, through the train command,
    exit code 2 and one sentence, no run directory."""
    out = tmp_path / "runs"
    proc = python_train(
        "--ds_config",
        str(ROOT / "ds_configs" / "zero2_bf16.json"),
        "--set",
        *TINY,
        f"utils.output_dir={out}",
        f"utils.cache_dir={tmp_path / 'cache'}",
        "model.compile=true",
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [
        "error: --set: trainer.overflow.locate hooks into the model's modules, and model.compile (--set) "
        "cannot promise to run such hooks; set it false, or set model.compile false."
    ], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not out.exists() or not any(out.iterdir())


def test_compile_on_the_fp32_compute_path_is_refused(monkeypatch):
    """Where the CPU computes fp16/bf16 in fp32 (a torch-function mode around the step), inductor
    would fuse away the rounding of each matmul's result, so an fp16 overflow would not happen: refused;
    the native path and fp32 training are served."""

    def config(ds: str, *extra: str):
        cfg = load_config(ROOT / "configs", [*TINY, *COMPILE, *extra])
        path = ROOT / "ds_configs" / f"{ds}.json"
        cfg.ds_config, _ = resolve_ds_config(read_ds_config(path), path, cfg, 1)
        return cfg

    for ds in ("zero2_fp16", "zero2_bf16"):
        with pytest.raises(ConfigError) as e:
            registry.check(config(ds, "utils.cpu_compute=fp32"))
        prec = ds.split("_")[1]
        assert str(e.value) == (
            f"--set: model.compile would change the numbers here: this CPU computes {prec} matmuls in fp32 "
            "(utils.cpu_compute fp32) and rounds each result, a rounding torch.compile fuses away (an fp16 "
            "product past 65504 stays finite); train in fp32, set utils.cpu_compute native, or set "
            "model.compile false."
        )
        registry.check(config(ds, "utils.cpu_compute=native"))
    registry.check(config("zero2_fp32", "utils.cpu_compute=fp32"))
