"""Every field of vLLM's MoE config, and every parameter of its MoE layer, is either honoured
by the wide-EP layer or refused at model build (`layer/method.py`: `MOE_FIELDS_HONOURED`,
`MOE_FIELDS_REFUSED`, `check_supported`, `check_layer`; `layer/experts.py`:
`expert_activation`). A vLLM upgrade that adds a field fails here until it is classified.
"""

import dataclasses
import inspect
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from vllm.model_executor.layers.fused_moe.activation import MoEActivation  # noqa: E402
from vllm.model_executor.layers.fused_moe.config import (  # noqa: E402
    FusedMoEConfig,
    FusedMoEParallelConfig,
    RoutingMethodType,
)
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts  # noqa: E402

from vllm_wideep.kernels import SWIGLU_OAI, Activation  # noqa: E402
from vllm_wideep.layer.experts import SUPPORTED_ACTIVATIONS, expert_activation  # noqa: E402
from vllm_wideep.layer.method import (  # noqa: E402
    MOE_FIELDS_HONOURED,
    MOE_FIELDS_REFUSED,
    check_layer,
    check_supported,
)


def vllm_moe_fields() -> set[str]:
    config = {f.name for f in dataclasses.fields(FusedMoEConfig)}
    layer = set(inspect.signature(RoutedExperts.__init__).parameters) - {"self"}
    return config | layer


def test_every_field_is_honoured_or_refused():
    listed = set(MOE_FIELDS_HONOURED) | set(MOE_FIELDS_REFUSED)
    unlisted = vllm_moe_fields() - listed
    assert not unlisted, (
        f"vLLM's MoE config or layer has fields the wide-EP layer neither honours nor "
        f"refuses: {sorted(unlisted)}; classify them in layer/method.py"
    )
    assert not set(MOE_FIELDS_HONOURED) & set(MOE_FIELDS_REFUSED)
    assert not listed - vllm_moe_fields(), "tables list fields vLLM no longer has"


def moe_config(**overrides) -> FusedMoEConfig:
    """A real single-rank FusedMoEConfig: 8 experts, top-2, H 32, I 64."""
    fields = dict(
        num_experts=8, experts_per_token=2, hidden_dim=32, intermediate_size=64,
        num_local_experts=8, num_logical_experts=8, activation=MoEActivation.SILU,
        device="cpu", routing_method=RoutingMethodType.Renormalize,
        moe_parallel_config=FusedMoEParallelConfig.make_no_parallel(), in_dtype=torch.float32,
    )  # fmt: skip
    return FusedMoEConfig(**{**fields, **overrides})


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(has_bias=True, activation=MoEActivation.SWIGLUOAI),  # gpt-oss
        dict(swiglu_limit=7.0),  # silu with a clamp (Bailing, EXAONE)
        dict(activation=MoEActivation.SWIGLUSTEP),  # Step-3.5
        # (vLLM 0.32 builds non-gated MoE configs on CUDA, XPU and ROCm only)
        dict(activation=MoEActivation.GELU_TANH),
    ],
)
def test_real_configs_pass(overrides):
    check_supported(moe_config(**overrides))


# A value off the accepted ones for each refused field.
BAD_VALUES = {
    "moe_backend": "triton",
    "is_lora_enabled": True,
    "skip_final_all_reduce": True,
    "activation_situ_beta": 1.0,
    "activation_situ_linear_beta": 1.0,
    "rocm_aiter_fmoe_enabled": True,
    "aiter_fmoe_shared_expert_enabled": True,
    "use_mxfp4_w4a4_dsv4": True,
}


@pytest.mark.parametrize("field", sorted(MOE_FIELDS_REFUSED))
def test_refused_field_names_field_and_value(field):
    moe = dataclasses.replace(moe_config())
    object.__setattr__(moe, field, BAD_VALUES[field])  # some are set by __post_init__
    with pytest.raises(NotImplementedError, match=f"{field}={BAD_VALUES[field]!r}"):
        check_supported(moe)


def swiglu(activation, limit=None, alpha=None, beta=None):
    return SimpleNamespace(
        activation=activation, swiglu_limit=limit, swiglu_alpha=alpha, swiglu_beta=beta
    )


@pytest.mark.parametrize(
    "moe, expected",
    [
        (swiglu(MoEActivation.SILU), Activation("silu")),
        (swiglu(MoEActivation.SILU, limit=7.0), Activation("silu", limit=7.0)),
        (swiglu(MoEActivation.SWIGLUOAI), SWIGLU_OAI),
        (swiglu(MoEActivation.SWIGLUOAI, 7.0, 1.702, 1.0), SWIGLU_OAI),
        (
            swiglu(MoEActivation.SWIGLUOAI_UNINTERLEAVE, 5.0, 1.5, 1.0),
            Activation("silu", alpha=1.5, beta=1.0, limit=5.0),
        ),
        (swiglu(MoEActivation.SWIGLUSTEP), Activation("swiglustep", limit=7.0)),
        (swiglu(MoEActivation.GELU_TANH), Activation("gelu_tanh")),
        (swiglu(MoEActivation.RELU2_NO_MUL), Activation("relu2", gated=False)),
    ],
)
def test_activation_mapping(moe, expected):
    assert expert_activation(moe) == expected


@pytest.mark.parametrize(
    "moe, match",
    [
        (swiglu(MoEActivation.SILU, alpha=1.702), "swiglu_alpha=1.702"),
        (swiglu(MoEActivation.SWIGLUOAI, limit=10.0), "swiglu_limit=10.0"),
        (swiglu(MoEActivation.SWIGLUSTEP, limit=5.0), "swiglu_limit=5.0"),
        (swiglu(MoEActivation.GELU, limit=7.0), "swiglu_limit=7.0"),
        (swiglu(MoEActivation.SWIGLUOAI_UNINTERLEAVE), "swiglu_limit=None"),
        (swiglu(MoEActivation.SITU), "'situ'"),
        (swiglu(MoEActivation.RELU2), "'relu2'"),
    ],
)
def test_activation_refusals_name_field_and_value(moe, match):
    with pytest.raises(NotImplementedError, match=match):
        expert_activation(moe)


def test_every_vllm_activation_maps_or_is_refused():
    for act in MoEActivation:
        if act in SUPPORTED_ACTIVATIONS:
            limit = 7.0 if act == MoEActivation.SWIGLUOAI_UNINTERLEAVE else None
            assert isinstance(expert_activation(swiglu(act, limit=limit)), Activation)
        else:
            with pytest.raises(NotImplementedError, match=repr(act.value)):
                expert_activation(swiglu(act))


@pytest.mark.parametrize("top_k", [1, 2])
def test_router_weight_on_input_is_top1_only(top_k):
    layer = SimpleNamespace(
        layer_name="model.layers.0.mlp.experts",
        moe_config=SimpleNamespace(experts_per_token=top_k),
        apply_router_weight_on_input=True,
    )
    if top_k == 1:
        check_layer(layer)
    else:
        with pytest.raises(NotImplementedError, match="apply_router_weight_on_input=True"):
            check_layer(layer)
