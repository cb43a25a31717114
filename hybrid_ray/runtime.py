"""`hybrid-ray run`: run a workload on Ray actors (emulated or real engines), with ``simulate``'s metrics.

The public API: ``RunOptions`` in, ``RunResult`` out, ``run``. The work is in ``actors/``: the
driver (``actors/driver.py``), reaching Ray and checking its resources (``actors/session.py``),
and the replica, controller and planner actors. Ray is imported only there, inside functions,
so ``import hybrid_ray`` and ``hybrid-ray simulate`` never load it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .actors.session import connect_ray
from .config import ClusterSpec
from .engines import engine_spec
from .errors import ReplicasLostError, RuntimeSetupError
from .inputs import DEFAULT_CONFIG, DEFAULT_WORKLOAD, load_inputs
from .results import CompletionRecord, read_results
from .workload import Request

if TYPE_CHECKING:
    from .actors.driver import Driver

__all__ = ["RunOptions", "RunResult", "run", "prepare", "resolve_engine", "connect_ray", "RuntimeSetupError", "ReplicasLostError"]


@dataclass(slots=True)
class RunOptions:
    config: str = DEFAULT_CONFIG
    workload: str = DEFAULT_WORKLOAD
    policy: str = "baseline"
    limit: int | None = None
    seed: int | None = None
    address: str | None = None            # None/"local": start a local Ray; "auto", "host:port", "ray://host:port"
    output: str | None = None             # results JSONL, appended as requests finish
    resume: str | None = None             # results JSONL of an earlier run: skip its requests, append to it
    time_scale: float | None = None       # override the cluster's time_scale
    report_interval_s: float = 0.1        # real seconds between a busy replica's load pushes
    cpus_per_replica: float | None = None # replace every group's resources by {CPU: x} (emulate on CPUs)
    lengths: str = "oracle"               # output lengths planned policies may use: oracle | quantile
    plan_method: str = "cpsat"
    plan_time_limit_s: float = 5.0
    plan_workers: int = 2
    dispatch_lead_s: float = 0.05         # send arrivals this many real seconds early (replicas hold them
                                          # until their arrival time): hides Ray latency at small time scales
    dispatch_gap_s: float = 0.02          # at most one routing call per this many real seconds
    poll_wait_s: float = 0.25             # long-poll wait: a quiet replica answers this often
    min_poll_gap_s: float = 0.05          # at most ~20 polls/s per replica while completions flow
    heartbeat_timeout_s: float = 10.0     # unanswered poll for this long (beyond poll_wait_s) = failed
    connect_timeout_s: float = 15.0
    startup_timeout_s: float = 60.0       # actors placed and constructed within this
    progress: bool = True
    engine: str | None = None             # emulated | transformers | vllm (real engines: time_scale 1);
                                          # None: the config's `engine:`, else emulated
    model: str | None = None              # real engines: a preset (tiny, llama-7b, ...) or a model directory
    device: str | None = None             # real engines: cpu | cuda (None: the config's, else cpu)
    record_format: Callable[[CompletionRecord], str] | None = None  # output line of a record (OpenAI batch files)


@dataclass(slots=True)
class RunResult:
    summary: Any                          # metrics.Summary (None when nothing was left to run)
    record: Any                           # simulator.RunRecord
    wall_s: float                         # whole command: Ray start, planning, run, collection
    run_wall_s: float                     # from the clock's start to the last completion
    time_scale: float
    failed_replicas: list[str] = field(default_factory=list)
    requeued: int = 0
    controller_decision_p99_s: float = 0.0
    messages: dict = field(default_factory=dict)
    messages_per_request: float = 0.0
    max_lag_s: float = 0.0                # worst real-time lag of a replica behind its modelled schedule
    late_adds: int = 0                    # sequences that reached a replica after its clock passed their arrival
    late_mean_s: float = 0.0              # ... by this much on average (modelled s; Ray latency / time_scale)
    late_max_s: float = 0.0
    skipped: int = 0                      # requests already in the --resume file
    duplicates_ignored: int = 0
    plan: Any = None
    output: str | None = None
    engine: str = "emulated"              # what ran the iterations, e.g. "transformers (tiny, cpu)"

    def to_dict(self) -> dict:
        """``simulate``'s JSON keys plus the runtime's own."""
        data = self.summary.to_dict() if self.summary is not None else {}
        data.update(wall_s=self.wall_s, run_wall_s=self.run_wall_s, time_scale=self.time_scale,
                    failed_replicas=len(self.failed_replicas), failed_replica_names=list(self.failed_replicas),
                    requeued=self.requeued, controller_decision_p99_s=self.controller_decision_p99_s,
                    messages=dict(self.messages), messages_per_request=self.messages_per_request,
                    max_lag_s=self.max_lag_s, late_adds=self.late_adds, late_mean_s=self.late_mean_s,
                    late_max_s=self.late_max_s, resumed_skipped=self.skipped,
                    duplicates_ignored=self.duplicates_ignored, output=self.output, engine=self.engine)
        return data


def engine_label(opts: RunOptions) -> str:
    """``emulated`` or ``transformers (tiny, cpu)``: what runs the iterations (after ``resolve_engine``)."""
    if opts.engine in (None, "emulated"):
        return "emulated"
    from .engines import DEFAULT_MODEL

    return f"{opts.engine} ({opts.model or DEFAULT_MODEL}, {opts.device})"


def resolve_engine(opts: RunOptions, cluster: ClusterSpec) -> RunOptions:
    """``--engine`` wins, else the config's ``engine:``, else emulated; model and device fall back to the
    config's when it names the same engine kind."""
    ce = cluster.engine
    kind = opts.engine or (ce.kind if ce is not None else "emulated")
    same = ce is not None and ce.kind == kind
    return replace(opts, engine=kind,
                   model=opts.model if opts.model is not None else (ce.model if same else None),
                   device=opts.device if opts.device is not None else (ce.device if same else "cpu"))


