"""Overflow anatomy: the first non-finite tensor of an overflow is named, headroom and underflow
against hand-computed tensors, DeepSpeed's skipping of non-finite bf16/fp32 steps, and one run
through the launcher with its report table and plot.

Engines are built in this process on one rank (as in test_numerics.py), stepped by the loop's own
``advance``.
"""

from __future__ import annotations

import math

import pytest
import torch
from deepspeed.utils import safe_get_full_fp32_param
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import ROOT, TINY, assert_ok, ds_config, launch, train_rows
from dsinstab.instruments.base import Context
from dsinstab.instruments.overflow import FP16_MAX, OverflowAnatomy, count_below, skips_nonfinite_steps
from dsinstab.run import engine as eng
from dsinstab.run import loop
from dsinstab.run.config import load_config
from dsinstab.run.ds_config import read_ds_config, resolve_ds_config
from dsinstab.run.lowp import compute_context
from dsinstab.run.model import build_model
from dsinstab.run.plugins import Plugins, Step

pytestmark = pytest.mark.usefixtures("one_rank")  # conftest: in-process engines


def setup(ds: str, *overrides: str, model: torch.nn.Module | None = None, before_plugin=None):
    """(config, model, engine, plugin) for conftest.TINY's model, or ``model``, in ds_config ``ds``.
    ``before_plugin(model)`` runs before the plug-in hooks the model (a fault inside a module).
    The plug-in is the one plug-in of a loop :class:`~dsinstab.run.loop.Run` that :func:`lm_step`
    steps."""
    cfg = load_config(ROOT / "configs", [*TINY, *overrides])
    path = ds if ds.endswith(".json") else ROOT / "ds_configs" / f"{ds}.json"
    cfg.ds_config, _ = resolve_ds_config(read_ds_config(path), path, cfg, 1)
    vocab = cfg.dataset.vocab_size
    model = model or build_model(cfg.model, vocab, vocab - 1, cfg.trainer.seed)
    if before_plugin:
        before_plugin(model)
    engine = eng.build_engine(model, cfg.trainer, cfg.ds_config)
    plugin = OverflowAnatomy(Context(cfg, model, engine))
    run = loop.Run(
        cfg=cfg,
        engine=engine,
        model=model,
        data=StepTokens(cfg),
        order=Order(cfg.trainer.micro_batch_size),
        checkpointer=None,
        plugins=Plugins([plugin]),
        run_dir=None,
        rank=0,
        world=1,
    )
    run.plugins.bind(run)
    RUNS.clear()  # one test's run at a time
    RUNS[id(plugin)] = run
    return cfg, model, engine, plugin


RUNS: dict[int, loop.Run] = {}  # the loop's run around each plug-in :func:`setup` built, by id


class StepTokens:
    """Random tokens where the loop reads its packed data (``blocks(split, indices)``): each step
    its own batch, drawn with the step number as the seed."""

    def __init__(self, cfg):
        self.cfg, self.seed = cfg, 0

    def blocks(self, split: str, indices: torch.Tensor) -> torch.Tensor:
        tokens = torch.Generator().manual_seed(self.seed)
        shape = (len(indices), self.cfg.model.seq_len + 1)
        return torch.randint(0, self.cfg.dataset.vocab_size, shape, generator=tokens)


class Order:
    """The same blocks every micro batch (:class:`StepTokens` draws the tokens), at a position that
    moves as the loop's batch order does."""

    def __init__(self, micro_batch: int):
        self.mb, self.seed, self.position = micro_batch, 0, 0

    def indices_at(self, position: int) -> torch.Tensor:
        return torch.arange(self.mb)

    def next(self) -> torch.Tensor:
        self.position += 1
        return self.indices_at(self.position - 1)


def lm_step(cfg, engine, plugin, step: int, blow_up_logit_grads: bool = False) -> dict:
    """One optimizer step on random tokens, taken by ``loop.advance`` with the plug-in in the run."""
    run = RUNS[id(plugin)]
    run.data.seed = step  # the step's batch; the loop numbers the step run.step + 1
    assert run.step + 1 == step

    def blow_up(module, args, logits):  # the loss stays finite; the gradient reaching the logits does not
        logits = logits * 1.0
        logits.register_hook(lambda g: g * math.inf)
        return logits

    head = run.model.get_output_embeddings()
    hook = head.register_forward_hook(blow_up) if blow_up_logit_grads else None
    try:
        _, metrics, _ = loop.advance(run, compute_context(engine))
    finally:
        if hook is not None:
            hook.remove()
    run.step = step
    return {k: v for k, v in metrics.items() if k.startswith("diag/")}


class Switch:
    on = False


# ---------------------------------------------------------------------------------------------
# The first non-finite tensor


