"""FP8 experts across gloo ranks.

* Moved by the balancer: a slot is its float8 weights and their block scales, so after
  every move each slot dequantizes to its expert's weights, and the experts' output on the
  moved slots equals the float64 reference of the dequantized experts.
* Fed by an fp8 dispatch: tokens are quantized once, per token and 128 columns, before
  they leave their rank; the W8A8 experts read those rows and scales as they came, and
  the combined output equals one rank computing the same W8A8 math on all experts."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tools.ranks import run_ranks
from vllm_wideep.comm.registry import make_dispatcher
from vllm_wideep.config import WideEPConfig
from vllm_wideep.eplb.balancer import Balancer
from vllm_wideep.eplb.location import ExpertSlots, home_placement
from vllm_wideep.kernels import WeightCache, moe_experts
from vllm_wideep.kernels.fp8 import Fp8Experts, dequantize_block_fp8, quantize_block_fp8

NUM_EXPERTS, HIDDEN, INTER, TOP_K = 8, 128, 128, 2


def _experts(expert_ids: torch.Tensor):
    """FP8 weights of the given logical experts, the same on every rank: w13 [n, 2I, H],
    w2 [n, H, I] float8 and their [n, 2I/128, H/128], [n, H/128, I/128] scales."""
    w13, w2 = [], []
    for e in expert_ids.tolist():
        g = torch.Generator().manual_seed(1000 + e)
        w13.append(torch.randn(2 * INTER, HIDDEN, generator=g) * (1 + e) / HIDDEN**0.5)
        w2.append(torch.randn(HIDDEN, INTER, generator=g) * (1 + e) / INTER**0.5)
    q13, s13 = quantize_block_fp8(torch.stack(w13))
    q2, s2 = quantize_block_fp8(torch.stack(w2))
    return [q13, q2, s13, s2]


def _reference(x, ids, weights, expert_of_slot):
    """float64 output of the experts in `expert_of_slot` (dequantized), ids local slots."""
    q13, q2, s13, s2 = _experts(expert_of_slot)
    w13 = dequantize_block_fp8(q13, s13).double()
    w2 = dequantize_block_fp8(q2, s2).double()
    out = torch.zeros(x.shape[0], HIDDEN, dtype=torch.float64)
    for m in range(x.shape[0]):
        for j in range(ids.shape[1]):
            s = int(ids[m, j])
            if s < 0:
                continue
            gate_up = w13[s] @ x[m].double()
            act = torch.nn.functional.silu(gate_up[:INTER]) * gate_up[INTER:]
            out[m] += weights[m, j].double() * (w2[s] @ act)
    return out


def _moves_carry_the_scales(rank, world_size):
    slots_per_rank = NUM_EXPERTS // world_size + 1
    mine = slice(rank * slots_per_rank, (rank + 1) * slots_per_rank)
    home = home_placement(NUM_EXPERTS, world_size, slots_per_rank)
    weights = _experts(home[mine])
    slots = ExpertSlots.create("layers.1", weights, NUM_EXPERTS, world_size, rank, routed=True)
    cache = WeightCache()
    slots.on_weights_changed.append(cache.clear)
    fp8 = Fp8Experts(w13_scale=weights[2], w2_scale=weights[3])
    config = WideEPConfig(
        enabled=True, eplb="online", eplb_interval=1, eplb_layers_per_step=1, eplb_window=1
    )
    balancer = Balancer([slots], config, dist.group.WORLD)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(6, HIDDEN, generator=gen)
    topk_weights = torch.rand(6, TOP_K, generator=gen)
    placements = set()
    for step in range(12):  # a different hot expert each step: a new placement every 3+ steps
        hot = torch.full((16, 1), step % NUM_EXPERTS)
        ids = torch.cat([hot, torch.arange(NUM_EXPERTS)[:, None]])
        slots.route(ids, torch.randn(len(ids), 8))
        balancer.step()
        expert_of_slot = slots.physical_to_logical[mine]
        placements.add(tuple(slots.physical_to_logical.tolist()))
        for tensor, expected in zip(slots.weights, _experts(expert_of_slot), strict=True):
            assert torch.equal(tensor.view(torch.uint8), expected.view(torch.uint8)), step
        ids = torch.randint(-1, slots_per_rank, (6, TOP_K), generator=gen)
        out = moe_experts(
            x, weights[0], weights[1], topk_weights, ids, backend="torch", cache=cache, fp8=fp8
        )
        expected = _reference(x, ids, topk_weights, expert_of_slot)
        # float32 against float64: error relative to the output's scale (experts scaled up
        # to 8x make a few outputs near 0 the difference of large terms).
        scale = expected.abs().max().item()
        torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5 * scale)
    counter = balancer.counters[0]
    assert counter.failures == 0 and counter.rebalances >= 3 and len(placements) >= 3


@pytest.mark.parametrize("world_size", [2, 4])
def test_fp8_slots_move_with_their_scales(world_size):
    run_ranks(_moves_carry_the_scales, world_size)


def _fp8_dispatch_feeds_w8a8_experts(rank, world_size, exchange):
    per_rank = NUM_EXPERTS // world_size
    mine = torch.arange(rank * per_rank, (rank + 1) * per_rank)
    q13, q2, s13, s2 = _experts(mine)
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(9, HIDDEN, generator=gen, dtype=torch.float32).to(torch.bfloat16)
    ids = torch.randint(-1, NUM_EXPERTS, (9, TOP_K), generator=gen)
    topk_weights = torch.rand(9, TOP_K, generator=gen)
    dispatcher = make_dispatcher(
        exchange,
        group=dist.group.WORLD,
        slots_per_rank=per_rank,
        num_ranks=world_size,
        dispatch_dtype="fp8",
        keep_fp8=True,
        max_tokens_per_rank=9,
    )
    received = dispatcher.dispatch(x, ids, topk_weights)
    assert received.hidden_states.dtype == torch.float8_e4m3fn
    assert received.hidden_scales.shape == (received.hidden_states.shape[0], 1)
    w8a8 = Fp8Experts(w13_scale=s13, w2_scale=s2, activations="fp8")
    expert_out = moe_experts(
        received.hidden_states,
        q13,
        q2,
        received.topk_weights,
        received.topk_ids,
        backend="torch",
        fp8=w8a8,
        hidden_scales=received.hidden_scales,
        out_dtype=torch.float32,
    )
    out = dispatcher.combine(expert_out, received.handle)
    # One rank with every expert, quantizing the same bf16 rows itself.
    all_q13, all_q2, all_s13, all_s2 = _experts(torch.arange(NUM_EXPERTS))
    expected = moe_experts(
        x.float(),  # bf16 values: the same rows, quantized the same way
        all_q13,
        all_q2,
        topk_weights,
        ids,
        backend="torch",
        fp8=Fp8Experts(w13_scale=all_s13, w2_scale=all_s2, activations="fp8"),
    )
    # Same operands; the fp32 GEMMs may round differently over another set of rows, which
    # can move an intermediate element across an FP8 rounding boundary (one e4m3 step,
    # 2**-3 of that element): rare, so the norm stays within 1e-3, where a row with
    # another row's scales, or a lost one, costs orders of magnitude more.
    error = (out - expected).norm() / expected.norm()
    assert error < 1e-3, f"relative error {error:.2e}"


@pytest.mark.parametrize("exchange", ["alltoall", "capacity"])
def test_fp8_dispatch_feeds_w8a8_experts_without_requantizing(exchange):
    run_ranks(_fp8_dispatch_feeds_w8a8_experts, 2, exchange)
