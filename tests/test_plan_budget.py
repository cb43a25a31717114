"""Anytime planning (issue 26): the plan's budget bounds every phase, and the best plan so far returns."""
from __future__ import annotations

import io
import json
import math
import time

import pytest

from hybrid_ray import planning
from hybrid_ray.cli import main
from hybrid_ray.inputs import load_inputs
from hybrid_ray.planner.budget import SIM_ITERATIONS_PER_S, PlanBudget, scaled_budget
from hybrid_ray.planning import build_scheduler, make_plan
from hybrid_ray.progress import PhaseLine
from hybrid_ray.simulator import DeadlinePassed, simulate


@pytest.fixture(scope="module")
def local300():
    return load_inputs("local", "gsm8k", limit=300, seed=3)


def _valid(plan, reqs, cluster):
    names = {r.name for r in cluster.replicas()}
    assert set(plan.assignment) == {q.id for q in reqs} and set(plan.assignment.values()) <= names
    assert sorted(i for ids in plan.order.values() for i in ids) == sorted(q.id for q in reqs)


def test_budget_clocks():
    b = PlanBudget(iterations=1000)
    assert b.affords(1000) and not b.affords(1001) and b.runs_affordable(300, 10) == 3
    b.spend(600, 600 / SIM_ITERATIONS_PER_S)
    assert b.iterations_left() == 400 and not b.affords(500) and b.runs_affordable(300, 10) == 1
    b.spend(10, 1.0)                                       # a slow host: the wall estimate learns it
    assert b.sec_per_iteration >= 0.05
    w = PlanBudget(wall_s=0.0)
    assert not w.affords(1) and w.runs_affordable(1, 5) == 0
    assert PlanBudget().runs_affordable(1e9, 7) == 7 and PlanBudget().left_s() == math.inf
    assert scaled_budget(200.0) == pytest.approx(4.0) and scaled_budget(200.0, 0.1) == pytest.approx(20.0)


def test_scaled_budget_is_deterministic_and_leaves_work_out(local300):
    cl, reqs = local300
    small = [make_plan(cl, reqs, plan_share=0.002) for _ in range(2)]
    assert small[0].assignment == small[1].assignment and small[0].order == small[1].order
    full = make_plan(cl, reqs)
    for p in (small[0], full):
        _valid(p, reqs, cl)
    sb, fb = small[0].info["budget"], full.info["budget"]
    assert fb["iterations"] is None and not fb["skipped"]
    allowance = small[0].info["budget_s"] * SIM_ITERATIONS_PER_S
    assert sb["iterations"] == int(allowance) and sb["skipped"]
    assert sb["simulated_iterations"] < fb["simulated_iterations"]
    # never more than the allowance and one run beyond it (a run starts only when its estimate fits)
    one_run = max(r for r in [full.info.get("sim_iterations", 0), sb["simulated_iterations"]])
    assert sb["simulated_iterations"] <= allowance + one_run
    assert small[0].solve_time_s > 0 and small[0].info["plan_share"] == 0.002


def test_more_budget_never_plans_worse(local300):
    """The anytime planner keeps the best candidate it simulated: a larger budget simulates a
    superset of the candidates (cheapest first), so its chosen score is never higher."""
    cl, reqs = local300
    scores = []
    for share in (0.01, 0.05, None):
        p = make_plan(cl, reqs, plan_share=share)
        c = p.info["candidates"]
        if p.info["simulated"]:
            scores.append(min(c.values()))
    assert len(scores) >= 2 and all(b <= a + 1e-9 for a, b in zip(scores, scores[1:]))


def test_a_simulation_past_its_deadline_is_cut(local300):
    cl, reqs = local300
    sch = build_scheduler("hybrid", cl, reqs, plan_share=0.01)
    with pytest.raises(DeadlinePassed):
        simulate(cl, sch, reqs, deadline=time.perf_counter() - 1.0)
    rec = simulate(cl, build_scheduler("hybrid", cl, reqs, plan_share=0.01), reqs, deadline=math.inf)
    assert len([s for s in rec.sequences if s.finish_s >= 0]) == len(reqs)


