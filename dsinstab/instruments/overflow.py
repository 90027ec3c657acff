"""Overflow anatomy: where a step's first inf or nan appeared, and how close each layer runs to fp16's limits.

:class:`TensorWatch` hooks every module of the model. While it records, each module's output in the
forward pass, the gradient with respect to that output, and each parameter's gradient are reduced to
their min and max on the device, in the order the step computes them; the first non-finite entry
names the tensor where an overflow started. It records no ordinary step: a step DeepSpeed skips
(every fp16 overflow; bf16/fp32 steps with a non-finite gradient) leaves the weights as they were,
and :meth:`OverflowAnatomy.recompute` runs it again, traced, right after ``engine.step()``. Where
DeepSpeed applies a non-finite gradient (fp32 without ZeRO, bf16 with ``check_grad_overflow`` off)
the step cannot be re-run, and every step is recorded. An ``overflow`` event names the tensor, its
largest magnitude in the last step recorded before (a ``headroom`` probe step, an earlier overflow,
or the step before where every step is recorded) and the step's loss scale
(``docs/overflow-anatomy.md``).

The ``headroom`` probe (``trainer.diagnostics.probes``) reads the same maxima on probe steps, per
layer, as a fraction of fp16's largest finite value (65504): activations, and gradients times the
loss scale (the fp16 run's own; for bf16 and fp32 runs ``trainer.overflow.assumed_loss_scale``, so
one bf16 run tells whether fp16 would have survived it). It also logs the share of parameter
gradient elements below fp16's smallest subnormal (2^-24) after scaling: what the loss scale is
too small to keep.

Gradients are those each rank computes for its own micro batches, before DeepSpeed averages them
across ranks: the tensors an fp16 backward actually holds. Maxima are reduced across ranks with
MAX, underflow shares with a mean.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import deepspeed.comm as dist
import torch

from dsinstab.instruments.base import Context, Instrument, probe_names
from dsinstab.instruments.layers import layer_of, layer_order
from dsinstab.run import engine as eng
from dsinstab.run import lowp
from dsinstab.run.model import lm_loss
from dsinstab.run.plugins import Step, world_size
from dsinstab.run.tracking import json_safe

FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504
FP16_TINY = 2.0**-24  # fp16's smallest subnormal: a scaled gradient below it is lost as 0


@dataclass(frozen=True)
class Slot:
    """One tracked tensor of the model: ``module``'s ``output`` (pass ``forward``), the gradient with
    respect to that output (``grad_output``, pass ``backward``: computed by the backward of the
    modules that consume the output), or a parameter's gradient (``grad_<param>``, ``backward``)."""

    module: str
    pass_: str
    tensor: str

    @property
    def group(self) -> str:
        return layer_of(self.module)


# ---------------------------------------------------------------------------------------------
# Hooks


