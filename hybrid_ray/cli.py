"""`hybrid-ray` command line: simulate | plan | run | bench | fit-cost-model | profile | make-model.

User errors (bad YAML, bad workload, impossible request) print one clear line and exit 2.
"""
from __future__ import annotations

import argparse
import sys
import time

from . import __version__
from .errors import HybridRayError
from .inputs import DEFAULT_CONFIG, DEFAULT_WORKLOAD, load_inputs

WORKLOAD_HELP = ("gsm8k (1,319 GSM8K questions, all at t=0), azure-conv / azure-code (Azure 2023 "
                 "traces with real arrival times), or a .jsonl/.csv file with prompt_tokens, "
                 "output_tokens[, id, arrival_s]")


def _add_inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help=f"cluster YAML path, or a bundled name (default: {DEFAULT_CONFIG})")
    p.add_argument("--workload", default=DEFAULT_WORKLOAD, help=f"{WORKLOAD_HELP} (default: {DEFAULT_WORKLOAD})")
    from .openai_batch import BatchPath
    p.add_argument("-i", "--input", dest="workload", type=BatchPath, default=argparse.SUPPRESS, metavar="JSONL",
                   help="an OpenAI batch input file (/v1/completions, /v1/chat/completions lines) as the workload; "
                        "malformed lines get error lines, the rest runs (docs/openai_batch.md)")
    p.add_argument("--limit", type=int, default=None, help="use only N requests (first N, or a seeded sample with --seed)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling with --limit (runs are deterministic)")
    p.add_argument("--json", metavar="OUT", default=None, help="also write the metrics as JSON to OUT")