def test_a_forward_overflow_is_named_with_its_magnitude_the_step_before():
    """fp16: a deep module's output pushed past 65504 on step 3 is the one named, in the forward pass
    (found by re-running step 3, which no probe traced), with its max |output| of step 2, the
    headroom probe's step, as an independent hook saw it."""
    fault, seen = Switch(), []

    def overflow_up_proj(model):
        model.model.layers[1].mlp.up_proj.register_forward_hook(lambda m, a, o: o * 1e5 if fault.on else o)

    cfg, model, engine, plugin = setup(
        "zero2_fp16",
        "trainer.diagnostics.every=2",
        "trainer.diagnostics.probes=headroom",
        before_plugin=overflow_up_proj,
    )
    model.model.layers[1].mlp.up_proj.register_forward_hook(
        lambda m, a, o: seen.append(float(o.detach().abs().max())) if torch.is_grad_enabled() else None
    )
    for step in (1, 2):
        lm_step(cfg, engine, plugin, step)
        assert plugin.last_event is None and not eng.overflowed(engine)
    fault.on = True
    lm_step(cfg, engine, plugin, 3)
    e = plugin.last_event
    assert eng.overflowed(engine) and engine.skipped_steps == 1
    assert (e["kind"], e["action"], e["step"], e["skipped"]) == ("overflow", "none", 3, True)
    assert (e["module"], e["pass"], e["tensor"], e["layer"]) == (
        "model.layers.1.mlp.up_proj",
        "forward",
        "output",
        "layer_1",
    )
    assert e["value"] in ("inf", "nan") and e["loss_scale"] == 65536.0
    assert e["before_step"] == 2 and e["amax_before"] == seen[1]
    assert e["headroom_before"] == pytest.approx(seen[1] / 65504)


class BlowUpGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * 1e30


def test_a_backward_overflow_names_the_gradient_that_went_non_finite():
    """fp16: the gradient with respect to ``act_fn``'s output blows up (the forward is untouched):
    named as that module's ``grad_output`` in the backward pass. No step before was traced (no
    probe, no earlier overflow): no magnitude before."""
    fault = Switch()
    cfg, model, engine, plugin = setup("zero2_fp16")
    model.model.layers[0].mlp.act_fn.register_forward_hook(  # after the plug-in's own hook
        lambda m, a, o: BlowUpGradient.apply(o) if fault.on else o
    )
    lm_step(cfg, engine, plugin, 1)
    fault.on = True
    lm_step(cfg, engine, plugin, 2)
    e = plugin.last_event
    assert e["skipped"] and (e["module"], e["pass"], e["tensor"]) == (
        "model.layers.0.mlp.act_fn",
        "backward",
        "grad_output",
    )
    assert e["amax_before"] is None and e["before_step"] is None and e["headroom_before"] is None


class CountOps(TorchDispatchMode):
    """How many aten ops are dispatched while it is on."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _run_with_two_overflows(ds: str, locate: bool) -> tuple[list[int], torch.Tensor, list, list[dict]]:
    """fp16 in ds_config ``ds``, four steps, ``up_proj``'s output past 65504 in steps 2 and 3: the
    aten ops of each step, then every fp32 master weight and Adam moment, the loss scales (and
    skipped steps) after each step, and the events."""
    fault = Switch()

    def overflow_up_proj(model):
        model.model.layers[1].mlp.up_proj.register_forward_hook(lambda m, a, o: o * 1e5 if fault.on else o)

    cfg, model, engine, plugin = setup(
        ds, f"trainer.overflow.locate={str(locate).lower()}", before_plugin=overflow_up_proj
    )
    ops, events, scales = [], [], []
    for step in (1, 2, 3, 4):
        fault.on = step in (2, 3)
        with CountOps() as count:
            lm_step(cfg, engine, plugin, step)
        ops.append(count.n)
        scales.append((eng.loss_scale(engine), engine.skipped_steps))
        if plugin.last_event is not None and plugin.last_event["step"] == step:
            events.append(plugin.last_event)
    masters = [safe_get_full_fp32_param(p) for p in model.parameters()]
    moments = [t for s in eng.client_optimizer(engine).state.values() for t in s.values()]  # Adam's
    assert len(moments) >= 3  # step, exp_avg, exp_avg_sq
    state = masters + moments
    return ops, torch.cat([t.detach().float().flatten() for t in state]), scales, events


@pytest.mark.parametrize("ds", ["zero2_fp16", "zero3_fp16"])
def test_locate_costs_no_op_on_a_step_without_overflow_and_leaves_the_run_as_it_was(ds):
    """``trainer.overflow.locate`` on and off, the same run: steps that do not overflow dispatch at
    most 2% more aten ops with it on (none: its hooks record nothing there); steps 2 and 3
    overflow, are re-run traced, and their events name ``up_proj``, step 3's with step 2's
    magnitude before (the re-run step is traced); and after step 4, which trains, every master
    weight, Adam moment and the loss scale are bit for bit those of the run with locate off: the
    re-runs left ZeRO's gradient buffers alone (ZeRO-3: and its partitioned weights)."""
    on_ops, on_state, on_scales, events = _run_with_two_overflows(ds, True)
    off_ops, off_state, off_scales, none = _run_with_two_overflows(ds, False)
    assert none == [] and on_scales == off_scales and on_scales[-1][1] == 2
    for step in (1, 4):  # the steps without overflow
        assert on_ops[step - 1] <= 1.02 * off_ops[step - 1], (on_ops, off_ops)
    assert on_ops[1] > off_ops[1]  # the overflowing step was traced
    assert torch.equal(on_state, off_state)
    print(f"aten ops per step, locate on: {on_ops}, off: {off_ops}")
    assert [(e["step"], e["module"], e["pass"], e["tensor"]) for e in events] == [
        (s, "model.layers.1.mlp.up_proj", "forward", "output") for s in (2, 3)
    ]
    assert events[0]["before_step"] is None and events[1]["before_step"] == 2
    assert events[1]["amax_before"] in ("inf", "nan") and events[1]["last_finite_step"] is None


