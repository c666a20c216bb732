"""The same requests give bit-identical logprobs under wide EP, as in stock vLLM: EP 2
(through TP 2, LLM class, the default `alltoall` exchange), float32 and bfloat16, the batch
run again in the same engine, its prompts sent one at a time (other batches: a token's
output must not depend on what else was scheduled with it) and in a fresh engine
(docs/token-exchange.md#determinism).

The child process (this file run as a script) prints one JSON line per engine:
    python tests/e2e/test_determinism.py '{"model": ..., "dtypes": [...]}'
"""

from __future__ import annotations

import json
import sys

import pytest

PROMPTS = [
    "The quick brown fox",
    "Once upon a time in a land far away, there lived",
    "def add(a, b):",
    "Hi",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14",
]
MAX_TOKENS = 12


def _logprobs(outputs) -> list:
    """[prompt][step] {token id: logprob} of the top 2, plus the chosen token."""
    return [
        [{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs]
        for o in outputs
    ]


def _child(spec: dict) -> None:
    from vllm import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2)
    for dtype in spec["dtypes"]:
        llm = LLM(
            model=spec["model"],
            dtype=dtype,
            tensor_parallel_size=2,
            additional_config={"wideep": {"enabled": True}},
            max_model_len=256,
            enforce_eager=True,
            seed=0,
        )
        runs = {
            "batch": _logprobs(llm.generate(PROMPTS, params, use_tqdm=False)),
            "batch again": _logprobs(llm.generate(PROMPTS, params, use_tqdm=False)),
            "one at a time": [
                _logprobs(llm.generate([p], params, use_tqdm=False))[0] for p in PROMPTS
            ],
        }
        print("RESULT " + json.dumps({"dtype": dtype, "runs": runs}), flush=True)
        del llm


def _results(model: str, dtypes: list[str]) -> dict[str, dict]:
    """dtype -> {how: logprobs}, from one child process (one engine per dtype)."""
    # Imported here: the child runs this file as a script, without the repository root
    # on its path.
    from tests.e2e.launch import e2e_env, run_group

    spec = json.dumps({"model": model, "dtypes": dtypes})
    output = run_group([sys.executable, __file__, spec], e2e_env(num_ranks=2), timeout=600)
    lines = [x.removeprefix("RESULT ") for x in output.splitlines() if x.startswith("RESULT ")]
    return {line["dtype"]: line["runs"] for line in map(json.loads, lines)}


@pytest.mark.slow
def test_reruns_are_bit_identical(tiny_model):
    model = tiny_model("qwen3_moe")
    first = _results(model, ["float32", "bfloat16"])
    fresh = _results(model, ["bfloat16"])
    assert sorted(first) == ["bfloat16", "float32"] and list(fresh) == ["bfloat16"]
    for dtype, runs in first.items():
        for how, logprobs in runs.items():
            assert logprobs == runs["batch"], f"{dtype}: {how} differs from the first batch"
    assert fresh["bfloat16"]["batch"] == first["bfloat16"]["batch"], "a fresh engine differs"


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
