"""The training step and the loop around it: eval, detectors, events, checkpoints, signals.

Every decision here (log, evaluate, checkpoint, roll back, stop) is taken by every rank from the
step counter or from values reduced across ranks, so collective calls always line up.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import resource
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import deepspeed.comm as dist
import torch
from tqdm import tqdm

from dsinstab import engine as eng
from dsinstab.checkpoint import Checkpointer, CheckpointWriteError, write_atomic
from dsinstab.config import RunConfig
from dsinstab.data import BatchOrder, PackedData
from dsinstab.model import lm_loss
from dsinstab.spikes import SpikeMonitor, firing_record
from dsinstab.tracking import json_safe

EXIT_FINISHED, EXIT_MIN_LOSS_SCALE, EXIT_STOPPED, EXIT_CHECKPOINT_FAILED = 0, 3, 4, 5  # 2: bad input (cli)
EXIT_INTERRUPTED = 130
HISTORY = 48  # logged values kept for the "before the event" part of an event record


class LossScaleAtMinimum(RuntimeError):
    """DeepSpeed's fp16 scaler hit its minimum and gave up on the run."""


@dataclass
class Run:
    """What the loop works with: built once by :mod:`dsinstab.cli`, passed around, never mutated
    except for the progress fields at the bottom."""

    cfg: RunConfig
    engine: object
    model: torch.nn.Module
    data: PackedData
    order: BatchOrder
    monitor: SpikeMonitor
    checkpointer: Checkpointer
    sink: object
    diagnostics: object  # dsinstab.diagnostics.Diagnostics
    run_dir: Path
    rank: int
    world: int
    say: object = print
    # progress, all part of the checkpoint
    step: int = 0
    tokens_seen: int = 0
    history: deque = field(default_factory=lambda: deque(maxlen=HISTORY))
    stop_requested: bool = False


# ---------------------------------------------------------------------------------------------
# The step


def train_step(run: Run, ctx) -> tuple[torch.Tensor, float]:
    """One optimizer step over ``gradient_accumulation_steps`` micro batches.

    Returns this rank's mean (loss, z-loss) as a tensor (no host sync here) and the global grad
    norm. The probes see the logits, and the model just before and after the optimizer step.
    """
    engine, gas, diag = run.engine, run.cfg.trainer.gradient_accumulation_steps, run.diagnostics
    total, norm_before = torch.zeros(2), None
    for micro in range(gas):
        batch = run.data.blocks("train", run.order.next())
        with ctx:
            logits = engine(input_ids=batch[:, :-1]).logits
            diag.observe_logits(logits)
            loss, parts = lm_loss(logits, batch[:, 1:], run.cfg.trainer.z_loss)
            engine.backward(loss)
        if micro == gas - 1:  # the accumulation boundary: engine.step() below applies the update
            norm_before = eng.grads_norm(run.model) if eng.needs_pre_step_norm(engine) else None
            diag.before_step()
        step_engine(engine)
        total += torch.stack([parts["ce"], parts.get("z_loss", torch.zeros(()))]).float()
    diag.after_step()
    return total / gas, eng.grad_norm(engine, run.model, norm_before)


def step_engine(engine) -> None:
    try:
        engine.step()
    except Exception as e:
        if "loss scale already at minimum" in str(e):
            raise LossScaleAtMinimum(str(e)) from None
        raise


# ---------------------------------------------------------------------------------------------
# The loop


def train(run: Run) -> int:
    """Train to ``max_steps``; returns the exit code (see the README)."""
    try:
        return _train(run)
    except CheckpointWriteError as e:
        run.sink.event({"step": run.step, "kind": "checkpoint_failed", "action": "stop", "message": str(e)})
        run.say(f"step {run.step}: {e}")
        return finish(run, "checkpoint_failed", EXIT_CHECKPOINT_FAILED)


