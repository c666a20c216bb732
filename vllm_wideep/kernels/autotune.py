"""Tune the expert GEMM tiles on this GPU and write ``configs/<device>.json``.

    python -m vllm_wideep.kernels.autotune [--hidden 7168 --intermediate 2048 --experts 32
                                            --topk 8 --rows 8 32 128 512 2048] [--output F]

For each rows-per-expert bucket it times the whole ``moe_experts_triton`` call (median of
triton.testing.do_bench) on uniformly routed tokens: first each BLOCK_M with the gate_up
candidates (down at its default), then the down candidates with the best gate_up. It merges
the winners into the table ``tile_configs.get_config`` reads, keyed by
``H=...,I=...`` and rows per expert, as vLLM does for its fused_moe configs.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import triton.testing

from vllm_wideep.kernels.grouped_gemm import moe_experts_triton
from vllm_wideep.kernels.tile_configs import (
    CONFIG_DIR,
    GEMM_KEYS,
    default_config,
    device_config_name,
    shape_key,
)

BLOCK_M_CHOICES = (16, 32, 64, 128)
GEMM_CHOICES = [
    dict(zip(GEMM_KEYS, values, strict=True))
    for values in itertools.product((64, 128), (64, 128), (1, 8), (4, 8), (3, 4))
]


def _inputs(rows_per_expert: int, H: int, inter: int, E: int, k: int):
    M = max(1, rows_per_expert * E // k)
    scores = torch.rand(M, E, device="cuda")
    weights, ids = scores.topk(k, dim=1)
    x = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
    w13 = torch.randn(E, 2 * inter, H, device="cuda", dtype=torch.bfloat16) / H**0.5
    w2 = torch.randn(E, H, inter, device="cuda", dtype=torch.bfloat16) / inter**0.5
    return x, w13, w2, weights, ids.to(torch.int32)


def _time_ms(inputs, config) -> float:
    try:
        return triton.testing.do_bench(
            lambda: moe_experts_triton(*inputs, config=config), warmup=5, rep=20,
            return_mode="median",
        )  # fmt: skip
    except triton.runtime.errors.OutOfResources:
        return float("inf")


# Search sizes: (all BLOCK_M choices?, every n-th GEMM candidate). Each candidate costs a
# Triton compile (about a second) plus its timing.
SEARCH = {"quick": (False, 8), "medium": (True, 4), "full": (True, 1)}


def tune_bucket(rows_per_expert: int, H: int, inter: int, E: int, k: int, search: str) -> dict:
    inputs = _inputs(rows_per_expert, H, inter, E, k)
    base = default_config(rows_per_expert, H, inter)
    all_block_ms, stride = SEARCH[search]
    block_ms = BLOCK_M_CHOICES if all_block_ms else (base["BLOCK_M"],)
    choices = GEMM_CHOICES[::stride]
    best = (_time_ms(inputs, base), base)
    for block_m in block_ms:
        for gate_up in choices:
            config = {"BLOCK_M": block_m, "gate_up": gate_up, "down": base["down"]}
            best = min(best, (_time_ms(inputs, config), config), key=lambda t: t[0])
    for down in choices:
        config = {**best[1], "down": down}
        best = min(best, (_time_ms(inputs, config), config), key=lambda t: t[0])
    print(f"rows/expert {rows_per_expert}: {best[0]:.3f} ms {best[1]}", flush=True)
    return best[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=32, help="local experts")
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 32, 128, 512, 2048])
    parser.add_argument("--search", choices=sorted(SEARCH), default="full")
    parser.add_argument("--output", type=Path, help="default: configs/<device>.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("autotune needs a CUDA GPU")
    device = torch.cuda.get_device_name()
    output = args.output or CONFIG_DIR / f"{device_config_name(device)}.json"
    table = json.loads(output.read_text()) if output.exists() else {}
    by_rows = table.setdefault(shape_key(args.hidden, args.intermediate), {})
    output.parent.mkdir(parents=True, exist_ok=True)
    for rows in args.rows:
        by_rows[str(rows)] = tune_bucket(
            rows, args.hidden, args.intermediate, args.experts, args.topk, args.search
        )
        # Written after every bucket, so a run cut short keeps what it tuned.
        output.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        print(f"wrote {output} for {device}", flush=True)


if __name__ == "__main__":
    main()
