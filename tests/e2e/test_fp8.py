"""FP8 checkpoints (128 x 128 block scales) under wide EP: greedy outputs equal stock vLLM
TP 1 on the dequantized copy of the same checkpoint (stock vLLM 0.32 has no FP8 MoE or
FP8 Linear kernel for this CPU, so that copy is the reference; the weight-only FP8 path
computes the same numbers).

Models (`tiny_models.build_fp8_model`, the tiny DeepSeek-V3 with 128-multiple sizes), in
DeepSeek's format (`quant_method: fp8`) and llm-compressor's (`compressed-tensors`):
experts-only FP8 in float32 and whole-model FP8 in bfloat16 (near-tie rule, as the
suite's other bf16 comparisons). Layouts: EP 1; EP 2 through TP 2 with 2 redundant slots
and a new placement every 3 steps (experts-only, float32: stock's own bf16 TP 2 forks
from its TP 1 on MLA); EP 2 through DP 2 with the OpenAI server, rebalancing the same way
(whole model, bfloat16)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.e2e.compare import assert_greedy_parity
from tests.e2e.launch import Server, e2e_env, generate, server_complete
from tests.e2e.reference import MAX_TOKENS, PROMPTS, spec
from vllm_wideep.tiny_models import build_fp8_model, dequantized_dir

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ARCH = "deepseek_v3_fp8"
# (format, scope, dtype): the checkpoints and the dtype each is served in.
FORMATS = ["fp8", "compressed-tensors"]
MODELS = [
    (fmt, scope, dtype)
    for fmt in FORMATS
    for scope, dtype in [("experts", "float32"), ("all", "bfloat16")]
]
EXPERTS_ONLY = [m for m in MODELS if m[1] == "experts"]
WHOLE_MODEL = [m for m in MODELS if m[1] == "all"]
REBALANCING = {
    "enabled": True,
    "redundant_experts": 2,
    "eplb": "online",
    "eplb_interval": 3,
    "eplb_layers_per_step": 1,
    "eplb_window": 16,
}


@pytest.fixture(scope="module")
def fp8_model():
    """(format, scope, dtype) -> path of the FP8 checkpoint; its reference is its
    `dequantized_dir`."""
    root = Path(os.environ.get("WIDEEP_TEST_CACHE", REPO / ".cache")) / "tiny-models"
    return {
        (fmt, scope, dtype): str(
            build_fp8_model(
                root / f"{ARCH}-{fmt}-{scope}-{dtype}", ARCH, dtype=dtype, fmt=fmt, scope=scope
            )
        )
        for fmt, scope, dtype in MODELS
    }


@pytest.fixture(scope="module")
def stock_on_dequantized(fp8_model):
    """Stock vLLM TP 1, plugin not loaded, on each dequantized copy (one process)."""
    runs = [{"model": str(dequantized_dir(fp8_model[m])), "dtype": m[2]} for m in MODELS]
    env = e2e_env(VLLM_PLUGINS="", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    return dict(zip(MODELS, generate(spec(runs), env, timeout=900), strict=True))


@pytest.fixture(scope="module")
def ep1(fp8_model):
    """Wide EP at EP 1 on each FP8 checkpoint, and on the experts-only one's dequantized
    copy (for the memory comparison); one process."""
    wideep = {"additional_config": {"wideep": {"enabled": True}}}
    runs = [{"model": fp8_model[m], "dtype": m[2], **wideep} for m in MODELS]
    runs.append(
        {"model": str(dequantized_dir(fp8_model[MODELS[0]])), "dtype": "bfloat16", **wideep}
    )
    env = e2e_env(VLLM_ENABLE_V1_MULTIPROCESSING="0")
    results = generate(spec(runs), env, timeout=900)
    return dict(zip(MODELS, results, strict=False)), results[-1]


@pytest.mark.parametrize("model", MODELS, ids="-".join)
def test_ep1_equals_stock_on_the_dequantized_copy(model, stock_on_dequantized, ep1):
    by_model, _ = ep1
    assert_greedy_parity(stock_on_dequantized[model], by_model[model], model[2])
    if model[2] == "float32":  # weight-only FP8 computes the dequantized weights' math
        assert by_model[model]["tokens"] == stock_on_dequantized[model]["tokens"]


def test_fp8_experts_hold_half_the_bytes_of_bf16(ep1):
    """Expert bytes per rank (weights and scales) of the FP8 checkpoint against the same
    experts in bfloat16 (its dequantized copy, served in bfloat16): at most 0.53x."""
    by_model, bf16 = ep1
    fp8_bytes = sum(by_model[MODELS[0]]["stats"][0]["expert_bytes"].values())
    bf16_bytes = sum(bf16["stats"][0]["expert_bytes"].values())
    assert fp8_bytes / bf16_bytes <= 0.53, (fp8_bytes, bf16_bytes)


@pytest.fixture(scope="module")
def tp2(fp8_model):
    """Each experts-only checkpoint at EP 2 through TP 2, rebalancing (one process)."""
    runs = [
        {
            "model": fp8_model[model],
            "dtype": model[2],
            "tensor_parallel_size": 2,
            "distributed_executor_backend": "mp",
            "additional_config": {"wideep": REBALANCING},
        }
        for model in EXPERTS_ONLY
    ]
    results = generate(spec(runs), e2e_env(num_ranks=2), timeout=1200)
    return dict(zip(EXPERTS_ONLY, results, strict=True))


@pytest.mark.parametrize("model", EXPERTS_ONLY, ids="-".join)
def test_ep2_through_tp2_while_rebalancing(model, tp2, stock_on_dequantized):
    result = tp2[model]
    assert result["tokens"] == stock_on_dequantized[model]["tokens"]
    assert_greedy_parity(stock_on_dequantized[model], result, model[2])
    _rebalanced_without_failures(result["stats"])


@pytest.mark.parametrize("model", WHOLE_MODEL, ids="-".join)
def test_ep2_through_dp2_server_while_rebalancing(model, fp8_model, stock_on_dequantized):
    args = ["--enable-wideep", "--data-parallel-size", "2", "--api-server-count", "1"]
    args += ["--dtype", model[2], "--max-model-len", "256", "--enforce-eager"]
    args += ["--served-model-name", "tiny", "--wideep-redundant-experts", "2"]
    args += ["--wideep-eplb", "online", "--wideep-eplb-interval", "3"]
    args += ["--wideep-eplb-layers-per-step", "1", "--wideep-eplb-window", "16"]
    env = e2e_env(num_ranks=2, VLLM_SERVER_DEV_MODE="1")  # for POST /collective_rpc
    with Server(fp8_model[model], args, env) as server:
        result = server_complete(server, PROMPTS, MAX_TOKENS)
        stats = server.post("/collective_rpc", {"method": "wideep_stats"})["results"]
    assert_greedy_parity(stock_on_dequantized[model], result, model[2])
    _rebalanced_without_failures(stats)


def _rebalanced_without_failures(stats: list[dict]) -> None:
    assert sorted(s["ep_rank"] for s in stats) == [0, 1]
    for rank in stats:
        for layer, counters in rank["eplb"].items():
            assert counters["rebalances"] >= 1, (layer, counters)
            assert counters["failures"] == 0, (layer, counters)
    assert sum(c["moved_bytes"] for r in stats for c in r["eplb"].values()) > 0
