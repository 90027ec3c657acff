"""torch's AdamW with three mitigations inside its update: skip-step, update clipping and
update-norm clipping.

DeepSpeed's ZeRO and fp16/bf16 wrappers compute the global grad norm, unscale and clip, then call
the client optimizer's ``step()`` on the fp32 master copies (whole tensors without ZeRO, flat
partitions of a param group with ZeRO 1/2, once per group). The only place that sees the step's
grad norm *before* the update is applied is therefore that ``step()``: :class:`MitigatedAdamW`
asks a gate for a factor there (1: apply, 0: skip, a tensor on the device, so no host sync) and
multiplies every change by it, as OLMo-core's skip-step optimizers do.

Update clipping (StableAdamW, Wortsman et al. 2023, arXiv:2304.13013) scales each tensor's step by
``1 / max(1, RMS_t)``, ``RMS_t = sqrt(mean(g_t^2 / max(v̂_t, eps^2)))``, with ``v̂_t`` the
bias-corrected second moment that already includes ``g_t``; the decoupled weight decay is scaled
with it (the paper's ``eta_t``). A "tensor" is a model parameter: on ZeRO's flat partitions the
sums run per parameter fragment and are added up across ranks (:class:`Segments`).

Update-norm clipping (Levanter's ``clip_update_norm``) needs the norm of the whole update before
any of it is applied: with :attr:`MitigatedAdamW.update_norm_scale` set, each tensor's change
(weight decay included) is computed and kept, and once the last ``step()`` call of the engine step
is in (:attr:`~MitigatedAdamW.update_calls`: ZeRO 1/2 make one per param group) their global norm
(summed across ranks where ZeRO partitions them) gives one scale for all, and the changes are
applied.

Off the CPU the update runs on lists of tensors with ``torch._foreach_*`` (one call per op for all
of a group's tensors: one kernel launch on CUDA, not one per tensor), each op the one the
per-tensor path applies to each tensor; on a CPU the two are bit for bit equal (tests/test_optim.py)
and the per-tensor loop, the faster there, is the default.

Only built when a run asks for one of them (``build_engine``): otherwise the engine gets torch's
AdamW.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import deepspeed.comm as dist
import torch
from deepspeed.runtime.zero import utils as zero_utils

from dsinstab.run.engine import client_optimizer


@dataclass
class Segments:
    """How a flat fp32 partition splits into parameters: ``lengths`` of consecutive runs (padding
    included), ``index`` of each run's parameter (``n_params`` for padding), ``numel`` of each
    parameter (+1 slot for padding) — the per-tensor RMS adds up each parameter's runs."""

    lengths: torch.Tensor
    index: torch.Tensor
    numel: torch.Tensor
    n_params: int
    reduce: bool  # a parameter's fragments live on several ranks: all-reduce the sums


