"""A wide-EP slot is its expert's weights and biases: redundant slots are filled with both
and EPLB moves carry both (`layer/method.py: expert_biases` feeds `ExpertSlots` and the
mover the same tensor list). One rank, so the moves are local copies; the multi-rank
transfers of any tensor list are tests/dist/test_eplb_mover.py's."""

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from vllm_wideep.eplb.location import ExpertSlots  # noqa: E402
from vllm_wideep.eplb.mover import apply_moves, plan_moves  # noqa: E402
from vllm_wideep.layer.method import expert_biases  # noqa: E402

E, S, H, INTER = 4, 6, 8, 4  # 4 experts on one rank with 2 redundant slots


def tagged(shape, tag):
    """`[S, *shape]`: expert j's slot holds `tag + j`; the redundant slots hold garbage."""
    out = torch.full((S, *shape), -1.0)
    for expert in range(E):
        out[expert] = tag + expert
    return out


def test_redundant_slots_and_moves_carry_weights_and_biases():
    layer = SimpleNamespace(
        w13_weight=tagged((2 * INTER, H), 0),
        w2_weight=tagged((H, INTER), 10),
        w13_bias=tagged((2 * INTER,), 100),
        w2_bias=tagged((H,), 200),
    )
    biases = expert_biases(SimpleNamespace(has_bias=True), layer)
    assert [b.data_ptr() for b in biases] == [
        layer.w13_bias.data_ptr(),
        layer.w2_bias.data_ptr(),
    ], "the slots must hold the layer's own bias tensors, which the experts read"
    weights = [layer.w13_weight, layer.w2_weight, *biases]
    slots = ExpertSlots.create("layer", weights, E, num_ranks=1, rank=0, routed=True)
    tags = (0, 10, 100, 200)

    def assert_slots_hold(physical_to_logical):
        for slot, expert in enumerate(physical_to_logical.tolist()):
            for w, tag in zip(weights, tags, strict=True):
                assert torch.all(w[slot] == tag + expert), (slot, expert, tag)

    assert_slots_hold(slots.physical_to_logical)  # redundant slots: weights and biases
    target = torch.tensor([3, 1, 0, 2, 3, 3])
    plan = plan_moves(slots.physical_to_logical, target, S)
    assert apply_moves(plan, weights, rank=0, num_ranks=1, group=None)
    assert_slots_hold(target)


def test_no_biases_without_has_bias():
    assert expert_biases(SimpleNamespace(has_bias=False), SimpleNamespace()) == []
