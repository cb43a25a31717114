"""`hybrid-ray` command line: simulate | plan | run | bench | fit-cost-model | profile | make-model | make-workload.

User errors (bad YAML, bad workload, impossible request, an option out of range or in conflict, an
output that cannot be written, --plot without matplotlib) print one clear line and exit 2, and are
checked before anything runs (before Ray starts, for `run`).
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from pathlib import Path
from typing import Callable

from . import __version__
from .errors import HybridRayError, UsageError, one_line
from .inputs import DEFAULT_CONFIG, DEFAULT_WORKLOAD, load_inputs
from .planner.budget import PLAN_SHARE
from .progress import PhaseLine



# -- option values: range-checked by argparse, so a bad one is one line naming the option ------------

def _number(minimum: float, *, strict: bool, integer: bool = False, unit: str = "",
            maximum: float | None = None) -> Callable[[str], float]:
    """An argparse ``type``: a finite number (an integer with ``integer``) >= / > ``minimum``."""
    what = f"{'an integer' if integer else 'a number'} {'>' if strict else '>='} {minimum:g}" + (
        f" and <= {maximum:g}" if maximum is not None else "") + (f" ({unit})" if unit else "")

    def parse(text: str) -> float:
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum) \
                or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


_POSITIVE_INT = _number(1, strict=False, integer=True)
_SECONDS = _number(0, strict=True, unit="seconds")
_POSITIVE = _number(0, strict=True)
_NONNEGATIVE = _number(0, strict=False)


def _ray_cpus(text: str) -> float:
    """--cpus-per-replica: an amount Ray can reserve (config.check_ray_amount)."""
    from .config import check_ray_amount

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0.0001 (Ray's unit), got {text!r}") from None
    problem = check_ray_amount(value)
    if problem:
        raise argparse.ArgumentTypeError(problem.replace(f"got {value!r}", f"got {text!r}"))
    return value


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block): ``hybrid-ray run: error: argument ...``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


class _WorkloadAction(argparse.Action):
    """``--workload`` and ``-i`` both set the workload: naming both is a conflict, not a silent override."""

    def __call__(self, parser, namespace, values, option_string=None):
        flag = "-i" if option_string in ("-i", "--input") else "--workload"
        other = getattr(namespace, "_workload_flag", None)
        if other is not None and other != flag:
            raise argparse.ArgumentError(self, f"conflicts with {other} {getattr(namespace, self.dest)}: "
                                               f"-i FILE is the workload (an OpenAI batch file); give one of them")
        namespace._workload_flag = flag
        setattr(namespace, self.dest, values)

WORKLOAD_HELP = ("gsm8k (1,319 GSM8K questions, all at t=0), azure-conv / azure-code (Azure 2023 "
                 "traces with real arrival times), mixed-tasks[:N[:SEED]] (generated text prompts of five "
                 "tasks, 3,000 by default), doc-qa[:N[:SEED]] / few-shot[:N[:SEED]] (generated prompts "
                 "sharing documents / few-shot prefixes, as hash_ids: prefix caching), or a .jsonl/.csv "
                 "file with prompt_tokens, output_tokens[, id, arrival_s, prompt or messages, max_tokens, "
                 "model, hash_ids]")


def _add_inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help=f"cluster YAML path, or a bundled name (default: {DEFAULT_CONFIG})")
    p.add_argument("--workload", default=DEFAULT_WORKLOAD, action=_WorkloadAction,
                   help=f"{WORKLOAD_HELP} (default: {DEFAULT_WORKLOAD})")
    from .openai_batch import BatchPath
    p.add_argument("-i", "--input", dest="workload", type=BatchPath, default=argparse.SUPPRESS, metavar="JSONL",
                   action=_WorkloadAction,
                   help="an OpenAI batch input file (/v1/completions, /v1/chat/completions lines) as the workload; "
                        "malformed lines get error lines, the rest runs (docs/openai_batch.md); not with --workload")
    p.add_argument("--limit", type=_POSITIVE_INT, default=None,
                   help="use only N requests (first N, or a seeded sample with --seed)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of every random choice: the --limit sample, --lengths quantile's history sample, the "
                        "serve router's draws and CP-SAT's search (offline, hybrid, plan); default 0. Runs are "
                        "deterministic; a --seed that nothing uses is an error")
    p.add_argument("--json", metavar="OUT", default=None, help="also write the metrics as JSON to OUT")


def _add_policy_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lengths", default=None, choices=["oracle", "quantile", "online", "learned"],
                   help="output lengths the policies may use: oracle = known in advance (the paper's setting; for "
                        "an OpenAI batch, max_tokens); quantile = predicted from a seeded 10%% history sample (or "
                        "--history); online = learned from this run's completions by prompt-length bucket and "
                        "model, queued work re-predicted as they move; learned = read from the request (prompt "
                        "text, kind, model, system prompt, max_tokens, prompt length) by a model fitted on "
                        "--history and this run's completions, p50/p90 capped at max_tokens (docs/scheduling.md "
                        "section 5) (default: learned for an OpenAI batch input, whose lengths are unknown; "
                        "oracle otherwise)")
    p.add_argument("--history", metavar="FILE", default=None, action="append",
                   help="an earlier run's requests and output lengths to start --lengths online/learned (and "
                        "replace quantile's sample): its output (results JSONL or OpenAI batch output; add the "
                        "batch input as another --history for its prompts), or a workload file with prompt text "
                        "and output_tokens (e.g. a pilot run's); repeatable")
    p.add_argument("--time-limit", type=_SECONDS, default=None,
                   help="wall-clock seconds the whole plan may take (packing, candidate simulations, rule "
                        "settings, refining) for planned policies (offline, hybrid). Default: a deterministic "
                        "budget scaled to the batch, 2%% of the makespan it plans at the simulator's nominal "
                        "speed, so that a plan is the same under any load (a loaded host takes longer)")


def _add_deterministic_time(p: argparse.ArgumentParser) -> None:
    p.add_argument("--deterministic-time", type=_POSITIVE, default=None, metavar="UNITS",
                   help="CP-SAT's deterministic-time budget (load-independent work units, about a second each on "
                        "a free core): the same plan on any machine. Without --time-limit there is then no "
                        "wall-clock limit (default: 0.4 x the time limit, which a loaded machine may not reach)")


def _assignment_note(plan) -> str:
    """Which candidate assignment the planner kept, and the simulated (or estimated) makespans."""
    scores = plan.info.get("candidates")
    kind = ("tiered assignment" if plan.method == "tiers" else "late binding" if plan.method == "bounded"
            else "length bands" if plan.info.get("bands") else "work-balanced packing")
    if plan.info.get("start") == "slots":
        kind += ", slot-balanced start order"
    if not scores:
        return kind
    how = "simulated hybrid" if plan.info.get("simulated", True) else "estimate"
    note = kind + f" ({how}: " + ", ".join(f"{k} {v:.2f} s" for k, v in sorted(scores.items())) + ")"
    cuts = plan.info.get("calibration_makespans")
    if plan.method == "tiers" and cuts:
        note += "; calibrated cuts " + " -> ".join(f"{v:.3f}" for v in cuts) + " s"
    if plan.info.get("rule"):
        from .planning import rule_label
        note += "; online rule " + rule_label(plan.info["rule"])
    refine = plan.info.get("refine")
    if refine:
        note += (f"; refined {refine['from_s']:.3f} -> {refine['to_s']:.3f} s "
                 f"({refine['accepted']} changes kept of {refine['simulations']} simulated runs)")
    return note


def _budget(args: argparse.Namespace) -> dict:
    """The planner's budget options: ``deterministic_time=`` when --deterministic-time was given;
    ``plan_share=`` (the scaled default) when neither it nor --time-limit was; and the live line."""
    det = getattr(args, "deterministic_time", None)
    opts: dict = {"progress": PhaseLine("plan")}
    if det is not None:
        opts["deterministic_time"] = det
    elif not math.isfinite(args.time_limit):
        opts["plan_share"] = PLAN_SHARE
    return opts


def _plan_cost_row(plan, makespan_s: float) -> tuple[str, str]:
    """The planner's wall time and its share of the makespan it planned (issue: at most PLAN_SHARE)."""
    wall = plan.solve_time_s
    share = f" ({100 * wall / makespan_s:.1f} % of the makespan)" if makespan_s > 0 else ""
    return ("planning wall time", f"{wall:.2f} s{share}")


