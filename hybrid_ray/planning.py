"""Making the offline plan, and building a named scheduler with it.

``make_plan`` packs the batch (``planner.binpack``), builds the candidate plans (work-balanced,
slot-ordered, length bands, tiers, late binding), and where lengths are known simulates the
hybrid on each (the very ``schedulers`` bundles that will run) to keep the fastest, then refines
it. ``build_scheduler`` gives a named policy's bundle, planning first where the policy needs it.

This module is the top of the scheduling layers: ``planner/`` and ``policies/`` below know nothing
of it, ``schedulers`` neither.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np

from .config import ClusterSpec
from .planner.banded import banded_assignment, estimated_finish
from .planner.binpack import deterministic_budget, pack
from .planner.budget import SIM_ITERATIONS_PER_S, PlanBudget, scaled_budget
from .planner.bounds import lower_bound
from .planner.estimate import latency_matrix, work_matrix
from .planner.prefix import (crowding_groups, finish_estimates as prefix_finish, grouped_order, prefix_assignment,
                             prefix_items)
from .planner.plan import METHODS, ORDERS, TAIL_BATCHES, Plan, repair_latency_bound, start_order
from .planner.refine import refine_assignment
from .planner.tiered import tiered_assignment
from .policies.base import PlannedLengths, Scheduler
from .policies.predict import has_distribution, make_predictor, predict_quantiles, scenario_lengths
from .schedulers import BUILDERS, initial_batch, needs_plan, plan_bands, plan_dispatch
from .simulator import DeadlinePassed, simulate
from .workload import Request


class SimBatch(list):
    """The requests the planner's simulated runs serve, with the predictor their policies see: a
    scenario's true lengths (``make_plan``'s ``scenario_output``) behind the planned ones."""

    predictor: PlannedLengths

    @classmethod
    def scenario(cls, requests: list[Request], planned: list[int], truth: np.ndarray) -> "SimBatch":
        true_out = np.maximum(1, np.rint(np.asarray(truth, dtype=np.float64))).astype(np.int64).tolist()
        out = cls(Request(q.id, q.prompt_tokens, o, 0.0, hash_ids=q.hash_ids) for q, o in zip(requests, true_out))
        out.predictor = PlannedLengths({q.id: p for q, p in zip(requests, planned)})
        return out


def make_plan(cluster: ClusterSpec, requests: list[Request], predicted_output: np.ndarray | None = None,
              method: str = "cpsat", time_limit_s: float = math.inf, workers: int = 2, seed: int = 0,
              start: str = "auto", bands: str = "auto", deterministic_time: float | None = None,
              dispatch: str | None = None, plan_share: float | None = None,
              progress: Callable[[str, float, float], None] | None = None,
              scenario_output: np.ndarray | None = None, span_output: np.ndarray | None = None) -> Plan:
    """Plan ``requests`` as one batch (arrival times ignored) on ``cluster``; lengths from
    ``predicted_output`` (the true lengths when None). Anytime: every phase after the packing
    (the bound's refinements, candidate simulations, rule settings, the refining search) runs only
    while the budget affords it, cheapest and likeliest to win first, and the best plan found so
    far is returned when it runs out (``plan.info["budget"]`` says what was left out).

    ``time_limit_s`` bounds the whole call's wall-clock seconds (``math.inf``, the default: no wall
    limit, so that library callers, the simulator and the benches get the same plan under any
    load); the packing gets PACK_SHARE of it. ``deterministic_time`` is CP-SAT's deterministic
    budget (default 0.4 x time_limit_s). ``plan_share``: a deterministic budget scaled to the
    batch, that share of the packing's estimated makespan (``planner.budget``: simulated iterations
    at SIM_ITERATIONS_PER_S, CP-SAT PACK_SHARE of it): the same plan on any machine, and a planner
    that costs about that share of what it plans. ``progress(phase, elapsed_s, left_s)`` hears
    each phase.

    ``scenario_output``: the true lengths of the simulated runs that choose between the candidates
    (and tune and refine the winner), a draw from the predictor's distribution
    (``policies.predict.scenario_lengths``), while the cuts and the policies in those runs see
    ``predicted_output``, as in the real run. None: the runs use the planned lengths, which
    flatters the cuts that bet on them (a band of requests predicted at their median, whose
    longest sets its replica's iterations).

    ``span_output``: an upper quantile of the predicted lengths, which the length bands cut their
    iterations with (``planner.banded``); None: ``predicted_output``.
    """
    dispatch_default = dispatch
    if dispatch not in (None, "auto", "plan", "bounded"):
        raise ValueError(f"unknown dispatch {dispatch!r}; choose auto, plan or bounded")
    det_budget = deterministic_budget(time_limit_s, deterministic_time)     # checks both
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}")
    if start not in ORDERS:
        raise ValueError(f"unknown start order {start!r}; choose from {', '.join(ORDERS)}")
    if method not in METHODS:
        raise ValueError(f"unknown planning method {method!r}; choose from {', '.join(METHODS)}")
    if plan_share is not None and not (plan_share > 0 and math.isfinite(plan_share)):
        raise ValueError(f"plan_share must be a finite number > 0, got {plan_share!r}")
    t0 = time.perf_counter()
    budget = PlanBudget(wall_s=float(time_limit_s), progress=progress, t0=t0)
    budget.enter("packing")
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
    latency = latency_matrix(cluster, prompt, output)
    span = None if span_output is None else np.maximum(output, np.asarray(span_output, dtype=np.float64))
    # requests sharing a prompt prefix, where the shared prefixes crowd the replicas' caches
    sharing = crowding_groups(cluster, requests)
    items: list = []                          # the prefix groups' bin-packing items, cut once

    def prefix_cut() -> tuple[list[np.ndarray], np.ndarray]:
        if not items:
            items.append(prefix_items(cluster, prompt, output, sharing))
        return items[0]
    method_used = method
    if plan_share is not None:        # the budget scales with the batch: its makespan's O(n) estimate, the
        # work on the reference group over the cluster's speed, or the longest request's latency on
        # its fastest group (LPT would cost seconds on a million requests)
        estimate = max(float(work[0].sum()) / float(speeds.sum()), float(latency.min(axis=0).max(initial=0.0)))
        allowance_s = scaled_budget(estimate, plan_share)
        if allowance_s < CPSAT_MIN_BUDGET_S:
            method_used = "lpt"       # CP-SAT and the other heuristics' fixed cost would exceed the budget
        budget.iterations = allowance_s * SIM_ITERATIONS_PER_S
        det_budget = max(MIN_PACK_DETERMINISTIC, PACK_SHARE * allowance_s)
        plan_info = {"plan_share": plan_share, "budget_s": allowance_s}
    else:
        plan_info = {}
    # wall clock: the matrices count; the packing gets its share, the rest of the phases what it leaves
    pack_wall = PACK_SHARE * budget.wall_left()
    if plan_share is not None and len(requests) > SIMULATE_MAX:
        # CP-SAT's model alone costs seconds past SIMULATE_MAX requests, outside its deterministic
        # budget, where the heuristics' packing is within a fraction of a percent anyway
        pack_wall = 0.0
    res = pack(work[0], speeds, method=method_used, time_limit_s=pack_wall, workers=workers,
               seed=seed, deterministic_time=det_budget)
    assign = res.assignment.copy()
    repaired = repair_latency_bound(assign, work, latency, gidx)
    # the plan packs the requests as one batch (all present), so its bound must ignore arrivals too;
    # and it knows only the lengths it planned with (a planner never reads a true length)
    planned_out = np.maximum(1, np.rint(output)).astype(np.int64).tolist()  # round half to even, as round()
    batch = [Request(q.id, q.prompt_tokens, o, 0.0, hash_ids=q.hash_ids) for q, o in zip(requests, planned_out)]
    runs_on = batch if scenario_output is None else SimBatch.scenario(requests, planned_out, scenario_output)
    budget.enter("bound")
    left = budget.left_s()
    lb = lower_bound(cluster, batch, thorough=left >= THOROUGH_BOUND_S, lp=left >= LP_BOUND_S)
    plan_info["bound"] = ("full" if left >= THOROUGH_BOUND_S or len(cluster.groups) == 1 else
                           "without the two-apart LP" if left >= LP_BOUND_S else "without the mixed-cluster LPs")
    info = {"pack_makespan_s": float(res.makespan), "pack_solve_time_s": float(res.solve_time_s), **plan_info,
            "chain_bound_s": lb.chain_s, "work_bound_s": lb.work_s, "steps_bound_s": lb.steps_s,
            "speeds": speed_of_group.tolist(), "latency_moves": repaired}

    orders: dict[tuple, np.ndarray] = {}      # (replica, mode, its requests) -> start order

    def build(assign: np.ndarray, banded: bool, slots: bool = False, grouped: bool = False) -> Plan:
        """The plan of an assignment; a replica's start order is computed once per set of requests
        (the refining search rebuilds plans that differ on two replicas). ``grouped``: each replica
        runs its prefix groups one after another (``planner.prefix``)."""
        order: dict[str, list[str]] = {r.name: [] for r in replicas}
        finish: dict[str, float] = {}
        est = (estimated_finish(cluster, prompt, output, assign, span) if banded else
               prefix_finish(cluster, *prefix_cut(), assign) if grouped else None)
        peak = prompt + output                                       # KV a request holds at its end
        for m, r in enumerate(replicas):
            idx = np.flatnonzero(assign == m)
            mode = start
            if grouped:
                key = (m, "groups", idx.tobytes())
                if key not in orders:
                    orders[key] = grouped_order(idx, sharing, work[gidx[m]], output)
                idx = orders[key]
                order[r.name] = [requests[j].id for j in idx]
                finish[r.name] = float(est[m])
                continue
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
            solver_status=res.status, method="prefix" if grouped else res.method if not banded else "bands",
            solve_time_s=time.perf_counter() - t0, info=dict(info, bands=banded))

    # the YAML's policy.hybrid.dispatch wins; else the caller's (schedulers.plan_dispatch); else auto
    dispatch = cluster.policy.get("hybrid", {}).get("dispatch", "auto")
    if dispatch == "auto" and dispatch_default is not None:
        dispatch = dispatch_default
    budget.enter("candidates")
    # each candidate as (name, how to build it), built and simulated in PRIORITY order while the budget
    # lasts (the tiers last: their calibration costs CALIBRATIONS + 1 runs); scores keep this order
    makers: dict[str, Callable[[], Plan]] = {}
    if sharing is not None and dispatch != "bounded":
        # requests sharing a cached prefix packed together (planner.prefix): a candidate like the others
        makers["prefix"] = lambda: _with(build(prefix_assignment(cluster, *prefix_cut(), len(requests)), False,
                                               grouped=True), start="groups")
    if bands in ("auto", "off") and dispatch != "bounded":
        makers["pack"] = lambda: build(assign, False)
        if start == "auto" and bands == "auto" and len(requests) <= TUNE_MAX:
            # the same assignment, each replica's slots balanced to run dry together (a candidate
            # only where the simulation chooses, with known lengths; and, as each candidate costs
            # simulations, up to TUNE_MAX requests, where a drain is a visible share of a run)
            makers["slots"] = lambda: _with(build(assign, False, slots=True), start="slots")
    if dispatch != "bounded" and (bands == "on" or (bands == "auto" and len(requests) <= SIMULATE_MAX)):
        # above SIMULATE_MAX requests per replica greatly exceed a batch: the longest requests'
        # iterations are a small share of a replica's, and bands would gain little
        cut: list = []

        def bands_assign() -> np.ndarray:
            if not cut:
                cut.append(banded_assignment(cluster, prompt, output, span)[0])
            return cut[0]
        makers["bands"] = lambda: build(bands_assign(), True)
        if start == "auto" and len(requests) <= TUNE_MAX:
            makers["bands-slots"] = lambda: _with(build(bands_assign(), True, slots=True), start="slots")
            # only the requests no full replica can run share the long runs; slots balanced
            makers["tiers"] = lambda: calibrated_tiers(cluster, runs_on, prompt, output,
                                                       lambda a: build(a, True, slots=True), budget)
    if dispatch == "bounded" or (dispatch == "auto" and bands == "auto" and len(requests) <= SIMULATE_MAX):
        # late binding: no assignment, Serve's bounded queues fed longest first (only a simulation
        # can price it against the plans; policy.hybrid.dispatch: bounded forces it)
        makers["bounded"] = lambda: _with(build(assign, False), dispatch="bounded", method="bounded")
    candidates, chosen = choose_plan(cluster, runs_on, makers, tune=bands == "auto", budget=budget,
                                     prompt=prompt, output=output)
    plan = candidates[chosen]
    shape = CANDIDATE_SHAPES.get(chosen)
    if shape is not None and bands == "auto" and plan.info.get("simulated") and len(replicas) > 1:
        budget.enter("refining")
        plan = refine_plan(cluster, runs_on, plan, lambda a: build(a, *shape), work, gidx, seed, budget)
    plan.solve_time_s = time.perf_counter() - t0
    plan.info["budget"] = {"wall_s": None if math.isinf(budget.wall_s) else budget.wall_s,
                           "iterations": None if math.isinf(budget.iterations) else int(budget.iterations),
                           "simulated_iterations": budget.spent_iterations, "skipped": dict(budget.skipped)}
    budget.enter("done")
    return plan


def _with(plan: Plan, start: str | None = None, dispatch: str | None = None, method: str | None = None) -> Plan:
    """``plan`` marked with a candidate's start order / dispatch / method (for the policy and the report)."""
    if start:
        plan.info["start"] = start
    if dispatch:
        plan.info["dispatch"] = dispatch
    if method:
        plan.method = method
    return plan


PACK_SHARE = 0.3                 # of the budget, for the packing (CP-SAT); the rest for the simulations
MIN_PACK_DETERMINISTIC = 0.01    # CP-SAT's smallest deterministic budget (it still returns its hint)
CPSAT_MIN_BUDGET_S = 0.5         # a scaled budget below this packs by LPT alone (CP-SAT's model costs ~0.1 s)
THOROUGH_BOUND_S = 1.0           # budget (s) below which the bound skips its costliest LP (still valid)
LP_BOUND_S = 0.25                # ... and below which every LP of a mixed cluster (`simulate` reports the full bound)


# (banded, slots) of each candidate's build: what a refined assignment is rebuilt with
CANDIDATE_SHAPES = {"pack": (False, False), "slots": (False, True), "bands": (True, False),
                    "bands-slots": (True, True), "tiers": (True, True), "prefix": (False, False, True)}
REFINE_SIMULATIONS = 128            # hybrid runs the local search may spend on the chosen plan...
REFINE_ITERATIONS = 250_000         # ... and at most this many simulated iterations in all


def refine_plan(cluster: ClusterSpec, batch: list[Request], plan: Plan, rebuild, work: np.ndarray,
                gidx: np.ndarray, seed: int, budget: PlanBudget | None = None) -> Plan:
    """``plan`` after the simulation-guided local search (``planner.refine``) on its assignment,
    each trial rebuilt with ``rebuild(assign)`` (the candidate's own start orders) and run with the
    chosen plan's settings (online rule, start-up). Up to REFINE_SIMULATIONS runs, fewer where a
    run is long: at most REFINE_ITERATIONS simulated iterations (a batch of 8 runs many more
    iterations than one of 128 for the same requests, and costs as much more to simulate).
    Returns ``plan`` itself when nothing improved; within ``budget``, as many runs as it affords
    (a run the wall clock no longer affords scores as never better)."""
    budget = budget or PlanBudget()
    index = {r.name: k for k, r in enumerate(cluster.replicas())}
    assign = np.array([index[plan.assignment[q.id]] for q in batch])

    first_iterations = _expected(plan, budget)
    if not budget.affords(first_iterations):
        budget.skip("refining search")
        return plan

    def finishes_of(a: np.ndarray) -> np.ndarray:
        trial = rebuild(a)
        trial.info = dict(plan.info)
        if budget.affords(first_iterations):
            try:
                return _finishes(_run_hybrid(cluster, batch, trial, budget))
            except DeadlinePassed:
                pass
        return np.full(len(cluster.replicas()), math.inf)     # never kept

    try:
        first = _run_hybrid(cluster, batch, plan, budget)    # what a run costs decides how many the search may spend
    except DeadlinePassed:
        return plan
    iterations = max(1, sum(len(r.records) for r in first.replicas))
    runs = max(1, min(REFINE_SIMULATIONS, REFINE_ITERATIONS // iterations,
                      budget.runs_affordable(iterations, REFINE_SIMULATIONS)))
    res = refine_assignment(assign, finishes_of, work, gidx, runs, seed, _finishes(first))
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


def _run_hybrid(cluster: ClusterSpec, batch: list[Request], plan: Plan, budget: PlanBudget | None = None):
    """The hybrid's simulated run (its RunRecord) on ``plan``; its iterations and wall time are
    charged to ``budget``, and become the estimate of the next run's (``_iterations``)."""
    t = time.perf_counter()
    deadline = budget.t0 + budget.wall_s if budget is not None and math.isfinite(budget.wall_s) else None
    predictor = batch.predictor if isinstance(batch, SimBatch) else make_predictor("oracle", batch)
    sch = BUILDERS["hybrid"](cluster, batch, plan=plan, predictor=predictor)
    try:
        rec = simulate(cluster, sch, batch, deadline=deadline)
    except DeadlinePassed:                   # the wall limit came first: the run is left out
        budget.skip("run cut at the deadline")
        raise
    iterations = sum(len(r.records) for r in rec.replicas)
    if cluster_caches_prefixes(cluster, batch):   # an iteration that admits cached prefixes costs more to simulate
        iterations *= PREFIX_SIM_COST
    plan.info["sim_iterations"] = iterations
    if budget is not None:
        budget.spend(iterations, time.perf_counter() - t)
        budget.run_iterations = max(budget.run_iterations, iterations)
    return rec


# what a simulated iteration costs with prefix caching at work, in iterations without it: the block
# matching at each admission and finish (doc-qa x h100_llama7b, `vllm`: 64 us against 9 us)
PREFIX_SIM_COST = 8


def cluster_caches_prefixes(cluster: ClusterSpec, batch: list[Request]) -> bool:
    """Whether a simulated run of ``batch`` on ``cluster`` keeps a prefix cache busy."""
    return any(g.prefix_caching for g in cluster.groups) and any(q.hash_ids for q in batch)


def _iterations(plan: Plan) -> float:
    """About how many iterations a hybrid run of ``plan`` simulates: its own last run's count, else
    each replica's decode steps (its output tokens over its batch, at least its longest output)
    plus a prefill iteration per batch of its requests."""
    if "sim_iterations" in plan.info:
        return float(plan.info["sim_iterations"])
    return float(plan.info.get("iterations_estimate", 0.0))


def _expected(plan: Plan, budget: PlanBudget) -> float:
    """A run's expected iterations: its own estimate, or as many as the longest run simulated so far
    on this batch (the candidates differ little in that; the prior undercounts long prompts)."""
    return max(_iterations(plan), float(budget.run_iterations))


def _simulate_hybrid(cluster: ClusterSpec, batch: list[Request], plan: Plan, finishes: list | None = None,
                     budget: PlanBudget | None = None) -> float:
    """The hybrid's simulated makespan on ``plan``; each replica's finish appended to ``finishes``;
    ``math.inf`` when the run was cut at the budget's wall deadline."""
    try:
        rec = _run_hybrid(cluster, batch, plan, budget)
    except DeadlinePassed:
        return math.inf
    if finishes is not None:
        finishes.extend(_finishes(rec).tolist())
    return rec.makespan_s


CALIBRATIONS = 6            # re-plans of the tiered assignment with the simulator's per-replica correction


def calibrated_tiers(cluster: ClusterSpec, batch: list[Request], prompt: np.ndarray, output: np.ndarray,
                     build, budget: PlanBudget | None = None) -> Plan | None:
    """The tiered plan (``planner.tiered``), re-cut up to CALIBRATIONS times with each replica's
    estimate scaled by what the simulator measured on the previous cut (its simulated finish over
    its estimate); the cut whose simulated hybrid run is shortest is kept.

    Why: the estimate prices each replica by list scheduling on its slots and every prompt at its
    full prefill price; the run packs the slots tighter (``planner.slots``) and mixes prompts into
    decode steps, by a margin that differs per replica (on `hetero` the full 7B replicas finish
    9 % before their estimate, the 13B ones and the long run's 3 %). Filled to the estimate, the replicas
    the estimate overprices finish early and the others set the makespan. Re-cuts stop when
    ``budget`` no longer affords a run; None when it affords none."""
    budget = budget or PlanBudget()
    scale = np.ones(cluster.num_replicas)
    best, best_ms, tried = None, math.inf, []
    for _ in range(CALIBRATIONS + 1):
        assign, _ = tiered_assignment(cluster, prompt, output, scale)
        plan = build(assign)
        plan.info["iterations_estimate"] = _iterations(best) if best is not None else _estimate_iterations(
            cluster, prompt, output, assign)
        if not budget.affords(_expected(plan, budget)):
            budget.skip("tiers re-cut")
            break
        finishes: list[float] = []
        ms = _simulate_hybrid(cluster, batch, plan, finishes, budget)
        if not math.isfinite(ms):
            break
        tried.append(round(ms, 6))
        if ms < best_ms * (1 - 1e-9):
            best, best_ms = plan, ms
        est = estimated_finish(cluster, prompt, output, assign)
        ratio = np.where(est > 0, np.asarray(finishes) / np.where(est > 0, est, 1.0), 1.0)
        scale = np.sqrt(scale * ratio)     # damped: the measured ratio moves with the cut
    if best is None:
        return None
    best.method = "tiers"
    best.info["start"] = "slots"
    best.info["calibrated_s"] = best_ms
    best.info["calibration_makespans"] = tried
    return best


def tune_rule(cluster: ClusterSpec, batch: list[Request], plan: Plan, default_s: float,
              budget: PlanBudget | None = None) -> float:
    """Keep in ``plan.info["rule"]`` the online-rule settings (RULES, or none: ``default_s``) under
    which the hybrid's simulated run on ``plan`` is shortest, on the planned lengths; ties keep the
    defaults. Returns that makespan.

    The Lagrangian multiplier is a free parameter of the rule (docs/scheduling.md section 3): one
    that suits a batch of 8 long prompts need not suit a batch of 128 short ones, and the
    simulator, with the very policy objects that will run, can tell which."""
    given = set(cluster.policy.get("hybrid", {}))
    best, best_ms = {}, default_s
    tried = {"default": round(default_s, 6)}
    budget = budget or PlanBudget()
    for rule in RULES:
        if given & set(rule):
            continue
        if not budget.affords(_expected(plan, budget)):
            budget.skip("rule setting")
            continue
        plan.info["rule"] = rule
        ms = _simulate_hybrid(cluster, batch, plan, budget=budget)
        tried[rule_label(rule)] = round(ms, 6)
        if ms < best_ms * (1 - 1e-9):
            best, best_ms = rule, ms
    plan.info["rule"] = dict(best)
    plan.info["rules_tried"] = tried
    return best_ms


def choose_plan(cluster: ClusterSpec, batch: list[Request], makers: dict[str, Callable[[], Plan | None]],
                tune: bool = False, budget: PlanBudget | None = None, prompt: np.ndarray | None = None,
                output: np.ndarray | None = None) -> tuple[dict[str, Plan], str]:
    """Build the candidates (``makers``: name -> builder) and keep the one whose simulated hybrid
    run is shortest, on the planned lengths; with ``tune`` (up to TUNE_MAX requests) each with its
    best online-rule settings (``tune_rule``). Returns (the candidates built, the chosen name).

    Why simulate: the candidates are cut with different cost estimates (work balance, length
    bands), neither of which sees the iteration-level interplay; the deterministic simulator
    does, with the very policy that will run the plan. Every run uses only the lengths the plan was
    made with. Anytime: candidates are simulated in PRIORITY order (the calibrated tiers, several
    runs, last), then the rule settings of the best so far first, each while ``budget`` affords
    it; a candidate it cannot simulate is left out. Above ``SIMULATE_MAX`` requests, or where not
    even one run fits, the candidates' own estimates decide (late binding, which has none, is then
    left out unless it is the only one).
    """
    budget = budget or PlanBudget()
    tune = tune and 0 < len(batch) <= TUNE_MAX
    names = list(makers)
    if len(names) == 1 and not tune:
        plan = makers[names[0]]()
        return {names[0]: plan}, names[0]
    candidates: dict[str, Plan] = {}
    scores: dict[str, float] = {}
    simulated = len(batch) <= SIMULATE_MAX
    scenario = isinstance(batch, SimBatch)
    if simulated:
        prior = 0.0
        for name in names_in_priority(makers, scenario):
            # building a cut costs too (the tiers' bisection seconds on long batches): only one the
            # budget could then simulate (the tiers: all their calibration runs) is built
            runs = CALIBRATIONS + 1 if name == "tiers" else 1
            if candidates and not budget.affords(runs * max(prior, float(budget.run_iterations))):
                budget.skip(f"candidate {name}")
                continue
            plan = makers[name]()
            if plan is None:                          # the tiers, when not one calibration run fitted
                continue
            candidates[name] = plan
            if "iterations_estimate" not in plan.info:
                plan.info["iterations_estimate"] = _estimate_iterations(cluster, prompt, output, _assign_of(cluster, batch, plan))
            prior = max(prior, _iterations(plan))
            if name == "tiers":                       # simulated while calibrated
                scores[name] = plan.info["calibrated_s"]
            elif budget.affords(_expected(plan, budget)):
                ms = _simulate_hybrid(cluster, batch, plan, budget=budget)
                if math.isfinite(ms):
                    scores[name] = ms
            else:
                budget.skip(f"candidate {name}")
        simulated = bool(scores)
        if tune:
            for name in sorted(scores, key=scores.get):        # the best so far first
                scores[name] = tune_rule(cluster, batch, candidates[name], scores[name], budget)
    if not simulated:                                 # one model for all: the band estimate
        for name in names:                            # the cheap cuts only (no tiers: seconds to cut)
            if name not in candidates and (name in ("pack", "bounded") or len(names) == 1):
                plan = makers[name]()
                if plan is not None:
                    candidates[name] = plan
        index = {r.name: k for k, r in enumerate(cluster.replicas())}
        for name, plan in candidates.items():
            if plan.info.get("dispatch") == "bounded" and len(candidates) > 1:
                continue
            assign = np.array([index[plan.assignment[q.id]] for q in batch])
            scores[name] = float(estimated_finish(cluster, prompt, output, assign).max(initial=0.0))
    scores = {n: scores[n] for n in names if n in scores}              # canonical order: ties as before
    ranked = scores
    if scenario and simulated and "bounded" in scores:                 # late binding unless a plan is clearly faster
        ranked = {k: v if k == "bounded" else v / (1.0 - ROBUST_MARGIN) for k, v in scores.items()}
    chosen = min(ranked, key=lambda k: (ranked[k], k != "pack"))
    for name, plan in candidates.items():
        plan.info["candidates"] = {k: round(v, 6) for k, v in scores.items()}
        plan.info["chosen"] = chosen
        plan.info["simulated"] = simulated
    return candidates, chosen


# the order the budget is spent on the candidates: one run each, a work-balanced and a banded cut first
# (on GSM8K the bands win on h100_llama7b by 19 %, the slot order on local by 4 %), then their
# slot-ordered variants, late binding, and the tiers last (their calibration is seven runs)
PRIORITY = ("prefix", "pack", "bands", "slots", "bands-slots", "bounded", "tiers")
# with predicted lengths (a scenario): the work-balanced cuts, then late binding, which every plan must
# beat by ROBUST_MARGIN, then the bands
SCENARIO_PRIORITY = ("prefix", "pack", "slots", "bounded", "bands", "bands-slots", "tiers")
# how much faster than late binding a plan must run on a scenario of predicted lengths to be kept:
# late binding adapts to the true lengths as they come, which one drawn scenario cannot show; on the
# mixed-task batch (600-request history) a scenario ranked a plan 3 % ahead of late binding on
# `local` that then ran 6 % behind it (docs/scheduling.md section 6)
ROBUST_MARGIN = 0.05


def names_in_priority(makers: dict, scenario: bool = False) -> list[str]:
    """The candidates in the order the budget is spent on them (PRIORITY; SCENARIO_PRIORITY when the
    runs serve a scenario of predicted lengths, where late binding is the reference)."""
    pri = SCENARIO_PRIORITY if scenario else PRIORITY
    return sorted(makers, key=lambda n: pri.index(n) if n in pri else len(pri))


def _assign_of(cluster: ClusterSpec, batch: list[Request], plan: Plan) -> np.ndarray:
    index = {r.name: k for k, r in enumerate(cluster.replicas())}
    return np.array([index[plan.assignment[q.id]] for q in batch], dtype=np.int64)


def _estimate_iterations(cluster: ClusterSpec, prompt: np.ndarray, output: np.ndarray, assign: np.ndarray) -> float:
    """A hybrid run's iteration count before any was simulated (``_iterations``' prior): per
    replica, its output tokens over its batch (at least its longest output), plus a prefill
    iteration per batch of its requests."""
    replicas = cluster.replicas()
    m = len(replicas)
    tokens = np.bincount(assign, weights=output, minlength=m)
    count = np.bincount(assign, minlength=m)
    longest = np.zeros(m)
    np.maximum.at(longest, assign, output)
    batch = np.array([r.group.max_batch_size for r in replicas], dtype=np.float64)
    return float(np.sum(np.maximum(tokens / batch, longest) + np.ceil(count / batch)))


def build_scheduler(name: str, cluster: ClusterSpec, requests: list[Request], lengths: str = "oracle",
                    seed: int = 0, history: list[tuple[int, int]] | None = None, predictor=None,
                    **kw) -> Scheduler:
    """The named policy's bundle; ``plan=`` passes a precomputed offline plan to planned policies,
    else one is made here (``make_plan``, with the other keyword arguments as its options).

    Every policy gets the same length predictor (``lengths``: oracle | quantile | online, starting
    from ``history`` pairs), or ``predictor`` when given (the runtime plans with it first): those
    that ignore lengths still report predicted work, and none sees a true length before the finish.
    """
    try:
        builder = BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(BUILDERS)}") from None
    if predictor is None:
        predictor = make_predictor(lengths, requests, seed, history=history)
    plan = kw.pop("plan", None)
    if plan is None and needs_plan(name):
        batch = initial_batch(requests)
        predicted = np.array([predictor.predict(q) for q in batch], dtype=np.float64)
        kw = {"bands": plan_bands(name, predictor), "dispatch": plan_dispatch(name, predictor, cluster, batch), **kw}
        if has_distribution(predictor):       # choose on a draw from it; cut the bands at its p90
            kw.setdefault("scenario_output", scenario_lengths(predictor, batch, seed))
            kw.setdefault("span_output", np.array([predict_quantiles(predictor, q)[1] for q in batch], np.float64))
        plan = make_plan(cluster, batch, predicted_output=predicted, **kw)
        kw = {}
    sch = builder(cluster, requests, plan=plan, predictor=predictor, seed=seed, **kw)
    sch.predictor = predictor
    return sch