class TensorWatch:
    """Per-step magnitudes of every module output, output gradient and parameter gradient.

    Between :meth:`start` and :meth:`stop`, each tracked tensor adds one entry (slot, micro batch,
    min, max) in execution order: forward hooks fire as each module finishes, tensor hooks as each
    gradient is complete. A wrapper that returns its last child's output unchanged (an MLP returning
    ``down_proj``'s output) adds nothing: the child already did. Forward passes without grad
    (evaluation) are not recorded. The hooks stay registered from the start, so that they keep
    their place among the model's other hooks, and run no tensor op while not recording.
    """

    def __init__(self, model: torch.nn.Module):
        self.slots: list[Slot] = []
        self.recording = False
        self.underflow_below: float | None = None  # set: count parameter-gradient elements below it
        self.handles = [model.register_forward_pre_hook(self._count_micro_batch)]
        for name, module in model.named_modules():
            fwd = self._slot(name, "forward", "output")
            bwd = self._slot(name, "backward", "grad_output")
            self.handles.append(module.register_forward_hook(self._forward_hook(fwd, bwd)))
        names: dict[int, list[str]] = {}  # every name of each parameter: a tied weight has several
        for mname, module in model.named_modules(remove_duplicate=False):
            for pname, p in module._parameters.items():
                if p is not None:
                    names.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
        self.shared: dict[int, list[str]] = {}  # slot -> the other names of a tied parameter's gradient
        for name, p in model.named_parameters():  # a tied weight once, under its first name
            if p.requires_grad:
                owner, _, pname = name.rpartition(".")
                if len(set(names[id(p)])) > 1:
                    self.shared[len(self.slots)] = sorted(set(names[id(p)]) - {name})
                self.handles.append(
                    p.register_hook(self._param_hook(self._slot(owner, "backward", f"grad_{pname}")))
                )
        self._clear()

    def _slot(self, module: str, pass_: str, tensor: str) -> int:
        self.slots.append(Slot(module, pass_, tensor))
        return len(self.slots) - 1

    def _clear(self) -> None:
        # slot, micro batch, min and max of each entry
        self.ids, self.micro, self.lo, self.hi = [], [], [], []
        self.under: list[tuple[int, torch.Tensor, int]] = []  # (slot, elements below, elements)
        self.micro_batch = -1
        self._last = None

    def start(self, underflow_below: float | None = None) -> None:
        self._clear()
        self.recording, self.underflow_below = True, underflow_below

    def stop(self) -> StepRecord | None:
        """The step's entries as device tensors (``None`` if nothing was recorded)."""
        self.recording = False
        record = None
        if self.ids:
            mag = torch.maximum(torch.stack(self.hi).float(), -torch.stack(self.lo).float())  # nan stays nan
            record = StepRecord(list(self.ids), list(self.micro), mag, list(self.under))
        self._clear()
        return record

    def _note(self, slot: int, t: torch.Tensor) -> None:
        lo, hi = torch.aminmax(t.detach())  # one pass, no temporary: cheaper than abs().amax()
        self.ids.append(slot)
        self.micro.append(self.micro_batch)
        self.lo.append(lo)
        self.hi.append(hi)

    def _count_micro_batch(self, module, args) -> None:
        if self.recording and torch.is_grad_enabled():
            self.micro_batch += 1

    def _forward_hook(self, fwd: int, bwd: int):
        def hook(module, args, output):
            if not self.recording or not torch.is_grad_enabled():
                return
            out = output[0] if isinstance(output, (tuple, list)) and output else output
            if not isinstance(out, torch.Tensor) or not out.is_floating_point() or not out.numel():
                return
            if out is self._last:  # a wrapper handing on its child's output
                return
            self._last = out
            self._note(fwd, out)
            if out.requires_grad:
                out.register_hook(self._grad_hook(bwd))

        return hook

    def _grad_hook(self, slot: int):
        def hook(grad: torch.Tensor) -> None:
            if self.recording:
                self._note(slot, grad)

        return hook

    def _param_hook(self, slot: int):
        def hook(grad: torch.Tensor) -> None:
            if not self.recording:
                return
            self._note(slot, grad)
            if self.underflow_below is not None:
                below = count_below(grad.detach(), self.underflow_below)
                self.under.append((slot, below, grad.numel()))

        return hook


# the bits of |x| as an integer: ordered like |x| for finite values, fp16 and bf16 alike
MAGNITUDE_BITS = {
    torch.float16: (torch.int16, 0x7FFF),
    torch.bfloat16: (torch.int16, 0x7FFF),
    torch.float32: (torch.int32, 0x7FFFFFFF),
}


def count_below(t: torch.Tensor, threshold: float) -> torch.Tensor:
    """How many elements have ``|x| < threshold`` (``threshold`` rounded to ``t``'s dtype), as a
    0-d tensor on ``t``'s device. Compared on the bits: a CPU without fp16 arithmetic runs fp16
    ``abs`` and ``<`` element by element, integer ones vectorised."""
    if t.dtype not in MAGNITUDE_BITS:
        return torch.count_nonzero(t.float().abs() < threshold)
    as_int, mask = MAGNITUDE_BITS[t.dtype]
    limit = int(torch.tensor(threshold, dtype=t.dtype).view(as_int)) & mask
    # count_nonzero: some 8x faster than sum() over a bool tensor on a CPU
    return torch.count_nonzero((t.contiguous().view(as_int) & mask) < limit)


@dataclass
class StepRecord:
    ids: list[int]  # slot of each entry, in execution order
    micro: list[int]  # micro batch of each entry
    mag: torch.Tensor  # max |x| of each entry (float32, on the device; inf or nan where non-finite)
    under: list[tuple[int, torch.Tensor, int]]

    def slot_max(self, n_slots: int, ids: torch.Tensor) -> torch.Tensor:
        """Max |x| per slot over the step (-1 for a slot not seen); a nan anywhere stays nan.
        ``ids`` is :attr:`ids` as a tensor on the device."""
        empty = torch.full((n_slots,), -1.0, device=self.mag.device)
        return empty.scatter_reduce(0, ids, self.mag, "amax", include_self=False)


# ---------------------------------------------------------------------------------------------
# DeepSpeed's behaviour on a non-finite gradient


