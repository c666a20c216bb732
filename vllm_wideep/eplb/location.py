"""Expert location on one rank: which logical expert each of a MoE layer's slots holds,
and the tables that send a router's logical choices to those slots.

The layer's weights have S slots per rank (`w13 [S, 2I, H]`, `w2 [S, H, I]`): the
E / R experts vLLM loads into slots 0 .. E/R - 1, plus `redundant_experts / R` extra slots
for replicas. Until a placement moves them, extra slot j holds a copy of local expert
`(j - E/R) % (E/R)` (the "home" placement), so every placement in use is valid.

Routing (logical expert id -> slot). With a placement (redundant slots, a placement file,
or online rebalancing) a logical expert lives in one or more slots. Each (token, choice)
goes to replica `row_key(token) % replica_count` of the expert, a key from the token's own
hidden-state bits (`row_keys`): tokens spread over the replicas like random numbers, and a
token takes the same slot whatever its batch, its position in it or the rank that
dispatches it. That keeps outputs bit-identical from run to run: combine adds a token's
per-rank partial sums in rank order (`comm/exchange.add_rows`), so which rank computes a
pair decides which sum it joins. (Preferring a replica on the dispatching rank would save
its traffic, but then a token's sums would depend on where the scheduler put it.)

Worked example (E = 4, R = 2, S = 3; rank 0 holds [0, 2, 1], rank 1 holds [0, 1, 3]):

    log2phy = [[0, 3], [2, 4], [1, -1], [5, -1]]     replica_count = [2, 2, 1, 1]
    a token with key 7 choosing experts [0, 3] goes to slots [log2phy[0, 7 % 2], 5] = [3, 5]

The tables are device tensors of fixed shape, updated in place (`ExpertRouting.load`), so a
captured CUDA graph sees a new placement without being captured again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vllm_wideep.eplb.placement import Placement
from vllm_wideep.eplb.stats import record


class ExpertRouting:
    """One layer's logical -> physical tables (the same on every rank).

    log2phy: `[E, max_replicas]` int64, the slots of each expert ascending, `-1` = padding.
    replica_count: `[E]` int64, slots per expert (>= 1).
    """

    def __init__(self, num_experts: int, max_replicas: int, device):
        self.log2phy = torch.full((num_experts, max_replicas), -1, dtype=torch.int64, device=device)
        self.replica_count = torch.ones(num_experts, dtype=torch.int64, device=device)

    def load(self, physical_to_logical: torch.Tensor, slots_per_rank: int) -> None:
        """Fill the tables (in place) from one layer's placement `[N]` int64."""
        num_experts, max_replicas = self.log2phy.shape
        log2phy, replica_count = routing_tables(physical_to_logical, num_experts, slots_per_rank)
        if log2phy.shape[1] > max_replicas:
            raise ValueError(
                f"an expert has {log2phy.shape[1]} replicas, more than the {max_replicas} "
                f"this layer was built for"
            )
        self.log2phy.fill_(-1)
        self.log2phy[:, : log2phy.shape[1]].copy_(log2phy)
        self.replica_count.copy_(replica_count)

    def to_physical(self, topk_ids: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """topk_ids `[M, k]` logical ids (`-1` = none), hidden_states `[M, H]` the tokens ->
        `[M, k]` int64 slots (`-1` kept)."""
        ids = topk_ids.long().clamp(min=0)
        replica = row_keys(hidden_states)[:, None] % self.replica_count[ids]
        return torch.where(topk_ids >= 0, self.log2phy[ids, replica], -1)


_INT_OF_SIZE = {2: torch.int16, 4: torch.int32}


def row_keys(hidden_states: torch.Tensor) -> torch.Tensor:
    """hidden_states `[M, H]` (16- or 32-bit floats) -> `[M]` int64 >= 0, a key from each
    row's own bits: its first 8 values read as integers, summed with odd weights. The low
    mantissa bits make keys spread like random numbers; equal rows get equal keys."""
    head = hidden_states[:, :8].contiguous()
    bits = head.view(_INT_OF_SIZE[head.element_size()]).long()
    weights = torch.arange(1, 2 * bits.shape[1], 2, device=bits.device)  # 1, 3, 5, ...
    return (bits * weights).sum(dim=1).abs()


def routing_tables(
    physical_to_logical: torch.Tensor, num_experts: int, slots_per_rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's placement `[N]` -> (log2phy `[E, max_replicas]`, replica_count `[E]`) on
    CPU, as described in `ExpertRouting`."""
    phy2log = physical_to_logical.to("cpu", torch.int64)
    placement = Placement(phy2log[None], num_ranks=phy2log.shape[0] // slots_per_rank)
    placement.validate(num_experts, placement.num_ranks)
    return placement.logical_to_physical[0], placement.replica_count[0]


def home_placement(num_experts: int, num_ranks: int, slots_per_rank: int) -> torch.Tensor:
    """`[R * S]` int64: rank r's slots hold its block of E / R experts, then copies of it."""
    experts_per_rank = num_experts // num_ranks
    slot = torch.arange(slots_per_rank)
    local = torch.where(slot < experts_per_rank, slot, (slot - experts_per_rank) % experts_per_rank)
    return (torch.arange(num_ranks)[:, None] * experts_per_rank + local).flatten()


@dataclass
class ExpertSlots:
    """One MoE layer's slots on this rank: the balancer's handle on the layer.

    weights: this rank's expert tensors, each `[S, ...]` (w13, w2), moved in place.
    physical_to_logical: `[N]` int64 on CPU, the placement in use.
    routing: the device tables that map logical ids to slots; None while the placement
        is the plain one without extra slots (ids are then slots already).
    step_counts: `[E]` int64 on the device, choices per logical expert this step.
    tokens_per_slot: `[S]` int64 on the device, (token, expert) rows each slot computed
        since start (counted by the experts).
    on_weights_changed: called after the weights were written in place (a new placement
        committed), e.g. to drop copies of the weights an experts backend keeps.
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
    tokens_per_slot: torch.Tensor
    on_weights_changed: list[Callable[[], None]] = field(default_factory=list)

    @classmethod
    def create(
        cls,
        layer_name: str,
        weights: list[torch.Tensor],
        num_experts: int,
        num_ranks: int,
        rank: int,
        routed: bool,
    ) -> ExpertSlots:
        """A layer's slots in the home placement.

        weights: this rank's expert tensors, each `[S, ...]`, with its E / R experts in
            slots 0 .. E/R - 1; the extra slots are filled here (extra slot j <- local
            expert `(j - E/R) % (E/R)`), in place.
        routed: build routing tables; needed with extra slots and for any placement
            other than the home one (a placement file, online rebalancing).
        """
        slots_per_rank = weights[0].shape[0]
        experts_per_rank = num_experts // num_ranks
        for w in weights:
            for j in range(experts_per_rank, slots_per_rank):
                w[j].copy_(w[j % experts_per_rank])
        home = home_placement(num_experts, num_ranks, slots_per_rank)
        device = weights[0].device
        routing = None
        if routed or slots_per_rank > experts_per_rank:
            routing = ExpertRouting(num_experts, len(home) - num_experts + 1, device)
        slots = cls(
            layer_name=layer_name,
            num_experts=num_experts,
            num_ranks=num_ranks,
            rank=rank,
            slots_per_rank=slots_per_rank,
            weights=weights,
            physical_to_logical=home,
            routing=routing,
            step_counts=torch.zeros(num_experts, dtype=torch.int64, device=device),
            tokens_per_slot=torch.zeros(slots_per_rank, dtype=torch.int64, device=device),
        )
        if routing is not None:
            slots.set_placement(home)
        return slots

    def route(self, topk_ids: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """Record this batch's logical choices, return their slots. topk_ids `[M, k]`,
        hidden_states `[M, H]` the tokens (`ExpertRouting.to_physical`)."""
        record(self.step_counts, topk_ids)
        if self.routing is None:
            return topk_ids
        return self.routing.to_physical(topk_ids, hidden_states)

    def set_placement(self, physical_to_logical: torch.Tensor) -> None:
        """Point the routing tables at a placement whose weights are in place."""
        assert self.routing is not None, "a layer without routing tables cannot move"
        self.routing.load(physical_to_logical, self.slots_per_rank)
        self.physical_to_logical = physical_to_logical.clone()
        for callback in self.on_weights_changed:
            callback()
