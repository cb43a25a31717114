"""Benchmarks: `bench paper` equals `simulate`; `bench cases` reports what its cases measured."""
import json

import pytest

from hybrid_ray.bench.cases import make_case, report, run_case
from hybrid_ray.bench.paper import PAPER, run_paper
from hybrid_ray.cli import main
from hybrid_ray.workload import load_gsm8k


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    out = tmp_path_factory.mktemp("res")
    return out, run_paper(out_dir=str(out), policies=("baseline", "offline", "hybrid"), progress=None)


def test_bench_paper_matches_simulate_exactly(paper, tmp_path):
    out, data = paper
    for p in ("baseline", "hybrid"):
        js = tmp_path / f"{p}.json"
        assert main(["simulate", "--config", "paper_llama65b", "--policy", p, "--json", str(js)]) == 0
        sim = json.loads(js.read_text())
        assert data["rows"][p]["makespan_s"] == sim["makespan_s"]
        assert data["rows"][p]["utilization_busy"] == sim["utilization_busy"]


def test_bench_paper_table_and_files(paper):
    out, data = paper
    rows = data["rows"]
    assert rows["hybrid"]["makespan_s"] < rows["offline"]["makespan_s"] < rows["baseline"]["makespan_s"]
    assert rows["hybrid"]["paper_makespan_s"] == PAPER["hybrid"][0]
    md = (out / "paper.md").read_text()
    assert "| hybrid | " in md and "190.58" in md and "lower bound" in md and "-0.0 %" not in md
    assert json.loads((out / "paper.json").read_text())["rows"].keys() == rows.keys()


def test_cases_are_seeded_and_summarised(tmp_path):
    pool = load_gsm8k()
    a, b = make_case(5, pool), make_case(5, pool)
    assert a[2] == b[2] and [q.id for q in a[1]] == [q.id for q in b[1]]
    assert make_case(6, pool)[2] != a[2] or len(make_case(6, pool)[1]) != len(a[1])
    results = [run_case(i, 1000 + i, pool, time_limit_s=0.5) for i in range(3)]
    data = report(results, 0, str(tmp_path / "c.json"), 0.0, progress=None)
    assert json.loads((tmp_path / "c.json").read_text())["summary"] == data["summary"]
    imp = [1 - r.makespan_s["hybrid"] / r.makespan_s["baseline"] for r in results]
    assert data["summary"]["hybrid"]["makespan_reduction_pct"]["mean"] == pytest.approx(100 * sum(imp) / 3)
    assert data["summary"]["hybrid"]["worse_than_baseline"] == sum(x < 0 for x in imp)
    for r in results:
        assert r.lower_bound_s <= min(r.makespan_s.values())


@pytest.mark.ray
def test_cases_as_ray_tasks_equal_sequential(tmp_path):
    from hybrid_ray.bench.cases import run_cases
    seq = run_cases(2, seed=7, out=None, progress=None, parallel=False)
    par = run_cases(2, seed=7, out=None, progress=None, parallel=True)
    assert par["cases"] == seq["cases"]


def test_perf_writes_its_json(tmp_path, monkeypatch):
    from hybrid_ray.bench import perf
    monkeypatch.setattr(perf, "simulator_rows", lambda: [])
    data = perf.run_perf(str(tmp_path / "perf.json"), progress=None, sizes=(500,), with_runtime=False)
    saved = json.loads((tmp_path / "perf.json").read_text())
    assert saved["planner"][0]["requests"] == 500 and len(saved["planner"]) == 2
    assert {r["method"] for r in data["planner"]} == {"lpt", "cpsat"}
    assert saved["decision"]["steady"]["p50_us"] > 0
