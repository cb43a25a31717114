"""What a run is asked (``RunOptions``) and what it gives back (``RunResult``).

Its own module so that both the public API (``runtime.py``) and the Ray driver (``actors/driver.py``)
use these types without importing each other: the runtime imports the driver, never the reverse.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .inputs import DEFAULT_CONFIG, DEFAULT_WORKLOAD
from .results import OutputFormat


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
    lengths: str = "oracle"               # output lengths policies may use: oracle | quantile | online
    history: str | None = None            # an earlier run's output: (prompt, output) pairs to start predictors
    plan_method: str = "cpsat"
    plan_time_limit_s: float = 5.0
    plan_deterministic_time: float | None = None   # CP-SAT's deterministic budget (None: 0.4 x the limit)
    plan_share: float | None = None       # a deterministic plan budget, this share of the makespan (planning.make_plan)
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
    output_format: OutputFormat | None = None   # how results are written, read back and finalized
                                                # (an OpenAI batch file's; None: plain records)
    wait_for_plan: bool = False           # planned policies: start only once the full plan is in (the run
                                          # then follows `simulate`'s timeline on it); default: start on the
                                          # initial plan (LPT) and switch when the full plan arrives


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
    controller_failures: list[str] = field(default_factory=list)   # why each controller actor was replaced
    line_errors: list[str] = field(default_factory=list)   # requests the engine failed on twice: error lines
    # real seconds from the driver's start (Ray's start included): every replica constructed, the
    # first iteration, the full plan's arrival (None: no planner, it failed, or the run ended first)
    engines_ready_s: float = 0.0
    first_iteration_s: float = 0.0
    plan_wall_s: float | None = None
    plan_moved: int = 0                   # requests the full plan moved off the initial plan's replica
    planner_error: str | None = None      # why the planner gave no plan (the run kept the initial plan)

    def to_dict(self) -> dict:
        """``simulate``'s JSON keys plus the runtime's own."""
        data = self.summary.to_dict() if self.summary is not None else {}
        data.update(wall_s=self.wall_s, run_wall_s=self.run_wall_s, time_scale=self.time_scale,
                    failed_replicas=len(self.failed_replicas), failed_replica_names=list(self.failed_replicas),
                    requeued=self.requeued, controller_decision_p99_s=self.controller_decision_p99_s,
                    messages=dict(self.messages), messages_per_request=self.messages_per_request,
                    max_lag_s=self.max_lag_s, late_adds=self.late_adds, late_mean_s=self.late_mean_s,
                    late_max_s=self.late_max_s, resumed_skipped=self.skipped,
                    duplicates_ignored=self.duplicates_ignored, output=self.output, engine=self.engine,
                    controller_restarts=len(self.controller_failures), line_errors=len(self.line_errors),
                    engines_ready_s=self.engines_ready_s, first_iteration_s=self.first_iteration_s,
                    plan_wall_s=self.plan_wall_s, plan_moved=self.plan_moved, planner_error=self.planner_error)
        return data


def engine_label(opts: RunOptions) -> str:
    """``emulated`` or ``transformers (tiny, cpu)``: what runs the iterations (after ``resolve_engine``)."""
    if opts.engine in (None, "emulated"):
        return "emulated"
    from .engines.factory import DEFAULT_MODEL

    return f"{opts.engine} ({opts.model or DEFAULT_MODEL}, {opts.device})"
