"""FP8 block-scaled experts (`moe_experts(..., fp8=Fp8Experts(...))`) against a float64
reference of the quantized math: Triton kernels (interpreter on CPU) and torch.

The reference (`reference_moe_experts(..., fp8=...)`) dequantizes the float8 weights with
their block scales in float64; for W8A16 it multiplies the activations as given, for W8A8
it quantizes the input and the SiLU-and-mul intermediate per token and bk columns the way
the kernels do (`quantize_activations_fp8`) and dequantizes them in float64. So the FP8
rounding itself is in the reference, and the bounds below only cover the GEMMs' rounding.

Shapes are small (Triton's interpreter is slow) but cover full and partial scale blocks:
H = 200 and I = 72, 136 leave a partial last block, and with I = 72 or 136 the up half of
w13 (rows I..2I) starts inside a block of 128 rows.
"""

import pytest
import torch

from vllm_wideep.kernels import Fp8Experts, WeightCache, moe_experts, torch_experts
from vllm_wideep.kernels.fp8 import dequantize_block_fp8, quantize_block_fp8
from vllm_wideep.kernels.grouped_gemm import moe_experts_triton, reference_moe_experts

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Bounds on max |out - ref| / max |ref| and on mean |out - ref| / mean |ref|.
#
# W8A16: the reference has exactly the kernels' operands (dequantized weights, activations
# as given), so the bounds are those of the unquantized tests: fp32 is exact up to
# summation order (measured ~5e-7); bf16 rounds the intermediate, the expert outputs and
# the result (2^-9 each).
#
# W8A8: the GEMMs themselves differ from the float64 reference by their rounding only:
# ~1e-6 in fp32 (CPU, interpreter), up to ~1e-4 where FP8 tensor cores accumulate a K tile
# of <= 128 products in ~14 bits before the fp32 promotion (Hopper, DeepSeek-V3 report
# 3.3.2). But that rounding can move an element of the intermediate across an FP8 rounding
# boundary, so it dequantizes one FP8 step (<= 2^-3 of itself) away from the reference's:
# rare, but a flip moves a whole output row by up to ~1e-2 of max |ref| at these sizes.
# Simulated with 1e-4 relative noise on gate_up (GPU-like): max 7e-3, mean 1.4e-3. Hence
# max <= 2e-2 (gross errors: a wrong scale block or row is O(1)) and mean <= 2e-3 (the
# systematic ones: skipping the intermediate's re-quantization alone gives a mean of 2e-2).
MAX_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
MEAN_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
W8A8_MAX_TOL, W8A8_MEAN_TOL = 2e-2, 2e-3

ACTIVATIONS = ["native", "fp8"]


def make_inputs(M, H, inter, E, k, dtype=torch.float32, drop=0.3, seed=0, block=(128, 128)):
    """Random MoE inputs with FP8 weights: (x, w13_q, w2_q, topk_weights, topk_ids, scales),
    scales = (w13_scale, w2_scale); about ``drop`` of the pairs get id -1.

    Each slot's weights get their own magnitude (0.25x to 4x) so that a scale read from the
    wrong slot or block is visible."""
    gen = torch.Generator().manual_seed(seed)
    extra = max(int(E * drop / (1 - drop)), k - E, 0)
    ids = torch.rand(M, E + extra, generator=gen).argsort(dim=1)[:, :k]
    ids = torch.where(ids < E, ids, -1).to(torch.int32)
    weights = torch.rand(M, k, generator=gen)
    x = torch.randn(M, H, generator=gen)
    magnitude = 4.0 ** (2 * torch.rand(E, 1, 1, generator=gen) - 1)
    w13 = torch.randn(E, 2 * inter, H, generator=gen) / H**0.5 * magnitude
    w2 = torch.randn(E, H, inter, generator=gen) / inter**0.5 / magnitude
    w13_q, w13_scale = quantize_block_fp8(w13, block)
    w2_q, w2_scale = quantize_block_fp8(w2, block)
    to = dict(device=DEVICE)
    return (x.to(dtype=dtype, **to), w13_q.to(**to), w2_q.to(**to), weights.to(**to),
            ids.to(**to), (w13_scale.to(**to), w2_scale.to(**to)))  # fmt: skip


def fp8_of(scales, activations, block=(128, 128)):
    return Fp8Experts(*scales, block=block, activations=activations)


