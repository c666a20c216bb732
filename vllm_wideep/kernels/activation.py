"""The experts' activation: what joins the gate_up GEMM to the down GEMM.

One spec, `Activation`, for both backends (the Triton kernel computes it in its epilogue)
and the float64 reference. The layer maps vLLM's `MoEActivation` and the layer's SwiGLU
parameters to it (`layer/method.py: expert_activation`); this module imports no vLLM.

For one (token, expert e) row, ``gate_up = w13[e] @ x + w13_bias[e]``, `[2I]` gated or
`[I]` not gated, splits into a gate g `[I]` and (gated only) an up u `[I]`::

    gated, packed (vLLM's layout):       g = gate_up[:I],    u = gate_up[I:]
    gated, interleaved (gpt-oss):        g = gate_up[0::2],  u = gate_up[1::2]
    not gated:                           g = gate_up

    limit L (None: no clamp):            g <- min(g, L) (except swiglustep),
                                         u <- clamp(u, -L, L)
    fn(g)   silu:       g * sigmoid(alpha * g)
            swiglustep: min(g * sigmoid(g), L)      (the limit clamps silu's output)
            gelu:       g * Phi(g), Phi the normal CDF (erf form)
            gelu_tanh:  g * (1 + tanh(sqrt(2 / pi) * (g + 0.044715 g^3))) / 2
            relu2:      max(g, 0)^2
    act = fn(g) * (u + beta)   gated
    act = fn(g)                not gated

vLLM's activations in these terms: ``silu`` = Activation("silu") (with ``swiglu_limit``:
limit=L); gpt-oss's ``swigluoai`` = Activation("silu", interleaved=True, alpha=1.702,
beta=1.0, limit=7.0); ``gelu_tanh_no_mul`` = Activation("gelu_tanh", gated=False).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F

Function = Literal["silu", "swiglustep", "gelu", "gelu_tanh", "relu2"]
FUNCTIONS: tuple[str, ...] = get_args(Function)


@dataclass(frozen=True)
class Activation:
    """fn, gated, interleaved, alpha, beta, limit: as in the module docstring."""

    fn: Function
    gated: bool = True
    interleaved: bool = False
    alpha: float = 1.0
    beta: float = 0.0
    limit: float | None = None

    def __post_init__(self) -> None:
        if self.fn not in FUNCTIONS:
            raise ValueError(f"activation fn={self.fn!r}, expected one of {FUNCTIONS}")
        if not self.gated and (self.interleaved or self.beta != 0.0 or self.limit is not None):
            raise ValueError(f"{self}: interleaved, beta and limit apply to gated activations only")
        if self.alpha != 1.0 and self.fn != "silu":
            raise ValueError(f"{self}: alpha (the sigmoid's scale) applies to silu only")
        if self.fn == "swiglustep" and (self.limit is None or not self.gated):
            raise ValueError(f"{self}: swiglustep is gated and needs a limit")
        if self.limit is not None and not self.limit > 0:
            raise ValueError(f"{self}: limit must be positive")

    def intermediate_size(self, w13_rows: int) -> int:
        """I from the rows of w13 (`2I` gated, `I` not)."""
        return w13_rows // 2 if self.gated else w13_rows

    def split(self, gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`[rows, 2I]` -> gate, up `[rows, I]` (views); `[rows, I]` -> gate, None."""
        if not self.gated:
            return gate_up, None
        if self.interleaved:
            return gate_up[:, 0::2], gate_up[:, 1::2]
        inter = gate_up.shape[1] // 2
        return gate_up[:, :inter], gate_up[:, inter:]

    def __call__(self, gate_up: torch.Tensor) -> torch.Tensor:
        """`[rows, 2I]` (gated) or `[rows, I]` -> act `[rows, I]`, in gate_up's dtype."""
        g, u = self.split(gate_up)
        if self == SILU:  # the common case: one fused op, one temporary
            return F.silu(g).mul_(u)
        if self.limit is not None and self.fn != "swiglustep":
            g = g.clamp(max=self.limit)
        if self.fn == "silu":
            act = g * torch.sigmoid(self.alpha * g) if self.alpha != 1.0 else F.silu(g)
        elif self.fn == "swiglustep":
            act = F.silu(g).clamp_(max=self.limit)
        elif self.fn == "gelu":
            act = F.gelu(g)
        elif self.fn == "gelu_tanh":
            act = F.gelu(g, approximate="tanh")
        else:
            act = F.relu(g).square_()
        if u is None:
            return act
        if self.limit is not None:
            u = u.clamp(-self.limit, self.limit)
        return act.mul_(u + self.beta if self.beta else u)


SILU = Activation("silu")
# gpt-oss's SwiGLU (HF transformers' GptOssExperts): interleaved gate/up, clamped at 7.
SWIGLU_OAI = Activation("silu", interleaved=True, alpha=1.702, beta=1.0, limit=7.0)
