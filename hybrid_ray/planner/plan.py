"""The offline plan: assign requests to replicas (makespan bin packing), order them, bound them.

Heterogeneous groups are packed as uniformly related machines (Q||Cmax): group g's speed is
the ratio of the workload's total estimated work on the reference group (the first) to that on
g. Predicted finish times are then recomputed with each group's own per-request estimate.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..config import ClusterSpec
from ..workload import Request
from .binpack import pack
from .bounds import lower_bound
from .estimate import latency_matrix, work_matrix

METHODS = ("cpsat", "lpt", "multifit", "kk")
ORDERS = ("auto", "short-tail", "longest")
TAIL_BATCHES = 4


def start_order(idx: np.ndarray, work: np.ndarray, batch: int, mode: str = "short-tail") -> np.ndarray:
    """Start order of one replica's requests (indices into the workload).

    ``longest``: longest work first (LPT inside the replica). ``short-tail`` (default): input order,
    except that the ``TAIL_BATCHES * batch`` smallest requests go last, longest of them first.
    Why not longest-first throughout: a KV-bound replica fed only long requests holds fewer of
    them at once; the input mix packs the cache better, and the tail only needs the *last*
    requests started to be short. (Measured on the 100-case study: docs/scheduling.md.)
    """
    by_work = idx[np.lexsort((idx, -work))]                  # longest first, ties by index
    if mode == "longest":
        return by_work
    n_tail = TAIL_BATCHES * batch
    if len(idx) <= n_tail:
        return by_work
    tail = by_work[-n_tail:]
    head = np.setdiff1d(idx, tail)                            # sorted: input order
    return np.concatenate([head, tail])



@dataclass(slots=True)
class Plan:
    assignment: dict[str, str]                 # request id -> replica name
    order: dict[str, list[str]]                # replica name -> request ids, start order
    predicted_finish_s: dict[str, float]       # replica name -> estimated finish time
    planned_makespan_s: float
    lower_bound_s: float                       # valid for any policy (planner.bounds)
    gap: float                                 # planned_makespan / lower_bound - 1
    pack_bound_s: float                        # bound of the packing problem itself
    pack_gap: float                            # planned makespan / pack_bound - 1: the solver's gap
    solver_status: str
    method: str
    solve_time_s: float
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def rank(self) -> dict[str, int]:
        """Position of each request in its replica's start order."""
        return {rid: k for ids in self.order.values() for k, rid in enumerate(ids)}