def assert_close(out, x, w13, w2, weights, ids, fp8):
    cpu = [t.cpu() for t in (x, w13, w2, weights, ids)]
    fp8_cpu = Fp8Experts(
        fp8.w13_scale.cpu(), fp8.w2_scale.cpu(), block=fp8.block, activations=fp8.activations
    )
    ref = reference_moe_experts(*cpu, fp8=fp8_cpu)
    err = (out.cpu().double() - ref).abs()
    max_tol, mean_tol = MAX_TOL[x.dtype], MEAN_TOL[x.dtype]
    if fp8.activations == "fp8":
        max_tol, mean_tol = max_tol + W8A8_MAX_TOL, mean_tol + W8A8_MEAN_TOL
    max_rel = err.max().item() / (ref.abs().max().item() or 1.0)
    mean_rel = err.mean().item() / (ref.abs().mean().item() or 1.0)
    assert max_rel <= max_tol and mean_rel <= mean_tol, (
        f"max error {max_rel:.3g} (bound {max_tol:.3g}), mean {mean_rel:.3g} ({mean_tol:.3g})"
    )


def run_triton(x, w13, w2, weights, ids, fp8, layout):
    out = torch.full_like(x, float("nan"))  # a row the kernels forget fails the comparison
    moe_experts_triton(x, w13, w2, weights, ids, layout=layout, out=out, fp8=fp8)
    return out


# (M, H, I, E, k): multiples of 128; partial last blocks with the up half starting inside
# a block (I = 136: w13 rows 136..271, scale rows 1..2); I below one block (72).
SHAPES = [(5, 256, 128, 4, 2), (70, 200, 136, 4, 2), (37, 128, 72, 3, 3)]
shape_id = "M{}_H{}_I{}_E{}_k{}".format


