"""A theoretical lower bound on the total inference time that *no* schedule can beat.

Valid for every schedule ``ReplicaState`` accepts, preemptions and recompute included; the
proofs are in docs/scheduling.md section 2. The argument is per iteration. With

    m   = min(decode.base, max(prefill.floor, prefill.base))   (no iteration is cheaper)
    rho = prefill.per_token                                    if m <= prefill.base
          prefill.per_token * (M - m) / (M - prefill.base)     else,  M = max(floor, prefill.base)

every iteration costs at least both of

    lin_dec + rho * C + max(m, [prefill.base + per_token * a + per_token_sq * A])
    lin_dec + rho * (C + a) + per_token_sq * A + m

where ``lin_dec`` is the per-sequence and per-context part of its decode tokens, ``C`` its
recompute tokens (prompt + generated again after a preemption), ``a`` and ``A`` its first-prefill
tokens and attention work (the bracket only when it has some): a prefill of T tokens costs at
least ``max(M, prefill.base + per_token * T)``, which is at least ``m + rho * T``. A token of request r at context
``c`` costs the replica at least ``min(per_seq + per_ctx * c, rho * c)`` (``lin'`` below): a
decode token the first, a recompute the second. Three families follow, the bound is their
maximum:

* **chain**: request r cannot finish before its prefill and its ``O_r - 1`` later tokens, each at
  least a step of a batch of one at its context (a decode step, or a recompute prefill alone),
  on the fastest group; with arrivals, not before ``arrival_r + chain_r``.
* **work**: each of ``R`` replicas runs at most ``B`` sequences and ``K`` KV tokens per iteration,
  and each sequence needs ``O_r`` iterations (its first prefill's last one included), so::

      R * T >= sum_r min_g [lin'_rg + (m_g O_r / B_g  or  m_g KV_r / K_g) + pre_rg]   and
      R * T >= sum_r min_g [lin'_rg + y_rg]

  with ``KV_r = O_r P_r + O_r (O_r - 1) / 2`` token-iterations and ``y`` the first prefill's
  linear and quadratic part plus its share of the prefill base, ``pre = rho P + per_token_sq P^2``
  what a prompt adds on top of the iteration it rides in. With arrivals, the requests
  arriving at or after t need ``t + their work / R``. With several groups, the cheapest group
  for every request overstates capacity; a linear program over fractional assignments
  (OR-Tools GLOP) gives a tighter, still valid, value, and taking apart the replica that holds
  the longest request and the one that holds the longest request not on it (each runs at least
  that request's iterations, full or not: ``_lp_two_longest``) tighter still. Every replica that
  holds a request also pays its start-up (``_ramp``): empty slots and dear prefills before its
  first batch is whole.
* **steps**: a replica holding set S runs at least ``max_r O_r`` iterations, so
  ``T >= lin'(S) + m * max(max O, sum O / B, sum KV / K)`` (and ``>= lin'(S) + y(S)``). Which
  replica holds the longest requests is unknown: mixing the terms with weights and relaxing to
  fractional assignments, requests sorted longest first, feasibility of T is a nested (Hall)
  condition that a greedy decides exactly; a bisection finds the least feasible T.

The value is shrunk by a few ulps so float summation order can never lift it above a makespan.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from ..config import ClusterSpec, ReplicaGroupSpec
from ..workload import Request

MAX_PATTERNS = 512           # group orders tried by the steps bound on mixed clusters
LP_MAX_TYPES = 4000          # distinct (prompt, output) pairs the work LP takes


@dataclass(frozen=True, slots=True)
class LowerBound:
    value_s: float
    chain_s: float          # longest single request (with its arrival)
    work_s: float           # total work over total capacity (with arrivals)
    critical_request: str   # id of the request achieving chain_s
    steps_s: float = 0.0    # iterations of the longest requests on their replicas (batch at t0)


@dataclass(frozen=True, slots=True)
class _Terms:
    """Per-request lower-bound terms on one group (seconds; ``m`` per iteration)."""
    lin: np.ndarray         # lin': per-token cost beyond the per-iteration minimum
    y: np.ndarray           # first prefill: linear + quadratic part + share of the prefill base
    pre: np.ndarray         # first prefill's part that rides on top of the per-iteration m: rho P + sq P^2
    pre_full: np.ndarray    # the same at the prefill's own per-token price: per_token P + sq P^2
    kv: np.ndarray          # KV token-iterations
    o: np.ndarray           # output tokens: iterations each request needs
    m: float
    m_pre: float            # min(prefill base, m): what an iteration costs beyond its tokens at full price
    batch: float
    kv_cap: float


def iteration_floor(g: ReplicaGroupSpec) -> tuple[float, float]:
    """(m, rho): no iteration costs less than m; a recompute token at context c at least rho*c."""
    pc, dc = g.cost_model.prefill, g.cost_model.decode
    big = max(pc.floor_s, pc.base_s)
    m = min(dc.base_s, big)
    rho = pc.per_token_s if m <= pc.base_s else pc.per_token_s * (big - m) / (big - pc.base_s)
    return m, rho


def _terms(g: ReplicaGroupSpec, p: np.ndarray, o: np.ndarray, pf: np.ndarray | None = None,
           pr: np.ndarray | None = None) -> _Terms:
    """``pf``: the prompt tokens a first prefill must compute (less what another request's prompt
    may have cached: ``_PrefixSharing``), which also bound the KV a request holds alone; ``pr``:
    what a recompute must compute of the prompt (less its own cacheable blocks). Both ``p`` without
    prefix caching. Decode contexts always count the whole prompt (attention reads it all)."""
    pc, dc = g.cost_model.prefill, g.cost_model.decode
    m, rho = iteration_floor(g)
    a, b = dc.per_seq_s, dc.per_ctx_token_s
    pf = p if pf is None else pf
    pr = p if pr is None else pr
    steps = np.maximum(o - 1, 0)
    tot = steps * p + steps * (steps + 1) / 2.0            # contexts P+1 .. P+steps
    if pr is p:
        if rho <= b:
            lin = rho * tot
        else:                                              # rho*c is the smaller for c <= a/(rho-b)
            k = np.floor(a / (rho - b))
            low = np.clip(k - p, 0, steps)
            s1 = low * p + low * (low + 1) / 2.0
            lin = rho * s1 + a * (steps - low) + b * (tot - s1)
    else:
        lin = _cached_lin(pc.per_token_sq_s, rho, a, b, p, pr, steps, tot)
    batch = float(min(g.max_batch_size, g.kv_capacity_tokens))
    attn = pf * pf if pf is p else pf * (2.0 * (p - pf) + pf)    # a continuation after the cached prefix
    y = pc.per_token_s * pf + pc.per_token_sq_s * attn + pc.base_s / batch
    kv = o * pf + o * (o - 1) / 2.0
    pre = rho * pf + pc.per_token_sq_s * attn
    pre_full = pc.per_token_s * pf + pc.per_token_sq_s * attn
    return _Terms(lin, y, pre, pre_full, kv, o, m, min(pc.base_s, m), batch, float(g.kv_capacity_tokens))


def _cached_lin(sq: float, rho: float, a: float, b: float, p: np.ndarray, pr: np.ndarray, steps: np.ndarray,
                tot: np.ndarray) -> np.ndarray:
    """lin' with prefix caching: the j-th later token of a request costs at least the least of a
    decode step's share at context P + j, ``a + b (P + j)``, and a recompute after its own cached
    prompt (``c = P - P_r`` tokens), which computes ``n = P_r + j`` tokens with attention
    ``n (2c + n)``: ``rho n + sq n (2c + n)``. Their difference is convex in n with one root n+ >= 0
    (the constant term is ``-(a + b c) <= 0``), so the recompute is the lesser exactly for
    ``n <= n+``: the first ``low`` tokens, summed in closed form."""
    c = p - pr
    lin_b = rho + 2.0 * sq * c - b                          # r - d = sq n^2 + lin_b n - (a + b c)
    k0 = a + b * c
    if sq > 0.0:
        root = (-lin_b + np.sqrt(lin_b * lin_b + 4.0 * sq * k0)) / (2.0 * sq)
    elif rho > b:
        root = np.where(lin_b > 0, k0 / np.where(lin_b > 0, lin_b, 1.0), np.inf)
    else:
        root = np.full_like(p, np.inf)
    low = np.clip(np.floor(root - pr), 0, steps)
    tri = low * (low + 1) / 2.0
    n1 = low * pr + tri                                     # sum of n = P_r + 1 .. P_r + low

    def s2(x: np.ndarray) -> np.ndarray:
        return x * (x + 1) * (2 * x + 1) / 6.0
    n2 = s2(pr + low) - s2(pr)
    return (rho + 2.0 * sq * c) * n1 + sq * n2 + a * (steps - low) + b * (tot - low * p - tri)


@dataclass(frozen=True, slots=True)
class _PrefixSharing:
    """What prefix caching (a group's ``prefix_caching``, requests' ``hash_ids``) lets a schedule skip,
    on one group's block size. A request's first prefill can hit only blocks another request's
    prompt also holds (``first``: its prompt less its leading shared blocks, at least the last
    token, as the engine computes it); a recompute can also hit its own prompt's blocks, cached by
    its first prefill (``recompute``); and each distinct shared block is computed at least once in
    the cluster (``shared_tokens``). Only prompt blocks are cached (``replica.py``)."""

    first: np.ndarray
    recompute: np.ndarray
    shared_tokens: float


def _sharing(g: ReplicaGroupSpec, requests: list[Request], p: np.ndarray) -> _PrefixSharing | None:
    if not g.prefix_caching or not any(q.hash_ids for q in requests):
        return None
    from ..prefix_cache import block_keys, shared_depths

    bs = g.block_size
    keys = [block_keys(q.hash_ids, q.prompt_tokens, bs) for q in requests]
    first, own = p.copy(), p.copy()
    shared: set[int] = set()
    for i, (ks, depth) in enumerate(zip(keys, shared_depths(keys))):
        limit = min(len(ks), (int(p[i]) - 1) // bs)          # the last token is always computed
        own[i] = p[i] - limit * bs
        d = min(depth, limit)
        first[i] = p[i] - d * bs
        shared.update(ks[:d])
    return _PrefixSharing(first, own, float(len(shared) * bs))


def _chain(g: ReplicaGroupSpec, t: _Terms, p: np.ndarray, o: np.ndarray, pf: np.ndarray | None = None) -> np.ndarray:
    """Request alone on a replica of g: its prefill (chunks only add floors and bases), then each
    later token by a decode step of one at its context, or a recompute prefill alone.

    If a recompute prefill of any context costs at least a decode step of one at that context
    (true when ``M >= decode(1, c1)`` at the context ``c1`` where the prefill leaves its floor, and
    the prefill's per-token cost is at least the decode's per-context cost), the decode steps
    are the chain; otherwise each later token costs at least ``m + lin'`` (the per-iteration bound).
    """
    pc, dc = g.cost_model.prefill, g.cost_model.decode
    steps = np.maximum(o - 1, 0)
    ctx = steps * p + steps * (steps + 1) / 2.0
    first = p if pf is None else pf                   # its prefix may come from another's prompt
    pre = np.maximum(pc.floor_s, pc.base_s + pc.per_token_s * first) + pc.per_token_sq_s * first * first
    big = max(pc.floor_s, pc.base_s)
    c1 = (big - pc.base_s) / pc.per_token_s if pc.per_token_s > 0 else np.inf
    # with prefix caching a recompute skips its own cached prompt: not dearer than a decode step
    recompute_dearer = (pf is None and pc.per_token_s >= dc.per_ctx_token_s and np.isfinite(c1)
                        and big >= dc.base_s + dc.per_seq_s + dc.per_ctx_token_s * c1)
    if recompute_dearer:
        return pre + steps * (dc.base_s + dc.per_seq_s) + dc.per_ctx_token_s * ctx
    return pre + steps * t.m + t.lin


def _arrays(requests: list[Request]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = np.fromiter((q.prompt_tokens for q in requests), np.float64, len(requests))
    o = np.fromiter((q.output_tokens for q in requests), np.float64, len(requests))
    a = np.fromiter((q.arrival_s for q in requests), np.float64, len(requests))
    return p, o, a


def lower_bound(cluster: ClusterSpec, requests: list[Request], thorough: bool = True, lp: bool = True) -> LowerBound:
    """Valid lower bound on the makespan (first arrival to last finish) for any schedule.

    ``thorough=False`` skips the costliest LP (two replicas apart, on mixed clusters; seconds on
    a large batch); ``lp=False`` every LP of a mixed cluster (about a second on GSM8K x `hetero`).
    The bound stays valid, only possibly lower: what an anytime planner short of time reports."""
    if not requests:
        return LowerBound(0.0, 0.0, 0.0, "")
    p, o, a = _arrays(requests)
    a = a - a.min()
    sharing = [_sharing(g, requests, p) for g in cluster.groups]
    terms = [_terms(g, p, o, sh.first, sh.recompute) if sh else _terms(g, p, o)
             for g, sh in zip(cluster.groups, sharing)]
    chains = [_chain(g, t, p, o, sh.first if sh else None) for g, t, sh in zip(cluster.groups, terms, sharing)]
    chain = np.min(chains, axis=0)
    ends = a + chain
    k = int(np.argmax(ends))
    chain_s = float(ends[k])
    works = [np.min([t.lin + w(t) for t in terms], axis=0) for w in _WORK_TERMS]
    work_s = max(_work_bound(a, w, cluster.num_replicas) for w in works)
    prefixed = any(sh is not None for sh in sharing)
    if prefixed:
        # each distinct shared block is computed once at least, at the cheapest group's token price
        once = min((iteration_floor(g)[1] * sh.shared_tokens if sh else 0.0)
                   for g, sh in zip(cluster.groups, sharing))
        works_sum = max(float(w.sum()) for w in works)
        work_s = max(work_s, (works_sum + once) / cluster.num_replicas + float(a.min()))
    steps_s = _steps_bound(cluster, terms, o)
    most = min(len(p), int(max(t.batch for t in terms)))
    pmin = np.min([sh.first if sh else p for sh in sharing], axis=0) if prefixed else p
    p_small = np.partition(pmin, most - 1)[:most]       # the smallest prompts: any replica's first batch
    ramps = [[_ramp(g, p_small, float(o.min()), lam) if lam is not None else 0.0 for lam in _RAMP_LAMS]
             for g in cluster.groups]
    if len(cluster.groups) == 1:               # every replica that holds a request starts up
        work_s = max(work_s, max(float(w.sum()) / cluster.num_replicas + r for w, r in zip(works, ramps[0])))
    elif lp and not prefixed:                 # (the LPs merge requests by (prompt, output) alone)
        # the LP rows subtract each replica's start-up from its T; valid when no schedule ends
        # before a start-up (the bound without them already says so)
        if max(map(max, ramps)) > max(chain_s, work_s, steps_s):
            ramps = [[0.0] * len(_WORK_TERMS) for _ in cluster.groups]
        pq, oq = _coarse(p, o)
        tq = terms if pq is p else [_terms(g, pq, oq) for g in cluster.groups]
        types = _types(pq, oq)                     # once: every LP below merges the same requests
        work_s = max(work_s, max(_lp_work(cluster, tq, w, types, [r[j] for r in ramps])
                                 for j, w in enumerate(_WORK_TERMS)))
        big = int(np.argmax(o))
        # two replicas apart is never below one apart (h2's rows hold on the pool's replicas too);
        # one apart is the fallback where GLOP proves nothing for two
        apart = ((thorough and _lp_two_longest(cluster, tq, chains, types, big, float(o.max()), ramps))
                 or _lp_longest(cluster, tq, chains, types, big, float(o.max()), ramps))
        steps_s = max(steps_s, apart)
    # shrink by a few ulps so float summation order can never lift the bound above a makespan
    value = max(chain_s, work_s, steps_s) * (1.0 - 1e-12)
    return LowerBound(value, chain_s, work_s, requests[k].id, steps_s)


def _mixed(lam: float, share):
    """lam * (m + rho T) + (1 - lam) * (m_pre + per_token T) per iteration, T its prefill tokens:
    below both sides of max(m + rho T, base_p + per_token T), so below every iteration's cost."""
    return lambda t: ((lam * t.m + (1 - lam) * t.m_pre) * share(t)
                      + lam * t.pre + (1 - lam) * t.pre_full)


