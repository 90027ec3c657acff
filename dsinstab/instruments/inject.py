"""A deliberate fault of the state for one step (``trainer.inject``, kinds ``lr`` and ``embed``), for
trying detectors and replays: the lr times ``factor``, or the embedding output scaled by it. (Bad
data, kinds ``repeat`` and ``random``, is the corpus's: :mod:`dsinstab.run.bad_data`.)

Like a bad batch, it is tied to the data position of step ``at_step`` of an unbroken run, so a
rollback or a branch that skips those batches also skips the fault.
"""

from __future__ import annotations

from dsinstab.instruments.base import Context, Instrument
from dsinstab.run.plugins import Step

STATE_KINDS = ("lr", "embed")


class InjectedFault(Instrument):
    name = "inject"
    key = "trainer.inject.at_step"

    @classmethod
    def wanted(cls, cfg) -> bool:
        inj = cfg.trainer.inject
        return bool(inj.at_step) and inj.kind in STATE_KINDS  # bad data is the data's (run/bad_data.py)

    def __init__(self, ctx: Context):
        self.cfg, self.engine, self.model = ctx.cfg.trainer, ctx.engine, ctx.model
        self.order = None
        self.saved_factor: float | None = None

    def bind(self, run) -> None:
        self.order = run.order

    def begin_step(self, step: Step) -> None:
        inj, gas = self.cfg.inject, self.cfg.gradient_accumulation_steps
        if self.order.position != (inj.at_step - 1) * gas:
            return
        scale = self.model.embedding_scale
        self.saved_factor = scale.factor
        if inj.kind == "lr":
            for g in self.engine.optimizer.param_groups:
                g["lr"] *= inj.factor
        else:
            scale.factor *= inj.factor

    def after_step(self, step: Step) -> None:
        if self.saved_factor is None:
            return
        # The schedule's own value: the lr of the next step when this one was applied, of this
        # step again when an fp16 overflow skipped it (the schedule then did not advance).
        for g, lr in zip(self.engine.optimizer.param_groups, self.engine.lr_scheduler.get_last_lr()):
            g["lr"] = lr
        self.model.embedding_scale.factor, self.saved_factor = self.saved_factor, None
