"""Run greedy generation for a list of engine configs, print one JSON result line.

Run as a subprocess by the tests (each vLLM run in its own process group):
    python tests/e2e/generate.py '<json spec>'
spec: {"runs": [{"model", "dtype", "tensor_parallel_size", "additional_config",
                 "distributed_executor_backend"}, ...],
       "prompts": [...], "max_tokens": N, "logprobs": K}
Output line: `RESULT {"runs": [{"tokens": [[...]], "logprobs": [[{id: lp}, ...]],
                               "stats": [...]}]}`
"""

import gc
import json
import sys


def _run(run: dict, prompts, max_tokens: int, logprobs: int) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=run["model"],
        dtype=run["dtype"],
        tensor_parallel_size=run.get("tensor_parallel_size", 1),
        distributed_executor_backend=run.get("distributed_executor_backend"),
        additional_config=run.get("additional_config") or {},
        speculative_config=run.get("speculative_config"),
        disable_log_stats=not run.get("speculative_config"),  # for the acceptance counters
        max_model_len=256,
        enforce_eager=True,
        seed=0,
    )
    params = SamplingParams(
        temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs
    )
    if run.get("one_prompt_at_a_time"):
        # Each prompt alone (a server test sending one request at a time compares).
        outputs = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
    else:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    result = {
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "logprobs": [
            [{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs]
            for o in outputs
        ],
    }
    if run.get("speculative_config"):
        result["spec_decode"] = _spec_decode_counts(llm)
    if (run.get("additional_config") or {}).get("wideep", {}).get("enabled"):
        result["stats"] = llm.collective_rpc("wideep_stats")
    del llm
    gc.collect()
    return result


def _spec_decode_counts(llm) -> dict[str, int]:
    """vLLM's speculative-decoding counters: {"draft_tokens": N, "accepted_tokens": M}."""
    names = {
        "vllm:spec_decode_num_draft_tokens": "draft_tokens",
        "vllm:spec_decode_num_accepted_tokens": "accepted_tokens",
    }
    counts = dict.fromkeys(names.values(), 0)
    for metric in llm.get_metrics():
        if metric.name in names:
            counts[names[metric.name]] += int(metric.value)
    return counts


def main() -> None:
    spec = json.loads(sys.argv[1])
    results = [
        _run(run, spec["prompts"], spec["max_tokens"], spec.get("logprobs", 2))
        for run in spec["runs"]
    ]
    print("RESULT " + json.dumps({"runs": results}), flush=True)


if __name__ == "__main__":
    main()
