"""Grouped expert GEMMs in Triton: kernels, launcher and the float64 reference.

One token's path (shapes for DeepSeek-V3 at EP 8: H=7168, I=2048, E=32 local, k=8)::

    hidden_states [M, H] --route()--> rows grouped by expert (permute.py)
      --gate_up GEMM, + w13_bias and the activation in the epilogue--> act [num_rows, I]
      --down GEMM, + w2_bias in the epilogue--> down [num_rows, H]
      --combine: out[m] = sum_j topk_weights[m, j] * down[flat_to_row[m * k + j]]--> out [M, H]

Both GEMMs walk a tile schedule computed on the device from ``Routing`` (no host sync, grid
fixed by shapes only, so the whole pipeline is CUDA-graph capturable):

* contiguous (prefill): ``cdiv(M * k, BLOCK_M) + E`` M-tiles, an upper bound because each
  expert wastes at most one partial tile. Each program finds its expert by a prefix sum
  over per-expert tile counts, and tiles past the last expert exit at once.
* batched (decode): ``E * cdiv(capacity, BLOCK_M)`` M-tiles, expert = tile // tiles per
  expert; tiles past the expert's count exit at once. Empty experts cost one exit each.

The activation (``activation.Activation``) is compile-time: its function, gating, layout
and parameters are constexprs, so SiLU-and-mul without biases compiles to the same code as
before they existed. A gated program reads the gate and up weight rows of its BLOCK_N
output columns (rows ``n`` and ``I + n`` packed, ``2n`` and ``2n + 1`` interleaved) into two
accumulators; a non-gated one reads only the first.

The combine is a separate kernel: each output row sums its k rows in a fixed order, so
results are deterministic (no atomics) and every output row is written, dropped or not.

FP8 block-scaled weights (``fp8.Fp8Experts``, block (bn, bk) = (128, 128) in DeepSeek-V3)
take the same kernels with the constexpr ``W_FP8`` (and ``A_FP8``); the unquantized kernels
compile to the same code as without them. Each K tile lies inside one K block of scales
(BLOCK_K divides bk), and each column ``n`` of a tile reads its weight scale
``w_scale[e, n // bn, k0 // bk]``, so any BLOCK_N works with any bn:

* W8A16 (``activations="native"``): float8 weight tiles are converted to the activation
  dtype (exact: e4m3 fits in bf16, fp16 and fp32), and
  ``acc += (x_tile @ w_tile) * w_scale[n]`` in fp32.
* W8A8 (``activations="fp8"``): the input is quantized per token and bk columns with torch
  (``fp8.quantize_activations_fp8``) before the gate_up GEMM, and the activation's output
  (written in fp32) likewise before the down GEMM; the kernels read float8
  rows and their scales `[rows, ceil(K / bk)]`, and
  ``acc += (x_q_tile @ w_q_tile) * x_scale[m] * w_scale[n]`` in fp32 per K tile: FP8
  tensor-core dots, promoted to fp32 every K block (DeepSeek-V3's and DeepGEMM's numerics).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from vllm_wideep.kernels.activation import SILU, Activation
from vllm_wideep.kernels.fp8 import Fp8Experts, dequantize_block_fp8, quantize_activations_fp8
from vllm_wideep.kernels.permute import Routing, route
from vllm_wideep.kernels.tile_configs import get_config

# Up to this many tokens moe_experts() uses the batched layout with capacity = M: its
# E * M rows stay small (16K rows at E=256), and one M-tile per expert is the common case.
# Above it the contiguous layout's M * k rows are far fewer than E * M.
BATCHED_MAX_TOKENS = 64

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@functools.cache
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def _interpreting() -> bool:
    """Triton's CPU interpreter computes bf16/fp16 tl.dot wrongly; upcast operands there."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _swizzle(pid, num_tiles_m, num_tiles_n, GROUP_M: tl.constexpr):
    """GROUP_M M-tiles share each N-tile column while they run, so the expert weight tile
    stays in L2 (Triton matmul tutorial)."""
    tiles_per_group = GROUP_M * num_tiles_n
    group = pid // tiles_per_group
    first_m = group * GROUP_M
    group_size = tl.minimum(num_tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_group) % group_size
    pid_n = (pid % tiles_per_group) // group_size
    return pid_m, pid_n


