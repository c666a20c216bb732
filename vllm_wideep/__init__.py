"""vllm_wideep: wide expert parallelism for vLLM.

Data path of one MoE layer (one folder per stage):

    router (vLLM)  topk_ids [M, k], topk_weights [M, k]
      -> comm/      dispatch: each token to every EP rank that owns one of its experts
      -> kernels/   experts: grouped GEMM over this rank's experts
      -> comm/      combine: weighted expert outputs back to the token's rank, summed
    plugin/ holds the vLLM glue, layer/ adapts the stages to vLLM's MoE kernel API.

Glossary (worked example: DeepSeek-V3, 256 routed experts, top-8, EP = DP 8 x TP 2 = 16):
    M      tokens entering the layer on this rank
    H      hidden size (7168);  I  expert intermediate size (2048)
    k      experts per token (8)
    E      routed experts of the model (256)
    R      ranks of the EP group (16);  E_local = E / R = 16 experts per rank
    slot   a place for one expert's weights on a rank; slot ids are global:
           rank r owns slots r * E_local ... (r + 1) * E_local - 1
    P      (token, destination rank) pairs one dispatch sends (<= M * min(k, R))
    C      rows per peer block of the `capacity` exchange (fixed; default: the per-rank
           token budget, ceil(max_num_batched_tokens / TP))

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
