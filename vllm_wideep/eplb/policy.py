"""plan_placement: which logical expert goes in each physical slot. A pure function.

Names follow the glossary in `placement.py` (L layers, E experts, R ranks, S slots per rank,
N = R * S slots). A slot of expert e serves `share[e] = load[e] / count[e]` tokens, where
`count[e]` is its replica count: tokens of a replicated expert split evenly over replicas.
Each layer is planned on its own, in four steps:

1. Replicate. Candidate replica counts, each run through steps 2-3; the one with the
   lowest max rank load wins (ties: the earlier). No expert gets more than R replicas
   while another expert can take one: a rank holding two copies of an expert gains
   nothing.
   a. greedy: every expert gets one slot; each of the N - E extra slots goes to the
      expert with the largest `share` (TensorRT-LLM's `doReplication`, DeepSeek's
      `replicate_experts`).
   b. split, for f in `_SPLIT_FRACTIONS`: expert e gets `ceil(load[e] / (f * mean rank
      load))` replicas; leftover slots go to the coldest experts. Greedy cuts hot experts
      into many mid-size replicas that no two fit on one rank (Zipf 1.2, EP 64, S = 5:
      ~80 replicas at 0.4-0.6 of the mean rank load, balancedness 0.93); cut into
      about one rank's worth, each goes on a rank of its own with cold experts (0.999).
   Candidates stop once the max rank load is within `_GOOD_ENOUGH` of the mean.
2. Pack (LPT). Replicas in descending `share` (ties: lower expert id first) each go to
   the least-loaded rank (ties: lower rank) that has a free slot and does not hold that
   expert yet; only if no such rank exists, to the least-loaded rank with a free slot.
3. Refine. While some swap of one slot on the most-loaded rank with one slot on another
   rank lowers the larger of the two ranks' loads, make the best such swap (the one whose
   larger load is smallest), keeping replicas on distinct ranks.
4. Keep (only with `current`). `fresh` is the plan of steps 1-3 and `limit` its max rank
   load times 1 + `STABILITY_TOLERANCE` (1 %); rank loads are under the new load.
   a. If `current` places every expert and its max rank load is <= limit, keep it as is.
   b. Else keep, of these candidates, the one changing the fewest slots among those with
      max rank load <= limit (relabel always is: it has `fresh`'s rank loads):
      - relabel: map `fresh`'s rank bins onto old ranks by a maximum-overlap assignment
        (Hungarian, numpy), then leave each expert that stays on its rank in its old slot.
      - repair, to `current`'s replica counts and to `fresh`'s: start from `current`,
        drop surplus replicas (duplicates on a rank, then on the most-loaded ranks first),
        put missing replicas into the freed slots by step 2, swap any second copy of an
        expert on a rank away to a rank lacking it, and refine by step 3 until the max
        rank load is <= limit.
   On Zipf traces whose hot experts drift (benchmarks/eplb.py, EP 8-64), this changes
   0-23 % as many slots per rebalance as planning from scratch, at balancedness >= 0.99.

Worked example (one layer, E = 4, R = 2, S = 3, load = [6, 3, 2, 1]; N - E = 2 extra slots):

    1a. shares [6, 3, 2, 1] -> expert 0 gets a replica (shares [3, 3, 2, 1]); the next
       argmax is expert 0 again (tie, lower id) but it already has R = 2 replicas, so
       expert 1 gets it: count = [2, 2, 1, 1], share = [3, 1.5, 2, 1].
    2. replicas by share: 0 (3), 0 (3), 2 (2), 1 (1.5), 1 (1.5), 3 (1)
         0 -> rank 0 [3]       0 -> rank 1 [3]        2 -> rank 0 [5]
         1 -> rank 1 [4.5]     1 -> rank 0 [6.5] (rank 1 already holds expert 1)
         3 -> rank 1 [5.5]
    3. rank 0 = {0, 2, 1} = 6.5, rank 1 = {0, 1, 3} = 5.5: the only swap that keeps
       replicas distinct and moves load (2 <-> 3) gives 5.5 / 6.5, no better. Done.
    1b. f = 1 (cap 6): count [1, 1, 1, 1] + 2 leftover to the coldest, experts 3 and 2:
       shares [6, 3, 1, 0.5], packed to rank 0 = {0, 2, 3} = 7.5: worse. f = 0.75, 0.5,
       0.9 give count [2, 1, 1, 2], peak 6.5: a tie, so 1a's plan stays.
    physical_to_logical = [[0, 2, 1, 0, 1, 3]], balancedness = 6 / 6.5 = 0.92.

Costs per layer: replication O((N - E) E), packing O(N R), one refine step O(S^2 R);
relabel O(R^3) (Hungarian) + O(R^2 E) (overlaps).
"""

