"""ZClip (Kumar et al. 2025, arXiv:2504.02507), ``trainer.mitigations.zclip_z``: the grad norm is
clipped at a threshold from an EMA of earlier norms' mean and variance.

DeepSpeed clips inside ``engine.step()`` on every optimizer path, so the threshold is handed to it
before the step (``set_grad_clip``); the EMA follows the clipped norm, as in the paper.
"""

from __future__ import annotations

import math

from dsinstab.instruments.base import Context, Instrument
from dsinstab.run import engine as eng
from dsinstab.run.plugins import Step

ZCLIP_WARMUP = 25  # steps whose norms start the EMA (the paper's default); no clipping by ZClip before


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


class ZClipPlugin(Instrument):
    name = "zclip"
    key = "trainer.mitigations.zclip_z"

    def __init__(self, ctx: Context):
        m, t = ctx.cfg.trainer.mitigations, ctx.cfg.trainer
        self.engine, self.log_every = ctx.engine, t.log_every
        self.zclip = ZClip(m.zclip_z, m.zclip_alpha, t.grad_clip)

    def before_step(self, step: Step) -> None:
        eng.set_grad_clip(self.engine, self.zclip.clip())

    def readings(self, step: Step) -> dict:
        return {"norm": (step.grad_norm, "same")}

    def collect(self, step: Step, values: dict) -> dict:
        threshold = self.zclip.threshold()
        clipped = self.zclip.observe(float(values["norm"]))
        if threshold is None or (not clipped and step.number % self.log_every):
            return {}  # logged on the loop's logging steps, and on every step it clips
        return {"mitig/zclip_threshold": threshold, "mitig/zclip_clipped": int(clipped)}

    def state_dict(self) -> dict:
        return self.zclip.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.zclip.load_state_dict(state)
