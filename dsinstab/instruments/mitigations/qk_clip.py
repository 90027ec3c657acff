"""QK-clip (Kimi K2's MuonClip), ``trainer.mitigations.qk_clip_tau``: after the step, each head
whose largest attention logit of the step passed tau has its query and key weights multiplied by
sqrt(tau / max), on the fp32 master copies the optimizer updates and on the module's weights."""

from __future__ import annotations

import math

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

from dsinstab.instruments.attention import LogitMaxima, record_into
from dsinstab.instruments.base import Context, Instrument, Refusal
from dsinstab.instruments.masters import MasterCopies
from dsinstab.instruments.mitigations.update_clip import ZERO3_REFUSAL
from dsinstab.run.ds_config import zero_stage
from dsinstab.run.plugins import Step


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
        for module in model.modules():
            targets = self._targets_of(module)
            if targets:
                self.targets[module.layer_idx] = targets
                self.head_dim[module.layer_idx] = module.head_dim
        self.n_heads = model.config.num_attention_heads
        self.recorder = LogitMaxima(only_training=True)  # evaluation runs without gradients
        record_into(model, self.recorder)

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

    def maxima(self) -> torch.Tensor:
        """(layers, heads) maxima of the training forwards since the last call, this rank's; -inf
        where none was seen."""
        got = self.recorder.take()
        device = self.engine.device
        rows = [got.get(i, torch.full((self.n_heads,), -math.inf)).to(device) for i in sorted(self.targets)]
        return torch.stack(rows)

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


class QKClipPlugin(Instrument):
    name = "qk_clip"
    key = "trainer.mitigations.qk_clip_tau"

    def __init__(self, ctx: Context):
        self.log_every = ctx.cfg.trainer.log_every
        self.qk = QKClip(ctx.cfg.trainer.mitigations.qk_clip_tau, ctx.model, ctx.engine)
        self.total = 0

    @classmethod
    def refusal(cls, cfg) -> Refusal | None:
        if cfg.model.arch == "qwen3":
            return Refusal(
                "needs model.arch llama or gpt2 (qwen3's qk-norm normalises each head's queries and "
                "keys, so scaling their weights cannot move its logits)."
            )
        if zero_stage(cfg.ds_config) == 3:
            return ZERO3_REFUSAL
        return None

    def readings(self, step: Step) -> dict:
        return {"qk": (self.qk.maxima().flatten(), "max")}  # the maximum over ranks

    def collect(self, step: Step, values: dict) -> dict:
        flat, heads = values["qk"], self.qk.n_heads
        n = self.qk.apply([flat[i : i + heads] for i in range(0, len(flat), heads)])
        self.total += n
        seen = [x for x in flat if math.isfinite(x)]
        if not n and step.number % self.log_every:
            return {}
        out = {"mitig/qk_clipped_heads": n, "mitig/qk_clipped_total": self.total}
        return out | ({"mitig/qk_logit_max": max(seen)} if seen else {})

    def state_dict(self) -> dict:
        return {"total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.total = state.get("total", 0)
