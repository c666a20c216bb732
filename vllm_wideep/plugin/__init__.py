"""vLLM glue: what `register()` installs in every vLLM process (the changes themselves are
listed in `hooks.HOOKS`)."""

from __future__ import annotations


def register() -> None:
    """Entry point of `vllm.general_plugins`; vLLM calls it once or more per process.

    Cheap and device-free: it registers the MoE classes and wraps a few vLLM functions;
    the worker-side hooks follow when a worker builds its first wide-EP MoE layer.
    """
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.model_executor.layers.fused_moe import MoERunner, UnquantizedFusedMoEMethod
    from vllm.model_executor.layers.quantization import register_quantization_config

    from vllm_wideep.layer import state
    from vllm_wideep.layer.fp8 import (
        CT_QUANTIZATION_NAME,
        QUANTIZATION_NAME,
        WideEPCompressedTensorsFp8Config,
        WideEPFp8Config,
    )
    from vllm_wideep.layer.method import WideEPUnquantizedMethod
    from vllm_wideep.layer.runner import WideEPMoERunner
    from vllm_wideep.plugin.cli import patch_cli
    from vllm_wideep.plugin.engine import patch_engine_config
    from vllm_wideep.plugin.ray_cpu import patch_ray_cpu
    from vllm_wideep.plugin.server import patch_server_exit_status
    from vllm_wideep.plugin.worker import install_step_hooks, patch_dp_client

    if op_registry_oot.get("MoERunner") is not WideEPMoERunner:
        MoERunner.register_oot(WideEPMoERunner)
    if op_registry_oot.get("UnquantizedFusedMoEMethod") is not WideEPUnquantizedMethod:
        UnquantizedFusedMoEMethod.register_oot(WideEPUnquantizedMethod)
    # Registering the same class again replaces it by itself.
    register_quantization_config(QUANTIZATION_NAME)(WideEPFp8Config)
    register_quantization_config(CT_QUANTIZATION_NAME)(WideEPCompressedTensorsFp8Config)
    patch_cli()
    patch_engine_config()
    patch_dp_client()
    patch_ray_cpu()
    patch_server_exit_status()
    if install_step_hooks not in state.on_first_layer:
        state.on_first_layer.append(install_step_hooks)
