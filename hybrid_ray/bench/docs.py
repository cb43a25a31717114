"""`hybrid-ray bench docs`: one command regenerates every table of figures in README.md and docs/*.md.

Why: a figure in the docs that no command reproduces goes stale silently as the scheduler changes.
Each generated table sits between HTML comments, invisible when rendered::

    <!-- bench:NAME -->            (or <!-- bench:NAME timing -->)
    ...the table, then "Regenerate: `hybrid-ray bench docs --only NAME`"
    <!-- /bench:NAME -->

and ``TABLES`` maps NAME to the function that returns the region's markdown, built from the bench
modules (``paper``, ``cases``, ``baselines``, ...), so a doc table and the bench that prints it
are the same code. ``bench docs`` rewrites the regions in place; ``--check`` only compares and
exits 1 listing the tables that differ.

Simulated tables are deterministic: every run plans with the planner's default budget
(``baselines.PLAN_OPTS``: `simulate`'s default, a budget scaled to the batch, no wall-clock limit),
so a loaded host gives the same numbers as a quiet one. Tables flagged ``timing`` hold wall-clock
measurements (decision latency, simulator speed, Ray runs, real engines): not reproducible, so
they are rewritten and checked only when named (``--only NAME``) or with ``--timing``.
"""
from __future__ import annotations

import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import HybridRayError
from . import baselines as bl
from .cases import BASELINES

OPEN = re.compile(r"^<!-- bench:(?P<name>[A-Za-z0-9_.-]+)(?P<flags>(?: [a-z]+)*) -->$")
CLOSE = re.compile(r"^<!-- /bench:(?P<name>[A-Za-z0-9_.-]+) -->$")
FLAGS = ("timing",)
DOC_FILES = ("README.md", "docs/*.md")


class DocsError(HybridRayError):
    """A doc file's markers are malformed, or ``--only`` names no table; the message says where."""


# -- the marked regions -------------------------------------------------------------------------------

@dataclass(slots=True)
class Region:
    """One marked table: ``lines[start + 1:end]`` of ``path`` is its body (markers excluded)."""
    path: Path
    name: str
    flags: tuple[str, ...]
    start: int
    end: int
    body: str = ""

    @property
    def timing(self) -> bool:
        return "timing" in self.flags


def doc_files(root: Path) -> list[Path]:
    out: list[Path] = []
    for pattern in DOC_FILES:
        out += sorted(root.glob(pattern))
    return [p for p in out if p.is_file()]


def find_regions(path: Path, text: str | None = None) -> list[Region]:
    """The marked regions of one file, in order; a stray, unclosed or nested marker is a DocsError."""
    lines = (path.read_text(encoding="utf-8") if text is None else text).split("\n")
    out: list[Region] = []
    cur: Region | None = None
    for i, line in enumerate(lines):
        s = line.strip()
        if not s.startswith(("<!-- bench:", "<!-- /bench:")):
            continue
        m, c = OPEN.match(s), CLOSE.match(s)
        where = f"{path}:{i + 1}"
        if m:
            if cur is not None:
                raise DocsError(f"{where}: <!-- bench:{m['name']} --> opens inside bench:{cur.name} "
                                f"(line {cur.start + 1}); close that one first with <!-- /bench:{cur.name} -->")
            flags = tuple(m["flags"].split())
            bad = [f for f in flags if f not in FLAGS]
            if bad:
                raise DocsError(f"{where}: unknown flag {bad[0]!r} on bench:{m['name']}; flags: {', '.join(FLAGS)}")
            cur = Region(path, m["name"], flags, i, -1)
        elif c:
            if cur is None or c["name"] != cur.name:
                raise DocsError(f"{where}: <!-- /bench:{c['name']} --> closes nothing"
                                + (f" (bench:{cur.name} is open)" if cur else ""))
            cur.end, cur.body = i, "\n".join(lines[cur.start + 1:i])
            out.append(cur)
            cur = None
        else:
            raise DocsError(f"{where}: malformed marker {s!r}: expected <!-- bench:NAME --> or "
                            f"<!-- bench:NAME timing --> ... <!-- /bench:NAME -->")
    if cur is not None:
        raise DocsError(f"{path}:{cur.start + 1}: <!-- bench:{cur.name} --> has no closing <!-- /bench:{cur.name} -->")
    return out


