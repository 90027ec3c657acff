"""The wandb sink: after a rollback in-process and after a resume in a new process, the history
that wandb recorded holds the same steps and values as metrics.jsonl.

wandb 0.31 has no Python reader of its ``.wandb`` files any more (sync moved into wandb-core), so
``wandb_segments`` below reads them: a 7-byte header, then LevelDB-log records (32 KiB blocks,
7-byte chunk headers) each holding one ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from wandb.proto import wandb_internal_pb2 as pb

from conftest import ROOT, assert_ok, launch
from dsinstab.run.tracking import open_sink, read_jsonl

BLOCK = 32 * 1024
# tests/test_spike_runs.py's rollback run: a spike injected at step 30, rolled back to step-20
SPIKE_ROLLBACK = (
    "trainer.max_steps=40",
    "trainer.checkpoint_every=10",
    "trainer.inject.at_step=30",
    "trainer.spikes.window=20",
    "trainer.spikes.warmup=10",
    "trainer.spikes.action=rollback",
    "trainer.spikes.rollback_min_back=5",
    "trainer.spikes.rollback_skip=5",
)


def wandb_records(path: Path):
    """The records of one ``.wandb`` file; a last record cut short by a kill is left out."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        if kind == 0 or len(chunk) < length:
            break
        pos += 7 + length
        parts = chunk if kind in (1, 2) else parts + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(parts)
            yield rec


