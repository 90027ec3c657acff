"""The registry: every instrument a run can have, keyed by the config key that switches it on.

Adding a probe, a detector or a mitigation is one new file (a subclass of
:class:`~dsinstab.instruments.base.Instrument` or :class:`~dsinstab.instruments.base.Probe`), one
config field and one line in :data:`INSTRUMENTS`; the loop, the train command and the engine are
untouched. The list's order is the order the loop calls them in.
"""

from __future__ import annotations

import torch
from deepspeed.accelerator import get_accelerator

from dsinstab.instruments.base import Context, Instrument, Probe, config_value, probe_names
from dsinstab.instruments.inject import InjectedFault
from dsinstab.instruments.mitigations.qk_clip import QKClipPlugin
from dsinstab.instruments.mitigations.skip_step import SkipStepPlugin
from dsinstab.instruments.mitigations.update_clip import UpdateClipPlugin
from dsinstab.instruments.mitigations.update_norm_clip import UpdateNormClipPlugin
from dsinstab.instruments.mitigations.zclip import ZClipPlugin
from dsinstab.instruments.optim import MitigatedAdamW
from dsinstab.instruments.overflow import OverflowAnatomy
from dsinstab.instruments.probes.activations import ActivationProbe
from dsinstab.instruments.probes.adam import AdamProbe
from dsinstab.instruments.probes.attn_logits import AttentionLogitProbe
from dsinstab.instruments.probes.layer_norms import LayerNormProbe
from dsinstab.instruments.probes.out_logits import OutputLogitProbe
from dsinstab.instruments.spikes import SpikeMonitor
from dsinstab.run import engine as eng
from dsinstab.run import lowp
from dsinstab.run.config import ConfigError, RunConfig, TrainerConfig
from dsinstab.run.ds_config import precision

MITIGATIONS: list[type[Instrument]] = [
    ZClipPlugin,  # trainer.mitigations.zclip_z
    SkipStepPlugin,  # trainer.mitigations.skip_step_sigma
    UpdateClipPlugin,  # trainer.mitigations.update_clip
    UpdateNormClipPlugin,  # trainer.mitigations.update_norm_clip_sigma
    QKClipPlugin,  # trainer.mitigations.qk_clip_tau
]
INSTRUMENTS: list[type[Instrument]] = [
    SpikeMonitor,  # trainer.spikes (always on)
    InjectedFault,  # trainer.inject.at_step
    AttentionLogitProbe,  # trainer.diagnostics.probes: attn_logits
    OutputLogitProbe,  # ... out_logits
    ActivationProbe,  # ... activations
    LayerNormProbe,  # ... layer_norms
    AdamProbe,  # ... adam
    OverflowAnatomy,  # trainer.overflow.locate, and the headroom probe
    *MITIGATIONS,
]
OTHER_PROBES = ("headroom",)  # probe names served by an instrument that is not a Probe
# what hooks into the model's modules (forward hooks, the recording attention), which model.compile
# cannot promise to run: dynamo traces the hooks it finds once and may miss one added later
# (dsinstab.run.engine.build_engine)
HOOKS_MODEL: tuple[type[Instrument], ...] = (
    AttentionLogitProbe,
    ActivationProbe,
    OverflowAnatomy,
    QKClipPlugin,
)


def probes(registry: list[type[Instrument]] | None = None) -> list[str]:
    """Every name ``trainer.diagnostics.probes`` accepts."""
    found = [c.name for c in (registry or INSTRUMENTS) if issubclass(c, Probe)]
    return found + list(OTHER_PROBES)


def wanted(cfg: RunConfig, registry: list[type[Instrument]] | None = None) -> list[type[Instrument]]:
    return [c for c in (registry or INSTRUMENTS) if c.wanted(cfg)]