def all_regions(root: Path) -> list[Region]:
    """Every marked region under ``root``; a name used twice is a DocsError."""
    regions = [r for p in doc_files(root) for r in find_regions(p)]
    seen: dict[str, Region] = {}
    for r in regions:
        if r.name in seen:
            o = seen[r.name]
            raise DocsError(f"{r.path}:{r.start + 1}: bench:{r.name} is already marked at {o.path}:{o.start + 1}; "
                            f"rename one")
        seen[r.name] = r
    return regions


# -- the registry ---------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Table:
    """A generated table: ``make()`` returns its markdown; ``also`` names the command that prints the
    same figures; ``timing``: wall-clock figures, rewritten and checked only when asked for."""
    name: str
    make: Callable[[], str]
    what: str
    timing: bool = False
    also: str = ""

    def regenerate_line(self) -> str:
        """The line under the table that says which command reproduces it."""
        note = f" (the same figures: `{self.also}`)" if self.also else ""
        if self.timing:
            note += "; wall-clock timings: `--check` skips them unless named"
        return f"Regenerate: `hybrid-ray bench docs --only {self.name}`{note}"

    def render(self) -> str:
        return f"{self.make().rstrip()}\n\n{self.regenerate_line()}"


TABLES: dict[str, Table] = {}


def table(name: str, what: str, timing: bool = False, also: str = ""):
    def deco(fn: Callable[[], str]) -> Callable[[], str]:
        TABLES[name] = Table(name, fn, what, timing, also)
        return fn
    return deco


# -- shared runs (cached: several tables read the same simulation) ----------------------------------------

@cache
def _inputs(config: str, workload: str, limit: int | None = None):
    if limit is not None:
        from ..inputs import load_inputs
        return load_inputs(config, workload, limit)
    return bl.load_case(config, workload)


@cache
def _bound(config: str, workload: str) -> float:
    from ..planner.bounds import lower_bound
    cl, reqs = _inputs(config, workload)
    return lower_bound(cl, reqs).value_s


@cache
def _history(config: str, workload: str) -> tuple[tuple[int, int], ...]:
    """The (prompt, output) pairs `--history` reads back from the oracle hybrid run's `-o` file."""
    from ..history import load_history
    from ..openai_batch import write_simulated_output
    cl, _ = _inputs(config, workload)
    rec, _s = _sim(config, workload, "hybrid", "oracle", False)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_simulated_output(workload, Path(tmp) / "hybrid_oracle.jsonl", cl, rec)
        return tuple(load_history(path))


@cache
def _sim(config: str, workload: str, policy: str, lengths: str = "oracle", history: bool = False):
    """(record, summary) of ``hybrid-ray simulate --config C --workload W --policy P --lengths L``."""
    from ..metrics import summarize
    from ..planning import build_scheduler
    from ..simulator import simulate
    cl, reqs = _inputs(config, workload)
    hist = list(_history(config, workload)) if history else None
    rec = simulate(cl, build_scheduler(policy, cl, reqs, lengths=lengths, history=hist, **bl.PLAN_OPTS), reqs)
    return rec, summarize(rec, _bound(config, workload))


def _sum(config: str, workload: str, policy: str, lengths: str = "oracle", history: bool = False):
    return _sim(config, workload, policy, lengths, history)[1]


@cache
def _paper() -> dict:
    from .paper import run_paper
    return run_paper(out_dir=None, progress=None, plan_opts=bl.PLAN_OPTS)


