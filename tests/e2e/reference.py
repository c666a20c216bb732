"""The stock-vLLM reference that several end-to-end modules compare against.

Starting vLLM dominates the suite's time on 2 cores, so stock vLLM at TP 1 runs once per
session (the `stock` fixture in conftest.py) for every tiny model and dtype, on these
prompts, and the modules that compare with it (test_parity, test_eplb, test_executors)
generate the same prompts and token counts.
"""

from __future__ import annotations

ARCHES = ["qwen3_moe", "deepseek_v3", "mixtral"]
DTYPES = ["float32", "bfloat16"]
CASES = [(arch, dtype) for arch in ARCHES for dtype in DTYPES]
PROMPTS = [
    "The quick brown fox",
    "Once upon a time in a land far away, there lived",
    "def add(a, b):",
    "Hi",
]
MAX_TOKENS = 12


def spec(runs: list[dict]) -> dict:
    """A tests/e2e/generate.py spec for `runs` on the reference prompts."""
    return {"runs": runs, "prompts": PROMPTS, "max_tokens": MAX_TOKENS, "logprobs": 2}


def runs(tiny_model, **extra) -> list[dict]:
    """One run per case, in `CASES` order."""
    return [{"model": tiny_model(arch), "dtype": dtype, **extra} for arch, dtype in CASES]


def by_case(results: list[dict]) -> dict[tuple[str, str], dict]:
    return dict(zip(CASES, results, strict=True))
