"""Wide EP against stock vLLM on a representative set of vLLM's MoE architectures (the
whole table, from benchmarks/coverage.py, is docs/coverage.md): greedy tokens equal to
stock vLLM at TP 1 (float32, the plugin not loaded) at EP 2 through TP 2 for Llama 4,
GLM-4.5, Qwen2-MoE, a Gemma 4 (GELU-tanh experts) and EXAONE-MoE (SwiGLU clamped by
`swiglu_limits`); gpt-oss (expert biases, clamped SwiGLU) served by `vllm serve
--enable-wideep` over DP 2 while the balancer moves experts; an MXFP4 gpt-oss refused,
naming MXFP4.

Stock vLLM runs every model in one process, wide EP every TP 2 model in one other
(benchmarks/coverage.py's runner): engine starts dominate the time on 2 cores.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks.coverage import (
    MAX_TOKENS,
    STOCK_ENV,
    build_models,
    last_error,
    run_cases,
    stock_cases,
    wideep_cases,
)
from tests.e2e.compare import assert_greedy_parity
from tests.e2e.launch import REPO, Server, e2e_env, server_complete, with_config
from tests.e2e.reference import PROMPTS

pytestmark = pytest.mark.slow

TP2_MODELS = ["llama4", "glm4_moe", "qwen2_moe", "gemma4", "exaone_moe"]
SERVED_MODEL = "gpt_oss"


@pytest.fixture(scope="module")
def models() -> dict[str, tuple[str, str]]:
    root = Path(os.environ.get("WIDEEP_TEST_CACHE", REPO / ".cache")) / "coverage-models"
    return build_models([*TP2_MODELS, SERVED_MODEL], root)


@pytest.fixture(scope="module")
def stock(models) -> dict[str, dict]:
    """Stock vLLM at TP 1, every model in one process."""
    return run_cases(stock_cases(models), e2e_env(**STOCK_ENV))


@pytest.fixture(scope="module")
def tp2(models) -> dict[str, dict]:
    """`--enable-wideep` at EP 2 through TP 2, every TP 2 model in one process."""
    return run_cases(wideep_cases({n: models[n] for n in TP2_MODELS}), e2e_env(num_ranks=2))


def _assert_same_as_stock(reference: dict, candidate: dict) -> None:
    assert "error" not in reference, last_error(reference.get("log", reference["error"]))
    assert "error" not in candidate, last_error(candidate.get("log", candidate["error"]))
    assert_greedy_parity(reference, candidate, "float32")  # logprobs, with a clear message
    assert candidate["tokens"] == reference["tokens"]


@pytest.mark.parametrize("name", TP2_MODELS)
def test_ep2_through_tp2_equals_stock(name, stock, tp2):
    _assert_same_as_stock(stock[name], tp2[name])


def test_gpt_oss_served_over_dp2_while_rebalancing(models, stock):
    path, _ = models[SERVED_MODEL]
    args = ["--enable-wideep", "--data-parallel-size", "2", "--api-server-count", "1"]
    args += ["--wideep-eplb", "online", "--wideep-eplb-interval", "3"]
    args += ["--dtype", "float32", "--max-model-len", "256", "--enforce-eager"]
    args += ["--served-model-name", "tiny"]
    env = e2e_env(num_ranks=2, VLLM_SERVER_DEV_MODE="1")  # for POST /collective_rpc
    with Server(path, args, env) as server:
        result = server_complete(server, PROMPTS, MAX_TOKENS)
        server_complete(server, PROMPTS, MAX_TOKENS)  # more steps: the balancer moves
        stats = server.post("/collective_rpc", {"method": "wideep_stats"})["results"]
    _assert_same_as_stock(stock[SERVED_MODEL], result)
    assert sorted(s["ep_rank"] for s in stats) == [0, 1]
    for rank in stats:
        for layer, counters in rank["eplb"].items():
            assert counters["rebalances"] >= 1, (layer, counters)
            assert counters["failures"] == 0, (layer, counters)


def test_mxfp4_gpt_oss_is_refused_naming_mxfp4(models, tmp_path, engine_config):
    """Real gpt-oss checkpoints are MXFP4: the engine config is refused before any
    weight loads, naming the format (the config is enough, weights are never read)."""
    mxfp4 = {"quant_method": "mxfp4"}
    model = with_config(
        models[SERVED_MODEL][0], tmp_path / "gpt-oss-mxfp4", quantization_config=mxfp4
    )
    with pytest.raises(ValueError, match=r"quantized as MXFP4") as error:
        engine_config(model, additional_config={"wideep": {"enabled": True}})
    assert "vllm_wideep:" in str(error.value) and "Drop --enable-wideep" in str(error.value)