@pytest.mark.parametrize("activations", ACTIVATIONS)
@pytest.mark.parametrize("layout", ["contiguous", "batched"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: shape_id(*s))
def test_triton_matches_reference(shape, layout, activations):
    *inputs, scales = make_inputs(*shape)
    fp8 = fp8_of(scales, activations)
    assert_close(run_triton(*inputs, fp8, layout), *inputs, fp8)


@pytest.mark.parametrize("activations", ACTIVATIONS)
def test_triton_bf16_activations(activations):
    *inputs, scales = make_inputs(20, 128, 64, 3, 2, dtype=torch.bfloat16, seed=1)
    fp8 = fp8_of(scales, activations)
    assert_close(run_triton(*inputs, fp8, "contiguous"), *inputs, fp8)


@pytest.mark.parametrize("activations", ACTIVATIONS)
@pytest.mark.parametrize("block", [(64, 64), (48, 96)], ids=lambda b: "block{}x{}".format(*b))
def test_triton_other_scale_blocks(block, activations):
    """Scale blocks smaller than the tiles (BLOCK_K capped at bk; a tile's columns read
    several scale rows) and bn, bk not powers of two (bk = 96 = 3 tiles of 32)."""
    *inputs, scales = make_inputs(24, 160, 104, 3, 2, seed=2, block=block)
    fp8 = fp8_of(scales, activations, block)
    assert_close(run_triton(*inputs, fp8, "contiguous"), *inputs, fp8)


@pytest.mark.parametrize("activations", ACTIVATIONS)
@pytest.mark.parametrize("layout", ["contiguous", "batched"])
def test_triton_dropped_pairs_contribute_zero(layout, activations):
    """Tokens whose pairs are all -1 get exactly 0 although their inputs are NaN (their
    rows are never read); the others match the reference."""
    x, w13, w2, weights, ids, scales = make_inputs(12, 128, 64, 4, 2, seed=3)
    ids[::3] = -1
    x[::3] = float("nan")
    fp8 = fp8_of(scales, activations)
    out = run_triton(x, w13, w2, weights, ids, fp8, layout)
    assert torch.equal(out[::3].cpu(), torch.zeros_like(out[::3].cpu()))
    keep = torch.ones(12, dtype=torch.bool)
    keep[::3] = False
    assert_close(out[keep], x[keep], w13, w2, weights[keep], ids[keep], fp8)


def test_entry_point_auto_backend():
    """`moe_experts` with fp8: Triton on a GPU, torch on CPU; both layouts by M."""
    for M in (6, 80):  # batched up to 64 tokens, contiguous above
        *inputs, scales = make_inputs(M, 128, 64, 4, 2, seed=4)
        fp8 = fp8_of(scales, "fp8")
        assert_close(moe_experts(*inputs, fp8=fp8), *inputs, fp8)
        if DEVICE == "cpu":
            assert_close(moe_experts(*inputs, backend="triton", fp8=fp8), *inputs, fp8)


# The torch backend's three paths (see test_moe_experts.py): W8A16 runs the unquantized
# path on the dequantized copy, so it goes through all three; W8A8 has its own loop.
GEMMS = ["grouped_mm", "per_expert", "vllm_kernel"]
TORCH_PATHS = [*(("native", gemm) for gemm in GEMMS), ("fp8", "per_expert")]
PATH_IDS = [f"{activations}-{gemm}" for activations, gemm in TORCH_PATHS]
TORCH_SHAPES = [(1, 128, 128, 2, 1), (37, 200, 136, 4, 3), (70, 256, 96, 8, 4)]


def cpu_inputs(*shape, **kwargs):
    x, w13, w2, weights, ids, scales = make_inputs(*shape, **kwargs)
    return [t.cpu() for t in (x, w13, w2, weights, ids)], tuple(s.cpu() for s in scales)


@pytest.mark.parametrize(("activations", "gemm"), TORCH_PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("shape", TORCH_SHAPES, ids=lambda s: shape_id(*s))
def test_torch_backend_matches_reference(shape, activations, gemm, force_torch_path):
    inputs, scales = cpu_inputs(*shape, seed=5)
    fp8 = fp8_of(scales, activations)
    dtype = torch_experts._compute_dtype(inputs[0])
    force_torch_path(gemm, *(t.to(dtype) for t in inputs[:3]))  # the dequantized operands
    assert_close(moe_experts(*inputs, backend="torch", fp8=fp8), *inputs, fp8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gemm", GEMMS)
def test_torch_w8a16_is_the_unquantized_path_on_dequantized_weights(gemm, dtype, force_torch_path):
    """Bit for bit: the dequantized copy (in the compute dtype: fp32 on CPUs without native
    bf16 GEMMs) goes through exactly the unquantized path, vLLM's kernel included."""
    (x, w13, w2, weights, ids), scales = cpu_inputs(16, 128, 64, 4, 2, dtype=dtype, seed=6)
    compute = torch_experts._compute_dtype(x)
    w13_d = dequantize_block_fp8(w13, scales[0]).to(compute)
    w2_d = dequantize_block_fp8(w2, scales[1]).to(compute)
    force_torch_path(gemm, x.to(compute), w13_d, w2_d)
    out = moe_experts(x, w13, w2, weights, ids, backend="torch", fp8=fp8_of(scales, "native"))
    expected = moe_experts(x.to(compute), w13_d, w2_d, weights, ids, backend="torch")
    assert torch.equal(out, expected.to(dtype))


@pytest.mark.parametrize("activations", ACTIVATIONS)
def test_torch_backend_dropped_rows_are_zero(activations):
    (x, w13, w2, weights, ids), scales = cpu_inputs(10, 128, 64, 4, 2, seed=7)
    ids[::3] = -1
    fp8 = fp8_of(scales, activations)
    out = moe_experts(x, w13, w2, weights, ids, backend="torch", fp8=fp8)
    assert torch.equal(out[::3], torch.zeros_like(out[::3]))
    assert_close(out, x, w13, w2, weights, ids, fp8)


@pytest.mark.parametrize(("activations", "gemm"), TORCH_PATHS[1:], ids=PATH_IDS[1:])
def test_torch_backend_cache_until_cleared(activations, gemm, force_torch_path):
    """The dequantized copy is made once into the caller's cache (the FP8 weights stay
    FP8), reused until `clear()`; after it an in-place write of a slot's weights and
    scales (what an EPLB move commits) reaches the next call."""
    (x, w13, w2, weights, ids), scales = cpu_inputs(12, 128, 64, 4, 2, seed=8)
    fp8 = fp8_of(scales, activations)
    compute = torch_experts._compute_dtype(x) if activations == "native" else torch.float32
    force_torch_path(gemm, x.to(compute), w13.float().to(compute), w2.float().to(compute))
    cache = WeightCache()
    ids[:, 0] = 1  # every token uses slot 1, the one rewritten below
    before = moe_experts(x, w13, w2, weights, ids, backend="torch", cache=cache, fp8=fp8)
    assert_close(before, x, w13, w2, weights, ids, fp8)
    dequantized = cache.get(w13, ("fp8_dequant", compute, fp8.block), None)
    assert dequantized.dtype == compute and w13.dtype == torch.float8_e4m3fn
    entries = len(cache)
    assert entries >= 2  # w13 and w2 dequantized (+ vLLM's prepacked copies)
    _, new_w13, new_w2, _, _, new_scales = make_inputs(12, 128, 64, 4, 2, seed=9)
    for w, new in zip((w13, w2, *fp8_scales(fp8)), (new_w13, new_w2, *new_scales), strict=True):
        w[1].copy_(new[1])  # as a move commits a slot
    stale = moe_experts(x, w13, w2, weights, ids, backend="torch", cache=cache, fp8=fp8)
    assert torch.equal(stale, before) and len(cache) == entries
    cache.clear()
    after = moe_experts(x, w13, w2, weights, ids, backend="torch", cache=cache, fp8=fp8)
    assert not torch.equal(after, before)
    assert_close(after, x, w13, w2, weights, ids, fp8)


def fp8_scales(fp8):
    return fp8.w13_scale, fp8.w2_scale


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("activations", ACTIVATIONS)
def test_triton_cuda_graph_replays_new_routing(activations):
    """W8A8 quantizes activations with torch between the kernels: capturable too."""
    x, w13, w2, weights, ids, scales = make_inputs(24, 256, 128, 8, 4, seed=10)
    fp8 = fp8_of(scales, activations)
    out = torch.empty_like(x)
    moe_experts_triton(x, w13, w2, weights, ids, out=out, fp8=fp8)  # compile first
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        moe_experts_triton(x, w13, w2, weights, ids, out=out, fp8=fp8)
    for seed in (11, 12):
        _, _, _, new_weights, new_ids, _ = make_inputs(24, 256, 128, 8, 4, seed=seed)
        weights.copy_(new_weights)
        ids.copy_(new_ids)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, x, w13, w2, weights, ids, fp8)


def test_rejects_bad_arguments():
    x, w13, w2, weights, ids, (s13, s2) = make_inputs(4, 200, 64, 2, 2)
    fp8 = Fp8Experts(s13, s2)
    with pytest.raises(ValueError, match=r"w13_scale \(2, 1, 2\) float32; got \(2, 1, 1\)"):
        moe_experts(x, w13, w2, weights, ids, fp8=Fp8Experts(s13[:, :, :1], s2))
    with pytest.raises(ValueError, match=r"w2 \(2, 200, 64\) with block \(128, 128\) needs"):
        moe_experts(x, w13, w2, weights, ids, fp8=Fp8Experts(s13, s2.half()))
    with pytest.raises(ValueError, match=r"block \(64, 64\) needs w13_scale \(2, 2, 4\)"):
        moe_experts(x, w13, w2, weights, ids, fp8=Fp8Experts(s13, s2, block=(64, 64)))
    with pytest.raises(ValueError, match="float8"):
        moe_experts(x, w13.float(), w2.float(), weights, ids, fp8=fp8)
    with pytest.raises(ValueError, match="need their block scales"):
        moe_experts(x, w13, w2, weights, ids)
    with pytest.raises(ValueError, match="activations"):
        Fp8Experts(s13, s2, activations="int8")
    with pytest.raises(ValueError, match="block"):
        Fp8Experts(s13, s2, block=(128, 0))
    # bk = 24 cannot hold a K tile of 16: the Triton backend refuses, the torch one runs.
    x, w13, w2, weights, ids, (s13, s2) = make_inputs(4, 48, 48, 2, 2, block=(24, 24))
    odd = Fp8Experts(s13, s2, block=(24, 24))
    with pytest.raises(ValueError, match="bk=24"):
        moe_experts(x, w13, w2, weights, ids, backend="triton", fp8=odd)
    if DEVICE == "cpu":
        assert_close(moe_experts(x, w13, w2, weights, ids, fp8=odd), x, w13, w2, weights, ids, odd)
