"""MoE experts in plain torch, the CPU backend of ``moe_experts``.

Same contract as the Triton path (see ``vllm_wideep.kernels.moe_experts``). On CPU a host
sync costs nothing, so this sorts pairs by expert once and reads the per-expert counts on
the host:

    sort pairs by expert -> gather x rows -> gate_up GEMM, silu(g) * u -> down GEMM
    -> scale by topk weight -> index_add_ into an fp32 [M, H] buffer

The GEMMs run one of two ways, by problem size:

* small (rows * H * I <= GROUPED_MM_MAX_WORK): ``torch._grouped_mm`` over all experts, two
  calls in all. Small problems are bound by per-op dispatch, and a per-expert loop costs
  about four ops per expert.
* large: ``torch.mm`` per active expert on its contiguous row slice, with the weight read as
  a ``w[e].t()`` view (the layout oneDNN multiplies fastest); measured faster than
  ``_grouped_mm`` once the GEMMs dominate.

Half-precision experts are multiplied in float32 when the CPU lacks native bf16 matrix
instructions (AVX2-only x86), where oneDNN's bf16 GEMM is several times slower than
upcasting the weights of the active experts.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# rows * H * I up to which the two-call grouped GEMM beats the per-expert loop on CPU
# (measured on AVX2: grouped wins at 1024 rows x 128 x 64, loses at 512 x 1024 x 512).
GROUPED_MM_MAX_WORK = 1 << 25


@functools.cache
def _native_half_gemm() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16/AMX on x86; Arm assumed)."""
    is_x86 = torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2", "AVX512")
    return not is_x86 or torch.cpu._is_avx512_bf16_supported()


def moe_experts_torch(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """hidden_states `[M, H]`, w13 `[E, 2I, H]`, w2 `[E, H, I]`, topk_weights `[M, k]`,
    topk_ids `[M, k]` int, `-1` = not on this rank. Returns `[M, H]` in the input dtype."""
    M, H = hidden_states.shape
    E = w13.shape[0]
    k = topk_ids.shape[1]
    on_cpu = hidden_states.device.type == "cpu"
    compute_dtype = hidden_states.dtype
    if compute_dtype != torch.float32 and on_cpu and not _native_half_gemm():
        compute_dtype = torch.float32

    flat = topk_ids.reshape(-1).to(torch.int64)
    key = torch.where(flat < 0, E, flat)  # dropped pairs sort last
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=E + 1)[:E]
    num_valid = int(counts.sum())
    order = order[:num_valid]
    tokens = order // k
    x = hidden_states.index_select(0, tokens).to(compute_dtype)
    if on_cpu and num_valid * H * w2.shape[2] <= GROUPED_MM_MAX_WORK:
        down = _grouped(x, w13, w2, counts, compute_dtype)
    else:
        down = _per_expert(x, w13, w2, counts.tolist(), compute_dtype)
    down = down.float().mul_(topk_weights.reshape(-1)[order].float().unsqueeze(1))
    out = torch.zeros(M, H, dtype=torch.float32, device=hidden_states.device)
    out.index_add_(0, tokens, down)
    return out.to(hidden_states.dtype)


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`[rows, 2I]` -> `[rows, I]`: silu(gate) * up."""
    inter = gate_up.shape[1] // 2
    act = F.silu(gate_up[:, :inter])
    return act.mul_(gate_up[:, inter:])


def _grouped(x, w13, w2, counts, dtype):
    """Both GEMMs as one ``torch._grouped_mm`` each; x `[rows, H]` sorted by expert."""
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    gate_up = torch._grouped_mm(x, w13.to(dtype).transpose(1, 2), offs=offsets)
    return torch._grouped_mm(_silu_mul(gate_up), w2.to(dtype).transpose(1, 2), offs=offsets)


def _per_expert(x, w13, w2, counts, dtype):
    """``torch.mm`` per active expert on its row slice; x `[rows, H]` sorted by expert."""
    down = torch.empty(x.shape[0], w2.shape[1], dtype=dtype, device=x.device)
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        end = start + count
        gate_up = torch.mm(x[start:end], w13[e].to(dtype).t())
        torch.mm(_silu_mul(gate_up), w2[e].to(dtype).t(), out=down[start:end])
        start = end
    return down
