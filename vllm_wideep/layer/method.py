"""The unquantized MoE method, wide-EP edition: same weights, wide-EP kernel.

Registered with `UnquantizedFusedMoEMethod.register_oot`, so vLLM builds it for every
unquantized MoE layer. Without `--enable-wideep` it is the stock method unchanged.
Weights keep vLLM's canonical layout (`w13 [S, 2I, H]`, `w2 [S, H, I]`, S slots per rank),
already sharded to this rank's experts by vLLM's loader (EP size = DP x TP).
"""

from __future__ import annotations

import torch
from vllm.config import get_current_vllm_config
from vllm.distributed import get_ep_group, get_tp_group
from vllm.model_executor.layers.fused_moe import modular_kernel as mk
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
    UnquantizedFusedMoEMethod,
)

from vllm_wideep.comm.registry import make_dispatcher
from vllm_wideep.config import WideEPConfig
from vllm_wideep.eplb.files import read_placement
from vllm_wideep.eplb.location import ExpertSlots
from vllm_wideep.eplb.mover import apply_moves, plan_moves
from vllm_wideep.layer.experts import WideEPExperts
from vllm_wideep.layer.prepare_finalize import TokenSlice, WideEPPrepareAndFinalize
from vllm_wideep.layer.state import register_layer


class WideEPUnquantizedMethod(UnquantizedFusedMoEMethod):
    def __init__(self, moe):
        self.wideep = WideEPConfig.from_additional_config(
            get_current_vllm_config().additional_config
        )
        super().__init__(moe)
        if self.wideep.enabled:
            _check_supported(moe)

    def create_weights(self, layer, num_experts: int, *args, **kwargs):
        """vLLM's weights, with `redundant_experts / R` extra slots per rank."""
        if self.wideep.enabled:
            num_experts += self.wideep.redundant_experts // self.moe.moe_parallel_config.ep_size
        return super().create_weights(layer, num_experts, *args, **kwargs)

    def process_weights_after_loading(self, layer) -> None:
        if not self.wideep.enabled:
            return super().process_weights_after_loading(layer)
        # No backend prepacking: the wide-EP experts read the canonical layout.
        self.moe_quant_config = self.get_fused_moe_quant_config(layer)
        self.slots = self._make_slots(layer)
        experts = WideEPExperts(
            self.moe,
            self.moe_quant_config,
            backend=self.wideep.experts_backend,
            tokens_per_slot=self.slots.tokens_per_slot,
        )
        # Every committed move writes the weights in place: drop the experts' copies.
        self.slots.on_weights_changed.append(experts.weight_cache.clear)
        prepare_finalize = self._make_prepare_finalize(layer)
        self.moe_kernel = mk.FusedMoEKernel(prepare_finalize, experts)
        register_layer(
            get_current_vllm_config().parallel_config,
            self.wideep,
            self.slots,
            prepare_finalize.dispatcher.traffic,
        )

    def _make_prepare_finalize(self, layer) -> WideEPPrepareAndFinalize:
        parallel = self.moe.moe_parallel_config
        ep_group = get_ep_group()
        # Bounds on the rows one rank dispatches per call (TP ranks each take a slice),
        # for the fixed-size buffers of the `capacity` exchange.
        vllm_config = get_current_vllm_config()
        tp_size = get_tp_group().world_size
        budget = vllm_config.scheduler_config.max_num_batched_tokens
        graph_tokens = max(vllm_config.compilation_config.cudagraph_capture_sizes or [0])
        dispatcher = make_dispatcher(
            self.wideep.token_exchange,
            group=ep_group.device_group,
            slots_per_rank=layer.w13_weight.shape[0],
            num_ranks=ep_group.world_size,
            dispatch_dtype=self.wideep.dispatch_dtype,
            capacity_tokens=self.wideep.capacity_tokens,
            max_tokens_per_rank=-(-budget // tp_size),
            graph_tokens_per_rank=-(-graph_tokens // tp_size),
        )
        if parallel.is_sequence_parallel:
            token_slice = TokenSlice(rank=0, size=1)  # vLLM already split the tokens
        else:
            tp_group = get_tp_group()
            token_slice = TokenSlice(tp_group.rank_in_group, tp_group.world_size)
        return WideEPPrepareAndFinalize(
            dispatcher, token_slice, ep_group.world_size, slots=self.slots
        )

    def _make_slots(self, layer) -> ExpertSlots:
        """The layer's slots in the home placement, then moved to the placement file's."""
        ep_group = get_ep_group()
        num_ranks, rank = ep_group.world_size, ep_group.rank_in_group
        weights = [layer.w13_weight.detach(), layer.w2_weight.detach()]
        balanced = self.wideep.eplb != "off" or self.wideep.placement is not None
        slots = ExpertSlots.create(
            layer.layer_name, weights, self.moe.num_experts, num_ranks, rank, routed=balanced
        )
        if self.wideep.placement is not None:
            home = slots.physical_to_logical
            target = _placement_row(self.wideep.placement, layer.layer_name, home)
            plan = plan_moves(home, target, slots.slots_per_rank)
            if not apply_moves(plan, weights, rank, num_ranks, ep_group.device_group):
                raise RuntimeError(
                    f"vllm_wideep: moving {layer.layer_name}'s experts to the placement in "
                    f"{self.wideep.placement} failed verification (a checksum mismatch)"
                )
            slots.set_placement(target)
        return slots


def _placement_row(path: str, layer_name: str, home: torch.Tensor) -> torch.Tensor:
    """This layer's row of the placement file; the front end checked the model identity."""
    record = read_placement(path)
    if layer_name not in record.layers:
        raise ValueError(
            f"vllm_wideep: placement file {path} has no row for MoE layer {layer_name!r} "
            f"(it has {record.layers}); was it made for this model?"
        )
    row = record.row_for(layer_name)
    if row.shape != home.shape:
        raise ValueError(
            f"vllm_wideep: placement file {path} has {row.numel()} slots per layer; this "
            f"deployment has {home.numel()}"
        )
    return row


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
