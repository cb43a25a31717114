"""Small builders shared by tests (random topologies and workloads)."""
from __future__ import annotations

import random
from dataclasses import replace

from hybrid_ray.config import ClusterSpec, ReplicaGroupSpec
from hybrid_ray.costmodel import CostModel, DecodeCost, PrefillCost
from hybrid_ray.workload import Request

COST = CostModel(PrefillCost(0.01, 0.002, 2e-5, 5e-10), DecodeCost(0.006, 7e-6, 1.7e-7))


def cluster(count: int = 2, max_batch: int = 8, kv: int = 10_000, cost: CostModel = COST, groups: int = 1,
            max_batched_tokens: int = 8192) -> ClusterSpec:
    gs = tuple(ReplicaGroupSpec(f"g{k}", count, max_batch, kv, cost.scaled(1 + k), max_batched_tokens)
               for k in range(groups))
    return ClusterSpec("test", gs)


def one_replica(cl: ClusterSpec, cost: CostModel) -> ClusterSpec:
    """``cl``'s first group, one replica, on ``cost`` (in-process replays and fidelity checks)."""
    cl = cl.with_cost_model(cost)
    return replace(cl, groups=(replace(cl.groups[0], count=1),))


def random_cluster(rng: random.Random, min_kv: int) -> ClusterSpec:
    groups = []
    for k in range(rng.randint(1, 3)):
        cost = CostModel(PrefillCost(rng.uniform(0, 0.02), rng.uniform(0, 0.01), rng.uniform(1e-6, 1e-4),
                                     rng.uniform(0, 1e-8)),
                         DecodeCost(rng.uniform(1e-3, 0.05), rng.uniform(0, 1e-4), rng.uniform(0, 1e-6)))
        groups.append(ReplicaGroupSpec(f"g{k}", rng.randint(1, 3), rng.randint(1, 8),
                                       rng.randint(min_kv, 3 * min_kv), cost, rng.choice([64, 256, 8192])))
    return ClusterSpec("random", tuple(groups))


def random_requests(rng: random.Random, n: int, arrivals: bool = False) -> list[Request]:
    t = 0.0
    out = []
    for i in range(n):
        if arrivals:
            t += rng.expovariate(20.0)
        out.append(Request(f"r{i}", rng.randint(1, 200), rng.randint(1, 60), t))
    return out
