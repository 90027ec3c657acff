"""The training step and the loop around it: eval, detectors, events, checkpoints, signals.

Every decision here (log, evaluate, checkpoint, roll back, stop) is taken by every rank from the
step counter or from values reduced across ranks, so collective calls always line up.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import deepspeed.comm as dist
import torch
from tqdm import tqdm

from dsinstab.instruments.spikes import SpikeMonitor, firing_record
from dsinstab.run import engine as eng
from dsinstab.run import lowp
from dsinstab.run.checkpoint import Checkpointer, CheckpointWriteError, write_atomic
from dsinstab.run.config import RunConfig
from dsinstab.run.data import BatchOrder, PackedData
from dsinstab.run.model import lm_loss
from dsinstab.run.plugins import Plugins
from dsinstab.run.state import restore, save
from dsinstab.run.tracking import json_safe

EXIT_FINISHED, EXIT_MIN_LOSS_SCALE, EXIT_STOPPED, EXIT_CHECKPOINT_FAILED = 0, 3, 4, 5  # 2: bad input (cli)
EXIT_INTERRUPTED = 130
HISTORY = 48  # logged values kept for the "before the event" part of an event record


class LossScaleAtMinimum(RuntimeError):
    """DeepSpeed's fp16 scaler hit its minimum and gave up on the run."""


@dataclass
class Run:
    """What the loop works with: built once by :mod:`dsinstab.commands.train`, passed around, never mutated
    except for the progress fields at the bottom."""

    cfg: RunConfig
    engine: object
    model: torch.nn.Module
    data: PackedData
    order: BatchOrder
    monitor: SpikeMonitor
    checkpointer: Checkpointer
    sink: object
    plugins: Plugins  # probes and mitigations: per-step hooks whose state rides in the checkpoint
    run_dir: Path
    rank: int
    world: int
    say: object = print
    # progress, all part of the checkpoint
    step: int = 0
    tokens_seen: int = 0
    history: deque = field(default_factory=lambda: deque(maxlen=HISTORY))
    stop_requested: bool = False
    step_indices: list = field(default_factory=list)  # this rank's blocks of the step, per micro batch
    step_losses: torch.Tensor | None = None  # this rank's (ce, z-loss) of the step, before its update


# ---------------------------------------------------------------------------------------------
# The step


def train_step(run: Run, ctx) -> tuple[torch.Tensor, float]:
    """One optimizer step over ``gradient_accumulation_steps`` micro batches.

    Returns this rank's mean (loss, z-loss) as a tensor on the engine's device (no host sync here)
    and the global grad norm. The plug-ins see the logits, and the model just before and after the
    optimizer step.
    """
    engine, gas, plugins = run.engine, run.cfg.trainer.gradient_accumulation_steps, run.plugins
    total, norm_before = torch.zeros(2, device=engine.device), None
    run.step_indices = []
    for micro in range(gas):
        indices = run.order.next()
        run.step_indices.append(indices.tolist())
        batch = run.data.blocks("train", indices).to(engine.device, non_blocking=True)
        with ctx:
            logits = engine(input_ids=batch[:, :-1]).logits
            plugins.observe_logits(logits)
            loss, parts = lm_loss(logits, batch[:, 1:], run.cfg.trainer.z_loss)
            engine.backward(loss)
        total += torch.stack([parts["ce"], parts.get("z_loss", parts["ce"] * 0)]).float()
        if micro == gas - 1:  # the accumulation boundary: engine.step() below applies the update
            norm_before = eng.grads_norm(run.model) if eng.needs_pre_step_norm(engine) else None
            run.step_losses = total / gas  # skip-step judges the step's loss before its update
            plugins.before_step()
        step_engine(engine)
    plugins.after_step()
    return run.step_losses, eng.grad_norm(engine, run.model, norm_before)


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
    """Train to ``max_steps``; returns the exit code (see the README).

    The signal handlers are this function's for its length: the caller's come back afterwards,
    so a process that trains several runs (a benchmark, a sweep) still answers SIGTERM.
    """
    previous = install_signal_handlers(run)
    try:
        return _train(run)
    except CheckpointWriteError as e:
        run.sink.event({"step": run.step, "kind": "checkpoint_failed", "action": "stop", "message": str(e)})
        run.say(f"step {run.step}: {e}")
        return finish(run, "checkpoint_failed", EXIT_CHECKPOINT_FAILED)
    except KeyboardInterrupt:  # a second signal: leave at once, without a checkpoint
        write_status(run, "interrupted", EXIT_INTERRUPTED, "a second SIGINT/SIGTERM; no checkpoint saved")
        raise
    except BaseException as e:
        write_status(run, "failed", None, f"{type(e).__name__}: {e}")
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _train(run: Run) -> int:
    t = run.cfg.trainer
    ctx = lowp.compute_context(run.engine, run.cfg.utils.cpu_compute, log=run.say)
    run.plugins.bind(run)
    tokens_per_step = t.micro_batch_size * t.gradient_accumulation_steps * run.world * run.cfg.model.seq_len
    bar = progress_bar(run)
    window_time, window_tokens = 0.0, 0
    if run.step == 0:
        log_eval(run, ctx)
    while run.step < t.max_steps:
        step = run.step + 1
        lr = eng.current_lr(run.engine)
        run.plugins.begin_step(step)
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
        for shift in run.monitor.pop_level_shifts():  # recorded, no action: its spike had one
            run.sink.event(json_safe({"step": step, **firing_record(shift), "action": "none"}))
        diag_metrics = dict(sorted(run.plugins.collect().items()))
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
        rolled_back = run.step != step  # the state is a checkpoint's again: nothing new to save
        periodic = bool(t.checkpoint_every) and step % t.checkpoint_every == 0
        if (periodic or stop) and not rolled_back:
            save(run, f"step-{step}")
        if stop:
            run.say(
                f"interrupted: {'rolled back to a checkpoint' if rolled_back else f'saved step-{step}'}; "
                "continue with --resume latest"
            )
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
    """Mean losses over ranks, and whether any rank was asked to stop: one collective, and the
    step's one host sync."""
    buf = torch.cat([losses.float(), losses.new_full((1,), float(run.stop_requested))])
    if run.world > 1:
        dist.all_reduce(buf)
    *means, stops = buf.tolist()
    return [m / run.world for m in means], stops > 0


