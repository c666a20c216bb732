"""The unquantized MoE method, wide-EP edition: same weights, wide-EP kernel.

Registered with `UnquantizedFusedMoEMethod.register_oot`, so vLLM builds it for every
unquantized MoE layer. Without `--enable-wideep` it is the stock method unchanged.
Weights keep vLLM's canonical layout (`w13 [S, 2I, H]`, `w2 [S, H, I]`, S slots per rank),
already sharded to this rank's experts by vLLM's loader (EP size = DP x TP).

`build_wideep_kernel` is the part every wide-EP method shares (the FP8 one in `fp8.py`
too): the layer's slots (weights plus, for quantized experts, their scales), the token
exchange, the experts, and the registration in the worker's state.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from vllm.config import get_current_vllm_config
from vllm.distributed import get_ep_group, get_tp_group
from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe import modular_kernel as mk
from vllm.model_executor.layers.fused_moe.config import FUSED_MOE_UNQUANTIZED_CONFIG
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
    UnquantizedFusedMoEMethod,
)

from vllm_wideep.comm.capacity import CapacityDispatcher, capacity_buffer_bytes
from vllm_wideep.comm.packing import RowFormat
from vllm_wideep.comm.registry import make_dispatcher
from vllm_wideep.config import WideEPConfig
from vllm_wideep.eplb.files import read_placement
from vllm_wideep.eplb.location import ExpertSlots
from vllm_wideep.eplb.mover import apply_moves, plan_moves
from vllm_wideep.kernels.fp8 import Fp8Experts
from vllm_wideep.layer.experts import WideEPExperts
from vllm_wideep.layer.prepare_finalize import TokenSlice, WideEPPrepareAndFinalize
from vllm_wideep.layer.state import register_layer

logger = init_logger("vllm_wideep")


def current_wideep_config() -> WideEPConfig:
    """The wide-EP options of the engine being built."""
    return WideEPConfig.from_additional_config(get_current_vllm_config().additional_config)


class WideEPUnquantizedMethod(UnquantizedFusedMoEMethod):
    def __init__(self, moe):
        self.wideep = current_wideep_config()
        super().__init__(moe)
        if self.wideep.enabled:
            check_supported(moe)

    def create_weights(self, layer, num_experts: int, *args, **kwargs):
        """vLLM's weights, with `redundant_experts / R` extra slots per rank."""
        if self.wideep.enabled:
            num_experts += extra_slots(self.wideep, self.moe)
        return super().create_weights(layer, num_experts, *args, **kwargs)

    def process_weights_after_loading(self, layer) -> None:
        if not self.wideep.enabled:
            return super().process_weights_after_loading(layer)
        # No backend prepacking: the wide-EP experts read the canonical layout.
        self.moe_quant_config = self.get_fused_moe_quant_config(layer)
        weights = [layer.w13_weight.detach(), layer.w2_weight.detach()]
        self.slots, self.moe_kernel = build_wideep_kernel(
            self.wideep, self.moe, self.moe_quant_config, layer, weights, fp8=None
        )


def extra_slots(config: WideEPConfig, moe) -> int:
    """Redundant slots per rank: `redundant_experts / R`."""
    return config.redundant_experts // moe.moe_parallel_config.ep_size


def build_wideep_kernel(
    config: WideEPConfig,
    moe,
    quant_config,
    layer,
    weights: list[torch.Tensor],
    fp8: Fp8Experts | None,
) -> tuple[ExpertSlots, mk.FusedMoEKernel]:
    """The layer's slots and its wide-EP kernel, registered with the worker's state.

    weights: every per-slot tensor of the layer, each `[S, ...]` (w13, w2, then the FP8
        scales if any): what a slot is, so moves, replicas and checksums cover them all.
    fp8: the scales of FP8 weights (the same tensors as in `weights`), or None.
    """
    slots = _make_slots(config, moe, layer, weights)
    experts = WideEPExperts(
        moe,
        quant_config or FUSED_MOE_UNQUANTIZED_CONFIG,
        backend=config.experts_backend,
        tokens_per_slot=slots.tokens_per_slot,
        fp8=fp8,
    )
    # Every committed move writes the weights in place: drop the experts' copies.
    slots.on_weights_changed.append(experts.weight_cache.clear)
    prepare_finalize = _make_prepare_finalize(config, moe, layer, slots, fp8 is not None)
    register_layer(
        get_current_vllm_config().parallel_config,
        config,
        slots,
        prepare_finalize.dispatcher.traffic,
    )
    return slots, mk.FusedMoEKernel(prepare_finalize, experts)


