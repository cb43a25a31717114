"""Length-banded assignment: long requests together on a few lightly loaded replicas.

Why: a replica cannot finish before its longest request's ``O`` iterations, and every iteration
costs at least the decode base (the weights streamed once). Balance *work* and the longest
requests spread over busy replicas: each of those pays ``base * O_max`` plus a full batch's
per-sequence cost at every step, and the makespan is set by the longest requests running in
full batches (h100_llama7b on GSM8K: 3.56 s against a 2.70 s bound). Put the longest requests
together on one replica, the next longest on the next, and so on, and each replica's time is
close to

    est(S) = sum_{r in S} (lin_r + prefill_r) + base * N(S)

where ``lin`` is a request's per-sequence and per-context decode cost, ``prefill`` its prompt's
and ``N(S)`` the iterations: S's requests, longest first, run on B slots (list scheduling: each
starts when a slot frees), at least ``sum KV token-steps / KV`` on a KV-bound replica. Sorted
by predicted length, the requests are cut into contiguous bands, one per replica (the groups
with the cheapest iteration take the longest bands), with a bisection on the common finish T:
each replica takes the longest band with ``est <= T``, then fills the slots its band frees early
with the shortest requests left, while ``est <= T``. ``planner.plan`` keeps this plan only if
the hybrid's simulated run on it beats the work-balanced plan.
"""
from __future__ import annotations

import heapq

import numpy as np

from ..config import ClusterSpec, ReplicaGroupSpec

BISECTIONS = 40


def _prefix(x: np.ndarray) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(x)])


def _finish(slots: list[float], cap: int, steps: float) -> float:
    """List scheduling on ``cap`` slots: a request of ``steps`` starts when the earliest slot frees."""
    return (slots[0] if len(slots) >= cap else 0.0) + steps


def _place(slots: list[float], cap: int, finish: float) -> None:
    if len(slots) >= cap:
        heapq.heapreplace(slots, finish)
    else:
        heapq.heappush(slots, finish)


class _GroupTables:
    """What ``est`` adds up on one group, over requests sorted longest first."""

    def __init__(self, g: ReplicaGroupSpec, p: np.ndarray, o: np.ndarray, span: np.ndarray | None = None):
        pc, dc = g.cost_model.prefill, g.cost_model.decode
        steps = np.maximum(o - 1, 0)
        ctx = steps * p + steps * (steps + 1) / 2.0
        self.base = dc.base_s
        self.slots = max(1, min(g.max_batch_size, g.kv_capacity_tokens))
        self.kv = float(g.kv_capacity_tokens)
        per_request = (steps * dc.per_seq_s + dc.per_ctx_token_s * ctx
                       + pc.per_token_s * p + pc.per_token_sq_s * p * p + pc.base_s / self.slots)
        self.lin_y = _prefix(per_request)
        self.kvsteps = _prefix(o * p + o * (o - 1) / 2.0)
        self.o = (o if span is None else span).tolist()       # the iterations a request holds a slot

    def _cost(self, lo: int, hi: int, iterations: float) -> float:
        kv_bound = (self.kvsteps[hi] - self.kvsteps[lo]) / self.kv
        return self.lin_y[hi] - self.lin_y[lo] + self.base * max(iterations, kv_bound)

    def band(self, lo: int, end: int, limit: float) -> tuple[int, int]:
        """Requests lo.. (longest first), then end-1, end-2, .. (shortest first) while est <= limit.

        Returns (hi, new_end): the replica takes lo..hi-1 and new_end..end-1. The short ones fill
        the slots its band frees early, which costs them no extra iteration. One pass of list
        scheduling (each request starts when the earliest slot frees): est only grows."""
        slots: list[float] = []
        span = lin = kv = 0.0
        o, lin_y, kvs = self.o, self.lin_y, self.kvsteps
        i, j = lo, end - 1
        top = True
        while i <= j:
            k = i if top else j
            fin = _finish(slots, self.slots, o[k])
            d_lin, d_kv = lin_y[k + 1] - lin_y[k], kvs[k + 1] - kvs[k]
            if lin + d_lin + self.base * max(fin, span, (kv + d_kv) / self.kv) > limit:
                if not top:
                    break
                top = False                           # the band is full: fill with the shortest
                continue
            _place(slots, self.slots, fin)
            span, lin, kv = max(span, fin), lin + d_lin, kv + d_kv
            if top:
                i += 1
            else:
                j -= 1
        return i, j + 1

    def est(self, lo: int, hi: int) -> float:
        """Estimated finish of a replica holding sorted requests lo..hi-1."""
        if hi <= lo:
            return 0.0
        slots: list[float] = []
        span = 0.0
        for x in self.o[lo:hi]:
            end = _finish(slots, self.slots, x)
            _place(slots, self.slots, end)
            span = end if end > span else span
        return self._cost(lo, hi, span)


