"""The batches the loop reads ahead (``run/data.py``'s ``Batches``): the same blocks in the same
order as reading each when it is due, wherever the order moves (a branch's skip and reshuffle, a
rollback, a resume), each read once, a run's numbers unchanged and its resume exact; on CUDA the
next step's blocks are pinned and their copy queues without waiting for the device."""

from __future__ import annotations

import json
import sys
import textwrap
import time

import pytest
import torch

from conftest import TINY, assert_ok, run_cmd
from dsinstab.run.data import Batches, BatchOrder
from dsinstab.run.tracking import read_jsonl

N_BLOCKS, MICRO, WORLD, RANK, SEED, GAS = 40, 2, 2, 1, 3, 2  # 10 micro batches an epoch: 5 steps


class PureBlocks:
    """Blocks that are a function of their index (block ``i`` holds ``i * 1000 + 0..8``), as the
    packed data's are; counts how many it reads."""

    def __init__(self):
        self.reads = 0

    def blocks(self, split: str, indices: torch.Tensor) -> torch.Tensor:
        assert split == "train"
        self.reads += len(indices)
        return indices[:, None] * 1000 + torch.arange(9)


def order() -> BatchOrder:
    return BatchOrder(N_BLOCKS, MICRO, WORLD, RANK, SEED)


def as_due(data, o: BatchOrder) -> tuple[torch.Tensor, torch.Tensor]:
    """A micro batch read when it is due: the loop before it read ahead."""
    indices = o.next()
    return indices, data.blocks("train", indices)


def take_step(batches: Batches, reference: BatchOrder) -> None:
    """One step's micro batches from ``batches``, each checked against reading it when due; then
    the read-ahead of the next step, as the loop does it."""
    for _ in range(GAS):
        indices, _, batch = batches.next()
        want_indices, want = as_due(PureBlocks(), reference)
        assert torch.equal(indices, want_indices) and torch.equal(batch, want)
    batches.prefetch()
    assert batches.order.state_dict() == reference.state_dict()  # a checkpoint holds the same


def rollback(o: BatchOrder, saved: dict, skip: int) -> None:
    o.load_state_dict(saved)  # run/actions.py's rollback: the checkpoint's position, then past the spike
    o.position += skip


MOVES = {  # before step N's reads, as the plug-ins and actions move the order
    3: lambda o, saved: o.skip(3 * GAS),  # a branch's skip (its begin_step)
    5: lambda o, saved: o.reseed(SEED + 7919),  # a branch's reshuffle
    8: lambda o, saved: rollback(o, saved, 2 * GAS),  # back to step 4's checkpoint, and past the spike
    10: lambda o, saved: rollback(o, o.state_dict(), 0),  # a restore to where the order is
    12: lambda o, saved: setattr(o, "position", o.position - GAS),  # a failed step's batches unread
}


