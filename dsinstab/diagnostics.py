"""Probes that explain a spike, run every ``trainer.diagnostics.every`` steps.

Each probe is a small plug-in: it attaches to the model once, records on probe steps only, and
returns ``diag/*`` metrics reduced across ranks, so every rank logs (and decides) from the same
numbers. Parameters, gradients and Adam moments are read through DeepSpeed's ``safe_get_full_*``
API, which assembles them under ZeRO 1-3 (a collective: every rank calls it, in the same order).

- ``attn_logits``: the largest pre-softmax attention logit per layer (Wortsman et al. 2023),
  through an attention function registered with ``transformers``' ``AttentionInterface``.
- ``out_logits``: max and mean of the output logits, and the mean log Z (what z-loss pulls to 0).
- ``layer_norms``: per-layer grad norm, parameter norm and update-to-parameter ratio.
- ``adam``: per layer, the RMS of Adam's bias-corrected second moment over epsilon.
- ``activations``: the RMS of each block's output.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

import deepspeed.comm as dist
import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad, safe_get_full_optimizer_state
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from dsinstab.config import DiagnosticsConfig

PROBE_ATTENTION = "dsinstab_probe"
LAYER_RE = re.compile(r"\.(?:layers|h)\.(\d+)\.")


def layer_of(name: str) -> str:
    """``layer_<i>`` for a block's parameter, ``embed`` for embeddings, head and final norm."""
    m = LAYER_RE.search(name)
    return f"layer_{m.group(1)}" if m else "embed"


def _reduce(values: dict[str, float], op) -> dict[str, float]:
    """The same numbers on every rank: an all-reduce of the dict's values in key order."""
    if not values or not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t, op=op)
    if op == dist.ReduceOp.SUM:
        t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


class AttentionLogitProbe:
    """Max of ``q·kᵀ·scaling`` per layer, causal mask applied.

    A function registered under a new name gets no attention mask from ``transformers`` (its mask
    builder only knows the built-in implementations), so the causal mask is applied here; the
    attention itself is ``transformers``' own SDPA path, which then uses ``is_causal``.
    """

    name = "attn_logits"

    def __init__(self):
        self.active = False
        self.maxima: dict[int, float] = {}

    def attach(self, model) -> None:
        AttentionInterface.register(PROBE_ATTENTION, self.attention)
        model.set_attn_implementation(PROBE_ATTENTION)

    def attention(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        if self.active:
            self.record(module.layer_idx, query, key, scaling)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    @torch.no_grad()
    def record(self, layer: int, query: torch.Tensor, key: torch.Tensor, scaling: float | None) -> None:
        q, k = query.float(), key.float()
        if k.shape[1] != q.shape[1]:  # grouped-query attention: one key head serves several queries
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        t_q, t_k = q.shape[-2], k.shape[-2]
        future = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).triu(1 + t_k - t_q)
        peak = -math.inf
        for b in range(q.shape[0]):  # one sequence at a time bounds the memory of the scores
            scores = (q[b] @ k[b].transpose(-1, -2)) * scale
            peak = max(peak, float(scores.masked_fill(future, -math.inf).amax()))
        self.maxima[layer] = max(self.maxima.get(layer, -math.inf), peak)

    def collect(self) -> dict:
        out = {f"diag/attn_logit_max/layer_{i}": v for i, v in self.maxima.items()}
        self.maxima = {}
        return _reduce(out, dist.ReduceOp.MAX)


class OutputLogitProbe:
    name = "out_logits"

    def __init__(self):
        self.active = False
        self.sums: dict[str, float] = defaultdict(float)
        self.peak = -math.inf
        self.count = 0

    @torch.no_grad()
    def observe(self, logits: torch.Tensor) -> None:
        if not self.active:
            return
        x = logits.float()
        self.peak = max(self.peak, float(x.amax()))
        self.sums["diag/out_logit_mean"] += float(x.mean())
        self.sums["diag/log_z"] += float(torch.logsumexp(x, dim=-1).mean())
        self.count += 1

    def collect(self) -> dict:
        if not self.count:
            return {}
        means = _reduce({k: v / self.count for k, v in self.sums.items()}, dist.ReduceOp.SUM)
        peak = _reduce({"diag/out_logit_max": self.peak}, dist.ReduceOp.MAX)
        self.sums, self.peak, self.count = defaultdict(float), -math.inf, 0
        return {**peak, **means}


class ActivationProbe:
    """RMS of each transformer block's output hidden states (mean over the step's micro batches)."""

    name = "activations"

    def __init__(self):
        self.active = False
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def attach(self, model) -> None:
        blocks = [m for n, m in model.named_modules() if re.fullmatch(r".*\.(layers|h)\.\d+", n)]
        for i, block in enumerate(blocks):
            block.register_forward_hook(self._hook(f"diag/act_rms/layer_{i}"))

    def _hook(self, key: str):
        def hook(module, args, output):
            if self.active:
                h = output[0] if isinstance(output, tuple) else output
                with torch.no_grad():
                    self.sums[key] += float(h.float().pow(2).mean().sqrt())
                self.counts[key] += 1

        return hook

    def collect(self) -> dict:
        out = {k: self.sums[k] / self.counts[k] for k in self.sums}
        self.sums, self.counts = defaultdict(float), defaultdict(int)
        return _reduce(out, dist.ReduceOp.SUM)


def _fp32_param(p: torch.nn.Parameter) -> torch.Tensor:
    full = safe_get_full_fp32_param(p)
    return (full if full is not None else p.data).detach().float()


