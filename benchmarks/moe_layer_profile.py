"""One MoE layer call on CPU, stage by stage: wide EP against stock vLLM's CPU MoE.

    python benchmarks/moe_layer_profile.py [--json docs/results/moe_layer_profile_cpu.json]
        [--shapes tiny-qwen3,tiny-dsv3,h1024,h2048] [--tokens 1,16,128,512] [--ep 1,2]

Stages of one layer call on one rank, M tokens per rank, bf16 activations:

    route     router logits (x @ gate^T) and vLLM's CPU router, `CPURouter.select_experts`
              (softmax top-k; grouped top-k with a correction bias for DeepSeek-V3): the
              same code for both
    dispatch  wide EP: `WideEPPrepareAndFinalize.prepare`: slot recording, `plan_routes`,
              row packing, the two `all_to_all_single` calls (gloo), unpacking
    experts   wide EP: `WideEPExperts.apply`, i.e. moe_experts(backend="torch") on this
              rank's E / EP experts; stock: `cpu_fused_moe` on all E experts (weights
              prepacked once, as `CPUUnquantizedExperts` does after loading)
    combine   wide EP: `WideEPPrepareAndFinalize.finalize`: the return `all_to_all_single`
              and the weighted sum per token

Stock is one rank holding all E experts with its M tokens: TP=1, or one rank of a DP
deployment without EP. Wide EP at EP=R: each of R ranks holds M tokens and E / R experts,
so a rank computes about as many (token, expert) rows as stock does; `wide / stock` is the
price of the exchange and of the experts backend. vLLM's modular-kernel glue around the
stages (workspace, no-op prepare of stock) is not timed.

Every rank runs one thread (`torch.set_num_threads(1)`), one rank per core, as vLLM's CPU
workers do with two ranks on two cores. EP=1 runs in this process (a one-rank gloo group:
the exchange is a local copy); EP=2 runs in two spawned processes, which time wide EP and
stock alternately on the same tokens, both ranks at once. A stage's figure is the median
over calls of the ranks' mean; total = the sum of the stages. The JSON also holds
`max_abs_diff`, the largest |wide - stock| output difference (bf16 rounding only).

A second loop times the exchange's steps one by one (`time_exchange_parts`): dispatch =
record (per-expert load counts for EPLB) + plan (`plan_routes`) + pack (gather and
`RowFormat.pack`) + exchange (row counts, then rows: two `all_to_all_single`) + unpack;
combine = return (`all_to_all_single` back) + sum (`index_add_` per token, copy out);
traffic = both stages' `TrafficCounters` updates (bytes moved, for `wideep_stats`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
import types
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

WIDE_STAGES = ("route", "dispatch", "experts", "combine")
STOCK_STAGES = ("route", "experts")
# dispatch = record .. unpack, combine = return + sum, and both count traffic
EXCHANGE_PARTS = ("record", "plan", "pack", "exchange", "unpack", "return", "sum", "traffic")
DTYPE = torch.bfloat16


@dataclass(frozen=True)
class MoEShape:
    """One MoE layer: H hidden, I expert intermediate, E routed experts, top-k; `grouped`
    = DeepSeek-V3 routing (sigmoid, 4 groups, top-2 groups, correction bias, x 2.5)."""

    name: str
    hidden: int
    intermediate: int
    experts: int
    top_k: int
    grouped: bool = False


SHAPES = {
    s.name: s
    for s in (
        MoEShape("tiny-qwen3", 128, 64, 16, 4),  # the tiny qwen3_moe (and mixtral-like)
        MoEShape("tiny-dsv3", 128, 64, 16, 4, grouped=True),  # the tiny deepseek_v3
        MoEShape("h1024", 1024, 512, 16, 4),
        MoEShape("h2048", 2048, 768, 64, 8),  # Qwen3-30B-A3B's expert shape, 64 of its 128
    )
}


def make_router(shape: MoEShape, gen: torch.Generator):
    from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter

    if not shape.grouped:
        return CPURouter(top_k=shape.top_k, global_num_experts=shape.experts, renormalize=True)
    return CPURouter(
        top_k=shape.top_k,
        global_num_experts=shape.experts,
        use_grouped_topk=True,
        num_expert_group=4,
        topk_group=2,
        scoring_func="sigmoid",
        routed_scaling_factor=2.5,
        e_score_correction_bias=0.1 * torch.randn(shape.experts, generator=gen),
    )


@dataclass
class RankLayer:
    """One rank's copy of a layer: full weights for stock, its E / R slots for wide EP."""

    shape: MoEShape
    gate: torch.Tensor  # [E, H]
    w13: torch.Tensor  # [E, 2I, H]
    w2: torch.Tensor  # [E, H, I]
    w13_packed: torch.Tensor  # cpu_prepack_moe_weight(w13)
    w2_packed: torch.Tensor
    router: object

    @classmethod
    def build(cls, shape: MoEShape) -> RankLayer:
        from vllm._custom_ops import cpu_prepack_moe_weight

        gen = torch.Generator().manual_seed(0)  # the same layer on every rank
        H, inter, E = shape.hidden, shape.intermediate, shape.experts
        gate = (2 * torch.randn(E, H, generator=gen) / H**0.5).to(DTYPE)
        w13 = (torch.randn(E, 2 * inter, H, generator=gen) / H**0.5).to(DTYPE)
        w2 = (torch.randn(E, H, inter, generator=gen) / inter**0.5).to(DTYPE)
        return cls(
            shape, gate, w13, w2,
            cpu_prepack_moe_weight(w13, ISA), cpu_prepack_moe_weight(w2, ISA),
            make_router(shape, gen),
        )  # fmt: skip


