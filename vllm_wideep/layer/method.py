"""The unquantized MoE method, wide-EP edition: same weights, wide-EP kernel.

Registered with `UnquantizedFusedMoEMethod.register_oot`, so vLLM builds it for every
unquantized MoE layer. Without `--enable-wideep` it is the stock method unchanged.
Weights keep vLLM's canonical layout (`w13 [E_local, 2I, H]`, `w2 [E_local, H, I]`),
already sharded to this rank's experts by vLLM's loader (EP size = DP x TP).
"""

from __future__ import annotations

from vllm.config import get_current_vllm_config
from vllm.distributed import get_ep_group, get_tp_group
from vllm.model_executor.layers.fused_moe import modular_kernel as mk
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
    UnquantizedFusedMoEMethod,
)

from vllm_wideep.comm.registry import DISPATCHERS
from vllm_wideep.layer.experts import WideEPExperts
from vllm_wideep.layer.prepare_finalize import TokenSlice, WideEPPrepareAndFinalize
from vllm_wideep.plugin.config import WideEPConfig


class WideEPUnquantizedMethod(UnquantizedFusedMoEMethod):
    def __init__(self, moe):
        self.wideep = WideEPConfig.from_additional_config(
            get_current_vllm_config().additional_config
        )
        super().__init__(moe)
        if self.wideep.enabled:
            _check_supported(moe)

    def process_weights_after_loading(self, layer) -> None:
        if not self.wideep.enabled:
            return super().process_weights_after_loading(layer)
        # No backend prepacking: the wide-EP experts read the canonical layout.
        self.moe_quant_config = self.get_fused_moe_quant_config(layer)
        self.moe_kernel = mk.FusedMoEKernel(
            self._make_prepare_finalize(layer),
            WideEPExperts(
                self.moe,
                self.moe_quant_config,
                backend=self.wideep.experts_backend,
                num_local_experts=layer.w13_weight.shape[0],
            ),
        )

    def _make_prepare_finalize(self, layer) -> WideEPPrepareAndFinalize:
        parallel = self.moe.moe_parallel_config
        ep_group = get_ep_group()
        dispatcher = DISPATCHERS[self.wideep.a2a_backend](
            group=ep_group.device_group,
            experts_per_rank=layer.w13_weight.shape[0],
            num_ranks=ep_group.world_size,
        )
        if parallel.is_sequence_parallel:
            token_slice = TokenSlice(rank=0, size=1)  # vLLM already split the tokens
        else:
            tp_group = get_tp_group()
            token_slice = TokenSlice(tp_group.rank_in_group, tp_group.world_size)
        return WideEPPrepareAndFinalize(dispatcher, token_slice, ep_group.world_size)


def _check_supported(moe) -> None:
    if moe.has_bias:
        raise NotImplementedError(
            "vllm_wideep: MoE layers with expert biases are not supported yet."
        )
    if not moe.is_act_and_mul or moe.activation.value != "silu":
        raise NotImplementedError(
            f"vllm_wideep: only SiLU-and-mul experts are supported yet; this model's "
            f"experts use {moe.activation.value} (act_and_mul={moe.is_act_and_mul})."
        )
