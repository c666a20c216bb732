"""Expert activations and biases (`kernels.activation.Activation`, ``w13_bias``, ``w2_bias``)
in the torch backend (its three paths) and the Triton kernels (interpreter on CPU, fp32,
both layouts), against a float64 reference written here from each activation's formula
(vLLM's `MoEActivation` definitions), not from the package's code.

Inputs are scaled so that |gate_up| goes well past the small limits used here: a clamp the
kernels skipped would show (``test_limits_bite`` checks that the inputs reach them).
"""

import math

import pytest
import torch

from vllm_wideep.kernels import SWIGLU_OAI, Activation, Fp8Experts, moe_experts
from vllm_wideep.kernels.fp8 import dequantize_block_fp8, quantize_block_fp8
from vllm_wideep.kernels.grouped_gemm import moe_experts_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REL_TOL = 1e-4  # fp32 against float64: exact up to summation order

M, H, INTER, E, K = 7, 32, 32, 4, 2  # multiples of 32: vLLM's CPU kernel takes them too
LIMIT = 1.5  # well inside |gate_up| of these inputs


def _silu(g, alpha=1.0):
    return g / (1.0 + torch.exp(-alpha * g))


def _gelu(g):
    return 0.5 * g * (1.0 + torch.erf(g / math.sqrt(2.0)))


def _gelu_tanh(g):
    return 0.5 * g * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g**3)))


def _packed(gu):
    return gu[: gu.shape[0] // 2], gu[gu.shape[0] // 2 :]


# name -> (Activation, reference act(gate_up [2I] or [I] float64) -> [I])
CASES = {
    "silu": (Activation("silu"), lambda gu: _silu(_packed(gu)[0]) * _packed(gu)[1]),
    # vLLM's silu with swiglu_limit: silu(min(g, L)) * clamp(u, -L, L)
    "silu_limit": (
        Activation("silu", limit=LIMIT),
        lambda gu: _silu(_packed(gu)[0].clamp(max=LIMIT)) * _packed(gu)[1].clamp(-LIMIT, LIMIT),
    ),
    # gpt-oss: interleaved, g = min(g, 7), u = clamp(u, -7, 7), g * sigmoid(1.702 g) * (u + 1)
    "swigluoai": (
        SWIGLU_OAI,
        lambda gu: _silu(gu[0::2].clamp(max=7.0), alpha=1.702) * (gu[1::2].clamp(-7.0, 7.0) + 1.0),
    ),
    # swigluoai_uninterleave: packed, the limit, alpha and beta from the model
    "swiglu_packed": (
        Activation("silu", alpha=1.25, beta=0.5, limit=LIMIT),
        lambda gu: (
            _silu(_packed(gu)[0].clamp(max=LIMIT), alpha=1.25)
            * (_packed(gu)[1].clamp(-LIMIT, LIMIT) + 0.5)
        ),
    ),
    # Step-3.5: min(silu(g), L) * clamp(u, -L, L): the limit clamps silu's output
    "swiglustep": (
        Activation("swiglustep", limit=LIMIT),
        lambda gu: _silu(_packed(gu)[0]).clamp(max=LIMIT) * _packed(gu)[1].clamp(-LIMIT, LIMIT),
    ),
    "gelu": (Activation("gelu"), lambda gu: _gelu(_packed(gu)[0]) * _packed(gu)[1]),
    "gelu_tanh": (
        Activation("gelu_tanh"),
        lambda gu: _gelu_tanh(_packed(gu)[0]) * _packed(gu)[1],
    ),
    "silu_no_mul": (Activation("silu", gated=False), _silu),
    "gelu_no_mul": (Activation("gelu", gated=False), _gelu),
    "gelu_tanh_no_mul": (Activation("gelu_tanh", gated=False), _gelu_tanh),
    "relu2_no_mul": (Activation("relu2", gated=False), lambda g: g.clamp(min=0.0) ** 2),
}


def make_inputs(activation: Activation, bias: bool, seed=0):
    """fp32 inputs on DEVICE: x, w13, w2, topk_weights, topk_ids (a third of the pairs -1),
    w13_bias, w2_bias (None without ``bias``). gate_up has a standard deviation of 2, or of
    1.3 x the activation's limit where that is larger."""
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * INTER if activation.gated else INTER
    spread = max(2.0, 1.3 * (activation.limit or 0.0))
    ids = torch.rand(M, E + 2, generator=gen).argsort(dim=1)[:, :K]
    ids = torch.where(ids < E, ids, -1).to(torch.int32)
    tensors = [
        torch.randn(M, H, generator=gen),
        torch.randn(E, rows, H, generator=gen) * (spread / H**0.5),
        torch.randn(E, H, INTER, generator=gen) / INTER**0.5,
        torch.rand(M, K, generator=gen),
        ids,
        torch.randn(E, rows, generator=gen) if bias else None,
        torch.randn(E, H, generator=gen) if bias else None,
    ]
    return [None if t is None else t.to(DEVICE) for t in tensors]


def reference(act, x, w13, w2, topk_weights, topk_ids, w13_bias, w2_bias):
    """float64 `[M, H]`: sum over pairs of weight * (w2[e] @ act(w13[e] @ x + b13[e]) + b2[e])."""
    x, w13, w2 = x.cpu().double(), w13.cpu().double(), w2.cpu().double()
    b13 = torch.zeros(w13.shape[:2]) if w13_bias is None else w13_bias.cpu()
    b2 = torch.zeros(w2.shape[:2]) if w2_bias is None else w2_bias.cpu()
    out = torch.zeros(x.shape, dtype=torch.float64)
    for m in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[m, j])
            if e >= 0:
                inner = act(w13[e] @ x[m] + b13[e].double())
                out[m] += float(topk_weights[m, j]) * (w2[e] @ inner + b2[e].double())
    return out


