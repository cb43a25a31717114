"""`hybrid-ray bench perf`: the performance figures, each against its reference in the same run.

* planner: solve time and gap for 1k / 10k / 100k requests (GSM8K sampled with repetition) on
  64 replicas, CP-SAT (`pack`, 2 workers) vs LPT alone;
* online decision latency (batch 256, 1,000 waiting), worst case and steady state, and an idle
  replica's start-up program (128 and 256 prompts, once per idle start);
* simulator speed: simulated requests and iterations per wall second, GSM8K and Azure conv.
"""
from __future__ import annotations

import time

import numpy as np

from ..config import load_cluster
from ..inputs import load_inputs
from ..jsonout import write_json
from ..planner.binpack import pack
from ..planner.estimate import request_work
from ..planning import build_scheduler
from ..simulator import simulate
from ..workload import load_gsm8k
from . import decision


def planner_rows(sizes=(1_000, 10_000, 100_000), replicas: int = 64, time_limit_s: float = 25.0) -> list[dict]:
    g = load_cluster("local").groups[0]
    pool = load_gsm8k()
    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        pick = rng.integers(0, len(pool), n)
        prompt = np.array([pool[i].prompt_tokens for i in pick], float)
        output = np.array([pool[i].output_tokens for i in pick], float)
        work = request_work(g, prompt, output)
        speeds = np.ones(replicas)
        for method in ("lpt", "cpsat"):
            t0 = time.perf_counter()
            res = pack(work, speeds, method=method, time_limit_s=time_limit_s, workers=2)
            rows.append({"requests": n, "replicas": replicas, "method": method, "solve_s": time.perf_counter() - t0,
                         "gap": res.makespan / res.lower_bound - 1, "status": res.status, "chosen": res.method})
    return rows


def simulator_rows() -> list[dict]:
    rows = []
    for cfg, wl, pol in (("paper_llama65b", "gsm8k", "baseline"), ("paper_llama65b", "gsm8k", "hybrid"),
                         ("azure_llama13b", "azure-conv", "baseline"), ("azure_llama13b", "azure-conv", "hybrid")):
        cl, reqs = load_inputs(cfg, wl)
        sch = build_scheduler(pol, cl, reqs, method="lpt")       # time the simulation, not the planner
        t0 = time.perf_counter()
        rec = simulate(cl, sch, reqs)
        wall = time.perf_counter() - t0
        iters = sum(len(r.records) for r in rec.replicas)
        rows.append({"config": cfg, "workload": wl, "policy": pol, "requests": len(reqs), "iterations": iters,
                     "wall_s": wall, "requests_per_s": len(reqs) / wall, "iterations_per_s": iters / wall})
    return rows


def runtime_rows(policies=("baseline", "hybrid")) -> list[dict]:
    """Ray runtime overhead on the embedded default: run vs simulate (same config and time_scale)."""
    from ..runtime import RunOptions, run

    rows = []
    cl, reqs = load_inputs("local", "gsm8k")
    for pol in policies:
        sched = build_scheduler(pol, cl, reqs)             # planning excluded, as in run_wall_s
        t0 = time.perf_counter()
        sim = simulate(cl, sched, reqs)
        sim_wall = time.perf_counter() - t0
        res = run(RunOptions(config="local", workload="gsm8k", policy=pol, progress=False, wait_for_plan=True))
        rows.append({"policy": pol, "time_scale": cl.time_scale, "simulate_makespan_s": sim.makespan_s,
                     "run_makespan_s": res.summary.makespan_s, "simulate_wall_s": sim_wall,
                     "run_wall_s": res.run_wall_s, "total_wall_s": res.wall_s,
                     "messages_per_request": res.messages_per_request,
                     "controller_decision_p99_s": res.controller_decision_p99_s})
    return rows


def run_perf(out: str | None = "results/perf.json", progress=print, sizes=(1_000, 10_000, 100_000),
             with_runtime: bool = True) -> dict:
    data = {"planner": planner_rows(sizes), "decision": {}, "simulator": simulator_rows(),
            "runtime": runtime_rows() if with_runtime else []}
    for key, shuffle in (("worst", True), ("steady", False)):
        data["decision"][key] = decision.measure(reshuffle=shuffle)
    data["startup"] = [decision.measure_startup(b) for b in (128, 256)]
    if progress:
        progress(format_perf(data))
    if out:
        write_json(out, data)
        if progress:
            progress(f"wrote {out}")
    return data


def format_perf(d: dict) -> str:
    lines = ["planner (64 identical replicas, GSM8K work, 2 workers)",
             "| requests | method | solve (s) | gap to packing bound | status |", "|---|---|---|---|---|"]
    for r in d["planner"]:
        lines.append(f"| {r['requests']:,} | {r['method']} (returned {r['chosen']}) | {r['solve_s']:.2f} | "
                     f"{100 * r['gap']:.4f} % | {r['status']} |")
    w, s = d["decision"]["worst"], d["decision"]["steady"]
    lines += ["", "online decision (Lagrangian rule + queue sort), batch 256, 1,000 waiting",
              "| queue | p50 (us) | p99 (us) |", "|---|---|---|",
              f"| reshuffled before each call (worst case) | {w['p50_us']:.1f} | {w['p99_us']:.1f} |",
              f"| unchanged, marked dirty (steady state) | {s['p50_us']:.1f} | {s['p99_us']:.1f} |",
              *(f"| an idle replica's start-up program, {u['batch']} prompts (once per idle start) | "
                f"{u['p50_us']:.1f} | {u['p99_us']:.1f} |" for u in d.get("startup", [])),
              "", "simulator speed (planning excluded)",
              "| config | workload | policy | requests | iterations | wall (s) | requests/s | iterations/s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in d["simulator"]:
        lines.append(f"| {r['config']} | {r['workload']} | {r['policy']} | {r['requests']:,} | {r['iterations']:,} | "
                     f"{r['wall_s']:.2f} | {r['requests_per_s']:,.0f} | {r['iterations_per_s']:,.0f} |")
    if d.get("runtime"):
        lines += ["", "Ray runtime vs simulator (local.yaml x GSM8K, emulated engine)",
                  "| policy | time_scale | makespan run / simulate (s) | wall run / simulate (s) | "
                  "Ray messages per request | controller decision p99 (ms) |", "|---|---|---|---|---|---|"]
        for r in d["runtime"]:
            lines.append(f"| {r['policy']} | {r['time_scale']:g} | {r['run_makespan_s']:.3f} / "
                         f"{r['simulate_makespan_s']:.3f} | {r['run_wall_s']:.2f} / {r['simulate_wall_s']:.2f} | "
                         f"{r['messages_per_request']:.2f} | {1e3 * r['controller_decision_p99_s']:.3f} |")
    return "\n".join(lines)
