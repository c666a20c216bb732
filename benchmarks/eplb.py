"""EPLB policy: balancedness and slots moved, ours against DeepSeek's and no balancing.

Placements, all over R ranks x S slots (S = E / R + redundant):
    ours      vllm_wideep.eplb.plan_placement
    deepseek  vLLM's DeepSeek EPLB port, global policy (DefaultEplbPolicy, 1 group,
              1 node); with its previous output as `old_global_expert_indices` on drift
    none      slot s holds expert s % E (linear, spare slots repeat experts 0, 1, ...)

balancedness = mean / max tokens per rank, averaged over layers (1 = perfect).
Drift: a trace of T windows whose hot experts move (traces.drifting_load); each window
is planned from the previous one's placement. moved = fraction of slots whose expert
changed per rebalance: ours with `current`, ours from scratch, DeepSeek's.
Ratios are to DeepSeek's (balancedness) and to ours from scratch (moved). Moved bytes
per rebalance are for DeepSeek-V3's experts (3 x 7168 x 2048 bf16 = 88 MB per slot), per
layer. Recorded traces (`--trace load.json`, written by `vllm-wideep eplb record` or
`make eval`) are planned at every EP size that divides their experts. Needs vllm.

    python benchmarks/eplb.py [--layers 4] [--steps 6] [--trace load.json] [--json out.json]
"""

import argparse
import json
import time

import torch
from vllm.distributed.eplb.policy.default import DefaultEplbPolicy

from vllm_wideep.eplb import Placement, plan_placement
from vllm_wideep.eplb.files import read_load
from vllm_wideep.eplb.traces import drifting_load, zipf_load

E = 256
TOKENS = 8192 * 8  # routed choices per window: 8192 tokens x top-8
ALPHAS = (0.8, 1.0, 1.2)
EP_SIZES = (8, 32, 64)
REDUNDANT = (0, 1, 2)


def deepseek(load, num_ranks, slots_per_rank, old=None):
    return DefaultEplbPolicy.rebalance_experts(
        load, num_ranks * slots_per_rank, 1, 1, num_ranks, old_global_expert_indices=old
    )


SLOT_BYTES = 3 * 7168 * 2048 * 2  # one DeepSeek-V3 expert, bf16


def linear(num_layers, num_ranks, slots_per_rank, num_experts=E):
    return (torch.arange(num_ranks * slots_per_rank) % num_experts).expand(num_layers, -1)


def balancedness(phy2log, load, num_ranks):
    return Placement(phy2log, num_ranks).balancedness(load).mean().item()


def zipf_row(alpha, num_ranks, redundant, layers):
    slots = E // num_ranks + redundant
    load = zipf_load(layers, E, TOKENS, alpha, seed=int(alpha * 100) + num_ranks)
    t0 = time.perf_counter()
    ours = plan_placement(load, num_ranks, slots)
    ours_ms = (time.perf_counter() - t0) * 1e3 / layers
    return {
        "trace": f"zipf {alpha}",
        "ep": num_ranks,
        "redundant": redundant,
        "ours": balancedness(ours, load, num_ranks),
        "deepseek": balancedness(deepseek(load, num_ranks, slots), load, num_ranks),
        "none": balancedness(linear(layers, num_ranks, slots), load, num_ranks),
        "ms_per_layer": ours_ms,
    }


def recorded_rows(path):
    """Our policy, DeepSeek's and none on a recorded load, at EP sizes dividing its E."""
    record = read_load(path)
    load = record.load.float()
    layers, num_experts = load.shape
    rows = []
    for num_ranks in (2, 4, 8, 16, 32, 64):
        if num_experts % num_ranks or num_ranks > num_experts:
            continue
        for redundant in REDUNDANT:
            slots = num_experts // num_ranks + redundant
            rows.append(
                {
                    "trace": f"recorded {record.model.architecture}",
                    "ep": num_ranks,
                    "redundant": redundant,
                    "ours": balancedness(plan_placement(load, num_ranks, slots), load, num_ranks),
                    "deepseek": balancedness(deepseek(load, num_ranks, slots), load, num_ranks),
                    "none": balancedness(
                        linear(layers, num_ranks, slots, num_experts), load, num_ranks
                    ),
                }
            )
    return rows


