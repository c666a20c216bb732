"""Per-worker state (`layer/state.py`) and the expert slots' write notifications."""

from __future__ import annotations

import torch

from vllm_wideep.comm.base import TrafficCounters
from vllm_wideep.config import WideEPConfig
from vllm_wideep.eplb.location import ExpertSlots, home_placement
from vllm_wideep.layer import state


def _slots(name: str, num_experts: int = 4, num_ranks: int = 2, rank: int = 0, extra: int = 1):
    per_rank = num_experts // num_ranks + extra
    weights = [torch.arange(per_rank * 6, dtype=torch.float32).view(per_rank, 2, 3)]
    return ExpertSlots.create(name, weights, num_experts, num_ranks, rank, routed=False)


def test_create_fills_extra_slots_with_home_copies():
    slots = _slots("layer", num_experts=4, num_ranks=2, rank=1, extra=2)
    w = slots.weights[0]
    assert torch.equal(w[2], w[0]) and torch.equal(w[3], w[1])  # extra j <- (j - 2) % 2
    assert torch.equal(slots.physical_to_logical, home_placement(4, 2, 4))
    assert slots.routing is not None, "extra slots need routing tables"
    assert slots.tokens_per_slot.shape == (4,) and slots.step_counts.shape == (4,)
    plain = _slots("plain", extra=0)
    assert plain.routing is None


def test_set_placement_tells_the_weight_owners():
    slots = _slots("layer")
    calls = []
    slots.on_weights_changed.append(lambda: calls.append(1))
    slots.set_placement(slots.physical_to_logical)
    assert calls == [1]


def test_worker_state_per_engine_and_per_layer_name(monkeypatch):
    monkeypatch.setattr(state, "_current", None)
    installed = []
    monkeypatch.setattr(state, "on_first_layer", [lambda: installed.append(1)])
    engine, other_engine = object(), object()
    config = WideEPConfig(enabled=True)

    first = state.register_layer(engine, config, _slots("a"), TrafficCounters())
    assert state.register_layer(engine, config, _slots("b"), TrafficCounters()) is first
    assert installed == [1], "worker hooks are installed once per engine"
    reloaded = _slots("a")
    state.register_layer(engine, config, reloaded, TrafficCounters())
    assert list(first.slots) == ["a", "b"] and first.slots["a"] is reloaded, "a reload replaces"
    assert state.worker_state(engine) is first
    assert state.worker_state(other_engine) is None

    second = state.register_layer(other_engine, config, _slots("a"), TrafficCounters())
    assert second is not first and state.worker_state(engine) is None
    assert installed == [1, 1]


def test_balancer_is_built_over_the_registered_layers(monkeypatch):
    monkeypatch.setattr(state, "_current", None)
    monkeypatch.setattr(state, "on_first_layer", [])
    engine = object()
    worker = state.register_layer(
        engine, WideEPConfig(enabled=True), _slots("a"), TrafficCounters()
    )
    balancer = worker.balancer_or_none(lambda: None)
    assert balancer is not None and balancer.layer_names == ["a"]
    assert worker.balancer_or_none(lambda: None) is balancer
    state.register_layer(engine, WideEPConfig(enabled=True), _slots("b"), TrafficCounters())
    assert worker.balancer_or_none(lambda: None).layer_names == ["a", "b"]


def test_online_rebalancing_reserves_staging_once(monkeypatch):
    """With online rebalancing the first layer reserves the moves' staging rows (layers
    per step in flight, twice with overlapped moves, S slots of each slot tensor), which
    the balancer then uses; without it nothing is reserved."""
    monkeypatch.setattr(state, "_current", None)
    monkeypatch.setattr(state, "on_first_layer", [])
    engine = object()
    online = WideEPConfig(enabled=True, eplb="online", eplb_layers_per_step=3)
    worker = state.register_layer(engine, online, _slots("a"), TrafficCounters())
    pool = worker.staging
    assert pool is not None and pool.buffers[0].shape == (6, 3, 2, 3)  # overlap: 2 x 3 sets
    assert pool.nbytes == 6 * 3 * 6 * 4
    state.register_layer(engine, online, _slots("b"), TrafficCounters())
    assert worker.staging is pool, "reserved once for every layer"
    assert worker.balancer_or_none(lambda: None).staging is pool
    monkeypatch.setattr(state, "_current", None)
    off = state.register_layer(object(), WideEPConfig(enabled=True), _slots("a"), TrafficCounters())
    assert off.staging is None
