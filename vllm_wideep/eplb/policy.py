"""plan_placement: which logical expert goes in each physical slot. A pure function.

Names follow the glossary in `placement.py` (L layers, E experts, R ranks, S slots per rank,
N = R * S slots). A slot of expert e serves `share[e] = load[e] / count[e]` tokens, where
`count[e]` is its replica count: tokens of a replicated expert split evenly over replicas.
Every step runs on all layers at once (numpy over a leading layer axis, no per-expert
Python loop); the loops left run over slots, ranks or swap rounds, never over layers:

1. Replicate. Candidate replica counts, each run through step 2; per layer the one with
   the lowest max rank load wins (ties: the earlier), then goes through step 3. No expert
   gets more than R replicas while another expert can take one: a rank holding two
   copies of an expert gains nothing.
   a. greedy: every expert gets one slot; each of the N - E extra slots goes to the
      expert with the largest `share` (TensorRT-LLM's `doReplication`, DeepSeek's
      `replicate_experts`).
   b. split, for f in `_SPLIT_FRACTIONS`, only for the layers greedy left above
      `_GOOD_ENOUGH`: expert e gets `ceil(load[e] / (f * mean rank load))` replicas;
      leftover slots go to the coldest experts. Greedy cuts hot experts into many
      mid-size replicas that no two fit on one rank (Zipf 1.2, EP 64, S = 5: ~80 replicas
      at 0.4-0.6 of the mean rank load, balancedness 0.93); cut into about one rank's
      worth, each goes on a rank of its own with cold experts (0.999).
2. Pack. Greedy's replicas by LPT: in descending `share` (ties: lower expert id first)
   each goes to the least-loaded rank (ties: lower rank) that has a free slot and does
   not hold that expert yet; only if no such rank exists, to the least-loaded rank with a
   free slot. Step 1b's candidates, cheaper, by rounds: round t gives each rank one
   replica, the largest to the least-loaded rank (a candidate left with two copies of an
   expert on a rank is dropped). Per layer the lowest max rank load wins.
3. Refine, at most `_ROUNDS` rounds. Each round pairs the k-th most-loaded rank above the
   target with the k-th least-loaded and makes each pair's best slot swap (the one whose
   larger load is smallest), keeping replicas on distinct ranks; a layer where no pair
   improves tries its most-loaded rank against each rank of the lighter half. Stops once
   the max rank load is within `_GOOD_ENOUGH` of the lower bound max(mean rank load,
   largest share).
4. Keep (only with `current`). `limit` is the lower bound of step 3 times
   1 + `STABILITY_TOLERANCE` (1 %); rank loads are under the new load.
   a. If `current` places every expert and its max rank load is <= limit, keep it as is.
   b. Else repair, to `current`'s replica counts and to step 1's: start from `current`,
      drop surplus replicas (duplicates on a rank, then on the most-loaded ranks first),
      put missing replicas into the freed slots by LPT, and refine by step 3 until the
      max rank load is <= limit. Of the repairs under the limit, keep the one changing
      fewer slots.
   c. Where no repair gets under it, refine the fresh plan (step 3), raise the limit to
      its max rank load times 1 + `STABILITY_TOLERANCE`, and take a repair under that;
      else relabel: map the fresh plan's rank bins onto old ranks by a maximum-overlap
      assignment (`scipy.optimize.linear_sum_assignment`), then leave each expert that
      stays on its rank in its old slot.
   On Zipf traces whose hot experts drift (tests/unit/test_eplb_policy.py, EP 8-64), this
   changes 1-30 % as many slots per rebalance as planning from scratch.

Worked example (one layer, E = 4, R = 2, S = 3, load = [6, 3, 2, 1]; N - E = 2 extra slots):

    1a. shares [6, 3, 2, 1] -> expert 0 gets a replica (shares [3, 3, 2, 1]); the next
       argmax is expert 0 again (tie, lower id) but it already has R = 2 replicas, so
       expert 1 gets it: count = [2, 2, 1, 1], share = [3, 1.5, 2, 1].
    2. replicas by share: 0 (3), 0 (3), 2 (2), 1 (1.5), 1 (1.5), 3 (1)
         0 -> rank 0 [3]       0 -> rank 1 [3]        2 -> rank 0 [5]
         1 -> rank 1 [4.5]     1 -> rank 0 [6.5] (rank 1 already holds expert 1)
         3 -> rank 1 [5.5]
    1b. peak 6.5 > mean 6: f = 1 (cap 6): count [1, 1, 1, 1] + 2 leftover to the coldest,
       experts 3 and 2: shares [6, 3, 1, 0.5], packed to rank 0 = {0, 2, 3} = 7.5: worse.
       f = 0.75, 0.5, 0.9 give count [2, 1, 1, 2], peak 6.5: a tie, so 1a's plan stays.
    3. rank 0 = {0, 2, 1} = 6.5, rank 1 = {0, 1, 3} = 5.5: the only swap that keeps
       replicas distinct and moves load (2 <-> 3) gives 5.5 / 6.5, no better. Done.
    physical_to_logical = [[0, 2, 1, 0, 1, 3]], balancedness = 6 / 6.5 = 0.92.

Costs, all layers at once: replication N - E rounds of O(L E); LPT N rounds of O(L R);
one refine round O(L S^2 R); relabel O(R^3) per layer relabelled (scipy) + O(L R S R).
On one core, DeepSeek-V3's 58 layers take 0.65-0.9x the time of vLLM's DeepSeek policy
(benchmarks/eplb_plan.py).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

# A layer keeps its current placement, or a cheaper repair of it, while its max rank load
# is at most this fraction above that of a fresh plan.
STABILITY_TOLERANCE = 0.01
# Step 1b's largest replica share, as fractions of the mean rank load, tried in this order.
_SPLIT_FRACTIONS = (1.0, 0.75, 0.5, 0.9)
# A plan whose max rank load is this close to its lower bound needs no further work.
_GOOD_ENOUGH = 1e-4
_ROUNDS = 16
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
    w = _check_load(load)
    num_layers, num_experts = w.shape
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
    bins, count = _pack_fresh(w, num_ranks, slots_per_rank)
    bound = _lower_bound(w, count, num_ranks)  # [L]
    if old is None:
        bins = _refine(w, bins, bound * (1 + _GOOD_ENOUGH))
    else:
        bins = _keep(w, bins, bound, old.reshape(num_layers, num_ranks, slots_per_rank))
    return torch.from_numpy(bins.reshape(num_layers, num_slots))


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


# ---- shared helpers -----------------------------------------------------------------------


def _counts(bins: np.ndarray, num_experts: int) -> np.ndarray:
    """bins: `[B, ...]` expert ids (`-1` = empty, not counted) -> `[B, E]` int64 copies."""
    flat = bins.reshape(len(bins), -1)
    rows = np.broadcast_to(np.arange(len(bins))[:, None], flat.shape)
    keys = (rows * num_experts + flat)[flat >= 0]
    return np.bincount(keys, minlength=len(bins) * num_experts).reshape(len(bins), num_experts)


def _held(bins: np.ndarray, num_experts: int) -> np.ndarray:
    """bins: `[B, R, S]` (`-1` = empty) -> `[B, R, E]` int64 copies of each expert per rank."""
    num_rows, num_ranks, _ = bins.shape
    return _counts(bins.reshape(num_rows * num_ranks, -1), num_experts).reshape(
        num_rows, num_ranks, num_experts
    )


def _rank_load(w: np.ndarray, bins: np.ndarray, count: np.ndarray | None = None) -> np.ndarray:
    """`[B, R]` tokens per rank of `bins` (`[B, R, S]`, no `-1`) under load w (`[B, E]`),
    replicas sharing their expert's load evenly (by `count`, default: bins' own)."""
    if count is None:
        count = _counts(bins, w.shape[1])
    share = w / np.maximum(count, 1)
    flat = bins.reshape(len(bins), -1)
    return np.take_along_axis(share, flat, axis=1).reshape(bins.shape).sum(axis=2)


def _twice_on_rank(bins: np.ndarray) -> np.ndarray:
    """bins: `[B, R, S]` expert ids (no `-1`) -> `[B, R, S]` bool, whether the slot's expert
    sits in another slot of the same rank too. Sorting S ids per rank is far cheaper than
    `_held`'s `[B, R, E]` counts when S << E."""
    order = np.argsort(bins, axis=2, kind="stable")
    ranked = np.take_along_axis(bins, order, axis=2)
    same = ranked[..., 1:] == ranked[..., :-1]  # [B, R, S - 1]
    twice = np.zeros(bins.shape, dtype=bool)
    twice[..., 1:] |= same
    twice[..., :-1] |= same
    out = np.empty_like(twice)
    np.put_along_axis(out, order, twice, axis=2)
    return out


