"""The metrics sink: the loop records ``name -> value``; the sink writes ``metrics.jsonl`` and wandb.

Only rank 0 holds real sinks; other ranks get a :class:`NullSink`, so the loop never asks
"is logging on".
"""

from __future__ import annotations

import json
import math
import netrc
import os
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch


def json_safe(value: Any) -> Any:
    """Plain JSON: tensors become numbers, and non-finite floats the strings "inf", "-inf", "nan"."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _lines(path: Path) -> list[tuple[str, dict]]:
    """Each line of a JSON-lines file with its record. A last line that does not parse is one a
    kill cut short while it was being written, and is left out; anywhere else it is an error."""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
    return out


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file, with "inf"/"nan" strings turned back into floats."""
    return [{k: _from_json(v) for k, v in rec.items()} for _, rec in _lines(Path(path))]


def _from_json(v: Any) -> Any:
    if v in ("inf", "-inf", "nan"):
        return float(v)
    return v


class JsonlFile:
    """Append-only JSON lines, flushed after every record so a killed run loses nothing logged."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "a", buffering=1)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def truncate_after(path: Path, step: int, spill: Path | None = None) -> None:
    """Drop the records past ``step`` (logged after the checkpoint a run resumes from), atomically;
    with ``spill``, append the dropped ones there instead of losing them."""
    if not path.exists():
        return
    kept, dropped = [], []
    for ln, rec in _lines(path):
        (kept if rec.get("step", 0) <= step else dropped).append(ln)
    if spill is not None and dropped:
        with open(spill, "a") as f:
            f.write("".join(ln + "\n" for ln in dropped))
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in kept))
    os.replace(tmp, path)


class NullSink:
    def log(self, step: int, metrics: dict) -> None: ...
    def event(self, record: dict) -> None: ...
    def rewind(self, step: int, events: bool, spill: Path | None = None) -> None: ...
    def close(self) -> None: ...


class LocalSink(NullSink):
    """``metrics.jsonl`` (one object per logged step) and ``events.jsonl`` (one per event)."""

    def __init__(self, run_dir: Path):
        self.metrics = JsonlFile(run_dir / "metrics.jsonl")
        self.events = JsonlFile(run_dir / "events.jsonl")

    def log(self, step: int, metrics: dict) -> None:
        self.metrics.write({"step": step, "time": round(time.time(), 3), **metrics})

    def event(self, record: dict) -> None:
        self.events.write(record)

    def rewind(self, step: int, events: bool, spill: Path | None = None) -> None:
        """Forget the metrics (and with ``events``, the events) logged after ``step``: a resumed or
        rolled-back run logs those steps again. ``spill`` keeps the forgotten metrics."""
        for f, keep_all in ((self.metrics, False), (self.events, not events)):
            if not keep_all:
                f.close()
                truncate_after(f.path, step, spill if f is self.metrics else None)
                f.file = open(f.path, "a", buffering=1)

    def close(self) -> None:
        self.metrics.close()
        self.events.close()


def wandb_mode() -> str:
    """``WANDB_MODE`` if set; otherwise online only with an API key, offline without one."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


class WandbSink(NullSink):
    """wandb, with the run's files inside the run directory; events also go to a table."""

    EVENT_COLUMNS = ("step", "kind", "value", "threshold", "baseline", "action")

    def __init__(self, run_dir: Path, project: str, name: str, config: dict, resume: bool):
        import wandb

        self.wandb = wandb
        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if resume and id_file.exists() else uuid.uuid4().hex[:12]
        kwargs = dict(
            project=project,
            name=name,
            id=run_id,
            dir=str(run_dir),
            config=config,
            resume="allow",
            settings=wandb.Settings(
                init_timeout=float(os.environ.get("WANDB_INIT_TIMEOUT", 30)), console="off"
            ),
        )
        mode = wandb_mode()
        try:
            self.run = wandb.init(mode=mode, **kwargs)
        except Exception as e:  # noqa: BLE001 - wandb unreachable or misconfigured: keep training
            if mode == "offline":
                raise
            warnings.warn(
                f"wandb could not start online ({type(e).__name__}); logging offline instead.", stacklevel=2
            )
            wandb.teardown()  # the failed online run still holds its id in wandb's service
            run_id = kwargs["id"] = uuid.uuid4().hex[:12]
            self.run = wandb.init(mode="offline", **kwargs)
        id_file.write_text(run_id)
        self.rows: list[list] = []

    def log(self, step: int, metrics: dict) -> None:
        self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def event(self, record: dict) -> None:
        self.rows.append([json.dumps(json_safe(record.get(c))) for c in self.EVENT_COLUMNS])
        table = self.wandb.Table(columns=list(self.EVENT_COLUMNS), data=self.rows)
        self.run.log({"spike/events": table}, step=record.get("step"))

    def close(self) -> None:
        self.run.finish()


class FanOut(NullSink):
    def __init__(self, *sinks):
        self.sinks = sinks

    def log(self, step: int, metrics: dict) -> None:
        for s in self.sinks:
            s.log(step, metrics)

    def event(self, record: dict) -> None:
        for s in self.sinks:
            s.event(record)

    def rewind(self, step: int, events: bool, spill: Path | None = None) -> None:
        for s in self.sinks:
            s.rewind(step, events, spill)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def open_sink(run_dir: Path, report_to: str, project: str, name: str, config: dict, resume: bool):
    sinks = [LocalSink(run_dir)]
    if report_to == "wandb":
        sinks.append(WandbSink(run_dir, project, name, config, resume))
    return FanOut(*sinks)
