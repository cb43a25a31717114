"""Waiting-queue order: a wrapper that sorts a replica's queue before the inner policy picks.

Preempted sequences always stay in front (they hold generated tokens and were admitted first);
the rest follow a key. The sort runs only when the queue changed, and Timsort on an already
sorted list is linear, so the hot path stays cheap.
"""
from __future__ import annotations

from typing import Callable

from ..replica import Iteration, ReplicaState, Sequence
from .base import IterationPolicy

SortKey = Callable[[Sequence], float]


def longest_predicted_first(s: Sequence) -> float:
    """Longest predicted output first: the long ones start early and do not form the tail."""
    return -float(s.predicted_output)


def plan_rank(rank: dict[str, int]) -> SortKey:
    """The planner's per-replica start order; requests it did not plan go last, FIFO."""
    last = len(rank)
    return lambda s: rank.get(s.id, last)


class SortedQueue:
    """Keeps ``r.waiting`` sorted by (not preempted, key), then delegates to ``inner``."""

    def __init__(self, inner: IterationPolicy, key: SortKey):
        self.inner = inner
        self.key = key
        self.name = getattr(inner, "name", "policy")

    def schedule(self, r: ReplicaState) -> Iteration | None:
        if r.waiting_dirty:
            key = self.key
            r.waiting.sort(key=lambda s: (s.preemptions == 0, key(s)))
            r.waiting_dirty = False
        return self.inner.schedule(r)