from __future__ import annotations

import numpy as np
import torch

# A layer keeps its current placement, or a cheaper repair of it, while its max rank load
# is at most this fraction above that of a fresh plan.
STABILITY_TOLERANCE = 0.01
# Step 1b's largest replica share, as fractions of the mean rank load, tried in this order.
_SPLIT_FRACTIONS = (1.0, 0.75, 0.5, 0.9)
# Stop trying replication rules once the max rank load is this close to the mean.
_GOOD_ENOUGH = 0.002
# Relative margin a refine swap must win by; stops float ties from cycling.
_EPS = 1e-9


def plan_placement(
    load: torch.Tensor,
    num_ranks: int,
    slots_per_rank: int,
    current: torch.Tensor | None = None,
) -> torch.Tensor:
    """Place E logical experts into R * S physical slots, per layer, balancing rank load.

    Args:
        load: `[L, E]` float, tokens routed to each logical expert (any device and dtype;
            non-negative).
        num_ranks: R, ranks of the EP group.
        slots_per_rank: S, expert slots on each rank; R * S >= E.
        current: `[L, R * S]` int64, the placement now in use; slots are kept where that
            costs no balance (module docstring, step 4).

    Returns:
        `[L, R * S]` int64 on CPU, the logical expert in each physical slot; rank r owns
        slots `r * S ... r * S + S - 1`. Every expert appears at least once; the extra
        slots hold replicas of hot experts, on distinct ranks where possible.
    """
    weights = _check_load(load)
    num_layers, num_experts = weights.shape
    if not isinstance(num_ranks, int) or num_ranks <= 0:
        raise ValueError(f"num_ranks must be a positive int, got {num_ranks!r}")
    if not isinstance(slots_per_rank, int) or slots_per_rank <= 0:
        raise ValueError(f"slots_per_rank must be a positive int, got {slots_per_rank!r}")
    num_slots = num_ranks * slots_per_rank
    if num_slots < num_experts:
        raise ValueError(
            f"{num_ranks} ranks x {slots_per_rank} slots = {num_slots} slots cannot hold "
            f"{num_experts} experts"
        )
    old = None if current is None else _check_current(current, num_layers, num_slots, num_experts)

    out = np.empty((num_layers, num_slots), dtype=np.int64)
    for layer in range(num_layers):
        fresh = _plan_fresh(weights[layer], num_ranks, slots_per_rank)
        if old is not None:
            fresh = _keep(weights[layer], fresh, old[layer].reshape(num_ranks, slots_per_rank))
        out[layer] = fresh.reshape(-1)
    return torch.from_numpy(out)


# ---- input checks -------------------------------------------------------------------------


def _check_load(load: torch.Tensor) -> np.ndarray:
    load = torch.as_tensor(load).float().cpu()
    if load.dim() != 2 or load.shape[1] == 0:
        raise ValueError(f"load must be [L, E] with E >= 1, got shape {tuple(load.shape)}")
    if not torch.isfinite(load).all():
        raise ValueError("load holds NaN or infinite values")
    if (load < 0).any():
        raise ValueError(f"load must be non-negative, min is {float(load.min())}")
    return load.double().numpy()


def _check_current(
    current: torch.Tensor, num_layers: int, num_slots: int, num_experts: int
) -> np.ndarray:
    current = torch.as_tensor(current).cpu()
    if tuple(current.shape) != (num_layers, num_slots):
        raise ValueError(
            f"current must be [{num_layers}, {num_slots}] like the result, "
            f"got shape {tuple(current.shape)}"
        )
    if current.is_floating_point() or current.is_complex():
        raise ValueError(f"current must hold integer expert ids, got {current.dtype}")
    old = current.long().numpy()
    if old.size and (old.min() < 0 or old.max() >= num_experts):
        raise ValueError(
            f"current holds expert ids in [{old.min()}, {old.max()}], outside [0, {num_experts})"
        )
    return old


