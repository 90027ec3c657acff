"""Benchmarks, as ratios measured side by side in one run: ``python benchmarks/run.py [--quick]``.

1. dsinstab's loop (default logging, spike detection, periodic checkpoints; then diagnostics every
   50 steps and every step) against a bare DeepSpeed loop, a plain PyTorch loop and the
   ``transformers`` Trainer with and without DeepSpeed, on the same model, data and ds_config, the
   sides alternated.
2. Model FLOPs utilisation against the matmul peak ``torch.matmul`` reaches here, same precision.
3. Start-up: time to the first step from a cold and a warm dataset cache; tokenization throughput;
   a spike checkpoint's save time against one step.
4. Scaling: one rank against two, ZeRO stages 0-3: tokens/s and peak memory per rank.

Nothing here is a test: times on shared machines are noisy, so only ratios of sides measured in
the same run are reported. ``--out FILE`` writes the table as Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from dsinstab.config import load_config, precision, read_ds_config, resolve_ds_config  # noqa: E402
from dsinstab.engine import init_distributed  # noqa: E402


def config(ds: str, *overrides: str):
    cfg = load_config(ROOT / "configs", list(overrides))
    path = ROOT / "ds_configs" / f"{ds}.json"
    cfg.ds_config, _ = resolve_ds_config(read_ds_config(path), path, cfg, 1)
    cfg.ds_config_path = str(path)
    return cfg


# ---------------------------------------------------------------------------------------------
# The sides of the overhead comparison


def bare_deepspeed(cfg, data, steps: int, keep: dict | None = None) -> float:
    """Engine forward, backward, step, nothing else: tokens/s over ``steps`` after 3 warm-up steps.
    ``keep["engine"]`` receives the trained engine (for the checkpoint measurement)."""
    from dsinstab.data import BatchOrder
    from dsinstab.engine import build_engine, compute_context
    from dsinstab.model import build_model, lm_loss

    t = cfg.trainer
    model = build_model(cfg.model, cfg.dataset.vocab_size, data.eos_id, t.seed)
    engine = build_engine(model, t, cfg.ds_config)
    order, ctx = BatchOrder(len(data.train), t.micro_batch_size, 1, 0, t.seed), compute_context(engine)
    for i in range(steps + 3):
        if i == 3:
            start = time.perf_counter()
        batch = data.blocks("train", order.next())
        with ctx:
            loss, _ = lm_loss(engine(input_ids=batch[:, :-1]).logits, batch[:, 1:], 0.0)
            engine.backward(loss)
        engine.step()
    if keep is not None:
        keep["engine"] = engine
    return steps * t.micro_batch_size * cfg.model.seq_len / (time.perf_counter() - start)


def plain_pytorch(cfg, data, steps: int) -> float:
    """A nanoGPT-style loop: fp32 weights, bf16 autocast, torch AdamW, clipping; no DeepSpeed."""
    from dsinstab.data import BatchOrder
    from dsinstab.engine import param_groups
    from dsinstab.model import build_model, lm_loss

    t = cfg.trainer
    model = build_model(cfg.model, cfg.dataset.vocab_size, data.eos_id, t.seed)
    opt = torch.optim.AdamW(param_groups(model, t), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), foreach=True)
    order = BatchOrder(len(data.train), t.micro_batch_size, 1, 0, t.seed)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision(cfg.ds_config) == "bf16")
    for i in range(steps + 3):
        if i == 3:
            start = time.perf_counter()
        batch = data.blocks("train", order.next())
        with autocast:
            loss, _ = lm_loss(model(input_ids=batch[:, :-1]).logits, batch[:, 1:], 0.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * t.micro_batch_size * cfg.model.seq_len / (time.perf_counter() - start)


def hf_trainer(cfg, data, steps: int, out: Path, use_deepspeed: bool) -> float:
    """The ``transformers`` Trainer on the same model, blocks and schedule; with ``use_deepspeed``
    it is handed the same ds_config. Timed from the end of step 3 to the end of the last step."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from dsinstab.model import build_model

    t, seq = cfg.trainer, cfg.model.seq_len

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return len(data.train)

        def __getitem__(self, i):
            ids = data.blocks("train", torch.tensor([i]))[0, :seq]
            return {"input_ids": ids, "labels": ids}  # the model shifts the labels itself

    class Clock(TrainerCallback):
        marks: dict = {}

        def on_step_end(self, args, state, control, **kwargs):
            self.marks[state.global_step] = time.perf_counter()

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
        learning_rate=t.lr,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type="cosine",
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        max_grad_norm=t.grad_clip,
        bf16=True,
        use_cpu=True,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        seed=t.seed,
        deepspeed=ds if use_deepspeed else None,
        disable_tqdm=True,
    )
    model = build_model(cfg.model, cfg.dataset.vocab_size, data.eos_id, t.seed)
    clock = Clock()
    Trainer(model=model, args=args, train_dataset=Blocks(), callbacks=[clock]).train()
    return steps * t.micro_batch_size * seq / (clock.marks[steps + 3] - clock.marks[3])


