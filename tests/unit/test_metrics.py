"""Wide-EP metrics never hurt serving: snapshot writes that fail are counted, not raised;
malformed snapshots and other runs' are skipped; a scrape never raises; expert load per
layer and expert is summed over ranks."""

from __future__ import annotations

import json

import pytest
import torch

from vllm_wideep.config import WideEPConfig
from vllm_wideep.eplb.balancer import Balancer
from vllm_wideep.eplb.location import ExpertSlots
from vllm_wideep.plugin import metrics


@pytest.fixture
def balancer():
    weights = [torch.zeros(4, 2)]
    layer = ExpertSlots.create("layers.1", weights, 4, 1, 0, routed=False)
    balancer = Balancer([layer], WideEPConfig(enabled=True), None)
    layer.route(torch.tensor([[0], [0], [3]]), torch.randn(3, 8))
    layer.tokens_per_slot += torch.tensor([2, 0, 0, 1])
    balancer.step()
    return balancer


def _families(collector) -> dict[str, dict[tuple, float]]:
    return {
        family.name: {tuple(s.labels.values()): s.value for s in family.samples}
        for family in collector.collect()
    }


def test_snapshots_of_this_run_are_served_and_summed(tmp_path, monkeypatch, balancer):
    monkeypatch.setenv(metrics.METRICS_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(metrics.METRICS_RUN_ENV, "run-a")
    for rank in (0, 1):
        metrics.Publisher(rank).publish(balancer)
    served = _families(metrics.WideEPCollector(tmp_path, "run-a"))
    assert served["vllm_wideep:expert_load"] == {
        ("layers.1", "0"): 4.0,  # 2 per rank
        ("layers.1", "1"): 0.0,
        ("layers.1", "2"): 0.0,
        ("layers.1", "3"): 2.0,
    }
    assert served["vllm_wideep:rank_tokens"] == {("layers.1", "0"): 3, ("layers.1", "1"): 3}
    assert served["vllm_wideep:balancedness"] == {("layers.1",): 1.0}
    assert _families(metrics.WideEPCollector(tmp_path, "run-b"))["vllm_wideep:expert_load"] == {}
    model = {"architecture": "DeepseekV3ForCausalLM", "num_experts": 4, "hidden_size": 2}
    info = _families(metrics.WideEPCollector(tmp_path, "run-a", model))["vllm_wideep:model_info"]
    assert info == {("DeepseekV3ForCausalLM", "4", "2"): 1.0}


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        json.dumps([1, 2]),
        json.dumps({"run": "r", "ep_rank": 0, "layers": {"x": {"recent_tokens": "many"}}}),
        json.dumps({"run": "r", "ep_rank": "0", "layers": {}}),
        "[" * 100_000,
    ],
)
def test_a_malformed_snapshot_is_skipped(tmp_path, content, monkeypatch, balancer):
    monkeypatch.setenv(metrics.METRICS_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(metrics.METRICS_RUN_ENV, "r")
    metrics.Publisher(0).publish(balancer)
    (tmp_path / "rank-1.json").write_text(content)
    served = _families(metrics.WideEPCollector(tmp_path, "r"))
    assert served["vllm_wideep:rank_tokens"] == {("layers.1", "0"): 3}


def test_a_failed_write_is_counted_not_raised(tmp_path, monkeypatch, balancer):
    monkeypatch.setenv(metrics.METRICS_DIR_ENV, str(tmp_path / "gone"))  # no such folder
    publisher = metrics.Publisher(0)
    publisher.publish(balancer)
    publisher.publish(balancer)
    assert publisher.failures == 2


def test_a_scrape_of_a_missing_folder_serves_nothing(tmp_path):
    served = _families(metrics.WideEPCollector(tmp_path / "gone", "r"))
    assert all(not samples for samples in served.values())


def test_write_replaces_a_planted_link_without_following_it(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    target = tmp_path / "rank-0.json"
    target.symlink_to(victim)
    metrics.write_atomically(target, {"a": 1})
    assert victim.read_text() == "keep"
    assert not target.is_symlink() and json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank-0.json", "victim"]
