"""Starting the process group: the launcher's ranks, DeepSpeed's ``init_distributed``, and the CPU's
shared-memory comm op built without waiting on an orphaned lock.

Every launcher tells a process its rank in variables of its own. :func:`discover` reads them (no
process group, no DeepSpeed import: the train command sizes the batch with it before anything
starts) and :func:`init_distributed` writes them as the variables torch and DeepSpeed read
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_SIZE``), so
DeepSpeed never takes its MPI discovery path, which needs mpi4py. The families, first found first:

========  =========================================================  ==============================
launcher  rank, world, local rank                                     rendezvous (when not set)
========  =========================================================  ==============================
torchrun  ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (also DeepSpeed's    given by the launcher
          own launcher: local, pdsh, mpich, impi)
openmpi   ``OMPI_COMM_WORLD_RANK``, ``_SIZE``, ``_LOCAL_RANK``          one node: 127.0.0.1; several:
mvapich   ``MV2_COMM_WORLD_RANK``, ``_SIZE``, ``_LOCAL_RANK``           ``MASTER_ADDR`` must be set
slurm     ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS`` (or                the first host of the step's
          ``SLURM_NTASKS``), ``SLURM_LOCALID``                          (or job's) node list
========  =========================================================  ==============================

``MASTER_PORT`` defaults to 29500 (DeepSpeed's), under SLURM to one derived from the job id so two
jobs sharing a node do not collide. With none of them set, ``python scripts/train.py`` is one rank.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from dsinstab.run.config import ConfigError

STALE_BUILD_LOCK_S = 600  # the shared-memory op builds in under a minute; a lock this old is orphaned
DEFAULT_PORT = 29500  # DeepSpeed's and torch's default rendezvous port
WHERE = "the launcher's environment"

# (launcher, rank, world size, local rank, local size): the variables each family sets, the first
# one present of each tuple taken; SLURM's local size is read from its tasks per node
FAMILIES = (
    ("torchrun", ("RANK",), ("WORLD_SIZE",), ("LOCAL_RANK",), None),  # its LOCAL_SIZE left as it is
    (
        "openmpi",
        ("OMPI_COMM_WORLD_RANK",),
        ("OMPI_COMM_WORLD_SIZE",),
        ("OMPI_COMM_WORLD_LOCAL_RANK",),
        ("OMPI_COMM_WORLD_LOCAL_SIZE",),
    ),
    (
        "mvapich",
        ("MV2_COMM_WORLD_RANK",),
        ("MV2_COMM_WORLD_SIZE",),
        ("MV2_COMM_WORLD_LOCAL_RANK",),
        ("MV2_COMM_WORLD_LOCAL_SIZE",),
    ),
    # the step's counts first: an srun step may use fewer tasks than the allocation has
    (
        "slurm",
        ("SLURM_PROCID",),
        ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"),
        ("SLURM_LOCALID",),
        (),
    ),
)
SLURM_NODELISTS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
SLURM_STEP_VARS = ("SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS")  # set for the tasks srun starts
# what a launcher tells its processes: a process that starts runs of its own (a sweep, the zoo)
# hands its children none of it, or each would take itself for one rank of the launcher's job
LAUNCH_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)
LAUNCH_PREFIXES = (
    "OMPI_COMM_WORLD_",
    "MV2_COMM_WORLD_",
    "PMI_",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_STEP_",
)


def without_launch(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` less every launcher variable (:data:`LAUNCH_VARS`, :data:`LAUNCH_PREFIXES`)."""
    return {k: v for k, v in environ.items() if k not in LAUNCH_VARS and not k.startswith(LAUNCH_PREFIXES)}


SLURM_TASKS_PER_NODE = ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")


@dataclass(frozen=True)
class Launch:
    """Who this process is in the job, as the launcher says; ``launcher`` is "none" for a process
    started without one (one rank)."""

    launcher: str
    rank: int
    world: int
    local_rank: int
    local_size: int | None  # ranks on this node, where the launcher says
    master_addr: str
    master_port: int | None  # None: a free port of this machine, picked when the group starts

    def environ(self) -> dict[str, str]:
        """The variables torch's ``env://`` rendezvous and DeepSpeed read."""
        out = {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world),
            "LOCAL_RANK": str(self.local_rank),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port if self.master_port is not None else free_port()),
        }
        if self.local_size is not None:  # DeepSpeed's CPU accelerator: its device count, shm allreduce
            out |= {"LOCAL_SIZE": str(self.local_size), "LOCAL_WORLD_SIZE": str(self.local_size)}
        return out


