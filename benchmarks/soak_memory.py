"""Resident memory of a `vllm serve` process group over many rounds of the soak traffic,
wide EP against stock vLLM.

    python benchmarks/soak_memory.py [--configs wideep-dp2,wideep-tp2,stock-tp2,stock-tp1]
        [--rounds 5] [--requests 400] [--concurrency 32] [--warm-up 64] [--arch qwen3_moe]
        [--dtype float32] [--env NAME=VALUE ...] [--by-mapping] [--out rss.json]

For each configuration (`CONFIGS`) it starts the server on the tiny checkpoint, sends
`--warm-up` requests, then `--rounds` rounds of `--requests` requests (the traffic of
benchmarks/soak.py: streamed greedy completions, mixed prompt and output lengths, 10 % of
the clients hanging up mid-stream; the same requests every round), and reads every
process's memory after the warm-up and after each round (`/proc/<pid>/status`):

    RSS    resident set, MiB
    anon   its anonymous part (heap, arenas, tensors), MiB; the rest is file pages
           (libraries, mapped weights)

Printed per configuration: a table of each process's RSS (anon) after the warm-up and
after each round, its mean growth per round from the end of round 1 on and its growth in
the last round. `--env` adds variables to the server's environment (another allocator:
`LD_PRELOAD=...`; oneDNN's primitive cache capped: `ONEDNN_PRIMITIVE_CACHE_CAPACITY=16`,
as benchmarks/soak.py runs its server; glibc's `MALLOC_MMAP_THRESHOLD_=131072`). Without
it the servers run with oneDNN's default cache (1024 primitives, a new one per batch token
count and linear layer shape), whose filling is the workers' growth. `--by-mapping` also
prints where each worker's RSS grew in each round, by kind of mapping
(`/proc/<pid>/smaps`): `[heap]` (glibc's main arena, grown with brk: freed memory goes
back to the system only from its top), anonymous mappings (other arenas, large blocks,
thread stacks) and files. Outputs are not checked against stock vLLM
(benchmarks/soak.py does that). Results: docs/benchmarks.md, "Resident memory over longer
runs". Configurations:

    wideep-dp2    the soak server: --enable-wideep --data-parallel-size 2, 2 redundant
                  slots, a new placement every 4 steps (benchmarks/soak.py `SERVE`)
    wideep-tp2    --enable-wideep --tensor-parallel-size 2: EP 2 through TP 2, the same
                  balancer settings
    stock-tp2     stock vLLM (plugin not loaded), --tensor-parallel-size 2
    stock-tp1     stock vLLM, one rank

Stock vLLM cannot serve a MoE model at DP 2 on CPU, so stock-tp2 is the 2-rank baseline.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.serve import ServeConfig  # noqa: E402
from benchmarks.soak import SERVE, drive, named_processes, soak_requests  # noqa: E402
from tests.e2e.launch import Server, e2e_env  # noqa: E402
from vllm_wideep.tiny_models import build_tiny_model  # noqa: E402

MIB = 1 << 20
COMMON = ["--max-model-len", "256", "--enforce-eager", "--served-model-name", "tiny"]
BALANCER = ["--wideep-redundant-experts", "2", "--wideep-eplb", "online"]
BALANCER += ["--wideep-eplb-interval", "4", "--wideep-eplb-window", "16"]


CONFIGS = {
    c.name: c
    for c in (
        ServeConfig("wideep-dp2", tuple(SERVE), 2, plugin=True),
        ServeConfig(
            "wideep-tp2",
            ("--enable-wideep", "--tensor-parallel-size", "2", *BALANCER, *COMMON),
            2,
            plugin=True,
        ),
        ServeConfig("stock-tp2", ("--tensor-parallel-size", "2", *COMMON), 2, plugin=False),
        ServeConfig("stock-tp1", tuple(COMMON), 1, plugin=False),
    )
}


def process_memory(group: int) -> dict[str, dict[str, float]]:
    """`"<name> (<pid>)"` (`named_processes`) -> {"rss", "anon"} in MiB for each live
    process of the group."""
    memory = {}
    for name, process in named_processes(group).items():
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{process.pid}/status").read_text().splitlines()
            fields = dict(line.split(":", 1) for line in status if ":" in line)
            kib = {key: int(fields[key].split()[0]) for key in ("VmRSS", "RssAnon")}
            memory[name] = {"rss": kib["VmRSS"] / 1024, "anon": kib["RssAnon"] / 1024}
    return memory


def rss_by_mapping(pid: int) -> dict[str, float]:
    """`pid`'s resident MiB by kind of mapping (`/proc/<pid>/smaps`): "[heap]", "anonymous",
    "files", and the kernel's other named ones ("[stack]", ...)."""
    kib: dict[str, int] = {}
    kind = "anonymous"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # "start-end perms offset dev inode [path]"
            path = fields[5] if len(fields) > 5 else ""
            kind = path if path.startswith("[") else ("files" if path else "anonymous")
        elif fields[0] == "Rss:":
            kib[kind] = kib.get(kind, 0) + int(fields[1])
    return {kind: size / 1024 for kind, size in kib.items()}


