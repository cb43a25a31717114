"""Simulation-guided local search on a plan's assignment: move or swap requests away from the
replicas that finish last, keeping each change the simulator says shortens the run.

Why: every plan is cut with a cost estimate, and the estimate misprices each replica by a
margin of its own (slot packing, prefills riding in decode steps, the start-up program): on
`hetero` the tiered plan's replicas finish 3.51-3.53 s where an even cut would end them together.
The deterministic simulator, running the very policy that will run the plan, prices a change
exactly, and a hybrid run of a few thousand requests costs tens of milliseconds, so a few
hundred of them buy what no estimate can.

The search compares runs by their replicas' finishes sorted latest first, lexicographically: a
change that ends the last replica no later but the second-last earlier is progress too, which
lets several replicas near the makespan come down one by one. First improvement wins; the search
stops when no candidate improves or the simulation budget is spent. Deterministic given a seed.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

HOT_REPLICAS = 3          # the latest-finishing replicas whose requests the search tries to move
PER_PAIR = 6              # moves and swaps tried per (late replica, earlier replica) pair


@dataclass(frozen=True, slots=True)
class RefineResult:
    assignment: np.ndarray        # replica index per request
    finishes: np.ndarray          # simulated finish per replica
    start_makespan_s: float
    makespan_s: float
    simulations: int
    accepted: int


def _earlier(a: np.ndarray, b: np.ndarray) -> bool:
    """Finishes ``a`` beat ``b``: sorted latest first, the first that differs is earlier."""
    for x, y in zip(np.sort(a)[::-1], np.sort(b)[::-1]):
        if abs(x - y) > 1e-9 * max(abs(y), 1.0):
            return x < y
    return False


def _candidates(assign: np.ndarray, finishes: np.ndarray, work: np.ndarray, group_of: np.ndarray,
                hi: int, rng: np.random.Generator):
    """Moves (one request from ``hi`` to an earlier replica, the one whose work there is closest
    to half the finishes' difference) and swaps (a drawn request of ``hi`` for the request of the
    earlier replica that best evens the two), earliest replica first."""
    on_hi = np.flatnonzero(assign == hi)
    if len(on_hi) == 0:
        return
    for lo in np.argsort(finishes, kind="stable"):
        if lo == hi or finishes[lo] >= finishes[hi]:
            continue
        target = 0.5 * (finishes[hi] - finishes[lo])
        there = work[group_of[lo]]
        for j in on_hi[np.argsort(np.abs(there[on_hi] - target), kind="stable")][:PER_PAIR]:
            moved = assign.copy()
            moved[j] = lo
            yield moved
        on_lo = np.flatnonzero(assign == lo)
        if len(on_lo) == 0:
            continue
        for j in rng.choice(on_hi, size=min(PER_PAIR, len(on_hi)), replace=False):
            k = on_lo[int(np.argmin(np.abs(there[j] - there[on_lo] - target)))]
            swapped = assign.copy()
            swapped[j], swapped[k] = lo, hi
            yield swapped


def refine_assignment(assign: np.ndarray, finishes_of: Callable[[np.ndarray], np.ndarray],
                      work: np.ndarray, group_of: np.ndarray, budget: int, seed: int = 0,
                      finishes: np.ndarray | None = None) -> RefineResult:
    """Local search from ``assign`` (replica index per request). ``finishes_of(assign)`` simulates
    the plan built from an assignment and returns each replica's finish; ``work[g, j]`` is request
    j's estimated seconds on group g (it only picks candidates: the simulation judges them);
    ``group_of[m]`` is replica m's group; ``budget`` caps the simulations, ``finishes`` (the
    start's, if already simulated) counting as one."""
    if finishes is None:
        finishes = finishes_of(assign)
    finishes = np.asarray(finishes, dtype=np.float64)
    start = float(finishes.max(initial=0.0))
    sims, accepted, step = 1, 0, 0
    while sims < budget:
        improved = False
        for hi in np.argsort(-finishes, kind="stable")[:HOT_REPLICAS]:
            rng = np.random.default_rng([seed, step, int(hi)])
            for cand in _candidates(assign, finishes, work, group_of, int(hi), rng):
                if sims >= budget:
                    break
                f = np.asarray(finishes_of(cand), dtype=np.float64)
                sims += 1
                if _earlier(f, finishes):
                    assign, finishes, improved = cand, f, True
                    accepted += 1
                    break
            if improved or sims >= budget:
                break
        if not improved:
            break
        step += 1
    return RefineResult(assign, finishes, start, float(finishes.max(initial=0.0)), sims, accepted)