class MitigatedAdamW(torch.optim.AdamW):
    """AdamW (torch's arithmetic and state keys: ``step``, ``exp_avg``, ``exp_avg_sq``) whose update
    a gate can skip and whose per-tensor step can be bounded.

    ``gate``: called once per ``step()`` call, returns a 0-d float tensor, 1.0 to apply and 0.0 to
    skip; a skipped step leaves weights, moments and Adam's step count exactly as they were.
    ``segments``: maps a flat partition to its :class:`Segments` (ZeRO), ``None`` for whole tensors.
    After each ``step()``, :attr:`clip_stats` holds (largest per-tensor RMS, tensors scaled down).
    ``update_norm_scale``: maps the global norm of the engine step's whole update (a 0-d device
    tensor) to the factor every change is multiplied by; ``update_calls`` ``step()`` calls make one
    engine step, ``update_reduce`` sums the squares across ranks (partitions), and
    ``on_update_applied`` gets the tensors changed (a ZeRO wrapper copies them to its 16-bit
    partitions: those of earlier calls were copied before their change was applied).
    ``foreach``: the multi-tensor path (True), the per-tensor one (False), or (None) the first off
    the CPU and the second on it.
    """

    def __init__(
        self,
        params,
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        update_clip: bool = False,
        foreach: bool | None = None,
    ):
        super().__init__(params, lr=lr, betas=betas, eps=eps, foreach=foreach)
        self.update_clip = update_clip
        # the instance's choice, not the groups' (a loaded state dict brings its own); None: foreach
        # off the CPU, as torch decides for its AdamW (on a CPU the foreach ops are loops over the
        # same kernels, each sweeping every tensor: 1.05-1.3x the loop's time there on the default
        # model, measured; the whole step the same)
        self.foreach = foreach
        self.gate: Callable[[], torch.Tensor] | None = None
        self.segments: Callable[[torch.Tensor], Segments | None] | None = None
        self.clip_stats: tuple[torch.Tensor, torch.Tensor] | None = None
        self.update_norm_scale: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.update_calls, self.update_reduce = 1, False
        self.on_update_applied: Callable[[list[torch.Tensor]], None] | None = None
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (tensor, its change) not yet applied
        self.pending_calls = 0
        self.pending_sq: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise NotImplementedError("MitigatedAdamW takes no closure")
        factor = self.gate() if self.gate is not None else None
        keep = self.update_norm_scale is not None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                self._init_state(p)
            if self._multi_tensor(params[0].device):
                changes = self._update_foreach(params, group, factor, keep)
                norms = torch._foreach_norm(changes) if keep else []
            else:
                changes = [self._update(p, group, factor, keep) for p in params]
                norms = [torch.linalg.vector_norm(c) for c in changes] if keep else []
            if keep:
                sq = torch.stack(norms).square().sum()
                self.pending_sq = sq if self.pending_sq is None else self.pending_sq + sq
                self.pending.extend(zip(params, changes))
        if keep:
            self.pending_calls += 1
            if self.pending_calls == self.update_calls:
                self._apply_pending()
        return None

    def _multi_tensor(self, device: torch.device) -> bool:
        return self.foreach if self.foreach is not None else device.type != "cpu"

    def begin_update(self) -> None:
        """Before an engine step (the update-norm plug-in calls it): nothing may be left pending."""
        if self.pending:
            raise RuntimeError(
                f"MitigatedAdamW: {self.pending_calls} of {self.update_calls} step() calls of the last "
                "engine step came: its update was never applied"
            )
        self.pending_calls, self.pending_sq = 0, None

    def _apply_pending(self) -> None:
        total = self.pending_sq
        if total is None:  # no tensor had a gradient: nothing to apply
            self.pending_calls = 0
            return
        if self.update_reduce:
            dist.all_reduce(total)
        scale = self.update_norm_scale(total.sqrt())
        if self._multi_tensor(total.device):
            params, changes = [p for p, _ in self.pending], [c for _, c in self.pending]
            torch._foreach_mul_(changes, scale.to(changes[0].dtype))
            torch._foreach_add_(params, changes)
        else:
            for p, change in self.pending:
                p.add_(change * scale.to(change.dtype))
        if self.on_update_applied is not None:
            self.on_update_applied([p for p, _ in self.pending])
        self.pending, self.pending_calls, self.pending_sq = [], 0, None

    def _init_state(self, p: torch.Tensor) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if state["step"].device != p.device:  # torch's load_state_dict keeps a loaded step on the CPU
            state["step"] = state["step"].to(p.device)

    def _update(self, p: torch.Tensor, group: dict, factor: torch.Tensor | None, keep: bool = False):
        """Adam's step of ``p`` (the per-tensor reference): applied, or with ``keep`` returned as the
        change it would make."""
        g, state = p.grad, self.state[p]
        step, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
        (b1, b2), lr, wd, eps = group["betas"], group["lr"], group["weight_decay"], group["eps"]
        if factor is None:
            step += 1
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            rate = torch.full((), lr, device=p.device)
        else:  # every change times the factor: with 0, each tensor stays bit for bit
            step += factor
            m.lerp_(g, factor * (1 - b1))
            v.mul_(1 - factor * (1 - b2)).addcmul_(g, g * (factor * (1 - b2)))
            rate = factor * lr
        t = step.clamp(min=1)  # a skipped first step leaves step 0: keep the corrections finite
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        denom = (v.sqrt() / bc2.sqrt()).add_(eps)
        if self.update_clip:
            rate = rate * self._clip_scale(p, self._ratio(g, v, bc2, eps))
        if keep:
            return -(rate * wd) * p - m / bc1 / denom * rate
        p.mul_(1 - rate * wd)
        p.sub_(m / bc1 / denom * rate)
        return None

    def _update_foreach(self, params: list, group: dict, factor: torch.Tensor | None, keep: bool) -> list:
        """:meth:`_update` of all ``params`` at once: each of its ops, in its order, as one
        ``torch._foreach_*`` call; the changes with ``keep`` (else ``[]``)."""
        states = [self.state[p] for p in params]
        grads = [p.grad for p in params]
        steps, ms, vs = ([s[k] for s in states] for k in ("step", "exp_avg", "exp_avg_sq"))
        (b1, b2), lr, wd, eps = group["betas"], group["lr"], group["weight_decay"], group["eps"]
        if factor is None:
            torch._foreach_add_(steps, 1)
            torch._foreach_lerp_(ms, grads, 1 - b1)
            torch._foreach_mul_(vs, b2)
            torch._foreach_addcmul_(vs, grads, grads, value=1 - b2)
            rate = torch.full((), lr, device=params[0].device)
        else:
            torch._foreach_add_(steps, factor)
            torch._foreach_lerp_(ms, grads, [factor * (1 - b1)] * len(params))
            torch._foreach_mul_(vs, 1 - factor * (1 - b2))
            torch._foreach_addcmul_(vs, grads, torch._foreach_mul(grads, factor * (1 - b2)))
            rate = factor * lr
        t = torch._foreach_clamp_min(steps, 1)
        bc1, bc2 = (_one_minus(torch._foreach_pow(b, t)) for b in (b1, b2))
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, torch._foreach_sqrt(bc2))
        torch._foreach_add_(denom, eps)
        if self.update_clip:  # rate: one per tensor (a 0-d tensor, or per element on ZeRO)
            rate = torch._foreach_mul(self._clip_scales(params, grads, vs, bc2, eps), rate)
        change = torch._foreach_div(ms, bc1)
        torch._foreach_div_(change, denom)
        torch._foreach_mul_(change, rate)
        one = isinstance(rate, torch.Tensor)  # one rate for all, or one per tensor (a list)
        decay = rate * wd if one else torch._foreach_mul(rate, wd)
        if keep:
            weight = torch._foreach_mul(params, -decay if one else torch._foreach_neg(decay))
            torch._foreach_sub_(weight, change)
            return weight
        torch._foreach_mul_(params, 1 - decay if one else _one_minus(decay))
        torch._foreach_sub_(params, change)
        return []

    @staticmethod
    def _ratio(g: torch.Tensor, v: torch.Tensor, bc2: torch.Tensor, eps: float) -> torch.Tensor:
        """``g^2 / max(v̂, eps^2)``, elementwise."""
        return g.float().square() / (v / bc2).clamp(min=eps * eps)

    def _clip_scales(self, params: list, grads: list, vs: list, bc2: list, eps: float) -> list:
        """:meth:`_clip_scale` of each of ``params`` (:meth:`_ratio` as foreach calls), the RMS of
        whole tensors in one call."""
        grads = [g.float() for g in grads]
        ratio = torch._foreach_pow(grads, 2)
        vhat = torch._foreach_div(vs, bc2)
        torch._foreach_clamp_min_(vhat, eps * eps)
        torch._foreach_div_(ratio, vhat)
        segs = [self.segments(p) if self.segments is not None else None for p in params]
        whole = [i for i, seg in enumerate(segs) if seg is None]
        scales = [None] * len(params)
        if whole:
            sums = torch._foreach_norm([ratio[i] for i in whole], 1)  # the sums of ratio >= 0
            rms = torch._foreach_sqrt(torch._foreach_div(sums, [float(ratio[i].numel()) for i in whole]))
            self._count(torch.stack(rms))
            for i, r in zip(whole, rms):
                scales[i] = 1 / r.clamp(min=1)
        for i, seg in enumerate(segs):
            if seg is not None:
                scales[i] = self._segment_scale(params[i], ratio[i], seg)
        return scales

    def _clip_scale(self, p: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
        """1 / max(1, RMS(ratio)) of each tensor (``ratio``: :meth:`_ratio`): a scalar for a whole
        tensor, one value per element of a flat ZeRO partition."""
        seg = self.segments(p) if self.segments is not None else None
        if seg is not None:
            return self._segment_scale(p, ratio, seg)
        rms = (torch.linalg.vector_norm(ratio, 1) / ratio.numel()).sqrt()  # the mean of ratio >= 0
        self._count(rms.unsqueeze(0))
        return 1 / rms.clamp(min=1)

    def _segment_scale(self, p: torch.Tensor, ratio: torch.Tensor, seg: Segments) -> torch.Tensor:
        sums = torch.segment_reduce(ratio.flatten(), "sum", lengths=seg.lengths)
        totals = torch.zeros(seg.n_params + 1, dtype=sums.dtype, device=p.device).index_add_(
            0, seg.index, sums
        )
        if seg.reduce:
            dist.all_reduce(totals)
        rms = (totals / seg.numel).sqrt()
        self._count(rms[: seg.n_params][seg.numel[: seg.n_params] > 0])
        scale = (1 / rms.clamp(min=1))[seg.index]
        return scale.repeat_interleave(seg.lengths, output_size=p.numel()).view_as(p)

    def _count(self, rms: torch.Tensor) -> None:
        top, n = rms.max(), (rms > 1).sum()
        if self.clip_stats is None:
            self.clip_stats = (top, n)
        else:
            self.clip_stats = (torch.maximum(self.clip_stats[0], top), self.clip_stats[1] + n)


def _one_minus(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """``1 - x`` of each (in place): ``-x + 1`` is the same IEEE number."""
    torch._foreach_neg_(xs)
    torch._foreach_add_(xs, 1)
    return xs


# ZeRO refuses a client optimizer whose exact type it has not tested (`type(opt) in ...`); this is
# torch's AdamW with the same state, so it is registered as DeepSpeed registers its own Muon.
if MitigatedAdamW not in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
    zero_utils.ZERO_SUPPORTED_OPTIMIZERS.append(MitigatedAdamW)


def mitigated_optimizer(engine, what: str) -> MitigatedAdamW:
    """The engine's :class:`MitigatedAdamW`, for a mitigation that acts inside the update; a
    TypeError naming ``what`` when the engine was built with another optimizer."""
    opt = client_optimizer(engine)
    if not isinstance(opt, MitigatedAdamW):
        raise TypeError(f"{what} needs the engine built with MitigatedAdamW (registry.optimizer_for)")
    return opt
