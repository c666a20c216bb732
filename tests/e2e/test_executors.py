"""Wide EP under both distributed executors, with the token-exchange backends.

EP 2 through TP 2 on the tiny Qwen3-MoE (float32), greedy parity with stock vLLM at TP 1
(the session's `stock` reference, tests/e2e/reference.py):
* the multiprocessing executor (`distributed_executor_backend="mp"`, given explicitly)
  with `capacity` and `allgather` (`a2a` under mp is `test_parity.py`'s TP 2 case);
* the Ray executor on a local two-node Ray cluster on 127.0.0.1 (a head and one worker
  node, `tests/e2e/ray_generate.py`) with `a2a`.
Each engine start costs a minute or more on 2 cores, so one process runs the mp engines
one after the other.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tests.e2e.compare import assert_greedy_parity
from tests.e2e.launch import REPO, e2e_env, generate, run_group
from tests.e2e.reference import spec

pytestmark = pytest.mark.slow

MP_BACKENDS = ["capacity", "allgather"]


def _run(model: str, backend: str, executor: str) -> dict:
    return {
        "model": model,
        "dtype": "float32",
        "tensor_parallel_size": 2,
        "distributed_executor_backend": executor,
        "additional_config": {"wideep": {"enabled": True, "a2a_backend": backend}},
    }


@pytest.fixture(scope="module")
def reference(stock) -> dict:
    return stock[("qwen3_moe", "float32")]


@pytest.fixture(scope="module")
def mp_runs(tiny_model):
    """backend -> result, all in one process (each its own engine)."""
    model = tiny_model("qwen3_moe")
    runs = [_run(model, backend, "mp") for backend in MP_BACKENDS]
    results = generate(spec(runs), e2e_env(num_ranks=2), timeout=900)
    return dict(zip(MP_BACKENDS, results, strict=True))


@pytest.fixture(scope="module")
def ray_a2a(tiny_model):
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed (pip install -e '.[ray]')")
    ray_spec = spec([_run(tiny_model("qwen3_moe"), "a2a", "ray")])
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


def _traffic(result: dict) -> dict[str, int]:
    """Counters summed over ranks and layers."""
    totals: dict[str, int] = {}
    for rank in result["stats"]:
        for counters in rank["traffic"].values():
            for name, value in counters.items():
                totals[name] = totals.get(name, 0) + value
    return totals


def _check_stats(result: dict) -> None:
    stats = result["stats"]
    assert sorted(s["ep_rank"] for s in stats) == [0, 1]
    for s in stats:
        assert s["tokens_per_expert"], "no wide-EP MoE layer"
        for layer, counts in s["tokens_per_expert"].items():
            assert sum(counts) > 0, f"rank {s['ep_rank']} computed nothing in {layer}"
        for layer, traffic in s["traffic"].items():
            assert traffic["calls"] > 0 and traffic["dispatch_sent_bytes"] > 0, layer


@pytest.mark.parametrize("backend", MP_BACKENDS)
def test_mp_executor(backend, mp_runs, reference):
    assert_greedy_parity(reference, mp_runs[backend], "float32")
    _check_stats(mp_runs[backend])
    assert _traffic(mp_runs[backend])["overflow_rows"] == 0


def test_ray_executor_on_a_local_two_node_cluster(ray_a2a, reference):
    assert_greedy_parity(reference, ray_a2a, "float32")
    _check_stats(ray_a2a)


def test_capacity_moves_padded_blocks(mp_runs):
    """Same prompts: with its default (worst-case) capacity the `capacity` exchange sends a
    full block per peer on every call, more than `allgather`'s rows. Per call, because two
    engines need not make the same number of MoE calls (profile and warm-up runs differ).
    (`a2a` against `allgather`, byte for byte: tests/dist/test_a2a_dispatch.py.)"""
    capacity, allgather = _traffic(mp_runs["capacity"]), _traffic(mp_runs["allgather"])
    assert capacity["calls"] > 0 and allgather["calls"] > 0
    for key in ("dispatch_sent_bytes", "combine_sent_bytes"):
        assert capacity[key] / capacity["calls"] > allgather[key] / allgather["calls"], key
