"""Move expert weights from one placement to another, in place, for one layer.

`plan_moves(old, new, slots_per_rank)` is pure: it lists, for every slot whose expert
changes, the slot it copies from. Two collectives do the copies, so that forward passes
can run between them while the bytes travel (`apply_moves` calls both at once):

    begin_moves    1. stage: every changed slot of this rank is filled into a staging
                      row (a `StagingPool` reserved at model build, reused by every
                      move), by a local copy when this rank already holds the expert,
                      else by a P2P receive; sends read the old weights, which are not
                      written yet, so the order of moves does not matter. The group agrees
                      that every rank prepared its part before any byte travels (else
                      every rank raises `MovesRefused`); returns at once
    finish_moves   2. verify: each staged slot's checksum must equal its source slot's
                      (computed by the source rank and all-reduced); the group agrees with
                      an all-reduce (MIN);
                   3. commit, only if every rank verified: copy the staged slots into the
                      weights in place (same storage: captured CUDA graphs stay valid).

`begin_moves_batch` and `finish_moves_batch` do the same for several layers with the
collectives of one (a vote per layer in one all-reduce): the balancer moves a step's layers
so, since each collective waits for the slowest rank. A step's moves then wait on two
all-reduces (begin: the vote with the checksums; finish: the verdicts) and the transfers.

A failed verification leaves every rank's weights as they were and returns False. Every
failure a rank can vote on is agreed by all ranks, so no rank waits on a peer that gave up;
a transfer that fails (a dead peer, the group's timeout) raises on the ranks that see it,
and the group cannot go on.

Worked example (S = 2; old = [0, 1 | 2, 3], new = [0, 2 | 2, 1]):
    slot 1 (rank 0) gets expert 2 from slot 2 (rank 1): a P2P transfer
    slot 3 (rank 1) gets expert 1 from slot 1 (rank 0): a P2P transfer, reading slot 1
        before rank 0 overwrites it (staging)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class SlotMove:
    """Slot `dst_slot` receives `expert`, whose weights are in `src_slot` under the old
    placement (global slot ids)."""

    dst_slot: int
    src_slot: int
    expert: int


@dataclass(frozen=True)
class MovePlan:
    """The moves turning one layer's old placement into its new one.

    Invariant: exactly one move per slot whose expert changes, none for the others; a
    move's source slot holds its expert under the old placement, and is on the
    destination's own rank whenever that rank held the expert.
    """

    moves: tuple[SlotMove, ...]
    slots_per_rank: int

    def rank_of(self, slot: int) -> int:
        return slot // self.slots_per_rank

    def incoming(self, rank: int) -> list[SlotMove]:
        """Moves into this rank's slots, in plan order."""
        return [m for m in self.moves if self.rank_of(m.dst_slot) == rank]

    def received(self, rank: int) -> list[SlotMove]:
        """Moves into this rank's slots from other ranks' slots (P2P receives)."""
        return [m for m in self.incoming(rank) if self.rank_of(m.src_slot) != rank]


def plan_moves(old: torch.Tensor, new: torch.Tensor, slots_per_rank: int) -> MovePlan:
    """old, new: `[N]` int64, one layer's physical_to_logical before and after.

    The source of a move is, in order of preference, a slot of the destination's own rank
    holding the expert (the lowest), else one of the expert's old slots chosen by the
    destination rank (`holders[dst_rank % len(holders)]`) to spread the sends.
    """
    old_list, new_list = old.tolist(), new.tolist()
    if len(old_list) != len(new_list):
        raise ValueError(f"placements differ in size: {len(old_list)} vs {len(new_list)}")
    holders: dict[int, list[int]] = {}
    for slot, expert in enumerate(old_list):
        holders.setdefault(expert, []).append(slot)
    moves = []
    for dst, (before, after) in enumerate(zip(old_list, new_list, strict=True)):
        if before == after:
            continue
        if after not in holders:
            raise ValueError(f"expert {after} is in no slot of the old placement")
        dst_rank = dst // slots_per_rank
        same_rank = [s for s in holders[after] if s // slots_per_rank == dst_rank]
        choices = same_rank or holders[after]
        src = choices[0] if same_rank else choices[dst_rank % len(choices)]
        moves.append(SlotMove(dst_slot=dst, src_slot=src, expert=after))
    return MovePlan(tuple(moves), slots_per_rank)


def slot_checksum(weights: list[torch.Tensor], local_slot: int) -> torch.Tensor:
    """`[2]` int64: plain and position-weighted sums of the slot's raw bits, all tensors.

    The bits are read as the widest integers that tile the slot (int64 for any slot of a
    multiple of 8 bytes: a quarter of the elements of a bf16 view, so a 9.4 MB slot takes
    ~8 ms on one CPU thread instead of ~135 ms) and summed modulo 2**64: exact integer
    arithmetic, so sender and receiver agree in any summation order on any device; a
    flipped bit changes the plain sum, swapped words change the weighted one.
    """
    total = torch.zeros(2, dtype=torch.int64, device=weights[0].device)
    for w in weights:
        raw = w[local_slot].contiguous().flatten().view(torch.uint8)
        width = next(n for n in (8, 4, 2, 1) if raw.numel() % n == 0)
        words = raw.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[width])
        words = words.long()  # a no-op for int64
        position = torch.arange(1, words.numel() + 1, dtype=torch.int64, device=words.device)
        total[0] += words.sum()
        total[1] += (words * position).sum()
    return total


