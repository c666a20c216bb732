"""FP8 expert weights with block scales, as DeepSeek-V3 ships them, and their torch math.

A weight `w [..., n, m]` is stored as `q [..., n, m]` float8 e4m3 and one float32 scale per
`block = (bn, bk)` tile (128 x 128 in DeepSeek's checkpoints, `*.weight_scale_inv`):

    w[..., i, j] ~ q[..., i, j] * scale[..., i // bn, j // bk]
    scale: `[..., ceil(n / bn), ceil(m / bk)]` float32

Worked example (DeepSeek-V3, H = 7168, I = 2048, one slot): w13 `[4096, 7168]` float8 with
scale `[32, 56]`; w2 `[7168, 2048]` with scale `[56, 16]`: 4 bytes of scale per 16384
weight bytes.

These functions are the reference and the CPU path: the torch experts dequantize once into
the layer's `WeightCache` (weight-only FP8, "W8A16"), and the tests build FP8 weights with
`quantize_block_fp8` (casting to float8 inside a kernel is wrong in Triton's interpreter).
The Triton experts read the FP8 weights and scales directly and quantize activations with
`quantize_activations_fp8` before each GEMM in W8A8.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
BLOCK = (128, 128)
ACTIVATIONS = ("fp8", "native")


@dataclass(frozen=True)
class Fp8Experts:
    """The scales that go with FP8 expert weights `w13 [S, 2I, H]`, `w2 [S, H, I]`.

    w13_scale: `[S, ceil(2I / bn), ceil(H / bk)]` float32.
    w2_scale: `[S, ceil(H / bn), ceil(I / bk)]` float32.
    block: `(bn, bk)`, rows and columns of weight per scale.
    activations: "fp8" (W8A8: activations quantized per token and bk columns, fp32
        accumulation, scales applied per K block, DeepSeek's and DeepGEMM's numerics) or
        "native" (W8A16: weights dequantized, activations in their own dtype).

    `check(w13, w2)` validates the weights against the scales and block.
    """

    w13_scale: torch.Tensor
    w2_scale: torch.Tensor
    block: tuple[int, int] = BLOCK
    activations: Literal["fp8", "native"] = "native"

    def __post_init__(self) -> None:
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"activations={self.activations!r}, expected one of {ACTIVATIONS}")
        if len(self.block) != 2 or not all(isinstance(b, int) and b > 0 for b in self.block):
            raise ValueError(f"block={self.block!r}, expected two positive ints (bn, bk)")

    def check(self, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """Raise ValueError unless `w13 [S, 2I, H]`, `w2 [S, H, I]` are float8 e4m3 and the
        scales are float32 of the shapes above."""
        if not w13.dtype == w2.dtype == FP8:
            raise ValueError(f"FP8 experts take {FP8} weights; got w13 {w13.dtype}, w2 {w2.dtype}")
        for name, w, scale in (("w13", w13, self.w13_scale), ("w2", w2, self.w2_scale)):
            expected = scale_shape(w.shape, self.block)
            if tuple(scale.shape) != expected or scale.dtype != torch.float32:
                raise ValueError(
                    f"{name} {tuple(w.shape)} with block {self.block} needs {name}_scale "
                    f"{expected} float32; got {tuple(scale.shape)} {scale.dtype}"
                )


def scale_shape(shape: torch.Size, block: tuple[int, int]) -> tuple[int, ...]:
    """`[..., n, m]` -> `(..., ceil(n / bn), ceil(m / bk))`: DeepSeek-V3's w13 `[4096, 7168]`
    with block (128, 128) -> `(32, 56)`."""
    *lead, n, m = shape
    return (*lead, -(-n // block[0]), -(-m // block[1]))


def _expand(scale: torch.Tensor, shape: torch.Size, block: tuple[int, int]) -> torch.Tensor:
    """Block scales `[..., n / bn, m / bk]` -> one scale per element `[..., n, m]`."""
    bn, bk = block
    n, m = shape[-2], shape[-1]
    return scale.repeat_interleave(bn, dim=-2)[..., :n, :].repeat_interleave(bk, dim=-1)[..., :m]


def dequantize_block_fp8(
    q: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int] = BLOCK,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """`q [..., n, m]` float8 with `scale [..., ceil(n / bn), ceil(m / bk)]` -> `dtype`.

    The product is taken in float64 for float64 (exact: 4 significant bits times 24) and in
    float32 otherwise, then cast to `dtype`."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    return (q.to(compute) * _expand(scale.to(compute), q.shape, block)).to(dtype)


def quantize_block_fp8(
    w: torch.Tensor, block: tuple[int, int] = BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """`w [..., n, m]` -> (`q` float8 e4m3 `[..., n, m]`, `scale` float32 `[..., ceil(n / bn),
    ceil(m / bk)]`), each tile scaled by its amax / 448 (DeepSeek's recipe)."""
    bn, bk = block
    n, m = w.shape[-2], w.shape[-1]
    rows, cols = -(-n // bn), -(-m // bk)
    padded = torch.zeros(*w.shape[:-2], rows * bn, cols * bk, dtype=torch.float32, device=w.device)
    padded[..., :n, :m] = w.float()
    tiles = padded.unflatten(-1, (cols, bk)).unflatten(-3, (rows, bn))  # [..., r, bn, c, bk]
    amax = tiles.abs().amax(dim=(-3, -1))  # [..., r, c]
    scale = torch.clamp(amax / FP8_MAX, min=1e-12)
    q = (w.float() / _expand(scale, w.shape, block)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def quantize_activations_fp8(
    x: torch.Tensor, group: int = BLOCK[1]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`x [M, H]` -> (`q [M, H]` float8 e4m3, `scale [M, ceil(H / group)]` float32): one
    scale per token and `group` columns (DeepEP's and DeepGEMM's 1 x 128 format).

    The same numbers as ``quantize_block_fp8(x[None], (1, group))``, in fewer passes (the
    Triton experts call it on every W8A8 GEMM's input)."""
    M, H = x.shape
    cols = -(-H // group)
    padded = x.float()
    if H % group:
        padded = torch.nn.functional.pad(padded, (0, cols * group - H))
    tiles = padded.reshape(M, cols, group)
    scale = torch.clamp(tiles.abs().amax(dim=-1) / FP8_MAX, min=1e-12)
    q = (tiles / scale[..., None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8).view(M, cols * group)
    return q[:, :H].contiguous(), scale
