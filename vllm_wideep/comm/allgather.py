"""`allgather` backend: every token to every rank, a reduce-scatter back. The reference.

Each rank receives all tokens of the EP group with their global slot ids turned into its
own local slots (`-1` elsewhere), runs its experts on them, and sends every row's partial
sum back to the token's rank, which adds the R partial sums. This is what vLLM's
`allgather_reducescatter` all2all backend moves, and the baseline of the traffic ratios:
dispatch and combine each move R - 1 rows per token to other ranks, where `alltoall` moves one
per distinct remote rank among the token's top-k.

Both directions run as `all_to_all_single` with the row counts exchanged first (a host
sync, so no CUDA graphs), because gloo's `all_gather` and `reduce_scatter` need equal
sizes on every rank and data-parallel ranks hold different token counts: dispatch sends
the rank's rows once to every peer (an all-gather), combine sends each token owner its
rows' partial sums (a reduce-scatter). The bytes are those of the two collectives.

Worked example, R = 2, rank 0 holds tokens a, b, rank 1 holds token c:
    dispatch: both ranks receive [a, b, c] (rank 0's block, then rank 1's)
    combine:  rank 0 gets [a0, b0] from itself and [a1, b1] from rank 1 and sums them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_wideep.comm.base import Dispatcher, DispatchResult
from vllm_wideep.comm.exchange import (
    Exchange,
    combine_traffic,
    dispatch_traffic,
    exchange_rows,
    return_rows,
)
from vllm_wideep.comm.packing import RowFormat


@dataclass(frozen=True)
class _AllGatherHandle:
    exchange: Exchange  # send_splits = [M] * R, recv_splits = every rank's M
    num_tokens: int  # M


class AllGatherDispatcher(Dispatcher):
    def dispatch(self, hidden_states, topk_ids, topk_weights) -> DispatchResult:
        fmt = RowFormat.of(hidden_states, topk_ids, self.dispatch_dtype)
        num_tokens, device = hidden_states.shape[0], hidden_states.device
        rows = fmt.pack(hidden_states, topk_ids.to(torch.int32), topk_weights)
        send_counts = torch.full((self.num_ranks,), num_tokens, dtype=torch.int64, device=device)
        recv, exchange = exchange_rows(rows.repeat(self.num_ranks, 1), send_counts, self.group)
        self.traffic.add(dispatch_traffic(exchange, self.rank, self.num_ranks, fmt.nbytes, device))

        hidden, scales, global_ids, weights = fmt.unpack(recv, self.keep_fp8)
        first = self.rank * self.slots_per_rank
        mine = (global_ids >= first) & (global_ids < first + self.slots_per_rank)
        return DispatchResult(
            hidden_states=hidden,
            hidden_scales=scales,
            topk_ids=torch.where(mine, global_ids - first, -1).to(torch.int32),
            topk_weights=torch.where(mine, weights, 0.0),
            handle=_AllGatherHandle(exchange, num_tokens),
        )

    def combine(self, expert_output, handle: _AllGatherHandle) -> torch.Tensor:
        returned = return_rows(expert_output, handle.exchange, self.group)  # [R * M, H]
        self.traffic.add(combine_traffic(handle.exchange, self.rank, expert_output, calls=1))
        partial = returned.float().view(self.num_ranks, handle.num_tokens, expert_output.shape[1])
        return partial.sum(dim=0)
