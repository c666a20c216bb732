"""Kernel tests run the Triton kernels for real on a GPU, else in Triton's CPU interpreter.

Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when
``vllm_wideep.kernels.grouped_gemm`` is first imported, so this is set before any test
module of this folder imports it.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vllm_wideep.kernels import SILU, torch_experts  # noqa: E402


@pytest.fixture
def vllm_cpu_ops():
    """vLLM's CPU ops (``torch.ops._C.cpu_fused_moe``), loaded as vLLM's CPU platform does."""
    pytest.importorskip("vllm")
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    if not hasattr(torch.ops._C, "cpu_fused_moe"):
        pytest.skip("vLLM's CPU MoE kernel is not available in this vLLM build")


@pytest.fixture
def force_torch_path(monkeypatch, request):
    """``force(gemm, x, w13, w2)``: make the torch backend take one of its three paths,
    whatever the problem size: ``"grouped_mm"``, ``"per_expert"`` or ``"vllm_kernel"``
    (vLLM's fused CPU kernel; skips where it is missing or can't take these shapes)."""

    def force(gemm, x, w13, w2, biases=(None, None), activation=SILU):
        if gemm != "vllm_kernel":
            monkeypatch.setattr(torch_experts, "_vllm_isa", lambda *args: None)
        threshold = torch_experts.GROUPED_MM_MAX_WORK if gemm == "grouped_mm" else -1
        monkeypatch.setattr(torch_experts, "GROUPED_MM_MAX_WORK", threshold)
        if gemm == "vllm_kernel":
            request.getfixturevalue("vllm_cpu_ops")
            if torch_experts._vllm_isa(x, w13, w2, biases, activation) is None:
                pytest.skip("vLLM's kernel needs H and I multiples of 32 and its activations")

    return force
