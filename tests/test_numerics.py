"""What a step applies and reports, on every shipped ds_config.

Engines are built in this process on one rank (a launched run costs ~30 s; an engine here well under
a second) and trained for a few steps on random tokens with the loop's own ``advance``.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import ROOT, TINY, ds_config
from dsinstab.instruments import registry
from dsinstab.instruments.base import Probe
from dsinstab.instruments.masters import MasterCopies
from dsinstab.run import engine as eng
from dsinstab.run import loop
from dsinstab.run.config import load_config
from dsinstab.run.ds_config import read_ds_config, resolve_ds_config
from dsinstab.run.lowp import compute_context
from dsinstab.run.model import build_model, lm_loss
from dsinstab.run.plugins import Plugins

DS_CONFIGS = sorted(p.stem for p in (ROOT / "ds_configs").glob("*.json"))
FP16 = [d for d in DS_CONFIGS if d.endswith("fp16")]
LAYERS = ("embed", "layer_0", "layer_1")  # conftest.TINY has two blocks
PROBE_KEYS = {
    "diag/out_logit_max",
    "diag/out_logit_mean",
    "diag/log_z",
    *(f"diag/{m}/layer_{i}" for m in ("attn_logit_max", "act_rms") for i in (0, 1)),
    *(
        f"diag/{m}/{k}"
        for m in ("grad_norm", "param_norm", "update_ratio", "adam_rms_over_eps")
        for k in LAYERS
    ),
}


pytestmark = pytest.mark.usefixtures("one_rank")  # conftest: in-process engines


PROBES = [c for c in registry.INSTRUMENTS if issubclass(c, Probe)]  # the probes only, in the run's order


class RandomTokens:
    """Random blocks where the loop reads its packed data (``blocks(split, indices)``), drawn from
    ``tokens``: a test may draw the next batch itself (:meth:`Tiny.batch`) or reseed it."""

    def __init__(self, cfg, tokens: torch.Generator):
        self.cfg, self.tokens = cfg, tokens

    def blocks(self, split: str, indices: torch.Tensor) -> torch.Tensor:
        shape = (len(indices), self.cfg.model.seq_len + 1)
        return torch.randint(0, self.cfg.dataset.vocab_size, shape, generator=self.tokens)


class Order:
    def __init__(self, micro_batch: int):
        self.position, self.mb = 0, micro_batch

    def next(self) -> torch.Tensor:
        self.position += 1
        return torch.arange((self.position - 1) * self.mb, self.position * self.mb)


class Tiny:
    """conftest.TINY's model in an engine of ``ds`` (a name in ds_configs/ or a path), with the
    registry's probes on every step when ``probes``, stepped by ``loop.advance`` as a run steps it."""

    def __init__(self, ds: str, *overrides: str, corrected: bool = True, probes: bool = False):
        self.cfg = load_config(ROOT / "configs", [*TINY, *overrides])
        path = ds if ds.endswith(".json") else ROOT / "ds_configs" / f"{ds}.json"
        self.cfg.ds_config, _ = resolve_ds_config(read_ds_config(path), path, self.cfg, 1)
        t, vocab = self.cfg.trainer, self.cfg.dataset.vocab_size
        t.diagnostics.every = 1 if probes else 0
        self.model = build_model(self.cfg.model, vocab, vocab - 1, t.seed)
        optimizer = registry.optimizer_for(self.cfg)
        self.engine = eng.build_engine(self.model, t, self.cfg.ds_config, optimizer, correct_faults=corrected)
        self.tokens = torch.Generator().manual_seed(1)
        self.run = loop.Run(
            cfg=self.cfg,
            engine=self.engine,
            model=self.model,
            data=RandomTokens(self.cfg, self.tokens),
            order=Order(t.micro_batch_size),
            checkpointer=None,
            plugins=Plugins(registry.build_plugins(self.cfg, self.model, self.engine, PROBES)),
            run_dir=None,
            rank=0,
            world=1,
        )
        self.run.plugins.bind(self.run)
        self.ctx = compute_context(self.engine)

    def batch(self) -> torch.Tensor:
        indices = torch.arange(self.cfg.trainer.micro_batch_size)  # the data draws the next batch
        return self.run.data.blocks("train", indices).to(self.engine.device)

    def train(self, steps: int) -> list[dict]:
        """``steps`` optimizer steps as the loop takes them; one row of readouts per step."""
        rows = []
        for _ in range(steps):
            step, metrics, _ = loop.advance(self.run, self.ctx)
            self.run.step = step.number
            rows.append(
                {
                    "loss": metrics["train/loss"],
                    "grad_norm": metrics["train/grad_norm"],
                    "loss_scale": step.loss_scale,
                    **{k: v for k, v in metrics.items() if k.startswith("diag/")},
                }
            )
        return rows

    def masters(self) -> dict[str, torch.Tensor]:
        """The fp32 weights the optimizer updates, by parameter name."""
        copies = MasterCopies(self.engine)
        return {n: copies.weights(p).clone() for n, p in self.model.named_parameters()}


