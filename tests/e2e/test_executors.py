"""Wide EP under vLLM's Ray executor, on a local two-node Ray cluster on 127.0.0.1 (a head
and one worker node, `tests/e2e/ray_generate.py`): EP 2 through TP 2 on the tiny
Qwen3-MoE (float32, `alltoall`), greedy parity with stock vLLM at TP 1 (the session's `stock`
reference, tests/e2e/reference.py). The multiprocessing executor, with every
token-exchange backend, is `test_parity.py`'s TP 2 cases.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tests.e2e.compare import assert_greedy_parity
from tests.e2e.launch import REPO, e2e_env, run_group
from tests.e2e.reference import spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(stock) -> dict:
    return stock[("qwen3_moe", "float32")]


@pytest.fixture(scope="module")
def ray_a2a(tiny_model):
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed (pip install -e '.[ray]')")
    run = {
        "model": tiny_model("qwen3_moe"),
        "dtype": "float32",
        "tensor_parallel_size": 2,
        "distributed_executor_backend": "ray",
        "additional_config": {"wideep": {"enabled": True, "token_exchange": "alltoall"}},
    }
    ray_spec = spec([run])
    env = e2e_env(num_ranks=2, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    output = run_group(
        [sys.executable, str(REPO / "tests/e2e/ray_generate.py"), json.dumps(ray_spec)],
        env,
        timeout=900,
    )
    assert "Connected to Ray cluster" in output
    line = next(line for line in output.splitlines() if line.startswith("RESULT "))
    (result,) = json.loads(line.removeprefix("RESULT "))["runs"]
    return result


def _check_stats(result: dict) -> None:
    stats = result["stats"]
    assert sorted(s["ep_rank"] for s in stats) == [0, 1]
    for s in stats:
        assert s["tokens_per_expert"], "no wide-EP MoE layer"
        for layer, counts in s["tokens_per_expert"].items():
            assert sum(counts) > 0, f"rank {s['ep_rank']} computed nothing in {layer}"
        for layer, traffic in s["traffic"].items():
            assert traffic["calls"] > 0 and traffic["dispatch_sent_bytes"] > 0, layer


def test_ray_executor_on_a_local_two_node_cluster(ray_a2a, reference):
    assert_greedy_parity(reference, ray_a2a, "float32")
    _check_stats(ray_a2a)