def verify(staged: list[torch.Tensor], expected: list[torch.Tensor]) -> bool:
    """Whether staged slot i (rows of `staged`) has checksum `expected[i]`."""
    return all(torch.equal(slot_checksum(staged, i), want) for i, want in enumerate(expected))


@dataclass
class MovesInFlight:
    """One layer's moves between `begin_moves` and `finish_moves`: staged rows (one per
    incoming move) being filled by local copies and P2P receives, and the sources'
    checksums, already all-reduced (layers begun together share the P2P requests)."""

    plan: MovePlan
    weights: list[torch.Tensor]
    rank: int
    num_ranks: int
    group: dist.ProcessGroup | None
    staged: list[torch.Tensor]  # per weight tensor: [len(incoming), ...]
    sources: torch.Tensor  # [N, 2] int64, slot checksums of the move sources
    works: list  # outstanding P2P requests (of every layer begun with it)
    stream: torch.cuda.Stream | None  # side stream of the local copies (GPU)


# Fault drill (the `wideep_fault_drill` RPC): alter one byte of the next slot this rank
# receives, after the transfer and before verification, so an operator can see a bad
# transfer refused by the whole group while serving goes on. One-shot, per process.
_drill_corrupt_next_receive = False


def drill_corrupt_next_receive() -> None:
    """Arm the fault drill: the next incoming slot of this rank arrives altered."""
    global _drill_corrupt_next_receive
    _drill_corrupt_next_receive = True


def _apply_drill(staged: list[torch.Tensor]) -> None:
    global _drill_corrupt_next_receive
    if _drill_corrupt_next_receive and staged[0].shape[0] > 0:
        _drill_corrupt_next_receive = False
        staged[0][0].reshape(-1).view(torch.uint8)[0] ^= 1


@dataclass
class StagingPool:
    """Staging rows for expert moves, reserved once (at model build, so vLLM's memory
    profile counts them) and reused by every `begin_moves`: `sets` sets of S slots of each
    slot tensor, one set per layer in flight.

    buffers: per slot tensor (weights, scales, biases: `ExpertSlots.weights`), `[sets, S,
        ...]` of its dtype on its device. A layer takes the next set in turn (`take`), so a
        set is reused only `sets` layer moves later.

    Worked example (DeepSeek-V3, bf16, S = 9, 4 layers a step, overlapped: 8 sets): a slot
    is 3 x 7168 x 2048 x 2 B = 88 MB, a set 9 x 88 MB = 793 MB, the pool 6.3 GB per rank.
    """

    buffers: list[torch.Tensor]
    _next: int = 0

    @classmethod
    def reserve(cls, weights: list[torch.Tensor], sets: int) -> StagingPool:
        """A pool of `sets` sets shaped like `weights` (each `[S, ...]`)."""
        return cls([w.new_empty((sets, *w.shape)) for w in weights])

    @property
    def sets(self) -> int:
        return self.buffers[0].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)

    def fits(self, weights: list[torch.Tensor]) -> bool:
        """Whether a layer with these slot tensors can stage in this pool."""
        return len(weights) == len(self.buffers) and all(
            b.shape[1:] == w.shape and b.dtype == w.dtype and b.device == w.device
            for b, w in zip(self.buffers, weights, strict=True)
        )

    def take(self) -> list[torch.Tensor]:
        """The next set: per slot tensor, `[S, ...]` rows to stage a layer's moves in."""
        index = self._next % self.sets
        self._next += 1
        return [b[index] for b in self.buffers]


class MovesRefused(RuntimeError):
    """A rank could not prepare its part of a layer's moves (staging memory, a bad
    placement...): every rank of the group raises it, at the same point, before any weight
    byte travels, so all keep the old placement together."""


