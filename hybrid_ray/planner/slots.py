"""Start order that makes a replica's batch slots run dry together (no long drain at the end).

Why: a replica of B slots holding many requests drains at its end: once its queue is empty,
every slot that frees stays empty, and the replica runs thinner and thinner decode steps, each
paying the full weight pass, until its last request ends. Longest-first order (LPT on the slots)
leaves the slots' ends spread over about one short request's length: on `local` x GSM8K the
last ~100 of ~720 iterations ran at a mean batch of ~30 of 64, about 0.3 s of 6.15 s.

The requests' output lengths are the iterations they hold a slot, so a replica is B identical
machines and the order is a schedule on them (P||Cmax). Two packings are tried: LPT followed by
pairwise exchanges between the most and the least loaded slot (a move or a swap, whichever evens
them most) until none helps, which suits many requests per slot; and multifit (first-fit
decreasing under a bisected slot length, ``binpack.pack_multifit``), which suits two or three
long requests per slot, where LPT leaves its 4/3 worst case (`hetero`'s 7B replicas: 337
iterations by LPT, 319 by multifit, for a longest request of 318). Each slot starts with its
shortest prompt, then runs the rest longest first; the start order is by planned start time.
Admitting in that order *is* list scheduling (the earliest-freed slot takes the next request);
each packing is scored by that list schedule, as it will run, and the shorter one is kept.
"""
from __future__ import annotations

import heapq

import numpy as np

from .binpack import pack_multifit

ADMIT_STEPS = 1.0        # iterations a freed slot typically waits for its next prompt (prefill batching)


def _lpt_exchange(length: np.ndarray, batch: int, max_rounds: int) -> list[list[int]]:
    """LPT onto the slots, then moves and swaps between the fullest and the emptiest slot."""
    slots: list[list[int]] = [[] for _ in range(batch)]
    load = np.zeros(batch)
    heap = [(0.0, s) for s in range(batch)]
    for k in np.argsort(-length, kind="stable"):     # longest first onto the least loaded slot
        _, s = heapq.heappop(heap)
        slots[s].append(int(k))
        load[s] += length[k]
        heapq.heappush(heap, (load[s], s))
    for _ in range(max_rounds):
        hi, lo = int(np.argmax(load)), int(np.argmin(load))
        diff = load[hi] - load[lo]
        if diff <= 1.0:
            break
        a = length[slots[hi]]
        b = np.concatenate([length[slots[lo]], [0.0]])          # 0: a move instead of a swap
        spread = np.abs(diff - 2.0 * (a[:, None] - b[None, :]))
        i, j = np.unravel_index(int(np.argmin(spread)), spread.shape)
        if spread[i, j] >= diff - 1e-9:
            break                                               # no exchange evens them
        ka = slots[hi].pop(int(i))
        slots[lo].append(ka)
        load[hi] -= length[ka]
        load[lo] += length[ka]
        if j < len(b) - 1:
            kb = slots[lo].pop(int(j))
            slots[hi].append(kb)
            load[lo] -= length[kb]
            load[hi] += length[kb]
    return slots


def _multifit(length: np.ndarray, batch: int) -> list[list[int]]:
    assign = pack_multifit(length, np.ones(batch)).assignment
    slots: list[list[int]] = [[] for _ in range(batch)]
    for k, s in enumerate(assign.tolist()):
        slots[s].append(k)
    return slots


def _start_order(slots: list[list[int]], length: np.ndarray, idx: np.ndarray,
                 prompts: np.ndarray | None) -> np.ndarray:
    """Positions (into idx) by planned start; each slot's shortest prompt first, then longest first.
    The first wave is ordered by slot load, fullest first: a replica's start-up program may start
    the last of them a few iterations late (``policies.lagrangian``), which the emptiest slots absorb."""
    starts, keys, members = [], [], []
    for s in slots:
        load = float(length[s].sum()) if s else 0.0
        s = sorted(s, key=lambda k: (-length[k], idx[k]))
        if prompts is not None and s:
            first = min(range(len(s)), key=lambda i: (prompts[s[i]], i))
            s.insert(0, s.pop(first))
        t = 0.0
        for i, k in enumerate(s):
            starts.append(t)
            keys.append(-load if i == 0 else -length[k])      # the first wave: fullest slot first
            members.append(k)
            t += length[k]
    members_arr = np.asarray(members, dtype=np.int64)
    return members_arr[np.lexsort((idx[members_arr], np.asarray(keys), np.asarray(starts)))]


def _list_schedule(lengths: np.ndarray, batch: int) -> tuple[float, float]:
    """(last end, last end - first end) of the slots when requests of ``lengths`` start in order."""
    slots = [0.0] * batch
    for x in lengths.tolist():
        heapq.heapreplace(slots, slots[0] + x)
    return max(slots), max(slots) - min(slots)


def slot_balanced_order(idx: np.ndarray, steps: np.ndarray, batch: int, max_rounds: int = 4096,
                        prompts: np.ndarray | None = None) -> np.ndarray:
    """``idx`` (request indices) in start order; ``steps[k]`` is request ``idx[k]``'s predicted output.
    With ``prompts``, each slot starts with its shortest prompt (the first wave's prefill is the
    replica's start-up, paid before anything decodes), then the rest longest first."""
    n = len(idx)
    if n <= batch:                                   # one request per slot: all start at once
        return idx[np.lexsort((idx, -steps))]
    length = np.asarray(steps, dtype=np.float64) + ADMIT_STEPS
    best, best_score = None, None
    for slots in (_lpt_exchange(length, batch, max_rounds), _multifit(length, batch)):
        pos = _start_order(slots, length, idx, prompts)
        score = _list_schedule(length[pos], batch)
        if best_score is None or score < best_score:
            best, best_score = pos, score
    return idx[best]
