"""Every token exchange gives the same bits for the same inputs: dispatch + combine run
again, with another thread count, with one rank arriving late, and (a token's sum is taken
in rank order whichever way its rows travelled) through `alltoall`, `capacity` and
`capacity` with a second round alike (docs/token-exchange.md#determinism)."""

import time

import torch
import torch.distributed as dist

from tools.ranks import run_ranks
from vllm_wideep.comm.registry import make_dispatcher

HIDDEN = 32
SLOTS_PER_RANK = 3
TOP_K = 3  # with 3 ranks, many tokens have rows on every rank: the sum order matters
MAX_TOKENS = 32

# (exchange, capacity_tokens); capacity 2 sends most rows in the second round.
EXCHANGES = [("alltoall", 0), ("capacity", 0), ("capacity", 2), ("allgather", 0)]


def _inputs(rank, world_size, dtype):
    g = torch.Generator().manual_seed(11 + rank)
    num_tokens = 9 + 4 * rank
    num_slots = world_size * SLOTS_PER_RANK
    x = torch.randn(num_tokens, HIDDEN, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(num_slots, generator=g)[:TOP_K] for _ in range(num_tokens)])
    # With capacity_tokens=2, tokens 0 and 1 fill rank 0's block, so token 2's row for
    # rank 0 takes the second round while its rows for ranks 1 and 2 fit the blocks.
    ids[:2] = torch.tensor([0, 1, 2])
    ids[2] = torch.tensor([0, SLOTS_PER_RANK, 2 * SLOTS_PER_RANK])
    weights = torch.rand(num_tokens, TOP_K, generator=g)
    return x, ids, weights


def _experts(received, rank):
    """A row-local stand-in for the experts: each received row scaled by its weights and a
    per-rank factor, so the ranks' partial sums differ in their low bits."""
    scale = (received.topk_weights * (received.topk_ids >= 0)).sum(1, keepdim=True)
    rows = received.hidden_states.float() * scale * (1.0 + 0.1 * rank) + 1e-3 * (rank + 1)
    mine = (received.topk_ids >= 0).any(1, keepdim=True)  # padding rows have no slot here
    return torch.where(mine, rows, 0.0).to(received.hidden_states.dtype)


def _exchange(rank, world_size, name, capacity_tokens, dtype, threads=None, late=False):
    """[M, H] float32 combine output of this rank's tokens."""
    if threads is not None:
        torch.set_num_threads(threads)
    dispatcher = make_dispatcher(
        name,
        capacity_tokens=capacity_tokens,
        group=dist.group.WORLD,
        slots_per_rank=SLOTS_PER_RANK,
        num_ranks=world_size,
        max_tokens_per_rank=MAX_TOKENS,
    )
    x, ids, weights = _inputs(rank, world_size, dtype)
    if late and rank == world_size - 1:
        time.sleep(0.3)  # the others' rows are there first
    received = dispatcher.dispatch(x, ids, weights)
    expert_output = _experts(received, rank)
    if late and rank == 0:
        time.sleep(0.3)
    return dispatcher.combine(expert_output, received.handle)


def _rank_main(rank, world_size):
    for dtype in (torch.float32, torch.bfloat16):
        threads = torch.get_num_threads()
        by_exchange = {}
        for name, capacity_tokens in EXCHANGES:
            what = f"{name} capacity_tokens={capacity_tokens} {dtype} rank {rank}"
            first = _exchange(rank, world_size, name, capacity_tokens, dtype)
            runs = {
                "again": _exchange(rank, world_size, name, capacity_tokens, dtype),
                "one thread": _exchange(rank, world_size, name, capacity_tokens, dtype, 1),
                "late rank": _exchange(
                    rank, world_size, name, capacity_tokens, dtype, threads, late=True
                ),
            }
            torch.set_num_threads(threads)
            for how, out in runs.items():
                assert torch.equal(out, first), f"{what}: {how} differs"
            by_exchange[(name, capacity_tokens)] = first
        # The same rows summed in rank order, whether some took capacity's second round.
        reference = by_exchange[("alltoall", 0)]
        for key in [("capacity", 0), ("capacity", 2)]:
            assert torch.equal(by_exchange[key], reference), f"{key} {dtype} rank {rank}"


def test_every_exchange_gives_the_same_bits():
    run_ranks(_rank_main, 3, timeout_s=300)