# the work terms a request adds beyond lin': iterations (over the batch, or over the KV cache)
# priced with the prefill tokens they carry at a mix of the two per-iteration bounds; and its
# first prefill alone
_LAMS = (1.0, 0.75, 0.5, 0.25, 0.0)
_WORK_TERMS = tuple(_mixed(lam, share) for lam in _LAMS
                    for share in (lambda t: t.o / t.batch, lambda t: t.kv / t.kv_cap)) + (lambda t: t.y,)
# the mix of each work term that counts iterations over the batch (a replica's start-up adds to
# those: ``_ramp``); None for the others
_RAMP_LAMS = tuple(x for lam in _LAMS for x in (lam, None)) + (None,)
RAMP_GRID = 256              # cumulative prompt-token points of the start-up program


def _ramp(g: ReplicaGroupSpec, p_small: np.ndarray, o_min: float, lam: float) -> float:
    """Least start-up cost of a replica of g that holds any request, beyond its requests' work terms.

    Its ``I`` iterations have ``B I = sum O + E`` token slots, E of them empty, and the work term
    (mix ``lam``) counts only ``sum O / B`` iterations at ``m_lam = lam m + (1 - lam) m_pre``; an
    iteration carrying ``a > 0`` first-prefill tokens also costs ``lam * e(a)`` more than its
    term, ``e(a) = max(0, prefill.base + per_token a - m - rho a)``. Before the batch is full the
    slots must stay empty: after iteration i at most ``N_i`` requests have whole prompts, those
    prompts hold at least the ``N_i`` smallest prompts' tokens ``S(N_i)``, and iteration i has at
    least ``B - N_i`` empty slots. So the replica pays at least

        min over prefill programs of  sum_i [ lam e(a_i) + m_lam (B - N_i) / B ]

    until ``N_i = B``, a shortest path over cumulative prompt tokens (grid points rounded up, which
    only lowers it: ``N`` can only grow and ``e`` is charged one grid step less). A replica that
    holds ``n < B`` requests pays until ``N = n`` and at least ``m_lam (B - n) / B`` in each of at
    least ``o_min`` iterations; the least over n is the value."""
    pc = g.cost_model.prefill
    m, rho = iteration_floor(g)
    b = int(min(g.max_batch_size, g.kv_capacity_tokens))
    n_max = min(b, len(p_small))
    if n_max < 1 or lam <= 0.0 and m <= 0.0:
        return 0.0
    price = (lam * m + (1.0 - lam) * min(pc.base_s, m)) / b
    prefix = np.concatenate([[0.0], np.cumsum(np.sort(p_small)[:n_max])])
    step = max(1.0, float(np.ceil(prefix[-1] / RAMP_GRID)))
    k_max = int(np.ceil(prefix[-1] / step))
    points = np.arange(k_max + 1) * step
    whole = np.searchsorted(prefix, points, side="right") - 1         # N at each cumulative point
    loss = price * (b - whole)
    short = np.maximum(points - step, 0.0)                            # a step of k units: (k - 1) units
    excess = lam * np.maximum(0.0, pc.base_s + pc.per_token_s * short - m - rho * short)
    cost = np.full(k_max + 1, np.inf)
    cost[0] = 0.0
    for k in range(1, k_max + 1):
        cost[k] = float(np.min(cost[:k] + excess[k:0:-1])) + loss[k]
    reach = np.full(n_max + 1, np.inf)                               # least cost to hold n whole
    np.minimum.at(reach, whole, cost)
    reach = np.minimum.accumulate(reach[::-1])[::-1]
    best = float(reach[b]) if n_max == b else np.inf
    for n in range(1, min(n_max, b - 1) + 1):
        best = min(best, max(float(reach[n]), price * (b - n) * o_min))
    return best if np.isfinite(best) else 0.0


