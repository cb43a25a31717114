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

Prediction error: each request's output-length prediction when it was first scheduled
(``Sequence.predicted_first``) against its true length (``generated`` at the finish): the mean
absolute error and Spearman's rank correlation (what sorting and packing depend on); and the same
for the prediction it started with (``predicted_output`` at the finish: an online predictor
re-predicts queued work, so for a batch all present at t=0 this is where its learning shows).

Prefix caching: ``cached_prompt_tokens`` sums the prompt tokens each finished request found in its
replica's prefix cache when first admitted (``Sequence.cached_tokens``, vLLM's
``prompt_tokens_details.cached_tokens``); ``prefix_hit_rate`` is that over all their prompt tokens.
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
    length_predictor: str = ""                 # oracle | quantile | online
    prediction_mae: float | None = None        # mean |first prediction - true output| (tokens)
    prediction_spearman: float | None = None   # rank correlation of first predictions and true outputs
    prediction_mae_start: float | None = None  # the same for the prediction each request started with
    prediction_spearman_start: float | None = None
    cached_prompt_tokens: int = 0              # prompt tokens served from the prefix cache (first admission)
    prefix_hit_rate: float = 0.0               # cached_prompt_tokens / prompt tokens of the finished requests

    def to_dict(self) -> dict:
        return asdict(self)


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else 0.0


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``; tied values share the average of their ranks."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])           # first index of each run of ties
    ends = np.r_[starts[1:], len(xs)]
    mean_rank = (starts + ends + 1) / 2.0                             # average of ranks starts+1 .. ends
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def spearman(a, b) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None when either side is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2:
        return None
    ra, rb = average_ranks(a) - (len(a) + 1) / 2.0, average_ranks(b) - (len(b) + 1) / 2.0
    den = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum()) / den if den > 0 else None


def prediction_error(seqs, at_start: bool = False) -> tuple[float | None, float | None]:
    """(MAE, Spearman) of finished sequences' first predictions (``at_start``: the predictions they
    started with) against their true output lengths."""
    pairs = [(s.predicted_output if at_start else s.predicted_first, s.generated) for s in seqs
             if s.finish_s >= 0 and s.predicted_first >= 0]
    if not pairs:
        return None, None
    pred, true = np.array(pairs, dtype=np.float64).T
    return float(np.abs(pred - true).mean()), spearman(pred, true)


def summarize(rec: RunRecord, lower_bound_s: float | None = None) -> Summary:
    seqs = rec.sequences
    done = [s for s in seqs if s.finish_s >= 0]
    arrival = np.array([s.req.arrival_s for s in done])
    first = np.array([s.first_token_s for s in done])
    finish = np.array([s.finish_s for s in done])
    out = np.array([s.generated for s in done])            # true lengths, learned at the finish
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
    mae, rho = prediction_error(done)
    mae_start, rho_start = prediction_error(done, at_start=True)
    cached = sum(s.cached_tokens for s in done)
    prompt = sum(s.req.prompt_tokens for s in done)
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
        lower_bound_s=lower_bound_s, gap=gap, length_predictor=str(rec.extra.get("predictor", "")),
        prediction_mae=mae, prediction_spearman=rho, prediction_mae_start=mae_start,
        prediction_spearman_start=rho_start,
        cached_prompt_tokens=cached, prefix_hit_rate=cached / prompt if prompt else 0.0,
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
    if s.cached_prompt_tokens:
        rows.append(("prefix cache hits", f"{s.cached_prompt_tokens:,} prompt tokens "
                                          f"({100 * s.prefix_hit_rate:.1f} % of the prompt tokens)"))
    if s.prediction_mae is not None:
        def rho(x):
            return f"{x:.3f}" if x is not None else "-"
        text = f"MAE {s.prediction_mae:.1f} tokens, rank corr. {rho(s.prediction_spearman)}"
        if s.prediction_mae_start is not None and s.prediction_mae_start != s.prediction_mae:
            text += f" (at start: {s.prediction_mae_start:.1f}, {rho(s.prediction_spearman_start)})"
        rows.append((f"length prediction ({s.length_predictor or '?'})", text))
    fin = sorted(s.replica_finish_s.values())
    if fin:
        rows.append(("replica finish min / max", f"{fin[0]:.2f} / {fin[-1]:.2f} s"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(w)}  {v}" for k, v in rows)
