"""The weights, gradients and Adam state of each parameter as the optimizer updates them, on every
DeepSpeed path (fp32 master copies under fp16/bf16; ZeRO 1-3 through DeepSpeed's ``safe_get_full_*``
API, which assembles them: a collective, every rank calls it in the same order).
"""

from __future__ import annotations

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad, safe_get_full_optimizer_state


class MasterCopies:
    """The weights, Adam state and gradient of each parameter, as the optimizer updates them.

    ZeRO 1-3 link each model parameter to its fp32 partition, and DeepSpeed's ``safe_get_full_*``
    assemble them. Without ZeRO, DeepSpeed's fp16 and bf16 optimizer (``FP16_UnfusedOptimizer``)
    lets torch's AdamW step fp32 clones of the parameters (its ``fp32_groups``, in the order of its
    ``fp16_groups``), which DeepSpeed's API does not cover: :meth:`master` maps a parameter to its
    clone. In fp32 without ZeRO, the torch optimizer updates the parameter itself.
    """

    def __init__(self, engine):
        self.engine = engine
        opt = engine.optimizer
        self.zero = bool(engine.zero_optimization())
        self.clones: dict[int, torch.Tensor] = {}
        if not self.zero and hasattr(opt, "fp32_groups"):
            for lp_group, hp_group in zip(opt.fp16_groups, opt.fp32_groups):
                self.clones |= {id(lp): hp for lp, hp in zip(lp_group, hp_group)}

    def master(self, p: torch.nn.Parameter) -> torch.Tensor:
        """The tensor torch's optimizer steps for ``p`` (without ZeRO; ZeRO partitions it)."""
        return self.clones.get(id(p), p)

    def weights(self, p: torch.nn.Parameter, keep: bool = False) -> torch.Tensor:
        """The fp32 weights; ``keep``: a copy that the optimizer step will not change."""
        if self.zero:
            return safe_get_full_fp32_param(p)  # assembled into a new buffer
        w = self.master(p).detach().float()
        return w.clone() if keep else w

    def grad(self, p: torch.nn.Parameter) -> torch.Tensor | None:
        """Before the step: the gradient the optimizer will read, still times the fp16 loss scale."""
        return safe_get_full_grad(p)

    def state(self, p: torch.nn.Parameter, key: str) -> torch.Tensor | None:
        if not self.zero:
            return self.engine.optimizer.state.get(self.master(p), {}).get(key)
        try:
            return safe_get_full_optimizer_state(p, key)
        except ValueError:
            # ZeRO-1/2 link the optimizer state to the parameters lazily, after the first step of
            # the first param group only; link again, with DeepSpeed's own function, once all exist.
            opt = self.engine.optimizer
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()
            return safe_get_full_optimizer_state(p, key)

    def adam_steps(self) -> int:
        """Adam's step counter (applied steps), read from the torch optimizer's own state."""
        opt = self.engine.optimizer
        inner = getattr(opt, "optimizer", opt)
        # every tensor torch steps together has the same count; read one (a CPU scalar unless the
        # optimizer is capturable or fused)
        step = next((s["step"] for s in inner.state.values() if "step" in s), 0)
        return int(step)