@triton.jit
def _tile_rows(
    pid_m,
    expert_offsets_ptr,
    expert_counts_ptr,
    num_experts,
    capacity,
    BATCHED: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """(expert, first row, end row) of M-tile ``pid_m``; first >= end means nothing to do."""
    if BATCHED:
        tiles_per_expert = tl.cdiv(capacity, BLOCK_M)
        expert = pid_m // tiles_per_expert
        base = expert * capacity
        row_start = base + (pid_m % tiles_per_expert) * BLOCK_M
        row_end = base + tl.load(expert_counts_ptr + expert)
    else:
        e = tl.arange(0, E_POW2)
        in_range = e < num_experts
        starts = tl.load(expert_offsets_ptr + e, mask=in_range, other=0)
        ends = tl.load(expert_offsets_ptr + e + 1, mask=in_range, other=0)
        tiles = tl.cdiv(ends - starts, BLOCK_M)
        tiles_end = tl.cumsum(tiles, 0)
        # First expert whose tiles end after pid_m; num_experts when pid_m is past all.
        expert = tl.sum((tiles_end <= pid_m).to(tl.int32), 0)
        mine = e == expert
        first_tile = tl.sum(tl.where(mine, tiles_end - tiles, 0), 0)
        row_start = tl.sum(tl.where(mine, starts, 0), 0) + (pid_m - first_tile) * BLOCK_M
        row_end = tl.sum(tl.where(mine, ends, 0), 0)
    return expert, row_start, row_end


@triton.jit
def _scaled_dot(
    acc,
    a,
    w,
    a_scale_ptrs,
    a_mask,
    w_scale_ptrs,
    w_mask,
    A_FP8: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """``acc + (a @ w) * scales`` for one K tile of FP8 weights `w [BLOCK_K, BLOCK_N]`, whose
    columns read their scale at ``w_scale_ptrs`` `[BLOCK_N]`; with A_FP8 the rows of float8
    `a [BLOCK_M, BLOCK_K]` read theirs at ``a_scale_ptrs`` `[BLOCK_M]`."""
    if UPCAST:
        a, w = a.to(tl.float32), w.to(tl.float32)
    elif not A_FP8:
        w = w.to(a.dtype)  # exact: every e4m3 value is a bf16, fp16 and fp32 value
    part = tl.dot(a, w, input_precision=DOT_PRECISION)
    if A_FP8:
        part = part * tl.load(a_scale_ptrs, mask=a_mask, other=0.0)[:, None]
    return acc + part * tl.load(w_scale_ptrs, mask=w_mask, other=0.0)[None, :]


@triton.jit
def _activate(
    g,
    u,
    FN: tl.constexpr,
    GATED: tl.constexpr,
    ALPHA: tl.constexpr,
    BETA: tl.constexpr,
    LIMIT: tl.constexpr,
):
    """``activation.Activation`` on fp32 gate and up tiles (u unused when not GATED);
    LIMIT 0.0 = no clamp (``Activation`` checks that a limit is positive)."""
    if LIMIT > 0.0 and FN != "swiglustep":
        g = tl.minimum(g, LIMIT)
    if FN == "silu":
        act = g * tl.sigmoid(ALPHA * g)
    elif FN == "swiglustep":
        act = tl.minimum(g * tl.sigmoid(g), LIMIT)
    elif FN == "gelu":
        act = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    elif FN == "gelu_tanh":
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)  # sqrt(2 / pi) * (...)
        act = g * tl.sigmoid(2.0 * inner)  # (1 + tanh(z)) / 2 = sigmoid(2z)
    else:  # relu2
        act = tl.maximum(g, 0.0)
        act = act * act
    if GATED:
        if LIMIT > 0.0:
            u = tl.minimum(tl.maximum(u, -LIMIT), LIMIT)
        act = act * (u + BETA)
    return act


@triton.jit
def _gate_up_act_kernel(
    x_ptr,  # [M, H] activations (float8 with A_FP8)
    w13_ptr,  # [E, 2I, H] ([E, I, H] not GATED; float8 with W_FP8)
    act_ptr,  # [num_rows, I] out: the activation (fp32 with A_FP8)
    x_scale_ptr,  # [M, cdiv(H, bk)] float32 (A_FP8 only)
    w_scale_ptr,  # [E, cdiv(2I, bn), cdiv(H, bk)] float32 (W_FP8 only)
    b13_ptr,  # [E, 2I] ([E, I] not GATED; HAS_BIAS only)
    row_token_ptr,  # [num_rows] int32
    expert_offsets_ptr,
    expert_counts_ptr,
    num_experts,
    capacity,
    num_tiles_m,
    N,  # I
    K,  # H
    stride_xm,
    stride_xk,
    stride_we,
    stride_wn,
    stride_wk,
    stride_am,
    stride_an,
    stride_xsm,
    stride_xsk,
    stride_wse,
    stride_wsn,
    stride_wsk,
    stride_be,
    stride_bn,
    BATCHED: tl.constexpr,
    E_POW2: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    W_FP8: tl.constexpr,
    A_FP8: tl.constexpr,
    SCALE_BLOCK_N: tl.constexpr,
    SCALE_BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FN: tl.constexpr,
    GATED: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    ALPHA: tl.constexpr,
    BETA: tl.constexpr,
    LIMIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _swizzle(tl.program_id(0), num_tiles_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    expert, row_start, row_end = _tile_rows(
        pid_m, expert_offsets_ptr, expert_counts_ptr, num_experts, capacity,
        BATCHED, E_POW2, BLOCK_M,
    )  # fmt: skip
    if row_start >= row_end:
        return
    expert = expert.to(tl.int64)
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    tokens = tl.load(row_token_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tokens[:, None] * stride_xm + offs_k[None, :] * stride_xk
    # The w13 rows of output column n: gate n and up I + n (packed), gate 2n and up 2n + 1
    # (interleaved), gate n only (not gated). Read as [BLOCK_K, BLOCK_N] tiles.
    if INTERLEAVED:
        gate_rows = 2 * offs_n
        up_rows = gate_rows + 1
    else:
        gate_rows = offs_n
        up_rows = N + offs_n
    w_ptrs = w13_ptr + expert * stride_we + offs_k[:, None] * stride_wk
    g_ptrs = w_ptrs + gate_rows[None, :] * stride_wn
    u_ptrs = w_ptrs + up_rows[None, :] * stride_wn
    if W_FP8:  # scale rows of the gate and up weight rows
        ws_ptrs = w_scale_ptr + expert * stride_wse
        gs_ptrs = ws_ptrs + (gate_rows // SCALE_BLOCK_N) * stride_wsn
        us_ptrs = ws_ptrs + (up_rows // SCALE_BLOCK_N) * stride_wsn
        xs_ptrs = x_scale_ptr + tokens * stride_xsm
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & n_mask[None, :]
        g = tl.load(g_ptrs, mask=w_mask, other=0.0)
        if W_FP8:
            kb = k0 // SCALE_BLOCK_K
            xs = xs_ptrs + kb * stride_xsk
            acc_g = _scaled_dot(acc_g, a, g, xs, row_mask, gs_ptrs + kb * stride_wsk, n_mask,
                                A_FP8, UPCAST, DOT_PRECISION)  # fmt: skip
            if GATED:
                u = tl.load(u_ptrs, mask=w_mask, other=0.0)
                acc_u = _scaled_dot(acc_u, a, u, xs, row_mask, us_ptrs + kb * stride_wsk,
                                    n_mask, A_FP8, UPCAST, DOT_PRECISION)  # fmt: skip
        else:
            if UPCAST:
                a, g = a.to(tl.float32), g.to(tl.float32)
            acc_g = tl.dot(a, g, acc_g, input_precision=DOT_PRECISION)
            if GATED:
                u = tl.load(u_ptrs, mask=w_mask, other=0.0)
                if UPCAST:
                    u = u.to(tl.float32)
                acc_u = tl.dot(a, u, acc_u, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_xk
        g_ptrs += BLOCK_K * stride_wk
        u_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        b_ptrs = b13_ptr + expert * stride_be
        acc_g += tl.load(b_ptrs + gate_rows * stride_bn, mask=n_mask, other=0.0).to(tl.float32)
        if GATED:
            acc_u += tl.load(b_ptrs + up_rows * stride_bn, mask=n_mask, other=0.0).to(tl.float32)
    act = _activate(acc_g, acc_u, FN, GATED, ALPHA, BETA, LIMIT)
    out_ptrs = act_ptr + rows.to(tl.int64)[:, None] * stride_am + offs_n[None, :] * stride_an
    tl.store(out_ptrs, act.to(act_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _down_kernel(
    act_ptr,  # [num_rows, I] (float8 with A_FP8)
    w2_ptr,  # [E, H, I] (float8 with W_FP8)
    down_ptr,  # [num_rows, H] out
    act_scale_ptr,  # [num_rows, cdiv(I, bk)] float32 (A_FP8 only)
    w_scale_ptr,  # [E, cdiv(H, bn), cdiv(I, bk)] float32 (W_FP8 only)
    b2_ptr,  # [E, H] (HAS_BIAS only)
    expert_offsets_ptr,
    expert_counts_ptr,
    num_experts,
    capacity,
    num_tiles_m,
    N,  # H
    K,  # I
    stride_am,
    stride_ak,
    stride_we,
    stride_wn,
    stride_wk,
    stride_dm,
    stride_dn,
    stride_asm,
    stride_ask,
    stride_wse,
    stride_wsn,
    stride_wsk,
    stride_be,
    stride_bn,
    BATCHED: tl.constexpr,
    E_POW2: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    W_FP8: tl.constexpr,
    A_FP8: tl.constexpr,
    SCALE_BLOCK_N: tl.constexpr,
    SCALE_BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _swizzle(tl.program_id(0), num_tiles_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    expert, row_start, row_end = _tile_rows(
        pid_m, expert_offsets_ptr, expert_counts_ptr, num_experts, capacity,
        BATCHED, E_POW2, BLOCK_M,
    )  # fmt: skip
    if row_start >= row_end:
        return
    rows = (row_start + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < row_end
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = (
        w2_ptr
        + expert.to(tl.int64) * stride_we
        + offs_n[None, :] * stride_wn
        + offs_k[:, None] * stride_wk
    )
    if W_FP8:
        ws_ptrs = (
            w_scale_ptr + expert.to(tl.int64) * stride_wse + (offs_n // SCALE_BLOCK_N) * stride_wsn
        )
        as_ptrs = act_scale_ptr + rows * stride_asm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if W_FP8:
            kb = k0 // SCALE_BLOCK_K
            acc = _scaled_dot(acc, a, w, as_ptrs + kb * stride_ask, row_mask,
                              ws_ptrs + kb * stride_wsk, n_mask,
                              A_FP8, UPCAST, DOT_PRECISION)  # fmt: skip
        else:
            if UPCAST:
                a, w = a.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        bias = tl.load(b2_ptr + expert.to(tl.int64) * stride_be + offs_n * stride_bn, mask=n_mask,
                       other=0.0)  # fmt: skip
        acc += bias.to(tl.float32)[None, :]
    out_ptrs = down_ptr + rows[:, None] * stride_dm + offs_n[None, :] * stride_dn
    tl.store(out_ptrs, acc.to(down_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _combine_kernel(
    down_ptr,  # [num_rows, H]
    flat_to_row_ptr,  # [M * k] int32, -1 = dropped
    topk_weights_ptr,  # [M, k]
    out_ptr,  # [M, H]
    H,
    stride_dm,
    stride_wm,
    stride_wk,
    stride_om,
    TOPK: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    m = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in tl.static_range(TOPK):
        row = tl.load(flat_to_row_ptr + m * TOPK + j)
        weight = tl.load(topk_weights_ptr + m * stride_wm + j * stride_wk).to(tl.float32)
        # A vector mask: the interpreter rejects a scalar one broadcast into it.
        keep = h_mask & (tl.zeros_like(offs) + row >= 0)
        vals = tl.load(
            down_ptr + tl.maximum(row, 0).to(tl.int64) * stride_dm + offs,
            mask=keep,
            other=0.0,
        )
        acc += weight * vals.to(tl.float32)
    tl.store(
        out_ptr + m.to(tl.int64) * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=h_mask
    )


def _launch_gemms(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    routing: Routing,
    config: dict,
    fp8: Fp8Experts | None = None,
    hidden_scales: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    activation: Activation = SILU,
) -> torch.Tensor:
    """Shared launch setup for both GEMMs; returns down `[num_rows, H]` in ``out_dtype``
    (default: the dtype of hidden_states)."""
    H = hidden_states.shape[1]
    E = w13.shape[0]
    inter = w2.shape[2]
    block_m = config["BLOCK_M"]
    if routing.capacity is None:
        num_tiles_m = triton.cdiv(routing.num_rows, block_m) + E
        capacity = 0
    else:
        num_tiles_m = E * triton.cdiv(routing.capacity, block_m)
        capacity = routing.capacity
    a_fp8 = fp8 is not None and fp8.activations == "fp8"
    block = (1, 1) if fp8 is None else fp8.block
    w13_scale, w2_scale = (None, None) if fp8 is None else (fp8.w13_scale, fp8.w2_scale)
    x, x_scale = hidden_states, hidden_scales  # already quantized by an fp8 dispatch
    if a_fp8 and hidden_scales is None:
        x, x_scale = quantize_activations_fp8(hidden_states, block[1])
    out_dtype = out_dtype or hidden_states.dtype
    common = dict(
        BATCHED=routing.capacity is not None,
        # At least 16 lanes: a 1-wide arange is legal but an unusual layout for the compiler.
        E_POW2=max(16, triton.next_power_of_2(E)),
        UPCAST=_interpreting(),
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        W_FP8=fp8 is not None,
        A_FP8=a_fp8,
        SCALE_BLOCK_N=block[0],
        SCALE_BLOCK_K=block[1],
        BLOCK_M=block_m,
    )
    # W8A8 quantizes the intermediate from fp32, as DeepGEMM's callers do from the epilogue.
    act_dtype = torch.float32 if a_fp8 else out_dtype
    act = torch.empty(routing.num_rows, inter, dtype=act_dtype, device=hidden_states.device)
    cfg = _gemm_config(config["gate_up"], fp8)
    grid = (num_tiles_m * triton.cdiv(inter, cfg["BLOCK_N"]),)
    _gate_up_act_kernel[grid](
        x, w13, act, _scale_ptr(x_scale, x), _scale_ptr(w13_scale, w13),
        _scale_ptr(w13_bias, w13), routing.row_token, routing.expert_offsets,
        routing.expert_counts, E, capacity, num_tiles_m, inter, H,
        x.stride(0), x.stride(1),
        w13.stride(0), w13.stride(1), w13.stride(2),
        act.stride(0), act.stride(1),
        *_strides(x_scale, 2), *_strides(w13_scale, 3), *_strides(w13_bias, 2),
        HAS_BIAS=w13_bias is not None,
        FN=activation.fn,
        GATED=activation.gated,
        INTERLEAVED=activation.interleaved,
        ALPHA=float(activation.alpha),
        BETA=float(activation.beta),
        LIMIT=0.0 if activation.limit is None else float(activation.limit),
        **common, **cfg,
    )  # fmt: skip
    act_scale = None
    if a_fp8:
        act, act_scale = quantize_activations_fp8(act, block[1])
    down = torch.empty(routing.num_rows, H, dtype=out_dtype, device=hidden_states.device)
    cfg = _gemm_config(config["down"], fp8)
    grid = (num_tiles_m * triton.cdiv(H, cfg["BLOCK_N"]),)
    _down_kernel[grid](
        act, w2, down, _scale_ptr(act_scale, act), _scale_ptr(w2_scale, w2),
        _scale_ptr(w2_bias, w2), routing.expert_offsets, routing.expert_counts,
        E, capacity, num_tiles_m, H, inter,
        act.stride(0), act.stride(1),
        w2.stride(0), w2.stride(1), w2.stride(2),
        down.stride(0), down.stride(1),
        *_strides(act_scale, 2), *_strides(w2_scale, 3), *_strides(w2_bias, 2),
        HAS_BIAS=w2_bias is not None,
        **common, **cfg,
    )  # fmt: skip
    return down


def _scale_ptr(scale: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    """A scale (or bias) pointer argument: the placeholder where the GEMM has none (never
    read)."""
    return placeholder if scale is None else scale


def _strides(scale: torch.Tensor | None, ndim: int) -> tuple[int, ...]:
    """A scale (or bias) tensor's strides, zeros where the GEMM has none."""
    return (0,) * ndim if scale is None else scale.stride()


def _gemm_config(cfg: dict, fp8: Fp8Experts | None) -> dict:
    """The tile config for one GEMM; with FP8, BLOCK_K inside one K block of scales: the
    tuned BLOCK_K, at most the largest power of two dividing bk, at least the K of one
    tensor-core dot (32 for float8 operands, else 16). ``_check_fp8_block`` checked that
    this divides bk."""
    if fp8 is None:
        return cfg
    block_k = min(cfg["BLOCK_K"], _pow2_factor(fp8.block[1]))
    return {**cfg, "BLOCK_K": max(block_k, _min_block_k(fp8))}


def _pow2_factor(n: int) -> int:
    """The largest power of two dividing n: 128 -> 128, 96 -> 32."""
    return n & -n


def _min_block_k(fp8: Fp8Experts) -> int:
    return 32 if fp8.activations == "fp8" else 16


def _check_fp8_block(fp8: Fp8Experts, device: torch.device) -> None:
    """The Triton kernels' limits on FP8 experts (ValueError naming them)."""
    bk = fp8.block[1]
    if _pow2_factor(bk) < _min_block_k(fp8):
        raise ValueError(
            f"block {fp8.block}: the Triton backend tiles K inside one scale block, so a "
            f"power of two >= {_min_block_k(fp8)} must divide bk={bk} for "
            f"activations={fp8.activations!r}; use the torch backend for this block"
        )
    if fp8.activations == "fp8" and device.type == "cuda" and not _interpreting():
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            raise ValueError(
                f"activations='fp8' needs FP8 tensor cores (compute capability 8.9+, "
                f"Ada/Hopper); this GPU is {capability}: use activations='native'"
            )


def moe_experts_triton(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    layout: str = "auto",
    config: dict | None = None,
    out: torch.Tensor | None = None,
    fp8: Fp8Experts | None = None,
    hidden_scales: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    activation: Activation = SILU,
) -> torch.Tensor:
    """Triton MoE experts; see ``vllm_wideep.kernels.moe_experts`` for the contract
    (``hidden_scales``, ``out_dtype``, the biases and ``activation`` too).

    layout: ``"contiguous"``, ``"batched"`` or ``"auto"`` (batched up to BATCHED_MAX_TOKENS).
    config: tile config as in ``tile_configs``; ``None`` looks it up for this GPU and shape
        (FP8 uses the same table, BLOCK_K capped at the scale block: ``_gemm_config``).
    out: `[M, H]` to write into (every row is written); allocated when ``None``.
    fp8: scales of float8 w13 and w2 and the activation precision (module docstring).
    """
    M, H = hidden_states.shape
    E = w13.shape[0]
    k = topk_ids.shape[1]
    if hidden_states.dtype not in _DTYPES and hidden_scales is None:
        raise ValueError(f"hidden_states dtype {hidden_states.dtype} not in {_DTYPES}")
    if fp8 is not None:
        fp8.check(w13, w2)
        _check_fp8_block(fp8, hidden_states.device)
    elif not w13.dtype == w2.dtype == hidden_states.dtype:
        raise ValueError(
            f"hidden_states, w13 and w2 must share a dtype; got {hidden_states.dtype}, "
            f"{w13.dtype}, {w2.dtype}"
        )
    if layout == "auto":
        layout = "batched" if M <= BATCHED_MAX_TOKENS else "contiguous"
    if layout not in ("contiguous", "batched"):
        raise ValueError(f"layout={layout!r}, expected 'contiguous', 'batched' or 'auto'")
    out_dtype = out_dtype or hidden_states.dtype
    if out is None:
        out = torch.empty(M, H, dtype=out_dtype, device=hidden_states.device)
    if M == 0:
        return out
    if config is None:
        # Rows per expert counts dropped pairs too: an upper bound, known without a sync.
        device_name = _device_name(hidden_states.device) if hidden_states.is_cuda else None
        config = get_config(M * k / E, H, w2.shape[2], device_name)
    routing = route(topk_ids, E, capacity=M if layout == "batched" else None)
    down = _launch_gemms(
        hidden_states, w13, w2, routing, config, fp8, hidden_scales, out_dtype,
        w13_bias, w2_bias, activation,
    )  # fmt: skip
    block_h = min(1024, triton.next_power_of_2(H))
    _combine_kernel[(M, triton.cdiv(H, block_h))](
        down, routing.flat_to_row, topk_weights, out,
        H, down.stride(0), topk_weights.stride(0), topk_weights.stride(1), out.stride(0),
        TOPK=k, BLOCK_H=block_h,
    )  # fmt: skip
    return out


def reference_moe_experts(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    fp8: Fp8Experts | None = None,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    activation: Activation = SILU,
) -> torch.Tensor:
    """Deliberately simple float64 loop over (token, slot); returns `[M, H]` float64.

    With ``fp8``: float8 weights dequantized in float64; for W8A8 also each input row and
    each activation output, quantized per ``bk`` columns (``quantize_activations_fp8``)
    and dequantized in float64."""

    def quantized(v: torch.Tensor) -> torch.Tensor:
        if fp8 is None or fp8.activations == "native":
            return v
        q, scale = quantize_activations_fp8(v[None], fp8.block[1])
        return dequantize_block_fp8(q, scale, (1, fp8.block[1]), torch.float64)[0]

    if fp8 is not None:
        w13 = dequantize_block_fp8(w13, fp8.w13_scale, fp8.block, torch.float64)
        w2 = dequantize_block_fp8(w2, fp8.w2_scale, fp8.block, torch.float64)
    x, w13, w2 = hidden_states.double(), w13.double(), w2.double()
    b13 = torch.zeros(w13.shape[:2], dtype=torch.float64) if w13_bias is None else w13_bias
    b2 = torch.zeros(w2.shape[:2], dtype=torch.float64) if w2_bias is None else w2_bias
    b13, b2 = b13.double().to(x.device), b2.double().to(x.device)
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for m in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[m, j])
            if e < 0:
                continue
            gate_up = w13[e] @ quantized(x[m]) + b13[e]
            act = activation(gate_up[None])[0]
            out[m] += float(topk_weights[m, j]) * (w2[e] @ quantized(act) + b2[e])
    return out
