"""Kernel tests run the Triton kernels for real on a GPU, else in Triton's CPU interpreter.

Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when
``vllm_wideep.kernels.grouped_gemm`` is first imported, so this is set before any test
module of this folder imports it.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
