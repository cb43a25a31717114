"""RunRecord -> Summary: makespan, two utilizations, throughput, latency percentiles.

Definitions (all over the run's makespan T, from the first arrival to the last finish, with R
replicas):

* ``utilization_busy`` = sum of replicas' busy time / (R * T): the share of replica-time spent
  executing iterations. A replica that finished its share early and idles until the last one
  is done lowers it. This is the paper's "utilization": all requests are present at time 0, so
  the only idle time is the tail after each replica's last request, which is exactly what a
  better assignment (offline) and a better iteration rule (online) shrink.
* ``utilization_slots`` = time-weighted batch occupancy / (sum of max_batch_size * T): how full
  the batches were. It also counts iterations in which running sequences wait for a prefill,
  so it measures memory/slot use rather than useful work.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .simulator import RunRecord


@dataclass(slots=True)
class Summary:
    policy: str
    config: str
    requests_total: int
    requests_completed: int
    makespan_s: float
    utilization_busy: float
    utilization_slots: float
    throughput_tok_s: float
    output_tokens: int
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    tpot_p90_s: float
    tpot_p99_s: float
    e2e_p50_s: float
    e2e_p90_s: float
    e2e_p99_s: float
    preemptions: int
    moves: int
    iterations: int
    replica_finish_s: dict
    lower_bound_s: float | None = None
    gap: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else 0.0


def summarize(rec: RunRecord, lower_bound_s: float | None = None) -> Summary:
    seqs = rec.sequences
    done = [s for s in seqs if s.finish_s >= 0]
    arrival = np.array([s.req.arrival_s for s in done])
    first = np.array([s.first_token_s for s in done])
    finish = np.array([s.finish_s for s in done])
    out = np.array([s.req.output_tokens for s in done])
    t0 = float(arrival.min()) if len(done) else 0.0
    makespan = float(finish.max()) - t0 if len(done) else 0.0
    multi = out > 1
    tpot = (finish[multi] - first[multi]) / (out[multi] - 1)
    busy = sum(r.busy_s for r in rec.replicas)
    slot_time = sum(rec_.resident * (rec_.end_s - rec_.start_s) for r in rec.replicas for rec_ in r.records)
    slots = sum(r.max_batch for r in rec.replicas)
    span = makespan if makespan > 0 else 1.0
    gap = None
    if lower_bound_s:
        gap = makespan / lower_bound_s - 1.0
    return Summary(
        policy=rec.policy, config=rec.config, requests_total=len(seqs), requests_completed=len(done),
        makespan_s=makespan,
        utilization_busy=busy / (len(rec.replicas) * span),
        utilization_slots=slot_time / (slots * span),
        throughput_tok_s=float(out.sum()) / span, output_tokens=int(out.sum()),
        ttft_p50_s=_pct(first - arrival, 50), ttft_p90_s=_pct(first - arrival, 90), ttft_p99_s=_pct(first - arrival, 99),
        tpot_p50_s=_pct(tpot, 50), tpot_p90_s=_pct(tpot, 90), tpot_p99_s=_pct(tpot, 99),
        e2e_p50_s=_pct(finish - arrival, 50), e2e_p90_s=_pct(finish - arrival, 90), e2e_p99_s=_pct(finish - arrival, 99),
        preemptions=sum(s.preemptions for s in seqs), moves=rec.moves,
        iterations=sum(len(r.records) for r in rec.replicas),
        replica_finish_s={r.name: (r.records[-1].end_s - t0 if r.records else 0.0) for r in rec.replicas},
        lower_bound_s=lower_bound_s, gap=gap,
    )


def format_summary(s: Summary) -> str:
    """A readable table for the terminal."""
    rows = [
        ("policy", s.policy), ("config", s.config),
        ("requests", f"{s.requests_completed}/{s.requests_total} completed"),
        ("total inference time (makespan)", f"{s.makespan_s:.2f} s"),
    ]
    if s.lower_bound_s:
        rows.append(("lower bound / gap", f"{s.lower_bound_s:.2f} s / {100 * s.gap:.2f} %"))
    rows += [
        ("utilization (busy time)", f"{100 * s.utilization_busy:.1f} %"),
        ("utilization (batch slots)", f"{100 * s.utilization_slots:.1f} %"),
        ("throughput", f"{s.throughput_tok_s:,.0f} output tok/s ({s.output_tokens:,} tokens)"),
        ("TTFT p50 / p90 / p99", f"{s.ttft_p50_s:.3f} / {s.ttft_p90_s:.3f} / {s.ttft_p99_s:.3f} s"),
        ("TPOT p50 / p90 / p99", f"{1e3 * s.tpot_p50_s:.1f} / {1e3 * s.tpot_p90_s:.1f} / {1e3 * s.tpot_p99_s:.1f} ms"),
        ("E2E p50 / p90 / p99", f"{s.e2e_p50_s:.2f} / {s.e2e_p90_s:.2f} / {s.e2e_p99_s:.2f} s"),
        ("iterations / preemptions / moves", f"{s.iterations} / {s.preemptions} / {s.moves}"),
    ]
    fin = sorted(s.replica_finish_s.values())
    if fin:
        rows.append(("replica finish min / max", f"{fin[0]:.2f} / {fin[-1]:.2f} s"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(w)}  {v}" for k, v in rows)
