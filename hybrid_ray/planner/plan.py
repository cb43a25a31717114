"""The offline plan: assign requests to replicas (makespan bin packing), order them, bound them.

Heterogeneous groups are packed as uniformly related machines (Q||Cmax): group g's speed is
the ratio of the workload's total estimated work on the reference group (the first) to that on
g. Predicted finish times are then recomputed with each group's own per-request estimate.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..config import ClusterSpec
from ..workload import Request
from .banded import banded_assignment, estimated_finish
from .binpack import deterministic_budget, pack
from .bounds import lower_bound
from .estimate import latency_matrix, work_matrix
from .refine import refine_assignment
from .slots import slot_balanced_order
from .tiered import tiered_assignment

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


def make_plan(cluster: ClusterSpec, requests: list[Request], predicted_output: np.ndarray | None = None,
              method: str = "cpsat", time_limit_s: float = math.inf, workers: int = 2, seed: int = 0,
              start: str = "auto", bands: str = "auto", deterministic_time: float | None = None,
              dispatch: str | None = None) -> Plan:
    """Plan ``requests`` as one batch (arrival times ignored) on ``cluster``; lengths from
    ``predicted_output`` (the true lengths when None).

    ``time_limit_s`` is wall-clock seconds from this call's start (the solver gets what the cost
    matrices left; ``math.inf``, the default: no wall limit, so that library callers, the simulator
    and the benches get the same plan under any load). ``deterministic_time`` is CP-SAT's deterministic
    budget (default 0.4 x time_limit_s): with it and no wall limit the plan is the same on any machine.
    """
    dispatch_default = dispatch
    if dispatch not in (None, "auto", "plan", "bounded"):
        raise ValueError(f"unknown dispatch {dispatch!r}; choose auto, plan or bounded")
    budget = deterministic_budget(time_limit_s, deterministic_time)     # checks both
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}")
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
    remaining = float(time_limit_s) - (time.perf_counter() - t0)       # wall clock: the matrices count
    res = pack(work[0], speeds, method=method, time_limit_s=remaining, workers=workers, seed=seed,
               deterministic_time=budget)
    assign = res.assignment.copy()
    latency = latency_matrix(cluster, prompt, output)
    repaired = repair_latency_bound(assign, work, latency, gidx)
    # the plan packs the requests as one batch (all present), so its bound must ignore arrivals too;
    # and it knows only the lengths it planned with (a planner never reads a true length)
    batch = [Request(q.id, q.prompt_tokens, max(1, int(round(o))), 0.0) for q, o in zip(requests, output)]
    lb = lower_bound(cluster, batch)
    info = {"pack_makespan_s": float(res.makespan), "pack_solve_time_s": float(res.solve_time_s),
            "chain_bound_s": lb.chain_s, "work_bound_s": lb.work_s, "steps_bound_s": lb.steps_s,
            "speeds": speed_of_group.tolist(), "latency_moves": repaired}

    orders: dict[tuple, np.ndarray] = {}      # (replica, mode, its requests) -> start order

    def build(assign: np.ndarray, banded: bool, slots: bool = False) -> Plan:
        """The plan of an assignment; a replica's start order is computed once per set of requests
        (the refining search rebuilds plans that differ on two replicas)."""
        order: dict[str, list[str]] = {r.name: [] for r in replicas}
        finish: dict[str, float] = {}
        est = estimated_finish(cluster, prompt, output, assign) if banded else None
        peak = prompt + output                                       # KV a request holds at its end
        for m, r in enumerate(replicas):
            idx = np.flatnonzero(assign == m)
            mode = start
            if banded:                # a band's longest requests set its iterations: start them first
                mode = "slots" if slots or start == "slots" else "longest"
            elif start == "auto":     # longest-first unless a batch of its long requests would not fit the KV cache
                b = r.group.max_batch_size
                top = np.sort(peak[idx])[-TAIL_BATCHES * b:] if len(idx) else peak[idx]
                kv_bound = len(top) and b * float(top.mean()) > r.group.kv_capacity_tokens
                mode = "short-tail" if kv_bound else ("slots" if slots else "longest")
            key = (m, mode, idx.tobytes())
            if key not in orders:
                orders[key] = start_order(idx, work[gidx[m], idx], r.group.max_batch_size, mode, output[idx],
                                          prompt[idx])
            idx = orders[key]
            order[r.name] = [requests[j].id for j in idx]
            finish[r.name] = (float(est[m]) if banded else
                              max(float(work[gidx[m], idx].sum()), float(latency[gidx[m], idx].max(initial=0.0))))
        planned = max(finish.values(), default=0.0)
        return Plan(
            assignment={requests[j].id: replicas[int(m)].name for j, m in enumerate(assign)},
            order=order, predicted_finish_s=finish, planned_makespan_s=planned,
            lower_bound_s=lb.value_s, gap=(planned / lb.value_s - 1.0) if lb.value_s > 0 else 0.0,
            pack_bound_s=float(res.lower_bound),
            pack_gap=float(res.makespan / res.lower_bound - 1.0) if res.lower_bound > 0 else 0.0,
            solver_status=res.status, method=res.method if not banded else "bands",
            solve_time_s=time.perf_counter() - t0, info=dict(info, bands=banded))

    # the YAML's policy.hybrid.dispatch wins; else the caller's (policies.plan_dispatch); else auto
    dispatch = cluster.policy.get("hybrid", {}).get("dispatch", "auto")
    if dispatch == "auto" and dispatch_default is not None:
        dispatch = dispatch_default
    candidates = {}
    if bands in ("auto", "off") and dispatch != "bounded":
        candidates["pack"] = build(assign, False)
        if start == "auto" and bands == "auto" and len(requests) <= TUNE_MAX:
            # the same assignment, each replica's slots balanced to run dry together (a candidate
            # only where the simulation chooses, with known lengths; and, as each candidate costs
            # simulations, up to TUNE_MAX requests, where a drain is a visible share of a run)
            candidates["slots"] = build(assign, False, slots=True)
            candidates["slots"].info["start"] = "slots"
    if dispatch != "bounded" and (bands == "on" or (bands == "auto" and len(requests) <= SIMULATE_MAX)):
        # above SIMULATE_MAX requests per replica greatly exceed a batch: the longest requests'
        # iterations are a small share of a replica's, and bands would gain little
        bands_assign = banded_assignment(cluster, prompt, output)[0]
        candidates["bands"] = build(bands_assign, True)
        if start == "auto" and len(requests) <= TUNE_MAX:
            candidates["bands-slots"] = build(bands_assign, True, slots=True)
            candidates["bands-slots"].info["start"] = "slots"
            # only the requests no full replica can run share the long runs; slots balanced
            candidates["tiers"] = calibrated_tiers(cluster, batch, prompt, output, lambda a: build(a, True, slots=True))
    if dispatch == "bounded" or (dispatch == "auto" and bands == "auto" and len(requests) <= SIMULATE_MAX):
        # late binding: no assignment, Serve's bounded queues fed longest first (only a simulation
        # can price it against the plans; policy.hybrid.dispatch: bounded forces it)
        candidates["bounded"] = build(assign, False)
        candidates["bounded"].info["dispatch"] = "bounded"
        candidates["bounded"].method = "bounded"
    chosen = choose_plan(cluster, batch, candidates, tune=bands == "auto")
    plan = candidates[chosen]
    shape = CANDIDATE_SHAPES.get(chosen)
    if shape is not None and bands == "auto" and plan.info.get("simulated") and len(replicas) > 1:
        plan = refine_plan(cluster, batch, plan, lambda a: build(a, *shape), work, gidx, seed)
    plan.solve_time_s = time.perf_counter() - t0
    return plan


# (banded, slots) of each candidate's build: what a refined assignment is rebuilt with
CANDIDATE_SHAPES = {"pack": (False, False), "slots": (False, True), "bands": (True, False),
                    "bands-slots": (True, True), "tiers": (True, True)}
REFINE_SIMULATIONS = 128            # hybrid runs the local search may spend on the chosen plan...
REFINE_ITERATIONS = 250_000         # ... and at most this many simulated iterations in all


def refine_plan(cluster: ClusterSpec, batch: list[Request], plan: Plan, rebuild, work: np.ndarray,
                gidx: np.ndarray, seed: int) -> Plan:
    """``plan`` after the simulation-guided local search (``planner.refine``) on its assignment,
    each trial rebuilt with ``rebuild(assign)`` (the candidate's own start orders) and run with the
    chosen plan's settings (online rule, start-up). Up to REFINE_SIMULATIONS runs, fewer where a
    run is long: at most REFINE_ITERATIONS simulated iterations (a batch of 8 runs many more
    iterations than one of 128 for the same requests, and costs as much more to simulate).
    Returns ``plan`` itself when nothing improved."""
    index = {r.name: k for k, r in enumerate(cluster.replicas())}
    assign = np.array([index[plan.assignment[q.id]] for q in batch])

    def finishes_of(a: np.ndarray) -> np.ndarray:
        trial = rebuild(a)
        trial.info = dict(plan.info)
        return _finishes(_run_hybrid(cluster, batch, trial))

    first = _run_hybrid(cluster, batch, plan)                 # what a run costs decides how many the search may spend
    iterations = max(1, sum(len(r.records) for r in first.replicas))
    budget = max(1, min(REFINE_SIMULATIONS, REFINE_ITERATIONS // iterations))
    res = refine_assignment(assign, finishes_of, work, gidx, budget, seed, _finishes(first))
    stats = {"simulations": res.simulations, "accepted": res.accepted,
             "from_s": round(res.start_makespan_s, 6), "to_s": round(res.makespan_s, 6)}
    if res.accepted == 0:
        plan.info["refine"] = stats
        return plan
    refined = rebuild(res.assignment)
    refined.info = dict(plan.info, refine=stats)
    refined.method = plan.method
    return refined


SIMULATE_MAX = 20_000       # requests up to which candidate plans are compared by simulation
TUNE_MAX = 5_000            # requests up to which the online rule's settings are compared too
# settings of the hybrid's online rule (policy.hybrid knobs) the planner may try on its plan: a
# steeper slot price (insert prefills sooner; 1e6: whenever a slot frees, as vLLM v1 does),
# longest-predicted-first queues instead of the plan's start order, an idle replica's start-up
# program in the plan's order instead of shortest prompts first, and all of vLLM v1's habits at
# once (chunks up to the group's token budget, no start-up program). Knobs the cluster YAML sets
# are never overridden.
RULES: tuple[dict, ...] = ({"multiplier": 2.0}, {"multiplier": 1e6}, {"sort": "longest"}, {"ramp": "plan"},
                           {"multiplier": 1e6, "sort": "longest", "chunk_tokens": 1 << 20, "ramp": "off"})


def rule_label(rule: dict) -> str:
    """``multiplier=2, sort=longest``: a rule's settings as `plan` prints them and ``rules_tried`` keys them."""
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in rule.items())