def test_read_ahead_gives_the_blocks_due_wherever_the_order_moves():
    mine, reference = order(), order()
    batches = Batches(PureBlocks(), mine, "cpu", ahead=GAS)
    saved, hits = None, []
    for n in range(1, 16):  # three epochs and more
        for o in (mine, reference):
            MOVES.get(n, lambda o, saved: None)(o, saved)
        if n == 4:
            saved = mine.state_dict()
        before = batches.taken_ahead
        take_step(batches, reference)
        hits += [n] * ((batches.taken_ahead - before) // GAS)
    # what was read ahead served every step whose order did not move away from it, and no other
    assert hits == [n for n in range(2, 16) if n not in (3, 5, 8, 12)]


def test_each_block_is_read_once_and_a_resumed_order_reads_what_the_unbroken_one_does():
    data, mine, reference = PureBlocks(), order(), order()
    batches = Batches(data, mine, "cpu", ahead=GAS)
    for _ in range(7):
        take_step(batches, reference)
    assert data.reads == (7 + 1) * GAS * MICRO  # the steps' and the next step's, no block twice
    # a resume: a new process, its order from the checkpoint, nothing read ahead yet
    resumed, resumed_reference = order(), order()
    resumed.load_state_dict(mine.state_dict())
    resumed_reference.load_state_dict(mine.state_dict())
    again = Batches(PureBlocks(), resumed, "cpu", ahead=GAS)
    for _ in range(6):
        take_step(again, resumed_reference)
        take_step(batches, reference)
        assert resumed.state_dict() == mine.state_dict()
    assert torch.equal(again.next().batch, batches.next().batch)


# A run's numbers with read-ahead and without it (the loop's Batches made to read nothing ahead,
# as the loop read before), then a resume from its step-4 checkpoint with read-ahead.
RUNS = textwrap.dedent(
    """
    import json, sys
    from dsinstab.commands import train as cli
    from dsinstab.run import data, loop

    class Counted(data.Batches):
        made = []

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.made.append(self)

    class NoneAhead(data.Batches):
        def __init__(self, data_, order, device, ahead=0):
            super().__init__(data_, order, device, 0)

    common = sys.argv[1:]
    codes = []
    for batches, extra, name in ((Counted, [], "ahead"), (NoneAhead, [], "as-due"),
                                 (Counted, ["--resume", "step-4"], "ahead")):
        loop.Batches = batches
        codes.append(cli.main([*extra, *common, f"utils.run_name={name}"]))
    print("RESULT", json.dumps({"codes": codes, "taken": [b.taken_ahead for b in Counted.made]}))
    """
)


def test_a_run_that_reads_ahead_trains_and_resumes_exactly_as_one_that_does_not(tmp_path, cache_dir):
    out = tmp_path / "runs"
    sets = [*TINY, "trainer.max_steps=8", "trainer.eval_every=4", "trainer.checkpoint_every=4"]
    sets += [
        "trainer.gradient_accumulation_steps=2",
        f"utils.output_dir={out}",
        f"utils.cache_dir={cache_dir}",
    ]
    cmd = [sys.executable, "-c", RUNS, "--ds_config", "zero2_bf16", "--set", *sets]
    proc = run_cmd(cmd, 300)
    assert_ok(proc)
    got = json.loads(proc.stdout.split("RESULT ")[-1].splitlines()[0])
    assert got["codes"] == [0, 0, 0]
    assert got["taken"] == [2 * 7, 2 * 3]  # every step's batches but the first's were read ahead

    def numbers(name: str) -> list[dict]:
        clock = ("time", "train/tokens_per_s")
        return [
            {k: v for k, v in r.items() if k not in clock} for r in read_jsonl(out / name / "metrics.jsonl")
        ]

    ahead, as_due_ = numbers("ahead"), numbers("as-due")
    assert [r["step"] for r in ahead if "train/loss" in r] == list(range(1, 9))
    assert ahead == as_due_  # bit for bit: losses, grad norms, evaluations, the resumed steps 5-8 too


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)"
)
def test_on_cuda_the_next_batches_are_pinned_and_their_copy_waits_for_nothing():
    data, mine = PureBlocks(), order()
    batches = Batches(data, mine, "cuda", ahead=GAS)
    batches.prefetch()  # the first pinned blocks (torch's host allocator keeps them for reuse)
    for _ in range(GAS):
        batches.next()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of device work queued before the copies
    t0 = time.perf_counter()
    batches.prefetch()
    took = time.perf_counter() - t0
    # a copy from pageable memory waits for the stream to drain; from pinned memory it queues
    assert not torch.cuda.current_stream().query(), "the device had finished: the read waited for it"
    assert took < 0.5, took
    due = [mine.indices_at(mine.position + m) for m in range(GAS)]
    for indices in due:
        got = batches.next()
        assert got.host.is_pinned() and got.batch.device.type == "cuda"
        assert torch.equal(got.indices, indices)
    torch.cuda.synchronize()
    assert torch.equal(got.batch.cpu(), PureBlocks().blocks("train", due[-1]))
    assert batches.taken_ahead == 2 * GAS
