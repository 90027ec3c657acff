"""``activations``: the RMS of each transformer block's output hidden states."""

from __future__ import annotations

import re
from collections import defaultdict

import torch

from dsinstab.instruments.base import Context, Probe


class ActivationProbe(Probe):
    """``diag/act_rms/layer_<i>``: the mean over the step's micro batches of each block's output RMS."""

    name = "activations"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = defaultdict(int)
        blocks = [m for n, m in ctx.model.named_modules() if re.fullmatch(r".*\.(layers|h)\.\d+", n)]
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

    def probe_readings(self):
        out = {k: (self.sums[k] / self.counts[k], "mean") for k in self.sums}
        self.sums, self.counts = {}, defaultdict(int)
        return out