ISA = "amx" if torch.cpu._is_amx_tile_supported() else "vec"


class WideEPLayer:
    """The wide-EP stages of `WideEPMoERunner` on this rank, built from the plugin's own
    prepare/finalize and experts code."""

    def __init__(self, layer: RankLayer, group, rank: int, num_ranks: int):
        from vllm_wideep.comm.alltoall import AllToAllDispatcher
        from vllm_wideep.eplb.location import ExpertSlots
        from vllm_wideep.kernels import SILU, WeightCache
        from vllm_wideep.layer.prepare_finalize import TokenSlice, WideEPPrepareAndFinalize

        E = layer.shape.experts
        per_rank = E // num_ranks
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        self.w13, self.w2 = layer.w13[mine], layer.w2[mine]  # views: no copy
        slots = ExpertSlots.create("profile", [self.w13, self.w2], E, num_ranks, rank, routed=False)
        dispatcher = AllToAllDispatcher(group=group, slots_per_rank=per_rank, num_ranks=num_ranks)
        self.prepare_finalize = WideEPPrepareAndFinalize(
            dispatcher, TokenSlice(0, 1), num_ranks, slots
        )
        # `WideEPExperts.apply` reads only these attributes of its instance.
        self.experts_state = types.SimpleNamespace(
            backend="torch",
            tokens_per_slot=slots.tokens_per_slot,
            weight_cache=WeightCache(),
            fp8=None,
            expert_w13_bias=None,
            expert_w2_bias=None,
            expert_activation=SILU,
        )
        self.num_experts = E

    def dispatch(self, x, topk_weights, topk_ids):
        return self.prepare_finalize.prepare(
            x, topk_weights, topk_ids, self.num_experts, None, False, None
        )

    def experts(self, received):
        from vllm_wideep.layer.experts import WideEPExperts

        hidden, _, _, ids, weights = received
        out = torch.empty_like(hidden)
        WideEPExperts.apply(
            self.experts_state,
            output=out,
            hidden_states=hidden,
            w1=self.w13,
            w2=self.w2,
            topk_weights=weights,
            topk_ids=ids,
            activation=None,
            global_num_experts=self.num_experts,
            expert_map=None,
            a1q_scale=None,
            a2_scale=None,
            workspace13=None,
            workspace2=None,
            expert_tokens_meta=None,
            apply_router_weight_on_input=False,
        )
        return out

    def combine(self, output, expert_output):
        from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import (
            TopKWeightAndReduceNoOP,
        )

        self.prepare_finalize.finalize(
            output, expert_output, None, None, False, TopKWeightAndReduceNoOP()
        )
        return output


