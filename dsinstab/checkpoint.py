"""DeepSpeed checkpoints with our client state: atomic ``latest``, retention, resume.

Tags are ``step-<N>`` (periodic) and ``spike-<N>`` (on a spike), in DeepSpeed's own format so its
tools (``zero_to_fp32.py``) work on them. A tag counts as complete once every rank has written it
and rank 0 has put a ``dsinstab.json`` marker in it; only then does ``latest`` move to it, by an
atomic rename, so a run killed mid-write resumes from the previous complete tag.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import deepspeed.comm as dist

from dsinstab.config import ConfigError

MARKER = "dsinstab.json"
TAG_RE = re.compile(r"^(step|spike)-(\d+)$")


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written on some rank; the previous one is untouched."""


def _attempt(write, folder: Path) -> str | None:
    """Run a write; a full disk or other I/O failure becomes a message instead of an exception."""
    try:
        write()
    except OSError as e:
        return e.strerror or str(e)
    except RuntimeError:
        # torch.save reports a full disk as a RuntimeError of its zip writer
        if shutil.disk_usage(folder).free < 1 << 20:
            return "No space left on device"
        raise
    return None


def _first_error(error: str | None) -> str | None:
    """Every rank learns whether any rank failed, so all take the same branch."""
    if dist.get_world_size() == 1:
        return error
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


def tag_step(tag: str) -> int:
    m = TAG_RE.match(tag)
    return int(m.group(2)) if m else -1


class Checkpointer:
    def __init__(self, engine, run_dir: Path, keep: int, is_main: bool):
        self.engine, self.keep, self.is_main = engine, keep, is_main
        self.dir = run_dir / "checkpoints"

    # -- writing ------------------------------------------------------------------------------

    def save(self, tag: str, client_state: dict, step: int) -> None:
        """Collective: every rank must call it with the same tag.

        A failed write (a full disk) on any rank fails the save on every rank: the partial tag is
        removed, ``latest`` keeps naming the previous checkpoint, and :class:`CheckpointWriteError`
        says so.
        """
        error = _attempt(
            lambda: self.engine.save_checkpoint(
                str(self.dir), tag=tag, client_state=client_state, save_latest=False
            ),
            self.dir,
        )
        if error is None and self.is_main:
            marker = json.dumps({"tag": tag, "step": step})
            error = _attempt(lambda: write_atomic(self.dir / tag / MARKER, marker), self.dir)
            error = error or _attempt(lambda: write_atomic(self.dir / "latest", tag), self.dir)
        error = _first_error(error)
        if error:
            if self.is_main:
                shutil.rmtree(self.dir / tag, ignore_errors=True)
            previous = self.latest_tag()
            raise CheckpointWriteError(
                f"checkpoint {tag} could not be written ({error}); "
                + (
                    f"{previous} is intact and --resume latest continues from it."
                    if previous
                    else "no earlier checkpoint exists."
                )
            )
        if self.is_main:
            self.prune()
        dist.barrier()

    def pin(self, tag: str) -> None:
        """Keep ``tag`` out of retention (the pre-spike state a study needs)."""
        if self.is_main and tag:
            pinned = sorted(set(self.pinned()) | {tag})
            write_atomic(self.dir / "pinned.json", json.dumps(pinned))

    def pinned(self) -> list[str]:
        path = self.dir / "pinned.json"
        return json.loads(path.read_text()) if path.exists() else []

    def prune(self) -> None:
        """Delete periodic tags beyond the newest ``keep``, never ``latest`` nor a pinned one, and
        partial tags older than ``latest``."""
        latest = self.latest_tag()
        protected = {latest, *self.pinned()}
        periodic = [t for t in self.complete_tags() if t.startswith("step-")]
        for tag in periodic[: -self.keep]:
            if tag not in protected:
                shutil.rmtree(self.dir / tag, ignore_errors=True)
        latest_step = tag_step(latest) if latest else -1
        for path in self.dir.iterdir():
            if path.is_dir() and TAG_RE.match(path.name) and not (path / MARKER).exists():
                if tag_step(path.name) < latest_step:
                    shutil.rmtree(path, ignore_errors=True)

    # -- reading ------------------------------------------------------------------------------

    def latest_tag(self) -> str | None:
        path = self.dir / "latest"
        return path.read_text().strip() if path.exists() else None

    def complete_tags(self) -> list[str]:
        """Complete tags, oldest first (by step; periodic before spike at the same step)."""
        if not self.dir.is_dir():
            return []
        tags = [p.name for p in self.dir.iterdir() if TAG_RE.match(p.name) and (p / MARKER).exists()]
        return sorted(tags, key=lambda t: (tag_step(t), t.startswith("spike")))

    def resolve(self, which: str) -> str:
        """The tag ``--resume`` names: ``latest`` (the newest complete one) or a tag."""
        tags = self.complete_tags()
        if which == "latest":
            latest = self.latest_tag()
            if latest in tags:
                return latest
            if tags:
                return tags[-1]
            raise ConfigError(f"--resume latest: {self.dir} holds no complete checkpoint.")
        if which not in tags:
            have = ", ".join(tags) or "none"
            raise ConfigError(
                f"--resume {which}: no complete checkpoint {which} in {self.dir}; have: {have}."
            )
        return which

    def newest_before(self, step: int) -> str | None:
        """The newest complete periodic tag at or before ``step`` (for rollback)."""
        older = [t for t in self.complete_tags() if t.startswith("step-") and tag_step(t) <= step]
        return older[-1] if older else None

    def load(self, tag: str) -> dict:
        """Collective: load model, optimizer, scheduler and loss scaler; return our client state."""
        path, client = self.engine.load_checkpoint(
            str(self.dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise ConfigError(f"--resume {tag}: DeepSpeed could not load {self.dir / tag}.")
        return client or {}
