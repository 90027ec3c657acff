"""Evaluation whose result does not depend on how many ranks compute it.

The evaluation set is the first ``min(eval_batches x micro_batch x world, n_validation)`` validation
blocks, each read exactly once by exactly one rank: round ``i`` covers the next ``micro_batch x
world`` blocks and rank ``r`` takes its ``r``-th part (as the training order lays out ranks). Where
the split ends inside a round, the blocks are not wrapped around: ranks then hold unequal counts,
and a rank with nothing left still runs the round's forward on one block that it weighs 0, so every
rank makes the same calls (ZeRO-3 gathers the parameters inside each forward). The loss is the sum
of the per-block losses over the number of blocks, summed across ranks in float64.
"""

from __future__ import annotations

import deepspeed.comm as dist
import torch
import torch.nn.functional as F


def eval_plan(total: int, micro_batch: int, world: int, rank: int) -> list[range]:
    """The blocks ``rank`` reads in each round, of ``total`` blocks shared by ``world`` ranks; every
    rank gets the same number of rounds, a range empty where its part lies past the end."""
    per_round = micro_batch * world
    rounds = -(-total // per_round)
    out = []
    for i in range(rounds):
        start = min(i * per_round + rank * micro_batch, total)
        out.append(range(start, min(start + micro_batch, total)))
    return out


def eval_blocks(trainer, world: int, n_validation: int) -> int:
    """How many validation blocks an evaluation reads (the first that many)."""
    return min(trainer.eval_batches * trainer.micro_batch_size * world, n_validation)


def block_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each block's mean cross-entropy over its tokens, in fp32 (as ``model.lm_loss`` computes it)."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return ce.view(targets.shape).mean(dim=1)


@torch.no_grad()
def evaluate(run, ctx) -> float:
    """Mean cross-entropy over the evaluation blocks (see the module): the same on any number of
    ranks but for float rounding inside a block's forward. Collective: call it on every rank."""
    engine = run.engine
    total = eval_blocks(run.cfg.trainer, run.world, len(run.data.validation))
    plan = eval_plan(total, run.cfg.trainer.micro_batch_size, run.world, run.rank)
    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
    count = 0
    engine.eval()
    try:
        for blocks in plan:
            # a rank past the end reads block 0 for the forward every rank makes, and weighs it 0
            indices = torch.tensor(list(blocks) or [0], dtype=torch.long)
            batch = run.data.blocks("validation", indices).to(engine.device, non_blocking=True)
            with ctx:
                logits = engine(input_ids=batch[:, :-1]).logits
            if len(blocks):
                loss_sum += block_losses(logits, batch[:, 1:]).double().sum()
                count += len(blocks)
    finally:
        engine.train()
    sums = torch.stack([loss_sum, torch.tensor(float(count), dtype=torch.float64, device=engine.device)])
    if run.world > 1:
        dist.all_reduce(sums)
    loss_sum, count = sums.tolist()  # the evaluation's one host sync
    return loss_sum / count
