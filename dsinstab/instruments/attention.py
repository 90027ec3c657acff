"""The largest pre-softmax attention logit of each head, recorded inside the model's own attention.

Both the attention-logit probe and QK-clip need ``max q·kᵀ·scaling`` over the causal positions of
every head; :func:`record_into` registers a wrapper around the model's attention implementation
(``transformers``' ``AttentionInterface``) that measures it and then runs that implementation with
exactly the arguments and mask it would have had, so numerics do not change. Each attention module
carries its recorders, so several models in one process keep their own.
"""

from __future__ import annotations

import math

import torch

from dsinstab.run.model import model_attention, wrapping_attention

ATTENTION = "dsinstab_logits"  # + "_<the wrapped implementation>"


class LogitMaxima:
    """Per layer, the head maxima of the forwards recorded since the last :meth:`take`."""

    def __init__(self, only_training: bool = False):
        self.only_training = only_training  # record forwards with gradients only (not evaluation)
        self.active = True
        self.maxima: dict[int, torch.Tensor] = {}

    def wants(self) -> bool:
        return self.active and (torch.is_grad_enabled() or not self.only_training)

    @torch.no_grad()
    def record(self, layer: int, query: torch.Tensor, key: torch.Tensor, scaling: float | None) -> None:
        peak = self.maxima.get(layer)
        head_max = causal_logit_max(query, key, scaling)
        self.maxima[layer] = head_max if peak is None else torch.maximum(peak, head_max)

    def take(self) -> dict[int, torch.Tensor]:
        out, self.maxima = self.maxima, {}
        return out


def causal_logit_max(query: torch.Tensor, key: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """``(heads,)``: each head's largest causal ``q·kᵀ·scaling`` over the batch, in fp32."""
    q, k = query.float(), key.float()
    if k.shape[1] != q.shape[1]:  # grouped-query attention: one key head serves several queries
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    t_q, t_k = q.shape[-2], k.shape[-2]
    future = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).triu(1 + t_k - t_q)
    peak = torch.full((q.shape[1],), -math.inf, device=q.device)
    for b in range(q.shape[0]):  # one sequence at a time bounds the memory of the scores
        scores = (q[b] @ k[b].transpose(-1, -2)) * scale
        peak = torch.maximum(peak, scores.masked_fill(future, -math.inf).amax(dim=(-1, -2)))
    return peak


def _recording_attention(module, query, key, value, attention_mask, *args, **kwargs):
    recorders, implementation = module.dsinstab_logit_recorders
    for r in recorders:
        if r.wants():
            r.record(module.layer_idx, query, key, kwargs.get("scaling"))
    return model_attention(module, implementation)(module, query, key, value, attention_mask, *args, **kwargs)


def record_into(model: torch.nn.Module, recorder: LogitMaxima) -> list[torch.nn.Module]:
    """Make every attention module of ``model`` feed ``recorder``; returns those modules. The first
    call switches the model to the recording implementation; later ones join it."""
    modules = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "head_dim")]
    if not modules:
        return []
    if not hasattr(modules[0], "dsinstab_logit_recorders"):
        name, wrapped = wrapping_attention(model, ATTENTION, _recording_attention)
        for m in modules:
            m.dsinstab_logit_recorders = ([], wrapped)
        model.set_attn_implementation(name)
    for m in modules:
        m.dsinstab_logit_recorders[0].append(recorder)
    return modules
