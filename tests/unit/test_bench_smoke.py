"""The serving benchmark's parsing and tables on a canned `vllm bench serve` result (no
servers), the soak memory benchmark's per-mapping RSS, and the MoE layer profile's and the
balancer benchmarks' CPU paths at tiny shapes."""

import argparse
import math
import os
import time

import psutil
import pytest

from benchmarks import serve, soak_memory

# The fields of a `vllm bench serve --save-result` JSON that benchmarks/serve.py reads
# (run with --percentile-metrics ttft,tpot,itl --metric-percentiles 50,90,99).
CANNED = {
    "completed": 32,
    "failed": 0,
    "output_throughput": 200.0,
    "request_throughput": 6.25,
    **{f"p{p}_ttft_ms": 100.0 * (i + 1) for i, p in enumerate((50, 90, 99))},
    **{f"p{p}_tpot_ms": 10.0 * (i + 1) for i, p in enumerate((50, 90, 99))},
    **{f"p{p}_itl_ms": 8.0 * (i + 1) for i, p in enumerate((50, 90, 99))},
}


def canned(scale_tok_s: float, scale_latency: float) -> dict:
    result = dict(CANNED)
    result["output_throughput"] *= scale_tok_s
    for key in result:
        if key.endswith("_ms"):
            result[key] *= scale_latency
    return result


def test_serve_arguments():
    args = serve.parse_args([])
    assert args.configs == ["stock-tp1", "stock-tp2", "wideep-ep2"]
    assert args.rates[:2] == [2.0, 8.0] and math.isinf(args.rates[2])
    assert args.out == "docs/results/serve_qwen3_moe.json"

    args = serve.parse_args(
        ["--arch", "mixtral", "--rates", "1,inf", "--configs", "stock-tp1,wideep-ep2-tp"]
    )
    assert args.out == "docs/results/serve_mixtral.json"
    assert args.rates == [1.0, math.inf]
    assert args.configs == ["stock-tp1", "wideep-ep2-tp"]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown configurations"):
        serve.parse_configs("stock-tp1,wideep-ep4")
    with pytest.raises(argparse.ArgumentTypeError, match="positive"):
        serve.parse_rates("0,2")


def test_rss_by_mapping_adds_up_to_the_process_rss():
    by_kind = soak_memory.rss_by_mapping(os.getpid())
    vm_rss_mib = psutil.Process().memory_info().rss / (1 << 20)
    assert {"[heap]", "anonymous", "files"} <= set(by_kind)
    # the two reads are moments apart, and reading smaps itself allocates
    assert sum(by_kind.values()) == pytest.approx(vm_rss_mib, rel=0.02)
    run = {
        "samples": [
            {"mappings": {"w": {"[heap]": 8.0, "files": 3.0}}},
            {"mappings": {"w": {"[heap]": 9.5, "files": 3.0}}},
        ]
    }
    assert soak_memory.mapping_table(run).splitlines()[2:] == [
        "| w | [heap] | +1.5 |",
        "| w | files | +0.0 |",
    ]


def test_serve_configs_flags():
    assert "--enable-wideep" in serve.CONFIGS["wideep-ep2"].args
    for name in ("wideep-ep2", "stock-dp2"):  # DP on CPU needs one API server
        assert "--api-server-count" in serve.CONFIGS[name].args
    assert not serve.CONFIGS["stock-tp1"].plugin and serve.CONFIGS["wideep-ep2"].plugin
    args = serve.parse_args(["--input-len", "64", "--output-len", "16"])
    flags = serve.serve_args(serve.CONFIGS["wideep-ep2"], args)
    assert flags[-1] == "--enforce-eager" and "96" in flags  # 64 + 16 + 16
    argv = serve.client_argv("http://127.0.0.1:1", serve.REPO, math.inf, args, "/tmp/x")
    assert argv[argv.index("--request-rate") + 1] == "inf"
    assert argv[argv.index("--percentile-metrics") + 1] == "ttft,tpot,itl"


