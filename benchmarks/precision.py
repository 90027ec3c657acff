"""Tokens/s of the default model in fp32, bf16 and fp16 through dsinstab's engine path, side by side:
``python benchmarks/precision.py [--steps N] [--threads N] [--slow] [--set SECTION.KEY=VALUE ...]``.

Each CPU setting runs in its own process (torch reads its ISA settings at import): this CPU as it
is, and with AVX-512 masked (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``), which is the
situation of a CI CPU without native bf16. Inside a process the precisions' engines are built once
and take turns in short rounds, so a load that comes and goes on a shared machine falls on all of
them alike; only the ratios to fp32 are meant to be compared. ``utils.cpu_compute`` is ``auto``
unless a side names another path. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsinstab.run.resolve import add_set_argument  # noqa: E402

# Name -> environment given to the measuring process
CPU_SETTINGS = {
    "this CPU": {},
    "AVX-512 masked (AVX2)": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}
# Side -> (ds_config, utils.cpu_compute)
SIDES = {
    "fp32": ("zero2_fp32", "auto"),
    "bf16": ("zero2_bf16", "auto"),
    "fp16": ("zero2_fp16", "auto"),
    "bf16 fp32-compute": ("zero2_bf16", "fp32"),
}
SLOW_SIDES = {"bf16 native": ("zero2_bf16", "native")}  # 20x slower where bf16 is not native
WARMUP, ROUND = 3, 5  # steps per side before timing, timed steps per side per turn


def measure(steps: int, sides: dict[str, tuple[str, str]], overrides: list[str] = ()) -> dict:
    """Build one engine per side in this process and time ``steps`` steps of each, in turns of
    :data:`ROUND`. Returns tokens/s per side, the compute path each took, and the CPU's features.
    ``overrides`` are ``--set`` items for the model and data (a tiny model for a smoke run)."""
    import torch
    from deepspeed.accelerator import get_accelerator

    from dsinstab.run.config import load_config
    from dsinstab.run.data import BatchOrder, prepare_data
    from dsinstab.run.distributed import init_distributed
    from dsinstab.run.ds_config import read_ds_config, resolve_ds_config
    from dsinstab.run.engine import build_engine
    from dsinstab.run.lowp import compute_context, cpu_features, describe, engine_dtype, use_fp32_compute
    from dsinstab.run.model import build_model, lm_loss

    init_distributed(log=lambda m: None)
    sync = get_accelerator().synchronize
    cfg = load_config(ROOT / "configs", list(overrides))
    t = cfg.trainer
    data = prepare_data(cfg.dataset, cfg.model.seq_len, cfg.utils.cache_dir, log=lambda m: None)
    tokens_per_step = t.micro_batch_size * cfg.model.seq_len
    # the other bf16 path only where it is not the one auto takes (on an accelerator there is one)
    other = "native" if use_fp32_compute(torch.bfloat16, "auto") else "fp32"
    other = other if get_accelerator().device_name() == "cpu" else "auto"
    sides = {k: v for k, v in sides.items() if v[1] == "auto" or (v[0] == "zero2_bf16" and v[1] == other)}
    runs = {}
    for name, (ds, mode) in sides.items():
        path = ROOT / "ds_configs" / f"{ds}.json"
        ds_config, _ = resolve_ds_config(read_ds_config(path), path, cfg, 1)
        model = build_model(cfg.model, cfg.dataset.vocab_size, data.eos_id, t.seed)
        engine = build_engine(model, t, ds_config)
        order = BatchOrder(len(data.train), t.micro_batch_size, 1, 0, t.seed)
        runs[name] = (engine, order, compute_context(engine, mode))

    def step(engine, order, ctx) -> None:
        batch = data.blocks("train", order.next()).to(engine.device)
        with ctx:
            loss, _ = lm_loss(engine(input_ids=batch[:, :-1]).logits, batch[:, 1:], 0.0)
            engine.backward(loss)
        engine.step()

    # a side on torch's reference bf16 kernels takes a sixth of the steps: it is 20x slower
    quota = {k: max(1, steps // 6) if sides[k][1] == "native" else steps for k in runs}
    seconds, cpu_seconds, done = dict.fromkeys(runs, 0.0), dict.fromkeys(runs, 0.0), dict.fromkeys(runs, 0)
    for run in runs.values():
        for _ in range(WARMUP):
            step(*run)
    while any(done[k] < quota[k] for k in runs):
        for name, run in runs.items():
            n = min(ROUND, quota[name] - done[name])
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(n):
                step(*run)
            sync()
            seconds[name] += time.perf_counter() - start
            cpu_seconds[name] += time.process_time() - cpu_start
            done[name] += n
    return {
        "tokens_per_s": {k: done[k] * tokens_per_step / s for k, s in seconds.items()},
        # CPU seconds of this process: what a busy shared machine disturbs least
        "tokens_per_cpu_s": {k: done[k] * tokens_per_step / s for k, s in cpu_seconds.items()},
        "steps": done,
        "path": {k: describe(run[2], engine_dtype(run[0])) for k, run in runs.items()},
        "features": cpu_features(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def child_env(extra: dict) -> dict:
    """A fresh single-rank process: no inherited rank variables, plus the CPU setting."""
    drop = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in drop and k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
    }
    return {**env, **extra}


def measure_in_child(setting: str, steps: int, slow: bool, threads: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            __file__,
            "--child",
            str(out),
            "--steps",
            str(steps),
            "--threads",
            str(threads),
        ]
        cmd += ["--slow"] if slow else []
        cmd += ["--set", *overrides] if overrides else []
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=child_env(CPU_SETTINGS[setting]), cwd=ROOT
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"precision benchmark ({setting}) exited {proc.returncode}:\n{proc.stderr[-3000:]}"
            )
        return json.loads(out.read_text())


def precision_rows(
    steps: int = 30, slow: bool = False, threads: int = 0, overrides: list[str] = ()
) -> list[tuple[str, str]]:
    """Rows ``(measurement, result)`` for each CPU setting: tokens/s of fp32, bf16 and fp16 (each on
    the path ``auto`` picks) and their ratios to fp32, by wall clock and by the process's CPU time;
    bf16 on the other path; the CPU's flags and what torch makes of them. ``slow`` adds bf16 on
    native kernels, which crawls where the CPU has none. ``threads`` > 0 sets torch's thread count:
    on a machine busier than its cores, one thread per process measures the work with the least
    noise from threads waiting for each other at every op. ``overrides``: ``--set`` items of
    every side (model, data, cache)."""
    from deepspeed.accelerator import get_accelerator

    # AVX-512 masking is a CPU matter; on an accelerator the first setting measures the device
    settings = list(CPU_SETTINGS)[: 2 if get_accelerator().device_name() == "cpu" else 1]
    rows: list[tuple[str, str]] = []
    for setting in settings:
        r = measure_in_child(setting, steps, slow, threads, list(overrides))
        tps, cpu, path, f = r["tokens_per_s"], r["tokens_per_cpu_s"], r["path"], r["features"]
        flags = [
            k for k in ("avx2", "avx512_f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16") if f[k]
        ]
        rows.append(
            (
                f"{setting}: CPU",
                f"{f['cpu']} ({' '.join(flags)}); torch {r['torch']} uses aten {f['aten_capability']}, "
                f"oneDNN bf16 {f['onednn_bf16']}, fp16 {f['onednn_fp16']}; {r['threads']} threads",
            )
        )
        rows.append(
            (
                f"{setting}: tokens/s fp32 / bf16 / fp16 ({steps} steps each, in turns)",
                f"{tps['fp32']:,.0f} / {tps['bf16']:,.0f} / {tps['fp16']:,.0f}  "
                f"(bf16/fp32 {tps['bf16'] / tps['fp32']:.2f}, fp16/fp32 {tps['fp16'] / tps['fp32']:.2f}; "
                f"per CPU-second {cpu['bf16'] / cpu['fp32']:.2f}, {cpu['fp16'] / cpu['fp32']:.2f})",
            )
        )
        for side in ("bf16", "fp16"):
            rows.append((f"{setting}: {side} with cpu_compute=auto", path[side]))
        for side in ("bf16 fp32-compute", "bf16 native"):
            if side in tps:
                rows.append(
                    (
                        f"{setting}: {side}, {r['steps'][side]} steps: tokens/s",
                        f"{tps[side]:,.0f}  ({tps[side] / tps['fp32']:.2f} of fp32; "
                        f"per CPU-second {cpu[side] / cpu['fp32']:.2f}): {path[side]}",
                    )
                )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per precision (after 3 warm-up steps)")
    p.add_argument(
        "--slow", action="store_true", help="also bf16 on native kernels (crawls without native bf16)"
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    add_set_argument(p, "model/data overrides of every side, e.g. model.n_layer=8 utils.cache_dir=/tmp/c")
    p.add_argument("--child", metavar="JSON", help=argparse.SUPPRESS)  # measure here, write the result there
    args = p.parse_args()
    if args.child:
        if args.threads > 0:
            import torch

            torch.set_num_threads(args.threads)
        sides = {**SIDES, **(SLOW_SIDES if args.slow else {})}
        Path(args.child).write_text(json.dumps(measure(args.steps, sides, args.overrides)))
        return 0
    rows = precision_rows(args.steps, args.slow, args.threads, args.overrides)
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k.ljust(width)}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