def test_a_wall_limit_that_cuts_every_run_still_returns_a_plan(local300, monkeypatch):
    """A deadline already past when the candidates start: each simulation is cut, none is scored,
    and a cut chosen by the estimates returns, complete."""
    cl, reqs = local300
    real = planning.simulate

    def late(*a, deadline=None, **k):
        return real(*a, deadline=time.perf_counter() - 1.0 if deadline is not None else None, **k)

    monkeypatch.setattr(planning, "simulate", late)
    p = make_plan(cl, reqs, time_limit_s=3600.0)
    _valid(p, reqs, cl)
    assert p.info["simulated"] is False and p.info["chosen"] in p.info["candidates"]
    assert p.info["budget"]["simulated_iterations"] == 0 and "tiers" not in p.info["candidates"]
    assert p.info["budget"]["skipped"].get("run cut at the deadline", 0) >= 1


def test_phase_line_is_quiet_then_live():
    out = io.StringIO()
    line = PhaseLine("plan", stream=out, quiet_s=1.0)
    line("packing", 0.2, 3.0)
    assert out.getvalue() == ""
    line("candidates", 1.5, 2.25)
    line("refining", 2.0, math.inf)
    line.close()
    lines = out.getvalue().splitlines()
    assert lines == ["plan: candidates | 1.5 s elapsed | budget 2.2 s left",
                     "plan: refining | 2.0 s elapsed"]


def test_simulate_reports_plan_wall_and_its_share(tmp_path, capsys):
    out = tmp_path / "s.json"
    assert main(["simulate", "--policy", "hybrid", "--limit", "200", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["plan_wall_s"] > 0
    assert data["plan_share_of_makespan"] == pytest.approx(data["plan_wall_s"] / data["makespan_s"])
    row = next(x for x in text.splitlines() if "planning wall time" in x)
    assert f"{data['plan_wall_s']:.2f} s (" in row and "% of the makespan)" in row


def test_the_main_job_shows_the_hybrid_beside_the_strongest_baseline(tmp_path, capsys):
    out = tmp_path / "c.json"
    assert main(["compare", "--limit", "300", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    pol = data["policies"]
    assert {"hybrid", "vllm", "serve", "raydata", "lpt-engine"} <= set(pol)
    best = min((n for n in pol if n != "hybrid"), key=lambda n: pol[n]["makespan_s"])
    assert data["strongest_baseline"] == best
    assert f"| {best} (strongest baseline) | {pol[best]['makespan_s']:.2f} s |" in text
    assert f"| lower bound | {data['lower_bound_s']:.2f} s |" in text
    assert all(p["makespan_s"] >= data["lower_bound_s"] for p in pol.values())
    assert pol["hybrid"]["plan_wall_s"] > 0 and f"({best}): {pol['hybrid']['makespan_s']:.2f} s vs" in text


def test_no_arguments_runs_the_main_job(monkeypatch):
    seen = []
    import hybrid_ray.cli as cli
    monkeypatch.setattr(cli, "cmd_compare", lambda args: seen.append(args.command) or 0)
    monkeypatch.setattr(cli, "cmd_simulate", lambda args: seen.append(args.command) or 0)
    parser = cli.build_parser()
    for action in parser._actions:                         # the parser binds func at build time
        if hasattr(action, "choices") and isinstance(action.choices, dict) and "compare" in action.choices:
            action.choices["compare"].set_defaults(func=cli.cmd_compare)
            action.choices["simulate"].set_defaults(func=cli.cmd_simulate)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    assert main([]) == 0 and main(["--policy", "hybrid"]) == 0
    assert seen == ["compare", "simulate"]


def test_a_short_budget_reports_a_cheaper_valid_bound():
    """Below 0.25 s of budget the plan's bound skips the mixed-cluster LPs: never above the full
    bound (both valid), and the plan says which it reports."""
    from hybrid_ray.planner.bounds import lower_bound

    cl, reqs = load_inputs("hetero", "gsm8k", limit=300, seed=2)
    full = lower_bound(cl, reqs).value_s
    no_two = lower_bound(cl, reqs, thorough=False).value_s
    no_lp = lower_bound(cl, reqs, lp=False).value_s
    assert 0 < no_lp <= no_two <= full
    short = make_plan(cl, reqs, plan_share=0.001)
    assert short.info["bound"] == "without the mixed-cluster LPs" and short.lower_bound_s == pytest.approx(no_lp)
    assert make_plan(cl, reqs).info["bound"] == "full"             # the library's unbounded planner
