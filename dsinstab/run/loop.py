"""The training step and the loop around it: eval, plug-ins, events, checkpoints, signals.

Every decision here (log, evaluate, checkpoint, roll back, stop) is taken by every rank from the
step counter or from values reduced across ranks, so collective calls always line up.
"""

from __future__ import annotations

import json
import math
import resource
import signal
import sys
import time
from contextlib import contextmanager

import deepspeed.comm as dist
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.fp16.loss_scaler import MIN_LOSS_SCALE
from tqdm import tqdm

from dsinstab.run import engine as eng
from dsinstab.run import lowp
from dsinstab.run.actions import on_firings, on_min_loss_scale
from dsinstab.run.checkpoint import CheckpointWriteError, write_atomic
from dsinstab.run.data import Batches
from dsinstab.run.evaluate import evaluate
from dsinstab.run.model import lm_loss
from dsinstab.run.plugins import Readings, Step
from dsinstab.run.state import Run, save
from dsinstab.run.status import RunEnd, read_status

# families every step has, written on logging steps; any other metric a plug-in reports (a probe's
# reading, a mitigation acting) makes its step a logging step
EVERY_STEP = ("train/", "spike/")


class LossScaleAtMinimum(RuntimeError):
    """DeepSpeed's fp16 scaler hit its minimum and gave up on the run."""


# ---------------------------------------------------------------------------------------------
# The step


def train_step(run: Run, step: Step, ctx, batches: Batches | None = None) -> None:
    """One optimizer step over ``gradient_accumulation_steps`` micro batches, filling in ``step``:
    its blocks, this rank's mean (loss, z-loss) and the global grad norm, all left on the device.
    The plug-ins see the logits, and the model just before and after the optimizer step."""
    engine, gas, plugins = run.engine, run.cfg.trainer.gradient_accumulation_steps, run.plugins
    batches = batches or Batches(run.data, run.order, engine.device)
    total = torch.zeros(2, device=engine.device)
    for micro in range(gas):
        indices, _, batch = batches.next()
        step.blocks.append(indices.tolist())
        with ctx:
            logits = engine(input_ids=batch[:, :-1]).logits
            plugins.observe_logits(logits)
            loss, parts = lm_loss(logits, batch[:, 1:], run.cfg.trainer.z_loss)
            engine.backward(loss)
        total += torch.stack([parts["ce"], parts.get("z_loss", parts["ce"] * 0)]).float()
        if micro == gas - 1:  # the accumulation boundary: engine.step() below applies the update
            step.losses = total / gas  # skip-step judges the step's loss before its update
            if eng.bare_optimizer(engine):  # DeepSpeed reports no norm there: measure it before the update
                step.grad_norm = eng.grads_norm(run.model)
            plugins.before_step(step)
        step_engine(engine)
    if step.grad_norm is None:
        step.grad_norm = eng.reported_grad_norm(engine)
    plugins.after_step(step)
    batches.prefetch()  # the next step's batches, read while the device works on this one


def step_engine(engine) -> None:
    """``engine.step()``; :class:`LossScaleAtMinimum` where an overflow meets a loss scale that can
    go no lower. DeepSpeed's ZeRO 1-3 optimizers raise there; ZeRO-0's clamps the scale at its
    minimum and skips every step from then on, so its end is detected from the same condition."""
    floor = at_loss_scale_floor(engine)  # read before the step: an overflow changes the scaler
    try:
        engine.step()
    except Exception as e:
        if "loss scale already at minimum" in str(e):
            raise LossScaleAtMinimum(str(e)) from None
        raise
    if floor is not None and eng.overflowed(engine):
        raise LossScaleAtMinimum(
            f"Current loss scale already at minimum ({floor:g}) - cannot decrease scale anymore."
        )


def at_loss_scale_floor(engine) -> float | None:
    """The scale, where an overflow in the coming ``engine.step()`` is the end: a dynamic fp16 scale
    already at the ds_config's ``min_loss_scale``, with no hysteresis left to spend (the condition
    DeepSpeed's ZeRO optimizers raise on), at an accumulation boundary; ``None`` otherwise."""
    if not (engine.fp16_enabled() and engine.dynamic_loss_scale()):
        return None
    if not engine.is_gradient_accumulation_boundary():
        return None
    scale, left = eng.loss_scale(engine), eng.hysteresis_left(engine)
    minimum = engine.dynamic_loss_scale_args()[MIN_LOSS_SCALE]
    return scale if scale <= minimum and (left is None or left <= 1) else None


