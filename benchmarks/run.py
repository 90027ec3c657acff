"""Benchmarks, as ratios measured side by side in one run: ``python benchmarks/run.py [--quick]``.

Sections (``--sections`` picks some):

- ``data``: tokenize + pack the built-in corpus; time to the first step, cold and warm cache.
- ``overhead``: dsinstab's loop (default logging, spike detection, periodic checkpoints; then
  diagnostics every 50 steps and every step) against a bare DeepSpeed loop, a plain PyTorch loop and
  the ``transformers`` Trainer with and without DeepSpeed, on the same model, data, ds_config and
  precision, the sides alternated.
- ``mfu``: the loop's model FLOPs against the matmul peak measured on the engine's device.
- ``model``: the ``gpt2-124m`` preset's shape (on the built-in corpus with a BPE trained here, so no
  network), bf16 and fp16: tokens/s and MFU against the bf16 and fp16 peaks measured in the run.
- ``checkpoint``: a spike checkpoint's save time against one step.
- ``scaling``: one rank against two, ZeRO stages 0-3: tokens/s and peak memory per rank.
- ``precision`` (benchmarks/precision.py) and ``corpus`` (benchmarks/data_prep.py).

Everything runs on DeepSpeed's accelerator (a GPU where there is one), every timing is bracketed by
its ``synchronize()``. Nothing here is a test of speed: times on shared machines are noisy, so only
ratios of sides measured in the same run are reported. ``--smoke`` runs every section for a couple
of steps on a tiny model (the suite checks the table's shape with it). ``--out FILE`` writes the
table between the markers below in FILE, leaving the rest of the file as it is.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import io
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from deepspeed.accelerator import get_accelerator  # noqa: E402

from dsinstab.run.config import (  # noqa: E402
    ConfigError,
    load_config,
    precision,
    read_ds_config,
    resolve_ds_config,
)
from dsinstab.run.distributed import init_distributed  # noqa: E402

DS_DIR = ROOT / "ds_configs"
DEEPSPEED = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
SECTIONS = ("data", "overhead", "mfu", "model", "checkpoint", "scaling", "precision", "corpus")
TABLE_BEGIN = "<!-- benchmarks/run.py --out: table begin -->"
TABLE_END = "<!-- benchmarks/run.py --out: table end -->"
NEVER = 10**6  # a step count no benchmark run reaches (evaluation off inside the timed window)

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


# ---------------------------------------------------------------------------------------------
# Input, device, precision


def ds_path(arg: str) -> Path:
    """``--ds``: a bare name in ds_configs/ (``zero2_fp32``) or a path to a JSON file."""
    names = ", ".join(sorted(p.stem for p in DS_DIR.glob("*.json")))
    if arg.endswith(".json") or os.sep in arg:
        path = Path(arg).expanduser()
        if not path.is_file():
            raise ConfigError(f"--ds: {arg} is not a file; give a ds_config path or a name among {names}.")
        return path.resolve()
    path = DS_DIR / f"{arg}.json"
    if not path.is_file():
        raise ConfigError(f"--ds: {arg!r} is not in ds_configs/; pick one of {names}, or give a JSON path.")
    return path


def config(ds: Path, *overrides: str, preset: str | None = None):
    cfg = load_config(ROOT / "configs", list(overrides), preset)
    cfg.ds_config, _ = resolve_ds_config(read_ds_config(ds), ds, cfg, 1)
    cfg.ds_config_path = str(ds)
    return cfg


def device() -> torch.device:
    """The device DeepSpeed's engine trains on (``cuda:N`` on a GPU machine, else ``cpu``)."""
    return torch.device(get_accelerator().current_device_name())


def sync() -> None:
    get_accelerator().synchronize()


def release() -> None:
    """Free what the last side left on the device before the next one is timed."""
    gc.collect()
    get_accelerator().empty_cache()


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def fp32_compute(prec: str, mode: str) -> bool:
    """Whether ``prec`` matmuls run in fp32 here: on a CPU without native kernels for it (see
    dsinstab/run/lowp.py), as dsinstab's own loop does. Never on a GPU."""
    if device().type != "cpu" or prec == "fp32":
        return False
    from dsinstab.run.lowp import use_fp32_compute

    return use_fp32_compute(DTYPES[prec], mode)