# ---- steps 1-3: a fresh plan --------------------------------------------------------------


def _plan_fresh(w: np.ndarray, num_ranks: int, slots_per_rank: int) -> np.ndarray:
    """One layer, steps 1-3. w: `[E]` float64 load. Returns `[R, S]` int64 expert ids."""
    num_slots = num_ranks * slots_per_rank
    good_enough = w.sum() / num_ranks * (1 + _GOOD_ENOUGH)
    best, best_peak = None, np.inf
    counts = [_replicate(w, num_slots, num_ranks)]
    counts += [_split(w, num_slots, num_ranks, f) for f in _SPLIT_FRACTIONS]
    for k, count in enumerate(counts):
        if count is None or any(np.array_equal(count, c) for c in counts[:k] if c is not None):
            continue
        bins = np.full((num_ranks, slots_per_rank), -1, dtype=np.int64)
        _pack(w / count, np.repeat(np.arange(len(w)), count), bins)
        _refine(w, bins)
        peak = _peak(w, bins)
        if peak < best_peak * (1 - _EPS):
            best, best_peak = bins, peak
        if best_peak <= good_enough:
            break
    return best


def _replicate(w: np.ndarray, num_slots: int, num_ranks: int) -> np.ndarray:
    """Step 1a, greedy: `[E]` int64 replica counts summing to num_slots."""
    count = np.ones(len(w), dtype=np.int64)
    for _ in range(num_slots - len(w)):
        share = np.where(count < num_ranks, w / count, -np.inf)
        if share.max() == -np.inf:  # N > E * R: duplicates on a rank are unavoidable
            share = w / count
        count[int(np.argmax(share))] += 1
    return count


def _split(w: np.ndarray, num_slots: int, num_ranks: int, fraction: float) -> np.ndarray | None:
    """Step 1b, split: `[E]` replica counts with shares <= fraction * mean rank load.

    None when that needs more than num_slots slots (or more than R replicas of one
    expert). Leftover slots go to the coldest experts, one each, ascending share.
    """
    cap = fraction * w.sum() / num_ranks
    if cap <= 0:
        return None
    count = np.maximum(1, np.ceil(w / cap)).astype(np.int64)
    if count.max() > num_ranks or count.sum() > num_slots:
        return None
    left = num_slots - int(count.sum())
    cold = np.argsort(w / count, kind="stable")
    cold = cold[count[cold] < num_ranks][:left]
    if len(cold) < left:
        return None
    count[cold] += 1
    return count


def _pack(share: np.ndarray, experts: np.ndarray, bins: np.ndarray) -> None:
    """Put `experts` (`[K]` ids, with repeats) into the `-1` slots of `bins` (`[R, S]`), LPT.

    share: `[E]` float64 tokens per replica of each expert. Filled in place (step 2).
    """
    num_ranks = bins.shape[0]
    num_experts = len(share)
    filled = bins >= 0
    rank_load = np.where(filled, share[np.maximum(bins, 0)], 0.0).sum(axis=1)
    free = (~filled).sum(axis=1)
    holds = np.zeros((num_ranks, num_experts), dtype=bool)
    rows, cols = np.nonzero(filled)
    holds[rows, bins[rows, cols]] = True
    # Descending share; `experts` is ascending, so the stable sort puts lower ids first.
    order = np.argsort(-share[experts], kind="stable")
    for e in experts[order]:
        open_ = free > 0
        ok = open_ & ~holds[:, e]
        if not ok.any():
            ok = open_
        rank = int(np.argmin(np.where(ok, rank_load, np.inf)))
        slot = int(np.argmax(bins[rank] < 0))
        bins[rank, slot] = e
        rank_load[rank] += share[e]
        free[rank] -= 1
        holds[rank, e] = True


