"""``deepspeed.initialize`` with our AdamW and schedule, and readouts of the engine's state."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from dsinstab.run.config import TrainerConfig
from dsinstab.run.ds_config import precision


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
    return [
        {"params": decay, "weight_decay": decay_rate(tc), "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def decay_rate(tc: TrainerConfig) -> float:
    """The ``weight_decay`` AdamW's decaying group gets (see :func:`param_groups`)."""
    return tc.weight_decay / tc.lr if tc.independent_weight_decay else tc.weight_decay


OptimizerFactory = Callable[[list[dict], TrainerConfig], torch.optim.Optimizer]


def adamw(groups: list[dict], tc: TrainerConfig) -> torch.optim.Optimizer:
    """torch's AdamW, ``fused`` where the device has the kernel (CUDA), ``foreach`` elsewhere."""
    kind = {"fused": True} if get_accelerator().device_name() == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.adam_beta1, tc.adam_beta2), eps=tc.adam_eps, **kind)


def build_engine(
    model: torch.nn.Module,
    tc: TrainerConfig,
    ds_config: dict,
    optimizer: OptimizerFactory = adamw,
    correct_faults: bool = True,
    compile_backend: str | None = None,
):
    """The DeepSpeed engine, with ``optimizer`` (torch's AdamW unless a mitigation brings its own,
    see ``dsinstab.instruments.registry.optimizer_for``) and transformers' warmup + cosine schedule,
    and DeepSpeed 0.19.8's faults corrected (:func:`correct_deepspeed_faults`; ``False`` shows them).
    With ``compile_backend`` (``model.compile``) the model is compiled with it by DeepSpeed's
    ``engine.compile``: ``torch.compile`` of the module in place, so its parameters keep their
    names and checkpoints their keys. Module hooks and compile do not mix reliably: dynamo traces
    the hooks it finds at the first forward, turns the Python state they read into guards (a
    recompile when it changes) and may never see one added later (measured, torch 2.13: a forward
    hook added to a block without hooks after the first compiled forward never ran), hence
    ``dsinstab.instruments.registry.check_compile``'s refusals.

    The engine steps the schedule only on applied steps, so an fp16 overflow does not advance it.
    """
    if precision(ds_config) == "fp16":
        allow_cpu_fp16()
    optimizer = optimizer(param_groups(model, tc), tc)

    def schedule(opt):
        return get_cosine_with_min_lr_schedule_with_warmup(
            opt, tc.warmup_steps, tc.max_steps, min_lr_rate=tc.min_lr_ratio
        )

    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config
    )
    if correct_faults:
        correct_deepspeed_faults(engine)
    if compile_backend:
        engine.compile(backend=compile_backend)
    return engine


def compile_refusal(backend: str) -> str | None:
    """Why ``model.compile`` cannot use ``backend`` here, as the end of a sentence naming the key;
    ``None`` when it can. Inductor writes C++ for a CPU and builds it with ``$CXX`` (g++ unless set)."""
    cxx = os.environ.get("CXX", "g++")
    if backend == "inductor" and get_accelerator().device_name() == "cpu" and not shutil.which(cxx):
        return (
            f"inductor needs a C++ compiler on a CPU and {cxx} is not on PATH; install one, set CXX, "
            "or use model.compile_backend aot_eager or eager."
        )
    return None


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
    decay = decay_rate(tc)
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


def bare_optimizer(engine) -> bool:
    """fp32 without ZeRO: the engine steps the torch optimizer itself, clips with its config and
    reports no grad norm (so the loop measures it before ``step``)."""
    return not (engine.fp16_enabled() or engine.bfloat16_enabled() or engine.zero_optimization())


def client_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer that applies the update (DeepSpeed's wrappers hold it as ``.optimizer``)."""
    return engine.optimizer if bare_optimizer(engine) else engine.optimizer.optimizer


def set_grad_clip(engine, value: float) -> None:
    """The global-norm clip ``engine.step()`` applies next (0: none). DeepSpeed's ZeRO 1-3 and
    fp16/bf16 optimizers read their ``clip_grad`` in ``step``; the bare path reads the config."""
    if bare_optimizer(engine):
        engine._config.gradient_clipping = value
    else:
        engine.optimizer.clip_grad = value


def grads_norm(model: torch.nn.Module) -> torch.Tensor:
    """The global norm of the gradients as they are now (a 0-d tensor on their device)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    return torch.nn.utils.get_total_norm(grads).double()


def reported_grad_norm(engine) -> torch.Tensor:
    """DeepSpeed's global grad norm of the last step, before clipping (call after ``step``), as a
    0-d float64 tensor on the engine's device; nan where it reports none."""
    norm = engine.get_global_grad_norm()
    norm = math.nan if norm is None else norm
    return torch.as_tensor(norm, dtype=torch.float64).to(engine.device)


def wrapper_grad_norm(engine) -> torch.Tensor | float:
    """The global grad norm of the step, unscaled and before clipping, as DeepSpeed's optimizer holds
    it while it calls the client optimizer (ZeRO 1-3 and the bf16 optimizer: a tensor). On ZeRO-0
    fp16 the wrapper measured the scaled gradients (dsinstab scales the loss there; see
    :func:`correct_deepspeed_faults`), so the scale is divided out as that correction does after."""
    norm = engine.optimizer._global_grad_norm
    if engine.fp16_enabled() and not engine.zero_optimization():
        norm = norm / loss_scale(engine)
    return norm


def finite_or_inf(norm: float) -> float:
    """A grad norm as the loop logs it: ``inf`` for a non-finite, negative or unreported one."""
    return norm if math.isfinite(norm) and norm >= 0 else math.inf


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
