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

from vllm_wideep.kernels.activation import SILU, SWIGLU_OAI, Activation
from vllm_wideep.kernels.fp8 import Fp8Experts
from vllm_wideep.kernels.torch_experts import WeightCache, moe_experts_torch, moe_experts_torch_fp8

__all__ = [
    "moe_experts",
    "BACKENDS",
    "Activation",
    "Fp8Experts",
    "SILU",
    "SWIGLU_OAI",
    "WeightCache",
]

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
    fp8: Fp8Experts | None = None,
    hidden_scales: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    activation: Activation = SILU,
) -> torch.Tensor:
    """Routed expert MLPs, summed per token with the router weights.

    hidden_states: `[M, H]` bf16, fp16 or fp32.
    w13: `[S, 2I, H]`, gate rows ``[:I]`` then up rows ``[I:]`` (vLLM's layout; alternating
        with ``activation.interleaved``), `[S, I, H]` for a non-gated activation; the dtype
        of hidden_states, or float8 e4m3 with ``fp8``.
    w2: `[S, H, I]`, as w13.
    topk_weights: `[M, k]` float.
    topk_ids: `[M, k]` int, local expert ids, `-1` = not on this rank (contributes nothing).
    backend: ``"triton"``, ``"torch"`` or ``"auto"`` (Triton on GPU, torch on CPU).
    cache: where the torch backend keeps transformed weights between calls; the caller
        clears it when it writes the weights or their scales (None: transform on every call).
    fp8: the block scales of float8 w13 and w2 (`fp8.Fp8Experts`, DeepSeek-V3's format) and
        the activation precision: "native" (W8A16) or "fp8" (W8A8, activations quantized
        per token and ``block[1]`` columns before each GEMM). None: unquantized weights.
    hidden_scales: `[M, ceil(H / block[1])]` float32, given when hidden_states are float8
        rows already quantized that way (an fp8 dispatch to W8A8 experts): they are used as
        they are, not quantized again. Needs ``fp8`` with activations "fp8".
    out_dtype: the result's dtype (default: that of hidden_states; required with
        ``hidden_scales``).
    w13_bias: `[S, 2I]` (`[S, I]` not gated), rows as in w13, or None; any float dtype,
        never quantized (also with ``fp8``).
    w2_bias: `[S, H]` or None, as w13_bias.
    activation: what joins the two GEMMs (`activation.Activation`); SiLU-and-mul by default.

    The Triton backend groups rows per expert in the batched layout (fixed capacity M per
    expert) for M <= ``grouped_gemm.BATCHED_MAX_TOKENS`` (64, decode) and in the contiguous
    layout above (prefill); both run without a host sync and can be captured in a CUDA graph.
    With ``fp8`` it reads the FP8 weights and scales directly (`grouped_gemm`); the torch
    backend dequantizes them once into ``cache`` (`torch_experts`).

    Returns `[M, H]` in ``out_dtype``::

        out[m] = sum_j topk_weights[m, j] * (w2[e] @ act(w13[e] @ hidden_states[m]
                                                         + w13_bias[e]) + w2_bias[e]),
        e = topk_ids[m, j], act = activation (gate/up split and formula in `activation`)

    with w13, w2 the dequantized weights under ``fp8`` (and, for W8A8, hidden_states and
    the activation's output each quantized and dequantized).
    """
    _check_shapes(hidden_states, w13, w2, topk_weights, topk_ids, w13_bias, w2_bias, activation)
    if fp8 is not None:
        fp8.check(w13, w2)
    elif w13.dtype == torch.float8_e4m3fn or w2.dtype == torch.float8_e4m3fn:
        raise ValueError(
            f"w13 {w13.dtype} and w2 {w2.dtype}: float8 weights need their block scales, "
            "pass fp8=Fp8Experts(w13_scale, w2_scale)"
        )
    if hidden_scales is not None and (
        fp8 is None
        or fp8.activations != "fp8"
        or hidden_states.dtype != torch.float8_e4m3fn
        or out_dtype is None
        or tuple(hidden_scales.shape)
        != (hidden_states.shape[0], -(-hidden_states.shape[1] // fp8.block[1]))
    ):
        raise ValueError(
            "hidden_scales go with float8 hidden_states [M, H], their scales "
            "[M, ceil(H / block[1])], fp8 experts with activations='fp8' and an out_dtype; "
            f"got hidden_states {hidden_states.dtype} {tuple(hidden_states.shape)}, "
            f"hidden_scales {tuple(hidden_scales.shape)}, fp8 {fp8}, out_dtype {out_dtype}"
        )
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}, expected one of {BACKENDS}")
    if backend == "auto":
        backend = "triton" if hidden_states.is_cuda else "torch"
    expert_math = dict(w13_bias=w13_bias, w2_bias=w2_bias, activation=activation)
    if backend == "torch":
        if fp8 is not None:
            return moe_experts_torch_fp8(
                hidden_states, w13, w2, topk_weights, topk_ids, fp8, cache, hidden_scales,
                out_dtype, **expert_math,
            )  # fmt: skip
        return moe_experts_torch(
            hidden_states, w13, w2, topk_weights, topk_ids, cache, **expert_math
        )
    if importlib.util.find_spec("triton") is None:
        raise ValueError("backend='triton' needs the triton package, which is not installed")
    from vllm_wideep.kernels.grouped_gemm import moe_experts_triton

    return moe_experts_triton(
        hidden_states,
        w13,
        w2,
        topk_weights,
        topk_ids,
        fp8=fp8,
        hidden_scales=hidden_scales,
        out_dtype=out_dtype,
        **expert_math,
    )


def _check_shapes(
    hidden_states, w13, w2, topk_weights, topk_ids, w13_bias, w2_bias, activation: Activation
) -> None:
    M, H = hidden_states.shape
    S, rows, w13_h = w13.shape
    inter = activation.intermediate_size(rows)
    w13_rows = "2I" if activation.gated else "I"
    if w13_h != H or (activation.gated and rows % 2) or tuple(w2.shape) != (S, H, inter):
        raise ValueError(
            f"expected w13 [S, {w13_rows}, H={H}] and w2 [S, H, I] for {activation}; got "
            f"w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}"
        )
    for name, bias, shape in (("w13_bias", w13_bias, (S, rows)), ("w2_bias", w2_bias, (S, H))):
        if bias is not None and (tuple(bias.shape) != shape or not bias.dtype.is_floating_point):
            raise ValueError(
                f"expected {name} {list(shape)} floating point; got {tuple(bias.shape)} "
                f"{bias.dtype}"
            )
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != M:
        raise ValueError(
            f"expected topk_ids and topk_weights [M={M}, k]; got {tuple(topk_ids.shape)} "
            f"and {tuple(topk_weights.shape)}"
        )
    if topk_ids.dtype.is_floating_point:
        raise ValueError(f"topk_ids must be an integer tensor, got {topk_ids.dtype}")