def _add_policy_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lengths", default="oracle", choices=["oracle", "quantile", "online"],
                   help="output lengths the policies may use: oracle = known in advance (the paper's setting); "
                        "quantile = predicted from a seeded 10%% history sample (or --history); online = learned "
                        "from this run's completions by prompt-length bucket and model, queued work re-predicted "
                        "as they move (default: oracle)")
    p.add_argument("--history", metavar="FILE", default=None,
                   help="an earlier run's output (results JSONL or OpenAI batch output) whose prompt/output "
                        "token counts start --lengths online (and replace quantile's sample)")
    p.add_argument("--time-limit", type=float, default=5.0,
                   help="CP-SAT time limit in seconds for planned policies (default: 5)")


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
    from .policies import build_scheduler
    from .simulator import simulate

    cluster, requests = load_inputs(args.config, args.workload, args.limit, args.seed)
    print(f"simulating {len(requests)} requests of {args.workload} on {cluster.name} "
          f"({cluster.num_replicas} replicas), policy {args.policy}", flush=True)
    t0 = time.perf_counter()
    history = None
    if args.history:
        from .history import load_history
        history = load_history(args.history)
    scheduler = build_scheduler(args.policy, cluster, requests, lengths=args.lengths, seed=args.seed or 0,
                                history=history, time_limit_s=args.time_limit)
    record = simulate(cluster, scheduler, requests)
    summary = summarize(record, lower_bound(cluster, requests).value_s)
    wall = time.perf_counter() - t0
    print(format_summary(summary))
    print(f"  {'simulated in'.ljust(32)}  {wall:.2f} s wall")
    if args.output:                         # per-request lines; OpenAI batch output for a batch input
        from .openai_batch import write_simulated_output
        print(f"wrote {write_simulated_output(args.workload, args.output, cluster, record, args.limit, args.seed)}")
    if args.plot:
        runs = [(args.policy, record, summary)]
        if args.policy != "baseline":      # the reference a reader compares against
            base = simulate(cluster, build_scheduler("baseline", cluster, requests), requests)
            runs.insert(0, ("baseline", base, summarize(base, summary.lower_bound_s)))
        _plot(args.plot, runs, summary.lower_bound_s)
    data = summary.to_dict()
    data.update(config=cluster.source, workload=args.workload, wall_s=wall, lengths=args.lengths)
    _write_json(args.json, data)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .planner.plan import make_plan

    cluster, requests = load_inputs(args.config, args.workload, args.limit, args.seed)
    print(f"planning {len(requests)} requests of {args.workload} on {cluster.name} "
          f"({cluster.num_replicas} replicas) with {args.method}, time limit {args.time_limit} s, "
          f"{args.workers} workers", flush=True)
    plan = make_plan(cluster, requests, method=args.method, time_limit_s=args.time_limit, workers=args.workers,
                     seed=args.seed or 0)
    fin = sorted(plan.predicted_finish_s.values())
    rows = [("planned makespan", f"{plan.planned_makespan_s:.2f} s"),
            ("lower bound (any policy)", f"{plan.lower_bound_s:.2f} s"),
            ("gap to the lower bound", f"{100 * plan.gap:.2f} % (the bound ignores prefill stalls; "
                                       f"the estimate does not)"),
            ("packing bound / gap / status", f"{plan.pack_bound_s:.2f} s / {100 * plan.pack_gap:.4f} % / "
                                             f"{plan.solver_status} ({plan.method})"),
            ("solve time", f"{plan.solve_time_s:.2f} s"),
            ("replica finish min / max", f"{fin[0]:.2f} / {fin[-1]:.2f} s" if fin else "-")]
    w = max(len(k) for k, _ in rows)
    print("\n".join(f"  {k.ljust(w)}  {v}" for k, v in rows))
    data = plan.to_dict()
    data.update(config=cluster.source, workload=args.workload)
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
                      plan_time_limit_s=args.time_limit, heartbeat_timeout_s=args.heartbeat_timeout,
                      startup_timeout_s=args.startup_timeout, connect_timeout_s=args.connect_timeout,
                      progress=not args.no_progress)
    opts.engine, opts.model, opts.device = args.engine, args.model, args.device
    opts.history = args.history
    print(f"running {args.workload} on {args.config} with policy {args.policy} on Ray "
          f"({describe_address(args.address)})", flush=True)
    try:
        res = run(opts)
    except KeyboardInterrupt:
        where = args.resume or args.output
        print("hybrid-ray: interrupted" + (f"; finished requests are in {where}: continue with --resume {where}"
                                            if where else ""), file=sys.stderr)
        return 130
    if res.summary is None:
        print(f"nothing to run: all {res.skipped} requests are already in {res.output}")
        return 0
    print(format_summary(res.summary))
    rows = [("engine", res.engine),
            ("wall time", f"{res.wall_s:.2f} s (run {res.run_wall_s:.2f} s at time_scale {res.time_scale:g})"),
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
    if args.which == "paper":
        from .bench.paper import run_paper
        run_paper(out_dir=args.out or "results")
    elif args.which == "cases":
        from .bench.cases import run_cases
        run_cases(args.n, args.seed or 0, args.out or "results/cases.json")
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

    points = load_profile(args.profile, args.model, args.hardware, args.tensor_parallel)
    model, rep = fit_cost_model(points)
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


def build_parser() -> argparse.ArgumentParser:
    from .policies import DESCRIPTIONS
    from .profiling import add_engine_options, add_profile_command

    p = argparse.ArgumentParser(
        prog="hybrid-ray",
        description="Hybrid offline-online scheduling of LLM inference over Ray model replicas. "
                    "With no subcommand, runs `simulate` on the embedded default "
                    f"({DEFAULT_CONFIG} config, {DEFAULT_WORKLOAD}).")
    p.add_argument("--version", action="version", version=f"hybrid-ray {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("simulate", help="run a policy in the deterministic simulator (virtual time)",
                       description="Simulate a workload on a cluster topology with one policy and print "
                                   "makespan, utilizations, throughput and latency percentiles.")
    _add_inputs(s)
    s.add_argument("--policy", default="baseline", choices=list(DESCRIPTIONS),
                   help="; ".join(f"{k}: {v}" for k, v in DESCRIPTIONS.items()) + " (default: baseline)")
    _add_policy_options(s)
    s.add_argument("-o", "--output", metavar="JSONL", default=None, help="write one line per request after the "
                   "simulation, in completion order (OpenAI batch output lines for an OpenAI batch input)")
    s.add_argument("--plot", metavar="DIR", default=None,
                   help="write gantt.png, occupancy.png and finish_times.png to DIR (this run beside the "
                        "baseline; needs the [plot] extra)")
    s.set_defaults(func=cmd_simulate)

    pl = sub.add_parser("plan", help="offline plan: CP-SAT makespan bin packing + lower bound",
                        description="Assign every request to a replica minimising the makespan (OR-Tools "
                                    "CP-SAT, warm-started by LPT; LPT / multifit / Karmarkar-Karp as "
                                    "fallbacks) and report the planned makespan, the lower bound and the gap.")
    _add_inputs(pl)
    pl.add_argument("--method", default="cpsat", choices=["cpsat", "lpt", "multifit", "kk"],
                    help="packing method (default: cpsat, which returns the best of itself and the heuristics)")
    pl.add_argument("--time-limit", type=float, default=5.0, help="CP-SAT time limit in seconds (default: 5)")
    pl.add_argument("--workers", type=int, default=2, help="CP-SAT search workers (default: 2)")
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
    r.add_argument("--time-scale", type=float, default=None, help="real seconds slept per modelled second "
                   "(default: the config's time_scale)")
    r.add_argument("--report-interval", type=float, default=0.1, help="real seconds between a busy replica's "
                   "load reports to the controller, besides one per iteration that finishes requests (default: 0.1)")
    r.add_argument("--cpus-per-replica", type=float, default=None, help="reserve this many CPUs per replica "
                   "actor instead of the config's resources (emulate a GPU config on CPUs; fractions allowed)")
    _add_policy_options(r)
    r.add_argument("--plan-method", default="cpsat", choices=["cpsat", "lpt", "multifit", "kk"],
                   help="planner method for offline/hybrid, run in the planner actor (default: cpsat)")
    r.add_argument("--heartbeat-timeout", type=float, default=10.0, help="seconds a replica may leave a poll "
                   "unanswered before it is declared failed and its requests recomputed elsewhere (default: 10)")
    r.add_argument("--connect-timeout", type=float, default=15.0, help="seconds to reach the Ray cluster given by "
                   "--address before giving up (default: 15)")
    r.add_argument("--startup-timeout", type=float, default=60.0, help="seconds for every replica actor to be "
                   "placed and to load its engine (default: 60; real models on a busy host may need more)")
    r.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    r.add_argument("--plot", metavar="DIR", default=None,
                   help="write gantt.png, occupancy.png and finish_times.png of this run to DIR ([plot] extra)")
    add_engine_options(r)
    r.set_defaults(func=cmd_run)

    b = sub.add_parser("bench", help="benchmarks that print tables (paper: the paper's table beside ours; "
                                     "cases: the 100-case study; perf: planner, decision and simulator speed; "
                                     "decision: online decision latency; load: 20,000 requests on 16 "
                                     "emulated Ray replicas)",
                       description="paper: LLaMA-65B x GSM8K, every policy beside the paper's figures (writes "
                                   "results/paper.json and .md). cases: random GSM8K subsets x random topologies, baseline vs offline vs "
                                   "hybrid, mean/min/max improvement and a histogram (writes results/cases.json). "
                                   "decision: latency of one online decision at batch 256 with 1,000 waiting.")
    b.add_argument("which", choices=["paper", "cases", "perf", "decision", "load", "baselines", "simscale", "vs-vllm", "fidelity"],
                   help="which benchmark (vs-vllm: hybrid-ray beside vLLM's scheduler, vllm run_batch and Ray Data "
                        "LLM on the same CPU replicas; needs vLLM: python -m hybrid_ray.bench.vs_vllm --help)")
    b.add_argument("--model", default=None, help="vs-vllm: model directory")
    b.add_argument("--replicas", type=int, default=None, help="vs-vllm: engines, one core each (default 2)")
    b.add_argument("--n", type=int, default=100, help="cases: how many (default 100)")
    b.add_argument("--seed", type=int, default=0, help="cases: seed of the random cases (default 0)")
    b.add_argument("--out", default=None, help="paper: output folder (default results/); "
                                                "cases: JSON output (default results/cases.json)")
    b.set_defaults(func=cmd_bench)

    f = sub.add_parser("fit-cost-model", help="fit a cost model from a profile CSV and print the YAML block",
                       description="Least-squares fit of prefill/decode iteration times (our profile CSV "
                                   "format or SplitwiseSim's perf_model.csv); prints the fit error and a "
                                   "cost_model block to paste into a cluster YAML.")
    f.add_argument("profile", help="profile CSV")
    f.add_argument("--model", help="filter rows by model (e.g. llama2-70b)")
    f.add_argument("--hardware", help="Splitwise: filter by hardware (e.g. h100-80gb)")
    f.add_argument("--tensor-parallel", type=int, help="Splitwise: filter by tensor_parallel")
    f.add_argument("--scale", type=float, default=1.0,
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
    add_profile_command(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"-h", "--help", "--version"}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            commands.update(action.choices)
    if not argv or argv[0] not in commands:
        argv = ["simulate"] + argv          # the embedded default: `hybrid-ray [simulate options]`
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except HybridRayError as e:
        print(f"hybrid-ray: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
