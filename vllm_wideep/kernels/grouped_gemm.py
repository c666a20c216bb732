"""Grouped expert GEMMs in Triton: kernels, launcher and the float64 reference.

One token's path (shapes for DeepSeek-V3 at EP 8: H=7168, I=2048, E=32 local, k=8)::

    hidden_states [M, H] --route()--> rows grouped by expert (permute.py)
      --gate_up GEMM, SiLU(g) * u in the epilogue--> act [num_rows, I]
      --down GEMM--> down [num_rows, H]
      --combine: out[m] = sum_j topk_weights[m, j] * down[flat_to_row[m * k + j]]--> out [M, H]

Both GEMMs walk a tile schedule computed on the device from ``Routing`` (no host sync, grid
fixed by shapes only, so the whole pipeline is CUDA-graph capturable):

* contiguous (prefill): ``cdiv(M * k, BLOCK_M) + E`` M-tiles, an upper bound because each
  expert wastes at most one partial tile. Each program finds its expert by a prefix sum
  over per-expert tile counts, and tiles past the last expert exit at once.
* batched (decode): ``E * cdiv(capacity, BLOCK_M)`` M-tiles, expert = tile // tiles per
  expert; tiles past the expert's count exit at once. Empty experts cost one exit each.

The combine is a separate kernel: each output row sums its k rows in a fixed order, so
results are deterministic (no atomics) and every output row is written, dropped or not.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

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
def _gate_up_silu_kernel(
    x_ptr,  # [M, H] activations
    w13_ptr,  # [E, 2I, H]
    act_ptr,  # [num_rows, I] out: silu(gate) * up
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
    BATCHED: tl.constexpr,
    E_POW2: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
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
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    tokens = tl.load(row_token_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tokens[:, None] * stride_xm + offs_k[None, :] * stride_xk
    # Gate rows are w13[e, :I], up rows w13[e, I:]; read both as [BLOCK_K, BLOCK_N] tiles.
    g_ptrs = (
        w13_ptr
        + expert.to(tl.int64) * stride_we
        + offs_n[None, :] * stride_wn
        + offs_k[:, None] * stride_wk
    )
    u_ptrs = g_ptrs + N * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & n_mask[None, :]
        g = tl.load(g_ptrs, mask=w_mask, other=0.0)
        u = tl.load(u_ptrs, mask=w_mask, other=0.0)
        if UPCAST:
            a, g, u = a.to(tl.float32), g.to(tl.float32), u.to(tl.float32)
        acc_g = tl.dot(a, g, acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(a, u, acc_u, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_xk
        g_ptrs += BLOCK_K * stride_wk
        u_ptrs += BLOCK_K * stride_wk
    act = acc_g * tl.sigmoid(acc_g) * acc_u
    out_ptrs = act_ptr + rows.to(tl.int64)[:, None] * stride_am + offs_n[None, :] * stride_an
    tl.store(out_ptrs, act.to(act_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _down_kernel(
    act_ptr,  # [num_rows, I]
    w2_ptr,  # [E, H, I]
    down_ptr,  # [num_rows, H] out
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
    BATCHED: tl.constexpr,
    E_POW2: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
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
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
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
) -> torch.Tensor:
    """Shared launch setup for both GEMMs; returns down `[num_rows, H]`."""
    H = hidden_states.shape[1]
    E, two_i, _ = w13.shape
    inter = two_i // 2
    block_m = config["BLOCK_M"]
    if routing.capacity is None:
        num_tiles_m = triton.cdiv(routing.num_rows, block_m) + E
        capacity = 0
    else:
        num_tiles_m = E * triton.cdiv(routing.capacity, block_m)
        capacity = routing.capacity
    common = dict(
        BATCHED=routing.capacity is not None,
        # At least 16 lanes: a 1-wide arange is legal but an unusual layout for the compiler.
        E_POW2=max(16, triton.next_power_of_2(E)),
        UPCAST=_interpreting(),
        DOT_PRECISION="ieee" if hidden_states.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m,
    )
    act = torch.empty(
        routing.num_rows, inter, dtype=hidden_states.dtype, device=hidden_states.device
    )
    cfg = config["gate_up"]
    grid = (num_tiles_m * triton.cdiv(inter, cfg["BLOCK_N"]),)
    _gate_up_silu_kernel[grid](
        hidden_states, w13, act, routing.row_token, routing.expert_offsets, routing.expert_counts,
        E, capacity, num_tiles_m, inter, H,
        hidden_states.stride(0), hidden_states.stride(1),
        w13.stride(0), w13.stride(1), w13.stride(2),
        act.stride(0), act.stride(1),
        **common, **cfg,
    )  # fmt: skip
    down = torch.empty(routing.num_rows, H, dtype=hidden_states.dtype, device=hidden_states.device)
    cfg = config["down"]
    grid = (num_tiles_m * triton.cdiv(H, cfg["BLOCK_N"]),)
    _down_kernel[grid](
        act, w2, down, routing.expert_offsets, routing.expert_counts,
        E, capacity, num_tiles_m, H, inter,
        act.stride(0), act.stride(1),
        w2.stride(0), w2.stride(1), w2.stride(2),
        down.stride(0), down.stride(1),
        **common, **cfg,
    )  # fmt: skip
    return down


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
) -> torch.Tensor:
    """Triton MoE experts; see ``vllm_wideep.kernels.moe_experts`` for the contract.

    layout: ``"contiguous"``, ``"batched"`` or ``"auto"`` (batched up to BATCHED_MAX_TOKENS).
    config: tile config as in ``tile_configs``; ``None`` looks it up for this GPU and shape.
    out: `[M, H]` to write into (every row is written); allocated when ``None``.
    """
    M, H = hidden_states.shape
    E, two_i, _ = w13.shape
    k = topk_ids.shape[1]
    if hidden_states.dtype not in _DTYPES:
        raise ValueError(f"hidden_states dtype {hidden_states.dtype} not in {_DTYPES}")
    if not w13.dtype == w2.dtype == hidden_states.dtype:
        raise ValueError(
            f"hidden_states, w13 and w2 must share a dtype; got {hidden_states.dtype}, "
            f"{w13.dtype}, {w2.dtype}"
        )
    if layout == "auto":
        layout = "batched" if M <= BATCHED_MAX_TOKENS else "contiguous"
    if layout not in ("contiguous", "batched"):
        raise ValueError(f"layout={layout!r}, expected 'contiguous', 'batched' or 'auto'")
    if out is None:
        out = torch.empty_like(hidden_states)
    if M == 0:
        return out
    if config is None:
        # Rows per expert counts dropped pairs too: an upper bound, known without a sync.
        device_name = _device_name(hidden_states.device) if hidden_states.is_cuda else None
        config = get_config(M * k / E, H, two_i // 2, device_name)
    routing = route(topk_ids, E, capacity=M if layout == "batched" else None)
    down = _launch_gemms(hidden_states, w13, w2, routing, config)
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
) -> torch.Tensor:
    """Deliberately simple float64 loop over (token, slot); returns `[M, H]` float64."""
    x, w13, w2 = hidden_states.double(), w13.double(), w2.double()
    inter = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for m in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[m, j])
            if e < 0:
                continue
            gate_up = w13[e] @ x[m]
            act = torch.nn.functional.silu(gate_up[:inter]) * gate_up[inter:]
            out[m] += float(topk_weights[m, j]) * (w2[e] @ act)
    return out
