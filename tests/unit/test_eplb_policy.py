"""plan_placement and Placement: invariants, a hand-computed golden, DeepSeek's policy as a
baseline on Zipf traces, and slot stability with `current` on drifting traces."""

import pytest
import torch

from vllm_wideep.eplb import Placement, plan_placement
from vllm_wideep.eplb.policy import STABILITY_TOLERANCE
from vllm_wideep.eplb.traces import drifting_load, zipf_load

E = 256
TOKENS = 8192 * 8  # routed choices per layer window: 8192 tokens x top-8


def _deepseek(load, num_ranks, slots_per_rank):
    """vLLM's DeepSeek EPLB port, global policy (1 group, 1 node)."""
    policy = pytest.importorskip("vllm.distributed.eplb.policy.default").DefaultEplbPolicy
    try:
        return policy.rebalance_experts(load, num_ranks * slots_per_rank, 1, 1, num_ranks)
    except (AssertionError, ValueError) as e:
        pytest.skip(f"DeepSeek's policy rejects R={num_ranks}, S={slots_per_rank}: {e}")


def _check_invariants(phy2log, load, num_ranks, slots_per_rank):
    num_layers, num_experts = load.shape
    assert phy2log.dtype == torch.int64
    assert phy2log.shape == (num_layers, num_ranks * slots_per_rank)
    placement = Placement(phy2log, num_ranks)
    placement.validate(num_experts, num_ranks)  # every expert placed, ids in range
    # Replicas on distinct ranks (possible whenever S <= E).
    if slots_per_rank <= num_experts:
        for rank_slots in phy2log.view(num_layers, num_ranks, slots_per_rank):
            for slots in rank_slots:
                assert len(set(slots.tolist())) == slots_per_rank
    return placement


# ---- golden: the worked example of policy.py's docstring, by hand -----------------------


def test_golden_worked_example():
    load = torch.tensor([[6.0, 3.0, 2.0, 1.0]])
    phy2log = plan_placement(load, num_ranks=2, slots_per_rank=3)
    assert phy2log.tolist() == [[0, 2, 1, 0, 1, 3]]

    placement = Placement(phy2log, num_ranks=2)
    assert placement.num_layers == 1 and placement.num_slots == 6
    assert placement.replica_count.tolist() == [[2, 2, 1, 1]]
    assert placement.logical_to_physical.tolist() == [[[0, 3], [2, 4], [1, -1], [5, -1]]]
    assert placement.rank_load(load).tolist() == [[6.5, 5.5]]
    assert placement.balancedness(load).item() == pytest.approx(6 / 6.5)


