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

from vllm_wideep.kernels import moe_experts


class WideEPExperts(mk.FusedMoEExpertsModular):
    def __init__(self, moe_config, quant_config, backend: str, num_local_experts: int):
        super().__init__(moe_config, quant_config)
        self.backend = backend
        # `[E_local]` int64: (token, expert) rows computed per local expert since start.
        self.tokens_per_expert = torch.zeros(
            num_local_experts, dtype=torch.int64, device=moe_config.device
        )

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
        ids = topk_ids.flatten().long()
        self.tokens_per_expert.scatter_add_(0, ids.clamp(min=0), (ids >= 0).long())
        output.copy_(
            moe_experts(hidden_states, w1, w2, topk_weights, topk_ids, backend=self.backend)
        )