def make_plan(cluster: ClusterSpec, requests: list[Request], predicted_output: np.ndarray | None = None,
              method: str = "cpsat", time_limit_s: float = 5.0, workers: int = 2, seed: int = 0,
              start: str = "auto") -> Plan:
    """Plan ``requests`` as one batch (arrival times ignored) on ``cluster``; lengths from
    ``predicted_output`` (the true lengths when None)."""
    if start not in ORDERS:
        raise ValueError(f"unknown start order {start!r}; choose from {', '.join(ORDERS)}")
    if method not in METHODS:
        raise ValueError(f"unknown planning method {method!r}; choose from {', '.join(METHODS)}")
    t0 = time.perf_counter()
    replicas = cluster.replicas()
    prompt = np.fromiter((q.prompt_tokens for q in requests), np.float64, len(requests))
    output = (np.fromiter((q.output_tokens for q in requests), np.float64, len(requests))
              if predicted_output is None else np.asarray(predicted_output, dtype=np.float64))
    work = work_matrix(cluster, prompt, output)                       # [groups, requests]
    group_of = {g.name: k for k, g in enumerate(cluster.groups)}
    gidx = np.array([group_of[r.group.name] for r in replicas])
    totals = work.sum(axis=1)
    speed_of_group = totals[0] / np.maximum(totals, 1e-300) if len(requests) else np.ones(len(cluster.groups))
    speeds = speed_of_group[gidx]
    res = pack(work[0], speeds, method=method, time_limit_s=time_limit_s, workers=workers, seed=seed)
    assign = res.assignment.copy()
    latency = latency_matrix(cluster, prompt, output)
    repaired = repair_latency_bound(assign, work, latency, gidx)
    order: dict[str, list[str]] = {r.name: [] for r in replicas}
    finish: dict[str, float] = {}
    peak = prompt + output                                           # KV a request holds at its end
    for m, r in enumerate(replicas):
        idx = np.flatnonzero(assign == m)
        mode = start
        if start == "auto":   # longest-first unless a batch of its long requests would not fit the KV cache
            b = r.group.max_batch_size
            top = np.sort(peak[idx])[-TAIL_BATCHES * b:] if len(idx) else peak[idx]
            kv_bound = len(top) and b * float(top.mean()) > r.group.kv_capacity_tokens
            mode = "short-tail" if kv_bound else "longest"
        idx = start_order(idx, work[gidx[m], idx], r.group.max_batch_size, mode)
        order[r.name] = [requests[j].id for j in idx]
        finish[r.name] = max(float(work[gidx[m], idx].sum()), float(latency[gidx[m], idx].max(initial=0.0)))
    planned = max(finish.values(), default=0.0)
    # the plan packs the requests as one batch (all present), so its bound must ignore arrivals too;
    # and it knows only the lengths it planned with (a planner never reads a true length)
    lb = lower_bound(cluster, [Request(q.id, q.prompt_tokens, max(1, int(round(o))), 0.0)
                               for q, o in zip(requests, output)])
    return Plan(
        assignment={requests[j].id: replicas[int(m)].name for j, m in enumerate(assign)},
        order=order, predicted_finish_s=finish, planned_makespan_s=planned,
        lower_bound_s=lb.value_s, gap=(planned / lb.value_s - 1.0) if lb.value_s > 0 else 0.0,
        pack_bound_s=float(res.lower_bound),
        pack_gap=float(res.makespan / res.lower_bound - 1.0) if res.lower_bound > 0 else 0.0,
        solver_status=res.status, method=res.method,
        solve_time_s=time.perf_counter() - t0,
        info={"pack_makespan_s": float(res.makespan), "pack_solve_time_s": float(res.solve_time_s),
              "chain_bound_s": lb.chain_s, "work_bound_s": lb.work_s, "speeds": speed_of_group.tolist(),
              "latency_moves": repaired},
    )


def repair_latency_bound(assign: np.ndarray, work: np.ndarray, latency: np.ndarray, gidx: np.ndarray,
                         max_moves: int = 200) -> int:
    """Greedy repair for replicas whose finish is set by one long request's latency, not by load.

    Bin packing balances *work*; a replica finishes no earlier than its longest request takes in
    a busy batch. While the latest replica is latency-bound, move that request to the replica
    where it ends earliest, if that lowers the overall finish. Returns the number of moves.
    """
    n_rep = len(gidx)
    load = np.array([work[gidx[m], assign == m].sum() for m in range(n_rep)])
    moves = 0
    for _ in range(max_moves):
        lat = np.array([latency[gidx[m], assign == m].max(initial=0.0) for m in range(n_rep)])
        finish = np.maximum(load, lat)
        worst = int(np.argmax(finish))
        if lat[worst] <= load[worst]:
            break                                    # load-bound: bin packing already balanced it
        members = np.flatnonzero(assign == worst)
        j = int(members[np.argmax(latency[gidx[worst], members])])
        cand = np.maximum(np.maximum(load + work[gidx, j], latency[gidx, j]), lat)
        cand[worst] = np.inf
        dst = int(np.argmin(cand))
        rest = np.delete(members, np.flatnonzero(members == j))
        new_worst = max(load[worst] - work[gidx[worst], j], latency[gidx[worst], rest].max(initial=0.0))
        if max(cand[dst], new_worst) >= finish[worst] - 1e-12:
            break
        assign[j] = dst
        load[worst] -= work[gidx[worst], j]
        load[dst] += work[gidx[dst], j]
        moves += 1
    return moves
