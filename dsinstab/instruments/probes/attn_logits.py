"""``attn_logits``: the largest pre-softmax attention logit per layer (Wortsman et al. 2023), the
quantity whose growth precedes attention-logit divergence."""

from __future__ import annotations

from dsinstab.instruments.attention import LogitMaxima, record_into
from dsinstab.instruments.base import Context, Probe


class AttentionLogitProbe(Probe):
    """``diag/attn_logit_max/layer_<i>``: max of ``q·kᵀ·scaling`` over heads and causal positions,
    recorded inside the model's own attention function (see :mod:`dsinstab.instruments.attention`)."""

    name = "attn_logits"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.recorder = LogitMaxima()
        self.recorder.active = False
        record_into(ctx.model, self.recorder)

    def begin_step(self, step) -> None:
        super().begin_step(step)
        self.recorder.active = self.active

    def probe_readings(self):
        self.recorder.active = False
        return {f"diag/attn_logit_max/layer_{i}": (v.amax(), "max") for i, v in self.recorder.take().items()}
