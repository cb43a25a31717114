"""`hybrid-ray bench baselines`: the hybrid against the faithful baselines on every bundled GPU config.

GSM8K on paper_llama65b, local, hetero and h100_llama7b; makespans (simulated seconds) of the
paper's v0 baseline, `vllm` (v1 engines behind least-loaded routing), `serve` (Ray Serve's
power-of-two-choices router with bounded replica queues) and the hybrid, the any-policy lower
bound and the hybrid's gap to it. This is the table in docs/scheduling.md section 7.
"""
from __future__ import annotations

from ..inputs import load_inputs
from ..jsonout import write_json
from ..metrics import summarize
from ..planner.bounds import lower_bound
from ..policies import build_scheduler
from ..simulator import simulate

CONFIGS = ("paper_llama65b", "local", "hetero", "h100_llama7b")
POLICIES = ("baseline", "vllm", "serve", "hybrid")


def rows(configs=CONFIGS, policies=POLICIES, workload: str = "gsm8k") -> list[dict]:
    out = []
    for cfg in configs:
        cl, reqs = load_inputs(cfg, workload)
        row: dict = {"config": cfg, "bound": lower_bound(cl, reqs).value_s}
        for p in policies:
            row[p] = summarize(simulate(cl, build_scheduler(p, cl, reqs), reqs)).makespan_s
        best = min(row[p] for p in policies if p != "hybrid")
        row["hybrid_vs_best_baseline"] = row["hybrid"] / best - 1
        row["hybrid_gap"] = row["hybrid"] / row["bound"] - 1
        out.append(row)
    return out


def table(data: list[dict], policies=POLICIES) -> str:
    head = "| config | " + " | ".join(policies) + " | bound | hybrid vs best baseline | hybrid's gap |"
    lines = [head, "|" + "---|" * (len(policies) + 4)]
    for r in data:
        lines.append(f"| {r['config']} | " + " | ".join(f"{r[p]:.2f}" for p in policies)
                     + f" | {r['bound']:.2f} | {100 * r['hybrid_vs_best_baseline']:+.1f} % | {100 * r['hybrid_gap']:.1f} % |")
    return "\n".join(lines)


def main(out: str | None = None) -> list[dict]:
    data = rows()
    print(table(data))
    if out:
        write_json(out, data)
    return data


if __name__ == "__main__":
    main()