def _has_twice_on_rank(bins: np.ndarray) -> np.ndarray:
    """bins: `[B, R, S]` expert ids -> `[B]` bool, whether some rank of the row holds an
    expert in two slots."""
    ranked = np.sort(bins, axis=2)  # two copies on a rank sit side by side
    return (ranked[..., 1:] == ranked[..., :-1]).any(axis=(1, 2))


def _argsort_rows(a: np.ndarray) -> np.ndarray:
    """`[B, n]` float -> `[B, n]` int64, a stable argsort along axis 1 (ties: lower index
    first). numpy's stable sort is about 3x slower than its default one; rank loads
    rarely tie, so sort by the default one and re-sort stably only the rows with ties."""
    order = np.argsort(a, axis=1)
    ranked = np.take_along_axis(a, order, axis=1)
    tie = (ranked[:, 1:] == ranked[:, :-1]).any(axis=1)
    if tie.any():
        order[tie] = np.argsort(a[tie], axis=1, kind="stable")
    return order


def _lower_bound(w: np.ndarray, count: np.ndarray, num_ranks: int) -> np.ndarray:
    """`[B]` no max rank load can be lower: the mean, and the largest share."""
    return np.maximum(w.sum(axis=1) / num_ranks, (w / np.maximum(count, 1)).max(axis=1))


