"""Planning time of all layers at DeepSeek-V3's size: ours against vLLM's DeepSeek policy.

One run, one thread (torch.set_num_threads(1)), on the same loads: L = 58 MoE layers x
E = 256 experts, 8192 tokens x top-8 routed choices per layer window, EP 32 with S = 9
slots per rank and EP 64 with S = 5 (one redundant slot per rank), Zipf 1.0 and 1.2.

    fresh        plan_placement(load, R, S) against DefaultEplbPolicy.rebalance_experts
    incremental  the next window of a drifting trace (traces.drifting_load, drift 0.02),
                 planned from each policy's own fresh plan of the previous window:
                 plan_placement(..., current=prev) against rebalance_experts(...,
                 old_global_expert_indices=prev)

    time          median of `--repeats` calls, seconds for all L layers; the two policies'
                  calls alternate (ours, vLLM's, ours, ...) so a change in machine load
                  during the run weighs on both alike
    balancedness  mean / max rank load, mean over layers (min over layers in brackets)
    moved         slots whose expert changed, incremental only, all layers

    python benchmarks/eplb_plan.py [--layers 58] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.eplb import deepseek
from vllm_wideep.eplb import Placement, plan_placement
from vllm_wideep.eplb.traces import drifting_load

E = 256
TOKENS = 8192 * 8
SHAPES = ((32, 9), (64, 5))  # (R, S): 288 and 320 slots per layer
ALPHAS = (1.0, 1.2)


POLICIES = (("ours", plan_placement), ("vllm", deepseek))


def timed(calls, repeats):
    """calls: {name: zero-argument function}. Returns {name: (result, median seconds)} of
    `repeats` rounds, each round calling every function once, in turn."""
    seconds = {name: [] for name in calls}
    results = {}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            results[name] = call()
            seconds[name].append(time.perf_counter() - start)
    return {name: (results[name], statistics.median(seconds[name])) for name in calls}


def row(alpha, num_ranks, slots_per_rank, layers, repeats):
    trace = drifting_load(2, layers, E, TOKENS, alpha, 0.02, seed=num_ranks + int(alpha * 10))
    out = {"alpha": alpha, "ep": num_ranks, "slots_per_rank": slots_per_rank}
    fresh = timed(
        {name: (lambda p=p: p(trace[0], num_ranks, slots_per_rank)) for name, p in POLICIES},
        repeats,
    )
    inc = timed(
        {
            name: (lambda p=p, prev=fresh[name][0]: p(trace[1], num_ranks, slots_per_rank, prev))
            for name, p in POLICIES
        },
        repeats,
    )
    for name, _ in POLICIES:
        (fresh_plan, fresh_s), (inc_plan, inc_s) = fresh[name], inc[name]
        fresh_bal = Placement(fresh_plan, num_ranks).balancedness(trace[0])
        inc_bal = Placement(inc_plan, num_ranks).balancedness(trace[1])
        out[name] = {
            "fresh_s": fresh_s,
            "incremental_s": inc_s,
            "fresh_bal": fresh_bal.mean().item(),
            "fresh_bal_min": fresh_bal.min().item(),
            "incremental_bal": inc_bal.mean().item(),
            "incremental_bal_min": inc_bal.min().item(),
            "moved": int((inc_plan != fresh_plan).sum()),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=58)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    print(f"L={args.layers} layers, E={E}, median of {args.repeats}, one thread")
    print(
        f"{'zipf':>4} {'EP':>3} {'S':>2} {'plan':>11} | {'ours s':>7} {'vllm s':>7} "
        f"{'ratio':>5} | {'bal ours (min)':>15} {'bal vllm (min)':>15} | "
        f"{'moved ours':>10} {'vllm':>5}"
    )
    rows = []
    for alpha in ALPHAS:
        for num_ranks, slots_per_rank in SHAPES:
            r = row(alpha, num_ranks, slots_per_rank, args.layers, args.repeats)
            rows.append(r)
            ours, vllm = r["ours"], r["vllm"]
            for plan in ("fresh", "incremental"):
                moved = f"{ours['moved']:>10} {vllm['moved']:>5}" if plan == "incremental" else ""
                print(
                    f"{alpha:>4} {num_ranks:>3} {slots_per_rank:>2} {plan:>11} | "
                    f"{ours[plan + '_s']:7.3f} {vllm[plan + '_s']:7.3f} "
                    f"{ours[plan + '_s'] / vllm[plan + '_s']:5.2f} | "
                    f"{ours[plan + '_bal']:7.4f} ({ours[plan + '_bal_min']:.3f}) "
                    f"{vllm[plan + '_bal']:7.4f} ({vllm[plan + '_bal_min']:.3f}) | {moved}"
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"layers": args.layers, "repeats": args.repeats, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
