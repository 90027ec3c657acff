"""The mitigations (dsinstab/instruments/mitigations/, dsinstab/instruments/optim.py, soft-capping in dsinstab/run/model.py).

Engines are built in this process on one rank and trained with the loop's own ``advance`` on
random tokens; one launcher run on two ranks shows that the decisions are collective.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, TINY, assert_ok, ds_config, launch, python_train, train_rows
from dsinstab.instruments import registry
from dsinstab.instruments.masters import MasterCopies
from dsinstab.instruments.mitigations import zclip as zclip_module
from dsinstab.instruments.mitigations.skip_step import SkipStep
from dsinstab.instruments.mitigations.update_norm_clip import UpdateNormWindow
from dsinstab.instruments.mitigations.zclip import ZCLIP_WARMUP, ZClip
from dsinstab.instruments.optim import MitigatedAdamW
from dsinstab.run import engine as eng
from dsinstab.run import loop
from dsinstab.run.config import ConfigError, ModelConfig, load_config
from dsinstab.run.ds_config import read_ds_config, resolve_ds_config
from dsinstab.run.engine import client_optimizer, set_grad_clip
from dsinstab.run.lowp import compute_context
from dsinstab.run.model import build_model, lm_loss, softcapped_attention
from dsinstab.run.plugins import Plugins

DS_CONFIGS = sorted(p.stem for p in (ROOT / "ds_configs").glob("*.json"))


class Blocks:
    """Random tokens where the loop reads its packed data (``blocks(split, indices)``)."""

    def __init__(self, cfg, n: int = 64):
        g = torch.Generator().manual_seed(1)
        self.n = n
        self.tokens = torch.randint(0, cfg.dataset.vocab_size, (n, cfg.model.seq_len + 1), generator=g)

    def blocks(self, split: str, indices: torch.Tensor) -> torch.Tensor:
        return self.tokens[indices]


class Order:
    """The blocks in turn (``repeat``: the first micro batch again and again), with the
    ``BatchOrder`` methods the loop's batches read ahead by."""

    seed = 0

    def __init__(self, micro_batch: int, n: int = 64, repeat: bool = False):
        self.position, self.mb, self.n, self.repeat = 0, micro_batch, n, repeat

    def indices_at(self, position: int) -> torch.Tensor:
        start = 0 if self.repeat else position * self.mb
        return torch.arange(start, start + self.mb) % self.n

    def next(self) -> torch.Tensor:
        self.position += 1
        return self.indices_at(self.position - 1)


class Tiny:
    """conftest.TINY's model in an engine of ``ds`` with the registry's mitigation plug-ins, stepped
    by ``loop.advance`` exactly as a run steps it."""

    def __init__(self, ds: str, *overrides: str, repeat: bool = False, foreach: bool | None = None):
        cfg = load_config(ROOT / "configs", [*TINY, *overrides])
        path = ds if ds.endswith(".json") else ROOT / "ds_configs" / f"{ds}.json"
        cfg.ds_config, _ = resolve_ds_config(read_ds_config(path), path, cfg, 1)
        t, vocab = cfg.trainer, cfg.dataset.vocab_size
        self.model = build_model(cfg.model, vocab, vocab - 1, t.seed)
        factory = registry.optimizer_for(cfg)

        def optimizer(groups, tc):  # MitigatedAdamW with its foreach path on, off, or by device (None)
            opt = factory(groups, tc)
            if isinstance(opt, MitigatedAdamW):
                opt.foreach = foreach
            return opt

        self.engine = eng.build_engine(self.model, t, cfg.ds_config, optimizer)
        found = registry.build_plugins(cfg, self.model, self.engine, registry.MITIGATIONS)
        by_name = {p.name: p for p in found}
        self.plugin = SimpleNamespace(  # each mitigation's own state, as the tests read it
            skip=getattr(by_name.get("skip_step"), "skip", None),
            qk=getattr(by_name.get("qk_clip"), "qk", None),
            zclip=getattr(by_name.get("zclip"), "zclip", None),
            update_norm=getattr(by_name.get("update_norm_clip"), "window", None),
        )
        self.run = loop.Run(
            cfg=cfg,
            engine=self.engine,
            model=self.model,
            data=Blocks(cfg),
            order=Order(t.micro_batch_size, repeat=repeat),
            checkpointer=None,
            sink=None,
            plugins=Plugins(found),
            run_dir=None,
            rank=0,
            world=1,
        )
        self.run.plugins.bind(self.run)
        self.ctx = compute_context(self.engine)

    def train(self, steps: int, spike_at: tuple = ()) -> list[dict]:
        """``spike_at``: steps whose output logits are multiplied by 4, a fault that makes the loss
        and the grad norm jump (x4 the grad norm, +0.3 the loss of the tiny model)."""
        rows = []
        for _ in range(steps):
            head = self.model.get_output_embeddings()
            spiking = self.run.step + 1 in spike_at
            spike = head.register_forward_hook(lambda m, a, out: out * 4) if spiking else None
            step, metrics, _ = loop.advance(self.run, self.ctx)
            self.run.step = step.number
            if spike is not None:
                spike.remove()
            rows.append(
                {
                    "step": step.number,
                    "loss": float(step.losses.sum()),
                    "grad_norm": step.norm,
                    **{k: v for k, v in metrics.items() if k.startswith("mitig/")},
                }
            )
        return rows

    def snapshot(self, moments: bool = True) -> dict[str, torch.Tensor]:
        """Master weights, Adam moments (after a first step) and the module's own weights, by name."""
        copies, out = MasterCopies(self.engine), {}
        for n, p in self.model.named_parameters():
            out[f"master/{n}"] = copies.weights(p, keep=True).clone()
            out[f"module/{n}"] = p.detach().clone()
            for key in ("exp_avg", "exp_avg_sq") if moments else ():
                out[f"{key}/{n}"] = copies.state(p, key).clone()
        return out

    def adam_steps(self) -> float:
        return next(float(s["step"]) for s in client_optimizer(self.engine).state.values())


