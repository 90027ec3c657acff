"""Mitigations from the literature as one plug-in (dsinstab/run/plugins.py), each behind one key.

- ZClip (Kumar et al. 2025, arXiv:2504.02507), ``trainer.mitigations.zclip_z``: the grad norm is
  clipped at ``mean + z * std`` of an EMA of earlier norms. DeepSpeed clips inside
  ``engine.step()`` on every optimizer path, so the threshold is handed to it before the step
  (:func:`set_grad_clip`); the EMA follows the clipped norm, as in the paper.
- Skip-step (OLMo-core), ``trainer.mitigations.skip_step_sigma``: an update whose loss or grad
  norm lies more than sigma standard deviations above the mean of the last ``skip_step_window``
  steps is not applied. Judged inside the optimizer (:class:`dsinstab.instruments.optim.MitigatedAdamW`),
  where DeepSpeed's grad norm of the step exists before the update; the schedule keeps counting.
- Update clipping (StableAdamW), ``trainer.mitigations.update_clip``: in MitigatedAdamW.
- QK-clip (Kimi K2's MuonClip), ``trainer.mitigations.qk_clip_tau``: after the step, each head
  whose largest attention logit of the step passed tau has its query and key weights multiplied
  by sqrt(tau / max), on the fp32 master copies the optimizer updates and on the module's weights.
- Soft-capping (Gemma 2) is part of the model (``model.attn_softcap``, ``model.logit_softcap``).

Every decision comes from values that are the same on every rank (DeepSpeed's reduced grad norm,
the loss and logit maxima all-reduced here), and all values the host needs reach it in one copy
per step, in ``after_step``. Nothing here is built when every key is off.
"""

from __future__ import annotations

import math

import deepspeed.comm as dist
import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

from dsinstab.instruments.diagnostics import MasterCopies
from dsinstab.instruments.optim import MitigatedAdamW, Segments
from dsinstab.run import engine as eng
from dsinstab.run.config import MitigationsConfig, TrainerConfig
from dsinstab.run.model import model_attention, wrapping_attention
from dsinstab.run.plugins import PluginBase

ZCLIP_WARMUP = 25  # steps whose norms start the EMA (the paper's default); no clipping by ZClip before
QK_CLIP_ATTENTION = "dsinstab_qk_clip"  # + "_<the wrapped implementation>"
# metrics that are non-zero on a step where a mitigation acted
ACTED = ("mitig/zclip_clipped", "mitig/skip_step", "mitig/update_clipped_tensors", "mitig/qk_clipped_heads")


def mitigation_plugins(t: TrainerConfig, model: torch.nn.Module, engine) -> list:
    """The run's mitigation plug-in, or nothing when every ``trainer.mitigations`` key is off."""
    m = t.mitigations
    if not (m.zclip_z or m.skip_step_sigma or m.update_clip or m.qk_clip_tau):
        return []
    return [Mitigations(m, model, engine, t.grad_clip, t.log_every)]


def uses_mitigated_optimizer(m: MitigationsConfig) -> bool:
    """Whether the engine needs :class:`MitigatedAdamW` instead of torch's AdamW."""
    return bool(m.skip_step_sigma or m.update_clip)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


# ---------------------------------------------------------------------------------------------
# The grad norm and the clip value, on every DeepSpeed optimizer path


def bare_optimizer(engine) -> bool:
    """fp32 without ZeRO: the engine steps the torch optimizer itself and clips with its config."""
    return not (engine.fp16_enabled() or engine.bfloat16_enabled() or engine.zero_optimization())


def set_grad_clip(engine, value: float) -> None:
    """The global-norm clip ``engine.step()`` applies next (0: none). DeepSpeed's ZeRO 1-3 and
    fp16/bf16 optimizers read their ``clip_grad`` in ``step``; the bare path reads the config."""
    if bare_optimizer(engine):
        engine._config.gradient_clipping = value
    else:
        engine.optimizer.clip_grad = value


def client_optimizer(engine) -> torch.optim.Optimizer:
    return engine.optimizer if bare_optimizer(engine) else engine.optimizer.optimizer


def wrapper_grad_norm(engine) -> torch.Tensor | float:
    """The global grad norm of the step, unscaled and before clipping, as DeepSpeed's optimizer holds
    it while it calls the client optimizer (ZeRO 1-3 and the bf16 optimizer: a tensor). On ZeRO-0
    fp16 the wrapper measured the scaled gradients (dsinstab scales the loss there; see
    engine.correct_deepspeed_faults), so the scale is divided out as that correction does after."""
    norm = engine.optimizer._global_grad_norm
    if engine.fp16_enabled() and not engine.zero_optimization():
        norm = norm / eng.loss_scale(engine)
    return norm


