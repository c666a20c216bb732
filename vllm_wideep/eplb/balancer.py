"""The per-worker load balancer: count load each step, re-plan every `eplb_interval`
steps without stalling them, move a few layers' weights per step between forward passes.

Lifecycle, once per engine step on every EP rank (vLLM calls `eplb_step` after each
step, and idle data-parallel ranks run a dummy step at the same time, so all ranks count
the same steps):

    step k:          fold each layer's step counts into the load window (device only)
                     finish the layers begun at step k-1: verify, commit the weights in
                     place, then switch the layer's routing tables
    k % interval:    all-reduce the window over the EP group; EP rank 0 starts planning
                     in a thread (`plan_placement`, keeping experts where they are when
                     that is free) and the steps go on
    while planning:  every rank votes whether rank 0's plan is ready (an all-reduce MIN);
                     once it is, rank 0 broadcasts it and the layers whose placement
                     changed become pending
    while pending:   from the next step on, begin moving `eplb_layers_per_step` layers
                     together (one all-reduce with the vote and the checksums, one batch
                     of transfers for all of them): the transfers run during the forward
                     pass of the next step, which still reads the old weights

So a plan costs a step no more than a vote (the policy runs beside the forward passes),
a layer's weights travel while the next forward pass computes (`eplb_overlap`, on by
default; off, a layer is finished in the step that begins it), and every forward pass sees
each layer's old placement whole or its new one whole. The balancer's collectives run on
a process group of their own: with NCCL its own communicator and stream, so the transfers
do not queue behind the forward pass's token exchange. Every rank issues them in the same
order at the same step boundaries. Staging rows for the moves are reserved once, when the
layers register (`layer/state.py`, `mover.StagingPool`).

Dummy steps move weights like real steps but add no load (their tokens are padding).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vllm_wideep.config import WideEPConfig
from vllm_wideep.eplb.location import ExpertSlots
from vllm_wideep.eplb.mover import (
    MovesInFlight,
    MovesRefused,
    StagingPool,
    agree,
    begin_moves_batch,
    finish_moves_batch,
    plan_moves,
)
from vllm_wideep.eplb.placement import Placement
from vllm_wideep.eplb.policy import plan_placement
from vllm_wideep.eplb.stats import LoadWindow

logger = logging.getLogger("vllm_wideep")


@dataclass
class LayerCounters:
    """Cumulative balancer work on one layer, this rank."""

    rebalances: int = 0
    failures: int = 0
    moved_bytes: int = 0  # bytes this rank received from other ranks
    seconds: float = 0.0  # wall time this rank's steps spent beginning and finishing moves


@dataclass
class StepTimes:
    """Wall time of the balancer's per-step hook on this rank, in two kinds of steps:
    plain (counting load only) and busy (starting a plan, voting on it, beginning or
    finishing moves). busy_max - plain mean is the longest pause a rebalance added."""

    plain_steps: int = 0
    plain_seconds: float = 0.0
    plain_max_seconds: float = 0.0
    busy_steps: int = 0
    busy_seconds: float = 0.0
    busy_max_seconds: float = 0.0

    def add(self, busy: bool, seconds: float) -> None:
        if busy:
            self.busy_steps += 1
            self.busy_seconds += seconds
            self.busy_max_seconds = max(self.busy_max_seconds, seconds)
        else:
            self.plain_steps += 1
            self.plain_seconds += seconds
            self.plain_max_seconds = max(self.plain_max_seconds, seconds)


@dataclass
class Planning:
    """A plan being made in the background: on EP rank 0 a thread runs the policy; every
    rank holds one of these, so all know a plan is on its way.

    started: the step that started it. current: `[L, N]` the placement it plans from.
    result: `[L, N]` int64 once the thread is done, None if it failed (rank 0 only).
    """

    started: int
    current: torch.Tensor
    thread: threading.Thread | None = None
    result: torch.Tensor | None = None

    def done(self) -> bool:
        return self.thread is None or not self.thread.is_alive()


def moves_overlap(config: WideEPConfig) -> bool:
    """Whether a layer's moves run across a step boundary (`eplb_overlap`; auto: on, on
    every device: a step then holds half a move, so the longest pause a rebalance adds
    halves, docs/load-balancing.md)."""
    return config.eplb_overlap in ("on", "auto")


def staging_sets(config: WideEPConfig, num_layers: int | None = None) -> int:
    """Layers whose moves can hold staging rows at once: `eplb_layers_per_step` (at most
    `num_layers`, the MoE layers there can be), twice that when moves overlap a step (the
    layers being committed while the next begin)."""
    layers = min(config.eplb_layers_per_step, num_layers or config.eplb_layers_per_step)
    return layers * (2 if moves_overlap(config) else 1)


@dataclass
class Balancer:
    layers: list[ExpertSlots]
    config: WideEPConfig
    group: dist.ProcessGroup | None
    steps: int = 0
    pending: list[int] = field(default_factory=list)  # layer indices still to move
    target: torch.Tensor | None = None  # [L, N] int64, the plan being applied
    in_flight: list[tuple[int, MovesInFlight]] = field(default_factory=list)  # begun layers
    counters: list[LayerCounters] = field(default_factory=list)
    planning: Planning | None = None  # a plan on its way (every rank)
    staging: StagingPool | None = None  # reserved staging rows; None: allocate per move
    step_times: StepTimes = field(default_factory=StepTimes)
    own_group: dist.ProcessGroup | None = None  # made at the first online step
    # The longest any of the balancer's collectives may wait for a peer (None: torch's
    # default); a peer that dies or stalls then fails the step instead of hanging it.
    timeout: timedelta | None = None

    def __post_init__(self) -> None:
        first = self.layers[0]
        self.num_ranks, self.rank = first.num_ranks, first.rank
        self.slots_per_rank = first.slots_per_rank
        self.num_experts = max(layer.num_experts for layer in self.layers)
        if self.config.eplb == "online" and any(
            (layer.slots_per_rank, layer.num_experts) != (self.slots_per_rank, self.num_experts)
            for layer in self.layers
        ):
            raise NotImplementedError(
                "vllm_wideep: online rebalancing needs every MoE layer to have the same "
                "number of experts and slots"
            )
        self.window = LoadWindow(
            len(self.layers),
            self.num_experts,
            self.config.eplb_stats,
            self.config.eplb_window,
            first.step_counts.device,
        )
        self.counters = [LayerCounters() for _ in self.layers]
        self.overlap = moves_overlap(self.config)

    @property
    def layer_names(self) -> list[str]:
        return [layer.layer_name for layer in self.layers]

    def placement(self) -> Placement:
        return Placement(
            torch.stack([layer.physical_to_logical for layer in self.layers]), self.num_ranks
        )

    def step(self, is_dummy: bool = False, is_profile: bool = False) -> None:
        counts = [layer.step_counts for layer in self.layers]
        if not (is_dummy or is_profile):
            self.window.add_step(self._stack(counts))
        torch._foreach_zero_(counts)
        if is_profile:
            return
        self.steps += 1
        if self.config.eplb != "online":
            return
        if self.own_group is None:
            self.own_group = _own_group(self.group, self.timeout)
        start = time.perf_counter()
        busy = bool(self.in_flight or self.planning or self.pending)
        self._finish()
        if self.planning is not None:
            self._collect_plan()
        elif not self.pending and self.steps % self.config.eplb_interval == 0:
            self._start_plan()
            busy = True
        elif self.pending:  # not in the step that took the plan: one step's pause each
            todo = self.pending[: self.config.eplb_layers_per_step]
            self.pending = self.pending[len(todo) :]
            self._begin(todo)
            if not self.overlap:
                self._finish()
        self.step_times.add(busy, time.perf_counter() - start)

    @property
    def moving(self) -> bool:
        """Whether a plan is still being applied (layers pending or in flight)."""
        return bool(self.pending or self.in_flight)

    def load(self) -> torch.Tensor:
        """`[L, E]` float64 on CPU, this rank's windowed load."""
        return self.window.total().cpu()

    def _stack(self, counts: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([F.pad(c, (0, self.num_experts - c.numel())) for c in counts])

    def _start_plan(self) -> None:
        """All-reduce the load window (a collective), then plan on EP rank 0 in a thread,
        so the steps go on while it plans (`_collect_plan` takes the plan)."""
        try:
            load = self.window.total()
            if self.num_ranks > 1:
                dist.all_reduce(load, group=self.own_group)
        except RuntimeError as error:
            raise self._group_failed("planning a new expert placement", error) from error
        planning = Planning(self.steps, self.placement().physical_to_logical)
        if self.rank == 0:
            # The policy of this step, its inputs on the host: the thread shares nothing.
            policy, snapshot = plan_placement, load.cpu()
            shape = (snapshot, self.num_ranks, self.slots_per_rank, planning.current)

            def plan() -> None:
                try:
                    planning.result = policy(*shape)
                except Exception as error:  # any failure: every rank skips this plan
                    logger.error(
                        "vllm_wideep: step %d: planning failed (%s)",
                        planning.started,
                        error,
                        exc_info=not isinstance(error, (RuntimeError, ValueError)),
                    )

            planning.thread = threading.Thread(target=plan, name="wideep-eplb-plan", daemon=True)
            planning.thread.start()
        self.planning = planning

    def _collect_plan(self) -> None:
        """Once EP rank 0's thread is done (every rank votes: an all-reduce MIN), broadcast
        its plan; the layers whose placement changes become pending. Every rank sees the
        same vote at the same step, so all take the plan together."""
        planning = self.planning
        try:
            device = self.layers[0].step_counts.device
            if not agree(planning.done(), self.num_ranks, self.own_group, device):
                return  # rank 0 is still planning: vote again at the next step
            target = torch.full_like(planning.current, -1)  # all -1: rank 0 failed to plan
            if planning.result is not None:
                target = planning.result
            if self.num_ranks > 1:
                target = target.to(device)
                dist.broadcast(
                    target, src=dist.get_global_rank(self.own_group, 0), group=self.own_group
                )
        except RuntimeError as error:
            raise self._group_failed("planning a new expert placement", error) from error
        self.planning = None
        if bool((target < 0).all()):
            logger.error(
                "vllm_wideep: step %d: no new expert placement (planning failed on EP rank "
                "0); every rank keeps the current one",
                self.steps,
            )
            return
        self.target = target.cpu()
        self.pending = [
            i
            for i in range(len(self.layers))
            if not torch.equal(self.target[i], planning.current[i])
        ]
        logger.info(
            "vllm_wideep: step %d: new expert placement (planned from step %d) for %d of %d "
            "MoE layers",
            self.steps,
            planning.started,
            len(self.pending),
            len(self.layers),
        )

    def _begin(self, indices: list[int]) -> None:
        """Begin these layers' moves together (`begin_moves_batch`: one all-reduce with the
        vote and the checksums, one batch of transfers for all)."""
        start = time.perf_counter()
        # The pool's sets go round; this step's layers (`in_flight`) may take at most
        # their share, so no set is reused while its layer, or last step's, still needs it.
        pool = self.staging
        per_step = 0 if pool is None else pool.sets // (2 if self.overlap else 1)
        batch = []
        for index in indices:
            layer = self.layers[index]
            plan = plan_moves(layer.physical_to_logical, self.target[index], self.slots_per_rank)
            staging = None
            if len(self.in_flight) + len(batch) < per_step and pool.fits(layer.weights):
                staging = pool.take()
            batch.append((plan, layer.weights, staging))
        try:
            begun = begin_moves_batch(batch, self.rank, self.num_ranks, self.own_group)
        except RuntimeError as error:  # the group itself failed (a dead or stalled peer)
            raise self._group_failed(f"moving {self._names(indices)}'s experts", error) from error
        seconds = (time.perf_counter() - start) / len(indices)
        for index, moves in zip(indices, begun, strict=True):
            self.counters[index].seconds += seconds
            if isinstance(moves, MovesRefused):  # every rank refused it: keep its placement
                self._failed(index, moves)
            else:
                self.in_flight.append((index, moves))

    def _finish(self) -> None:
        """Finish every begun layer (`finish_moves_batch`: one vote for all)."""
        if not self.in_flight:
            return
        start = time.perf_counter()
        indices = [index for index, _ in self.in_flight]
        try:
            verdicts = finish_moves_batch([moves for _, moves in self.in_flight])
        except RuntimeError as error:
            raise self._group_failed(f"moving {self._names(indices)}'s experts", error) from error
        seconds = (time.perf_counter() - start) / len(indices)
        for (index, moves), ok in zip(self.in_flight, verdicts, strict=True):
            layer, counter = self.layers[index], self.counters[index]
            counter.seconds += seconds
            if ok:
                layer.set_placement(self.target[index])
                counter.rebalances += 1
                slot_bytes = sum(w[0].numel() * w.element_size() for w in layer.weights)
                counter.moved_bytes += len(moves.plan.received(self.rank)) * slot_bytes
            else:
                self._failed(index, "a moved slot failed verification")
        self.in_flight = []

    def _names(self, indices: list[int]) -> str:
        return ", ".join(self.layers[i].layer_name for i in indices)

    def _group_failed(self, what: str, error: Exception) -> RuntimeError:
        """The error that stops the engine when a collective itself failed (a dead or
        stalled peer, the group's timeout): the ranks cannot agree on anything any more."""
        return RuntimeError(
            f"vllm_wideep: EP rank {self.rank}: {what} failed ({error}); the EP group cannot go on"
        )

    def _failed(self, index: int, reason) -> None:
        self.counters[index].failures += 1
        logger.error(
            "vllm_wideep: %s keeps its old expert placement (%s); serving goes on",
            self.layers[index].layer_name,
            reason,
        )


def _own_group(
    group: dist.ProcessGroup | None, timeout: timedelta | None
) -> dist.ProcessGroup | None:
    """A process group over `group`'s ranks for the balancer alone (same backend), whose
    collectives wait at most `timeout`.

    `new_group` is collective over the whole world; the world is the EP group whenever
    wide EP runs (no pipeline parallelism), otherwise the balancer shares `group`."""
    if group is None or dist.get_world_size(group) == 1:
        return group
    ranks = dist.get_process_group_ranks(group)
    if len(ranks) != dist.get_world_size():
        return group
    return dist.new_group(ranks, backend=dist.get_backend(group), timeout=timeout)
