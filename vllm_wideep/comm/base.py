"""The dispatch/combine interface every token-exchange backend implements.

dispatch: rows of this rank's tokens -> rows this rank's experts must compute
combine:  those rows' expert outputs -> one summed output row per source token

Backends (`registry.DISPATCHERS`, chosen by `--wideep-token-exchange`), built from the
primitives in `exchange.py`:
    alltoall   comm/alltoall.py   variable-size all_to_all_single, one row per (token, rank)
    capacity   comm/capacity.py   fixed-size per-peer buffers, no host sync (CUDA graphs)
    allgather  comm/allgather.py  every token to every rank, reduce-scatter back (reference)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from vllm_wideep.config import DispatchDtype


@dataclass(frozen=True)
class DispatchResult:
    """What a rank's experts receive.

    hidden_states: `[M_recv, H]` activation dtype, one row per (source token, this rank);
        backends with fixed-size buffers also hand over padding rows (all ids `-1`).
        float8 e4m3 when the dispatcher keeps fp8 rows (`keep_fp8`).
    hidden_scales: `[M_recv, ceil(H / 128)]` float32 scales of float8 hidden_states,
        else None.
    topk_ids: `[M_recv, k]` int32 local slots, `-1` = the choice is on another rank.
    topk_weights: `[M_recv, k]` float32 router weights, `0` where `topk_ids` is `-1`.
    handle: backend state that `combine` needs to send results back.
    """

    hidden_states: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    handle: Any
    hidden_scales: torch.Tensor | None = None


# Columns of `TrafficCounters.totals`, in order.
TRAFFIC_FIELDS = (
    "calls",
    "dispatch_sent_bytes",
    "dispatch_recv_bytes",
    "combine_sent_bytes",
    "combine_recv_bytes",
    "overflow_rows",
)


class TrafficCounters:
    """Cumulative token-exchange traffic of one dispatcher (one MoE layer on one rank).

    Bytes count what crosses the link to or from other ranks: a rank's rows for itself
    are a local copy and are not counted. They include the row-count headers and, for
    fixed-size buffers, the padding (what the wire carries, not just the payload).
    `overflow_rows` counts (token, rank) rows that did not fit a `capacity` buffer and
    went in the second round. `totals` is a device tensor updated with device ops only,
    so counting adds no host sync and replays inside a CUDA graph; `snapshot()` syncs.
    """

    def __init__(self) -> None:
        self.totals: torch.Tensor | None = None  # `[len(TRAFFIC_FIELDS)]` int64

    def add(self, increment: torch.Tensor) -> None:
        """increment: `[len(TRAFFIC_FIELDS)]` int64 on the data's device."""
        if self.totals is None:
            self.totals = torch.zeros_like(increment)
        self.totals.add_(increment)

    @staticmethod
    def increment(device: torch.device, **values: int | torch.Tensor) -> torch.Tensor:
        """`[len(TRAFFIC_FIELDS)]` int64 from named host ints or 0-dim device tensors."""
        unknown = set(values) - set(TRAFFIC_FIELDS)
        assert not unknown, f"unknown traffic fields {unknown}"
        out = torch.zeros(len(TRAFFIC_FIELDS), dtype=torch.int64, device=device)
        host = {n: v for n, v in values.items() if not isinstance(v, torch.Tensor)}
        if host:
            index = [TRAFFIC_FIELDS.index(n) for n in host]
            out[index] = torch.tensor(list(host.values()), dtype=torch.int64).to(device)
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                out[TRAFFIC_FIELDS.index(name)] += value.to(torch.int64)
        return out

    def snapshot(self) -> dict[str, int]:
        """`{field: int}` (zeros before the first call); reads the device."""
        if self.totals is None:
            return dict.fromkeys(TRAFFIC_FIELDS, 0)
        return dict(zip(TRAFFIC_FIELDS, self.totals.tolist(), strict=True))


class Dispatcher(ABC):
    """Moves tokens to the ranks that own their experts and the results back.

    Every rank of the EP group must call `dispatch` and then `combine` the same number
    of times, also with zero tokens: both are collectives.

    Constructor keywords shared by every backend: `group` (the EP process group),
    `slots_per_rank` (slots per rank), `num_ranks` (EP size), `dispatch_dtype`
    (`"auto"` = the activation dtype, `"fp8"` = float8 e4m3 with a scale per token and 128
    columns), `keep_fp8` (with fp8 dispatch, hand the experts the float8 rows and scales
    instead of dequantizing them: for FP8 experts computing W8A8).
    """

    def __init__(
        self,
        *,
        group,
        slots_per_rank: int,
        num_ranks: int,
        dispatch_dtype: DispatchDtype = "auto",
        keep_fp8: bool = False,
    ):
        import torch.distributed as dist

        self.group = group
        self.slots_per_rank = slots_per_rank
        self.num_ranks = num_ranks
        self.rank = dist.get_rank(group)
        self.dispatch_dtype = dispatch_dtype
        self.keep_fp8 = keep_fp8 and dispatch_dtype == "fp8"
        self.traffic = TrafficCounters()

    @abstractmethod
    def dispatch(
        self,
        hidden_states: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
    ) -> DispatchResult:
        """hidden_states `[M, H]`, topk_ids `[M, k]` global slot ids (`-1` = none),
        topk_weights `[M, k]`."""

    @abstractmethod
    def combine(self, expert_output: torch.Tensor, handle: Any) -> torch.Tensor:
        """expert_output `[M_recv, H]` (each row already weighted and summed over this
        rank's experts) -> `[M, H]` float32, summed over ranks per source token."""
