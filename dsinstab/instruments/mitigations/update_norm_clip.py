"""Update-norm clipping (Levanter's ``clip_update_norm``), ``trainer.mitigations.update_norm_clip_sigma``:
the norm of the whole optimizer update (the change AdamW applies to the parameters this step,
weight decay included) is clipped at the mean + sigma std of the last ``update_norm_clip_window``
update norms. Inside :class:`MitigatedAdamW`, which computes every tensor's change before it applies
any (ZeRO 1/2's per-group calls included) and sums the squares across ranks where ZeRO partitions
the tensors, so every rank takes the same decision from the same norm, on the device.
"""

from __future__ import annotations

import math

import deepspeed.comm as dist
import torch
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

from dsinstab.instruments.base import Context, Instrument, Refusal
from dsinstab.instruments.optim import mitigated_optimizer
from dsinstab.run.ds_config import zero_stage
from dsinstab.run.plugins import Step, world_size


class UpdateNormWindow:
    """The rolling window of update norms (on the device) and the clip it gives the next one.

    The window holds the norms as applied (after clipping, as ZClip's EMA follows clipped norms), so
    a run of large updates cannot pull the threshold up at its own pace. An update of norm 0 (lr 0 at
    the first warm-up step, or a step skip-step skipped) and a non-finite one are left out of the
    mean and std; clipping starts once min(window, max(20, window/2)) norms are in (as skip-step's
    history). The std is the population std (ddof 0).
    """

    def __init__(self, sigma: float, window: int, device):
        self.sigma, self.window = sigma, window
        self.min_history = min(window, max(20, window // 2))
        self.hist = torch.full((window,), math.nan, device=device)
        self.count = 0  # values written so far
        self.last: torch.Tensor | None = None  # (norm, threshold, clipped) of the step, on the device

    def threshold(self) -> torch.Tensor:
        """mean + sigma * std of the usable norms in the window; inf until enough are in."""
        valid = self.hist.isfinite()
        n = valid.sum()
        mean = torch.where(valid, self.hist, 0).sum() / n.clamp(min=1)
        var = torch.where(valid, (self.hist - mean) ** 2, 0).sum() / n.clamp(min=1)
        return torch.where(n >= self.min_history, mean + self.sigma * var.sqrt(), math.inf)

    def scale(self, norm: torch.Tensor) -> torch.Tensor:
        """The factor the step's update is multiplied by (1, or threshold / norm); the applied norm
        joins the window. Called by MitigatedAdamW once per engine step."""
        norm = norm.float()
        t = self.threshold()
        clipped = norm > t  # a nan norm is not clipped (nothing is known of it)
        scale = torch.where(clipped, t / norm, 1.0)
        applied = norm * scale
        usable = applied.isfinite() & (applied > 0)
        self.hist[self.count % self.window] = torch.where(usable, applied, math.nan)
        self.count += 1
        self.last = torch.stack([norm, t, clipped.float()])
        return scale

    def state_dict(self) -> dict:
        # in the order written, oldest first, so another window size could take it
        k = min(self.count, self.window)
        order = [(self.count - k + i) % self.window for i in range(k)]
        return {"history": self.hist[order].cpu().tolist(), "count": self.count}

    def load_state_dict(self, s: dict) -> None:
        self.hist.fill_(math.nan)
        hist = torch.tensor(s["history"], dtype=torch.float32)[-self.window :]
        self.count = s["count"]
        for i in range(hist.numel()):
            self.hist[(self.count - hist.numel() + i) % self.window] = hist[i].to(self.hist.device)


class UpdateNormClipPlugin(Instrument):
    name = "update_norm_clip"
    key = "trainer.mitigations.update_norm_clip_sigma"
    needs_mitigated_optimizer = True

    def __init__(self, ctx: Context):
        m = ctx.cfg.trainer.mitigations
        self.engine, self.log_every = ctx.engine, ctx.cfg.trainer.log_every
        self.window = UpdateNormWindow(m.update_norm_clip_sigma, m.update_norm_clip_window, ctx.engine.device)
        self.opt = mitigated_optimizer(ctx.engine, "update-norm clipping")
        self.opt.update_norm_scale = self.window.scale
        if isinstance(ctx.engine.optimizer, DeepSpeedZeroOptimizer):
            # ZeRO 1/2 step one param group at a time, each a flat partition of this rank's share
            self.opt.update_calls = len(self.opt.param_groups)
            self.opt.update_reduce = world_size() > 1
            self.opt.on_update_applied = self._copy_to_16bit

    @classmethod
    def refusal(cls, cfg) -> Refusal | None:
        return ZERO3_REFUSAL if zero_stage(cfg.ds_config) == 3 else None

    def _copy_to_16bit(self, changed: list[torch.Tensor]) -> None:
        """ZeRO 1/2 copy a group's fp32 partition to its 16-bit one right after the group's
        ``step()`` call, before this step's change was applied to it: copied again here, before
        DeepSpeed all-gathers the 16-bit partitions."""
        z = self.engine.optimizer
        ids = {id(p) for p in changed}
        for i, fp32 in enumerate(z.single_partition_of_fp32_groups):
            if id(fp32) in ids:
                rank = dist.get_rank(group=z.real_dp_process_group[i])
                z.parallel_partitioned_bit16_groups[i][rank].data.copy_(fp32.data)

    def before_step(self, step: Step) -> None:
        self.opt.begin_update()
        self.window.last = None

    def readings(self, step: Step) -> dict:
        # the same on every rank: the norm's squares were summed across the partitions
        return {} if self.window.last is None else {"update_norm": (self.window.last, "same")}

    def collect(self, step: Step, values: dict) -> dict:
        if "update_norm" not in values:
            return {}  # no update this step (an fp16 overflow)
        norm, threshold, clipped = values["update_norm"]
        if not clipped and step.number % self.log_every:
            return {}
        out = {"mitig/update_norm": norm, "mitig/update_norm_clipped": int(clipped)}
        if math.isfinite(threshold):
            out["mitig/update_norm_threshold"] = threshold
        return out

    def state_dict(self) -> dict:
        return self.window.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.window.load_state_dict(state)


ZERO3_REFUSAL = Refusal(
    "needs ZeRO stage 0, 1 or 2 (ZeRO-3 steps the optimizer one sub-group at a time and copies each "
    "to its 16-bit weights before the next is stepped, so dsinstab cannot hold the update back until "
    "its whole norm is known).",
    in_ds_config=True,
)
