"""`hybrid-ray bench baselines`: the hybrid against every faithful baseline on every bundled GPU config.

Configs paper_llama65b, local, hetero and h100_llama7b; workloads GSM8K and the Azure conversation
trace in batch mode (every arrival moved to t = 0: a batch job of the trace's request mix, the
setting the planner is for). Per row: the makespan (simulated seconds) of each faithful baseline
(``cases.BASELINES``: the paper's v0 ``baseline``, then what operators run) and of the hybrid, the
best baseline and the hybrid's ratio to it (< 1: the hybrid is faster), the any-policy lower bound
(``planner/bounds.py``) and the hybrid's gap to it. This is the table in docs/scheduling.md
section 7 (``hybrid-ray bench docs --only baselines`` rewrites it there).

A request longer than every replica's KV cache can never run; in batch mode such requests are
dropped from the Azure trace (148 of 19,366 on paper_llama65b, whose KV holds 4,400 tokens), and
the ``requests`` column says how many ran.

Each (config, workload) gets two rows, one per condition (``CONDITIONS``):

* ``online + noise 0.05``, the headline: output lengths learned during the run (``--lengths
  online``, every policy the same predictor) and engines whose iteration times stray from the cost
  model the planner and policies use (``--cost-noise 0.05``: a fixed per-replica lognormal bias and
  a per-iteration lognormal jitter, ``simulator.CostNoise``, seed ``NOISE_SEED``). The bound stays
  the nominal model's.
* ``oracle``: the paper's setting, lengths known in advance and the exact cost model.
"""
from __future__ import annotations

from dataclasses import replace

from ..config import ClusterSpec, load_cluster
from ..inputs import load_inputs
from ..jsonout import write_json
from ..metrics import summarize
from ..planner.budget import DEFAULT_PLAN_OPTS
from ..planner.bounds import lower_bound
from ..planning import build_scheduler
from ..simulator import CostNoise, simulate
from ..workload import Request, load_workload
from .cases import BASELINES

CONFIGS = ("paper_llama65b", "local", "hetero", "h100_llama7b")
AZURE_BATCH = "azure-conv-batch"
WORKLOADS = ("gsm8k", AZURE_BATCH)
POLICIES = BASELINES + ("hybrid",)
# the planner's default budget (simulate's 5 s -> 2 units) with no wall-clock limit: the same plan on a
# loaded host as on a quiet one, and the same as `simulate` where the wall limit does not bind
PLAN_OPTS = DEFAULT_PLAN_OPTS          # `simulate`'s default plan budget (planner.budget)
# (key, label, lengths, cost noise sigma): the headline condition first, then the paper's
CONDITIONS = (("headline", "online + noise 0.05", "online", 0.05),
              ("oracle", "oracle", "oracle", 0.0))
NOISE_SEED = 0          # `hybrid-ray simulate ... --seed 0`: the cost noise's and the serve routers' seed


def batch_mode(requests: list[Request], cluster: ClusterSpec) -> list[Request]:
    """``requests`` with every arrival at t = 0, less those no replica's KV cache can hold."""
    kv = max(g.kv_capacity_tokens for g in cluster.groups)
    return [replace(q, arrival_s=0.0) for q in requests if q.prompt_tokens + q.output_tokens <= kv]


def load_case(config: str, workload: str) -> tuple[ClusterSpec, list[Request]]:
    """Cluster and requests of one row: a workload name, or ``azure-conv-batch`` (batch mode)."""
    if workload == AZURE_BATCH:
        cluster = load_cluster(config)
        return cluster, batch_mode(load_workload("azure-conv"), cluster)
    return load_inputs(config, workload)


def _condition(condition: str) -> tuple[str, str, str, float]:
    for c in CONDITIONS:
        if c[0] == condition:
            return c
    raise ValueError(f"unknown condition {condition!r}; choose from {', '.join(c[0] for c in CONDITIONS)}")


def one_row(config: str, workload: str, policies=POLICIES, plan_opts: dict | None = None,
            condition: str = "oracle") -> dict:
    """One row: ``hybrid-ray simulate --config C --workload W --policy P`` for every policy, under
    ``condition`` (``CONDITIONS``: the headline adds ``--lengths online --cost-noise 0.05 --seed 0``)."""
    key, label, lengths, sigma = _condition(condition)
    cl, reqs = load_case(config, workload)
    row: dict = {"config": config, "workload": workload, "condition": key, "condition_label": label,
                 "lengths": lengths, "cost_noise": sigma, "requests": len(reqs), "bound": lower_bound(cl, reqs).value_s}
    opts = PLAN_OPTS if plan_opts is None else plan_opts
    noise = CostNoise(sigma, NOISE_SEED) if sigma else None
    for p in policies:
        sch = build_scheduler(p, cl, reqs, lengths=lengths, seed=NOISE_SEED, **opts)
        row[p] = summarize(simulate(cl, sch, reqs, noise=noise)).makespan_s
    base = [p for p in policies if p != "hybrid"]
    if base:
        row["best_baseline"] = min(base, key=lambda p: row[p])
        row["hybrid_vs_best_baseline"] = row["hybrid"] / row[row["best_baseline"]]
    row["hybrid_gap"] = row["hybrid"] / row["bound"] - 1
    return row


