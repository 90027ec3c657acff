"""What a run measures: the plan of a mode (``--smoke``, ``--quick``, full), and each section's
rows of the table."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from deepspeed.accelerator import get_accelerator

from benchmarks.basics import (
    DS_DIR,
    compute_dtype,
    config,
    device,
    flops,
    flops_per_token,
    matmul_peak,
    n_parameters,
    release,
    sync,
    tokens_per_step,
)
from benchmarks.launched import first_step_seconds, scaling_run
from benchmarks.sides import bare_deepspeed, dsinstab_loop, hf_trainer, plain_pytorch
from dsinstab.run.ds_config import precision

SECTIONS = ("data", "overhead", "mfu", "model", "checkpoint", "scaling", "precision", "corpus")

# --smoke: a 2-layer, 64-wide model on 400k characters, a couple of steps a side
SMOKE_MODEL = [
    "model.n_layer=2",
    "model.d_model=64",
    "model.n_head=2",
    "model.seq_len=64",
    "dataset.vocab_size=512",
    "dataset.max_chars=400000",
    "trainer.micro_batch_size=4",
    "trainer.gradient_accumulation_steps=1",
]
# The gpt2-124m preset reads FineWeb-Edu with GPT-2's tokenizer from the hub; the benchmark keeps
# its shape (layers, width, context, vocabulary, batch) on data that needs no network.
LOCAL_DATA = [
    "dataset.source=builtin",
    "dataset.name=",
    "dataset.config_name=",
    "dataset.tokenizer=bpe",
    f"dataset.num_proc={min(8, os.cpu_count() or 1)}",
]


@dataclass
class Plan:
    name: str
    steps: int  # timed steps of each overhead side
    repeats: int
    sections: tuple[str, ...]
    stages: tuple[int, ...]
    scale_steps: int
    model_steps: int
    precision_steps: int
    corpus_mb: tuple[int, ...]
    overrides: tuple[str, ...] = ()  # model/data overrides of every run
    ranks: tuple[int, ...] = (1, 2)  # of the scaling runs (one GPU: one rank)


def make_plan(args: argparse.Namespace, on_gpu: bool) -> Plan:
    if args.smoke:
        # two ranks only (the launcher and the collective); one step of the precision sides
        plan = Plan("smoke", 2, 1, SECTIONS, (2,), 4, 2, 1, (20,), tuple(SMOKE_MODEL), (2,))
    elif args.quick and on_gpu:  # the GPU check: the 124M shape against the device's peak
        plan = Plan("quick", 100, 1, ("model",), (2,), 30, 20, 30, ())
    elif args.quick:
        plan = Plan(
            "quick", 100, 2, ("data", "overhead", "mfu", "checkpoint", "scaling"), (2,), 30, 5, 30, ()
        )
    else:
        plan = Plan("full", 200, 3, SECTIONS, (0, 1, 2, 3), 60, 50 if on_gpu else 5, 100, (250, 1000))
    if args.sections:
        plan.sections = tuple(args.sections)
    return plan


def other_benchmark(module: str):
    """benchmarks/<module>.py, imported when its section runs; ``None`` (with a note) in a
    checkout without it."""
    try:
        return importlib.import_module(f"benchmarks.{module}")
    except ModuleNotFoundError as e:
        if e.name not in (f"benchmarks.{module}", "benchmarks"):
            raise
        print(f"note: benchmarks/{module}.py is not in this checkout; its rows are left out", file=sys.stderr)
        return None


def precision_section(plan: Plan, cache: Path) -> list[tuple[str, str]]:
    mod = other_benchmark("precision")
    if mod is None:
        return []
    return mod.precision_rows(plan.precision_steps, overrides=[*plan.overrides, f"utils.cache_dir={cache}"])


def corpus_section(plan: Plan, seq_len: int) -> list[tuple[str, str]]:
    """Generated local corpora prepared in bounded memory (benchmarks/data_prep.py), packed into
    blocks of the run's ``seq_len``."""
    mod = other_benchmark("data_prep")
    if mod is None:
        return []
    return [
        (
            f"prepare a generated {r['corpus_mb']:,.0f} MB local corpus ({r['tokenizer']} tokenizer, "
            f"{r['num_proc']} processes, blocks of {seq_len + 1}, cold cache)",
            f"{r['seconds']:.1f} s, {r['tokens_per_s'] / 1e3:,.0f}k tokens/s, peak RSS {r['peak_rss_mb']:,.0f} MB",
        )
        for r in mod.corpus_rows(list(plan.corpus_mb), seq_len=seq_len)
    ]


