"""Train the same model on the same seed and data in fp16 and in bf16, then compare them.

    python scripts/fp16_vs_bf16.py --preset fp16-collapse --set utils.run_name=first

Both runs go through the DeepSpeed launcher, one after the other, with identical settings but the
ds_config (``ds_configs/zero<stage>_fp16.json`` and ``..._bf16.json``), as ``<name>-fp16`` and
``<name>-bf16`` in one wandb group. The report lands in ``<output_dir>/<name>-report/`` and, when
wandb is on, in a wandb run of its own in the same group.
"""

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from dsinstab.reports.report import report_command  # noqa: E402
from dsinstab.run.config import ConfigError, load_config  # noqa: E402
from dsinstab.run.distributed import free_port  # noqa: E402
from dsinstab.run.resolve import add_set_argument, find_path, presets_help  # noqa: E402
from dsinstab.run.status import EXIT_CODES  # noqa: E402
from dsinstab.run.tracking import log_report  # noqa: E402

EXAMPLES = """\
examples:
  # fp16 dies at its minimum loss scale, bf16 trains on; open runs/first-report/report.html
  python scripts/fp16_vs_bf16.py --preset fp16-collapse --set utils.run_name=first
  # the pair under ZeRO-3 on two ranks each, without wandb
  python scripts/fp16_vs_bf16.py --preset fp16-collapse --zero 3 --num_gpus 2 --set utils.report_to=none

Runs land in <utils.output_dir>/<name>-fp16, <name>-bf16 and <name>-report (default: runs/ below
the working directory; <name> is utils.run_name or fp16-vs-bf16-<date>-<time>).
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog=EXAMPLES + "\n" + presets_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--preset", default=None, metavar="NAME|PATH", help="a preset applied to both runs (default: none)"
    )
    add_set_argument(
        p, "overrides applied to both runs, e.g. --set utils.run_name=first trainer.max_steps=100"
    )
    p.add_argument(
        "--config_dir",
        default="configs",
        metavar="DIR",
        help="folder with the four YAML files, relative to the working directory or the checkout "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--zero",
        type=int,
        default=2,
        choices=(0, 1, 2, 3),
        help="ZeRO stage of both ds_configs (default: %(default)s)",
    )
    p.add_argument("--num_gpus", type=int, default=1, help="ranks per run (default: %(default)s)")
    p.add_argument(
        "--master_port",
        type=int,
        default=0,
        help="the launcher's port (default: a free one per run, so pairs can run side by side)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace runs of the same names")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    args.config_dir = str(find_path(args.config_dir))
    try:
        cfg = load_config(args.config_dir, args.overrides, args.preset)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = cfg.utils.run_name or f"fp16-vs-bf16-{time.strftime('%Y%m%d-%H%M%S')}"
    group = cfg.utils.wandb_group or name  # both runs, and the report's, in one wandb group
    runs_dir = Path(cfg.utils.output_dir).expanduser()
    started = time.time()
    run_dirs = []
    for precision in ("fp16", "bf16"):
        run_name = f"{name}-{precision}"
        cmd = [
            shutil.which("deepspeed") or "deepspeed",
            "--num_gpus",
            str(args.num_gpus),
            "--master_port",
            str(args.master_port or free_port()),
            str(ROOT / "scripts" / "train.py"),
            "--config_dir",
            args.config_dir,
            "--ds_config",
            str(ROOT / "ds_configs" / f"zero{args.zero}_{precision}.json"),
            *(["--preset", args.preset] if args.preset else []),
            *(["--overwrite"] if args.overwrite else []),
            "--set",
            *args.overrides,
            f"utils.run_name={run_name}",
            f"utils.wandb_group={group}",
        ]
        print(f"== {precision}: {' '.join(cmd[1:])}", flush=True)
        code = subprocess.call(cmd)
        if code == 2:
            return 2  # bad input: the run already said why
        print(
            f"== {precision} run ended with exit code {code}: {EXIT_CODES.get(code, 'a crash')}", flush=True
        )
        run_dirs.append(runs_dir / run_name)
    out = report_command(run_dirs, runs_dir / f"{name}-report")
    if out is None:
        return 2
    print(f"== both runs and the report took {time.time() - started:.0f}s; open {out / 'report.html'}")
    if cfg.utils.report_to == "wandb":
        log_report(out, cfg.utils.wandb_project, f"{name}-report", group)
    return 0


if __name__ == "__main__":
    sys.exit(main())
