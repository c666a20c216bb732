"""The balancer through the real server (EP=2 through DP=2) and commands: serve with
online rebalancing (greedy outputs equal stock vLLM's at TP 1: this is also the Qwen3-MoE
float32 case of test_parity.py's EP 2 through DP 2 server), read its metrics on
`/metrics`, record the expert load, plan a placement file, serve from it: the same
tokens, the file's placement in every layer."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.e2e.compare import assert_greedy_parity
from tests.e2e.launch import VENV_BIN, Server, e2e_env, server_complete
from tests.e2e.reference import MAX_TOKENS, PROMPTS
from vllm_wideep.eplb.files import read_load, read_placement

pytestmark = pytest.mark.slow

SERVE = ["--data-parallel-size", "2", "--api-server-count", "1", "--dtype", "float32"]
SERVE += ["--max-model-len", "256", "--enforce-eager", "--served-model-name", "tiny"]


def _cli(*args: str) -> str:
    done = subprocess.run(
        [str(VENV_BIN / "vllm-wideep"), "eplb", *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _metric(text: str, name: str) -> dict[str, float]:
    """`{labels: value}` of one metric in Prometheus text format."""
    pattern = re.compile(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", re.M)
    return {labels: float(value) for labels, value in pattern.findall(text)}


def test_record_plan_and_serve_from_a_placement_file(tiny_model, stock, tmp_path):
    model = tiny_model("qwen3_moe")
    env = e2e_env(num_ranks=2, VLLM_SERVER_DEV_MODE="1")  # POST /collective_rpc
    load_file, placement_file = tmp_path / "load.json", tmp_path / "placement.json"

    online = ["--wideep-eplb", "online", "--wideep-eplb-interval", "4"]
    online += ["--wideep-redundant-experts", "2"]
    with Server(model, ["--enable-wideep", *online, *SERVE], env) as server:
        before = server_complete(server, PROMPTS, MAX_TOKENS)
        server_complete(server, PROMPTS, 2 * MAX_TOKENS)  # more steps: more rebalances
        _cli("record", "--url", server.url, "--out", str(load_file), "--source", "rpc")
        metrics = server.get_text("/metrics")
        _cli("record", "--url", server.url, "--out", str(tmp_path / "from_metrics.json"))
    assert_greedy_parity(stock[("qwen3_moe", "float32")], before, "float32")
    load = read_load(load_file)
    assert load.layers == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    # each layer saw every token once, with its top-4 choices, on one rank or the other
    per_layer = load.load.sum(dim=1)
    assert per_layer[0] == per_layer[1] > 0 and per_layer[0] % 4 == 0
    # the same from /metrics (no dev mode), as of the workers' last snapshot
    published = read_load(tmp_path / "from_metrics.json")
    assert published.layers == load.layers and published.model == load.model
    published_per_layer = published.load.sum(dim=1)
    assert published_per_layer[0] == published_per_layer[1] > 0
    assert published_per_layer[0] % 4 == 0 and published_per_layer[0] <= per_layer[0]
    balance = _metric(metrics, "vllm_wideep:balancedness")
    assert set(balance) == {f'layer="{name}"' for name in load.layers}, metrics[-2000:]
    assert all(0 < v <= 1 for v in balance.values())
    assert len(_metric(metrics, "vllm_wideep:rank_tokens")) == 4  # 2 layers x 2 ranks
    rebalances = _metric(metrics, "vllm_wideep:eplb_rebalances_total")
    assert len(rebalances) == 2 and min(rebalances.values()) >= 1, metrics[-3000:]
    assert max(_metric(metrics, "vllm_wideep:eplb_failures_total").values()) == 0

    printed = _cli(
        "placement",
        "--load",
        str(load_file),
        "--ep-size",
        "2",
        "--redundant-experts",
        "2",
        "--out",
        str(placement_file),
    )
    assert "balancedness before" in printed
    _cli(
        "heatmap",
        "--load",
        str(load_file),
        "--placement",
        str(placement_file),
        "--out",
        str(tmp_path / "load.png"),
    )
    assert (tmp_path / "load.png").stat().st_size > 0
    placement = read_placement(placement_file)

    args = ["--enable-wideep", "--wideep-placement", str(placement_file), *SERVE]
    with Server(model, args, env) as server:
        after = server_complete(server, PROMPTS, MAX_TOKENS)
        replies = server.post("/collective_rpc", {"method": "wideep_load"})["results"]
    assert_greedy_parity(before, after, "float32")
    assert sorted(r["ep_rank"] for r in replies) == [0, 1]
    for reply in replies:  # serving from the file's placement, in every layer
        for name, row in zip(reply["layers"], reply["physical_to_logical"], strict=True):
            assert row == placement.row_for(name).tolist(), name
