"""Benchmarks: `bench paper` equals `simulate`; `bench cases` reports what its cases measured."""
import json

import pytest

from hybrid_ray.bench.cases import BASELINES, POLICIES, case_seeds, make_case, make_long_case, report, run_case
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
    results = [run_case(i, 1000 + i, pool, time_limit_s=0.5) for i in range(2)]
    results += [run_case(2 + j, 2000 + j, None, time_limit_s=0.5, kind="long") for j in range(2)]
    data = report(results, 0, str(tmp_path / "c.json"), 0.0, progress=None)
    assert json.loads((tmp_path / "c.json").read_text())["summary"] == data["summary"]
    assert set(data["summary"]) == {"all", "gsm8k", "long"}
    assert list(data["summary"]["all"]) == list(BASELINES) + ["best", "offline"]   # every faithful baseline
    for group, rs in (("all", results), ("gsm8k", results[:2]), ("long", results[2:])):
        for p in BASELINES:
            ratio = [r.makespan_s["hybrid"] / r.makespan_s[p] for r in rs]
            s = data["summary"][group][p]
            assert s["cases"] == len(rs)
            assert s["ratio"]["mean"] == pytest.approx(sum(ratio) / len(rs))
            assert (s["ratio"]["min"], s["ratio"]["max"]) == (min(ratio), max(ratio))
            lost = [100 * (x - 1) for x in ratio if x > 1 + 1e-9]
            assert s["losses"] == len(lost) and s["worst_loss_pct"] == pytest.approx(max(lost, default=0.0))
        best = [r.makespan_s["hybrid"] / min(r.makespan_s[p] for p in BASELINES) for r in rs]
        assert data["summary"][group]["best"]["ratio"]["max"] == max(best)
    for r in results:
        assert set(r.makespan_s) == set(POLICIES)
        assert r.lower_bound_s <= min(r.makespan_s.values())


def test_long_context_cases_are_kv_bound_and_feasible():
    for seed in range(20):
        cl, reqs, desc = make_long_case(seed)
        assert [q.id for q in make_long_case(seed)[1]] == [q.id for q in reqs] and make_long_case(seed)[2] == desc
        assert all(2048 <= q.prompt_tokens <= 32768 and q.arrival_s == 0 for q in reqs)
        need = max(q.prompt_tokens + q.output_tokens for q in reqs)
        for g in cl.groups:
            assert 2 * need <= g.kv_capacity_tokens <= 5 * need        # KV-bound, yet every request fits
            assert g.max_batched_tokens in (2048, 4096, 8192)
    assert max(q.prompt_tokens for s in range(20) for q in make_long_case(s)[1]) > 16_000


def test_case_seeds_keep_the_gsm8k_cases_and_add_long_ones():
    seeds = case_seeds(3, 1, 2)
    assert seeds[:3] == [(i, 100_003 + i, "gsm8k") for i in range(3)]
    assert [k for _, _, k in seeds[3:]] == ["long", "long"] and len({s for _, s, _ in seeds}) == 5


@pytest.mark.ray
def test_cases_as_ray_tasks_equal_sequential(tmp_path):
    from hybrid_ray.bench.cases import run_cases
    seq = run_cases(2, seed=7, out=None, progress=None, parallel=False, long=1)
    par = run_cases(2, seed=7, out=None, progress=None, parallel=True, long=1)
    assert par["cases"] == seq["cases"]


def test_perf_writes_its_json(tmp_path, monkeypatch):
    from hybrid_ray.bench import perf
    monkeypatch.setattr(perf, "simulator_rows", lambda: [])
    data = perf.run_perf(str(tmp_path / "perf.json"), progress=None, sizes=(500,), with_runtime=False)
    saved = json.loads((tmp_path / "perf.json").read_text())
    assert saved["planner"][0]["requests"] == 500 and len(saved["planner"]) == 2
    assert {r["method"] for r in data["planner"]} == {"lpt", "cpsat"}
    assert saved["decision"]["steady"]["p50_us"] > 0
    assert [u["batch"] for u in saved["startup"]] == [128, 256]
    assert all(0 < u["p50_us"] <= u["p99_us"] for u in saved["startup"])
    text = perf.format_perf(data)
    assert "| an idle replica's start-up program, 256 prompts (once per idle start) |" in text


def test_cases_report_the_headline_condition_first():
    """Each case also runs `--lengths online --cost-noise 0.05`, the noise seeded by the case's seed;
    the report puts that summary first and keeps the paper's setting (oracle, exact) as `summary`."""
    from hybrid_ray.bench.cases import HEADLINE
    from hybrid_ray.planning import build_scheduler
    from hybrid_ray.simulator import CostNoise, simulate
    pool = load_gsm8k()
    policies = ("vllm", "serve-llm", "hybrid")
    r = run_case(0, 1000, pool, time_limit_s=0.5, policies=policies)
    cl, reqs, _ = make_case(1000, pool)
    assert HEADLINE == {"lengths": "online", "cost_noise": 0.05}
    for p in ("vllm", "serve-llm"):
        sch = build_scheduler(p, cl, reqs, lengths="online", seed=1000)
        assert r.headline_makespan_s[p] == simulate(cl, sch, reqs, noise=CostNoise(0.05, 1000)).makespan_s
        assert r.makespan_s[p] == simulate(cl, build_scheduler(p, cl, reqs), reqs).makespan_s
    assert set(r.headline_makespan_s) == set(policies) and r.headline_makespan_s != r.makespan_s
    printed: list[str] = []
    data = report([r], 0, None, 0.0, progress=printed.append)
    head = data["headline"]["summary"]["all"]["vllm"]["ratio"]["mean"]
    assert head == pytest.approx(r.headline_makespan_s["hybrid"] / r.headline_makespan_s["vllm"])
    assert data["summary"]["all"]["vllm"]["ratio"]["mean"] == pytest.approx(r.makespan_s["hybrid"] / r.makespan_s["vllm"])
    text = printed[0]
    assert text.index("headline: online lengths, cost noise 0.05") < text.index("the paper's setting")
    assert run_case(0, 1000, pool, time_limit_s=0.5, policies=("vllm",), headline=False).headline_makespan_s == {}


@pytest.mark.slow        # ~20 s: the hybrid plans GSM8K twice
def test_bench_baselines_headline_rows_are_simulate_with_online_lengths_and_noise(tmp_path):
    from hybrid_ray.bench import baselines as bl
    policies = ("vllm", "serve-llm", "hybrid")
    rows = bl.rows(configs=("local",), workloads=("gsm8k",), policies=policies)
    assert [r["condition"] for r in rows] == ["headline", "oracle"]           # the headline first
    head, oracle = rows
    for p, row, extra in (("vllm", head, ["--lengths", "online", "--cost-noise", "0.05", "--seed", "0"]),
                          ("serve-llm", oracle, [])):
        js = tmp_path / f"{p}.json"
        assert main(["simulate", "--config", "local", "--policy", p, "--json", str(js), *extra]) == 0
        assert row[p] == json.loads(js.read_text())["makespan_s"]
    assert head["vllm"] != oracle["vllm"]
    text = bl.table(rows, policies)
    assert "| local | gsm8k | online + noise 0.05 | 1,319 |" in text and "| local | gsm8k | oracle | 1,319 |" in text