def compute_dtype(prec: str, mode: str = "auto") -> torch.dtype:
    """The dtype the run's matmuls actually execute in: its peak is the one MFU is measured against."""
    return torch.float32 if fp32_compute(prec, mode) else DTYPES[prec]


def side_context(prec: str, mode: str) -> contextlib.AbstractContextManager:
    """For the sides without a DeepSpeed engine of ours (plain PyTorch, the Trainer): the same
    low-precision arithmetic as dsinstab's loop, so every side runs the same kernels."""
    if not fp32_compute(prec, mode):
        return contextlib.nullcontext()
    from dsinstab.run.lowp import LowPrecisionInFp32

    return LowPrecisionInFp32(DTYPES[prec])


def trainer_precision(ds_config: dict) -> dict:
    """The ``TrainingArguments`` precision flags that match the ds_config: both sides of a
    comparison compute in the same precision."""
    prec = precision(ds_config)
    return {"bf16": prec == "bf16", "fp16": prec == "fp16"}


def tokens_per_step(cfg) -> int:
    t = cfg.trainer
    return t.micro_batch_size * t.gradient_accumulation_steps * cfg.model.seq_len


# ---------------------------------------------------------------------------------------------
# The sides of the overhead comparison


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


# ---------------------------------------------------------------------------------------------
# The machine's limit


def matmul_peak(dtype: torch.dtype, reps: int = 10) -> tuple[float, int]:
    """FLOP/s of an n x n x n ``torch.matmul`` on the engine's device; n is 8192 on a GPU (large
    enough to fill it), 2048 on a CPU. Returns (FLOP/s, n)."""
    dev = device()
    n = 2048 if dev.type == "cpu" else 8192
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    for _ in range(3):
        a @ b
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    seconds = time.perf_counter() - start
    del a, b
    release()
    return 2 * n**3 * reps / seconds, n


def flops_per_token(cfg, n_params: int) -> float:
    """6N for the weights (forward and backward) plus the attention scores, 12 · layers · T · d."""
    m = cfg.model
    return 6 * n_params + 12 * m.n_layer * m.seq_len * m.d_model


def n_parameters(cfg) -> int:
    from dsinstab.run.model import build_model, count_parameters

    with torch.device("meta"):  # the shapes only: no memory, no init
        return count_parameters(build_model(cfg.model, cfg.dataset.vocab_size, 0, 0))


def flops(x: float) -> str:
    return f"{x / 1e12:,.1f} TFLOP/s" if x >= 1e12 else f"{x / 1e9:,.1f} GFLOP/s"


# ---------------------------------------------------------------------------------------------
# Start-up and scaling, through the launcher


