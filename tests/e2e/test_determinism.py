"""The same requests give bit-identical logprobs under wide EP, as in stock vLLM: EP 2
(through TP 2, LLM class, the default `alltoall` exchange), the batch run again in the same
engine, its prompts sent one at a time (other batches: a token's output must not depend on
what else was scheduled with it) and in a fresh engine (docs/token-exchange.md#determinism).
Qwen3-MoE in float32 from a placement that replicates experts on the other rank (a token's
replica, and so which rank's partial sum its expert output joins, must not depend on its
batch or rank); DeepSeek-V3 in bfloat16, whose TP-sharded shared experts are added to the
routed output, in an order that must not depend on which TP rank dispatched a token.

The child process (this file run as a script) prints one JSON line per engine:
    python tests/e2e/test_determinism.py '{"engines": [[model, dtype, wideep options], ...]}'
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

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
    for model, dtype, options in spec["engines"]:
        llm = LLM(
            model=model,
            dtype=dtype,
            tensor_parallel_size=2,
            additional_config={"wideep": {"enabled": True, **options}},
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
        print("RESULT " + json.dumps({"engine": [model, dtype, options], "runs": runs}), flush=True)
        del llm


def _results(engines: list[list]) -> list[dict]:
    """[model, dtype, options] each -> [{how: logprobs}], from one child process (the
    engines in turn)."""
    # Imported here: the child runs this file as a script, without the repository root
    # on its path.
    from tests.e2e.launch import e2e_env, run_group

    spec = json.dumps({"engines": engines})
    output = run_group([sys.executable, __file__, spec], e2e_env(num_ranks=2), timeout=600)
    lines = [x.removeprefix("RESULT ") for x in output.splitlines() if x.startswith("RESULT ")]
    results = list(map(json.loads, lines))
    assert [r["engine"] for r in results] == engines, output[-3000:]
    return [r["runs"] for r in results]


def _cross_rank_replicas(path) -> str:
    """A placement file for the tiny Qwen3-MoE at EP 2: each rank holds its 8 experts plus
    a replica of 2 of the other rank's."""
    from vllm_wideep.eplb.files import ModelIdentity, PlacementRecord, write_placement
    from vllm_wideep.eplb.placement import Placement

    row = [*range(8), 8, 9, *range(8, 16), 0, 1]
    layers = [f"model.layers.{i}.mlp.experts" for i in range(2)]
    model = ModelIdentity("Qwen3MoeForCausalLM", num_experts=16, hidden_size=128)
    placement = Placement(torch.tensor([row, row]), num_ranks=2)
    write_placement(path, PlacementRecord(model, layers, placement))
    return str(path)


@pytest.mark.slow
def test_reruns_are_bit_identical(tiny_model, tmp_path):
    placement = _cross_rank_replicas(tmp_path / "placement.json")
    qwen = [tiny_model("qwen3_moe"), "float32", {"placement": placement}]
    deepseek = [tiny_model("deepseek_v3"), "bfloat16", {}]
    first = _results([qwen, deepseek])
    (fresh,) = _results([deepseek])
    for engine, runs in zip([qwen, deepseek], first, strict=True):
        for how, logprobs in runs.items():
            assert logprobs == runs["batch"], f"{engine}: {how} differs from the first batch"
    assert fresh["batch"] == first[1]["batch"], "a fresh engine differs"


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
