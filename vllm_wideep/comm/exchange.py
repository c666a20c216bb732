"""The exchange primitives every token-exchange backend is built from.

`exchange_rows` sends rows grouped by destination rank with one variable-size
`all_to_all_single` (the row counts go first, read on the host: a sync), and
`return_rows` sends rows back the way they came, and `add_rows` adds the returned rows
into their tokens in a fixed order. `dispatch_traffic` and `combine_traffic` count the bytes
of those calls that crossed to other ranks (`TrafficCounters`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from vllm_wideep.comm.base import TrafficCounters


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


def add_rows(out: torch.Tensor, token_index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`out[token_index[p]] += rows[p]` for p = 0, 1, ... in that order, on every device;
    returns `out`.

    out: `[M, H]` float32; token_index: `[P]` int64; rows: `[P, H]` float32. Callers list a
    token's rows by source rank, so its sum is always taken in rank order, whatever the
    batch, the thread count or the order in which peers' rows arrived
    (docs/token-exchange.md#determinism). CPU `index_add_` adds the rows one after another
    in index order; CUDA's uses atomics, whose order varies from run to run, where
    `index_put_(accumulate=True)` sorts the indices stably and adds each token's rows in
    one thread, in order.
    """
    if out.device.type == "cuda":
        return out.index_put_((token_index,), rows, accumulate=True)
    return out.index_add_(0, token_index, rows)


def dispatch_traffic(
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


def combine_traffic(
    exchange: Exchange, rank: int, expert_output: torch.Tensor, calls: int = 0
) -> torch.Tensor:
    """Combine bytes of `return_rows(expert_output, exchange)`: the rows a rank received
    at dispatch go back, the rows it sent come home. `calls` counts the layer call."""
    received, sent = exchange.remote(rank)
    row_bytes = expert_output.shape[1] * expert_output.element_size()
    return TrafficCounters.increment(
        expert_output.device,
        calls=calls,
        combine_sent_bytes=sent * row_bytes,
        combine_recv_bytes=received * row_bytes,
    )
