"""Serving benchmark on CPU: `--enable-wideep` at EP 2 against stock vLLM, tiny models.

    python benchmarks/serve.py [--arch qwen3_moe] [--configs stock-tp1,stock-tp2,wideep-ep2]
        [--rates 2,8,inf] [--input-len 128] [--output-len 32] [--num-prompts 32]
        [--out docs/results/serve_qwen3_moe.json]

For each configuration it starts `vllm serve` on the tiny checkpoint (built in
`.cache/tiny-models/<arch>` if missing) in its own process group
(`tools.launch.Server`), runs vLLM's own client, `vllm bench serve`, once per
request rate on the same random prompts (fixed input and output lengths, `--ignore-eos`,
seed 0), reads its JSON and stops the server. Configurations (`CONFIGS`):

    stock-tp1      stock vLLM (plugin not loaded), one rank; vLLM's automatic binding puts
                   its threads on core 0 and reserves core 1 (logged: reserved_cpus=[1])
    stock-tp2      stock vLLM, tensor parallel 2: one rank per core
    stock-dp2      stock vLLM, data parallel 2 (not in the default set)
    wideep-ep2     --enable-wideep --data-parallel-size 2: EP 2 over two DP engines
    wideep-ep2-tp  --enable-wideep --tensor-parallel-size 2: EP 2 over two TP ranks

The 2-rank configurations bind one rank per core (`VLLM_CPU_OMP_THREADS_BIND=0|1`), the
API server shares the cores. Printed per (configuration, rate): output
tokens/s, percentiles of time to first token (TTFT), time per output token after the first
(TPOT, per request) and inter-token latency (ITL, per gap between streamed chunks: tokens
that arrive in one chunk count as gaps of 0), then each as a ratio to stock-tp1
at the same rate, and for the 2-rank configurations also to stock-tp2 (the same cores,
the same split: one rank per core). tokens/s ratio > 1 and latency ratio < 1 favour the
configuration. `--enforce-eager` is on by default, as in the tests and the demo (no
torch.compile, a shorter start-up); `--compile` drops it. The client runs in this process
(importing vLLM once); the JSON keeps its full result per run and the OpenMP core binding
each server logged.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PERCENTILES = (50, 90, 99)
LATENCY_METRICS = ("ttft", "tpot", "itl")
BASELINES = ("stock-tp1", "stock-tp2")


@dataclass(frozen=True)
class ServeConfig:
    """One way to serve the model: `vllm serve` flags, ranks (one core each when 2), and
    whether the plugin is loaded."""

    name: str
    args: tuple[str, ...]
    ranks: int
    plugin: bool


CONFIGS = {
    c.name: c
    for c in (
        ServeConfig("stock-tp1", (), 1, plugin=False),
        ServeConfig("stock-tp2", ("--tensor-parallel-size", "2"), 2, plugin=False),
        ServeConfig(
            "stock-dp2", ("--data-parallel-size", "2", "--api-server-count", "1"), 2, plugin=False
        ),
        ServeConfig(
            "wideep-ep2",
            ("--enable-wideep", "--data-parallel-size", "2", "--api-server-count", "1"),
            2,
            plugin=True,
        ),
        ServeConfig(
            "wideep-ep2-tp", ("--enable-wideep", "--tensor-parallel-size", "2"), 2, plugin=True
        ),
    )
}
DEFAULT_CONFIGS = ("stock-tp1", "stock-tp2", "wideep-ep2")
ARCHES = ("qwen3_moe", "deepseek_v3", "mixtral")


def parse_rates(text: str) -> list[float]:
    """ "2,8,inf" -> [2.0, 8.0, inf]: requests per second, inf = all at once."""
    rates = [float(r) for r in text.split(",") if r.strip()]
    if not rates or any(not r > 0 for r in rates):
        raise argparse.ArgumentTypeError(f"rates must be positive numbers or inf, got {text!r}")
    return rates


def parse_configs(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown configurations {unknown or text!r}; expected some of {list(CONFIGS)}"
        )
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="qwen3_moe", choices=ARCHES)
    parser.add_argument(
        "--configs",
        type=parse_configs,
        default=list(DEFAULT_CONFIGS),
        help=f"comma-separated, of {', '.join(CONFIGS)} (default: {','.join(DEFAULT_CONFIGS)})",
    )
    parser.add_argument(
        "--rates", type=parse_rates, default=parse_rates("2,8,inf"), help="requests/s; inf"
    )
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens")
    parser.add_argument("--output-len", type=int, default=32, help="generated tokens")
    parser.add_argument("--num-prompts", type=int, default=32, help="requests per rate")
    parser.add_argument("--out", help="JSON results (default docs/results/serve_<arch>.json)")
    parser.add_argument("--compile", action="store_true", help="drop --enforce-eager")
    parser.add_argument("--start-timeout", type=float, default=600, help="seconds per server")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = f"docs/results/serve_{args.arch}.json"
    return args


# --------------------------------------------------------------------------- results


def bench_metrics(result: dict) -> dict[str, float]:
    """The figures we compare, from one `vllm bench serve --save-result` JSON."""
    metrics = {"output_tok_s": result["output_throughput"]}
    for name in LATENCY_METRICS:
        for p in PERCENTILES:
            metrics[f"{name}_p{p}_ms"] = result[f"p{p}_{name}_ms"]
    metrics["completed"] = result["completed"]
    metrics["failed"] = result.get("failed", 0)
    return metrics


RATIO_KEYS = ("output_tok_s", *(f"{n}_p{p}_ms" for n in LATENCY_METRICS for p in PERCENTILES))


def add_ratios(rows: list[dict]) -> list[dict]:
    """rows: {"config", "rate", "metrics"}; adds "vs": {baseline: {key: row / baseline}}
    for stock-tp1 and, for 2-rank configurations, stock-tp2, at the same rate."""
    by_key = {(r["config"], r["rate"]): r for r in rows}
    for row in rows:
        row["vs"] = {}
        for base in BASELINES:
            if base == row["config"] or (base == "stock-tp2" and CONFIGS[row["config"]].ranks < 2):
                continue
            ref = by_key.get((base, row["rate"]))
            if ref is None:
                continue
            row["vs"][base] = {
                k: row["metrics"][k] / ref["metrics"][k] if ref["metrics"][k] else math.nan
                for k in RATIO_KEYS
            }
    return rows


def _rate(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def format_tables(rows: list[dict]) -> str:
    pct = "/".join(f"p{p}" for p in PERCENTILES)
    names = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL"}
    heads = " | ".join(f"{names[n]} {pct}" for n in LATENCY_METRICS)
    lines = [
        f"| config | req/s | output tok/s | {heads.replace(pct, pct + ' ms')} | load |",
        "|---|---:|---:|" + "---:|" * (len(LATENCY_METRICS) + 1),
    ]
    for r in rows:
        m = r["metrics"]
        cells = [
            " / ".join(f"{m[f'{n}_p{p}_ms']:.{0 if n == 'ttft' else 1}f}" for p in PERCENTILES)
            for n in LATENCY_METRICS
        ]
        failed = f" ({m['failed']} failed)" if m["failed"] else ""
        load = r.get("load_average_before")
        lines.append(
            f"| {r['config']} | {_rate(r['rate'])} | {m['output_tok_s']:.1f}{failed} "
            f"| {' | '.join(cells)} | {'' if load is None else f'{load:.1f}'} |"
        )
    lines += [
        "",
        "load = the 1-minute load average when the rate's run started.",
        "",
        "Ratios (configuration / baseline at the same rate; tok/s > 1 and latency < 1 are better):",
        "",
        f"| config | vs | req/s | output tok/s | {heads} |",
        "|---|---|---:|---:|" + "---:|" * len(LATENCY_METRICS),
    ]
    for r in rows:
        for base, v in r["vs"].items():
            cells = [
                " / ".join(f"{v[f'{n}_p{p}_ms']:.2f}" for p in PERCENTILES) for n in LATENCY_METRICS
            ]
            lines.append(
                f"| {r['config']} | {base} | {_rate(r['rate'])} | **{v['output_tok_s']:.2f}** "
                f"| {' | '.join(cells)} |"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------- running


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if "Model name" in line
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores"


def tiny_model(arch: str) -> Path:
    from vllm_wideep.tiny_models import build_tiny_model

    return build_tiny_model(REPO / ".cache" / "tiny-models" / arch, arch)


def serve_args(config: ServeConfig, args) -> list[str]:
    max_len = args.input_len + args.output_len + 16  # room for special tokens
    serve = [*config.args, "--served-model-name", "tiny", "--max-model-len", str(max_len)]
    return serve if args.compile else [*serve, "--enforce-eager"]


def omp_binding(server_log: str) -> list[str]:
    """The cores each rank's OpenMP threads were bound to, from vLLM's log."""
    return [
        line.split("\t", 1)[-1].strip()
        for line in server_log.splitlines()
        if "core ids=" in line or "reserved_cpus=" in line
    ]


def wait_until_ready(server, timeout: float) -> float:
    """Server.wait_ready in 30 s steps, a progress line after each; returns seconds."""
    start = time.monotonic()
    while True:
        elapsed = time.monotonic() - start
        try:
            server.wait_ready(timeout=min(30.0, max(1.0, timeout - elapsed)))
            return time.monotonic() - start
        except RuntimeError:
            if server.proc.poll() is not None or time.monotonic() - start >= timeout:
                raise
            print(f"    still starting ({time.monotonic() - start:.0f} s)", flush=True)


def client_argv(url: str, model: Path, rate: float, args, result_dir: str) -> list[str]:
    """The `vllm bench serve` flags for one rate."""
    return [
        "--backend", "vllm", "--base-url", url, "--model", "tiny", "--tokenizer", str(model),
        "--dataset-name", "random", "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len), "--random-range-ratio", "0",
        "--num-prompts", str(args.num_prompts), "--request-rate", _rate(rate),
        "--ignore-eos", "--seed", "0", "--num-warmups", "2", "--disable-tqdm",
        "--percentile-metrics", ",".join(LATENCY_METRICS),
        "--metric-percentiles", ",".join(map(str, PERCENTILES)),
        "--save-result", "--result-dir", result_dir, "--result-filename", "result.json",
    ]  # fmt: skip


def run_client(argv: list[str], result_dir: str) -> dict:
    """`vllm bench serve` in this process (importing vLLM once saves a minute per run
    here); its report is kept out of the progress lines and shown only on failure."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    report = io.StringIO()
    try:
        with contextlib.redirect_stdout(report), contextlib.redirect_stderr(report):
            bench_main(parser.parse_args(argv))
    except (Exception, SystemExit):
        print(report.getvalue()[-6000:], file=sys.stderr)
        raise
    return json.loads(Path(result_dir, "result.json").read_text())


