"""Routers: which replica a newly arrived request joins."""
from __future__ import annotations

import heapq

from ..replica import LoadReport, Sequence


def greedy_least(seqs: list[Sequence], start: list[tuple[float, int]], cost) -> list[int]:
    """Each sequence in turn to the replica with the least (load, index); its ``cost(seq, index)``
    is then added to that replica's load, so a burst spreads out."""
    heap = list(start)
    heapq.heapify(heap)
    out = []
    for s in seqs:
        load, i = heap[0]
        out.append(i)
        heapq.heapreplace(heap, (load + cost(s, i), i))
    return out


class RoundRobinRouter:
    """Cycles through replicas in order, ignoring load."""

    def __init__(self) -> None:
        self._next = 0

    def route(self, seqs: list[Sequence], loads: list[LoadReport]) -> list[int]:
        out = [(self._next + k) % len(loads) for k in range(len(seqs))]
        self._next = (self._next + len(seqs)) % len(loads)
        return out


class LeastLoadedRouter:
    """Fewest outstanding requests (waiting + running), ties to the lowest index.

    What a load balancer in front of vLLM replicas does (Ray Serve and vLLM's production router
    route on queue length): it sees request counts, not the hidden output lengths.
    """

    def route(self, seqs: list[Sequence], loads: list[LoadReport]) -> list[int]:
        return greedy_least(seqs, [(r.outstanding, r.index) for r in loads], lambda s, i: 1)


class EarliestFinishRouter:
    """Each arrival goes to the replica predicted to finish its current work first.

    Within a batch arriving together, each pick adds the request's estimated work to that
    replica's predicted finish, so a burst spreads by work, not by count.
    """

    def __init__(self, work_of) -> None:
        self.work_of = work_of      # (sequence, replica index) -> estimated seconds

    def route(self, seqs: list[Sequence], loads: list[LoadReport]) -> list[int]:
        return greedy_least(seqs, [(r.predicted_finish_s, r.index) for r in loads], self.work_of)


class PlanRouter:
    """Sends planned requests where the offline plan put them; others to ``fallback``."""

    def __init__(self, assignment: dict[str, int], fallback) -> None:
        self.assignment = assignment
        self.fallback = fallback

    def route(self, seqs: list[Sequence], loads: list[LoadReport]) -> list[int]:
        out = [self.assignment.get(s.id, -1) for s in seqs]
        rest = [s for s, t in zip(seqs, out) if t < 0]
        if rest:
            it = iter(self.fallback.route(rest, loads))
            out = [t if t >= 0 else next(it) for t in out]
        return out
