"""PlannerActor: the offline planner (``planning.make_plan``) as a Ray actor.

CP-SAT is CPU-heavy and runs for its time limit; in an actor it can run on any node of the
cluster (not necessarily the driver's) and later re-plan the remaining requests, e.g. after a
replica was lost, while the run goes on. The driver does not wait for it: the run starts on the
initial plan (``planner.initial``) and switches to this one when it arrives (``actors/driver.py``).
"""
from __future__ import annotations

from ..config import ClusterSpec
from ..planner.plan import Plan
from ..planning import make_plan
from ..workload import Request


class PlannerActor:
    def ready(self) -> bool:
        return True

    def plan(self, cluster: ClusterSpec, requests: list[Request], **opts) -> Plan:
        """``make_plan(cluster, requests, **opts)`` (method, time_limit_s, workers, seed, predicted_output)."""
        return make_plan(cluster, requests, **opts)

    def replan(self, cluster: ClusterSpec, remaining_requests: list[Request], **opts) -> Plan:
        """A fresh plan for what is left (a cluster without the failed replicas, say)."""
        return make_plan(cluster, remaining_requests, **opts)
