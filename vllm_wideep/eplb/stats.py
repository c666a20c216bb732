"""Expert load statistics: per-step counts in, a windowed or decayed `[L, E]` load out.

Each MoE layer counts, on the device, the (token, choice) pairs its router sends to each
logical expert (`record`); once per engine step `LoadWindow.add_step` folds those counts
into the window, all on the device, so no step waits for the host. The totals are summed
over EP ranks only when a plan is made.
"""

from __future__ import annotations

import torch

from vllm_wideep.config import EplbStats


def record(counts: torch.Tensor, ids: torch.Tensor) -> None:
    """Count a batch's choices per id (in place, on the device): a layer's step counts
    per logical expert, or the rows its experts computed per local slot.

    counts: `[E]` (or `[S]`) int64. ids: `[M, k]` ids, `-1` = none (not counted).
    """
    ids = ids.flatten().long()
    counts.scatter_add_(0, ids.clamp(min=0), (ids >= 0).long())


class LoadWindow:
    """The load of the last `window` steps ('window'), or every step weighed by
    `0.5 ** (age / window)` ('decay'), for L layers and E logical experts."""

    def __init__(self, num_layers: int, num_experts: int, mode: EplbStats, window: int, device):
        self.mode = mode
        if mode == "window":
            # [W, L, E] int64 ring of step loads; `_cursor` is the next row to overwrite.
            self._ring = torch.zeros(
                window, num_layers, num_experts, dtype=torch.int64, device=device
            )
            self._cursor = 0
        else:
            # [L, E] float64 decayed sum.
            self._decayed = torch.zeros(num_layers, num_experts, dtype=torch.float64, device=device)
            self._factor = 0.5 ** (1.0 / window)

    def add_step(self, step_load: torch.Tensor) -> None:
        """step_load: `[L, E]` int64, the counts of one engine step."""
        if self.mode == "window":
            self._ring[self._cursor].copy_(step_load)
            self._cursor = (self._cursor + 1) % self._ring.shape[0]
        else:
            self._decayed.mul_(self._factor).add_(step_load)

    def total(self) -> torch.Tensor:
        """`[L, E]` float64 load on the device (this rank's tokens only)."""
        if self.mode == "window":
            return self._ring.sum(dim=0, dtype=torch.float64)
        return self._decayed.clone()
