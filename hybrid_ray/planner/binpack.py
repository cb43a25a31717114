"""Minimum-makespan packing of requests onto replicas: P||Cmax and Q||Cmax.

This is the offline half of the hybrid scheduler: every request j carries an estimated amount of
work w_j >= 0 (seconds on a speed-1 replica) and every replica m a relative speed s_m > 0
(replicas of one hardware group share a speed). A job placed on m takes w_j / s_m seconds.

Problem
-------
Find an assignment a: J -> M minimising the makespan

    C(a) = max_m  L_m / s_m,        L_m = sum_{j : a(j) = m} w_j .

Identical speeds give P||Cmax, distinct speeds Q||Cmax; both are strongly NP-hard.

Lower bound (``makespan_lower_bound``)
--------------------------------------
Sort work w_(1) >= ... >= w_(n) and speeds s_(1) >= ... >= s_(m). The bound is the maximum of

* prefix bound, for k = 1..min(n, m):  (w_(1) + ... + w_(k)) / (s_(1) + ... + s_(k))
  (the k largest jobs occupy at most k machines, at best the k fastest; k = 1 is max_j w_j / s_max);
* volume bound:  sum_j w_j / sum_m s_m;
* pair bound, for k = 1..min(m, n - 1):  min( (w_(k) + w_(k+1)) / s_(1),  w_(k+1) / s_(k+1) )
  (either one of the k+1 largest jobs runs on a machine of sorted position > k, no faster than
  s_(k+1), or all of them run on the first k machines and two of them share one; with
  s_(m+1) = 0 the k = m term is the classic P||Cmax bound w_(m) + w_(m+1));
* pigeonhole bound, for r >= 1 with r*m + 1 <= n:  (w_(rm-r+1) + ... + w_(rm+1)) / s_(1)
  (some machine holds r + 1 of the r*m + 1 largest jobs).

Every term is a valid bound, so the maximum is; it is shrunk by a relative 4 (n + m) * 2^-52 so
that floating-point summation can never lift it above a makespan computed from the same floats.
If all work is integral and every speed is exactly a rational a_m / b_m (b_m <= 1000; identical
speeds always qualify), every makespan is an integer multiple of 1 / lam, lam = lcm(a) / gcd(b)
(see the exact mode below), so the bound is rounded up to ceil(LB * lam) / lam; for identical
machines that is ceil(LB * s) / s.

MIP (``pack_cpsat``, CP-SAT)
----------------------------
CP-SAT needs integers, so makespans are measured in units of tau seconds (below). Jobs with
w_j = 0 are left out of the model and placed afterwards.

Sets
    M              machines; G_1, ..., G_r the groups of machines with exactly equal speed,
                   first(G_i) the lowest machine index of group G_i.
    T              item types; type t holds c_t jobs whose representative work is
                   r_t = min of their w_j (so r_t <= w_j for every member).
Data
    p_tm = floor(r_t / (s_m tau))      time of one type-t job on m, in units (rounded down);
    g, q_m = floor(g / (s_m tau))      fluid unit of work and its time on m (aggregated mode);
    F = max(0, floor(W_small / g) - m - 1)   fluid volume, W_small = total small-job work.
Variables
    y_tm in {0, ..., c_t}   how many type-t jobs run on m (a boolean x_jm when c_t = 1);
    f_m  in {0, ..., F}     fluid units of small-job work on m (aggregated mode only);
    T    in {T_lo, ..., T_hint}   the makespan, in units.
Objective
    minimise T
Constraints
    sum_m y_tm = c_t                              for every type t
    sum_m f_m  = F
    L_m := sum_t p_tm y_tm + q_m f_m <= T         for every machine m
    sum_i y_{t*, first(G_i)} >= 1                 symmetry breaking, t* = the largest type: the
        machines of a group are interchangeable, so some largest job may be assumed to sit on
        the first machine of its group (machine 0 for identical machines). SYMMETRY_BREAKING =
        "loads" instead imposes L_a >= L_b for consecutive machines a < b of every group; that
        is valid too (not together with the former) but measurably slows CP-SAT's LNS, whose
        moves it blocks, so it is not the default.
    T_lo = max( max_t min_m p_tm,
                ceil( (sum_t c_t min_m s_m p_tm + F min_m s_m q_m) / sum_m s_m ),  [*]
                ceil(LB / tau) - loss )                                             [exact mode]
        [*] from T sum_m s_m >= sum_m s_m L_m. The last term holds because rounding down costs
        less than one unit per job: T(A) > C(A) / tau - n for every float assignment A.
    T_hint = the value of T at the warm start (AddHint of the best heuristic's assignment, with
        machines relabelled inside their group so the hint satisfies the symmetry breaking).

Rounding and bounds. Every coefficient is rounded *down* (after multiplying by 1 - 1e-14 so that
a float division can never round one up) and the fluid may split jobs, so the model is a
relaxation: the image of any float assignment of makespan C has T <= C / tau. The solver's proven
bound B therefore yields the float lower bound B * tau * (1 - 1e-14); the reported
``lower_bound`` is max(analytic bound, that). Makespans are always recomputed from the float work
of the per-job assignment, never from the integers.

Exact mode, used when (#distinct positive work values) * m <= EXACT_MAX_VARS = 12,000: one type
per distinct work value (equal jobs collapse into one counted type, which is lossless), no fluid.
  * integral work (e.g. token counts) and speeds that are rationals a_m / b_m with b_m <= 1000
    (identical speeds always are): lam = lcm(a) / gcd(b), k_m = lam / s_m (an integer),
    tau = 1 / lam, p_tm = w_t k_m exactly - no rounding at all (loss = 0; total * k <= 2^50);
  * otherwise tau = LB / U with U = min(1e10 * n, 2^44) (further capped so no linear expression
    can exceed 2^60): loss = n units, i.e. a relative n / U (1e-10 for n <= 1,759).
CP-SAT stops when T - B <= loss + 2 units (0.5 when integral) - reported ``OPTIMAL``: the
float makespan is then within a relative (2 loss + 2) / U of the optimum - or at a relative gap
of 1e-4 (reported ``FEASIBLE``: a planning horizon does not need more). ``pack`` does not call
CP-SAT at all when its best heuristic is already within 1e-5 of the lower bound.

Aggregated mode, otherwise (e.g. 100k jobs of continuous work): tau = LB / U with U = 1e9. The
positive jobs are put into geometric classes anchored at the largest job,
class(j) = floor(log(w_max / w_j) / log(1 + 1e-3)), so within a class work differs by less than
0.1%. The first K = max(1, 4096 // m) occupied classes are the *large* types (at most 4,096
integer y_tm variables however large n is); all smaller jobs become the fluid, with
g = sqrt(U) * s_max * tau, so that q_m >= sqrt(U): the floors of q_m, F and of a machine's fluid
each cost about 3e-5 * s_max / s_m relative. CP-SAT stops at a relative gap of 1e-4 (below the
0.1% class rounding, the model cannot tell solutions apart). The solution is expanded
deterministically: the members of each large type, in decreasing work, go to the machine with a
remaining quota y_tm that finishes them earliest (true float loads); then the small jobs are
placed by LPT on the true loads, which also absorbs the rounding of the large types (its error
is at most one small job per machine). Aggregated results are ``FEASIBLE`` unless the float
makespan meets the lower bound.

Heuristics
----------
``pack_lpt``: longest processing time first, each job to the machine where it finishes first
(min (L_m + w_j) / s_m; ties: faster, then lower index); one heap per speed group,
O(n log n + n (log m + #groups)). Identical machines: C_LPT <= (4/3 - 1/(3m)) C*.
``pack_multifit``: Coffman-Garey-Johnson: binary search on a bin capacity in
[max(W/m, w_max), max(2W/m, w_max)] with first-fit decreasing (segment tree, O(n log m) per
probe); identical machines only (else LPT).
``pack_kk``: Karmarkar-Karp largest differencing for m-way partitioning, O(n m log m) time and
O(n m) memory; identical machines only (else LPT).
``pack``: with ``method="cpsat"`` runs LPT, multifit (n <= 5,000) and KK (n m <= 200,000),
warm-starts CP-SAT with the best, and returns the best assignment found (never worse than any
heuristic it ran), tagged with the method that produced it (CP-SAT only if strictly better).

Status: ``OPTIMAL`` = proven optimal (exact-mode CP-SAT proof as above, or makespan <=
lower_bound * (1 + 1e-9)); ``FEASIBLE`` = CP-SAT ran and found a solution, optimality not proven;
``HEURISTIC`` = heuristic result with no solver involvement (or the solver found nothing).

Time: ``time_limit_s`` is wall-clock seconds for the whole call (heuristics and model building
included; CP-SAT's ``max_time_in_seconds`` gets what is left), ``math.inf`` for none.
Determinism: heuristics, model building and expansion are deterministic (stable sorts, index
tie-breaks). CP-SAT runs with ``interleave_search`` (its workers' trajectories do not depend on
thread timing), ``random_seed = seed`` and a deterministic-time budget (``max_deterministic_time``:
``deterministic_time``, default DET_TIME_PER_SECOND * time_limit_s), so a solve that ends by proof,
gap limit or that budget is repeatable. On a loaded machine the wall clock may fire first and the
solution may then differ between runs (never worse than the warm start): for a reproducible plan,
give ``deterministic_time`` and ``time_limit_s=math.inf`` (``--deterministic-time`` on the CLI).
"""
from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

