"""The case study: random GSM8K subsets and long-context batches on random topologies, the hybrid
against every faithful baseline.

GSM8K cases (``make_case``) draw, from their own seed: a sample of 200..1,319 GSM8K requests in
shuffled order, one or two replica groups (2..8 replicas in all) of LLaMA-7B / 13B / 65B-TP2
replicas (the bundled configs' fitted cost models), a batch size in {8, 16, 32, 64} and a KV
capacity that holds at least the longest request.

Long-context cases (``make_long_case``) are batch jobs of 40..200 documents: prompts of 2k..32k
tokens (log-uniform), outputs of 32..1,024 tokens, on KV-bound replicas: every group's KV holds
only 2..5 times the longest prompt + output (so a handful of requests run at once, whatever the
batch size) and chunks prefill at ``max_batched_tokens`` in {2048, 4096, 8192}. Every group holds
every request (checked), so no router can strand one.

Every policy sees the same case, under two conditions: the headline one (``HEADLINE``: output
lengths learned during the run, ``--lengths online``, and engines off the cost model, ``--cost-noise
0.05`` seeded by the case's seed; ``headline_makespan_s``) and the paper's (lengths known, the exact
cost model; ``makespan_s``). The report compares the hybrid with each faithful baseline
(``BASELINES``) case by case, headline first: the ratio of makespans (hybrid / baseline; < 1: the
hybrid is faster), and the losses (cases where the hybrid is slower) and by how much.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..config import ClusterSpec, ReplicaGroupSpec, load_cluster
from ..jsonout import write_json
from ..metrics import summarize
from ..planner.bounds import lower_bound
from ..planner.budget import DEFAULT_PLAN_OPTS
from ..planning import build_scheduler
from ..progress import PhaseLine
from ..simulator import CostNoise, simulate
from ..workload import Request, check_feasible, load_gsm8k

# the faithful baselines: the paper's v0 baseline, then what operators run (docs/scheduling.md section 7)
BASELINES = ("baseline", "vllm", "serve", "serve-llm", "raydata", "lpt-engine", "chunked")
POLICIES = BASELINES + ("offline", "hybrid")
MODELS = {"llama7b": ("local", 0), "llama13b": ("hetero", 0), "llama65b-tp2": ("paper_llama65b", 0)}
KINDS = ("gsm8k", "long")
# the headline condition: lengths learned online, iteration times off the cost model (simulator.CostNoise)
HEADLINE = {"lengths": "online", "cost_noise": 0.05}
HEADLINE_LABEL = "online lengths, cost noise 0.05"


@dataclass(slots=True)
class CaseResult:
    case: int
    requests: int
    replicas: int
    topology: str
    lower_bound_s: float
    makespan_s: dict
    utilization_busy: dict
    kind: str = "gsm8k"
    # the same policies under HEADLINE (empty when the case ran only the paper's setting)
    headline_makespan_s: dict = field(default_factory=dict)


def _cost(model: str):
    cfg, idx = MODELS[model]
    return load_cluster(cfg).groups[idx].cost_model


def _describe(groups: list[ReplicaGroupSpec], long: bool = False) -> str:
    def one(g: ReplicaGroupSpec) -> str:
        extra = f"/kv{g.kv_capacity_tokens // 1000}k/t{g.max_batched_tokens}" if long else ""
        return f"{g.count}x{g.name.rsplit('-', 1)[0]}/b{g.max_batch_size}{extra}"
    return " + ".join(one(g) for g in groups)


def make_case(seed: int, pool: list[Request]) -> tuple[ClusterSpec, list[Request], str]:
    rng = random.Random(seed)
    reqs = rng.sample(pool, rng.randint(200, len(pool)))
    groups = []
    need = max(q.prompt_tokens + q.output_tokens for q in reqs)
    for k in range(rng.choice([1, 1, 2])):
        model = rng.choice(sorted(MODELS))
        batch = rng.choice([8, 16, 32, 64])
        kv = max(need, int(batch * rng.uniform(150, 400)))
        groups.append(ReplicaGroupSpec(f"{model}-{k}", rng.randint(1, 4), batch, kv, _cost(model)))
    return ClusterSpec(f"case{seed}", tuple(groups)), reqs, _describe(groups)


def long_requests(rng: random.Random, n: int, prompt: tuple[int, int] = (2048, 32768),
                  output: tuple[int, int] = (32, 1024)) -> list[Request]:
    """``n`` batch requests (all at t = 0) with log-uniform prompt and output lengths."""
    def logu(lo: int, hi: int) -> int:
        return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
    return [Request(f"long{i}", logu(*prompt), logu(*output)) for i in range(n)]


def make_long_case(seed: int) -> tuple[ClusterSpec, list[Request], str]:
    """A long-context batch on KV-bound replicas (module docstring)."""
    rng = random.Random(seed)
    reqs = long_requests(rng, rng.randint(40, 200))
    need = max(q.prompt_tokens + q.output_tokens for q in reqs)
    groups = []
    for k in range(rng.choice([1, 1, 2])):
        model = rng.choice(sorted(MODELS))
        batch = rng.choice([8, 16, 32, 64])
        kv = int(need * rng.uniform(2.0, 5.0))            # a few times the longest request, never less
        groups.append(ReplicaGroupSpec(f"{model}-{k}", rng.randint(1, 4), batch, kv, _cost(model),
                                       rng.choice([2048, 4096, 8192])))
    for g in groups:
        check_feasible(reqs, [g.kv_capacity_tokens])       # every group holds every request
    return ClusterSpec(f"long{seed}", tuple(groups)), reqs, _describe(groups, long=True)


def run_case(i: int, seed: int, pool: list[Request] | None, time_limit_s: float = math.inf, kind: str = "gsm8k",
             policies: tuple[str, ...] = POLICIES, plan_opts: dict | None = None,
             headline: bool = True) -> CaseResult:
    """``plan_opts``: planner options (default: `simulate`'s, ``DEFAULT_PLAN_OPTS``: a budget scaled
    to the batch, no wall limit, the same on a loaded host); ``headline``: also run every policy
    under ``HEADLINE`` (noise seeded by the case's seed)."""
    cl, reqs, desc = make_long_case(seed) if kind == "long" else make_case(seed, pool)
    lb = lower_bound(cl, reqs).value_s
    opts = {**DEFAULT_PLAN_OPTS, "time_limit_s": time_limit_s, **(plan_opts or {})}
    ms, ut, hl = {}, {}, {}
    for p in policies:
        s = summarize(simulate(cl, build_scheduler(p, cl, reqs, **opts), reqs), lb)
        ms[p], ut[p] = s.makespan_s, s.utilization_busy
    if headline:
        noise = CostNoise(HEADLINE["cost_noise"], seed)
        for p in policies:
            sch = build_scheduler(p, cl, reqs, lengths=HEADLINE["lengths"], seed=seed, **opts)
            hl[p] = summarize(simulate(cl, sch, reqs, noise=noise), lb).makespan_s
    return CaseResult(i, len(reqs), cl.num_replicas, desc, lb, ms, ut, kind, hl)


def histogram(values: list[float], bins: int = 10, width: int = 40) -> str:
    counts, edges = np.histogram(values, bins=bins)
    top = max(counts.max(), 1)
    return "\n".join(f"  {edges[k]:+7.2f} .. {edges[k + 1]:+7.2f} % | {'#' * round(width * c / top)} {c}"
                     for k, c in enumerate(counts))


def _case_task(i: int, seed: int, kind: str = "gsm8k") -> CaseResult:
    """One case in a Ray worker (loads the bundled pool itself: nothing big is shipped)."""
    return run_case(i, seed, load_gsm8k() if kind == "gsm8k" else None, kind=kind)


def case_seeds(n: int, seed: int, long: int) -> list[tuple[int, int, str]]:
    """(case number, case seed, kind): the GSM8K cases keep the seeds they always had."""
    out = [(i, seed * 100_003 + i, "gsm8k") for i in range(n)]
    return out + [(n + j, seed * 100_003 + 50_000 + j, "long") for j in range(long)]


def run_cases(n: int = 100, seed: int = 0, out: str | None = "results/cases.json", progress=print,
              parallel: bool = True, address: str | None = None, long: int | None = None) -> dict:
    """Run the study: ``n`` GSM8K cases and ``long`` long-context ones (default n // 5);
    ``parallel`` runs the cases as Ray tasks (local Ray, or ``address``)."""
    long = n // 5 if long is None else long
    t0 = time.perf_counter()
    total = n + long
    step = max(1, total // 10)
    line = PhaseLine("bench cases", enabled=progress is not None, quiet_s=0.0)

    def tick(done: int, total_: int) -> None:
        if done % step == 0 or done == total_:
            line(f"{done}/{total_} cases", time.perf_counter() - t0)

    seeds = case_seeds(n, seed, long)
    if parallel:
        from ..actors.tasks import map_tasks
        results = map_tasks(_case_task, seeds, address=address, progress=tick)
    else:
        pool = load_gsm8k() if n else None
        results = []
        for k, (i, s, kind) in enumerate(seeds):
            results.append(run_case(i, s, pool, kind=kind))
            tick(k + 1, total)
    line.close()
    return report(results, seed, out, time.perf_counter() - t0, progress)


def compare(results: list[CaseResult], against: str, key: str = "makespan_s") -> dict:
    """The hybrid against one policy (or ``"best"``: the fastest faithful baseline of each case);
    ``key``: ``makespan_s`` (the paper's setting) or ``headline_makespan_s``."""
    def other(ms: dict) -> float:
        if against == "best":
            return min(ms[b] for b in BASELINES if b in ms)
        return ms[against]

    ratio = np.array([getattr(r, key)["hybrid"] / other(getattr(r, key)) for r in results])
    loss = 100 * (ratio[ratio > 1 + 1e-9] - 1)       # % slower, in the cases the hybrid loses
    return {"cases": len(results),
            "ratio": {"mean": float(ratio.mean()), "min": float(ratio.min()), "max": float(ratio.max())},
            "losses": int(loss.size),
            "worst_loss_pct": float(loss.max()) if loss.size else 0.0,
            "mean_loss_pct": float(loss.mean()) if loss.size else 0.0,
            "lost_cases": [r.case for r, x in zip(results, ratio) if x > 1 + 1e-9]}


def table(summary: dict, title: str) -> list[str]:
    lines = [title,
             f"  {'hybrid vs':13s} {'mean ratio':>10s} {'min':>7s} {'max':>7s} {'losses':>8s} "
             f"{'worst loss':>11s} {'mean loss':>10s}"]
    for p, s in summary.items():
        r = s["ratio"]
        lines.append(f"  {p:13s} {r['mean']:10.3f} {r['min']:7.3f} {r['max']:7.3f} "
                     f"{s['losses']:>3d} / {s['cases']:<3d} {s['worst_loss_pct']:10.2f}% {s['mean_loss_pct']:9.2f}%")
    return lines


def report(results: list[CaseResult], seed: int, out: str | None, wall: float, progress=print) -> dict:
    present = [p for p in POLICIES if p != "hybrid" and results and all(p in r.makespan_s for r in results)]
    against = [p for p in present if p in BASELINES] + ["best"] + [p for p in present if p not in BASELINES]
    groups = {"all": results} | {k: [r for r in results if r.kind == k] for k in KINDS}
    summary = {g: {p: compare(rs, p) for p in against} for g, rs in groups.items() if rs}
    with_headline = bool(results) and all(r.headline_makespan_s for r in results)
    headline = {g: {p: compare(rs, p, "headline_makespan_s") for p in against}
                for g, rs in groups.items() if rs} if with_headline else {}
    gap = [r.makespan_s["hybrid"] / r.lower_bound_s - 1 for r in results]
    util = [100 * (r.utilization_busy["hybrid"] - r.utilization_busy["baseline"]) for r in results
            if "baseline" in r.utilization_busy]
    counts = ", ".join(f"{len(rs)} {k}" for k, rs in groups.items() if k != "all" and rs)
    lines = [f"{len(results)} cases ({counts}; seed {seed}), {wall:.0f} s wall",
             "makespan ratio hybrid / other per case (< 1: the hybrid is faster; best: the fastest "
             "faithful baseline of each case); losses: cases where the hybrid is slower, by how much"]
    if headline:
        lines.append(f"headline: {HEADLINE_LABEL} (`--lengths online --cost-noise 0.05`, seeded by each case's seed)")
        for g, s in headline.items():
            lines += table(s, f"{g} ({len(groups[g])} cases):")
        lines.append("the paper's setting: oracle lengths, the exact cost model")
    for g, s in summary.items():
        lines += table(s, f"{g} ({len(groups[g])} cases):")
    if util:
        lines.append(f"hybrid busy-utilization gain over the v0 baseline: {np.mean(util):+.1f} points on average "
                     f"(the paper reports +8.0)")
    lines.append(f"hybrid's gap to the lower bound: mean {100 * np.mean(gap):.1f} %, max {100 * np.max(gap):.1f} %")
    lines.append("hybrid vs the best faithful baseline per case (% makespan reduction):")
    best = [100 * (1 - r.makespan_s["hybrid"] / min(r.makespan_s[b] for b in BASELINES if b in r.makespan_s))
            for r in results]
    lines.append(histogram(best))
    if progress:
        progress("\n".join(lines))
    data = {"seed": seed, "n": len(results), "baselines": list(BASELINES), "summary": summary,
            "headline": {"condition": HEADLINE, "summary": headline} if headline else None,
            "cases": [asdict(r) for r in results]}
    if out:
        write_json(out, data, indent=1)
        if progress:
            progress(f"wrote {out}")
    return data
