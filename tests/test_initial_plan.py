"""The fast initial plan (``planner.initial``): a complete Plan, an LPT packing, longest first."""
from __future__ import annotations

import numpy as np
import pytest

from hybrid_ray.inputs import load_inputs
from hybrid_ray.planner.estimate import work_matrix
from hybrid_ray.planner.initial import initial_plan
from hybrid_ray.workload import Request


def _requests(n: int, seed: int = 0) -> list[Request]:
    rng = np.random.default_rng(seed)
    prompt = rng.integers(8, 2000, n)
    output = np.minimum(rng.geometric(1 / 200, n), 2000)       # long-tailed, as LLM outputs are
    return [Request(f"r{k}", int(p), int(o), 0.0) for k, (p, o) in enumerate(zip(prompt, output))]


@pytest.mark.parametrize("config", ["local", "hetero"])      # identical replicas; two groups (uniform speeds)
def test_100k_requests_are_an_lpt_packing_within_four_thirds_of_the_trivial_bound(config):
    cluster, _ = load_inputs(config, "gsm8k", 1)
    requests = _requests(100_000)
    predicted = np.array([q.output_tokens for q in requests], dtype=np.float64) * 1.1   # lengths as given
    plan = initial_plan(cluster, requests, predicted)

    replicas = cluster.replicas()
    names = [r.name for r in replicas]
    index = {n: k for k, n in enumerate(names)}
    ids = [q.id for q in requests]
    # complete: every request once, on a replica of this cluster, in that replica's start order
    assert set(plan.assignment) == set(ids) and set(plan.order) == set(names) == set(plan.predicted_finish_s)
    assert sorted(rid for order in plan.order.values() for rid in order) == sorted(ids)
    assert all(plan.assignment[rid] == name for name, order in plan.order.items() for rid in order)

    prompt = np.array([q.prompt_tokens for q in requests], dtype=np.float64)
    work = work_matrix(cluster, prompt, predicted)
    gidx = np.array([[g.name for g in cluster.groups].index(r.group.name) for r in replicas])
    speeds = (work[0].sum() / work.sum(axis=1))[gidx]          # make_plan's uniform speeds
    pos = {rid: j for j, rid in enumerate(ids)}
    assign = np.array([index[plan.assignment[rid]] for rid in ids])
    for name, order in plan.order.items():                    # each replica: longest first on its own group
        w = work[gidx[index[name]], [pos[rid] for rid in order]]
        assert np.all(np.diff(w) <= 0)

    # LPT's certificate: each replica's smallest job was placed last, where it finished earliest, so
    # load_i / s_i <= (load_k + w_last_i) / s_k for every replica k (the loads only grew since)
    w0 = work[0]
    load = np.bincount(assign, weights=w0, minlength=len(replicas))
    last = np.full(len(replicas), np.inf)
    np.minimum.at(last, assign, w0)
    for i in range(len(replicas)):
        assert load[i] / speeds[i] <= np.min((load + last[i]) / speeds) * (1 + 1e-9) + 1e-12

    makespan = float(np.max(load / speeds))
    trivial = max(w0.sum() / speeds.sum(), w0.max() / speeds.max())
    assert trivial <= makespan <= 4 / 3 * trivial
    assert plan.info["pack_makespan_s"] == pytest.approx(makespan, rel=1e-9)
    assert plan.planned_makespan_s == max(plan.predicted_finish_s.values())
    for name, fin in plan.predicted_finish_s.items():          # its own group's work, packed
        assert fin == pytest.approx(work[gidx[index[name]], assign == index[name]].sum(), rel=1e-9)
    assert 0 < plan.lower_bound_s <= plan.info["pack_makespan_s"] * (1 + 1e-12)
    assert plan.method == "lpt" and plan.info["initial"] and not plan.info["bands"]


def test_true_lengths_by_default_and_an_empty_batch():
    cluster, requests = load_inputs("local", "gsm8k", 50)
    a = initial_plan(cluster, requests)
    b = initial_plan(cluster, requests, np.array([q.output_tokens for q in requests], dtype=np.float64))
    assert a.assignment == b.assignment and a.order == b.order
    empty = initial_plan(cluster, [])
    assert empty.assignment == {} and all(v == [] for v in empty.order.values()) and empty.planned_makespan_s == 0.0
