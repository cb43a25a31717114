"""Named schedulers: `build_scheduler(name, cluster, requests)` gives the bundle a run uses."""
from __future__ import annotations

import numpy as np

from ..config import ClusterSpec
from ..errors import ConfigError
from ..planner.estimate import sequence_work
from ..workload import Request
from .base import Scheduler
from .chunked import ChunkedPrefill
from .controller import RebalanceController
from .fcfs import FCFSPrefillFirst
from .lagrangian import LagrangianPolicy
from .predict import make_predictor
from .raydata import RayDataDispatcher
from .routing import EarliestFinishRouter, LeastLoadedRouter, PlanRouter, RoundRobinRouter
from .serve import ServeDispatcher
from .sorting import SortedQueue, longest_predicted_first, plan_rank

# Knobs a cluster YAML may set under `policy: {NAME: {...}}`, with their defaults.
KNOBS: dict[str, dict[str, object]] = {
    "chunked": {"token_budget": 512},
    "raydata": {"batch_size": 32, "max_concurrent_batches": 8},
    "serve": {"max_ongoing_requests": 0},          # 0: 2 x each replica's max_batch_size
    "hybrid": {"multiplier": 1.0, "allow_mixed": True, "chunk_tokens": 512, "horizon": 32, "sort": "plan",
               "interval_s": 1.0, "threshold_s": 0.5, "rel_threshold": 0.01, "max_moves": 4},
}


def _knobs(cluster: ClusterSpec, name: str) -> dict:
    """The policy's knobs: defaults overridden by the YAML; unknown keys and wrong types rejected."""
    given = dict(cluster.policy.get(name, {}))
    allowed = KNOBS.get(name, {})
    out = dict(allowed)
    for key, value in given.items():
        if key not in allowed:
            raise ConfigError(f"{cluster.source}: policy.{name}: unknown key {key!r}; allowed: "
                              f"{', '.join(sorted(allowed)) or '(none)'}")
        default = allowed[key]
        ok = (isinstance(value, bool) if isinstance(default, bool) else
              isinstance(value, (int, float)) and not isinstance(value, bool) if isinstance(default, (int, float))
              else isinstance(value, type(default)))
        if not ok:
            raise ConfigError(f"{cluster.source}: policy.{name}.{key}: expected {type(default).__name__}, "
                              f"got {value!r}")
        out[key] = value
    for name_ in cluster.policy:
        if name_ not in KNOBS:
            raise ConfigError(f"{cluster.source}: policy: unknown policy {name_!r}; knobs exist for "
                              f"{', '.join(sorted(KNOBS))}")
    return out


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
    """Ray Serve LLM: power-of-two-choices routing with bounded replica queues, v1 engines (policies/serve.py)."""
    bound = int(_knobs(cluster, "serve")["max_ongoing_requests"])
    if bound < 0:
        raise ConfigError(f"{cluster.source}: policy.serve.max_ongoing_requests: expected an integer >= 1 "
                          f"(or 0 for 2 x max_batch_size), got {bound}")
    limits = {r.index: bound or 2 * r.group.max_batch_size for r in cluster.replicas()}
    sch = Scheduler("serve", LeastLoadedRouter(), vllm_v1_engine)
    sch.dispatcher = ServeDispatcher(limits, seed=seed)
    return sch


def build_raydata(cluster: ClusterSpec, requests: list[Request], **_) -> Scheduler:
    """Ray Data LLM: blocks of rows to the least-busy engine actor, FCFS inside (policies/raydata.py)."""
    k = _knobs(cluster, "raydata")
    sch = Scheduler("raydata", LeastLoadedRouter(), lambda r: FCFSPrefillFirst())
    sch.dispatcher = RayDataDispatcher(len(requests), int(k["batch_size"]), int(k["max_concurrent_batches"]))
    return sch


def build_lpt_engine(cluster: ClusterSpec, requests: list[Request], predictor=None, **_) -> Scheduler:
    """A per-engine batch scheduler (vLLM-Ascend's batch-job-aware one): least-loaded routing, then
    longest predicted output first inside each engine. No cluster plan, no controller."""
    return Scheduler("lpt-engine", LeastLoadedRouter(), lambda r: SortedQueue(FCFSPrefillFirst()),
                     predictor=predictor or make_predictor("oracle", requests), sort_key=longest_predicted_first,
                     rekey=longest_predicted_first)


def initial_batch(requests: list[Request]) -> list[Request]:
    """The requests known before the run starts (those at the first arrival time): what a plan covers."""
    t0 = min((q.arrival_s for q in requests), default=0.0)
    return [q for q in requests if q.arrival_s == t0]


