"""What every benchmark side shares: the ``--ds`` input, the run config, the device and its
synchronisation, the precision a side computes in, and the machine's matmul peak (what MFU is
measured against)."""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from deepspeed.accelerator import get_accelerator

from dsinstab.run.config import ConfigError, load_config
from dsinstab.run.ds_config import precision, read_ds_config, resolve_ds_config

ROOT = Path(__file__).resolve().parents[1]
DS_DIR = ROOT / "ds_configs"
DEEPSPEED = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
NEVER = 10**6  # a step count no benchmark run reaches (evaluation off inside the timed window)


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
