"""`capacity` with no second round (C = the per-rank token budget): a rank with more rows
for one peer than C makes every rank raise the same `CapacityOverflowError`, at once, not
one rank raising while its peers wait in the next collective until the timeout."""

import time

import torch
import torch.distributed as dist

from tools.ranks import run_ranks
from vllm_wideep.comm.capacity import CapacityOverflowError
from vllm_wideep.comm.registry import make_dispatcher

BUDGET = 4  # max_tokens_per_rank; capacity_tokens=0 without graphs makes C = BUDGET
SLOTS_PER_RANK = 2


def _rank_main(rank, world_size):
    dispatcher = make_dispatcher(
        "capacity",
        group=dist.group.WORLD,
        slots_per_rank=SLOTS_PER_RANK,
        num_ranks=world_size,
        max_tokens_per_rank=BUDGET,
    )
    assert dispatcher.capacity == BUDGET and not dispatcher.may_overflow
    # Rank 0 is handed 10 tokens (more than the budget), all for rank 1's expert 2;
    # rank 1 has 2 tokens, which fit.
    num_tokens = 10 if rank == 0 else 2
    ids = torch.full((num_tokens, 1), SLOTS_PER_RANK)
    start = time.monotonic()
    try:
        dispatcher.dispatch(torch.ones(num_tokens, 8), ids, torch.ones(num_tokens, 1))
    except CapacityOverflowError as e:
        message = str(e)
    else:
        raise AssertionError(f"rank {rank}: no CapacityOverflowError")
    elapsed = time.monotonic() - start
    dist.barrier()  # no rank is left inside a collective: the group still works
    return message, elapsed


def test_one_rank_over_capacity_fails_every_rank():
    (message0, elapsed0), (message1, elapsed1) = run_ranks(_rank_main, 2, timeout_s=60)
    assert message0 == message1
    assert "C = 4 rows per peer block and rank 0 has 10 rows for one peer, 6 beyond it" in message0
    assert "--wideep-capacity-tokens" in message0 and "--max-num-batched-tokens" in message0
    assert max(elapsed0, elapsed1) < 20, (elapsed0, elapsed1)
