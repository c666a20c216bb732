"""One dispatch row as bytes: a token's hidden state and its (slot, weight) list.

Every backend sends a row as one uint8 vector, so one collective moves all of a row's
parts whatever their dtypes:

    [ hidden: H x itemsize | fp8 scales: ceil(H / 128) x 4 (fp8 only) | slot ids: k x int32
      | weights: k x f32 ]

fp8 dispatch (`dispatch_dtype="fp8"`) sends the activations in the format FP8 experts
consume (DeepEP's and DeepGEMM's): float8 e4m3 with one float32 scale per token and 128
columns (`kernels.fp8.quantize_activations_fp8`). The receiver either hands the float8 rows
and their scales to FP8 experts (`keep_fp8`: W8A8, no second quantization) or multiplies
back to the activation dtype. Combine always sends the activation dtype.

Worked example, DeepSeek-V3 (H = 7168, k = 8): bf16 rows are 14336 + 32 + 32 = 14400 bytes;
fp8 rows 7168 + 56 x 4 + 32 + 32 = 7456 bytes (0.52x).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_wideep.config import DispatchDtype
from vllm_wideep.kernels.fp8 import (
    BLOCK,
    FP8,
    dequantize_block_fp8,
    quantize_activations_fp8,
)

GROUP = BLOCK[1]  # columns per activation scale


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """`[P, n]` any dtype -> `[P, n * itemsize]` uint8 view."""
    return t.contiguous().view(torch.uint8).reshape(t.shape[0], t.shape[1] * t.element_size())


def from_bytes(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`[P, n * itemsize]` uint8 -> `[P, n]` dtype."""
    return b.contiguous().view(dtype)


@dataclass(frozen=True)
class RowFormat:
    """Layout of one dispatch row; `dtype` is the activation dtype of the layer."""

    hidden_dim: int
    top_k: int
    dtype: torch.dtype
    fp8: bool = False

    @classmethod
    def of(
        cls, hidden_states: torch.Tensor, topk_ids: torch.Tensor, dispatch_dtype: DispatchDtype
    ) -> RowFormat:
        return cls(
            hidden_states.shape[1], topk_ids.shape[1], hidden_states.dtype, dispatch_dtype == "fp8"
        )

    @property
    def hidden_bytes(self) -> int:
        return self.hidden_dim * (1 if self.fp8 else self.dtype.itemsize)

    @property
    def scale_bytes(self) -> int:
        return 4 * -(-self.hidden_dim // GROUP) if self.fp8 else 0

    @property
    def nbytes(self) -> int:
        """Bytes per row."""
        return self.hidden_bytes + self.scale_bytes + 8 * self.top_k

    def pack(self, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """hidden `[P, H]`, ids `[P, k]` int32, weights `[P, k]` float32 -> `[P, nbytes]` uint8."""
        if self.fp8:
            q, scale = quantize_activations_fp8(hidden)
            parts = [as_bytes(q), as_bytes(scale)]
        else:
            parts = [as_bytes(hidden.to(self.dtype))]
        parts += [as_bytes(ids.to(torch.int32)), as_bytes(weights.float())]
        return torch.cat(parts, dim=1)

    def unpack(
        self, rows: torch.Tensor, keep_fp8: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """`[P, nbytes]` uint8 -> (hidden `[P, H]`, scales, ids `[P, k]` int32, weights
        `[P, k]` float32). hidden is in the activation dtype and scales None, except for
        fp8 rows with `keep_fp8`: then hidden is float8 and scales `[P, ceil(H / 128)]`
        float32."""
        h, s = self.hidden_bytes, self.hidden_bytes + self.scale_bytes
        ids_end = s + 4 * self.top_k
        scales = None
        if self.fp8:
            hidden = from_bytes(rows[:, :h], FP8)
            scales = from_bytes(rows[:, h:s], torch.float32)
            if not keep_fp8:
                hidden = dequantize_block_fp8(hidden, scales, (1, GROUP)).to(self.dtype)
                scales = None
        else:
            hidden = from_bytes(rows[:, :h], self.dtype)
        return (
            hidden,
            scales,
            from_bytes(rows[:, s:ids_end], torch.int32),
            from_bytes(rows[:, ids_end:], torch.float32),
        )