def overhead(plan: Plan, cfg, ds: Path, data, work: Path, trained: dict) -> tuple[list, float]:
    """Section ``overhead``; also returns the dsinstab loop's median tokens/s."""
    prec, steps, over = precision(cfg.ds_config), plan.steps, plan.overrides
    sides = {
        "bare DeepSpeed loop": lambda: bare_deepspeed(cfg, data, steps, trained),
        "dsinstab loop": lambda: dsinstab_loop(ds, steps, work, *over),
        "dsinstab, overflow tracing off (trainer.overflow.locate=false)": lambda: dsinstab_loop(
            ds, steps, work, *over, "trainer.overflow.locate=false"
        ),
        "dsinstab, diagnostics every 50 steps": lambda: dsinstab_loop(
            ds, steps, work, *over, "trainer.diagnostics.every=50"
        ),
        "dsinstab, diagnostics every step": lambda: dsinstab_loop(
            ds, steps, work, *over, "trainer.diagnostics.every=1"
        ),
        f"plain PyTorch loop ({prec if prec == 'fp32' else prec + ' autocast'})": lambda: plain_pytorch(
            cfg, data, steps
        ),
        "transformers Trainer + DeepSpeed (same ds_config)": lambda: hf_trainer(cfg, data, steps, work, True),
        f"transformers Trainer, no DeepSpeed ({prec})": lambda: hf_trainer(cfg, data, steps, work, False),
    }
    results: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(plan.repeats):
        for name, run in sides.items():
            results[name].append(run())
            release()
    bare = statistics.median(results["bare DeepSpeed loop"])
    rows = []
    for name, values in results.items():
        med = statistics.median(values)
        rows.append(
            (
                f"{name}: tokens/s (median of {plan.repeats})",
                f"{med:,.0f}  (x{med / bare:.3f} of bare DeepSpeed)",
            )
        )
    return rows, statistics.median(results["dsinstab loop"])


def model_section(plan: Plan, work: Path, on_gpu: bool) -> list[tuple[str, str]]:
    """The gpt2-124m preset's shape in bf16 and fp16 (ZeRO-2), MFU against the peaks measured here."""
    over = [*LOCAL_DATA, "trainer.checkpoint_every=0", *plan.overrides]
    shape = "gpt2-124m"
    if plan.overrides:
        shape += " preset, tiny shape (smoke)"
    elif not on_gpu:  # a 124M step of 64 x 1024 tokens takes minutes on a CPU
        over += ["trainer.micro_batch_size=1", "trainer.gradient_accumulation_steps=1"]
        shape += " (micro batch 1, no accumulation: CPU)"
    rows, tps = [], {}
    for prec in ("bf16", "fp16"):
        ds = DS_DIR / f"zero2_{prec}.json"
        cfg = config(ds, *over, preset="gpt2-124m")
        tps[prec] = dsinstab_loop(ds, plan.model_steps, work, *over, preset="gpt2-124m")
        dtype = compute_dtype(prec, cfg.utils.cpu_compute)
        peak, n = matmul_peak(dtype)
        achieved = flops_per_token(cfg, n_parameters(cfg)) * tps[prec]
        rows.append((f"torch.matmul peak on {device()} ({dtype}, {n}^3)", flops(peak)))
        label = (
            f"{shape} {prec}, {tokens_per_step(cfg):,} tokens/step, {plan.model_steps} steps: tokens/s, MFU"
        )
        ratio = f", x{tps[prec] / tps['bf16']:.3f} of bf16" if prec != "bf16" else ""
        rows.append(
            (label, f"{tps[prec]:,.0f} tokens/s{ratio}, MFU {achieved / peak:.1%} of the {dtype} peak")
        )
    return rows


