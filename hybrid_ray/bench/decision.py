"""Online decision latency: one Lagrangian decision + queue sort at batch 256 with 1,000 waiting.

The decision runs before every GPU iteration, so it must cost well under a millisecond. This
builds a replica with a full batch of 255 running sequences (one free slot) and 1,000 waiting
requests, then times ``policy.schedule`` (the rule and the sorted-queue wrapper) many times,
dirtying the queue before each call so the sort is part of what is measured.
"""
from __future__ import annotations

import random
import time

import numpy as np

from ..config import ReplicaGroupSpec, ReplicaSpec, load_cluster
from ..replica import PREFILL, Iteration, ReplicaState, Sequence
from ..workload import Request
from ..policies.lagrangian import LagrangianPolicy
from ..policies.sorting import SortedQueue, longest_predicted_first


def build_replica(batch: int = 256, waiting: int = 1000, seed: int = 0) -> ReplicaState:
    g0 = load_cluster("local").groups[0]
    g = ReplicaGroupSpec("bench", 1, batch, 10_000_000, g0.cost_model, max_batched_tokens=1 << 20)
    r = ReplicaState(ReplicaSpec("bench-0", 0, g))
    rng = random.Random(seed)
    run = [Sequence(Request(f"r{i}", rng.randint(20, 200), rng.randint(50, 400)), 0) for i in range(batch - 1)]
    for s in run:
        s.predicted_output = s.req.output_tokens
        s.sort_key = longest_predicted_first(s)
    r.add(run)
    it = r.begin(Iteration(PREFILL, [(s, s.prefill_target) for s in run]))
    r.complete(it, 0.0, 0.1)
    wait = [Sequence(Request(f"w{i}", rng.randint(20, 200), rng.randint(50, 400)), 0) for i in range(waiting)]
    for s in wait:
        s.predicted_output = s.req.output_tokens
        s.sort_key = longest_predicted_first(s)
    r.add(wait)
    return r


def measure(batch: int = 256, waiting: int = 1000, repeats: int = 2000, allow_mixed: bool = True,
            reshuffle: bool = True) -> dict:
    """Time ``schedule``; ``reshuffle`` scrambles the queue before each call (worst-case sort),
    else the queue stays sorted and is only marked changed (steady state of a real run)."""
    r = build_replica(batch, waiting)
    policy = SortedQueue(LagrangianPolicy(allow_mixed=allow_mixed))
    times = np.empty(repeats)
    rng = random.Random(1)
    for k in range(repeats):
        if reshuffle:
            rng.shuffle(r.waiting)        # worst case: the queue changed completely since last time
        r.waiting_dirty = True
        t0 = time.perf_counter()
        policy.schedule(r)
        times[k] = time.perf_counter() - t0
    return {"batch": batch, "waiting": waiting, "p50_us": float(np.percentile(times, 50) * 1e6),
            "p99_us": float(np.percentile(times, 99) * 1e6), "mean_us": float(times.mean() * 1e6)}


def main() -> dict:
    out = {}
    for label, shuffle in (("queue reshuffled before each call (worst case)", True),
                           ("queue unchanged but marked dirty (steady state)", False)):
        res = measure(reshuffle=shuffle)
        out["worst" if shuffle else "steady"] = res
        print(f"online decision (Lagrangian rule + queue sort), batch {res['batch']}, {res['waiting']} waiting, "
              f"{label}: p50 {res['p50_us']:.1f} us, p99 {res['p99_us']:.1f} us (target < 100 us)")
    return out


if __name__ == "__main__":
    main()