# Policies whose schedule depends on --seed (CP-SAT's search for the planned ones, serve's draws).
_SEEDED_POLICIES = ("offline", "hybrid", "serve", "serve-llm")


def _seed_is_used(args: argparse.Namespace) -> bool:
    if args.limit is not None or (getattr(args, "cost_noise", None) or 0) > 0:
        return True
    if args.command == "plan":
        return args.method == "cpsat"
    return args.lengths in ("quantile", "learned") or getattr(args, "policy", "hybrid") in _SEEDED_POLICIES


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):    # a broken install, or a module without a spec
        return False


def _default_lengths(args: argparse.Namespace) -> None:
    """``--lengths`` left out: learned for an OpenAI batch input (its output lengths are unknown: the
    oracle would know only max_tokens), oracle (the paper's setting) for workloads with true lengths."""
    if hasattr(args, "lengths") and args.lengths is None:
        from .openai_batch import is_batch_workload
        args.lengths = "learned" if is_batch_workload(args.workload) else "oracle"


def _preflight(args: argparse.Namespace) -> None:
    """Everything about the command line that can be wrong, checked before anything runs (Ray included)."""
    _default_lengths(args)
    if getattr(args, "time_limit", False) is None:   # a deterministic budget alone: no wall-clock limit
        # (--deterministic-time's, or the default scaled to the batch): the same plan under any load
        args.time_limit = math.inf
    if args.command in ("simulate", "compare", "plan", "run") and args.seed is not None and not _seed_is_used(args):
        raise UsageError(f"--seed {args.seed} changes nothing here: it seeds the --limit sample, --lengths quantile, "
                         f"{'--cost-noise, ' if args.command == 'simulate' else ''}"
                         f"the {'/'.join(_SEEDED_POLICIES)} policies{' and CP-SAT' if args.command == 'plan' else ''}; "
                         f"add --limit N to sample N requests, or drop --seed")
    from .results import check_writable

    for option in ("output", "resume", "json"):
        path = getattr(args, option, None)
        if path and isinstance(path, str):
            check_writable(path, "-o/--output" if option == "output" else f"--{option}")
    plot = getattr(args, "plot", None)
    if plot:
        if not _importable("matplotlib"):
            raise UsageError(f"--plot {plot} needs matplotlib: pip install 'hybrid-ray[plot]', or drop --plot")
        if Path(plot).exists() and not Path(plot).is_dir():
            raise UsageError(f"--plot {plot}: is a file; give a folder for the PNG files")
        check_writable(Path(plot) / "gantt.png", "--plot")


