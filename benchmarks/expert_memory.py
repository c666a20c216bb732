"""Expert bytes per EP rank: an FP8 checkpoint (weights + 128 x 128 block scales) against
the same experts in bfloat16 (its dequantized copy), both served with --enable-wideep.

    python benchmarks/expert_memory.py [--ep 1] [--workdir .cache/expert-memory]

Reads `wideep_stats`' `expert_bytes` (what each rank's slots hold) from two in-process
engines on the tiny DeepSeek-V3 with 128-multiple sizes, prints both and the ratio
(target: at most 0.53), and the analytic figure for DeepSeek-V3 itself.
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

DEEPSEEK_V3 = {"experts": 256, "layers": 58, "hidden": 7168, "inter": 2048}


def expert_bytes(model: str, dtype: str, ep: int) -> list[int]:
    """Per EP rank, the bytes of every MoE layer's slots, summed."""
    from vllm import LLM

    llm = LLM(
        model=model,
        dtype=dtype,
        data_parallel_size=1,
        tensor_parallel_size=ep,
        additional_config={"wideep": {"enabled": True}},
        max_model_len=128,
        enforce_eager=True,
    )
    stats = sorted(llm.collective_rpc("wideep_stats"), key=lambda s: s["ep_rank"])
    del llm
    return [sum(s["expert_bytes"].values()) for s in stats]


def deepseek_v3_bytes_per_rank(ep: int) -> tuple[float, float]:
    """(FP8 with scales, BF16) routed-expert bytes per rank of DeepSeek-V3 at EP `ep`."""
    e, layers, h, i = (DEEPSEEK_V3[k] for k in ("experts", "layers", "hidden", "inter"))
    weights = 3 * h * i  # gate, up, down
    scales = 4 * (2 * i // 128 * h // 128 + h // 128 * i // 128)
    per_expert_fp8, per_expert_bf16 = weights + scales, 2 * weights
    return (layers * e / ep * per_expert_fp8, layers * e / ep * per_expert_bf16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ep", type=int, default=1, help="EP size (through TP)")
    parser.add_argument("--workdir", default=".cache/expert-memory")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm_wideep.tiny_models import build_fp8_model, dequantized_dir

    fp8_model = build_fp8_model(
        Path(args.workdir) / "fp8", "deepseek_v3_fp8", dtype="bfloat16", scope="experts"
    )
    fp8 = expert_bytes(str(fp8_model), "bfloat16", args.ep)
    bf16 = expert_bytes(str(dequantized_dir(fp8_model)), "bfloat16", args.ep)
    print(f"# {platform.processor() or platform.machine()}, EP {args.ep}, tiny DeepSeek-V3")
    print("| rank | FP8 + scales (bytes) | BF16 (bytes) | ratio |")
    print("|---|---|---|---|")
    for rank, (a, b) in enumerate(zip(fp8, bf16, strict=True)):
        print(f"| {rank} | {a} | {b} | {a / b:.4f} |")
    fp8_v3, bf16_v3 = deepseek_v3_bytes_per_rank(32)
    print(
        f"DeepSeek-V3 routed experts at EP 32 (analytic): FP8 {fp8_v3 / 1e9:.2f} GB, "
        f"BF16 {bf16_v3 / 1e9:.2f} GB per rank, ratio {fp8_v3 / bf16_v3:.4f}"
    )


if __name__ == "__main__":
    main()