def _train(run: Run) -> int:
    t = run.cfg.trainer
    ctx = eng.compute_context(run.engine)
    install_signal_handlers(run)
    tokens_per_step = t.micro_batch_size * t.gradient_accumulation_steps * run.world * run.cfg.model.seq_len
    bar = progress_bar(run)
    window_time, window_tokens = 0.0, 0
    if run.step == 0:
        log_eval(run, ctx)
    while run.step < t.max_steps:
        step = run.step + 1
        lr = eng.current_lr(run.engine)
        run.diagnostics.begin_step(step)
        t0 = time.perf_counter()
        try:
            with injected_fault(run, step):
                losses, grad_norm = train_step(run, ctx)
        except LossScaleAtMinimum as e:
            return on_min_loss_scale(run, step, str(e))
        window_time += time.perf_counter() - t0
        window_tokens += tokens_per_step
        run.step, run.tokens_seen = step, run.tokens_seen + tokens_per_step
        (ce, z_loss), stop = reduce_step(run, losses)
        loss = ce + z_loss
        overflow, scale = eng.overflowed(run.engine), eng.loss_scale(run.engine)
        firings, spike_metrics = run.monitor.observe(loss, grad_norm, overflow, scale)
        diag_metrics = run.diagnostics.collect()
        metrics = {
            "train/loss": loss,
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "train/overflow": int(overflow),
            "train/skipped_steps": int(run.engine.skipped_steps),
            **precision_metrics(run.engine, scale),
            **spike_metrics,
            **({"train/z_loss": z_loss, "train/ce_loss": ce} if t.z_loss else {}),
        }
        run.history.append({"step": step, **metrics})
        metrics |= diag_metrics
        if step % t.log_every == 0 or step == t.max_steps or diag_metrics:
            metrics["train/tokens_per_s"] = window_tokens / max(window_time, 1e-9)
            run.sink.log(step, metrics)
            window_time, window_tokens = 0.0, 0
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", **({"scale": f"{scale:g}"} if scale is not None else {}))
        if step % t.eval_every == 0 or step == t.max_steps:
            log_eval(run, ctx)
        if firings:
            code = on_firings(run, step, firings, lr, grad_norm, scale)
            if code is not None:
                return code
        periodic = bool(t.checkpoint_every) and step % t.checkpoint_every == 0
        if periodic or stop:
            save(run, f"step-{step}")
        if stop:
            run.say(f"interrupted: saved step-{step}; continue with --resume latest")
            return finish(run, "interrupted", EXIT_INTERRUPTED)
    bar.close()
    return finish(run, "finished", EXIT_FINISHED)


def precision_metrics(engine, scale: float | None) -> dict:
    if scale is None:
        return {}
    out = {"train/loss_scale": scale}
    left = eng.hysteresis_left(engine)
    if left is not None:
        out["train/hysteresis"] = left
    return out


def reduce_step(run: Run, losses: torch.Tensor) -> tuple[list[float], bool]:
    """Mean losses over ranks, and whether any rank was asked to stop: one collective per step."""
    buf = torch.cat([losses.float(), torch.tensor([float(run.stop_requested)])])
    if run.world > 1:
        dist.all_reduce(buf)
    return (buf[:-1] / run.world).tolist(), bool(buf[-1] > 0)


@torch.no_grad()
def evaluate(run: Run, ctx) -> float:
    """Mean cross-entropy over the first ``eval_batches x micro_batch x world`` validation blocks."""
    t, engine = run.cfg.trainer, run.engine
    n = len(run.data.validation)
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for i in range(t.eval_batches):
        start = (i * run.world + run.rank) * t.micro_batch_size
        batch = run.data.blocks("validation", torch.arange(start, start + t.micro_batch_size) % n)
        with ctx:
            _, parts = lm_loss(engine(input_ids=batch[:, :-1]).logits, batch[:, 1:], 0.0)
        total += torch.tensor([float(parts["ce"]), 1.0], dtype=torch.float64)
    engine.train()
    if run.world > 1:
        dist.all_reduce(total)
    return float(total[0] / total[1])


def log_eval(run: Run, ctx) -> None:
    loss = evaluate(run, ctx)
    ppl = math.exp(loss) if loss < 700 else math.inf
    run.sink.log(run.step, {"eval/loss": loss, "eval/ppl": ppl})
    run.say(f"step {run.step}: eval/loss {loss:.4f}  eval/ppl {ppl:.2f}")


# ---------------------------------------------------------------------------------------------
# Events and actions


def on_firings(run: Run, step: int, firings, lr: float, grad_norm: float, scale) -> int | None:
    action = run.monitor.decide(step)
    record = event_record(run, step, firings, lr, grad_norm, scale, action)
    run.sink.event(record)
    run.say(f"step {step}: {', '.join(f.kind for f in firings)} -> {action}")
    if action == "checkpoint":
        pre_spike = run.checkpointer.newest_before(step)
        run.checkpointer.pin(pre_spike)
        save(run, f"spike-{step}", event=record)
    elif action == "stop":
        save(run, f"spike-{step}", event=record)
        return finish(run, "stopped", EXIT_STOPPED)
    elif action == "rollback":
        rollback(run, step, record)
    return None