def _plot(directory: str, runs: list, lower_bound_s: float | None) -> None:
    from .plots import write_plots
    for path in write_plots(runs, directory, lower_bound_s):
        print(f"wrote {path}")


def _write_json(path: str | None, data: dict) -> None:
    if path:
        from .jsonout import write_json
        print(f"wrote {write_json(path, data)}")


def cmd_simulate(args: argparse.Namespace) -> int:
    from .metrics import format_summary, summarize
    from .planner.bounds import lower_bound
    from .planning import build_scheduler
    from .simulator import CostNoise, simulate

    cluster, requests = load_inputs(args.config, args.workload, args.limit, args.seed)
    print(f"simulating {len(requests)} requests of {args.workload} on {cluster.name} "
          f"({cluster.num_replicas} replicas), policy {args.policy}"
          + (f", cost noise {args.cost_noise:g} (seed {args.seed or 0})" if args.cost_noise else ""), flush=True)
    t0 = time.perf_counter()
    history = None
    if args.history:
        from .history import load_history
        history = load_history(args.history)
    budget = _budget(args)
    scheduler = build_scheduler(args.policy, cluster, requests, lengths=args.lengths, seed=args.seed or 0,
                                history=history, time_limit_s=args.time_limit, **budget)
    budget["progress"].close()
    noise = CostNoise(args.cost_noise, args.seed or 0) if args.cost_noise else None
    record = simulate(cluster, scheduler, requests, noise=noise)
    summary = summarize(record, lower_bound(cluster, requests).value_s)
    wall = time.perf_counter() - t0
    print(format_summary(summary))
    plan = scheduler.info.get("plan")
    plan_wall = plan.solve_time_s if plan is not None else 0.0
    if plan is not None:
        key, value = _plan_cost_row(plan, summary.makespan_s)
        print(f"  {key.ljust(32)}  {value}")
    print(f"  {'simulated in'.ljust(32)}  {wall:.2f} s wall")
    if args.output:                         # per-request lines; OpenAI batch output for a batch input
        from .openai_batch import write_simulated_output
        print(f"wrote {write_simulated_output(args.workload, args.output, cluster, record, args.limit, args.seed)}")
    if args.plot:
        runs = [(args.policy, record, summary)]
        if args.policy != "baseline":      # the reference a reader compares against
            base = simulate(cluster, build_scheduler("baseline", cluster, requests), requests, noise=noise)
            runs.insert(0, ("baseline", base, summarize(base, summary.lower_bound_s)))
        _plot(args.plot, runs, summary.lower_bound_s)
    data = summary.to_dict()
    data.update(config=cluster.source, workload=args.workload, wall_s=wall, lengths=args.lengths,
                cost_noise=args.cost_noise, plan_wall_s=plan_wall,
                plan_share_of_makespan=plan_wall / summary.makespan_s if summary.makespan_s > 0 else 0.0)
    _write_json(args.json, data)
    return 0


# the faithful baselines the main job runs beside the hybrid (docs/scheduling.md section 7), as deployed
# by default and as tuned; the strongest on the batch is the one to beat
COMPARE_BASELINES = ("vllm", "serve", "serve-llm", "raydata", "lpt-engine")