MIXED_N, MIXED_SEED = 3000, 0          # `--workload mixed-tasks:3000:0`
MIXED_HISTORY, MIXED_HISTORY_SEED = 600, 1   # `make-workload mixed-tasks --n 600 --seed 1` as --history
MIXED_NOISE_SEED = 1


def mixed_row(config: str, policies=POLICIES, plan_opts: dict | None = None) -> dict:
    """The mixed-task batch (``mixed_tasks``) on ``config``: ``hybrid-ray simulate --workload
    mixed-tasks --lengths learned --history pilot.jsonl --cost-noise 0.05 --seed 1`` per policy, the
    pilot being 600 requests of another seed; every policy gets the same fitted predictor.
    Also the hybrid with the oracle (what knowing the lengths is worth) and the bound."""
    from ..history import HistoryRow
    from ..config import load_cluster
    from ..metrics import spearman
    from ..workload import mixed_task_requests

    cl = load_cluster(config)
    reqs = mixed_task_requests(MIXED_N, MIXED_SEED)
    hist = [HistoryRow(q.prompt_tokens, q.output_tokens, q) for q in mixed_task_requests(MIXED_HISTORY, MIXED_HISTORY_SEED)]
    opts = PLAN_OPTS if plan_opts is None else plan_opts
    noise = CostNoise(0.05, MIXED_NOISE_SEED)
    row: dict = {"config": config, "requests": len(reqs), "bound": lower_bound(cl, reqs).value_s}
    for p in policies:
        sch = build_scheduler(p, cl, reqs, lengths="learned", history=hist, seed=MIXED_NOISE_SEED, **opts)
        s = summarize(simulate(cl, sch, reqs, noise=noise))
        row[p] = s.makespan_s
        if p == "hybrid":
            row["spearman_start"] = s.prediction_spearman_start
            row["mae_start"] = s.prediction_mae_start
            row["hybrid_plan"] = sch.info["plan"].info.get("chosen")
    sch = build_scheduler("hybrid", cl, reqs, lengths="oracle", seed=MIXED_NOISE_SEED, **opts)
    row["hybrid_oracle"] = summarize(simulate(cl, sch, reqs, noise=noise)).makespan_s
    base = [p for p in policies if p != "hybrid"]
    row["best_baseline"] = min(base, key=lambda p: row[p])
    row["hybrid_vs_best_baseline"] = row["hybrid"] / row[row["best_baseline"]]
    return row


def mixed_table(data: list[dict], policies=POLICIES) -> str:
    base = [p for p in policies if p != "hybrid"]
    lines = ["| config | " + " | ".join("baseline (v0)" if p == "baseline" else p for p in base)
             + " | best baseline | hybrid (plan kept) | hybrid / best | hybrid, oracle lengths | bound | "
             "rank corr. at start |", "|---|" + "---:|" * (len(base) + 6)]
    for r in data:
        lines.append(f"| {r['config']} | " + " | ".join(f"{r[p]:.2f}" for p in base)
                     + f" | {r['best_baseline']} | {r['hybrid']:.2f} ({r['hybrid_plan']}) | "
                     f"{r['hybrid_vs_best_baseline']:.3f} | {r['hybrid_oracle']:.2f} | {r['bound']:.2f} | "
                     f"{r['spearman_start']:.3f} |")
    return "\n".join(lines)


# prefix workloads (prefix_workloads.py): where their prompts fit the KV caches (paper_llama65b's 4,400
# tokens hold no document); `serve-prefix` as Ray ships it and with the threshold Ray's docs example sets
PREFIX_CONFIGS = ("local", "hetero", "h100_llama7b")
PREFIX_WORKLOADS = ("doc-qa", "few-shot")
SERVE_PREFIX_TUNED = "serve-prefix/20"
PREFIX_POLICIES = ("vllm", "serve", "serve-llm", "serve-prefix", SERVE_PREFIX_TUNED, "raydata", "lpt-engine",
                   "hybrid")


def _policy_cluster(cluster: ClusterSpec, policy: str) -> tuple[ClusterSpec, str]:
    """``serve-prefix/20``: serve-prefix with ``policy: {serve-prefix: {imbalanced_threshold: 20}}``."""
    if policy == SERVE_PREFIX_TUNED:
        return replace(cluster, policy={**cluster.policy, "serve-prefix": {"imbalanced_threshold": 20}}), "serve-prefix"
    return cluster, policy


