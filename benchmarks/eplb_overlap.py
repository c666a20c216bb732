"""What overlapping expert moves with the forward pass saves, on 2 gloo ranks (CPU).

Each step runs a stand-in forward pass (per local expert, a batch through the expert's
two GEMMs in float32, then a small all-reduce standing in for the token exchange) and
moves `--moves` expert slots per rank to the other rank (every step swaps back and forth
between two placements), three ways, in one run:

    plain      forward only (the baseline)
    sync       apply_moves, then the forward: the step waits for the bytes
    overlap    finish the moves begun at the last step, begin this step's, forward: the
               bytes travel during the forward (what `eplb_overlap` does)

    python benchmarks/eplb_overlap.py [--hidden 2048 --intermediate 768 --experts 16
                                       --moves 2 --tokens 32 --steps 12] [--json out.json]

Default expert: Qwen3-30B-A3B's (H 2048, I 768, bf16: 9.4 MB per slot). The moves use
the balancer's own process group, as the server does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from tools.ranks import run_ranks
from vllm_wideep.eplb.location import home_placement
from vllm_wideep.eplb.mover import apply_moves, begin_moves, finish_moves, plan_moves

WORLD = 2


def _rank_main(rank: int, world_size: int, args: argparse.Namespace) -> dict[str, float]:
    """Seconds per step of each mode on this rank."""
    torch.set_num_threads(1)
    mover_group = dist.new_group([0, 1], backend="gloo")
    slots = args.experts // WORLD + 1
    gen = torch.Generator().manual_seed(rank)
    w13 = torch.randn(slots, 2 * args.intermediate, args.hidden, generator=gen)  # [S, 2I, H]
    w2 = torch.randn(slots, args.hidden, args.intermediate, generator=gen)  # [S, H, I]
    weights = [w13.to(torch.bfloat16), w2.to(torch.bfloat16)]
    x = torch.randn(args.tokens, args.hidden, generator=gen)  # [T, H]
    sync_token = torch.zeros(1)

    def forward() -> None:
        for e in range(slots - 1):
            gate_up = x @ w13[e].T  # [T, 2I]
            act = torch.nn.functional.silu(gate_up[:, : args.intermediate])
            (act * gate_up[:, args.intermediate :]) @ w2[e].T  # [T, H]
        dist.all_reduce(sync_token)  # the token exchange's rendezvous

    # Two placements a step apart: the first `moves` slots of each rank swap experts
    # with the other rank's (all by P2P), and back.
    a = home_placement(args.experts, WORLD, slots)
    b = a.clone()
    for i in range(args.moves):
        b[i], b[slots + i] = a[slots + i], a[i]
    plans = [plan_moves(a, b, slots), plan_moves(b, a, slots)]

    def run(mode: str) -> float:
        in_flight = None
        dist.barrier()
        start = time.perf_counter()
        for step in range(args.steps):
            plan = plans[step % 2]
            if mode == "sync":
                assert apply_moves(plan, weights, rank, WORLD, mover_group)
            elif mode == "overlap":
                if in_flight is not None:
                    assert finish_moves(in_flight)
                in_flight = begin_moves(plan, weights, rank, WORLD, mover_group)
            forward()
        if in_flight is not None:
            assert finish_moves(in_flight)
        dist.barrier()
        return (time.perf_counter() - start) / args.steps

    run("overlap")  # warm up every path
    times = {mode: run(mode) for mode in ("plain", "sync", "overlap", "plain")}
    times["plain"] = min(times["plain"], run("plain"))
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--moves", type=int, default=2, help="slots per rank moved per step")
    parser.add_argument("--tokens", type=int, default=32, help="rows per expert per forward")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--json")
    args = parser.parse_args()

    per_rank = run_ranks(_rank_main, WORLD, args, timeout_s=900)
    # A step ends when its slowest rank ends: the max over ranks.
    times = {mode: max(rank[mode] for rank in per_rank) for mode in per_rank[0]}
    slot_mb = (3 * args.intermediate * args.hidden * 2) / 1e6
    plain = times["plain"]
    print(
        f"2 gloo ranks, 1 thread each; expert H={args.hidden} I={args.intermediate} bf16 "
        f"({slot_mb:.1f} MB/slot), {args.moves} slots/rank moved per step "
        f"({args.moves * slot_mb:.1f} MB each way), forward: {args.experts // WORLD} local "
        f"experts x {args.tokens} rows"
    )
    print(f"{'mode':8s} {'ms/step':>9s} {'x plain':>8s} {'extra ms':>9s}")
    for mode in ("plain", "sync", "overlap"):
        t = times[mode]
        print(f"{mode:8s} {t * 1e3:9.1f} {t / plain:8.2f} {(t - plain) * 1e3:9.1f}")
    saved = 1 - (times["overlap"] - plain) / (times["sync"] - plain)
    print(f"overlap hides {saved:.0%} of the synchronous move's extra time")
    if args.json:
        summary = {"args": vars(args), "seconds_per_step": times, "hidden_fraction": saved}
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
