"""Prefix-aware planning, the prefix-aware bound and Ray Serve LLM's prefix-aware router (issue 28).

* the bound counts a first prefill less the blocks another request's prompt shares, a recompute
  less its own cached prompt, and each distinct shared block once in the cluster; it stays below
  every schedule the state machine accepts, adversarial ones included, with prefix caching on;
* the planner packs prefix groups as items where the distinct prefixes crowd a replica's cache,
  and each replica runs its groups one after another;
* ``serve-prefix`` routes by the longest prefix match, else to the smallest tenant.
"""
from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybrid_ray.config import ClusterSpec
from hybrid_ray.metrics import summarize
from hybrid_ray.planner import bounds
from hybrid_ray.planner.bounds import lower_bound
from hybrid_ray.planner.prefix import grouped_order, prefix_groups, prefixes_crowd
from hybrid_ray.planning import build_scheduler
from hybrid_ray.policies.base import Scheduler
from hybrid_ray.policies.routing import LeastLoadedRouter
from hybrid_ray.policies.serve_prefix import PrefixAffinityDispatcher
from hybrid_ray.prefix_cache import HASH_BLOCK_TOKENS
from hybrid_ray.prefix_workloads import doc_qa
from hybrid_ray.replica import Sequence
from hybrid_ray.simulator import simulate
from hybrid_ray.workload import Request, prefix_requests

from helpers import cluster, random_cluster
from test_simulator_properties import ADVERSARIES

B = HASH_BLOCK_TOKENS


def _prefixed(rng: random.Random, n: int) -> list[Request]:
    """n requests in a few groups: a shared chain of 1-2 ids (512-token blocks), then their own."""
    groups = [tuple(rng.randrange(1, 10**6) for _ in range(rng.randint(1, 2))) for _ in range(rng.randint(1, 4))]
    out = []
    for i in range(n):
        g = rng.choice(groups)
        prompt = len(g) * B + rng.randint(1, 300)
        own = tuple(rng.randrange(10**6, 2 * 10**6) for _ in range(-(-prompt // B) - len(g)))
        out.append(Request(f"p{i}", prompt, rng.randint(1, 25), 0.0, hash_ids=g + own))
    return out


def _case(seed: int, n: int, tiny_kv: bool) -> tuple[ClusterSpec, list[Request]]:
    rng = random.Random(seed)
    reqs = _prefixed(rng, n)
    need = max(q.prompt_tokens + q.output_tokens for q in reqs)
    cl = random_cluster(rng, min_kv=need)
    cl = replace(cl, groups=tuple(replace(g, block_size=rng.choice([8, 16, 64]), max_batched_tokens=max(
        g.max_batched_tokens, 4096), kv_capacity_tokens=need + rng.randint(0, 5) if tiny_kv else g.kv_capacity_tokens)
        for g in cl.groups))
    return cl, reqs


def _above(cl, reqs, rec) -> None:
    lb = lower_bound(cl, reqs)
    ms = summarize(rec).makespan_s
    assert ms >= lb.value_s, f"{rec.policy}: makespan {ms:.6g} s < bound {lb.value_s:.6g} s"


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 20), tiny_kv=st.booleans(),
       adversary=st.sampled_from(sorted(ADVERSARIES)))
def test_adversarial_schedules_with_prefix_caching_respect_the_bound(seed, n, tiny_kv, adversary):
    cl, reqs = _case(seed, n, tiny_kv)
    rec = simulate(cl, Scheduler(adversary, LeastLoadedRouter(), ADVERSARIES[adversary]), reqs)
    assert all(s.generated == s.req.output_tokens for s in rec.sequences)
    _above(cl, reqs, rec)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 24), tiny_kv=st.booleans(),
       policy=st.sampled_from(["vllm", "baseline", "serve-prefix", "hybrid"]))
def test_policies_with_prefix_caching_respect_the_bound(seed, n, tiny_kv, policy):
    cl, reqs = _case(seed, n, tiny_kv)
    rec = simulate(cl, build_scheduler(policy, cl, reqs, time_limit_s=float("inf"), deterministic_time=0.05), reqs)
    _above(cl, reqs, rec)


