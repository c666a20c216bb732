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

`--precision fp8`: FP8 block-scaled experts (DeepSeek-V3's format: float8 e4m3 weights, one
float32 scale per 128 x 128 block) at fewer points, each row W8A16 (activations bf16) or
W8A8 (activations quantized per token and 128 columns with torch before each GEMM; that
time is included), with two baselines timed in the same run on the same routing:

    weight bytes   = A * 3 * H * I * 1 + A * 4 * (scale blocks of w13 and w2)
    floor bytes    = weight bytes + 2 * M * H * 2          (bf16 x in, bf16 out)
    vs_bf16        = time of the BF16 kernel on the same point / time
    vs_dense_fp8   = time of torch._scaled_mm on [rows, H] x [H, 2I] and [rows, I] x [I, H]
                     (cuBLAS FP8, one scale per tensor: no block scales, no grouping, rows
                     rounded up to 16) / time; absent where _scaled_mm can't run
    max_rel_err_vs_torch: against the torch backend with the same FP8 weights and mode

Timing is triton.testing.do_bench's median. Each call takes the next of several input sets
(and, where memory allows, weight sets) so L2 does not hold the previous call's data.

Without a GPU the same command runs tiny shapes in Triton's interpreter (so a test can
catch breakage); its timings mean nothing.

    python benchmarks/grouped_gemm.py [--json results.json] [--quick] [--precision fp8]
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

from vllm_wideep.kernels import Fp8Experts, moe_experts  # noqa: E402
from vllm_wideep.kernels.fp8 import FP8, quantize_block_fp8, scale_shape  # noqa: E402
from vllm_wideep.kernels.grouped_gemm import moe_experts_triton  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16

GPU_MODEL = dict(H=7168, I=2048, num_experts=256, topk=8)
# The two ends first, so a run cut short by a time limit still shows the trend.
GPU_EP = (8, 64, 16, 32)
GPU_DECODE_B = (32, 64, 128, 256)
GPU_PREFILL_B = (2048, 8192)
# FP8 rows: three rows and three timings per point, so fewer points.
GPU_FP8_DECODE_B = (64, 256)
GPU_FP8_PREFILL_B = (8192,)
CPU_MODEL = dict(H=64, I=32, num_experts=32, topk=4)
CPU_EP = (4, 8)
CPU_DECODE_B = (2,)
CPU_PREFILL_B = (16,)
FP8_MODES = {"fp8-w8a16": "native", "fp8-w8a8": "fp8"}  # row label -> Fp8Experts.activations


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


def point_inputs(model, ep, batch, num_weight_sets, gen):
    """Four (x, topk_weights, topk_ids) sets of rank 0 and ``num_weight_sets`` bf16 weight
    sets (w13, w2) of its local experts."""
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
    return inputs, expert_weights, local


def point_fields(ep, batch, layout, local, inputs):
    x, _, ids = inputs[0]
    rows = int((ids >= 0).sum())
    active = int(torch.unique(ids[ids >= 0]).numel())
    return {
        "ep": ep, "local_experts": local, "batch_per_rank": batch, "layout": layout,
        "tokens": x.shape[0], "rows": rows, "active_experts": active,
        "rows_per_expert": rows / local,
    }  # fmt: skip


def time_kernel(inputs, expert_weights, layout, fp8s=None):
    """Median ms of moe_experts_triton, each call on the next input and weight set."""
    next_input, next_weights = rotating(inputs), rotating(list(range(len(expert_weights))))

    def run():
        x, weights, ids = next_input()
        i = next_weights()
        w13, w2 = expert_weights[i]
        fp8 = None if fp8s is None else fp8s[i]
        moe_experts_triton(x, w13, w2, weights, ids, layout=layout, fp8=fp8)

    return time_ms(run)


def rel_err_vs_torch(inputs, w13, w2, layout, fp8=None):
    """Guard against fast garbage: max |Triton - torch backend| / max |torch backend|."""
    x, weights, ids = inputs[0]
    ours = moe_experts_triton(x, w13, w2, weights, ids, layout=layout, fp8=fp8).float()
    ref = moe_experts(x, w13, w2, weights, ids, backend="torch", fp8=fp8).float()
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()


