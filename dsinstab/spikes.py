"""Spike detectors, the OLMo 2 spike score, and the policy that turns a firing into an action.

Every input is a value already reduced across ranks (the mean loss, DeepSpeed's global grad norm,
its loss scale), so every rank holds the same detector state and takes the same decision. All
state round-trips through ``state_dict`` and rides in the checkpoint: a resumed run fires exactly
where the unbroken run would.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass
from statistics import median

from dsinstab.config import SpikesConfig

MAD_TO_STD = 1.4826  # MAD of a normal distribution times this is its standard deviation


@dataclass
class Firing:
    kind: str
    value: float
    threshold: float | None = None
    baseline: float | None = None


class RobustSpikeDetector:
    """Fires when a value exceeds ``median + k * 1.4826 * MAD`` of a trailing window, and the
    median by at least ``min_rel_jump``.

    A spike is an episode: it fires on the first value above the threshold and re-arms only once a
    value comes back below it, so a spike that lasts twenty steps is one event. Values above the
    threshold stay out of the baseline.
    """

    def __init__(self, name: str, k: float, window: int, warmup: int, min_rel_jump: float):
        self.name, self.k, self.warmup, self.min_rel_jump = name, k, warmup, min_rel_jump
        self.values: deque[float] = deque(maxlen=window)
        self.seen = 0
        self.active = False

    def update(self, value: float) -> Firing | None:
        self.seen += 1
        if not math.isfinite(value):
            return None  # the non-finite detector reports these
        if self.seen <= self.warmup:
            return None
        if len(self.values) >= max(5, self.values.maxlen // 4):
            base = median(self.values)
            mad = median(abs(v - base) for v in self.values)
            threshold = max(base + self.k * MAD_TO_STD * mad, base * (1 + self.min_rel_jump))
            if value > threshold:
                first, self.active = not self.active, True
                return Firing(self.name, value, threshold, base) if first else None
        self.active = False
        self.values.append(value)
        return None

    def state_dict(self) -> dict:
        return {"values": list(self.values), "seen": self.seen, "active": self.active}

    def load_state_dict(self, state: dict) -> None:
        self.values.clear()
        self.values.extend(state["values"])
        self.seen, self.active = state["seen"], state["active"]


class SpikeScore:
    """OLMo 2's spike score: the share of the last ``window`` values that lie at least ``sigma``
    standard deviations from the mean of the (up to ``window``) values before each of them.

    A value is judged once at least ``min_history`` earlier values exist (a std of fewer is
    noise); the score is the number of judged values that were spikes divided by the number
    judged, over the last ``window`` judged values. Non-finite values are not judged.
    """

    min_history = 10

    def __init__(self, window: int, sigma: float):
        self.sigma = sigma
        self.values: deque[float] = deque(maxlen=window)
        self.flags: deque[int] = deque(maxlen=window)

    def update(self, value: float) -> float:
        if not math.isfinite(value):
            return self.score()
        if len(self.values) >= self.min_history:
            n = len(self.values)
            mean = sum(self.values) / n
            std = math.sqrt(sum((v - mean) ** 2 for v in self.values) / (n - 1))
            self.flags.append(int(std > 0 and abs(value - mean) >= self.sigma * std))
        self.values.append(value)
        return self.score()

    def score(self) -> float:
        return sum(self.flags) / len(self.flags) if self.flags else 0.0

    def state_dict(self) -> dict:
        return {"values": list(self.values), "flags": list(self.flags)}

    def load_state_dict(self, state: dict) -> None:
        self.values.clear()
        self.values.extend(state["values"])
        self.flags.clear()
        self.flags.extend(state["flags"])


class LossScaleDetector:
    """fp16: too many overflow-skipped steps in a row, or the scale down at a floor (fires once
    per descent to it)."""

    def __init__(self, max_consecutive: int, floor: float):
        self.max_consecutive, self.floor = max_consecutive, floor
        self.consecutive = 0
        self.longest = 0
        self.at_floor = False

    def update(self, overflow: bool, scale: float | None) -> list[Firing]:
        fired = []
        self.consecutive = self.consecutive + 1 if overflow else 0
        self.longest = max(self.longest, self.consecutive)
        if self.consecutive == self.max_consecutive + 1:
            fired.append(Firing("overflow_run", float(self.consecutive), float(self.max_consecutive)))
        if scale is not None:
            low = scale <= self.floor
            if low and not self.at_floor:
                fired.append(Firing("loss_scale_floor", scale, self.floor))
            self.at_floor = low
        return fired

    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive, "longest": self.longest, "at_floor": self.at_floor}

    def load_state_dict(self, state: dict) -> None:
        self.consecutive, self.longest, self.at_floor = (
            state["consecutive"],
            state["longest"],
            state["at_floor"],
        )


class SpikeMonitor:
    """All detectors, the spike scores, and the action policy (cooldown, caps)."""

    def __init__(self, cfg: SpikesConfig, fp16: bool):
        self.cfg, self.fp16 = cfg, fp16
        self.loss = RobustSpikeDetector("loss_spike", cfg.loss_k, cfg.window, cfg.warmup, cfg.min_rel_jump)
        self.grad = RobustSpikeDetector(
            "grad_norm_spike", cfg.grad_norm_k, cfg.window, cfg.warmup, cfg.min_rel_jump
        )
        self.score_loss = SpikeScore(cfg.score_window, cfg.score_sigma)
        self.score_grad = SpikeScore(cfg.score_window, cfg.score_sigma)
        self.scale = LossScaleDetector(cfg.max_consecutive_overflows, cfg.min_loss_scale)
        self.nonfinite = [False, False]
        self.last_checkpoint_step = -(10**9)
        self.checkpoints = 0
        self.rollbacks = 0
        self.fired = 0

    def observe(
        self, loss: float, grad_norm: float, overflow: bool, scale: float | None
    ) -> tuple[list[Firing], dict]:
        """Feed one step's reduced values; return the firings and the ``spike/*`` metrics."""
        firings = []
        # Non-finite values are episodes too: the first of a run of them fires.
        # An fp16 overflow is a skipped step, not a broken one: its infinite norm is expected.
        bad_loss, bad_norm = not math.isfinite(loss), not math.isfinite(grad_norm) and not overflow
        if bad_loss and not self.nonfinite[0]:
            firings.append(Firing("nonfinite_loss", loss))
        if bad_norm and not self.nonfinite[1]:
            firings.append(Firing("nonfinite_grad_norm", grad_norm))
        self.nonfinite = [bad_loss, bad_norm]
        if not overflow:
            firings += [f for f in (self.loss.update(loss), self.grad.update(grad_norm)) if f]
        if self.fp16:
            firings += self.scale.update(overflow, scale)
        self.fired += bool(firings)
        metrics = {
            "spike/fired": int(bool(firings)),
            "spike/score_loss": self.score_loss.update(loss),
            "spike/score_grad_norm": self.score_grad.update(grad_norm)
            if not overflow
            else self.score_grad.score(),
        }
        return firings, metrics

    def decide(self, step: int) -> str:
        """The action for firings at ``step``: the configured one, held back by cooldown and caps."""
        action = self.cfg.action
        if action == "checkpoint":
            if (
                self.checkpoints >= self.cfg.max_checkpoints
                or step - self.last_checkpoint_step < self.cfg.cooldown
            ):
                return "none"
            self.checkpoints += 1
            self.last_checkpoint_step = step
        elif action == "rollback":
            if self.rollbacks >= self.cfg.max_rollbacks:
                return "stop"
            self.rollbacks += 1
        return action

    def state_dict(self) -> dict:
        return {
            "loss": self.loss.state_dict(),
            "grad": self.grad.state_dict(),
            "score_loss": self.score_loss.state_dict(),
            "score_grad": self.score_grad.state_dict(),
            "scale": self.scale.state_dict(),
            "nonfinite": list(self.nonfinite),
            "policy": {
                "last_checkpoint_step": self.last_checkpoint_step,
                "checkpoints": self.checkpoints,
                "rollbacks": self.rollbacks,
                "fired": self.fired,
            },
        }

    def load_state_dict(self, state: dict) -> None:
        self.loss.load_state_dict(state["loss"])
        self.grad.load_state_dict(state["grad"])
        self.score_loss.load_state_dict(state["score_loss"])
        self.score_grad.load_state_dict(state["score_grad"])
        self.scale.load_state_dict(state["scale"])
        self.nonfinite = list(state["nonfinite"])
        for k, v in state["policy"].items():
            setattr(self, k, v)


def firing_record(f: Firing) -> dict:
    return {k: v for k, v in asdict(f).items() if v is not None}