def event_record(run: Run, step: int, firings, lr, grad_norm, scale, action: str) -> dict:
    """One line of events.jsonl: what fired, the state around it, and the batch on every rank."""
    mine = run.order.indices_at(run.order.position - 1).tolist()
    gathered = [None] * run.world
    if run.world > 1:
        dist.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    first = firings[0]
    return json_safe(
        {
            "step": step,
            "kind": first.kind,
            "value": first.value,
            "threshold": first.threshold,
            "baseline": first.baseline,
            "firings": [firing_record(f) for f in firings],
            "action": action,
            "lr": lr,
            "grad_norm": grad_norm,
            "loss_scale": scale,
            "batch_indices": gathered,
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
    policy = run.monitor.state_dict()["policy"]
    restore(run, run.checkpointer.load(tag))
    run.monitor.load_state_dict({**run.monitor.state_dict(), "policy": policy})
    skipped = (step + s.rollback_skip - run.step) * run.cfg.trainer.gradient_accumulation_steps
    run.order.position += skipped
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


def on_min_loss_scale(run: Run, step: int, message: str) -> int:
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
    run.step = step - 1  # the step that failed was never applied
    save(run, f"spike-{step}")
    run.say(
        f"step {step}: the fp16 loss scale is at its minimum ({scale:g}) and DeepSpeed cannot go on; "
        f"saved spike-{step} (the last good state)."
    )
    return finish(run, "min_loss_scale", EXIT_MIN_LOSS_SCALE)


@contextlib.contextmanager
def injected_fault(run: Run, step: int):
    """The configured deliberate fault, for one step: lr times ``factor`` or the embeddings scaled.

    Like a bad batch, it is tied to the data position of step ``at_step`` of an unbroken run, so a
    rollback that skips those batches also skips the fault.
    """
    inj = run.cfg.trainer.inject
    gas = run.cfg.trainer.gradient_accumulation_steps
    if not inj.at_step or run.order.position != (inj.at_step - 1) * gas:
        yield
        return
    groups = run.engine.optimizer.param_groups
    saved_lr = [g["lr"] for g in groups]
    scale = run.model.embedding_scale
    saved_factor = scale.factor
    if inj.kind == "lr":
        for g in groups:
            g["lr"] *= inj.factor
    else:
        scale.factor *= inj.factor
    try:
        yield
    finally:
        for g, lr in zip(groups, saved_lr):
            g["lr"] = lr
        scale.factor = saved_factor


# ---------------------------------------------------------------------------------------------
# Checkpoint state, signals, status


def client_state(run: Run) -> dict:
    return {
        "step": run.step,
        "tokens_seen": run.tokens_seen,
        "batch_order": run.order.state_dict(),
        "monitor": run.monitor.state_dict(),
        "history": list(run.history),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
    }


def restore(run: Run, client: dict) -> None:
    state = client["dsinstab"]
    run.step, run.tokens_seen = state["step"], state["tokens_seen"]
    run.order.load_state_dict(state["batch_order"])
    run.monitor.load_state_dict(state["monitor"])
    run.history.clear()
    run.history.extend(state["history"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])


def save(run: Run, tag: str, event: dict | None = None) -> None:
    state = {"dsinstab": client_state(run)}
    if event is not None:
        state["dsinstab_event"] = event
    run.checkpointer.save(tag, state, run.step)


def install_signal_handlers(run: Run) -> None:
    """SIGTERM/SIGINT ask for a checkpoint and a clean exit at the end of the current step."""

    first: list[float] = []

    def handler(signum, frame):
        # Ctrl-C reaches the launcher and the ranks at once, and the launcher then sends SIGTERM:
        # signals close together are one request. A second one, seconds later, gives up at once.
        if first and time.monotonic() - first[0] > 5:
            raise KeyboardInterrupt
        first[:] = first or [time.monotonic()]
        run.stop_requested = True

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def progress_bar(run: Run):
    t = run.cfg.trainer
    disable = run.rank != 0 or not run.cfg.utils.progress_bar
    return tqdm(total=t.max_steps, initial=run.step, disable=disable, dynamic_ncols=True, mininterval=1.0)


def finish(run: Run, state: str, code: int) -> int:
    write_status(run, state, code)
    return code


def write_status(run: Run, state: str, code: int | None) -> None:
    if run.rank == 0:
        write_atomic(
            run.run_dir / "status.json",
            json.dumps(
                {
                    "state": state,
                    "step": run.step,
                    "exit_code": code,
                    "tokens_seen": run.tokens_seen,
                    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                }
            ),
        )