def drift_row(alpha, num_ranks, redundant, layers, steps):
    slots = E // num_ranks + redundant
    trace = drifting_load(steps + 1, layers, E, TOKENS, alpha, 0.02, seed=num_ranks)
    ours = fresh_prev = plan_placement(trace[0], num_ranks, slots)
    ds = deepseek(trace[0], num_ranks, slots)
    moved = {"ours": 0, "fresh": 0, "deepseek": 0}
    bal = {"ours": 0.0, "fresh": 0.0, "deepseek": 0.0}
    for load in trace[1:]:
        new_ours = plan_placement(load, num_ranks, slots, current=ours)
        fresh = plan_placement(load, num_ranks, slots)
        new_ds = deepseek(load, num_ranks, slots, old=ds)
        moved["ours"] += int((new_ours != ours).sum())
        moved["fresh"] += int((fresh != fresh_prev).sum())
        moved["deepseek"] += int((new_ds != ds).sum())
        for name, p in (("ours", new_ours), ("fresh", fresh), ("deepseek", new_ds)):
            bal[name] += balancedness(p, load, num_ranks) / steps
        ours, fresh_prev, ds = new_ours, fresh, new_ds
    total = steps * layers * num_ranks * slots
    return {
        "trace": f"drift {alpha}",
        "ep": num_ranks,
        "redundant": redundant,
        "ours": bal["ours"],
        "fresh": bal["fresh"],
        "deepseek": bal["deepseek"],
        "moved_ours": moved["ours"] / total,
        "moved_fresh": moved["fresh"] / total,
        "moved_deepseek": moved["deepseek"] / total,
        "gb_per_layer_ours": moved["ours"] / (steps * layers) * SLOT_BYTES / 1e9,
        "gb_per_layer_fresh": moved["fresh"] / (steps * layers) * SLOT_BYTES / 1e9,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6, help="rebalances per drift trace")
    parser.add_argument("--trace", action="append", default=[], help="a recorded load file")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()

    recorded = [row for path in args.trace for row in recorded_rows(path)]
    if recorded:
        print(f"{'trace':>32} {'EP':>3} {'red':>3} | {'ours':>6} {'deepseek':>8} {'none':>6}")
    for r in recorded:
        print(
            f"{r['trace']:>32} {r['ep']:>3} {r['redundant']:>3} | {r['ours']:6.4f} "
            f"{r['deepseek']:8.4f} {r['none']:6.4f}"
        )

    print(f"E={E}, {TOKENS} routed choices per layer window, {args.layers} layers")
    print(
        f"{'trace':>10} {'EP':>3} {'red':>3} | {'ours':>6} {'deepseek':>8} {'none':>6} | "
        f"{'ours/ds':>7} {'ours/none':>9} | {'ms/layer':>8}"
    )
    zipf = []
    for alpha in ALPHAS:
        for ep in EP_SIZES:
            for red in REDUNDANT:
                r = zipf_row(alpha, ep, red, args.layers)
                zipf.append(r)
                print(
                    f"{r['trace']:>10} {ep:>3} {red:>3} | {r['ours']:6.4f} {r['deepseek']:8.4f} "
                    f"{r['none']:6.4f} | {r['ours'] / r['deepseek']:7.3f} "
                    f"{r['ours'] / r['none']:9.2f} | {r['ms_per_layer']:8.1f}"
                )

    print(
        f"\ndrift 0.02 ({round(0.02 * E)} popularity swaps per layer per window), "
        f"{args.steps} rebalances; moved = fraction of slots changed per rebalance"
    )
    print(
        f"{'trace':>10} {'EP':>3} {'red':>3} | {'bal ours':>8} {'fresh':>6} {'ds':>6} | "
        f"{'moved ours':>10} {'fresh':>6} {'ds':>6} | {'ours/fresh':>10} {'ours/ds':>7} | "
        f"{'GB/layer ours':>13} {'fresh':>6}"
    )
    drift = []
    for alpha in (1.0, 1.2):
        for ep in EP_SIZES:
            for red in REDUNDANT:
                r = drift_row(alpha, ep, red, args.layers, args.steps)
                drift.append(r)
                print(
                    f"{r['trace']:>10} {ep:>3} {red:>3} | {r['ours']:8.4f} {r['fresh']:6.4f} "
                    f"{r['deepseek']:6.4f} | {r['moved_ours']:10.3f} {r['moved_fresh']:6.3f} "
                    f"{r['moved_deepseek']:6.3f} | "
                    f"{r['moved_ours'] / max(r['moved_fresh'], 1e-9):10.3f} "
                    f"{r['moved_ours'] / max(r['moved_deepseek'], 1e-9):7.3f} | "
                    f"{r['gb_per_layer_ours']:13.2f} {r['gb_per_layer_fresh']:6.2f}"
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"recorded": recorded, "zipf": zipf, "drift": drift, "layers": args.layers},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