def assert_close(out, ref):
    err = (out.cpu().double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert scale > 0 and err / scale <= REL_TOL, f"max error {err:.3g} vs max |ref| {scale:.3g}"


def run(backend, inputs, activation, layout=None):
    x, w13, w2, weights, ids, b13, b2 = inputs
    if backend == "triton":
        out = torch.full_like(x, float("nan"))  # a row the kernels forget fails
        moe_experts_triton(
            x, w13, w2, weights, ids, layout=layout, out=out,
            w13_bias=b13, w2_bias=b2, activation=activation,
        )  # fmt: skip
        return out
    return moe_experts(
        x, w13, w2, weights, ids, backend="torch", w13_bias=b13, w2_bias=b2, activation=activation
    )


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("gemm", ["grouped_mm", "per_expert", "vllm_kernel"])
@pytest.mark.parametrize("name", CASES)
def test_torch_backend(name, gemm, bias, force_torch_path):
    activation, act = CASES[name]
    inputs = [None if t is None else t.cpu() for t in make_inputs(activation, bias)]
    force_torch_path(gemm, *inputs[:3], biases=tuple(inputs[5:]), activation=activation)
    assert_close(run("torch", inputs, activation), reference(act, *inputs))


@pytest.mark.parametrize("layout", ["contiguous", "batched"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("name", CASES)
def test_triton(name, bias, layout):
    activation, act = CASES[name]
    inputs = make_inputs(activation, bias, seed=1)
    assert_close(run("triton", inputs, activation, layout), reference(act, *inputs))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp8_weights_with_biases(backend):
    """W8A16: biases (not quantized) and gpt-oss's interleaved activation on FP8 weights, to
    the reference on the dequantized weights."""
    activation, act = CASES["swigluoai"]
    x, w13, w2, weights, ids, b13, b2 = make_inputs(activation, bias=True, seed=2)
    # Scales to the weights' size: quantize per 128 x 128 block, dequantize for the reference.
    w13_q, w13_scale = quantize_block_fp8(w13.cpu())
    w2_q, w2_scale = quantize_block_fp8(w2.cpu())
    fp8 = Fp8Experts(w13_scale.to(DEVICE), w2_scale.to(DEVICE), (128, 128), "native")
    out = moe_experts(
        x, w13_q.to(DEVICE), w2_q.to(DEVICE), weights, ids, backend=backend, fp8=fp8,
        w13_bias=b13, w2_bias=b2, activation=activation,
    )  # fmt: skip
    w13_deq = dequantize_block_fp8(w13_q, w13_scale, (128, 128), torch.float64)
    w2_deq = dequantize_block_fp8(w2_q, w2_scale, (128, 128), torch.float64)
    assert_close(out, reference(act, x, w13_deq, w2_deq, weights, ids, b13, b2))


def test_limits_bite():
    """The inputs push gate_up past every limit used above, so a skipped clamp fails."""
    for name in ("silu_limit", "swigluoai", "swiglustep"):
        activation, _ = CASES[name]
        x, w13, *_ = make_inputs(activation, bias=True)
        gate_up = torch.einsum("mh,erh->mer", x.cpu(), w13.cpu())
        assert gate_up.amax() > 1.5 * activation.limit and gate_up.amin() < -activation.limit


def test_bias_shape_is_checked():
    activation, _ = CASES["silu"]
    x, w13, w2, weights, ids, b13, b2 = make_inputs(activation, bias=True)
    with pytest.raises(ValueError, match="w13_bias"):
        moe_experts(x, w13, w2, weights, ids, w13_bias=b13[:, :INTER], w2_bias=b2)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(fn="tanh"),
        dict(fn="silu", gated=False, limit=1.0),
        dict(fn="gelu", alpha=1.702),
        dict(fn="swiglustep"),
        dict(fn="silu", limit=0.0),
    ],
)
def test_activation_spec_refuses_undefined_math(kwargs):
    with pytest.raises(ValueError):
        Activation(**kwargs)