__all__ = [
    "PackResult",
    "makespan_lower_bound",
    "pack",
    "pack_cpsat",
    "pack_kk",
    "pack_lpt",
    "pack_multifit",
]

OPT_RTOL = 1e-9  # makespan within this relative distance of the lower bound counts as proven optimal
GOOD_ENOUGH_RTOL = 1e-5  # pack() skips CP-SAT when a heuristic is this close to the lower bound
EXACT_MAX_VARS = 12_000  # exact (lossless) model if (#distinct work values) * m stays below this
EXACT_RESOLUTION_PER_JOB = 1e10  # exact mode: U = 1e10 * n units per LB (rounding <= 1e-10 rel.)
EXACT_RESOLUTION_MAX = 2.0**44
AGG_MAX_VARS = 4_096  # aggregated mode: at most this many y_tm variables
AGG_CLASS_EPS = 1e-3  # relative width of a large-job class
AGG_RESOLUTION = 1e9
AGG_REL_GAP = 1e-4
SYMMETRY_BREAKING = "largest"  # "largest" | "loads" | "none" (see module docstring)
# CP-SAT's deterministic clock ran at 0.5-1.6 units per wall second (2 workers, interleaved) in
# our measurements; budgeting 0.4 unit per second of ``time_limit_s`` lets the deterministic
# limit, not the wall clock, end the search on ordinary hardware, which keeps results repeatable.
DET_TIME_PER_SECOND = 0.4
DEFAULT_DETERMINISTIC_TIME = DET_TIME_PER_SECOND * 5.0  # the budget when there is no wall limit either
MIN_SOLVE_S = 0.01  # less wall time than this left after the heuristics: CP-SAT is not started
EXACT_REL_GAP = 1e-4  # exact mode stops within 0.01 % of its bound (a plan needs no more; FEASIBLE unless closed)
MULTIFIT_MAX_JOBS = 5_000  # pack(): run multifit only up to this many jobs (O(iter * n log m))
KK_MAX_CELLS = 200_000  # pack(): run KK only while n * m stays below this (O(n m log m))
_MAX_ACTIVITY = 2.0**60  # keep every CP-SAT linear expression far from int64 overflow
_COEF_SHRINK = 1.0 - 1e-14  # applied before floor() so float division never rounds a coefficient up
_INT_MAX_TOTAL = 2.0**50  # integral work with rational speeds is modelled exactly, unscaled
_EPS = float(np.finfo(np.float64).eps)