def skips_nonfinite_steps(engine) -> bool:
    """Whether DeepSpeed skips an optimizer step whose gradients hold an inf or a nan, setting
    ``engine.optimizer.overflow`` (global across ranks) and counting ``engine.skipped_steps``.

    In DeepSpeed 0.19.8: always in fp16; in bf16 on ZeRO-0 (its fp16 optimizer checks every
    gradient), ZeRO-1 with fp32 gradient accumulation (``BF16_Optimizer``), ZeRO-3 (it checks the
    norm) and on ZeRO-1/2 while ``bf16.check_grad_overflow`` is on (the default); in fp32 on ZeRO-1
    to 3 (while ``zero_optimization.compute_grad_norm`` is on, the default). Never in fp32 without
    ZeRO, where torch's optimizer applies the non-finite gradient.
    """
    opt = engine.optimizer
    if not hasattr(opt, "overflow"):
        return False
    if hasattr(opt, "check_grad_overflow"):  # ZeRO-1/2 (DeepSpeedZeroOptimizer)
        by_norm = getattr(opt, "dtype", None) != torch.bfloat16 and getattr(opt, "compute_grad_norm", True)
        return bool(opt.check_grad_overflow or by_norm)
    return True


# ---------------------------------------------------------------------------------------------
# The plug-in


