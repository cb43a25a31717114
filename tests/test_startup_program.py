"""The start-up program: how an idle replica fills its batch (policies/lagrangian.py)."""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from hybrid_ray.config import ClusterSpec, load_cluster
from hybrid_ray.costmodel import CostModel, DecodeCost, PrefillCost
from hybrid_ray.knobs import KnobError, check_policy_knobs
from hybrid_ray.policies.base import Scheduler
from hybrid_ray.policies.lagrangian import LagrangianPolicy, startup_program
from hybrid_ray.policies.routing import LeastLoadedRouter
from hybrid_ray.replica import MIXED, PREFILL
from hybrid_ray.simulator import simulate
from hybrid_ray.workload import Request


@pytest.fixture(scope="module")
def h100_7b() -> ClusterSpec:
    return load_cluster("h100_llama7b")


def _program_cost(cost: CostModel, prompts: list[int], sizes: list[int], batch: int, mu: float) -> float:
    """What the program's groups cost beyond every token's own decode cost (the docstring's sum)."""
    total, at, n = 0.0, 0, 0
    base = cost.decode.base_s
    for i, k in enumerate(sizes):
        group = prompts[at:at + k]
        at += k
        n += k
        pre = cost.prefill_time(sum(group), sum(x * x for x in group))
        total += (pre if i == 0 else max(base, pre)) - base + mu * (batch - n)
    return total


def _compositions(n: int):
    for cuts in itertools.product((False, True), repeat=n - 1):
        sizes, run = [], 1
        for c in cuts:
            if c:
                sizes.append(run)
                run = 1
            else:
                run += 1
        yield sizes + [run]


@pytest.mark.parametrize("seed", range(5))
def test_program_is_the_least_cost_composition(h100_7b, seed):
    """Exact: no other split of the prompts into consecutive groups costs less (brute force)."""
    cost = h100_7b.groups[0].cost_model
    rng = np.random.default_rng(seed)
    prompts = sorted(rng.integers(20, 400, 9).tolist())
    batch = 16
    mu = 4 * cost.decode.base_s / batch
    sizes = startup_program(cost, prompts, batch, budget=8192, mu=mu)
    assert sum(sizes) == len(prompts) and min(sizes) >= 1
    best = min(_program_cost(cost, prompts, s, batch, mu) for s in _compositions(len(prompts)))
    assert _program_cost(cost, prompts, sizes, batch, mu) == pytest.approx(best, rel=1e-12)


def test_program_on_a_full_batch_of_short_prompts(h100_7b):
    """128 GSM8K-like prompts on a 7B replica: a first group, then small groups near the prefill's
    knee (236 tokens), and less start-up cost than one prefill of all of them."""
    g = h100_7b.groups[0]
    cost = g.cost_model
    prompts = [70] * 128
    mu = cost.decode.base_s / 128
    sizes = startup_program(cost, prompts, 128, budget=10_000, mu=mu)
    assert len(sizes) > 5 and sizes[0] > max(sizes[1:])
    knee = (cost.prefill.floor_s - cost.prefill.base_s) / cost.prefill.per_token_s
    assert all(70 * k <= knee + 70 for k in sizes[1:])
    assert _program_cost(cost, prompts, sizes, 128, mu) < 0.85 * _program_cost(cost, prompts, [128], 128, mu)
    # a flat prefill (no per-token price) has nothing to save: one group
    flat = CostModel(PrefillCost(floor_s=0.01, base_s=0.01, per_token_s=0.0, per_token_sq_s=0.0),
                     DecodeCost(base_s=0.006, per_seq_s=0.0, per_ctx_token_s=0.0))
    assert startup_program(flat, prompts, 128, budget=10_000, mu=mu) == [128]


def test_program_keeps_the_token_budget(h100_7b):
    cost = h100_7b.groups[0].cost_model
    prompts = [300] * 40
    sizes = startup_program(cost, prompts, 64, budget=1000, mu=1.0)      # slots priced high: big groups
    at = 0
    for i, k in enumerate(sizes):
        running = at
        assert k == 1 or 300 * k + running <= 1000
        at += k


def _one_replica(cfg: ClusterSpec) -> ClusterSpec:
    return ClusterSpec(name="one", groups=(dataclasses.replace(cfg.groups[0], count=1),), time_scale=cfg.time_scale)


def _run(cluster: ClusterSpec, reqs: list[Request], ramp: str):
    sch = Scheduler("lagrangian", LeastLoadedRouter(), lambda r: LagrangianPolicy(chunk_tokens=512, ramp=ramp))
    return simulate(cluster, sch, reqs)


def _requests(n: int, seed: int = 3) -> list[Request]:
    rng = np.random.default_rng(seed)
    return [Request(f"r{i}", int(p), int(o), 0.0)
            for i, (p, o) in enumerate(zip(rng.integers(30, 80, n), rng.integers(60, 140, n)))]


def test_an_idle_replica_follows_its_program(h100_7b):
    """384 short requests on one 128-slot replica: it runs the program's groups over the first 128,
    in order, each riding a decode step; every request completes; and it ends sooner than with
    one first prefill of all 128."""
    cluster = _one_replica(h100_7b)
    reqs = _requests(384)
    on, off = _run(cluster, reqs, "shortest"), _run(cluster, reqs, "off")
    g = cluster.groups[0]
    first = reqs[:g.max_batch_size]
    prompts = [first[0].prompt_tokens] + sorted(q.prompt_tokens for q in first[1:])
    sizes = startup_program(g.cost_model, prompts, g.max_batch_size, g.max_batched_tokens,
                            g.cost_model.decode.base_s / g.max_batch_size)
    recs = on.replicas[0].records
    assert [x.kind for x in recs[:len(sizes)]] == [PREFILL] + [MIXED] * (len(sizes) - 1)
    assert [x.prefills for x in recs[:len(sizes)]] == sizes
    assert [x.tokens for x in recs[:len(sizes)]] == [sum(prompts[a:a + k]) for a, k in
                                                    zip(np.cumsum([0] + sizes[:-1]), sizes)]
    assert off.replicas[0].records[0].prefills == g.max_batch_size
    for run in (on, off):
        assert sorted(s.req.id for s in run.sequences if s.finish_s >= 0) == sorted(q.id for q in reqs)
        assert sum(x.outputs for x in run.replicas[0].records) == sum(q.output_tokens for q in reqs)
    assert on.makespan_s < off.makespan_s


def test_no_program_without_requests_behind_the_batch(h100_7b):
    """With no more requests than slots, a late start only delays its request: one first prefill."""
    cluster = _one_replica(h100_7b)
    reqs = _requests(128)
    on, off = _run(cluster, reqs, "shortest"), _run(cluster, reqs, "off")
    assert on.replicas[0].records[0].prefills == 128
    assert on.makespan_s == off.makespan_s


def test_ramp_knob_is_checked():
    with pytest.raises(KnobError, match="policy.hybrid.ramp"):
        check_policy_knobs({"hybrid": {"ramp": "sometimes"}})
    with pytest.raises(ValueError, match="unknown ramp"):
        LagrangianPolicy(ramp="sometimes")
