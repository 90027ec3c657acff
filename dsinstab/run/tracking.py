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


def truncate_after(path: Path, step: int, spill: Path | None = None, keep: int | None = None) -> None:
    """Drop the records past ``step`` (logged after the checkpoint a run resumes from), atomically;
    with ``keep``, every record after the first ``keep`` instead, whatever its step. With ``spill``,
    append the dropped ones there instead of losing them."""
    if not path.exists():
        return
    kept, dropped = [], []
    for i, (ln, rec) in enumerate(_lines(path)):
        (kept if (i < keep if keep is not None else rec.get("step", 0) <= step) else dropped).append(ln)
    if spill is not None and dropped:
        with open(spill, "a") as f:
            f.write("".join(ln + "\n" for ln in dropped))
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in kept))
    os.replace(tmp, path)


class NullSink:
    """No output. A sink's checkpointed state (``state_dict``) is how many events it had written,
    so that a resume forgets exactly the events written after its checkpoint was saved."""

    def log(self, step: int, metrics: dict) -> None: ...
    def event(self, record: dict) -> None: ...
    def rewind(self, step: int, events: bool, spill: Path | None = None) -> None: ...
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...
    def close(self) -> None: ...


class LocalSink(NullSink):
    """``metrics.jsonl`` (one object per logged step) and ``events.jsonl`` (one per event)."""

    def __init__(self, run_dir: Path):
        self.metrics = JsonlFile(run_dir / "metrics.jsonl")
        self.events = JsonlFile(run_dir / "events.jsonl")
        self.events_written = len(_lines(self.events.path))
        self.restored_events: int | None = None  # how many the restored checkpoint's state counted

    def log(self, step: int, metrics: dict) -> None:
        self.metrics.write({"step": step, "time": round(time.time(), 3), **metrics})

    def event(self, record: dict) -> None:
        self.events.write(record)
        self.events_written += 1

    def state_dict(self) -> dict:
        return {"events": self.events_written}

    def load_state_dict(self, state: dict) -> None:
        """The run was restored from a checkpoint whose sink state is ``state`` (``{}`` for a
        checkpoint from before sinks had one): the next :meth:`rewind` with ``events`` keeps
        the events it counted."""
        self.restored_events = state.get("events")

    def rewind(self, step: int, events: bool, spill: Path | None = None) -> None:
        """Forget the metrics logged after ``step``: a resumed or rolled-back run logs those steps
        again; ``spill`` keeps them. With ``events``, forget the events written after the restored
        checkpoint was saved (a rollback's own events, written at the spike's step, come before a
        later checkpoint and stay); for a checkpoint that did not count them, those after ``step``."""
        for f, keep_all in ((self.metrics, False), (self.events, not events)):
            if not keep_all:
                f.close()
                keep = self.restored_events if f is self.events else None
                truncate_after(f.path, step, spill if f is self.metrics else None, keep=keep)
                f.file = open(f.path, "a", buffering=1)
        self.events_written = len(_lines(self.events.path)) if self.events.path.exists() else 0
        self.restored_events = None

    def close(self) -> None:
        self.metrics.close()
        self.events.close()