class OverflowAnatomy(Instrument):
    """``overflow`` events naming the first non-finite tensor, and the ``headroom`` probe."""

    name = "overflow"
    key = "trainer.overflow.locate"

    def __init__(self, ctx: Context):
        tc, model, engine = ctx.cfg.trainer, ctx.model, ctx.engine
        self.every = tc.diagnostics.every if "headroom" in probe_names(ctx.cfg) else 0
        self.locate = tc.overflow.locate
        self.engine, self.sink = engine, None
        self.fp16 = bool(engine.fp16_enabled())
        self.precision = "fp16" if self.fp16 else "bf16" if engine.bfloat16_enabled() else "fp32"
        # gradients as fp16 would hold them: already times the loss scale in an fp16 run
        self.assumed_scale = None if self.fp16 else tc.overflow.assumed_loss_scale
        self.skips = skips_nonfinite_steps(engine)
        # trace every step only where an overflowing step cannot be run again: its update was applied
        self.every_step = self.locate and not self.skips
        self.run, self.compute = None, None
        self.watch = TensorWatch(model)
        self.slots = self.watch.slots
        n, device = len(self.slots), engine.device
        self.prev = torch.full((n,), -1.0, device=device)  # max |x| per slot in the last recorded step
        self.prev_step = 0
        self.last_finite = torch.full((n,), -1.0, device=device)
        self.last_finite_step = torch.zeros(n, device=device)
        self.groups = sorted({s.group for s in self.slots}, key=layer_order)
        gi, other = self.groups.index, len(self.groups)  # other: the group of the other pass's slots
        self.group_of = {
            k: torch.tensor([gi(s.group) if s.pass_ == k else other for s in self.slots], device=device)
            for k in ("forward", "backward")
        }
        self.step, self.scale, self.probe, self.record, self.step_max = 0, None, False, None, None
        self.blocks: list = []
        self.last_event: dict | None = None
        self._ids_cache: dict[tuple, torch.Tensor] = {}

    @classmethod
    def wanted(cls, cfg) -> bool:
        tc = cfg.trainer
        return tc.overflow.locate or (bool(tc.diagnostics.every) and "headroom" in probe_names(cfg))

    def bind(self, run) -> None:
        self.sink, self.run = run.sink, run
        if self.locate and not self.every_step:  # the loop's own (on every rank: may agree across ranks)
            self.compute = lowp.compute_context(self.engine, run.cfg.utils.cpu_compute)

    def begin_step(self, step: Step) -> None:
        self.step = step.number
        self.probe = bool(self.every) and step.number % self.every == 0
        self.scale = eng.loss_scale(self.engine)  # the scale this step's backward multiplies by
        self.record = None
        if self.every_step or self.probe:
            self.watch.start(FP16_TINY / self.grad_scale if self.probe else None)

    @property
    def grad_scale(self) -> float:
        """What turns a gradient of this run into the one fp16 would hold."""
        return 1.0 if self.fp16 else float(self.assumed_scale)

    def after_update(self, step: Step) -> None:
        """The step's record: its own where it was traced, else, where DeepSpeed skipped it (a flag
        that is the same on every rank), the recomputed step's; else none."""
        self.blocks = step.blocks
        if self.watch.recording:
            self.record = self.watch.stop()
        elif self.locate and eng.overflowed(self.engine) and self.run is not None:
            self.record = self.recompute(step.blocks)

    def recompute(self, blocks: list[list[int]]) -> StepRecord | None:
        """The skipped step again, traced: its micro batches (``blocks``) through the model with the
        weights it ran with, in the loop's compute context, the loss scaled as ``engine.backward``
        scales it (over the accumulation steps, times the step's loss scale), gradients by
        ``torch.autograd.grad``. The model is called itself, not the engine, whose output hooks
        would start a DeepSpeed backward; ``autograd.grad`` neither fills ``.grad`` nor fires the
        post-accumulate hooks ZeRO reduces gradients in, so its buffers never see this pass (ZeRO-3's
        module hooks gather the partitioned weights as in the step: every rank re-runs its own
        micro batches, the same all-gathers in the same order). Dropout is off (``build_model``):
        the pass is the step's own, op for op."""
        engine, run = self.engine, self.run
        model, gas = engine.module, engine.gradient_accumulation_steps()
        params = [p for p in model.parameters() if p.requires_grad]
        self.watch.start()
        try:
            for indices in blocks:
                batch = run.data.blocks("train", torch.tensor(indices)).to(engine.device)
                with self.compute, torch.enable_grad():
                    logits = model(input_ids=batch[:, :-1]).logits
                    loss, _ = lm_loss(logits, batch[:, 1:], run.cfg.trainer.z_loss)
                    if self.scale is None:
                        loss = loss / gas
                    elif engine.zero_optimization():  # ZeRO: scale_if_loss after the division
                        loss = loss / gas * self.scale
                    else:  # run/engine.py scales before engine.backward divides
                        loss = loss.float() * self.scale / gas
                    torch.autograd.grad(loss, params, allow_unused=True)
        finally:
            record = self.watch.stop()
        return record

    def readings(self, step: Step) -> dict:
        """Where DeepSpeed does not skip non-finite steps, whether this rank saw one (reduced with
        MAX); on probe steps the headroom maxima and underflow shares."""
        if self.record is None:
            return {}
        self.step_max = self.record.slot_max(len(self.slots), self._device_ids(self.record.ids))
        out = {}
        if self.every_step and not self.skips:
            out["nonfinite"] = ((~torch.isfinite(self.record.mag)).any().float(), "max")
        if self.probe:
            maxima, share = self._headroom_readings(self.record, self.step_max)
            out |= {"maxima": (maxima, "max"), "share": (share, "mean")}
        return out

    def collect(self, step: Step, values: dict) -> dict:
        record, step_max, self.record, self.step_max = self.record, self.step_max, None, None
        if record is None:
            return {}
        out = {}
        if self.locate and self._overflowed(values):
            self._write_event(record)
        if self.probe:
            out = self._headroom(values["maxima"], values["share"])
        seen = step_max >= 0
        finite = seen & torch.isfinite(step_max)
        self.last_finite = torch.where(finite, step_max, self.last_finite)
        self.last_finite_step = torch.where(finite, float(self.step), self.last_finite_step)
        self.prev = torch.where(seen, step_max, -1.0)
        self.prev_step = self.step
        return out

    def _device_ids(self, ids: list[int]) -> torch.Tensor:
        """``ids`` on the device, copied there once: steps repeat the same order, and a copy from the
        host each step would wait for the device's queue on a GPU."""
        key = tuple(ids)
        if key not in self._ids_cache:
            if len(self._ids_cache) > 8:  # a changing order (e.g. varying micro batches): keep a few
                self._ids_cache.clear()
            self._ids_cache[key] = torch.tensor(ids, device=self.prev.device)
        return self._ids_cache[key]

    # -- the overflow ---------------------------------------------------------------------------

    def _overflowed(self, values: dict) -> bool:
        """The same answer on every rank. Where DeepSpeed skips non-finite steps its flag is global
        and on the host already; elsewhere (fp32 without ZeRO, bf16 with ``check_grad_overflow``
        off) the ranks' own findings, reduced with the step's readings."""
        return eng.overflowed(self.engine) if self.skips else values["nonfinite"] > 0

    def _first_nonfinite(self, record: StepRecord) -> dict | None:
        """This rank's first non-finite entry, with the same tensor's magnitude before (host sync:
        on an overflow only)."""
        bad = (~torch.isfinite(record.mag)).nonzero()
        if not len(bad):
            return None
        i = int(bad[0])
        slot_i = record.ids[i]
        value, before, last, last_step = torch.stack(
            [record.mag[i], self.prev[slot_i], self.last_finite[slot_i], self.last_finite_step[slot_i]]
        ).tolist()
        slot = self.slots[slot_i]
        fp16_view = self.grad_scale if slot.pass_ == "backward" else 1.0
        return {
            "module": slot.module,
            "pass": slot.pass_,
            "tensor": slot.tensor,
            "layer": slot.group,
            "micro_batch": record.micro[i],
            **({"shared_with": self.watch.shared[slot_i]} if slot_i in self.watch.shared else {}),
            "value": value,
            "before_step": self.prev_step if before >= 0 else None,
            "amax_before": before if before >= 0 else None,
            "headroom_before": before * fp16_view / FP16_MAX if before >= 0 else None,
            "last_finite_step": int(last_step) if last >= 0 else None,
            "last_finite_amax": last if last >= 0 else None,
        }

    def _write_event(self, record: StepRecord) -> None:
        found = self._first_nonfinite(record)
        rank, world = (dist.get_rank(), world_size()) if dist.is_initialized() else (0, 1)
        per_rank = [found]
        if world > 1:
            per_rank = [None] * world
            dist.all_gather_object(per_rank, found)
        first_rank = next((r for r, f in enumerate(per_rank) if f is not None), None)
        event = {
            "step": self.step,
            "kind": "overflow",
            "action": "none",
            "precision": self.precision,
            "skipped": eng.overflowed(self.engine),
            "loss_scale": self.scale,
            "rank": first_rank,
            **(per_rank[first_rank] if first_rank is not None else {"module": None}),
        }
        if first_rank is None:
            event["note"] = (
                "no tracked tensor was non-finite: the overflow arose where gradients were "
                "accumulated or reduced across ranks"
            )
        if self.assumed_scale is not None:
            event["assumed_loss_scale"] = self.assumed_scale
        if world > 1:
            event["ranks"] = per_rank
        indices = [self.blocks]
        if world > 1:
            indices = [None] * world
            dist.all_gather_object(indices, self.blocks)
        event["batch_indices"] = indices
        self.last_event = json_safe(event)
        if self.sink is not None and rank == 0:
            self.sink.event(self.last_event)

    # -- headroom -------------------------------------------------------------------------------

    def _headroom_readings(self, record: StepRecord, step_max: torch.Tensor):
        """Per layer: max |activation| and max |scaled gradient| (one row), and the underflow share."""
        n_groups, device = len(self.groups), step_max.device

        def group_max(kind: str) -> torch.Tensor:
            buf = torch.full((n_groups + 1,), -1.0, device=device)
            return buf.scatter_reduce(0, self.group_of[kind], step_max, "amax", include_self=True)[:-1]

        maxima = torch.cat([group_max("forward"), group_max("backward") * self.grad_scale])
        below = torch.zeros(n_groups, device=device)
        total = torch.zeros(n_groups, device=device)
        for slot, count, numel in record.under:
            g = self.groups.index(self.slots[slot].group)
            below[g] += count
            total[g] += numel
        return maxima, torch.where(total > 0, below / total.clamp(min=1), -1.0)

    def _headroom(self, maxima: list[float], shares: list[float]) -> dict:
        """The headroom metrics from the reduced readings: fractions of 65504, underflow shares."""
        n_groups = len(self.groups)
        act, grad = maxima[:n_groups], maxima[n_groups:]
        out = {"diag/headroom_loss_scale": self.scale if self.fp16 else self.assumed_scale}
        for i, g in enumerate(self.groups):
            for family, v in (("act", act[i]), ("grad", grad[i])):
                if math.isnan(v) or v >= 0:  # -1: nothing of the kind in the group; nan: past the limit
                    out[f"diag/headroom_{family}/{g}"] = v / FP16_MAX if math.isfinite(v) else math.inf
            # absent for embed (rows of tokens not in the batch are exact zeros, not underflow) and
            # where the gradients are not finite (an overflowed step's nan is not "below")
            if shares[i] >= 0 and g != "embed" and math.isfinite(grad[i]):
                out[f"diag/underflow/{g}"] = shares[i]
        return out

    # -- checkpoint -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "slots": [asdict(s) for s in self.slots],
            "prev": self.prev.tolist(),
            "prev_step": self.prev_step,
            "last_finite": self.last_finite.tolist(),
            "last_finite_step": self.last_finite_step.tolist(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("slots") != [asdict(s) for s in self.slots]:
            return  # another model: start without a step before
        device = self.prev.device
        self.prev = torch.tensor(state["prev"], device=device)
        self.prev_step = state["prev_step"]
        self.last_finite = torch.tensor(state["last_finite"], device=device)
        self.last_finite_step = torch.tensor(state["last_finite_step"], device=device)
