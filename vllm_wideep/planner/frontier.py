"""Sweep batch per GPU for each EP size and keep the Pareto frontier of
(tokens/s per user, tokens/s per GPU).

Raising the batch per GPU ``B`` raises tokens/s per GPU and lowers tokens/s per user (the
step gets longer), so every EP size traces a curve; a point is on the frontier when no other
point of the same EP size is at least as fast per user and faster per GPU. Points whose KV
cache does not fit next to the weights (``B > max_batch_per_gpu``) are left out.

``at_user_rate`` reads one curve at a given tokens/s per user by solving for the (real)
batch per GPU: step time grows with ``B``, so bisection finds it. That is how the validation
compares EP sizes "at 100 tokens/s per user".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from vllm_wideep.planner.hardware import HardwareProfile
from vllm_wideep.planner.model_shape import ModelShape
from vllm_wideep.planner.perf_model import Deployment, StepEstimate, decode_step
from vllm_wideep.planner.precision import Precision

DEFAULT_BATCHES: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 192, 256, 384, 512)


@dataclass(frozen=True)
class EPCurve:
    """The decode sweep of one EP size."""

    ep_size: int
    estimates: tuple[StepEstimate, ...]  # every swept batch, in batch order
    frontier: tuple[StepEstimate, ...]  # Pareto points that fit in memory, fastest user first

    @property
    def fits(self) -> bool:
        """False when not even the smallest swept batch fits in memory."""
        return bool(self.frontier)


def pareto_frontier(estimates: Iterable[StepEstimate]) -> list[StepEstimate]:
    """Points not dominated in (tokens/s per user, tokens/s per GPU), fastest user first.
    Points that do not fit in memory are dropped."""
    feasible = [e for e in estimates if e.fits_in_memory]
    feasible.sort(key=lambda e: (-e.tokens_per_s_per_user, -e.tokens_per_s_per_gpu))
    frontier: list[StepEstimate] = []
    for e in feasible:
        if not frontier or e.tokens_per_s_per_gpu > frontier[-1].tokens_per_s_per_gpu:
            frontier.append(e)
    return frontier


def sweep(
    model: ModelShape,
    hw: HardwareProfile,
    prec: Precision,
    template: Deployment,
    ep_sizes: Sequence[int],
    batches: Sequence[float] = DEFAULT_BATCHES,
) -> list[EPCurve]:
    """Decode estimates for every (EP size, batch per GPU); ``template`` gives the rest."""
    curves = []
    for ep in ep_sizes:
        estimates = tuple(
            decode_step(model, hw, prec, replace(template, ep_size=ep, batch_per_gpu=b))
            for b in batches
        )
        curves.append(EPCurve(ep, estimates, tuple(pareto_frontier(estimates))))
    return curves


def at_user_rate(
    model: ModelShape,
    hw: HardwareProfile,
    prec: Precision,
    template: Deployment,
    user_rate: float,
    min_batch: float = 1.0,
) -> StepEstimate | None:
    """The decode estimate of ``template``'s EP size at ``user_rate`` tokens/s per user.

    Solves tokens_per_s_per_user(B) = user_rate for B in [min_batch, max batch that fits].
    Returns None when even ``min_batch`` is slower than ``user_rate``; when the memory
    limit stops B first, returns the estimate at that limit (faster per user than asked).
    """
    if user_rate <= 0:
        raise ValueError(f"user_rate = {user_rate} must be > 0 tokens/s")

    def at(batch: float) -> StepEstimate:
        return decode_step(model, hw, prec, replace(template, batch_per_gpu=batch))

    low = at(min_batch)
    if low.tokens_per_s_per_user < user_rate or not low.fits_in_memory:
        return None
    high_batch = low.max_batch_per_gpu
    if at(high_batch).tokens_per_s_per_user >= user_rate:
        return at(high_batch)
    lo, hi = min_batch, high_batch
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if at(mid).tokens_per_s_per_user >= user_rate:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-6 * hi:
            break
    return at(lo)


def default_ep_sizes(gpus: int) -> list[int]:
    """EP sizes that divide ``gpus``: the powers of two below it, and ``gpus`` itself."""
    if gpus < 1:
        raise ValueError(f"gpus = {gpus} must be >= 1")
    sizes = {gpus}
    ep = 1
    while ep < gpus:
        if gpus % ep == 0:
            sizes.add(ep)
        ep *= 2
    return sorted(sizes)
