"""`hybrid-ray bench simscale`: how the simulator scales with requests and replicas.

GSM8K's token counts sampled with repetition to N requests (all at t = 0), on `local`'s LLaMA-7B
group resized to R replicas, policy hybrid (its plan by LPT, so that the simulation, not CP-SAT,
is timed; the planner has its own rows in `bench perf`). Prints wall seconds to build the
scheduler and to simulate, and the simulated makespan (identical across code changes that only
make the simulator faster: tests compare makespans).
"""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from ..config import load_cluster
from ..jsonout import write_json
from ..planning import build_scheduler
from ..simulator import simulate
from ..workload import Request, load_gsm8k

CASES = ((100_000, 4), (100_000, 64), (1_000_000, 64))


def sampled_gsm8k(n: int, seed: int = 0) -> list[Request]:
    pool = load_gsm8k()
    pick = np.random.default_rng(seed).integers(0, len(pool), n)
    return [Request(f"q{i}", pool[j].prompt_tokens, pool[j].output_tokens) for i, j in enumerate(pick.tolist())]


def row(n: int, replicas: int, policy: str = "hybrid") -> dict:
    cl = load_cluster("local")
    cl = replace(cl, groups=(replace(cl.groups[0], count=replicas),))
    reqs = sampled_gsm8k(n)
    t0 = time.perf_counter()
    sch = build_scheduler(policy, cl, reqs, method="lpt")
    t1 = time.perf_counter()
    rec = simulate(cl, sch, reqs)
    t2 = time.perf_counter()
    return {"requests": n, "replicas": replicas, "policy": policy, "build_s": t1 - t0, "simulate_s": t2 - t1,
            "iterations": sum(len(r.records) for r in rec.replicas),
            "makespan_s": max(s.finish_s for s in rec.sequences)}


def main(out: str | None = None, cases=CASES) -> list[dict]:
    rows = []
    print("| requests | replicas | policy | build (s) | simulate (s) | iterations | makespan (s) |")
    print("|---|---|---|---|---|---|---|")
    for n, r in cases:
        x = row(n, r)
        rows.append(x)
        print(f"| {n:,} | {r} | {x['policy']} | {x['build_s']:.2f} | {x['simulate_s']:.2f} | {x['iterations']:,} | "
              f"{x['makespan_s']:.3f} |", flush=True)
    if out:
        write_json(out, rows)
    return rows


if __name__ == "__main__":
    main()
