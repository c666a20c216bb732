"""MTP speculative decoding with wide EP: greedy outputs and vLLM's acceptance counts
equal stock vLLM's with the same `num_speculative_tokens` K, and the draft layer's MoE
runs through wide EP on every rank, in lock-step.

    K = 2, EP 2 through DP 2    `vllm serve --enable-wideep --data-parallel-size 2
                                --speculative-config '{"method": "mtp", ...}'`, one request
                                at a time, so the idle DP rank runs dummy target and
                                draft passes   vs stock vLLM at TP 1
    K = 1, EP 2 through TP 2    LLM class   vs stock vLLM at TP 1

The model is the tiny DeepSeek-V3 whose MTP layer copies the last MoE layer
(`deepseek_v3_mtp`, see vllm_wideep/tiny_models.py): its drafts are accepted about half
of the time, so equal acceptance counts show that the draft MoE computed the same as
stock's. (With random MTP weights about 1 draft in 100 is accepted, whatever the draft
layer computes.) Three vLLM launches: the cheapest cover of K = 1, 2 and EP 2 through
DP 2, TP 2, plus one in-process stock engine per K.
"""

from __future__ import annotations

import json

import pytest

from tests.e2e.compare import assert_greedy_parity
from tests.e2e.launch import Server, e2e_env, generate, server_complete

pytestmark = pytest.mark.slow

ARCH = "deepseek_v3_mtp"
DTYPE = "float32"
PROMPTS = [
    "The quick brown fox",
    "Once upon a time in a land far away, there lived",
    "def add(a, b):",
    "Hi",
]
MAX_TOKENS = 16
WIDEEP = {"wideep": {"enabled": True}}
MTP_LAYER = "model.layers.3.mlp.experts"  # num_hidden_layers + 0: the draft model's MoE
# Stock vLLM at TP 1 accepts 57% (K=1) and 36% (K=2) of this model's drafts here.
MIN_ACCEPTANCE = 0.2


def mtp(k: int) -> dict:
    return {"method": "mtp", "num_speculative_tokens": k}


def _run(model: str, k: int, **extra) -> dict:
    # Every prompt runs alone, as the server test sends them.
    return {
        "model": model,
        "dtype": DTYPE,
        "one_prompt_at_a_time": True,
        "speculative_config": mtp(k),
        **extra,
    }


def _spec(runs: list[dict]) -> dict:
    return {"runs": runs, "prompts": PROMPTS, "max_tokens": MAX_TOKENS, "logprobs": 2}


def _acceptance(counts: dict) -> float:
    return counts["accepted_tokens"] / counts["draft_tokens"]


def _assert_same_outputs_and_acceptance(reference: dict, candidate: dict) -> None:
    parity = assert_greedy_parity(reference, candidate, DTYPE)
    print(f"stock {reference['spec_decode']} wide EP {candidate['spec_decode']} {parity}")
    assert reference["spec_decode"]["draft_tokens"] > 0
    assert _acceptance(reference["spec_decode"]) >= MIN_ACCEPTANCE, reference["spec_decode"]
    if not parity.forks:  # the same tokens verified: the same drafts accepted
        assert candidate["spec_decode"] == reference["spec_decode"]
    else:
        diff = abs(_acceptance(candidate["spec_decode"]) - _acceptance(reference["spec_decode"]))
        assert diff < 0.1, (reference["spec_decode"], candidate["spec_decode"], parity)


def _assert_draft_layer_on_every_rank(stats: list[dict], num_ranks: int) -> None:
    """The draft MoE is a wide-EP layer of its own, computed on every rank; every rank
    ran every MoE layer the same number of times (the a2a exchange needs all of them)."""
    assert sorted(s["ep_rank"] for s in stats) == list(range(num_ranks))
    for s in stats:
        counts = s["tokens_per_expert"]
        assert MTP_LAYER in counts and sum(counts[MTP_LAYER]) > 0, (s["ep_rank"], counts.keys())
    calls = [{layer: t["calls"] for layer, t in s["traffic"].items()} for s in stats]
    assert all(c == calls[0] for c in calls), calls
    assert calls[0][MTP_LAYER] >= calls[0]["model.layers.1.mlp.experts"]  # 1+ draft pass a step


@pytest.fixture(scope="module")
def model(tiny_model) -> str:
    return tiny_model(ARCH)


@pytest.fixture(scope="module")
def stock_tp1(model):
    """K -> stock vLLM (plugin not loaded) at TP 1; in-process engines (fast start)."""
    env = e2e_env(VLLM_PLUGINS="", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    results = generate(_spec([_run(model, 1), _run(model, 2)]), env, timeout=600)
    return dict(zip([1, 2], results, strict=True))


def test_ep2_through_tp2_k1(model, stock_tp1):
    runs = [_run(model, 1, tensor_parallel_size=2, additional_config=WIDEEP)]
    [wideep] = generate(_spec(runs), e2e_env(num_ranks=2), timeout=900)
    _assert_same_outputs_and_acceptance(stock_tp1[1], wideep)
    _assert_draft_layer_on_every_rank(wideep["stats"], 2)


def test_ep2_through_dp2_server_k2(model, stock_tp1):
    args = ["--enable-wideep", "--data-parallel-size", "2", "--api-server-count", "1"]
    args += ["--speculative-config", json.dumps(mtp(2))]
    args += ["--dtype", DTYPE, "--max-model-len", "256", "--enforce-eager"]
    args += ["--served-model-name", "tiny"]
    env = e2e_env(num_ranks=2, VLLM_SERVER_DEV_MODE="1")  # for POST /collective_rpc
    with Server(model, args, env) as server:
        parts = [server_complete(server, [p], MAX_TOKENS) for p in PROMPTS]
        stats = server.post("/collective_rpc", {"method": "wideep_stats"})["results"]
        metrics = server.get_text("/metrics")
    result = {key: [seq for part in parts for seq in part[key]] for key in parts[0]}
    result["spec_decode"] = {
        "draft_tokens": _counter(metrics, "vllm:spec_decode_num_draft_tokens_total"),
        "accepted_tokens": _counter(metrics, "vllm:spec_decode_num_accepted_tokens_total"),
    }
    _assert_same_outputs_and_acceptance(stock_tp1[2], result)
    _assert_draft_layer_on_every_rank(stats, 2)


def _counter(prometheus_text: str, name: str) -> int:
    """A counter's sum over its label sets (one per DP engine)."""
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in prometheus_text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    ]
    assert values, f"{name} not in /metrics"
    return int(sum(values))
