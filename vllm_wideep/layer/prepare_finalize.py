"""vLLM's [Quantize-Dispatch] and [Combine] steps, done by a wide-EP `Dispatcher`.

Tensor-parallel ranks hold the same tokens (attention output is all-reduced before the
MoE), so each TP rank dispatches only its slice of them. `finalize` all-gathers the
combined slices over TP, so every TP rank holds the whole routed output and
`output_is_reduced()` is True: vLLM then all-reduces only the TP-sharded shared experts'
output and adds the routed output after that, `(s_0 + s_1) + routed`. Writing each slice
with zeros elsewhere and letting vLLM all-reduce `shared + routed` would add a token's
routed output on the TP rank that dispatched it, `(s_0 + routed) + s_1` or
`s_0 + (s_1 + routed)`; which rank that is depends on the batch size, so the low bits of
a token's output would depend on what else was scheduled with it. The gather also moves
fewer bytes than that all-reduce.
When vLLM already splits tokens across TP ranks (sequence-parallel MoE), no slicing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from vllm.model_executor.layers.fused_moe import modular_kernel as mk

from vllm_wideep.comm.base import Dispatcher
from vllm_wideep.eplb.location import ExpertSlots


@dataclass(frozen=True)
class TokenSlice:
    """This rank's share of tokens replicated over `size` TP ranks."""

    rank: int
    size: int

    def per_rank(self, num_tokens: int) -> int:
        return -(-num_tokens // self.size)

    def bounds(self, num_tokens: int) -> tuple[int, int]:
        per_rank = self.per_rank(num_tokens)
        start = min(self.rank * per_rank, num_tokens)
        return start, min(start + per_rank, num_tokens)


def gather_slices(
    combined: torch.Tensor, token_slice: TokenSlice, num_tokens: int, tp_group
) -> torch.Tensor:
    """combined `[end - start, H]`, this rank's slice -> `[num_tokens, H]`, every slice in
    token order, the same on every TP rank (`tp_group`: vLLM's GroupCoordinator). Short
    slices (the last ranks') are padded to one size for the fixed-size all-gather."""
    if token_slice.size == 1:
        return combined
    per_rank = token_slice.per_rank(num_tokens)
    if combined.shape[0] < per_rank:
        padded = combined.new_zeros(per_rank, combined.shape[1])
        padded[: combined.shape[0]] = combined
        combined = padded
    return tp_group.all_gather(combined, dim=0)[:num_tokens]


@dataclass(frozen=True)
class _Pending:
    handle: Any
    start: int
    end: int


class WideEPPrepareAndFinalize(mk.FusedMoEPrepareAndFinalizeModular):
    def __init__(
        self,
        dispatcher: Dispatcher,
        token_slice: TokenSlice,
        ep_size: int,
        slots: ExpertSlots,
        tp_group=None,
    ):
        """tp_group: vLLM's TP GroupCoordinator, to gather the slices (None: no slicing)."""
        super().__init__()
        assert token_slice.size == 1 or tp_group is not None
        self.dispatcher = dispatcher
        self.slots = slots
        self.token_slice = token_slice
        self.tp_group = tp_group
        self.ep_size = ep_size
        self._pending: _Pending | None = None

    @property
    def activation_format(self) -> mk.FusedMoEActivationFormat:
        return mk.FusedMoEActivationFormat.Standard

    def topk_indices_dtype(self) -> torch.dtype | None:
        return None

    def max_num_tokens_per_rank(self) -> int | None:
        return None

    def num_dispatchers(self) -> int:
        return self.ep_size

    def output_is_reduced(self) -> bool:
        return True  # every TP rank holds the whole routed output (`gather_slices`)

    def prepare(
        self,
        a1: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        num_experts: int,
        expert_map: torch.Tensor | None,
        apply_router_weight_on_input: bool,
        quant_config,
        defer_input_quant: bool = False,
    ) -> mk.PrepareResultType:
        if apply_router_weight_on_input:
            # Top-1 (Llama-4): scale the input, send weight 1. With k > 1 one input row
            # cannot carry k weights: `method.check_layer` refuses that at model build.
            a1 = a1 * topk_weights.to(a1.dtype)
            topk_weights = torch.ones_like(topk_weights)
        start, end = self.token_slice.bounds(a1.shape[0])
        # logical ids -> slots, counted
        slot_ids = self.slots.route(topk_ids[start:end], a1[start:end])
        result = self.dispatcher.dispatch(a1[start:end], slot_ids, topk_weights[start:end])
        self._pending = _Pending(result.handle, start, end)
        # FP8 rows travel with their scales (fp8 dispatch to FP8 experts): vLLM hands them
        # to the experts as `a1q_scale`.
        return (
            result.hidden_states,
            result.hidden_scales,
            None,
            result.topk_ids,
            result.topk_weights,
        )

    def finalize(
        self,
        output: torch.Tensor,
        fused_expert_output: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        apply_router_weight_on_input: bool,
        weight_and_reduce_impl: mk.TopKWeightAndReduce,
    ) -> None:
        pending, self._pending = self._pending, None
        assert pending is not None, "finalize without prepare"
        # `fused_expert_output` may alias `output`; combine has read it before we write.
        combined = self.dispatcher.combine(fused_expert_output, pending.handle)
        output.copy_(gather_slices(combined, self.token_slice, output.shape[0], self.tp_group))
