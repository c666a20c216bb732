"""`a2a` backend: variable-size `all_to_all_single` over the EP group.

One collective exchanges the per-rank row counts (a host sync: the split sizes must be
known on the host), one moves the rows. Each row carries the token's hidden state and its
(slot, weight) list packed as bytes, so a dispatch is two collectives whatever the dtypes.
NCCL on GPU, gloo on CPU (gloo supports uneven splits for `all_to_all_single` only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from vllm_wideep.comm.base import Dispatcher, DispatchResult
from vllm_wideep.comm.routing import plan_routes


@dataclass(frozen=True)
class _A2AHandle:
    token_index: torch.Tensor  # [P] int64 source row of each sent pair
    send_splits: list[int]  # [R] pairs sent to each rank
    recv_splits: list[int]  # [R] rows received from each rank
    num_tokens: int  # M


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """`[P, n]` any dtype -> `[P, n * itemsize]` uint8 view."""
    return t.contiguous().view(torch.uint8).reshape(t.shape[0], t.shape[1] * t.element_size())


def _from_bytes(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return b.contiguous().view(dtype)


class AllToAllDispatcher(Dispatcher):
    def __init__(
        self,
        group: dist.ProcessGroup,
        experts_per_rank: int,
        num_ranks: int,
    ):
        self.group = group
        self.experts_per_rank = experts_per_rank
        self.num_ranks = num_ranks

    def dispatch(self, hidden_states, topk_ids, topk_weights) -> DispatchResult:
        plan = plan_routes(topk_ids, topk_weights, self.experts_per_rank, self.num_ranks)
        recv_counts = torch.empty_like(plan.send_counts)
        dist.all_to_all_single(recv_counts, plan.send_counts, group=self.group)
        send_splits = plan.send_counts.tolist()
        recv_splits = recv_counts.tolist()

        hidden_dim, top_k = hidden_states.shape[1], topk_ids.shape[1]
        send = torch.cat(
            [
                _as_bytes(hidden_states[plan.token_index]),
                _as_bytes(plan.local_ids),
                _as_bytes(plan.weights),
            ],
            dim=1,
        )
        recv = send.new_empty((sum(recv_splits), send.shape[1]))
        dist.all_to_all_single(
            recv,
            send,
            output_split_sizes=recv_splits,
            input_split_sizes=send_splits,
            group=self.group,
        )

        hidden_bytes = hidden_dim * hidden_states.element_size()
        ids_bytes = top_k * 4
        return DispatchResult(
            hidden_states=_from_bytes(recv[:, :hidden_bytes], hidden_states.dtype),
            topk_ids=_from_bytes(recv[:, hidden_bytes : hidden_bytes + ids_bytes], torch.int32),
            topk_weights=_from_bytes(recv[:, hidden_bytes + ids_bytes :], torch.float32),
            handle=_A2AHandle(plan.token_index, send_splits, recv_splits, hidden_states.shape[0]),
        )

    def combine(self, expert_output, handle: _A2AHandle) -> torch.Tensor:
        returned = expert_output.new_empty((len(handle.token_index), expert_output.shape[1]))
        dist.all_to_all_single(
            returned,
            expert_output.contiguous(),
            output_split_sizes=handle.send_splits,
            input_split_sizes=handle.recv_splits,
            group=self.group,
        )
        out = torch.zeros(
            (handle.num_tokens, expert_output.shape[1]),
            dtype=torch.float32,
            device=expert_output.device,
        )
        return out.index_add_(0, handle.token_index, returned.float())