# ---------------------------------------------------------------------------------------------
# ZClip


class ZClip:
    """EMA of the grad norm's mean and variance; the clip threshold for the next step."""

    def __init__(self, z: float, alpha: float, base_clip: float):
        self.z, self.alpha, self.base = z, alpha, base_clip
        self.warm: list[float] = []
        self.mean: float | None = None
        self.var = 0.0

    def threshold(self) -> float | None:
        return None if self.mean is None else self.mean + self.z * math.sqrt(self.var)

    def clip(self) -> float:
        """What ``engine.step()`` clips at: the lower of the threshold and ``trainer.grad_clip``."""
        t = self.threshold()
        if t is None:
            return self.base
        return min(t, self.base) if self.base > 0 else t

    def observe(self, norm: float) -> bool:
        """The step's norm (before clipping); returns whether ZClip clipped it."""
        if not math.isfinite(norm):  # an overflowed step was not applied: it teaches nothing
            return False
        t = self.threshold()
        if t is None:
            self.warm.append(norm)
            if len(self.warm) == ZCLIP_WARMUP:
                self.mean = sum(self.warm) / len(self.warm)
                self.var = sum((x - self.mean) ** 2 for x in self.warm) / len(self.warm)
                self.warm = []
            return False
        clipped = min(norm, t)
        self.mean = self.alpha * self.mean + (1 - self.alpha) * clipped
        self.var = self.alpha * self.var + (1 - self.alpha) * (clipped - self.mean) ** 2
        return norm > t

    def state_dict(self) -> dict:
        return {"warm": list(self.warm), "mean": self.mean, "var": self.var}

    def load_state_dict(self, s: dict) -> None:
        self.warm, self.mean, self.var = list(s["warm"]), s["mean"], s["var"]


# ---------------------------------------------------------------------------------------------
# Skip-step


