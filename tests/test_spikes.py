"""Detectors and the spike score on made-up series."""

from __future__ import annotations

import json
import math
import random

import pytest

from dsinstab.instruments.spikes import (
    LossScaleDetector,
    RobustSpikeDetector,
    SpikeMonitor,
    SpikeScore,
)
from dsinstab.run.config import SpikesConfig
from dsinstab.run.plugins import firing_record
from dsinstab.run.policy import ActionPolicy


def feed(det, values):
    return [i for i, v in enumerate(values) if det.update(v)]


def detector(window=100, warmup=10, level_shift_steps=25, k=8.0):
    return RobustSpikeDetector("loss_spike", k, window, warmup, 0.1, level_shift_steps)


def test_flat_noisy_series_fires_nothing():
    rng = random.Random(0)
    det = detector()
    assert feed(det, [3.0 + rng.gauss(0, 0.02) for _ in range(2000)]) == []


def test_a_step_jump_fires_once_and_firing_values_stay_out_of_the_baseline():
    rng = random.Random(1)
    series = [3.0 + rng.gauss(0, 0.02) for _ in range(300)]
    series[200] = 6.0
    det = detector()
    assert feed(det, series) == [200]
    assert 6.0 not in det.values


def test_a_lasting_spike_is_one_episode_and_the_detector_re_arms():
    det = detector(window=50, warmup=0)
    series = [3.0 + 0.01 * (i % 3) for i in range(60)] + [7.0] * 20 + [3.0] * 20 + [8.0] + [3.0] * 5
    assert feed(det, series) == [60, 100]


def test_warmup_is_ignored():
    det = detector(window=20, warmup=50)
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


def test_a_lasting_jump_is_one_spike_then_a_level_shift_and_later_spikes_still_fire():
    det = detector(window=50, warmup=0, level_shift_steps=10)
    low = [3.0 + 0.01 * (i % 3) for i in range(60)]
    high = [6.0 + 0.01 * (i % 3) for i in range(40)]
    series = low + high + [12.0] + high[:5]
    fired = {i: f for i, v in enumerate(series) if (f := det.update(v))}
    assert sorted(fired) == [60, 69, 100]
    spike, shift, later = fired[60], fired[69], fired[100]
    assert spike.kind == "loss_spike" and spike.value == 6.0
    # the tenth value of the episode: the median of its values is the new level, the old one the baseline
    assert (shift.kind, shift.series, shift.value, shift.baseline) == ("level_shift", "loss", 6.01, 3.01)
    assert later.kind == "loss_spike" and later.value == 12.0 and later.baseline == 6.01
    assert 3.0 not in det.values and det.episode == [] and len(det.values) == 10 + 30 + 5


def test_a_spike_shorter_than_the_bound_is_no_level_shift():
    det = detector(window=50, warmup=0, level_shift_steps=10)
    series = [3.0 + 0.01 * (i % 3) for i in range(60)] + [7.0] * 9 + [3.0] * 5
    fired = [(i, f.kind) for i, v in enumerate(series) if (f := det.update(v))]
    assert fired == [(60, "loss_spike")]
    assert 7.0 not in det.values


def test_the_monitor_records_a_level_shift_without_an_action():
    mon = SpikeMonitor(SpikesConfig(warmup=0, window=20, level_shift_steps=5), fp16=False)
    steps = [(3.0 + 0.01 * (i % 3), 1.0 + 0.01 * (i % 2)) for i in range(30)] + [(9.0, 1.0)] * 8
    out = []
    for i, (loss, gn) in enumerate(steps):
        firings, metrics = mon.observe(loss, gn, overflow=False, scale=None)
        out.append((i, [f.kind for f in firings], metrics["spike/fired"], mon.pop_level_shifts()))
    assert [(i, k) for i, k, _, _ in out if k] == [(30, ["loss_spike"])]  # the action is for the spike alone
    shifts = [(i, s) for i, _, fired, found in out for s in found]
    assert [(i, s.kind, s.series, s.value) for i, s in shifts] == [(34, "level_shift", "loss", 9.0)]
    assert out[34][2] == 0 and mon.fired == 1
    assert mon.pop_level_shifts() == []  # handed over once
    assert firing_record(shifts[0][1]) == {
        "kind": "level_shift",
        "series": "loss",
        "value": 9.0,
        "threshold": shifts[0][1].threshold,
        "baseline": 3.01,
    }


