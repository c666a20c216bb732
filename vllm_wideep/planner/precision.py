"""Number formats of a deployment: bytes per weight, per KV element, per element sent.

Three presets (``PRECISIONS``), named by the routed experts' weight format:

=========  ======  =====  =======  ====  ========  =======  ====================================
preset     expert  dense  LM head  KV    dispatch  combine  compute (experts / dense / attention)
=========  ======  =====  =======  ====  ========  =======  ====================================
bf16       2       2      2        2     2         2        bf16 / bf16 / bf16
fp8        1       1      2        2     1         2        fp8 / fp8 / bf16
fp4        0.5625  1      2        1     0.5625    2        fp4 / fp8 / fp8
=========  ======  =====  =======  ====  ========  =======  ====================================

Bytes per element. "dense" covers attention projections, dense MLPs, shared experts, the
router and the MTP glue. "dispatch"/"combine": the hidden-state elements the all-to-all
sends to the experts and back.

* ``bf16`` is what vllm_wideep runs today (unquantized MoE only).
* ``fp8`` is DeepSeek's production setting (Day 6 overview): "FP8 GEMMs and dispatch, BF16
  MLA and combine". Block scales (one FP32 per 128x128 weights) add 0.02 % and are ignored.
* ``fp4`` is TensorRT-LLM's DeepSeek-R1 NVFP4 setting: NVFP4 experts (4-bit values plus one
  FP8 scale per 16 = 4.5 bits = 0.5625 bytes), FP8 attention projections, FP8 KV cache and
  FP8 generation MLA, NVFP4 dispatch (tech blog 14), BF16 combine.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_wideep.planner.hardware import COMPUTE_DTYPES

NVFP4_BYTES = 0.5625


@dataclass(frozen=True)
class Precision:
    """Bytes per element of each tensor class, and the GEMM operand type of each stage."""

    name: str
    expert_weight_bytes: float
    dense_weight_bytes: float
    lm_head_bytes: float
    kv_bytes: float
    dispatch_bytes: float
    combine_bytes: float
    activation_bytes: float = 2.0  # activations the GEMMs read and write
    expert_compute: str = "bf16"
    dense_compute: str = "bf16"
    attention_compute: str = "bf16"

    def __post_init__(self) -> None:
        for field in ("expert_compute", "dense_compute", "attention_compute"):
            if getattr(self, field) not in COMPUTE_DTYPES:
                raise ValueError(
                    f"precision {self.name!r}: {field} must be one of {COMPUTE_DTYPES}"
                )


PRECISIONS: dict[str, Precision] = {
    "bf16": Precision("bf16", 2, 2, 2, 2, 2, 2),
    "fp8": Precision(
        "fp8",
        1,
        1,
        2,
        2,
        1,
        2,
        expert_compute="fp8",
        dense_compute="fp8",
        attention_compute="bf16",
    ),
    "fp4": Precision(
        "fp4",
        NVFP4_BYTES,
        1,
        2,
        1,
        NVFP4_BYTES,
        2,
        expert_compute="fp4",
        dense_compute="fp8",
        attention_compute="fp8",
    ),
}


def load_precision(name: str) -> Precision:
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; expected one of {tuple(PRECISIONS)}")
    return PRECISIONS[name]
