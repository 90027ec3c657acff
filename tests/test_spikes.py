"""Detectors and the spike score on made-up series."""

from __future__ import annotations

import math
import random

import pytest

from dsinstab.config import SpikesConfig
from dsinstab.spikes import LossScaleDetector, RobustSpikeDetector, SpikeMonitor, SpikeScore


def feed(det, values):
    return [i for i, v in enumerate(values) if det.update(v)]


def test_flat_noisy_series_fires_nothing():
    rng = random.Random(0)
    det = RobustSpikeDetector("loss_spike", k=8, window=100, warmup=10, min_rel_jump=0.1)
    assert feed(det, [3.0 + rng.gauss(0, 0.02) for _ in range(2000)]) == []


def test_a_step_jump_fires_once_and_firing_values_stay_out_of_the_baseline():
    rng = random.Random(1)
    series = [3.0 + rng.gauss(0, 0.02) for _ in range(300)]
    series[200] = 6.0
    det = RobustSpikeDetector("loss_spike", k=8, window=100, warmup=10, min_rel_jump=0.1)
    assert feed(det, series) == [200]
    assert 6.0 not in det.values


def test_a_lasting_spike_is_one_episode_and_the_detector_re_arms():
    det = RobustSpikeDetector("loss_spike", k=8, window=50, warmup=0, min_rel_jump=0.1)
    series = [3.0 + 0.01 * (i % 3) for i in range(60)] + [7.0] * 20 + [3.0] * 20 + [8.0] + [3.0] * 5
    assert feed(det, series) == [60, 100]


def test_warmup_is_ignored():
    det = RobustSpikeDetector("loss_spike", k=8, window=20, warmup=50, min_rel_jump=0.1)
    series = [10.0 - 0.1 * i for i in range(50)] + [5.0] * 50
    assert feed(det, series) == []


def test_nonfinite_values_fire_and_fp16_overflow_norms_do_not():
    mon = SpikeMonitor(SpikesConfig(warmup=0), fp16=True)
    firings, _ = mon.observe(math.nan, 1.0, overflow=False, scale=1024.0)
    assert [f.kind for f in firings] == ["nonfinite_loss"]
    firings, _ = mon.observe(math.nan, math.inf, overflow=True, scale=512.0)
    assert firings == []  # still the same non-finite episode; and an fp16 overflow's inf norm is expected
    mon.observe(3.0, 1.0, overflow=False, scale=512.0)
    firings, _ = mon.observe(math.inf, 1.0, overflow=False, scale=512.0)
    assert [f.kind for f in firings] == ["nonfinite_loss"]  # re-armed by a finite value
    bf16 = SpikeMonitor(SpikesConfig(warmup=0), fp16=False)
    firings, metrics = bf16.observe(3.0, math.inf, overflow=False, scale=None)
    assert [f.kind for f in firings] == ["nonfinite_grad_norm"] and metrics["spike/fired"] == 1


def test_loss_scale_detector_fires_on_overflow_runs_and_on_the_floor_once():
    det = LossScaleDetector(max_consecutive=3, floor=4.0)
    kinds = []
    for overflow, scale in [
        (True, 64),
        (True, 32),
        (True, 16),
        (True, 8),
        (True, 4),
        (False, 4),
        (True, 4),
        (False, 8),
        (True, 4),
    ]:
        kinds.append([f.kind for f in det.update(overflow, scale)])
    assert kinds[3] == ["overflow_run"]
    assert kinds[4] == ["loss_scale_floor"]
    assert kinds[5] == kinds[6] == []  # still at the floor: no second firing
    assert kinds[8] == ["loss_scale_floor"]  # it rose and fell back: fires again
    assert det.longest == 5


def test_spike_score_matches_a_hand_computation():
    window, sigma = 20, 3.0
    rng = random.Random(2)
    values = [1.0 + rng.gauss(0, 0.1) for _ in range(60)]
    values[30] = values[45] = 5.0
    score = SpikeScore(window, sigma)
    got = [score.update(v) for v in values]
    # by hand: judge each value against the mean/std of up to `window` earlier values
    flags = []
    for i, v in enumerate(values):
        prev = values[max(0, i - window) : i]
        if len(prev) >= SpikeScore.min_history:
            m = sum(prev) / len(prev)
            s = math.sqrt(sum((p - m) ** 2 for p in prev) / (len(prev) - 1))
            flags.append(int(abs(v - m) >= sigma * s))
        recent = flags[-window:]
        assert got[i] == pytest.approx(sum(recent) / len(recent) if recent else 0.0)
    assert flags.count(1) >= 2 and got[50] > 0


def test_policy_cooldown_and_caps():
    mon = SpikeMonitor(SpikesConfig(action="checkpoint", cooldown=10, max_checkpoints=2), fp16=False)
    assert [mon.decide(s) for s in (100, 105, 111, 130)] == ["checkpoint", "none", "checkpoint", "none"]
    roll = SpikeMonitor(SpikesConfig(action="rollback", max_rollbacks=1), fp16=False)
    assert [roll.decide(s) for s in (10, 20)] == ["rollback", "stop"]


def test_monitor_state_round_trips():
    rng = random.Random(3)
    a = SpikeMonitor(SpikesConfig(warmup=5, window=20), fp16=True)
    b = SpikeMonitor(SpikesConfig(warmup=5, window=20), fp16=True)
    series = [(3 + rng.gauss(0, 0.05), 1 + rng.gauss(0, 0.05)) for _ in range(80)]
    series[60] = (9.0, 30.0)
    for loss, gn in series[:40]:
        a.observe(loss, gn, False, 1024.0)
    b.load_state_dict(a.state_dict())
    for loss, gn in series[40:]:
        assert a.observe(loss, gn, False, 1024.0) == b.observe(loss, gn, False, 1024.0)
