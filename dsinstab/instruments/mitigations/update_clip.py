"""Update clipping (StableAdamW, Wortsman et al. 2023), ``trainer.mitigations.update_clip``: each
tensor's step is scaled by ``1 / max(1, RMS(g^2 / v̂))``, inside :class:`MitigatedAdamW`."""

from __future__ import annotations

import torch

from dsinstab.instruments.base import Context, Instrument, Refusal
from dsinstab.instruments.optim import Segments, mitigated_optimizer
from dsinstab.run.ds_config import zero_stage
from dsinstab.run.plugins import Step, world_size


class FlatSegments:
    """ZeRO 1/2 and the bf16 optimizer step flat fp32 partitions: each model parameter's fragment in
    them (DeepSpeed's ``_hp_mapping``) gives the runs that make up one tensor. Parameters are
    numbered in the model's order, the same on every rank, so per-parameter sums add up across
    ranks; a partition is mapped when the optimizer first steps it (ZeRO 1/2 hand the client
    optimizer one param group at a time)."""

    def __init__(self, engine):
        params = list(engine.module.parameters())
        self.n_params = len(params)
        self.numel = torch.tensor([p.numel() for p in params] + [1], dtype=torch.float32)
        self.frags: dict[int, list[tuple[torch.Tensor, int]]] = {}  # storage -> (fragment, index)
        for i, p in enumerate(params):
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is not None:  # None: no part of p lives in this rank's partitions
                frag = mapping.get_hp_fragment()
                self.frags.setdefault(frag.untyped_storage().data_ptr(), []).append((frag, i))
        self.cache: dict[int, Segments] = {}

    def __call__(self, flat: torch.Tensor) -> Segments:
        if id(flat) not in self.cache:
            self.cache[id(flat)] = self._segments(flat)
        return self.cache[id(flat)]

    def _segments(self, flat: torch.Tensor) -> Segments:
        base, size = flat.data_ptr(), flat.numel() * flat.element_size()
        found = sorted(
            ((f.data_ptr() - base) // f.element_size(), f.numel(), i)
            for f, i in self.frags.get(flat.untyped_storage().data_ptr(), [])
            if base <= f.data_ptr() < base + size
        )
        runs, at, pad = [], 0, self.n_params
        for start, n, i in found:
            if start > at:
                runs.append((start - at, pad))  # alignment padding between fragments
            runs.append((n, i))
            at = start + n
        if at < flat.numel():
            runs.append((flat.numel() - at, pad))
        dev = flat.device
        return Segments(
            lengths=torch.tensor([r[0] for r in runs], device=dev),
            index=torch.tensor([r[1] for r in runs], device=dev),
            numel=self.numel.to(dev),
            n_params=self.n_params,
            reduce=world_size() > 1,
        )


class UpdateClipPlugin(Instrument):
    name = "update_clip"
    key = "trainer.mitigations.update_clip"
    needs_mitigated_optimizer = True

    def __init__(self, ctx: Context):
        self.log_every = ctx.cfg.trainer.log_every
        self.opt = mitigated_optimizer(ctx.engine, "update clipping")
        if _flat(ctx.engine):
            self.opt.segments = FlatSegments(ctx.engine)

    @classmethod
    def refusal(cls, cfg) -> Refusal | None:
        return ZERO3_REFUSAL if zero_stage(cfg.ds_config) == 3 else None

    def before_step(self, step: Step) -> None:
        self.opt.clip_stats = None

    def readings(self, step: Step) -> dict:
        if self.opt.clip_stats is None:
            return {}
        top, n = self.opt.clip_stats  # the same on every rank: the sums were all-reduced
        return {"update": (torch.stack([top.float(), n.float()]), "same")}

    def collect(self, step: Step, values: dict) -> dict:
        if "update" not in values:
            return {}
        top, n = values["update"]
        if not n and step.number % self.log_every:
            return {}
        return {"mitig/update_rms_max": top, "mitig/update_clipped_tensors": int(n)}


ZERO3_REFUSAL = Refusal(
    "needs ZeRO stage 0, 1 or 2 (ZeRO-3 partitions each weight across ranks and dsinstab cannot yet "
    "change or measure one head or tensor there).",
    in_ds_config=True,
)


def _flat(engine) -> bool:
    """The client optimizer steps flat partitions (ZeRO 1/2, the bf16 optimizer), not tensors."""
    return any(getattr(p, "_hp_mapping", None) is not None for p in engine.module.parameters())