class SkipStep:
    """OLMo-core's rule on device tensors: judged once the history holds max(20, window/2) values
    (at most ``window``); the history takes every judged step, skipped ones included, as there.

    Differences from OLMo-core, on purpose: only values *above* the mean count (the issue's rule;
    OLMo-core takes |z|), and non-finite values in the history are left out of its mean and std
    (OLMo-core's would turn nan and skip every later step).
    """

    def __init__(self, sigma: float, window: int, device):
        self.sigma, self.window = sigma, window
        self.min_history = min(window, max(20, window // 2))
        self.hist = torch.full((2, window), math.nan, device=device)  # rows: loss, grad norm
        self.count = 0  # values written so far
        self.skipped = 0  # steps skipped so far (host: read with the step's one copy)

    def judge(self, loss: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """1.0 to apply this step, 0.0 to skip it; the values join the history."""
        x = torch.stack([loss.float(), norm.float()])
        if self.count < self.min_history:
            factor = torch.ones((), device=x.device)
        else:
            valid = self.hist.isfinite()
            n = valid.sum(1)
            mean = torch.where(valid, self.hist, 0).sum(1) / n
            var = torch.where(valid, (self.hist - mean[:, None]) ** 2, 0).sum(1) / (n - 1)
            ok = (x - mean <= self.sigma * var.sqrt()) | (n < 2)  # a nan value is not ok: skipped
            factor = ok.all().float()
        self.hist[:, self.count % self.window] = x
        self.count += 1
        return factor

    def state_dict(self) -> dict:
        # in the order written, oldest first, so another window size could take it
        k = min(self.count, self.window)
        order = [(self.count - k + i) % self.window for i in range(k)]
        return {"history": self.hist[:, order].cpu().tolist(), "count": self.count, "skipped": self.skipped}

    def load_state_dict(self, s: dict) -> None:
        self.hist.fill_(math.nan)
        hist = torch.tensor(s["history"], dtype=torch.float32).reshape(2, -1)[:, -self.window :]
        k = hist.shape[1]
        self.count, self.skipped = s["count"], s["skipped"]
        for i in range(k):
            self.hist[:, (self.count - k + i) % self.window] = hist[:, i].to(self.hist.device)


class FlatSegments:
    """ZeRO 1/2 and the bf16 optimizer step flat fp32 partitions: each model parameter's fragment in
    them (DeepSpeed's ``_hp_mapping``) gives the runs that make up one tensor. Parameters are
    numbered in the model's order, the same on every rank, so per-parameter sums add up across
    ranks; a partition is mapped when the optimizer first steps it (ZeRO 1/2 hand the client
    optimizer one param group at a time)."""

    def __init__(self, engine):
        params = list(engine.module.parameters())
        self.n_params = len(params)
        self.numel = torch.tensor([p.numel() for p in params] + [1], dtype=torch.float32)
        self.frags: dict[int, list[tuple[torch.Tensor, int]]] = {}  # storage -> (fragment, index)
        for i, p in enumerate(params):
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is not None:  # None: no part of p lives in this rank's partitions
                frag = mapping.get_hp_fragment()
                self.frags.setdefault(frag.untyped_storage().data_ptr(), []).append((frag, i))
        self.cache: dict[int, Segments] = {}

    def __call__(self, flat: torch.Tensor) -> Segments:
        if id(flat) not in self.cache:
            self.cache[id(flat)] = self._segments(flat)
        return self.cache[id(flat)]

    def _segments(self, flat: torch.Tensor) -> Segments:
        base, size = flat.data_ptr(), flat.numel() * flat.element_size()
        found = sorted(
            ((f.data_ptr() - base) // f.element_size(), f.numel(), i)
            for f, i in self.frags.get(flat.untyped_storage().data_ptr(), [])
            if base <= f.data_ptr() < base + size
        )
        runs, at, pad = [], 0, self.n_params
        for start, n, i in found:
            if start > at:
                runs.append((start - at, pad))  # alignment padding between fragments
            runs.append((n, i))
            at = start + n
        if at < flat.numel():
            runs.append((flat.numel() - at, pad))
        dev = flat.device
        return Segments(
            lengths=torch.tensor([r[0] for r in runs], device=dev),
            index=torch.tensor([r[1] for r in runs], device=dev),
            numel=self.numel.to(dev),
            n_params=self.n_params,
            reduce=world_size() > 1,
        )


# ---------------------------------------------------------------------------------------------
# QK-clip


def _clip_recording_attention(module, query, key, value, attention_mask, *args, **kwargs):
    """Registered with ``transformers``: records the head maxima of a training forward, then runs
    the attention the model had (which may be the diagnostics probe's, or soft-capped)."""
    clip, wrapped = module.dsinstab_qk_clip
    if torch.is_grad_enabled():  # a training forward (evaluation runs without gradients)
        clip.record(module.layer_idx, query, key, kwargs.get("scaling"))
    return model_attention(module, wrapped)(module, query, key, value, attention_mask, *args, **kwargs)


class QKClip:
    """Per layer and head, the largest causal ``q·kᵀ·scaling`` of the step's training forwards, and
    the rescale of the heads over tau. Query/key weights of llama-style (``q_proj``, ``k_proj``)
    and gpt2 (``c_attn``, query columns then key columns) attention, biases included."""

    def __init__(self, tau: float, model: torch.nn.Module, engine):
        self.tau, self.engine = tau, engine
        self.zero = bool(engine.zero_optimization())
        self.masters = MasterCopies(engine)
        self.targets: dict[int, list[tuple[torch.nn.Parameter, int, list[int]]]] = {}
        self.head_dim: dict[int, int] = {}
        self.maxima: dict[int, torch.Tensor] = {}
        name, wrapped = wrapping_attention(model, QK_CLIP_ATTENTION, _clip_recording_attention)
        for module in model.modules():
            targets = self._targets_of(module)
            if targets:
                module.dsinstab_qk_clip = (self, wrapped)
                self.targets[module.layer_idx] = targets
                self.head_dim[module.layer_idx] = module.head_dim
        self.n_heads = model.config.num_attention_heads
        model.set_attn_implementation(name)

    @staticmethod
    def _targets_of(module) -> list:
        if hasattr(module, "q_proj") and hasattr(module, "k_proj"):
            if module.k_proj.weight.shape != module.q_proj.weight.shape:
                raise ValueError("QK-clip needs one key head per query head (no grouped-query attention)")
            lin = [module.q_proj, module.k_proj]
            return [(m.weight, 0, [0]) for m in lin] + [(m.bias, 0, [0]) for m in lin if m.bias is not None]
        if hasattr(module, "c_attn") and not getattr(module, "is_cross_attention", False):
            d = module.embed_dim  # Conv1D: weight (in, 3*d), columns q | k | v
            return [(module.c_attn.weight, 1, [0, d]), (module.c_attn.bias, 0, [0, d])]
        return []

    @torch.no_grad()
    def record(self, layer: int, query: torch.Tensor, key: torch.Tensor, scaling: float | None) -> None:
        q, k = query.float(), key.float()
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        t_q, t_k = q.shape[-2], k.shape[-2]
        future = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).triu(1 + t_k - t_q)
        peak = self.maxima.get(layer)
        if peak is None:
            peak = torch.full((q.shape[1],), -math.inf, device=q.device)
        for b in range(q.shape[0]):  # one sequence at a time bounds the memory of the scores
            scores = (q[b] @ k[b].transpose(-1, -2)) * scale
            peak = torch.maximum(peak, scores.masked_fill(future, -math.inf).amax(dim=(-1, -2)))
        self.maxima[layer] = peak

    def reduced(self, device) -> torch.Tensor:
        """(layers, heads) maxima of the step, the maximum over ranks; -inf where none was seen."""
        rows = [
            self.maxima.get(i, torch.full((self.n_heads,), -math.inf, device=device))
            for i in sorted(self.targets)
        ]
        self.maxima = {}
        out = torch.stack(rows).to(device)
        if world_size() > 1:
            dist.all_reduce(out, op=dist.ReduceOp.MAX)
        return out

    @torch.no_grad()
    def apply(self, maxima: list[list[float]]) -> int:
        """Rescale each head over tau (identical on every rank: the maxima are); returns how many."""
        clipped = 0
        for layer, row in zip(sorted(self.targets), maxima):
            over = {h: math.sqrt(self.tau / m) for h, m in enumerate(row) if m > self.tau}
            if not over:
                continue
            clipped += len(over)
            hd = self.head_dim[layer]
            for param, dim, starts in self.targets[layer]:
                factor = torch.ones(param.shape[dim], dtype=torch.float32, device=param.device)
                for h, s in over.items():
                    for start in starts:
                        factor[start + h * hd : start + (h + 1) * hd] = s
                shape = [1] * param.ndim
                shape[dim] = -1
                self._scale(param, factor.view(shape))
        return clipped

    def _scale(self, p: torch.nn.Parameter, factor: torch.Tensor) -> None:
        """Multiply the fp32 master copy (what the optimizer updates) and make the module's weight
        its rounding, as DeepSpeed's own copy after a step does."""
        if self.zero:  # ZeRO 1/2: each rank holds fragments of the master; every rank calls this
            full = safe_get_full_fp32_param(p) * factor
            safe_set_full_fp32_param(p, full)
            p.data.copy_(full)
            return
        master = self.masters.master(p)
        master.mul_(factor)
        if master is not p:
            p.data.copy_(master)


# ---------------------------------------------------------------------------------------------
# The plug-in


class Mitigations(PluginBase):
    """ZClip, skip-step, update clipping and QK-clip, each present only when its key is on."""

    name = "mitigations"

    def __init__(
        self, cfg: MitigationsConfig, model: torch.nn.Module, engine, base_clip: float, log_every: int = 1
    ):
        self.engine, self.model, self.run = engine, model, None
        self.log_every, self.step = log_every, 0
        self.device = engine.device
        self.zclip = ZClip(cfg.zclip_z, cfg.zclip_alpha, base_clip) if cfg.zclip_z else None
        self.skip = (
            SkipStep(cfg.skip_step_sigma, cfg.skip_step_window, self.device) if cfg.skip_step_sigma else None
        )
        self.qk = QKClip(cfg.qk_clip_tau, model, engine) if cfg.qk_clip_tau else None
        self.opt = client_optimizer(engine)
        if uses_mitigated_optimizer(cfg):
            if not isinstance(self.opt, MitigatedAdamW):
                raise TypeError("skip-step and update clipping need the engine built with MitigatedAdamW")
            if self.skip is not None:
                self.opt.gate = self._gate
            if cfg.update_clip and _flat(engine):
                self.opt.segments = FlatSegments(engine)
        self.update_clip = cfg.update_clip
        self.loss: torch.Tensor | None = None
        self.bare_norm: torch.Tensor | None = None
        self.factor: torch.Tensor | None = None
        self.metrics: dict = {}
        self.qk_total = 0

    def bind(self, run) -> None:
        self.run = run

    def begin_step(self, step: int) -> None:
        self.step = step

    # the optimizer's callbacks -------------------------------------------------------------

    def _gate(self) -> torch.Tensor:
        """Called by MitigatedAdamW inside engine.step(), once per param group: judged once."""
        if self.factor is None:
            norm = self.bare_norm if bare_optimizer(self.engine) else wrapper_grad_norm(self.engine)
            norm = torch.as_tensor(norm, dtype=torch.float32).to(self.device)
            self.factor = self.skip.judge(self.loss, norm)
        return self.factor

    # the hooks ----------------------------------------------------------------------------

    def before_step(self) -> None:
        self.factor = None
        if self.update_clip:
            self.opt.clip_stats = None
        if self.skip is not None:
            # the step's mean loss over ranks (ce + z-loss, as train/loss), on the device
            loss = self.run.step_losses.float().sum()
            if world_size() > 1:
                dist.all_reduce(loss)
                loss = loss / world_size()
            self.loss = loss
        if (self.zclip is not None or self.skip is not None) and bare_optimizer(self.engine):
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            self.bare_norm = torch.nn.utils.get_total_norm(grads)  # the engine clips them before step
        if self.zclip is not None:
            set_grad_clip(self.engine, self.zclip.clip())

    def after_step(self) -> None:
        """The step's values reach the host in one copy; ZClip and QK-clip decide from them."""
        parts: list[tuple[str, torch.Tensor]] = []
        if self.zclip is not None:
            norm = self.bare_norm if bare_optimizer(self.engine) else self.engine.get_global_grad_norm()
            parts.append(("norm", torch.as_tensor(norm, dtype=torch.float32).to(self.device).reshape(1)))
        if self.skip is not None and self.factor is not None:
            parts.append(("skip", (1 - self.factor).reshape(1)))
        if self.update_clip and self.opt.clip_stats is not None:
            top, n = self.opt.clip_stats
            parts.append(("update", torch.stack([top.float(), n.float()]).to(self.device)))
        if self.qk is not None:
            parts.append(("qk", self.qk.reduced(self.device).flatten()))
        values = torch.cat([t for _, t in parts]).tolist() if parts else []  # the step's one host sync
        got, at = {}, 0
        for key, t in parts:
            got[key], at = values[at : at + t.numel()], at + t.numel()
        self.metrics = {}
        if self.zclip is not None:
            threshold = self.zclip.threshold()
            clipped = self.zclip.observe(got["norm"][0])
            if threshold is not None:
                self.metrics |= {"mitig/zclip_threshold": threshold, "mitig/zclip_clipped": int(clipped)}
        if self.skip is not None:
            skipped = int(got.get("skip", [0])[0])
            self.skip.skipped += skipped
            self.metrics |= {"mitig/skip_step": skipped, "mitig/skipped_steps": self.skip.skipped}
        if "update" in got:
            top, n = got["update"]
            self.metrics |= {"mitig/update_rms_max": top, "mitig/update_clipped_tensors": int(n)}
        if self.qk is not None:
            flat = got["qk"]
            rows = [flat[i : i + self.qk.n_heads] for i in range(0, len(flat), self.qk.n_heads)]
            n = self.qk.apply(rows)
            self.qk_total += n
            seen = [x for x in flat if math.isfinite(x)]
            if seen:
                self.metrics["mitig/qk_logit_max"] = max(seen)
            self.metrics |= {"mitig/qk_clipped_heads": n, "mitig/qk_clipped_total": self.qk_total}
        acted = any(self.metrics.get(k) for k in ACTED)
        if not acted and self.step % self.log_every:
            self.metrics = {}  # logged on the loop's logging steps, and on every step a mitigation acts

    def collect(self) -> dict:
        out, self.metrics = self.metrics, {}
        return out

    def state_dict(self) -> dict:
        state: dict = {"qk_total": self.qk_total}
        if self.zclip is not None:
            state["zclip"] = self.zclip.state_dict()
        if self.skip is not None:
            state["skip_step"] = self.skip.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.qk_total = state.get("qk_total", 0)
        if self.zclip is not None and "zclip" in state:
            self.zclip.load_state_dict(state["zclip"])
        if self.skip is not None and "skip_step" in state:
            self.skip.load_state_dict(state["skip_step"])


def _flat(engine) -> bool:
    """The client optimizer steps flat partitions (ZeRO 1/2, the bf16 optimizer), not tensors."""
    return any(getattr(p, "_hp_mapping", None) is not None for p in engine.module.parameters())