def test_serve_metrics_ratios_and_tables():
    rows = [
        {"config": "stock-tp1", "rate": 2.0, "metrics": serve.bench_metrics(canned(1.0, 1.0))},
        {"config": "stock-tp2", "rate": 2.0, "metrics": serve.bench_metrics(canned(0.5, 2.0))},
        {"config": "wideep-ep2", "rate": 2.0, "metrics": serve.bench_metrics(canned(0.8, 1.5))},
        {"config": "wideep-ep2", "rate": math.inf, "metrics": serve.bench_metrics(CANNED)},
    ]
    assert rows[0]["metrics"]["itl_p90_ms"] == 16.0
    serve.add_ratios(rows)
    assert rows[0]["vs"] == {}
    assert set(rows[1]["vs"]) == {"stock-tp1"}
    wide = rows[2]["vs"]
    assert set(wide) == {"stock-tp1", "stock-tp2"}
    assert wide["stock-tp1"]["output_tok_s"] == pytest.approx(0.8)
    assert wide["stock-tp1"]["ttft_p99_ms"] == pytest.approx(1.5)
    assert wide["stock-tp2"]["output_tok_s"] == pytest.approx(1.6)
    assert wide["stock-tp2"]["itl_p50_ms"] == pytest.approx(0.75)
    assert rows[3]["vs"] == {}  # no baseline ran at this rate

    table = serve.format_tables(rows)
    assert "| wideep-ep2 | 2 | 160.0 | 150 / 300 / 450 |" in table  # no load: blank
    assert "| wideep-ep2 | stock-tp2 | 2 | **1.60** |" in table
    assert "| wideep-ep2 | inf | 200.0 |" in table


def test_layer_profile_runs_on_cpu_at_a_tiny_shape():
    # Import what the profile imports lazily, so that the timing is of the profile itself.
    import vllm._custom_ops  # noqa: F401
    import vllm.model_executor.layers.fused_moe.router.cpu_router  # noqa: F401

    import vllm_wideep.layer.experts  # noqa: F401
    import vllm_wideep.layer.prepare_finalize  # noqa: F401
    from benchmarks import moe_layer_profile as profile

    start = time.perf_counter()
    rows = profile.profile_ep1(
        [profile.SHAPES["tiny-qwen3"], profile.SHAPES["tiny-dsv3"]],
        [4],
        budget_s=0.0,
        min_calls=2,
        max_calls=2,
    )
    assert time.perf_counter() - start < 10
    assert [(r["shape"], r["M"], r["ep"], r["calls"]) for r in rows] == [
        ("tiny-qwen3", 4, 1, 2),
        ("tiny-dsv3", 4, 1, 2),
    ]
    for r in rows:
        assert set(r["wide_ms"]) == set(profile.WIDE_STAGES)
        assert all(t > 0 for t in (*r["wide_ms"].values(), *r["stock_ms"].values()))
        assert set(r["exchange_parts_ms"]) == set(profile.EXCHANGE_PARTS)
        assert r["wide_total_ms"] == pytest.approx(sum(r["wide_ms"].values()))
        assert r["ratio"] == pytest.approx(r["wide_total_ms"] / r["stock_total_ms"])
        assert r["max_abs_diff"] < 0.1  # bf16: the two backends compute the same layer
    assert "| tiny-dsv3 (128/64/16/4) | 4 | 1 |" in profile.format_table(rows)


def test_eplb_overlap_benchmark_runs_at_a_tiny_shape(tmp_path):
    """Two gloo ranks move slots sync and overlapped; every move is verified (asserted
    inside), the JSON has a time per mode."""
    import json
    import subprocess
    import sys

    out = tmp_path / "overlap.json"
    argv = [sys.executable, "benchmarks/eplb_overlap.py", "--hidden", "64"]
    argv += ["--intermediate", "32", "--experts", "4", "--steps", "2", "--json", str(out)]
    subprocess.run(argv, check=True, timeout=300, cwd=serve.REPO)
    times = json.loads(out.read_text())["seconds_per_step"]
    assert set(times) == {"plain", "sync", "overlap"} and all(t > 0 for t in times.values())


def test_eplb_plan_alternates_the_policies():
    from benchmarks import eplb_plan

    order = []
    out = eplb_plan.timed({"a": lambda: order.append("a") or 1, "b": lambda: order.append("b")}, 3)
    assert order == ["a", "b"] * 3
    assert out["a"][0] == 1 and out["b"][0] is None
    assert all(seconds >= 0 for _, seconds in out.values())

    result = eplb_plan.row(1.2, 32, 9, layers=2, repeats=1)
    for name in ("ours", "vllm"):
        figures = result[name]
        assert 0 < figures["fresh_bal_min"] <= figures["fresh_bal"] <= 1
        assert 0 < figures["incremental_bal_min"] <= figures["incremental_bal"] <= 1
        assert 0 <= figures["moved"] <= 2 * 32 * 9
