"""`hybrid-ray bench planscale`: how long the whole plan takes as the batch grows (1k to 1M requests).

GSM8K's token counts sampled with repetition (``bench simscale``'s sample) on `local`'s LLaMA-7B
group resized to 64 replicas; ``make_plan`` with the CLI's default budget (``plan_share``: 2 % of
the makespan it plans) or a wall limit (``--time-limit``). Each row: the plan's wall time (packing,
bound, candidates and their simulations, refining), the packing's estimated makespan, then the
hybrid's simulated run on the kept plan (simulated after the clock stops: what the plan is worth),
the lower bound and the run's gap to it.
"""
from __future__ import annotations

import math
import time
from dataclasses import replace

from ..config import load_cluster
from ..jsonout import write_json
from ..planner.budget import PLAN_SHARE
from ..planning import build_scheduler, make_plan
from ..progress import PhaseLine
from ..simulator import simulate
from .simscale import sampled_gsm8k

SIZES = (1_000, 10_000, 100_000, 1_000_000)


def row(n: int, replicas: int = 64, time_limit_s: float = math.inf, progress=None) -> dict:
    cl = load_cluster("local")
    cl = replace(cl, groups=(replace(cl.groups[0], count=replicas),))
    reqs = sampled_gsm8k(n)
    share = PLAN_SHARE if math.isinf(time_limit_s) else None
    t0 = time.perf_counter()
    plan = make_plan(cl, reqs, time_limit_s=time_limit_s, plan_share=share, progress=progress)
    wall = time.perf_counter() - t0
    t1 = time.perf_counter()
    run = simulate(cl, build_scheduler("hybrid", cl, reqs, plan=plan), reqs)
    lb = plan.lower_bound_s
    return {"requests": n, "replicas": replicas, "wall_s": wall, "estimate_s": plan.planned_makespan_s,
            "makespan_s": run.makespan_s, "simulate_wall_s": time.perf_counter() - t1, "lower_bound_s": lb,
            "gap": run.makespan_s / lb - 1 if lb else 0.0, "chosen": plan.info.get("chosen") or plan.method,
            "budget": plan.info.get("budget")}


def format_rows(rows: list[dict]) -> str:
    lines = ["| requests | plan wall (s) | packing estimate (s) | hybrid run (s) | lower bound (s) | gap | kept |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['requests']:,} | {r['wall_s']:.2f} | {r['estimate_s']:.3f} | {r['makespan_s']:.3f} | "
                     f"{r['lower_bound_s']:.3f} | {100 * r['gap']:.2f} % | {r['chosen']} |")
    return "\n".join(lines)


def main(out: str | None = "results/planscale.json", sizes=SIZES, time_limit_s: float = math.inf, progress=print) -> list[dict]:
    rows = []
    for n in sizes:
        line = PhaseLine(f"bench planscale: {n:,} requests, plan", enabled=progress is not None)
        rows.append(row(n, time_limit_s=time_limit_s, progress=line))
        line.close()
    if progress:
        progress(format_rows(rows))
    if out:
        write_json(out, rows)
    return rows
