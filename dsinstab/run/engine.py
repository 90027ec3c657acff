"""``deepspeed.initialize`` with our AdamW and schedule, and readouts of the engine's state."""

from __future__ import annotations

import math

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from dsinstab.run.config import TrainerConfig, precision


def param_groups(model: torch.nn.Module, tc: TrainerConfig) -> list[dict]:
    """AdamW groups: decay on matrices; none on biases, norms and (unless asked) embeddings.

    With ``independent_weight_decay`` the decay no longer scales with the peak lr: AdamW applies
    ``lr_t * weight_decay``, so giving it ``weight_decay / lr`` makes the decay
    ``weight_decay * lr_t / lr`` (Wortsman et al. 2023).
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_embedding = id(p) in embeddings
        if p.ndim >= 2 and (not is_embedding or tc.decay_embeddings):
            decay.append(p)
        else:
            no_decay.append(p)
    wd = tc.weight_decay / tc.lr if tc.independent_weight_decay else tc.weight_decay
    return [
        {"params": decay, "weight_decay": wd, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_engine(model: torch.nn.Module, tc: TrainerConfig, ds_config: dict, correct_faults: bool = True):
    """The DeepSpeed engine, with torch's AdamW and transformers' warmup + cosine schedule, and
    DeepSpeed 0.19.8's faults corrected (:func:`correct_deepspeed_faults`; ``False`` shows them).

    The engine steps the schedule only on applied steps, so an fp16 overflow does not advance it.
    """
    if precision(ds_config) == "fp16":
        allow_cpu_fp16()
    from dsinstab.instruments.mitigations import uses_mitigated_optimizer  # (mitigations reads the engine)

    if uses_mitigated_optimizer(tc.mitigations):  # skip-step, update clipping: inside the update
        from dsinstab.instruments.optim import MitigatedAdamW

        optimizer = MitigatedAdamW(
            param_groups(model, tc),
            lr=tc.lr,
            betas=(tc.adam_beta1, tc.adam_beta2),
            eps=tc.adam_eps,
            update_clip=tc.mitigations.update_clip,
        )
    else:
        optimizer = torch.optim.AdamW(
            param_groups(model, tc),
            lr=tc.lr,
            betas=(tc.adam_beta1, tc.adam_beta2),
            eps=tc.adam_eps,
            foreach=True,
        )

    def schedule(opt):
        return get_cosine_with_min_lr_schedule_with_warmup(
            opt, tc.warmup_steps, tc.max_steps, min_lr_rate=tc.min_lr_ratio
        )

    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config
    )
    if correct_faults:
        correct_deepspeed_faults(engine)
    return engine


# ---------------------------------------------------------------------------------------------
# fp16 on CPUs without native fp16 arithmetic (dsinstab.run.lowp computes it in fp32 there)


def apply_optimizer_config(engine, tc) -> list[str]:
    """The loaded optimizer and schedule (a ``LambdaLR``, as :func:`build_engine` makes) take this
    run's lr, eps, betas and weight decay; what changed, by name. DeepSpeed's load puts the saved
    ones back; a resume or a branch with other settings wants its own. Unchanged values are not
    touched, so a resume or a plain replay stays bit-exact.

    Weight decay goes by the group's name (``dsinstab.run.engine.param_groups`` names them): under
    ZeRO-3 the parameters are partitioned by now and their shapes no longer tell the groups apart.
    """
    decay = tc.weight_decay / tc.lr if tc.independent_weight_decay else tc.weight_decay
    groups, sched, changed = engine.optimizer.param_groups, engine.lr_scheduler, set()
    for i, g in enumerate(groups):
        wd = {"decay": decay, "no_decay": 0.0}.get(g.get("name"), g["weight_decay"])
        for key, value in (
            ("eps", tc.adam_eps),
            ("betas", (tc.adam_beta1, tc.adam_beta2)),
            ("weight_decay", wd),
        ):
            if (tuple(g[key]) if key == "betas" else g[key]) != value:
                g[key] = value
                changed.add(key)
        # the lr is this run's peak times its schedule's factor at the step (a changed max_steps
        # changes the factor): the same product the schedule computes, so an unchanged run is exact
        sched.base_lrs[i] = tc.lr
        lr = tc.lr * sched.lr_lambdas[i](sched.last_epoch)
        if g["lr"] != lr:
            g["lr"] = lr
            changed.add("lr")
    sched._last_lr = [g["lr"] for g in groups]  # what get_last_lr() reports until the next step
    # DeepSpeed's fp16/bf16 and ZeRO-1/2 optimizers take the saved clipping back with their state
    if getattr(engine.optimizer, "clip_grad", tc.grad_clip) != tc.grad_clip:
        engine.optimizer.clip_grad = tc.grad_clip
        changed.add("grad_clip")
    return sorted(changed)


def allow_cpu_fp16() -> None:
    """DeepSpeed's CPU accelerator refuses fp16 unless oneDNN has native fp16 kernels; torch runs
    fp16 on every CPU, and fp16's loss scaling is what this tool studies, so lift the gate."""
    acc = get_accelerator()
    if acc.device_name() == "cpu" and not acc.is_fp16_supported():
        acc.is_fp16_supported = lambda: True


# ---------------------------------------------------------------------------------------------
# Readouts of the engine's state (identical on every rank: DeepSpeed reduces them)