def discover(environ: Mapping[str, str] | None = None) -> Launch:
    """This process's rank, world size, local rank and rendezvous from the launcher's variables
    (see the module's table), without starting anything; raises :class:`ConfigError` when they are
    incomplete or no rendezvous address can be found."""
    env = os.environ if environ is None else environ
    for launcher, rank_vars, world_vars, local_vars, size_vars in FAMILIES:
        rank = _int(env, rank_vars)
        if rank is None:
            continue
        if launcher == "slurm" and not any(env.get(k, "").strip() for k in SLURM_STEP_VARS):
            continue  # a batch script or salloc shell, not a task srun started: one rank of its own
        world = _int(env, world_vars)
        if world is None:
            raise ConfigError(f"{WHERE}: {rank_vars[0]} is set but none of {', '.join(world_vars)} is.")
        local_rank = _int(env, local_vars)
        if launcher == "slurm":
            local_size = _slurm_local_size(env)
        else:
            local_size = _int(env, size_vars) if size_vars else None
        if local_rank is None:
            if world > 1:
                raise ConfigError(f"{WHERE}: {rank_vars[0]} is set but {local_vars[0]} is not.")
            local_rank = 0
        if not 0 <= rank < world or not 0 <= local_rank < world:
            raise ConfigError(
                f"{WHERE}: {launcher} gives rank {rank} (local rank {local_rank}) of {world}; a rank "
                "must lie in [0, world size)."
            )
        addr, port = _rendezvous(env, launcher, world, local_size)
        if world == 1:  # alone: a free port, never one a job-wide rule gives every process alike
            addr, port = "127.0.0.1", None
        return Launch(launcher, rank, world, local_rank, local_size, addr, port)
    return Launch("none", 0, 1, 0, None, "127.0.0.1", None)


def world_size_from_env() -> int:
    """The job's world size as the launcher gives it (1 without one); starts nothing."""
    return discover().world


