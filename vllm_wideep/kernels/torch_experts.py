"""MoE experts in plain torch, the CPU backend of ``moe_experts``.

Same contract as the Triton path (see ``vllm_wideep.kernels.moe_experts``). On CPU a host
sync costs nothing, so this sorts pairs by expert once and reads the per-expert counts on
the host:

    sort pairs by expert -> gather x rows -> gate_up GEMM (+ w13_bias), activation
    -> down GEMM (+ w2_bias) -> scale by topk weight -> index_add_ into an fp32 [M, H] buffer

The activation is an `activation.Activation` (SiLU-and-mul by default); biases, when given,
are added in the compute dtype right after their GEMM.

The GEMMs run one of two ways, by problem size:

* small (rows * H * I <= GROUPED_MM_MAX_WORK): ``torch._grouped_mm`` over all experts, two
  calls in all. Small problems are bound by per-op dispatch, and a per-expert loop costs
  about four ops per expert.
* large: ``torch.mm`` per active expert on its contiguous row slice, with the weight read as
  a ``w[e].t()`` view (the layout oneDNN multiplies fastest); measured faster than
  ``_grouped_mm`` once the GEMMs dominate.

Half-precision experts are multiplied in float32 when the CPU lacks native bf16 matrix
instructions (AVX2-only x86), where oneDNN's bf16 GEMM is several times slower than
fp32. The fp32 copy of the weights is made once and kept in the caller's ``WeightCache``:
converting them on every call cost up to 100x the GEMMs at decode sizes. In memory: one fp32
copy per weight tensor, i.e. twice the bf16 expert memory, until the owner clears it.

vLLM's own fused CPU MoE kernel runs instead, at every batch size, whenever vLLM's CPU ops
are loaded and it takes the shapes and the activation (as stock vLLM's CPU experts do): it
reads the bf16 weights directly (half the bytes of the fp32 copy) in one op. A row's result
from it does not depend on the other rows of the call, which the path above cannot promise
(oneDNN multiplies fewer than 12 rows with other kernels, so the low bits of a token's
output moved with the batch it came in), and its bits differ from the path above's. Choosing
between the two by batch size therefore made a token's output depend on what else was
scheduled with it, i.e. on request arrival: reruns of the same requests differed
(docs/token-exchange.md#determinism). On AVX2 it is 1.1-23x faster than the path above at
decode sizes; at 64 and more pairs per expert with H >= 1024 it is 1.2-1.7x slower
(docs/benchmarks.md), the price of deterministic prefill. It needs its own prepacked copy of
the weights (``_prepacked``, same bytes as the weights, kept in the same cache) and has no
id for "not on this rank" (see ``_vllm_fused``). It takes biases and computes four
activations exactly as `Activation` defines them (``_VLLM_ACTIVATIONS``); any other runs the
path above.

FP8 block-scaled experts (``moe_experts_torch_fp8``, scales in ``fp8.Fp8Experts``):

* W8A16 (``activations="native"``): the weights are dequantized once, to the compute dtype
  above (fp32 for fp32 activations and for half activations on a CPU without native half
  GEMMs, else the activation dtype), into the caller's ``WeightCache``; then exactly the
  unquantized path runs on that copy, vLLM's fused kernel included. The result equals
  ``moe_experts_torch`` on the dequantized weights bit for bit. In memory: the FP8 weights
  and scales stay as they are, plus the dequantized copy (4 bytes per weight element in
  fp32, 2 in bf16/fp16: DeepSeek-V3's 32 slots at EP 8, 1.4 G elements, take 5.6 GB in fp32)
  and, once vLLM's kernel has run, its prepacked copy of that (same bytes).
* W8A8 (``activations="fp8"``): the reference-grade math in fp32, slow by design: the
  input and the activation's output quantized per token and ``bk`` columns
  (``quantize_activations_fp8``) and dequantized, times the fp32 dequantized weights (the
  fp32 copy above, 4 bytes per weight element), one ``torch.mm`` per expert.
"""

