"""The cost of an online rebalance step, as a ratio to a plain decode step, on CPU.

Serves a tiny model with wide EP at EP=2 (TP=2, `vllm.LLM`) three times in one run, each
in its own process: the balancer off, and re-planning every `--interval` steps with every
layer moved at once (the most a step can carry), with the moves overlapped with the next
forward pass (`eplb_overlap` on) and without (off). Same prompts, greedy.

    plain step       = wall time of the timed generate, balancer off / engine steps
    rebalance step   = (wall time on - wall time off) / re-planning steps
    also: the balancer's own timer (seconds its steps spent beginning and finishing moves
          per re-planning step, max over ranks)
    pause            = the longest step hook on a busy step (starting a plan, voting on
                       it, beginning or finishing moves) minus the mean plain hook, max
                       over ranks and the whole run (`wideep_stats` "eplb_steps"), as a
                       ratio to a plain step; also the mean busy hook's excess, and the
                       staging reserved per rank

    python benchmarks/eplb_step_cost.py [--arch qwen3_moe] [--tokens 48] [--json out.json]

Tiny models move tiny experts (qwen3_moe: 98 KB per slot), so the ratio here bounds the
fixed cost of a rebalance (plan, collectives, verification), not the bandwidth cost of
moving DeepSeek-sized experts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [f"Request {i}: the quick brown fox jumps over" for i in range(8)]


def child(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=spec["model"],
        tensor_parallel_size=2,
        dtype="float32",
        max_model_len=256,
        enforce_eager=True,
        seed=0,
        additional_config={"wideep": spec["wideep"]},
    )
    params = SamplingParams(temperature=0, max_tokens=spec["tokens"], ignore_eos=True)
    llm.generate(PROMPTS[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm up
    before = llm.collective_rpc("wideep_stats")
    start = time.perf_counter()
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    after = llm.collective_rpc("wideep_stats")
    return {
        "seconds": seconds,
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "eplb_before": before,
        "eplb_after": after,
    }


def _moves(before: list[dict], after: list[dict]) -> tuple[int, float]:
    """(rebalances of all layers, seconds moving weights: max over ranks) during the run."""
    rebalances, seconds = 0, 0.0
    for b, a in zip(
        sorted(before, key=lambda r: r["ep_rank"]),
        sorted(after, key=lambda r: r["ep_rank"]),
        strict=True,
    ):
        layers = a["eplb"]
        rank_rebalances = sum(layers[n]["rebalances"] - b["eplb"][n]["rebalances"] for n in layers)
        rank_seconds = sum(layers[n]["seconds"] - b["eplb"][n]["seconds"] for n in layers)
        rebalances = max(rebalances, rank_rebalances)
        seconds = max(seconds, rank_seconds)
    return rebalances, seconds


def _pause(after: list[dict]) -> tuple[float, float, float]:
    """(longest busy step hook - mean plain step hook, mean busy - mean plain, both max
    over ranks, in seconds; staging bytes per rank)."""
    longest = mean = 0.0
    for rank in after:
        steps = rank["eplb_steps"]
        plain = steps["plain_seconds"] / max(steps["plain_steps"], 1)
        longest = max(longest, steps["busy_max_seconds"] - plain)
        mean = max(mean, steps["busy_seconds"] / max(steps["busy_steps"], 1) - plain)
    return longest, mean, max(rank["staging_bytes"] for rank in after)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="qwen3_moe")
    parser.add_argument("--tokens", type=int, default=48, help="output tokens per prompt")
    parser.add_argument("--interval", type=int, default=2)
    parser.add_argument("--json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return 0

    sys.path.insert(0, str(REPO))
    from tools.launch import e2e_env, run_group
    from vllm_wideep.tiny_models import build_tiny_model

    model = str(build_tiny_model(REPO / ".cache" / "tiny-models" / args.arch, args.arch))
    online = {
        "enabled": True,
        "redundant_experts": 2,
        "eplb": "online",
        "eplb_interval": args.interval,
        "eplb_layers_per_step": 64,
        "eplb_window": 8,
    }
    configs = {
        "off": {"enabled": True, "redundant_experts": 2},
        "online": {**online, "eplb_overlap": "on"},
        "online, no overlap": {**online, "eplb_overlap": "off"},
    }
    results = {}
    for name, wideep in configs.items():
        print(f"[{name}] starting EP=2 (TP=2) engine ...", flush=True)
        spec = {"model": model, "wideep": wideep, "tokens": args.tokens}
        output = run_group(
            [sys.executable, __file__, "--child", json.dumps(spec)], e2e_env(2), timeout=900
        )
        line = next(x for x in output.splitlines() if x.startswith("RESULT "))
        results[name] = json.loads(line.removeprefix("RESULT "))
        print(f"[{name}] {results[name]['seconds']:.2f} s", flush=True)

    steps = args.tokens  # one prefill step and tokens - 1 decode steps, all prompts batched
    plain = results["off"]["seconds"] / steps
    rebalance_steps = steps // args.interval
    summary = {"arch": args.arch, "steps": steps, "plain_step_ms": plain * 1e3}
    summary["rebalance_steps"] = rebalance_steps
    print(f"\n{args.arch}, EP=2 (TP=2), 8 prompts x {args.tokens} tokens, fp32")
    print(f"plain step (balancer off)              {plain * 1e3:8.1f} ms")
    for name in ("online", "online, no overlap"):
        run = results[name]
        extra = (run["seconds"] - results["off"]["seconds"]) / rebalance_steps
        layer_moves, moving = _moves(run["eplb_before"], run["eplb_after"])
        pause, mean_pause, staging = _pause(run["eplb_after"])
        summary[name] = {
            "pause_ms": pause * 1e3,
            "pause_per_plain_step": pause / plain,
            "mean_pause_ms": mean_pause * 1e3,
            "staging_bytes_per_rank": staging,
            "layer_moves": layer_moves,
            "extra_ms_per_rebalance_step_wall": extra * 1e3,
            "moving_ms_per_rebalance_step": moving / rebalance_steps * 1e3,
            "same_tokens": results["off"]["tokens"] == run["tokens"],
        }
        print(f"[{name}] {layer_moves} layer moves in {rebalance_steps} re-planning steps")
        print(
            f"  extra wall time per re-planning step {extra * 1e3:8.1f} ms "
            f"= {extra / plain:.2f} x a plain step"
        )
        print(
            f"  balancer's own time                  {moving / rebalance_steps * 1e3:8.1f} ms "
            f"= {moving / rebalance_steps / plain:.2f} x a plain step"
        )
        print(
            f"  longest pause a rebalance added      {pause * 1e3:8.1f} ms "
            f"= {pause / plain:.2f} x a plain step"
        )
        print(
            f"  mean pause of a busy step            {mean_pause * 1e3:8.1f} ms "
            f"= {mean_pause / plain:.2f} x a plain step"
        )
        print(f"  staging reserved per rank            {staging / 2**10:8.1f} KiB")
        print(f"  same tokens as with the balancer off: {summary[name]['same_tokens']}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