def test_golden_no_redundancy():
    # LPT: 4 -> rank 0, 3 -> rank 1, 2 -> rank 1 (5), 1 -> rank 0 (5); no swap helps.
    # An idle layer: every rank load ties at 0, so each expert (ascending id) goes to the
    # lowest rank with a free slot: the identity.
    load = torch.tensor([[4.0, 3.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    assert plan_placement(load, 2, 2).tolist() == [[0, 3, 1, 2], [0, 1, 2, 3]]


# ---- input checks --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"load": torch.ones(1, 8), "num_ranks": 2, "slots_per_rank": 3}, "cannot hold 8"),
        ({"load": torch.ones(8), "num_ranks": 2, "slots_per_rank": 4}, r"\[L, E\]"),
        ({"load": -torch.ones(1, 4), "num_ranks": 2, "slots_per_rank": 2}, "non-negative"),
        ({"load": torch.full((1, 4), float("nan")), "num_ranks": 2, "slots_per_rank": 2}, "NaN"),
        ({"load": torch.ones(1, 4), "num_ranks": 0, "slots_per_rank": 2}, "num_ranks"),
        (
            {
                "load": torch.ones(2, 4),
                "num_ranks": 2,
                "slots_per_rank": 2,
                "current": torch.arange(4)[None],
            },
            r"current must be \[2, 4\]",
        ),
        (
            {
                "load": torch.ones(1, 4),
                "num_ranks": 2,
                "slots_per_rank": 2,
                "current": torch.tensor([[0, 1, 2, 9]]),
            },
            "outside",
        ),
    ],
)
def test_bad_input_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_placement(**kwargs)


def test_validate_names_the_problem():
    with pytest.raises(ValueError, match=r"experts \[3\] are not placed"):
        Placement(torch.tensor([[0, 1, 2, 2]]), 2).validate(4, 2)
    with pytest.raises(ValueError, match="out of range"):
        Placement(torch.tensor([[0, 1, 2, 4]]), 2).validate(4, 2)
    with pytest.raises(ValueError, match="not divisible by 3 ranks"):
        Placement(torch.tensor([[0, 1, 2, 3]]), 3).validate(4, 3)
    Placement(torch.tensor([[0, 1, 2, 3]]), 2).validate(4, 2)


# ---- invariants on random shapes -----------------------------------------------------------


@pytest.mark.parametrize(
    "num_experts, num_ranks, slots_per_rank",
    [(8, 1, 8), (8, 2, 5), (6, 4, 2), (16, 4, 6), (5, 2, 5), (4, 2, 8), (64, 16, 6)],
)
def test_invariants(num_experts, num_ranks, slots_per_rank):
    load = zipf_load(3, num_experts, 1000, 1.0, seed=num_experts + num_ranks)
    load[1] = 0  # an idle layer
    phy2log = plan_placement(load, num_ranks, slots_per_rank)
    placement = _check_invariants(phy2log, load, num_ranks, slots_per_rank)
    assert placement.rank_load(load).sum(dim=1).allclose(load.sum(dim=1))
    # Any device/dtype at the boundary, same answer.
    assert torch.equal(plan_placement(load.double(), num_ranks, slots_per_rank), phy2log)


# ---- against DeepSeek's policy ---------------------------------------------------------------


@pytest.mark.parametrize("redundant", [0, 1, 2])
@pytest.mark.parametrize("num_ranks", [8, 32, 64])
@pytest.mark.parametrize("alpha", [0.8, 1.0, 1.2])
def test_balances_at_least_as_well_as_deepseek(alpha, num_ranks, redundant):
    slots_per_rank = E // num_ranks + redundant
    load = zipf_load(2, E, TOKENS, alpha, seed=int(alpha * 10) + num_ranks)
    ours = plan_placement(load, num_ranks, slots_per_rank)
    deepseek = _deepseek(load, num_ranks, slots_per_rank)

    ours_bal = _check_invariants(ours, load, num_ranks, slots_per_rank).balancedness(load)
    deepseek_bal = Placement(deepseek, num_ranks).balancedness(load)
    assert (ours_bal >= deepseek_bal - 1e-6).all(), (ours_bal, deepseek_bal)
    if redundant == 1:
        assert (ours_bal >= 0.95).all(), ours_bal


# ---- stability with `current` --------------------------------------------------------------


def test_current_equal_to_own_plan_is_kept():
    load = zipf_load(2, E, TOKENS, 1.0, seed=7)
    plan = plan_placement(load, 32, 9)
    assert torch.equal(plan_placement(load, 32, 9, current=plan), plan)


def test_current_missing_an_expert_is_replaced():
    load = zipf_load(1, 16, 1000, 1.0, seed=3)
    current = torch.zeros(1, 20, dtype=torch.int64)  # expert 0 everywhere
    phy2log = plan_placement(load, 4, 5, current=current)
    _check_invariants(phy2log, load, 4, 5)


@pytest.mark.parametrize(
    "alpha, num_ranks, redundant", [(1.0, 32, 1), (1.2, 64, 1), (0.8, 8, 2), (1.2, 32, 0)]
)
def test_current_moves_at_most_half_of_a_fresh_plan(alpha, num_ranks, redundant):
    slots_per_rank = E // num_ranks + redundant
    trace = drifting_load(5, 2, E, TOKENS, alpha, drift=0.02, seed=num_ranks)
    current = plan_placement(trace[0], num_ranks, slots_per_rank)
    moved_ours = moved_fresh = 0
    for load in trace[1:]:
        ours = plan_placement(load, num_ranks, slots_per_rank, current=current)
        fresh = plan_placement(load, num_ranks, slots_per_rank)
        _check_invariants(ours, load, num_ranks, slots_per_rank)
        ours_bal = Placement(ours, num_ranks).balancedness(load)
        fresh_bal = Placement(fresh, num_ranks).balancedness(load)
        assert (ours_bal >= fresh_bal / (1 + STABILITY_TOLERANCE) - 1e-6).all()
        moved_ours += int((ours != current).sum())
        moved_fresh += int((fresh != current).sum())
        current = ours
    assert moved_ours <= moved_fresh / 2, (moved_ours, moved_fresh)


# ---- traces ----------------------------------------------------------------------------------


def test_traces_are_seeded():
    a = zipf_load(2, 16, 500, 1.0, seed=1)
    assert a.shape == (2, 16) and a.sum(dim=1).tolist() == [500, 500]
    assert torch.equal(a, zipf_load(2, 16, 500, 1.0, seed=1))
    d = drifting_load(3, 2, 16, 500, 1.0, drift=0.1, seed=1)
    assert d.shape == (3, 2, 16) and torch.equal(d, drifting_load(3, 2, 16, 500, 1.0, 0.1, 1))


# ---- properties on random loads ------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_random_loads_keep_the_invariants_and_balance_like_deepseek(seed):
    """Random shapes and loads (Zipf, uniform, a dead expert, with and without `current`):
    every expert placed, each rank exactly S slots, balancedness at least DeepSeek's minus
    a small tolerance. Ranks hold at least 4 experts: with fewer, DeepSeek's second copy of
    an expert on one rank (which ours never makes) splits load finer than any placement
    of distinct replicas can."""
    gen = torch.Generator().manual_seed(seed)
    num_ranks = [4, 8, 16, 32][seed % 4]
    num_experts = num_ranks * int(torch.randint(4, 9, (1,), generator=gen))
    slots_per_rank = num_experts // num_ranks + int(torch.randint(0, 4, (1,), generator=gen))
    if seed % 3:
        load = zipf_load(4, num_experts, 4000, 0.6 + 0.2 * (seed % 4), seed=seed)
    else:
        load = torch.rand(4, num_experts, generator=gen) * 100
    load[0, 0] = 0  # a dead expert must still be placed
    ours = plan_placement(load, num_ranks, slots_per_rank)
    placement = _check_invariants(ours, load, num_ranks, slots_per_rank)
    slots = ours.view(-1, num_ranks, slots_per_rank)
    assert (slots >= 0).all() and slots.shape[2] == slots_per_rank
    deepseek = Placement(_deepseek(load, num_ranks, slots_per_rank), num_ranks)
    assert (placement.balancedness(load) >= deepseek.balancedness(load) - 0.01).all()
    # Planned again from its own plan on a perturbed load: still valid, few moves.
    shifted = load * (1 + 0.05 * torch.rand(load.shape, generator=gen))
    again = plan_placement(shifted, num_ranks, slots_per_rank, current=ours)
    _check_invariants(again, shifted, num_ranks, slots_per_rank)
