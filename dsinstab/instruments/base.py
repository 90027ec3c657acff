"""What every instrument is: a plug-in of the loop's seam that one config key switches on.

An instrument (a detector, a probe, a mitigation) subclasses :class:`Instrument`, names its key,
and the registry (:mod:`dsinstab.instruments.registry`) builds it for every run whose config sets
that key. It may refuse a config it cannot serve (one sentence, checked before anything is
written), and may ask for the mitigated optimizer, which the registry then hands to the engine.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch

from dsinstab.run.config import RunConfig
from dsinstab.run.plugins import PluginBase


def config_value(cfg: RunConfig, key: str):
    """The value of a dotted config key, e.g. ``trainer.mitigations.zclip_z``."""
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


@dataclass(frozen=True)
class Refusal:
    """Why a config cannot have an instrument: the end of a sentence that starts with its key."""

    text: str
    in_ds_config: bool = False  # the ds_config, not the YAML, is what stands in the way


@dataclass
class Context:
    """What an instrument is built from: the run's config, the model and its DeepSpeed engine."""

    cfg: RunConfig
    model: torch.nn.Module
    engine: object

    @functools.cached_property
    def masters(self):
        """The run's one :class:`~dsinstab.instruments.masters.MasterCopies` (built on first use)."""
        from dsinstab.instruments.masters import MasterCopies

        return MasterCopies(self.engine)


class Instrument(PluginBase):
    """A plug-in built by the registry when its config key is set."""

    key: ClassVar[str] = ""  # the dotted config key that switches it on
    needs_mitigated_optimizer: ClassVar[bool] = False  # acts inside the update (MitigatedAdamW)

    @classmethod
    def wanted(cls, cfg: RunConfig) -> bool:
        """Whether the run has this instrument: its key is set (non-zero, non-empty, true)."""
        return bool(config_value(cfg, cls.key))

    @classmethod
    def refusal(cls, cfg: RunConfig) -> Refusal | None:
        """Why ``cfg`` (its ds_config resolved) cannot have this instrument; ``None`` when it can."""
        return None

    @classmethod
    def build(cls, ctx: Context) -> Instrument:
        return cls(ctx)


class Probe(Instrument):
    """An instrument that records on probe steps only (every ``trainer.diagnostics.every`` steps),
    named in ``trainer.diagnostics.probes``; nothing is recorded in between, evaluation included."""

    key = "trainer.diagnostics.probes"

    def __init__(self, ctx: Context):
        self.every = ctx.cfg.trainer.diagnostics.every
        self.active = False

    @classmethod
    def wanted(cls, cfg: RunConfig) -> bool:
        return bool(cfg.trainer.diagnostics.every) and cls.name in probe_names(cfg)

    def begin_step(self, step) -> None:
        self.active = step.number % self.every == 0

    def readings(self, step):
        return self.probe_readings() if self.active else {}

    def probe_readings(self):
        """The probe step's readings, keyed by metric name (see :data:`dsinstab.run.plugins.Readings`)."""
        return {}

    def collect(self, step, values: dict) -> dict:
        if not self.active:
            return {}
        self.active = False  # nothing is recorded until the next probe step (evaluation included)
        return values


def probe_names(cfg: RunConfig) -> list[str]:
    """The probes ``trainer.diagnostics.probes`` names, in its order."""
    return [p.strip() for p in cfg.trainer.diagnostics.probes.split(",") if p.strip()]
