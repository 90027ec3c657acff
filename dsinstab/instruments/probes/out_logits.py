"""``out_logits``: max and mean of the output logits, and the mean log Z (what z-loss pulls to 0)."""

from __future__ import annotations

import torch

from dsinstab.instruments.base import Context, Probe


class OutputLogitProbe(Probe):
    name = "out_logits"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.peak: torch.Tensor | None = None
        self.mean_sum: torch.Tensor | float = 0.0
        self.log_z_sum: torch.Tensor | float = 0.0
        self.count = 0

    @torch.no_grad()
    def observe_logits(self, logits: torch.Tensor) -> None:
        if not self.active:
            return
        peak = logits.amax().float()
        self.peak = peak if self.peak is None else torch.maximum(self.peak, peak)
        self.mean_sum = self.mean_sum + logits.mean(dtype=torch.float32)
        # log Z in fp32, one sequence at a time: an fp32 copy of all logits can take gigabytes
        log_z = sum(torch.logsumexp(seq.float(), dim=-1).sum() for seq in logits.flatten(0, -3))
        self.log_z_sum = self.log_z_sum + log_z / logits[..., 0].numel()
        self.count += 1

    def probe_readings(self):
        if not self.count:
            return {}
        out = {
            "diag/out_logit_max": (self.peak, "max"),
            "diag/out_logit_mean": (self.mean_sum / self.count, "mean"),
            "diag/log_z": (self.log_z_sum / self.count, "mean"),
        }
        self.peak, self.mean_sum, self.log_z_sum, self.count = None, 0.0, 0.0, 0
        return out
