"""The MoE runner, wide-EP edition.

Registered with `MoERunner.register_oot`, so every MoE layer of every model is built as
this class. With wide EP on it changes one thing: the layer body always runs behind
vLLM's opaque `moe_forward` custom op, also on CPU where stock vLLM lets Dynamo trace it,
because dispatch sizes depend on the data (Dynamo cannot trace the host sync).

    route (vLLM's router) -> dispatch -> experts -> combine    (WideEPUnquantizedMethod)
"""

from __future__ import annotations

import torch
from vllm.config import get_current_vllm_config
from vllm.model_executor.layers.fused_moe import MoERunner

from vllm_wideep.config import WideEPConfig
from vllm_wideep.layer.fp8 import WideEPFp8MoEMethod
from vllm_wideep.layer.method import WideEPUnquantizedMethod


class WideEPMoERunner(MoERunner):
    def __init__(self, *args, **kwargs):
        # Read before super().__init__, which calls _select_forward.
        self.wideep_enabled = WideEPConfig.from_additional_config(
            get_current_vllm_config().additional_config
        ).enabled
        super().__init__(*args, **kwargs)
        if not self.wideep_enabled:
            return
        quant_method = self.routed_experts.quant_method
        if not isinstance(quant_method, (WideEPUnquantizedMethod, WideEPFp8MoEMethod)):
            raise NotImplementedError(
                f"vllm_wideep: layer {self.layer_name} uses the MoE method "
                f"{type(quant_method).__name__}; wide EP runs unquantized experts and "
                f"FP8 experts with 128x128 block scales. Serve such a checkpoint or drop "
                f"--enable-wideep."
            )

    def _select_forward(self):
        if not self.wideep_enabled:
            return super()._select_forward()
        if self._shared_experts is None:
            return torch.ops.vllm.moe_forward
        return torch.ops.vllm.moe_forward_shared
