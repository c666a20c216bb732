"""FP8 checkpoints with 128 x 128 block scales (DeepSeek's format) under wide EP.

vLLM's quantized MoE methods are not CustomOps, so `register_oot` does not reach them.
The plugin registers its own quantization config instead, `WideEPFp8Config`, under the
name `wideep_fp8`, and the engine hook (`plugin/engine.py`) selects it only when wide EP
is on and the checkpoint says `quant_method: fp8`: stock vLLM's `fp8` stays untouched for
every other engine in the process.

    routed experts   `WideEPFp8MoEMethod`: vLLM's FP8 weights and block scales, loaded by
                     vLLM's own loader (`w13_weight` `[S, 2I, H]` float8,
                     `w13_weight_scale_inv` `[S, 2I / 128, H / 128]` float32, w2 alike),
                     computed by the wide-EP experts (`kernels.moe_experts(fp8=...)`),
                     with the expert biases (model dtype, not quantized) where the model
                     has them. A slot is its weights, scales and biases: moves, replicas
                     and checksums carry them all.
    other Linears    vLLM's `Fp8LinearMethod` where the platform has an FP8 kernel; on
                     CPUs (none has one in vLLM 0.32) `Fp8DequantizedLinearMethod`, which
                     dequantizes the weight once at load (one log line).

The config also accepts float32 activations (stock `fp8` allows bf16 and fp16 only): the
weight-only path on CPU computes in the model dtype, which lets a float32 run match stock
vLLM on the dequantized checkpoint exactly.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe.config import FUSED_MOE_UNQUANTIZED_CONFIG
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.fp8 import Fp8Config, Fp8MoEMethod
from vllm.model_executor.layers.quantization.utils.fp8_utils import (
    create_fp8_scale_parameter,
    create_fp8_weight_parameter,
    validate_fp8_block_shape,
    validate_fp8_block_shape_moe,
)
from vllm.model_executor.layers.quantization.utils.quant_utils import is_layer_skipped
from vllm.model_executor.parameter import BlockQuantScaleParameter
from vllm.platforms import current_platform

from vllm_wideep.kernels.fp8 import BLOCK, Fp8Experts, dequantize_block_fp8
from vllm_wideep.layer.method import (
    build_wideep_kernel,
    check_supported,
    current_wideep_config,
    extra_slots,
)

logger = init_logger("vllm_wideep")

QUANTIZATION_NAME = "wideep_fp8"
CT_QUANTIZATION_NAME = "wideep_ct_fp8"


class WideEPFp8Config(Fp8Config):
    """vLLM's `Fp8Config`, with the wide-EP MoE method and a CPU Linear method.

    scale_name: the checkpoint's name of the block scales (`X.weight_scale_inv`)."""

    scale_name = "weight_scale_inv"

    @classmethod
    def get_name(cls) -> str:
        return QUANTIZATION_NAME

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.half, torch.float32]

    @classmethod
    def override_quantization_method(
        cls, hf_quant_cfg: dict[str, Any], user_quant: str | None, hf_config: Any = None
    ) -> str | None:
        """Claim an `fp8` checkpoint when the engine asked for `wideep_fp8`."""
        if user_quant == QUANTIZATION_NAME and hf_quant_cfg.get("quant_method") == "fp8":
            return QUANTIZATION_NAME
        return None

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        from vllm.model_executor.layers.fused_moe.layer import RoutedExperts

        skipped = is_layer_skipped(
            prefix=prefix,
            ignored_layers=self.ignored_layers,
            fused_mapping=self.packed_modules_mapping,
            match_mode=self.ignored_layers_match_mode,
        )
        if isinstance(layer, RoutedExperts) and not skipped:
            return WideEPFp8MoEMethod(self, layer)
        if isinstance(layer, LinearBase) and not skipped and current_platform.is_cpu():
            return Fp8DequantizedLinearMethod(self)
        return super().get_quant_method(layer, prefix)


