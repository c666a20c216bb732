"""Triton MoE experts at wide-EP shapes: TFLOP/s, GB/s, and ratios to two baselines.

On a GPU: DeepSeek-V3 experts (H=7168, I=2048, 256 experts, top-8) at EP 8/16/32/64
(32/16/8/4 local experts). Each rank holds B tokens (DP attention); B * EP tokens are routed
top-8 over 256 experts and rank 0 receives the tokens that hit one of its experts, with the
other ids set to -1. So the local experts see about B * 8 (token, expert) rows in all,
B * 8 * EP / 256 each: arithmetic intensity rises with EP.

Formulas, per call (rows = valid (token, expert) pairs, A = experts with >= 1 row):

    FLOP           = rows * 6 * H * I            (gate_up 2*H*2I, down 2*I*H per row)
    weight bytes   = A * 3 * H * I * elem
    intensity      = FLOP / weight bytes
    floor bytes    = weight bytes + 2 * M * H * elem   (read each active expert once, read x,
                                                          write out)
    GB/s           = floor bytes / time
    vs_dense       = our TFLOP/s / TFLOP/s of torch.matmul on [rows, H] x [H, 2I] and
                     [rows, I] x [I, H] (cuBLAS, same FLOP, no grouping)
    vs_hbm_floor   = (floor bytes / copy bandwidth) / time; copy bandwidth is measured in the
                     same run with a large device-to-device copy

Targets (H100/H200): prefill vs_dense >= 0.8, decode vs_hbm_floor >= 0.7.

Timing is triton.testing.do_bench's median. Each call takes the next of several input sets
(and, where memory allows, weight sets) so L2 does not hold the previous call's data.

Without a GPU the same command runs tiny shapes in Triton's interpreter (so a test can
catch breakage); its timings mean nothing.

    python benchmarks/grouped_gemm.py [--json results.json] [--quick]
"""

import argparse
import itertools
import json
import os
import time

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    # Triton reads this when the kernels are decorated, i.e. at import below.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.testing  # noqa: E402

from vllm_wideep.kernels import moe_experts  # noqa: E402
from vllm_wideep.kernels.grouped_gemm import moe_experts_triton  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16

GPU_MODEL = dict(H=7168, I=2048, num_experts=256, topk=8)
# The two ends first, so a run cut short by a time limit still shows the trend.
GPU_EP = (8, 64, 16, 32)
GPU_DECODE_B = (32, 64, 128, 256)
GPU_PREFILL_B = (2048, 8192)
CPU_MODEL = dict(H=64, I=32, num_experts=32, topk=4)
CPU_EP = (4, 8)
CPU_DECODE_B = (2,)
CPU_PREFILL_B = (16,)


def received_routing(batch, ep, num_experts, topk, gen):
    """topk ids/weights of the tokens rank 0 receives: `[M, topk]` local ids, -1 elsewhere."""
    local = num_experts // ep
    scores = torch.rand(batch * ep, num_experts, device=DEVICE, generator=gen)
    weights, ids = scores.topk(topk, dim=1)
    hits = ids < local
    keep = hits.any(dim=1)
    ids = torch.where(hits, ids, -1)[keep].to(torch.int32)
    return weights[keep].contiguous(), ids.contiguous(), local