def dsinstab_loop(ds: str, steps: int, out: Path, *overrides: str) -> float:
    """The real entry point in this process; tokens/s from the wall-clock times of metrics.jsonl
    between step 4 and the last step, so logging, detectors and checkpoints are all inside."""
    from dsinstab.cli import main
    from dsinstab.tracking import read_jsonl

    name = f"bench-{time.monotonic_ns()}"
    code = main(
        [
            "--ds_config",
            str(ROOT / "ds_configs" / f"{ds}.json"),
            "--set",
            f"trainer.max_steps={steps + 3}",
            f"trainer.eval_every={10**6}",
            "utils.report_to=none",
            "utils.progress_bar=false",
            f"utils.output_dir={out}",
            f"utils.run_name={name}",
            *overrides,
        ]
    )
    assert code == 0, f"dsinstab run exited {code}"
    rows = [r for r in read_jsonl(out / name / "metrics.jsonl") if "train/loss" in r]
    t0, t1 = rows[2]["time"], rows[-1]["time"]
    cfg = config(ds, *overrides)
    shutil.rmtree(out / name)
    return steps * cfg.trainer.micro_batch_size * cfg.model.seq_len / (t1 - t0)


# ---------------------------------------------------------------------------------------------
# The machine's limit


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start)


def flops_per_token(cfg, n_params: int) -> float:
    """6N for the weights (forward and backward) plus the attention scores, 12 · layers · T · d."""
    m = cfg.model
    return 6 * n_params + 12 * m.n_layer * m.seq_len * m.d_model


# ---------------------------------------------------------------------------------------------
# Start-up and scaling, through the launcher


def child_env() -> dict:
    """This process is rank 0 of its own one-rank group; a child must not inherit that."""
    drop = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def run_train(launcher: list[str], out: Path, name: str, *args: str) -> tuple[list[dict], dict]:
    """``scripts/train.py`` under ``launcher``, quietly; its logged training rows and status."""
    from dsinstab.tracking import read_jsonl

    cmd = [
        *launcher,
        str(ROOT / "scripts/train.py"),
        *args,
        "--set",
        "utils.report_to=none",
        "utils.progress_bar=false",
        f"utils.output_dir={out}",
        f"utils.run_name={name}",
    ]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT, env=child_env())
    rows = [r for r in read_jsonl(out / name / "metrics.jsonl") if "train/loss" in r]
    return rows, json.loads((out / name / "status.json").read_text())


def first_step_seconds(cache: Path, out: Path, name: str) -> float:
    start = time.time()
    rows, _ = run_train(
        [sys.executable], out, name, "--set", "trainer.max_steps=1", f"utils.cache_dir={cache}"
    )
    return rows[0]["time"] - start


def scaling_run(ds: str, ranks: int, steps: int, out: Path) -> tuple[float, float]:
    rows, status = run_train(
        ["deepspeed", "--num_gpus", str(ranks)],
        out,
        f"scale-{ds}-{ranks}",
        "--ds_config",
        str(ROOT / "ds_configs" / f"{ds}.json"),
        "--set",
        f"trainer.max_steps={steps}",
        f"trainer.eval_every={10**6}",
        "trainer.checkpoint_every=0",
    )
    return statistics.median(r["train/tokens_per_s"] for r in rows[3:]), status["peak_rss_mb"]


