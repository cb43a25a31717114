"""The offline plan's data and its pure parts: ``Plan``, a replica's start order, latency repair.

``hybrid_ray.planning.make_plan`` makes plans (packing, candidates, the simulation that chooses
between them); this module imports neither the policies nor the simulator.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .slots import slot_balanced_order

METHODS = ("cpsat", "lpt", "multifit", "kk")
ORDERS = ("auto", "short-tail", "longest", "slots")
TAIL_BATCHES = 4


def start_order(idx: np.ndarray, work: np.ndarray, batch: int, mode: str = "short-tail",
                steps: np.ndarray | None = None, prompts: np.ndarray | None = None) -> np.ndarray:
    """Start order of one replica's requests (indices into the workload).

    ``longest``: longest work first (LPT inside the replica). ``slots``: the batch slots' ends
    balanced on the predicted outputs ``steps``, each slot starting with its shortest of ``prompts``
    (``planner.slots``). ``short-tail`` (default): input order,
    except that the ``TAIL_BATCHES * batch`` smallest requests go last, longest of them first.
    Why not longest-first throughout: a KV-bound replica fed only long requests holds fewer of
    them at once; the input mix packs the cache better, and the tail only needs the *last*
    requests started to be short. (Measured on the 100-case study: docs/scheduling.md.)
    """
    if mode == "slots":
        return slot_balanced_order(idx, steps, batch, prompts=prompts)
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