def cmd_compare(args: argparse.Namespace) -> int:
    """The main job: the hybrid and every faithful baseline on the same inputs, the strongest
    baseline beside the hybrid with the lower bound, each gap and the plan's wall time."""
    from .metrics import summarize
    from .planner.bounds import lower_bound
    from .planning import build_scheduler
    from .schedulers import BUILDERS
    from .simulator import simulate

    cluster, requests = load_inputs(args.config, args.workload, args.limit, args.seed)
    print(f"hybrid-ray: {len(requests)} requests of {args.workload} on {cluster.name} "
          f"({cluster.num_replicas} simulated replicas), lengths {args.lengths}: the hybrid against "
          f"the faithful baselines", flush=True)
    history = None
    if args.history:
        from .history import load_history
        history = load_history(args.history)
    bound = lower_bound(cluster, requests).value_s
    rows = []
    for name in ("hybrid", *[b for b in COMPARE_BASELINES if b in BUILDERS]):
        budget = _budget(args) if name == "hybrid" else {}
        t0 = time.perf_counter()
        sch = build_scheduler(name, cluster, requests, lengths=args.lengths, seed=args.seed or 0, history=history,
                              time_limit_s=args.time_limit, **budget)
        if budget:
            budget["progress"].close()
        plan = sch.info.get("plan")
        plan_wall = plan.solve_time_s if plan is not None else 0.0
        summary = summarize(simulate(cluster, sch, requests), bound)
        rows.append((name, summary, plan_wall, time.perf_counter() - t0))
    hybrid = rows[0]
    best = min(rows[1:], key=lambda r: r[1].makespan_s)
    lines = ["| policy | total time | busy utilization | gap to bound | planning wall |", "|---|---|---|---|---|"]
    for name, sm, plan_wall, _ in sorted(rows, key=lambda r: r[1].makespan_s):
        mark = " (strongest baseline)" if name == best[0] else ""
        lines.append(f"| {name}{mark} | {sm.makespan_s:.2f} s | {100 * sm.utilization_busy:.1f} % | "
                     f"{100 * sm.gap:.1f} % | {f'{plan_wall:.2f} s' if name == 'hybrid' else '-'} |")
    lines.append(f"| lower bound | {bound:.2f} s | | | |")
    print("\n".join(lines))
    h, b = hybrid[1].makespan_s, best[1].makespan_s
    verdict = "faster" if h < b else "slower"
    print(f"hybrid vs the strongest baseline ({best[0]}): {h:.2f} s vs {b:.2f} s, {100 * abs(1 - h / b):.1f} % "
          f"{verdict}; planning took {hybrid[2]:.2f} s wall ({100 * hybrid[2] / h:.1f} % of the hybrid's makespan). "
          f"Simulated: `hybrid-ray run` runs it on Ray actors, `hybrid-ray --help` lists every command.")
    _write_json(args.json, {"config": cluster.source, "workload": args.workload, "lengths": args.lengths,
                            "lower_bound_s": bound, "strongest_baseline": best[0],
                            "policies": {n: dict(sm.to_dict(), plan_wall_s=pw, wall_s=w) for n, sm, pw, w in rows}})
    return 0


def _simulated_rows(plan) -> list[tuple[str, str]]:
    """The chosen plan's simulated hybrid run (after the refining search), where the planner chose
    by simulation: the planned makespan above is the packing's estimate, which can be far from what
    the run takes."""
    scores, chosen = plan.info.get("candidates"), plan.info.get("chosen")
    if not plan.info.get("simulated") or not scores or chosen not in scores:
        return []
    refine = plan.info.get("refine")
    ms, lb = float(refine["to_s"] if refine else scores[chosen]), plan.lower_bound_s
    if lb - 1e-6 <= ms < lb:
        ms = lb                  # the scores are rounded to the microsecond: one that meets the bound
    gap = 100 * (ms / lb - 1) if lb > 0 else 0.0
    return [("simulated hybrid run / gap", f"{ms:.2f} s / {gap:.2f} %")]


def _solve_time_note(plan) -> str:
    """Solve time, and how much of it the packing (which the time limit bounds) took."""
    pack = plan.info.get("pack_solve_time_s")
    if pack is None or not plan.info.get("simulated"):
        return f"{plan.solve_time_s:.2f} s"
    what = "the candidate plans and rule settings"
    if plan.info.get("refine"):
        what = "the candidate plans, rule settings and refining search"
    b = plan.info.get("budget") or {}
    left_out = ", ".join(f"{k} x{v}" for k, v in (b.get("skipped") or {}).items())
    within = (f"within the {b['wall_s']:g} s limit" if b.get("wall_s") else
              f"within {b['iterations']:,} simulated iterations" if b.get("iterations") is not None else "no limit")
    return (f"{plan.solve_time_s:.2f} s (packing {pack:.2f} s; the rest simulates {what}, {within}"
            + (f"; left out for the budget: {left_out}" if left_out else "") + ")")