from __future__ import annotations

import functools
import weakref

import torch

from vllm_wideep.kernels.activation import SILU, SWIGLU_OAI, Activation
from vllm_wideep.kernels.fp8 import Fp8Experts, dequantize_block_fp8, quantize_activations_fp8

# rows * H * I up to which the two-call grouped GEMM beats the per-expert loop on CPU
# (measured on AVX2: grouped wins at 1024 rows x 128 x 64, loses at 512 x 1024 x 512).
GROUPED_MM_MAX_WORK = 1 << 25
# The activations vLLM's fused CPU kernel computes, by its name for them (vLLM's CPU experts
# pass `MoEActivation.value`); each checked against `Activation` in tests/kernels.
_VLLM_ACTIVATIONS = {
    SILU: "silu",
    SWIGLU_OAI: "swigluoai",
    Activation("gelu"): "gelu",
    Activation("gelu_tanh"): "gelu_tanh",
}


@functools.cache
def _native_half_gemm() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16/AMX on x86; Arm assumed)."""
    is_x86 = torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2", "AVX512")
    return not is_x86 or torch.cpu._is_avx512_bf16_supported()


class WeightCache:
    """Transformed copies of expert weights (the fp32 copy of bf16 weights, the dequantized
    copy of FP8 weights, vLLM's prepacked layout), made on first use and reused until
    `clear()`.

    The owner of the weights keeps one (the wide-EP experts of a MoE layer) and calls
    `clear()` whenever it writes them: after loading, and after every EPLB move commits.
    It holds at most one copy per live weight tensor and transform; a freed tensor's entries
    go with it.
    """

    def __init__(self) -> None:
        # (id of the weight tensor, transform key) -> (weakref to the tensor, its copy)
        self._entries: dict[tuple[int, object], tuple[weakref.ref, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, w: torch.Tensor, key: object, transform) -> torch.Tensor:
        """``transform(w)``, made once per tensor object and ``key`` until `clear()`."""
        cache_key = (id(w), key)
        entry = self._entries.get(cache_key)
        if entry is not None and entry[0]() is w:
            return entry[1]
        copy = transform(w.detach())  # no autograd graph kept alive by the cache
        ref = weakref.ref(w, functools.partial(self._forget, cache_key))
        self._entries[cache_key] = (ref, copy)
        return copy

    def _forget(self, cache_key: tuple[int, object], ref: weakref.ref) -> None:
        entry = self._entries.get(cache_key)
        if entry is not None and entry[0] is ref:  # not a newer tensor's entry at the same id
            del self._entries[cache_key]

    def clear(self) -> None:
        """Drop every copy: the weights were written."""
        self._entries.clear()


def _transformed(w: torch.Tensor, key: object, transform, cache: WeightCache | None):
    return transform(w) if cache is None else cache.get(w, key, transform)


def _upcast(w: torch.Tensor, dtype: torch.dtype, cache: WeightCache | None) -> torch.Tensor:
    """``w.to(dtype)``, through ``cache`` when given."""
    return w if w.dtype == dtype else _transformed(w, dtype, lambda t: t.to(dtype), cache)


def _prepacked(w: torch.Tensor, isa: str, cache: WeightCache | None) -> torch.Tensor:
    """``w`` in the blocked layout of vLLM's fused kernel, through ``cache`` when given."""

    from vllm._custom_ops import cpu_prepack_moe_weight  # loaded: _vllm_isa checked the ops

    key = ("vllm_prepack", isa)
    return _transformed(w, key, lambda t: cpu_prepack_moe_weight(t.contiguous(), isa), cache)


def _vllm_isa(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    biases: tuple[torch.Tensor | None, torch.Tensor | None],
    activation: Activation,
) -> str | None:
    """The ISA string for vLLM's fused CPU MoE kernel on these tensors, None where it can't run.

    It needs vLLM's CPU ops loaded (vLLM's CPU platform loads them at startup; this package
    never imports vLLM itself), one floating dtype for input, weights and biases, H and I
    multiples of 32 (vLLM's ``CPUUnquantizedExperts`` alignment) and one of its activations.
    ISA as vLLM picks it: AMX for bf16 where the CPU has AMX tiles, else the portable "vec"
    kernel.
    """
    dtype = hidden_states.dtype
    if (
        hidden_states.device.type != "cpu"
        or activation not in _VLLM_ACTIVATIONS
        or not (dtype == w13.dtype == w2.dtype)
        or any(b is not None and b.dtype != dtype for b in biases)
        or dtype not in (torch.bfloat16, torch.float16, torch.float32)
        or w2.shape[1] % 32
        or w2.shape[2] % 32
        or not hasattr(torch.ops._C, "cpu_fused_moe")
    ):
        return None
    return "amx" if dtype == torch.bfloat16 and _has_amx() else "vec"


@functools.cache
def _has_amx() -> bool:  # a CPUID query: once, not per MoE call
    return torch.cpu._is_amx_tile_supported()


def _vllm_fused(
    hidden_states, w13, w2, topk_weights, topk_ids, isa: str, cache, biases, activation
) -> torch.Tensor:
    """vLLM's ``cpu_fused_moe``; it reads float32 router weights and int32 ids as contiguous
    buffers and writes every row of ``out``. biases: (w13_bias `[S, 2I]`, w2_bias `[S, H]`),
    each None or the input dtype.

    It indexes with every id, so a -1 would read out of bounds: each -1 pair is rerouted to
    an expert the token already uses (its largest id; expert 0 if it has none) with weight
    0, so it adds a row to an expert whose weights are read anyway and contributes
    0 * (expert output) = 0 to the sum (-0.0 at worst; NaN only if that output is not
    finite, i.e. the input row already was not).
    """
    valid = topk_ids >= 0
    fill = topk_ids.amax(dim=1, keepdim=True).clamp_(min=0)
    ids = torch.where(valid, topk_ids, fill).to(torch.int32).contiguous()
    weights = (topk_weights.float() * valid).contiguous()  # 2x faster than where(..., 0.0)
    # The kernel checks row stride == H. `.contiguous()` and `empty_like` keep a one-row
    # view's stride (e.g. H + 2k inside the dispatch buffer): allocate [M, H] explicitly.
    M, H = hidden_states.shape
    x = hidden_states
    if x.stride() != (H, 1):
        x = torch.empty(M, H, dtype=x.dtype, device=x.device).copy_(x)
    out = torch.empty(M, H, dtype=x.dtype, device=x.device)
    w13, w2 = _prepacked(w13, isa, cache), _prepacked(w2, isa, cache)
    b13, b2 = (None if b is None else b.contiguous() for b in biases)
    act = _VLLM_ACTIVATIONS[activation]
    # (out, x, w13, w2, w13_bias, w2_bias, topk_weights, topk_ids, skip_weighted, act, isa)
    torch.ops._C.cpu_fused_moe(out, x, w13, w2, b13, b2, weights, ids, False, act, isa)
    return out


def moe_experts_torch(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    cache: WeightCache | None = None,
    *,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    activation: Activation = SILU,
) -> torch.Tensor:
    """hidden_states `[M, H]`, w13 `[S, 2I, H]` (`[S, I, H]` for a non-gated activation),
    w2 `[S, H, I]`, topk_weights `[M, k]`, topk_ids `[M, k]` int, `-1` = not on this rank,
    w13_bias `[S, 2I]` (`[S, I]`) and w2_bias `[S, H]` or None. Returns `[M, H]` in the input
    dtype.

    cache: where to keep the transformed weights (and biases) between calls (see
    `WeightCache`); None transforms them on every call."""
    biases = (w13_bias, w2_bias)
    # Never chosen by batch size: see the module docstring (determinism).
    isa = _vllm_isa(hidden_states, w13, w2, biases, activation)
    if isa is not None:
        return _vllm_fused(
            hidden_states, w13, w2, topk_weights, topk_ids, isa, cache, biases, activation
        )
    compute_dtype = _compute_dtype(hidden_states)
    return _sorted_experts(
        hidden_states, w13, w2, topk_weights, topk_ids, compute_dtype, cache, biases, activation
    )


def moe_experts_torch_fp8(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    fp8: Fp8Experts,
    cache: WeightCache | None = None,
    hidden_scales: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    *,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    activation: Activation = SILU,
) -> torch.Tensor:
    """FP8 block-scaled experts: w13 `[S, 2I, H]` and w2 `[S, H, I]` float8 e4m3, their
    scales in ``fp8``; the biases (not quantized) and other arguments and the result as in
    `moe_experts_torch`. With
    ``hidden_scales`` (W8A8 only) hidden_states are float8 already quantized per token and
    ``bk`` columns (by an fp8 dispatch) and are used as they are; the result is then in
    ``out_dtype``.

    W8A16 runs `moe_experts_torch` on the weights dequantized to the compute dtype (kept in
    ``cache``; the scales count as part of the weights: clear it when either is written).
    W8A8 computes in fp32 with the input and the intermediate quantized per token and
    ``bk`` columns (see the module docstring)."""
    if fp8.activations == "native":
        dtype = _compute_dtype(hidden_states)
        w13 = _dequantized(w13, fp8.w13_scale, fp8.block, dtype, cache)
        w2 = _dequantized(w2, fp8.w2_scale, fp8.block, dtype, cache)
        b13, b2 = (None if b is None else _upcast(b, dtype, cache) for b in (w13_bias, w2_bias))
        out = moe_experts_torch(
            hidden_states.to(dtype), w13, w2, topk_weights, topk_ids, cache,
            w13_bias=b13, w2_bias=b2, activation=activation,
        )  # fmt: skip
        return out.to(hidden_states.dtype)
    group = fp8.block[1]
    w13 = _dequantized(w13, fp8.w13_scale, fp8.block, torch.float32, cache)
    w2 = _dequantized(w2, fp8.w2_scale, fp8.block, torch.float32, cache)
    if hidden_scales is not None:
        x = dequantize_block_fp8(hidden_states, hidden_scales, (1, group))
    else:
        x = _fake_quantized(hidden_states, group)
    out = _sorted_experts(
        x, w13, w2, topk_weights, topk_ids, torch.float32, cache, (w13_bias, w2_bias),
        activation, act_quant=functools.partial(_fake_quantized, group=group),
    )  # fmt: skip
    return out.to(out_dtype or hidden_states.dtype)


def _compute_dtype(hidden_states: torch.Tensor) -> torch.dtype:
    """The GEMM dtype: fp32 for half activations on a CPU without native half GEMMs."""
    dtype = hidden_states.dtype
    on_cpu = hidden_states.device.type == "cpu"
    if dtype != torch.float32 and on_cpu and not _native_half_gemm():
        return torch.float32
    return dtype


def _dequantized(q, scale, block, dtype, cache: WeightCache | None) -> torch.Tensor:
    """FP8 `q [S, n, m]` with block scales -> `dtype`, through ``cache`` when given; one slot
    at a time, so the transient per-element scales take one slot's memory."""

    def dequantize(q: torch.Tensor) -> torch.Tensor:
        out = torch.empty(q.shape, dtype=dtype, device=q.device)
        for slot in range(q.shape[0]):
            out[slot] = dequantize_block_fp8(q[slot], scale[slot], block, dtype)
        return out

    return _transformed(q, ("fp8_dequant", dtype, block), dequantize, cache)


def _fake_quantized(x: torch.Tensor, group: int) -> torch.Tensor:
    """`x [rows, n]` -> fp32 `[rows, n]`: quantized per row and ``group`` columns, dequantized."""
    q, scale = quantize_activations_fp8(x, group)
    return dequantize_block_fp8(q, scale, (1, group))


def _sorted_experts(
    hidden_states, w13, w2, topk_weights, topk_ids, compute_dtype, cache, biases, activation,
    act_quant=None,
) -> torch.Tensor:  # fmt: skip
    """Pairs sorted by expert, both GEMMs in ``compute_dtype``, the weighted sum in fp32.

    biases: (w13_bias `[S, 2I]`, w2_bias `[S, H]`), each None or any float dtype.
    act_quant: applied to the activation's output before the down GEMM (W8A8)."""
    M, H = hidden_states.shape
    E = w13.shape[0]
    k = topk_ids.shape[1]
    # -1 (dropped) -> E so those pairs sort last; one op where a cast + where took three.
    key = topk_ids.reshape(-1).remainder(E + 1)
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=E + 1)[:E]
    num_valid = int(counts.sum())
    order = order[:num_valid]
    tokens = order // k
    x = hidden_states.index_select(0, tokens).to(compute_dtype)
    b13, b2 = (None if b is None else _upcast(b, compute_dtype, cache) for b in biases)
    on_cpu = hidden_states.device.type == "cpu"
    if on_cpu and act_quant is None and num_valid * H * w2.shape[2] <= GROUPED_MM_MAX_WORK:
        row_expert = key[order]  # [num_valid]: the slot of each sorted row
        down = _grouped(x, w13, w2, counts, row_expert, b13, b2, activation, compute_dtype, cache)
    else:
        down = _per_expert(
            x, w13, w2, counts.tolist(), b13, b2, activation, compute_dtype, cache, act_quant
        )
    down = down.float().mul_(topk_weights.reshape(-1)[order].float().unsqueeze(1))
    out = torch.zeros(M, H, dtype=torch.float32, device=hidden_states.device)
    out.index_add_(0, tokens, down)
    return out.to(hidden_states.dtype)