class WideEPCompressedTensorsFp8Config(WideEPFp8Config):
    """llm-compressor's FP8 block format (`"quant_method": "compressed-tensors"`, every
    config group's weights float 8-bit with `strategy: block`, `block_structure [128, 128]`,
    activations dynamic per 128-column group or none), read into the same FP8 machinery:
    scales are `X.weight_scale`; `ignore` names the unquantized modules exactly or as
    `re:` regular expressions."""

    scale_name = "weight_scale"

    @classmethod
    def get_name(cls) -> str:
        return CT_QUANTIZATION_NAME

    @classmethod
    def override_quantization_method(
        cls, hf_quant_cfg: dict[str, Any], user_quant: str | None, hf_config: Any = None
    ) -> str | None:
        if (
            user_quant == CT_QUANTIZATION_NAME
            and hf_quant_cfg.get("quant_method") == "compressed-tensors"
        ):
            return CT_QUANTIZATION_NAME
        return None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> WideEPCompressedTensorsFp8Config:
        reason = compressed_tensors_fp8_block_problem(config)
        if reason is not None:
            raise ValueError(f"vllm_wideep: {reason}")
        ignore = list(config.get("ignore") or [])
        quant_config = cls(
            is_checkpoint_fp8_serialized=True,
            activation_scheme="dynamic",
            ignored_layers=[name for name in ignore if not name.startswith("re:")],
            weight_block_size=list(BLOCK),
        )
        quant_config.ignored_patterns = [
            re.compile(name[3:]) for name in ignore if name.startswith("re:")
        ]
        return quant_config

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        # A `re:` entry matched against vLLM's module name (a fused one too) ignores it
        # as an exact entry would.
        matched = any(pattern.match(prefix) for pattern in self.ignored_patterns)
        if matched and prefix not in self.ignored_layers:
            self.ignored_layers.append(prefix)
        return super().get_quant_method(layer, prefix)


def compressed_tensors_fp8_block_problem(config: dict[str, Any]) -> str | None:
    """Why a compressed-tensors `quantization_config` is not FP8 with 128 x 128 blocks
    (None when it is). Pure."""
    groups = config.get("config_groups") or {}
    if not groups:
        return "a compressed-tensors checkpoint without config_groups"
    for name, group in groups.items():
        weights = group.get("weights") or {}
        activations = group.get("input_activations")
        fp8_blocks = (
            weights.get("num_bits") == 8
            and weights.get("type") == "float"
            and weights.get("strategy") == "block"
            and list(weights.get("block_structure") or []) == list(BLOCK)
        )
        dynamic_groups = activations is None or (
            activations.get("dynamic") is True and activations.get("strategy") in ("group", "token")
        )
        if not (fp8_blocks and dynamic_groups):
            return (
                f"compressed-tensors group {name!r} is not FP8 with {list(BLOCK)} weight "
                f"blocks and dynamic activations (weights {weights}, activations "
                f"{activations})"
            )
    return None


