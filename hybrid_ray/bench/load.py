"""Load benchmark of the Ray runtime: many requests over many emulated replicas on one machine.

Does the controller keep up? It prints the controller's decision latency (p50 / p99 of the wall
time of each router / controller call), the Ray messages per request (pushes, polls, routes,
adds), how late requests reached their replicas (Ray latency in modelled seconds) and the host's
lag behind the modelled schedule. The workload is GSM8K sampled with repetition (prompt and
output lengths of random GSM8K items) with Poisson arrivals at ``--rate`` requests per modelled
second (0: all at t = 0), written as a JSONL file; the cluster is ``local.yaml``'s replica group
repeated ``--replicas`` times.

    python -m hybrid_ray.bench.load --requests 20000 --replicas 16
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from ..config import ClusterSpec, load_cluster
from ..runtime import RunOptions, run
from ..jsonout import write_json
from ..workload import Request, load_gsm8k, load_workload


def write_workload(path: Path, n: int, rate: float, seed: int = 0) -> Path:
    """``n`` GSM8K-shaped requests (sampled with repetition), Poisson arrivals at ``rate``/s (0: all at 0)."""
    rng = random.Random(seed)
    items = load_gsm8k()
    t = 0.0
    with path.open("w") as fh:
        for i in range(n):
            q = rng.choice(items)
            if rate > 0 and i:
                t += rng.expovariate(rate)
            fh.write(json.dumps({"id": f"load-{i}", "prompt_tokens": q.prompt_tokens,
                                 "output_tokens": q.output_tokens, "arrival_s": round(t, 6)}) + "\n")
    return path


def load_cluster_x(replicas: int, time_scale: float) -> ClusterSpec:
    """``local.yaml``'s replica group, ``replicas`` times."""
    base = load_cluster("local")
    g = base.groups[0]
    return replace(base, name=f"local-x{replicas}", groups=(replace(g, count=replicas),), time_scale=time_scale,
                   source=f"{base.source} (x{replicas} replicas)")


def load_requests(requests: int, rate: float, seed: int = 0) -> list[Request]:
    """The benchmark's workload, written as JSONL and read back through the ordinary loader."""
    with tempfile.TemporaryDirectory() as tmp:
        return load_workload(str(write_workload(Path(tmp) / "load.jsonl", requests, rate, seed)))


def run_load(requests: int = 20_000, replicas: int = 16, rate: float = 400.0, time_scale: float = 1.0,
             policy: str = "baseline", address: str | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Run the benchmark; return its figures (also the run's summary numbers)."""
    cluster = load_cluster_x(replicas, time_scale)
    reqs = load_requests(requests, rate, seed)
    t0 = time.perf_counter()
    res = run(RunOptions(policy=policy, address=address, progress=progress, cpus_per_replica=0.1),
              cluster=cluster, requests=reqs)
    wall = time.perf_counter() - t0
    s = res.summary
    return {
        "requests": requests, "replicas": replicas, "rate_per_s": rate, "time_scale": time_scale, "policy": policy,
        "completed": s.requests_completed, "failed_replicas": len(res.failed_replicas),
        "wall_s": wall, "run_wall_s": res.run_wall_s, "makespan_s": s.makespan_s,
        "controller_decision_p99_s": res.controller_decision_p99_s,
        "messages_per_request": res.messages_per_request, "messages": res.messages,
        "late_adds": res.late_adds, "late_mean_s": res.late_mean_s, "max_lag_s": res.max_lag_s,
        "ttft_p50_s": s.ttft_p50_s, "ttft_p99_s": s.ttft_p99_s, "throughput_tok_s": s.throughput_tok_s,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hybrid_ray.bench.load", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--replicas", type=int, default=16)
    p.add_argument("--rate", type=float, default=400.0, help="arrivals per modelled second (0: all at t=0)")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="real seconds per modelled second (default 1: smaller ones outrun a 2-core host at this load)")
    p.add_argument("--policy", default="baseline")
    p.add_argument("--address", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the figures to this file")
    a = p.parse_args(argv)
    fig = run_load(a.requests, a.replicas, a.rate, a.time_scale, a.policy, a.address, a.seed)
    print(f"{fig['completed']}/{fig['requests']} requests over {fig['replicas']} emulated replicas "
          f"({fig['policy']}, {fig['rate_per_s']:g} req/s modelled, time_scale {fig['time_scale']:g})")
    print(f"  wall time                      {fig['wall_s']:.1f} s (run {fig['run_wall_s']:.1f} s)")
    print(f"  makespan (modelled)            {fig['makespan_s']:.2f} s")
    print(f"  controller decision p99        {1e3 * fig['controller_decision_p99_s']:.3f} ms")
    print(f"  Ray messages per request       {fig['messages_per_request']:.2f}  {fig['messages']}")
    print(f"  late adds (mean, modelled)     {fig['late_adds']} ({fig['late_mean_s']:.3f} s)")
    print(f"  host lag behind schedule       {fig['max_lag_s']:.3f} s")
    print(f"  TTFT p50 / p99 (modelled)      {fig['ttft_p50_s']:.3f} / {fig['ttft_p99_s']:.3f} s")
    if a.json:
        write_json(a.json, fig)
    return 0 if fig["completed"] == fig["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
