"""What a loaded run is: :class:`RunData` and :func:`load_run`, and what every report shares about
runs (their colours in a plot, the words for how they ended).

The comparison report, its overflow section, the replay and the sweep all read run directories
through here; :mod:`dsinstab.reports.render` draws the tables, figures and pages they write.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dsinstab.run.config import ConfigError
from dsinstab.run.status import RunEnd
from dsinstab.run.tracking import read_jsonl

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def ending(state: str | None, otherwise: str = "unknown") -> str:
    """How a report says a ``status.json`` state ended (:class:`RunEnd`'s words); ``otherwise``
    for a missing or unknown state."""
    end = RunEnd.of(state)
    return end.words if end else otherwise


@dataclass
class RunData:
    name: str
    path: Path
    config: dict
    metrics: list[dict]
    events: list[dict] = field(default_factory=list)
    status: dict = field(default_factory=dict)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """Steps and values of one metric, in step order (absent steps left out)."""
        rows = [(r["step"], r[key]) for r in self.metrics if key in r]
        return [s for s, _ in rows], [v for _, v in rows]

    @property
    def precision(self) -> str:
        ds = self.config.get("ds_config", {})
        return (
            "fp16"
            if ds.get("fp16", {}).get("enabled")
            else "bf16"
            if ds.get("bf16", {}).get("enabled")
            else "fp32"
        )

    @property
    def label(self) -> str:
        return f"{self.name} ({self.precision})"

    @property
    def firings(self) -> list[tuple[int, str]]:
        """(step, kind) of every detector firing: each spike event lists the firings of its step.
        Events without firings (a rollback, DeepSpeed giving up, a failed checkpoint) are not spikes."""
        return [(e["step"], f["kind"]) for e in self.events for f in e.get("firings", [])]

    @property
    def end_step(self) -> int | None:
        """The step a run was ended at, for runs that did not finish: the stopping event's step.
        DeepSpeed's giving up at the minimum loss scale is at step N while status.json holds N-1,
        the last step applied."""
        stops = [e["step"] for e in self.events if e.get("action") == "stop"]
        return stops[-1] if stops else self.status.get("step")


def load_run(path: str | Path) -> RunData:
    """A run directory; anything else is refused with one sentence (exit 2 in the scripts)."""
    path = Path(path)
    if not (path / "metrics.jsonl").exists() or not (path / "config.yaml").exists():
        raise ConfigError(f"{path}: not a run directory (it needs metrics.jsonl and config.yaml).")
    try:
        metrics = read_jsonl(path / "metrics.jsonl")
    except ValueError as e:
        raise ConfigError(f"{path / 'metrics.jsonl'}: not valid JSON lines ({e}).") from None
    if not any("train/loss" in r for r in metrics):
        raise ConfigError(f"{path / 'metrics.jsonl'}: holds no logged training step.")
    events = read_jsonl(path / "events.jsonl") if (path / "events.jsonl").exists() else []
    status = yaml.safe_load((path / "status.json").read_text()) if (path / "status.json").exists() else {}
    config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    return RunData(path.name, path, config, metrics, events, status)
