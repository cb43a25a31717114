"""The simulation-guided local search on a plan's assignment (planner/refine.py)."""
import numpy as np
import pytest

from hybrid_ray.inputs import load_inputs
from hybrid_ray import planning as plan_module
from hybrid_ray.planning import _simulate_hybrid, make_plan
from hybrid_ray.planner.refine import _earlier, refine_assignment


def _additive(work, group_of, replicas):
    """A stand-in simulator: each replica finishes after the sum of its requests' work."""
    calls = []

    def finishes_of(a):
        calls.append(a.copy())
        return np.array([work[group_of[m], a == m].sum() for m in range(replicas)])
    return finishes_of, calls


def test_earlier_compares_latest_first():
    assert _earlier(np.array([3.0, 1.0, 2.0]), np.array([3.0, 2.5, 1.0]))    # 3 = 3, then 2 < 2.5
    assert not _earlier(np.array([3.0, 2.5]), np.array([2.5, 3.0]))          # the same finishes
    assert not _earlier(np.array([3.1, 0.0]), np.array([3.0, 3.0]))          # the last replica first


def test_search_evens_an_additive_model_within_its_budget():
    rng = np.random.default_rng(0)
    work = np.stack([rng.uniform(1, 10, 60), np.zeros(60)])
    work[1] = 1.7 * work[0]                                   # group 1 is 1.7x slower
    group_of = np.array([0, 0, 1])
    start = np.zeros(60, dtype=int)                           # everything on replica 0
    finishes_of, calls = _additive(work, group_of, 3)
    res = refine_assignment(start, finishes_of, work, group_of, budget=400, seed=1)
    assert res.simulations == len(calls) <= 400
    assert res.start_makespan_s == pytest.approx(work[0].sum())
    # an even cut would end near total / (1 + 1 + 1/1.7); the search gets within 5 % of it
    even = work[0].sum() / (2 + 1 / 1.7)
    assert res.makespan_s < 1.05 * even and res.accepted > 10
    assert res.makespan_s == pytest.approx(finishes_of(res.assignment).max())
    again = refine_assignment(start, _additive(work, group_of, 3)[0], work, group_of, budget=400, seed=1)
    assert (again.assignment == res.assignment).all()        # deterministic given the seed
    tight = refine_assignment(start, _additive(work, group_of, 3)[0], work, group_of, budget=5, seed=1)
    assert tight.simulations == 5 and tight.makespan_s > res.makespan_s


@pytest.fixture(scope="module")
def hetero_sample():
    return load_inputs("hetero", "gsm8k", limit=400, seed=3)


def test_refined_plan_runs_as_the_search_measured_and_never_slower(hetero_sample):
    cl, reqs = hetero_sample
    plan = make_plan(cl, reqs, method="lpt")
    info = plan.info["refine"]
    chosen = plan.info["candidates"][plan.info["chosen"]]
    assert info["from_s"] == pytest.approx(chosen, abs=1e-6)
    assert info["to_s"] <= info["from_s"] and 1 <= info["simulations"] <= plan_module.REFINE_SIMULATIONS
    # the kept plan, run again, ends exactly where the search measured it
    assert _simulate_hybrid(cl, reqs, plan) == pytest.approx(info["to_s"], abs=1e-6)
    assert sorted(plan.assignment) == sorted(q.id for q in reqs)
    assert sorted(i for ids in plan.order.values() for i in ids) == sorted(q.id for q in reqs)


def test_no_budget_keeps_the_chosen_plan(hetero_sample, monkeypatch):
    cl, reqs = hetero_sample
    monkeypatch.setattr(plan_module, "REFINE_SIMULATIONS", 1)
    plan = make_plan(cl, reqs, method="lpt")
    assert plan.info["refine"]["accepted"] == 0 and plan.info["refine"]["simulations"] == 1
    assert _simulate_hybrid(cl, reqs, plan) == pytest.approx(plan.info["candidates"][plan.info["chosen"]], abs=1e-6)