# ---------------------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="fewer steps and repeats, no ZeRO-stage sweep (~7 min)"
    )
    p.add_argument("--ds", default="zero2_bf16", help="ds_config of the overhead comparison")
    p.add_argument("--out", default=None, help="also write the Markdown table here")
    args = p.parse_args()
    steps, repeats = (100, 2) if args.quick else (200, 3)
    init_distributed(log=print)
    from dsinstab.data import prepare_data
    from dsinstab.model import build_model, count_parameters

    work = Path(tempfile.mkdtemp(prefix="dsinstab-bench-"))
    cfg = config(args.ds)
    rows: list[tuple[str, str]] = []

    # 3. data first: a cold cache, then a warm one
    cold = work / "cold-cache"
    start = time.perf_counter()
    data = prepare_data(cfg.dataset, cfg.model.seq_len, cold, log=lambda m: None)
    tok_time = time.perf_counter() - start
    tokens = (len(data.train) + len(data.validation)) * (cfg.model.seq_len + 1)
    rows.append(
        (
            "tokenize + pack the built-in corpus (cold, BPE training included)",
            f"{tok_time:.1f} s, {tokens / tok_time / 1e3:.0f}k tokens/s",
        )
    )
    rows.append(
        (
            "time to first step, cold cache (python scripts/train.py)",
            f"{first_step_seconds(work / 'c2', work, 'cold'):.1f} s",
        )
    )
    rows.append(("time to first step, warm cache", f"{first_step_seconds(work / 'c2', work, 'warm'):.1f} s"))

    # 1. overhead, alternating sides
    trained: dict = {}
    sides = {
        "bare DeepSpeed loop": lambda: bare_deepspeed(cfg, data, steps, trained),
        "dsinstab loop": lambda: dsinstab_loop(args.ds, steps, work),
        "dsinstab, diagnostics every 50 steps": lambda: dsinstab_loop(
            args.ds, steps, work, "trainer.diagnostics.every=50"
        ),
        "dsinstab, diagnostics every step": lambda: dsinstab_loop(
            args.ds, steps, work, "trainer.diagnostics.every=1"
        ),
        "plain PyTorch loop (bf16 autocast)": lambda: plain_pytorch(cfg, data, steps),
        "transformers Trainer + DeepSpeed (same ds_config)": lambda: hf_trainer(cfg, data, steps, work, True),
        "transformers Trainer, no DeepSpeed (bf16)": lambda: hf_trainer(cfg, data, steps, work, False),
    }
    results: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(repeats):
        for name, run in sides.items():
            results[name].append(run())
    bare = statistics.median(results["bare DeepSpeed loop"])
    for name, values in results.items():
        med = statistics.median(values)
        rows.append(
            (f"{name}: tokens/s (median of {repeats})", f"{med:,.0f}  (x{med / bare:.3f} of bare DeepSpeed)")
        )

    # 2. MFU against the measured matmul peak, in the run's precision
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float32, "fp32": torch.float32}[precision(cfg.ds_config)]
    peak = matmul_peak(dtype)
    n_params = count_parameters(build_model(cfg.model, cfg.dataset.vocab_size, data.eos_id, 0))
    achieved = flops_per_token(cfg, n_params) * statistics.median(results["dsinstab loop"])
    rows.append((f"torch.matmul peak ({dtype}, 2048^3)", f"{peak / 1e9:,.0f} GFLOP/s"))
    rows.append(
        (
            "dsinstab model FLOPs (6N + attention) per second",
            f"{achieved / 1e9:,.1f} GFLOP/s, MFU {achieved / peak:.1%}",
        )
    )

    # 3b. a spike checkpoint (model, fp32 master weights, Adam moments) against one step
    from dsinstab.checkpoint import Checkpointer

    engine = trained["engine"]
    ckpt = Checkpointer(engine, work / "ckpt-run", keep=1, is_main=True)
    start = time.perf_counter()
    ckpt.save("spike-1", {"dsinstab": {}}, 1)
    save_s = time.perf_counter() - start
    step_s = cfg.trainer.micro_batch_size * cfg.model.seq_len / statistics.median(results["dsinstab loop"])
    rows.append(("spike checkpoint save", f"{save_s:.2f} s = {save_s / step_s:.1f} steps"))

    # 4. scaling
    stages = (2,) if args.quick else (0, 1, 2, 3)
    for stage in stages:
        for ranks in (1, 2):
            tps, rss = scaling_run(f"zero{stage}_bf16", ranks, 30 if args.quick else 60, work)
            rows.append(
                (
                    f"ZeRO-{stage} bf16, {ranks} rank(s): tokens/s (all ranks), peak RSS per rank",
                    f"{tps:,.0f}, {rss} MB",
                )
            )

    width = max(len(k) for k, _ in rows)
    header = f"dsinstab benchmarks: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, ds_config {args.ds}, {steps} steps x {repeats}"
    print(header)
    for k, v in rows:
        print(f"  {k.ljust(width)}  {v}")
    if args.out:
        md = [
            f"_{header}_",
            "",
            "| measurement | result |",
            "| --- | --- |",
            *[f"| {k} | {v} |" for k, v in rows],
        ]
        Path(args.out).write_text("\n".join(md) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
