"""``adam``: per layer, sqrt(mean v̂) / eps, the gradient RMS Adam sees against its epsilon. Near or
below 1, epsilon dominates the update (the "Adam epsilon meets shrinking gradients" regime)."""

from __future__ import annotations

from collections import defaultdict

import torch

from dsinstab.instruments.base import Context, Probe
from dsinstab.instruments.layers import layer_of


class AdamProbe(Probe):
    name = "adam"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        t = ctx.cfg.trainer
        self.params = [(n, p) for n, p in ctx.model.named_parameters() if p.requires_grad]
        self.eps, self.beta2, self.masters = t.adam_eps, t.adam_beta2, ctx.masters
        self.out: dict = {}

    def after_step(self, step) -> None:
        if not self.active:
            return
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

    def probe_readings(self):
        out, self.out = self.out, {}
        return out