def test_caching_lowers_the_bound_only_where_prefixes_are_shared():
    rng = random.Random(5)
    reqs = _prefixed(rng, 30)
    cl = cluster(count=2, max_batch=8, kv=20_000)
    off = replace(cl, groups=tuple(replace(g, prefix_caching=False) for g in cl.groups))
    bare = [replace(q, hash_ids=None) for q in reqs]
    assert lower_bound(off, reqs) == lower_bound(cl, bare) == lower_bound(off, bare)
    assert lower_bound(cl, reqs).value_s < lower_bound(off, reqs).value_s
    # unshared ids: only a recompute could hit (its own prompt); the first prefills stay whole
    own = [replace(q, hash_ids=tuple(10**7 + 100 * i + k for k in range(len(q.hash_ids)))) for i, q in enumerate(reqs)]
    sh = bounds._sharing(cl.groups[0], own, np.array([q.prompt_tokens for q in own], float))
    assert sh.shared_tokens == 0 and np.array_equal(sh.first, [q.prompt_tokens for q in own])


def test_sharing_counts_block_aligned_prefixes_and_the_last_token():
    g = replace(cluster(count=1).groups[0], block_size=16)
    a = Request("a", 2 * B + 10, 5, hash_ids=(1, 2, 3))
    b = Request("b", 2 * B, 5, hash_ids=(1, 2))          # its whole prompt is shared: the last token is not
    c = Request("c", B + 100, 5, hash_ids=(1, 9))
    p = np.array([q.prompt_tokens for q in (a, b, c)], float)
    sh = bounds._sharing(g, [a, b, c], p)
    assert sh.first.tolist() == [10.0, 16.0, 100.0]   # a: its 64 full blocks are shared; b: all but the last
    assert sh.shared_tokens == 2 * B                        # ids (1), (1, 2): 64 distinct blocks
    assert sh.recompute.tolist() == [p[0] - ((p[0] - 1) // 16) * 16, 16.0, p[2] - ((p[2] - 1) // 16) * 16]


def test_cached_decode_term_is_the_least_of_decode_and_cached_recompute():
    g = cluster(count=1).groups[0]
    dc, pc = g.cost_model.decode, g.cost_model.prefill
    _, rho = bounds.iteration_floor(g)
    rng = np.random.default_rng(0)
    for _ in range(100):
        p = float(rng.integers(2, 9000))
        pr = float(rng.integers(1, p + 1))
        steps = float(rng.integers(0, 300))
        j = np.arange(1, steps + 1)
        n = pr + j
        brute = np.minimum(dc.per_seq_s + dc.per_ctx_token_s * (p + j),
                           rho * n + pc.per_token_sq_s * n * (2 * (p - pr) + n)).sum()
        tot = steps * p + steps * (steps + 1) / 2
        got = bounds._cached_lin(pc.per_token_sq_s, rho, dc.per_seq_s, dc.per_ctx_token_s, np.array([p]),
                                 np.array([pr]), np.array([steps]), np.array([tot]))[0]
        assert got == pytest.approx(brute, rel=1e-9, abs=1e-12)


def test_groups_are_the_deepest_shared_prefix():
    reqs = [Request("a", 3 * B, 5, hash_ids=(1, 2, 3)), Request("b", 3 * B, 5, hash_ids=(1, 2, 4)),
            Request("c", 2 * B, 5, hash_ids=(1, 5)), Request("d", B, 5, hash_ids=(7,)), Request("e", B, 5)]
    g = prefix_groups(reqs)
    assert g.group[0] == g.group[1] != g.group[2] and g.group[3] == g.group[4] == -1
    assert g.shared.tolist() == [2 * B, 2 * B, B, 0, 0]
    assert prefix_groups([Request("x", B, 5, hash_ids=(1,)), Request("y", B, 5, hash_ids=(2,))]) is None


@pytest.fixture(scope="module")
def docqa():
    """300 questions over 30 documents on 4 small replicas whose caches hold a few documents."""
    reqs = prefix_requests(doc_qa(300, seed=3, docs=30))
    cl = cluster(count=4, max_batch=32, kv=40_000)
    return cl, reqs


def test_the_prefix_plan_runs_groups_together_and_beats_the_baselines(docqa):
    cl, reqs = docqa
    groups = prefix_groups(reqs)
    assert prefixes_crowd(cl, groups)
    sch = build_scheduler("hybrid", cl, reqs, plan_share=0.02)
    plan = sch.info["plan"]
    assert plan.method == "prefix" and plan.info["chosen"] == "prefix"
    index = {q.id: i for i, q in enumerate(reqs)}
    for ids in plan.order.values():
        g = [groups.group[index[x]] for x in ids]
        runs = [k for i, k in enumerate(g) if i == 0 or k != g[i - 1]]
        assert len(runs) == len(set(runs))                 # each group in one contiguous run
    hybrid = summarize(simulate(cl, sch, reqs))
    vllm = summarize(simulate(cl, build_scheduler("vllm", cl, reqs), reqs))
    assert hybrid.prefix_hit_rate > vllm.prefix_hit_rate
    assert hybrid.makespan_s < 0.9 * vllm.makespan_s
    assert hybrid.makespan_s >= lower_bound(cl, reqs).value_s


def test_prefixes_that_fit_every_cache_leave_the_usual_cuts(docqa):
    cl, reqs = docqa
    big = cluster(count=4, max_batch=32, kv=10_000_000)
    assert not prefixes_crowd(big, prefix_groups(reqs))
    plan = build_scheduler("hybrid", big, reqs, plan_share=0.02).info["plan"]
    assert plan.method != "prefix" and "prefix" not in plan.info.get("candidates", {})


def test_grouped_order_keeps_groups_contiguous_longest_first():
    reqs = [Request(f"r{i}", 2 * B, o, hash_ids=((1, 2) if i < 3 else (5, 6))[:1] + (100 + i, 200 + i))
            for i, o in enumerate([5, 9, 7, 3, 8])]
    reqs.append(Request("solo", 2 * B, 50))
    g = prefix_groups(reqs)
    idx = np.arange(len(reqs))
    work = np.array([1.0, 1.0, 1.0, 5.0, 5.0, 0.5])
    order = grouped_order(idx, g, work, np.array([q.output_tokens for q in reqs], float)).tolist()
    assert order == [4, 3, 1, 2, 0, 5]                     # the heavier group first, each longest first


def _seq(rid: str, prompt: int, ids) -> Sequence:
    return Sequence(Request(rid, prompt, 5, hash_ids=ids), 5)


class _Live:
    """A load report as the dispatcher reads it: its replica index."""

    def __init__(self, i: int):
        self.index = i


def test_serve_prefix_routes_by_match_else_to_the_smallest_tenant():
    d = PrefixAffinityDispatcher({0: 10**9, 1: 10**9, 2: 10**9}, seed=0)
    live = [_Live(0), _Live(1), _Live(2)]
    first = d.admit([_seq("a", 3 * B, (1, 2, 3))], live)
    assert first == [(first[0][0], 0)]                    # every tenant empty: the smallest, lowest index
    again = d.admit([_seq("b", 3 * B, (1, 2, 9))], live)[0][1]
    assert again == 0 and d.prefix_routed == 1            # 2 of 3 blocks match: 67 % >= 10 %
    other = d.admit([_seq("c", 3 * B, (7, 8, 9))], live)[0][1]
    assert other == 1                                     # no match: the smallest tenant
    low = d.admit([_seq("d", 40 * B, (1,) + tuple(range(50, 89)))], live)[0][1]
    assert low == 2                                       # 1 of 40 blocks: below 10 %, smallest tenant


def test_serve_prefix_falls_back_to_two_choices_when_imbalanced():
    d = PrefixAffinityDispatcher({0: 10**9, 1: 10**9}, seed=0, imbalanced_threshold=2)
    live = [_Live(0), _Live(1)]
    placed = [d.admit([_seq(f"s{i}", 2 * B, (1, 2))], live)[0][1] for i in range(6)]
    assert placed[:3] == [0, 0, 0]                        # by match, until replica 0 runs 3 more
    assert 1 in placed[3:]                                # imbalance past 2: power of two choices
