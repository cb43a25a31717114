"""Waiting-queue order: a wrapper that sorts a replica's queue before the inner policy picks.

Each request's key is computed once, when its Sequence is made (``Scheduler.sort_key``), and
stored on it; a preempted sequence's key becomes -inf, so it stays in front (it holds generated
tokens and was admitted first). Keys are numbers, never NaN (floats, or ints below 2**53:
ranks, token counts). Sorting on a stored float (``attrgetter``) is C-speed: the sort runs only when the
queue changed, and costs ~15 us for 1,000 waiting that barely changed (timsort is linear on
sorted runs) but ~80 us for 1,000 shuffled (a key function: ~105 us).

Partial order. An inner policy with ``lookahead(r)`` (the Lagrangian rule) says how many queue
entries its next decision reads at most, m. Then only those are put in front: the m a full stable
sort would put first, in its order; the rest keep their queue order (an O(n) selection, ~25 us for
1,000 waiting and m = 1, ~35 us for m = 25). Nothing can tell the two apart. The rest is sorted,
stably, only when something reads the queue past its front (take-backs, re-predictions, drains:
``ReplicaState`` calls ``r.unsorted_tail`` first), or when a later decision, with only admissions
since, needs more than the front holds: sorting the rest once is cheaper than selecting from it
at each such decision (on 100k requests x 64 replicas those selections were half the simulator's
time); sequences added since stay after it, unsorted, as they would have. And a later ordering
of the whole queue puts the same sequences first as a full sort would, since equal keys keep the
same relative order either way. Admissions, runs and makespans are bit-identical
(tests/test_sorting.py). Short queues, large m, and queues that look sorted but for new arrivals
(timsort is then linear) get the full sort.

The inner policy only reads ``r.waiting`` front to back, so any of them composes: around
``ChunkedPrefill`` (a vLLM v1 engine, `lpt-engine`) in-progress chunks still go first, then
waiting prompts in the sorted order, stopping at the first that does not fit.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import compress
from operator import attrgetter
from typing import Callable

import numpy as np

from ..replica import Iteration, ReplicaState, SchedulingError, Sequence
from .base import IterationPolicy

SortKey = Callable[[Sequence], float]
_key = attrgetter("sort_key")


def longest_predicted_first(s: Sequence) -> float:
    """Longest predicted output first: the long ones start early and do not form the tail."""
    return -float(s.predicted_output)


def plan_rank(rank: dict[str, int]) -> SortKey:
    """The planner's per-replica start order; requests it did not plan go last, FIFO."""
    last = len(rank)
    return lambda s: rank.get(s.id, last)


def order_front(queue: list[Sequence], m: int) -> None:
    """Put in front of ``queue``, in order, the ``m`` (>= 1) entries a stable sort by key puts
    first; the rest keep their order."""
    if m == 1:
        i = queue.index(min(queue, key=_key))  # the first of the smallest (identity: eq=False)
        if i:
            queue.insert(0, queue.pop(i))
        return
    n = len(queue)
    keys = np.fromiter(map(_key, queue), np.float64, n)
    t = np.partition(keys, m - 1)[m - 1]       # the m-th smallest key
    cand = np.flatnonzero(keys <= t)           # those and ties with the m-th, in queue order
    take = cand[np.argsort(keys[cand], kind="stable")[:m]].tolist()   # by key, ties in queue order
    front = [queue[i] for i in take]
    if m <= 32:                                # few: cut them out (memmoves)
        for i in sorted(take, reverse=True):
            del queue[i]
        queue[:0] = front
    else:
        keep = np.ones(n, dtype=bool)
        keep[take] = False
        front.extend(compress(queue, keep.tolist()))
        queue[:] = front


@dataclass(slots=True)
class UnsortedTail:
    """The ``n`` entries of ``r.waiting`` from ``first`` to ``last``, left in queue order by a partial
    sort. Calling it sorts them in place (stable), which is what the full sort would have held:
    anything after them was added since, and stays unsorted until the next decision sorts it."""

    first: Sequence
    last: Sequence
    n: int

    def start(self, r: ReplicaState) -> int:
        """Where the tail begins (the queue's sorted front before it only shrinks or grows at index 0)."""
        w = r.waiting
        try:
            i = w.index(self.first)            # Sequence compares by identity
        except ValueError:
            i = -1
        if i < 0 or i + self.n > len(w) or w[i + self.n - 1] is not self.last:
            raise SchedulingError(f"{r.name}: the queue's unsorted part changed (a policy read past its lookahead)")
        return i

    def __call__(self, r: ReplicaState) -> None:
        i = self.start(r)
        w = r.waiting
        w[i:i + self.n] = sorted(w[i:i + self.n], key=_key)
        r.unsorted_tail = None


def _looks_sorted(w: list[Sequence]) -> bool:
    """A few evenly spaced neighbours in order: the queue is sorted but for what was added since
    (a full timsort is then O(n) and the cheapest); a shuffled queue fails with 1 - 2^-8."""
    step = max(len(w) // 8, 1)
    return all(w[i].sort_key <= w[i + 1].sort_key for i in range(0, len(w) - 1, step))


class SortedQueue:
    """Keeps ``r.waiting`` sorted by each sequence's ``sort_key``, then delegates to ``inner``.

    With an inner ``lookahead(r)``, queues of at least ``min_partial`` entries, of which it reads
    at most ``max_share``, are ordered only as far as it reads (module docstring); same results.
    """

    def __init__(self, inner: IterationPolicy, min_partial: int = 64, max_share: float = 0.25,
                 max_partial: int = 4096):
        self.inner = inner
        self.name = getattr(inner, "name", "policy")
        self.min_partial = min_partial
        # a partial order leaves the tail unsorted, so every decision that reads past the front
        # scans the whole queue again (O(n) each); a full sort is paid once and then only popped
        # from. Deep queues (a planned batch of 100k on a few replicas) take the full sort.
        self.max_partial = max_partial
        self.max_share = max_share
        self._lookahead: Callable[[ReplicaState], int] | None = getattr(inner, "lookahead", None)

    def schedule(self, r: ReplicaState) -> Iteration | None:
        if r.waiting_dirty or r.unsorted_tail is not None:
            self._order(r)
        return self.inner.schedule(r)

    def _order(self, r: ReplicaState) -> None:
        w = r.waiting
        n = len(w)
        dirty, tail = r.waiting_dirty, r.unsorted_tail
        r.waiting_dirty = False
        if self._lookahead is None or n < self.min_partial or n > self.max_partial:
            self._sort(r)
            return
        m = self._lookahead(r)                 # the inner policy's next schedule(r) reuses its work
        if not dirty:                          # only admissions since
            if m <= tail.start(r):             # the front still holds m
                return
            tail(r)                            # it ran out: sorting the rest once beats selecting again
            return
        if m >= n or m > self.max_share * n or (tail is None and _looks_sorted(w)):
            self._sort(r)
        elif m == 0:                           # it reads nothing: sort nothing now
            r.unsorted_tail = UnsortedTail(w[0], w[-1], n) if n else None
        else:
            order_front(w, m)
            r.unsorted_tail = UnsortedTail(w[m], w[-1], n - m)

    @staticmethod
    def _sort(r: ReplicaState) -> None:
        r.waiting.sort(key=_key)
        r.unsorted_tail = None
