"""Install the wide-EP runner and method into vLLM's MoE layer factory."""

from __future__ import annotations


def patch_moe() -> None:
    """Register the out-of-tree MoE classes (idempotent: registration is by class name)."""
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.model_executor.layers.fused_moe import MoERunner, UnquantizedFusedMoEMethod

    from vllm_wideep.layer.method import WideEPUnquantizedMethod
    from vllm_wideep.layer.runner import WideEPMoERunner

    if op_registry_oot.get("MoERunner") is not WideEPMoERunner:
        MoERunner.register_oot(WideEPMoERunner)
    if op_registry_oot.get("UnquantizedFusedMoEMethod") is not WideEPUnquantizedMethod:
        UnquantizedFusedMoEMethod.register_oot(WideEPUnquantizedMethod)