def cmd_plan(args: argparse.Namespace) -> int:
    from .planning import make_plan

    cluster, requests = load_inputs(args.config, args.workload, args.limit, args.seed)
    limit = (f"time limit {args.time_limit:g} s" if math.isfinite(args.time_limit) else
             f"deterministic budget {args.deterministic_time:g}" if args.deterministic_time else
             f"budget {100 * PLAN_SHARE:g} % of the makespan")
    print(f"planning {len(requests)} requests of {args.workload} on {cluster.name} "
          f"({cluster.num_replicas} replicas) with {args.method}, {limit}, "
          f"{args.workers} workers", flush=True)
    budget = _budget(args)
    plan = make_plan(cluster, requests, method=args.method, time_limit_s=args.time_limit, workers=args.workers,
                     seed=args.seed or 0, **budget)
    budget["progress"].close()
    fin = sorted(plan.predicted_finish_s.values())
    rows = [("planned makespan", f"{plan.planned_makespan_s:.2f} s"),
            ("lower bound (any policy)", f"{plan.lower_bound_s:.2f} s" + (
                f" ({plan.info['bound']}: the budget; `simulate` reports the full bound)"
                if plan.info.get("bound", "full") != "full" else "")),
            ("gap to the lower bound", f"{100 * plan.gap:.2f} %"),
            *_simulated_rows(plan),
            ("assignment", _assignment_note(plan)),
            ("work packing bound / gap / status", f"{plan.pack_bound_s:.2f} s / {100 * plan.pack_gap:.4f} % / "
                                                  f"{plan.solver_status} ({args.method})"),
            ("solve time", _solve_time_note(plan)),
            ("replica finish min / max", f"{fin[0]:.2f} / {fin[-1]:.2f} s" if fin else "-")]
    w = max(len(k) for k, _ in rows)
    print("\n".join(f"  {k.ljust(w)}  {v}" for k, v in rows))
    data = plan.to_dict()
    data.update(config=cluster.source, workload=args.workload, plan_wall_s=plan.solve_time_s)
    _write_json(args.json, data)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """`hybrid-ray run`: the same policies on Ray actors, emulated or real engines (hybrid_ray/runtime.py)."""
    from .actors.session import describe_address
    from .metrics import format_summary
    from .runtime import RunOptions, run

    opts = RunOptions(config=args.config, workload=args.workload, policy=args.policy, limit=args.limit,
                      seed=args.seed, address=args.address, output=args.output, resume=args.resume,
                      time_scale=args.time_scale, report_interval_s=args.report_interval,
                      cpus_per_replica=args.cpus_per_replica, lengths=args.lengths, plan_method=args.plan_method,
                      plan_time_limit_s=args.time_limit, plan_deterministic_time=args.deterministic_time,
                      plan_share=_budget(args).get("plan_share"), heartbeat_timeout_s=args.heartbeat_timeout,
                      startup_timeout_s=args.startup_timeout, connect_timeout_s=args.connect_timeout,
                      progress=not args.no_progress)
    opts.engine, opts.model, opts.device = args.engine, args.model, args.device
    opts.history = args.history
    print(f"running {args.workload} on {args.config} with policy {args.policy} on Ray "
          f"({describe_address(args.address)})", flush=True)
    try:
        res = run(opts)
    except KeyboardInterrupt as e:        # Ctrl-C, or SIGTERM (runtime.Terminated): exit 128 + signal
        where = args.resume or args.output
        signum = getattr(e, "signum", 2)
        print(f"hybrid-ray: {'terminated' if signum == 15 else 'interrupted'}"
              + (f"; finished requests are in {where}: continue with --resume {where}" if where else ""),
              file=sys.stderr)
        return 128 + signum
    if res.summary is None:
        print(f"nothing to run: all {res.skipped} requests are already in {res.output}")
        return 0
    print(format_summary(res.summary))
    rows = [("engine", res.engine),
            ("wall time", f"{res.wall_s:.2f} s (run {res.run_wall_s:.2f} s at time_scale {res.time_scale:g})"),
            ("engines ready / first iteration", f"{res.engines_ready_s:.2f} / {res.first_iteration_s:.2f} s after start"
             + (f"; full plan at {res.plan_wall_s:.2f} s, {res.plan_moved} requests moved" if res.plan_wall_s is not None
                else f"; no full plan ({res.planner_error}): initial plan" if res.planner_error
                else "; the run ended before the full plan: initial plan" if res.plan is not None else "")),
            ("failed replicas / requeued", f"{len(res.failed_replicas)}"
             + (f" ({', '.join(res.failed_replicas)})" if res.failed_replicas else "") + f" / {res.requeued}"),
            ("controller decision p99", f"{1e3 * res.controller_decision_p99_s:.3f} ms"),
            ("Ray messages per request", f"{res.messages_per_request:.2f}"),
            ("late adds (mean / max, modelled)", f"{res.late_adds} ({res.late_mean_s:.3f} / {res.late_max_s:.3f} s)")]
    if res.skipped:
        rows.append(("resumed: skipped", f"{res.skipped} requests already in {res.output}"))
    print("\n".join(f"  {k.ljust(32)}  {v}" for k, v in rows))
    if res.late_adds and res.late_mean_s > 0.01 * res.summary.makespan_s:
        print(f"note: {res.late_adds} requests reached their replica after its modelled clock had passed their "
              f"arrival (Ray latency / time_scale); raise --time-scale for online timing closer to `simulate`")
    data = res.to_dict()
    data.update(config=res.record.config, workload=args.workload, lengths=args.lengths)
    _write_json(args.json, data)
    if args.plot:
        _plot(args.plot, [(args.policy, res.record, res.summary)], res.summary.lower_bound_s)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.which == "docs":                        # rewrite (or --check) every marked table in the docs
        from .bench.docs import run_docs
        return run_docs(args.only, check=args.check, timing=args.timing, root=args.root)
    if args.which == "paper":
        from .bench.paper import run_paper
        run_paper(out_dir=args.out or "results")
    elif args.which == "cases":
        from .bench.cases import run_cases
        run_cases(args.n, args.seed or 0, args.out or "results/cases.json", long=args.long)
    elif args.which == "perf":
        from .bench.perf import run_perf
        run_perf(args.out or "results/perf.json")
    elif args.which == "load":
        from .bench.load import main as load_main
        return load_main(["--json", args.out] if args.out else [])
    elif args.which == "decision":
        from .bench.decision import main as decision_main
        decision_main()
    elif args.which == "baselines":
        from .bench.baselines import main as baselines_main
        baselines_main(args.out)
    elif args.which == "simscale":
        from .bench.simscale import main as simscale_main
        simscale_main(args.out)
    elif args.which == "planscale":                 # the whole plan's wall time, 1k to 1M requests
        from .bench.planscale import main as planscale_main
        planscale_main(args.out or "results/planscale.json")
    elif args.which == "fidelity":                  # real tiny model on CPU ([engine] extra); --out: JSON
        from .bench.fidelity import main as fidelity_main
        fidelity_main(args.out)
    elif args.which == "vs-vllm":
        from .bench.vs_vllm import main as vs_vllm_main
        vs_vllm_main(["--n", str(args.n), "--out", args.out or "results/vs_vllm.json"]
                     + (["--model", args.model] if args.model else [])
                     + (["--replicas", str(args.replicas)] if args.replicas else []))
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from .profiles import cost_model_yaml, fit_cost_model, load_profile

    from .errors import WorkloadError

    path = Path(args.profile)
    if not path.is_file():
        raise UsageError(f"fit-cost-model {args.profile}: {'is a directory' if path.is_dir() else 'no such file'}; "
                         f"give a profile CSV (`hybrid-ray profile` writes one)")
    try:
        points = load_profile(args.profile, args.model, args.hardware, args.tensor_parallel)
        model, rep = fit_cost_model(points)
    except HybridRayError:
        raise
    except (OSError, UnicodeDecodeError) as e:
        raise WorkloadError(f"{args.profile}: cannot read: {getattr(e, 'strerror', None) or one_line(e)}") from None
    except (KeyError, ValueError, TypeError, IndexError, ZeroDivisionError) as e:
        raise WorkloadError(f"{args.profile}: not a usable profile CSV ({type(e).__name__}: {one_line(e)}); "
                            f"expected our profile columns or SplitwiseSim's perf_model.csv") from None
    if args.scale != 1.0:
        model = model.scaled(args.scale)
    print(f"fitted {rep.n_prefill} prefill and {rep.n_decode} decode points of {args.profile}")
    print(rep.lines())
    if args.scale != 1.0:
        print(f"  coefficients multiplied by {args.scale}")
    print(cost_model_yaml(model, indent=4), end="")
    return 0


