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

This file is the command line and the table; the measuring is in ``basics.py`` (input, device,
precision, the matmul peak), ``sides.py`` (the sides of the overhead comparison), ``launched.py``
(``scripts/train.py`` in child processes) and ``sections.py`` (the plan and each section's rows).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from deepspeed.accelerator import get_accelerator  # noqa: E402

from benchmarks.basics import config, device, ds_path, trainer_precision  # noqa: E402
from benchmarks.sections import SECTIONS, make_plan, measure  # noqa: E402
from dsinstab.run.config import ConfigError  # noqa: E402
from dsinstab.run.distributed import init_distributed  # noqa: E402

# what the tests reach through this script: its input, the Trainer's precision, the table
__all__ = ["check_out", "config", "ds_path", "main", "trainer_precision", "write_out"]

TABLE_BEGIN = "<!-- benchmarks/run.py --out: table begin -->"
TABLE_END = "<!-- benchmarks/run.py --out: table end -->"


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