def advance(run: Run, ctx, batches: Batches | None = None) -> tuple[Step, dict, bool]:
    """Train one step and read it: the step record with its reduced values, the plug-ins' metrics,
    and whether any rank was asked to stop. One host copy for the loop's values and every
    plug-in's readings together. ``batches``: the loop's, which reads ahead (default: none ahead)."""
    step = Step(number=run.step + 1, lr=eng.current_lr(run.engine))
    run.plugins.begin_step(step)
    train_step(run, step, ctx, batches)
    losses = step.losses
    stop = torch.full((), float(run.stop_requested), device=losses.device)
    own: Readings = {
        "ce": (losses[0], "mean"),
        "z_loss": (losses[1], "mean"),
        "stop": (stop, "max"),
        "grad_norm": (step.grad_norm, "same"),
    }
    values = run.plugins.read(step, own)
    step.loss = values["ce"] + values["z_loss"]
    step.norm = eng.finite_or_inf(values["grad_norm"])
    step.overflow, step.loss_scale = eng.overflowed(run.engine), eng.loss_scale(run.engine)
    metrics = {
        "train/loss": step.loss,
        "train/lr": step.lr,
        "train/grad_norm": step.norm,
        "train/overflow": int(step.overflow),
        "train/skipped_steps": int(run.engine.skipped_steps),
        **precision_metrics(run.engine, step.loss_scale),
        **(
            {"train/z_loss": values["z_loss"], "train/ce_loss": values["ce"]}
            if run.cfg.trainer.z_loss
            else {}
        ),
    }
    metrics |= dict(sorted(run.plugins.collect(step).items()))
    return step, metrics, values["stop"] > 0


# ---------------------------------------------------------------------------------------------
# The loop


def train(run: Run) -> int:
    """Train to ``max_steps``; returns the exit code (see the README).

    The signal handlers are this function's for its length: the caller's come back afterwards,
    so a process that trains several runs (a benchmark, a sweep) still answers SIGTERM.
    """
    previous = install_signal_handlers(run)
    try:
        if run.world > 1:  # rank 0 has written this segment's "running": a failure from here on stays
            dist.barrier()
        return _train(run)
    except CheckpointWriteError as e:
        run.sink.event({"step": run.step, "kind": "checkpoint_failed", "action": "stop", "message": str(e)})
        run.say(f"step {run.step}: {e}")
        return finish(run, RunEnd.checkpoint_failed)
    except KeyboardInterrupt:  # a second signal: leave at once, without a checkpoint
        write_status(run, RunEnd.interrupted, "a second SIGINT/SIGTERM; no checkpoint saved")
        raise
    except BaseException as e:
        write_status(run, RunEnd.failed, f"{type(e).__name__}: {e}")
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _train(run: Run) -> int:
    t = run.cfg.trainer
    ctx = lowp.compute_context(run.engine, run.cfg.utils.cpu_compute, log=run.say)
    run.plugins.bind(run)
    last = run.plugins.last_step(t.max_steps)  # a branch may end before the schedule does
    bar = progress_bar(run, last)
    try:
        end = _steps(run, ctx, last, bar)
    finally:  # every way out, an exception's too: the bar's last frame, and no bar left behind
        bar.close()
    return finish(run, end)


def _steps(run: Run, ctx, last: int, bar) -> RunEnd:
    """The steps from ``run.step`` to ``last``; how the run ends."""
    t = run.cfg.trainer
    tokens_per_step = t.micro_batch_size * t.gradient_accumulation_steps * run.world * run.cfg.model.seq_len
    batches = Batches(run.data, run.order, run.engine.device, ahead=t.gradient_accumulation_steps)
    if run.step == 0:
        log_eval(run, ctx)
    clock = Throughput()
    while run.step < last:
        try:
            step, metrics, stop = advance(run, ctx, batches)
        except LossScaleAtMinimum as e:
            return on_min_loss_scale(run, run.step + 1, str(e))
        clock.tokens += tokens_per_step
        n = step.number
        run.step, run.tokens_seen = n, run.tokens_seen + tokens_per_step
        run.history.append({"step": n, **{k: v for k, v in metrics.items() if k.startswith(EVERY_STEP)}})
        if n % t.log_every == 0 or n == last or not all(k.startswith(EVERY_STEP) for k in metrics):
            metrics["train/tokens_per_s"] = clock.rate()
            run.sink.log(n, metrics)
        scale = step.loss_scale
        bar.set_postfix(loss=f"{step.loss:.3f}", **({"scale": f"{scale:g}"} if scale is not None else {}))
        bar.update(1)
        if n % t.eval_every == 0 or n == last:
            with clock.paused():
                log_eval(run, ctx)
        firings = run.plugins.firings(step)
        if firings:
            with clock.paused():  # what follows a firing saves or loads checkpoints
                end = on_firings(run, step, firings)
            if end is not None:
                return end
        rolled_back = run.step != n  # the state is a checkpoint's again: nothing new to save
        periodic = bool(t.checkpoint_every) and n % t.checkpoint_every == 0
        if (periodic or stop) and not rolled_back:
            with clock.paused():
                save(run, f"step-{n}")
        if stop:
            bar.close()
            run.say(
                f"interrupted: {'rolled back to a checkpoint' if rolled_back else f'saved step-{n}'}; "
                "continue with --resume latest"
            )
            return RunEnd.interrupted
    return RunEnd.finished


