"""Probes that explain a spike, run every ``trainer.diagnostics.every`` steps.

Each probe is a small plug-in: it attaches to the model once, records on probe steps only, and
hands its readings to :class:`Diagnostics` as tensors on the engine's device. Once per probe step
those are reduced across ranks (one all-reduce for means, one for maxima) and read to the host in a
single copy, so every rank logs (and decides) from the same numbers.

Weights, gradients and Adam moments are those the optimizer updates: the fp32 master copies under
fp16/bf16 (see :class:`MasterCopies`), read under ZeRO 1-3 through DeepSpeed's ``safe_get_full_*``
API, which assembles them (a collective: every rank calls it, in the same order).

- ``attn_logits``: the largest pre-softmax attention logit per layer (Wortsman et al. 2023),
  recorded by a wrapper around the model's own attention function (``transformers``'
  ``AttentionInterface``), which then runs unchanged.
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

from dsinstab.run import engine as eng
from dsinstab.run.config import DiagnosticsConfig
from dsinstab.run.model import model_attention, wrapping_attention

PROBE_ATTENTION = "dsinstab_probe"  # + "_<the model's implementation>", e.g. dsinstab_probe_eager
LAYER_RE = re.compile(r"\.(?:layers|h)\.(\d+)\.")

# A reading: (0-d tensor on the engine's device, how ranks combine it): "mean" and "max" for values
# each rank measures on its own data, "same" for values that are already equal on every rank.
Readings = dict[str, tuple[torch.Tensor, str]]


def layer_of(name: str) -> str:
    """``layer_<i>`` for a block's parameter, ``embed`` for embeddings, head and final norm."""
    m = LAYER_RE.search(name)
    return f"layer_{m.group(1)}" if m else "embed"


def reduce_readings(readings: Readings) -> dict[str, float]:
    """The same numbers on every rank: means and maxima over ranks, each kind in one all-reduce of
    one tensor on the readings' device, then one host copy for all of them."""
    if not readings:
        return {}
    keys = sorted(readings)
    device = readings[keys[0]][0].device
    parts = []
    for how in ("mean", "max", "same"):
        names = [k for k in keys if readings[k][1] == how]
        if not names:
            continue
        t = torch.stack([readings[k][0].to(device, torch.float64) for k in names])
        if how != "same" and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM if how == "mean" else dist.ReduceOp.MAX)
            if how == "mean":
                t /= dist.get_world_size()
        parts.append((names, t))
    values = torch.cat([t for _, t in parts]).tolist()  # the probe step's one host sync
    return dict(zip([k for names, _ in parts for k in names], values))


# ---------------------------------------------------------------------------------------------
# Probes of the forward pass


def _probed_attention(module, query, key, value, attention_mask, *args, **kwargs):
    """Registered with ``transformers``; records for the module's probe, then runs the model's own
    attention function with exactly the arguments and mask it would have had."""
    probe, implementation = module.dsinstab_attention
    if probe.active:
        probe.record(module.layer_idx, query, key, kwargs.get("scaling"))
    attention = model_attention(module, implementation)
    return attention(module, query, key, value, attention_mask, *args, **kwargs)


class AttentionLogitProbe:
    """Max of ``q·kᵀ·scaling`` per layer, causal mask applied.

    The model is switched to ``dsinstab_probe_<its implementation>``, registered with both the
    attention and the mask interface of ``transformers``: the mask builder gives it the mask of the
    implementation it wraps (``transformers`` builds masks by implementation name), and the wrapper
    calls that implementation, so numerics do not change. Each attention module carries its probe,
    so several models in one process keep their own.
    """

    name = "attn_logits"

    def __init__(self):
        self.active = False
        self.maxima: dict[int, torch.Tensor] = {}

    def attach(self, model) -> None:
        name, wrapped = wrapping_attention(model, PROBE_ATTENTION, _probed_attention)
        for module in model.modules():
            if hasattr(module, "layer_idx"):  # the attention modules (and some blocks: harmless)
                module.dsinstab_attention = (self, wrapped)
        model.set_attn_implementation(name)

    @torch.no_grad()
    def record(self, layer: int, query: torch.Tensor, key: torch.Tensor, scaling: float | None) -> None:
        q, k = query.float(), key.float()
        if k.shape[1] != q.shape[1]:  # grouped-query attention: one key head serves several queries
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        t_q, t_k = q.shape[-2], k.shape[-2]
        future = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).triu(1 + t_k - t_q)
        peak = self.maxima.get(layer)
        if peak is None:
            peak = torch.full((), -math.inf, device=q.device)
        for b in range(q.shape[0]):  # one sequence at a time bounds the memory of the scores
            scores = (q[b] @ k[b].transpose(-1, -2)) * scale
            peak = torch.maximum(peak, scores.masked_fill(future, -math.inf).amax())
        self.maxima[layer] = peak

    def readings(self) -> Readings:
        out = {f"diag/attn_logit_max/layer_{i}": (v, "max") for i, v in self.maxima.items()}
        self.maxima = {}
        return out


