"""`a2a` backend: variable-size `all_to_all_single` over the EP group.

One collective exchanges the per-rank row counts (a host sync: the split sizes must be
known on the host), one moves the rows. Each row carries the token's hidden state and its
(slot, weight) list packed as bytes (`packing.RowFormat`), so a dispatch is two collectives
whatever the dtypes. NCCL on GPU, gloo on CPU (gloo supports uneven splits for
`all_to_all_single` only).

Lean by construction: a token goes once to each rank that owns one of its experts, and
that rank sums its experts' outputs before sending one row back, so both directions move
one row per (token, destination rank), not per (token, expert). The host sync makes the
layer impossible to capture in a CUDA graph: the plugin turns graphs off with this backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from vllm_wideep.comm.base import Dispatcher, DispatchResult, TrafficCounters
from vllm_wideep.comm.packing import RowFormat
from vllm_wideep.comm.routing import plan_routes


@dataclass(frozen=True)
class Exchange:
    """Split sizes of one variable-size exchange, in rows, as the host knows them."""

    send_splits: list[int]  # [R] rows sent to each rank
    recv_splits: list[int]  # [R] rows received from each rank

    def remote(self, rank: int) -> tuple[int, int]:
        """(rows sent to, rows received from) the other ranks."""
        return (
            sum(self.send_splits) - self.send_splits[rank],
            sum(self.recv_splits) - self.recv_splits[rank],
        )


def exchange_rows(
    rows: torch.Tensor, send_counts: torch.Tensor, group
) -> tuple[torch.Tensor, Exchange]:
    """Send `rows` `[P, n]` (grouped by destination, `send_counts` `[R]` int64 per rank);
    return the rows received `[sum recv, n]`, grouped by source rank, and the splits."""
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    exchange = Exchange(send_counts.tolist(), recv_counts.tolist())
    recv = rows.new_empty((sum(exchange.recv_splits), rows.shape[1]))
    dist.all_to_all_single(
        recv,
        rows.contiguous(),
        output_split_sizes=exchange.recv_splits,
        input_split_sizes=exchange.send_splits,
        group=group,
    )
    return recv, exchange


def return_rows(rows: torch.Tensor, exchange: Exchange, group) -> torch.Tensor:
    """The reverse of `exchange_rows`: rows received go back where they came from."""
    returned = rows.new_empty((sum(exchange.send_splits), rows.shape[1]))
    dist.all_to_all_single(
        returned,
        rows.contiguous(),
        output_split_sizes=exchange.send_splits,
        input_split_sizes=exchange.recv_splits,
        group=group,
    )
    return returned


def exchange_traffic(
    exchange: Exchange, rank: int, num_ranks: int, row_bytes: int, device
) -> torch.Tensor:
    """Dispatch bytes of `exchange_rows`, counts header included (8 bytes per peer)."""
    sent, received = exchange.remote(rank)
    header = 8 * (num_ranks - 1)
    return TrafficCounters.increment(
        device,
        dispatch_sent_bytes=sent * row_bytes + header,
        dispatch_recv_bytes=received * row_bytes + header,
    )


@dataclass(frozen=True)
class _A2AHandle:
    token_index: torch.Tensor  # [P] int64 source row of each sent pair
    exchange: Exchange
    num_tokens: int  # M


class AllToAllDispatcher(Dispatcher):
    def dispatch(self, hidden_states, topk_ids, topk_weights) -> DispatchResult:
        fmt = RowFormat.of(hidden_states, topk_ids, self.dispatch_dtype)
        plan = plan_routes(topk_ids, topk_weights, self.experts_per_rank, self.num_ranks)
        send = fmt.pack(hidden_states[plan.token_index], plan.local_ids, plan.weights)
        recv, exchange = exchange_rows(send, plan.send_counts, self.group)
        self.traffic.add(
            exchange_traffic(exchange, self.rank, self.num_ranks, fmt.nbytes, send.device)
        )
        hidden, ids, weights = fmt.unpack(recv)
        return DispatchResult(
            hidden_states=hidden,
            topk_ids=ids,
            topk_weights=weights,
            handle=_A2AHandle(plan.token_index, exchange, hidden_states.shape[0]),
        )

    def combine(self, expert_output, handle: _A2AHandle) -> torch.Tensor:
        returned = return_rows(expert_output, handle.exchange, self.group)
        received, sent = handle.exchange.remote(self.rank)
        row_bytes = expert_output.shape[1] * expert_output.element_size()
        self.traffic.add(
            TrafficCounters.increment(
                expert_output.device,
                calls=1,
                combine_sent_bytes=sent * row_bytes,
                combine_recv_bytes=received * row_bytes,
            )
        )
        out = torch.zeros(
            (handle.num_tokens, expert_output.shape[1]),
            dtype=torch.float32,
            device=expert_output.device,
        )
        return out.index_add_(0, handle.token_index, returned.float())
