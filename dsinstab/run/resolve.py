"""From a command line to a checked run config, the same for every command that starts runs.

Paths are taken relative to the working directory first, then to the checkout, so the shipped
``configs/`` and ``ds_configs/`` work from any directory.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from dsinstab.run.config import ConfigError, RunConfig, load_config
from dsinstab.run.ds_config import read_ds_config, resolve_ds_config

ROOT = Path(__file__).resolve().parents[2]  # the checkout, whose configs/ and ds_configs/ are shipped
DEFAULT_DS_CONFIG = "ds_configs/zero2_bf16.json"


def find_path(path: str | Path, folder: str = "", suffix: str = "") -> Path:
    """``path`` as given (relative to the working directory), else the same path inside the
    checkout, else, for a bare name, ``<folder>/<name><suffix>`` in the checkout. A path found
    nowhere comes back as given, for the error to name it."""
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        return p
    candidates = [ROOT / p]
    if folder and len(p.parts) == 1:
        candidates.append(ROOT / folder / (p.name if p.suffix == suffix else p.name + suffix))
    return next((c for c in candidates if c.exists()), p)


def shipped(folder: str, pattern: str) -> list[tuple[str, str]]:
    """(name, first comment line) of each shipped file, e.g. the presets with their summary."""
    out = []
    for f in sorted((ROOT / folder).glob(pattern)):
        first = f.read_text().splitlines()[:1] if f.suffix == ".yaml" else []
        out.append((f.stem, first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""))
    return out


def presets_help() -> str:
    rows = shipped("configs/presets", "*.yaml")
    width = max((len(n) for n, _ in rows), default=0)
    lines = [f"  {n:<{width}}  {summary}" for n, summary in rows]
    return "presets (--preset NAME, configs/presets/NAME.yaml):\n" + "\n".join(lines)


def ds_configs_help() -> str:
    names = ", ".join(n for n, _ in shipped("ds_configs", "*.json"))
    names = textwrap.fill(names, 96, initial_indent="  ", subsequent_indent="  ")
    return f"ds_configs (--ds_config ds_configs/NAME.json or NAME):\n{names}"


def add_set_argument(p: argparse.ArgumentParser, help: str) -> None:
    """``--set SECTION.KEY=VALUE ...``, repeatable: the overrides every entry point takes."""
    p.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help=help,
    )


def resolve(args: argparse.Namespace, world_size: int) -> tuple[RunConfig, list[str]]:
    """The run config and the resolved ds_config, from any working directory."""
    args.config_dir = str(find_path(args.config_dir))
    if args.preset and Path(args.preset).suffix in (".yaml", ".yml"):
        args.preset = str(find_path(args.preset))
    ds_path = find_path(args.ds_config, "ds_configs", ".json")
    if not ds_path.exists():
        names = ", ".join(n for n, _ in shipped("ds_configs", "*.json"))
        raise ConfigError(f"--ds_config: {args.ds_config} does not exist; give a path or one of {names}.")
    args.ds_config = str(ds_path)
    cfg = load_config(args.config_dir, args.overrides, args.preset)
    cfg.ds_config, notes = resolve_ds_config(read_ds_config(ds_path), ds_path, cfg, world_size)
    cfg.ds_config_path = str(ds_path)
    return cfg, notes