class Throughput:
    """``train/tokens_per_s``: the training tokens since the last logged step over the wall time
    they took, all of each step counted (the reduction, the plug-ins, logging, the bar) but
    evaluation and checkpoints (:meth:`paused`). The clock is read once the device has done the
    work queued so far: a synchronise on logged steps only, so no other step waits for it."""

    def __init__(self):
        self.tokens, self.left_out, self.start = 0, 0.0, time.perf_counter()

    @contextmanager
    def paused(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.left_out += time.perf_counter() - t0

    def rate(self) -> float:
        get_accelerator().synchronize()
        now = time.perf_counter()
        rate = self.tokens / max(now - self.start - self.left_out, 1e-9)
        self.tokens, self.left_out, self.start = 0, 0.0, now
        return rate


def precision_metrics(engine, scale: float | None) -> dict:
    if scale is None:
        return {}
    out = {"train/loss_scale": scale}
    left = eng.hysteresis_left(engine)
    if left is not None:
        out["train/hysteresis"] = left
    return out


def log_eval(run: Run, ctx) -> None:
    loss = evaluate(run, ctx)
    ppl = math.exp(loss) if loss < 700 else math.inf
    run.sink.log(run.step, {"eval/loss": loss, "eval/ppl": ppl})
    run.say(f"step {run.step}: eval/loss {loss:.4f}  eval/ppl {ppl:.2f}")


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


PROGRESS_EVERY_S = 20.0  # without a terminal: a progress line this often (and one at the end)


def progress_bar(run: Run, last: int):
    """tqdm's bar on rank 0 where stderr is a terminal; where it is not (a log file, a sweep's log,
    CI) a :class:`ProgressLines`, so the log gets plain lines instead of ``\r``-joined frames."""
    if run.rank != 0 or not run.cfg.utils.progress_bar:
        return tqdm(total=last, initial=run.step, disable=True)
    if not sys.stderr.isatty():
        return ProgressLines(last, run.step)
    return tqdm(total=last, initial=run.step, dynamic_ncols=True, mininterval=1.0)


class ProgressLines:
    """The bar's calls (``set_postfix``, ``update``, ``close``) as one plain line on stderr every
    ``every`` seconds and one when it closes: ``step 40/400 (10%)  3.2 steps/s  loss=4.123``."""

    def __init__(self, total: int, initial: int, every: float = PROGRESS_EVERY_S, file=None, clock=None):
        self.total, self.n, self.every = total, initial, every
        self.file, self.clock = file, clock or time.monotonic
        self.start_n, self.start = initial, self.clock()
        self.last_line, self.shown, self.postfix = self.start, initial, {}

    def set_postfix(self, **values) -> None:
        self.postfix = values

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.clock() - self.last_line >= self.every:
            self._line()

    def close(self) -> None:
        if self.n != self.shown:
            self._line()

    def _line(self) -> None:
        now = self.clock()
        rate = (self.n - self.start_n) / max(now - self.start, 1e-9)
        pct = f" ({100 * self.n // self.total}%)" if self.total else ""
        extra = "".join(f"  {k}={v}" for k, v in self.postfix.items())
        print(
            f"step {self.n}/{self.total}{pct}  {rate:.3g} steps/s{extra}",
            file=self.file or sys.stderr,
            flush=True,
        )
        self.last_line, self.shown = now, self.n


def finish(run: Run, end: RunEnd) -> int:
    write_status(run, end)
    return end.code


def write_status(run: Run, end: RunEnd, message: str | None = None) -> None:
    """``status.json``. Rank 0 writes every state; any other rank writes one only when it fails (a
    rank that fails alone leaves the others waiting in a collective until the launcher kills them:
    rank 0 would never say so). A failure another rank recorded in this segment is never written
    over, by rank 0's end or a later failure: the first failure is the cause, and a run where any
    rank failed reads as failed. (Rank 0 writes "running" as the segment starts, before any rank
    trains: that one replaces whatever an earlier segment left.)"""
    failed = end is RunEnd.failed
    if run.rank != 0 and not failed:
        return
    if end is not RunEnd.running:
        current = read_status(run.run_dir)
        if current.get("state") == RunEnd.failed.name and current.get("rank", 0) != run.rank:
            return
    if failed and run.world > 1 and message:
        message = f"rank {run.rank}: {message}"
    status = {
        "state": end.name,
        "step": run.step,
        "exit_code": end.code,
        "tokens_seen": run.tokens_seen,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        **({"rank": run.rank} if failed and run.world > 1 else {}),
    }
    text = json.dumps(status | ({"message": message} if message else {}))
    if run.rank == 0:
        write_atomic(run.run_dir / "status.json", text)
        return
    try:  # another rank's run directory may be a copy that does not exist on its node
        write_atomic(run.run_dir / "status.json", text, tmp_suffix=f".tmp-rank{run.rank}")
    except OSError:
        pass