# ---- steps 1-3: a fresh plan --------------------------------------------------------------


def _pack_fresh(w: np.ndarray, num_ranks: int, slots_per_rank: int):
    """Steps 1-2 for every layer. w: `[L, E]` float64 load. Returns `[L, R, S]` int64
    bins and their `[L, E]` int64 replica counts."""
    num_layers, num_experts = w.shape
    num_slots = num_ranks * slots_per_rank
    count = _replicate(w, num_slots, num_ranks)
    experts = np.repeat(np.tile(np.arange(num_experts), num_layers), count.reshape(-1))
    bins = np.full((num_layers, num_ranks, slots_per_rank), -1, dtype=np.int64)
    _pack(w / count, experts.reshape(num_layers, -1), bins)
    peak = _rank_load(w, bins, count).max(axis=1)
    mean = w.sum(axis=1) / num_ranks
    todo = np.nonzero(peak > mean * (1 + _GOOD_ENOUGH))[0]
    # Step 1b on the layers greedy left uneven, every fraction at once (rows: layer x f).
    fractions = np.repeat(np.array(_SPLIT_FRACTIONS), len(todo))
    count_all, ok_all = _split(
        np.tile(w[todo], (len(_SPLIT_FRACTIONS), 1)), num_slots, num_ranks, fractions
    )
    splits = [
        (
            count_all[k * len(todo) : (k + 1) * len(todo)],
            ok_all[k * len(todo) : (k + 1) * len(todo)],
        )
        for k in range(len(_SPLIT_FRACTIONS))
    ]
    rows = np.concatenate([todo[ok] for _, ok in splits]).astype(np.int64)
    if len(rows):
        tried = np.concatenate([c[ok] for c, ok in splits])
        tried_bins, clash = _pack_rounds(w[rows], tried, num_ranks, slots_per_rank)
        tried_peak = np.where(clash, np.inf, _rank_load(w[rows], tried_bins, tried).max(axis=1))
        # Per layer, the candidate with the lowest peak wins (ties: greedy, then the
        # earlier fraction): candidate k of layer l is peaks[l, k].
        which = np.concatenate([np.full(ok.sum(), k) for k, (_, ok) in enumerate(splits)])
        peaks = np.full((num_layers, 1 + len(splits)), np.inf)
        peaks[:, 0] = peak
        peaks[rows, 1 + which] = tried_peak
        won = np.argmin(peaks, axis=1)
        pick = won[rows] == 1 + which
        bins[rows[pick]] = tried_bins[pick]
        count[rows[pick]] = tried[pick]
    return bins, count


def _replicate(w: np.ndarray, num_slots: int, num_ranks: int) -> np.ndarray:
    """Step 1a, greedy: `[L, E]` int64 replica counts, each row summing to num_slots."""
    num_layers, num_experts = w.shape
    layers = np.arange(num_layers)
    count = np.ones((num_layers, num_experts), dtype=np.int64)
    extra, capped = num_slots - num_experts, True
    if num_slots > num_experts * num_ranks:  # every expert reaches R; the rest uncapped
        count[:] = num_ranks
        extra, capped = num_slots - num_experts * num_ranks, False
    share = w / count  # -inf once an expert has R replicas (while capped)
    for _ in range(extra):
        e = np.argmax(share, axis=1)
        count[layers, e] += 1
        c = count[layers, e]
        share[layers, e] = np.where(capped & (c >= num_ranks), -np.inf, w[layers, e] / c)
    return count


