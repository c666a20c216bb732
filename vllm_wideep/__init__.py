"""vllm_wideep: wide expert parallelism for vLLM.

Data path of one MoE layer (one package per stage):

    router (vLLM)   topk_ids [M, k] logical experts, topk_weights [M, k]
      -> eplb/      location: logical expert -> slot (the replica a key of the token picks)
      -> comm/      dispatch: each token to every EP rank that owns one of its slots
      -> kernels/   experts: grouped GEMM over this rank's slots
      -> comm/      combine: weighted expert outputs back to the token's rank, summed
    layer/ adapts the stages to vLLM's MoE kernel API; plugin/ is the vLLM glue.

Package layers, each importing only those below it (checked by `make lint`):
    plugin/ -> layer/ -> eplb/ -> comm/ -> kernels/ -> config.py
and beside them the user tools planner/, cli.py, tiny_models.py (no vLLM glue).

Glossary, used in every docstring (worked example: DeepSeek-V3, 256 routed experts,
top-8, EP = DP 16 x TP 2 = 32 ranks, one redundant slot per rank):
    M       tokens entering the layer on this rank
    M_recv  rows this rank's experts receive from dispatch
    H       hidden size (7168);  I  expert intermediate size (2048)
    k       experts per token (8)
    E       routed (logical) experts of the model (256)
    R       ranks of the EP group, EP size = DP x TP (32)
    S       slots per rank, E / R + redundant / R (256 / 32 + 1 = 9)
    N       physical slots of a layer, R x S (288); rank r owns slots r*S ... r*S + S - 1
    L       MoE layers
    slot    a place for one expert's weights on a rank (global slot ids as above)
    P       (token, destination rank) pairs of one dispatch (<= M * min(k, R))
    C       rows per peer block of the `capacity` exchange
    physical_to_logical (phy2log)  `[L, N]` expert in each slot
    logical_to_physical (log2phy)  `[L, E, max_replicas]` slots of each expert, -1 = none
    replica_count (logcnt)         `[L, E]` slots holding each expert

Importing this package does not import vLLM (the kernels run where vLLM is absent).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm_wideep.plugin.llm import LLM

__all__ = ["LLM", "register"]


def register() -> None:
    """The `vllm.general_plugins` entry point."""
    from vllm_wideep.plugin import register as _register

    _register()


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from vllm_wideep.plugin.llm import LLM

        return LLM
    raise AttributeError(name)
