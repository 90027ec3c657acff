"""DeepSpeed checkpoints with our client state: atomic ``latest``, retention, resume.

Tags are ``step-<N>`` (periodic) and ``spike-<N>`` (on a spike), in DeepSpeed's own format so its
tools (``zero_to_fp32.py``) work on them. A tag counts as complete once every rank has written it
and a ``dsinstab.json`` marker is in it; only then does ``latest`` move to it, by an atomic rename,
so a run killed mid-write resumes from the previous complete tag. A rollback points ``latest``
back at the tag it reloaded at once, so a run killed before its next save resumes from that state
rather than the one the rollback abandoned.

The marker records the step the tag holds, and every choice (resume, rollback target, retention)
goes by that step, never by the name: ``spike-N`` after a failed step N holds step N-1, and a tag
rewritten after a rollback holds whatever was saved last. The marker also records what maps the
saved data position onto batches, which a resumed run must match.

Every decision read from the file system is taken on global rank 0 and broadcast, so ranks on
nodes whose storage lags or is node-local never disagree.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import deepspeed.comm as dist
import torch
from deepspeed.accelerator import get_accelerator

from dsinstab.run.config import ConfigError, RunConfig

MARKER = "dsinstab.json"
TAG_RE = re.compile(r"^(step|spike)-(\d+)$")
RANKS = "the number of ranks"  # the one entry of the data layout that is not a config key


def write_atomic(path: Path, text: str, tmp_suffix: str = ".tmp") -> None:
    """``text`` into ``path`` by a rename; writers that may race give each their own ``tmp_suffix``."""
    tmp = path.with_name(path.name + tmp_suffix)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written on some rank; the previous one is untouched."""


def tag_step(tag: str) -> int:
    """The step in a tag's name (``-1`` for another name); choices use :meth:`Checkpointer.saved_step`."""
    m = TAG_RE.match(tag)
    return int(m.group(2)) if m else -1


# ---------------------------------------------------------------------------------------------
# Agreement across ranks


def on_rank_zero(fn: Callable[..., Any], *args) -> Any:
    """``fn(*args)`` run on global rank 0 only; every rank returns its result or raises the
    :class:`ConfigError` it raised. Collective when there are several ranks.

    Only rank 0's view of the file system counts: another node's copy may lag or not exist.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn(*args)
    box: list = [None]
    failure = None
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn(*args))
        except ConfigError as e:
            box[0] = ("refused", str(e))
        except Exception as e:  # the other ranks must not wait for a broadcast that never comes
            failure, box[0] = e, ("failed", f"{type(e).__name__}: {e}")
    # object collectives use the current device, which the engine sets only once it is built
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dist.broadcast_object_list(box, src=0, device=torch.device(get_accelerator().device_name(local)))
    if failure is not None:
        raise failure
    kind, value = box[0]
    if kind == "refused":
        raise ConfigError(value)
    if kind == "failed":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


def _first_error(error: str | None) -> str | None:
    """Every rank learns whether any rank failed, so all take the same branch."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return error
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


def _attempt(write: Callable[[], object], folder: Path) -> str | None:
    """Run a write; a full disk or other I/O failure becomes a message instead of an exception."""
    try:
        write()
    except OSError as e:
        return e.strerror or str(e)
    except RuntimeError as e:
        # torch.save reports I/O failures as RuntimeErrors of its zip writer
        while not folder.exists():
            folder = folder.parent
        if shutil.disk_usage(folder).free < 1 << 20:
            return "No space left on device"
        text = str(e)
        if (
            "strerror:" in text
        ):  # "[enforce fail at inline_container.cc:747] . open file failed with strerror: X"
            return text.rsplit("strerror:", 1)[1].strip()
        if "PytorchStreamWriter" in text:
            return text.splitlines()[0]
        raise
    return None


class _RecordedWrites:
    """Inside this block, DeepSpeed's checkpoint writes record a failure instead of raising.

    ``engine.save_checkpoint`` has barriers between its writes: a rank whose write raised would
    leave it early and wait in our error exchange while the others wait in DeepSpeed's barrier,
    for ever. With the writes recorded every rank goes through every collective, and after the
    first failure a rank's later writes are skipped.
    """

    def __init__(self, engine, folder: Path):
        self.engine, self.folder, self.error = engine, folder, None
        # the checkpoint engine's writes, and the recovery script DeepSpeed copies next to them
        self.targets = [(engine.checkpoint_engine, "save"), (engine.checkpoint_engine, "makedirs")]
        if hasattr(engine, "_copy_recovery_script"):
            self.targets.append((engine, "_copy_recovery_script"))

    def _guard(self, fn: Callable) -> Callable:
        def guarded(*args, **kwargs):
            if self.error is None:
                self.error = _attempt(lambda: fn(*args, **kwargs), self.folder)

        return guarded

    def __enter__(self) -> _RecordedWrites:
        for obj, name in self.targets:
            setattr(obj, name, self._guard(getattr(obj, name)))
        return self

    def __exit__(self, *exc) -> None:
        for obj, name in self.targets:
            delattr(obj, name)  # the instance attribute goes; the class's method shows again


