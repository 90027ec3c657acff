"""The three model families build from scratch; our loss and optimizer groups are what they claim."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_ok, launch, train_rows
from dsinstab.run.config import ModelConfig, TrainerConfig
from dsinstab.run.engine import param_groups
from dsinstab.run.model import build_model, count_parameters, lm_loss

TINY = dict(n_layer=2, d_model=64, n_head=4, seq_len=32)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen3"])
def test_each_arch_builds_from_scratch_and_runs(arch):
    model = build_model(ModelConfig(arch=arch, **TINY), vocab_size=300, eos_id=299, seed=0)
    assert model.config.model_type == arch
    logits = model(input_ids=torch.randint(0, 300, (2, 32))).logits
    assert logits.shape == (2, 32, 300)
    names = [n for n, _ in model.named_parameters()]
    assert any("q_norm" in n for n in names) == (arch == "qwen3")  # qwen3: per-head qk-norm
    again = build_model(ModelConfig(arch=arch, **TINY), vocab_size=300, eos_id=299, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))  # seeded init
    assert count_parameters(model) > 300 * 64


def test_loss_is_cross_entropy_and_z_loss_adds_its_term():
    logits, targets = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    loss, parts = lm_loss(logits, targets, z_loss=0.0)
    assert torch.allclose(loss, F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1)))
    with_z, parts = lm_loss(logits, targets, z_loss=1e-2)
    log_z = torch.logsumexp(logits.reshape(-1, 11), -1)
    assert torch.allclose(parts["z_loss"], 1e-2 * log_z.pow(2).mean())
    assert torch.allclose(with_z, loss + parts["z_loss"])


def test_no_decay_on_biases_norms_and_embeddings_unless_asked():
    model = build_model(ModelConfig(arch="gpt2", **TINY), vocab_size=300, eos_id=299, seed=0)
    decay, no_decay = param_groups(model, TrainerConfig())
    emb = {id(model.transformer.wte.weight), id(model.transformer.wpe.weight)}
    assert all(p.ndim >= 2 and id(p) not in emb for p in decay["params"])
    assert emb <= {id(p) for p in no_decay["params"]}
    assert any(p.ndim == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0
    decay, _ = param_groups(model, TrainerConfig(decay_embeddings=True))
    assert emb <= {id(p) for p in decay["params"]}
    decay, _ = param_groups(model, TrainerConfig(independent_weight_decay=True, weight_decay=0.1, lr=0.01))
    assert decay["weight_decay"] == pytest.approx(10.0)


@pytest.mark.parametrize("arch, ds", [("gpt2", "zero0_bf16"), ("qwen3", "zero1_bf16")])
def test_other_families_train_through_the_launcher(tmp_path, cache_dir, arch, ds):
    proc, run = launch(tmp_path, cache_dir, f"model.arch={arch}", "trainer.max_steps=6", ds=ds)
    assert_ok(proc)
    assert f"model: {arch}" in proc.stdout
    rows = train_rows(run)
    assert len(rows) == 6 and rows[-1]["train/loss"] < rows[0]["train/loss"]