# ---------------------------------------------------------------------------------------------
# Headroom and underflow


class OneLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2, bias=False)])

    def forward(self, x):
        return self.layers[0](x)


def test_headroom_and_underflow_match_hand_computed_tensors(tmp_path):
    """fp32 run, assumed loss scale 1024. out = x Wᵀ, loss = sum(out * c), so the gradient with
    respect to out is c and W's gradient is cᵀ x:

        x = [[1, -2], [3, 0.5]]   W = [[2, 0], [-1, 4]]   out = [[2, -9], [6, -1]]  -> max 9
        c = [[1e-12, 0], [0, 1]]  cᵀx = [[1e-12, -2e-12], [3, 0.5]]                  -> max 3

    fp16's smallest subnormal over the scale is 2^-24 / 1024 = 5.8e-11: two of W's four gradient
    elements (1e-12, -2e-12) are below it.
    """
    model = OneLayer()
    with torch.no_grad():
        model.layers[0].weight.copy_(torch.tensor([[2.0, 0.0], [-1.0, 4.0]]))
    fp32_zero0 = ds_config(tmp_path, "zero2_fp32", zero_optimization={"stage": 0})
    cfg, model, engine, plugin = setup(
        fp32_zero0,
        "trainer.diagnostics.every=1",
        "trainer.diagnostics.probes=headroom",
        "trainer.overflow.assumed_loss_scale=1024",
        model=model,
    )
    x = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    c = torch.tensor([[1e-12, 0.0], [0.0, 1.0]])
    step, plugins = Step(number=1), Plugins([plugin])  # the loop's calls, around a step of OneLayer
    plugins.begin_step(step)
    out = engine(x)
    engine.backward((out * c).sum())
    plugins.before_step(step)
    engine.step()
    plugins.after_step(step)
    plugins.read(step, {})
    metrics = plugins.collect(step)
    assert metrics == {
        "diag/headroom_act/layer_0": pytest.approx(9 / 65504),
        "diag/headroom_grad/layer_0": pytest.approx(3 * 1024 / 65504),
        "diag/underflow/layer_0": 0.5,
        "diag/headroom_loss_scale": 1024.0,
    }
    assert FP16_MAX == 65504
    state = plugin.state_dict()  # the step's maxima ride in the checkpoint
    other = OverflowAnatomy(Context(cfg, OneLayer(), engine))
    other.load_state_dict(state)
    assert other.state_dict() == state and max(state["prev"]) == 9


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_underflow_counts_on_the_bits_agree_with_a_float64_comparison(dtype):
    x = torch.tensor([0.0, -0.0, 1e-9, -3e-8, 5.96e-8, 6e-8, -1.0, math.inf, math.nan, 2**-24, -(2**-30)])
    x = x.to(dtype)
    expected = int((x.double().abs() < 2**-24).sum())  # nan and inf are not below
    assert int(count_below(x, 2**-24)) == expected
    assert int(count_below(x.reshape(1, -1).t(), 2**-24)) == expected  # a non-contiguous view


# ---------------------------------------------------------------------------------------------
# DeepSpeed skips non-finite bf16 and fp32 steps too


def _weights(engine, model) -> torch.Tensor:
    if engine.zero_optimization():
        return torch.cat([safe_get_full_fp32_param(p).flatten() for p in model.parameters()])
    return torch.cat([p.detach().float().flatten() for p in model.parameters()])