# ---------------------------------------------------------------------------------------------
# Probes


@pytest.mark.parametrize("ds", DS_CONFIGS)
def test_every_probe_reports_on_every_shipped_ds_config(ds):
    rows = Tiny(ds, probes=True).train(2)  # step 1 runs at lr 0 (warmup); step 2 updates
    for row in rows:
        assert PROBE_KEYS <= set(row), sorted(PROBE_KEYS - set(row))
        assert all(math.isfinite(row[k]) for k in PROBE_KEYS)
    for k in LAYERS:
        assert rows[0][f"diag/update_ratio/{k}"] == 0
        assert 1e-4 < rows[1][f"diag/update_ratio/{k}"] < 0.1
        assert rows[1][f"diag/adam_rms_over_eps/{k}"] > 1  # a gradient far above Adam's eps
    for row in rows:  # the per-layer gradients are those of the global norm
        total = math.sqrt(sum(row[f"diag/grad_norm/{k}"] ** 2 for k in LAYERS))
        assert total == pytest.approx(row["grad_norm"], rel=1e-5)


def test_zero0_and_zero2_fp16_probes_read_the_same_master_weights_and_state():
    """On ZeRO-0, DeepSpeed's fp16 optimizer keeps fp32 clones outside its ZeRO API: the probes must
    read those, not the fp16 weights. Same run on both: the probes agree to 1e-5 (measured: 5e-7,
    the order of summation of the norms)."""
    zero0, zero2 = (Tiny(ds, probes=True).train(3) for ds in ("zero0_fp16", "zero2_fp16"))
    for a, b in zip(zero0, zero2):
        assert set(a) == set(b)
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-9), k


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_the_probes_leave_a_runs_losses_unchanged(arch, attn):
    """Probes on every step vs off: the same losses and grad norms to the last bit, on the CPU."""
    overrides = (
        f"model.arch={arch}",
        f"model.attn_implementation={attn}",
        "trainer.gradient_accumulation_steps=2",
    )
    on = Tiny("zero2_bf16", *overrides, probes=True).train(3)
    off = Tiny("zero2_bf16", *overrides).train(3)
    assert "diag/attn_logit_max/layer_1" in on[-1]
    assert [(r["loss"], r["grad_norm"]) for r in on] == [(r["loss"], r["grad_norm"]) for r in off]


# ---------------------------------------------------------------------------------------------
# The global grad norm


def reference_grad_norm(tiny: Tiny, batch: torch.Tensor) -> float:
    """The same model and batch in fp32 and plain torch: the norm by hand."""
    cfg = tiny.cfg
    model = build_model(cfg.model, cfg.dataset.vocab_size, cfg.dataset.vocab_size - 1, cfg.trainer.seed)
    loss, _ = lm_loss(model(input_ids=batch[:, :-1]).logits, batch[:, 1:], 0.0)
    loss.backward()
    return math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters()))


# measured: fp32 6e-7, fp16 1.2e-5, bf16 1.9e-4 (bf16 weights and activations keep 8 bits)
NORM_TOLERANCE = {"fp32": 1e-5, "fp16": 1e-4, "bf16": 5e-4}


@pytest.mark.parametrize("ds", DS_CONFIGS)
def test_step_1_grad_norm_matches_an_fp32_reference(ds):
    tiny = Tiny(ds)
    batch = tiny.batch()
    tiny.tokens.manual_seed(1)  # train() draws the same batch again
    reported = tiny.train(1)[0]["grad_norm"]
    assert reported == pytest.approx(reference_grad_norm(tiny, batch.cpu()), rel=NORM_TOLERANCE[ds[-4:]])


@pytest.mark.parametrize("ds", FP16)
def test_a_growing_loss_scale_changes_neither_the_reported_norm_nor_the_update(ds, tmp_path):
    """loss_scale_window 1: the scale doubles in step 2's step(), after the gradients were scaled with
    the old one. The same run with a scale that stays must report and apply exactly the same."""
    grows = Tiny(ds_config(tmp_path, ds, fp16={"loss_scale_window": 1}))
    stays = Tiny(ds)
    a, b = grows.train(2), stays.train(2)
    assert [r["loss_scale"] for r in a] == [65536, 131072] and [r["loss_scale"] for r in b] == [65536] * 2
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    masters_a, masters_b = grows.masters(), stays.masters()
    assert all(torch.equal(masters_a[n], masters_b[n]) for n in masters_a)
    assert grows.train(1)[0]["loss"] == stays.train(1)[0]["loss"]