def loss_scale(engine) -> float | None:
    """The current fp16 loss scale; ``None`` for bf16 and fp32, where there is none."""
    if not engine.fp16_enabled():
        return None
    return float(engine.optimizer.loss_scale)


def hysteresis_left(engine) -> int | None:
    """Overflows the dynamic scaler still tolerates before it halves the scale (ZeRO optimizers)."""
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if not engine.fp16_enabled() or scaler is None:
        return None
    left = getattr(scaler, "cur_hysteresis", None)
    return int(left) if left is not None else None


def overflowed(engine) -> bool:
    """Whether the last optimizer step was skipped for an fp16 overflow."""
    return bool(getattr(engine.optimizer, "overflow", False))


def grad_norm(engine, model: torch.nn.Module, before_step: float | None = None) -> float:
    """The global grad norm of the last step, before clipping; ``inf`` for a non-finite one.

    DeepSpeed reports it for its own optimizers (call after ``step``); a bare torch optimizer (fp32,
    ZeRO-0) leaves it unset, so the loop measures it with :func:`grads_norm` before ``step``.
    """
    norm = before_step if before_step is not None else engine.get_global_grad_norm()
    norm = float(norm) if norm is not None else math.nan
    return norm if math.isfinite(norm) and norm >= 0 else math.inf


def needs_pre_step_norm(engine) -> bool:
    """True when DeepSpeed will not report the grad norm, so it must be measured before ``step``."""
    return not (engine.fp16_enabled() or engine.bfloat16_enabled() or engine.zero_optimization())


def grads_norm(model: torch.nn.Module) -> float:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def current_lr(engine) -> float:
    return float(engine.get_lr()[0])


def correct_deepspeed_faults(engine) -> None:
    """Correct, on this engine instance, three faults of DeepSpeed 0.19.8 that change what a step
    applies or reports; idempotent. tests/test_numerics.py shows each fault and fails once a
    DeepSpeed release fixes one, so that its correction is dropped rather than applied twice.

    - Without ZeRO, the fp16/bf16 optimizer (``FP16_UnfusedOptimizer``) runs a real AdamW step on
      zero gradients when it is built: the fp32 master weights get one weight decay at the peak lr
      and Adam's step counter starts at 1, so the first updates use the wrong bias correction
      (about 0.73x the first update). The masters and the counters are put back.
    - Without ZeRO, ``engine.backward`` never multiplies the loss by the fp16 loss scale, yet the
      optimizer divides the gradients by it: updates ~65536x too small (Adam's epsilon then
      dominates them) and no overflow is ever seen (deepspeedai/DeepSpeed#8393, open). The loss is
      scaled here as the ZeRO path scales it, and the norm measured on the scaled gradients is
      divided back.
    - Every fp16 optimizer (ZeRO-0 to 3) updates the dynamic scale before it unscales the
      gradients, so on a step where the scale grows they are divided by twice the scale they were
      multiplied with: half the update, and ZeRO-3 also reports half the grad norm. The grown scale
      takes effect when ``step`` returns instead; overflows are left as they are (their gradients
      are dropped).
    """
    opt = engine.optimizer
    if getattr(opt, "_dsinstab_corrected", False):
        return
    opt._dsinstab_corrected = True
    if not engine.zero_optimization() and hasattr(opt, "fp32_groups"):
        _undo_init_step(opt)
    if engine.fp16_enabled():
        _grow_scale_after_unscaling(opt, unscaled_backward=not engine.zero_optimization())
        if not engine.zero_optimization():
            _scale_loss_in_backward(engine)


@torch.no_grad()
def _undo_init_step(opt) -> None:
    # The masters were cloned from the model's weights just before that step, and the moments it
    # wrote are zeros (its gradients were zeros).
    for lp_group, hp_group in zip(opt.fp16_groups, opt.fp32_groups):
        for lp, hp in zip(lp_group, hp_group):
            hp.copy_(lp)
            step = opt.optimizer.state.get(hp, {}).get("step")
            if torch.is_tensor(step):
                step.zero_()


def _grow_scale_after_unscaling(opt, unscaled_backward: bool) -> None:
    update_scale, step, grown = opt._update_scale, opt.step, []

    def update_scale_after_step(overflow=False):
        if overflow:
            return update_scale(overflow)
        scaler = _scaler(opt)
        held = scaler.cur_scale
        update_scale(False)
        grown.append(scaler.cur_scale)
        scaler.cur_scale = held  # until step() has unscaled with the scale the gradients carry

    def step_then_grow(*args, **kwargs):
        used = _scaler(opt).cur_scale
        try:
            return step(*args, **kwargs)
        finally:
            if unscaled_backward and not opt.overflow:
                opt._global_grad_norm = opt._global_grad_norm / used  # measured on scaled gradients
            if grown:
                _scaler(opt).cur_scale = grown.pop()

    opt._update_scale, opt.step = update_scale_after_step, step_then_grow


def _scaler(opt):
    """Where ``cur_scale`` lives now: the DynamicLossScaler (ZeRO) or the LossScaleConfig (no ZeRO).
    Looked up on every use: ``load_checkpoint`` replaces the ZeRO optimizers' scaler object."""
    return getattr(opt, "loss_scaler", None) or opt.loss_scale_config


def _scale_loss_in_backward(engine) -> None:
    backward = engine.backward

    def scaled_backward(loss, *args, **kwargs):
        scale = _scaler(engine.optimizer).cur_scale
        return backward(loss.float() * scale, *args, **kwargs) / scale

    engine.backward = scaled_backward