@contextlib.contextmanager
def timed(section: str):
    """How long a section took, wall and CPU (this process and its children), on stderr."""
    wall, cpu = time.perf_counter(), time.process_time()
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    yield
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = time.process_time() - cpu + after.ru_utime + after.ru_stime - kids.ru_utime - kids.ru_stime
    print(
        f"section {section}: {time.perf_counter() - wall:.0f} s, {cpu:.0f} CPU s", file=sys.stderr, flush=True
    )


def measure(plan: Plan, ds: Path, work: Path) -> list[tuple[str, str]]:
    from dsinstab.run.data import prepare_data

    on_gpu = device().type != "cpu"
    over = list(plan.overrides)
    cfg = config(ds, *over)
    prec = precision(cfg.ds_config)
    rows: list[tuple[str, str]] = []
    data = None
    if {"data", "overhead", "checkpoint"} & set(plan.sections):
        with timed("data"):
            start = time.perf_counter()
            data = prepare_data(cfg.dataset, cfg.model.seq_len, work / "cold-cache", log=lambda m: None)
            tok_time = time.perf_counter() - start
            if "data" in plan.sections:
                tokens = (len(data.train) + len(data.validation)) * (cfg.model.seq_len + 1)
                rows.append(
                    (
                        "tokenize + pack the built-in corpus (cold, BPE training included)",
                        f"{tok_time:.1f} s, {tokens / tok_time / 1e3:,.0f}k tokens/s",
                    )
                )
                cold_s = first_step_seconds(work / "c2", work, "cold", over)
                rows.append(("time to first step, cold cache (python scripts/train.py)", f"{cold_s:.1f} s"))
                warm_s = first_step_seconds(work / "c2", work, "warm", over)
                rows.append(("time to first step, warm cache", f"{warm_s:.1f} s"))

    trained: dict = {}
    loop_tps = None
    if "overhead" in plan.sections:
        with timed("overhead"):
            section, loop_tps = overhead(plan, cfg, ds, data, work, trained)
            rows += section
    if "mfu" in plan.sections:
        with timed("mfu"):
            if loop_tps is None:
                loop_tps = dsinstab_loop(ds, plan.steps, work, *over)
            dtype = compute_dtype(prec, cfg.utils.cpu_compute)
            peak, n = matmul_peak(dtype)
            achieved = flops_per_token(cfg, n_parameters(cfg)) * loop_tps
            rows.append((f"torch.matmul peak on {device()} ({dtype}, {n}^3)", flops(peak)))
            rows.append(
                (
                    "dsinstab model FLOPs (6N + attention) per second",
                    f"{flops(achieved)}, MFU {achieved / peak:.1%}",
                )
            )
    if "model" in plan.sections:
        with timed("model"):
            rows += model_section(plan, work, on_gpu)
    if "checkpoint" in plan.sections:
        from dsinstab.run.checkpoint import Checkpointer

        with timed("checkpoint"):
            if "engine" not in trained:
                bare_deepspeed(cfg, data, 1, trained)
            if loop_tps is None:
                loop_tps = dsinstab_loop(ds, plan.steps, work, *over)
            ckpt = Checkpointer(trained["engine"], work / "ckpt-run", keep=1, is_main=True)
            sync()
            start = time.perf_counter()
            ckpt.save("spike-1", {"dsinstab": {}}, 1)
            sync()
            save_s = time.perf_counter() - start
            step_s = tokens_per_step(cfg) / loop_tps
            rows.append(("spike checkpoint save", f"{save_s:.3g} s = {save_s / step_s:.3g} steps"))
    trained.clear()
    release()
    if "scaling" in plan.sections:
        most = get_accelerator().device_count() if on_gpu else max(plan.ranks)
        with timed("scaling"):
            for stage in plan.stages:
                for ranks in sorted({min(r, most) for r in plan.ranks}):
                    path = DS_DIR / f"zero{stage}_{prec}.json"
                    tps, rss = scaling_run(path, ranks, plan.scale_steps, work, over)
                    rows.append(
                        (
                            f"ZeRO-{stage} {prec}, {ranks} rank(s): tokens/s (all ranks), peak RSS per rank",
                            f"{tps:,.0f}, {rss} MB",
                        )
                    )
    if "precision" in plan.sections:
        with timed("precision"):
            rows += precision_section(plan, work / "cold-cache")
    if "corpus" in plan.sections:
        with timed("corpus"):
            rows += corpus_section(plan, cfg.model.seq_len)
    return rows
