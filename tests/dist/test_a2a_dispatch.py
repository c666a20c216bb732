"""The `a2a` dispatcher over gloo: dispatch -> per-rank experts -> combine equals the
single-process float64 MoE, for uneven, empty and skewed routing."""

import pytest
import torch
import torch.distributed as dist

from tests.dist.harness import run_ranks
from vllm_wideep.comm.a2a import AllToAllDispatcher

HIDDEN = 16


def _moe_reference(x, topk_ids, topk_weights, w):
    """x [M, H] float64; w [E, H, H]: out[m] = sum_j weight * (x[m] @ w[e].T)."""
    out = torch.zeros_like(x)
    for m in range(x.shape[0]):
        for e, wt in zip(topk_ids[m].tolist(), topk_weights[m].tolist()):
            if e >= 0:
                out[m] += wt * (w[e] @ x[m])
    return out


def _case(seed, rank, world_size, experts_per_rank, top_k, scenario):
    """Tokens of `rank`, same weights everywhere (seeded by case, not by rank)."""
    num_experts = world_size * experts_per_rank
    w = torch.randn(num_experts, HIDDEN, HIDDEN, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed * 100 + rank)
    num_tokens = {"uneven": 3 + 5 * rank, "idle_rank": 0 if rank == 1 else 6, "one_expert": 9}[
        scenario
    ]
    x = torch.randn(num_tokens, HIDDEN, generator=g)
    if scenario == "one_expert":
        topk_ids = torch.zeros(num_tokens, top_k, dtype=torch.int64)
        topk_ids[:, 1:] = -1
    else:
        topk_ids = torch.stack(
            [torch.randperm(num_experts, generator=g)[:top_k] for _ in range(num_tokens)]
        ) if num_tokens else torch.empty(0, top_k, dtype=torch.int64)
    topk_weights = torch.rand(num_tokens, top_k, generator=g)
    return x, topk_ids, topk_weights, w


def _rank_main(rank, world_size, experts_per_rank, top_k, scenario, dtype):
    x, topk_ids, topk_weights, w = _case(7, rank, world_size, experts_per_rank, top_k, scenario)
    dispatcher = AllToAllDispatcher(dist.group.WORLD, experts_per_rank, world_size)
    received = dispatcher.dispatch(x.to(dtype), topk_ids, topk_weights)

    # This rank's experts: local slot s is global expert rank * experts_per_rank + s.
    local_w = w[rank * experts_per_rank : (rank + 1) * experts_per_rank].double()
    rows = received.hidden_states.double()
    expert_out = torch.zeros_like(rows)
    for j in range(received.topk_ids.shape[1]):
        slot = received.topk_ids[:, j].long()
        mine = slot >= 0
        y = torch.einsum("rh,rgh->rg", rows[mine], local_w[slot[mine]])
        expert_out[mine] += received.topk_weights[mine, j, None].double() * y
    out = dispatcher.combine(expert_out.to(dtype), received.handle)

    expected = _moe_reference(x.double(), topk_ids, topk_weights.double(), w.double())
    assert out.dtype == torch.float32 and out.shape == x.shape
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * 10)
    # Each (token, rank) pair is sent once: rows received == distinct owners summed.
    sent = sum(len({e // experts_per_rank for e in ids if e >= 0}) for ids in topk_ids.tolist())
    assert len(received.handle.token_index) == sent


def _all_cases(rank, world_size, cases):
    for experts_per_rank, top_k, scenario, dtype in cases:
        _rank_main(rank, world_size, experts_per_rank, top_k, scenario, dtype)


# One process group per world size (spawning ranks costs seconds); each case is a
# (experts per rank, top-k, scenario, dtype).
CASES = {
    2: [
        (4, 2, "uneven", torch.float32),
        (2, 4, "idle_rank", torch.float32),  # rank 1 sends nothing, still computes
        (1, 2, "uneven", torch.float32),  # top-k over all experts
        (4, 3, "uneven", torch.bfloat16),
    ],
    4: [
        (1, 4, "uneven", torch.float32),  # top-k equal to the number of ranks
        (2, 6, "uneven", torch.float32),  # top-k larger than the number of ranks
        (2, 3, "one_expert", torch.float32),  # every token to expert 0 on rank 0
        (2, 3, "idle_rank", torch.float32),
    ],
}


@pytest.mark.parametrize("world_size", sorted(CASES))
def test_a2a_matches_reference(world_size):
    run_ranks(_all_cases, world_size, CASES[world_size])
