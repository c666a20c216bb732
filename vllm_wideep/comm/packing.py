"""One dispatch row as bytes: a token's hidden state and its (slot, weight) list.

Every backend sends a row as one uint8 vector, so one collective moves all of a row's
parts whatever their dtypes:

    [ hidden: H x itemsize | fp8 scale: 4 (fp8 only) | slot ids: k x int32 | weights: k x f32 ]

Worked example, DeepSeek-V3 (H = 7168, k = 8): bf16 rows are 14336 + 32 + 32 = 14400 bytes;
fp8 rows 7168 + 4 + 32 + 32 = 7236 bytes (0.50x).

fp8 dispatch (`dispatch_dtype="fp8"`): each row is scaled by its own amax / 448 (the largest
float8 e4m3 value) and rounded to `torch.float8_e4m3fn`; the receiver multiplies back and
returns the activation dtype. Combine always sends the activation dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_wideep.config import DispatchDtype

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """`[P, n]` any dtype -> `[P, n * itemsize]` uint8 view."""
    return t.contiguous().view(torch.uint8).reshape(t.shape[0], t.shape[1] * t.element_size())


def from_bytes(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`[P, n * itemsize]` uint8 -> `[P, n]` dtype."""
    return b.contiguous().view(dtype)


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[P, H]` -> (`[P, H]` float8 e4m3, `[P, 1]` float32 scale); x ~ q * scale."""
    amax = x.abs().amax(dim=1, keepdim=True).float()
    scale = torch.clamp(amax / FP8_MAX, min=1e-12)
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


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
        return 4 if self.fp8 else 0

    @property
    def nbytes(self) -> int:
        """Bytes per row."""
        return self.hidden_bytes + self.scale_bytes + 8 * self.top_k

    def pack(self, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """hidden `[P, H]`, ids `[P, k]` int32, weights `[P, k]` float32 -> `[P, nbytes]` uint8."""
        if self.fp8:
            q, scale = quantize_fp8(hidden)
            parts = [as_bytes(q), as_bytes(scale)]
        else:
            parts = [as_bytes(hidden.to(self.dtype))]
        parts += [as_bytes(ids.to(torch.int32)), as_bytes(weights.float())]
        return torch.cat(parts, dim=1)

    def unpack(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`[P, nbytes]` uint8 -> hidden `[P, H]` dtype, ids `[P, k]` int32, weights float32."""
        h, s = self.hidden_bytes, self.hidden_bytes + self.scale_bytes
        ids_end = s + 4 * self.top_k
        if self.fp8:
            hidden = dequantize_fp8(
                from_bytes(rows[:, :h], FP8), from_bytes(rows[:, h:s], torch.float32), self.dtype
            )
        else:
            hidden = from_bytes(rows[:, :h], self.dtype)
        return (
            hidden,
            from_bytes(rows[:, s:ids_end], torch.int32),
            from_bytes(rows[:, ids_end:], torch.float32),
        )