# ---------------------------------------------------------------------------------------------
# What a resume must match


def data_layout(cfg: RunConfig, world: int, data_key: str) -> dict:
    """What maps the saved data position (micro steps taken) onto batches.

    A resume that changes any of it would continue on other data than the unbroken run, so it is
    refused; ``data_key`` is the packed data's cache key (corpus, tokenizer, block length).
    """
    t = cfg.trainer
    return {
        RANKS: world,
        "trainer.micro_batch_size": t.micro_batch_size,
        "trainer.gradient_accumulation_steps": t.gradient_accumulation_steps,
        "trainer.seed": t.seed,
        "model.seq_len": cfg.model.seq_len,
        "data_key": data_key,
        # (num_proc and streaming change how the blocks are made, not which: the data_key is the same)
        "dataset": {k: v for k, v in asdict(cfg.dataset).items() if k not in ("num_proc", "streaming")},
    }


def layout_mismatch(saved: dict, now: dict) -> str | None:
    """What differs between the layout a checkpoint was saved with and this run's, in words."""
    for key, value in saved.items():
        if key in ("data_key", "dataset") or now.get(key) == value:
            continue
        if key == RANKS:
            return f"it was saved by {value} ranks and this run has {now.get(key)}"
        return f"it was saved with {key}={value} and this run has {now.get(key)}"
    if saved.get("data_key") != now.get("data_key"):
        old, new = saved.get("dataset", {}), now.get("dataset", {})
        changed = [k for k in old if old[k] != new.get(k)]
        if changed:
            k = changed[0]
            return f"it was saved with dataset.{k}={old[k]!r} and this run has {new.get(k)!r}"
        return (
            f"its training data (cache key {saved.get('data_key')}) differs from this run's "
            f"({now.get('data_key')}): the corpus files or dsinstab's packing changed"
        )
    return None


# ---------------------------------------------------------------------------------------------
# The checkpointer


