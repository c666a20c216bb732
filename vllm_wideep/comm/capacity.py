"""`capacity` backend: fixed-size per-peer buffers, no host sync (CUDA-graph safe).

Every rank sends every peer one block of `C + 1` rows (`C` = the capacity) in one
`all_to_all_single` with equal splits: a header row carrying the number of rows used, the
sender's overflow count and the sender's most rows for one peer, then up to C rows packed
as in `packing.RowFormat`, the rest zeros. Routing (`plan_routes(max_pairs=M * min(k, R))`),
packing, the header and the unpacking are device ops on fixed shapes: inside a capture
nothing reads a count on the host, so vLLM can capture the MoE layer in a CUDA graph
(outside one, the headers are read once per layer: see the end). The price is padding: the
wire carries R - 1 full blocks per call whatever the routing (`TrafficCounters` counts
them).

Worked example, R = 2, C = 3, rank 0 sends rows a, b to rank 1 and nothing to itself:

    block to rank 0: [header (0, 0, 2) | 0 | 0 | 0]
    block to rank 1: [header (2, 0, 2) | a | b | 0]
    rank 1 receives 2 * 3 rows, masks all but a and b (`-1` ids), its experts skip them,
    and combine sends the same fixed blocks back; rank 0 picks a's and b's rows out.

Capacity and overflow. A rank dispatches at most `max_tokens_per_rank` rows
(ceil(max_num_batched_tokens / TP): the scheduler's token budget, TP-sliced), so a peer
receives at most that many from it:

* `capacity_tokens = 0` (default): with CUDA graphs, C = the largest graph batch per rank
  (what a decode step can send: captured batches never overflow, larger eager batches such
  as prefill chunks take the second round below); without graphs, C = max_tokens_per_rank,
  and no batch can overflow. At DeepSeek-V3 shapes, EP 64, an 8192-token budget and graph
  batches up to 512, a call's buffers per rank are 0.47 GB each way instead of 7.55 GB.
* `capacity_tokens = N`: C = max(N, the largest CUDA-graph batch per rank), capped at
  max_tokens_per_rank. Captured batches cannot overflow, so they run without a host read.
  Outside capture (eager batches larger than the graph sizes), the host reads the
  overflow counts that arrived in the headers (one sync per layer, the same value on
  every rank) and, when any rank overflowed, all ranks run a second, variable-size round
  (the `alltoall` exchange) for the rows beyond C. No row is ever dropped; each one that took
  the second round adds to `overflow_rows`.
* No second round when C already equals max_tokens_per_rank: a rank that has more rows
  for one peer than C (it was handed more tokens than the budget) cannot send them. Every
  rank reads the headers outside a capture (one host read per layer; the headers came in
  the collective that runs anyway), so all of them learn it from the same numbers and
  raise the same `CapacityOverflowError`, naming the rank, its rows and C, instead of one
  rank raising and its peers waiting for it in the next collective until the timeout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from vllm_wideep.comm.base import Dispatcher, DispatchResult, TrafficCounters
from vllm_wideep.comm.exchange import (
    Exchange,
    add_rows,
    combine_traffic,
    dispatch_traffic,
    exchange_rows,
    return_rows,
)
from vllm_wideep.comm.packing import RowFormat
from vllm_wideep.comm.routing import plan_routes
from vllm_wideep.config import DispatchDtype

# int64 each: rows used in the block, the sender's overflow rows, the sender's most rows
# for one peer
HEADER_BYTES = 24


class CapacityOverflowError(RuntimeError):
    """Rows beyond the capacity with no second round to carry them; raised on every rank."""


def capacity_rows(
    capacity_tokens: int, max_tokens_per_rank: int, graph_tokens_per_rank: int = 0
) -> int:
    """Rows per peer block, C (see the module docstring).

    capacity_tokens: the `capacity_tokens` option; 0 = the largest graph batch, or
        max_tokens_per_rank without graphs.
    max_tokens_per_rank: the most rows one rank dispatches in a call.
    graph_tokens_per_rank: the most rows per rank of a CUDA-graph batch (0 = no graphs).
    """
    if capacity_tokens < 0 or max_tokens_per_rank < 1:
        raise ValueError(
            f"vllm_wideep: capacity_tokens must be >= 0 (got {capacity_tokens}) and "
            f"max_tokens_per_rank >= 1 (got {max_tokens_per_rank})"
        )
    if capacity_tokens == 0:
        return min(graph_tokens_per_rank or max_tokens_per_rank, max_tokens_per_rank)
    return min(max(capacity_tokens, graph_tokens_per_rank), max_tokens_per_rank)


def capacity_buffer_bytes(capacity: int, num_ranks: int, row_bytes: int) -> int:
    """Bytes of one call's send (or receive) buffer per rank: R blocks of C + 1 rows."""
    return num_ranks * (capacity + 1) * row_bytes


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