def banded_assignment(cluster: ClusterSpec, prompt: np.ndarray, output: np.ndarray,
                      span: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Replica index per request (cluster.replicas() order) and the estimated makespan.

    ``span``: the output lengths that set a replica's iterations (its longest request's, list
    scheduling on its slots), where they differ from the expected lengths ``output`` that set its
    work: with predicted lengths an upper quantile, since a band's iterations are its longest
    request's, and among requests predicted alike the long one is there whichever it is."""
    n = len(prompt)
    replicas = cluster.replicas()
    if n == 0:
        return np.zeros(0, dtype=np.int64), 0.0
    span = output if span is None else np.asarray(span, dtype=np.float64)
    order = np.lexsort((-prompt, -output, -span))       # longest output first
    p, o, sp = prompt[order].astype(np.float64), output[order].astype(np.float64), span[order]
    tables = {g.name: _GroupTables(g, p, o, sp) for g in cluster.groups}
    # cheapest iteration first: the longest bands go where a step costs least
    rep_order = sorted(range(len(replicas)), key=lambda k: (replicas[k].group.cost_model.decode.base_s, k))

    def cut(limit: float) -> list[tuple[int, int, int, int]] | None:
        """Per replica (in rep_order) its band lo..hi-1 and fill new_end..end-1, or None if the
        requests do not fit under a common finish ``limit``."""
        parts, lo, end = [], 0, n
        for k in rep_order:
            hi, new_end = lo, end
            if lo < end:
                hi, new_end = tables[replicas[k].group.name].band(lo, end, limit)
            parts.append((lo, hi, new_end, end))
            lo, end = hi, new_end
        return parts if lo >= end else None

    hi_t = min(tables[r.group.name].est(0, n) for r in replicas)   # one replica takes everything
    lo_t = 0.0
    for _ in range(BISECTIONS):
        mid = 0.5 * (lo_t + hi_t)
        if cut(mid) is None:
            lo_t = mid
        else:
            hi_t = mid
    parts = cut(hi_t)
    assert parts is not None
    assign_sorted = np.empty(n, dtype=np.int64)
    for k, (lo, hi, new_end, end) in zip(rep_order, parts):
        assign_sorted[lo:hi] = k
        assign_sorted[new_end:end] = k
    assign = np.empty(n, dtype=np.int64)
    assign[order] = assign_sorted
    return assign, hi_t


def estimated_finish(cluster: ClusterSpec, prompt: np.ndarray, output: np.ndarray, assign: np.ndarray,
                     span: np.ndarray | None = None) -> np.ndarray:
    """``est`` of each replica under any assignment (the model the bands are cut with)."""
    replicas = cluster.replicas()
    out = np.zeros(len(replicas))
    span = output if span is None else np.asarray(span, dtype=np.float64)
    for k, r in enumerate(replicas):
        idx = np.flatnonzero(assign == k)
        if len(idx) == 0:
            continue
        idx = idx[np.lexsort((-prompt[idx], -output[idx], -span[idx]))]
        t = _GroupTables(r.group, prompt[idx].astype(np.float64), output[idx].astype(np.float64),
                         span[idx].astype(np.float64))
        out[k] = t.est(0, len(idx))
    return out
