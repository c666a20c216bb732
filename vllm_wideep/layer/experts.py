"""vLLM's [Permute-Experts-Unpermute] step: this rank's experts on the rows it received.

Rows arrive with local slot ids (`-1` = another rank's expert) and router weights, and
leave weighted and summed over this rank's experts, so vLLM's top-k reduce is a no-op.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.fused_moe import modular_kernel as mk
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import (
    TopKWeightAndReduceNoOP,
)

from vllm_wideep.eplb.stats import record
from vllm_wideep.kernels import WeightCache, moe_experts
from vllm_wideep.kernels.fp8 import Fp8Experts


class WideEPExperts(mk.FusedMoEExpertsModular):
    """backend: the `experts_backend` option. tokens_per_slot: `[S]` int64 on the device,
    (token, expert) rows computed per local slot since start (the layer's
    `ExpertSlots.tokens_per_slot`). weight_cache: the torch backend's transformed copies of
    this layer's weights; the layer clears it whenever it writes them. fp8: the block scales
    of FP8 weights (vLLM passes the weights to `apply`; the scales live here), or None."""

    def __init__(
        self,
        moe_config,
        quant_config,
        backend: str,
        tokens_per_slot: torch.Tensor,
        fp8: Fp8Experts | None = None,
    ):
        super().__init__(moe_config, quant_config)
        self.backend = backend
        self.tokens_per_slot = tokens_per_slot
        self.weight_cache = WeightCache()
        self.fp8 = fp8

    @staticmethod
    def activation_format() -> mk.FusedMoEActivationFormat:
        return mk.FusedMoEActivationFormat.Standard

    @staticmethod
    def _supports_current_device() -> bool:
        return True

    @staticmethod
    def _supports_no_act_and_mul() -> bool:
        return False

    @staticmethod
    def _supports_quant_scheme(weight_key, activation_key) -> bool:
        return (weight_key, activation_key) == (None, None)

    @staticmethod
    def _supports_activation(activation: MoEActivation) -> bool:
        return activation == MoEActivation.SILU

    @staticmethod
    def _supports_parallel_config(moe_parallel_config) -> bool:
        return True

    def workspace_shapes(
        self,
        M,
        N,
        K,
        topk,
        global_num_experts,
        local_num_experts,
        expert_tokens_meta,
        activation,
    ):
        return (0,), (0,), (M, K)

    def finalize_weight_and_reduce_impl(self) -> mk.TopKWeightAndReduce:
        return TopKWeightAndReduceNoOP()

    def apply(
        self,
        output: torch.Tensor,
        hidden_states: torch.Tensor,
        w1: torch.Tensor,
        w2: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        activation,
        global_num_experts,
        expert_map,
        a1q_scale,
        a2_scale,
        workspace13,
        workspace2,
        expert_tokens_meta,
        apply_router_weight_on_input,
    ) -> None:
        record(self.tokens_per_slot, topk_ids)
        output.copy_(
            moe_experts(
                hidden_states,
                w1,
                w2,
                topk_weights,
                topk_ids,
                backend=self.backend,
                cache=self.weight_cache,
                fp8=self.fp8,
                hidden_scales=a1q_scale,  # FP8 rows from an fp8 dispatch, used as they came
                out_dtype=output.dtype,
            )
        )
