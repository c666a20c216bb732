"""The dispatch/combine interface every token-exchange backend implements.

dispatch: rows of this rank's tokens -> rows this rank's experts must compute
combine:  those rows' expert outputs -> one summed output row per source token
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class DispatchResult:
    """What a rank's experts receive.

    hidden_states: `[R, H]` activation dtype, one row per (source token, this rank).
    topk_ids: `[R, k]` int32 local expert slots, `-1` = the choice is on another rank.
    topk_weights: `[R, k]` float32 router weights, `0` where `topk_ids` is `-1`.
    handle: backend state that `combine` needs to send results back.
    """

    hidden_states: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    handle: Any


class Dispatcher(ABC):
    """Moves tokens to the ranks that own their experts and the results back.

    Every rank of the EP group must call `dispatch` and then `combine` the same number
    of times, also with zero tokens: both are collectives.
    """

    @abstractmethod
    def dispatch(
        self,
        hidden_states: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
    ) -> DispatchResult:
        """hidden_states `[M, H]`, topk_ids `[M, k]` global slot ids (`-1` = none),
        topk_weights `[M, k]`."""

    @abstractmethod
    def combine(self, expert_output: torch.Tensor, handle: Any) -> torch.Tensor:
        """expert_output `[R, H]` (each row already weighted and summed over this
        rank's experts) -> `[M, H]` float32, summed over ranks per source token."""