def prepare(opts: RunOptions, cluster: ClusterSpec | None = None, requests: list[Request] | None = None
            ) -> tuple[RunOptions, ClusterSpec, list[Request], int]:
    """Inputs for a run: (options with the engine and output resolved, cluster with time_scale applied,
    requests still to run, requests skipped)."""
    if cluster is None or requests is None:
        cluster, requests = load_inputs(opts.config, opts.workload, opts.limit, opts.seed)
    opts = resolve_engine(opts, cluster)
    if opts.time_scale is not None:
        if not opts.time_scale > 0:
            raise RuntimeSetupError(f"--time-scale must be > 0, got {opts.time_scale}")
        cluster = replace(cluster, time_scale=float(opts.time_scale))
    if engine_spec(opts.engine, opts.model, opts.device) is not None:   # checks the extra and the model
        cluster = replace(cluster, time_scale=1.0)   # a real engine's iterations take real time
    ids = [q.id for q in requests]
    if len(set(ids)) != len(ids):
        dup = sorted({x for x in ids if ids.count(x) > 1})[:5]
        raise RuntimeSetupError(f"request ids must be unique (the runtime tracks requests by id); repeated: {dup}")
    output = opts.output
    skipped = 0
    if opts.resume:
        if output and Path(output).resolve() != Path(opts.resume).resolve():
            raise RuntimeSetupError(f"--resume {opts.resume} appends to that file; drop --output {output} "
                                    f"or make it the same file")
        if not Path(opts.resume).exists():
            raise RuntimeSetupError(f"--resume {opts.resume}: no such results file (a new run writes one with "
                                    f"--output {opts.resume})")
        done = read_results(opts.resume).ids
        output = opts.resume
        before = len(requests)
        requests = [q for q in requests if q.id not in done]
        skipped = before - len(requests)
    elif output and Path(output).exists() and Path(output).stat().st_size > 0:
        raise RuntimeSetupError(f"--output {output} already exists; pass --resume {output} to continue that run, "
                                f"or choose another file")
    return replace(opts, output=output), cluster, requests, skipped


def run(opts: RunOptions, hook: Callable[[Driver], None] | None = None, *, cluster: ClusterSpec | None = None,
        requests: list[Request] | None = None, scheduler=None) -> RunResult:
    """Run a workload on Ray (emulated or real engines) and return the same metrics as ``simulate``.

    ``cluster``/``requests`` replace ``opts.config``/``opts.workload``; ``scheduler`` replaces the
    named policy (the router, controller and policy objects must be picklable by cloudpickle).
    """
    t0 = time.perf_counter()
    from .openai_batch import prepare_batch_run   # an OpenAI batch workload: -o is the resume file
    opts, cluster, requests = prepare_batch_run(opts, cluster, requests)
    opts, cluster, todo, skipped = prepare(opts, cluster, requests)
    if not todo:
        return RunResult(None, None, time.perf_counter() - t0, 0.0, cluster.time_scale, skipped=skipped,
                         output=opts.output, engine=engine_label(opts))
    from .actors.driver import Driver

    return Driver(opts, cluster, todo, scheduler=scheduler, hook=hook, skipped=skipped).run()
