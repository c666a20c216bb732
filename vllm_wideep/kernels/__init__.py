"""Expert computation for wide EP: ``moe_experts`` and its two backends.

Imports neither vLLM nor, until the Triton backend is first used, Triton: this package
must load on a GPU box without vLLM and on a CPU box without Triton.

Symbols as in the package glossary (`vllm_wideep/__init__.py`): ``M`` rows on this rank,
``H`` hidden size, ``I`` expert intermediate size, ``S`` slots (local experts) of this rank,
``k`` top-k. DeepSeek-V3 at EP 8: H=7168, I=2048, S=256/8=32, k=8.
"""

from __future__ import annotations

import importlib.util

import torch

from vllm_wideep.kernels.torch_experts import WeightCache, moe_experts_torch

__all__ = ["moe_experts", "BACKENDS", "WeightCache"]

BACKENDS = ("auto", "triton", "torch")


def moe_experts(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    backend: str = "auto",
    cache: WeightCache | None = None,
) -> torch.Tensor:
    """Routed expert MLPs with SiLU gating, summed per token with the router weights.

    hidden_states: `[M, H]` bf16, fp16 or fp32.
    w13: `[S, 2I, H]`, gate rows ``[:I]`` then up rows ``[I:]`` (vLLM's layout).
    w2: `[S, H, I]`.
    topk_weights: `[M, k]` float.
    topk_ids: `[M, k]` int, local expert ids, `-1` = not on this rank (contributes nothing).
    backend: ``"triton"``, ``"torch"`` or ``"auto"`` (Triton on GPU, torch on CPU).
    cache: where the torch backend keeps transformed weights between calls; the caller
        clears it when it writes the weights (None: transform on every call).

    The Triton backend groups rows per expert in the batched layout (fixed capacity M per
    expert) for M <= ``grouped_gemm.BATCHED_MAX_TOKENS`` (64, decode) and in the contiguous
    layout above (prefill); both run without a host sync and can be captured in a CUDA graph.

    Returns `[M, H]` in the dtype of hidden_states::

        out[m] = sum_j topk_weights[m, j] * w2[e] @ (silu(g) * u),
        e = topk_ids[m, j], (g, u) = halves of w13[e] @ hidden_states[m]
    """
    _check_shapes(hidden_states, w13, w2, topk_weights, topk_ids)
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}, expected one of {BACKENDS}")
    if backend == "auto":
        backend = "triton" if hidden_states.is_cuda else "torch"
    if backend == "torch":
        return moe_experts_torch(hidden_states, w13, w2, topk_weights, topk_ids, cache)
    if importlib.util.find_spec("triton") is None:
        raise ValueError("backend='triton' needs the triton package, which is not installed")
    from vllm_wideep.kernels.grouped_gemm import moe_experts_triton

    return moe_experts_triton(hidden_states, w13, w2, topk_weights, topk_ids)


def _check_shapes(hidden_states, w13, w2, topk_weights, topk_ids) -> None:
    M, H = hidden_states.shape
    S, two_i, w13_h = w13.shape
    if w13_h != H or two_i % 2 or tuple(w2.shape) != (S, H, two_i // 2):
        raise ValueError(
            f"expected w13 [S, 2I, H={H}] and w2 [S, H, I]; got w13 {tuple(w13.shape)}, "
            f"w2 {tuple(w2.shape)}"
        )
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != M:
        raise ValueError(
            f"expected topk_ids and topk_weights [M={M}, k]; got {tuple(topk_ids.shape)} "
            f"and {tuple(topk_weights.shape)}"
        )
    if topk_ids.dtype.is_floating_point:
        raise ValueError(f"topk_ids must be an integer tensor, got {topk_ids.dtype}")
