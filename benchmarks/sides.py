"""The sides of the overhead comparison, each timed on the same model, data, ds_config and
precision: a bare DeepSpeed loop, a plain PyTorch loop, the ``transformers`` Trainer (with and
without DeepSpeed) and dsinstab's own loop."""

from __future__ import annotations

import contextlib
import io
import shutil
import time
from pathlib import Path

import torch

from benchmarks.basics import (
    DTYPES,
    NEVER,
    ROOT,
    config,
    device,
    release,
    side_context,
    sync,
    tokens_per_step,
    trainer_precision,
)
from dsinstab.run.ds_config import precision


def bare_deepspeed(cfg, data, steps: int, keep: dict | None = None) -> float:
    """Engine forward, backward, step, nothing else: tokens/s over ``steps`` after 3 warm-up steps.
    ``keep["engine"]`` receives the trained engine (for the checkpoint measurement)."""
    from dsinstab.run.data import BatchOrder
    from dsinstab.run.engine import build_engine
    from dsinstab.run.lowp import compute_context
    from dsinstab.run.model import build_model, lm_loss

    t = cfg.trainer
    model = build_model(cfg.model, cfg.dataset.vocab_size, data.eos_id, t.seed)
    engine = build_engine(model, t, cfg.ds_config)
    order = BatchOrder(len(data.train), t.micro_batch_size, 1, 0, t.seed)
    ctx = compute_context(engine, cfg.utils.cpu_compute)
    for i in range(steps + 3):
        if i == 3:
            sync()
            start = time.perf_counter()
        for _ in range(t.gradient_accumulation_steps):
            batch = data.blocks("train", order.next()).to(engine.device)
            with ctx:
                loss, _ = lm_loss(engine(input_ids=batch[:, :-1]).logits, batch[:, 1:], 0.0)
                engine.backward(loss)
            engine.step()
    sync()
    seconds = time.perf_counter() - start
    if keep is not None:
        keep["engine"] = engine
    return steps * tokens_per_step(cfg) / seconds


def plain_pytorch(cfg, data, steps: int) -> float:
    """A nanoGPT-style loop: fp32 weights, autocast to the ds_config's precision (fp16 with a
    GradScaler), torch AdamW, clipping; no DeepSpeed."""
    from dsinstab.run.data import BatchOrder
    from dsinstab.run.engine import param_groups
    from dsinstab.run.model import build_model, lm_loss

    t, dev, prec = cfg.trainer, device(), precision(cfg.ds_config)
    model = build_model(cfg.model, cfg.dataset.vocab_size, data.eos_id, t.seed).to(dev)
    opt = torch.optim.AdamW(param_groups(model, t), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), foreach=True)
    scaler = torch.amp.GradScaler(dev.type, enabled=prec == "fp16")
    order = BatchOrder(len(data.train), t.micro_batch_size, 1, 0, t.seed)
    autocast = torch.autocast(dev.type, dtype=DTYPES[prec], enabled=prec != "fp32")
    with side_context(prec, cfg.utils.cpu_compute):
        for i in range(steps + 3):
            if i == 3:
                sync()
                start = time.perf_counter()
            for _ in range(t.gradient_accumulation_steps):
                batch = data.blocks("train", order.next()).to(dev)
                with autocast:
                    loss, _ = lm_loss(model(input_ids=batch[:, :-1]).logits, batch[:, 1:], 0.0)
                scaler.scale(loss / t.gradient_accumulation_steps).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
        sync()
    return steps * tokens_per_step(cfg) / (time.perf_counter() - start)


def hf_trainer(cfg, data, steps: int, out: Path, use_deepspeed: bool) -> float:
    """The ``transformers`` Trainer on the same model, blocks, schedule and precision; with
    ``use_deepspeed`` it is handed the same ds_config. Timed from the end of step 3 to the end of
    the last step (device-synchronised)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from dsinstab.run.model import build_model

    t, seq = cfg.trainer, cfg.model.seq_len

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return len(data.train)

        def __getitem__(self, i):
            ids = data.blocks("train", torch.tensor([i]))[0, :seq]
            return {"input_ids": ids, "labels": ids}  # the model shifts the labels itself

    marks: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (3, steps + 3):
                sync()
                marks[state.global_step] = time.perf_counter()

    ds = dict(
        cfg.ds_config,
        train_batch_size="auto",
        train_micro_batch_size_per_gpu="auto",
        gradient_accumulation_steps="auto",
        gradient_clipping="auto",
    )
    args = TrainingArguments(
        output_dir=str(out / "hf-trainer"),
        max_steps=steps + 3,
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.lr,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type="cosine",
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        max_grad_norm=t.grad_clip,
        **trainer_precision(cfg.ds_config),
        use_cpu=device().type == "cpu",
        logging_steps=NEVER,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        seed=t.seed,
        deepspeed=ds if use_deepspeed else None,
        disable_tqdm=True,
    )
    model = build_model(cfg.model, cfg.dataset.vocab_size, data.eos_id, t.seed)
    with side_context(precision(cfg.ds_config), cfg.utils.cpu_compute):
        Trainer(model=model, args=args, train_dataset=Blocks(), callbacks=[Clock()]).train()
    return steps * tokens_per_step(cfg) / (marks[steps + 3] - marks[3])


def dsinstab_loop(ds: Path, steps: int, out: Path, *overrides: str, preset: str | None = None) -> float:
    """The real entry point in this process; tokens/s from the wall-clock times of metrics.jsonl
    between step 3 and the last step. A line is written after the step's losses are read back
    to the host, so the device has finished the step. Logging, detectors and periodic checkpoints
    are inside that window; evaluation is not (``eval_every`` beyond the run; the evaluations
    before step 1 and after the last step fall outside), as none of the other sides evaluates."""
    from dsinstab.commands.train import main
    from dsinstab.run.tracking import read_jsonl

    name = f"bench-{time.monotonic_ns()}"
    argv = ["--config_dir", str(ROOT / "configs"), "--ds_config", str(ds)]
    argv += ["--preset", preset] if preset else []
    settings = [
        f"trainer.max_steps={steps + 3}",
        f"trainer.eval_every={NEVER}",
        "trainer.eval_batches=1",
        "trainer.log_every=1",
        "utils.report_to=none",
        "utils.progress_bar=false",
        f"utils.output_dir={out}",
        f"utils.cache_dir={out / 'cache'}",
        f"utils.run_name={name}",
    ]
    log = io.StringIO()  # the run's own console lines; shown if it fails
    with contextlib.redirect_stdout(log):
        code = main([*argv, "--set", *settings, *overrides])
    if code != 0:
        raise RuntimeError(f"the dsinstab run exited {code}:\n{log.getvalue()[-3000:]}")
    rows = [r for r in read_jsonl(out / name / "metrics.jsonl") if "train/loss" in r]
    t0, t1 = rows[2]["time"], rows[-1]["time"]
    cfg = config(ds, *overrides, preset=preset)
    shutil.rmtree(out / name)
    release()
    return steps * tokens_per_step(cfg) / (t1 - t0)
