"""Logical expert ids -> physical slots, the step between vLLM's router and dispatch.

With a placement (redundant slots, a placement file, or online rebalancing) a logical
expert lives in one or more slots. Each (token, choice) goes to

    the expert's slot on this rank, if there is one (no traffic), else
    replica `(token index + rank) % replica_count` of it (tokens spread evenly).

Worked example (E = 4, R = 2, S = 3; rank 0 holds [0, 2, 1], rank 1 holds [0, 1, 3]):

    log2phy = [[0, 3], [2, 4], [1, -1], [5, -1]]     replica_count = [2, 2, 1, 1]
    rank 0: local_slot = [0, 2, 1, -1]  -> expert 3 goes to slot 5, the rest stay home
    rank 1: local_slot = [3, 4, -1, 5]  -> expert 2 goes to slot 1, the rest stay home

The tables are device tensors of fixed shape, updated in place (`load`), so a captured
CUDA graph sees a new placement without being captured again.
"""

from __future__ import annotations

import torch

from vllm_wideep.eplb.placement import Placement


class ExpertRouting:
    """One layer's logical -> physical tables on one rank.

    log2phy: `[E, max_replicas]` int64, the slots of each expert ascending, `-1` = padding.
    replica_count: `[E]` int64, slots per expert (>= 1).
    local_slot: `[E]` int64, the expert's first slot on this rank, `-1` = none.
    """

    def __init__(self, num_experts: int, max_replicas: int, rank: int, device):
        self.rank = rank
        self.log2phy = torch.full((num_experts, max_replicas), -1, dtype=torch.int64, device=device)
        self.replica_count = torch.ones(num_experts, dtype=torch.int64, device=device)
        self.local_slot = torch.full((num_experts,), -1, dtype=torch.int64, device=device)

    def load(self, physical_to_logical: torch.Tensor, slots_per_rank: int) -> None:
        """Fill the tables (in place) from one layer's placement `[N]` int64."""
        num_experts, max_replicas = self.log2phy.shape
        tables = routing_tables(physical_to_logical, num_experts, slots_per_rank, self.rank)
        log2phy, replica_count, local_slot = tables
        if log2phy.shape[1] > max_replicas:
            raise ValueError(
                f"an expert has {log2phy.shape[1]} replicas, more than the {max_replicas} "
                f"this layer was built for"
            )
        self.log2phy.fill_(-1)
        self.log2phy[:, : log2phy.shape[1]].copy_(log2phy)
        self.replica_count.copy_(replica_count)
        self.local_slot.copy_(local_slot)

    def to_physical(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """topk_ids `[M, k]` logical ids (`-1` = none) -> `[M, k]` int64 slots (`-1` kept)."""
        valid = topk_ids >= 0
        ids = topk_ids.long().clamp(min=0)
        token = torch.arange(ids.shape[0], device=ids.device)[:, None] + self.rank
        replica = token % self.replica_count[ids]
        spread = self.log2phy[ids, replica]
        local = self.local_slot[ids]
        slots = torch.where(local >= 0, local, spread)
        return torch.where(valid, slots, -1)


def routing_tables(
    physical_to_logical: torch.Tensor, num_experts: int, slots_per_rank: int, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's placement `[N]` -> (log2phy `[E, max_replicas]`, replica_count `[E]`,
    local_slot `[E]`) on CPU, as described in `ExpertRouting`."""
    phy2log = physical_to_logical.to("cpu", torch.int64)
    num_slots = phy2log.shape[0]
    placement = Placement(phy2log[None], num_ranks=num_slots // slots_per_rank)
    placement.validate(num_experts, placement.num_ranks)
    log2phy = placement.logical_to_physical[0]
    replica_count = placement.replica_count[0]
    mine = torch.arange(rank * slots_per_rank, (rank + 1) * slots_per_rank)
    no_slot = torch.full((num_experts,), num_slots, dtype=torch.int64)
    local_slot = no_slot.scatter_reduce(0, phy2log[mine], mine, "amin")
    local_slot[local_slot == num_slots] = -1
    return log2phy, replica_count, local_slot