def begin_moves(
    plan: MovePlan,
    weights: list[torch.Tensor],
    rank: int,
    num_ranks: int,
    group: dist.ProcessGroup | None,
    staging: list[torch.Tensor] | None = None,
) -> MovesInFlight:
    """Start `plan` on this rank's weights (each `[S, ...]`, slot-major) without waiting:
    the P2P transfers progress in the background (gloo's transport threads on CPU,
    NCCL's stream on GPU) and the local copies run on a side stream on GPU. The weights
    are only read until `finish_moves`, so forward passes may run in between. A
    collective over `group`: every rank calls it with the same plan, in the same order.

    Each rank first prepares its part alone (source checksums, staging buffers, local
    copies); the group then agrees (an all-reduce of the ranks that failed, with the
    checksums), and only if every rank prepared do the transfers start. Otherwise every
    rank raises `MovesRefused`.

    staging: rows to stage in (per weight tensor, `[>= S, ...]`, e.g. `StagingPool.take`),
    untouched until `finish_moves`; None allocates them here."""
    (moves,) = begin_moves_batch([(plan, weights, staging)], rank, num_ranks, group)
    if isinstance(moves, MovesRefused):
        raise moves
    return moves


def begin_moves_batch(
    layers: list[tuple[MovePlan, list[torch.Tensor], list[torch.Tensor] | None]],
    rank: int,
    num_ranks: int,
    group: dist.ProcessGroup | None,
) -> list[MovesInFlight | MovesRefused]:
    """`begin_moves` for several layers (per layer: plan, weights, staging) with one
    all-reduce, the vote (each layer still agreed on alone) and every layer's source
    checksums in one, and one batch of P2P operations, however many layers. Each
    collective costs a wait on the slowest rank: a step moving 4 layers waits once here
    instead of 8 times.

    Returns per layer its moves in flight, or the `MovesRefused` every rank got for it
    (a rank could not prepare that layer); raises only when a collective itself fails."""
    if len({plan.slots_per_rank for plan, _, _ in layers}) != 1:
        raise ValueError("layers moved together need the same number of slots per rank")
    device = layers[0][1][0].device
    stream = None
    if device.type == "cuda":
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))  # weights written before
    prepared, failures = [], []
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        for plan, weights, staging in layers:
            try:
                prepared.append(_prepare(plan, weights, rank, num_ranks, device, staging))
                failures.append(None)
            except (RuntimeError, ValueError) as error:  # torch.OutOfMemoryError included
                prepared.append(None)
                # The message only: the error's traceback holds this frame, whose transfer
                # requests would then live until a garbage collection, maybe past the
                # process group's end (gloo aborts the process then).
                failures.append(f"{type(error).__name__}: {error}")
        # One all-reduce (SUM) is the vote and the checksums: per layer, the ranks that
        # could not prepare it, then its `[N, 2]` source checksums (zero but on the sources'
        # ranks). A layer goes only where no rank failed; no weight byte travels before it.
        num_slots = num_ranks * layers[0][0].slots_per_rank
        empty = torch.zeros(num_slots, 2, dtype=torch.int64, device=device)
        packed = torch.cat(
            [
                torch.tensor([f is not None for f in failures], dtype=torch.int64, device=device),
                torch.stack([p[0] if p is not None else empty for p in prepared]).reshape(-1),
            ]
        )
        if num_ranks > 1:
            dist.all_reduce(packed, group=group)
        verdicts = (packed[: len(layers)] == 0).tolist()
        sources = packed[len(layers) :].view(len(layers), num_slots, 2)
        ops = []  # layer by layer, each in plan order: the same order on every rank
        for i, (plan, weights, _) in enumerate(layers):
            if verdicts[i]:
                ops += _transfers(plan, weights, prepared[i][1], rank, group)
        works = dist.batch_isend_irecv(ops) if ops else []
    results: list[MovesInFlight | MovesRefused] = []
    for i, (plan, weights, _) in enumerate(layers):
        if verdicts[i]:
            staged = prepared[i][1]
            results.append(
                MovesInFlight(
                    plan, weights, rank, num_ranks, group, staged, sources[i], works, stream
                )
            )
        else:
            where = f"this rank: {failures[i]}" if failures[i] is not None else "on another rank"
            results.append(MovesRefused(f"a rank could not prepare its expert moves ({where})"))
    return results


