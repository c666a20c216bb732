"""Exchange name -> Dispatcher class, checked against the config's `TokenExchange` choices."""

from __future__ import annotations

from typing import get_args

from vllm_wideep.comm.allgather import AllGatherDispatcher
from vllm_wideep.comm.alltoall import AllToAllDispatcher
from vllm_wideep.comm.base import Dispatcher
from vllm_wideep.comm.capacity import CapacityDispatcher, capacity_rows
from vllm_wideep.config import DispatchDtype, TokenExchange

DISPATCHERS: dict[str, type[Dispatcher]] = {
    "alltoall": AllToAllDispatcher,
    "capacity": CapacityDispatcher,
    "allgather": AllGatherDispatcher,
}
assert set(DISPATCHERS) == set(get_args(TokenExchange)), "registry and config disagree"


def make_dispatcher(
    exchange: TokenExchange,
    *,
    group,
    slots_per_rank: int,
    num_ranks: int,
    dispatch_dtype: DispatchDtype = "auto",
    keep_fp8: bool = False,
    capacity_tokens: int = 0,
    max_tokens_per_rank: int = 1,
    graph_tokens_per_rank: int = 0,
) -> Dispatcher:
    """The dispatcher of the exchange named `exchange`, for one MoE layer.

    keep_fp8: with fp8 dispatch, deliver float8 rows and their scales (FP8 experts).
    capacity_tokens: rows per peer block asked for (`capacity` only; 0 = never overflow).
    max_tokens_per_rank: the most rows one rank dispatches in a call
        (ceil(max_num_batched_tokens / TP)); sizes the `capacity` buffers.
    graph_tokens_per_rank: the same bound for CUDA-graph batches (0 = no graphs).
    """
    common = {
        "group": group,
        "slots_per_rank": slots_per_rank,
        "num_ranks": num_ranks,
        "dispatch_dtype": dispatch_dtype,
        "keep_fp8": keep_fp8,
    }
    if exchange == "capacity":
        capacity = capacity_rows(capacity_tokens, max_tokens_per_rank, graph_tokens_per_rank)
        return CapacityDispatcher(
            **common, capacity=capacity, max_tokens_per_rank=max_tokens_per_rank
        )
    return DISPATCHERS[exchange](**common)