def _route(layer: RankLayer, x):
    logits = torch.nn.functional.linear(x, layer.gate)
    return layer.router.select_experts(x, logits)


def time_wide(layer: RankLayer, wide: WideEPLayer, x) -> tuple[dict[str, float], torch.Tensor]:
    out = torch.empty_like(x)
    t0 = time.perf_counter()
    topk_weights, topk_ids = _route(layer, x)
    t1 = time.perf_counter()
    received = wide.dispatch(x, topk_weights, topk_ids)
    t2 = time.perf_counter()
    expert_out = wide.experts(received)
    t3 = time.perf_counter()
    wide.combine(out, expert_out)
    t4 = time.perf_counter()
    times = {"route": t1 - t0, "dispatch": t2 - t1, "experts": t3 - t2, "combine": t4 - t3}
    return times, out


def time_stock(layer: RankLayer, x) -> tuple[dict[str, float], torch.Tensor]:
    from vllm._custom_ops import cpu_fused_moe

    out = torch.empty_like(x)
    t0 = time.perf_counter()
    topk_weights, topk_ids = _route(layer, x)
    t1 = time.perf_counter()
    cpu_fused_moe(
        out, x, layer.w13_packed, layer.w2_packed, None, None, topk_weights, topk_ids,
        "silu", ISA,
    )  # fmt: skip
    t2 = time.perf_counter()
    return {"route": t1 - t0, "experts": t2 - t1}, out


def time_exchange_parts(wide: WideEPLayer, x, topk_weights, topk_ids) -> dict[str, float]:
    """The steps of `AllToAllDispatcher.dispatch` and `.combine`, timed one by one (the
    same calls; the traffic counters of both, done in between there, timed last)."""
    from vllm_wideep.comm.exchange import (
        combine_traffic,
        dispatch_traffic,
        exchange_rows,
        return_rows,
    )
    from vllm_wideep.comm.packing import RowFormat
    from vllm_wideep.comm.routing import plan_routes
    from vllm_wideep.eplb.stats import record

    pf = wide.prepare_finalize
    d = pf.dispatcher
    t = [time.perf_counter()]
    record(pf.slots.step_counts, topk_ids)
    t.append(time.perf_counter())
    plan = plan_routes(topk_ids, topk_weights, d.slots_per_rank, d.num_ranks)
    t.append(time.perf_counter())
    fmt = RowFormat.of(x, topk_ids, d.dispatch_dtype)
    send = fmt.pack(x[plan.token_index], plan.local_ids, plan.weights)
    t.append(time.perf_counter())
    recv, exchange = exchange_rows(send, plan.send_counts, d.group)
    t.append(time.perf_counter())
    hidden, _, _, _ = fmt.unpack(recv)
    t.append(time.perf_counter())
    returned = return_rows(hidden, exchange, d.group)  # stands in for the experts' rows
    t.append(time.perf_counter())
    out = torch.zeros(x.shape, dtype=torch.float32)
    out.index_add_(0, plan.token_index, returned.float())
    torch.empty_like(x).copy_(out)  # finalize's copy into the layer output
    t.append(time.perf_counter())
    d.traffic.add(dispatch_traffic(exchange, d.rank, d.num_ranks, fmt.nbytes, x.device))
    d.traffic.add(combine_traffic(exchange, d.rank, returned, calls=1))
    t.append(time.perf_counter())
    return {name: t[i + 1] - t[i] for i, name in enumerate(EXCHANGE_PARTS)}


