"""Named schedulers: each policy's bundle (router, iteration policy, controller, dispatcher) built
from the cluster, the requests, a length predictor and, for the planned policies, an offline plan.

This module sits above ``policies/`` and ``planner/`` and below ``planning`` (which makes the plan
and simulates these very bundles to choose between candidate plans): it never plans, so nothing
below imports it back.
"""
from __future__ import annotations

import math

from .config import ClusterSpec
from .errors import ConfigError
from .knobs import KNOBS, KnobError, check_policy_knobs
from .planner.estimate import sequence_work
from .planner.prefix import crowding_groups
from .policies.base import Scheduler
from .policies.chunked import ChunkedPrefill
from .policies.controller import RebalanceController
from .policies.fcfs import FCFSPrefillFirst
from .policies.lagrangian import LagrangianPolicy
from .policies.predict import has_distribution, make_predictor
from .policies.raydata import RAY_DATA_IN_FLIGHT_FACTOR, RayDataDispatcher
from .policies.routing import EarliestFinishRouter, LeastLoadedRouter, PlanRouter, RoundRobinRouter
from .policies.serve import SERVE_LLM_MAX_ONGOING_REQUESTS, ServeDispatcher
from .policies.serve_prefix import PrefixAffinityDispatcher
from .policies.sorting import SortedQueue, longest_predicted_first, plan_rank
from .workload import Request


def _knobs(cluster: ClusterSpec, name: str) -> dict:
    """The policy's knobs: defaults overridden by the YAML (validated as at config load: a hand-built
    ClusterSpec gets the same one-line errors)."""
    try:
        check_policy_knobs(cluster.policy)
    except KnobError as e:
        raise ConfigError(f"{cluster.source}: {e}") from None
    return {**KNOBS.get(name, {}), **cluster.policy.get(name, {})}


def build_baseline(cluster: ClusterSpec, requests: list[Request], **_) -> Scheduler:
    return Scheduler("baseline", LeastLoadedRouter(), lambda r: FCFSPrefillFirst())


def build_round_robin(cluster: ClusterSpec, requests: list[Request], **_) -> Scheduler:
    return Scheduler("round-robin", RoundRobinRouter(), lambda r: FCFSPrefillFirst())


def build_chunked(cluster: ClusterSpec, requests: list[Request], **_) -> Scheduler:
    budget = int(_knobs(cluster, "chunked")["token_budget"])
    return Scheduler("chunked", LeastLoadedRouter(), lambda r: ChunkedPrefill(budget))


def vllm_v1_engine(r) -> ChunkedPrefill:
    """vLLM v1's scheduler inside a replica: chunked prefill always on, its token budget the group's
    ``max_batched_tokens`` (vLLM's ``max_num_batched_tokens``), running requests first, then waiting
    ones FCFS; recompute preemption of the newest when KV runs out (``ReplicaState.begin``)."""
    return ChunkedPrefill(r.max_batched_tokens)


def build_vllm(cluster: ClusterSpec, requests: list[Request], **_) -> Scheduler:
    """`vllm serve` data parallelism: least-loaded routing (fewest outstanding) to v1 engines."""
    return Scheduler("vllm", LeastLoadedRouter(), vllm_v1_engine)


def build_serve(cluster: ClusterSpec, requests: list[Request], seed: int = 0, **_) -> Scheduler:
    """Ray Serve LLM tuned for batch jobs: power-of-two-choices routing with replica queues bounded
    at ``max_ongoing_requests`` (default 2 x the batch), v1 engines (policies/serve.py)."""
    bound = int(_knobs(cluster, "serve")["max_ongoing_requests"])
    if bound < 0:
        raise ConfigError(f"{cluster.source}: policy.serve.max_ongoing_requests: expected an integer >= 1 "
                          f"(or 0 for 2 x max_batch_size), got {bound}")
    limits = {r.index: bound or 2 * r.group.max_batch_size for r in cluster.replicas()}
    sch = Scheduler("serve", LeastLoadedRouter(), vllm_v1_engine)
    sch.dispatcher = ServeDispatcher(limits, seed=seed)
    return sch


