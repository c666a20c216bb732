"""Placement: which logical expert sits in each physical slot, and what follows from it.

Symbols as in the package glossary (`vllm_wideep/__init__.py`): L layers, E logical
experts, R ranks, S slots per rank, N = R * S slots; rank r owns slots r * S ... r * S + S - 1.
`load` is `[L, E]` float, tokens routed to each logical expert in a window.

The stored form is the minimal one, `physical_to_logical` plus the rank count; every other
map is derived on access.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Placement:
    """The expert placement of every MoE layer.

    physical_to_logical: `[L, N]` int64, the logical expert held by each physical slot;
        rank r owns slots `r * S ... r * S + S - 1`, `S = N // num_ranks`.
    num_ranks: R, the ranks the slots are spread over.

    A valid placement (see `validate`) holds every expert at least once, so `E` is
    `physical_to_logical.max() + 1`; the derived maps use that.
    """

    physical_to_logical: torch.Tensor
    num_ranks: int

    def __post_init__(self) -> None:
        phy2log = torch.as_tensor(self.physical_to_logical).to("cpu", torch.int64)
        if phy2log.dim() != 2:
            raise ValueError(
                f"physical_to_logical must be [L, N], got shape {tuple(phy2log.shape)}"
            )
        object.__setattr__(self, "physical_to_logical", phy2log)

    @property
    def num_layers(self) -> int:
        return self.physical_to_logical.shape[0]

    @property
    def num_slots(self) -> int:
        """N = R * S, physical slots per layer."""
        return self.physical_to_logical.shape[1]

    @property
    def slots_per_rank(self) -> int:
        return self.num_slots // self.num_ranks

    @property
    def num_experts(self) -> int:
        """E, taken as the largest expert id + 1 (every expert is placed)."""
        if self.physical_to_logical.numel() == 0:
            return 0
        return int(self.physical_to_logical.max()) + 1

    @property
    def replica_count(self) -> torch.Tensor:
        """`[L, E]` int64, how many slots hold each logical expert."""
        return self._count_replicas(self.num_experts)

    def _count_replicas(self, num_experts: int) -> torch.Tensor:
        """`[L, num_experts]` int64 slots per expert id; ids must be < num_experts."""
        counts = torch.zeros(self.num_layers, num_experts, dtype=torch.int64)
        return counts.scatter_add_(
            1, self.physical_to_logical, torch.ones_like(self.physical_to_logical)
        )

    @property
    def logical_to_physical(self) -> torch.Tensor:
        """`[L, E, max_replicas]` int64, the slots of each expert ascending, `-1` = padding."""
        phy2log = self.physical_to_logical
        max_replicas = int(self.replica_count.max()) if phy2log.numel() else 0
        log2phy = torch.full(
            (self.num_layers, self.num_experts, max_replicas), -1, dtype=torch.int64
        )
        # A stable sort by expert keeps each expert's slots in ascending order.
        order = torch.sort(phy2log, dim=1, stable=True).indices  # [L, N] slot ids
        experts = torch.gather(phy2log, 1, order)  # [L, N] sorted expert ids
        first = torch.searchsorted(experts, experts, right=False)  # first slot of its expert
        replica = torch.arange(self.num_slots).expand_as(order) - first
        layer = torch.arange(self.num_layers)[:, None].expand_as(order)
        log2phy[layer, experts, replica] = order
        return log2phy

    def validate(self, num_experts: int, num_ranks: int) -> None:
        """Raise ValueError unless this placement serves E experts over R ranks.

        Checks: R matches, N divisible by R, every id in [0, E), every expert placed.
        """
        if num_ranks != self.num_ranks:
            raise ValueError(f"placement is for {self.num_ranks} ranks, expected {num_ranks}")
        if num_ranks <= 0 or self.num_slots % num_ranks != 0:
            raise ValueError(
                f"{self.num_slots} slots per layer are not divisible by {num_ranks} ranks"
            )
        phy2log = self.physical_to_logical
        bad = (phy2log < 0) | (phy2log >= num_experts)
        if bad.any():
            layer, slot = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"layer {layer} slot {slot} holds expert {int(phy2log[layer, slot])}, "
                f"out of range [0, {num_experts})"
            )
        missing = self._count_replicas(num_experts) == 0
        if missing.any():
            layer = int(missing.any(dim=1).nonzero()[0])
            experts = missing[layer].nonzero().flatten().tolist()
            raise ValueError(f"layer {layer}: experts {experts[:8]} are not placed")

    def rank_load(self, load: torch.Tensor) -> torch.Tensor:
        """`[L, R]` float32, tokens each rank serves.

        load: `[L, E]`, tokens per logical expert. A replicated expert's tokens are split
        evenly over its replicas, so a slot of expert e serves `load[e] / replica_count[e]`.
        """
        load = torch.as_tensor(load).float().cpu()
        if load.dim() != 2 or load.shape[0] != self.num_layers:
            raise ValueError(f"load must be [{self.num_layers}, E], got shape {tuple(load.shape)}")
        share = load / self._count_replicas(load.shape[1]).clamp(min=1)
        slot_load = torch.gather(share, 1, self.physical_to_logical)  # [L, N]
        return slot_load.view(self.num_layers, self.num_ranks, -1).sum(dim=2)

    def balancedness(self, load: torch.Tensor) -> torch.Tensor:
        """`[L]` float32, mean / max rank load per layer (1 = perfect; 1 for an idle layer)."""
        ranks = self.rank_load(load)
        peak = ranks.max(dim=1).values
        mean = ranks.mean(dim=1)
        return torch.where(peak > 0, mean / peak.clamp(min=1e-30), torch.ones_like(peak))
