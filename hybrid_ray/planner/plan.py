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
from .estimate import work_matrix

METHODS = ("cpsat", "lpt", "multifit", "kk")


@dataclass(slots=True)
class Plan:
    assignment: dict[str, str]                 # request id -> replica name
    order: dict[str, list[str]]                # replica name -> request ids, start order
    predicted_finish_s: dict[str, float]       # replica name -> estimated finish time
    planned_makespan_s: float
    lower_bound_s: float                       # valid for any policy (planner.bounds)
    gap: float                                 # planned_makespan / lower_bound - 1
    pack_bound_s: float                        # bound of the packing problem itself
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
              method: str = "cpsat", time_limit_s: float = 5.0, workers: int = 2, seed: int = 0) -> Plan:
    """Plan ``requests`` (those present now) on ``cluster``; lengths from ``predicted_output``."""
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
    assign = res.assignment
    order: dict[str, list[str]] = {r.name: [] for r in replicas}
    finish: dict[str, float] = {}
    for m, r in enumerate(replicas):
        idx = np.flatnonzero(assign == m)
        w = work[gidx[m], idx]
        idx = idx[np.lexsort((idx, -w))]                               # longest first, stable
        order[r.name] = [requests[j].id for j in idx]
        finish[r.name] = float(work[gidx[m], idx].sum())
    planned = max(finish.values(), default=0.0)
    lb = lower_bound(cluster, requests)
    return Plan(
        assignment={requests[j].id: replicas[int(m)].name for j, m in enumerate(assign)},
        order=order, predicted_finish_s=finish, planned_makespan_s=planned,
        lower_bound_s=lb.value_s, gap=(planned / lb.value_s - 1.0) if lb.value_s > 0 else 0.0,
        pack_bound_s=float(res.lower_bound), solver_status=res.status, method=res.method,
        solve_time_s=time.perf_counter() - t0,
        info={"pack_makespan_s": float(res.makespan), "pack_solve_time_s": float(res.solve_time_s),
              "chain_bound_s": lb.chain_s, "work_bound_s": lb.work_s, "speeds": speed_of_group.tolist()},
    )