class OutputLogitProbe:
    name = "out_logits"

    def __init__(self):
        self.active = False
        self.peak: torch.Tensor | None = None
        self.mean_sum: torch.Tensor | float = 0.0
        self.log_z_sum: torch.Tensor | float = 0.0
        self.count = 0

    @torch.no_grad()
    def observe(self, logits: torch.Tensor) -> None:
        if not self.active:
            return
        peak = logits.amax().float()
        self.peak = peak if self.peak is None else torch.maximum(self.peak, peak)
        self.mean_sum = self.mean_sum + logits.mean(dtype=torch.float32)
        # log Z in fp32, one sequence at a time: an fp32 copy of all logits can take gigabytes
        log_z = sum(torch.logsumexp(seq.float(), dim=-1).sum() for seq in logits.flatten(0, -3))
        self.log_z_sum = self.log_z_sum + log_z / logits[..., 0].numel()
        self.count += 1

    def readings(self) -> Readings:
        if not self.count:
            return {}
        out = {
            "diag/out_logit_max": (self.peak, "max"),
            "diag/out_logit_mean": (self.mean_sum / self.count, "mean"),
            "diag/log_z": (self.log_z_sum / self.count, "mean"),
        }
        self.peak, self.mean_sum, self.log_z_sum, self.count = None, 0.0, 0.0, 0
        return out


class ActivationProbe:
    """RMS of each transformer block's output hidden states (mean over the step's micro batches)."""

    name = "activations"

    def __init__(self):
        self.active = False
        self.sums: dict[str, torch.Tensor] = {}
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
                    rms = h.float().pow(2).mean().sqrt()
                self.sums[key] = self.sums[key] + rms if key in self.sums else rms
                self.counts[key] += 1

        return hook

    def readings(self) -> Readings:
        out = {k: (self.sums[k] / self.counts[k], "mean") for k in self.sums}
        self.sums, self.counts = {}, defaultdict(int)
        return out


# ---------------------------------------------------------------------------------------------
# Probes of the optimizer step


class MasterCopies:
    """The weights, Adam state and gradient of each parameter, as the optimizer updates them.

    ZeRO 1-3 link each model parameter to its fp32 partition, and DeepSpeed's ``safe_get_full_*``
    assemble them. Without ZeRO, DeepSpeed's fp16 and bf16 optimizer (``FP16_UnfusedOptimizer``)
    lets torch's AdamW step fp32 clones of the parameters (its ``fp32_groups``, in the order of its
    ``fp16_groups``), which DeepSpeed's API does not cover: :meth:`master` maps a parameter to its
    clone. In fp32 without ZeRO, the torch optimizer updates the parameter itself.
    """

    def __init__(self, engine):
        self.engine = engine
        opt = engine.optimizer
        self.zero = bool(engine.zero_optimization())
        self.clones: dict[int, torch.Tensor] = {}
        if not self.zero and hasattr(opt, "fp32_groups"):
            for lp_group, hp_group in zip(opt.fp16_groups, opt.fp32_groups):
                self.clones |= {id(lp): hp for lp, hp in zip(lp_group, hp_group)}

    def master(self, p: torch.nn.Parameter) -> torch.Tensor:
        """The tensor torch's optimizer steps for ``p`` (without ZeRO; ZeRO partitions it)."""
        return self.clones.get(id(p), p)

    def weights(self, p: torch.nn.Parameter, keep: bool = False) -> torch.Tensor:
        """The fp32 weights; ``keep``: a copy that the optimizer step will not change."""
        if self.zero:
            return safe_get_full_fp32_param(p)  # assembled into a new buffer
        w = self.master(p).detach().float()
        return w.clone() if keep else w

    def grad(self, p: torch.nn.Parameter) -> torch.Tensor | None:
        """Before the step: the gradient the optimizer will read, still times the fp16 loss scale."""
        return safe_get_full_grad(p)

    def state(self, p: torch.nn.Parameter, key: str) -> torch.Tensor | None:
        if not self.zero:
            return self.engine.optimizer.state.get(self.master(p), {}).get(key)
        try:
            return safe_get_full_optimizer_state(p, key)
        except ValueError:
            # ZeRO-1/2 link the optimizer state to the parameters lazily, after the first step of
            # the first param group only; link again, with DeepSpeed's own function, once all exist.
            opt = self.engine.optimizer
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()
            return safe_get_full_optimizer_state(p, key)

    def adam_steps(self) -> int:
        """Adam's step counter (applied steps), read from the torch optimizer's own state."""
        opt = self.engine.optimizer
        inner = getattr(opt, "optimizer", opt)
        # every tensor torch steps together has the same count; read one (a CPU scalar unless the
        # optimizer is capturable or fused)
        step = next((s["step"] for s in inner.state.values() if "step" in s), 0)
        return int(step)