class LayerNormProbe:
    """Per layer: grad norm (before clipping), fp32 parameter norm, and ||Δθ|| / ||θ|| of the step."""

    name = "layer_norms"

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], engine):
        self.params, self.engine = named_params, engine
        self.before: dict[str, torch.Tensor] = {}
        self.metrics: dict[str, float] = {}

    def before_step(self) -> None:
        # fp16 gradients are still multiplied by the loss scale before the optimizer step
        unscale = float(self.engine.optimizer.loss_scale) if self.engine.fp16_enabled() else 1.0
        grads, norms = defaultdict(float), defaultdict(float)
        for name, p in self.params:
            layer = layer_of(name)
            g = safe_get_full_grad(p)
            if g is not None:
                grads[layer] += float(g.float().pow(2).sum())
            w = _fp32_param(p)
            norms[layer] += float(w.pow(2).sum())
            self.before[name] = w.clone()
        self.metrics = {f"diag/grad_norm/{k}": math.sqrt(v) / unscale for k, v in grads.items()}
        self.metrics |= {f"diag/param_norm/{k}": math.sqrt(v) for k, v in norms.items()}

    def after_step(self) -> None:
        delta, norm = defaultdict(float), defaultdict(float)
        for name, p in self.params:
            layer, w0 = layer_of(name), self.before.pop(name)
            delta[layer] += float((_fp32_param(p) - w0).pow(2).sum())
            norm[layer] += float(w0.pow(2).sum())
        self.metrics |= {
            f"diag/update_ratio/{k}": math.sqrt(delta[k] / norm[k]) if norm[k] else 0.0 for k in delta
        }

    def collect(self) -> dict:
        out, self.metrics = self.metrics, {}
        return out


class AdamProbe:
    """Per layer: sqrt(mean v̂) / eps, the gradient RMS Adam sees against its epsilon. Near or
    below 1, epsilon dominates the update (the "Adam epsilon meets shrinking gradients" regime)."""

    name = "adam"

    def __init__(self, named_params, engine, eps: float, beta2: float):
        self.params, self.engine, self.eps, self.beta2 = named_params, engine, eps, beta2
        self.metrics: dict[str, float] = {}

    def _state(self, p) -> torch.Tensor | None:
        try:
            v = safe_get_full_optimizer_state(p, "exp_avg_sq")
        except ValueError:
            # ZeRO-1/2 link the optimizer state to the parameters lazily, after the first step of
            # the first param group only; link again, with DeepSpeed's own function, once all exist.
            opt = self.engine.optimizer
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()
            v = safe_get_full_optimizer_state(p, "exp_avg_sq")
        if v is None:  # a bare torch optimizer (ZeRO-0, fp32) keeps its state per parameter
            v = self.engine.optimizer.state.get(p, {}).get("exp_avg_sq")
        return v

    def after_step(self) -> None:
        sums, counts, steps = (
            defaultdict(float),
            defaultdict(int),
            self.engine.global_steps - self.engine.skipped_steps,
        )
        correction = 1 - self.beta2 ** max(steps, 1)
        for name, p in self.params:
            v = self._state(p)
            if v is not None:
                sums[layer_of(name)] += float(v.float().sum()) / correction
                counts[layer_of(name)] += v.numel()
        self.metrics = {
            f"diag/adam_rms_over_eps/{k}": math.sqrt(sums[k] / counts[k]) / self.eps for k in sums
        }

    def collect(self) -> dict:
        out, self.metrics = self.metrics, {}
        return out


class Diagnostics:
    """The probes of a run, switched on for probe steps only."""

    def __init__(self, cfg: DiagnosticsConfig, model, engine, eps: float, beta2: float):
        self.every = cfg.every
        names = [n.strip() for n in cfg.probes.split(",") if n.strip()] if cfg.every else []
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.attn = AttentionLogitProbe() if "attn_logits" in names else None
        self.logits = OutputLogitProbe() if "out_logits" in names else None
        self.acts = ActivationProbe() if "activations" in names else None
        self.norms = LayerNormProbe(named, engine) if "layer_norms" in names else None
        self.adam = AdamProbe(named, engine, eps, beta2) if "adam" in names else None
        for probe in (self.attn, self.acts):
            if probe is not None:
                probe.attach(model)
        self.active = False

    @property
    def probes(self) -> list:
        return [p for p in (self.attn, self.logits, self.acts, self.norms, self.adam) if p is not None]

    def _switch(self, on: bool) -> None:
        self.active = on
        for probe in (self.attn, self.logits, self.acts):
            if probe is not None:
                probe.active = on

    def begin_step(self, step: int) -> None:
        self._switch(bool(self.every) and step % self.every == 0)

    def observe_logits(self, logits: torch.Tensor) -> None:
        if self.active and self.logits is not None:
            self.logits.observe(logits)

    def before_step(self) -> None:
        if self.active and self.norms is not None:
            self.norms.before_step()

    def after_step(self) -> None:
        if not self.active:
            return
        for probe in (self.norms, self.adam):
            if probe is not None:
                probe.after_step()

    def collect(self) -> dict:
        """The step's ``diag/*`` metrics (empty off probe steps)."""
        if not self.active:
            return {}
        self._switch(False)  # nothing is recorded until the next probe step (evaluation included)
        out = {}
        for probe in self.probes:
            out |= probe.collect()
        return dict(sorted(out.items()))

    def state_dict(self) -> dict:
        return {}  # probes keep nothing between probe steps

    def load_state_dict(self, state: dict) -> None:
        pass
