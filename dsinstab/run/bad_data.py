"""Bad data in the corpus itself (``trainer.inject.kind: repeat | random``): the train blocks that
an unbroken run reads at steps ``at_step .. at_step + steps - 1`` are replaced, on every rank, by one
token repeated or by uniformly random tokens, wherever and whenever they are read.

The fault belongs to the blocks, not to the steps: a rollback or a replay that skips those batches
skips it, and a branch that reshuffles the batch order meets the same bad blocks at other steps.
"""

from __future__ import annotations

import torch

from dsinstab.run.config import InjectConfig
from dsinstab.run.data import BatchOrder, PackedData

DATA_KINDS = ("repeat", "random")


def bad_blocks(inj: InjectConfig, order: BatchOrder, gas: int) -> list[int]:
    """The train blocks every rank of an unbroken run reads at the injected steps."""
    first, last = (inj.at_step - 1) * gas, (inj.at_step - 1 + inj.steps) * gas
    found: set[int] = set()
    for rank in range(order.world):
        theirs = BatchOrder(order.n_blocks, order.micro_batch, order.world, rank, order.seed)
        for position in range(first, last):
            found.update(theirs.indices_at(position).tolist())
    return sorted(found)


class CorruptedData:
    """:class:`PackedData` whose bad train blocks read as bad data (everything else delegates)."""

    def __init__(self, data: PackedData, inj: InjectConfig, bad: list[int], seed: int):
        self.data, self.kind, self.bad = data, inj.kind, torch.tensor(bad, dtype=torch.long)
        self.seed = seed

    def __getattr__(self, name):
        return getattr(self.data, name)

    def blocks(self, split: str, indices: torch.Tensor) -> torch.Tensor:
        out = self.data.blocks(split, indices)
        if split != "train":
            return out
        hit = torch.isin(indices, self.bad)
        for row in hit.nonzero().flatten().tolist():
            out[row] = self.bad_block(int(indices[row]), out.shape[1])
        return out

    def bad_block(self, block: int, length: int) -> torch.Tensor:
        """The same bad content for a block every time it is read (seeded by the block's index)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + block)
        if self.kind == "repeat":
            token = int(torch.randint(0, self.data.vocab_size, (1,), generator=g))
            return torch.full((length,), token, dtype=torch.long)
        return torch.randint(0, self.data.vocab_size, (length,), generator=g)


def with_bad_data(data: PackedData, inj: InjectConfig, order: BatchOrder, gas: int, seed: int):
    """``data`` itself, or the corrupted view of it when ``trainer.inject`` asks for bad data."""
    if not inj.at_step or inj.kind not in DATA_KINDS:
        return data
    return CorruptedData(data, inj, bad_blocks(inj, order, gas), seed)
