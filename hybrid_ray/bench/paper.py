"""`hybrid-ray bench paper`: the paper's table (LLaMA-65B x GSM8K) beside ours.

Rows: every policy we compare (the paper's three plus what operators run today) and the lower
bound; columns: total inference time, busy utilization, gap to the bound, relative improvement
over the baseline, and the paper's published figures with their improvements. Each row runs
exactly what `hybrid-ray simulate --config paper_llama65b --policy P` runs (same defaults), so
the numbers are identical.
"""
from __future__ import annotations

import time
from pathlib import Path

from ..inputs import load_inputs
from ..jsonout import write_json
from ..metrics import summarize
from ..planner.bounds import lower_bound
from ..planner.budget import DEFAULT_PLAN_OPTS
from ..planning import build_scheduler
from ..simulator import simulate

# Pang et al., arXiv 2502.15763, abstract: total time (s) and utilization (%)
PAPER = {"baseline": (201.00, 80.2), "offline": (197.08, 85.5), "hybrid": (190.58, 89.1), "lower bound": (180.0, None)}
POLICIES = ("baseline", "chunked", "raydata", "lpt-engine", "offline", "hybrid")


def run_paper(config: str = "paper_llama65b", workload: str = "gsm8k", out_dir: str | None = "results",
              policies: tuple[str, ...] = POLICIES, progress=print, plan_opts: dict | None = None) -> dict:
    """``plan_opts``: planner options for build_scheduler (default: `simulate`'s, ``DEFAULT_PLAN_OPTS``)."""
    plan_opts = DEFAULT_PLAN_OPTS if plan_opts is None else plan_opts
    t0 = time.perf_counter()
    cluster, requests = load_inputs(config, workload)
    lb = lower_bound(cluster, requests).value_s
    rows = {}
    for p in policies:
        s = summarize(simulate(cluster, build_scheduler(p, cluster, requests, **(plan_opts or {})), requests), lb)
        rows[p] = {"makespan_s": s.makespan_s, "utilization_busy": s.utilization_busy,
                   "utilization_slots": s.utilization_slots, "gap": s.gap, "ttft_p99_s": s.ttft_p99_s}
    base = rows["baseline"]["makespan_s"]
    for p, r in rows.items():
        r["improvement_vs_baseline"] = 1 - r["makespan_s"] / base
        if p in PAPER:
            pt, pu = PAPER[p]
            r["paper_makespan_s"], r["paper_utilization"] = pt, pu / 100
            r["paper_improvement_vs_baseline"] = 1 - pt / PAPER["baseline"][0]
    data = {"config": cluster.source, "workload": workload, "requests": len(requests), "lower_bound_s": lb,
            "paper_lower_bound_s": PAPER["lower bound"][0], "rows": rows, "wall_s": time.perf_counter() - t0}
    md = to_markdown(data)
    if progress:
        progress(md)
    if out_dir:
        write_json(Path(out_dir) / "paper.json", data)
        (Path(out_dir) / "paper.md").write_text(md + "\n")
        if progress:
            progress(f"wrote {out_dir}/paper.json and {out_dir}/paper.md ({data['wall_s']:.1f} s)")
    return data


def _pct(x: float) -> str:
    return f"{100 * x + 0.0:+.1f} %"          # + 0.0 turns -0.0 into 0.0


def to_markdown(d: dict) -> str:
    lines = [f"LLaMA-65B x GSM8K ({d['requests']} requests), ours: `{Path(d['config']).name}` (simulated); "
             f"paper: Pang et al. 2025",
             "",
             "| policy | total time (s) | utilization (busy) | gap to bound | vs baseline | paper time (s) | "
             "paper utilization | paper vs baseline |",
             "|---|---|---|---|---|---|---|---|"]
    for p, r in d["rows"].items():
        paper = (f"{r['paper_makespan_s']:.2f} | {100 * r['paper_utilization']:.1f} % | "
                 f"{_pct(-r['paper_improvement_vs_baseline'])}" if "paper_makespan_s" in r else "- | - | -")
        lines.append(f"| {p} | {r['makespan_s']:.2f} | {100 * r['utilization_busy']:.1f} % | {100 * r['gap']:.1f} % | "
                     f"{_pct(-r['improvement_vs_baseline'])} | {paper} |")
    lb, plb = d["lower_bound_s"], d["paper_lower_bound_s"]
    base = d["rows"]["baseline"]["makespan_s"]
    lines.append(f"| lower bound | {lb:.2f} | | | {_pct(lb / base - 1)} | about {plb:.0f} | | "
                 f"{_pct(plb / PAPER['baseline'][0] - 1)} |")
    return "\n".join(lines)