def run_config(config: ServeConfig, model: Path, args, step: str) -> list[dict]:
    from tools.launch import Server, e2e_env

    extra = {} if config.plugin else {"VLLM_PLUGINS": ""}
    env = e2e_env(num_ranks=config.ranks, **extra)
    flags = serve_args(config, args)
    print(f"[{step}] {config.name}: vllm serve {' '.join(flags)}", flush=True)
    server = Server(str(model), flags, env)
    rows = []
    try:
        startup = wait_until_ready(server, args.start_timeout)
        binding = omp_binding(server.output())
        print(f"    ready after {startup:.0f} s; {'; '.join(binding)}", flush=True)
        with tempfile.TemporaryDirectory() as result_dir:
            for i, rate in enumerate(args.rates, 1):
                print(
                    f"    rate {_rate(rate)} req/s ({i}/{len(args.rates)}): "
                    f"{args.num_prompts} prompts ...",
                    end="",
                    flush=True,
                )
                load = os.getloadavg()[0]
                t0 = time.monotonic()
                argv = client_argv(server.url, model, rate, args, result_dir)
                result = run_client(argv, result_dir)
                m = bench_metrics(result)
                print(
                    f" {m['output_tok_s']:.1f} tok/s, TTFT p50 {m['ttft_p50_ms']:.0f} ms, "
                    f"ITL p50 {m['itl_p50_ms']:.1f} ms ({time.monotonic() - t0:.0f} s)",
                    flush=True,
                )
                rows.append(
                    {
                        "config": config.name,
                        "rate": rate,
                        "metrics": m,
                        "startup_s": startup,
                        "omp_binding": binding,
                        "load_average_before": load,
                        "serve_args": flags,
                        "bench": result,
                    }
                )
    finally:
        server.stop()
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # for the client
    model = tiny_model(args.arch)
    import vllm.benchmarks.serve  # noqa: F401  (the client: import once, before timing)

    print(
        f"{machine()}; tiny {args.arch}, {args.num_prompts} prompts per rate, "
        f"{args.input_len} in / {args.output_len} out tokens, rates {args.rates}",
        flush=True,
    )
    load_before = os.getloadavg()
    start = time.monotonic()
    rows = []
    for i, name in enumerate(args.configs, 1):
        rows += run_config(CONFIGS[name], model, args, f"{i}/{len(args.configs)}")
    load_after = os.getloadavg()
    add_ratios(rows)
    print()
    print(format_tables(rows))
    print(
        f"\nload average (1/5/15 min) before {' '.join(f'{x:.1f}' for x in load_before)}, "
        f"after {' '.join(f'{x:.1f}' for x in load_after)}; {time.monotonic() - start:.0f} s"
    )
    record = {
        "machine": machine(),
        "python": sys.version.split()[0],
        "arch": args.arch,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "num_prompts": args.num_prompts,
        "enforce_eager": not args.compile,
        "load_average": {"before": load_before, "after": load_after},
        "results": [{**r, "rate": _rate(r["rate"])} for r in rows],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