class Checkpointer:
    """Saves, finds and loads the run's tags. ``layout`` (see :func:`data_layout`) goes into every
    marker and is checked on resume; without it nothing is checked."""

    def __init__(self, engine, run_dir: Path, keep: int, is_main: bool, layout: dict | None = None):
        self.engine, self.keep, self.is_main, self.layout = engine, keep, is_main, layout
        self.dir = run_dir / "checkpoints"
        # who writes and deletes this rank's copy of a tag: DeepSpeed's rule for its model states
        node_local = engine is not None and engine.use_node_local_storage()
        self.is_writer = int(os.environ.get("LOCAL_RANK", "0")) == 0 if node_local else is_main

    # -- writing ------------------------------------------------------------------------------

    def save(self, tag: str, client_state: dict, step: int) -> None:
        """Collective: every rank must call it with the same tag and step.

        A failed write (a full disk) on any rank fails the save on every rank: the partial tag is
        removed, ``latest`` keeps naming the previous checkpoint, and :class:`CheckpointWriteError`
        says so. The marker is written only once every rank has written its part.
        """
        if self.is_writer:
            # a tag written again (after a rollback) is incomplete until its new marker is in.
            # DeepSpeed's save starts with a barrier, so no rank writes before this is gone.
            (self.dir / tag / MARKER).unlink(missing_ok=True)
        with _RecordedWrites(self.engine, self.dir) as writes:
            self.engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
        error = _first_error(writes.error)
        if error is None:
            error = _first_error(self.commit(tag, step) if self.is_writer else None)
        if error:
            if self.is_writer:
                shutil.rmtree(self.dir / tag, ignore_errors=True)
            previous = on_rank_zero(self.latest_tag)
            raise CheckpointWriteError(
                f"checkpoint {tag} could not be written ({error}); "
                + (
                    f"{previous} is intact and --resume latest continues from it."
                    if previous
                    else "no earlier checkpoint exists."
                )
            )
        doomed = on_rank_zero(self.prunable)
        if self.is_writer:
            for name in doomed:
                shutil.rmtree(self.dir / name, ignore_errors=True)
        dist.barrier()

    def commit(self, tag: str, step: int) -> str | None:
        """Mark ``tag`` complete as holding ``step`` and point ``latest`` at it; an I/O failure
        is returned as a message. Called by :meth:`save` once every rank has written its part."""
        marker = {"tag": tag, "step": step, **({"data_layout": self.layout} if self.layout else {})}
        error = _attempt(lambda: write_atomic(self.dir / tag / MARKER, json.dumps(marker)), self.dir)
        return error or _attempt(lambda: write_atomic(self.dir / "latest", tag), self.dir)

    def point_latest(self, tag: str) -> None:
        """Collective: ``latest`` names ``tag`` (a rollback's target, the run's state again), by the
        same atomic rename as :meth:`commit`; a failed write raises :class:`CheckpointWriteError`
        on every rank."""
        write = (lambda: write_atomic(self.dir / "latest", tag)) if self.is_writer else None
        error = _first_error(_attempt(write, self.dir) if write else None)
        if error:
            raise CheckpointWriteError(
                f"latest could not be pointed at {tag} ({error}); it may still name a checkpoint "
                "the run rolled back from."
            )

    def pin(self, tag: str) -> None:
        """Keep ``tag`` out of retention (the pre-spike state a study needs)."""
        if self.is_main and tag:
            pinned = sorted(set(self.pinned()) | {tag})
            write_atomic(self.dir / "pinned.json", json.dumps(pinned))

    def pinned(self) -> list[str]:
        path = self.dir / "pinned.json"
        return json.loads(path.read_text()) if path.exists() else []

    def prunable(self) -> list[str]:
        """What retention deletes: periodic tags beyond the newest ``keep`` by saved step, never
        ``latest`` nor a pinned one, and partial tags older than ``latest``. Read on rank 0."""
        latest = self.latest_tag()
        protected = {latest, *self.pinned()}
        periodic = [t for t in self.complete_tags() if t.startswith("step-")]
        doomed = [t for t in periodic[: -self.keep] if t not in protected]
        latest_step = self.saved_step(latest) if latest else None
        if latest_step is not None:
            doomed += [
                p.name
                for p in self.dir.iterdir()
                if p.is_dir() and TAG_RE.match(p.name) and not (p / MARKER).exists()
                if tag_step(p.name) < latest_step
            ]
        return doomed

    # -- reading (local; the collective methods below read on rank 0) --------------------------

    def latest_tag(self) -> str | None:
        path = self.dir / "latest"
        return path.read_text().strip() if path.exists() else None

    def marker(self, tag: str) -> dict | None:
        path = self.dir / tag / MARKER
        return json.loads(path.read_text()) if path.exists() else None

    def saved_step(self, tag: str) -> int | None:
        """The step ``tag`` holds (``None`` for an incomplete or missing tag)."""
        marker = self.marker(tag)
        return None if marker is None else int(marker.get("step", tag_step(tag)))

    def complete_tags(self) -> list[str]:
        """Complete tags, oldest first by the step they hold; at the same step, periodic before
        spike, then by name (a tag written again after a rollback has the later name)."""
        if not self.dir.is_dir():
            return []
        steps = {p.name: self.saved_step(p.name) for p in self.dir.iterdir() if TAG_RE.match(p.name)}
        complete = [t for t, s in steps.items() if s is not None]
        return sorted(complete, key=lambda t: (steps[t], t.startswith("spike"), tag_step(t)))

    # -- decisions (collective: every rank calls them; rank 0 reads, all get its answer) --------

    def resolve(self, which: str) -> str:
        """The tag ``--resume`` names, ``latest`` (the newest complete one) or a tag, checked to
        continue on the same data as the run that saved it."""
        return on_rank_zero(self._resolve, which)

    def _resolve(self, which: str) -> str:
        tags = self.complete_tags()
        if which == "latest":
            tag = self.latest_tag()
            if tag not in tags:
                if not tags:
                    raise ConfigError(f"--resume latest: {self.dir} holds no complete checkpoint.")
                tag = tags[-1]
        elif which in tags:
            tag = which
        else:
            have = ", ".join(tags) or "none"
            raise ConfigError(
                f"--resume {which}: no complete checkpoint {which} in {self.dir}; have: {have}."
            )
        saved = self.marker(tag).get("data_layout")
        problem = saved and self.layout and layout_mismatch(saved, self.layout)
        if problem:
            raise ConfigError(
                f"--resume {which}: {tag} cannot continue this run because {problem}, which would map "
                "its data position onto other batches; resume with the same setting or start a new run."
            )
        return tag

    def newest_before(self, step: int) -> str | None:
        """The newest complete periodic tag holding a step at or before ``step`` (for rollback)."""
        return on_rank_zero(self._newest_before, step)

    def _newest_before(self, step: int) -> str | None:
        older = [t for t in self.complete_tags() if t.startswith("step-") and self.saved_step(t) <= step]
        return older[-1] if older else None

    def load(self, tag: str) -> dict:
        """Collective: load model, optimizer, scheduler and loss scaler; return our client state."""
        path, client = self.engine.load_checkpoint(
            str(self.dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise ConfigError(f"--resume {tag}: DeepSpeed could not load {self.dir / tag}.")
        return client or {}