def _refine(w: np.ndarray, bins: np.ndarray, target: float = 0.0) -> np.ndarray:
    """Swap slots between the most-loaded rank and others while that lowers it (step 3).

    w: `[E]` load; bins: `[R, S]` ids, changed in place and returned. Stops once the max
    rank load is <= target.
    """
    num_ranks, slots_per_rank = bins.shape
    if num_ranks == 1:
        return bins
    count = np.bincount(bins.reshape(-1), minlength=len(w))
    share = w / np.maximum(count, 1)
    held = np.zeros((num_ranks, len(w)), dtype=np.int64)
    np.add.at(held, (np.repeat(np.arange(num_ranks), slots_per_rank), bins.reshape(-1)), 1)
    slot_load = share[bins]  # [R, S]
    rank_load = slot_load.sum(axis=1)
    others = np.arange(num_ranks)
    for _ in range(4 * bins.size):
        a = int(np.argmax(rank_load))
        peak = rank_load[a]
        if peak <= target:
            break
        # delta[i, b, j]: load moving from rank a to rank b by swapping a's slot i with b's j.
        delta = slot_load[a][:, None, None] - slot_load[None, :, :]
        worst = np.maximum(peak - delta, rank_load[None, :, None] + delta)
        e_a = bins[a]  # [S]
        valid = (delta > 0) & (others != a)[None, :, None]
        valid &= e_a[:, None, None] != bins[None, :, :]
        valid &= (held[:, e_a].T == 0)[:, :, None]  # b does not hold a's expert yet
        valid &= (held[a][bins] == 0)[None, :, :]  # a does not hold b's expert yet
        worst = np.where(valid, worst, np.inf)
        best = int(np.argmin(worst))
        if not worst.flat[best] < peak * (1 - _EPS):
            break
        i, b, j = np.unravel_index(best, worst.shape)
        ea, eb = int(bins[a, i]), int(bins[b, j])
        bins[a, i], bins[b, j] = eb, ea
        held[a, ea] -= 1
        held[b, eb] -= 1
        held[a, eb] += 1
        held[b, ea] += 1
        moved = delta[i, b, j]
        slot_load[a, i], slot_load[b, j] = slot_load[b, j], slot_load[a, i]
        rank_load[a] -= moved
        rank_load[b] += moved
    return bins


# ---- step 4: keep what is there -----------------------------------------------------------


def _peak(w: np.ndarray, bins: np.ndarray) -> float:
    """Max rank load of `bins` (`[R, S]`), replicas sharing their expert's load evenly."""
    count = np.bincount(bins.reshape(-1), minlength=len(w))
    return float((w / np.maximum(count, 1))[bins].sum(axis=1).max())


