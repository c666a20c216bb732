"""Which EP rank gets which token: the pure part of dispatch.

A token is sent at most once to each rank that owns one or more of its experts, with the
(local slot, weight) list for that rank; the other entries of the list are -1 / 0 there.

Worked example (4 experts over 2 ranks, so rank r owns experts 2r and 2r+1):

    topk_ids = [[0, 3],        token 0 -> experts 0 (rank 0) and 3 (rank 1)
                [1, 0]]        token 1 -> experts 1 and 0, both on rank 0

    pairs (rank, token), sorted by rank: (0, 0), (0, 1), (1, 0)
    send_counts = [2, 1]
    local_ids   = [[0, -1], [1, 0], [-1, 1]]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RoutePlan:
    """The (token, destination rank) pairs of one dispatch, grouped by destination.

    token_index: `[P]` int64, the source row of each pair; pairs are sorted by
        destination rank, then by token.
    send_counts: `[R]` int64, number of pairs per destination rank (sums to P).
    local_ids: `[P, k]` int32, the expert slot on the destination rank for each of the
        token's k choices, `-1` = that choice lives on another rank.
    weights: `[P, k]` float32, the router weight of each choice, `0` where `-1`.
    """

    token_index: torch.Tensor
    send_counts: torch.Tensor
    local_ids: torch.Tensor
    weights: torch.Tensor


def plan_routes(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    experts_per_rank: int,
    num_ranks: int,
) -> RoutePlan:
    """Group the tokens' expert choices by owning rank.

    topk_ids: `[M, k]` int, expert (slot) ids in `[0, num_ranks * experts_per_rank)`;
        `-1` = no expert (the choice is dropped).
    topk_weights: `[M, k]` float, router weights.
    Rank r owns slots `r * experts_per_rank ... (r + 1) * experts_per_rank - 1`.
    """
    num_tokens = topk_ids.shape[0]
    valid = topk_ids >= 0
    # Dropped choices point at an extra column that is cut off below.
    owner = torch.where(valid, topk_ids // experts_per_rank, num_ranks).long()  # [M, k]
    hits = torch.zeros(num_tokens, num_ranks + 1, dtype=torch.bool, device=topk_ids.device)
    hits.scatter_(1, owner, True)
    hits = hits[:, :num_ranks]  # hits[m, r]: token m has a choice on rank r
    # nonzero over the transpose lists pairs by rank first, then by token.
    dest_rank, token_index = hits.t().nonzero(as_tuple=True)
    send_counts = hits.sum(dim=0, dtype=torch.int64)

    mine = (owner[token_index] == dest_rank[:, None]) & valid[token_index]  # [P, k]
    local_ids = torch.where(
        mine, topk_ids[token_index] - dest_rank[:, None] * experts_per_rank, -1
    ).to(torch.int32)
    weights = torch.where(mine, topk_weights[token_index].float(), 0.0)
    return RoutePlan(token_index, send_counts, local_ids, weights)
