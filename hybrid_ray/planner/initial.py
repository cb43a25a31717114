"""The fast initial plan: longest predicted first, packed greedily (LPT), in well under a second.

``hybrid-ray run`` starts its replicas on this plan while the full planner (``planning.make_plan``:
CP-SAT, candidate plans, simulations; seconds to minutes on a busy host) works in its actor; the
full plan, when it arrives, re-assigns and re-orders only the requests that have not started
(docs/runtime.md, Planning while the engines start). ``make_plan`` may use it as its first schedule.

The model is make_plan's: each request's estimated work on each group (``estimate.work_matrix``),
heterogeneous groups treated as uniformly related machines (a replica of group g has speed
``total work on group 0 / total work on group g``), and each request placed, longest first, on the
replica where it would finish earliest (``binpack.pack_lpt``: a heap per speed class, ~0.1 s for
100k requests). Each replica then starts its requests longest first.
"""
from __future__ import annotations

import time

import numpy as np

from ..config import ClusterSpec
from ..workload import Request
from .binpack import pack_lpt
from .estimate import work_matrix
from .plan import Plan


def initial_plan(cluster: ClusterSpec, requests: list[Request], predicted_output: np.ndarray | None = None) -> Plan:
    """A complete ``Plan`` of ``requests`` on ``cluster`` by LPT on the estimated work; lengths from
    ``predicted_output`` (the true lengths when None). Arrival times are ignored (one batch).

    ``predicted_finish_s``: each replica's packed work on its own group's estimate (no latency
    term); ``planned_makespan_s`` their max. ``lower_bound_s`` and ``pack_bound_s`` are the
    packing model's cheap analytic bound (``binpack.makespan_lower_bound``: total work over total
    speed, the longest request on the fastest replica, and the pair / pigeonhole terms), a bound
    of this work model only, NOT ``planner.bounds``' bound valid for every schedule the replica
    state machine accepts (which costs an LP on mixed clusters). ``method`` is "lpt", ``info``
    has ``initial: True``, ``bands: False`` and the speeds.
    """
    t0 = time.perf_counter()
    replicas = cluster.replicas()
    n = len(requests)
    prompt = np.fromiter((q.prompt_tokens for q in requests), np.float64, n)
    output = (np.fromiter((q.output_tokens for q in requests), np.float64, n)
              if predicted_output is None else np.asarray(predicted_output, dtype=np.float64))
    if output.shape != (n,):
        raise ValueError(f"predicted_output has shape {output.shape}, expected ({n},)")
    work = work_matrix(cluster, prompt, output)                      # [groups, requests]
    group_of = {g.name: k for k, g in enumerate(cluster.groups)}
    gidx = np.array([group_of[r.group.name] for r in replicas], dtype=np.int64)
    totals = work.sum(axis=1)
    speed_of_group = np.ones(len(cluster.groups))
    if totals[0] > 0:                                                 # (no work at all: any speeds do)
        speed_of_group = np.where(totals > 0, totals[0] / np.where(totals > 0, totals, 1.0), 1.0)
    speeds = speed_of_group[gidx]
    res = pack_lpt(work[0], speeds)
    assign = res.assignment
    # each replica's requests, longest first on its own group's work, ties by input order: what
    # plan.start_order(..., "longest") gives, in one sort for all replicas
    by_replica = np.lexsort((np.arange(n), -work[gidx[assign], np.arange(n)], assign)) if n else assign
    bounds = np.searchsorted(assign[by_replica], np.arange(len(replicas) + 1))
    ids = [q.id for q in requests]
    order: dict[str, list[str]] = {}
    finish: dict[str, float] = {}
    for m, r in enumerate(replicas):
        idx = by_replica[bounds[m]:bounds[m + 1]]
        order[r.name] = [ids[j] for j in idx.tolist()]
        finish[r.name] = float(work[gidx[m], idx].sum())
    names = [r.name for r in replicas]
    assignment = dict(zip(ids, (names[m] for m in assign.tolist())))
    planned = max(finish.values(), default=0.0)
    lb = float(res.lower_bound)
    return Plan(assignment=assignment, order=order, predicted_finish_s=finish, planned_makespan_s=planned,
                lower_bound_s=lb, gap=planned / lb - 1.0 if lb > 0 else 0.0, pack_bound_s=lb,
                pack_gap=float(res.makespan / lb - 1.0) if lb > 0 else 0.0, solver_status=res.status,
                method="lpt", solve_time_s=time.perf_counter() - t0,
                info={"initial": True, "bands": False, "speeds": speed_of_group.tolist(),
                      "pack_makespan_s": float(res.makespan)})

