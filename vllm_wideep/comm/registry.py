"""Backend name -> Dispatcher class, checked against the config's `A2ABackend` choices."""

from __future__ import annotations

from typing import get_args

from vllm_wideep.comm.a2a import AllToAllDispatcher
from vllm_wideep.comm.allgather import AllGatherDispatcher
from vllm_wideep.comm.base import Dispatcher
from vllm_wideep.comm.capacity import CapacityDispatcher, capacity_rows
from vllm_wideep.plugin.config import A2ABackend, WideEPConfig

DISPATCHERS: dict[str, type[Dispatcher]] = {
    "a2a": AllToAllDispatcher,
    "capacity": CapacityDispatcher,
    "allgather": AllGatherDispatcher,
}
assert set(DISPATCHERS) == set(get_args(A2ABackend)), "registry and config disagree"


def make_dispatcher(
    config: WideEPConfig,
    *,
    group,
    experts_per_rank: int,
    num_ranks: int,
    max_tokens_per_rank: int,
    graph_tokens_per_rank: int = 0,
) -> Dispatcher:
    """The dispatcher `config.a2a_backend` names, for one MoE layer.

    max_tokens_per_rank: the most rows one rank dispatches in a call
        (ceil(max_num_batched_tokens / TP)); sizes the `capacity` buffers.
    graph_tokens_per_rank: the same bound for CUDA-graph batches (0 = no graphs).
    """
    common = {
        "group": group,
        "experts_per_rank": experts_per_rank,
        "num_ranks": num_ranks,
        "dispatch_dtype": config.dispatch_dtype,
    }
    if config.a2a_backend == "capacity":
        capacity = capacity_rows(config.capacity_tokens, max_tokens_per_rank, graph_tokens_per_rank)
        return CapacityDispatcher(
            **common, capacity=capacity, max_tokens_per_rank=max_tokens_per_rank
        )
    return DISPATCHERS[config.a2a_backend](**common)