@dataclass(frozen=True)
class _SecondRound:
    pairs: torch.Tensor  # [P2] int64 the overflow pairs, indices into the plan's pairs
    exchange: Exchange


@dataclass(frozen=True)
class _CapacityHandle:
    token_index: torch.Tensor  # [P_max] int64 source row of each pair, by rank (padding: 0)
    gather_index: torch.Tensor  # [P_max] int64 row in the returned blocks; R * C = none
    num_tokens: int  # M
    second: _SecondRound | None


class CapacityDispatcher(Dispatcher):
    def __init__(
        self,
        *,
        group,
        slots_per_rank: int,
        num_ranks: int,
        capacity: int,
        max_tokens_per_rank: int,
        dispatch_dtype: DispatchDtype = "auto",
        keep_fp8: bool = False,
    ):
        super().__init__(
            group=group,
            slots_per_rank=slots_per_rank,
            num_ranks=num_ranks,
            dispatch_dtype=dispatch_dtype,
            keep_fp8=keep_fp8,
        )
        if not capacity >= 1:
            raise ValueError(f"vllm_wideep: capacity must be >= 1 row, got {capacity}")
        self.max_tokens_per_rank = max_tokens_per_rank
        self.capacity = min(capacity, max_tokens_per_rank)
        self.may_overflow = self.capacity < max_tokens_per_rank
        self._wire_bytes: dict[tuple, torch.Tensor] = {}  # per-call increments, on device

    def _fixed_increment(self, device, **values: int) -> torch.Tensor:
        """A constant increment, built on the first (eager) call and reused, so counting
        inside a captured graph copies nothing from the host."""
        key = (str(device), *sorted(values.items()))
        if key not in self._wire_bytes:
            self._wire_bytes[key] = TrafficCounters.increment(device, **values)
        return self._wire_bytes[key]

    def dispatch(self, hidden_states, topk_ids, topk_weights) -> DispatchResult:
        num_tokens, top_k = topk_ids.shape
        R, C, device = self.num_ranks, self.capacity, hidden_states.device
        fmt = RowFormat.of(hidden_states, topk_ids, self.dispatch_dtype)
        if fmt.nbytes < HEADER_BYTES:
            raise ValueError(f"vllm_wideep: rows of {fmt.nbytes} bytes cannot hold the header")
        plan = plan_routes(
            topk_ids,
            topk_weights,
            self.slots_per_rank,
            R,
            max_pairs=num_tokens * min(top_k, R),
        )
        real = plan.dest_rank < R
        first_pair = torch.cumsum(plan.send_counts, 0) - plan.send_counts  # [R]
        position = (
            torch.arange(len(real), device=device)
            - torch.cat([first_pair, first_pair.new_zeros(1)])[plan.dest_rank]
        )
        fits = real & (position < C)
        overflow = fits.logical_not().logical_and(real)

        block = C + 1
        trash = R * block
        send = torch.zeros(trash + 1, fmt.nbytes, dtype=torch.uint8, device=device)
        packed = fmt.pack(hidden_states[plan.token_index], plan.local_ids, plan.weights)
        send[torch.where(fits, plan.dest_rank * block + 1 + position, trash)] = packed
        header = torch.stack(
            [
                plan.send_counts.clamp(max=C),
                overflow.sum().expand(R),
                plan.send_counts.max().expand(R),
            ],
            dim=1,
        )  # [R, 3] int64
        blocks = send[:trash].view(R, block, fmt.nbytes)
        blocks[:, 0, :HEADER_BYTES] = header.view(torch.uint8).view(R, HEADER_BYTES)
        recv = torch.empty_like(blocks)
        dist.all_to_all_single(recv, blocks, group=self.group)

        wire = (R - 1) * block * fmt.nbytes
        self.traffic.add(
            self._fixed_increment(device, dispatch_sent_bytes=wire, dispatch_recv_bytes=wire)
            + TrafficCounters.increment(device, overflow_rows=overflow.sum())
        )
        # reshape, not contiguous(): with R = 1 the slice counts as contiguous but keeps
        # the block stride, which need not be a multiple of 8.
        header_in = recv[:, 0, :HEADER_BYTES].reshape(-1).view(torch.int64).view(R, 3)
        used = torch.arange(C, device=device)[None, :] < header_in[:, :1]  # [R, C]
        hidden, scales, ids, weights = fmt.unpack(
            recv[:, 1:].reshape(R * C, fmt.nbytes), self.keep_fp8
        )
        used = used.reshape(R * C, 1)
        ids = torch.where(used, ids, -1)
        weights = torch.where(used, weights, 0.0)

        second = None
        # Never inside a capture (sized not to overflow there): one host read, the same
        # numbers on every rank.
        over = [] if _capturing() else header_in[:, 1:].tolist()  # [R, 2]
        if any(beyond for beyond, _ in over):
            if not self.may_overflow:
                raise CapacityOverflowError(self._overflow_message(over))
            pairs = overflow.nonzero().squeeze(1)  # still sorted by destination rank
            counts = torch.bincount(plan.dest_rank[pairs], minlength=R)
            recv2, exchange = exchange_rows(packed[pairs], counts, self.group)
            self.traffic.add(dispatch_traffic(exchange, self.rank, R, fmt.nbytes, device))
            hidden2, scales2, ids2, weights2 = fmt.unpack(recv2, self.keep_fp8)
            hidden = torch.cat([hidden, hidden2])
            scales = None if scales is None else torch.cat([scales, scales2])
            ids = torch.cat([ids, ids2])
            weights = torch.cat([weights, weights2])
            second = _SecondRound(pairs, exchange)

        gather_index = torch.where(fits, plan.dest_rank * C + position, R * C)
        return DispatchResult(
            hidden_states=hidden,
            hidden_scales=scales,
            topk_ids=ids,
            topk_weights=weights,
            handle=_CapacityHandle(plan.token_index, gather_index, num_tokens, second),
        )

    def _overflow_message(self, over: list[list[int]]) -> str:
        """over: per sending rank, [rows beyond C, most rows for one peer]."""
        ranks = "; ".join(
            f"rank {rank} has {most} rows for one peer, {beyond} beyond it"
            for rank, (beyond, most) in enumerate(over)
            if beyond
        )
        return (
            f"vllm_wideep: the capacity exchange holds C = {self.capacity} rows per peer "
            f"block and {ranks}. No second round: C already equals the per-rank token "
            f"budget ceil(max_num_batched_tokens / TP) = {self.max_tokens_per_rank} the "
            f"buffers were sized for, and a rank was handed more tokens than that. Raise "
            f"--max-num-batched-tokens, or set --wideep-capacity-tokens below the budget so "
            f"that rows beyond C take a second round."
        )

    def combine(self, expert_output, handle: _CapacityHandle) -> torch.Tensor:
        R, C = self.num_ranks, self.capacity
        hidden_dim, device = expert_output.shape[1], expert_output.device
        first = expert_output[: R * C].contiguous()
        returned = torch.empty((R * C + 1, hidden_dim), dtype=first.dtype, device=device)
        returned[R * C :].zero_()
        dist.all_to_all_single(returned[: R * C], first, group=self.group)
        wire = (R - 1) * C * hidden_dim * expert_output.element_size()
        self.traffic.add(
            self._fixed_increment(device, calls=1, combine_sent_bytes=wire, combine_recv_bytes=wire)
        )
        rows = returned[handle.gather_index].float()  # [P_max, H]; zeros where none came
        if handle.second is not None:
            exchange = handle.second.exchange
            second = return_rows(expert_output[R * C :], exchange, self.group)
            self.traffic.add(combine_traffic(exchange, self.rank, expert_output))
            rows[handle.second.pairs] = second.float()
        # One add over the pairs, sorted by rank: a token's rows are summed in rank order
        # whether they came in the blocks or in the second round.
        out = torch.zeros(handle.num_tokens, hidden_dim, dtype=torch.float32, device=device)
        return add_rows(out, handle.token_index, rows)