@pytest.mark.parametrize("ds", ["zero0_fp16", "zero0_bf16"])
def test_zero0_trains_exactly_as_zero2(ds):
    """Without ZeRO, DeepSpeed's optimizer is another class (fp32 clones per parameter, its own loss
    scaling): the same run must give the same losses and norms (summation order: 1e-5)."""
    zero0, zero2 = Tiny(ds).train(4), Tiny(ds.replace("zero0", "zero2")).train(4)
    assert [r["loss"] for r in zero0] == pytest.approx([r["loss"] for r in zero2], rel=1e-6)
    assert [r["grad_norm"] for r in zero0] == pytest.approx([r["grad_norm"] for r in zero2], rel=1e-5)


# ---------------------------------------------------------------------------------------------
# The faults of DeepSpeed 0.19.8 that engine.correct_deepspeed_faults corrects. Each test fails once
# a DeepSpeed release fixes its fault: then drop that correction (it would apply twice).


def test_deepspeed_zero3_reports_half_the_norm_and_zero1_applies_half_the_update_when_the_scale_grows(
    tmp_path,
):
    growing = {"fp16": {"loss_scale_window": 1}}
    z3 = Tiny(ds_config(tmp_path, "zero3_fp16", **growing), corrected=False).train(2)
    z3_stays = Tiny("zero3_fp16", corrected=False).train(2)
    assert z3[1]["grad_norm"] == pytest.approx(z3_stays[1]["grad_norm"] / 2, rel=1e-6)
    z1 = Tiny(ds_config(tmp_path, "zero1_fp16", **growing), corrected=False)
    z1_stays = Tiny("zero1_fp16", corrected=False)
    z1.train(2), z1_stays.train(2)
    w, w_stays = z1.masters(), z1_stays.masters()
    assert not all(torch.equal(w[n], w_stays[n]) for n in w)


def test_deepspeed_zero0_fp16_does_not_scale_the_loss():
    """deepspeedai/DeepSpeed#8393: the gradients come back unscaled, and the optimizer unscales them."""
    tiny = Tiny("zero0_fp16", corrected=False)
    batch = tiny.batch()
    with tiny.ctx:
        loss, _ = lm_loss(tiny.engine(input_ids=batch[:, :-1]).logits, batch[:, 1:], 0.0)
        tiny.engine.backward(loss)
    assert eng.grads_norm(tiny.model) == pytest.approx(reference_grad_norm(tiny, batch.cpu()), rel=1e-3)


@pytest.mark.parametrize("ds", ["zero0_fp16", "zero0_bf16"])
def test_deepspeed_zero0_steps_adam_once_when_it_is_built(ds):
    """An AdamW step on zero gradients at the peak lr: one weight decay, and Adam's count at 1."""
    tiny = Tiny(ds, corrected=False)
    opt = tiny.engine.optimizer
    assert {float(s["step"]) for s in opt.optimizer.state.values()} == {1.0}
    group = opt.optimizer.param_groups[0]
    decay = 1 - tiny.cfg.trainer.lr * group["weight_decay"]
    assert decay < 1
    for lp, hp in zip(opt.fp16_groups[0], opt.fp32_groups[0]):
        assert torch.allclose(hp, lp.float() * decay, rtol=1e-6, atol=0)


def test_the_corrections_apply_once(tmp_path):
    """Corrected twice, a ZeRO-0 fp16 run whose scale grows still equals one whose scale stays."""
    tiny = Tiny(ds_config(tmp_path, "zero0_fp16", fp16={"loss_scale_window": 1}))
    eng.correct_deepspeed_faults(tiny.engine)
    stays = Tiny("zero0_fp16")
    assert [r["grad_norm"] for r in tiny.train(3)] == [r["grad_norm"] for r in stays.train(3)]


@pytest.mark.parametrize("ds", ["zero2_fp16", "zero3_fp16"])
def test_the_scale_growth_correction_survives_loading_a_checkpoint(ds, tmp_path):
    """load_checkpoint replaces ZeRO's loss scaler object: the correction must follow it, or a
    resumed or rolled-back run applies half an update on its next scale growth."""
    path = ds_config(tmp_path, ds, fp16={"loss_scale_window": 1})
    loaded, unbroken = Tiny(path), Tiny(path)
    rows = loaded.train(1)
    loaded.engine.save_checkpoint(str(tmp_path / "ck"), tag="t")
    loaded.engine.load_checkpoint(str(tmp_path / "ck"), tag="t")
    rows += loaded.train(2)
    assert [(r["loss_scale"], r["grad_norm"]) for r in rows] == [
        (r["loss_scale"], r["grad_norm"]) for r in unbroken.train(3)
    ]
    masters_a, masters_b = loaded.masters(), unbroken.masters()
    assert all(torch.equal(masters_a[n], masters_b[n]) for n in masters_a)
