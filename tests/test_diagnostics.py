"""Probes against direct computations, the same under ZeRO-0, ZeRO-3 and two ranks; mitigation keys."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, assert_ok, ds_config, launch, train_rows
from dsinstab.instruments.attention import ATTENTION
from dsinstab.instruments.base import Context
from dsinstab.instruments.probes.attn_logits import AttentionLogitProbe
from dsinstab.instruments.probes.out_logits import OutputLogitProbe
from dsinstab.run.config import ModelConfig, load_config
from dsinstab.run.model import build_model
from dsinstab.run.plugins import Step, reduce_readings

TINY = dict(n_layer=2, d_model=64, n_head=4, seq_len=16)


def probe_of(kind, model: torch.nn.Module | None = None):
    """A probe of ``kind`` as the registry builds it, probing every step, on ``model`` (none: a
    model without attention, for a probe fed by hand), and a probe step it is active in."""
    cfg = load_config(ROOT / "configs", ["trainer.diagnostics.every=1"])
    probe = kind(Context(cfg, model if model is not None else torch.nn.Module(), engine=None))
    step = Step(number=1)
    probe.begin_step(step)
    return probe, step


def test_attention_probe_matches_an_explicit_causal_q_kT():
    torch.manual_seed(0)
    q, k = (torch.randn(2, 4, 16, 8) * 3 for _ in range(2))
    # make a future position hold the largest logit: the causal mask must hide it
    k[:, :, -1] = q[:, :, 0] * 10
    probe, step = probe_of(AttentionLogitProbe)
    probe.recorder.record(3, q, k, scaling=8**-0.5)
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    causal = torch.ones(16, 16, dtype=torch.bool).tril()
    expected = float(scores.masked_fill(~causal, -math.inf).amax())
    assert float(probe.recorder.maxima[3].amax()) == pytest.approx(expected, rel=1e-5)  # over the heads
    assert expected < float(scores.amax())  # the unmasked maximum is in the future
    assert reduce_readings(probe.readings(step)) == {
        "diag/attn_logit_max/layer_3": pytest.approx(expected, rel=1e-5)
    }
    assert probe.recorder.maxima == {}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen3"])
def test_the_probe_wraps_the_models_own_attention_and_changes_nothing(arch, attn):
    def tiny():
        mc = ModelConfig(arch=arch, attn_implementation=attn, **TINY)
        return build_model(mc, vocab_size=100, eos_id=99, seed=0).eval()

    x = torch.randint(0, 100, (2, 16))
    ref = tiny()(input_ids=x).logits
    model, other = tiny(), tiny()
    probe, step = probe_of(AttentionLogitProbe, model)  # built inactive; active from this probe step on
    others, _ = probe_of(AttentionLogitProbe, other)  # a second model in the process keeps its own probe
    others.recorder.active = False
    assert model.config._attn_implementation == f"{ATTENTION}_{attn}"
    assert torch.equal(model(input_ids=x).logits, ref)
    assert sorted(probe.recorder.maxima) == [0, 1] and others.recorder.maxima == {}
    probe.recorder.active = False
    model(input_ids=x)
    assert probe.readings(step) and probe.recorder.maxima == {}


def test_log_z_matches_logsumexp():
    logits = torch.randn(3, 7, 50) * 4
    probe, step = probe_of(OutputLogitProbe)
    probe.observe_logits(logits)
    out = reduce_readings(probe.readings(step))
    assert out["diag/log_z"] == pytest.approx(float(torch.logsumexp(logits, -1).mean()), rel=1e-6)
    assert out["diag/out_logit_max"] == pytest.approx(float(logits.max()))
    assert out["diag/out_logit_mean"] == pytest.approx(float(logits.mean()), abs=1e-6)


DIAG = (
    "trainer.max_steps=4",
    "trainer.diagnostics.every=2",
    "trainer.checkpoint_every=0",
    "trainer.eval_every=100",
)


def _diag(run):
    return [
        {k: v for k, v in r.items() if k.startswith("diag/")} for r in train_rows(run) if "diag/log_z" in r
    ]


def test_probes_agree_under_zero0_zero3_and_two_ranks(tmp_path, cache_dir):
    """One rank with micro batch 8 reads the same global batch as two ranks with 4 each."""
    zero0 = ds_config(tmp_path, "zero2_fp32", zero_optimization={"stage": 0})
    zero3 = ds_config(tmp_path / "..", "zero2_fp32", zero_optimization={"stage": 3})
    runs = {}
    for name, ds, ranks, mbs in [("z0", zero0, 1, 8), ("z3", zero3, 1, 8), ("z3x2", zero3, 2, 4)]:
        proc, run = launch(
            tmp_path, cache_dir, *DIAG, f"trainer.micro_batch_size={mbs}", ds=ds, ranks=ranks, name=name
        )
        assert_ok(proc)
        runs[name] = _diag(run)
    base = runs["z0"]
    assert [len(r) for r in base] == [len(r) for r in runs["z3x2"]] and len(base) == 2
    keys = set(base[0])
    assert {
        "diag/attn_logit_max/layer_1",
        "diag/grad_norm/layer_0",
        "diag/update_ratio/embed",
        "diag/adam_rms_over_eps/layer_1",
        "diag/act_rms/layer_1",
        "diag/log_z",
    } <= keys
    for other in ("z3", "z3x2"):
        for a, b in zip(base, runs[other]):
            assert set(a) == set(b)
            for k in a:
                assert b[k] == pytest.approx(a[k], rel=2e-3, abs=1e-6), (other, k)


def test_layer_grad_norms_add_up_to_the_global_norm(tmp_path, cache_dir):
    proc, run = launch(tmp_path, cache_dir, *DIAG, ds="zero2_bf16")
    assert_ok(proc)
    for r in train_rows(run):
        if "diag/log_z" in r:
            parts = [v for k, v in r.items() if k.startswith("diag/grad_norm/")]
            assert math.sqrt(sum(p * p for p in parts)) == pytest.approx(r["train/grad_norm"], rel=1e-3)


def test_z_loss_is_part_of_the_loss_and_logged(tmp_path, cache_dir):
    proc, run = launch(
        tmp_path, cache_dir, "trainer.max_steps=3", "trainer.z_loss=1e-2", "trainer.checkpoint_every=0"
    )
    assert_ok(proc)
    for r in train_rows(run):
        assert r["train/z_loss"] > 0
        assert r["train/loss"] == pytest.approx(r["train/ce_loss"] + r["train/z_loss"])


def test_init_std_and_embedding_scale_switches():
    small = build_model(ModelConfig(arch="llama", init_std=0.002, **TINY), 100, 99, seed=0)
    large = build_model(ModelConfig(arch="llama", init_std=0.05, **TINY), 100, 99, seed=0)
    w = lambda m: m.model.layers[0].mlp.up_proj.weight.std().item()  # noqa: E731
    assert w(small) == pytest.approx(0.002, rel=0.1) and w(large) == pytest.approx(0.05, rel=0.1)
    scaled = build_model(ModelConfig(arch="llama", embedding_scale=8.0, **TINY), 100, 99, seed=0)
    x = torch.randint(0, 100, (1, 16))
    emb = scaled.get_input_embeddings()
    assert torch.allclose(emb(x), 8.0 * F.embedding(x, emb.weight))
