"""What a firing does: the event record and the actions: a spike checkpoint, a stop, PaLM's rollback, the end at fp16's minimum loss scale.

Detectors (plug-ins in :mod:`dsinstab.instruments`) only say what fired; the run decides here what
follows, from the same firings on every rank, so every rank takes the same action.
"""

from __future__ import annotations

import deepspeed.comm as dist

from dsinstab.run import engine as eng
from dsinstab.run.plugins import Firing, Step, firing_record
from dsinstab.run.state import Run, restore, save
from dsinstab.run.status import RunEnd
from dsinstab.run.tracking import json_safe


def on_firings(run: Run, step: Step, firings: list[Firing]) -> RunEnd | None:
    """Record the firings as one event and take the policy's action; a run end when it stops."""
    action = run.policy.decide(step.number)
    record = event_record(run, step, firings, action)
    run.sink.event(record)
    run.say(f"step {step.number}: {', '.join(f.kind for f in firings)} -> {action}")
    if action == "checkpoint":
        pre_spike = run.checkpointer.newest_before(step.number)
        run.checkpointer.pin(pre_spike)
        save(run, f"spike-{step.number}", event=record)
    elif action == "stop":
        save(run, f"spike-{step.number}", event=record)
        return RunEnd.stopped
    elif action == "rollback":
        rollback(run, step.number, record)
    return None


def gathered_blocks(run: Run, step: Step) -> list:
    """``batch_indices[rank][micro_batch]``: the blocks of the step on every rank (collective)."""
    if run.world == 1:
        return [step.blocks]
    gathered = [None] * run.world
    dist.all_gather_object(gathered, step.blocks)
    return gathered


def event_record(run: Run, step: Step, firings: list[Firing], action: str) -> dict:
    """One line of events.jsonl: what fired, the state around it, and the blocks of the step on
    every rank."""
    first = firings[0]
    return json_safe(
        {
            "step": step.number,
            "kind": first.kind,
            "value": first.value,
            "threshold": first.threshold,
            "baseline": first.baseline,
            "firings": [firing_record(f) for f in firings],
            "action": action,
            "lr": step.lr,
            "grad_norm": step.norm,
            "loss_scale": step.loss_scale,
            "batch_indices": gathered_blocks(run, step),
            "recent": list(run.history),
        }
    )


def rollback(run: Run, step: int, record: dict) -> None:
    """PaLM's remedy: reload the newest checkpoint at least ``rollback_min_back`` steps before the
    spike and skip the batches from there through the spike plus ``rollback_skip`` more."""
    s = run.cfg.trainer.spikes
    tag = run.checkpointer.newest_before(step - s.rollback_min_back)
    if tag is None:
        run.say(f"step {step}: no checkpoint {s.rollback_min_back}+ steps back; continuing without rollback")
        return
    policy, read = run.policy.state_dict(), run.order.position
    restore(run, run.checkpointer.load(tag))
    # a kill from here on resumes from the state the run rolled back to, not the one it left
    run.checkpointer.point_latest(tag)
    run.policy.load_state_dict(policy)  # the counts go on: caps hold across rollbacks
    # Skip what was read since the checkpoint, by data position: after an earlier rollback to the
    # same tag the data ran ahead of the step count, and the earlier spike's batches stay skipped.
    restored = run.order.position
    run.order.position = read + s.rollback_skip * run.cfg.trainer.gradient_accumulation_steps
    skipped = run.order.position - restored
    run.sink.rewind(run.step, events=False, spill=run.run_dir / "metrics_rolled_back.jsonl")
    run.sink.event(
        {
            "step": step,
            "kind": "rollback",
            "action": "rollback",
            "to_tag": tag,
            "resumed_at": run.step,
            "skipped_micro_batches": skipped,
            "cause": record["kind"],
        }
    )
    run.say(f"step {step}: rolled back to {tag}, skipping {skipped} micro batches")


def on_min_loss_scale(run: Run, step: int, message: str) -> RunEnd:
    """DeepSpeed ended the run at its minimum loss scale: record it, keep the last good state."""
    scale = eng.loss_scale(run.engine)
    run.sink.event(
        json_safe(
            {
                "step": step,
                "kind": "loss_scale_minimum",
                "value": scale,
                "action": "stop",
                "message": message,
                "recent": list(run.history),
            }
        )
    )
    run.step = step - 1  # the step that failed was never applied: neither were its batches read
    run.order.position -= run.cfg.trainer.gradient_accumulation_steps
    save(run, f"spike-{step}")
    run.say(
        f"step {step}: the fp16 loss scale is at its minimum ({scale:g}) and DeepSpeed cannot go on; "
        f"saved spike-{step} (the last good state)."
    )
    return RunEnd.min_loss_scale