@dataclass(frozen=True, slots=True)
class PackResult:
    assignment: np.ndarray  # int32, len n_jobs, machine index per job
    makespan: float  # max over machines of load/speed, same units as work/speed
    lower_bound: float  # a valid lower bound on the optimal makespan of this problem
    status: str  # "OPTIMAL" | "FEASIBLE" | "HEURISTIC"
    method: str  # "cpsat" | "lpt" | "multifit" | "kk": what produced the assignment
    solve_time_s: float


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _check(work: np.ndarray, speeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert inputs; errors name what the caller must fix."""
    w = np.ascontiguousarray(work, dtype=np.float64)
    s = np.ascontiguousarray(speeds, dtype=np.float64)
    if w.ndim != 1:
        raise ValueError(f"work must be 1-D, got shape {w.shape}")
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"speeds must be a non-empty 1-D array, got shape {s.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("work must be finite and >= 0")
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError("speeds must be finite and > 0")
    return w, s


def _machine_loads(w: np.ndarray, m: int, assignment: np.ndarray) -> np.ndarray:
    return np.bincount(assignment, weights=w, minlength=m)[:m].astype(np.float64, copy=False)


def _makespan(w: np.ndarray, s: np.ndarray, assignment: np.ndarray) -> float:
    """Makespan of an assignment, from the float work (the one definition used everywhere)."""
    if w.size == 0:
        return 0.0
    return float(np.max(_machine_loads(w, s.size, assignment) / s))


def _identical(s: np.ndarray) -> bool:
    return bool(np.all(s == s[0]))


def _proven(makespan: float, lb: float) -> bool:
    return makespan <= lb * (1.0 + OPT_RTOL)


def _result(
    w: np.ndarray, s: np.ndarray, a: np.ndarray, lb: float, method: str, t0: float,
    status: str | None = None,
) -> PackResult:
    a = np.ascontiguousarray(a, dtype=np.int32)
    mk = _makespan(w, s, a)
    if status is None:
        status = "HEURISTIC"
    if _proven(mk, lb):
        status = "OPTIMAL"
    return PackResult(a, mk, float(lb), status, method, time.perf_counter() - t0)


def _lower_bound(w: np.ndarray, s: np.ndarray) -> float:
    n, m = w.size, s.size
    if n == 0:
        return 0.0
    ws = np.sort(w)[::-1]
    if ws[0] <= 0.0:
        return 0.0
    ss = np.sort(s)[::-1]
    k = min(n, m)
    lb = float(np.max(np.cumsum(ws[:k]) / np.cumsum(ss[:k])))  # prefix bound (k=1: max w / s_max)
    total = math.fsum(ws.tolist())
    lb = max(lb, total / math.fsum(ss.tolist()))  # volume bound
    if n > 1:  # pair bound, k = 1..min(m, n-1) (1-based)
        kk = np.arange(1, min(m, n - 1) + 1)
        pair = (ws[kk - 1] + ws[kk]) / ss[0]
        spill = np.where(kk < m, ws[kk] / ss[np.minimum(kk, m - 1)], np.inf)
        lb = max(lb, float(np.max(np.minimum(pair, spill))))
    r_max = (n - 1) // m
    if r_max >= 1:  # pigeonhole: r*m+1 largest jobs, one machine holds r+1 of them
        csum = np.concatenate(([0.0], np.cumsum(ws)))
        r = np.arange(1, r_max + 1)
        hi = r * m + 1
        lb = max(lb, float(np.max(csum[hi] - csum[hi - r - 1])) / ss[0])
    lb *= 1.0 - 4.0 * (n + m) * _EPS
    if total <= 2.0**52 and np.all(ws == np.floor(ws)):
        _, lam, exact = _speed_multipliers(s)
        if exact:  # integral work: every makespan is max_m load_m * k_m / lam, a multiple of 1/lam
            lb = math.ceil(lb * lam) / lam
    return lb


def makespan_lower_bound(work: np.ndarray, speeds: np.ndarray) -> float:
    """A valid lower bound on the optimal makespan (see module docstring for the terms)."""
    w, s = _check(work, speeds)
    return _lower_bound(w, s)


# --------------------------------------------------------------------------------------------
# LPT
# --------------------------------------------------------------------------------------------
def _lpt_fill(
    w: np.ndarray, s: np.ndarray, jobs: np.ndarray, assignment: np.ndarray, loads: np.ndarray,
) -> None:
    """Place ``jobs`` (any order; sorted here, largest first) where each finishes earliest.

    Updates ``assignment`` and ``loads`` (float work per machine) in place. Ties go to the
    faster group, then the lower machine index, so the result is deterministic.
    """
    if jobs.size == 0:
        return
    jobs = jobs[np.argsort(-w[jobs], kind="stable")]
    wl = w[jobs].tolist()
    out = np.empty(jobs.size, dtype=np.int32)
    speeds_u = np.unique(s)[::-1]  # distinct speeds, fastest first
    if speeds_u.size <= 8:
        heaps = []
        for sp in speeds_u.tolist():
            idx = np.flatnonzero(s == sp).tolist()
            h = [(float(loads[i]), i) for i in idx]
            heapq.heapify(h)
            heaps.append(h)
        if len(heaps) == 1:
            h = heaps[0]
            for k, wj in enumerate(wl):
                ld, i = h[0]
                out[k] = i
                heapq.heapreplace(h, (ld + wj, i))
        else:
            sp_l = speeds_u.tolist()
            ng = len(heaps)
            for k, wj in enumerate(wl):
                best_g, best_t = 0, (heaps[0][0][0] + wj) / sp_l[0]
                for g in range(1, ng):
                    t = (heaps[g][0][0] + wj) / sp_l[g]
                    if t < best_t:
                        best_g, best_t = g, t
                h = heaps[best_g]
                ld, i = h[0]
                out[k] = i
                heapq.heapreplace(h, (ld + wj, i))
        loads[:] = 0.0
        for h in heaps:
            for ld, i in h:
                loads[i] = ld
    else:  # many distinct speeds: one vectorised argmin per job, machines fastest first
        rank = np.lexsort((np.arange(s.size), -s))  # position -> machine
        ld, sp = loads[rank].copy(), s[rank]
        for k, wj in enumerate(wl):
            r = int(np.argmin((ld + wj) / sp))
            out[k] = rank[r]
            ld[r] += wj
        loads[rank] = ld
    assignment[jobs] = out


def _lpt(w: np.ndarray, s: np.ndarray) -> np.ndarray:
    a = np.zeros(w.size, dtype=np.int32)
    _lpt_fill(w, s, np.arange(w.size), a, np.zeros(s.size))
    return a


def pack_lpt(work: np.ndarray, speeds: np.ndarray) -> PackResult:
    """Longest processing time first: fast (100k jobs in ~0.1 s) and within 4/3 of optimal."""
    t0 = time.perf_counter()
    w, s = _check(work, speeds)
    return _result(w, s, _lpt(w, s), _lower_bound(w, s), "lpt", t0)


# --------------------------------------------------------------------------------------------
# Multifit
# --------------------------------------------------------------------------------------------
def _ffd(wl: list[float], m: int, cap: float) -> list[int] | None:
    """First-fit decreasing into m bins of capacity ``cap``; None if some job does not fit.

    A max segment tree over remaining capacities finds the first bin that fits in O(log m).
    """
    size = 1
    while size < m:
        size *= 2
    tree = [-math.inf] * (2 * size)
    for b in range(m):
        tree[size + b] = cap
    for i in range(size - 1, 0, -1):
        tree[i] = max(tree[2 * i], tree[2 * i + 1])
    out = []
    for wj in wl:
        if tree[1] < wj:
            return None
        i = 1
        while i < size:
            i = 2 * i if tree[2 * i] >= wj else 2 * i + 1
        out.append(i - size)
        tree[i] -= wj
        i //= 2
        while i:
            a, b = tree[2 * i], tree[2 * i + 1]
            tree[i] = a if a >= b else b
            i //= 2
    return out


def pack_multifit(work: np.ndarray, speeds: np.ndarray, iterations: int = 20) -> PackResult:
    """Coffman-Garey-Johnson multifit (identical machines; falls back to LPT otherwise).

    Often beats LPT on few-jobs-per-machine instances, where LPT's 4/3 worst case lives.
    """
    t0 = time.perf_counter()
    w, s = _check(work, speeds)
    lb = _lower_bound(w, s)
    n, m = w.size, s.size
    if n == 0 or m == 1 or not _identical(s) or lb == 0.0:
        res = _result(w, s, _lpt(w, s), lb, "lpt", t0)
        if n == 0 or m == 1 or lb == 0.0:  # trivially optimal: report as multifit's own
            return PackResult(res.assignment, res.makespan, lb, "OPTIMAL", "multifit",
                              time.perf_counter() - t0)
        return res
    order = np.argsort(-w, kind="stable")
    wl = w[order].tolist()
    total = math.fsum(wl)
    lo = max(total / m, wl[0])
    hi = max(2.0 * total / m, wl[0])
    best = _ffd(wl, m, hi)
    if best is None:  # cannot happen per CGJ; guard against float edge cases
        return _result(w, s, _lpt(w, s), lb, "lpt", t0)
    for _ in range(max(0, iterations)):
        mid = 0.5 * (lo + hi)
        got = _ffd(wl, m, mid)
        if got is None:
            lo = mid
        else:
            hi, best = mid, got
    a = np.empty(n, dtype=np.int32)
    a[order] = np.asarray(best, dtype=np.int32)
    return _result(w, s, a, lb, "multifit", t0)


# --------------------------------------------------------------------------------------------
# Karmarkar-Karp largest differencing
# --------------------------------------------------------------------------------------------
def pack_kk(work: np.ndarray, speeds: np.ndarray) -> PackResult:
    """Karmarkar-Karp m-way differencing (identical machines; falls back to LPT otherwise).

    Strong when jobs are many and of similar size; O(n m log m) time and O(n m) memory.
    """
    t0 = time.perf_counter()
    w, s = _check(work, speeds)
    lb = _lower_bound(w, s)
    n, m = w.size, s.size
    if not _identical(s):
        return _result(w, s, _lpt(w, s), lb, "lpt", t0)
    if n == 0:
        return _result(w, s, np.zeros(0, np.int32), lb, "kk", t0)
    left: list[int] = []
    right: list[int] = []
    pad = [0.0] * (m - 1)
    nil = [-1] * (m - 1)
    wl = w.tolist()
    # heap entries: (-(max - min), tiebreak, sums desc, node per bin); leaves 0..n-1 are jobs
    heap = [(-wl[j], j, [wl[j]] + pad, [j] + nil) for j in range(n)]
    heapq.heapify(heap)
    counter = n
    while len(heap) > 1:
        _, _, sa, na = heapq.heappop(heap)
        _, _, sb, nb = heapq.heappop(heap)
        merged = []
        for i in range(m):
            x, y = na[i], nb[m - 1 - i]
            if x < 0:
                node = y
            elif y < 0:
                node = x
            else:
                node = n + len(left)
                left.append(x)
                right.append(y)
            merged.append((sa[i] + sb[m - 1 - i], node))
        merged.sort(key=lambda t: -t[0])
        sums = [t[0] for t in merged]
        heapq.heappush(heap, (-(sums[0] - sums[-1]), counter, sums, [t[1] for t in merged]))
        counter += 1
    a = np.zeros(n, dtype=np.int32)
    for b, root in enumerate(heap[0][3]):
        stack = [root] if root >= 0 else []
        while stack:
            v = stack.pop()
            if v < n:
                a[v] = b
            else:
                stack.append(left[v - n])
                stack.append(right[v - n])
    return _result(w, s, a, lb, "kk", t0)


# --------------------------------------------------------------------------------------------
# CP-SAT
# --------------------------------------------------------------------------------------------
@dataclass(slots=True)
class _Model:
    """The integer model in arrays (see module docstring), before it is handed to CP-SAT."""

    exact: bool  # lossless types (one per distinct work value), no fluid
    tau: float  # seconds of makespan per model unit
    loss: int  # model T can undercut the float makespan / tau by at most this many units
    members: list[np.ndarray]  # job ids per type (exact: equal work; aggregated: desc work)
    counts: np.ndarray  # c_t
    p: np.ndarray  # (types, m) int64 units
    small: np.ndarray  # job ids placed by LPT after the solve (zero work, aggregated fluid)
    g: float  # fluid unit of work
    q: np.ndarray  # (m,) int64 units per fluid unit
    fluid: int  # F


def _build(w: np.ndarray, s: np.ndarray, lb: float) -> _Model:
    m = s.size
    pos = np.flatnonzero(w > 0)
    zero = np.flatnonzero(w <= 0)
    activity_cap = _MAX_ACTIVITY / (math.fsum(s.tolist()) / float(s.min()))
    vals, inv = np.unique(w[pos], return_inverse=True)
    if vals.size * m <= EXACT_MAX_VARS:
        mult, lam = None, 0.0
        total = math.fsum(w[pos].tolist())
        if total <= _INT_MAX_TOTAL and bool(np.all(vals == np.round(vals))):
            mult, lam, _ = _speed_multipliers(s)
            if mult is not None and total * float(mult.max()) > _INT_MAX_TOTAL:
                mult = None
        if mult is not None:  # e.g. token counts: p_tm = w_t * k_m exactly, no rounding at all
            tau, loss = 1.0 / lam, 0
        else:
            U = min(EXACT_RESOLUTION_PER_JOB * max(1, pos.size), EXACT_RESOLUTION_MAX, activity_cap)
            tau, loss = lb / U, int(pos.size)
        by_type = np.argsort(inv, kind="stable")
        bounds = np.searchsorted(inv[by_type], np.arange(vals.size + 1))
        members = [pos[by_type[bounds[t]:bounds[t + 1]]] for t in range(vals.size)]
        reps = vals
        small = zero
        g, q, fluid = 0.0, np.zeros(m, np.int64), 0
        exact = True
    else:
        U = min(AGG_RESOLUTION, activity_cap)
        tau, loss = lb / U, int(pos.size)
        pw = w[pos]
        order = np.argsort(-pw, kind="stable")
        pos_sorted, pw_sorted = pos[order], pw[order]
        cls = np.floor(np.log(pw_sorted[0] / pw_sorted) / math.log1p(AGG_CLASS_EPS)).astype(np.int64)
        ucls = np.unique(cls)
        k = max(1, AGG_MAX_VARS // m)
        last = ucls[min(k, ucls.size) - 1]
        n_big = int(np.searchsorted(cls, last, side="right"))  # cls is non-decreasing
        cb = cls[:n_big]
        starts = np.flatnonzero(np.r_[True, cb[1:] != cb[:-1]])
        ends = np.r_[starts[1:], n_big]
        members = [pos_sorted[a:b] for a, b in zip(starts.tolist(), ends.tolist())]
        reps = np.array([pw_sorted[b - 1] for b in ends.tolist()])  # min work of the class
        small = np.concatenate([pos_sorted[n_big:], zero])
        g = math.sqrt(U) * float(s.max()) * tau
        q = np.floor(g / (s * tau) * _COEF_SHRINK).astype(np.int64)
        w_small = math.fsum(pw_sorted[n_big:].tolist())
        fluid = max(0, int(math.floor(w_small / g)) - m - 1)
        exact = False
    if exact and loss == 0:
        p = np.round(reps).astype(np.int64)[:, None] * mult[None, :]
    else:
        p = np.floor(reps[:, None] / (s[None, :] * tau) * _COEF_SHRINK).astype(np.int64)
    counts = np.array([len(x) for x in members], dtype=np.int64)
    return _Model(exact, tau, loss, members, counts, p, small, g, q, fluid)


def _speed_multipliers(s: np.ndarray) -> tuple[np.ndarray | None, float, bool]:
    """Integers k_m and lam with s_m * k_m = lam for all m, if the speeds are (up to float
    rounding) rationals with denominators <= 1000 and k_m stays small; else (None, 0, False).

    With integral work, time in units of 1 / lam is then w_j * k_m: an exact integer model.
    The flag says whether every speed equals its fraction exactly (no float rounding at all).
    """
    fr = {}
    exact = True
    for x in np.unique(s).tolist():
        f = Fraction(x).limit_denominator(1000)
        if abs(float(f) - x) > 4.0 * _EPS * x:
            return None, 0.0, False
        exact = exact and f == Fraction(x)
        fr[x] = f
    num = math.lcm(*(f.numerator for f in fr.values()))
    den = math.gcd(*(f.denominator for f in fr.values()))
    k = {x: (num // f.numerator) * (f.denominator // den) for x, f in fr.items()}
    if max(k.values()) > 1_000_000:
        return None, 0.0, False
    return np.array([k[x] for x in s.tolist()], dtype=np.int64), num / den, exact


def _speed_groups(s: np.ndarray) -> list[np.ndarray]:
    return [np.flatnonzero(s == sp) for sp in np.unique(s)[::-1]]


def _model_loads(md: _Model, y: np.ndarray, f: np.ndarray) -> np.ndarray:
    return (md.p * y).sum(axis=0) + md.q * f


def _hint_values(
    md: _Model, w: np.ndarray, s: np.ndarray, hint: np.ndarray, groups: list[np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """The hint in model variables, machines relabelled within their speed group so that it
    satisfies the symmetry breaking; it is then a feasible solution (T = its max load)."""
    m = s.size
    types = len(md.members)
    y = np.zeros((types, m), dtype=np.int64)
    for t, mem in enumerate(md.members):
        y[t] = np.bincount(hint[mem], minlength=m)[:m]
    f = np.zeros(m, dtype=np.int64)
    if md.fluid > 0:
        small_pos = md.small[w[md.small] > 0]
        sl = _machine_loads(w[small_pos], m, hint[small_pos])
        f = np.floor(sl / md.g).astype(np.int64)
        excess = int(f.sum()) - md.fluid
        for i in np.argsort(-f, kind="stable").tolist():  # trim to exactly F units
            if excess <= 0:
                break
            d = min(excess, int(f[i]))
            f[i] -= d
            excess -= d
        if excess < 0:  # float edge case: top up one machine so that sum f = F holds exactly
            f[int(np.argmin(f))] -= excess
    loads = _model_loads(md, y, f)
    perm = np.arange(m)  # model machine k takes the hint's machine perm[k]
    if SYMMETRY_BREAKING == "loads":
        for grp in groups:
            perm[grp] = grp[np.argsort(-loads[grp], kind="stable")]
    elif SYMMETRY_BREAKING == "largest" and types:
        holder = int(np.flatnonzero(y[_largest_type(md)] > 0)[0])
        grp = next(g for g in groups if holder in g)
        perm[grp[0]], perm[holder] = holder, int(grp[0])
    return y[:, perm], f[perm]


def _largest_type(md: _Model) -> int:
    return int(np.argmax(md.p.max(axis=1)))


def _t_lo(md: _Model, s: np.ndarray, lb: float) -> int:
    """A valid lower bound on T for the integer model (see docstring).

    In exact mode every float assignment A has T(A) >= C(A) / tau - loss, hence the analytic
    bound carries over; the fluid of aggregated mode may split jobs, so there only the volume
    and the largest-item terms (which hold for the relaxation itself) are used.
    """
    lo = 0
    if md.exact:
        lo = max(0, math.ceil(lb / md.tau * _COEF_SHRINK) - md.loss)
    if md.p.shape[0]:
        lo = max(lo, int(md.p.min(axis=1).max()))
        vol = float((md.counts * (md.p * s[None, :]).min(axis=1)).sum())
    else:
        vol = 0.0
    if md.fluid > 0:
        vol += md.fluid * float((md.q * s).min())
    vol_lo = math.ceil(vol / math.fsum(s.tolist()) * _COEF_SHRINK) if vol > 0 else 0
    return max(lo, vol_lo, 0)


def pack_cpsat(
    work: np.ndarray,
    speeds: np.ndarray,
    time_limit_s: float = 5.0,
    workers: int = 2,
    seed: int = 0,
    hint: np.ndarray | None = None,
    deterministic_time: float | None = None,
) -> PackResult:
    """Solve the MIP of the module docstring with CP-SAT, warm-started from ``hint`` (or LPT).

    ``time_limit_s``: wall-clock seconds, model building included (``math.inf``: none);
    ``deterministic_time``: CP-SAT's deterministic budget (default DET_TIME_PER_SECOND * time_limit_s).
    Falls back to LPT with status HEURISTIC if CP-SAT returns no solution in time.
    """
    from ortools.sat.python import cp_model  # deferred: keeps heuristics importable without it

    t0 = time.perf_counter()
    w, s = _check(work, speeds)
    n, m = w.size, s.size
    lb = _lower_bound(w, s)
    if n == 0 or lb == 0.0 or m == 1:  # closed form: every assignment (or the trivial one) is optimal
        return _result(w, s, np.zeros(n, np.int32), lb, "cpsat", t0, "OPTIMAL")
    if hint is None:
        hint = _lpt(w, s)
    else:
        hint = np.asarray(hint)
        if hint.shape != (n,) or np.any(hint < 0) or np.any(hint >= m):
            raise ValueError(f"hint must have shape ({n},) with machine indices in [0, {m})")
        hint = hint.astype(np.int64)

    md = _build(w, s, lb)
    groups = _speed_groups(s)
    types = len(md.members)
    y_h, f_h = _hint_values(md, w, s, hint, groups)
    loads_h = _model_loads(md, y_h, f_h)
    t_lo = _t_lo(md, s, lb)
    t_hi = max(int(loads_h.max()), t_lo)

    model = cp_model.CpModel()
    y = [[None] * m for _ in range(types)]
    for t in range(types):
        c = int(md.counts[t])
        for i in range(m):
            y[t][i] = model.new_bool_var(f"x{t}_{i}") if c == 1 else model.new_int_var(0, c, f"y{t}_{i}")
        model.add(sum(y[t]) == c)
    f = None
    if md.fluid > 0:
        f = [model.new_int_var(0, md.fluid, f"f{i}") for i in range(m)]
        model.add(sum(f) == md.fluid)
    T = model.new_int_var(t_lo, t_hi, "T")
    load_expr = []
    for i in range(m):
        vs = [y[t][i] for t in range(types) if md.p[t, i] != 0]
        cs = [int(md.p[t, i]) for t in range(types) if md.p[t, i] != 0]
        if f is not None and md.q[i] != 0:
            vs.append(f[i])
            cs.append(int(md.q[i]))
        expr = cp_model.LinearExpr.weighted_sum(vs, cs) if vs else 0
        load_expr.append(expr)
        if vs:
            model.add(expr <= T)
    if SYMMETRY_BREAKING == "loads":
        for grp in groups:  # symmetry breaking within each equal-speed group
            gl = grp.tolist()
            for a, b in zip(gl[:-1], gl[1:]):
                if not isinstance(load_expr[b], int):
                    model.add(load_expr[a] >= load_expr[b])
    elif SYMMETRY_BREAKING == "largest" and types:
        t_max = _largest_type(md)
        model.add(sum(y[t_max][int(grp[0])] for grp in groups) >= 1)
    model.minimize(T)
    for t in range(types):
        for i in range(m):
            model.add_hint(y[t][i], int(y_h[t, i]))
    if f is not None:
        for i in range(m):
            model.add_hint(f[i], int(f_h[i]))
    model.add_hint(T, t_hi)

    solver = cp_model.CpSolver()
    prm = solver.parameters
    # The deterministic budget ends the search repeatably on a machine with time to spare; the wall
    # clock (what is left of time_limit_s after building the model) is the limit the user asked for.
    remaining = float(time_limit_s) - (time.perf_counter() - t0)
    if math.isfinite(remaining):
        prm.max_time_in_seconds = max(MIN_SOLVE_S, remaining)
    prm.max_deterministic_time = deterministic_budget(time_limit_s, deterministic_time)
    prm.num_workers = max(1, int(workers))
    prm.random_seed = int(seed)
    prm.interleave_search = True
    prm.log_search_progress = False
    abs_gap = md.loss + 2.0 if md.loss else 0.5  # below the rounding noise (exact if integral)
    prm.absolute_gap_limit = abs_gap
    prm.relative_gap_limit = EXACT_REL_GAP if md.exact else AGG_REL_GAP
    st = solver.solve(model)

    if st not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return _result(w, s, _lpt(w, s), lb, "lpt", t0, "HEURISTIC")

    bound = solver.best_objective_bound
    lb = max(lb, math.floor(bound + 1e-9) * md.tau * _COEF_SHRINK)

    a = np.zeros(n, dtype=np.int32)
    loads = np.zeros(m)
    yv = np.array([[solver.value(y[t][i]) for i in range(m)] for t in range(types)], dtype=np.int64)
    for t in range(types):
        mem = md.members[t]
        quota = yv[t]
        if md.exact:  # equal work: any order is the same schedule
            a[mem] = np.repeat(np.arange(m, dtype=np.int32), quota)
            loads += quota * w[mem[0]]
        else:  # decreasing work, each to the quota-holding machine that finishes it first
            quota = quota.copy()
            for j in mem.tolist():
                fin = np.where(quota > 0, (loads + w[j]) / s, np.inf)
                i = int(np.argmin(fin))
                a[j] = i
                loads[i] += w[j]
                quota[i] -= 1
    _lpt_fill(w, s, md.small, a, loads)
    # CP-SAT says OPTIMAL also when it stops at the relative gap limit: check the gap ourselves.
    closed = solver.objective_value - bound <= abs_gap
    status = "OPTIMAL" if (md.exact and closed) else "FEASIBLE"
    return _result(w, s, a, lb, "cpsat", t0, status)


# --------------------------------------------------------------------------------------------
# front door
# --------------------------------------------------------------------------------------------
_HEURISTICS = {"lpt": pack_lpt, "multifit": pack_multifit, "kk": pack_kk}


def deterministic_budget(time_limit_s: float, deterministic_time: float | None = None) -> float:
    """CP-SAT's deterministic-time budget: the one given, else DET_TIME_PER_SECOND x the wall limit."""
    if deterministic_time is not None:
        if not (deterministic_time > 0 and math.isfinite(deterministic_time)):
            raise ValueError(f"deterministic_time must be a finite number > 0, got {deterministic_time!r}")
        return float(deterministic_time)
    if not time_limit_s > 0:
        raise ValueError(f"time_limit_s must be > 0 (or math.inf), got {time_limit_s!r}")
    return DET_TIME_PER_SECOND * time_limit_s if math.isfinite(time_limit_s) else DEFAULT_DETERMINISTIC_TIME


def pack(
    work: np.ndarray,
    speeds: np.ndarray,
    method: str = "cpsat",
    time_limit_s: float = 5.0,
    workers: int = 2,
    seed: int = 0,
    deterministic_time: float | None = None,
) -> PackResult:
    """Pack jobs onto machines with ``method``; "cpsat" = best of heuristics and CP-SAT.

    With "cpsat", LPT always runs, multifit when n <= MULTIFIT_MAX_JOBS and KK when
    n * m <= KK_MAX_CELLS (identical machines); the best warm-starts CP-SAT, which gets what is
    left of ``time_limit_s`` (wall seconds; none left: the best heuristic, HEURISTIC) within its
    ``deterministic_time`` budget. If a heuristic already meets the lower bound, CP-SAT is skipped.
    The lower bound returned is the best of all bounds; CP-SAT's assignment is returned only
    if it is strictly better than its warm start (so ``method`` names who actually found it).
    """
    t0 = time.perf_counter()
    if method in _HEURISTICS:
        return _HEURISTICS[method](work, speeds)
    if method != "cpsat":
        raise ValueError(f"unknown method {method!r}; use 'cpsat', 'lpt', 'multifit' or 'kk'")
    w, s = _check(work, speeds)
    n, m = w.size, s.size
    cands = [pack_lpt(w, s)]
    if _identical(s) and n <= MULTIFIT_MAX_JOBS:
        cands.append(pack_multifit(w, s))
    if _identical(s) and n * m <= KK_MAX_CELLS:
        cands.append(pack_kk(w, s))
    best_h = min(cands, key=lambda r: r.makespan)  # stable: earlier heuristic wins ties
    lb = max(r.lower_bound for r in cands)
    if _proven(best_h.makespan, lb) or n == 0:
        return PackResult(best_h.assignment, best_h.makespan, lb, "OPTIMAL", best_h.method,
                          time.perf_counter() - t0)
    if best_h.makespan <= lb * (1.0 + GOOD_ENOUGH_RTOL):
        # already within the gap CP-SAT would be asked to close: solving cannot pay off
        return PackResult(best_h.assignment, best_h.makespan, lb, "FEASIBLE", best_h.method,
                          time.perf_counter() - t0)
    budget = deterministic_budget(time_limit_s, deterministic_time)   # of the whole call, not of what is left
    remaining = float(time_limit_s) - (time.perf_counter() - t0)
    if remaining < MIN_SOLVE_S:
        return PackResult(best_h.assignment, best_h.makespan, lb, "HEURISTIC", best_h.method,
                          time.perf_counter() - t0)
    cp = pack_cpsat(w, s, time_limit_s=remaining, workers=workers, seed=seed,
                    hint=best_h.assignment, deterministic_time=budget)
    lb = max(lb, cp.lower_bound)
    solver_ran = cp.method == "cpsat"
    # CP-SAT must strictly improve on its warm start to be credited with the assignment.
    best = cp if solver_ran and cp.makespan < best_h.makespan else best_h
    if cp.status == "OPTIMAL" and best.makespan <= cp.makespan:
        status = "OPTIMAL"
    else:
        status = "FEASIBLE" if solver_ran else "HEURISTIC"
    if _proven(best.makespan, lb):
        status = "OPTIMAL"
    return PackResult(best.assignment, best.makespan, lb, status, best.method,
                      time.perf_counter() - t0)
