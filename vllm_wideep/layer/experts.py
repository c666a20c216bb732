"""vLLM's [Permute-Experts-Unpermute] step: this rank's experts on the rows it received.

Rows arrive with local slot ids (`-1` = another rank's expert) and router weights, and
leave weighted and summed over this rank's experts, so vLLM's top-k reduce is a no-op.

`expert_activation` maps vLLM's `MoEActivation` and the layer's SwiGLU parameters to the
kernels' `Activation` (the kernels import no vLLM):

    vLLM activation          kernels' Activation                             parameters
    silu                     silu, packed                                    swiglu_limit
    swigluoai (gpt-oss)      silu, interleaved, alpha 1.702, beta 1, limit 7 fixed
    swigluoai_uninterleave   silu, packed                                    all three
    swiglustep (Step-3.5)    swiglustep, limit 7                             fixed
    gelu, gelu_tanh          gelu, gelu_tanh, packed                         none
    *_no_mul                 silu, gelu, gelu_tanh, relu2, not gated         none
    relu2 (gated), situ      refused
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.fused_moe import modular_kernel as mk
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import (
    TopKWeightAndReduceNoOP,
)

from vllm_wideep.eplb.stats import record
from vllm_wideep.kernels import SWIGLU_OAI, Activation, WeightCache, moe_experts
from vllm_wideep.kernels.fp8 import Fp8Experts

# The activations whose math is fixed by their name alone (no parameter may be set).
_PLAIN_ACTIVATIONS = {
    MoEActivation.GELU: Activation("gelu"),
    MoEActivation.GELU_TANH: Activation("gelu_tanh"),
    MoEActivation.SILU_NO_MUL: Activation("silu", gated=False),
    MoEActivation.GELU_NO_MUL: Activation("gelu", gated=False),
    MoEActivation.GELU_TANH_NO_MUL: Activation("gelu_tanh", gated=False),
    MoEActivation.RELU2_NO_MUL: Activation("relu2", gated=False),
}
SUPPORTED_ACTIVATIONS = frozenset(_PLAIN_ACTIVATIONS) | {
    MoEActivation.SILU,
    MoEActivation.SWIGLUOAI,
    MoEActivation.SWIGLUOAI_UNINTERLEAVE,
    MoEActivation.SWIGLUSTEP,
}
# vLLM's fixed limit for swiglustep (`swiglustep_and_mul_triton`, Step-3.5 asserts it)
SWIGLUSTEP_LIMIT = 7.0


def expert_activation(moe) -> Activation:
    """The kernels' `Activation` for vLLM's ``moe.activation`` with the layer's
    ``swiglu_limit``, ``swiglu_alpha`` and ``swiglu_beta`` (FusedMoEConfig), as vLLM's own
    experts compute it (`fused_moe/activation.py: apply_moe_activation`). A parameter
    vLLM's kernels ignore or read inconsistently for that activation is refused, not
    dropped: NotImplementedError naming the activation, the field and its value."""
    act = moe.activation
    limit, alpha, beta = moe.swiglu_limit, moe.swiglu_alpha, moe.swiglu_beta
    if act not in SUPPORTED_ACTIVATIONS:
        raise NotImplementedError(
            f"vllm_wideep: MoE activation {act.value!r} is not computed by the wide-EP "
            f"experts (they compute {sorted(a.value for a in SUPPORTED_ACTIVATIONS)})."
        )
    if act == MoEActivation.SILU:  # silu(min(g, L)) * clamp(u, -L, L)
        _only(act, moe, swiglu_limit=limit)
        return Activation("silu", limit=limit)
    if act == MoEActivation.SWIGLUOAI:
        o = SWIGLU_OAI
        _only(act, moe, swiglu_limit=o.limit, swiglu_alpha=o.alpha, swiglu_beta=o.beta)
        return SWIGLU_OAI
    if act == MoEActivation.SWIGLUOAI_UNINTERLEAVE:
        if limit is None:
            raise NotImplementedError(
                "vllm_wideep: MoE activation 'swigluoai_uninterleave' with "
                "swiglu_limit=None: vLLM requires a limit for it."
            )
        alpha = 1.0 if alpha is None else alpha
        beta = 0.0 if beta is None else beta
        return Activation("silu", alpha=alpha, beta=beta, limit=limit)
    if act == MoEActivation.SWIGLUSTEP:
        _only(act, moe, swiglu_limit=SWIGLUSTEP_LIMIT)
        return Activation("swiglustep", limit=SWIGLUSTEP_LIMIT)
    _only(act, moe)
    return _PLAIN_ACTIVATIONS[act]


def _only(act: MoEActivation, moe, **accepted) -> None:
    """Refuse each SwiGLU parameter of ``moe`` set to anything but None or its value in
    ``accepted`` (a parameter missing there may not be set at all)."""
    for field in ("swiglu_limit", "swiglu_alpha", "swiglu_beta"):
        value = getattr(moe, field)
        if value is None or (field in accepted and value == accepted[field]):
            continue
        wanted = f"{field}={accepted[field]!r}" if field in accepted else f"no {field}"
        raise NotImplementedError(
            f"vllm_wideep: MoE activation {act.value!r} with {field}={value!r}: vLLM's "
            f"experts compute {act.value} with {wanted} (they ignore the rest or read it "
            "inconsistently), and so do the wide-EP experts."
        )


class WideEPExperts(mk.FusedMoEExpertsModular):
    """backend: the `experts_backend` option. tokens_per_slot: `[S]` int64 on the device,
    (token, expert) rows computed per local slot since start (the layer's
    `ExpertSlots.tokens_per_slot`). weight_cache: the torch backend's transformed copies of
    this layer's weights; the layer clears it whenever it writes them. fp8: the block scales
    of FP8 weights (vLLM passes the weights to `apply`; the scales live here), or None.
    w13_bias `[S, 2I]`, w2_bias `[S, H]`: the layer's expert biases (the tensors its moves
    write in place), or None. The activation comes from ``moe_config``
    (`expert_activation`)."""

    def __init__(
        self,
        moe_config,
        quant_config,
        backend: str,
        tokens_per_slot: torch.Tensor,
        fp8: Fp8Experts | None = None,
        w13_bias: torch.Tensor | None = None,
        w2_bias: torch.Tensor | None = None,
    ):
        super().__init__(moe_config, quant_config)
        self.backend = backend
        self.tokens_per_slot = tokens_per_slot
        self.weight_cache = WeightCache()
        self.fp8 = fp8
        self.expert_w13_bias = w13_bias
        self.expert_w2_bias = w2_bias
        self.expert_activation = expert_activation(moe_config)

    @staticmethod
    def activation_format() -> mk.FusedMoEActivationFormat:
        return mk.FusedMoEActivationFormat.Standard

    @staticmethod
    def _supports_current_device() -> bool:
        return True

    @staticmethod
    def _supports_no_act_and_mul() -> bool:
        return True

    @staticmethod
    def _supports_quant_scheme(weight_key, activation_key) -> bool:
        return (weight_key, activation_key) == (None, None)

    @staticmethod
    def _supports_activation(activation: MoEActivation) -> bool:
        return activation in SUPPORTED_ACTIVATIONS

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
                w13_bias=self.expert_w13_bias,
                w2_bias=self.expert_w2_bias,
                activation=self.expert_activation,
            )
        )
