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
fp32. The fp32 copy of the weights is made once and cached (``_upcast``): converting them on
every call cost up to 100x the GEMMs at decode sizes. The cache holds one fp32 copy per
weight tensor, i.e. twice the bf16 expert memory, and is dropped when the tensor is freed.
"""

from __future__ import annotations

import functools
import weakref

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


# data_ptr -> (weakref to the source tensor, its _version then, its copy in the compute dtype)
_UPCAST_CACHE: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}


def _upcast(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``w.to(dtype)``, cached per weight tensor until it is written or freed.

    An entry is reused only for the same tensor object (a freed tensor's address can be
    reused by a new one) at the same ``_version``: every in-place write bumps it, through
    the tensor itself or any view or ``.detach()`` of it, e.g. the EPLB mover's
    ``w[slot].copy_(...)``. Writes through ``.data`` get a separate counter and are NOT seen;
    the wide-EP layer hands the mover ``.detach()`` views for that reason, and after
    reloading weights call ``clear_upcast_cache()``. Inference tensors track no version and
    are converted on every call.
    """
    if w.dtype == dtype:
        return w
    if w.is_inference():
        return w.to(dtype)
    ptr = w.data_ptr()
    entry = _UPCAST_CACHE.get(ptr)
    if entry is not None and entry[0]() is w and entry[1] == w._version and entry[2].dtype == dtype:
        return entry[2]
    copy = w.detach().to(dtype)  # no autograd graph kept alive by the cache
    # The callback drops the entry with its tensor, so the cache stays one copy per live tensor.
    _UPCAST_CACHE[ptr] = (weakref.ref(w, functools.partial(_forget, ptr)), w._version, copy)
    return copy


def _forget(ptr: int, ref: weakref.ref) -> None:
    entry = _UPCAST_CACHE.get(ptr)
    if entry is not None and entry[0] is ref:  # not a newer tensor's entry at the same address
        del _UPCAST_CACHE[ptr]


def clear_upcast_cache() -> None:
    """Drop every cached copy (after writing weights through ``.data``, e.g. a reload)."""
    _UPCAST_CACHE.clear()


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

    # -1 (dropped) -> E so those pairs sort last; one op where a cast + where took three.
    key = topk_ids.reshape(-1).remainder(E + 1)
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
    gate_up = torch._grouped_mm(x, _upcast(w13, dtype).transpose(1, 2), offs=offsets)
    return torch._grouped_mm(_silu_mul(gate_up), _upcast(w2, dtype).transpose(1, 2), offs=offsets)


def _per_expert(x, w13, w2, counts, dtype):
    """``torch.mm`` per active expert on its row slice; x `[rows, H]` sorted by expert."""
    down = torch.empty(x.shape[0], w2.shape[1], dtype=dtype, device=x.device)
    w13, w2 = _upcast(w13, dtype), _upcast(w2, dtype)
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        end = start + count
        gate_up = torch.mm(x[start:end], w13[e].t())
        torch.mm(_silu_mul(gate_up), w2[e].t(), out=down[start:end])
        start = end
    return down