def _finishes(rec) -> np.ndarray:
    """Each replica's last iteration end in a run record (0 for an idle replica)."""
    return np.array([r.records[-1].end_s if r.records else 0.0 for r in rec.replicas])


def _run_hybrid(cluster: ClusterSpec, batch: list[Request], plan: Plan):
    """The hybrid's simulated run (its RunRecord) on ``plan``."""
    from ..policies import build_scheduler
    from ..simulator import simulate

    return simulate(cluster, build_scheduler("hybrid", cluster, batch, plan=plan), batch)


def _simulate_hybrid(cluster: ClusterSpec, batch: list[Request], plan: Plan, finishes: list | None = None) -> float:
    """The hybrid's simulated makespan on ``plan``; each replica's finish appended to ``finishes``."""
    rec = _run_hybrid(cluster, batch, plan)
    if finishes is not None:
        finishes.extend(_finishes(rec).tolist())
    return rec.makespan_s


CALIBRATIONS = 6            # re-plans of the tiered assignment with the simulator's per-replica correction


def calibrated_tiers(cluster: ClusterSpec, batch: list[Request], prompt: np.ndarray, output: np.ndarray,
                     build) -> Plan:
    """The tiered plan (``planner.tiered``), re-cut up to CALIBRATIONS times with each replica's
    estimate scaled by what the simulator measured on the previous cut (its simulated finish over
    its estimate); the cut whose simulated hybrid run is shortest is kept.

    Why: the estimate prices each replica by list scheduling on its slots and every prompt at its
    full prefill price; the run packs the slots tighter (``planner.slots``) and mixes prompts into
    decode steps, by a margin that differs per replica (on `hetero` the full 7B replicas finish
    9 % before their estimate, the 13B ones and the long run's 3 %). Filled to the estimate, the replicas
    the estimate overprices finish early and the others set the makespan."""
    scale = np.ones(cluster.num_replicas)
    best, best_ms, tried = None, math.inf, []
    for _ in range(CALIBRATIONS + 1):
        assign, _ = tiered_assignment(cluster, prompt, output, scale)
        plan = build(assign)
        finishes: list[float] = []
        ms = _simulate_hybrid(cluster, batch, plan, finishes)
        tried.append(round(ms, 6))
        if ms < best_ms * (1 - 1e-9):
            best, best_ms = plan, ms
        est = estimated_finish(cluster, prompt, output, assign)
        ratio = np.where(est > 0, np.asarray(finishes) / np.where(est > 0, est, 1.0), 1.0)
        scale = np.sqrt(scale * ratio)     # damped: the measured ratio moves with the cut
    best.method = "tiers"
    best.info["start"] = "slots"
    best.info["calibration_makespans"] = tried
    return best