def measure(config: ServeConfig, model: str, dtype: str, args: argparse.Namespace) -> dict:
    """Samples after the warm-up and after each round: [{"requests", "seconds", "load",
    "memory"}]."""
    requests = soak_requests(args.requests, 0.1, seed=0)
    warm_up = soak_requests(args.warm_up, 0.1, seed=-1)
    extra = dict(args.env)
    if not config.plugin:
        extra["VLLM_PLUGINS"] = ""
    env = e2e_env(num_ranks=config.ranks, **extra)
    samples = []
    served = 0
    with Server(model, [*config.args, "--dtype", dtype], env) as server:
        start = time.monotonic()
        drive(server.url, warm_up, args.concurrency)
        served += len(warm_up)
        for round_index in range(args.rounds + 1):
            if round_index:
                start = time.monotonic()
                outcomes = drive(server.url, requests, args.concurrency)
                served += len(requests)
                errors = [o.error for o in outcomes if o.error is not None]
                assert not errors, errors[:3]
            sample = {
                "requests": served,
                "seconds": time.monotonic() - start,
                "load": os.getloadavg()[0],
                "memory": process_memory(server.proc.pid),
            }
            if args.by_mapping:
                sample["mappings"] = worker_mappings(server.proc.pid)
            samples.append(sample)
            total = sum(m["rss"] for m in sample["memory"].values())
            print(
                f"{config.name}: {served} requests, {sample['seconds']:.0f} s, "
                f"load {sample['load']:.1f}, RSS {total:.0f} MiB",
                flush=True,
            )
    return {
        "config": config.name,
        "args": list(config.args),
        "env": extra,
        "samples": samples,
    }


def worker_mappings(group: int) -> dict[str, dict[str, float]]:
    """`rss_by_mapping` of each worker of the group, by `named_processes` name."""
    mappings = {}
    for name, process in named_processes(group).items():
        if "Worker" in name:
            with contextlib.suppress(OSError):
                mappings[name] = rss_by_mapping(process.pid)
    return mappings


def mapping_table(run: dict) -> str:
    """Each worker's RSS growth in each round by kind of mapping (MiB)."""
    samples = run["samples"]
    lines = ["| worker | mapping | growth per round |", "|---|---|---|"]
    for worker in sorted(samples[0]["mappings"]):
        per_sample = [s["mappings"].get(worker, {}) for s in samples]
        for kind in sorted({kind for mappings in per_sample for kind in mappings}):
            sizes = [mappings.get(kind, 0.0) for mappings in per_sample]
            growths = [b - a for a, b in itertools.pairwise(sizes)]
            if kind.startswith("[") and kind != "[heap]" and not any(growths):
                continue  # [stack], [vdso], ... unchanged
            growth = " ".join(f"{g:+.1f}" for g in growths)
            lines.append(f"| {worker} | {kind} | {growth} |")
    return "\n".join(lines)


def table(run: dict) -> str:
    """Each process's RSS (anon) after each sample, its mean growth per round from the
    end of the first round on, and its growth in the last round (MiB)."""
    samples = run["samples"]
    processes = sorted(samples[0]["memory"])
    head = ["process"] + [f"after {s['requests']}" for s in samples]
    head += ["per round after round 1", "last round"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for process in processes:
        memory = [s["memory"].get(process, {"rss": 0.0, "anon": 0.0}) for s in samples]
        cells = [f"{m['rss']:.0f} ({m['anon']:.0f})" for m in memory]
        rss = [m["rss"] for m in memory]
        later = rss[2:] and (rss[-1] - rss[1]) / (len(rss) - 2)
        cells += [f"{later:+.1f}", f"{rss[-1] - rss[-2]:+.1f}" if len(rss) > 1 else ""]
        lines.append(f"| {process} | " + " | ".join(cells) + " |")
    loads = ", ".join(f"{s['load']:.1f}" for s in samples)
    lines.append(f"\nRSS (anon) MiB; load after each sample: {loads}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="wideep-dp2,wideep-tp2,stock-tp2,stock-tp1")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warm-up", type=int, default=64)
    parser.add_argument("--arch", default="qwen3_moe")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--env",
        type=lambda text: tuple(text.split("=", 1)),
        action="append",
        default=[],
        help="NAME=VALUE for the server's environment (repeatable)",
    )
    parser.add_argument(
        "--by-mapping", action="store_true", help="each worker's growth by kind of mapping"
    )
    parser.add_argument("--out", type=Path, help="append each configuration's samples (JSON)")
    args = parser.parse_args()
    model = str(build_tiny_model(REPO / ".cache" / "tiny-models" / args.arch, args.arch))
    for name in args.configs.split(","):
        run = measure(CONFIGS[name], model, args.dtype, args)
        print(table(run), flush=True)
        if args.by_mapping:
            print(mapping_table(run), flush=True)
        if args.out is not None:
            with args.out.open("a") as out:
                out.write(json.dumps(run) + "\n")


if __name__ == "__main__":
    main()