def time_ms(fn):
    if ON_GPU:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    # Interpreter timings mean nothing; one warm run keeps the CPU smoke test short.
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def copy_bandwidth_gbs():
    """Device-to-device copy: bytes read + written per second."""
    n = (1 << 30) if ON_GPU else (1 << 22)
    src = torch.empty(n, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * n / ms / 1e6


def rotating(sets):
    """A callable returning the next set each time, so consecutive calls use fresh data."""
    cycle = itertools.cycle(sets)
    return lambda: next(cycle)


def bench_point(model, ep, batch, layout, bandwidth_gbs, num_weight_sets, gen):
    H, inter, topk = model["H"], model["I"], model["topk"]
    inputs = []
    for _ in range(4):
        weights, ids, local = received_routing(batch, ep, model["num_experts"], topk, gen)
        x = torch.randn(ids.shape[0], H, device=DEVICE, dtype=DTYPE, generator=gen)
        inputs.append((x, weights, ids))
    expert_weights = [
        (
            torch.randn(local, 2 * inter, H, device=DEVICE, dtype=DTYPE, generator=gen) / H**0.5,
            torch.randn(local, H, inter, device=DEVICE, dtype=DTYPE, generator=gen) / inter**0.5,
        )
        for _ in range(num_weight_sets)
    ]
    x, weights, ids = inputs[0]
    M = x.shape[0]
    rows = int((ids >= 0).sum())
    active = int(torch.unique(ids[ids >= 0]).numel())

    # Guard against fast garbage: compare with the torch backend on the first set.
    w13, w2 = expert_weights[0]
    ours = moe_experts_triton(x, w13, w2, weights, ids, layout=layout).float()
    ref = moe_experts(x, w13, w2, weights, ids, backend="torch").float()
    rel_err = ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()

    next_input, next_weights = rotating(inputs), rotating(expert_weights)

    def run():
        x, weights, ids = next_input()
        w13, w2 = next_weights()
        moe_experts_triton(x, w13, w2, weights, ids, layout=layout)

    ms = time_ms(run)

    a = torch.randn(max(rows, 1), H, device=DEVICE, dtype=DTYPE, generator=gen)
    act = torch.randn(max(rows, 1), inter, device=DEVICE, dtype=DTYPE, generator=gen)
    w13_dense = expert_weights[0][0][0].t()  # [H, 2I]
    w2_dense = expert_weights[0][1][0].t()  # [I, H]
    dense_ms = time_ms(lambda: (torch.matmul(a, w13_dense), torch.matmul(act, w2_dense)))

    elem = torch.finfo(DTYPE).bits // 8
    flop = rows * 6 * H * inter
    weight_bytes = active * 3 * H * inter * elem
    floor_bytes = weight_bytes + 2 * M * H * elem
    floor_ms = floor_bytes / bandwidth_gbs / 1e6
    return {
        "ep": ep, "local_experts": local, "batch_per_rank": batch, "layout": layout,
        "tokens": M, "rows": rows, "active_experts": active,
        "rows_per_expert": rows / local, "ms": ms,
        "tflops": flop / ms / 1e9, "gbs": floor_bytes / ms / 1e6,
        "intensity": flop / max(weight_bytes, 1),
        "dense_tflops": flop / dense_ms / 1e9, "vs_dense": dense_ms / ms,
        "vs_hbm_floor": floor_ms / ms, "max_rel_err_vs_torch": rel_err,
    }  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write results here")
    parser.add_argument("--quick", action="store_true", help="the first two EP sizes only")
    args = parser.parse_args()
    model = GPU_MODEL if ON_GPU else CPU_MODEL
    eps = GPU_EP if ON_GPU else CPU_EP
    decode, prefill = (GPU_DECODE_B, GPU_PREFILL_B) if ON_GPU else (CPU_DECODE_B, CPU_PREFILL_B)
    if args.quick:
        eps = eps[:2]
    device = torch.cuda.get_device_name() if ON_GPU else "CPU (Triton interpreter)"
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    bandwidth = copy_bandwidth_gbs()
    print(f"{device}; {model}; copy bandwidth {bandwidth:.0f} GB/s; dtype {DTYPE}")
    header = (
        f"{'EP':>3} {'E':>3} {'B':>5} {'phase':>7} {'layout':>10} {'M':>6} {'rows':>6} "
        f"{'ms':>8} {'TFLOP/s':>8} {'GB/s':>7} {'FLOP/B':>7} {'vs_dense':>8} "
        f"{'vs_floor':>8} {'err':>8}"
    )
    print(header)
    results = []
    for ep in eps:
        local_bytes = (model["num_experts"] // ep) * 3 * model["H"] * model["I"] * 2
        # Two weight sets where they fit easily; one set of >= 350 MB already dwarfs L2.
        num_weight_sets = 2 if local_bytes < (8 << 30) else 1
        for batch, phase in [(b, "decode") for b in decode] + [(b, "prefill") for b in prefill]:
            layouts = ("contiguous", "batched") if phase == "decode" else ("contiguous",)
            for layout in layouts:
                r = bench_point(model, ep, batch, layout, bandwidth, num_weight_sets, gen)
                r["phase"] = phase
                results.append(r)
                print(
                    f"{ep:>3} {r['local_experts']:>3} {batch:>5} {phase:>7} {layout:>10} "
                    f"{r['tokens']:>6} {r['rows']:>6} {r['ms']:8.3f} {r['tflops']:8.1f} "
                    f"{r['gbs']:7.0f} {r['intensity']:7.1f} {r['vs_dense']:8.2f} "
                    f"{r['vs_hbm_floor']:8.2f} {r['max_rel_err_vs_torch']:8.1e}",
                    flush=True,
                )
                if args.json:  # after every point, so a run cut short still leaves data
                    _write_json(args.json, device, model, bandwidth, results)
            if ON_GPU:
                torch.cuda.empty_cache()


def _write_json(path, device, model, bandwidth, results):
    with open(path, "w") as f:
        json.dump(
            {"device": device, "model": model, "copy_bandwidth_gbs": bandwidth,
             "dtype": str(DTYPE), "results": results},
            f, indent=1,
        )  # fmt: skip


if __name__ == "__main__":
    main()
