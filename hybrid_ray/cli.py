"""`hybrid-ray` command line: simulate | fit-cost-model (more subcommands join as they land).

User errors (bad YAML, bad workload, impossible request) print one clear line and exit 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

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
    p.add_argument("--limit", type=int, default=None, help="use only N requests (first N, or a seeded sample with --seed)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling with --limit (runs are deterministic)")
    p.add_argument("--json", metavar="OUT", default=None, help="also write the metrics as JSON to OUT")


def _write_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        print(f"wrote {path}")


def cmd_simulate(args: argparse.Namespace) -> int:
    from .metrics import format_summary, summarize
    from .planner.bounds import lower_bound
    from .policies import build_scheduler
    from .simulator import simulate

    cluster, requests = load_inputs(args.config, args.workload, args.limit, args.seed)
    print(f"simulating {len(requests)} requests of {args.workload} on {cluster.name} "
          f"({cluster.num_replicas} replicas), policy {args.policy}", flush=True)
    t0 = time.perf_counter()
    scheduler = build_scheduler(args.policy, cluster, requests)
    record = simulate(cluster, scheduler, requests)
    summary = summarize(record, lower_bound(cluster, requests).value_s)
    wall = time.perf_counter() - t0
    print(format_summary(summary))
    print(f"  {'simulated in'.ljust(32)}  {wall:.2f} s wall")
    data = summary.to_dict()
    data.update(config=cluster.source, workload=args.workload, wall_s=wall)
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
            ("gap", f"{100 * plan.gap:.2f} %"),
            ("packing bound / status", f"{plan.pack_bound_s:.2f} s / {plan.solver_status} ({plan.method})"),
            ("solve time", f"{plan.solve_time_s:.2f} s"),
            ("replica finish min / max", f"{fin[0]:.2f} / {fin[-1]:.2f} s" if fin else "-")]
    w = max(len(k) for k, _ in rows)
    print("\n".join(f"  {k.ljust(w)}  {v}" for k, v in rows))
    data = plan.to_dict()
    data.update(config=cluster.source, workload=args.workload)
    _write_json(args.json, data)
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from .profiles import cost_model_yaml, fit_cost_model, load_profile

    points = load_profile(args.profile, args.model, args.hardware, args.tensor_parallel)
    model, rep = fit_cost_model(points)
    if args.scale != 1.0:
        model = model.scaled(args.scale)
    print(f"fitted {rep.n_prefill} prefill and {rep.n_decode} decode points of {args.profile}")
    print(f"  prefill relative error: max {100 * rep.prefill_max_rel_err:.1f} %, mean {100 * rep.prefill_mean_rel_err:.1f} %")
    print(f"  decode relative error:  max {100 * rep.decode_max_rel_err:.1f} %, mean {100 * rep.decode_mean_rel_err:.1f} %")
    if args.scale != 1.0:
        print(f"  coefficients multiplied by {args.scale}")
    print(cost_model_yaml(model, indent=4), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .policies import DESCRIPTIONS

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
