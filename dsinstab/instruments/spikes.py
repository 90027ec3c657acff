"""Spike detectors and the OLMo 2 spike score, as one plug-in: :class:`SpikeMonitor`.

Every input is a value already reduced across ranks (the mean loss, DeepSpeed's global grad norm,
its loss scale), so every rank holds the same detector state and reports the same firings; what a firing does is the
run's to decide (:mod:`dsinstab.run.actions`). All
state round-trips through ``state_dict`` and rides in the checkpoint: a resumed run fires exactly
where the unbroken run would.
"""

from __future__ import annotations

import math
from collections import deque
from statistics import median

from dsinstab.instruments.base import Context, Instrument
from dsinstab.run.config import SpikesConfig
from dsinstab.run.ds_config import precision
from dsinstab.run.plugins import Firing, Step, firing_record
from dsinstab.run.tracking import json_safe

MAD_TO_STD = 1.4826  # MAD of a normal distribution times this is its standard deviation


class RobustSpikeDetector:
    """Fires when a value exceeds ``median + k * 1.4826 * MAD`` of a trailing window, and the
    median by at least ``min_rel_jump``.

    A spike is an episode: it fires on the first value above the threshold and re-arms once a value
    comes back below it, so a spike that lasts twenty steps is one firing. Values above the
    threshold stay out of the baseline, so an episode is bounded: once it has lasted
    ``level_shift_steps`` values the jump is taken as the new level (a divergence, or a loss that
    settles higher) and reported as a ``level_shift`` firing, and the episode's values become the
    baseline. Without that bound a lasting jump would keep every later value out of the baseline
    and no later spike could fire.
    """

    def __init__(
        self, name: str, k: float, window: int, warmup: int, min_rel_jump: float, level_shift_steps: int
    ):
        self.name, self.k, self.warmup, self.min_rel_jump = name, k, warmup, min_rel_jump
        self.series = name.removesuffix("_spike")
        self.level_shift_steps = level_shift_steps
        self.values: deque[float] = deque(maxlen=window)
        self.episode: list[float] = []  # the values of the spike in progress, above the threshold
        self.seen = 0

    def update(self, value: float) -> Firing | None:
        """The spike (first value of an episode) or the level shift (its ``level_shift_steps``-th
        value) that ``value`` makes, if any."""
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
                self.episode.append(value)
                if len(self.episode) == 1:
                    return Firing(self.name, value, threshold, base)
                if len(self.episode) < self.level_shift_steps:
                    return None
                level = median(self.episode)
                self.values.clear()
                self.values.extend(self.episode)
                self.episode = []
                return Firing("level_shift", level, threshold, base, series=self.series)
        self.episode = []
        self.values.append(value)
        return None

    def state_dict(self) -> dict:
        return {"values": list(self.values), "episode": list(self.episode), "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.values.clear()
        self.values.extend(state["values"])
        self.episode = list(state.get("episode", []))  # absent in checkpoints from before the bound
        self.seen = state["seen"]


class SpikeScore:
    """OLMo 2's spike score. The paper ("2 OLMo 2 Furious", arXiv 2501.00656, on training
    stability) defines it as "the percentage of values in the training loss or gradient norm that
    are at least seven standard deviations away from a rolling average of the last 1000 values";
    ``sigma`` (default 7) and ``window`` (default 1000) are those two numbers. Precisely:

    - which side: both. A value is a spike when ``|value - mean| >= sigma * std`` ("at least",
      "away from"). OLMo-core's ``StabilityMonitorCallback`` counts only values above
      ``mean + k * std`` (and with a 128-value window, k = 6): its numbers differ from these.
    - which window: the ``window`` values before the one judged, the value itself excluded (as
      OLMo-core does); mean and std (the population std, dividing by n, as OLMo-core does) are
      theirs. A window with std 0 judges nothing a spike.
    - minimum history: a full window. A value is judged only once ``window`` earlier values exist
      (OLMo-core requires its full window too); before that there is no score: ``update`` returns
      None and the ``spike/score_*`` metric is absent, not zero.
    - the score: the share (0-1, not percent) of the judged values that were spikes, over the run
      so far, the one number per run that the paper compares.

    Non-finite values are neither judged nor put in the window (one would make the mean NaN).
    """

    def __init__(self, window: int, sigma: float):
        self.sigma = sigma
        self.values: deque[float] = deque(maxlen=window)
        self.judged = 0
        self.spikes = 0

    def update(self, value: float) -> float | None:
        if not math.isfinite(value):
            return self.score()
        if len(self.values) == self.values.maxlen:
            n = len(self.values)
            mean = sum(self.values) / n
            std = math.sqrt(sum((v - mean) ** 2 for v in self.values) / n)
            self.judged += 1
            self.spikes += int(std > 0 and abs(value - mean) >= self.sigma * std)
        self.values.append(value)
        return self.score()

    def score(self) -> float | None:
        return self.spikes / self.judged if self.judged else None

    def state_dict(self) -> dict:
        return {"values": list(self.values), "judged": self.judged, "spikes": self.spikes}

    def load_state_dict(self, state: dict) -> None:
        self.values.clear()
        self.values.extend(state["values"])
        self.judged, self.spikes = state.get("judged", 0), state.get("spikes", 0)


class LossScaleDetector:
    """Too many skipped steps in a row (fp16 overflows; in bf16/fp32, DeepSpeed's skips of
    non-finite gradients), or the fp16 scale down at a floor (fires once per descent to it)."""

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


class SpikeMonitor(Instrument):
    """All detectors and the spike scores, fed the step's reduced loss, grad norm, overflow flag and
    loss scale. Level shifts are recorded as events with no action (the spike that began one had
    its own); the other firings go to the run's action policy."""

    name = "spikes"
    key = "trainer.spikes"

    def __init__(self, cfg: SpikesConfig, fp16: bool):
        self.cfg, self.fp16 = cfg, fp16
        self.loss, self.grad = (
            RobustSpikeDetector(name, k, cfg.window, cfg.warmup, cfg.min_rel_jump, cfg.level_shift_steps)
            for name, k in (("loss_spike", cfg.loss_k), ("grad_norm_spike", cfg.grad_norm_k))
        )
        self.score_loss = SpikeScore(cfg.score_window, cfg.score_sigma)
        self.score_grad = SpikeScore(cfg.score_window, cfg.score_sigma)
        self.scale = LossScaleDetector(cfg.max_consecutive_overflows, cfg.min_loss_scale)
        self.nonfinite = [False, False]
        self.fired = 0  # steps that fired
        self.found: list[Firing] = []
        self.level_shifts: list[Firing] = []
        self.sink = None

    @classmethod
    def wanted(cls, cfg) -> bool:
        return True  # every run watches for spikes; trainer.spikes.action says what follows

    @classmethod
    def build(cls, ctx: Context) -> SpikeMonitor:
        return cls(ctx.cfg.trainer.spikes, precision(ctx.cfg.ds_config) == "fp16")

    def bind(self, run) -> None:
        self.sink = run.sink

    def collect(self, step: Step, values: dict) -> dict:
        self.found, metrics = self.observe(step.loss, step.norm, step.overflow, step.loss_scale)
        for shift in self.pop_level_shifts():  # recorded, no action: its spike had one
            self.sink.event(json_safe({"step": step.number, **firing_record(shift), "action": "none"}))
        return metrics

    def pop_level_shifts(self) -> list[Firing]:
        """The level shifts found since the last call (record them as events; they take no action)."""
        shifts, self.level_shifts = self.level_shifts, []
        return shifts

    def firings(self, step: Step) -> list[Firing]:
        found, self.found = self.found, []
        return found

    def observe(
        self, loss: float, grad_norm: float, overflow: bool, scale: float | None
    ) -> tuple[list[Firing], dict]:
        """Feed one step's reduced values; return the firings that call for the action and the
        ``spike/*`` metrics. A level shift is not among them: :meth:`pop_level_shifts` hands it
        over, to be recorded without an action (the spike that began it already had one)."""
        firings = []
        # Non-finite values are episodes too: the first of a run of them fires.
        # fp16's scaler skips overflowed steps by design: their infinite norm is expected. DeepSpeed
        # also skips bf16 and fp32 steps whose gradients are not finite, and there it is a fault.
        bad_loss = not math.isfinite(loss)
        bad_norm = not math.isfinite(grad_norm) and not (overflow and self.fp16)
        if bad_loss and not self.nonfinite[0]:
            firings.append(Firing("nonfinite_loss", loss))
        if bad_norm and not self.nonfinite[1]:
            firings.append(Firing("nonfinite_grad_norm", grad_norm))
        self.nonfinite = [bad_loss, bad_norm]
        # The loss of an overflowed step is a real forward pass of the current weights: a spike in
        # it is the state's (often the very step after a bad update), so the loss detector sees it.
        # Its grad norm is the loss scaler's inf and says nothing about the model.
        for f in (self.loss.update(loss), None if overflow else self.grad.update(grad_norm)):
            if f is not None:
                (self.level_shifts if f.kind == "level_shift" else firings).append(f)
        firings += self.scale.update(overflow, scale)  # overflow runs in every precision; floors in fp16
        self.fired += bool(firings)
        scores = {
            "spike/score_loss": self.score_loss.update(loss),
            # an overflow-skipped step's norm is inf by design: not a value of the series
            "spike/score_grad_norm": self.score_grad.score()
            if overflow
            else self.score_grad.update(grad_norm),
        }
        metrics = {"spike/fired": int(bool(firings)), **{k: v for k, v in scores.items() if v is not None}}
        return firings, metrics

    def state_dict(self) -> dict:
        return {
            "loss": self.loss.state_dict(),
            "grad": self.grad.state_dict(),
            "score_loss": self.score_loss.state_dict(),
            "score_grad": self.score_grad.state_dict(),
            "scale": self.scale.state_dict(),
            "nonfinite": list(self.nonfinite),
            "fired": self.fired,
        }

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.loss.load_state_dict(state["loss"])
        self.grad.load_state_dict(state["grad"])
        self.score_loss.load_state_dict(state["score_loss"])
        self.score_grad.load_state_dict(state["score_grad"])
        self.scale.load_state_dict(state["scale"])
        self.nonfinite = list(state["nonfinite"])
        self.fired = state.get("fired", state.get("policy", {}).get("fired", 0))
