"""``layer_norms``: per layer, the grad norm (before clipping), the fp32 parameter norm and the
update-to-parameter ratio ||Δθ|| / ||θ|| of the step, on the weights the optimizer updates."""

from __future__ import annotations

import torch

from dsinstab.instruments.base import Context, Probe
from dsinstab.instruments.layers import layer_of
from dsinstab.run import engine as eng


def _sq(x: torch.Tensor) -> torch.Tensor:
    return x.float().pow(2).sum(dtype=torch.float64)


class LayerNormProbe(Probe):
    name = "layer_norms"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.params = [(n, p) for n, p in ctx.model.named_parameters() if p.requires_grad]
        self.engine, self.masters = ctx.engine, ctx.masters
        self.before: dict[str, torch.Tensor] = {}
        self.out: dict = {}

    def before_step(self, step) -> None:
        if not self.active:
            return
        grads, norms = {}, {}
        for name, p in self.params:
            layer = layer_of(name)
            g = self.masters.grad(p)
            if g is not None:
                grads[layer] = grads.get(layer, 0.0) + _sq(g)
            w = self.masters.weights(p, keep=True)
            norms[layer] = norms.get(layer, 0.0) + _sq(w)
            self.before[name] = w
        # fp16 gradients still carry the loss scale before the optimizer step
        unscale = eng.loss_scale(self.engine) or 1.0
        self.out = {f"diag/grad_norm/{k}": (v.sqrt() / unscale, "same") for k, v in grads.items()}
        self.out |= {f"diag/param_norm/{k}": (v.sqrt(), "same") for k, v in norms.items()}

    def after_step(self, step) -> None:
        if not self.active:
            return
        delta, norm = {}, {}
        for name, p in self.params:
            layer, w0 = layer_of(name), self.before.pop(name)
            delta[layer] = delta.get(layer, 0.0) + _sq(self.masters.weights(p) - w0)
            norm[layer] = norm.get(layer, 0.0) + _sq(w0)
        for k in delta:
            ratio = torch.where(norm[k] > 0, delta[k] / norm[k], 0.0).sqrt()  # 0: a layer of zeros
            self.out[f"diag/update_ratio/{k}"] = (ratio, "same")

    def probe_readings(self):
        out, self.out = self.out, {}
        return out
