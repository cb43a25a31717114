"""The 100-case study: random GSM8K subsets and random topologies, baseline vs offline vs hybrid.

Each case draws, from its own seed: a sample of 200..1,319 GSM8K requests in shuffled order,
one or two replica groups (2..8 replicas in all) of LLaMA-7B / 13B / 65B-TP2 replicas (the
bundled configs' fitted cost models), a batch size in {8, 16, 32, 64} and a KV capacity that
holds at least the longest request. Every policy sees the same case.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, asdict

import numpy as np

from ..config import ClusterSpec, ReplicaGroupSpec, load_cluster
from ..jsonout import write_json
from ..metrics import summarize
from ..planner.bounds import lower_bound
from ..policies import build_scheduler
from ..simulator import simulate
from ..workload import Request, load_gsm8k

POLICIES = ("baseline", "raydata", "lpt-engine", "offline", "hybrid")
MODELS = {"llama7b": ("local", 0), "llama13b": ("hetero", 0), "llama65b-tp2": ("paper_llama65b", 0)}


@dataclass(slots=True)
class CaseResult:
    case: int
    requests: int
    replicas: int
    topology: str
    lower_bound_s: float
    makespan_s: dict
    utilization_busy: dict


def make_case(seed: int, pool: list[Request]) -> tuple[ClusterSpec, list[Request], str]:
    rng = random.Random(seed)
    reqs = rng.sample(pool, rng.randint(200, len(pool)))
    groups = []
    need = max(q.prompt_tokens + q.output_tokens for q in reqs)
    for k in range(rng.choice([1, 1, 2])):
        model = rng.choice(sorted(MODELS))
        cfg, idx = MODELS[model]
        cost = load_cluster(cfg).groups[idx].cost_model
        batch = rng.choice([8, 16, 32, 64])
        kv = max(need, int(batch * rng.uniform(150, 400)))
        groups.append(ReplicaGroupSpec(f"{model}-{k}", rng.randint(1, 4), batch, kv, cost))
    cl = ClusterSpec(f"case{seed}", tuple(groups))
    desc = " + ".join(f"{g.count}x{g.name.rsplit('-', 1)[0]}/b{g.max_batch_size}" for g in groups)
    return cl, reqs, desc


def run_case(i: int, seed: int, pool: list[Request], time_limit_s: float = 1.0) -> CaseResult:
    cl, reqs, desc = make_case(seed, pool)
    lb = lower_bound(cl, reqs).value_s
    ms, ut = {}, {}
    for p in POLICIES:
        s = summarize(simulate(cl, build_scheduler(p, cl, reqs, time_limit_s=time_limit_s), reqs), lb)
        ms[p], ut[p] = s.makespan_s, s.utilization_busy
    return CaseResult(i, len(reqs), cl.num_replicas, desc, lb, ms, ut)


def histogram(values: list[float], bins: int = 10, width: int = 40) -> str:
    counts, edges = np.histogram(values, bins=bins)
    top = max(counts.max(), 1)
    return "\n".join(f"  {edges[k]:+7.2f} .. {edges[k + 1]:+7.2f} % | {'#' * round(width * c / top)} {c}"
                     for k, c in enumerate(counts))


def _case_task(i: int, seed: int) -> CaseResult:
    """One case in a Ray worker (loads the bundled pool itself: nothing big is shipped)."""
    return run_case(i, seed, load_gsm8k())


def run_cases(n: int = 100, seed: int = 0, out: str | None = "results/cases.json", progress=print,
              parallel: bool = True, address: str | None = None) -> dict:
    """Run the study; ``parallel`` runs the cases as Ray tasks (local Ray, or ``address``)."""
    t0 = time.perf_counter()
    step = max(1, n // 10)

    def tick(done: int, total: int) -> None:
        if progress and (done % step == 0 or done == total):
            progress(f"  {done}/{total} cases ({time.perf_counter() - t0:.0f} s)")

    seeds = [(i, seed * 100_003 + i) for i in range(n)]
    if parallel:
        from ..actors.tasks import map_tasks
        results = map_tasks(_case_task, seeds, address=address, progress=tick)
    else:
        pool = load_gsm8k()
        results = []
        for i, s in seeds:
            results.append(run_case(i, s, pool))
            tick(i + 1, n)
    return report(results, seed, out, time.perf_counter() - t0, progress)


def report(results: list[CaseResult], seed: int, out: str | None, wall: float, progress=print) -> dict:
    def imp(p):   # makespan reduction in % against baseline
        return [100 * (1 - r.makespan_s[p] / r.makespan_s["baseline"]) for r in results]

    def pts(p):   # utilization gain in points against baseline
        return [100 * (r.utilization_busy[p] - r.utilization_busy["baseline"]) for r in results]

    summary = {}
    lines = [f"{len(results)} cases (seed {seed}), {wall:.0f} s wall",
             f"  {'policy':10s} {'makespan reduction vs baseline (%)':>38s}   {'utilization gain (points)':>28s}",
             f"  {'':10s} {'mean':>12s} {'min':>12s} {'max':>12s}   {'mean':>9s} {'min':>9s} {'max':>8s}"]
    for p in POLICIES[1:]:
        m, u = imp(p), pts(p)
        summary[p] = {"makespan_reduction_pct": {"mean": float(np.mean(m)), "min": float(np.min(m)), "max": float(np.max(m))},
                      "utilization_gain_points": {"mean": float(np.mean(u)), "min": float(np.min(u)), "max": float(np.max(u))},
                      "worse_than_baseline": int(sum(x < -1e-9 for x in m))}
        lines.append(f"  {p:10s} {np.mean(m):12.2f} {np.min(m):12.2f} {np.max(m):12.2f}   "
                     f"{np.mean(u):9.2f} {np.min(u):9.2f} {np.max(u):8.2f}")
    lines.append(f"  hybrid worse than baseline in {summary['hybrid']['worse_than_baseline']} of {len(results)} cases; "
                 f"the paper reports +8.0 utilization points on average")
    lines.append("hybrid makespan reduction per case:")
    lines.append(histogram(imp("hybrid")))
    if progress:
        progress("\n".join(lines))
    data = {"seed": seed, "n": len(results), "summary": summary, "cases": [asdict(r) for r in results]}
    if out:
        write_json(out, data, indent=1)
        if progress:
            progress(f"wrote {out}")
    return data