def _split(
    w: np.ndarray, num_slots: int, num_ranks: int, fraction: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Step 1b, split: `[B, E]` replica counts with shares <= fraction (`[B]`, per row) *
    mean rank load, and `[B]` bool, whether that fits (at most num_slots slots, at most
    R replicas of an expert). Leftover slots go to the coldest experts, one each,
    ascending share."""
    cap = fraction[:, None] * w.sum(axis=1, keepdims=True) / num_ranks  # [B, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        count = np.maximum(1, np.ceil(np.where(cap > 0, w / cap, 1))).astype(np.int64)
    left = num_slots - count.sum(axis=1)  # [B]
    cold = np.argsort(w / count, axis=1, kind="stable")  # [B, E]
    open_ = np.take_along_axis(count, cold, axis=1) < num_ranks
    take = open_ & (np.cumsum(open_, axis=1) <= left[:, None])
    ok = (cap[:, 0] > 0) & (count.max(axis=1) <= num_ranks) & (left >= 0)
    ok &= open_.sum(axis=1) >= left
    rows = np.broadcast_to(np.arange(len(w))[:, None], cold.shape)
    count[rows[take], cold[take]] += 1
    return count, ok


def _pack_rounds(w: np.ndarray, count: np.ndarray, num_ranks: int, slots_per_rank: int):
    """Step 2 for step 1b's candidates, cheaper than LPT: R ranks take R replicas a round.

    Returns `[B, R, S]` int64 holding expert e `count[b, e]` times, and `[B]` bool, rows
    left with two copies of an expert on a rank (to be discarded). Replicas in
    descending share fill slot column t in round t: the round's largest replica goes to
    the least-loaded rank, the next to the next; a replica landing on a rank that holds
    its expert trades ranks with its neighbour in the round when that clears both.
    """
    num_rows, num_experts = w.shape
    share = w / np.maximum(count, 1)
    experts = np.repeat(np.tile(np.arange(num_experts), num_rows), count.reshape(-1))
    experts = experts.reshape(num_rows, -1)
    item_share = np.take_along_axis(share, experts, 1)
    order = np.argsort(-item_share, axis=1, kind="stable")
    experts = np.take_along_axis(experts, order, 1).reshape(num_rows, slots_per_rank, num_ranks)
    item_share = np.take_along_axis(item_share, order, 1).reshape(experts.shape)
    # Slot-major while filling: round t writes column t of every rank.
    cols = np.empty((slots_per_rank, num_rows, num_ranks), dtype=np.int64)
    rank_load = np.zeros((num_rows, num_ranks))
    rank = np.tile(np.arange(num_ranks), (num_rows, 1))  # round 0: all loads tie at 0
    rows = np.arange(num_rows)[:, None]
    for t in range(slots_per_rank):
        if t:
            rank = _argsort_rows(rank_load)  # [B, R] lightest first
        e = experts[:, t]  # [B, R] descending share
        if t:
            # A replica run (<= R copies, consecutive in share order) spans at most two
            # rounds: only round t - 1 can have put e on the same rank.
            prev = np.take_along_axis(cols[t - 1], rank, 1)  # [B, R] by position
            x, k = np.nonzero(prev == e)
            k2 = np.where(k + 1 < num_ranks, k + 1, k - 1)
            ok = (prev[x, k2] != e[x, k]) & (prev[x, k] != e[x, k2])
            # Swaps touching a common position would break the permutation: skip those.
            at = np.concatenate([x * num_ranks + k, x * num_ranks + k2])
            touched = np.bincount(at, minlength=num_rows * num_ranks)
            ok &= (touched[x * num_ranks + k] == 1) & (touched[x * num_ranks + k2] == 1)
            rank[x[ok], k[ok]], rank[x[ok], k2[ok]] = rank[x[ok], k2[ok]], rank[x[ok], k[ok]]
        cols[t][rows, rank] = e
        rank_load[rows, rank] += item_share[:, t]
    bins = np.ascontiguousarray(cols.transpose(1, 2, 0))  # [B, R, S]
    return bins, _has_twice_on_rank(bins)


def _pack(share: np.ndarray, experts: np.ndarray, bins: np.ndarray) -> None:
    """Put `experts` (`[B, K]` ids per row, `-1` = none) into the `-1` slots of `bins`
    (`[B, R, S]`), LPT, filled in place (step 2). share: `[B, E]` float64 tokens per
    replica. Each row must have at least as many free slots as experts."""
    num_rows, num_ranks, slots_per_rank = bins.shape
    rows = np.arange(num_rows)
    filled = bins >= 0
    flat = bins.reshape(num_rows, -1)
    slot_share = np.take_along_axis(share, np.maximum(flat, 0), axis=1).reshape(bins.shape)
    rank_load = np.where(filled, slot_share, 0.0).sum(axis=2)  # [B, R]
    free = (~filled).sum(axis=2)  # [B, R]
    num_experts = share.shape[1]
    # holds[b * E + e, r]: rank r of row b holds expert e. Scattered from the filled slots:
    # cheaper than transposing `_held`'s `[B, R, E]` counts.
    holds = np.zeros((num_rows * num_experts, num_ranks), dtype=bool)
    b, r, _ = np.nonzero(filled)
    holds[b * num_experts + bins[filled], r] = True
    # Descending share, ties in the given (ascending id) order; `-1` last.
    item_share = np.where(experts >= 0, np.take_along_axis(share, np.maximum(experts, 0), 1), -1)
    order = np.argsort(-item_share, axis=1, kind="stable")
    experts = np.take_along_axis(experts, order, 1)
    item_share = np.maximum(np.take_along_axis(item_share, order, 1), 0)
    # A rank's load as a candidate: inf when full; plus `penalty`, more than any rank's
    # load, when it holds the expert already, so it is taken only if every open rank does.
    cand = np.where(free > 0, rank_load, np.inf).reshape(-1)  # [B * R], flat: fast indexing
    free = free.reshape(-1)
    penalty = (2 * (rank_load.sum(axis=1) + item_share.sum(axis=1)) + 1)[:, None]
    placed_rank = np.full(experts.shape, -1, dtype=np.int64)
    real_items = (experts >= 0).sum(axis=1)
    first = 0
    if not filled.any() and experts.shape[1] >= num_ranks and (item_share[:, :num_ranks] > 0).all():
        # Onto empty ranks the R largest replicas go to ranks 0 .. R-1 in turn (each
        # leaves its rank heavier than the empty ones): one step instead of R.
        first = num_ranks
        placed_rank[:, :first] = np.arange(num_ranks)
        cand += item_share[:, :first].reshape(-1)
        free -= 1
        cand[free == 0] = np.inf
        holds[
            (rows[:, None] * num_experts + experts[:, :first]).reshape(-1),
            np.tile(np.arange(num_ranks), num_rows),
        ] = True
    # Per item k, its rows of `holds` and its share, k-major: one contiguous row per step.
    held_rows = np.ascontiguousarray((rows[:, None] * num_experts + np.maximum(experts, 0)).T)
    share_k = np.ascontiguousarray(item_share.T)  # [K, B]
    placed_k = np.full(held_rows.shape, -1, dtype=np.int64)  # [K, B]
    load = cand.reshape(num_rows, num_ranks)  # a view: sees cand's updates
    every = int(real_items.min(initial=0))  # items 0 .. every - 1 exist in every row
    base = rows * num_ranks
    for k in range(first, int(real_items.max(initial=0))):
        if k < every:  # all rows: views, no row gathers
            live, held_row, view, at_base = slice(None), held_rows[k], load, base
        else:
            live = rows[k < real_items]
            held_row, view, at_base = held_rows[k, live], load[live], base[live]
        # The least-loaded open rank; the penalty only matters where that rank holds the
        # expert already (rare): re-pick those rows with it.
        rank = np.argmin(view, axis=1)
        clash = np.nonzero(holds[held_row, rank])[0]
        if len(clash):
            again = view[clash] + holds[held_row[clash]] * penalty[live][clash]
            rank[clash] = np.argmin(again, axis=1)
        holds[held_row, rank] = True
        at = at_base + rank
        left = free[at] - 1
        free[at] = left
        cand[at] = np.where(left > 0, cand[at] + share_k[k, live], np.inf)
        placed_k[k, live] = rank
    placed_rank[:, first:] = placed_k[first:].T
    # A rank's j-th new expert goes to its j-th empty slot.
    order = np.argsort(placed_rank, axis=1, kind="stable")  # by rank, then pack order
    placed_rank = np.take_along_axis(placed_rank, order, 1)
    experts = np.take_along_axis(experts, order, 1)
    real = experts >= 0
    b = np.broadcast_to(rows[:, None], experts.shape)[real]
    r = placed_rank[real]
    nth = _nth_in_group(b * num_ranks + r)
    empty_first = np.argsort(filled, axis=2, kind="stable")  # [B, R, S]
    bins[b, r, empty_first[b, r, nth]] = experts[real]


def _nth_in_group(keys: np.ndarray) -> np.ndarray:
    """keys: `[K]` sorted -> `[K]` int64, each element's index among its equal keys."""
    start = np.r_[0, np.nonzero(np.diff(keys))[0] + 1]
    return np.arange(len(keys)) - np.repeat(start, np.diff(np.r_[start, len(keys)]))


def _refine(w: np.ndarray, bins: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Swap slots between heavy and light ranks while that lowers the heavier (step 3).

    w: `[B, E]`; bins: `[B, R, S]` ids, changed in place and returned; target: `[B]`, a
    row stops once its max rank load is <= its target. Each round pairs, per row, the
    k-th most-loaded rank above the target with the k-th least-loaded and makes each
    pair's best swap (the one whose larger load is smallest): one round evens many rank
    pairs. A row where no pair improves tries the most-loaded rank against every rank
    (one swap); a row where that fails too is done.
    """
    num_rows, num_ranks, _ = bins.shape
    if num_ranks == 1:
        return bins
    state = _SwapState(w, bins)
    rank_load = state.rank_load  # [B * R], kept in step by state.swap
    active = np.arange(num_rows)
    done = np.zeros(num_rows, dtype=bool)  # rows where no swap helps any more
    for _ in range(_ROUNDS):
        load = rank_load.reshape(num_rows, num_ranks)[active]  # [A, R]
        over = load > target[active, None]
        keep = over.any(axis=1)
        active, over, load = active[keep], over[keep], load[keep]
        if not len(active):
            break
        pairs = min(num_ranks // 2, int(over.sum(axis=1).max()))
        by_load = _argsort_rows(load)
        heavy, light = by_load[:, ::-1][:, :pairs], by_load[:, :pairs]  # [A, P]
        # Only pairs whose heavy rank is above the target may swap: evaluate just those.
        x, p = np.nonzero(np.take_along_axis(over, heavy, axis=1))
        at_h = active[x] * num_ranks + heavy[x, p]  # [K] flat (row, rank) ids
        at_l = active[x] * num_ranks + light[x, p]
        excess, best, half_gap = state.best_swaps(at_h, at_l)
        better = excess < half_gap - _EPS * rank_load[at_h]
        state.swap(at_h[better], at_l[better], best[better])
        stalled = active[np.bincount(x[better], minlength=len(active)) == 0]
        if len(stalled):  # the peak rank against the lighter half, one swap per row
            by_load = _argsort_rows(rank_load.reshape(num_rows, num_ranks)[stalled])
            half = max(1, num_ranks // 2)
            peak = stalled * num_ranks + by_load[:, -1]  # [T] flat ids
            at_l = (stalled[:, None] * num_ranks + by_load[:, :half]).reshape(-1)
            excess, best, half_gap = state.best_swaps(np.repeat(peak, half), at_l)
            # The pair whose larger load ends lowest: mid + excess = peak - half_gap + excess.
            x = np.arange(len(stalled))
            p = x * half + np.argmin((excess - half_gap).reshape(-1, half), axis=1)
            ok = excess[p] < half_gap[p] - _EPS * rank_load[peak]
            state.swap(peak[ok], at_l[p[ok]], best[p[ok]])
            done[stalled[~ok]] = True
            active = active[~done[active]]
    bins[:] = state.slot_bins.T.reshape(bins.shape)
    return bins


class _SwapState:
    """The refine's view of `[B, R, S]` bins, rank-major: `slot_bins` and `slot_load`
    (`[S, B * R]`: slot i of flat rank b * R + r), `held` (`[B * R, E]` copies of each
    expert per rank, int8 where S fits) and `rank_load` (`[B * R]`), kept in step with
    swaps. Slot-major storage makes a pair's S slots one contiguous gather per slot."""

    def __init__(self, w: np.ndarray, bins: np.ndarray):
        num_rows, num_ranks, slots_per_rank = bins.shape
        num_experts = w.shape[1]
        share = w / np.maximum(_counts(bins, num_experts), 1)
        held = _held(bins, num_experts).reshape(num_rows * num_ranks, num_experts)
        # held is read by random gathers: the smaller its dtype, the fewer cache misses.
        self.held = held.astype(np.int8 if slots_per_rank < 128 else np.int64)
        self.slot_bins = np.ascontiguousarray(bins.reshape(-1, slots_per_rank).T)
        flat = bins.reshape(num_rows, -1)
        slot_load = np.take_along_axis(share, flat, axis=1).reshape(-1, slots_per_rank)
        self.slot_load = np.ascontiguousarray(slot_load.T)
        self.rank_load = slot_load.sum(axis=1)

    def best_swaps(self, at_h: np.ndarray, at_l: np.ndarray):
        """For rank pairs (`[K]` flat (row, rank) ids of heavy and light ranks): `[K]` how
        far the larger load after each pair's best swap stays above the pair's midpoint,
        `[K]` that swap as `i * S + j` (heavy's slot i with light's slot j), and `[K]` half
        the pair's load gap.

        Swapping moves delta = slot_load[h, i] - slot_load[l, j] to the light rank; the
        larger load becomes mid + |delta - gap / 2| (mid, gap: the pair's mean load and
        difference), which is below the heavy load iff 0 < delta < gap. A swap is
        invalid (inf) unless each rank lacks the other's expert."""
        slots_per_rank = self.slot_bins.shape[0]
        num_experts = self.held.shape[1]
        held = self.held.reshape(-1)
        half_gap = (self.rank_load[at_h] - self.rank_load[at_l]) / 2
        from_h = self.slot_load[:, at_h] - half_gap  # [S, K]
        from_l = self.slot_load[:, at_l]
        # Invalid slots push |delta - gap / 2| to inf: +inf on heavy's side, -inf on light's.
        from_h[held[at_l * num_experts + self.slot_bins[:, at_h]] > 0] = np.inf
        from_l[held[at_h * num_experts + self.slot_bins[:, at_l]] > 0] = -np.inf
        # [S, S, K], pairs last: numpy's inner loops then run long.
        excess = np.subtract(from_h[:, None, :], from_l[None, :, :])
        excess = np.abs(excess, out=excess).reshape(slots_per_rank**2, -1)
        best = np.argmin(excess, axis=0)
        return excess[best, np.arange(len(best))], best, half_gap

    def swap(self, at_h: np.ndarray, at_l: np.ndarray, ij: np.ndarray) -> None:
        """Swap slot i of flat rank at_h with slot j of flat rank at_l (`[K]` each, all
        2K ranks distinct), ij = i * S + j."""
        i, j = np.divmod(ij, self.slot_bins.shape[0])
        eh, el = self.slot_bins[i, at_h], self.slot_bins[j, at_l]
        load_h, load_l = self.slot_load[i, at_h], self.slot_load[j, at_l]
        self.slot_bins[i, at_h], self.slot_bins[j, at_l] = el, eh
        self.slot_load[i, at_h], self.slot_load[j, at_l] = load_l, load_h
        # The 2K ranks are distinct: plain fancy updates suffice.
        self.held[at_h, eh] -= 1
        self.held[at_l, el] -= 1
        self.held[at_h, el] += 1
        self.held[at_l, eh] += 1
        self.rank_load[at_h] -= load_h - load_l
        self.rank_load[at_l] += load_h - load_l


# ---- step 4: keep what is there -----------------------------------------------------------


def _keep(w: np.ndarray, fresh: np.ndarray, bound: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Choose among `old`, repairs of `old` and a relabelled fresh plan (step 4), per layer.

    w: `[L, E]`; fresh: `[L, R, S]` steps 1-2's bins, not refined yet; bound: `[L]` the
    lower bound of their max rank load; old: `[L, R, S]`. Returns `[L, R, S]`. Refining
    fresh costs as much as the rest, so the limit starts from the bound, and fresh is
    refined only for the layers no repair brings under that: their limit becomes fresh's
    max rank load (>= the bound) times 1 + `STABILITY_TOLERANCE`.
    """
    num_experts, slots_per_rank = w.shape[1], old.shape[2]
    limit = bound * (1 + STABILITY_TOLERANCE)
    have = _counts(old, num_experts)
    complete = (have > 0).all(axis=1)
    out = old.copy()
    todo = np.nonzero(~complete | (_rank_load(w, old, have).max(axis=1) > limit))[0]
    if not len(todo):
        return out
    # Repairs to the old replica counts (complete layers) and to fresh's, in one batch
    # (rows are independent): `[T, R, S]` each, with their max rank loads and changed
    # slots (inf: not usable).
    mine = np.nonzero(complete[todo])[0]  # rows of todo that get an old-count repair
    layer = np.concatenate([todo[mine], todo])
    want = np.concatenate([have[todo[mine]], _counts(fresh[todo], num_experts)])
    both = _repair(w[layer], want, old[layer], limit[layer])
    both_peak = _rank_load(w[layer], both).max(axis=1)
    both_moved = (both != old[layer]).sum(axis=(1, 2)).astype(np.float64)
    if slots_per_rank <= num_experts:  # a second copy on a rank is avoidable
        both_moved[_has_twice_on_rank(both)] = np.inf
    repairs = []
    for part, rows in ((slice(0, len(mine)), mine), (slice(len(mine), None), slice(None))):
        repaired = old[todo].copy()
        peak = np.full(len(todo), np.inf)
        moved = np.full(len(todo), np.inf)
        repaired[rows], peak[rows], moved[rows] = both[part], both_peak[part], both_moved[part]
        repairs.append((repaired, peak, moved))
    # Layers no repair brings under the bound's limit: refine fresh, loosen the limit.
    short = np.ones(len(todo), dtype=bool)
    for _, peak, moved in repairs:
        short &= ~((peak <= limit[todo]) & (moved < np.inf))
    left = todo[short]
    fresh_left = fresh[left]
    if len(left):
        _refine(w[left], fresh_left, bound[left] * (1 + _GOOD_ENOUGH))
        limit[left] = _rank_load(w[left], fresh_left).max(axis=1) * (1 + STABILITY_TOLERANCE)
    # Of the repairs under the limit, the one changing fewer slots; else relabel fresh.
    best = np.full(len(todo), np.inf)
    for repaired, peak, moved in repairs:
        better = (peak <= limit[todo]) & (moved < best)
        out[todo[better]] = repaired[better]
        best[better] = moved[better]
    relabel = best[short] == np.inf
    if relabel.any():
        out[left[relabel]] = _relabel(fresh_left[relabel], old[left[relabel]], num_experts)
    return out


def _relabel(fresh: np.ndarray, old: np.ndarray, num_experts: int) -> np.ndarray:
    """Permute each row's fresh rank bins onto old ranks for most overlap, then keep
    kept experts' slots. fresh, old: `[B, R, S]`."""
    old_held = _held(old, num_experts) > 0  # [B, R, E]
    # overlap[x, i, j]: slots of fresh bin i whose expert old rank j holds.
    rows = np.arange(len(fresh))[:, None, None]
    overlap = old_held.transpose(0, 2, 1)[rows, fresh].sum(axis=2)  # [B, R, R]
    out = np.empty_like(fresh)
    for x in range(len(fresh)):  # scipy solves one assignment per call
        bin_of, rank_of = linear_sum_assignment(overlap[x], maximize=True)
        out[x, rank_of] = fresh[x, bin_of]
    return _keep_slots(out, old)


def _keep_slots(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Within each rank, put experts that stay in their old slots; the rest fill the gaps
    in order. new, old: `[B, R, S]` (old may hold `-1`)."""
    # The k-th copy of an expert in `old` matches the k-th copy of it in `new`.
    tri = np.tril(np.ones((new.shape[2],) * 2, dtype=bool), -1)  # [S, S] j < i
    occ_new = ((new[..., :, None] == new[..., None, :]) & tri).sum(axis=3)
    occ_old = ((old[..., :, None] == old[..., None, :]) & tri).sum(axis=3)
    match = (old[..., :, None] == new[..., None, :]) & (
        occ_old[..., :, None] == occ_new[..., None, :]
    )  # [B, R, S_old, S_new]
    kept = match.any(axis=3)
    used = match.any(axis=2)
    out = np.where(kept, old, -1)
    # The t-th gap gets the t-th unused new expert (both in slot order).
    gaps = np.argsort(kept, axis=2, kind="stable")
    fill = np.take_along_axis(new, np.argsort(used, axis=2, kind="stable"), axis=2)
    real = np.arange(new.shape[2]) < (~kept).sum(axis=2, keepdims=True)
    b, r, t = np.nonzero(real)
    out[b, r, gaps[b, r, t]] = fill[b, r, t]
    return out


def _repair(w: np.ndarray, want: np.ndarray, old: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Edit `old` (`[B, R, S]`) to replica counts `want` (`[B, E]`) with few slot changes,
    then refine to `target` (`[B]`)."""
    num_rows, num_ranks, slots_per_rank = old.shape
    num_experts = w.shape[1]
    share = w / np.maximum(want, 1)
    bins = old.copy()
    flat = bins.reshape(num_rows, -1)
    rows = np.broadcast_to(np.arange(num_rows)[:, None], flat.shape)
    rank = np.broadcast_to(np.arange(flat.shape[1])[None, :] // slots_per_rank, flat.shape)
    rank_load = _rank_load(w, old, want)  # [B, R] under the new counts
    surplus = np.take_along_axis(_counts(old, num_experts) - want, flat, 1)  # [B, N]
    dup = _twice_on_rank(old).reshape(num_rows, -1)  # [B, N]
    # Per (row, expert), drop copies on ranks holding it twice first, then on the
    # most-loaded ranks (ties: lower rank), until `want` copies are left. One sort key,
    # unique per slot: (row, expert, not a duplicate, rank by descending load, slot).
    by_load = np.argsort(-rank_load, axis=1, kind="stable")  # [B, R]
    heaviness = np.empty_like(by_load)
    np.put_along_axis(heaviness, by_load, np.arange(num_ranks)[None, :], axis=1)
    group = rows * num_experts + flat  # [B, N]
    key = (group * 2 + ~dup) * flat.shape[1] + (
        heaviness[rows, rank] * slots_per_rank + np.arange(flat.shape[1]) % slots_per_rank
    )
    order = np.argsort(key.reshape(-1))
    nth = _nth_in_group(group.reshape(-1)[order])
    drop = np.zeros(flat.size, dtype=bool)
    drop[order] = nth < surplus.reshape(-1)[order]
    flat.reshape(-1)[drop] = -1
    missing = np.maximum(want - _counts(bins, num_experts), 0)  # [B, E]
    width = int(missing.sum(axis=1).max())
    if width:
        items = np.full((num_rows, width), -1, dtype=np.int64)
        per_row = missing.sum(axis=1)
        ids = np.repeat(np.tile(np.arange(num_experts), num_rows), missing.reshape(-1))
        col = np.arange(len(ids)) - np.repeat(np.cumsum(per_row) - per_row, per_row)
        items[np.repeat(np.arange(num_rows), per_row), col] = ids
        _pack(share, items, bins)
    return _refine(w, bins, target)