def applied_norms(engine) -> dict[int, float]:
    """The norm of the gradients the client optimizer receives, by step (ZeRO 1/2 call it once per
    param group, ZeRO-3 once per sub-group: the squares add up)."""
    out: dict[int, float] = {}
    opt = client_optimizer(engine)

    def hook(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        step = engine.global_steps + 1
        out[step] = out.get(step, 0.0) + sum(float(g.double().pow(2).sum()) for g in grads)

    opt.register_step_pre_hook(hook)
    return out


# ---------------------------------------------------------------------------------------------
# ZClip


def test_zclip_clips_exactly_when_the_norm_passes_the_ema_threshold():
    z = ZClip(z=2.5, alpha=0.97, base_clip=0.0, mode="threshold")
    norms = [1.0 + 0.1 * math.sin(i) for i in range(ZCLIP_WARMUP)]
    for n in norms:
        assert z.clip() == 0.0 and not z.observe(n)  # warm-up: trainer.grad_clip (0: none)
    mean = sum(norms) / len(norms)
    std = math.sqrt(sum((x - mean) ** 2 for x in norms) / len(norms))
    assert z.threshold() == pytest.approx(mean + 2.5 * std)
    below = z.threshold() * 0.999
    assert not z.observe(below)
    threshold = z.threshold()
    assert z.clip() == threshold
    assert z.observe(threshold * 10)  # a spike: clipped, and the EMA takes the clipped value
    m1 = 0.97 * (0.97 * mean + 0.03 * below) + 0.03 * threshold
    assert z.mean == pytest.approx(m1)
    assert ZClip(2.5, 0.97, base_clip=0.5, mode="threshold").clip() == 0.5
    state = z.state_dict()
    again = ZClip(2.5, 0.97, 0.0, mode="threshold")
    again.load_state_dict(state)
    assert again.threshold() == z.threshold() and again.observe(5.0) == z.observe(5.0)


def test_adaptive_zclip_clips_to_mu_plus_z_thr_squared_over_z_sigma_by_hand():
    """The official code's default (z-score mode, adaptive scaling) on mu 1, sigma 0.1, z_thr 2.5."""
    z = ZClip(z=2.5, alpha=0.97, base_clip=0.0)
    assert z.mode == "adaptive"
    z.load_state_dict({"warm": [], "mean": 1.0, "var": 0.01})
    assert z.threshold() == pytest.approx(1.25)
    assert z.limit(1.2) is None and z.limit(1.25) is None  # z = 2 and z = 2.5: not above z_thr
    assert z.limit(2.0) == pytest.approx(1.0625)  # z = 10: 1 + 6.25 / 10 * 0.1
    assert z.limit(3.0) == pytest.approx(1.03125)  # z = 20: the further out, the lower the clip
    assert z.clip() == 0.0  # DeepSpeed gets trainer.grad_clip (0: none); ZClip acts in the step
    # the factor that takes the gradients DeepSpeed hands the optimizer (norm g) to the clip
    assert float(z.factor(torch.tensor(2.0))) == pytest.approx(1.0625 / 2.0)
    assert float(z.factor(torch.tensor(1.2))) == 1.0
    capped = ZClip(2.5, 0.97, base_clip=1.05)
    capped.load_state_dict(z.state_dict())
    assert capped.clip() == 1.05
    assert float(capped.factor(torch.tensor(2.0))) == 1.0  # 1.05 < 1.0625: DeepSpeed's own clip stands
    assert float(capped.factor(torch.tensor(3.0))) == pytest.approx(1.03125 / 1.05)
    assert z.observe(2.0)  # clipped; the EMA takes the clipped norm
    assert z.mean == pytest.approx(0.97 * 1.0 + 0.03 * 1.0625)
    assert z.var == pytest.approx(0.97 * 0.01 + 0.03 * (1.0625 - 0.97 * 1.0 - 0.03 * 1.0625) ** 2)
    assert not z.observe(1.1)


@pytest.mark.parametrize("ds", ["zero0_fp32", "zero0_fp16", "zero2_bf16", "zero3_bf16"])
def test_adaptive_zclip_hands_the_optimizer_the_adaptive_clip_on_a_spike(ds, one_rank, tmp_path, monkeypatch):
    """The clip depends on the spike step's own norm; the optimizer receives exactly
    mu + z_thr^2 / z * sigma on the bare fp32 path, ZeRO-0 fp16, ZeRO-2 and ZeRO-3 bf16 (ZeRO 1-3
    call the optimizer once per group or sub-group: one factor for all). A warm-up of 8 steps
    instead of 25 keeps the test short."""
    monkeypatch.setattr(zclip_module, "ZCLIP_WARMUP", 8)
    if ds == "zero0_fp32":
        ds = ds_config(tmp_path, "zero0_bf16", bf16={"enabled": False})
    tiny = Tiny(ds, "trainer.mitigations.zclip_z=2.5", "trainer.grad_clip=0")
    zc, seen = tiny.plugin.zclip, applied_norms(tiny.engine)
    calm = tiny.train(9)[-1]
    assert calm["mitig/zclip_clipped"] == 0 and math.sqrt(seen[9]) == pytest.approx(
        calm["grad_norm"], rel=1e-4
    )
    mu, sigma = zc.mean, math.sqrt(zc.var)
    spike = tiny.train(1, spike_at=(10,))[0]
    z = (spike["grad_norm"] - mu) / sigma
    assert z > 2.5 and spike["mitig/zclip_clipped"] == 1
    expected = mu + 2.5**2 / z * sigma
    assert spike["mitig/zclip_clip"] == pytest.approx(expected, rel=1e-9)
    assert spike["mitig/zclip_threshold"] == pytest.approx(mu + 2.5 * sigma, rel=1e-9)
    assert spike["mitig/zclip_threshold"] > expected  # below the threshold mode's clip
    assert math.sqrt(seen[10]) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("ds", [*DS_CONFIGS, "zero0_fp32"])
def test_the_clip_set_before_the_step_is_the_one_applied_and_the_gate_sees_the_norm(ds, one_rank, tmp_path):
    """On every shipped ds_config (and fp32 without ZeRO, the bare torch optimizer): the value
    set_grad_clip hands DeepSpeed is the norm the optimizer receives, and the grad norm skip-step
    judges inside the step is the run's reported one (unscaled, before clipping)."""
    if ds == "zero0_fp32":
        ds = ds_config(tmp_path, "zero0_bf16", bf16={"enabled": False})
    tiny = Tiny(ds, "trainer.grad_clip=0", "trainer.mitigations.skip_step_sigma=6")
    seen = applied_norms(tiny.engine)
    for step, clip in ((1, 1e-3), (2, 0.0)):
        set_grad_clip(tiny.engine, clip)
        row = tiny.train(1)[0]
        applied = math.sqrt(seen[step])
        assert tiny.plugin.skip.hist[1, tiny.plugin.skip.count - 1].item() == pytest.approx(
            row["grad_norm"], rel=1e-6
        )
        assert applied == pytest.approx(clip or row["grad_norm"], rel=1e-4)


# ---------------------------------------------------------------------------------------------
# Skip-step


def test_skip_step_judges_one_sided_after_its_minimum_history_without_non_finite_values():
    """OLMo-core's comparison, (x - mean) <= sigma * std: a value far below the mean applies."""
    assert [SkipStep(6, w, "cpu").min_history for w in (4, 16, 32, 128)] == [4, 16, 20, 64]
    skip = SkipStep(sigma=3.0, window=4, device="cpu")
    one = torch.tensor(1.0)
    for loss in (1.0, 1.1, 0.9, math.nan):  # nan: left out of the mean and std
        assert float(skip.judge(torch.tensor(loss), one)) == 1.0  # not judged before 4 values
    assert float(skip.judge(torch.tensor(-100.0), one)) == 1.0  # far below: applied
    skip = SkipStep(sigma=3.0, window=4, device="cpu")
    for loss in (1.0, 1.1, 0.9, math.nan):
        skip.judge(torch.tensor(loss), one)
    assert float(skip.judge(torch.tensor(1.4), one)) == 0.0  # mean 1, std 0.1: 4 std above
    assert float(skip.judge(torch.tensor(1.0), torch.tensor(-50.0))) == 1.0  # the grad norm alike


@pytest.mark.parametrize("ds", ["zero0_fp16", "zero2_bf16"])
def test_a_skipped_step_leaves_weights_and_adam_moments_unchanged(ds, one_rank):
    tiny = Tiny(ds, "trainer.mitigations.skip_step_sigma=6", "trainer.mitigations.skip_step_window=8")
    rows = tiny.train(9)
    assert [r["mitig/skip_step"] for r in rows] == [0] * 9
    before, lr, adam = tiny.snapshot(), eng.current_lr(tiny.engine), tiny.adam_steps()
    spike = tiny.train(1, spike_at=(10,))[0]
    assert not eng.overflowed(tiny.engine)  # skipped by the mitigation, not by an fp16 overflow
    assert spike["mitig/skip_step"] == 1 and spike["mitig/skipped_steps"] == 1
    after = tiny.snapshot()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed[:5]
    assert tiny.adam_steps() == adam == 9
    assert eng.current_lr(tiny.engine) != lr  # the schedule counts on, as in OLMo-core
    calm = tiny.train(1)[0]
    assert calm["mitig/skip_step"] == 0 and calm["mitig/skipped_steps"] == 1
    assert tiny.adam_steps() == 10
    assert not torch.equal(tiny.snapshot()["master/model.norm.weight"], after["master/model.norm.weight"])


# ---------------------------------------------------------------------------------------------
# Update clipping


def test_update_clipping_equals_a_hand_computed_step():
    torch.manual_seed(0)
    lr, (b1, b2), eps, wd = 0.1, (0.9, 0.95), 1e-8, 0.1
    w0 = [torch.randn(4, 3), torch.randn(5)]
    grads = [[torch.randn(4, 3) * 0.01, torch.randn(5)], [torch.randn(4, 3) * 3, torch.randn(5) * 1e-3]]
    params = [w.clone().requires_grad_() for w in w0]
    opt = MitigatedAdamW(
        [{"params": params, "weight_decay": wd}], lr=lr, betas=(b1, b2), eps=eps, update_clip=True
    )
    plain = [w.clone().requires_grad_() for w in w0]
    ref = torch.optim.AdamW([{"params": plain, "weight_decay": wd}], lr=lr, betas=(b1, b2), eps=eps)
    plain_ours = [w.clone().requires_grad_() for w in w0]
    ours = MitigatedAdamW([{"params": plain_ours, "weight_decay": wd}], lr=lr, betas=(b1, b2), eps=eps)
    w = [x.double() for x in w0]
    m = [torch.zeros_like(x) for x in w]
    v = [torch.zeros_like(x) for x in w]
    rms_of = [0.0, 0.0]
    for t, gs in enumerate(grads, start=1):
        for i, g in enumerate(gs):
            params[i].grad, plain[i].grad, plain_ours[i].grad = g.clone(), g.clone(), g.clone()
            g = g.double()
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            v_hat = v[i] / (1 - b2**t)
            rms = (g * g / v_hat.clamp(min=eps**2)).mean().sqrt()
            rms_of[i] = rms
            eta = lr / max(1.0, float(rms))
            w[i] = w[i] * (1 - eta * wd) - eta * (m[i] / (1 - b1**t)) / (v_hat.sqrt() + eps)
        opt.clip_stats = None
        opt.step()
        ref.step()
        ours.step()
    # step 2: tensor 0's gradient jumped 300x against its v (clipped), tensor 1's fell (not clipped)
    assert float(opt.clip_stats[1]) == 1
    assert float(opt.clip_stats[0]) == pytest.approx(float(rms_of[0]), rel=1e-5)
    for i in range(2):
        assert torch.allclose(params[i].double(), w[i], rtol=1e-6, atol=1e-7)
        assert torch.allclose(plain_ours[i], plain[i], rtol=1e-6, atol=1e-7)  # off: torch's AdamW
    assert not torch.allclose(params[0], plain[0], rtol=1e-3)


def test_update_clipping_is_per_tensor_on_zero2_partitions_as_on_zero0(one_rank):
    """ZeRO-2 steps one flat partition per param group; the RMS still runs per parameter. Without
    update clipping the two train bit for bit alike; with it, after step 2 (the first with clipped
    tensors) they agree to the rounding of the RMS sums (measured: 6e-8). Later steps drift apart
    further through fp16 rounding and the elements where v is near eps, so two steps are compared."""
    runs = [
        Tiny(ds, "trainer.mitigations.update_clip=true", "trainer.lr=0.05")
        for ds in ("zero0_fp16", "zero2_fp16")
    ]
    rows = [r.train(2) for r in runs]
    assert [r["mitig/update_clipped_tensors"] for r in rows[0]] == [0, 7]
    assert [r["mitig/update_clipped_tensors"] for r in rows[1]] == [0, 7]
    assert rows[0][1]["mitig/update_rms_max"] == pytest.approx(rows[1][1]["mitig/update_rms_max"], rel=1e-6)
    s0, s2 = (r.snapshot() for r in runs)
    for k in s0:
        if k.startswith("master/"):
            assert torch.allclose(s0[k], s2[k], rtol=0, atol=1e-6), k


# ---------------------------------------------------------------------------------------------
# Update-norm clipping

UNC = ("trainer.mitigations.update_norm_clip_sigma=3", "trainer.mitigations.update_norm_clip_window=8",
       "trainer.max_steps=40")  # fmt: skip


def lr_spike(tiny: Tiny, factor: float = 10.0) -> None:
    """The next step's lr times ``factor`` (the schedule sets its own again after the step): the
    update's norm jumps ``factor``-fold, where a gradient spike (``spike_at``) barely moves Adam's."""
    for g in client_optimizer(tiny.engine).param_groups:
        g["lr"] *= factor


def test_the_update_norm_window_by_hand():
    w = UpdateNormWindow(sigma=3.0, window=4, device="cpu")
    assert w.min_history == 4  # min(window, max(20, window / 2))
    assert float(w.scale(torch.tensor(0.0))) == 1.0  # a zero update (lr 0, a skipped step): left out
    for norm in (1.0, 2.0, 3.0):
        assert float(w.scale(torch.tensor(norm))) == 1.0
        assert math.isinf(float(w.last[1]))  # no threshold until 4 usable norms are in
    assert float(w.scale(torch.tensor(4.0))) == 1.0
    threshold = 2.5 + 3 * math.sqrt(1.25)  # mean + 3 * population std of 1, 2, 3, 4
    assert float(w.scale(torch.tensor(10.0))) == pytest.approx(threshold / 10)
    norm, t, clipped = w.last.tolist()
    assert (norm, clipped) == (10.0, 1.0) and t == pytest.approx(threshold)
    assert w.state_dict()["history"] == pytest.approx([2.0, 3.0, 4.0, threshold])  # the applied norm
    again = UpdateNormWindow(3.0, 4, "cpu")
    again.load_state_dict(w.state_dict())
    assert again.count == w.count == 6 and float(again.threshold()) == float(w.threshold())


def test_update_norm_clipping_scales_the_whole_update_weight_decay_included():
    """MitigatedAdamW holds every change back until the norm of all of them is known; a scale of 1
    is torch's AdamW, a scale of 0.5 halves each tensor's change (decay and Adam's step alike)."""
    torch.manual_seed(0)
    w0, grads = [torch.randn(4, 3), torch.randn(5)], [torch.randn(4, 3), torch.randn(5)]
    seen = []
    for scale in (1.0, 0.5):
        ours = [w.clone().requires_grad_() for w in w0]
        plain = [w.clone().requires_grad_() for w in w0]
        opt = MitigatedAdamW([{"params": ours, "weight_decay": 0.1}], lr=0.1, betas=(0.9, 0.95), eps=1e-8)
        opt.update_norm_scale = lambda n, s=scale: seen.append(float(n)) or torch.tensor(s)
        ref = torch.optim.AdamW([{"params": plain, "weight_decay": 0.1}], lr=0.1, betas=(0.9, 0.95), eps=1e-8)
        for p, q, g in zip(ours, plain, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        change = [(q - w).detach() for q, w in zip(plain, w0)]
        assert seen[-1] == pytest.approx(float(torch.cat([c.flatten() for c in change]).norm()), rel=1e-6)
        for p, w, c in zip(ours, w0, change):
            assert torch.allclose(p.detach(), w + scale * c, rtol=1e-6, atol=1e-7)
        assert not opt.pending


@pytest.mark.parametrize("ds", ["zero0_fp16", "zero2_bf16"])
def test_update_norm_clipping_applies_exactly_the_threshold_on_a_spike(ds, one_rank):
    """An lr spike at step 10 (the window holds steps 2-9; step 1's update is 0 at lr 0): the update
    applied to the fp32 masters has the norm mean + 3 std of the window's norms, and on ZeRO-2 the
    module's 16-bit weights hold it too (ZeRO copies each group's partition before the last group
    has stepped; the plug-in copies them again)."""
    tiny = Tiny(ds, *UNC)
    rows = tiny.train(9)
    norms = [r["mitig/update_norm"] for r in rows[1:]]
    assert rows[0]["mitig/update_norm"] == 0 and not any(r["mitig/update_norm_clipped"] for r in rows)
    mean = sum(norms) / len(norms)
    threshold = mean + 3 * math.sqrt(sum((x - mean) ** 2 for x in norms) / len(norms))
    before = tiny.snapshot(moments=False)
    lr_spike(tiny)
    spike = tiny.train(1)[0]
    after = tiny.snapshot(moments=False)
    assert spike["mitig/update_norm_clipped"] == 1 and spike["mitig/update_norm"] > 2 * threshold
    assert spike["mitig/update_norm_threshold"] == pytest.approx(threshold, rel=1e-5)
    masters = [k for k in before if k.startswith("master/")]
    applied = math.sqrt(sum(float((after[k].double() - before[k].double()).square().sum()) for k in masters))
    assert applied == pytest.approx(threshold, rel=1e-4)
    for k in masters:
        module = after["module/" + k.removeprefix("master/")]
        assert torch.equal(module, after[k].to(module.dtype)), k
    assert tiny.train(1)[0]["mitig/update_norm_clipped"] == 0


@pytest.mark.parametrize("ds", ["zero0_bf16", "zero2_fp16"])
def test_foreach_and_per_tensor_mitigated_adamw_train_bit_for_bit_alike(ds, one_rank):
    """MitigatedAdamW's foreach path (the default off the CPU) and its per-tensor one, inside real
    engines (ZeRO-0 hands it every tensor, ZeRO-2 a flat partition per group) with the three
    mitigations that act inside the update on, through an lr spike whose update is clipped and a
    gradient spike that skips a step, tensors clipped all along: the same metrics, weights and moments,
    bit for bit."""
    keys = ("trainer.mitigations.update_clip=true", "trainer.mitigations.skip_step_sigma=6",
            "trainer.mitigations.skip_step_window=8", *UNC)  # fmt: skip
    runs = [Tiny(ds, *keys, foreach=f) for f in (True, False)]
    assert [client_optimizer(r.engine).foreach for r in runs] == [True, False]
    rows = []
    for r in runs:
        head = r.train(9)
        lr_spike(r)
        rows.append(head + r.train(3, spike_at=(12,)))
    assert rows[0] == rows[1]
    acted = {k for row in rows[0] for k, v in row.items() if k.startswith("mitig/") and v}
    assert {"mitig/skip_step", "mitig/update_clipped_tensors", "mitig/update_norm_clipped"} <= acted, acted
    s0, s1 = (r.snapshot() for r in runs)
    assert [k for k in s0 if not torch.equal(s0[k], s1[k])] == []


def test_update_norm_clipping_resumes_exactly_and_is_off_by_default(one_rank, tmp_path):
    """The window rides in the checkpoint: a run resumed at step 5 (window not yet full) clips the
    lr spike of step 10 as the unbroken run does. Off by default: no plug-in, torch's AdamW; ZeRO-3
    is refused in one sentence."""
    cfg = load_config(ROOT / "configs")
    assert not [c for c in registry.wanted(cfg) if c.name == "update_norm_clip"]
    assert registry.optimizer_for(cfg) is eng.adamw
    on = load_config(ROOT / "configs", list(UNC))
    assert [c.name for c in registry.wanted(on, registry.MITIGATIONS)] == ["update_norm_clip"]
    path = ROOT / "ds_configs" / "zero3_bf16.json"
    on.ds_config, _ = resolve_ds_config(read_ds_config(path), path, on, 1)
    on.ds_config_path = str(path)
    with pytest.raises(
        ConfigError,
        match=r"zero3_bf16.json: trainer.mitigations.update_norm_clip_sigma needs ZeRO stage 0, 1 or 2",
    ):
        registry.check(on)

    def tail(tiny: Tiny) -> list[dict]:
        rows = tiny.train(4)
        lr_spike(tiny)
        return rows + tiny.train(2)

    unbroken = Tiny("zero2_bf16", *UNC)
    unbroken.train(5)
    state = {"plugins": unbroken.run.plugins.state_dict(), "position": unbroken.run.order.position}
    unbroken.engine.save_checkpoint(str(tmp_path), tag="t", client_state=state)
    rows = tail(unbroken)
    assert [r["mitig/update_norm_clipped"] for r in rows] == [0, 0, 0, 0, 1, 0]
    resumed = Tiny("zero2_bf16", *UNC)
    _, client = resumed.engine.load_checkpoint(str(tmp_path), tag="t")
    resumed.run.plugins.load_state_dict(client["plugins"])
    resumed.run.order.position, resumed.run.step = client["position"], 5
    assert resumed.plugin.update_norm.count == 5
    assert tail(resumed) == rows


# ---------------------------------------------------------------------------------------------
# QK-clip


@pytest.mark.parametrize("ds, arch", [("zero0_fp16", "llama"), ("zero2_bf16", "gpt2")])
def test_qk_clip_rescales_exactly_the_heads_over_tau(ds, arch, one_rank):
    # step 1 runs at lr 0 (warm-up): only QK-clip changes the weights
    tiny = Tiny(ds, f"model.arch={arch}", "trainer.mitigations.qk_clip_tau=1", repeat=True)
    qk = tiny.plugin.qk
    batch = tiny.run.data.blocks("train", tiny.run.order.next())[:, :-1]
    tiny.run.order.position = 0

    def maxima() -> torch.Tensor:
        with tiny.ctx:
            tiny.engine(input_ids=batch.to(tiny.engine.device))
        return qk.maxima()

    first = maxima()
    tau = float(first.flatten().median())
    qk.tau = tau
    before = tiny.snapshot(moments=False)
    row = tiny.train(1)[0]
    over = first > tau
    assert row["mitig/qk_clipped_heads"] == int(over.sum()) > 0
    assert row["mitig/qk_logit_max"] == pytest.approx(float(first.max()), rel=1e-6)
    after = tiny.snapshot(moments=False)
    for layer, targets in qk.targets.items():
        hd = qk.head_dim[layer]
        for param, dim, starts in targets:
            name = next(n for n, p in tiny.model.named_parameters() if p is param)
            w0, w1 = before[f"master/{name}"], after[f"master/{name}"]
            for h in range(qk.n_heads):
                s = math.sqrt(tau / float(first[layer, h])) if over[layer, h] else 1.0
                for start in starts:
                    rows = slice(start + h * hd, start + (h + 1) * hd)
                    a, b = w0.narrow(dim, rows.start, hd), w1.narrow(dim, rows.start, hd)
                    assert torch.allclose(b, a * s, rtol=1e-6, atol=0), (name, h)
            module = dict(tiny.model.named_parameters())[name]
            assert torch.equal(module.detach(), w1.to(module.dtype))  # the module holds the master's rounding
    again = maxima()
    assert float(again.max()) <= tau * 1.02  # bf16/fp16 weights: within their rounding
    # the first layer's other heads keep their logits (later layers see the first one's new output)
    assert torch.allclose(again[0][~over[0]], first[0][~over[0]])


def test_qk_clip_is_refused_where_it_cannot_act(tmp_path):
    # each plug-in refuses what it cannot serve (registry.check, run before anything is written)
    with pytest.raises(ConfigError, match="qk_clip_tau needs model.arch llama or gpt2"):
        registry.check(
            load_config(ROOT / "configs", ["model.arch=qwen3", "trainer.mitigations.qk_clip_tau=100"])
        )
    cfg = load_config(ROOT / "configs", ["trainer.mitigations.update_clip=true"])
    path = ROOT / "ds_configs" / "zero3_bf16.json"
    cfg.ds_config, _ = resolve_ds_config(read_ds_config(path), path, cfg, 1)
    cfg.ds_config_path = str(path)
    with pytest.raises(
        ConfigError, match=r"zero3_bf16.json: trainer.mitigations.update_clip needs ZeRO stage 0, 1 or 2"
    ):
        registry.check(cfg)
    out = tmp_path / "runs"
    proc = python_train(
        "--ds_config", "zero3_bf16", "--set", *TINY, "trainer.mitigations.qk_clip_tau=100",
        f"utils.output_dir={out}", f"utils.cache_dir={tmp_path / 'cache'}",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "trainer.mitigations.qk_clip_tau needs ZeRO stage 0, 1 or 2" in errors[0]
    assert not out.exists() or not any(out.iterdir())


# ---------------------------------------------------------------------------------------------
# Soft-capping


def test_the_z_loss_is_the_mean_of_the_squared_log_z_palm_s_form():
    """lm_loss adds z_loss * mean((log Z)^2), not z_loss * mean(log Z)^2: log Z of 1 and 3 give 5, not 4."""
    logits = torch.stack([torch.tensor([1.0, 1.0]) - math.log(2.0), torch.tensor([3.0, 3.0]) - math.log(2.0)])
    loss, parts = lm_loss(logits[None], torch.tensor([[0, 1]]), z_loss=0.1)
    assert float(parts["z_loss"]) == pytest.approx(0.1 * (1.0 + 9.0) / 2)
    assert float(loss) == pytest.approx(float(parts["ce"]) + 0.5)


def test_attention_softcap_bounds_the_logits_and_is_identity_for_small_ones():
    class Attention(torch.nn.Module):
        dsinstab_attn_softcap = 5.0

    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    causal = torch.full((6, 6), -math.inf).triu(1)[None, None]
    for size, expect_capped in ((1e-2, False), (1e3, True)):
        out, weights = softcapped_attention(Attention().eval(), q * size, k, v, causal, scaling=0.5)
        raw = (q * size) @ k.transpose(-1, -2) * 0.5
        capped = 5.0 * torch.tanh(raw / 5.0)
        assert float(capped.abs().max()) <= 5.0
        assert torch.allclose(weights, torch.softmax(capped + causal, -1), atol=1e-6)
        uncapped = torch.softmax(raw + causal, -1)
        assert torch.allclose(weights, uncapped, atol=1e-5) != expect_capped
        assert torch.allclose(out, (weights @ v).transpose(1, 2), atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_softcapped_models_bound_output_logits_and_match_when_logits_are_small(arch):
    small = dict(arch=arch, n_layer=2, d_model=32, n_head=2, seq_len=16)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    plain = build_model(ModelConfig(**small), 100, 99, seed=0)
    # an attention cap far above the logits: the capped attention path computes what sdpa computes
    capped = build_model(ModelConfig(**small, attn_softcap=1e6, logit_softcap=30.0), 100, 99, seed=0)
    with torch.no_grad():
        expected = 30.0 * torch.tanh(plain(input_ids=ids).logits / 30.0)
        assert torch.allclose(capped(input_ids=ids).logits, expected, atol=1e-6)
    big = build_model(ModelConfig(**small, logit_softcap=30.0), 100, 99, seed=0)
    raw = build_model(ModelConfig(**small), 100, 99, seed=0)
    with torch.no_grad():
        for m in (big, raw):
            m.get_output_embeddings().weight.mul_(100)  # output logits in the hundreds
        assert float(raw(input_ids=ids).logits.abs().max()) > 30
        assert float(big(input_ids=ids).logits.abs().max()) <= 30


# ---------------------------------------------------------------------------------------------
# Resume, and two ranks


def test_zclip_and_skip_step_act_on_a_spike_and_a_resumed_run_acts_alike(one_rank, tmp_path):
    """ZClip (threshold mode) clips the spike of step 30 at its threshold (the optimizer receives exactly that norm)
    and skip-step skips it. The plug-in's state rides in DeepSpeed's client state: a run resumed at
    step 20 (ZClip still gathering its first 25 norms) decides at steps 21-32 exactly as the run
    that never stopped."""
    keys = ("trainer.mitigations.zclip_z=2.5", "trainer.mitigations.zclip_mode=threshold",
            "trainer.mitigations.skip_step_sigma=6",
            "trainer.mitigations.skip_step_window=16", "trainer.max_steps=32", "trainer.grad_clip=0")  # fmt: skip
    spikes = (30, 31)
    unbroken = Tiny("zero2_bf16", *keys)
    seen = applied_norms(unbroken.engine)
    head = unbroken.train(20)
    state = {"plugins": unbroken.run.plugins.state_dict(), "position": unbroken.run.order.position}
    unbroken.engine.save_checkpoint(str(tmp_path), tag="t", client_state=state)
    tail_unbroken = unbroken.train(12, spike_at=spikes)
    rows = {r["step"]: r for r in head + tail_unbroken}
    assert all("mitig/zclip_threshold" not in rows[s] for s in range(1, ZCLIP_WARMUP + 1))
    calm, spike = rows[29], rows[30]
    assert calm["mitig/zclip_clipped"] == 0 and calm["grad_norm"] < calm["mitig/zclip_threshold"]
    assert math.sqrt(seen[29]) == pytest.approx(calm["grad_norm"], rel=1e-4)
    assert spike["mitig/zclip_clipped"] == 1 and spike["grad_norm"] > spike["mitig/zclip_threshold"]
    assert math.sqrt(seen[30]) == pytest.approx(spike["mitig/zclip_threshold"], rel=1e-4)
    assert spike["mitig/skip_step"] == 1

    resumed = Tiny("zero2_bf16", *keys)
    _, client = resumed.engine.load_checkpoint(str(tmp_path), tag="t")
    resumed.run.plugins.load_state_dict(client["plugins"])
    resumed.run.order.position, resumed.run.step = client["position"], 20
    assert resumed.train(12, spike_at=spikes) == tail_unbroken


def test_two_ranks_take_the_same_decisions(tmp_path, cache_dir):
    """Skip-step judges the loss all-reduced over ranks and DeepSpeed's reduced grad norm, QK-clip
    the logit maxima all-reduced. At sigma 1 on two ranks of ZeRO-2 several steps are skipped, and
    each rank's optimizer shard counts the same applied steps (a rank judging its own loss would
    skip others); QK-clip's and update-norm clipping's collectives line up."""
    proc, run_dir = launch(
        tmp_path, cache_dir,
        "trainer.mitigations.skip_step_sigma=1", "trainer.mitigations.skip_step_window=4",
        "trainer.mitigations.qk_clip_tau=0.2", "trainer.mitigations.update_clip=true",
        "trainer.mitigations.update_norm_clip_sigma=1", "trainer.mitigations.update_norm_clip_window=4",
        ranks=2,
    )  # fmt: skip
    assert_ok(proc)
    rows = {r["step"]: r for r in train_rows(run_dir)}
    # update-norm clipping all-reduces its sum of squares inside each step: the ranks keep in step
    assert all("mitig/update_norm" in r for r in rows.values())
    skipped = rows[12]["mitig/skipped_steps"]
    assert skipped == sum(rows[s]["mitig/skip_step"] for s in range(1, 13)) > 0
    assert sum(rows[s]["mitig/qk_clipped_heads"] for s in rows) > 0
    assert all("mitig/update_clipped_tensors" in r for r in rows.values())
    shards = sorted((run_dir / "checkpoints" / "step-12").glob("*optim_states.pt"))
    assert len(shards) == 2
    counts = []
    for shard in shards:
        sd = torch.load(shard, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        base = sd["base_optimizer_state"]
        states = base["state"].values() if isinstance(base, dict) else base
        counts.append({float(s["step"]) for s in states})
    assert counts == [{12.0 - skipped}] * 2
