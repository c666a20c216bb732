"""Which EP rank gets which token: the pure part of dispatch.

A token is sent at most once to each rank that owns one or more of its experts, with the
(local slot, weight) list for that rank; the other entries of the list are -1 / 0 there.

Worked example (4 experts over 2 ranks, so rank r owns experts 2r and 2r+1):

    topk_ids = [[0, 3],        token 0 -> experts 0 (rank 0) and 3 (rank 1)
                [1, 0]]        token 1 -> experts 1 and 0, both on rank 0

    pairs (rank, token), sorted by rank: (0, 0), (0, 1), (1, 0)
    send_counts = [2, 1]
    local_ids   = [[0, -1], [1, 0], [-1, 1]]

With `max_pairs` the plan has a fixed length (padding pairs at the end go to rank
`num_ranks`), so fixed-size backends route without a host sync (CUDA-graph safe):
max_pairs = 5 above adds two pairs with dest_rank 2, token_index 0, local_ids -1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RoutePlan:
    """The (token, destination rank) pairs of one dispatch, grouped by destination.

    token_index: `[P]` int64, the source row of each pair; pairs are sorted by
        destination rank, then by token (padding pairs: 0).
    dest_rank: `[P]` int64, the destination rank of each pair; `num_ranks` = padding
        (only in plans built with `max_pairs`).
    send_counts: `[R]` int64, number of pairs per destination rank (sums to P).
    local_ids: `[P, k]` int32, the expert slot on the destination rank for each of the
        token's k choices, `-1` = that choice lives on another rank.
    weights: `[P, k]` float32, the router weight of each choice, `0` where `-1`.
    """

    token_index: torch.Tensor
    dest_rank: torch.Tensor
    send_counts: torch.Tensor
    local_ids: torch.Tensor
    weights: torch.Tensor


def plan_routes(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    slots_per_rank: int,
    num_ranks: int,
    max_pairs: int | None = None,
) -> RoutePlan:
    """Group the tokens' expert choices by owning rank.

    topk_ids: `[M, k]` int, expert (slot) ids in `[0, num_ranks * slots_per_rank)`;
        `-1` = no expert (the choice is dropped).
    topk_weights: `[M, k]` float, router weights.
    Rank r owns slots `r * slots_per_rank ... (r + 1) * slots_per_rank - 1`.
    max_pairs: None = exactly the P pairs (the length depends on the data: a host sync
        on GPU); an int >= P, e.g. `M * min(k, num_ranks)` = every token to every rank
        it can reach = fixed length, padded.
    """
    num_tokens = topk_ids.shape[0]
    valid = topk_ids >= 0
    # Dropped choices point at an extra column that is cut off below.
    owner = torch.where(valid, topk_ids // slots_per_rank, num_ranks).long()  # [M, k]
    hits = torch.zeros(num_tokens, num_ranks + 1, dtype=torch.bool, device=topk_ids.device)
    hits.scatter_(1, owner, True)
    hits = hits[:, :num_ranks]  # hits[m, r]: token m has a choice on rank r
    # nonzero over the transpose lists pairs by rank first, then by token.
    if max_pairs is None:
        dest_rank, token_index = hits.t().nonzero(as_tuple=True)
    else:
        pairs = torch.nonzero_static(hits.t(), size=max_pairs, fill_value=-1)
        padding = pairs[:, 0] < 0
        dest_rank = pairs[:, 0].masked_fill(padding, num_ranks)
        token_index = pairs[:, 1].masked_fill(padding, 0)
    send_counts = hits.sum(dim=0, dtype=torch.int64)

    mine = (owner[token_index] == dest_rank[:, None]) & valid[token_index]  # [P, k]
    local_ids = torch.where(
        mine, topk_ids[token_index] - dest_rank[:, None] * slots_per_rank, -1
    ).to(torch.int32)
    weights = torch.where(mine, topk_weights[token_index].float(), 0.0)
    return RoutePlan(token_index, dest_rank, send_counts, local_ids, weights)