def wandb_segments(run_dir: Path) -> list[dict]:
    """Each offline segment of the run, in the order it started (the order in which ``wandb sync``
    uploads the segments of one run): its run record, history rows (step -> {key: value},
    wandb's own ``_`` keys left out) and last summary values."""
    segments = []
    for path in (run_dir / "wandb").glob("offline-run-*/run-*.wandb"):
        seg = {"path": path, "run": None, "rows": {}, "summary": {}}
        for rec in wandb_records(path):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                seg["run"] = rec.run
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                step = items.pop("_step")
                seg["rows"].setdefault(step, {}).update({k: v for k, v in items.items() if k[0] != "_"})
            elif kind == "summary":
                for i in rec.summary.update:
                    seg["summary"][i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
        segments.append(seg)
    return sorted(segments, key=lambda s: s["run"].start_time.ToMicroseconds())


def wandb_history(run_dir: Path) -> dict[int, dict]:
    """What the run's history is once the segments are synced: a segment whose branch point names
    its own run is wandb's rewind, which drops the rows after the branch point's step."""
    segments = wandb_segments(run_dir)
    assert len({s["run"].run_id for s in segments}) == 1, "one wandb run, rewound, not several"
    history: dict[int, dict] = {}
    for i, seg in enumerate(segments):
        bp = seg["run"].branch_point
        # a later segment with no branch point would not continue the history when synced
        assert i == 0 or (bp.run, bp.metric) == (seg["run"].run_id, "_step"), seg["path"]
        if bp.run:
            history = {s: row for s, row in history.items() if s <= bp.value}
        history.update(seg["rows"])
    return history


def metrics_by_step(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl as wandb holds it: one row per step (train and eval lines of a step merged),
    numbers only, without the wall clock."""
    rows: dict[int, dict] = {}
    for r in read_jsonl(run_dir / "metrics.jsonl"):
        numbers = {k: v for k, v in r.items() if k not in ("step", "time") and isinstance(v, (int, float))}
        rows.setdefault(r["step"], {}).update(numbers)
    return rows


def same(a: dict[int, dict], b: dict[int, dict]) -> bool:
    def norm(h):
        return {
            s: {k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()}
            for s, r in h.items()
        }

    return norm(a) == norm(b)


def event_table(run_dir: Path) -> list[list]:
    """The rows of the events table in the last segment's summary, read from its file."""
    seg = wandb_segments(run_dir)[-1]
    ref = seg["summary"]["spike/events"]
    table = json.loads((seg["path"].parent / "files" / ref["path"]).read_text())
    return [[json.loads(v) for v in row] for row in table["data"]]


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def sink(run_dir: Path, resume: bool = False, group: str = ""):
    config = {"utils": {"wandb_group": group}, "trainer": {"lr": 0.1}}
    return open_sink(run_dir, "wandb", "dsinstab-test", run_dir.name, config, resume)


def test_a_rollback_rewinds_the_wandb_run_to_what_metrics_jsonl_holds(tmp_path, offline):
    s = sink(tmp_path)
    s.log(0, {"eval/loss": 9.0})
    for step in range(1, 11):
        s.log(step, {"train/loss": float(step), "spike/fired": int(step == 8)})
    s.event({"step": 8, "kind": "loss_spike", "value": 8.0, "action": "rollback"})
    s.rewind(5, events=False, spill=tmp_path / "metrics_rolled_back.jsonl")
    s.event({"step": 8, "kind": "rollback", "action": "rollback"})  # the spike's step, after the rewind
    for step in range(6, 11):
        s.log(step, {"train/loss": 100.0 + step, "spike/fired": 0})
    s.log(10, {"eval/loss": math.nan})
    s.close()

    history = wandb_history(tmp_path)
    assert same(history, metrics_by_step(tmp_path))
    assert [history[k]["train/loss"] for k in (5, 6, 10)] == [5, 106, 110]
    assert math.isnan(history[10]["eval/loss"])
    segments = wandb_segments(tmp_path)
    assert [(s["run"].branch_point.run, s["run"].branch_point.value) for s in segments] == [
        ("", 0),
        (segments[0]["run"].run_id, 5),  # the second segment is a rewind of the same run to step 5
    ]
    assert [row[:2] for row in event_table(tmp_path)] == [[8, "loss_spike"], [8, "rollback"]]


RESUME = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_tracking import sink
s = sink(Path({run!r}), resume=True)
s.rewind(4, events=True)
for step in range(5, 9):
    s.log(step, {{"train/loss": 50.0 + step}})
s.event({{"step": 7, "kind": "grad_norm_spike", "action": "checkpoint"}})
s.close()
"""


def test_a_resume_in_a_new_process_rewinds_the_same_wandb_run(tmp_path, offline):
    s = sink(tmp_path, group="pair-1")
    for step in range(1, 9):
        s.log(step, {"train/loss": float(step)})
    s.event({"step": 3, "kind": "loss_spike", "action": "checkpoint"})
    s.event({"step": 6, "kind": "loss_spike", "action": "checkpoint"})
    s.close()
    # the run resumes from its step-4 checkpoint, as cli does: metrics.jsonl is cut back first
    s_local = open_sink(tmp_path, "none", "", "", {}, True)
    s_local.rewind(4, events=True)
    s_local.close()
    code = RESUME.format(tests=str(ROOT / "tests"), run=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]

    history = wandb_history(tmp_path)
    assert same(history, metrics_by_step(tmp_path))
    assert {k: r["train/loss"] for k, r in history.items()} == {
        1: 1,
        2: 2,
        3: 3,
        4: 4,
        5: 55,
        6: 56,
        7: 57,
        8: 58,
    }
    assert len(wandb_segments(tmp_path)) == 2
    assert [row[:2] for row in event_table(tmp_path)] == [[3, "loss_spike"], [7, "grad_norm_spike"]]


RESUME_COUNTED = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_tracking import sink
s = sink(Path({run!r}), resume=True)
s.load_state_dict({saved!r})  # what restore() hands the sink from the checkpoint at step 4
s.rewind(4, events=True)
s.log(5, {{"train/loss": 55.0}})
s.close()
"""


def test_a_resume_keeps_the_events_its_checkpoint_counted_in_the_wandb_table_too(tmp_path, offline):
    s = sink(tmp_path)
    for step in range(1, 7):
        s.log(step, {"train/loss": float(step)})
    # a rollback from step 6 (its events carry step 6), then a checkpoint at step 4 after it
    s.event({"step": 6, "kind": "loss_spike", "action": "rollback"})
    s.event({"step": 6, "kind": "rollback", "action": "rollback"})
    saved = s.state_dict()
    s.event({"step": 5, "kind": "grad_norm_spike", "action": "none"})  # after the checkpoint
    s.close()
    assert saved == {"events": 2}
    code = RESUME_COUNTED.format(tests=str(ROOT / "tests"), run=str(tmp_path), saved=saved)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [row[:2] for row in event_table(tmp_path)] == [[6, "loss_spike"], [6, "rollback"]]
    assert [(e["step"], e["kind"]) for e in read_jsonl(tmp_path / "events.jsonl")] == [
        (6, "loss_spike"),
        (6, "rollback"),
    ]


def test_the_wandb_group_is_the_configured_one(tmp_path, offline):
    for name, group in (("grouped", "sweep-7"), ("plain", "")):
        (tmp_path / name).mkdir()
        s = sink(tmp_path / name, group=group)
        s.log(1, {"train/loss": 1.0})
        s.close()
        assert wandb_segments(tmp_path / name)[0]["run"].run_group == group


def test_an_end_to_end_rollback_leaves_wandb_equal_to_metrics_jsonl(tmp_path, cache_dir):
    proc, run = launch(tmp_path, cache_dir, *SPIKE_ROLLBACK, "utils.report_to=wandb")
    assert_ok(proc)
    events = read_jsonl(run / "events.jsonl")
    assert [e["kind"] for e in events] == ["loss_spike", "rollback"]
    history = wandb_history(run)
    assert same(history, metrics_by_step(run))
    assert sorted(history) == list(range(0, 41))
    assert [s["run"].branch_point.value for s in wandb_segments(run)] == [0, 20]  # rewound to step-20
    assert [row[1] for row in event_table(run)] == ["loss_spike", "rollback"]
