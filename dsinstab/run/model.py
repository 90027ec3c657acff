"""A ``transformers`` causal LM built from config, from scratch, and the loss we compute from its logits."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from transformers import (
    AttentionInterface,
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from dsinstab.run.config import ModelConfig


def hf_config(mc: ModelConfig, vocab_size: int, eos_id: int) -> PretrainedConfig:
    """The ``transformers`` config of ``mc``'s family; qwen3 is Llama-like with per-head qk-norm."""
    positions = mc.max_position or mc.seq_len
    common = dict(
        vocab_size=vocab_size,
        tie_word_embeddings=mc.tie_embeddings,
        initializer_range=mc.init_std,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=None,
        use_cache=False,
    )
    if mc.arch == "gpt2":
        return AutoConfig.for_model(
            "gpt2",
            n_embd=mc.d_model,
            n_layer=mc.n_layer,
            n_head=mc.n_head,
            n_inner=mc.d_ff or None,
            n_positions=positions,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
    d_ff = mc.d_ff or max(64, round(8 * mc.d_model / 3 / 64) * 64)
    extra = {"head_dim": mc.d_model // mc.n_head} if mc.arch == "qwen3" else {}
    return AutoConfig.for_model(
        mc.arch,
        hidden_size=mc.d_model,
        intermediate_size=d_ff,
        num_hidden_layers=mc.n_layer,
        num_attention_heads=mc.n_head,
        num_key_value_heads=mc.n_head,
        max_position_embeddings=positions,
        rms_norm_eps=1e-6,
        attention_dropout=0.0,
        **extra,
        **common,
    )


class EmbeddingScale:
    """Forward hook that multiplies the input embeddings' output (embedding scaling, fault injection)."""

    def __init__(self, module: torch.nn.Module, factor: float):
        self.factor = factor
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, output):
        return output if self.factor == 1.0 else output * self.factor


SOFTCAP_ATTENTION = "dsinstab_softcap"


def softcapped_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Gemma 2's attention: the logits ``q·kᵀ·scaling`` become ``c·tanh(logit / c)`` before the mask
    and the softmax. Registered with ``transformers``' ``AttentionInterface`` (sdpa has no place for
    it) with the eager mask; the cap is the attention module's ``dsinstab_attn_softcap``."""
    cap = module.dsinstab_attn_softcap
    if key.shape[1] != query.shape[1]:  # grouped-query attention: one key head serves several queries
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.tanh(torch.matmul(query, key.transpose(-1, -2)) * (scaling / cap)) * cap
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class LogitSoftcap:
    """Forward hook on the output head: logits become ``c·tanh(logit / c)`` (Gemma 2), so the loss,
    evaluation and the probes all see the capped logits; computed in fp32, returned in the head's dtype."""

    def __init__(self, module: torch.nn.Module, cap: float):
        self.cap = cap
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, output):
        return (torch.tanh(output.float() / self.cap) * self.cap).to(output.dtype)


def model_attention(module: torch.nn.Module, implementation: str):
    """The attention function ``module`` calls for ``implementation``, as its model code picks it."""
    if implementation == "eager":  # not in the interface: each model file has its own
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[implementation]


def register_attention(name: str, fn, masks_of: str) -> None:
    """``fn`` becomes the attention implementation ``name`` in ``transformers``, its masks built as
    for the implementation ``masks_of`` (``transformers`` builds masks by implementation name)."""
    AttentionInterface.register(name, fn)
    if masks_of in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[masks_of])


def wrapping_attention(model: PreTrainedModel, prefix: str, fn) -> tuple[str, str]:
    """Register ``fn`` as an implementation that wraps the model's current one; returns (its name,
    the wrapped one's name). The caller tells the attention modules what to call, then switches the
    model with ``model.set_attn_implementation(name)``."""
    wrapped = model.config._attn_implementation
    register_attention(f"{prefix}_{wrapped}", fn, wrapped)
    return f"{prefix}_{wrapped}", wrapped


def build_model(mc: ModelConfig, vocab_size: int, eos_id: int, seed: int) -> PreTrainedModel:
    torch.manual_seed(seed)
    implementation = mc.attn_implementation
    if mc.attn_softcap:
        register_attention(SOFTCAP_ATTENTION, softcapped_attention, "eager")
        implementation = SOFTCAP_ATTENTION
    model = AutoModelForCausalLM.from_config(
        hf_config(mc, vocab_size, eos_id), attn_implementation=implementation
    )
    if mc.attn_softcap:
        for module in model.modules():
            if hasattr(module, "layer_idx"):  # the attention modules (and some blocks: harmless)
                module.dsinstab_attn_softcap = mc.attn_softcap
    model.embedding_scale = EmbeddingScale(model.get_input_embeddings(), mc.embedding_scale)
    if mc.logit_softcap:
        model.logit_softcap = LogitSoftcap(model.get_output_embeddings(), mc.logit_softcap)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, z_loss: float) -> tuple[torch.Tensor, dict]:
    """Cross-entropy in fp32, plus ``z_loss * mean((log Z)^2)`` when asked (PaLM's z-loss).

    Returns the loss to optimise and its parts, detached, for logging.
    """
    logits = logits.float().flatten(0, 1)
    ce = F.cross_entropy(logits, targets.flatten())
    parts = {"ce": ce.detach()}
    if z_loss == 0:
        return ce, parts
    log_z = torch.logsumexp(logits, dim=-1)
    z = z_loss * log_z.pow(2).mean()
    parts["z_loss"] = z.detach()
    return ce + z, parts
