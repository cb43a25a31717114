"""Profile measurements -> fitted CostModel (least squares), with the fit error reported.

Two CSV formats are read (the header tells which):

* ours (``shared/data/profiles/h100_measured``, and what ``hybrid-ray profile`` writes):
  ``model,phase,batch,tokens_or_ctx,layers_run,ms_measured,ms_full_model`` -- a prefill row is
  ``batch`` prompts of ``tokens_or_ctx`` tokens each; a decode row is one step of ``batch``
  sequences with ``tokens_or_ctx`` tokens of context each.
* SplitwiseSim's ``perf_model.csv``: ``prompt_time`` (ms) is the prefill of ``batch_size`` prompts of
  ``prompt_size`` tokens; ``token_time`` (ms) is the mean decode step over ``token_size`` outputs,
  so its mean context per sequence is ``prompt_size + token_size / 2``. Repeats are averaged.

The fit minimises *relative* squared error (rows weighted by 1/y), because short and long
iterations matter equally to a scheduler; coefficients are constrained non-negative (a negative
per-token cost would make the planner prefer longer batches for free).
"""
from __future__ import annotations

import csv
import itertools
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .costmodel import CostModel, DecodeCost, PrefillCost
from .errors import WorkloadError


@dataclass(frozen=True, slots=True)
class ProfilePoint:
    phase: str        # "prefill" | "decode"
    batch: int        # prompts in the prefill, or sequences in the decode step
    tokens: int       # tokens per prompt (prefill) or context tokens per sequence (decode)
    seconds: float


@dataclass(frozen=True, slots=True)
class FitReport:
    prefill_max_rel_err: float
    prefill_mean_rel_err: float
    decode_max_rel_err: float
    decode_mean_rel_err: float
    n_prefill: int
    n_decode: int

    @property
    def max_rel_err(self) -> float:
        return max(self.prefill_max_rel_err, self.decode_max_rel_err)

    def lines(self) -> str:
        """The two error lines every fitting command prints."""
        return (f"  prefill relative error: max {100 * self.prefill_max_rel_err:.1f} %, "
                f"mean {100 * self.prefill_mean_rel_err:.1f} %\n"
                f"  decode relative error:  max {100 * self.decode_max_rel_err:.1f} %, "
                f"mean {100 * self.decode_mean_rel_err:.1f} %")


def load_profile(path: str | Path, model: str | None = None, hardware: str | None = None,
                 tensor_parallel: int | None = None) -> list[ProfilePoint]:
    """Read a profile CSV of either format; the filters select Splitwise rows."""
    path = Path(path)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise WorkloadError(f"{path}: profile has no rows")
    cols = set(rows[0])
    if {"phase", "batch", "tokens_or_ctx"} <= cols:
        col = "ms_full_model" if "ms_full_model" in cols else "ms_measured"
        return [ProfilePoint(r["phase"], int(r["batch"]), int(r["tokens_or_ctx"]), float(r[col]) / 1e3)
                for r in rows if model is None or r.get("model") == model]
    if {"prompt_size", "batch_size", "prompt_time", "token_time"} <= cols:
        return _splitwise_points(path, rows, model, hardware, tensor_parallel)
    raise WorkloadError(f"{path}: unknown profile format, columns {sorted(cols)}")


