"""One MoE layer's expert slots on this rank: which expert each holds, and its load.

The layer's weights have S slots per rank (`w13 [S, 2I, H]`, `w2 [S, H, I]`): the
E / R experts vLLM loads into slots 0 .. E/R - 1, plus `redundant_experts / R` extra slots
for replicas. Until a placement moves them, extra slot j holds a copy of local expert
`(j - E/R) % (E/R)` (the "home" placement), so every placement in use is valid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_wideep.eplb.stats import record
from vllm_wideep.layer.remap import ExpertRouting


def home_placement(num_experts: int, num_ranks: int, slots_per_rank: int) -> torch.Tensor:
    """`[R * S]` int64: rank r's slots hold its block of E / R experts, then copies of it."""
    experts_per_rank = num_experts // num_ranks
    slot = torch.arange(slots_per_rank)
    local = torch.where(slot < experts_per_rank, slot, (slot - experts_per_rank) % experts_per_rank)
    return (torch.arange(num_ranks)[:, None] * experts_per_rank + local).flatten()


@dataclass
class ExpertSlots:
    """The balancer's handle on one MoE layer (state lives here and in the weights).

    weights: this rank's expert tensors, each `[S, ...]` (w13, w2), moved in place.
    physical_to_logical: `[N]` int64 on CPU, the placement in use.
    routing: the device tables that map logical ids to slots; None while the placement
        is the plain one without extra slots (ids are then slots already).
    step_counts: `[E]` int64 on the device, choices per logical expert this step.
    tokens_per_slot: `[S]` int64 on the device, (token, expert) rows each slot computed
        since start (the experts' counter).
    """

    layer_name: str
    num_experts: int
    num_ranks: int
    rank: int
    slots_per_rank: int
    weights: list[torch.Tensor]
    physical_to_logical: torch.Tensor
    routing: ExpertRouting | None
    step_counts: torch.Tensor
    tokens_per_slot: torch.Tensor | None = None

    def route(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """Record this batch's logical choices, return their slots. topk_ids `[M, k]`."""
        record(self.step_counts, topk_ids)
        if self.routing is None:
            return topk_ids
        return self.routing.to_physical(topk_ids)

    def set_placement(self, physical_to_logical: torch.Tensor) -> None:
        """Point the routing tables at a placement whose weights are in place."""
        assert self.routing is not None, "a layer without routing tables cannot move"
        self.routing.load(physical_to_logical, self.slots_per_rank)
        self.physical_to_logical = physical_to_logical.clone()