def test_spike_score_against_a_series_worked_out_by_hand():
    # OLMo 2's definition with window 4, sigma 2: each value against the mean and population std
    # of the 4 values before it, either side, once 4 earlier values exist.
    score = SpikeScore(window=4, sigma=2.0)
    got = [score.update(v) for v in (1.0, 3.0, 1.0, 3.0, 5.0, math.nan, 4.0, 0.0)]
    # 1, 3, 1, 3: fewer than 4 earlier values, not judged: no score yet
    # 5: window 1 3 1 3, mean 2, std 1; |5 - 2| = 3 >= 2: spike                          1/1
    # nan: neither judged nor kept                                                        1/1
    # 4: window 3 1 3 5, mean 3, var (0+4+0+4)/4 = 2, std 1.414; |4 - 3| = 1 < 2.83      1/2
    # 0: window 1 3 5 4 (the first 1 has left), mean 3.25,
    #    var (5.0625+0.0625+3.0625+0.5625)/4 = 2.1875, std 1.479; |0 - 3.25| = 3.25 >= 2.958:
    #    a spike below the mean (with the n-1 std, 1.708, it would not be: 3.25 < 3.416)  2/3
    assert got[:4] == [None] * 4
    assert got[4:] == [1.0, 1.0, 0.5, pytest.approx(2 / 3)]


@pytest.mark.parametrize(
    "window_values, value, expected",
    [
        ((1.0, 3.0, 1.0, 3.0), 4.0, 1.0),  # mean 2, std 1: exactly 2 std away counts ("at least")
        ((1.0, 3.0, 1.0, 3.0), 3.9, 0.0),  # 1.9 std: not a spike
        ((1.0, 3.0, 1.0, 3.0), 0.0, 1.0),  # 2 std below
        ((2.0, 2.0, 2.0, 2.0), 5.0, 0.0),  # std 0: nothing is judged a spike
    ],
)
def test_spike_score_edges_by_hand(window_values, value, expected):
    score = SpikeScore(window=4, sigma=2.0)
    for v in window_values:
        assert score.update(v) is None
    assert score.update(value) == expected


def test_the_spike_score_is_absent_until_a_full_window():
    mon = SpikeMonitor(SpikesConfig(score_window=10), fp16=False)
    keys = [set(mon.observe(3.0 + 0.01 * i, 1.0, False, None)[1]) for i in range(11)]
    assert all("spike/score_loss" not in k for k in keys[:10])
    assert {"spike/score_loss", "spike/score_grad_norm"} <= keys[10]


def test_policy_cooldown_and_caps():
    mon = ActionPolicy(SpikesConfig(action="checkpoint", cooldown=10, max_checkpoints=2))
    assert [mon.decide(s) for s in (100, 105, 111, 130)] == ["checkpoint", "none", "checkpoint", "none"]
    roll = ActionPolicy(SpikesConfig(action="rollback", max_rollbacks=1))
    assert [roll.decide(s) for s in (10, 20)] == ["rollback", "stop"]


def test_monitor_state_round_trips():
    rng = random.Random(3)
    cfg = SpikesConfig(warmup=5, window=20, level_shift_steps=6, score_window=10)
    a, b = SpikeMonitor(cfg, fp16=True), SpikeMonitor(cfg, fp16=True)
    series = [(3 + rng.gauss(0, 0.05), 1 + rng.gauss(0, 0.05)) for _ in range(80)]
    series[37:80] = [(9 + rng.gauss(0, 0.05), gn) for _, gn in series[37:80]]  # a lasting jump from 37
    series[60] = (30.0, 30.0)
    for loss, gn in series[:40]:  # stop inside the episode that began at 37
        a.observe(loss, gn, False, 1024.0)
    assert a.loss.episode and a.pop_level_shifts() == []
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # as the checkpoint keeps it
    seen = []
    for loss, gn in series[40:]:
        got = a.observe(loss, gn, False, 1024.0), a.pop_level_shifts()
        assert got == (b.observe(loss, gn, False, 1024.0), b.pop_level_shifts())
        seen += [f.kind for f in got[0][0] + got[1]]
    assert seen == ["level_shift", "loss_spike", "grad_norm_spike"]


def test_skipped_bf16_steps_fire_where_fp16_overflows_are_expected():
    """DeepSpeed skips a bf16/fp32 step whose gradients are not finite: a fault, not loss scaling."""
    cfg = SpikesConfig(max_consecutive_overflows=3)
    bf16, fp16 = SpikeMonitor(cfg, fp16=False), SpikeMonitor(cfg, fp16=True)
    assert [f.kind for f in bf16.observe(2.0, math.inf, True, None)[0]] == ["nonfinite_grad_norm"]
    assert fp16.observe(2.0, math.inf, True, 1024.0)[0] == []
    for scale in (512.0, 256.0):
        assert bf16.observe(2.0, math.inf, True, None)[0] == fp16.observe(2.0, math.inf, True, scale)[0] == []
    last_bf16, last_fp16 = (
        bf16.observe(2.0, math.inf, True, None)[0],
        fp16.observe(2.0, math.inf, True, 128.0)[0],
    )
    assert [f.kind for f in last_bf16] == [f.kind for f in last_fp16] == ["overflow_run"]
