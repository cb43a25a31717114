"""Named schedulers: `build_scheduler(name, cluster, requests)` gives the bundle a run uses."""
from __future__ import annotations

from ..config import ClusterSpec
from ..workload import Request
from .base import Scheduler
from .chunked import ChunkedPrefill
from .fcfs import FCFSPrefillFirst
from .routing import LeastLoadedRouter, PlanRouter, RoundRobinRouter
from .sorting import SortedQueue, plan_rank


def _knobs(cluster: ClusterSpec, name: str) -> dict:
    return dict(cluster.policy.get(name, {}))


def build_baseline(cluster: ClusterSpec, requests: list[Request], **_) -> Scheduler:
    return Scheduler("baseline", LeastLoadedRouter(), lambda r: FCFSPrefillFirst())


def build_round_robin(cluster: ClusterSpec, requests: list[Request], **_) -> Scheduler:
    return Scheduler("round-robin", RoundRobinRouter(), lambda r: FCFSPrefillFirst())


def build_chunked(cluster: ClusterSpec, requests: list[Request], **_) -> Scheduler:
    budget = int(_knobs(cluster, "chunked").get("token_budget", 512))
    return Scheduler("chunked", LeastLoadedRouter(), lambda r: ChunkedPrefill(budget))


def initial_batch(requests: list[Request]) -> list[Request]:
    """The requests known before the run starts (those at the first arrival time): what a plan covers."""
    t0 = min((q.arrival_s for q in requests), default=0.0)
    return [q for q in requests if q.arrival_s == t0]


def build_offline(cluster: ClusterSpec, requests: list[Request], plan=None, **plan_opts) -> Scheduler:
    """The paper's offline method: planned assignment and start order, FCFS inside replicas.

    ``plan`` may come precomputed (e.g. from a PlannerActor); else it is made here.
    """
    from ..planner.plan import make_plan

    if plan is None:
        plan = make_plan(cluster, initial_batch(requests), **plan_opts)
    index = {r.name: r.index for r in cluster.replicas()}
    router = PlanRouter({rid: index[name] for rid, name in plan.assignment.items()}, LeastLoadedRouter())
    rank = plan_rank(plan.rank())
    sch = Scheduler("offline", router, lambda r: SortedQueue(FCFSPrefillFirst(), rank))
    sch.info["plan"] = plan
    return sch


BUILDERS = {
    "baseline": build_baseline,
    "round-robin": build_round_robin,
    "chunked": build_chunked,
    "offline": build_offline,
}

PLANNED = {"offline"}

DESCRIPTIONS = {
    "baseline": "least-loaded routing + FCFS prefill-first continuous batching (vLLM v0 style)",
    "round-robin": "round-robin routing + FCFS prefill-first",
    "chunked": "least-loaded routing + Sarathi-style chunked prefill (token budget, vLLM v1 style)",
    "offline": "CP-SAT makespan plan (assignment + longest-first order) + FCFS prefill-first",
}


def policy_names() -> list[str]:
    return list(BUILDERS)


def needs_plan(name: str) -> bool:
    """Whether the policy starts from an offline plan (``build_scheduler(..., plan=...)``)."""
    return name in PLANNED


def build_scheduler(name: str, cluster: ClusterSpec, requests: list[Request], **kw) -> Scheduler:
    """The named policy's bundle; ``plan=`` passes a precomputed offline plan to planned policies."""
    try:
        builder = BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(BUILDERS)}") from None
    return builder(cluster, requests, **kw)
