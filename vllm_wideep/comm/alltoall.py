"""`alltoall` exchange: variable-size `all_to_all_single` over the EP group.

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

from vllm_wideep.comm.base import Dispatcher, DispatchResult
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


@dataclass(frozen=True)
class _AllToAllHandle:
    token_index: torch.Tensor  # [P] int64 source row of each sent pair, by rank then token
    exchange: Exchange
    num_tokens: int  # M


class AllToAllDispatcher(Dispatcher):
    def dispatch(self, hidden_states, topk_ids, topk_weights) -> DispatchResult:
        fmt = RowFormat.of(hidden_states, topk_ids, self.dispatch_dtype)
        plan = plan_routes(topk_ids, topk_weights, self.slots_per_rank, self.num_ranks)
        send = fmt.pack(hidden_states[plan.token_index], plan.local_ids, plan.weights)
        recv, exchange = exchange_rows(send, plan.send_counts, self.group)
        self.traffic.add(
            dispatch_traffic(exchange, self.rank, self.num_ranks, fmt.nbytes, send.device)
        )
        hidden, scales, ids, weights = fmt.unpack(recv, self.keep_fp8)
        return DispatchResult(
            hidden_states=hidden,
            hidden_scales=scales,
            topk_ids=ids,
            topk_weights=weights,
            handle=_AllToAllHandle(plan.token_index, exchange, hidden_states.shape[0]),
        )

    def combine(self, expert_output, handle: _AllToAllHandle) -> torch.Tensor:
        returned = return_rows(expert_output, handle.exchange, self.group)
        self.traffic.add(combine_traffic(handle.exchange, self.rank, expert_output, calls=1))
        out = torch.zeros(
            (handle.num_tokens, expert_output.shape[1]),
            dtype=torch.float32,
            device=expert_output.device,
        )
        # Pairs are sorted by rank: each token's rows are added in rank order.
        return add_rows(out, handle.token_index, returned.float())