def _int(env: Mapping[str, str], names: tuple[str, ...]) -> int | None:
    for name in names:
        value = env.get(name, "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"{WHERE}: {name} is {value!r}, not a whole number.") from None
    return None


def _rendezvous(
    env: Mapping[str, str], launcher: str, world: int, local_size: int | None
) -> tuple[str, int | None]:
    """Rank 0's address and port: those already set win; else what the launcher tells."""
    port = _int(env, ("MASTER_PORT",))
    addr = env.get("MASTER_ADDR", "").strip()
    if launcher == "torchrun":
        if not addr and world > 1:
            raise ConfigError(
                f"{WHERE}: RANK and WORLD_SIZE are set but MASTER_ADDR is not; set both MASTER_ADDR and MASTER_PORT."
            )
        if port is None and world > 1:
            raise ConfigError(f"{WHERE}: RANK and WORLD_SIZE are set but MASTER_PORT is not.")
        return addr or "127.0.0.1", port
    if launcher == "slurm":
        nodelist = next((env[k] for k in SLURM_NODELISTS if env.get(k, "").strip()), "")
        addr = addr or (first_host(nodelist) if nodelist else "")
        if port is None and env.get("SLURM_JOB_ID", "").strip().isdigit():
            port = 15000 + int(env["SLURM_JOB_ID"]) % 10000
    if not addr:
        if world == 1 or local_size == world:  # every rank on this node
            addr = "127.0.0.1"
        else:
            raise ConfigError(
                f"{WHERE}: {launcher} gives {world} ranks on more than one node (or does not say) and "
                "MASTER_ADDR is not set; set MASTER_ADDR to rank 0's host (and MASTER_PORT) in the "
                "environment every rank gets (DeepSpeed's launcher: a .deepspeed_env file)."
            )
    return addr, DEFAULT_PORT if port is None else port


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list: ``node[07-09,12],gpu1`` -> ``node07``."""
    depth, end = 0, len(nodelist)
    for i, c in enumerate(nodelist):  # the first entry ends at the first comma outside brackets
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            end = i
            break
    entry = nodelist[:end].strip()
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], entry)


def _slurm_local_size(env: Mapping[str, str]) -> int | None:
    """This node's task count from SLURM's ``2(x3),1`` form (the step's, else the job's), indexed
    by ``SLURM_NODEID``; None where SLURM does not say."""
    spec = next((env[k] for k in SLURM_TASKS_PER_NODE if env.get(k, "").strip()), "")
    node = _int(env, ("SLURM_NODEID",))
    if not spec or node is None:
        return None
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node] if node < len(counts) else None


def free_port() -> int:
    """A TCP port free on this machine now: the rendezvous of a run that must not collide with
    another on the same machine (DeepSpeed's launcher defaults to 29500 for every run)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(log: Callable[[str], None]) -> tuple[int, int]:
    """``deepspeed.init_distributed`` hardened for the CPU, under any launcher (see :func:`discover`);
    returns (rank, world size).

    ``python scripts/train.py`` runs as one rank without a launcher.
    """
    import deepspeed
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    launch = discover()
    os.environ.update(launch.environ())
    if launch.launcher not in ("none", "torchrun") and launch.rank == 0:
        log(
            f"{launch.world} ranks from {launch.launcher}'s variables, rendezvous at "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        )
    cpu = get_accelerator().device_name() == "cpu"
    if cpu:
        load_shm_comm_op(log)
    else:
        # before any collective: NCCL's object broadcasts (run name, resume tag) use the current
        # device, which would be cuda:0 on every rank of a node until the engine sets it
        get_accelerator().set_device(launch.local_rank)
    deepspeed.init_distributed(verbose=False, auto_mpi_discovery=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    if cpu:
        dist.barrier()  # every rank has mapped every other rank's segment by now
        unlink_shm_segment(rank)
    return rank, world


@contextlib.contextmanager
def process_group(log: Callable[[str], None]) -> Iterator[tuple[int, int]]:
    """:func:`init_distributed` for the length of a block, the group destroyed after it if the block
    created it (a caller that set up the group itself, like benchmarks/run.py, keeps it)."""
    import deepspeed.comm as dist

    created = not dist.is_initialized()
    rank_world = init_distributed(log)
    try:
        yield rank_world
    finally:
        if created:
            dist.destroy_process_group()


def load_shm_comm_op(log: Callable[[str], None]) -> None:
    """Build or load DeepSpeed's shared-memory comm op, never waiting on an orphaned build lock.

    torch guards its JIT builds with a plain lock file that a killed process leaves behind, after
    which every later start waits forever in silence (pytorch/pytorch#189245). Our starts queue on
    an flock, which the kernel drops when its holder dies; a torch lock still there while we hold
    ours belongs to another program's build, or to a dead one if it is older than any build.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return
    from torch.utils.cpp_extension import _get_build_directory  # the folder torch's load() uses

    build_dir = Path(_get_build_directory(builder.NAME, verbose=False))
    with FileLock(f"{build_dir}.dsinstab.lock"):
        lock, waiting = build_dir / "lock", False
        while True:
            try:
                age = time.time() - lock.stat().st_mtime
            except FileNotFoundError:
                break
            if age > STALE_BUILD_LOCK_S:
                log(f"removing {lock}: a build lock {age / 60:.0f} min old, left by a killed process")
                lock.unlink(missing_ok=True)
            elif not waiting:
                log(f"waiting for another process to finish building {builder.NAME} ({lock})")
                waiting = True
            time.sleep(1)
        with contextlib.redirect_stdout(io.StringIO()):
            builder.load(verbose=False)  # cached by DeepSpeed: init_distributed reuses it


def unlink_shm_segment(rank: int) -> None:
    """Remove the name of DeepSpeed's shared-memory allreduce segment for ``rank`` once every rank
    has it mapped (the mappings stay valid).

    DeepSpeed never unlinks it, so each CPU run would leave 69 MB of RAM per rank in /dev/shm
    until the machine reboots, killed runs included.
    """
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}").unlink(missing_ok=True)
