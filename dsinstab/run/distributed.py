"""Starting the process group: the launcher's ranks, DeepSpeed's ``init_distributed``, and the CPU's
shared-memory comm op built without waiting on an orphaned lock.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import deepspeed
import deepspeed.comm as dist
from deepspeed.accelerator import get_accelerator
from filelock import FileLock

STALE_BUILD_LOCK_S = 600  # the shared-memory op builds in under a minute; a lock this old is orphaned


def free_port() -> int:
    """A TCP port free on this machine now: the rendezvous of a run that must not collide with
    another on the same machine (DeepSpeed's launcher defaults to 29500 for every run)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(log: Callable[[str], None]) -> tuple[int, int]:
    """``deepspeed.init_distributed`` hardened for the CPU; returns (rank, world size).

    ``python scripts/train.py`` runs as one rank without a launcher.
    """
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )
    cpu = get_accelerator().device_name() == "cpu"
    if cpu:
        load_shm_comm_op(log)
    else:
        # before any collective: NCCL's object broadcasts (run name, resume tag) use the current
        # device, which would be cuda:0 on every rank of a node until the engine sets it
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    if cpu:
        dist.barrier()  # every rank has mapped every other rank's segment by now
        unlink_shm_segment(rank)
    return rank, world


@contextlib.contextmanager
def process_group(log: Callable[[str], None]) -> Iterator[tuple[int, int]]:
    """:func:`init_distributed` for the length of a block, the group destroyed after it if the block
    created it (a caller that set up the group itself, like benchmarks/run.py, keeps it)."""
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