def log_report(out: Path, project: str, name: str, group: str, extra: dict | None = None) -> None:
    """A report folder as one wandb run in the group of the runs it reports on: every plot,
    ``report.html``, and ``extra`` (tables, say) under their keys."""
    import wandb

    run = wandb.init(
        project=project,
        name=name,
        group=group,
        dir=str(out),
        mode=wandb_mode(),
        settings=wandb.Settings(init_timeout=60, console="off"),
    )
    run.log(
        {f"plot/{p.stem}": wandb.Image(str(p)) for p in sorted(out.glob("*.png"))}
        | {"report": wandb.Html((out / "report.html").read_text())}
        | (extra or {})
    )
    run.finish()


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
    """wandb, with the run's files inside the run directory; events as a table in the run summary.

    wandb keeps one history row per step and drops a step lower than the newest it has, so the
    steps a rollback or a resume logs again must rewind the wandb run as they rewind
    ``metrics.jsonl``. ``rewind(k)`` uses wandb's own rewind: it finishes the current segment of
    the run and starts the next with ``resume_from="<id>?_step=<k>"`` (the same run id). Online,
    the server truncates the history after step k at once. Offline, every segment is a folder
    ``wandb/offline-run-<time>-<id>`` whose run record holds the branch point; ``wandb sync`` of
    the folders in time order replays the rewinds, so the synced history matches
    ``metrics.jsonl`` (the server archives the rows it drops). wandb's rewind is a preview feature
    of its cloud (not of self-managed servers): a server that refuses it, like one that cannot be
    reached, leaves the rest of the run offline, with a warning.

    The events table goes to the summary, not the history: the rollback event carries the spike's
    step, and a history row at that step would make wandb drop the replayed steps below it.
    """

    EVENT_COLUMNS = ("step", "kind", "value", "threshold", "baseline", "action")

    def __init__(self, run_dir: Path, project: str, name: str, config: dict, resume: bool):
        import wandb

        self.wandb = wandb
        group = config.get("utils", {}).get("wandb_group") or None
        self.kwargs = dict(project=project, name=name, dir=str(run_dir), config=config, group=group)
        self.mode = wandb_mode()
        self.id_file = run_dir / "wandb_id"
        self.run = None
        self.events: list[dict] = []
        self.restored_events: int | None = None
        self.has_run = resume and self.id_file.exists()  # a wandb run to rewind exists
        self.run_id = self.id_file.read_text().strip() if self.has_run else uuid.uuid4().hex[:12]
        if self.has_run and (run_dir / "events.jsonl").exists():
            self.events = read_jsonl(run_dir / "events.jsonl")
        if not resume:
            self._start(rewind_to=None)
        # resumed: the first segment starts at the rewind() to the checkpoint's step

    def _start(self, rewind_to: int | None) -> None:
        """Start a segment of the run: a new or resumed run, or with ``rewind_to`` wandb's rewind."""
        kwargs = dict(
            self.kwargs,
            id=self.run_id,
            settings=self.wandb.Settings(
                init_timeout=float(os.environ.get("WANDB_INIT_TIMEOUT", 30)), console="off"
            ),
        )
        if rewind_to is None or not self.has_run:
            kwargs["resume"] = "allow"
        else:
            kwargs["resume_from"] = f"{self.run_id}?_step={rewind_to}"
        try:
            self.run = self.wandb.init(mode=self.mode, **kwargs)
        except Exception as e:  # noqa: BLE001 - wandb unreachable or misconfigured: keep training
            if self.mode == "offline":
                raise
            warnings.warn(
                f"wandb could not start online ({type(e).__name__}); logging offline instead.", stacklevel=3
            )
            self.wandb.teardown()  # the failed online run still holds its id in wandb's service
            self.mode = "offline"  # and every later segment: no second wait on an unreachable server
            self.run = self.wandb.init(mode="offline", **kwargs)
        self.id_file.write_text(self.run_id)
        self.has_run = True
        if self.events:
            self._summarize_events()

    def _active(self):
        if self.run is None:  # resumed, and logging before any rewind: continue the run as it is
            self._start(rewind_to=None)
        return self.run

    def log(self, step: int, metrics: dict) -> None:
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        self._active().log(numbers, step=step)

    def event(self, record: dict) -> None:
        self._active()
        self.events.append(record)
        self._summarize_events()

    def _summarize_events(self) -> None:
        rows = [[json.dumps(json_safe(e.get(c))) for c in self.EVENT_COLUMNS] for e in self.events]
        self.run.summary["spike/events"] = self.wandb.Table(columns=list(self.EVENT_COLUMNS), data=rows)

    def load_state_dict(self, state: dict) -> None:
        self.restored_events = state.get("events")  # as LocalSink's: the table holds the same events

    def rewind(self, step: int, events: bool, spill: Path | None = None) -> None:
        """Rewind the wandb run to ``step`` (the kept events stay in the table; with ``events``,
        those written after the restored checkpoint leave it, as they leave ``events.jsonl``).
        wandb keeps what it drops itself: ``spill`` is not used."""
        restored, self.restored_events = self.restored_events, None
        if events:
            if restored is not None:
                self.events = self.events[:restored]
            else:
                self.events = [e for e in self.events if e.get("step", 0) <= step]
        if self.run is not None:
            self.run.finish()
        self._start(rewind_to=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
        # finish() can return before wandb's service has written the run's last records (offline,
        # the .wandb file); teardown waits for it. scripts/train.py then leaves by os._exit, which
        # would skip wandb's own teardown at exit.
        self.wandb.teardown()


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

    def state_dict(self) -> dict:
        return {k: v for s in self.sinks for k, v in s.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        for s in self.sinks:
            s.load_state_dict(state)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def open_sink(run_dir: Path, report_to: str, project: str, name: str, config: dict, resume: bool):
    sinks = [LocalSink(run_dir)]
    if report_to == "wandb":
        sinks.append(WandbSink(run_dir, project, name, config, resume))
    return FanOut(*sinks)