def cmd_make_model(args: argparse.Namespace) -> int:
    """`hybrid-ray make-model DIR`: a tiny LLaMA model directory built offline (engines/tiny_model.py)."""
    from .engines.tiny_model import build_tiny_model

    print(f"wrote {build_tiny_model(args.dir, seed=args.seed)}")
    return 0


def cmd_make_workload(args: argparse.Namespace) -> int:
    """`hybrid-ray make-workload mixed-tasks|doc-qa|few-shot -o FILE`: a generated workload (mixed_tasks.py,
    prefix_workloads.py)."""
    try:
        if args.name == "mixed-tasks":
            from .mixed_tasks import write_jsonl
            path = write_jsonl(args.output, args.n, args.seed, fmt=args.format)
        else:
            if args.format != "workload":
                raise UsageError(f"--format {args.format}: {args.name} carries token counts and hash_ids, no text; "
                                 f"only --format workload")
            from .prefix_workloads import write_jsonl as write_prefix
            path = write_prefix(args.output, args.name, args.n, args.seed)
    except OSError as e:
        raise UsageError(f"-o {args.output}: cannot write ({e.strerror or e})") from None
    print(f"wrote {path} ({args.n} requests, seed {args.seed})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .schedulers import DESCRIPTIONS
    from .profiling import add_engine_options, add_profile_command

    p = _Parser(
        prog="hybrid-ray",
        description="Hybrid offline-online scheduling of LLM inference over Ray model replicas. "
                    "With no arguments, runs `compare` (the hybrid beside the faithful baselines) on the "
                    f"embedded default ({DEFAULT_CONFIG} config, {DEFAULT_WORKLOAD}); with options but no "
                    "subcommand, `simulate`.")
    p.add_argument("--version", action="version", version=f"hybrid-ray {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("simulate", help="run a policy in the deterministic simulator (virtual time)",
                       description="Simulate a workload on a cluster topology with one policy and print "
                                   "makespan, utilizations, throughput and latency percentiles.")
    _add_inputs(s)
    s.add_argument("--policy", default="baseline", choices=list(DESCRIPTIONS),
                   help="; ".join(f"{k}: {v}" for k, v in DESCRIPTIONS.items()) + " (default: baseline)")
    _add_policy_options(s)
    _add_deterministic_time(s)
    s.add_argument("--cost-noise", type=_NONNEGATIVE, default=0.0, metavar="SIGMA",
                   help="model error: each replica's iterations take the cost model's time x a fixed per-replica "
                        "lognormal bias (sigma SIGMA, median 1) x a per-iteration lognormal factor with mean 1, "
                        "seeded by --seed; the planner and every policy still see the nominal model (default: 0, "
                        "the exact model)")
    s.add_argument("-o", "--output", metavar="JSONL", default=None, help="write one line per request after the "
                   "simulation, in completion order (OpenAI batch output lines for an OpenAI batch input)")
    s.add_argument("--plot", metavar="DIR", default=None,
                   help="write gantt.png, occupancy.png and finish_times.png to DIR (this run beside the "
                        "baseline; needs the [plot] extra)")
    s.set_defaults(func=cmd_simulate)

    c = sub.add_parser("compare", help="the main job: the hybrid beside every faithful baseline (simulated)",
                       description="Simulate the hybrid and the faithful baselines (" + ", ".join(COMPARE_BASELINES)
                                   + ") on the same inputs and print them side by side with the lower bound, "
                                     "each gap and the plan's wall time. `hybrid-ray` with no arguments runs it "
                                     "on the embedded default.")
    _add_inputs(c)
    _add_policy_options(c)
    _add_deterministic_time(c)
    c.set_defaults(func=cmd_compare)

    pl = sub.add_parser("plan", help="offline plan: CP-SAT makespan bin packing + lower bound",
                        description="Assign every request to a replica minimising the makespan (OR-Tools "
                                    "CP-SAT, warm-started by LPT; LPT / multifit / Karmarkar-Karp as "
                                    "fallbacks) and report the planned makespan, the lower bound and the gap.")
    _add_inputs(pl)
    pl.add_argument("--method", default="cpsat", choices=["cpsat", "lpt", "multifit", "kk"],
                    help="packing method (default: cpsat, which returns the best of itself and the heuristics)")
    pl.add_argument("--time-limit", type=_SECONDS, default=None,
                    help="wall-clock seconds for the whole plan (default: a deterministic budget scaled to the "
                         "batch, 2%% of its makespan at the simulator's nominal speed)")
    _add_deterministic_time(pl)
    pl.add_argument("--workers", type=_POSITIVE_INT, default=2, help="CP-SAT search workers (default: 2)")
    pl.set_defaults(func=cmd_plan)

    r = sub.add_parser("run", help="run a policy on Ray actors in real time (emulated engine, or --engine transformers|vllm)",
                       description="Run a workload on Ray: one actor per replica (the same replica state "
                                   "machine and policy objects as `simulate`, with an engine that sleeps the "
                                   "modelled iteration time x time_scale), a controller actor and a planner "
                                   "actor. Prints the same metrics as `simulate` plus wall time, failures and "
                                   "message counts. On a cluster: `ray job submit --address http://HEAD:8265 "
                                   "-- hybrid-ray run --address auto ...` (docs/runtime.md).")
    _add_inputs(r)
    r.add_argument("--policy", default="baseline", choices=list(DESCRIPTIONS), help="scheduling policy, as for "
                   "simulate (default: baseline)")
    r.add_argument("--address", default=None, help="Ray to use: omitted = start a local Ray; auto = the cluster "
                   "this node belongs to; HOST:6379 (GCS) or ray://HOST:10001 (Ray Client)")
    r.add_argument("-o", "--output", metavar="JSONL", default=None, help="append one JSON record per finished request "
                   "(flushed as they finish); with an OpenAI batch input, OpenAI batch output lines, and the file is "
                   "also the resume file")
    r.add_argument("--resume", metavar="JSONL", default=None, help="skip the requests already in this results "
                   "file and append to it (a truncated last line is tolerated)")
    r.add_argument("--time-scale", type=_POSITIVE, default=None, help="real seconds slept per modelled second "
                   "(default: the config's time_scale)")
    r.add_argument("--report-interval", type=_SECONDS, default=0.1, help="real seconds between a busy replica's "
                   "load reports to the controller, besides one per iteration that finishes requests (default: 0.1)")
    r.add_argument("--cpus-per-replica", type=_ray_cpus, default=None, help="reserve this many CPUs per replica "
                   "actor instead of the config's resources (emulate a GPU config on CPUs; fractions allowed)")
    _add_policy_options(r)
    _add_deterministic_time(r)
    r.add_argument("--plan-method", default="cpsat", choices=["cpsat", "lpt", "multifit", "kk"],
                   help="planner method for offline/hybrid, run in the planner actor (default: cpsat)")
    r.add_argument("--heartbeat-timeout", type=_SECONDS, default=10.0, help="seconds a replica may leave a poll "
                   "unanswered before it is declared failed and its requests recomputed elsewhere (default: 10)")
    r.add_argument("--connect-timeout", type=_SECONDS, default=15.0, help="seconds to reach the Ray cluster given by "
                   "--address before giving up (default: 15)")
    r.add_argument("--startup-timeout", type=_SECONDS, default=60.0, help="seconds for every replica actor to be "
                   "placed and to load its engine (default: 60; real models on a busy host may need more)")
    r.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    r.add_argument("--plot", metavar="DIR", default=None,
                   help="write gantt.png, occupancy.png and finish_times.png of this run to DIR ([plot] extra)")
    add_engine_options(r)
    r.set_defaults(func=cmd_run)

    b = sub.add_parser("bench", help="benchmarks that print tables (paper: the paper's table beside ours; "
                                     "cases: the 100-case study; perf: planner, decision and simulator speed; "
                                     "decision: online decision latency; load: 20,000 requests on 16 "
                                     "emulated Ray replicas; docs: regenerate every marked table in the docs)",
                       description="paper: LLaMA-65B x GSM8K, every policy beside the paper's figures (writes "
                                   "results/paper.json and .md). cases: random GSM8K subsets and long-context batches x random "
                                   "topologies, the hybrid against every faithful baseline: makespan ratio "
                                   "mean/min/max, losses and by how much (writes results/cases.json). "
                                   "decision: latency of one online decision at batch 256 with 1,000 waiting. "
                                   "docs: rewrite the tables between <!-- bench:NAME --> markers in README.md and "
                                   "docs/*.md (--check: compare only, exit 1 if any differ).")
    b.add_argument("which", choices=["paper", "cases", "perf", "decision", "load", "baselines", "simscale", "planscale", "vs-vllm", "fidelity",
                                     "docs"],
                   help="which benchmark (vs-vllm: hybrid-ray beside vLLM's scheduler, vllm run_batch and Ray Data "
                        "LLM on the same CPU replicas; needs vLLM: python -m hybrid_ray.bench.vs_vllm --help)")
    b.add_argument("--model", default=None, help="vs-vllm: model directory")
    b.add_argument("--replicas", type=_POSITIVE_INT, default=None, help="vs-vllm: engines, one core each (default 2)")
    b.add_argument("--n", type=_POSITIVE_INT, default=100, help="cases: how many (default 100)")
    b.add_argument("--seed", type=int, default=0, help="cases: seed of the random cases (default 0)")
    b.add_argument("--long", type=_number(0, strict=False, integer=True), default=None,
                   help="cases: long-context cases (2k-32k-token prompts, KV-bound replicas) besides the "
                        "--n GSM8K ones (default n // 5)")
    b.add_argument("--out", default=None, help="paper: output folder (default results/); "
                                                "cases: JSON output (default results/cases.json)")
    b.add_argument("--check", action="store_true", help="docs: compare the marked tables with what the code gives, "
                   "write nothing; exit 1 listing those that differ")
    b.add_argument("--only", nargs="+", metavar="NAME", default=None,
                   help="docs: just these tables (<!-- bench:NAME --> markers), wall-clock ones included")
    b.add_argument("--timing", action="store_true", help="docs: also the wall-clock tables (skipped by default)")
    b.add_argument("--root", default=None, help="docs: the checkout holding README.md and docs/ (default: here)")
    b.set_defaults(func=cmd_bench)

    f = sub.add_parser("fit-cost-model", help="fit a cost model from a profile CSV and print the YAML block",
                       description="Least-squares fit of prefill/decode iteration times (our profile CSV "
                                   "format or SplitwiseSim's perf_model.csv); prints the fit error and a "
                                   "cost_model block to paste into a cluster YAML.")
    f.add_argument("profile", help="profile CSV")
    f.add_argument("--model", help="filter rows by model (e.g. llama2-70b)")
    f.add_argument("--hardware", help="Splitwise: filter by hardware (e.g. h100-80gb)")
    f.add_argument("--tensor-parallel", type=_POSITIVE_INT, help="Splitwise: filter by tensor_parallel")
    f.add_argument("--scale", type=_POSITIVE, default=1.0,
                   help="multiply every coefficient (e.g. 1/(TP x efficiency) for a one-GPU-equivalent profile)")
    f.set_defaults(func=cmd_fit)
    mm = sub.add_parser("make-model", help="write a tiny LLaMA model directory (real tokenizer and chat template, "
                                           "random weights) for --engine transformers|vllm; nothing is downloaded",
                        description="Build a tiny LLaMA model directory offline: a byte-level BPE tokenizer trained "
                                    "on the bundled GSM8K text, a chat template and seeded random weights (EOS "
                                    "boosted so some greedy requests stop early). Loads with transformers and vLLM. "
                                    "An existing directory built with the same arguments is kept.")
    mm.add_argument("dir", help="directory to write (new or empty)")
    mm.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    mm.set_defaults(func=cmd_make_model)
    mw = sub.add_parser("make-workload", help="write a generated workload (mixed-tasks: five task kinds with "
                                              "prompt text and true output lengths; doc-qa, few-shot: shared "
                                              "prefixes) as a JSONL file",
                        description="Write the mixed-task workload: classification, summaries, stories, translation "
                                    "and math prompts (templates, GSM8K questions, seeded random words) with "
                                    "prompt_tokens consistent with the text and true output_tokens drawn per task "
                                    "(docs/scheduling.md section 5). --workload mixed-tasks[:N[:SEED]] is the same "
                                    "without a file; a different --seed makes a disjoint history.")
    mw.add_argument("name", choices=["mixed-tasks", "doc-qa", "few-shot"],
                    help="which generator (doc-qa, few-shot: shared prefixes as hash_ids, docs/scheduling.md section 8)")
    mw.add_argument("--n", type=_POSITIVE_INT, default=3000, help="requests (default 3000)")
    mw.add_argument("--seed", type=int, default=0, help="generator seed (default 0; the docs' history uses 1)")
    mw.add_argument("--format", choices=["workload", "batch"], default="workload",
                    help="workload: prompt/messages, prompt_tokens, output_tokens, max_tokens, model per line "
                         "(--workload FILE, --history FILE); batch: OpenAI batch input lines with the true length "
                         "as body.output_tokens (-i FILE) (default: workload)")
    mw.add_argument("-o", "--output", required=True, metavar="JSONL", help="file to write")
    mw.set_defaults(func=cmd_make_workload)
    add_profile_command(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"-h", "--help", "--version"}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            commands.update(action.choices)
    if not argv:
        argv = ["compare"]                  # the main job: the hybrid beside the faithful baselines
    elif argv[0] not in commands:
        argv = ["simulate"] + argv          # `hybrid-ray [simulate options]`
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:            # --help, --version, or a one-line option error (_Parser.error)
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    try:
        _preflight(args)
        return args.func(args)
    except HybridRayError as e:
        print(f"hybrid-ray: error: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