def _prepare(plan: MovePlan, weights, rank: int, num_ranks: int, device, staging=None):
    """This rank's part before any byte travels: `[N, 2]` source checksums (its own
    sources set, the rest 0) and the staging rows of its incoming moves (the first rows of
    `staging`, else new ones), local ones filled."""
    first_slot = rank * plan.slots_per_rank
    incoming = plan.incoming(rank)
    sources = torch.zeros(num_ranks * plan.slots_per_rank, 2, dtype=torch.int64, device=device)
    for m in plan.moves:
        if plan.rank_of(m.src_slot) == rank:
            sources[m.src_slot] = slot_checksum(weights, m.src_slot - first_slot)
    if staging is None:
        staged = [w.new_empty((len(incoming), *w.shape[1:])) for w in weights]
    else:
        staged = [rows[: len(incoming)] for rows in staging]
    for i, m in enumerate(incoming):
        if plan.rank_of(m.src_slot) == rank:
            for w, s in zip(weights, staged, strict=True):
                s[i].copy_(w[m.src_slot - first_slot])
    return sources, staged


def _transfers(plan: MovePlan, weights, staged, rank: int, group) -> list:
    """The P2P sends and receives of this rank, in plan order on every rank (which pairs
    each send with its receive)."""
    first_slot = rank * plan.slots_per_rank
    staged_row = {m.dst_slot: i for i, m in enumerate(plan.incoming(rank))}
    ops = []
    for m in plan.moves:
        src_rank, dst_rank = plan.rank_of(m.src_slot), plan.rank_of(m.dst_slot)
        if src_rank == rank and dst_rank != rank:
            peer = _global_rank(group, dst_rank)
            ops += [
                dist.P2POp(dist.isend, w[m.src_slot - first_slot], peer, group) for w in weights
            ]
        elif dst_rank == rank and src_rank != rank:
            peer = _global_rank(group, src_rank)
            ops += [dist.P2POp(dist.irecv, s[staged_row[m.dst_slot]], peer, group) for s in staged]
    return ops


def agree(ok: bool, num_ranks: int, group: dist.ProcessGroup | None, device) -> bool:
    """Whether every rank of `group` says ok (an all-reduce MIN; a collective)."""
    return agree_each([ok], num_ranks, group, device)[0]


def agree_each(
    oks: list[bool], num_ranks: int, group: dist.ProcessGroup | None, device
) -> list[bool]:
    """Per item, whether every rank of `group` says ok: one all-reduce MIN of all items."""
    verdicts = torch.tensor([int(ok) for ok in oks], dtype=torch.int64, device=device)
    if num_ranks > 1:
        dist.all_reduce(verdicts, op=dist.ReduceOp.MIN, group=group)
    return [bool(v) for v in verdicts.tolist()]


def finish_moves(moves: MovesInFlight) -> bool:
    """Wait for `begin_moves`'s transfers, verify every staged slot, agree over the group,
    and only if every rank verified, copy the staged slots into the weights in place (same
    storage: captured CUDA graphs stay valid). Returns False, with the weights untouched
    on every rank, if any staged slot fails verification. A collective, like
    `begin_moves`; forward passes after it see the new weights."""
    return finish_moves_batch([moves])[0]


def finish_moves_batch(batch: list[MovesInFlight]) -> list[bool]:
    """`finish_moves` for layers begun together (`begin_moves_batch`, in the same order on
    every rank), with one vote for all: each layer commits, or keeps its weights, alone."""
    device = batch[0].weights[0].device
    waited = set()
    for moves in batch:
        if moves.stream is not None:
            current = torch.cuda.current_stream(device)
            current.wait_stream(moves.stream)
            for t in [*moves.staged, moves.sources]:  # allocated on the side stream
                t.record_stream(current)
        for work in moves.works:  # a send's source is read until it completes: commit after
            if id(work) not in waited:
                waited.add(id(work))
                work.wait()
    oks = []
    for moves in batch:
        _apply_drill(moves.staged)
        incoming = moves.plan.incoming(moves.rank)
        oks.append(verify(moves.staged, [moves.sources[m.src_slot] for m in incoming]))
    verdicts = agree_each(oks, batch[0].num_ranks, batch[0].group, device)
    for moves, ok in zip(batch, verdicts, strict=True):
        if ok:
            first_slot = moves.rank * moves.plan.slots_per_rank
            for i, m in enumerate(moves.plan.incoming(moves.rank)):
                for w, s in zip(moves.weights, moves.staged, strict=True):
                    w[m.dst_slot - first_slot].copy_(s[i])
    return verdicts


def apply_moves(
    plan: MovePlan,
    weights: list[torch.Tensor],
    rank: int,
    num_ranks: int,
    group: dist.ProcessGroup | None,
) -> bool:
    """`begin_moves` then `finish_moves`: carry out `plan` before returning."""
    return finish_moves(begin_moves(plan, weights, rank, num_ranks, group))


def _global_rank(group: dist.ProcessGroup | None, group_rank: int) -> int:
    return dist.get_global_rank(group, group_rank) if group is not None else group_rank
