"""Property tests: random small workloads and topologies, every policy.

Invariants checked independently of the replica's own assertions: each request finishes exactly
once with exactly its output tokens; no iteration exceeds the batch or KV limits; time never
goes backwards; the same inputs give the same results.
"""
import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from hybrid_ray.metrics import summarize
from hybrid_ray.policies import build_scheduler, policy_names
from hybrid_ray.replica import RUNNING, ReplicaState
from hybrid_ray.simulator import simulate

from helpers import random_cluster, random_requests


def _kv_from_scratch(r: ReplicaState) -> int:
    held = sum(s.req.prompt_tokens + r.generated(s) for s in r.running.values())
    return held + sum(s.prefilled for s in r.prefilling.values())


@pytest.fixture
def checked_begin(monkeypatch):
    """Wrap ReplicaState.begin to check the limits after every admission."""
    seen = {"iterations": 0}
    orig = ReplicaState.begin

    def begin(self, it):
        out = orig(self, it)
        assert len(self.running) + len(self.prefilling) <= self.max_batch
        assert _kv_from_scratch(self) == self.kv_used
        growth = len(self.running) if it.decode else 0
        assert self.kv_used + growth <= self.kv_capacity
        seen["iterations"] += 1
        return out

    monkeypatch.setattr(ReplicaState, "begin", begin)
    return seen


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), n=st.integers(1, 40), arrivals=st.booleans(),
       policy=st.sampled_from(policy_names()))
def test_invariants(checked_begin, seed, n, arrivals, policy):
    rng = random.Random(seed)
    reqs = random_requests(rng, n, arrivals)
    cl = random_cluster(rng, min_kv=max(q.prompt_tokens + q.output_tokens for q in reqs))
    before = checked_begin["iterations"]
    rec = simulate(cl, build_scheduler(policy, cl, reqs, method="lpt"), reqs)
    finished = [s for r in rec.replicas for s in r.finished]
    assert sorted(s.id for s in finished) == sorted(q.id for q in reqs)          # exactly once
    for s in rec.sequences:
        assert s.generated == s.req.output_tokens
        assert s.req.arrival_s <= s.first_token_s <= s.finish_s
        assert s.status != RUNNING
    for r in rec.replicas:
        prev = 0.0
        for x in r.records:
            assert x.start_s >= prev - 1e-12 and x.end_s > x.start_s
            prev = x.end_s
        assert r.kv_used == 0 and not r.running and not r.waiting
    assert checked_begin["iterations"] - before == sum(len(r.records) for r in rec.replicas)
    again = simulate(cl, build_scheduler(policy, cl, reqs, method="lpt"), reqs)
    assert [s.finish_s for s in again.sequences] == [s.finish_s for s in rec.sequences]
    assert summarize(again).to_dict() == summarize(rec).to_dict()


def test_tight_kv_preempts_but_never_loses(checked_begin):
    rng = random.Random(7)
    reqs = random_requests(rng, 60)
    cl = random_cluster(rng, min_kv=max(q.prompt_tokens + q.output_tokens for q in reqs))
    total = 0
    for policy in policy_names():
        rec = simulate(cl, build_scheduler(policy, cl, reqs, method="lpt"), reqs)
        assert sorted(s.id for r in rec.replicas for s in r.finished) == sorted(q.id for q in reqs)
        total += sum(s.preemptions for s in rec.sequences)
    assert total > 0, "this instance was chosen to exercise preemption"
