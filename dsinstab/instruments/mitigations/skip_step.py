"""Skip-step (OLMo-core), ``trainer.mitigations.skip_step_sigma``: an update whose loss or grad norm
lies more than sigma standard deviations above the mean of the last ``skip_step_window`` steps is
not applied. Judged inside the optimizer (:class:`dsinstab.instruments.optim.MitigatedAdamW`), where
DeepSpeed's grad norm of the step exists before the update; the schedule keeps counting.
"""

from __future__ import annotations

import math

import deepspeed.comm as dist
import torch

from dsinstab.instruments.base import Context, Instrument
from dsinstab.instruments.optim import mitigated_optimizer
from dsinstab.run import engine as eng
from dsinstab.run.plugins import Step, world_size


class SkipStep:
    """OLMo-core's rule on device tensors: a value skips the step when ``(x - mean) > sigma * std``
    (one-sided, as OLMo-core compares ``(latest - mean) <= sigma_factor * std``); the history takes
    every judged step, skipped ones included, as there.

    Differences from OLMo-core, on purpose: the loss judged is ``train/loss``, the cross-entropy
    plus the z-loss (OLMo-core judges the cross-entropy alone); judging starts once the history
    holds min(window, max(20, window/2)) values, dsinstab's own minimum; and non-finite values in
    the history are left out of its mean and std (a nan there would otherwise poison every later
    judgement).
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


class SkipStepPlugin(Instrument):
    name = "skip_step"
    key = "trainer.mitigations.skip_step_sigma"
    needs_mitigated_optimizer = True

    def __init__(self, ctx: Context):
        m = ctx.cfg.trainer.mitigations
        self.engine, self.log_every = ctx.engine, ctx.cfg.trainer.log_every
        self.skip = SkipStep(m.skip_step_sigma, m.skip_step_window, ctx.engine.device)
        opt = mitigated_optimizer(ctx.engine, "skip-step")
        opt.gate = self._gate
        self.step: Step | None = None
        self.loss: torch.Tensor | None = None
        self.factor: torch.Tensor | None = None

    def _gate(self) -> torch.Tensor:
        """Called by MitigatedAdamW inside engine.step(), once per param group: judged once."""
        if self.factor is None:
            bare = eng.bare_optimizer(self.engine)
            norm = self.step.grad_norm if bare else eng.wrapper_grad_norm(self.engine)
            norm = torch.as_tensor(norm, dtype=torch.float32).to(self.engine.device)
            self.factor = self.skip.judge(self.loss, norm)
        return self.factor

    def before_step(self, step: Step) -> None:
        self.step, self.factor = step, None
        # the step's mean loss over ranks (ce + z-loss, as train/loss), on the device
        loss = step.losses.float().sum()
        if world_size() > 1:
            dist.all_reduce(loss)
            loss = loss / world_size()
        self.loss = loss

    def readings(self, step: Step) -> dict:
        return {} if self.factor is None else {"skip": (1 - self.factor, "same")}

    def collect(self, step: Step, values: dict) -> dict:
        skipped = int(values.get("skip", 0))
        self.skip.skipped += skipped
        if not skipped and step.number % self.log_every:
            return {}
        return {"mitig/skip_step": skipped, "mitig/skipped_steps": self.skip.skipped}

    def state_dict(self) -> dict:
        return self.skip.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.skip.load_state_dict(state)