def _sq(x: torch.Tensor) -> torch.Tensor:
    return x.float().pow(2).sum(dtype=torch.float64)


class LayerNormProbe:
    """Per layer: grad norm (before clipping), fp32 parameter norm, and ||Δθ|| / ||θ|| of the step."""

    name = "layer_norms"

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], engine, masters: MasterCopies):
        self.params, self.engine, self.masters = named_params, engine, masters
        self.before: dict[str, torch.Tensor] = {}
        self.out: Readings = {}

    def before_step(self) -> None:
        grads, norms = {}, {}
        for name, p in self.params:
            layer = layer_of(name)
            g = self.masters.grad(p)
            if g is not None:
                grads[layer] = grads.get(layer, 0.0) + _sq(g)
            w = self.masters.weights(p, keep=True)
            norms[layer] = norms.get(layer, 0.0) + _sq(w)
            self.before[name] = w
        # fp16 gradients still carry the loss scale before the optimizer step
        unscale = eng.loss_scale(self.engine) or 1.0
        self.out = {f"diag/grad_norm/{k}": (v.sqrt() / unscale, "same") for k, v in grads.items()}
        self.out |= {f"diag/param_norm/{k}": (v.sqrt(), "same") for k, v in norms.items()}

    def after_step(self) -> None:
        delta, norm = {}, {}
        for name, p in self.params:
            layer, w0 = layer_of(name), self.before.pop(name)
            delta[layer] = delta.get(layer, 0.0) + _sq(self.masters.weights(p) - w0)
            norm[layer] = norm.get(layer, 0.0) + _sq(w0)
        for k in delta:
            ratio = torch.where(norm[k] > 0, delta[k] / norm[k], 0.0).sqrt()  # 0: a layer of zeros
            self.out[f"diag/update_ratio/{k}"] = (ratio, "same")

    def readings(self) -> Readings:
        out, self.out = self.out, {}
        return out


class AdamProbe:
    """Per layer: sqrt(mean v̂) / eps, the gradient RMS Adam sees against its epsilon. Near or
    below 1, epsilon dominates the update (the "Adam epsilon meets shrinking gradients" regime)."""

    name = "adam"

    def __init__(self, named_params, engine, eps: float, beta2: float, masters: MasterCopies):
        self.params, self.engine, self.eps, self.beta2 = named_params, engine, eps, beta2
        self.masters = masters
        self.out: Readings = {}

    def after_step(self) -> None:
        sums, counts = {}, defaultdict(int)
        correction = 1 - self.beta2 ** max(self.masters.adam_steps(), 1)
        for name, p in self.params:
            v = self.masters.state(p, "exp_avg_sq")
            if v is not None:
                layer = layer_of(name)
                sums[layer] = sums.get(layer, 0.0) + v.sum(dtype=torch.float64)
                counts[layer] += v.numel()
        self.out = {
            f"diag/adam_rms_over_eps/{k}": ((s / counts[k] / correction).sqrt() / self.eps, "same")
            for k, s in sums.items()
        }

    def readings(self) -> Readings:
        out, self.out = self.out, {}
        return out


# ---------------------------------------------------------------------------------------------


class Diagnostics:
    """The probes of a run, switched on for probe steps only: a plug-in (dsinstab/run/plugins.py)."""

    name = "diagnostics"

    def __init__(self, cfg: DiagnosticsConfig, model, engine, eps: float, beta2: float):
        self.every = cfg.every
        names = [n.strip() for n in cfg.probes.split(",") if n.strip()] if cfg.every else []
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        masters = MasterCopies(engine) if {"layer_norms", "adam"} & set(names) else None
        self.attn = AttentionLogitProbe() if "attn_logits" in names else None
        self.logits = OutputLogitProbe() if "out_logits" in names else None
        self.acts = ActivationProbe() if "activations" in names else None
        self.norms = LayerNormProbe(named, engine, masters) if "layer_norms" in names else None
        self.adam = AdamProbe(named, engine, eps, beta2, masters) if "adam" in names else None
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
        """The step's ``diag/*`` metrics (empty off probe steps); one host sync for all of them."""
        if not self.active:
            return {}
        self._switch(False)  # nothing is recorded until the next probe step (evaluation included)
        readings: Readings = {}
        for probe in self.probes:
            readings |= probe.readings()
        return dict(sorted(reduce_readings(readings).items()))

    def state_dict(self) -> dict:
        return {}  # probes keep nothing between probe steps

    def load_state_dict(self, state: dict) -> None:
        pass
