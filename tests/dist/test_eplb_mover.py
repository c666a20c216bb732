"""Expert weights moved between gloo ranks land in the right slots, and a failed
verification leaves every rank's weights and placement as they were."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.dist.harness import run_ranks
from vllm_wideep.eplb import mover
from vllm_wideep.eplb.balancer import Balancer
from vllm_wideep.eplb.mover import apply_moves, plan_moves
from vllm_wideep.eplb.policy import plan_placement
from vllm_wideep.eplb.traces import zipf_load
from vllm_wideep.layer.remap import ExpertRouting
from vllm_wideep.layer.slots import ExpertSlots, home_placement
from vllm_wideep.plugin.config import WideEPConfig

NUM_EXPERTS = 8


def _tagged(expert_per_slot: torch.Tensor, layer: int, dtype) -> list[torch.Tensor]:
    """Weights whose every element names (layer, expert): w13 [S, 4, 3], w2 [S, 3, 2]."""
    tag = (layer * 100 + expert_per_slot).to(dtype)
    w13 = tag[:, None, None] + torch.arange(12, dtype=dtype).view(4, 3) / 1024
    w2 = -tag[:, None, None] - torch.arange(6, dtype=dtype).view(3, 2) / 1024
    return [w13.contiguous(), w2.contiguous()]


def _check_weights(weights, expert_per_slot, layer):
    expected = _tagged(expert_per_slot, layer, weights[0].dtype)
    for w, e in zip(weights, expected, strict=True):
        assert torch.equal(w, e), f"layer {layer}: slots hold {w[:, 0, 0].tolist()}"


def _sequence_of_plans(rank, world_size, dtype_name):
    dtype = getattr(torch, dtype_name)
    slots_per_rank = NUM_EXPERTS // world_size + 1
    mine = slice(rank * slots_per_rank, (rank + 1) * slots_per_rank)
    current = home_placement(NUM_EXPERTS, world_size, slots_per_rank)
    weights = _tagged(current[mine], layer=3, dtype=dtype)
    storage = [w.data_ptr() for w in weights]
    for step in range(6):  # drifting hot experts, each plan kept close to the last
        load = zipf_load(1, NUM_EXPERTS, tokens=5000, alpha=1.5, seed=step)
        target = plan_placement(load, world_size, slots_per_rank, current[None])[0]
        if step % 2:
            target = plan_placement(load, world_size, slots_per_rank)[0]  # from scratch
        plan = plan_moves(current, target, slots_per_rank)
        assert apply_moves(plan, weights, rank, world_size, dist.group.WORLD)
        current = target
        _check_weights(weights, current[mine], layer=3)
    assert [w.data_ptr() for w in weights] == storage  # moved in place


def _failed_verification_keeps_old_weights(rank, world_size):
    slots_per_rank = NUM_EXPERTS // world_size + 1
    mine = slice(rank * slots_per_rank, (rank + 1) * slots_per_rank)
    old = home_placement(NUM_EXPERTS, world_size, slots_per_rank)
    new = old.roll(slots_per_rank)  # every slot changes, all by P2P
    weights = _tagged(old[mine], layer=0, dtype=torch.float32)
    if rank == world_size - 1:  # this rank's staged slots look corrupt
        mover.verify = lambda staged, expected: False
    ok = apply_moves(plan_moves(old, new, slots_per_rank), weights, rank, world_size, None)
    assert ok is False
    _check_weights(weights, old[mine], layer=0)


def _balancer_moves_weights_and_tables(rank, world_size):
    """Two layers, skewed load, re-plan every 2 steps, one layer moved per step."""
    slots_per_rank = NUM_EXPERTS // world_size + 1
    mine = slice(rank * slots_per_rank, (rank + 1) * slots_per_rank)
    home = home_placement(NUM_EXPERTS, world_size, slots_per_rank)
    layers = []
    for layer in range(2):
        routing = ExpertRouting(NUM_EXPERTS, NUM_EXPERTS, rank, "cpu")
        slots = ExpertSlots(
            layer_name=f"layers.{layer}",
            num_experts=NUM_EXPERTS,
            num_ranks=world_size,
            rank=rank,
            slots_per_rank=slots_per_rank,
            weights=_tagged(home[mine], layer, torch.bfloat16),
            physical_to_logical=home,
            routing=routing,
            step_counts=torch.zeros(NUM_EXPERTS, dtype=torch.int64),
        )
        slots.set_placement(home)
        layers.append(slots)
    config = WideEPConfig(
        enabled=True, eplb="online", eplb_interval=2, eplb_layers_per_step=1, eplb_window=4
    )
    balancer = Balancer(layers, config, dist.group.WORLD)
    gen = torch.Generator().manual_seed(rank)
    hot = torch.tensor([[5, 5, 5, 5], [2, 2, 7, 7]])  # per layer, this step's hot experts
    for _ in range(2):  # step 2 plans and moves layer 0
        for layer, slots in enumerate(layers):
            slots.route(
                torch.cat([hot[layer], torch.randint(NUM_EXPERTS, (4,), generator=gen)])[:, None]
            )
        balancer.step()
    assert balancer.pending == [1]  # layer 1 waits for the next step
    for slots in layers[:1]:
        _check_weights(slots.weights, slots.physical_to_logical[mine], 0)
    assert torch.equal(layers[1].physical_to_logical, home)
    balancer.step(is_dummy=True)  # dummy steps move too
    assert balancer.pending == []
    for layer, slots in enumerate(layers):
        assert not torch.equal(slots.physical_to_logical, home)
        _check_weights(slots.weights, slots.physical_to_logical[mine], layer)
        # the hot expert got a replica; the tables route to slots that hold the expert
        assert int((slots.physical_to_logical == hot[layer, 0]).sum()) >= 2
        ids = torch.arange(NUM_EXPERTS)[:, None]
        assert torch.equal(slots.physical_to_logical[slots.route(ids)], ids)
    assert all(c.rebalances == 1 and c.failures == 0 for c in balancer.counters)


@pytest.mark.parametrize("world_size", [2, 4])
def test_any_sequence_of_plans_puts_every_expert_in_its_slots(world_size):
    run_ranks(_sequence_of_plans, world_size, "bfloat16")


def test_failed_verification_keeps_the_old_placement_on_every_rank():
    run_ranks(_failed_verification_keeps_old_weights, 2)


@pytest.mark.parametrize("world_size", [2, 4])
def test_balancer_replans_from_load_and_moves_a_few_layers_per_step(world_size):
    run_ranks(_balancer_moves_weights_and_tables, world_size)
