"""The unquantized MoE method, wide-EP edition: same weights, wide-EP kernel.

Registered with `UnquantizedFusedMoEMethod.register_oot`, so vLLM builds it for every
unquantized MoE layer. Without `--enable-wideep` it is the stock method unchanged.
Weights keep vLLM's canonical layout (`w13 [S, 2I, H]`, `w2 [S, H, I]`, S slots per rank),
already sharded to this rank's experts by vLLM's loader (EP size = DP x TP).

`build_wideep_kernel` is the part every wide-EP method shares (the FP8 one in `fp8.py`
too): the layer's slots (weights, biases and, for quantized experts, scales), the token
exchange, the experts, and the registration in the worker's state.

What the experts compute comes from vLLM's `FusedMoEConfig` and the MoE layer's own
attributes. Every field of both is in one of two tables below, `MOE_FIELDS_HONOURED` (with
where it is honoured) or `MOE_FIELDS_REFUSED` (with the values the wide-EP layer computes;
any other is refused at model build by `check_supported`, naming field and value).
`tests/unit/test_moe_config_fields.py` fails when vLLM grows a field neither table lists.
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
from vllm_wideep.layer.experts import WideEPExperts, expert_activation
from vllm_wideep.layer.prepare_finalize import TokenSlice, WideEPPrepareAndFinalize
from vllm_wideep.layer.state import register_layer

logger = init_logger("vllm_wideep")

# FusedMoEConfig fields and MoE layer (`RoutedExperts.__init__`) parameters the wide-EP
# layer honours, and where.
MOE_FIELDS_HONOURED: dict[str, str] = {
    # the experts' math: `expert_activation` maps or refuses each combination
    "activation": "expert_activation",
    "swiglu_limit": "expert_activation: Activation.limit",
    "swiglu_alpha": "expert_activation: Activation.alpha",
    "swiglu_beta": "expert_activation: Activation.beta",
    "has_bias": "w13_bias and w2_bias: in the experts and in every slot (moved with it)",
    "apply_router_weight_on_input": "prepare scales the input (top-1); check_layer refuses k > 1",
    # shapes and placement
    "num_experts": "slots and routing tables",
    "num_logical_experts": "equals num_experts: vLLM's own EPLB is refused (plugin/engine.py)",
    "num_local_experts": "the slots per rank before redundant ones",
    "experts_per_token": "k of every dispatch",
    "hidden_dim": "H of the dispatch rows and the experts",
    "hidden_dim_unpadded": "padding is zero weight rows: contributes nothing",
    "intermediate_size": "I, read from the weights",
    "intermediate_size_per_partition": "I per rank, read from the weights",
    "intermediate_size_per_partition_unpadded": "padding is zero weights: act(0) = 0",
    "intermediate_pad": "padding is zero weights: act(0) = 0",
    "tp_shard_with_padding": "vLLM's loader shards the weights before the experts read them",
    "in_dtype": "the dispatch rows' dtype",
    "device": "the weights' device",
    "moe_parallel_config": "EP group, TP slicing and sequence parallelism (prepare_finalize)",
    "max_num_tokens": "vLLM's batched DP buffers, unused: dispatch sizes its own buffers",
    "elastic_ep_max_dp_size": "sizes vLLM's elastic-EP buffers, unused: dispatch sizes its own",
    "max_capture_size": "CUDA-graph sizes: the capacity exchange reads compilation_config",
    "defer_moe_finalize_max_num_tokens": "read by experts that defer; the wide-EP ones never do",
    "_defer_moe_finalize": "read by experts that defer; the wide-EP ones never do",
    # routing: vLLM's router runs before prepare and hands over topk_ids and weights
    "routing_method": "vLLM's router",
    "router_logits_dtype": "vLLM's router",
    "has_hash_routing": "vLLM's router",
    "renormalize": "vLLM's router",
    "use_grouped_topk": "vLLM's router",
    "num_expert_group": "vLLM's router",
    "topk_group": "vLLM's router",
    "custom_routing_function": "vLLM's router",
    "scoring_func": "vLLM's router",
    "routed_scaling_factor": "vLLM's router or runner scales the weights or the output",
    "e_score_correction_bias": "vLLM's router",
    "shared_expert_prefix": "shared experts run in vLLM's runner, beside the routed ones",
    # layer construction
    "layer_name": "slots and statistics are keyed by it",
    "params_dtype": "the weights' dtype",
    "moe_config": "this table",
    "quant_config": "the quantization method (unquantized or wideep_fp8)",
    "expert_map_manager": "vLLM's loader's expert sharding; slots start from it",
    "ckpt_gate_proj_name": "vLLM's loader",
    "ckpt_down_proj_name": "vLLM's loader",
    "ckpt_up_proj_name": "vLLM's loader",
    "is_fused_checkpoint_transposed": "vLLM's loader",
}

# FusedMoEConfig fields with the only values the wide-EP layer computes; `check_supported`
# refuses any other at model build.
MOE_FIELDS_REFUSED: dict[str, tuple] = {
    "moe_backend": ("auto",),  # the wide-EP experts replace vLLM's backends
    "is_lora_enabled": (False,),  # no LoRA in the wide-EP experts
    "skip_final_all_reduce": (False,),  # vLLM allows it only with an un-reduced output
    "activation_situ_beta": (None,),  # SiTU is not computed
    "activation_situ_linear_beta": (None,),
    # ROCm AITER experts (vLLM sets the first two to None where AITER is absent)
    "rocm_aiter_fmoe_enabled": (False, None),
    "aiter_fmoe_shared_expert_enabled": (False, None),
    "use_mxfp4_w4a4_dsv4": (False,),
}


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


def expert_biases(moe, layer) -> list[torch.Tensor]:
    """The layer's expert biases, w13_bias `[S, 2I]` and w2_bias `[S, H]`, or none."""
    if not moe.has_bias:
        return []
    return [layer.w13_bias.detach(), layer.w2_bias.detach()]


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

    weights: the per-slot weights of the layer, each `[S, ...]` (w13, w2, then the FP8
        scales if any). The slots hold them and the layer's biases (`expert_biases`):
        what a slot is, so moves, replicas and checksums cover them all.
    fp8: the scales of FP8 weights (the same tensors as in `weights`), or None.
    """
    check_layer(layer)
    biases = expert_biases(moe, layer)
    slots = _make_slots(config, moe, layer, weights + biases)
    w13_bias, w2_bias = biases or (None, None)
    experts = WideEPExperts(
        moe,
        quant_config or FUSED_MOE_UNQUANTIZED_CONFIG,
        backend=config.experts_backend,
        tokens_per_slot=slots.tokens_per_slot,
        fp8=fp8,
        w13_bias=w13_bias,
        w2_bias=w2_bias,
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
    tp_group = get_tp_group()
    if moe.moe_parallel_config.is_sequence_parallel:
        token_slice = TokenSlice(rank=0, size=1)  # vLLM already split the tokens
    else:
        token_slice = TokenSlice(tp_group.rank_in_group, tp_group.world_size)
    return WideEPPrepareAndFinalize(
        dispatcher, token_slice, ep_group.world_size, slots=slots, tp_group=tp_group
    )


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
    """Refuse, at model build, a `FusedMoEConfig` the wide-EP experts do not compute: a
    `MOE_FIELDS_REFUSED` field off its values, or an activation `expert_activation` refuses.
    NotImplementedError naming the field and its value."""
    for field, allowed in MOE_FIELDS_REFUSED.items():
        value = getattr(moe, field)
        if value not in allowed:
            raise NotImplementedError(
                f"vllm_wideep: this MoE layer has {field}={value!r}; the wide-EP experts "
                f"compute only {field} in {list(allowed)}. Drop --enable-wideep for it."
            )
    expert_activation(moe)


def check_layer(layer) -> None:
    """Refuse the MoE layer attributes the wide-EP experts do not compute (model build)."""
    top_k = layer.moe_config.experts_per_token
    if layer.apply_router_weight_on_input and top_k > 1:
        # prepare scales each token's input by its router weight: one weight per token.
        raise NotImplementedError(
            f"vllm_wideep: {layer.layer_name} has apply_router_weight_on_input=True with "
            f"top-k {top_k}; the wide-EP layer applies router weights to the input for "
            "top-1 routing only (as vLLM's own kernels do)."
        )