def profile_rank(
    rank: int,
    num_ranks: int,
    shapes: list[MoEShape],
    tokens: list[int],
    budget_s: float,
    min_calls: int = 3,
    max_calls: int = 100,
) -> list[dict]:
    """Time every (shape, M) on this rank of the default process group; every rank must
    call it with the same arguments. Returns per-call stage times in ms."""
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    group = dist.group.WORLD
    rows = []
    for shape in shapes:
        layer = RankLayer.build(shape)
        wide = WideEPLayer(layer, group, rank, num_ranks)
        for M in tokens:
            gen = torch.Generator().manual_seed(1000 * rank + M)
            x = torch.randn(M, shape.hidden, generator=gen).to(DTYPE)
            for _ in range(2):  # warm-up, and the outputs to compare
                dist.barrier()
                _, wide_out = time_wide(layer, wide, x)
                start = time.perf_counter()
                _, stock_out = time_stock(layer, x)
                dist.barrier()
                time_wide(layer, wide, x)
                per_call = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            diff = (wide_out.float() - stock_out.float()).abs().max()
            dist.all_reduce(per_call, op=dist.ReduceOp.MAX)  # the ranks agree on the count
            dist.all_reduce(diff, op=dist.ReduceOp.MAX)
            calls = int(min(max_calls, max(min_calls, budget_s / per_call.item())))
            wide_times, stock_times = [], []
            for _ in range(calls):  # alternate, so a change in load hits both
                dist.barrier()
                wide_times.append(time_wide(layer, wide, x)[0])
                stock_times.append(time_stock(layer, x)[0])
            parts = []
            routed = _route(layer, x)
            for _ in range(calls):
                dist.barrier()
                parts.append(time_exchange_parts(wide, x, *routed))
            rows.append(
                {
                    "shape": shape.name,
                    "M": M,
                    "ep": num_ranks,
                    "calls": calls,
                    "max_abs_diff": diff.item(),
                    "wide_ms": {s: [1e3 * t[s] for t in wide_times] for s in WIDE_STAGES},
                    "stock_ms": {s: [1e3 * t[s] for t in stock_times] for s in STOCK_STAGES},
                    "parts_ms": {s: [1e3 * t[s] for t in parts] for s in EXCHANGE_PARTS},
                }
            )
        del wide, layer
    return rows


def summarize(per_rank: list[list[dict]], shapes: dict[str, MoEShape]) -> list[dict]:
    """Per (shape, M, EP): each stage's median over calls of the ranks' mean, in ms."""
    summary = []
    for rows in zip(*per_rank, strict=True):
        first = rows[0]

        def stage(side, name, rows=rows):
            calls = zip(*(r[side][name] for r in rows), strict=True)
            return statistics.median(statistics.fmean(c) for c in calls)

        wide = {s: stage("wide_ms", s) for s in WIDE_STAGES}
        stock = {s: stage("stock_ms", s) for s in STOCK_STAGES}
        parts = {s: stage("parts_ms", s) for s in EXCHANGE_PARTS}
        wide_total, stock_total = sum(wide.values()), sum(stock.values())
        summary.append(
            {
                **{k: first[k] for k in ("shape", "M", "ep", "calls", "max_abs_diff")},
                "layer": asdict(shapes[first["shape"]]),
                "wide_ms": wide,
                "wide_total_ms": wide_total,
                "wide_pct": {s: 100 * t / wide_total for s, t in wide.items()},
                "stock_ms": stock,
                "stock_total_ms": stock_total,
                "ratio": wide_total / stock_total,
                "exchange_parts_ms": parts,
            }
        )
    return summary


# --------------------------------------------------------------------------- ranks


@contextlib.contextmanager
def single_rank_group():
    """A one-rank gloo group in this process (EP=1), destroyed on exit."""
    if dist.is_initialized():
        raise RuntimeError("a default process group exists already")
    from tools.launch import free_port
    from tools.ranks import init_gloo

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    init_gloo(0, 1, free_port())
    try:
        yield
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(threads)


def profile_ep1(shapes, tokens, budget_s, **kwargs) -> list[dict]:
    with single_rank_group():
        rows = profile_rank(0, 1, shapes, tokens, budget_s, **kwargs)
    return summarize([rows], {s.name: s for s in shapes})


def _rank_entry(rank, world_size, *args) -> list[dict]:
    torch.set_num_threads(1)
    return profile_rank(rank, world_size, *args)


