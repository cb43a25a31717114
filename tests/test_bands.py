"""Length-banded plans, the steps and LP bounds, and the controller's plan profile."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from hybrid_ray.config import ClusterSpec, ReplicaGroupSpec
from hybrid_ray.costmodel import CostModel, DecodeCost, PrefillCost
from hybrid_ray.inputs import load_inputs
from hybrid_ray.metrics import summarize
from hybrid_ray.planner.banded import banded_assignment, estimated_finish
from hybrid_ray.planner import bounds
from hybrid_ray.planner.bounds import _WORK_TERMS, _coarse, _terms, _work_bound, lower_bound
from hybrid_ray.planning import RULES, build_scheduler, make_plan
from hybrid_ray.schedulers import plan_bands, policy_names
from hybrid_ray.policies.controller import RebalanceController
from hybrid_ray.policies.predict import make_predictor
from hybrid_ray.replica import PREFILL, Iteration, LoadReport, ReplicaState, Sequence
from hybrid_ray.simulator import simulate
from hybrid_ray.workload import Request

COST = CostModel(PrefillCost(0.0073, 0.0024, 2.1e-5, 5e-10), DecodeCost(0.00625, 6.8e-6, 1.7e-7))


@pytest.fixture(scope="module")
def h100():
    return load_inputs("h100_llama7b", "gsm8k")


@pytest.fixture(scope="module")
def h100_plans(h100):
    cl, reqs = h100
    return make_plan(cl, reqs), make_plan(cl, reqs, bands="off")


def _arrays(reqs):
    return (np.array([q.prompt_tokens for q in reqs], float), np.array([q.output_tokens for q in reqs], float))


def test_bands_cover_every_request_once_and_put_the_longest_together(h100):
    cl, reqs = h100
    p, o = _arrays(reqs)
    assign, est = banded_assignment(cl, p, o)
    assert assign.shape == (len(reqs),) and set(assign.tolist()) <= set(range(cl.num_replicas))
    longest = int(np.argmax(o))
    holder = assign == assign[longest]
    # the longest request's replica runs its ~O_max iterations lightly loaded: a handful of requests
    assert holder.sum() < len(reqs) / cl.num_replicas / 4
    # the estimate the bands are cut with is the one estimated_finish reports
    assert estimated_finish(cl, p, o, assign).max() == pytest.approx(est, rel=1e-6)


def test_planner_keeps_bands_when_the_simulated_hybrid_is_faster(h100, h100_plans):
    """h100 x GSM8K: the longest requests together (bands, or tiers: only those no full replica
    can run) beat the work-balanced packing by over 10 %; the planner keeps the fastest."""
    cl, reqs = h100
    auto, packed = h100_plans
    scores = auto.info["candidates"]
    chosen = auto.info["chosen"]
    assert chosen in ("bands", "bands-slots", "tiers") and auto.method in ("bands", "tiers")
    assert packed.info.get("bands") is False
    assert scores[chosen] == min(scores.values()) and scores["bands"] < scores["pack"]
    runs = {name: summarize(simulate(cl, build_scheduler("hybrid", cl, reqs, plan=plan), reqs))
            for name, plan in ((chosen, auto), ("pack", packed))}
    # the planner's own simulation, after its refining search
    assert runs[chosen].makespan_s == pytest.approx(auto.info["refine"]["to_s"])
    assert auto.info["refine"]["to_s"] <= scores[chosen]
    assert runs[chosen].makespan_s < 0.9 * runs["pack"].makespan_s
    # the band estimate (the model both cut with) predicts each replica's simulated finish closely,
    # from above: it prices every prompt at its full prefill price, which the run's start-up program
    # and mixed steps undercut (by up to 7.3 % on the full replicas, 0.2 % on the long runs)
    for name, finish in runs[chosen].replica_finish_s.items():
        assert finish * 0.99 <= auto.predicted_finish_s[name] <= finish * 1.08


def test_banded_plan_with_exact_lengths_makes_no_moves(h100, h100_plans):
    cl, reqs = h100
    rec = simulate(cl, build_scheduler("hybrid", cl, reqs, plan=h100_plans[0]), reqs)
    assert rec.moves == 0


def test_controller_discounts_the_plans_profile_and_acts_on_drift():
    def rep(i, finish, waiting=10, work=1.0):
        return LoadReport(i, f"r{i}", 0.0, waiting, 0, waiting, work, 0.0, finish, "g")

    plain = RebalanceController(interval_s=1.0, threshold_s=0.1, rel_threshold=0.0)
    profiled = RebalanceController(interval_s=1.0, threshold_s=0.1, rel_threshold=0.0, keep_plan_profile=True)
    first = [rep(0, 10.0), rep(1, 8.0)]
    assert plain.rebalance(first, 0.0)                       # raw imbalance: moves
    assert profiled.rebalance(first, 0.0) == []              # the plan's intent: no move
    # later replica 0 falls 2 s further behind than planned (its bias shrank with its work): drift
    later = [rep(0, 11.0), rep(1, 6.0)]
    moves = profiled.rebalance(later, 1.0)
    assert moves and moves[0].src == 0 and moves[0].dst == 1


def test_plan_bands_only_for_the_hybrid_with_known_lengths():
    reqs = [Request("a", 10, 20)]
    oracle, online = make_predictor("oracle", reqs), make_predictor("online", reqs)
    assert plan_bands("hybrid", oracle) == "auto"
    assert plan_bands("hybrid", online) == "off" and plan_bands("offline", oracle) == "off"


def test_report_counts_the_longest_sequences_idle_steps():
    cl = ClusterSpec("one", (ReplicaGroupSpec("g", 1, 64, 100_000, COST, 8192),))
    st = ReplicaState(cl.replicas()[0])
    s = Sequence(Request("long", 10, 400), predicted_output=400)
    st.add([s])
    st.complete(st.begin(Iteration(PREFILL, [(s, 10)], decode=False)), 0.0, 0.01)
    rep = st.report(0.01)
    # work shares each step's base over a full batch (1/64 of it); alone, it still runs 399 steps
    assert rep.running_work_s < 399 * COST.decode.base_s / 10
    assert rep.predicted_finish_s >= 0.01 + 399 * COST.decode.base_s


def test_steps_bound_sees_long_requests_that_must_share_a_replica():
    cl = ClusterSpec("two", (ReplicaGroupSpec("g", 2, 64, 100_000, COST, 8192),))
    reqs = [Request(f"l{i}", 20, 400) for i in range(3)] + [Request(f"s{i}", 20, 5) for i in range(6)]
    lb = lower_bound(cl, reqs)
    # two of the three long requests share a replica: 400 iterations plus both their token costs
    assert lb.steps_s > lb.chain_s > 0 and lb.value_s == pytest.approx(lb.steps_s, rel=1e-9)
    for policy in policy_names():
        ms = simulate(cl, build_scheduler(policy, cl, reqs, method="lpt"), reqs).makespan_s
        assert ms >= lb.value_s, policy


def test_lp_work_bound_beats_the_cheapest_group_bound_on_hetero():
    cl, reqs = load_inputs("hetero", "gsm8k")
    p, o = _arrays(reqs)
    terms = [_terms(g, p, o) for g in cl.groups]
    cheapest = max(_work_bound(np.zeros(len(reqs)), np.min([t.lin + w(t) for t in terms], axis=0), cl.num_replicas)
                   for w in _WORK_TERMS)
    lb = lower_bound(cl, reqs)
    assert lb.work_s > 1.2 * cheapest
    # the replica running the longest request (428 tokens) runs 428 steps, full or not: taking it
    # apart in the LP lifts the bound well above the LP over full batches
    assert lb.steps_s > 1.05 * lb.work_s and lb.value_s == pytest.approx(lb.steps_s)
    hybrid = simulate(cl, build_scheduler("hybrid", cl, reqs), reqs).makespan_s
    assert hybrid >= lb.value_s


def test_second_replica_apart_lifts_the_hetero_bound(monkeypatch):
    """The replica holding the longest request not on the first runs that many steps, and every
    longer request sits on the first: on hetero (GSM8K) that lifts the bound by more than 0.5 %,
    and the hybrid still runs above it."""
    cl, reqs = load_inputs("hetero", "gsm8k")
    two = lower_bound(cl, reqs)
    monkeypatch.setattr(bounds, "_lp_two_longest", lambda *a: 0.0)       # one apart only
    one = lower_bound(cl, reqs)
    assert two.value_s > 1.005 * one.value_s and two.value_s == pytest.approx(two.steps_s)
    hybrid = simulate(cl, build_scheduler("hybrid", cl, reqs), reqs).makespan_s
    assert hybrid >= two.value_s


@pytest.mark.parametrize("seed", range(8))
def test_second_replica_apart_is_never_below_one_apart_and_never_above_a_run(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    fast = ReplicaGroupSpec("fast", int(rng.integers(1, 4)), int(rng.integers(2, 9)), 6000, COST, 4096)
    slow = dataclasses.replace(fast, name="slow", count=int(rng.integers(1, 3)),
                               cost_model=COST.scaled(float(rng.uniform(1.2, 2.5))))
    cl = ClusterSpec("two", (slow, fast))
    reqs = [Request(f"r{i}", int(rng.integers(1, 400)), int(rng.integers(1, 300))) for i in range(40)]
    two = lower_bound(cl, reqs).value_s
    for policy in ("hybrid", "serve", "lpt-engine"):
        assert simulate(cl, build_scheduler(policy, cl, reqs, method="lpt"), reqs).makespan_s >= two, policy
    monkeypatch.setattr(bounds, "_lp_two_longest", lambda *a: 0.0)
    assert two >= lower_bound(cl, reqs).value_s * (1 - 1e-6)


def test_many_request_types_are_rounded_down_for_the_lp(monkeypatch):
    """Past LP_MAX_TYPES the LPs see every request rounded down to the least of its cell:
    smaller requests, so a smaller but still valid value, and no longer none at all."""
    rng = np.random.default_rng(5)
    p = rng.integers(1, 3000, 400).astype(float)
    o = rng.integers(1, 500, 400).astype(float)
    monkeypatch.setattr(bounds, "LP_MAX_TYPES", 150)
    pq, oq = _coarse(p, o)
    assert np.unique(np.stack([pq, oq]), axis=1).shape[1] <= 150
    assert (pq <= p).all() and (oq <= o).all() and (pq < p).any()
    fast = ReplicaGroupSpec("fast", 2, 32, 200_000, COST, 4096)
    slow = dataclasses.replace(fast, name="slow", cost_model=COST.scaled(1.8))
    cl = ClusterSpec("two", (slow, fast))
    reqs = [Request(f"r{i}", int(a), int(b)) for i, (a, b) in enumerate(zip(p, o))]
    coarse = lower_bound(cl, reqs)
    monkeypatch.setattr(bounds, "LP_MAX_TYPES", 4000)
    exact = lower_bound(cl, reqs)
    assert 0.0 < coarse.work_s <= exact.work_s and coarse.steps_s <= exact.steps_s
    assert coarse.work_s > 0.9 * exact.work_s
    for policy in ("hybrid", "serve"):
        assert simulate(cl, build_scheduler(policy, cl, reqs, method="lpt"), reqs).makespan_s >= exact.value_s


def test_bound_and_bands_on_a_kv_bound_group():
    g = ReplicaGroupSpec("kv", 2, 64, 6_000, COST, 4096)                      # ~3 long requests at once
    cl = ClusterSpec("kv", (g,))
    rng = np.random.default_rng(3)
    reqs = [Request(f"r{i}", int(rng.integers(500, 1500)), int(rng.integers(50, 400))) for i in range(40)]
    lb = lower_bound(cl, reqs)
    k = dataclasses.replace(g, kv_capacity_tokens=10**7)
    assert lb.value_s > lower_bound(ClusterSpec("big", (k,)), reqs).value_s    # KV limits concurrency
    for policy in ("hybrid", "vllm", "serve"):
        assert simulate(cl, build_scheduler(policy, cl, reqs, method="lpt"), reqs).makespan_s >= lb.value_s


def test_planner_tunes_the_online_rule_but_never_a_knob_the_yaml_sets():
    cl, reqs = load_inputs("paper_llama65b", "gsm8k")
    reqs = reqs[:300]
    plan = make_plan(cl, reqs)
    tried = plan.info["rules_tried"]
    assert "default" in tried and len(tried) == 1 + len(RULES)
    # the kept rule is the fastest tried, and the run under it is what the planner simulated
    assert plan.info["candidates"][plan.info["chosen"]] == pytest.approx(min(tried.values()))
    ms = simulate(cl, build_scheduler("hybrid", cl, reqs, plan=plan), reqs).makespan_s
    assert plan.info["refine"]["from_s"] == pytest.approx(min(tried.values()), rel=1e-6)
    assert ms == pytest.approx(plan.info["refine"]["to_s"], rel=1e-6) and ms <= min(tried.values())
    pinned = dataclasses.replace(cl, policy={"hybrid": {"multiplier": 1.0}})
    plan2 = make_plan(pinned, reqs)
    assert all("multiplier" not in k for k in plan2.info["rules_tried"]) and "multiplier" not in plan2.info["rule"]
    # with learned lengths (or for the offline policy) nothing is tuned: bands off, no rule
    sch = build_scheduler("hybrid", cl, reqs, lengths="online")
    assert "rule" not in sch.info["plan"].info and sch.info["plan"].info.get("bands") is False


def _exact_start_up(g: ReplicaGroupSpec, prompts: list[int], lam: float = 1.0) -> float:
    """The start-up cost ``bounds._ramp`` bounds, by a DP over every integer token program: each
    iteration carries a >= 1 prompt tokens and costs lam*e(a) + m_lam*(B - N)/B (no grid)."""
    pc = g.cost_model.prefill
    m, rho = bounds.iteration_floor(g)
    b = len(prompts)
    price = (lam * m + (1 - lam) * min(pc.base_s, m)) / b
    prefix = np.cumsum([0] + sorted(prompts))
    total = int(prefix[-1])
    whole = np.searchsorted(prefix, np.arange(total + 1), side="right") - 1
    a = np.arange(total + 1, dtype=float)
    excess = lam * np.maximum(0.0, pc.base_s + pc.per_token_s * a - m - rho * a)
    cost = np.full(total + 1, np.inf)
    cost[0] = 0.0
    for c in range(1, total + 1):
        cost[c] = np.min(cost[:c] + excess[c:0:-1]) + price * (b - whole[c])
    return float(cost[total])


@pytest.mark.parametrize("lam", [1.0, 0.5])
@pytest.mark.parametrize("prompts", [[180, 260, 410], [600, 700, 900, 1500]])
def test_start_up_bound_is_below_every_integer_prefill_program(lam, prompts):
    """The grid DP rounds cumulative tokens up and charges each step one grid unit less: never above
    the exact optimum over integer programs, and close to it."""
    g = ReplicaGroupSpec("g", 1, len(prompts), 10_000, COST)
    exact = _exact_start_up(g, prompts, lam)
    got = bounds._ramp(g, np.array(prompts, float), o_min=10_000.0, lam=lam)   # a long run: fill the batch
    assert 0.0 < got <= exact
    assert got >= 0.95 * exact


def test_start_up_is_free_when_the_whole_first_batch_fits_one_cheap_prefill():
    g = ReplicaGroupSpec("g", 1, 3, 10_000, COST)
    # 120 tokens ride below the prefill floor's sweet spot; at lam = 0 no prefill costs extra
    assert bounds._ramp(g, np.array([30.0, 40.0, 50.0]), 1e4, 1.0) == 0.0
    assert bounds._ramp(g, np.array([600.0, 700.0, 900.0]), 1e4, 0.0) == 0.0


def test_start_up_lifts_the_single_group_bound_and_stays_below_every_run(monkeypatch):
    cl, reqs = load_inputs("local", "gsm8k")
    with_ramp = lower_bound(cl, reqs)
    monkeypatch.setattr(bounds, "_ramp", lambda *a, **k: 0.0)
    without = lower_bound(cl, reqs)
    # the first prefill of a batch of 64 costs every replica about 0.02 s more than the work terms
    assert with_ramp.value_s > without.value_s + 0.01
    monkeypatch.undo()
    for policy in ("hybrid", "vllm", "baseline"):
        ms = simulate(cl, build_scheduler(policy, cl, reqs), reqs).makespan_s
        assert ms >= with_ramp.value_s