@cache
def _cases(n: int = 100, seed: int = 0) -> dict:
    """`bench cases --n 100 --seed 0` (n // 5 long-context cases too), each plan with `simulate`'s
    default budget and no wall limit: the same on a loaded host."""
    from ..workload import load_gsm8k
    from .cases import case_seeds, report, run_case
    t0 = time.perf_counter()
    pool = load_gsm8k()
    results = [run_case(i, s, pool if kind == "gsm8k" else None, kind=kind)
               for i, s, kind in case_seeds(n, seed, n // 5)]
    return report(results, seed, None, time.perf_counter() - t0, progress=None)


@cache
def _baselines() -> list[dict]:
    return bl.rows()


def _pct(x: float, sign: bool = False) -> str:
    return f"{100 * x + 0.0:{'+' if sign else ''}.1f} %"


def _opt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


PAPER_CFG = "paper_llama65b"
LABELS = {"baseline": "baseline (v0: least-loaded + FCFS prefill-first)",
          "vllm": "vllm (least-loaded + vLLM v1 engines)",
          "serve": "serve (tuned: power-of-two router, bounded queues, v1 engines)",
          "serve-llm": "serve-llm (Serve LLM's default: power-of-two router, unbounded queues, v1 engines)",
          "raydata": "raydata (Ray Data LLM blocks, v1 engines)",
          "lpt-engine": "lpt-engine (least-loaded + longest-first v1 engines)",
          "chunked": "chunked (least-loaded + Sarathi, 512)",
          "offline": "offline (plan + FCFS)",
          "hybrid": "hybrid (plan + Lagrangian + controller)"}
PAPER_ROWS = BASELINES + ("offline", "hybrid")


# -- README.md ------------------------------------------------------------------------------------------

@table("readme-paper", "README: GSM8K x paper_llama65b, every faithful baseline, offline and hybrid beside the paper")
def readme_paper() -> str:
    from .paper import PAPER
    lines = ["| policy | total time | busy utilization | gap to bound | paper |", "|---|---|---|---|---|"]
    for p in PAPER_ROWS:
        s = _sum(PAPER_CFG, "gsm8k", p)
        paper = f"{PAPER[p][0]:.2f} s / {PAPER[p][1]:.1f} %" if p in PAPER else "-"
        name = "baseline (v0)" if p == "baseline" else p
        lines.append(f"| {name} | {s.makespan_s:.2f} s | {_pct(s.utilization_busy)} | {_pct(s.gap)} | {paper} |")
    lines.append(f"| lower bound | {_bound(PAPER_CFG, 'gsm8k'):.2f} s | | | about {PAPER['lower bound'][0]:.0f} s |")
    return "\n".join(lines)


# -- docs/benchmarks.md ---------------------------------------------------------------------------------

@table("paper", "benchmarks: the paper's table beside ours", also="hybrid-ray bench paper")
def paper_table() -> str:
    from .paper import to_markdown
    return to_markdown(_paper())


AZURE = ("azure_llama13b", "azure-conv")


@table("azure-conv", "benchmarks: the Azure conversation trace with its arrival times, every faithful baseline")
def azure_conv() -> str:
    lines = ["| policy | total time (s) | busy util. | slot util. | TTFT p50 / p90 / p99 (s) |", "|---|---|---|---|---|"]
    for p in BASELINES + ("hybrid",):
        s = _sum(*AZURE, p)
        lines.append(f"| {p} | {s.makespan_s:.2f} | {_pct(s.utilization_busy)} | {_pct(s.utilization_slots)} | "
                     f"{s.ttft_p50_s:.2f} / {s.ttft_p90_s:.2f} / {s.ttft_p99_s:.2f} |")
    return "\n".join(lines)


def _case_arrays(data: dict, policy: str, key: str = "makespan_s", cases: list | None = None) -> np.ndarray:
    return np.array([c[key][policy] for c in (data["cases"] if cases is None else cases)], dtype=float)


@table("cases-policies", "benchmarks: the case study, every policy against the v0 baseline",
       also="hybrid-ray bench cases --n 100 --seed 0")
def cases_policies() -> str:
    d = _cases()
    base, ubase = _case_arrays(d, "baseline"), _case_arrays(d, "baseline", "utilization_busy")
    lines = [f"{d['n']} cases (seed {d['seed']}): makespan reduction against the v0 baseline and busy-utilization "
             f"gain, per case", "",
             "| policy | makespan reduction vs baseline: mean / min / max | busy-utilization gain (points): "
             "mean / min / max |", "|---|---|---|"]
    for p in [p for p in PAPER_ROWS if p != "baseline" and p in d["cases"][0]["makespan_s"]]:
        red = 1 - _case_arrays(d, p) / base
        gain = 100 * (_case_arrays(d, p, "utilization_busy") - ubase)
        lines.append(f"| {p} | {_pct(red.mean())} / {_pct(red.min())} / {_pct(red.max())} | "
                     f"{gain.mean():.1f} / {gain.min():.1f} / {gain.max():.1f} |")
    return "\n".join(lines)


@table("cases-hybrid", "benchmarks: the case study, the hybrid against each policy, per kind of case",
       also="hybrid-ray bench cases --n 100 --seed 0")
def cases_hybrid() -> str:
    d = _cases()
    kinds = [("all", d["cases"])] + [(k, [c for c in d["cases"] if c.get("kind", "gsm8k") == k])
                                     for k in ("gsm8k", "long")]
    against = [p for p in PAPER_ROWS if p != "hybrid" and p in d["cases"][0]["makespan_s"]]
    lines = ["| cases | against | mean | min | max | worse | worst loss | utilization (points, mean) |",
             "|---|---|---|---|---|---|---|---|"]
    for kind, cs in kinds:
        if not cs:
            continue
        hyb, uh = _case_arrays(d, "hybrid", cases=cs), _case_arrays(d, "hybrid", "utilization_busy", cs)
        rows = [(p, _case_arrays(d, p, cases=cs), _case_arrays(d, p, "utilization_busy", cs)) for p in against]
        best = np.min([r[1] for r in rows if r[0] in BASELINES], axis=0)
        rows.insert(len([p for p in against if p in BASELINES]), ("best baseline", best, None))
        for p, other, uo in rows:
            red = 1 - hyb / other
            lost = red[red < -1e-9]
            util = f"{100 * (uh - uo).mean():+.1f}" if uo is not None else "-"
            lines.append(f"| {kind} ({len(cs)}) | {p} | {_pct(red.mean())} | {_pct(red.min())} | {_pct(red.max())} | "
                         f"{lost.size} of {len(cs)} | {f'{-100 * lost.min():.2f} %' if lost.size else '-'} | {util} |")
    gap = np.array([c["makespan_s"]["hybrid"] / c["lower_bound_s"] - 1 for c in d["cases"]])
    lines += ["", f"Hybrid's gap to the lower bound over the {len(gap)} cases: mean {_pct(gap.mean())}, "
                  f"max {_pct(gap.max())}."]
    return "\n".join(lines)


@table("simscale", "benchmarks: simulator speed, 100k / 1M requests", timing=True, also="hybrid-ray bench simscale")
def simscale_table() -> str:
    from . import simscale
    lines = ["| requests | replicas | policy | build (s) | simulate (s) | iterations | makespan (s) |",
             "|---|---|---|---|---|---|---|"]
    for n, r in simscale.CASES:
        x = simscale.row(n, r)
        lines.append(f"| {n:,} | {r} | {x['policy']} | {x['build_s']:.2f} | {x['simulate_s']:.2f} | "
                     f"{x['iterations']:,} | {x['makespan_s']:.3f} |")
    return "\n".join(lines)


@table("planscale", "benchmarks: the whole plan's wall time, 1k to 1M requests", timing=True,
       also="hybrid-ray bench planscale")
def planscale_table() -> str:
    from .planscale import SIZES, format_rows, row
    return format_rows([row(n) for n in SIZES])


@table("perf", "benchmarks: planner, decision latency, simulator and Ray runtime speed", timing=True,
       also="hybrid-ray bench perf")
def perf_table() -> str:
    from .perf import format_perf, run_perf
    return format_perf(run_perf(out=None, progress=None))


# -- docs/scheduling.md ---------------------------------------------------------------------------------

@table("gap-decomposition", "scheduling section 7: where the hybrid's time goes, per replica, against the bound")
def gap_decomposition() -> str:
    """Each replica's busy time split into the decode base of its occupied slots, the base of its empty
    slots, the per-token decode part (lin) and what prefills add beyond a decode step; averaged."""
    lines = ["| config (GSM8K) | hybrid (s) | bound (s) | gap | full-slot base + lin (s) | empty slots (s) | "
             "prefill extra (s) |", "|---|---|---|---|---|---|---|"]
    for cfg in bl.CONFIGS:
        rec, s = _sim(cfg, "gsm8k", "hybrid")
        used = empty = extra = 0.0
        for r in rec.replicas:
            d, b = r.cost.decode, r.max_batch
            for x in r.records:
                t = x.end_s - x.start_s
                if x.kind == "prefill":
                    extra += t
                    continue
                lin = d.per_seq_s * x.batch + d.per_ctx_token_s * x.ctx_tokens
                used += d.base_s * x.batch / b + lin
                empty += d.base_s * (b - x.batch) / b
                extra += t - d.base_s - lin
        n = len(rec.replicas)
        lines.append(f"| {cfg} | {s.makespan_s:.2f} | {s.lower_bound_s:.2f} | {_pct(s.makespan_s / s.lower_bound_s - 1)} | "
                     f"{used / n:.2f} | {empty / n:.2f} | {extra / n:.2f} |")
    return "\n".join(lines)


@table("rule-ablation", "scheduling section 6: where the hybrid's gain comes from, one plan, the rule's settings")
def rule_ablation() -> str:
    """GSM8K x paper_llama65b, the work-balanced plan fixed (no bands, no tuning), the online rule varied."""
    from dataclasses import replace

    from ..metrics import summarize
    from ..planning import build_scheduler, make_plan
    from ..simulator import simulate
    cl, reqs = _inputs(PAPER_CFG, "gsm8k")
    plan = make_plan(cl, reqs, bands="off", **bl.PLAN_OPTS)
    rows = [("offline (plan + FCFS prefill-first)", "offline", {})]
    rows += [(f"prefill or decode only, lambda = {lam:g}", "hybrid", {"allow_mixed": False, "multiplier": lam})
             for lam in (1.0, 1e6)]
    rows += [(f"mixing allowed, lambda = {lam:g}", "hybrid", {"multiplier": lam}) for lam in (0.1, 0.5, 1.0, 2.0, 1e6)]
    lines = ["| the plan's requests run with | total time (s) | gap to bound |", "|---|---|---|"]
    for label, policy, knobs in rows:
        c = replace(cl, policy={"hybrid": knobs} if knobs else {})
        s = summarize(simulate(c, build_scheduler(policy, c, reqs, plan=plan), reqs), _bound(PAPER_CFG, "gsm8k"))
        lines.append(f"| {label} | {s.makespan_s:.2f} | {_pct(s.makespan_s / s.lower_bound_s - 1)} |")
    return "\n".join(lines)


@table("lengths", "scheduling section 5: known, quantile and learned lengths on GSM8K x paper_llama65b")
def lengths_table() -> str:
    w = (PAPER_CFG, "gsm8k")
    lines = ["| policy | lengths | total time (s) | busy util. | moves | MAE first / at start (tokens) | "
             "rank corr. first / at start |", "|---|---|---|---|---|---|---|"]
    for label, lengths, hist in (("oracle", "oracle", False), ("quantile", "quantile", False),
                                 ("online", "online", False), ("online + history", "online", True)):
        s = _sum(*w, "hybrid", lengths, hist)
        lines.append(f"| hybrid | {label} | {s.makespan_s:.2f} | {_pct(s.utilization_busy)} | {s.moves} | "
                     f"{_opt(s.prediction_mae, '.1f')} / {_opt(s.prediction_mae_start, '.1f')} | "
                     f"{_opt(s.prediction_spearman, '.3f')} / {_opt(s.prediction_spearman_start, '.3f')} |")
    for p in ("offline", "lpt-engine"):
        ss = [_sum(*w, p, lengths) for lengths in ("oracle", "quantile", "online")]
        lines.append(f"| {p} | oracle / quantile / online | {' / '.join(f'{s.makespan_s:.2f}' for s in ss)} | "
                     f"{' / '.join(f'{100 * s.utilization_busy:.1f}' for s in ss)} % | "
                     f"{' / '.join(str(s.moves) for s in ss)} | | |")
    s = _sum(*w, "baseline")
    lines.append(f"| baseline | any | {s.makespan_s:.2f} | {_pct(s.utilization_busy)} | {s.moves} | | |")
    return "\n".join(lines)


@table("results-paper", "scheduling section 6: GSM8K x paper_llama65b, every policy and the bound")
def results_paper() -> str:
    from .paper import PAPER
    lines = ["| policy | total time (s) | busy utilization | gap to bound | paper |", "|---|---|---|---|---|"]
    for p in PAPER_ROWS:
        s = _sum(PAPER_CFG, "gsm8k", p)
        paper = f"{PAPER[p][0]:.2f} s / {PAPER[p][1]:.1f} %" if p in PAPER else "-"
        lines.append(f"| {LABELS[p]} | {s.makespan_s:.2f} | {_pct(s.utilization_busy)} | {_pct(s.gap)} | {paper} |")
    lines.append(f"| lower bound | {_bound(PAPER_CFG, 'gsm8k'):.2f} | | | about {PAPER['lower bound'][0]:.0f} s |")
    return "\n".join(lines)


@table("results-workloads", "scheduling section 6: GSM8K with known and quantile lengths, the Azure conversation trace")
def results_workloads() -> str:
    lines = ["| workload | lengths | policy | total time (s) | busy util. | TTFT p50 / p99 (s) | preemptions |",
             "|---|---|---|---|---|---|---|"]
    rows = [("GSM8K", (PAPER_CFG, "gsm8k"), "-", p, "oracle") for p in BASELINES]
    rows += [("GSM8K", (PAPER_CFG, "gsm8k"), L, p, L) for L in ("oracle", "quantile") for p in ("offline", "hybrid")]
    rows += [("Azure conv", AZURE, "-", p, "oracle") for p in BASELINES]
    rows += [("Azure conv", AZURE, L, "hybrid", L) for L in ("oracle", "quantile")]
    for wl, w, label, p, lengths in rows:
        s = _sum(*w, p, lengths)
        lines.append(f"| {wl} | {label} | {p} | {s.makespan_s:.2f} | {_pct(s.utilization_busy)} | "
                     f"{s.ttft_p50_s:.2f} / {s.ttft_p99_s:.2f} | {s.preemptions} |")
    return "\n".join(lines)


@table("baselines", "scheduling section 7: the hybrid against every faithful baseline, GSM8K and Azure batch",
       also="hybrid-ray bench baselines")
def baselines_table() -> str:
    return bl.table(_baselines())


@table("prefix", "scheduling section 8: prefix workloads (document QA, few-shot) with prefix caching, every "
       "policy, hit rates and the prefix-aware bound", also="hybrid-ray bench baselines")
def prefix_table() -> str:
    return bl.prefix_table(bl.prefix_rows())


@table("mixed-tasks", "scheduling section 5: the mixed-task batch with a 600-request pilot history, learned "
       "lengths and cost noise 0.05, every bundled GPU config")
def mixed_tasks_table() -> str:
    return bl.mixed_table([bl.mixed_row(c) for c in bl.CONFIGS])


# -- docs/engines.md (real engines) ---------------------------------------------------------------------

@table("fidelity", "engines: cost model fitted and calibrated on the tiny model vs real runs", timing=True,
       also="hybrid-ray bench fidelity")
def fidelity_table() -> str:
    from . import fidelity
    from ..engines.transformers import TransformersEngine
    engine = TransformersEngine("tiny", threads=1)
    cost, fit = fidelity.fit_row(engine)
    rows = [fidelity.one_replica_row(engine, cost), fidelity.ray_row(cost)]
    lines = [f"Fit on the default grid: prefill max error {_pct(fit['prefill_max_rel_err'])}, decode "
             f"{_pct(fit['decode_max_rel_err'])}.", "",
             "| setting (2-core host) | calibration (prefill / decode) | real runs (s) | simulated (s) | "
             "real / simulated makespan (median) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['what']} | x{r['prefill_scale']:.2f} / x{r['decode_scale']:.2f} | "
                     f"{', '.join(f'{x:.3f}' for x in r['real_s'])} | {r['simulated_s']:.3f} | {r['ratio']:.2f} |")
    return "\n".join(lines)


@table("vs-vllm", "engines: hybrid-ray beside vLLM, vllm run_batch and Ray Data LLM on CPU replicas", timing=True,
       also="hybrid-ray bench vs-vllm --n 200 --model DIR")
def vs_vllm_table() -> str:
    from ..errors import UsageError
    from . import vs_vllm
    if not _importable("vllm"):
        raise UsageError("bench docs --only vs-vllm needs vLLM: run it with the vLLM venv's hybrid-ray "
                         "(.venv-vllm/bin/hybrid-ray bench docs --only vs-vllm)")
    with tempfile.TemporaryDirectory() as tmp:
        data = vs_vllm.main(["--n", "200", "--replicas", "2", "--out", str(Path(tmp) / "vs_vllm.json")])
    return vs_vllm.format_table(data["systems"])


def _importable(name: str) -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# -- docs/runtime.md (Ray runs) -------------------------------------------------------------------------

RUNTIME_ROWS = (("paper_llama65b", "gsm8k", 120, "oracle", ("baseline", "chunked", "offline", "hybrid", "lpt-engine")),
                ("paper_llama65b", "gsm8k", None, "oracle", ("baseline", "hybrid")),
                ("paper_llama65b", "gsm8k", 120, "quantile", ("offline", "hybrid")),
                ("local", "gsm8k", None, "oracle", ("raydata",)),
                ("local", "azure-conv", 500, "oracle", ("baseline", "hybrid")))


@table("run-vs-simulate", "runtime: `run` on local Ray actors against `simulate`, same inputs", timing=True)
def run_vs_simulate() -> str:
    from ..metrics import summarize
    from ..planning import build_scheduler
    from ..runtime import RunOptions, run
    from ..simulator import simulate
    lines = ["| config / workload | policy | run makespan | simulate makespan |", "|---|---|---|---|"]
    for cfg, wl, limit, lengths, policies in RUNTIME_ROWS:
        cl, reqs = _inputs(cfg, wl, limit)
        what = f"{cfg}, {'GSM8K' if wl == 'gsm8k' else wl} {len(reqs):,}" + (
            f", `--lengths {lengths}`" if lengths != "oracle" else "")
        for p in policies:
            # emulated replicas reserve a tenth of a CPU each, so that the GPU configs run on any host;
            # planned policies start on the full plan, as `simulate` does (not on the initial one)
            res = run(RunOptions(config=cfg, workload=wl, limit=limit, policy=p, lengths=lengths, progress=False,
                                 cpus_per_replica=0.1, wait_for_plan=True))
            sim = summarize(simulate(cl, build_scheduler(p, cl, reqs, lengths=lengths), reqs))
            lines.append(f"| {what} | {p} | {res.summary.makespan_s:.3f} s | {sim.makespan_s:.3f} s |")
    return "\n".join(lines)


# -- the command ------------------------------------------------------------------------------------------

def default_root() -> Path:
    """The checkout the docs live in: the current folder if it holds them, else this package's checkout."""
    for cand in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (cand / "README.md").is_file() and (cand / "docs").is_dir():
            return cand
    return Path.cwd()


@dataclass(slots=True)
class Outcome:
    name: str
    path: Path
    status: str            # changed | unchanged | skipped (timing) | differs
    seconds: float = 0.0


@dataclass(slots=True)
class Report:
    outcomes: list[Outcome] = field(default_factory=list)

    def names(self, status: str) -> list[str]:
        return [o.name for o in self.outcomes if o.status == status]


def check_registry(regions: list[Region]) -> None:
    """Every marker has a generator, every generator a marker, and the timing flags agree."""
    marked = {r.name: r for r in regions}
    for r in regions:
        if r.name not in TABLES:
            raise DocsError(f"{r.path}:{r.start + 1}: bench:{r.name} has no generator in hybrid_ray/bench/docs.py "
                            f"(known: {', '.join(TABLES)})")
        if r.timing != TABLES[r.name].timing:
            want = "<!-- bench:%s timing -->" % r.name if TABLES[r.name].timing else "<!-- bench:%s -->" % r.name
            raise DocsError(f"{r.path}:{r.start + 1}: bench:{r.name}: expected the marker {want}")
    missing = [n for n in TABLES if n not in marked]
    if missing:
        raise DocsError(f"no <!-- bench:{missing[0]} --> marker in README.md or docs/*.md for the generator "
                        f"{missing[0]!r}; add the marked region")


def regenerate(root: Path | str | None = None, only: list[str] | None = None, check: bool = False,
               timing: bool = False, progress: Callable[[str], None] | None = print) -> Report:
    """Rewrite (or with ``check`` compare) the marked tables; timing ones only if named or ``timing``."""
    root = Path(root) if root else default_root()
    if not (root / "README.md").is_file():
        raise DocsError(f"--root {root}: no README.md there; run from the hybrid-ray checkout or give --root DIR")
    regions = all_regions(root)
    check_registry(regions)
    unknown = [n for n in (only or []) if n not in TABLES]
    if unknown:
        raise DocsError(f"--only {unknown[0]}: no such table; choose from {', '.join(TABLES)}")
    report = Report()
    by_file: dict[Path, list[tuple[Region, str]]] = {}
    for r in regions:
        if only and r.name not in only:
            continue
        if r.timing and not timing and not only:
            report.outcomes.append(Outcome(r.name, r.path, "skipped (timing)"))
            continue
        t0 = time.perf_counter()
        body = TABLES[r.name].render()
        same = body.strip("\n") == r.body.strip("\n")
        status = "unchanged" if same else ("differs" if check else "changed")
        out = Outcome(r.name, r.path, status, time.perf_counter() - t0)
        report.outcomes.append(out)
        if progress:
            progress(f"{r.name:18s} {_rel(r.path, root):22s} {status} ({out.seconds:.1f} s)")
        if not same and not check:
            by_file.setdefault(r.path, []).append((r, body))
    for path, edits in by_file.items():
        # the regions found again now: the file may have been edited while the tables ran (minutes)
        text = path.read_text(encoding="utf-8")
        now = {r.name: r for r in find_regions(path, text)}
        missing = [r.name for r, _ in edits if r.name not in now]
        if missing:
            raise DocsError(f"{path}: bench:{missing[0]} was removed while its table ran; nothing written to this file")
        lines = text.split("\n")
        for r, body in sorted(((now[r.name], body) for r, body in edits), key=lambda e: -e[0].start):
            lines[r.start + 1:r.end] = body.split("\n")      # bottom up: earlier line numbers hold
        path.write_text("\n".join(lines), encoding="utf-8")
    return report


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def run_docs(only: list[str] | None = None, check: bool = False, timing: bool = False,
             root: str | None = None) -> int:
    """The CLI entry: 0 when done (or nothing differs), 1 when ``check`` found tables that differ."""
    t0 = time.perf_counter()
    rep = regenerate(root, only, check, timing)
    skipped = rep.names("skipped (timing)")
    if skipped:
        print(f"skipped (wall-clock timings; name them with --only, or --timing): {', '.join(skipped)}")
    if check:
        diff = rep.names("differs")
        if diff:
            print(f"out of date: {', '.join(diff)}; run: hybrid-ray bench docs --only {' '.join(diff)}",
                  file=sys.stderr)
            return 1
        print(f"every checked table is up to date ({time.perf_counter() - t0:.0f} s)")
        return 0
    changed = rep.names("changed")
    print(f"{len(changed)} table(s) rewritten{': ' + ', '.join(changed) if changed else ''} "
          f"({time.perf_counter() - t0:.0f} s)")
    return 0


__all__ = ["DocsError", "Region", "TABLES", "Table", "all_regions", "check_registry", "find_regions",
           "regenerate", "run_docs"]