def _splitwise_points(path, rows, model, hardware, tp) -> list[ProfilePoint]:
    pre: dict[tuple, list[float]] = defaultdict(list)
    dec: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        if (model and r["model"] != model) or (hardware and r["hardware"] != hardware) or (
                tp and int(r["tensor_parallel"]) != tp):
            continue
        b, p, t = int(r["batch_size"]), int(r["prompt_size"]), int(r["token_size"])
        pre[(b, p)].append(float(r["prompt_time"]) / 1e3)
        dec[(b, p + t // 2)].append(float(r["token_time"]) / 1e3)
    if not pre:
        raise WorkloadError(f"{path}: no rows for model={model} hardware={hardware} tp={tp}")
    pts = [ProfilePoint("prefill", b, p, float(np.mean(v))) for (b, p), v in sorted(pre.items())]
    pts += [ProfilePoint("decode", b, c, float(np.mean(v))) for (b, c), v in sorted(dec.items())]
    return pts


def _nonneg_wls(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Relative-error least squares with non-negative coefficients (best over feature subsets)."""
    w = 1.0 / y
    best, best_err = np.zeros(X.shape[1]), np.inf
    for k in range(X.shape[1], 0, -1):
        for cols in itertools.combinations(range(X.shape[1]), k):
            c, *_ = np.linalg.lstsq(X[:, cols] * w[:, None], y * w, rcond=None)
            if np.any(c < 0):
                continue
            coef = np.zeros(X.shape[1])
            coef[list(cols)] = c
            err = float(np.sum(((X @ coef - y) * w) ** 2))
            if err < best_err:
                best, best_err = coef, err
    return best


def _fit_decode(pts: list[ProfilePoint]) -> DecodeCost:
    B = np.array([p.batch for p in pts], float)
    C = np.array([p.batch * p.tokens for p in pts], float)
    y = np.array([p.seconds for p in pts])
    c = _nonneg_wls(np.column_stack([np.ones_like(B), B, C]), y)
    return DecodeCost(float(c[0]), float(c[1]), float(c[2]))


def _fit_prefill(pts: list[ProfilePoint]) -> PrefillCost:
    """Roofline fit: try each split of the points into floor-bound and linear-bound by total tokens."""
    T = np.array([p.batch * p.tokens for p in pts], float)
    A = np.array([p.batch * p.tokens ** 2 for p in pts], float)
    y = np.array([p.seconds for p in pts])
    best, best_err = None, np.inf
    for thr in np.unique(T):
        lin = T >= thr
        if lin.sum() < 2:
            continue
        c = _nonneg_wls(np.column_stack([np.ones(lin.sum()), T[lin], A[lin]]), y[lin])
        below = ~lin
        floor = float(np.median(y[below] - c[2] * A[below])) if below.any() else 0.0
        cand = PrefillCost(max(floor, 0.0), float(c[0]), float(c[1]), float(c[2]))
        pred = np.array([CostModel(cand, DecodeCost(0, 0, 0)).prefill_time(t, a) for t, a in zip(T, A)])
        err = float(np.max(np.abs(pred - y) / y))
        if err < best_err:
            best, best_err = cand, err
    if best is None:
        c = _nonneg_wls(np.column_stack([np.ones_like(T), T, A]), y)
        best = PrefillCost(0.0, float(c[0]), float(c[1]), float(c[2]))
    return best


def fit_cost_model(points: list[ProfilePoint]) -> tuple[CostModel, FitReport]:
    """Fit prefill and decode separately; report relative errors on the fitted points."""
    pre = [p for p in points if p.phase == "prefill"]
    dec = [p for p in points if p.phase == "decode"]
    if len(pre) < 2 or len(dec) < 3:
        raise WorkloadError(f"need >= 2 prefill and >= 3 decode points, got {len(pre)} and {len(dec)}")
    model = CostModel(_fit_prefill(pre), _fit_decode(dec))
    pe = np.array([abs(model.prefill_time(p.batch * p.tokens, p.batch * p.tokens ** 2) - p.seconds) / p.seconds
                   for p in pre])
    de = np.array([abs(model.decode_time(p.batch, p.batch * p.tokens) - p.seconds) / p.seconds for p in dec])
    return model, FitReport(float(pe.max()), float(pe.mean()), float(de.max()), float(de.mean()), len(pre), len(dec))


def cost_model_yaml(model: CostModel, indent: int = 0) -> str:
    """A ``cost_model:`` block ready to paste into a cluster YAML."""
    pad = " " * indent
    p, d = model.prefill, model.decode
    return (f"{pad}cost_model:\n"
            f"{pad}  prefill: {{floor_s: {p.floor_s:.6g}, base_s: {p.base_s:.6g}, "
            f"per_token_s: {p.per_token_s:.6g}, per_token_sq_s: {p.per_token_sq_s:.6g}}}\n"
            f"{pad}  decode: {{base_s: {d.base_s:.6g}, per_seq_s: {d.per_seq_s:.6g}, "
            f"per_ctx_token_s: {d.per_ctx_token_s:.6g}}}\n")


@dataclass(frozen=True, slots=True)
class Calibration:
    """How a replay's measured iterations compare with a cost model, per iteration kind.

    ``measured_s`` / ``predicted_s`` are the kind's summed iteration times; the scales are the
    robust levels of their ratio for prefill and decode (``_level``; 1.0 where the replay ran no
    iteration of that kind).
    """

    iterations: dict[str, int]
    measured_s: dict[str, float]
    predicted_s: dict[str, float]
    prefill_scale: float
    decode_scale: float

    def lines(self) -> str:
        rows = [f"  {kind:7s} {self.iterations[kind]:6d} iterations  measured {self.measured_s[kind]:9.4f} s  "
                f"predicted {self.predicted_s[kind]:9.4f} s  x{self.measured_s[kind] / self.predicted_s[kind]:.3f}"
                for kind in sorted(self.iterations) if self.predicted_s[kind] > 0]
        rows.append(f"  scaled prefill x{self.prefill_scale:.3f}, decode x{self.decode_scale:.3f} "
                    f"(median over blocks of the run)")
        return "\n".join(rows)


CALIBRATION_BLOCKS = 9      # a phase's iterations are cut into this many consecutive blocks (fewer if short)
MIN_BLOCK_ITERATIONS = 20


def _level(measured: list[float], predicted: list[float]) -> float:
    """Measured / predicted time, robust to a passing disturbance of the host.

    The iterations (in run order) are cut into consecutive blocks of about equal predicted time;
    the ratio is the median of the blocks' ratios. A stall or a burst of another process's work
    inflates a block or two, not the median; with few iterations it is the plain ratio of sums.
    """
    total, spent = sum(predicted), sum(measured)
    if total <= 0 or spent <= 0:
        return 1.0
    k = max(1, min(CALIBRATION_BLOCKS, len(measured) // MIN_BLOCK_ITERATIONS))
    if k == 1:
        return spent / total
    ratios, m, p, edge = [], 0.0, 0.0, total / k
    for mi, pi in zip(measured, predicted):
        m, p = m + mi, p + pi
        if p >= edge and len(ratios) < k - 1:
            ratios.append(m / p)
            m = p = 0.0
    if p > 0:
        ratios.append(m / p)
    return float(np.median(ratios))


def calibrate(cost: CostModel, records) -> tuple[CostModel, Calibration]:
    """Scale ``cost``'s prefill and decode coefficients to the level that ``records`` measured.

    Why: a profile times each shape over and over on an otherwise idle engine; a run never repeats
    a shape and shares the host with its other replicas. Both change the *level* of every
    iteration's time, not the shape of the model (docs/engines.md, "Fidelity"), so a short replay
    of representative requests fixes the level: one factor per phase, time-weighted as the
    makespan is (``_level``). Mixed iterations are left out of the factors (they blend both).
    ``records`` are ``IterationRecord``s in run order, e.g. every replica's of a ``hybrid-ray run``.
    """
    measured: dict[str, list[float]] = defaultdict(list)
    predicted: dict[str, list[float]] = defaultdict(list)
    for r in records:
        measured[r.kind].append(r.end_s - r.start_s)
        predicted[r.kind].append(r.predicted_s(cost))
    if not measured:
        raise WorkloadError("calibration: the replay ran no iterations")
    pre, dec = _level(measured["prefill"], predicted["prefill"]), _level(measured["decode"], predicted["decode"])
    kinds = [k for k in measured if measured[k]]
    return cost.scaled(pre, dec), Calibration({k: len(measured[k]) for k in kinds},
                                              {k: sum(measured[k]) for k in kinds},
                                              {k: sum(predicted[k]) for k in kinds}, pre, dec)
