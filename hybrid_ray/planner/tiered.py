"""Tiered assignment: only the requests no full replica can run share the lightly loaded replicas.

Why: length bands (``planner.banded``) put each contiguous band of lengths on one replica. On a
mixed cluster the second band then holds requests nearly as long as its replica's whole run, one
or two per slot, and the replica decodes half-empty batches for its last hundred iterations
(`hetero` x GSM8K: 387 iterations where 275 full ones would do). The bound's LP has a different
shape: one replica runs the longest request's ``O_max`` iterations, lightly loaded; every other
replica runs full batches. A replica of group g that runs full batches until a common finish T
runs about ``N_g(T) = T / (B_g * lin_g + base_g)`` iterations (``lin_g``: the workload's mean cost
per token beyond the weight pass, on g), so a request longer than ``N_g(T)`` cannot run there
without leaving slots empty.

Longest first, each request goes to the replica of least estimated finish (``banded.est``, the
same model as the bands: list scheduling on the slots) among the special replicas and those whose
cap it fits, under the common finish T; a request none of them can take opens a *special*
replica (uncapped, cheapest iterations first), where it shares the long run. A bisection finds
the least T. A second pass caps each group at the full iterations the first pass gave it
(``sum O / B``): that is the run its slots must fill.

``scale`` corrects the estimate per replica (the planner measures it: the simulated finish of
the previous plan over its estimate), so that each replica is filled to what it really runs.
"""
from __future__ import annotations

import heapq

import numpy as np

from ..config import ClusterSpec
from .banded import _finish, _GroupTables, _place

BISECTIONS = 24             # of the common finish: 2^-24 of one replica's whole-batch estimate


class _Replica:
    __slots__ = ("tables", "scale", "slots", "span", "lin", "kv", "est", "special")

    def __init__(self, tables: _GroupTables, scale: float):
        self.tables = tables
        self.scale = scale
        self.slots: list[float] = []
        self.span = self.lin = self.kv = self.est = 0.0
        self.special = False

    def estimate(self, k: int) -> tuple[float, float]:
        """(scaled est with request k added, k's finish iteration) by list scheduling on the slots."""
        t = self.tables
        fin = _finish(self.slots, t.slots, t.o[k])
        kv = (self.kv + t.kvsteps[k + 1] - t.kvsteps[k]) / t.kv
        return (self.lin + t.lin_y[k + 1] - t.lin_y[k] + t.base * max(fin, self.span, kv)) * self.scale, fin

    def add(self, k: int, est: float, fin: float) -> None:
        t = self.tables
        _place(self.slots, t.slots, fin)
        self.span = max(self.span, fin)
        self.lin += t.lin_y[k + 1] - t.lin_y[k]
        self.kv += t.kvsteps[k + 1] - t.kvsteps[k]
        self.est = est


def _attempt(cluster: ClusterSpec, tables: dict, o: np.ndarray, limit: float, caps: dict[str, float] | None,
             scale: np.ndarray) -> tuple[np.ndarray, list[_Replica]] | None:
    """Requests (sorted longest first) placed under a common finish ``limit``, or None."""
    replicas = cluster.replicas()
    reps = [_Replica(tables[r.group.name], float(scale[i])) for i, r in enumerate(replicas)]
    # cheapest iteration first: a special replica's long run costs its base per iteration
    opening = sorted(range(len(reps)), key=lambda i: (replicas[i].group.cost_model.decode.base_s, i))
    heaps: dict[str, list[tuple[float, int]]] = {g.name: [] for g in cluster.groups}
    for i, r in enumerate(replicas):
        heaps[r.group.name].append((0.0, i))
    cap = {}
    for g in cluster.groups:
        t = tables[g.name]
        per_token = t.lin_y[-1] / max(float(o.sum()), 1.0)
        cap[g.name] = caps[g.name] if caps else limit / (t.slots * per_token + t.base)
    special: list[int] = []
    where = np.empty(len(o), dtype=np.int64)
    for k in range(len(o)):
        best = None
        for name, heap in heaps.items():
            while heap and (reps[heap[0][1]].special or heap[0][0] != reps[heap[0][1]].est):
                heapq.heappop(heap)                  # stale entry (lazy deletion)
            if not heap or o[k] > cap[name]:
                continue
            i = heap[0][1]
            est, fin = reps[i].estimate(k)
            if est <= limit and (best is None or est < best[0]):
                best = (est, fin, i)
        for i in special:                             # open special replicas take anything
            est, fin = reps[i].estimate(k)
            if est <= limit and (best is None or est < best[0]):
                best = (est, fin, i)
        if best is None:                              # a long one: open a special replica
            for i in opening:
                if reps[i].special:
                    continue
                est, fin = reps[i].estimate(k)
                if est <= limit:
                    best = (est, fin, i)
                    reps[i].special = True
                    special.append(i)
                    break
            if best is None:
                return None
        est, fin, i = best
        reps[i].add(k, est, fin)
        if not reps[i].special:
            heapq.heappush(heaps[replicas[i].group.name], (est, i))
        where[k] = i
    return where, reps


def _bisect(cluster: ClusterSpec, tables: dict, o: np.ndarray, caps, scale: np.ndarray
            ) -> tuple[float, np.ndarray, list[_Replica]]:
    # one replica (the largest scale) takes everything: always feasible without caps
    hi = max(t.est(0, len(o)) for t in tables.values()) * float(scale.max()) * 1.000001 + 1e-9
    best = _attempt(cluster, tables, o, hi, caps, scale) or _attempt(cluster, tables, o, hi, None, scale)
    assert best is not None
    lo = 0.0
    for _ in range(BISECTIONS):
        mid = 0.5 * (lo + hi)
        got = _attempt(cluster, tables, o, mid, caps, scale)
        if got is None:
            lo = mid
        else:
            hi, best = mid, got
    return hi, best[0], best[1]


def tiered_assignment(cluster: ClusterSpec, prompt: np.ndarray, output: np.ndarray,
                      scale: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Replica index per request (cluster.replicas() order) and the estimated makespan."""
    n = len(prompt)
    if n == 0:
        return np.zeros(0, dtype=np.int64), 0.0
    scale = np.ones(cluster.num_replicas) if scale is None else np.asarray(scale, dtype=np.float64)
    order = np.lexsort((-prompt, -output))              # longest output first
    p, o = prompt[order].astype(np.float64), output[order].astype(np.float64)
    tables = {g.name: _GroupTables(g, p, o) for g in cluster.groups}
    limit, where, reps = _bisect(cluster, tables, o, None, scale)
    caps = {}
    group_of = [r.group.name for r in cluster.replicas()]
    for g in cluster.groups:                            # pass 2: each group's full run from pass 1
        full = [o[where == i].sum() / r.tables.slots for i, r in enumerate(reps)
                if not r.special and group_of[i] == g.name]
        caps[g.name] = float(np.mean(full)) if full else float("inf")
    limit2, where2, _ = _bisect(cluster, tables, o, caps, scale)
    if limit2 < limit:
        limit, where = limit2, where2
    assign = np.empty(n, dtype=np.int64)
    assign[order] = where
    return assign, limit
