"""How a run ends: one enum for the state in ``status.json``, its exit code and its words.

The loop writes it, the train command lists it in ``--help``, the reports print it, and the sweep
and the replay read it to tell an ended point from one to run again.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path

EXIT_BAD_INPUT = 2  # a ConfigError: one sentence on stderr, nothing written


class RunEnd(enum.Enum):
    """``(exit code, how a report says it)``; the value in ``status.json`` is the member's name."""

    finished = (0, "finished")
    min_loss_scale = (3, "died at the minimum loss scale")
    stopped = (4, "stopped by a detector")
    checkpoint_failed = (5, "stopped: a checkpoint could not be written")
    interrupted = (130, "interrupted (resumable)")
    failed = (None, "failed (see its log)")
    running = (None, "still running or killed")

    @property
    def code(self) -> int | None:
        return self.value[0]

    @property
    def words(self) -> str:
        return self.value[1]

    @property
    def is_outcome(self) -> bool:
        """An ending that is the run's result (a sweep point or a branch that need not run again)."""
        return self in (RunEnd.finished, RunEnd.min_loss_scale, RunEnd.stopped)

    @classmethod
    def of(cls, state: str | None) -> RunEnd | None:
        """The member named by a ``status.json`` state; ``None`` for a missing or unknown one."""
        return cls.__members__.get(state or "")


EXIT_INTERRUPTED = RunEnd.interrupted.code


def read_status(run_dir: Path) -> dict:
    """A run directory's ``status.json`` (empty when there is none yet, or it cannot be read)."""
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def outcome(status: dict) -> RunEnd | None:
    """How a run ended, where that ending is its result (finished, died at the minimum loss scale,
    stopped by a detector: a rerun skips it); ``None`` for any other state or none."""
    end = RunEnd.of(status.get("state"))
    return end if end is not None and end.is_outcome else None


# the exit codes as ``train.py --help`` lists them
EXIT_CODES = {
    RunEnd.finished.code: "finished",
    EXIT_BAD_INPUT: "bad input (one sentence on stderr, nothing written)",
    RunEnd.min_loss_scale.code: "DeepSpeed's fp16 loss scale hit its minimum (the last good state is saved)",
    RunEnd.stopped.code: "stopped by a spike detector",
    RunEnd.checkpoint_failed.code: "a checkpoint could not be written",
    RunEnd.interrupted.code: "interrupted after saving a checkpoint (--resume latest continues)",
}
