"""Every dispatch backend over gloo: dispatch -> per-rank experts -> combine equals the
single-process float64 MoE, for uneven, empty and skewed routing, and the traffic
counters equal the bytes the routing predicts."""

import pytest
import torch
import torch.distributed as dist

from tools.ranks import run_ranks
from vllm_wideep.comm.packing import RowFormat
from vllm_wideep.comm.registry import make_dispatcher

HIDDEN = 16
MAX_TOKENS = 32  # max_tokens_per_rank given to every dispatcher; no case has more

# (backend, capacity_tokens, dispatch_dtype); capacity 2 forces the second round.
BACKENDS = [
    ("alltoall", 0, "auto"),
    ("allgather", 0, "auto"),
    ("capacity", 0, "auto"),
    ("capacity", 2, "auto"),
    ("alltoall", 0, "fp8"),
    ("capacity", 0, "fp8"),
]


def _moe_reference(x, topk_ids, topk_weights, w):
    """x [M, H] float64; w [E, H, H]: out[m] = sum_j weight * (x[m] @ w[e].T)."""
    out = torch.zeros_like(x)
    for m in range(x.shape[0]):
        for e, wt in zip(topk_ids[m].tolist(), topk_weights[m].tolist(), strict=True):
            if e >= 0:
                out[m] += wt * (w[e] @ x[m])
    return out


def _tokens(scenario, rank):
    return {"uneven": 3 + 5 * rank, "idle_rank": 0 if rank == 1 else 6, "one_expert": 9}[scenario]


def _case(seed, rank, world_size, experts_per_rank, top_k, scenario):
    """Tokens of `rank`, same weights everywhere (seeded by case, not by rank)."""
    num_experts = world_size * experts_per_rank
    w = torch.randn(num_experts, HIDDEN, HIDDEN, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed * 100 + rank)
    num_tokens = _tokens(scenario, rank)
    x = torch.randn(num_tokens, HIDDEN, generator=g)
    if scenario == "one_expert":
        topk_ids = torch.zeros(num_tokens, top_k, dtype=torch.int64)
        topk_ids[:, 1:] = -1
    elif num_tokens:
        topk_ids = torch.stack(
            [torch.randperm(num_experts, generator=g)[:top_k] for _ in range(num_tokens)]
        )
    else:
        topk_ids = torch.empty(0, top_k, dtype=torch.int64)
    topk_weights = torch.rand(num_tokens, top_k, generator=g)
    return x, topk_ids, topk_weights, w


def _local_experts(received, local_w):
    """This rank's experts on the rows it received, summed per row (float64)."""
    rows = received.hidden_states.double()
    out = torch.zeros_like(rows)
    for j in range(received.topk_ids.shape[1]):
        slot = received.topk_ids[:, j].long()
        mine = slot >= 0
        y = torch.einsum("rh,rgh->rg", rows[mine], local_w[slot[mine]])
        out[mine] += received.topk_weights[mine, j, None].double() * y
    return out


def _expected_traffic(backend, capacity, rank, world_size, experts_per_rank, case_args, fmt):
    """Bytes to and from the other ranks, from every rank's routing."""
    R = world_size
    remote_rows = torch.zeros(R, R, dtype=torch.int64)  # [src, dst] (token, rank) rows
    for src in range(R):
        _, ids, _, _ = _case(7, src, *case_args)
        for row in ids.tolist():
            for dst in {e // experts_per_rank for e in row if e >= 0}:
                remote_rows[src, dst] += 1
    out_bytes = HIDDEN * fmt.dtype.itemsize
    if backend == "capacity":
        C = capacity
        over = (remote_rows - C).clamp(min=0)
        over.fill_diagonal_(0)
        sent, received = over[rank].sum().item(), over[:, rank].sum().item()
        second = bool((remote_rows - C).clamp(min=0).sum())
        header = 8 * (R - 1) if second else 0
        return {
            "dispatch_sent_bytes": (R - 1) * (C + 1) * fmt.nbytes + sent * fmt.nbytes + header,
            "dispatch_recv_bytes": (R - 1) * (C + 1) * fmt.nbytes + received * fmt.nbytes + header,
            "combine_sent_bytes": ((R - 1) * C + received) * out_bytes,
            "combine_recv_bytes": ((R - 1) * C + sent) * out_bytes,
            "overflow_rows": (remote_rows[rank] - C).clamp(min=0).sum().item(),
        }
    if backend == "allgather":
        tokens = [_tokens(case_args[-1], r) for r in range(R)]
        sent, received = (R - 1) * tokens[rank], sum(tokens) - tokens[rank]
    else:
        remote_rows.fill_diagonal_(0)
        sent, received = remote_rows[rank].sum().item(), remote_rows[:, rank].sum().item()
    return {
        "dispatch_sent_bytes": sent * fmt.nbytes + 8 * (R - 1),
        "dispatch_recv_bytes": received * fmt.nbytes + 8 * (R - 1),
        "combine_sent_bytes": received * out_bytes,
        "combine_recv_bytes": sent * out_bytes,
        "overflow_rows": 0,
    }


def _rank_main(rank, world_size, experts_per_rank, top_k, scenario, dtype, backend_args):
    backend, capacity_tokens, dispatch_dtype = backend_args
    case_args = (world_size, experts_per_rank, top_k, scenario)
    x, topk_ids, topk_weights, w = _case(7, rank, *case_args)
    dispatcher = make_dispatcher(
        backend,
        capacity_tokens=capacity_tokens,
        dispatch_dtype=dispatch_dtype,
        group=dist.group.WORLD,
        slots_per_rank=experts_per_rank,
        num_ranks=world_size,
        max_tokens_per_rank=MAX_TOKENS,
    )
    received = dispatcher.dispatch(x.to(dtype), topk_ids, topk_weights)
    local_w = w[rank * experts_per_rank : (rank + 1) * experts_per_rank].double()
    expert_out = _local_experts(received, local_w)
    out = dispatcher.combine(expert_out.to(dtype), received.handle)

    expected = _moe_reference(x.double(), topk_ids, topk_weights.double(), w.double())
    what = f"{backend_args} {dtype} {case_args} rank {rank}"
    assert out.dtype == torch.float32 and out.shape == x.shape, what
    if dispatch_dtype == "fp8":
        # e4m3 keeps 3 mantissa bits: a few percent per element, less in the sums.
        error = (out.double() - expected).norm() / expected.norm().clamp(min=1e-9)
        assert error < 0.08, f"{what}: relative error {error:.4f}"
    else:
        tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
        torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * 10, msg=what)

    fmt = RowFormat.of(x.to(dtype), topk_ids, dispatch_dtype)
    capacity = getattr(dispatcher, "capacity", None)
    traffic = dispatcher.traffic.snapshot()
    assert traffic == {
        "calls": 1,
        **_expected_traffic(backend, capacity, rank, world_size, experts_per_rank, case_args, fmt),
    }, what


def _all_cases(rank, world_size, cases):
    for case in cases:
        for backend_args in BACKENDS:
            _rank_main(rank, world_size, *case, backend_args)


# One process group per world size (spawning ranks costs seconds); each case is a
# (experts per rank, top-k, scenario, dtype), run with every backend.
CASES = {
    1: [(8, 3, "uneven", torch.float32)],  # EP 1: every block goes to the rank itself
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
def test_backends_match_reference(world_size):
    run_ranks(_all_cases, world_size, CASES[world_size])
