"""moe_experts against a float64 reference: Triton kernels (interpreter on CPU) and torch.

Outputs are poisoned with NaN before each Triton run, so a row the kernels forget to write
fails the comparison.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_wideep.kernels import moe_experts, torch_experts
from vllm_wideep.kernels.grouped_gemm import moe_experts_triton, reference_moe_experts

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Max abs error relative to max |reference|: fp32 is exact up to summation order; half
# types round the intermediate activation, the expert outputs and the result.
REL_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def make_inputs(M, H, inter, E, k, dtype, drop=0.3, seed=0):
    """Random MoE inputs; about ``drop`` of the pairs get id -1 (expert on another rank).

    Each token picks k distinct experts among ``E + extra``; ids >= E become -1.
    """
    gen = torch.Generator().manual_seed(seed)
    extra = max(int(E * drop / (1 - drop)), k - E, 0)
    ids = torch.rand(M, E + extra, generator=gen).argsort(dim=1)[:, :k]
    ids = torch.where(ids < E, ids, -1).to(torch.int32)
    weights = torch.rand(M, k, generator=gen)
    x = torch.randn(M, H, generator=gen)
    w13 = torch.randn(E, 2 * inter, H, generator=gen) / H**0.5
    w2 = torch.randn(E, H, inter, generator=gen) / inter**0.5
    to = dict(device=DEVICE)
    return (x.to(dtype=dtype, **to), w13.to(dtype=dtype, **to), w2.to(dtype=dtype, **to),
            weights.to(**to), ids.to(**to))  # fmt: skip


def assert_close(out, x, w13, w2, weights, ids):
    ref = reference_moe_experts(x.cpu(), w13.cpu(), w2.cpu(), weights.cpu(), ids.cpu())
    err = (out.cpu().double() - ref).abs().max().item()
    scale = ref.abs().max().item() or 1.0
    assert err / scale <= REL_TOL[x.dtype], f"max error {err:.3g} vs max |ref| {scale:.3g}"


def run_triton(inputs, layout):
    x = inputs[0]
    out = torch.full_like(x, float("nan"))
    moe_experts_triton(*inputs, layout=layout, out=out)
    return out


# (M, H, I, E, k): sizes off the 16-multiples, top-k 1..8, 1..64 experts, a single token,
# and more experts than tokens so most experts receive nothing.
SHAPES = [
    (1, 32, 32, 1, 1),
    (5, 48, 40, 4, 2),
    (37, 64, 48, 8, 8),
    (70, 96, 80, 64, 6),
]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("layout", ["contiguous", "batched"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}_H{}_I{}_E{}_k{}".format(*s))
def test_triton_matches_reference(shape, layout):
    # Cycle dtypes over shapes so every dtype meets every layout without the full product.
    dtype = DTYPES[SHAPES.index(shape) % len(DTYPES)]
    inputs = make_inputs(*shape, dtype=dtype)
    assert_close(run_triton(inputs, layout), *inputs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_dtypes(dtype):
    inputs = make_inputs(20, 40, 24, 3, 2, dtype=dtype, seed=1)
    assert_close(run_triton(inputs, "contiguous"), *inputs)


@pytest.mark.parametrize("layout", ["contiguous", "batched"])
def test_triton_all_dropped_rows_are_zero(layout):
    x, w13, w2, weights, ids = make_inputs(9, 32, 32, 4, 2, dtype=torch.float32)
    ids[:] = -1
    out = run_triton((x, w13, w2, weights, ids), layout)
    assert torch.equal(out.cpu(), torch.zeros_like(out.cpu()))


@pytest.mark.parametrize("layout", ["contiguous", "batched"])
def test_triton_one_hot_expert_spans_tiles(layout):
    """All 40 tokens on expert 2 (several M-tiles), experts 0, 1, 3 empty."""
    x, w13, w2, weights, ids = make_inputs(40, 32, 48, 4, 1, dtype=torch.float32, seed=2)
    ids[:] = 2
    assert_close(run_triton((x, w13, w2, weights, ids), layout), x, w13, w2, weights, ids)


# The torch backend's three paths: vLLM's fused CPU kernel (few pairs per expert, when
# vLLM's CPU ops are loaded), else one of two GEMM paths by problem size (forced with the
# `force_torch_path` fixture of conftest.py).
GEMMS = ["grouped_mm", "per_expert", "vllm_kernel"]


@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize(
    "shape", [(1, 32, 32, 1, 1), (37, 64, 48, 8, 8), (70, 96, 80, 64, 6), (16, 128, 64, 16, 4)]
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_backend_matches_reference(shape, dtype, gemm, force_torch_path):
    # The backend picks its path by problem size; force each path on the same inputs.
    inputs = [t.cpu() for t in make_inputs(*shape, dtype=dtype, seed=3)]
    force_torch_path(gemm, *inputs[:3])
    assert_close(moe_experts(*inputs, backend="torch"), *inputs)


@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize("rows", [1, 5])
def test_torch_backend_reads_rows_of_a_wider_buffer(rows, gemm, force_torch_path):
    """Tokens as a column slice of a wider buffer (as the dispatch hands them over: row
    stride H + 2k). One row of it passes `is_contiguous()` with that stride, which vLLM's
    kernel refuses: it crashed a server once."""
    x, w13, w2, weights, ids = [t.cpu() for t in make_inputs(rows, 64, 32, 4, 2, torch.bfloat16)]
    force_torch_path(gemm, x, w13, w2)
    wide = torch.cat([x, torch.zeros(rows, 4, dtype=x.dtype)], dim=1)[:, :64]
    assert wide.stride() == (68, 1)
    out = moe_experts(wide, w13, w2, weights, ids, backend="torch")
    assert_close(out, x, w13, w2, weights, ids)


@pytest.mark.parametrize("gemm", GEMMS)
def test_torch_backend_dropped_rows_are_zero(gemm, force_torch_path):
    """Tokens with no pair on this rank get exactly 0, in every path (vLLM's kernel gets
    their pairs rerouted with weight 0)."""
    x, w13, w2, weights, ids = [t.cpu() for t in make_inputs(10, 64, 32, 4, 2, torch.bfloat16)]
    force_torch_path(gemm, x, w13, w2)
    ids[::3] = -1
    out = moe_experts(x, w13, w2, weights, ids, backend="torch")
    assert torch.equal(out[::3], torch.zeros_like(out[::3]))
    assert_close(out, x, w13, w2, weights, ids)


@pytest.mark.parametrize("gemm", GEMMS)
def test_torch_backend_weight_cache_until_cleared(gemm, force_torch_path):
    """The CPU backend keeps transformed weights (an fp32 copy of bf16 weights, vLLM's
    prepacked layout) in the caller's cache: reused until the owner clears it, and after
    `clear()` an in-place slot write (what an EPLB move commits) reaches the next call."""
    x, w13, w2, weights, ids = [t.cpu() for t in make_inputs(12, 64, 64, 4, 2, torch.bfloat16)]
    force_torch_path(gemm, x, w13, w2)
    cache = torch_experts.WeightCache()
    ids[:, 0] = 1  # every token uses slot 1, the one rewritten below
    before = moe_experts(x, w13, w2, weights, ids, backend="torch", cache=cache)
    assert_close(before, x, w13, w2, weights, ids)
    _, new_w13, new_w2, _, _ = make_inputs(12, 64, 64, 4, 2, torch.bfloat16, seed=9)
    for w, new in ((w13, new_w13), (w2, new_w2)):
        w[1].copy_(new[1])  # as a move commits a slot
    if len(cache):  # a path that keeps copies computes with them until cleared
        stale = moe_experts(x, w13, w2, weights, ids, backend="torch", cache=cache)
        assert torch.equal(stale, before)
    cache.clear()
    after = moe_experts(x, w13, w2, weights, ids, backend="torch", cache=cache)
    assert_close(after, x, w13, w2, weights, ids)
    assert_close(moe_experts(x, w13, w2, weights, ids, backend="torch"), x, w13, w2, weights, ids)


def test_torch_backend_weight_cache_is_bounded():
    """One cached copy per live weight tensor and transform; a freed tensor's entries go
    with it."""
    cache = torch_experts.WeightCache()
    w = torch.randn(4, 8, 8).to(torch.bfloat16)
    first = torch_experts._upcast(w, torch.float32, cache)
    assert torch_experts._upcast(w, torch.float32, cache) is first
    half = torch_experts._upcast(w, torch.float16, cache)  # another transform, its own entry
    assert half.dtype == torch.float16 and torch_experts._upcast(w, torch.float32, cache) is first
    assert torch_experts._upcast(w.detach(), torch.float32, cache) is not first  # another object
    assert len(cache) == 2  # the .detach() view is gone already: its entry went with it
    del w
    assert len(cache) == 0


def test_public_entry_point_auto_backend():
    inputs = make_inputs(6, 32, 32, 4, 2, dtype=torch.bfloat16, seed=4)
    assert_close(moe_experts(*inputs, backend="auto"), *inputs)
    if DEVICE == "cpu":
        assert_close(moe_experts(*inputs, backend="triton"), *inputs)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("layout", ["contiguous", "batched"])
def test_triton_cuda_graph_replays_new_routing(layout):
    """Captured once, replayed after the routing changed in place: no host sync, no stale
    shapes."""
    x, w13, w2, weights, ids = make_inputs(24, 64, 48, 8, 4, dtype=torch.bfloat16, seed=5)
    out = torch.empty_like(x)
    moe_experts_triton(x, w13, w2, weights, ids, layout=layout, out=out)  # compile first
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        moe_experts_triton(x, w13, w2, weights, ids, layout=layout, out=out)
    for seed in (6, 7):
        _, _, _, new_weights, new_ids = make_inputs(24, 64, 48, 8, 4, torch.bfloat16, seed=seed)
        weights.copy_(new_weights)
        ids.copy_(new_ids)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, x, w13, w2, weights, ids)


def test_rejects_bad_arguments():
    x, w13, w2, weights, ids = make_inputs(4, 32, 32, 2, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="backend"):
        moe_experts(x, w13, w2, weights, ids, backend="cutlass")
    with pytest.raises(ValueError, match="w13"):
        moe_experts(x, w13[:, :, :16], w2, weights, ids)
    with pytest.raises(ValueError, match="share a dtype"):
        moe_experts_triton(x, w13.half(), w2, weights, ids)
    with pytest.raises(ValueError, match="layout"):
        moe_experts_triton(x, w13, w2, weights, ids, layout="padded")


@pytest.mark.slow
@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU table runs in benchmarks/gpu_check.sh")
def test_grouped_gemm_benchmark_runs_on_cpu(tmp_path):
    """benchmarks/grouped_gemm.py in its CPU mode (interpreter, tiny shapes) still works."""
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(root), "TRITON_INTERPRET": "1"}
    subprocess.run(
        [sys.executable, str(root / "benchmarks" / "grouped_gemm.py"), "--json", str(out)],
        check=True, env=env, timeout=300,
    )  # fmt: skip
    results = json.loads(out.read_text())["results"]
    assert {r["layout"] for r in results} == {"contiguous", "batched"}
    assert all(r["max_rel_err_vs_torch"] < REL_TOL[torch.bfloat16] for r in results)
