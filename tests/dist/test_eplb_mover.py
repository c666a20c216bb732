"""Expert weights moved between gloo ranks land in the right slots, and a failed
verification leaves every rank's weights and placement as they were."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from tools.ranks import run_ranks
from vllm_wideep.config import WideEPConfig
from vllm_wideep.eplb import balancer as balancer_module
from vllm_wideep.eplb import mover
from vllm_wideep.eplb.balancer import Balancer, staging_sets
from vllm_wideep.eplb.location import ExpertSlots, home_placement
from vllm_wideep.eplb.mover import (
    MovesRefused,
    StagingPool,
    apply_moves,
    begin_moves,
    begin_moves_batch,
    finish_moves,
    finish_moves_batch,
    plan_moves,
)
from vllm_wideep.eplb.policy import plan_placement
from vllm_wideep.eplb.traces import zipf_load

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
    if rank == world_size - 1:  # one byte of this rank's first received slot altered
        mover.drill_corrupt_next_receive()
    plan = plan_moves(old, new, slots_per_rank)
    assert apply_moves(plan, weights, rank, world_size, None) is False
    _check_weights(weights, old[mine], layer=0)
    assert apply_moves(plan, weights, rank, world_size, None)  # the drill is one-shot
    _check_weights(weights, new[mine], layer=0)


def _layers_moved_together(rank, world_size):
    """Three layers begun and finished together: one all-reduce at the beginning (the
    vote and the checksums), one at the end (the verdicts), whatever the layer count; a
    layer one rank cannot prepare (layer 1) and a layer whose transfer arrives altered
    (layer 0) each keep their old placement on every rank, layer 2 commits."""
    slots_per_rank = NUM_EXPERTS // world_size + 1
    mine = slice(rank * slots_per_rank, (rank + 1) * slots_per_rank)
    old = home_placement(NUM_EXPERTS, world_size, slots_per_rank)
    new = old.roll(slots_per_rank)  # every slot changes, all by P2P
    weights = [_tagged(old[mine], layer, torch.float32) for layer in range(3)]
    plan = plan_moves(old, new, slots_per_rank)
    prepare, all_reduce = mover._prepare, dist.all_reduce
    calls = []

    def failing_prepare(plan, weights_, *args):
        if rank == world_size - 1 and weights_ is weights[1]:  # stand-in for an OOM
            raise torch.OutOfMemoryError("staging layer 1")
        return prepare(plan, weights_, *args)

    def counted_all_reduce(*args, **kwargs):
        calls.append(args[0].shape)
        return all_reduce(*args, **kwargs)

    mover._prepare, dist.all_reduce = failing_prepare, counted_all_reduce
    try:
        begun = begin_moves_batch(
            [(plan, w, None) for w in weights], rank, world_size, dist.group.WORLD
        )
        assert len(calls) == 1, calls  # the vote and the checksums: [3 + 3 * N * 2]
        assert isinstance(begun[1], MovesRefused)
        if rank == world_size - 1:  # the first slot it verifies next (layer 0's) altered
            mover.drill_corrupt_next_receive()
        verdicts = finish_moves_batch([begun[0], begun[2]])
        assert len(calls) == 2, calls  # one vote for both layers
    finally:
        mover._prepare, dist.all_reduce = prepare, all_reduce
    assert verdicts == [False, True]
    _check_weights(weights[0], old[mine], 0)
    _check_weights(weights[1], old[mine], 1)
    _check_weights(weights[2], new[mine], 2)


def _balancer_moves_weights_and_tables(rank, world_size, overlap):
    """Two layers, skewed load, re-plan every 2 steps, one layer moved per step; with
    `overlap` a layer begun at one step is committed at the next."""
    slots_per_rank = NUM_EXPERTS // world_size + 1
    mine = slice(rank * slots_per_rank, (rank + 1) * slots_per_rank)
    home = home_placement(NUM_EXPERTS, world_size, slots_per_rank)
    layers = []
    for layer in range(2):
        weights = _tagged(home[mine], layer, torch.bfloat16)
        slots = ExpertSlots.create(
            f"layers.{layer}", weights, NUM_EXPERTS, world_size, rank, routed=True
        )
        assert torch.equal(slots.physical_to_logical, home)
        layers.append(slots)
    config = WideEPConfig(
        enabled=True,
        eplb="online",
        eplb_interval=2,
        eplb_layers_per_step=1,
        eplb_window=4,
        eplb_overlap="on" if overlap else "off",
    )
    staging = StagingPool.reserve(layers[0].weights, staging_sets(config))
    balancer = Balancer(layers, config, dist.group.WORLD, staging=staging)
    gen = torch.Generator().manual_seed(rank)
    hot = torch.tensor([[5, 5, 5, 5], [2, 2, 7, 7]])  # per layer, this step's hot experts

    def whole(layer: int) -> None:  # weights and tables agree: no half-moved layer
        slots = layers[layer]
        _check_weights(slots.weights, slots.physical_to_logical[mine], layer)

    def routed_step() -> None:
        for layer, slots in enumerate(layers):
            ids = torch.cat([hot[layer], torch.randint(NUM_EXPERTS, (4,), generator=gen)])
            slots.route(ids[:, None], torch.randn(len(ids), 8, generator=gen))
        balancer.step()

    for _ in range(2):  # step 2 starts planning (in a thread on rank 0)
        routed_step()
    assert balancer.planning is not None and not balancer.moving
    while balancer.planning is not None:  # the step that takes the plan moves nothing
        routed_step()
    assert balancer.pending == [0, 1] and not balancer.in_flight
    whole(0), whole(1)
    routed_step()  # begins layer 0 (one layer per step)
    assert balancer.pending == [1]  # layer 1 waits for the next step
    assert torch.equal(layers[1].physical_to_logical, home)
    if overlap:  # layer 0 in flight: the next forward pass still sees its old placement
        assert [index for index, _ in balancer.in_flight] == [0]
        staged = balancer.in_flight[0][1].staged[0]  # in the reserved pool, not allocated
        pool = staging.buffers[0]
        assert pool.data_ptr() <= staged.data_ptr() < pool.data_ptr() + pool.nbytes
        assert torch.equal(layers[0].physical_to_logical, home)
        balancer.step()  # commits layer 0, begins layer 1
        assert [index for index, _ in balancer.in_flight] == [1]
        assert torch.equal(layers[1].physical_to_logical, home)
    assert not torch.equal(layers[0].physical_to_logical, home)
    whole(0), whole(1)
    balancer.step(is_dummy=True)  # dummy steps move too
    assert balancer.pending == [] and balancer.in_flight == [] and not balancer.moving
    for layer, slots in enumerate(layers):
        assert not torch.equal(slots.physical_to_logical, home)
        whole(layer)
        # the hot expert got a replica; the tables route to slots that hold the expert
        assert int((slots.physical_to_logical == hot[layer, 0]).sum()) >= 2
        ids = torch.arange(NUM_EXPERTS)[:, None]
        tokens = torch.randn(NUM_EXPERTS, 8)
        assert torch.equal(slots.physical_to_logical[slots.route(ids, tokens)], ids)
    assert all(c.rebalances == 1 and c.failures == 0 for c in balancer.counters)


def _transfers_progress_between_begin_and_finish(rank, world_size):
    """After `begin_moves` returns, the received slots fill in while this rank does other
    work (gloo's transport threads), before `finish_moves` is called."""
    slots_per_rank = NUM_EXPERTS // world_size
    mine = slice(rank * slots_per_rank, (rank + 1) * slots_per_rank)
    old = home_placement(NUM_EXPERTS, world_size, slots_per_rank)
    new = old.roll(slots_per_rank)  # every slot changes, all by P2P
    weights = _tagged(old[mine], layer=1, dtype=torch.float32)
    moves = begin_moves(plan_moves(old, new, slots_per_rank), weights, rank, world_size, None)
    expected = _tagged(new[mine], layer=1, dtype=torch.float32)  # incoming in slot order
    deadline = time.monotonic() + 30
    while not all(torch.equal(s, e) for s, e in zip(moves.staged, expected, strict=True)):
        assert time.monotonic() < deadline, "the transfers did not progress on their own"
        torch.mm(torch.randn(64, 64), torch.randn(64, 64))  # the forward pass's work
    _check_weights(weights, old[mine], layer=1)  # nothing committed yet
    assert finish_moves(moves)
    _check_weights(weights, new[mine], layer=1)


def _slow_plan_does_not_stall_the_steps(rank, world_size):
    """Rank 0's policy takes 2 s: the steps meanwhile take no longer than a vote, and
    every rank takes the plan at the same step."""
    slots_per_rank = NUM_EXPERTS // world_size + 1
    mine = slice(rank * slots_per_rank, (rank + 1) * slots_per_rank)
    home = home_placement(NUM_EXPERTS, world_size, slots_per_rank)
    layer = ExpertSlots.create(
        "layers.0", _tagged(home[mine], 0, torch.float32), NUM_EXPERTS, world_size, rank, True
    )
    config = WideEPConfig(
        enabled=True, eplb="online", eplb_interval=2, eplb_layers_per_step=1, eplb_window=4
    )
    balancer = Balancer([layer], config, dist.group.WORLD)
    policy = balancer_module.plan_placement

    def slow(*args):
        time.sleep(2)
        return policy(*args)

    balancer_module.plan_placement = slow
    try:
        longest, steps = 0.0, 0
        while balancer.planning is not None or balancer.moving or steps < 2:
            ids = torch.tensor([[3]] * 8 + [[e] for e in range(NUM_EXPERTS)])
            layer.route(ids, torch.randn(len(ids), 8))
            start = time.monotonic()
            balancer.step()
            longest = max(longest, time.monotonic() - start)
            steps += 1
            time.sleep(0.05)  # the forward pass
    finally:
        balancer_module.plan_placement = policy
    assert balancer.counters[0].rebalances == 1
    _check_weights(layer.weights, layer.physical_to_logical[mine], 0)
    return steps, longest


def test_planning_runs_beside_the_steps():
    (steps_0, longest_0), (steps_1, longest_1) = run_ranks(_slow_plan_does_not_stall_the_steps, 2)
    assert steps_0 == steps_1 > 10, "every rank took the plan at the same step, seconds later"
    assert max(longest_0, longest_1) < 1.0, "a step waited for the policy"


@pytest.mark.parametrize("world_size", [2, 4])
def test_any_sequence_of_plans_puts_every_expert_in_its_slots(world_size):
    run_ranks(_sequence_of_plans, world_size, "bfloat16")


@pytest.mark.parametrize("world_size", [2, 4])
def test_a_corrupt_transfer_keeps_the_old_placement_on_every_rank(world_size):
    run_ranks(_failed_verification_keeps_old_weights, world_size)


@pytest.mark.parametrize("world_size", [2, 4])
def test_layers_moved_together_share_collectives_and_fail_alone(world_size):
    run_ranks(_layers_moved_together, world_size)


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no-overlap"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_balancer_replans_from_load_and_moves_a_few_layers_per_step(world_size, overlap):
    run_ranks(_balancer_moves_weights_and_tables, world_size, overlap)


def test_transfers_progress_while_the_rank_computes():
    run_ranks(_transfers_progress_between_begin_and_finish, 2)