def build_serve_llm(cluster: ClusterSpec, requests: list[Request], seed: int = 0, **_) -> Scheduler:
    """Ray Serve LLM as deployed by default: the same power-of-two-choices router with Serve LLM's
    default ``max_ongoing_requests`` (``SERVE_LLM_MAX_ONGOING_REQUESTS``, 1e9: no bound), so every
    request is routed on arrival and waits in its replica's engine; v1 engines (policies/serve.py)."""
    limits = {r.index: SERVE_LLM_MAX_ONGOING_REQUESTS for r in cluster.replicas()}
    sch = Scheduler("serve-llm", LeastLoadedRouter(), vllm_v1_engine)
    sch.dispatcher = ServeDispatcher(limits, seed=seed)
    return sch


def build_serve_prefix(cluster: ClusterSpec, requests: list[Request], seed: int = 0, **_) -> Scheduler:
    """Ray Serve LLM with its prefix-aware router (``PrefixCacheAffinityRouter``, its default
    thresholds): a request goes to the replica whose routed prompts share its longest prefix, else
    to the replica with the least prompt text routed; unbounded queues as ``serve-llm``; v1 engines
    with prefix caching (policies/serve_prefix.py)."""
    k = _knobs(cluster, "serve-prefix")
    limits = {r.index: SERVE_LLM_MAX_ONGOING_REQUESTS for r in cluster.replicas()}
    threshold = int(k["imbalanced_threshold"]) or math.inf
    sch = Scheduler("serve-prefix", LeastLoadedRouter(), vllm_v1_engine)
    sch.dispatcher = PrefixAffinityDispatcher(limits, seed=seed, imbalanced_threshold=threshold,
                                              match_rate_threshold=float(k["match_rate_threshold"]))
    return sch


def build_raydata(cluster: ClusterSpec, requests: list[Request], **_) -> Scheduler:
    """Ray Data LLM: blocks of rows to the least-busy engine actor (at most
    ``max_tasks_in_flight_per_actor`` blocks submitted to one, ``max_concurrent_batches`` of them
    running in its engine), a vLLM v1 engine inside each (its stage builds ``vllm.AsyncLLMEngine``:
    v1, chunked prefill; policies/raydata.py)."""
    k = _knobs(cluster, "raydata")
    concurrent = int(k["max_concurrent_batches"])
    in_flight = int(k["max_tasks_in_flight_per_actor"]) or RAY_DATA_IN_FLIGHT_FACTOR * concurrent
    sch = Scheduler("raydata", LeastLoadedRouter(), vllm_v1_engine)
    sch.dispatcher = RayDataDispatcher(len(requests), int(k["batch_size"]), concurrent, in_flight)
    return sch


def build_lpt_engine(cluster: ClusterSpec, requests: list[Request], predictor=None, **_) -> Scheduler:
    """A per-engine batch scheduler modelled on vLLM-Ascend's batch-job-aware one (an LPT waiting
    queue inside a vLLM v1 scheduler): least-loaded routing, then each v1 engine's waiting queue
    sorted longest predicted output first (preempted requests stay in front). No cluster plan, no
    controller. docs/scheduling.md section 7 says where it differs from vLLM-Ascend's.

    ``predictor``: the run's length predictor, the very one the hybrid gets (``build_scheduler``
    passes it; the oracle only with ``--lengths oracle``). Built without one, it is the oracle, as
    ``build_scheduler``'s default ``lengths="oracle"`` is."""
    if predictor is None:
        predictor = make_predictor("oracle", requests)
    return Scheduler("lpt-engine", LeastLoadedRouter(), lambda r: SortedQueue(vllm_v1_engine(r)),
                     predictor=predictor, sort_key=longest_predicted_first, rekey=longest_predicted_first)


def initial_batch(requests: list[Request]) -> list[Request]:
    """The requests known before the run starts (those at the first arrival time): what a plan covers."""
    t0 = min((q.arrival_s for q in requests), default=0.0)
    return [q for q in requests if q.arrival_s == t0]


