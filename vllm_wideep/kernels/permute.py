"""Group (token, expert) pairs by local expert, on the device, without a host sync.

Glossary (worked example: DeepSeek-V3 at EP 8, 256 experts / 8 ranks = 32 local experts):

* ``M``: tokens on this rank; ``k``: top-k (8); ``E``: local experts (32).
* pair: one (token, slot) entry of ``topk_ids``; there are ``M * k`` of them.
* row: the position of a pair in the grouped layout the expert GEMMs read and write.

Two layouts, both with data-independent shapes so they can be captured in a CUDA graph:

* contiguous (prefill): rows sorted by expert, expert ``e`` owns rows
  ``[expert_offsets[e], expert_offsets[e + 1])``; ``M * k`` rows in all, pairs with id
  ``-1`` sort behind the last expert and no tile reads them.
* batched (decode): expert ``e`` owns rows ``[e * capacity, e * capacity + expert_counts[e])``;
  ``E * capacity`` rows in all. With ``capacity = M`` nothing can overflow, because top-k
  never names one expert twice for the same token.

``flat_to_row`` maps pairs back to rows for the combine, ``-1`` where the pair is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Routing:
    """Where every (token, expert) pair lives in the grouped layout.

    row_token: `[num_rows]` int32, source token of each row (0 in unused batched slots).
    flat_to_row: `[M * k]` int32, row of pair ``m * k + j``, `-1` = not on this rank.
    expert_offsets: `[E + 1]` int32, contiguous layout row ranges (prefix sum of counts).
    expert_counts: `[E]` int32, pairs per local expert.
    capacity: rows per expert in the batched layout, ``None`` for contiguous.
    """

    row_token: torch.Tensor
    flat_to_row: torch.Tensor
    expert_offsets: torch.Tensor
    expert_counts: torch.Tensor
    capacity: int | None

    @property
    def num_rows(self) -> int:
        return self.row_token.shape[0]


def route(topk_ids: torch.Tensor, num_experts: int, capacity: int | None = None) -> Routing:
    """Sort pairs by expert; batched layout when ``capacity`` is given.

    topk_ids: `[M, k]` int, local expert ids in ``[0, num_experts)``, `-1` = not on this rank.
    Everything stays on ``topk_ids.device``; no ``.item()``, so no host sync.
    """
    M, k = topk_ids.shape
    device = topk_ids.device
    num_pairs = M * k
    flat = topk_ids.reshape(-1)
    # Dropped pairs get key E so the stable sort puts them after every real expert.
    key = torch.where(flat < 0, num_experts, flat).to(torch.int64)
    order = torch.sort(key, stable=True).indices
    counts = torch.zeros(num_experts + 1, dtype=torch.int32, device=device)
    counts.scatter_add_(0, key, torch.ones_like(key, dtype=torch.int32))
    offsets = torch.zeros(num_experts + 2, dtype=torch.int32, device=device)
    offsets[1:] = torch.cumsum(counts, 0)
    expert_offsets = offsets[: num_experts + 1]
    expert_counts = counts[:num_experts]
    valid = flat >= 0

    sorted_pos = torch.empty(num_pairs, dtype=torch.int64, device=device)
    sorted_pos[order] = torch.arange(num_pairs, device=device)
    if capacity is None:
        row_token = (order // k).to(torch.int32)
        rows = sorted_pos
    else:
        rank_in_expert = sorted_pos - offsets[key].to(torch.int64)
        rows = key * capacity + rank_in_expert
        # A rank past capacity can only come from a caller breaking the distinct-ids
        # precondition; drop it rather than write out of bounds.
        valid = valid & (rank_in_expert < capacity)
        num_rows = num_experts * capacity
        # Dropped pairs scatter into one spare slot that is sliced off.
        row_token = torch.zeros(num_rows + 1, dtype=torch.int32, device=device)
        safe_rows = torch.where(valid, rows, num_rows)
        row_token[safe_rows] = (torch.arange(num_pairs, device=device) // k).to(torch.int32)
        row_token = row_token[:num_rows]
        expert_counts = torch.clamp(expert_counts, max=capacity)
    flat_to_row = torch.where(valid, rows, -1).to(torch.int32)
    return Routing(row_token, flat_to_row, expert_offsets, expert_counts, capacity)
