"""Command lines for runs that start somewhere else: one shell line per run, ``commands.txt``
(what a sweep's, the zoo's and a replay's ``--emit commands`` write), and DeepSpeed's launcher for
the ranks of one run, on this node or across a hostfile's nodes.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dsinstab.run.config import ConfigError
from dsinstab.run.resolve import ROOT

TRAIN = ROOT / "scripts" / "train.py"
DEEPSPEED_PORT = 29500  # DeepSpeed's launcher's rendezvous port unless told another


def command_line(cmd: list[str], cwd: Path | None = None) -> str:
    """``cmd`` as one shell line, run from ``cwd`` where given."""
    line = shlex.join(cmd)
    return f"cd {shlex.quote(str(cwd))} && {line}" if cwd is not None else line


def write_commands(folder: Path, lines: list[str]) -> Path:
    """``folder/commands.txt``: one command a line."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "commands.txt"
    path.write_text("".join(line + "\n" for line in lines))
    return path


@dataclass
class Launch:
    """How a run's ranks start: one process for one rank; DeepSpeed's launcher for more, on this
    node (``--num_gpus``) or on the first ``num_nodes`` hosts of a hostfile, ``num_gpus`` each."""

    hostfile: Path | None = None
    num_nodes: int = 1
    num_gpus: int = 1
    master_addr: str | None = None
    master_port: int | None = None  # None: a port free on this machine when the command is made
    extra: list[str] = field(default_factory=list)  # more of the launcher's own options, as given

    def head(self) -> list[str]:
        """The command up to and including ``scripts/train.py``."""
        if self.hostfile is None and self.num_gpus == 1 and not self.extra:
            return [sys.executable, str(TRAIN)]
        from dsinstab.run.distributed import free_port

        launcher = Path(sys.executable).parent / "deepspeed"
        head = [str(launcher) if launcher.exists() else "deepspeed"]
        if self.hostfile is not None:
            head += ["--hostfile", str(self.hostfile), "--num_nodes", str(self.num_nodes)]
        head += ["--num_gpus", str(self.num_gpus)]
        head += ["--master_addr", self.master_addr] if self.master_addr else []
        return [*head, "--master_port", str(self.master_port or free_port()), *self.extra, str(TRAIN)]


def read_hostfile(path: str | Path) -> dict[str, int]:
    """The hosts of a DeepSpeed hostfile and their slots (``host slots=N`` lines; ``#`` comments)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"--hostfile {path}: cannot be read ({e.strerror}).") from None
    hosts: dict[str, int] = {}
    for line in (ln.strip() for ln in text.splitlines()):
        if not line or line.startswith("#"):
            continue
        m = re.match(r"(\S+)\s+slots=(\d+)", line)
        if not m or m.group(1) in hosts:
            raise ConfigError(
                f"--hostfile {path}: {line!r} is not a 'host slots=N' line of a host named once."
            )
        hosts[m.group(1)] = int(m.group(2))
    if not hosts:
        raise ConfigError(f"--hostfile {path}: names no host; write one 'host slots=N' line per node.")
    return hosts


def plan_launch(
    world: int,
    hostfile: str | None = None,
    num_nodes: int | None = None,
    num_gpus: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    extra: list[str] | None = None,
) -> Launch:
    """The launch of ``world`` ranks, checked: on one node without a hostfile; with one,
    ``num_nodes`` x ``num_gpus`` of them (default: the first host's slots per node, as many nodes
    as that takes), which must make ``world`` and fit the hostfile."""
    extra = list(extra or [])
    if hostfile is None:
        if num_nodes not in (None, 1):
            raise ConfigError(
                f"--num_nodes {num_nodes}: several nodes need --hostfile H (each node and its slots, "
                "as DeepSpeed's launcher reads it)."
            )
        if num_gpus not in (None, world):
            raise ConfigError(
                f"--num_gpus {num_gpus}: the run has {world} rank(s), which one node runs as "
                f"--num_gpus {world}; several nodes need --hostfile H."
            )
        return Launch(None, 1, world, master_addr, master_port, extra)
    hosts = read_hostfile(hostfile)
    gpus = num_gpus or next(iter(hosts.values()))
    nodes = num_nodes or max(1, world // gpus)
    if nodes * gpus != world:
        given = "" if num_gpus else " (the first host's slots)"
        raise ConfigError(
            f"--hostfile {hostfile}: the run has {world} rank(s), not --num_nodes {nodes} x --num_gpus "
            f"{gpus}{given}; give --num_nodes and --num_gpus whose product is {world}."
        )
    short = [f"{h} slots={s}" for h, s in list(hosts.items())[:nodes] if s < gpus]
    if len(hosts) < nodes or short:
        have = ", ".join(f"{h} slots={s}" for h, s in hosts.items())
        raise ConfigError(f"--hostfile {hostfile}: {nodes} node(s) of {gpus} slot(s) wanted; it has {have}.")
    return Launch(Path(hostfile).resolve(), nodes, gpus, master_addr, master_port or DEEPSPEED_PORT, extra)