def _grouped(x, w13, w2, counts, row_expert, b13, b2, activation, dtype, cache):
    """Both GEMMs as one ``torch._grouped_mm`` each; x `[rows, H]` sorted by expert, the
    slot of each row in ``row_expert`` `[rows]`, biases b13, b2 None or ``dtype``."""
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    w13, w2 = _upcast(w13, dtype, cache), _upcast(w2, dtype, cache)
    gate_up = torch._grouped_mm(x, w13.transpose(1, 2), offs=offsets)
    if b13 is not None:
        gate_up += b13.index_select(0, row_expert)
    down = torch._grouped_mm(activation(gate_up), w2.transpose(1, 2), offs=offsets)
    if b2 is not None:
        down += b2.index_select(0, row_expert)
    return down


def _per_expert(x, w13, w2, counts, b13, b2, activation, dtype, cache, act_quant=None):
    """``torch.mm`` (``addmm`` with a bias) per active expert on its row slice; x
    `[rows, H]` sorted by expert, biases b13, b2 None or ``dtype``."""
    down = torch.empty(x.shape[0], w2.shape[1], dtype=dtype, device=x.device)
    w13, w2 = _upcast(w13, dtype, cache), _upcast(w2, dtype, cache)
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        end = start + count
        if b13 is None:
            gate_up = torch.mm(x[start:end], w13[e].t())
        else:
            gate_up = torch.addmm(b13[e], x[start:end], w13[e].t())
        act = activation(gate_up)
        if act_quant is not None:
            act = act_quant(act)
        if b2 is None:
            torch.mm(act, w2[e].t(), out=down[start:end])
        else:
            torch.addmm(b2[e], act, w2[e].t(), out=down[start:end])
        start = end
    return down
