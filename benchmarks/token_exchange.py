"""Token-exchange traffic and latency of the dispatch backends.

    python benchmarks/token_exchange.py [--json docs/results/token_exchange_cpu.json]

1. Traffic, EP 2 to 64, DeepSeek-V3 shapes (H = 7168 bf16, 256 routed experts, top-8),
   computed from per-token routings (uniform, and Zipf-skewed as in
   `vllm_wideep.eplb.traces`): bytes per token each rank sends to other ranks, dispatch +
   combine, with the formulas `comm.base.TrafficCounters` counts by (row-count headers
   and capacity padding included), and the ratio to `allgather`.

   Rows per token sent to other ranks, tokens spread evenly over the R ranks:
       allgather      R - 1 (every other rank), each direction
       alltoall            distinct ranks among the token's experts, less its own rank
       capacity       (R - 1) * C / M: a full block of C rows per peer per call of M tokens;
                      C = M (the worst case, no overflow possible) and C = the largest
                      per-peer row count of the batch (the smallest C without overflow)
   For uniform routing over E experts, P(a given rank holds none of a token's k experts)
   is q = C(E - E/R, k) / C(E, k), so alltoall moves (R - 1)(1 - q) rows per token: the
   predicted allgather / alltoall factor is 1 / (1 - q).

2. Latency of dispatch + combine on CPU over gloo, EP 2 and 4 (one process per rank on
   this machine's cores), the same shapes, M tokens per rank, uniform routing, no expert
   compute (the received rows go straight back); also the counters' bytes per token,
   which must equal part 1's figures for the same routing.

3. fp8 dispatch accuracy: the MoE layer's output error from fp8 instead of bf16 input.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

HIDDEN = 7168
NUM_EXPERTS = 256
TOP_K = 8
DTYPE = torch.bfloat16
EP_SIZES = [2, 4, 8, 16, 32, 64]
TOKENS_PER_RANK = 128  # M, per rank per call (a decode batch)
ZIPF_ALPHA = 1.0


def sample_routing(num_tokens: int, skew: str, seed: int) -> torch.Tensor:
    """`[T, k]` int64 distinct experts per token; "uniform" or "zipf" (alpha 1, hot
    experts at random ids, the law of `vllm_wideep.eplb.traces`)."""
    g = torch.Generator().manual_seed(seed)
    if skew == "uniform":
        p = torch.ones(NUM_EXPERTS)
    else:
        p = torch.arange(1, NUM_EXPERTS + 1, dtype=torch.float64) ** -ZIPF_ALPHA
        p = p[torch.randperm(NUM_EXPERTS, generator=g)]
    return torch.multinomial(p.float().expand(num_tokens, -1), TOP_K, generator=g)


def row_bytes(fp8: bool = False) -> int:
    from vllm_wideep.comm.packing import RowFormat

    return RowFormat(HIDDEN, TOP_K, DTYPE, fp8=fp8).nbytes


def traffic_per_token(topk_ids: torch.Tensor, num_ranks: int) -> dict[str, float]:
    """Bytes per token sent to other ranks (dispatch + combine) for each backend; token t
    lives on rank t % R, calls carry M = TOKENS_PER_RANK tokens per rank."""
    R, M = num_ranks, TOKENS_PER_RANK
    T = topk_ids.shape[0] - topk_ids.shape[0] % (R * M)
    topk_ids = topk_ids[:T]
    owner = topk_ids // (NUM_EXPERTS // R)  # [T, k]
    hits = torch.zeros(T, R, dtype=torch.bool).scatter_(1, owner, True)
    src = torch.arange(T) % R
    remote = (hits.sum(1) - hits[torch.arange(T), src].long()).double()  # [T]
    out_row = HIDDEN * DTYPE.itemsize
    header = 8 * (R - 1) / M  # the row-count exchange (dispatch only), per token
    # per call: tokens [call * R * M, (call + 1) * R * M), rank r's tokens t % R == r
    per_call = hits.view(-1, M, R, R)  # [calls, m, src rank, dst rank]
    max_load = int(per_call.sum(1).max())  # most rows one rank sends one peer in a call
    rows = {
        "allgather": float(R - 1),
        "alltoall": remote.mean().item(),
    }
    result = {name: n * (row_bytes() + out_row) + header for name, n in rows.items()}
    result["alltoall_fp8"] = rows["alltoall"] * (row_bytes(fp8=True) + out_row) + header
    for name, C in (("capacity_worst", M), ("capacity_max_load", max_load)):
        result[name] = (R - 1) * ((C + 1) * row_bytes() + C * out_row) / M
    result["alltoall_remote_rows"] = rows["alltoall"]
    result["capacity_max_load_rows"] = max_load
    return result


def predicted_factor(num_ranks: int) -> float:
    """allgather / alltoall rows for uniform routing: 1 / (1 - q)."""
    per_rank = NUM_EXPERTS // num_ranks
    q = math.comb(NUM_EXPERTS - per_rank, TOP_K) / math.comb(NUM_EXPERTS, TOP_K)
    return 1.0 / (1.0 - q)


# --------------------------------------------------------------------------- latency


BACKEND_CASES = [
    ("alltoall", 0, "auto"),
    ("alltoall", 0, "fp8"),
    ("capacity", 0, "auto"),  # C = M: the worst case
    ("allgather", 0, "auto"),
]


def _latency_rank(rank, world_size, iters):
    """Median ms and bytes per token of each backend case (rank 0's view)."""
    import torch.distributed as dist

    from vllm_wideep.comm.registry import make_dispatcher

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(TOKENS_PER_RANK, HIDDEN, generator=g).to(DTYPE)
    ids = sample_routing(TOKENS_PER_RANK * world_size, "uniform", seed=0)
    ids = ids[rank::world_size]  # token t on rank t % R, as in traffic_per_token
    weights = torch.rand(TOKENS_PER_RANK, TOP_K, generator=g)
    out = {}
    for backend, capacity_tokens, dispatch_dtype in BACKEND_CASES:
        dispatcher = make_dispatcher(
            backend,
            capacity_tokens=capacity_tokens,
            dispatch_dtype=dispatch_dtype,
            group=dist.group.WORLD,
            slots_per_rank=NUM_EXPERTS // world_size,
            num_ranks=world_size,
            max_tokens_per_rank=TOKENS_PER_RANK,
        )
        times = []
        for i in range(iters + 2):
            dist.barrier()
            start = time.perf_counter()
            received = dispatcher.dispatch(x, ids, weights)
            dispatcher.combine(received.hidden_states, received.handle)
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank
            if i >= 2:  # warm-up
                times.append(elapsed.item())
        traffic = dispatcher.traffic.snapshot()
        sent = torch.tensor(
            [traffic["dispatch_sent_bytes"] + traffic["combine_sent_bytes"]], dtype=torch.float64
        )
        dist.all_reduce(sent)
        name = backend + ("_fp8" if dispatch_dtype == "fp8" else "")
        if backend == "capacity":
            name += "_worst"
        per_token = sent.item() / (traffic["calls"] * TOKENS_PER_RANK * world_size)
        out[name] = {"ms": 1e3 * statistics.median(times), "bytes_per_token": per_token}
    return out


def measure_latency(world_size: int, iters: int) -> dict:
    from tools.ranks import run_ranks

    return run_ranks(_latency_rank, world_size, iters)[0]


# --------------------------------------------------------------------------- fp8


def fp8_accuracy(seed: int = 0) -> dict[str, dict[str, float]]:
    """Relative error of an MoE layer's output when its input travels as fp8 with a scale
    per token and 128 columns (the dispatch format) instead of bf16, on random experts
    (H=1024, I=256, 32 experts, top-8, 512 tokens): `||y(fp8 x) - y(bf16 x)|| /
    ||y(bf16 x)||` over the batch, and the worst token. Two inputs: Gaussian, and Gaussian
    with 8 outlier channels 30x larger (as LLM activations have), which coarse scales handle
    worst. bf16 vs fp32 input is the yardstick."""
    from vllm_wideep.kernels.fp8 import dequantize_block_fp8, quantize_activations_fp8
    from vllm_wideep.kernels.torch_experts import moe_experts_torch

    g = torch.Generator().manual_seed(seed)
    H, inter, E, M = 1024, 256, 32, 512
    w13 = torch.randn(E, 2 * inter, H, generator=g) / H**0.5
    w2 = torch.randn(E, H, inter, generator=g) / inter**0.5
    ids = torch.stack([torch.randperm(E, generator=g)[:TOP_K] for _ in range(M)])
    weights = torch.softmax(torch.randn(M, TOP_K, generator=g), dim=1)

    def layer(x):
        return moe_experts_torch(x.float(), w13, w2, weights, ids).double()

    def errors(y, ref):
        token = (y - ref).norm(dim=1) / ref.norm(dim=1)
        return {"batch": ((y - ref).norm() / ref.norm()).item(), "worst_token": token.max().item()}

    out = {}
    gaussian = torch.randn(M, H, generator=g)
    outliers = gaussian.clone()
    outliers[:, torch.randperm(H, generator=g)[:8]] *= 30
    for name, x in (("gaussian", gaussian), ("outlier_channels", outliers)):
        x_bf16 = x.to(DTYPE)
        ref = layer(x_bf16)
        q, scale = quantize_activations_fp8(x_bf16)
        out[name] = {
            "fp8_vs_bf16": errors(layer(dequantize_block_fp8(q, scale, (1, 128)).to(DTYPE)), ref),
            "bf16_vs_fp32": errors(ref, layer(x)),
        }
    return out


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="docs/results/token_exchange_cpu.json")
    parser.add_argument("--tokens", type=int, default=16384, help="routed tokens sampled")
    parser.add_argument("--iters", type=int, default=10, help="timed calls per backend")
    args = parser.parse_args()

    print(
        f"DeepSeek-V3 shapes: H={HIDDEN} {str(DTYPE).removeprefix('torch.')}, "
        f"{NUM_EXPERTS} experts, top-{TOP_K}, M={TOKENS_PER_RANK} tokens per rank per call; "
        f"dispatch row {row_bytes()} B ({row_bytes(fp8=True)} B fp8), combine row "
        f"{HIDDEN * DTYPE.itemsize} B"
    )
    print("Bytes per token sent to other ranks, dispatch + combine, and ratio to allgather:\n")
    header = (
        "| routing | EP | allgather | alltoall (x) | alltoall fp8 (x) | capacity C=M (x) | "
        "capacity C=max load (x) | alltoall rows/token | predicted allgather/alltoall |"
    )
    print(header)
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    table = []
    for skew in ("uniform", "zipf"):
        topk_ids = sample_routing(args.tokens, skew, seed=1)
        for R in EP_SIZES:
            t = traffic_per_token(topk_ids, R)
            ag = t["allgather"]
            predicted = (
                predicted_factor(R) if skew == "uniform" else (R - 1) / t["alltoall_remote_rows"]
            )
            row = {"routing": skew, "ep": R, **t, "predicted_factor": predicted}
            table.append(row)

            def cell(name, t=t, ag=ag):
                return f"{t[name] / 1024:.1f} KiB ({t[name] / ag:.3f})"

            print(
                f"| {skew} | {R} | {ag / 1024:.1f} KiB | {cell('alltoall')} "
                f"| {cell('alltoall_fp8')} | "
                f"{cell('capacity_worst')} | {cell('capacity_max_load')} "
                f"| {t['alltoall_remote_rows']:.2f} | {predicted:.3f} |"
            )
    print(
        "\n(x) = bytes / allgather bytes. 'predicted' is 1 / (1 - q) for uniform routing and "
        "(R - 1) / rows per token of the zipf routing itself; ag / alltoall = 1 / (x of alltoall)."
    )

    latency = {}
    print(f"\nDispatch + combine on CPU over gloo, median of {args.iters} calls, slowest rank:\n")
    print("| EP | backend | ms | bytes/token (counters) | bytes/token (routing) |")
    print("|---:|---|---:|---:|---:|")
    for R in (2, 4):
        measured = measure_latency(R, args.iters)
        routing = traffic_per_token(sample_routing(TOKENS_PER_RANK * R, "uniform", seed=0), R)
        latency[R] = measured
        for name, m in measured.items():
            print(
                f"| {R} | {name} | {m['ms']:.1f} | {m['bytes_per_token']:.0f} "
                f"| {routing[name]:.0f} |"
            )

    accuracy = fp8_accuracy()
    print("\nfp8 dispatch: relative error of the MoE layer output (batch / worst token):\n")
    print("| input | fp8 vs bf16 dispatch | bf16 vs fp32 (yardstick) |")
    print("|---|---|---|")
    for name, e in accuracy.items():
        a, b = e["fp8_vs_bf16"], e["bf16_vs_fp32"]
        print(
            f"| {name} | {a['batch']:.4f} / {a['worst_token']:.4f} "
            f"| {b['batch']:.4f} / {b['worst_token']:.4f} |"
        )

    record = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}",
        "shapes": {"hidden": HIDDEN, "experts": NUM_EXPERTS, "top_k": TOP_K},
        "tokens_per_rank": TOKENS_PER_RANK,
        "traffic": table,
        "latency_gloo": latency,
        "fp8_accuracy": accuracy,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