def _planned(cluster: ClusterSpec, requests: list[Request], plan, predictor, plan_opts: dict):
    """The offline plan of the initial batch, made with the predictor's lengths."""
    from ..planner.plan import make_plan

    if plan is None:
        batch = initial_batch(requests)
        predicted = np.array([predictor.predict(q) for q in batch], dtype=np.float64)
        plan = make_plan(cluster, batch, predicted_output=predicted, **plan_opts)
    index = {r.name: r.index for r in cluster.replicas()}
    return plan, {rid: index[name] for rid, name in plan.assignment.items()}


def build_offline(cluster: ClusterSpec, requests: list[Request], plan=None, predictor=None, seed: int = 0,
                  **plan_opts) -> Scheduler:
    """The paper's offline method: planned assignment and start order, FCFS inside replicas.

    ``plan`` may come precomputed (e.g. from a PlannerActor); else it is made here.
    """
    predictor = predictor or make_predictor("oracle", requests)
    plan, assignment = _planned(cluster, requests, plan, predictor, plan_opts)
    rank = plan_rank(plan.rank())
    sch = Scheduler("offline", PlanRouter(assignment, LeastLoadedRouter()),
                    lambda r: SortedQueue(FCFSPrefillFirst()), predictor=predictor, sort_key=rank)
    sch.info["plan"] = plan
    return sch


def build_hybrid(cluster: ClusterSpec, requests: list[Request], plan=None, predictor=None, seed: int = 0,
                 **plan_opts) -> Scheduler:
    """The hybrid method: offline plan + queue sorting + Lagrangian iteration rule + controller."""
    k = _knobs(cluster, "hybrid")
    if k["sort"] not in ("plan", "longest"):
        raise ConfigError(f"{cluster.source}: policy.hybrid.sort: expected 'plan' or 'longest', got {k['sort']!r}")
    predictor = predictor or make_predictor("oracle", requests)
    plan, assignment = _planned(cluster, requests, plan, predictor, plan_opts)
    key = plan_rank(plan.rank()) if k["sort"] == "plan" else longest_predicted_first
    groups = [r.group for r in cluster.replicas()]

    def work_of(s, i: int) -> float:
        g = groups[i]
        return sequence_work(g.cost_model, g.max_batch_size, g.kv_capacity_tokens, s.req.prompt_tokens,
                             s.predicted_output)

    mult, mixed, horizon, chunk = float(k["multiplier"]), bool(k["allow_mixed"]), int(k["horizon"]), int(k["chunk_tokens"])
    sch = Scheduler("hybrid", PlanRouter(assignment, EarliestFinishRouter(work_of)),
                    lambda r: SortedQueue(LagrangianPolicy(mult, mixed, horizon, chunk)),
                    RebalanceController(float(k["interval_s"]), float(k["threshold_s"]),
                                        float(k["rel_threshold"]), int(k["max_moves"])),
                    predictor=predictor, sort_key=key, rekey=None if k["sort"] == "plan" else key)
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
    "lpt-engine": build_lpt_engine,
}

PLANNED = {"offline", "hybrid"}

DESCRIPTIONS = {
    "baseline": "least-loaded routing + FCFS prefill-first continuous batching (vLLM v0 style)",
    "round-robin": "round-robin routing + FCFS prefill-first",
    "chunked": "least-loaded routing + Sarathi-style chunked prefill (token budget, vLLM v1 style)",
    "offline": "CP-SAT makespan plan (assignment + longest-first order) + FCFS prefill-first",
    "hybrid": "offline plan + sorting + Lagrangian prefill-vs-decode rule + rebalancing controller",
    "raydata": "ray.data.llm's dispatch: blocks of 32 rows to the least-busy engine (<= 8 blocks in flight), FCFS",
    "lpt-engine": "least-loaded routing + longest-predicted-first inside each engine (per-engine batch scheduler)",
    "vllm": "`vllm serve` data parallel: least-loaded routing + vLLM v1 engines (chunked prefill, budget = max_batched_tokens)",
    "serve": "Ray Serve LLM: power-of-two-choices router, <= max_ongoing_requests per replica (2 x batch), vLLM v1 engines",
}


def policy_names() -> list[str]:
    return list(BUILDERS)


def needs_plan(name: str) -> bool:
    """Whether the policy starts from an offline plan (``build_scheduler(..., plan=...)``)."""
    return name in PLANNED


def build_scheduler(name: str, cluster: ClusterSpec, requests: list[Request], lengths: str = "oracle",
                    seed: int = 0, history: list[tuple[int, int]] | None = None, predictor=None,
                    **kw) -> Scheduler:
    """The named policy's bundle; ``plan=`` passes a precomputed offline plan to planned policies.

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
    sch = builder(cluster, requests, predictor=predictor, seed=seed, **kw)
    sch.predictor = predictor
    return sch