class WideEPFp8MoEMethod(Fp8MoEMethod):
    """FP8 block-scaled routed experts, wide-EP edition (see the module docstring)."""

    def __init__(self, quant_config: WideEPFp8Config, layer):
        # Not Fp8MoEMethod.__init__: it selects one of vLLM's FP8 expert backends, and the
        # wide-EP experts replace them all (there is none for CPUs).
        FusedMoEMethodBase.__init__(self, layer.moe_config)
        self.wideep = current_wideep_config()
        check_supported(self.moe)
        if list(quant_config.weight_block_size or []) != list(BLOCK):
            raise NotImplementedError(
                "vllm_wideep: FP8 checkpoints without block scales (per-tensor "
                f"weight_scale) or with blocks other than {list(BLOCK)} are not supported "
                f"with --enable-wideep (this one: {quant_config.weight_block_size})"
            )
        self.quant_config = quant_config
        self.weight_block_size = quant_config.weight_block_size
        self.block_quant = True
        self.weight_scale_name = quant_config.scale_name
        self.weight_scale_refine = None
        self.moe_block_shape = self.weight_block_size
        validate_fp8_block_shape_moe(
            self.moe.intermediate_size_per_partition, self.weight_block_size
        )

    def create_weights(self, layer, num_experts: int, *args, **kwargs):
        """vLLM's FP8 weights and scales, with `redundant_experts / R` extra slots."""
        num_experts += extra_slots(self.wideep, self.moe)
        return super().create_weights(layer, num_experts, *args, **kwargs)

    def get_fused_moe_quant_config(self, layer):
        # The wide-EP experts read the scales themselves; vLLM's kernel wrapper is told
        # nothing is quantized, so it quantizes no activation either.
        return FUSED_MOE_UNQUANTIZED_CONFIG

    def process_weights_after_loading(self, layer) -> None:
        self.moe_quant_config = FUSED_MOE_UNQUANTIZED_CONFIG
        weights = [
            layer.w13_weight.detach(),
            layer.w2_weight.detach(),
            getattr(layer, f"w13_{self.weight_scale_name}").detach(),
            getattr(layer, f"w2_{self.weight_scale_name}").detach(),
        ]
        fp8 = Fp8Experts(
            w13_scale=weights[2],
            w2_scale=weights[3],
            block=tuple(self.weight_block_size),
            # fp8 dispatch delivers FP8 activations: W8A8. Otherwise weight-only (W8A16).
            activations="fp8" if self.wideep.dispatch_dtype == "fp8" else "native",
        )
        self.slots, self.moe_kernel = build_wideep_kernel(
            self.wideep, self.moe, self.moe_quant_config, layer, weights, fp8=fp8
        )


class Fp8DequantizedLinearMethod(UnquantizedLinearMethod):
    """An FP8 block-scaled Linear on a platform without an FP8 Linear kernel: loaded as FP8
    by vLLM's loader, then dequantized once to the model dtype and run as vLLM's
    unquantized Linear (which is also how vLLM's MLA reads `kv_b_proj` afterwards)."""

    _logged = False

    def __init__(self, quant_config: WideEPFp8Config):
        super().__init__()
        self.weight_block_size = quant_config.weight_block_size
        self.scale_name = quant_config.scale_name

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ):
        """`Fp8LinearMethod.create_weights` for block scales, less the search for an FP8
        Linear kernel (there is none here): `weight` float8, its block scales float32."""
        weight_loader = extra_weight_attrs.get("weight_loader")
        layer.logical_widths = output_partition_sizes
        layer.input_size_per_partition = input_size_per_partition
        layer.output_size_per_partition = sum(output_partition_sizes)
        layer.orig_dtype = params_dtype
        layer.weight_block_size = self.weight_block_size
        validate_fp8_block_shape(
            layer,
            input_size,
            output_size,
            input_size_per_partition,
            output_partition_sizes,
            self.weight_block_size,
        )
        layer.register_parameter(
            "weight",
            create_fp8_weight_parameter(
                layer.output_size_per_partition, input_size_per_partition, weight_loader
            ),
        )
        layer.register_parameter(
            self.scale_name,
            create_fp8_scale_parameter(
                BlockQuantScaleParameter,
                output_partition_sizes,
                input_size_per_partition,
                self.weight_block_size,
                weight_loader,
            ),
        )

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if not Fp8DequantizedLinearMethod._logged:
            Fp8DequantizedLinearMethod._logged = True
            logger.info(
                "vllm_wideep: no FP8 Linear kernel on this platform; FP8 Linear weights "
                "are dequantized to %s at load (the MoE experts stay FP8).",
                layer.orig_dtype,
            )
        scale = getattr(layer, self.scale_name)
        weight = dequantize_block_fp8(layer.weight.data, scale.data, tuple(self.weight_block_size))
        layer.weight = torch.nn.Parameter(weight.to(layer.orig_dtype), requires_grad=False)
        delattr(layer, self.scale_name)
        super().process_weights_after_loading(layer)