def _make_prepare_finalize(
    config: WideEPConfig, moe, layer, slots: ExpertSlots, fp8_experts: bool
) -> WideEPPrepareAndFinalize:
    ep_group = get_ep_group()
    # Bounds on the rows one rank dispatches per call (TP ranks each take a slice),
    # for the fixed-size buffers of the `capacity` exchange.
    vllm_config = get_current_vllm_config()
    tp_size = get_tp_group().world_size
    budget = vllm_config.scheduler_config.max_num_batched_tokens
    graph_tokens = max(vllm_config.compilation_config.cudagraph_capture_sizes or [0])
    dispatcher = make_dispatcher(
        config.token_exchange,
        group=ep_group.device_group,
        slots_per_rank=layer.w13_weight.shape[0],
        num_ranks=ep_group.world_size,
        dispatch_dtype=config.dispatch_dtype,
        keep_fp8=fp8_experts,  # FP8 experts read fp8-dispatched rows as they came
        capacity_tokens=config.capacity_tokens,
        max_tokens_per_rank=-(-budget // tp_size),
        graph_tokens_per_rank=-(-graph_tokens // tp_size),
    )
    if isinstance(dispatcher, CapacityDispatcher):
        _log_capacity(dispatcher, moe, config)
    if moe.moe_parallel_config.is_sequence_parallel:
        token_slice = TokenSlice(rank=0, size=1)  # vLLM already split the tokens
    else:
        tp_group = get_tp_group()
        token_slice = TokenSlice(tp_group.rank_in_group, tp_group.world_size)
    return WideEPPrepareAndFinalize(dispatcher, token_slice, ep_group.world_size, slots=slots)


_capacity_logged = False


def _log_capacity(dispatcher: CapacityDispatcher, moe, config: WideEPConfig) -> None:
    """Once per process: the `capacity` exchange's rows per peer and buffer memory."""
    global _capacity_logged
    if _capacity_logged:
        return
    _capacity_logged = True
    row = RowFormat(
        moe.hidden_dim, moe.experts_per_token, moe.in_dtype, config.dispatch_dtype == "fp8"
    )
    nbytes = capacity_buffer_bytes(dispatcher.capacity, dispatcher.num_ranks, row.nbytes)
    logger.info(
        "vllm_wideep: capacity exchange: %d rows per peer block (%s), %.1f MiB sent and "
        "%.1f MiB received per rank and MoE layer call",
        dispatcher.capacity,
        "may overflow into a second round" if dispatcher.may_overflow else "never overflows",
        nbytes / 2**20,
        nbytes / 2**20,
    )


def _make_slots(config: WideEPConfig, moe, layer, weights: list[torch.Tensor]) -> ExpertSlots:
    """The layer's slots in the home placement, then moved to the placement file's."""
    ep_group = get_ep_group()
    num_ranks, rank = ep_group.world_size, ep_group.rank_in_group
    balanced = config.eplb != "off" or config.placement is not None
    slots = ExpertSlots.create(
        layer.layer_name, weights, moe.num_experts, num_ranks, rank, routed=balanced
    )
    if config.placement is not None:
        home = slots.physical_to_logical
        target = _placement_row(config.placement, layer.layer_name, home)
        _check_same_on_every_rank(
            target, config.placement, layer.layer_name, ep_group, weights[0].device
        )
        plan = plan_moves(home, target, slots.slots_per_rank)
        if not apply_moves(plan, weights, rank, num_ranks, ep_group.device_group):
            raise RuntimeError(
                f"vllm_wideep: moving {layer.layer_name}'s experts to the placement in "
                f"{config.placement} failed verification (a checksum mismatch)"
            )
        slots.set_placement(target)
    return slots


def _check_same_on_every_rank(
    row: torch.Tensor, path: str, layer_name: str, ep_group, device: torch.device
) -> None:
    """Every rank read the same placement row (a file replaced while ranks load would split
    the group): all-reduce MAX of the row's digest and of its negation; all ranks raise
    together when they differ."""
    digest = int(hashlib.sha256(row.cpu().numpy().tobytes()).hexdigest()[:15], 16)
    both = torch.tensor([digest, -digest], dtype=torch.int64, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=ep_group.device_group)
    if both.tolist() != [digest, -digest]:
        raise RuntimeError(
            f"vllm_wideep: the EP ranks read different placements for {layer_name} from "
            f"{path} (was the file replaced while the server started?)"
        )


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


def check_supported(moe) -> None:
    """Refuse the MoE features the wide-EP experts do not compute (yet)."""
    if moe.has_bias:
        raise NotImplementedError(
            "vllm_wideep: MoE layers with expert biases are not supported yet."
        )
    if not moe.is_act_and_mul or moe.activation.value != "silu":
        raise NotImplementedError(
            f"vllm_wideep: only SiLU-and-mul experts are supported yet; this model's "
            f"experts use {moe.activation.value} (act_and_mul={moe.is_act_and_mul})."
        )