def bench_point(model, ep, batch, layout, bandwidth_gbs, num_weight_sets, gen):
    H, inter = model["H"], model["I"]
    inputs, expert_weights, local = point_inputs(model, ep, batch, num_weight_sets, gen)
    point = point_fields(ep, batch, layout, local, inputs)
    M, rows, active = point["tokens"], point["rows"], point["active_experts"]
    rel_err = rel_err_vs_torch(inputs, *expert_weights[0], layout)
    ms = time_kernel(inputs, expert_weights, layout)

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
        **point, "precision": "bf16", "ms": ms,
        "tflops": flop / ms / 1e9, "gbs": floor_bytes / ms / 1e6,
        "intensity": flop / max(weight_bytes, 1),
        "dense_tflops": flop / dense_ms / 1e9, "vs_dense": dense_ms / ms,
        "vs_hbm_floor": floor_ms / ms, "max_rel_err_vs_torch": rel_err,
    }  # fmt: skip


def dense_fp8_ms(rows, H, inter, gen):
    """torch._scaled_mm (cuBLAS FP8, per-tensor scales) on [rows, H] x [H, 2I] and
    [rows, I] x [I, H], rows rounded up to 16 (its alignment); None where it can't run."""
    if not hasattr(torch, "_scaled_mm"):
        return None
    m = -(-max(rows, 1) // 16) * 16

    def fp8(*shape):
        return torch.randn(*shape, device=DEVICE, generator=gen).to(FP8)

    # _scaled_mm takes the second operand column-major: the .t() of a row-major [N, K].
    a, act, w13, w2 = fp8(m, H), fp8(m, inter), fp8(2 * inter, H), fp8(H, inter)
    one = torch.ones((), device=DEVICE)

    def run():
        torch._scaled_mm(a, w13.t(), scale_a=one, scale_b=one, out_dtype=DTYPE)
        torch._scaled_mm(act, w2.t(), scale_a=one, scale_b=one, out_dtype=DTYPE)

    try:
        run()
    except (RuntimeError, NotImplementedError) as e:
        print(f"torch._scaled_mm unavailable here ({str(e).splitlines()[0]}): no vs_dense_fp8")
        return None
    return time_ms(run)


def bench_fp8_point(model, ep, batch, layout, bandwidth_gbs, num_weight_sets, gen):
    """The W8A16 and W8A8 rows of one point; the BF16 kernel and dense FP8 timed here too."""
    H, inter = model["H"], model["I"]
    inputs, expert_weights, local = point_inputs(model, ep, batch, num_weight_sets, gen)
    point = point_fields(ep, batch, layout, local, inputs)
    M, rows, active = point["tokens"], point["rows"], point["active_experts"]
    bf16_ms = time_kernel(inputs, expert_weights, layout)
    quantized = []
    for w13, w2 in expert_weights:
        (q13, s13), (q2, s2) = quantize_block_fp8(w13), quantize_block_fp8(w2)
        quantized.append(((q13, q2), (s13, s2)))
    del expert_weights
    dense_ms = dense_fp8_ms(rows, H, inter, gen)

    flop = rows * 6 * H * inter
    scale_elems = sum(
        torch.Size(scale_shape(shape, (128, 128))).numel() for shape in ((2 * inter, H), (H, inter))
    )
    weight_bytes = active * (3 * H * inter + 4 * scale_elems)
    floor_bytes = weight_bytes + 2 * M * H * 2
    floor_ms = floor_bytes / bandwidth_gbs / 1e6
    results = []
    for precision, activations in FP8_MODES.items():
        fp8s = [Fp8Experts(*scales, activations=activations) for _, scales in quantized]
        weights = [w for w, _ in quantized]
        rel_err = rel_err_vs_torch(inputs, *weights[0], layout, fp8s[0])
        ms = time_kernel(inputs, weights, layout, fp8s)
        results.append({
            **point, "precision": precision, "ms": ms,
            "tflops": flop / ms / 1e9, "gbs": floor_bytes / ms / 1e6,
            "intensity": flop / max(weight_bytes, 1), "bf16_ms": bf16_ms, "vs_bf16": bf16_ms / ms,
            "dense_fp8_tflops": None if dense_ms is None else flop / dense_ms / 1e9,
            "vs_dense_fp8": None if dense_ms is None else dense_ms / ms,
            "vs_hbm_floor": floor_ms / ms, "max_rel_err_vs_torch": rel_err,
        })  # fmt: skip
    return results


def _ratio(value):
    return f"{value:8.2f}" if value is not None else f"{'n/a':>8}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write results here")
    parser.add_argument("--quick", action="store_true", help="the first two EP sizes only")
    parser.add_argument(
        "--precision",
        choices=("bf16", "fp8"),
        default="bf16",
        help="bf16: the BF16 kernel vs dense cuBLAS; fp8: W8A16 and W8A8 rows vs the BF16 "
        "kernel and dense FP8 cuBLAS (fewer points)",
    )
    args = parser.parse_args()
    fp8 = args.precision == "fp8"
    model = GPU_MODEL if ON_GPU else CPU_MODEL
    eps = GPU_EP if ON_GPU else CPU_EP
    decode, prefill = (GPU_DECODE_B, GPU_PREFILL_B) if ON_GPU else (CPU_DECODE_B, CPU_PREFILL_B)
    if fp8 and ON_GPU:
        decode, prefill = GPU_FP8_DECODE_B, GPU_FP8_PREFILL_B
    if args.quick:
        eps = eps[:2]
    device = torch.cuda.get_device_name() if ON_GPU else "CPU (Triton interpreter)"
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    bandwidth = copy_bandwidth_gbs()
    print(f"{device}; {model}; copy bandwidth {bandwidth:.0f} GB/s; {args.precision}")
    if fp8:
        print(
            f"{'EP':>3} {'E':>3} {'B':>5} {'phase':>7} {'layout':>10} {'M':>6} {'rows':>6} "
            f"{'precision':>9} {'ms':>8} {'TFLOP/s':>8} {'GB/s':>7} {'vs_bf16':>8} "
            f"{'vs_fp8':>8} {'vs_floor':>8} {'err':>8}"
        )
    else:
        print(
            f"{'EP':>3} {'E':>3} {'B':>5} {'phase':>7} {'layout':>10} {'M':>6} {'rows':>6} "
            f"{'ms':>8} {'TFLOP/s':>8} {'GB/s':>7} {'FLOP/B':>7} {'vs_dense':>8} "
            f"{'vs_floor':>8} {'err':>8}"
        )
    results = []
    for ep in eps:
        local_bytes = (model["num_experts"] // ep) * 3 * model["H"] * model["I"] * 2
        # Two weight sets where they fit easily; one set of >= 350 MB already dwarfs L2.
        num_weight_sets = 2 if local_bytes < (8 << 30) else 1
        for batch, phase in [(b, "decode") for b in decode] + [(b, "prefill") for b in prefill]:
            layouts = ("contiguous", "batched") if phase == "decode" else ("contiguous",)
            for layout in layouts:
                bench = bench_fp8_point if fp8 else bench_point
                rows = bench(model, ep, batch, layout, bandwidth, num_weight_sets, gen)
                for r in rows if fp8 else [rows]:
                    r["phase"] = phase
                    results.append(r)
                    head = (
                        f"{ep:>3} {r['local_experts']:>3} {batch:>5} {phase:>7} {layout:>10} "
                        f"{r['tokens']:>6} {r['rows']:>6} "
                    )
                    if fp8:
                        tail = (
                            f"{r['precision']:>9} {r['ms']:8.3f} {r['tflops']:8.1f} "
                            f"{r['gbs']:7.0f} {r['vs_bf16']:8.2f} {_ratio(r['vs_dense_fp8'])} "
                        )
                    else:
                        tail = (
                            f"{r['ms']:8.3f} {r['tflops']:8.1f} {r['gbs']:7.0f} "
                            f"{r['intensity']:7.1f} {r['vs_dense']:8.2f} "
                        )
                    print(
                        f"{head}{tail}{r['vs_hbm_floor']:8.2f} {r['max_rel_err_vs_torch']:8.1e}",
                        flush=True,
                    )
                if args.json:  # after every point, so a run cut short still leaves data
                    _write_json(args.json, device, model, bandwidth, args.precision, results)
            if ON_GPU:
                torch.cuda.empty_cache()


def _write_json(path, device, model, bandwidth, precision, results):
    with open(path, "w") as f:
        json.dump(
            {"device": device, "model": model, "copy_bandwidth_gbs": bandwidth,
             "dtype": str(DTYPE), "precision": precision, "results": results},
            f, indent=1,
        )  # fmt: skip


if __name__ == "__main__":
    main()