@pytest.mark.parametrize(
    "ds, skips",
    [
        ("zero0_bf16", True),
        ("zero1_bf16", True),
        ("zero2_bf16", True),
        ("zero3_bf16", True),
        ("zero2_fp32", True),
        ("fp32-zero0", False),
        ("bf16-zero2-no-check", False),
    ],
)
def test_deepspeed_skips_a_non_finite_bf16_or_fp32_step_and_it_is_an_overflow(ds, skips, tmp_path):
    """A step whose loss is finite but whose gradient is not: DeepSpeed 0.19.8 skips it in bf16 on
    every ZeRO stage and in fp32 with ZeRO, as it skips an fp16 overflow (``optimizer.overflow``,
    ``engine.skipped_steps``, weights and lr schedule unchanged), without a word (deepspeed#8415);
    the plug-in's event names where it started. fp32 without ZeRO, or bf16 with
    ``check_grad_overflow`` off, applies the non-finite gradient."""
    if ds == "fp32-zero0":
        ds = ds_config(tmp_path, "zero2_fp32", zero_optimization={"stage": 0})
    elif ds == "bf16-zero2-no-check":
        ds = ds_config(tmp_path, "zero2_bf16", bf16={"enabled": True, "check_grad_overflow": False})
    cfg, model, engine, plugin = setup(ds)
    assert skips_nonfinite_steps(engine) is skips
    lm_step(cfg, engine, plugin, 1)
    before, lr_steps = _weights(engine, model), engine.lr_scheduler.last_epoch
    lm_step(cfg, engine, plugin, 2, blow_up_logit_grads=True)
    after = _weights(engine, model)
    assert eng.overflowed(engine) is skips
    assert engine.skipped_steps == int(skips)
    assert engine.lr_scheduler.last_epoch == lr_steps + (not skips)
    assert torch.equal(before, after) if skips else not torch.isfinite(after).all()
    e = plugin.last_event
    assert (e["kind"], e["skipped"], e["loss_scale"]) == ("overflow", skips, None)
    assert (e["module"], e["pass"], e["tensor"]) == ("lm_head", "backward", "grad_output")


# ---------------------------------------------------------------------------------------------
# Through the launcher, into the report


def test_a_launched_fp16_run_names_the_overflow_and_reports_headroom(tmp_path, cache_dir):
    """The embeddings scaled by 1e6 at step 4 (trainer.inject): the first non-finite tensor is the
    embedding output, in the forward pass; the headroom probe logs every layer; the report's table
    counts where the overflows started and the headroom plot is drawn."""
    from dsinstab.reports.overflow_report import overflow_table
    from dsinstab.reports.report import write_report
    from dsinstab.reports.run_data import load_run

    proc, run = launch(
        tmp_path,
        cache_dir,
        "trainer.max_steps=5",
        "trainer.checkpoint_every=0",
        "trainer.eval_every=100",
        "trainer.inject.at_step=4",
        "trainer.inject.kind=embed",
        "trainer.inject.factor=1e6",
        "trainer.diagnostics.every=2",
        "trainer.diagnostics.probes=headroom",
        "trainer.spikes.action=none",
        ds="zero2_fp16",
    )
    assert_ok(proc)
    data = load_run(run)
    (e,) = [e for e in data.events if e["kind"] == "overflow"]
    assert (e["step"], e["module"], e["pass"], e["skipped"]) == (4, "model.embed_tokens", "forward", True)
    assert 0 < e["headroom_before"] < 1e-3 and e["loss_scale"] == 65536
    rows = {r["step"]: r for r in train_rows(run)}
    assert rows[4]["train/overflow"] == 1
    groups = ("embed", "layer_0", "layer_1")
    assert all(0 < rows[2][f"diag/headroom_act/{g}"] < 1 for g in groups)
    assert all(0 < rows[2][f"diag/headroom_grad/{g}"] < 1 for g in groups)
    assert rows[4]["diag/headroom_act/embed"] == math.inf  # past 65504 at the overflow
    assert 0 <= rows[2]["diag/underflow/layer_1"] < 1
    assert "diag/underflow/layer_1" not in rows[4]  # nan gradients are not "below": no share at all
    (row,) = overflow_table([data])
    assert row["overflows"] == 1 and row["first overflow"] == 4
    assert row["train/overflow_first"] == "model.embed_tokens (forward) x1"
    folder, _ = write_report([run], tmp_path / "report")
    assert (folder / "headroom.png").stat().st_size > 10_000
    md = (folder / "report.md").read_text()
    assert "## Overflows" in md and "| model.embed_tokens (forward), output |" in md
    assert "![headroom](headroom.png)" in md
    assert (
        md.count("data:image/png") == 0
        and (folder / "report.html").read_text().count("<h2>Overflows</h2>") == 1
    )