def plan_bands(policy: str, predictor) -> str:
    """The planner's ``bands`` option for ``policy``: length bands (planner/banded.py) are the
    hybrid's, with known lengths or a fitted length distribution (``has_distribution``: the bands
    are cut at its p90 and chosen on a draw from it, ``planning.make_plan``); not on a bare point
    prediction, where a band of requests predicted long that turn out short leaves its replica idle
    and the simulation that chooses would run on the same wrong lengths."""
    return "auto" if policy == "hybrid" and (predictor.name == "oracle" or has_distribution(predictor)) else "off"


def plan_dispatch(policy: str, predictor, cluster: ClusterSpec, requests: list[Request] | None = None) -> str:
    """The planner's default ``dispatch`` for ``policy`` (the YAML's policy.hybrid.dispatch wins).

    Known lengths: ``auto``, the planner simulates plan routing and late binding and keeps the
    faster. A fitted length distribution: ``auto`` too, on a draw from it, where a plan must beat
    late binding by ``planning.ROBUST_MARGIN``. A point prediction alone (online at the start): no
    simulation can tell (it would run on the same wrong lengths), so a rule. One group: late binding (Serve's bounded queues, fed longest predicted first), which
    balances by completions and needs no lengths; several groups: the plan, which puts work where
    it is cheapest, where late binding would hand long requests to a slow replica that frees first
    (docs/scheduling.md section 7 has the measurements). Whatever the lengths, a batch whose shared
    prefixes crowd the replicas' caches (``planner.prefix``) is planned: the prefix plan keeps each
    group where its prefix is cached."""
    if policy != "hybrid":
        return "plan"
    if predictor.name == "oracle" or has_distribution(predictor):
        return "auto"
    if requests is not None and crowding_groups(cluster, requests) is not None:
        return "plan"                 # a group runs where its prefix is cached: late binding would scatter it
    return "bounded" if len(cluster.groups) == 1 else "plan"


def _assignment(cluster: ClusterSpec, plan) -> dict[str, int]:
    """The plan's assignment as request id -> replica index (what ``PlanRouter`` routes by)."""
    if plan is None:
        raise ValueError("this policy routes by an offline plan: make one first (planning.build_scheduler "
                         "does, or pass plan=)")
    index = {r.name: r.index for r in cluster.replicas()}
    return {rid: index[name] for rid, name in plan.assignment.items()}


def build_offline(cluster: ClusterSpec, requests: list[Request], plan=None, predictor=None, **_) -> Scheduler:
    """The paper's offline method: planned assignment and start order, FCFS inside replicas.

    ``plan``: the offline plan (``planning.make_plan``, or a PlannerActor's).
    """
    predictor = predictor or make_predictor("oracle", requests)
    assignment = _assignment(cluster, plan)
    rank = plan_rank(plan.rank())
    sch = Scheduler("offline", PlanRouter(assignment, LeastLoadedRouter()),
                    lambda r: SortedQueue(FCFSPrefillFirst()), predictor=predictor, sort_key=rank)
    sch.info["plan"] = plan
    return sch