def prefix_row(config: str, workload: str, condition: str = "headline", policies=PREFIX_POLICIES,
               plan_opts: dict | None = None) -> dict:
    """One prefix-workload row: makespan and prefix hit rate per policy, vLLM-style engines caching
    prefixes (the groups' default), the prefix-aware bound and the hybrid's ratio to the best baseline."""
    key, label, lengths, sigma = _condition(condition)
    cl, reqs = load_inputs(config, workload)
    row: dict = {"config": config, "workload": workload, "condition": key, "condition_label": label,
                 "requests": len(reqs), "bound": lower_bound(cl, reqs).value_s}
    opts = PLAN_OPTS if plan_opts is None else plan_opts
    noise = CostNoise(sigma, NOISE_SEED) if sigma else None
    for p in policies:
        c, name = _policy_cluster(cl, p)
        sch = build_scheduler(name, c, reqs, lengths=lengths, seed=NOISE_SEED, **opts)
        s = summarize(simulate(c, sch, reqs, noise=noise))
        row[p] = s.makespan_s
        row[f"{p} hit rate"] = s.prefix_hit_rate
        if p == "hybrid":
            row["hybrid_plan"] = sch.info["plan"].method
    base = [p for p in policies if p != "hybrid"]
    row["best_baseline"] = min(base, key=lambda p: row[p])
    row["hybrid_vs_best_baseline"] = row["hybrid"] / row[row["best_baseline"]]
    row["vllm_over_hybrid"] = row["vllm"] / row["hybrid"]
    row["hybrid_gap"] = row["hybrid"] / row["bound"] - 1
    return row


def prefix_rows(configs=PREFIX_CONFIGS, workloads=PREFIX_WORKLOADS, progress=None,
                conditions=tuple(c[0] for c in CONDITIONS)) -> list[dict]:
    out = []
    for wl in workloads:
        for cfg in configs:
            for cond in conditions:
                out.append(prefix_row(cfg, wl, cond))
            if progress:
                progress(f"  {wl} x {cfg} done")
    return out


def prefix_table(data: list[dict], policies=PREFIX_POLICIES) -> str:
    base = [p for p in policies if p != "hybrid"]
    lines = ["| config | workload | condition | " + " | ".join(base)
             + " | hybrid | best baseline / hybrid | vllm / hybrid | bound | hybrid's gap |",
             "|---|---|---|" + "---:|" * (len(base) + 5)]
    for r in data:
        cells = [f"{r[p]:.2f} ({100 * r[p + ' hit rate']:.0f} %)" for p in base]
        lines.append(f"| {r['config']} | {r['workload']} | {r['condition_label']} | " + " | ".join(cells)
                     + f" | {r['hybrid']:.2f} ({100 * r['hybrid hit rate']:.0f} %, {r['hybrid_plan']}) | "
                     f"{1 / r['hybrid_vs_best_baseline']:.2f} x ({r['best_baseline']}) | {r['vllm_over_hybrid']:.2f} x | "
                     f"{r['bound']:.2f} | {100 * r['hybrid_gap']:.0f} % |")
    return "\n".join(lines)


def rows(configs=CONFIGS, workloads=WORKLOADS, policies=POLICIES, plan_opts: dict | None = None,
         progress=None, conditions=tuple(c[0] for c in CONDITIONS)) -> list[dict]:
    out = []
    for wl in workloads:
        for cfg in configs:
            for cond in conditions:
                out.append(one_row(cfg, wl, policies, plan_opts, cond))
            if progress:
                progress(f"  {wl} x {cfg} done")
    return out


def table(data: list[dict], policies=POLICIES) -> str:
    base = [p for p in policies if p != "hybrid"]
    head = ("| config | workload | condition | requests | "
            + " | ".join("baseline (v0)" if p == "baseline" else p for p in base)
            + " | best baseline | hybrid | hybrid / best | bound | hybrid's gap |")
    lines = [head, "|---|---|---|" + "---:|" * (len(base) + 6)]
    for r in data:
        best = r["best_baseline"]
        lines.append(f"| {r['config']} | {r['workload']} | {r.get('condition_label', 'oracle')} | {r['requests']:,} | "
                     + " | ".join(f"{r[p]:.2f}" for p in base)
                     + f" | {best} | {r['hybrid']:.2f} | {r['hybrid_vs_best_baseline']:.3f} | {r['bound']:.2f} | "
                     f"{100 * r['hybrid_gap']:.1f} % |")
    return "\n".join(lines)


def main(out: str | None = None) -> list[dict]:
    from ..progress import PhaseLine

    line = PhaseLine("bench baselines", quiet_s=0.0)
    data = rows(progress=lambda text: line(text.strip()))
    prefix = prefix_rows(progress=lambda text: line(text.strip()))
    line.close()
    print(table(data))
    print()
    print("Prefix workloads (makespan s, prefix hit rate):")
    print(prefix_table(prefix))
    if out:
        write_json(out, data + prefix)
    return data + prefix


if __name__ == "__main__":
    main()