def _work_bound(arrival: np.ndarray, work: np.ndarray, replicas: int) -> float:
    """max over arrival times t of t + (work of requests arriving at or after t) / replicas."""
    order = np.argsort(arrival, kind="stable")
    a, w = arrival[order], work[order]
    suffix = np.cumsum(w[::-1])[::-1]
    return float(np.max(a + suffix / replicas))


def _coarse(p: np.ndarray, o: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(p, o) itself if it has at most LP_MAX_TYPES distinct pairs; else each request rounded down
    to the least prompt and output of its cell: k strata of equal count by output, each cut into k
    cells by prompt (k*k <= LP_MAX_TYPES). Every term grows with p and o, so smaller requests give
    a smaller, still valid, LP value."""
    if np.unique(np.stack([p, o]), axis=1).shape[1] <= LP_MAX_TYPES:
        return p, o
    k = int(np.sqrt(LP_MAX_TYPES))
    pq, oq = p.copy(), o.copy()
    for stratum in np.array_split(np.argsort(o, kind="stable"), k):
        for cell in np.array_split(stratum[np.argsort(p[stratum], kind="stable")], k):
            if cell.size:
                pq[cell] = p[cell].min()
                oq[cell] = o[cell].min()
    return pq, oq


def _types(p: np.ndarray, o: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Requests with equal (prompt, output) merged into one type: (counts, first index, type of
    each request); None past LP_MAX_TYPES."""
    keys, inv = np.unique(np.stack([p, o]), axis=1, return_inverse=True)
    if keys.shape[1] > LP_MAX_TYPES:
        return None
    inv = inv.ravel()
    counts = np.bincount(inv).astype(np.float64)
    first = np.zeros(keys.shape[1], dtype=np.int64)
    first[inv[::-1]] = np.arange(len(inv))[::-1]
    return counts, first, inv


def _solve_min_makespan(solver, makespan) -> float:
    from ortools.linear_solver import pywraplp
    solver.Minimize(makespan)
    if solver.Solve() != pywraplp.Solver.OPTIMAL:
        return 0.0
    # the LP's own optimum is a float answer: its dual bound is what is proven; GLOP's primal
    # optimum equals it up to its tolerance, so shrink by that tolerance
    return float(makespan.solution_value()) * (1.0 - 1e-7)


def _lp_work(cluster: ClusterSpec, terms: list[_Terms], term, types, ramp: list[float]) -> float:
    """min T with a fractional assignment of every request to groups, each group's work at most
    count * (T - ramp) (OR-Tools GLOP; ``ramp``: each group's start-up, ``_ramp``); requests with
    equal (prompt, output) merge into one type (``_types``)."""
    from ortools.linear_solver import pywraplp

    solver = pywraplp.Solver.CreateSolver("GLOP")
    if types is None or solver is None:
        return 0.0
    counts, first, _ = types
    size = [(t.lin + term(t))[first] for t in terms]
    x = [[solver.NumVar(0.0, float(c), "") for c in counts] for _ in terms]
    makespan = solver.NumVar(0.0, solver.infinity(), "T")
    for j, c in enumerate(counts):
        solver.Add(sum(x[gi][j] for gi in range(len(terms))) == float(c))
    for gi, g in enumerate(cluster.groups):
        solver.Add(sum(float(size[gi][j]) * x[gi][j] for j in range(len(counts)))
                   <= g.count * makespan - g.count * ramp[gi])
    return _solve_min_makespan(solver, makespan)


def _lp_longest(cluster: ClusterSpec, terms: list[_Terms], chain: list[np.ndarray], types,
                big: int, o_big: float, ramps: list[list[float]]) -> float:
    """The work LP with the replica h that runs the longest request L taken apart (mixed clusters).

    A started request never leaves its replica, so h runs at least ``O_L`` iterations, each at
    least ``m`` (mixed with the prefill line as in ``_mixed``), whether its batch is full or not:
    ``m I + sum_{r on h} (lin'_r + pre_r) <= T`` with ``I >= O_L``, ``B I >= sum O_r`` and
    ``K I >= sum KV_r``; the other replicas keep the work constraints, and L's own chain on that
    group holds too. Which group holds L is unknown: the least over groups is the bound; a group
    whose chain for L already reaches the least so far cannot lower it and is skipped. Requests
    may be rounded down (``_coarse``) before ``_types`` merges them; ``big`` indexes L and
    ``o_big`` is its exact output. ``ramps[g][j]``: the start-up a replica of group g adds to work
    term j (``_ramp``), charged on the other replicas only (h's empty slots are inside its I).
    """
    if types is None:
        return 0.0
    counts, first, inv = types
    longest = int(inv[big])
    from ortools.linear_solver import pywraplp

    work = [[(t.lin + w(t))[first] for w in _WORK_TERMS] for t in terms]
    least = np.inf
    for gs in sorted(range(len(terms)), key=lambda k: float(chain[k][big])):
        if chain[gs][big] >= least:
            continue
        solver = pywraplp.Solver.CreateSolver("GLOP")
        if solver is None:
            return 0.0
        span = range(len(counts))
        x = [[solver.NumVar(0.0, float(c), "") for c in counts] for _ in terms]
        h = [solver.NumVar(0.0, float(c), "") for c in counts]
        makespan = solver.NumVar(0.0, solver.infinity(), "T")
        iters = solver.NumVar(o_big, solver.infinity(), "I")
        for j, c in enumerate(counts):
            solver.Add(sum(x[gi][j] for gi in range(len(terms))) + h[j] == float(c))
        solver.Add(h[longest] >= 1.0)
        for gi, g in enumerate(cluster.groups):              # every work row holds on the others
            n = g.count - (gi == gs)
            for size, ramp in zip(work[gi], ramps[gi]):
                solver.Add(sum(float(size[j]) * x[gi][j] for j in span) <= n * makespan - n * ramp)
        for row in _own_rows(terms[gs], first, [], []):   # h's own rows (its empty slots are in I)
            _add_row(solver, h, iters, makespan, *row)
        v = _solve_min_makespan(solver, makespan)
        if v <= 0.0:
            return 0.0                        # no proven value for this group: claim nothing
        least = min(least, max(v, float(chain[gs][big])))     # L runs on a replica of gs
    return float(least) if np.isfinite(least) else 0.0


def _own_rows(t: _Terms, first: np.ndarray, work: list[np.ndarray], ramp: list[float]):
    """The rows of one replica of t's group as (coefficients per type, iteration coefficient,
    makespan coefficient, constant), each meaning ``coef . hold + a I + b T <= c``: its ``I``
    iterations, each at least m (mixed with the prefill line as in ``_mixed``), fit in T; it has at
    least as many iterations as its batch and KV cache need; and the work rows ``work`` with
    their start-ups ``ramp`` hold too, as on every replica (``_lp_longest`` passes none)."""
    lin = t.lin[first]
    for lam in _LAMS:
        yield lin + (lam * t.pre + (1 - lam) * t.pre_full)[first], lam * t.m + (1 - lam) * t.m_pre, -1.0, 0.0
    yield (t.lin + t.y)[first], 0.0, -1.0, 0.0
    for share in ((t.o / t.batch)[first], (t.kv / t.kv_cap)[first]):       # iterations per batch, per KV
        yield share, -1.0, 0.0, 0.0
    for size, r in zip(work, ramp):
        yield size, 0.0, -1.0, -r


def _add_row(solver, hold: list, iters, makespan, coef: np.ndarray, a: float, b: float, c: float):
    """Add ``coef . hold + a iters + b makespan <= c`` (a row of ``_own_rows``, or a pool's work
    row with ``iters`` None) to ``solver``; returns the constraint."""
    ct = solver.Constraint(-solver.infinity(), c)
    for var, w in zip(hold, coef.tolist()):
        ct.SetCoefficient(var, w)
    if iters is not None:
        ct.SetCoefficient(iters, a)
    ct.SetCoefficient(makespan, b)
    return ct


class _TwoApart:
    """The work LP with two replicas taken apart: h1 (group g1) holds the longest request, h2
    (group g2) the longest request not on h1. ``keep``: the indices of the rows to build (None:
    all); dropping rows only lowers the value, so any subset stays a valid bound."""

    def __init__(self, cluster: ClusterSpec, terms: list[_Terms], types, work, ramps, g1: int, g2: int,
                 longest: int, o_big: float, keep: set[int] | None = None):
        from ortools.linear_solver import pywraplp

        counts, first, _ = types
        self.counts = counts
        self.out = terms[0].o[first]
        ng = len(terms)
        s = self.solver = pywraplp.Solver.CreateSolver("GLOP")
        inf = s.infinity()
        self.x = [[s.NumVar(0.0, float(c), "") for c in counts] for _ in range(ng)]
        self.h2 = [s.NumVar(0.0, float(c), "") for c in counts]
        h1 = [s.NumVar(0.0, float(c), "") for c in counts]
        self.makespan = s.NumVar(0.0, inf, "T")
        i1 = s.NumVar(o_big, inf, "I1")
        self.i2 = s.NumVar(0.0, inf, "I2")
        for j, c in enumerate(counts):
            ct = s.Constraint(float(c), float(c))
            for var in [self.x[gi][j] for gi in range(ng)] + [h1[j], self.h2[j]]:
                ct.SetCoefficient(var, 1.0)
        h1[longest].SetLb(1.0)
        rows = []
        left = [g.count - (gi == g1) - (gi == g2) for gi, g in enumerate(cluster.groups)]
        for gi in range(ng):                   # every work row holds on the group's other replicas
            rows += [(self.x[gi], size, None, 0.0, -float(left[gi]), -left[gi] * r)
                     for size, r in zip(work[gi], ramps[gi])]
        for g, hold, iters in ((g1, h1, i1), (g2, self.h2, self.i2)):
            rows += [(hold, coef, iters, a, b, c) for coef, a, b, c in
                     _own_rows(terms[g], first, work[g], ramps[g])]
        self.rows = [(k, _add_row(s, hold, iters, self.makespan, coef, a, b, c))
                     for k, (hold, coef, iters, a, b, c) in enumerate(rows) if keep is None or k in keep]
        s.Minimize(self.makespan)

    def solve(self, v: float, forced: bool) -> float:
        """A(v) (``forced``: requests longer than v on h1) or B(v) (h2 runs v iterations); -1 where
        GLOP proves nothing."""
        from ortools.linear_solver import pywraplp

        for j, c in enumerate(self.counts):
            ub = 0.0 if forced and self.out[j] > v else float(c)
            self.h2[j].SetUb(ub)
            for xg in self.x:
                xg[j].SetUb(ub)
        self.i2.SetLb(0.0 if forced else v)
        if self.solver.Solve() != pywraplp.Solver.OPTIMAL:
            return -1.0
        return float(self.makespan.solution_value()) * (1.0 - 1e-7)

    def binding(self) -> set[int]:
        """The rows whose dual is nonzero in the last solution."""
        return {k for k, ct in self.rows if abs(ct.dual_value()) > 1e-12}


TOP_OUTPUTS = 16             # longest requests whose outputs set the second replica's threshold
TWO_APART_MAX_TYPES = 2000   # past this many request types the second LP costs seconds and gave nothing


def _lp_two_longest(cluster: ClusterSpec, terms: list[_Terms], chain: list[np.ndarray], types,
                    big: int, o_big: float, ramps: list[list[float]]) -> float:
    """``_lp_longest`` with a second replica taken apart (mixed clusters).

    h1 holds the longest request L; h2 holds the longest request not on h1, of output v. Then h2
    runs at least v iterations, and every request longer than v is on h1. With v and the groups of
    h1 and h2 unknown, the bound is the least over them of ``max(A(v), B(v))``: A the LP with the
    longer requests on h1 (h2's count free), B the LP with h2 running v iterations (nothing
    forced). A only grows as v falls and B only as v rises, so a bisection over the candidate v
    finds the least, and ``max(A(longest v), B(shortest v))`` already rules a pair of groups out.
    The candidates are the outputs of the TOP_OUTPUTS longest requests; a smaller v puts all of
    them on h1, which A at the smallest candidate bounds. "Everything on h1" is the last case.
    The bisection solves the LP with only the rows binding at its ends (fewer rows: a lower,
    still valid value, found much faster). Requests rounded down (``_coarse``) keep the argument:
    h2 is then the replica holding the largest rounded output not on h1, and it runs at least
    that many iterations."""
    if types is None or len(types[0]) > TWO_APART_MAX_TYPES:
        return 0.0
    counts, first, inv = types
    longest = int(inv[big])
    work = [[(t.lin + w(t))[first] for w in _WORK_TERMS] for t in terms]
    cand = np.unique(np.sort(terms[0].o)[::-1][:TOP_OUTPUTS])[::-1]     # candidate v, longest first
    last = len(cand) - 1
    least = np.inf
    for g1 in sorted(range(len(terms)), key=lambda g: float(chain[g][big])):
        if chain[g1][big] >= least:
            continue
        t1 = terms[g1]                                   # everything on h1
        every = [float(np.dot(counts, (t1.lin + t1.y)[first]))]
        every += [float(np.dot(counts, w)) + r for w, r in zip(work[g1], ramps[g1])]
        least = min(least, max(max(every), float(chain[g1][big])))
        for g2 in sorted(range(len(terms)), key=lambda g: g != g1):
            if min(g.count - (gi == g1) - (gi == g2) for gi, g in enumerate(cluster.groups)) < 0:
                continue
            full = _TwoApart(cluster, terms, types, work, ramps, g1, g2, longest, o_big)
            ends, keep = [], set()
            for i, forced in ((0, True), (last, False), (last, True), (0, False)):  # [2]: v below all
                ends.append(full.solve(float(cand[i]), forced))
                if ends[-1] < 0:
                    return 0.0                           # no proven value: claim nothing
                if len(ends) == 2 and max(ends) >= least:
                    break
                keep |= full.binding()
            if max(ends[:2]) >= least:
                continue
            lp = _TwoApart(cluster, terms, types, work, ramps, g1, g2, longest, o_big, keep)
            seen: dict[tuple[int, bool], float] = {}

            def at(i: int, forced: bool) -> float:
                if (i, forced) not in seen:
                    seen[i, forced] = lp.solve(float(cand[i]), forced)
                    if seen[i, forced] < 0:
                        raise _NoValue
                return seen[i, forced]

            try:
                lo, hi = 0, last                         # least i with A > B: A rises, B falls along i
                while lo < hi:
                    mid = (lo + hi) // 2
                    if at(mid, True) > at(mid, False):
                        hi = mid
                    else:
                        lo = mid + 1
                best = min([ends[2]] + [max(at(i, True), at(i, False)) for i in {max(lo - 1, 0), lo}])
            except _NoValue:
                return 0.0
            least = min(least, max(best, float(chain[g1][big])))
    return float(least) if np.isfinite(least) else 0.0


class _NoValue(Exception):
    """GLOP proved no value for an LP: the family claims nothing."""


def _steps_bound(cluster: ClusterSpec, terms: list[_Terms], o: np.ndarray, grid: int = 5) -> float:
    """The steps family (module docstring): weights mu (iterations vs prefill), alpha, beta, gamma
    (longest, batch, KV) on a grid; for each, the least T whose nested Hall condition holds."""
    groups = cluster.groups
    order = np.argsort(-o, kind="stable")
    out = o[order]
    counts = [g.count for g in groups]
    labels = [k for k, c in enumerate(counts) for _ in range(c)]
    if len(groups) == 1:
        patterns = [labels]
    else:
        patterns = sorted(set(itertools.permutations(labels))) if len(labels) <= 9 else []
        if not patterns or len(patterns) > MAX_PATTERNS:
            return 0.0
    fr = np.linspace(0.0, 1.0, grid)
    best = 0.0
    # alpha > 0 only: without the 'longest' term the work bound covers it
    for mu, al, be in [(mu, al, be) for mu in fr[1:] for al in fr[1:] for be in fr if al + be <= 1 + 1e-9]:
        ga = max(0.0, 1.0 - al - be)
        size = np.stack([t.lin[order] + mu * (t.m * (be * out / t.batch + ga * t.kv[order] / t.kv_cap) + t.pre[order])
                         + (1 - mu) * t.y[order] for t in terms])
        ref = size.min(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            theta = [float(np.min(np.where(ref > 0, s / ref, np.inf))) for s in size]
        theta = [th if np.isfinite(th) and th > 0 else 1.0 for th in theta]
        cum_w = np.concatenate([[0.0], np.cumsum(ref)])
        slope = [mu * al * t.m for t in terms]
        total = cum_w[-1]

        def feasible(T: float) -> bool:
            for pat in patterns:
                cap = 0.0
                ok = True
                for pos, k in enumerate(pat):
                    if pos == 0:
                        v = out[0]
                    else:                             # least threshold: the longer rest fits before
                        i = int(np.searchsorted(cum_w, cap, side="right")) - 1
                        v = out[i] if i < len(out) else 0.0
                    c = (T - slope[k] * v) / theta[k]
                    if c < 0.0:
                        ok = False
                        break
                    cap += c
                if ok and total <= cap:
                    return True
            return False

        if feasible(best):
            continue
        lo, hi = best, max(best, 1e-9) * 2.0
        while not feasible(hi):
            lo, hi = hi, hi * 2.0
        for _ in range(48):
            mid = 0.5 * (lo + hi)
            if feasible(mid):
                hi = mid
            else:
                lo = mid
        best = lo
    return best
