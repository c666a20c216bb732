"""Synthetic expert-load traces for tests and benchmarks. Pure: seeded numpy only.

A trace counts (token, expert) choices: `tokens` is the number of routed choices per layer
(tokens x top-k). Expert popularity follows Zipf's law, `p(rank k) ~ k ** -alpha`, with a
different random expert holding each popularity rank in each layer (hot experts differ by
layer, as in DeepSeek-R1's recorded loads).

Worked example: E = 256, alpha = 1.0: the hottest expert draws 1 / H(256) = 16 % of the
choices, 41x the mean of 1 / 256 = 0.4 %.
"""

from __future__ import annotations

import numpy as np
import torch


def _zipf_probs(num_experts: int, alpha: float) -> np.ndarray:
    p = np.arange(1, num_experts + 1, dtype=np.float64) ** -float(alpha)
    return p / p.sum()


def zipf_load(
    num_layers: int, num_experts: int, tokens: int, alpha: float, seed: int
) -> torch.Tensor:
    """`[L, E]` float32 routed choices per expert, Zipf(alpha) popularity, multinomial draw."""
    rng = np.random.default_rng(seed)
    p = _zipf_probs(num_experts, alpha)
    rows = [rng.multinomial(tokens, p[rng.permutation(num_experts)]) for _ in range(num_layers)]
    return torch.tensor(np.stack(rows), dtype=torch.float32)


def drifting_load(
    num_steps: int,
    num_layers: int,
    num_experts: int,
    tokens: int,
    alpha: float,
    drift: float,
    seed: int,
) -> torch.Tensor:
    """`[T, L, E]` float32: T consecutive load windows whose hot experts move.

    Each step, per layer, `max(1, round(drift * E))` random pairs of experts trade
    popularity ranks (a hot expert can turn cold and the other way round), then the
    window is drawn as in `zipf_load`. drift = 0.02 with E = 256 swaps 5 pairs a step.
    """
    rng = np.random.default_rng(seed)
    p = _zipf_probs(num_experts, alpha)
    rank_of = np.stack([rng.permutation(num_experts) for _ in range(num_layers)])  # [L, E]
    swaps = max(1, round(drift * num_experts))
    steps = []
    for _ in range(num_steps):
        for layer in range(num_layers):
            pairs = rng.integers(0, num_experts, size=(swaps, 2))
            for a, b in pairs:
                rank_of[layer, [a, b]] = rank_of[layer, [b, a]]
        steps.append(np.stack([rng.multinomial(tokens, p[r]) for r in rank_of]))
    return torch.tensor(np.stack(steps), dtype=torch.float32)
