"""plan_routes against a per-token loop."""

import pytest
import torch

from vllm_wideep.comm.routing import plan_routes


def _reference(topk_ids, topk_weights, experts_per_rank, num_ranks):
    pairs = []
    for rank in range(num_ranks):
        for m in range(topk_ids.shape[0]):
            ids, ws = topk_ids[m].tolist(), topk_weights[m].tolist()
            owners = [i // experts_per_rank if i >= 0 else None for i in ids]
            if rank in owners:
                local = [
                    i - rank * experts_per_rank if o == rank else -1
                    for i, o in zip(ids, owners, strict=True)
                ]
                weights = [w if o == rank else 0.0 for w, o in zip(ws, owners, strict=True)]
                pairs.append((rank, m, local, weights))
    return pairs


@pytest.mark.parametrize("num_tokens", [0, 1, 7, 64])
@pytest.mark.parametrize(
    "num_ranks, experts_per_rank, top_k", [(1, 8, 2), (2, 4, 2), (4, 2, 8), (8, 4, 3)]
)
def test_plan_matches_loop(num_tokens, num_ranks, experts_per_rank, top_k):
    g = torch.Generator().manual_seed(num_tokens * 131 + num_ranks)
    num_experts = num_ranks * experts_per_rank
    top_k = min(top_k, num_experts)
    rows = [torch.randperm(num_experts, generator=g)[:top_k] for _ in range(num_tokens)]
    topk_ids = torch.stack(rows) if rows else torch.empty(0, top_k, dtype=torch.int64)
    # Some choices dropped (-1), as a capacity limit or a masked expert would do.
    topk_ids[torch.rand(num_tokens, top_k, generator=g) < 0.1] = -1
    topk_weights = torch.rand(num_tokens, top_k, generator=g)

    plan = plan_routes(topk_ids, topk_weights, experts_per_rank, num_ranks)
    expected = _reference(topk_ids, topk_weights, experts_per_rank, num_ranks)

    assert plan.send_counts.tolist() == [sum(p[0] == r for p in expected) for r in range(num_ranks)]
    assert plan.token_index.tolist() == [p[1] for p in expected]
    assert plan.local_ids.tolist() == [p[2] for p in expected]
    torch.testing.assert_close(
        plan.weights, torch.tensor([p[3] for p in expected]).reshape(-1, top_k)
    )


def test_token_sent_once_per_rank_even_with_all_choices_there():
    topk_ids = torch.tensor([[0, 1, 2, 3]])  # all four on rank 0 of 2
    plan = plan_routes(topk_ids, torch.ones(1, 4), slots_per_rank=4, num_ranks=2)
    assert plan.send_counts.tolist() == [1, 0]
    assert plan.local_ids.tolist() == [[0, 1, 2, 3]]