def profile_spawned(world_size: int, shapes, tokens, budget_s) -> list[dict]:
    from tools.ranks import run_ranks

    per_rank = run_ranks(_rank_entry, world_size, shapes, tokens, budget_s)
    return summarize(per_rank, {s.name: s for s in shapes})


# --------------------------------------------------------------------------- main


def format_table(summary: list[dict]) -> str:
    lines = [
        "| shape (H/I/E/k) | M/rank | EP | route | dispatch | experts | combine | wide ms "
        "| stock route | stock experts | stock ms | wide / stock |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary:
        s = r["layer"]
        cells = [f"{r['wide_ms'][st]:.3f} ({r['wide_pct'][st]:.0f}%)" for st in WIDE_STAGES]
        lines.append(
            f"| {s['name']} ({s['hidden']}/{s['intermediate']}/{s['experts']}/{s['top_k']}) "
            f"| {r['M']} | {r['ep']} | {' | '.join(cells)} | {r['wide_total_ms']:.3f} "
            f"| {r['stock_ms']['route']:.3f} | {r['stock_ms']['experts']:.3f} "
            f"| {r['stock_total_ms']:.3f} | **{r['ratio']:.2f}** |"
        )
    return "\n".join(lines)


def format_parts_table(summary: list[dict]) -> str:
    names = " | ".join(EXCHANGE_PARTS)
    lines = [
        f"| shape | M/rank | EP | {names} | dispatch + combine (stages above) |",
        "|---|---:|---:|" + "---:|" * (len(EXCHANGE_PARTS) + 1),
    ]
    for r in summary:
        parts = " | ".join(f"{r['exchange_parts_ms'][p]:.3f}" for p in EXCHANGE_PARTS)
        both = r["wide_ms"]["dispatch"] + r["wide_ms"]["combine"]
        lines.append(f"| {r['shape']} | {r['M']} | {r['ep']} | {parts} | {both:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="docs/results/moe_layer_profile_cpu.json")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)}")
    parser.add_argument("--tokens", default="1,16,128,512", help="M, tokens per rank")
    parser.add_argument("--ep", default="1,2", help="EP sizes (1: this process; 2: 2 ranks)")
    parser.add_argument("--budget", type=float, default=1.5, help="seconds per (shape, M)")
    args = parser.parse_args()
    unknown = set(args.shapes.split(",")) - set(SHAPES)
    if unknown:
        parser.error(f"unknown shapes {sorted(unknown)}; expected some of {list(SHAPES)}")
    shapes = [SHAPES[n] for n in args.shapes.split(",")]
    tokens = [int(m) for m in args.tokens.split(",")]
    ep_sizes = [int(r) for r in args.ep.split(",")]

    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, one thread "
        f"per rank, torch {torch.__version__}, ISA {ISA}, "
        f"capability {torch.backends.cpu.get_cpu_capability()}"
    )
    print(machine, flush=True)
    load_before = os.getloadavg()
    summary = []
    for R in ep_sizes:
        print(f"EP={R}: {len(shapes)} shapes x M in {tokens} ...", flush=True)
        t0 = time.perf_counter()
        if R == 1:
            rows = profile_ep1(shapes, tokens, args.budget)
        else:
            rows = profile_spawned(R, shapes, tokens, args.budget)
        print(f"EP={R} done in {time.perf_counter() - t0:.0f} s", flush=True)
        summary += rows
    load_after = os.getloadavg()
    print(
        "\nms per layer call (% of the wide-EP call); wide / stock = wide ms / stock ms, "
        "lower is better\n"
    )
    print(format_table(summary))
    print("\nThe exchange step by step, ms (separate calls, same inputs):\n")
    print(format_parts_table(summary))
    print(f"\nload average before {load_before[0]:.1f}, after {load_after[0]:.1f} (1 min)")
    record = {
        "machine": machine,
        "load_average": {"before": load_before, "after": load_after},
        "dtype": str(DTYPE).removeprefix("torch."),
        "results": summary,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
