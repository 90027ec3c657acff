"""ZClip (Kumar et al. 2025, arXiv:2504.02507), ``trainer.mitigations.zclip_z``: a grad norm whose
z-score against an EMA of earlier norms' mean and variance passes ``z_thr`` is clipped.

``trainer.mitigations.zclip_mode``:

- ``adaptive`` (the default, the official code's ``mode="zscore"``, ``clip_option="adaptive_scaling"``):
  with ``z = (g - mu) / sigma > z_thr`` the norm is clipped to ``mu + (z_thr^2 / z) * sigma``, the
  reciprocal rule: the further the norm is out, the lower it is clipped. The clip depends on the
  step's own norm, which DeepSpeed knows only inside ``engine.step()``: a step pre-hook on the client
  optimizer (which every DeepSpeed path calls after it has unscaled and clipped at
  ``trainer.grad_clip``) reads DeepSpeed's pre-clip norm there, as skip-step's gate does, and
  rescales the gradients it is handed. A 0-d device factor, computed once per step: no host sync.
- ``threshold``: the norm is clipped at ``mu + z_thr * sigma`` (the official code's ``percentile``
  mode), a value known before the step and handed to DeepSpeed (``set_grad_clip``).

In both the EMA follows the clipped norm and starts from the first 25 steps' norms (the paper's
defaults); ``trainer.grad_clip`` > 0 stays an upper bound of the clip.
"""

from __future__ import annotations

import math

import torch

from dsinstab.instruments.base import Context, Instrument
from dsinstab.run import engine as eng
from dsinstab.run.plugins import Step

ZCLIP_WARMUP = 25  # steps whose norms start the EMA (the paper's default); no clipping by ZClip before
MODES = ("adaptive", "threshold")


class ZClip:
    """EMA of the grad norm's mean and variance, and the clip it gives a norm."""

    def __init__(self, z: float, alpha: float, base_clip: float, mode: str = "adaptive"):
        if mode not in MODES:
            raise ValueError(f"ZClip mode {mode!r}; allowed: {', '.join(MODES)}")
        self.z, self.alpha, self.base, self.mode = z, alpha, base_clip, mode
        self.warm: list[float] = []
        self.mean: float | None = None
        self.var = 0.0

    def threshold(self) -> float | None:
        """The norm above which ZClip clips (z-score ``z_thr``); ``None`` during its warm-up."""
        return None if self.mean is None else self.mean + self.z * math.sqrt(self.var)

    def limit(self, norm: float) -> float | None:
        """What ZClip clips ``norm`` to (``trainer.grad_clip`` aside); ``None`` where it does not."""
        t = self.threshold()
        if t is None or not norm > t:
            return None
        if self.mode == "threshold":
            return t
        # mu + (z_thr^2 / z) * sigma with z = (g - mu) / sigma; g - mu > z_thr * sigma >= 0 here
        return self.mean + self.z**2 * self.var / (norm - self.mean)

    def clip(self) -> float:
        """What ``engine.step()`` clips at (handed to DeepSpeed before the step): the lower of the
        threshold and ``trainer.grad_clip`` in ``threshold`` mode, ``trainer.grad_clip`` in
        ``adaptive`` mode (its clip comes inside the step, :meth:`factor`)."""
        t = self.threshold()
        if t is None or self.mode == "adaptive":
            return self.base
        return min(t, self.base) if self.base > 0 else t

    def factor(self, norm: torch.Tensor) -> torch.Tensor | None:
        """``adaptive`` mode: what the gradients DeepSpeed hands the optimizer (the pre-clip norm
        ``norm``, clipped at :meth:`clip`) are multiplied by so that their norm is the lower of
        :meth:`limit` and ``trainer.grad_clip``; a 0-d tensor on ``norm``'s device. ``None``: none."""
        t = self.threshold()
        if t is None or self.mode != "adaptive":
            return None
        g = norm.double()
        target = self.mean + self.z**2 * self.var / (g - self.mean)  # only read where g > t
        received = g
        if self.base > 0:
            target, received = target.clamp(max=self.base), g.clamp(max=self.base)
        return torch.where(g > t, target / received, torch.ones_like(g))

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
        limit = self.limit(norm)
        clipped = norm if limit is None else limit
        self.mean = self.alpha * self.mean + (1 - self.alpha) * clipped
        self.var = self.alpha * self.var + (1 - self.alpha) * (clipped - self.mean) ** 2
        return limit is not None

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
        self.zclip = ZClip(m.zclip_z, m.zclip_alpha, t.grad_clip, m.zclip_mode)
        self.step: Step | None = None
        self.judged = False  # this step's factor is computed (adaptive mode)
        self.scale: torch.Tensor | None = None  # and is this (None: ZClip is still warming up)
        if self.zclip.mode == "adaptive":
            eng.client_optimizer(ctx.engine).register_step_pre_hook(self._pre_step)

    def _pre_step(self, optimizer, args, kwargs) -> None:
        """Inside ``engine.step()``, before the client optimizer updates (ZeRO 1/2 call it once per
        param group, ZeRO-3 once per sub-group: the factor is computed once)."""
        if not self.judged:
            self.judged = True
            if self.zclip.threshold() is not None:  # not during the warm-up
                bare = eng.bare_optimizer(self.engine)
                norm = self.step.grad_norm if bare else eng.wrapper_grad_norm(self.engine)
                norm = torch.as_tensor(norm, dtype=torch.float64).to(self.engine.device)
                self.scale = self.zclip.factor(norm)
        if self.scale is None:
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(self.scale.to(p.grad.dtype))

    def before_step(self, step: Step) -> None:
        self.step, self.judged, self.scale = step, False, None
        eng.set_grad_clip(self.engine, self.zclip.clip())

    def readings(self, step: Step) -> dict:
        return {"norm": (step.grad_norm, "same")}

    def collect(self, step: Step, values: dict) -> dict:
        norm = float(values["norm"])
        threshold, limit = self.zclip.threshold(), self.zclip.limit(norm)
        clipped = self.zclip.observe(norm)
        if threshold is None or (not clipped and step.number % self.log_every):
            return {}  # logged on the loop's logging steps, and on every step it clips
        out = {"mitig/zclip_threshold": threshold, "mitig/zclip_clipped": int(clipped)}
        if clipped:
            out["mitig/zclip_clip"] = limit  # the norm ZClip let through (trainer.grad_clip aside)
        return out

    def state_dict(self) -> dict:
        return self.zclip.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.zclip.load_state_dict(state)