def free_port() -> int:
    """The launcher's default port (29500) may be taken by another job on the same machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict:
    """This process is rank 0 of its own one-rank group; a child must not inherit that."""
    drop = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def run_train(launcher: list[str], out: Path, name: str, *args: str) -> tuple[list[dict], dict]:
    """``scripts/train.py`` under ``launcher``, quietly; its logged training rows and status."""
    from dsinstab.run.tracking import read_jsonl

    cmd = [
        *launcher,
        str(ROOT / "scripts/train.py"),
        *args,
        "utils.report_to=none",
        "utils.progress_bar=false",
        f"utils.output_dir={out}",
        f"utils.run_name={name}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=child_env())
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    rows = [r for r in read_jsonl(out / name / "metrics.jsonl") if "train/loss" in r]
    return rows, json.loads((out / name / "status.json").read_text())


def first_step_seconds(cache: Path, out: Path, name: str, overrides: list[str]) -> float:
    start = time.time()
    rows, _ = run_train(
        [sys.executable], out, name, "--set", *overrides, "trainer.max_steps=1", f"utils.cache_dir={cache}"
    )
    return rows[0]["time"] - start


def scaling_run(ds: Path, ranks: int, steps: int, out: Path, overrides: list[str]) -> tuple[float, float]:
    rows, status = run_train(
        [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port())],
        out,
        f"scale-{ds.stem}-{ranks}",
        "--ds_config",
        str(ds),
        "--set",
        *overrides,
        f"trainer.max_steps={steps}",
        f"trainer.eval_every={NEVER}",
        "trainer.checkpoint_every=0",
        f"utils.cache_dir={out / 'cache'}",
    )
    timed = rows[3:] or rows[-1:]
    return statistics.median(r["train/tokens_per_s"] for r in timed), status["peak_rss_mb"]


# ---------------------------------------------------------------------------------------------
# What a run measures


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


# ---------------------------------------------------------------------------------------------
# The table


def machine() -> str:
    if device().type != "cpu":
        acc = get_accelerator()
        return f"{acc.device_count()} x {torch.cuda.get_device_name() if torch.cuda.is_available() else acc.device_name()}"
    from dsinstab.run.lowp import cpu_features

    f = cpu_features()
    flags = [k for k in ("avx2", "avx512_f", "avx512_bf16", "avx512_fp16", "amx_bf16") if f.get(k)]
    return f"{f['cpu']}, {os.cpu_count()} cores ({', '.join(flags) or 'no AVX2'})"


def markdown(header: str, rows: list[tuple[str, str]]) -> str:
    lines = [
        f"_{header}_",
        "",
        "| measurement | result |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in rows],
    ]
    return "\n".join(lines)


def check_out(path: Path) -> None:
    """``--out``, before anything is measured: a new file, or one holding the table markers."""
    if not path.exists():
        if not path.parent.is_dir():
            raise ConfigError(f"--out: the folder {path.parent} does not exist.")
        return
    text = path.read_text()
    if not (TABLE_BEGIN in text and TABLE_END in text and text.index(TABLE_BEGIN) < text.index(TABLE_END)):
        raise ConfigError(
            f"--out: {path} exists without the lines {TABLE_BEGIN} and {TABLE_END}; "
            "add them where the table goes, or give a new file."
        )


def write_out(path: Path, table: str) -> None:
    """The table between the markers; everything outside them stays as it was."""
    if not path.exists():
        path.write_text(f"{TABLE_BEGIN}\n{table}\n{TABLE_END}\n")
        return
    text = path.read_text()
    head, rest = text.split(TABLE_BEGIN, 1)
    tail = rest.split(TABLE_END, 1)[1]
    path.write_text(f"{head}{TABLE_BEGIN}\n{table}\n{TABLE_END}{tail}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        action="store_true",
        help="CPU: 100 steps x 2, ZeRO-2 only, no model/precision/corpus sections (~7 min); "
        "GPU: the gpt2-124m shape in bf16 and fp16 against the measured peaks (~1 min)",
    )
    mode.add_argument(
        "--smoke",
        action="store_true",
        help="every section, a couple of steps on a tiny model: checks that all of it runs, measures nothing",
    )
    p.add_argument(
        "--ds",
        default="zero2_bf16",
        help="ds_config of the comparison: a name in ds_configs/ or a path (default: zero2_bf16)",
    )
    p.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=None,
        help="run only these sections (default: the mode's)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="also write the Markdown table into this file, between its table markers (a new file gets them)",
    )
    args = p.parse_args(argv)
    try:
        ds = ds_path(args.ds)
        config(ds)  # a bad ds_config is refused before anything runs
        if args.out:
            check_out(Path(args.out))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    init_distributed(log=print)
    plan = make_plan(args, device().type != "cpu")
    work = Path(tempfile.mkdtemp(prefix="dsinstab-bench-"))
    try:
        rows = measure(plan, ds, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    header = (
        f"dsinstab benchmarks ({plan.name}): {machine()}, torch {torch.__version__}, ds_config {ds.stem}, "
        f"{plan.steps} steps x {plan.repeats}, {time.strftime('%Y-%m-%d')}"
    )
    width = max(len(k) for k, _ in rows)
    print(header)
    for k, v in rows:
        print(f"  {k.ljust(width)}  {v}")
    if args.out:
        write_out(Path(args.out), markdown(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
