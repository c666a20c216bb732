"""Faults during rebalancing on gloo ranks: a failure one rank can report becomes a vote
every rank sees, so all keep the old placement together and the next steps run; a peer
that stalls makes the others fail with a named error within the group's timeout."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from tools.ranks import run_ranks
from vllm_wideep.config import WideEPConfig
from vllm_wideep.eplb import balancer as balancer_module
from vllm_wideep.eplb import mover
from vllm_wideep.eplb.balancer import Balancer
from vllm_wideep.eplb.location import ExpertSlots, home_placement

NUM_EXPERTS = 8
TIMEOUT_S = 4


def _layer(rank: int, world_size: int) -> ExpertSlots:
    """One layer whose slot weights name their expert: w [S, 3] = expert id."""
    slots_per_rank = NUM_EXPERTS // world_size + 1
    home = home_placement(NUM_EXPERTS, world_size, slots_per_rank)
    mine = home[rank * slots_per_rank : (rank + 1) * slots_per_rank]
    weights = [mine.float()[:, None].repeat(1, 3).contiguous()]
    return ExpertSlots.create("layers.1", weights, NUM_EXPERTS, world_size, rank, routed=True)


def _balancer(rank: int, world_size: int, timeout_s: float = 120) -> tuple[Balancer, ExpertSlots]:
    """A balancer whose group waits `timeout_s` for a peer (long, except where a test
    stalls a peer on purpose: ranks on a loaded 2-core machine drift by seconds)."""
    layer = _layer(rank, world_size)
    config = WideEPConfig(
        enabled=True, eplb="online", eplb_interval=2, eplb_layers_per_step=1, eplb_window=4
    )
    timeout = timedelta(seconds=timeout_s)
    balancer = Balancer([layer], config, dist.group.WORLD, timeout=timeout)
    dist.barrier()  # every rank starts stepping together
    return balancer, layer


def _skewed_step(balancer: Balancer, layer: ExpertSlots, hot: int) -> None:
    ids = torch.tensor([[hot]] * 12 + [[e] for e in range(NUM_EXPERTS)])
    layer.route(ids, torch.randn(len(ids), 8))
    balancer.step()


def _plan_and_take(balancer: Balancer, layer: ExpertSlots, hot: int) -> None:
    """Step until a plan starts (the interval), then until every rank took it and moved
    its layers: the step after the one that takes a plan begins its moves and, without
    overlap, finishes them. The ranks vote on the plan each step, so all take it at the
    same step however long it took."""
    _skewed_step(balancer, layer, hot)
    while balancer.planning is None:
        _skewed_step(balancer, layer, hot)
    while balancer.planning is not None or balancer.moving:
        _skewed_step(balancer, layer, hot)


def _whole(layer: ExpertSlots, rank: int) -> None:
    """Weights and placement agree: every slot holds the expert the placement says."""
    S = layer.slots_per_rank
    expected = layer.physical_to_logical[rank * S : (rank + 1) * S].float()
    assert torch.equal(layer.weights[0][:, 0], expected), (layer.weights[0][:, 0], expected)


def _one_rank_cannot_prepare(rank, world_size):
    balancer, layer = _balancer(rank, world_size)
    home = layer.physical_to_logical.clone()
    prepare = mover._prepare
    if rank == world_size - 1:  # stand-in for an out-of-memory while staging

        def out_of_memory(*args, **kwargs):
            raise torch.OutOfMemoryError("staging buffers: out of memory")

        mover._prepare = out_of_memory
    _plan_and_take(balancer, layer, hot=3)  # the move begins: the last rank cannot prepare
    counter = balancer.counters[0]
    assert counter.failures == 1 and counter.rebalances == 0, counter
    assert torch.equal(layer.physical_to_logical, home)
    _whole(layer, rank)
    mover._prepare = prepare  # memory is back: the next plan moves
    _plan_and_take(balancer, layer, hot=3)
    assert counter.rebalances == 1 and not torch.equal(layer.physical_to_logical, home)
    _whole(layer, rank)
    return counter.failures


def _rank0_cannot_plan(rank, world_size):
    balancer, layer = _balancer(rank, world_size)
    home = layer.physical_to_logical.clone()
    plan_placement = balancer_module.plan_placement
    if rank == 0:

        def broken(*args, **kwargs):
            raise ValueError("the policy failed")

        balancer_module.plan_placement = broken
    _plan_and_take(balancer, layer, hot=5)
    assert torch.equal(layer.physical_to_logical, home) and not balancer.moving
    balancer_module.plan_placement = plan_placement
    _plan_and_take(balancer, layer, hot=5)
    _whole(layer, rank)
    return balancer.counters[0].rebalances


@pytest.mark.parametrize("world_size", [2, 4])
def test_a_rank_that_cannot_prepare_makes_every_rank_keep_the_old_placement(world_size):
    assert run_ranks(_one_rank_cannot_prepare, world_size) == [1] * world_size


def test_a_failed_plan_on_rank_0_is_skipped_by_every_rank():
    assert run_ranks(_rank0_cannot_plan, 2) == [1, 1]


def _stalled_peer(rank, world_size):
    balancer, layer = _balancer(rank, world_size, timeout_s=TIMEOUT_S)
    _plan_and_take(balancer, layer, hot=2)  # the group exists, a first move went through
    if rank == 1:
        time.sleep(3 * TIMEOUT_S)  # stalled (a frozen engine) past the group's timeout
    start = time.monotonic()
    try:
        _plan_and_take(balancer, layer, hot=6)  # the next plan needs every rank
    except RuntimeError as error:
        return str(error), time.monotonic() - start
    return None, time.monotonic() - start


def test_a_stalled_peer_fails_the_others_within_the_timeout():
    (message, elapsed), _ = run_ranks(_stalled_peer, 2, timeout_s=120)
    assert message is not None, "rank 0 went on without its peer"
    assert "vllm_wideep: EP rank 0: planning a new expert placement failed" in message
    assert "the EP group cannot go on" in message
    assert elapsed < TIMEOUT_S + 10, f"failed after {elapsed:.1f} s"