@torch.no_grad()
def evaluate(run: Run, ctx) -> float:
    """Mean cross-entropy over the first ``eval_batches x micro_batch x world`` validation blocks."""
    t, engine = run.cfg.trainer, run.engine
    n = len(run.data.validation)
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=engine.device)  # (sum of losses, batches)
    for i in range(t.eval_batches):
        start = (i * run.world + run.rank) * t.micro_batch_size
        indices = torch.arange(start, start + t.micro_batch_size) % n
        batch = run.data.blocks("validation", indices).to(engine.device, non_blocking=True)
        with ctx:
            _, parts = lm_loss(engine(input_ids=batch[:, :-1]).logits, batch[:, 1:], 0.0)
        total[0] += parts["ce"].double()
        total[1] += 1
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
    """One line of events.jsonl: what fired, the state around it, and the blocks of the step on
    every rank: ``batch_indices[rank][micro_batch]``."""
    gathered = [None] * run.world
    if run.world > 1:
        dist.all_gather_object(gathered, run.step_indices)
    else:
        gathered = [run.step_indices]
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
    policy, read = run.monitor.state_dict()["policy"], run.order.position
    restore(run, run.checkpointer.load(tag))
    run.monitor.load_state_dict({**run.monitor.state_dict(), "policy": policy})
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
    run.step = step - 1  # the step that failed was never applied: neither were its batches read
    run.order.position -= run.cfg.trainer.gradient_accumulation_steps
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
        # The schedule's own value: the lr of the next step when this one was applied, of this
        # step again when an fp16 overflow skipped it (the schedule then did not advance).
        for g, lr in zip(groups, run.engine.lr_scheduler.get_last_lr()):
            g["lr"] = lr
        scale.factor = saved_factor


# ---------------------------------------------------------------------------------------------
# Signals, status


def install_signal_handlers(run: Run) -> dict:
    """SIGTERM/SIGINT ask for a checkpoint and a clean exit at the end of the current step;
    returns the handlers they replace."""

    first: list[float] = []

    def handler(signum, frame):
        # Ctrl-C reaches the launcher and the ranks at once, and the launcher then sends SIGTERM:
        # signals close together are one request. A second one, seconds later, gives up at once.
        if first and time.monotonic() - first[0] > 5:
            raise KeyboardInterrupt
        first[:] = first or [time.monotonic()]
        run.stop_requested = True

    return {signum: signal.signal(signum, handler) for signum in (signal.SIGTERM, signal.SIGINT)}


def progress_bar(run: Run):
    t = run.cfg.trainer
    disable = run.rank != 0 or not run.cfg.utils.progress_bar
    return tqdm(total=t.max_steps, initial=run.step, disable=disable, dynamic_ncols=True, mininterval=1.0)


def finish(run: Run, state: str, code: int) -> int:
    write_status(run, state, code)
    return code


def write_status(run: Run, state: str, code: int | None, message: str | None = None) -> None:
    if run.rank == 0:
        status = {
            "state": state,
            "step": run.step,
            "exit_code": code,
            "tokens_seen": run.tokens_seen,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        }
        write_atomic(
            run.run_dir / "status.json", json.dumps(status | ({"message": message} if message else {}))
        )