def tune_rule(cluster: ClusterSpec, batch: list[Request], plan: Plan, default_s: float) -> float:
    """Keep in ``plan.info["rule"]`` the online-rule settings (RULES, or none: ``default_s``) under
    which the hybrid's simulated run on ``plan`` is shortest, on the planned lengths; ties keep the
    defaults. Returns that makespan.

    The Lagrangian multiplier is a free parameter of the rule (docs/scheduling.md section 3): one
    that suits a batch of 8 long prompts need not suit a batch of 128 short ones, and the
    simulator, with the very policy objects that will run, can tell which."""
    given = set(cluster.policy.get("hybrid", {}))
    best, best_ms = {}, default_s
    tried = {"default": round(default_s, 6)}
    for rule in RULES:
        if given & set(rule):
            continue
        plan.info["rule"] = rule
        ms = _simulate_hybrid(cluster, batch, plan)
        tried[rule_label(rule)] = round(ms, 6)
        if ms < best_ms * (1 - 1e-9):
            best, best_ms = rule, ms
    plan.info["rule"] = dict(best)
    plan.info["rules_tried"] = tried
    return best_ms


def choose_plan(cluster: ClusterSpec, batch: list[Request], candidates: dict[str, Plan], tune: bool = False) -> str:
    """The candidate whose simulated hybrid run is shortest, on the planned lengths; with ``tune``
    (up to TUNE_MAX requests) each candidate with its best online-rule settings (``tune_rule``).

    Why simulate: the candidates are cut with different cost estimates (work balance, length
    bands), neither of which sees the iteration-level interplay; the deterministic simulator
    does, with the very policy that will run the plan. Above ``SIMULATE_MAX`` requests, the
    candidates' own estimates decide. Every run uses only the lengths the plan was made with.
    """
    tune = tune and 0 < len(batch) <= TUNE_MAX
    if len(candidates) == 1 and not tune:
        return next(iter(candidates))
    scores: dict[str, float] = {}
    if len(batch) <= SIMULATE_MAX:
        for name, plan in candidates.items():
            scores[name] = _simulate_hybrid(cluster, batch, plan)
            if tune:
                scores[name] = tune_rule(cluster, batch, plan, scores[name])
    else:                                      # one model for both: the band estimate
        prompt = np.fromiter((q.prompt_tokens for q in batch), np.float64, len(batch))
        output = np.fromiter((q.output_tokens for q in batch), np.float64, len(batch))
        index = {r.name: k for k, r in enumerate(cluster.replicas())}
        for name, plan in candidates.items():
            assign = np.array([index[plan.assignment[q.id]] for q in batch])
            scores[name] = float(estimated_finish(cluster, prompt, output, assign).max(initial=0.0))
    chosen = min(scores, key=lambda k: (scores[k], k != "pack"))
    for name, plan in candidates.items():
        plan.info["candidates"] = {k: round(v, 6) for k, v in scores.items()}
        plan.info["chosen"] = chosen
        plan.info["simulated"] = len(batch) <= SIMULATE_MAX
    return chosen


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