def build_hybrid(cluster: ClusterSpec, requests: list[Request], plan=None, predictor=None, seed: int = 0,
                 **_) -> Scheduler:
    """The hybrid method: offline plan + queue sorting + Lagrangian iteration rule + controller."""
    k = _knobs(cluster, "hybrid")
    if k["sort"] not in ("plan", "longest"):
        raise ConfigError(f"{cluster.source}: policy.hybrid.sort: expected 'plan' or 'longest', got {k['sort']!r}")
    predictor = predictor or make_predictor("oracle", requests)
    assignment = _assignment(cluster, plan)
    # the online rule's settings the planner found faster on this batch (planner.plan.tune_rule);
    # never one the YAML sets
    given = set(cluster.policy.get("hybrid", {}))
    k.update({key: v for key, v in plan.info.get("rule", {}).items() if key not in given})
    key = plan_rank(plan.rank()) if k["sort"] == "plan" else longest_predicted_first
    groups = [r.group for r in cluster.replicas()]

    def work_of(s, i: int) -> float:
        g = groups[i]
        return sequence_work(g.cost_model, g.max_batch_size, g.kv_capacity_tokens, s.req.prompt_tokens,
                             s.predicted_output)

    bounded = plan.info.get("dispatch") == "bounded"
    if bounded and "max_moves" not in given:
        # late binding: the central queue already balances, and moving what waits in a replica's
        # short queue only reshuffles it (GSM8K x paper_llama65b, online lengths, cost noise 0.05,
        # seeds 0-3: 181.59 / 177.55 / 175.73 / 188.33 s with moves, 179.64 / 177.45 / 174.67 /
        # 187.32 without)
        k["max_moves"] = 0
    mult, mixed, horizon, chunk = float(k["multiplier"]), bool(k["allow_mixed"]), int(k["horizon"]), int(k["chunk_tokens"])
    sch = Scheduler("hybrid", PlanRouter(assignment, EarliestFinishRouter(work_of)),
                    lambda r: SortedQueue(LagrangianPolicy(mult, mixed, horizon, chunk, str(k["ramp"]))),
                    RebalanceController(float(k["interval_s"]), float(k["threshold_s"]),
                                        float(k["rel_threshold"]), int(k["max_moves"]),
                                        keep_plan_profile=bool(plan.info.get("bands"))),
                    predictor=predictor, sort_key=key, rekey=None if k["sort"] == "plan" else key)
    if bounded:
        # late binding (planner.plan: kept when its simulated run is faster): Serve's bounded
        # replica queues, 2 x the batch, fed longest predicted first
        limits = {r.index: 2 * r.group.max_batch_size for r in cluster.replicas()}
        sch.dispatcher = ServeDispatcher(limits, seed=seed, order_key=longest_predicted_first)
    sch.info["plan"] = plan
    return sch


BUILDERS = {
    "baseline": build_baseline,
    "round-robin": build_round_robin,
    "chunked": build_chunked,
    "offline": build_offline,
    "hybrid": build_hybrid,
    "raydata": build_raydata,
    "vllm": build_vllm,
    "serve": build_serve,
    "serve-llm": build_serve_llm,
    "serve-prefix": build_serve_prefix,
    "lpt-engine": build_lpt_engine,
}

PLANNED = {"offline", "hybrid"}

DESCRIPTIONS = {
    "baseline": "the paper's baseline: least-loaded routing + FCFS prefill-first continuous batching (vLLM v0, no chunking)",
    "round-robin": "round-robin routing + FCFS prefill-first",
    "chunked": "least-loaded routing + Sarathi-style chunked prefill (token budget, vLLM v1 style)",
    "offline": "CP-SAT makespan plan (assignment + longest-first order) + FCFS prefill-first",
    "hybrid": "offline plan + sorting + Lagrangian prefill-vs-decode rule + rebalancing controller",
    "raydata": "ray.data.llm's dispatch: blocks of 32 rows to the least-busy engine actor (<= 16 blocks in flight "
               "per actor, 8 of them in its engine), vLLM v1 engines",
    "lpt-engine": "least-loaded routing + vLLM v1 engines, waiting queue longest-predicted-first (per-engine batch scheduler)",
    "vllm": "`vllm serve` data parallel: least-loaded routing + vLLM v1 engines (chunked prefill, budget = max_batched_tokens)",
    "serve": "Ray Serve LLM, tuned: power-of-two-choices router, <= max_ongoing_requests per replica (2 x batch), "
             "vLLM v1 engines",
    "serve-prefix": "Ray Serve LLM with its PrefixCacheAffinityRouter (default thresholds: prefix match rate >= 0.1, "
                    "no load threshold), unbounded queues, vLLM v1 engines with prefix caching",
    "serve-llm": "Ray Serve LLM as deployed by default: power-of-two-choices router, max_ongoing_requests 1e9 "
                 "(unbounded: every request routed on arrival), vLLM v1 engines",
}


def policy_names() -> list[str]:
    return list(BUILDERS)


def needs_plan(name: str) -> bool:
    """Whether the policy starts from an offline plan (``build_scheduler(..., plan=...)``)."""
    return name in PLANNED