def check(cfg: RunConfig, registry: list[type[Instrument]] | None = None) -> None:
    """Refuse, in one sentence, a config (its ds_config resolved) that a wanted instrument cannot
    serve, or a probe name no instrument has."""
    sources = getattr(cfg, "sources", {})
    where = sources.get("trainer", "trainer.yaml")
    allowed = probes(registry)
    unknown = [p for p in probe_names(cfg) if p not in allowed]
    if unknown:
        raise ConfigError(
            f"{where}: trainer.diagnostics.probes has unknown {unknown[0]!r}; allowed: {', '.join(allowed)}."
        )
    if cfg.model.compile:
        check_compile(cfg, registry)
    for c in wanted(cfg, registry):
        refusal = c.refusal(cfg)
        if refusal is not None:
            source = cfg.ds_config_path if refusal.in_ds_config else where
            raise ConfigError(f"{source}: {c.key} {refusal.text}")


def check_compile(cfg: RunConfig, registry: list[type[Instrument]] | None = None) -> None:
    """Refuse, in one sentence, ``model.compile`` with a backend this machine cannot build, or with a
    wanted instrument that hooks into the model's modules (:data:`HOOKS_MODEL`)."""
    sources = getattr(cfg, "sources", {})
    where, model_where = sources.get("trainer", "trainer.yaml"), sources.get("model", "model.yaml")
    why = eng.compile_refusal(cfg.model.compile_backend)
    if why is not None:
        raise ConfigError(f"{model_where}: model.compile_backend {why}")
    hooked = {c.name for c in HOOKS_MODEL if issubclass(c, Probe)} | set(OTHER_PROBES)
    allowed = ", ".join(p for p in probes(registry) if p not in hooked)
    for c in wanted(cfg, registry):
        if not issubclass(c, HOOKS_MODEL):
            continue
        if issubclass(c, Probe) or (c is OverflowAnatomy and not cfg.trainer.overflow.locate):
            name = c.name if issubclass(c, Probe) else "headroom"
            what, fix = (
                f"trainer.diagnostics.probes {name}",
                f"drop it (probes with model.compile: {allowed})",
            )
        else:
            off = "false" if isinstance(config_value(cfg, c.key), bool) else "0"
            what, fix = c.key, f"set it {off}"
        raise ConfigError(
            f"{where}: {what} hooks into the model's modules, and model.compile ({model_where}) cannot "
            f"promise to run such hooks; {fix}, or set model.compile false."
        )
    prec = precision(getattr(cfg, "ds_config", None) or {})
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(prec)
    on_cpu = get_accelerator().device_name() == "cpu"
    if on_cpu and dtype is not None and lowp.use_fp32_compute(dtype, cfg.utils.cpu_compute):
        raise ConfigError(  # seen: a compiled fp16 (a @ b) * 0.5 gave 40000 where eager gives inf
            f"{model_where}: model.compile would change the numbers here: this CPU computes {prec} matmuls "
            f"in fp32 (utils.cpu_compute {cfg.utils.cpu_compute}) and rounds each result, a rounding "
            "torch.compile fuses away (an fp16 product past 65504 stays finite); train in fp32, set "
            "utils.cpu_compute native, or set model.compile false."
        )


def optimizer_for(cfg: RunConfig, registry: list[type[Instrument]] | None = None) -> eng.OptimizerFactory:
    """The optimizer factory :func:`dsinstab.run.engine.build_engine` takes: :class:`MitigatedAdamW`
    when a wanted instrument acts inside the update, torch's AdamW otherwise."""
    if not any(c.needs_mitigated_optimizer for c in wanted(cfg, registry)):
        return eng.adamw

    def mitigated(groups: list[dict], tc: TrainerConfig) -> torch.optim.Optimizer:
        betas = (tc.adam_beta1, tc.adam_beta2)
        return MitigatedAdamW(
            groups, lr=tc.lr, betas=betas, eps=tc.adam_eps, update_clip=tc.mitigations.update_clip
        )

    return mitigated


def build_plugins(
    cfg: RunConfig, model: torch.nn.Module, engine, registry: list[type[Instrument]] | None = None
) -> list[Instrument]:
    """The run's instruments, in the registry's order: only those whose key is set are built."""
    ctx = Context(cfg, model, engine)
    return [c.build(ctx) for c in wanted(cfg, registry)]