def _keep(w: np.ndarray, fresh: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Choose among `old`, a relabelled `fresh` and repairs of `old` (step 4). `[R, S]`."""
    limit = _peak(w, fresh) * (1 + STABILITY_TOLERANCE)
    have = np.bincount(old.reshape(-1), minlength=len(w))
    complete = bool((have > 0).all())
    if complete and _peak(w, old) <= limit:
        return old.copy()
    best = _relabel(fresh, old, len(w))
    want = np.bincount(fresh.reshape(-1), minlength=len(w))
    for count in (have, want) if complete else (want,):
        repaired = _repair(w, count, old, target=limit)
        if _peak(w, repaired) <= limit and (repaired != old).sum() < (best != old).sum():
            best = repaired
    return best


def _relabel(fresh: np.ndarray, old: np.ndarray, num_experts: int) -> np.ndarray:
    """Permute fresh's rank bins onto old ranks for most overlap; keep kept experts' slots."""
    num_ranks, slots_per_rank = fresh.shape
    rank_ids = np.repeat(np.arange(num_ranks), slots_per_rank)
    new_cnt = np.zeros((num_ranks, num_experts), dtype=np.int64)
    old_cnt = np.zeros((num_ranks, num_experts), dtype=np.int64)
    np.add.at(new_cnt, (rank_ids, fresh.reshape(-1)), 1)
    np.add.at(old_cnt, (rank_ids, old.reshape(-1)), 1)
    # overlap[i, j]: experts that fresh bin i shares with old rank j (multiset).
    overlap = np.minimum(new_cnt[:, None, :], old_cnt[None, :, :]).sum(axis=2)
    target_rank = _max_assignment(overlap)  # fresh bin i -> old rank target_rank[i]
    out = np.empty_like(fresh)
    out[target_rank] = fresh
    return _keep_slots(out, old)


def _keep_slots(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Within each rank, put experts that stay in their old slots; the rest fill the gaps."""
    out = np.full_like(new, -1)
    for rank in range(new.shape[0]):
        pending = list(new[rank])
        for slot, e in enumerate(old[rank]):
            if e in pending:
                pending.remove(e)
                out[rank, slot] = e
        gaps = np.nonzero(out[rank] < 0)[0]
        out[rank, gaps] = pending
    return out


def _max_assignment(score: np.ndarray) -> np.ndarray:
    """Hungarian algorithm: `[n, n]` score -> `[n]` column of each row, max total score."""
    n = score.shape[0]
    cost = (score.max() - score).astype(np.float64)
    u = np.zeros(n + 1)
    v = np.zeros(n + 1)
    row_of = np.zeros(n + 1, dtype=np.int64)  # row_of[j]: 1-based row matched to column j
    way = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        row_of[0] = i
        j0 = 0
        minv = np.full(n + 1, np.inf)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = row_of[j0]
            reduced = cost[i0 - 1] - u[i0] - v[1:]
            free = ~used[1:]
            better = free & (reduced < minv[1:])
            minv[1:][better] = reduced[better]
            way[1:][better] = j0
            masked = np.where(free, minv[1:], np.inf)
            j1 = int(np.argmin(masked)) + 1
            delta = masked[j1 - 1]
            u[row_of[used]] += delta
            v[used] -= delta
            minv[1:][free] -= delta
            j0 = j1
            if row_of[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            row_of[j0] = row_of[j1]
            j0 = j1
    col_of = np.empty(n, dtype=np.int64)
    col_of[row_of[1:] - 1] = np.arange(n)
    return col_of


def _repair(w: np.ndarray, want: np.ndarray, old: np.ndarray, target: float) -> np.ndarray:
    """Edit `old` to replica counts `want` (`[E]`) with few slot changes, then refine."""
    num_experts = len(w)
    have = np.bincount(old.reshape(-1), minlength=num_experts)
    share = w / want
    bins = old.copy()
    rank_load = share[bins].sum(axis=1)
    for e in np.nonzero(have > want)[0]:
        ranks, slots = np.nonzero(bins == e)
        # Drop copies on ranks holding e twice first, then on the most-loaded ranks.
        dup = np.array([(bins[r] == e).sum() > 1 for r in ranks])
        order = np.lexsort((-rank_load[ranks], ~dup))[: have[e] - want[e]]
        bins[ranks[order], slots[order]] = -1
        np.subtract.at(rank_load, ranks[order], share[e])
    missing = np.repeat(np.arange(num_experts), np.maximum(want - have, 0))
    _pack(share, missing, bins)
    _spread_duplicates(share, bins)
    return _refine(w, bins, target=target)


def _spread_duplicates(share: np.ndarray, bins: np.ndarray) -> None:
    """Swap each second copy of an expert on a rank with a slot of a rank lacking it.

    share: `[E]` tokens per replica; bins: `[R, S]`, changed in place. Of the possible
    swaps, takes the one whose larger rank load is smallest; keeps a copy where none is.
    """
    for rank in range(bins.shape[0]):
        for slot in range(bins.shape[1]):
            e = bins[rank, slot]
            if (bins[rank] == e).sum() < 2:
                continue
            ok = ~(bins == e).any(axis=1)[:, None] & ~np.isin(bins, bins[rank])
            if not ok.any():
                continue
            rank_load = share[bins].sum(axis=1)
            moved = share[e] - share[bins]  # load moving from `rank` to the other rank
            worst = np.maximum(rank_load[rank] - moved, rank_load[:, None] + moved)
            other, other_slot = np.unravel_index(np.argmin(np.where(ok, worst, np.inf)), ok.shape)
            bins[rank, slot], bins[other, other_slot] = bins[other, other_slot], e
